"""Space maps (dm-space-map-common.c, -disk.c, -metadata.c): reference counts of blocks, on disk.

The format is the kernel's.  Counts are 2 bits a block in *bitmap* blocks (csum, padding,
blocknr, then little-endian words; a block's high bit at ``2*i``, low bit at ``2*i + 1``); 3
means "see the overflow btree" (block -> le32 count).  An *index entry* per bitmap (le64
blocknr, le32 nr_free, le32 none_free_before) says where it lives.  The root written into the
superblock is le64 nr_blocks, nr_allocated, bitmap_root, ref_count_root:

* the **disk** space map (data blocks) keeps its index entries in a btree of 16-byte values;
* the **metadata** space map keeps them in one *index* block of up to 255 entries, and counts
  the blocks it is itself made of, in itself.

Counts are held in memory (bitmaps decoded on first use) and change in the kernel's order,
so that the blocks land where the kernel puts them: the first change to a bitmap in a
transaction moves it to a new block (allocated then, right after the block being counted),
counts of 3 or more go to the overflow btree at once, the data map's index entries are
written to its btree at commit (the kernel's index-entry cache order) and the metadata map's
index block is copied last.  The bitmaps' bytes are written at commit.  A block freed in a
transaction is not handed out again before the commit (the committed metadata may still point
at it), and allocation goes on from where the last one stopped, wrapping at the end.
"""
import errno
import struct
from collections.abc import Callable

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

    __slots__ = ("location", "nr_free", "none_free_before", "entries", "dirty", "shadowed")

    def __init__(self, location: int, nr_free: int, none_free_before: int):
        self.location = location
        self.nr_free = nr_free
        self.none_free_before = none_free_before
        self.entries: bytearray | None = None
        self.dirty = False        # entries changed since the commit: bytes to write
        self.shadowed = False     # ``location`` was allocated in this transaction

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
        self.committed_nr_blocks = 0
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
        i, bit = divmod(b, ENTRIES_PER_BITMAP)
        ie = self.bitmaps[i]
        entries = self._entries(i)
        if not ie.shadowed:
            self._shadow_bitmap(ie)
        self._orig.setdefault(b, old)
        entries[bit] = min(count, 3)
        ie.dirty = True
        self.changed = True
        self._ie_saved(i)
        if old == 0:
            self.nr_allocated += 1
            self._count_allocation(1)
            ie.nr_free -= 1
            if ie.none_free_before == bit:
                ie.none_free_before = bit + 1
        elif count == 0:
            self.nr_allocated -= 1
            self._count_allocation(-1)
            ie.nr_free += 1
            ie.none_free_before = min(ie.none_free_before, bit)
        if count >= 3 or old >= 3:
            self._nest(1)
            try:
                if count >= 3:
                    self._overflow[b] = count
                    self.ref_count_root, _ = self.ref_info.insert(self.ref_count_root, [b],
                                                                  count.to_bytes(4, "little"))
                else:
                    self._overflow.pop(b, None)
                    self.ref_count_root = self.ref_info.remove(self.ref_count_root, [b])
            finally:
                self._nest(-1)

    def _nest(self, n: int) -> None:
        """Enter (1) or leave (-1) work nested inside a count change (the metadata map's recursion)."""

    def _count_allocation(self, n: int) -> None:
        """``nr_allocated_this_transaction``: the net allocations status counts as used."""
        self.allocated_this_transaction += n

    def _shadow_bitmap(self, ie: IndexEntry) -> None:
        """The first change to a bitmap in a transaction moves it to a block of this transaction
        (``shadow_bitmap``): a new block from the metadata space map, the old one released."""
        ie.shadowed = True
        sm = self.tm.sm
        new = sm.new_block()
        if ie.location:
            sm.dec(ie.location)
        ie.location = new

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
        return b

    no_space_message = "no free blocks in the space map"

    def nr_free(self) -> int:
        """Free blocks as the kernel reports them (``old nr_blocks - old nr_allocated -
        allocated this transaction``: the data map counts net changes, the metadata map every
        block it hands out, its own moves included, and no frees)."""
        return max(self.committed_nr_blocks - self.committed_nr_allocated - self.allocated_this_transaction, 0)

    def extend(self, extra: int) -> None:
        """Grow by ``extra`` blocks (``sm_ll_extend``): new bitmaps get blocks now."""
        if extra < 0:
            raise MetadataError("space maps cannot shrink", errno.EINVAL)
        new_nr = self.nr_blocks + extra
        want = -(-new_nr // ENTRIES_PER_BITMAP)
        if want > self.max_bitmaps():
            raise MetadataError("space map too large (%d blocks)" % new_nr, errno.EINVAL)
        self._add_bitmaps(want)
        self.nr_blocks = new_nr
        self.changed = True

    def _add_bitmaps(self, want: int) -> None:
        while len(self.bitmaps) < want:
            blk = self.tm.new_block(BITMAP)
            self.tm.unlock(blk)
            ie = IndexEntry(blk.location, ENTRIES_PER_BITMAP, 0)
            ie.entries = bytearray(ENTRIES_PER_BITMAP)
            ie.dirty = ie.shadowed = True
            self.bitmaps.append(ie)
            self._ie_saved(len(self.bitmaps) - 1)

    def _ie_saved(self, i: int) -> None:
        """``save_ie``: index entry ``i`` changed (the metadata map keeps them all in memory)."""

    def max_bitmaps(self) -> int:
        return 1 << 40

    # -- commit -----------------------------------------------------------------------------

    def _write_bitmap(self, ie: IndexEntry) -> None:
        assert ie.entries is not None
        blk = self.tm.bm.write_lock_zero(ie.location, BITMAP)
        blk.data[BITMAP_HEADER_SIZE:] = encode_bitmap(ie.entries)
        self.tm.unlock(blk)
        ie.dirty = False

    def transaction_committed(self) -> None:
        """The superblock naming this state is on disk: frees become allocatable."""
        self._orig.clear()
        self.committed_nr_allocated = self.nr_allocated
        self.committed_nr_blocks = self.nr_blocks
        self.allocated_this_transaction = 0
        self.changed = False
        for ie in self.bitmaps:
            ie.shadowed = False

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


IE_CACHE_SIZE = 64


def _ie_slot(index: int) -> int:
    """The kernel's index-entry cache slot (``dm_hash_block(index, IE_CACHE_MASK)``)."""
    return ((index & 0xFFFFFFFF) * 4294967291) & 0xFFFFFFFF & (IE_CACHE_SIZE - 1)


class DiskSpaceMap(SpaceMap):
    """The data space map (``dm_sm_disk``): index entries in a btree of bitmap number -> entry,
    changed ones held in the kernel's 64-slot cache and written back at commit (or when another
    entry takes their slot)."""

    no_space_message = "no free data blocks"

    def __init__(self, tm: TransactionManager):
        super().__init__(tm)
        self.index_info = BTreeInfo(tm, INDEX_ENTRY_TYPE)
        self.index_root = 0
        self._iec: dict[int, int] = {}       # slot -> bitmap index, entries not yet written back

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
        sm.committed_nr_blocks = sm.nr_blocks
        return sm

    def bitmap_root(self) -> int:
        return self.index_root

    def _ie_saved(self, i: int) -> None:
        slot = _ie_slot(i)
        held = self._iec.get(slot)
        if held is not None and held != i:
            self._writeback(held)
        self._iec[slot] = i

    def _writeback(self, i: int) -> None:
        self.index_root, _ = self.index_info.insert(self.index_root, [i], self.bitmaps[i].pack())

    def _commit_index(self) -> None:
        """``disk_ll_commit``: write the cached index entries back, slot by slot."""
        for slot in sorted(self._iec):
            self._writeback(self._iec[slot])
        self._iec.clear()

    def extend(self, extra: int) -> None:
        """``sm_disk_extend``: new bitmaps, then the map commits (its index entries written)."""
        super().extend(extra)
        self._commit_index()
        self.committed_nr_allocated = self.nr_allocated
        self.committed_nr_blocks = self.nr_blocks
        self.allocated_this_transaction = 0

    def commit(self) -> None:
        """``sm_disk_commit``: the index entries to the btree; the changed bitmaps' bytes."""
        self._commit_index()
        for ie in self.bitmaps:
            if ie.dirty:
                self._write_bitmap(ie)


class MetadataSpaceMap(SpaceMap):
    """The metadata space map (``dm_sm_metadata``): one index block, counts itself.

    Changing a count can move a bitmap, which allocates from this same map: such nested
    changes are applied at once (the kernel queues them until the outer change is done, with
    the same blocks chosen).  :meth:`nr_free` falls by one at every block handed out (its
    own moves too) and rises only at the commit, as 6.1's does; an allocation that leaves
    the registered threshold or fewer free blocks calls the threshold function once per
    crossing (``check_threshold``)."""

    no_space_message = "no free metadata blocks"

    def __init__(self, tm: TransactionManager):
        super().__init__(tm)
        tm.sm = self
        self.index_location = 0
        self._recursing = 0
        self.threshold: tuple[int, Callable[[], None]] | None = None
        self._threshold_value: int | None = None

    def register_threshold(self, threshold: int, fn: Callable[[], None]) -> None:
        """``dm_sm_register_threshold_callback``: ``fn`` runs when an allocation leaves ``threshold``
        or fewer free blocks, once per crossing (the last count seen is kept across a new
        registration, as the kernel's ``set_threshold`` keeps it)."""
        self.threshold = (threshold, fn)

    def _check_threshold(self, value: int) -> None:
        """``check_threshold``: below (or at) the mark now, and not already below it."""
        t = self.threshold
        if t is not None and value <= t[0]:
            last = self._threshold_value
            if last is None or last > t[0]:
                t[1]()
        self._threshold_value = value

    def max_bitmaps(self) -> int:
        return MAX_METADATA_BITMAPS

    def _count_allocation(self, n: int) -> None:
        """6.1 counts this map's allocations in :meth:`new_block` only (its own moves too), and
        frees not at all until the commit."""

    def _shadow_bitmap(self, ie: IndexEntry) -> None:
        self._recursing += 1
        try:
            super()._shadow_bitmap(ie)
        finally:
            self._recursing -= 1

    def _nest(self, n: int) -> None:
        self._recursing += n

    @classmethod
    def create(cls, tm: TransactionManager, nr_blocks: int, superblock: int = 0) -> "MetadataSpaceMap":
        """``dm_sm_metadata_create``: bootstrap, the kernel's way.  The blocks it is made of are
        taken in order after the superblock (index block, overflow root, then the bitmaps) and
        counted once it exists, with the superblock."""
        sm = cls(tm)
        nr_blocks = min(nr_blocks, METADATA_MAX_BLOCKS)
        sm.nr_blocks = nr_blocks
        sm._bootstrap = superblock + 1
        sm.index_location = sm.new_block()
        idx = tm.bm.write_lock_zero(sm.index_location, INDEX)
        tm.bm.unlock(idx)
        tm._shadows.add(sm.index_location)
        sm.ref_count_root = sm.ref_info.empty()
        want = -(-nr_blocks // ENTRIES_PER_BITMAP)
        while len(sm.bitmaps) < want:
            b = sm.new_block()
            blk = tm.bm.write_lock_zero(b, BITMAP)
            tm.bm.unlock(blk)
            ie = IndexEntry(b, ENTRIES_PER_BITMAP, 0)
            ie.entries = bytearray(ENTRIES_PER_BITMAP)
            ie.dirty = ie.shadowed = True
            sm.bitmaps.append(ie)
        end = sm._bootstrap
        del sm._bootstrap
        sm.begin = end
        for b in range(superblock, end):
            sm.set_count(b, 1)
        # the kernel commits the new map (sm_metadata_create): these counts are not this
        # transaction's allocations
        sm.committed_nr_allocated = sm.nr_allocated
        sm.committed_nr_blocks = sm.nr_blocks
        sm.allocated_this_transaction = 0
        return sm

    _bootstrap: int

    def new_block(self) -> int:
        boot = getattr(self, "_bootstrap", None)
        if boot is not None:
            # bootstrap: blocks in order, counted when the map exists (sm_bootstrap_new_block)
            if boot >= self.nr_blocks:
                raise NoSpace(self.no_space_message)
            self._bootstrap = boot + 1
            return boot
        try:
            b = super().new_block()
        except NoSpace:
            self.tm.bm.log("space map metadata: unable to allocate new metadata block")
            raise
        self.allocated_this_transaction += 1
        self._check_threshold(self.nr_free())
        return b

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
        sm.committed_nr_blocks = sm.nr_blocks
        return sm

    def bitmap_root(self) -> int:
        return self.index_location

    def extend(self, extra: int) -> None:
        """``sm_metadata_extend``: the new bitmaps take the first blocks of the new area."""
        old_len = self.nr_blocks
        new_nr = old_len + extra
        want = -(-new_nr // ENTRIES_PER_BITMAP)
        if want > self.max_bitmaps():
            raise MetadataError("space map too large (%d blocks)" % new_nr, errno.EINVAL)
        self.nr_blocks = new_nr
        first = len(self.bitmaps)
        b = old_len
        while len(self.bitmaps) < want:
            blk = self.tm.bm.write_lock_zero(b, BITMAP)
            self.tm.bm.unlock(blk)
            ie = IndexEntry(b, ENTRIES_PER_BITMAP, 0)
            ie.entries = bytearray(ENTRIES_PER_BITMAP)
            ie.dirty = ie.shadowed = True
            self.bitmaps.append(ie)
            b += 1
        for ie in self.bitmaps[first:]:
            self.set_count(ie.location, 1)
        # (only new bitmaps change the index block: 6.1's extend commits the map then, and
        # a grown map with none leaves its index where it is)
        self.begin = b

    def commit(self) -> None:
        """``sm_metadata_commit``: the index block copied (if anything changed) and written with
        every bitmap's entry; the changed bitmaps' bytes."""
        if not self.changed and self.index_location:
            return
        if not (self.index_location and self.tm.is_shadow(self.index_location)):
            blk = replace_block(self.tm, self.index_location, INDEX)
            self.tm.unlock(blk)
            self.index_location = blk.location
        for ie in self.bitmaps:
            if ie.dirty:
                self._write_bitmap(ie)
        blk = self.tm.bm.write_lock(self.index_location, INDEX)
        data = blk.data
        data[16:] = bytes(len(data) - 16)
        for i, ie in enumerate(self.bitmaps):
            data[16 + 16 * i:32 + 16 * i] = ie.pack()
        self.tm.unlock(blk)
