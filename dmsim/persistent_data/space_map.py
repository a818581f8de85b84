"""Space maps (dm-space-map-common.c, -disk.c, -metadata.c): reference counts of blocks, on disk.

The format is the kernel's.  Counts are 2 bits a block in *bitmap* blocks (csum, padding,
blocknr, then little-endian words; a block's high bit at ``2*i``, low bit at ``2*i + 1``); 3
means "see the overflow btree" (block -> le32 count).  An *index entry* per bitmap (le64
blocknr, le32 nr_free, le32 none_free_before) says where it lives.  The root written into the
superblock is le64 nr_blocks, nr_allocated, bitmap_root, ref_count_root:

* the **disk** space map (data blocks) keeps its index entries in a btree of 16-byte values;
* the **metadata** space map keeps them in one *index* block of up to 255 entries, and counts
  the blocks it is itself made of, in itself.

How counts change in between is ours: they are held in memory (bitmaps loaded on first use)
and written at commit, each changed bitmap to a freshly allocated block.  The metadata space
map's commit runs to a fixed point, since writing its bitmaps allocates blocks that change
its bitmaps.  As in the kernel, a block freed in a transaction is not handed out again before
the commit (the committed metadata may still point at it), and allocation goes on from where
the last one stopped, going back to the start when it reaches the end.
"""
import errno
import struct

from .btree import BTreeInfo, ValueType
from .errors import MetadataError, NoSpace
from .transaction_manager import TransactionManager, replace_block
from .validators import BITMAP, INDEX

BITMAP_HEADER_SIZE = 16
ENTRIES_PER_BYTE = 4
ENTRIES_PER_BITMAP = (4096 - BITMAP_HEADER_SIZE) * ENTRIES_PER_BYTE  # 16320
_BITMAP_BYTES = 4096 - BITMAP_HEADER_SIZE
MAX_METADATA_BITMAPS = 255
METADATA_MAX_BLOCKS = MAX_METADATA_BITMAPS * ENTRIES_PER_BITMAP
SPACE_MAP_ROOT_SIZE = 128

_ROOT = struct.Struct("<QQQQ")
_INDEX_ENTRY = struct.Struct("<QII")
# counts 1 and 2 are stored with their two bits swapped (high bit first)
_SWAP = bytes([0, 2, 1, 3]) + bytes(252)
_MASK = int.from_bytes(b"\x03" * _BITMAP_BYTES, "little")


def decode_bitmap(words: bytes | bytearray) -> bytearray:
    """A bitmap block's words as one byte per entry (0, 1, 2, or 3 for "overflow")."""
    x = int.from_bytes(words, "little")
    out = bytearray(ENTRIES_PER_BITMAP)
    for k in range(ENTRIES_PER_BYTE):
        out[k::ENTRIES_PER_BYTE] = ((x >> (2 * k)) & _MASK).to_bytes(_BITMAP_BYTES, "little")
    return out.translate(_SWAP)


def encode_bitmap(entries: bytes | bytearray) -> bytes:
    """Inverse of :func:`decode_bitmap`."""
    t = bytes(entries).translate(_SWAP)
    x = 0
    for k in range(ENTRIES_PER_BYTE):
        x |= int.from_bytes(t[k::ENTRIES_PER_BYTE], "little") << (2 * k)
    return x.to_bytes(_BITMAP_BYTES, "little")


def pack_root(nr_blocks: int, nr_allocated: int, bitmap_root: int, ref_count_root: int) -> bytes:
    return _ROOT.pack(nr_blocks, nr_allocated, bitmap_root, ref_count_root).ljust(SPACE_MAP_ROOT_SIZE, b"\0")


def unpack_root(raw: bytes) -> tuple[int, int, int, int]:
    """(nr_blocks, nr_allocated, bitmap_root, ref_count_root)."""
    nr_blocks, nr_allocated, bitmap_root, ref_count_root = _ROOT.unpack_from(raw, 0)
    return nr_blocks, nr_allocated, bitmap_root, ref_count_root


class IndexEntry:
    """One bitmap: its committed location, free count, a hint, and its entries once loaded."""

    __slots__ = ("location", "nr_free", "none_free_before", "entries", "dirty")

    def __init__(self, location: int, nr_free: int, none_free_before: int):
        self.location = location
        self.nr_free = nr_free
        self.none_free_before = none_free_before
        self.entries: bytearray | None = None
        self.dirty = False

    def pack(self) -> bytes:
        return _INDEX_ENTRY.pack(self.location, self.nr_free, self.none_free_before)

    @classmethod
    def unpack(cls, raw: bytes | bytearray, offset: int = 0) -> "IndexEntry":
        return cls(*_INDEX_ENTRY.unpack_from(raw, offset))


REF_COUNT_TYPE = ValueType(4)
INDEX_ENTRY_TYPE = ValueType(16)


class SpaceMap:
    """What both space maps share: counts, allocation, the overflow tree (``sm_ll_*``)."""

    def __init__(self, tm: TransactionManager):
        self.tm = tm
        self.nr_blocks = 0
        self.nr_allocated = 0
        self.bitmaps: list[IndexEntry] = []
        self.ref_info = BTreeInfo(tm, REF_COUNT_TYPE)
        self.ref_count_root = 0
        self._overflow: dict[int, int] = {}
        self._overflow_dirty: set[int] = set()
        self._orig: dict[int, int] = {}
        self.begin = 0
        self.allocated_this_transaction = 0
        self.committed_nr_allocated = 0
        self.changed = False

    # -- counts -----------------------------------------------------------------------------

    def _entries(self, i: int) -> bytearray:
        ie = self.bitmaps[i]
        if ie.entries is None:
            blk = self.tm.peek(ie.location, BITMAP)
            ie.entries = decode_bitmap(blk.data[BITMAP_HEADER_SIZE:])
        return ie.entries

    def _check(self, b: int) -> None:
        if not 0 <= b < self.nr_blocks:
            raise MetadataError("space map block %d out of bounds (%d blocks)" % (b, self.nr_blocks), errno.EINVAL)

    def get_count(self, b: int) -> int:
        self._check(b)
        e = self._entries(b // ENTRIES_PER_BITMAP)[b % ENTRIES_PER_BITMAP]
        if e < 3:
            return e
        c = self._overflow.get(b)
        if c is None:
            raw = self.ref_info.lookup_or_none(self.ref_count_root, [b])
            if raw is None:
                raise MetadataError("space map: block %d overflows but has no ref count" % b)
            c = self._overflow[b] = int.from_bytes(raw, "little")
        return c

    def count_is_more_than_one(self, b: int) -> bool:
        return self.get_count(b) > 1

    def set_count(self, b: int, count: int) -> None:
        old = self.get_count(b)
        if old == count:
            return
        if count < 0 or count > 0xFFFFFFFF:
            raise MetadataError("reference count %d out of range" % count, errno.EINVAL)
        self._orig.setdefault(b, old)
        i, bit = divmod(b, ENTRIES_PER_BITMAP)
        ie = self.bitmaps[i]
        entries = self._entries(i)
        entries[bit] = min(count, 3)
        ie.dirty = True
        self.changed = True
        if count >= 3:
            self._overflow[b] = count
            self._overflow_dirty.add(b)
        elif old >= 3:
            self._overflow.pop(b, None)
            self._overflow_dirty.add(b)
        if old == 0:
            self.nr_allocated += 1
            ie.nr_free -= 1
            if ie.none_free_before == bit:
                ie.none_free_before = bit + 1
        elif count == 0:
            self.nr_allocated -= 1
            ie.nr_free += 1
            ie.none_free_before = min(ie.none_free_before, bit)

    def inc(self, b: int) -> None:
        self.set_count(b, self.get_count(b) + 1)

    def dec(self, b: int) -> None:
        c = self.get_count(b)
        if c == 0:
            raise MetadataError("unable to decrement a reference count below 0 (block %d)" % b, errno.EINVAL)
        self.set_count(b, c - 1)

    # -- allocation -------------------------------------------------------------------------

    def _find_free(self, begin: int, end: int) -> int | None:
        """First block in [begin, end) free now and at the last commit (``find_common_free_block``)."""
        orig = self._orig
        i = begin // ENTRIES_PER_BITMAP
        while begin < end:
            base = i * ENTRIES_PER_BITMAP
            hi = min(end - base, ENTRIES_PER_BITMAP)
            ie = self.bitmaps[i]
            if ie.nr_free > 0:
                entries = self._entries(i)
                pos = max(begin - base, ie.none_free_before)
                while pos < hi:
                    pos = entries.find(0, pos, hi)
                    if pos < 0:
                        break
                    b = base + pos
                    if not orig.get(b, 0):
                        return b
                    pos += 1
            i += 1
            begin = base + ENTRIES_PER_BITMAP
        return None

    def new_block(self) -> int:
        """Allocate a block (count 1): from the last allocation on, then from the start."""
        b = self._find_free(self.begin, self.nr_blocks)
        if b is None:
            b = self._find_free(0, min(self.begin, self.nr_blocks))
        if b is None:
            raise NoSpace(self.no_space_message)
        self.begin = b + 1
        self.set_count(b, 1)
        self.allocated_this_transaction += 1
        return b

    no_space_message = "no free blocks in the space map"

    def nr_free(self) -> int:
        """Free blocks as the kernel reports them: frees count only once committed."""
        return max(self.nr_blocks - self.committed_nr_allocated - self.allocated_this_transaction, 0)

    def extend(self, extra: int) -> None:
        """Grow by ``extra`` blocks (``sm_ll_extend``), new bitmaps written at the next commit."""
        if extra < 0:
            raise MetadataError("space maps cannot shrink", errno.EINVAL)
        new_nr = self.nr_blocks + extra
        want = -(-new_nr // ENTRIES_PER_BITMAP)
        if want > self.max_bitmaps():
            raise MetadataError("space map too large (%d blocks)" % new_nr, errno.EINVAL)
        while len(self.bitmaps) < want:
            ie = IndexEntry(0, ENTRIES_PER_BITMAP, 0)
            ie.entries = bytearray(ENTRIES_PER_BITMAP)
            ie.dirty = True
            self.bitmaps.append(ie)
        self.nr_blocks = new_nr
        self.changed = True
        # the kernel commits the space map after an extend (sm_disk_extend): counts restart
        self.committed_nr_allocated = self.nr_allocated
        self.allocated_this_transaction = 0

    def max_bitmaps(self) -> int:
        return 1 << 40

    # -- commit -----------------------------------------------------------------------------

    def _sync_overflow(self) -> bool:
        """Bring the overflow btree in line with the counts of 3 or more; whether anything changed."""
        did = False
        while self._overflow_dirty:
            todo = sorted(self._overflow_dirty)
            self._overflow_dirty.clear()
            for b in todo:
                c = self._overflow.get(b)
                if c is not None:
                    self.ref_count_root, _ = self.ref_info.insert(self.ref_count_root, [b], c.to_bytes(4, "little"))
                elif self.ref_info.lookup_or_none(self.ref_count_root, [b]) is not None:
                    self.ref_count_root = self.ref_info.remove(self.ref_count_root, [b])
            did = True
        return did

    def _place_bitmap(self, ie: IndexEntry) -> bool:
        """Give a changed bitmap a block of this transaction; whether a block was allocated."""
        if ie.location and self.tm.is_shadow(ie.location):
            return False
        blk = replace_block(self.tm, ie.location, BITMAP)
        self.tm.unlock(blk)
        ie.location = blk.location
        return True

    def _write_bitmap(self, ie: IndexEntry) -> None:
        assert ie.entries is not None
        blk = self.tm.bm.write_lock(ie.location, BITMAP)
        blk.data[BITMAP_HEADER_SIZE:] = encode_bitmap(ie.entries)
        self.tm.unlock(blk)
        ie.dirty = False

    def transaction_committed(self) -> None:
        """The superblock naming this state is on disk: frees become allocatable."""
        self._orig.clear()
        self.committed_nr_allocated = self.nr_allocated
        self.allocated_this_transaction = 0
        self.changed = False

    def root_bytes(self) -> bytes:
        """The 128-byte root for the superblock (call after :meth:`commit`)."""
        return pack_root(self.nr_blocks, self.nr_allocated, self.bitmap_root(), self.ref_count_root)

    def bitmap_root(self) -> int:
        raise NotImplementedError

    def counts(self) -> dict[int, int]:
        """Every non-zero count (tests, checks): loads every bitmap."""
        out = {}
        for i in range(len(self.bitmaps)):
            base = i * ENTRIES_PER_BITMAP
            for pos, e in enumerate(self._entries(i)):
                if e and base + pos < self.nr_blocks:
                    out[base + pos] = self.get_count(base + pos)
        return out


class DiskSpaceMap(SpaceMap):
    """The data space map (``dm_sm_disk``): index entries in a btree of bitmap number -> entry."""

    no_space_message = "no free data blocks"

    def __init__(self, tm: TransactionManager):
        super().__init__(tm)
        self.index_info = BTreeInfo(tm, INDEX_ENTRY_TYPE)
        self.index_root = 0

    @classmethod
    def create(cls, tm: TransactionManager, nr_blocks: int = 0) -> "DiskSpaceMap":
        """``dm_sm_disk_create``: empty index and overflow trees, then ``extend``."""
        sm = cls(tm)
        sm.index_root = sm.index_info.empty()
        sm.ref_count_root = sm.ref_info.empty()
        sm.extend(nr_blocks)
        return sm

    @classmethod
    def open(cls, tm: TransactionManager, root: bytes) -> "DiskSpaceMap":
        sm = cls(tm)
        sm.nr_blocks, sm.nr_allocated, sm.index_root, sm.ref_count_root = unpack_root(root)
        want = -(-sm.nr_blocks // ENTRIES_PER_BITMAP)
        for i, (k, raw) in enumerate(sm.index_info.items(sm.index_root)):
            if k != i:
                raise MetadataError("data space map index has bitmap %d where %d belongs" % (k, i))
            sm.bitmaps.append(IndexEntry.unpack(raw))
        if len(sm.bitmaps) != want:
            raise MetadataError("data space map of %d blocks has %d bitmaps, wants %d"
                                % (sm.nr_blocks, len(sm.bitmaps), want))
        sm.committed_nr_allocated = sm.nr_allocated
        return sm

    def bitmap_root(self) -> int:
        return self.index_root

    def commit(self) -> None:
        """Write changed bitmaps, their index entries and the overflow tree (``sm_disk_commit``)."""
        self._sync_overflow()
        for i, ie in enumerate(self.bitmaps):
            if ie.dirty:
                self._place_bitmap(ie)
                self._write_bitmap(ie)
                self.index_root, _ = self.index_info.insert(self.index_root, [i], ie.pack())


class MetadataSpaceMap(SpaceMap):
    """The metadata space map (``dm_sm_metadata``): one index block, counts itself."""

    no_space_message = "no free metadata blocks"

    def __init__(self, tm: TransactionManager):
        super().__init__(tm)
        tm.sm = self
        self.index_location = 0

    def max_bitmaps(self) -> int:
        return MAX_METADATA_BITMAPS

    @classmethod
    def create(cls, tm: TransactionManager, nr_blocks: int, superblock: int = 0) -> "MetadataSpaceMap":
        """``dm_sm_metadata_create``: every block free but the superblock."""
        sm = cls(tm)
        sm.extend(min(nr_blocks, METADATA_MAX_BLOCKS))
        sm.inc(superblock)
        sm.begin = superblock + 1
        sm.ref_count_root = sm.ref_info.empty()
        return sm

    @classmethod
    def open(cls, tm: TransactionManager, root: bytes) -> "MetadataSpaceMap":
        sm = cls(tm)
        sm.nr_blocks, sm.nr_allocated, sm.index_location, sm.ref_count_root = unpack_root(root)
        if sm.nr_blocks > METADATA_MAX_BLOCKS:
            raise MetadataError("metadata space map of %d blocks is larger than the maximum %d"
                                % (sm.nr_blocks, METADATA_MAX_BLOCKS))
        if sm.nr_blocks > tm.bm.nr_blocks:
            raise MetadataError("metadata space map of %d blocks on a device of %d"
                                % (sm.nr_blocks, tm.bm.nr_blocks), errno.EINVAL)
        blk = tm.peek(sm.index_location, INDEX)
        nr_bitmaps = -(-sm.nr_blocks // ENTRIES_PER_BITMAP)
        for i in range(nr_bitmaps):
            sm.bitmaps.append(IndexEntry.unpack(blk.data, 16 + 16 * i))
        sm.committed_nr_allocated = sm.nr_allocated
        return sm

    def bitmap_root(self) -> int:
        return self.index_location

    def commit(self) -> None:
        """Write everything the map is made of, to a fixed point: placing a block changes counts."""
        if not self.changed and self.index_location:
            return
        while True:
            progress = self._sync_overflow()
            for ie in self.bitmaps:
                if ie.dirty and self._place_bitmap(ie):
                    progress = True
            if not (self.index_location and self.tm.is_shadow(self.index_location)):
                blk = replace_block(self.tm, self.index_location, INDEX)
                self.tm.unlock(blk)
                self.index_location = blk.location
                progress = True
            if not progress and not self._overflow_dirty:
                break
        for ie in self.bitmaps:
            if ie.dirty:
                self._write_bitmap(ie)
        blk = self.tm.bm.write_lock(self.index_location, INDEX)
        data = blk.data
        data[16:] = bytes(len(data) - 16)
        for i, ie in enumerate(self.bitmaps):
            data[16 + 16 * i:32 + 16 * i] = ie.pack()
        self.tm.unlock(blk)
