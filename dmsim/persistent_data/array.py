"""Arrays (dm-array.c): a btree of block index -> *array block*, for dm-cache, dm-era and dm-clone.

An array block is::

    le32 csum (crc32c ^ 595846735), le32 max_entries, le32 nr_entries, le32 value_size,
    le64 blocknr, then nr_entries values of value_size bytes

``max_entries`` is ``(block size - 24) // value_size``; every block is full but the last.
Array blocks are copy-on-write like btree nodes: a block shared between two arrays (after one
took a reference on the other's root) is copied on the first write and its values gain a
reference each (the value type's ``inc``); the last reference to a block dropping drops its
values (``dec``).  Like btrees, every change takes a root and returns the new one.
"""
import struct
from collections.abc import Callable, Iterator

from .block_manager import Block
from .btree import BTreeInfo, ValueType
from .errors import MetadataError
from .transaction_manager import TransactionManager
from .validators import ARRAY_BLOCK

ARRAY_BLOCK_HEADER_SIZE = 24
_HEADER = struct.Struct("<IIIIQ")


def calc_max_entries(value_size: int, block_size: int = 4096) -> int:
    return (block_size - ARRAY_BLOCK_HEADER_SIZE) // value_size


class ArrayBlock:
    """Decoded view of an array block: its values packed in one bytearray."""

    __slots__ = ("max_entries", "value_size", "values")

    def __init__(self, max_entries: int, value_size: int, values: bytearray):
        self.max_entries = max_entries
        self.value_size = value_size
        self.values = values

    @property
    def nr_entries(self) -> int:
        return len(self.values) // self.value_size

    @classmethod
    def decode(cls, data: bytes | bytearray) -> "ArrayBlock":
        _csum, max_entries, nr_entries, value_size, _blocknr = _HEADER.unpack_from(data, 0)
        if value_size == 0 or nr_entries > max_entries or \
                ARRAY_BLOCK_HEADER_SIZE + max_entries * value_size > len(data):
            raise MetadataError("array block: bad header (max %d, nr %d, value size %d)"
                                % (max_entries, nr_entries, value_size))
        end = ARRAY_BLOCK_HEADER_SIZE + nr_entries * value_size
        return cls(max_entries, value_size, bytearray(data[ARRAY_BLOCK_HEADER_SIZE:end]))

    def encode(self, data: bytearray) -> None:
        _HEADER.pack_into(data, 0, 0, self.max_entries, self.nr_entries, self.value_size, 0)
        end = ARRAY_BLOCK_HEADER_SIZE + len(self.values)
        data[ARRAY_BLOCK_HEADER_SIZE:end] = self.values
        data[end:] = bytes(len(data) - end)

    def copy(self) -> "ArrayBlock":
        return ArrayBlock(self.max_entries, self.value_size, bytearray(self.values))

    def get(self, i: int) -> bytes:
        vs = self.value_size
        return bytes(self.values[i * vs:(i + 1) * vs])

    def set(self, i: int, value: bytes) -> None:
        vs = self.value_size
        self.values[i * vs:(i + 1) * vs] = value


def _view(blk: Block) -> ArrayBlock:
    v = blk.view
    if v is None:
        v = blk.view = ArrayBlock.decode(blk.data)
    return v


class ArrayInfo:
    """``struct dm_array_info``: the value type and the btree of array blocks."""

    def __init__(self, tm: TransactionManager, value_type: ValueType):
        self.tm = tm
        self.value_type = value_type
        self.max_entries = calc_max_entries(value_type.size)
        self.btree = BTreeInfo(tm, ValueType(8, inc=self._block_inc, dec=self._block_dec))
        # for pointing an entry at a block's shadow: the shadow already dropped the old reference
        self._repoint = BTreeInfo(tm, ValueType(8, inc=self._block_inc))

    # -- array blocks -----------------------------------------------------------------------

    def _read(self, b: int) -> ArrayBlock:
        return _view(self.tm.peek(b, ARRAY_BLOCK))

    def _block_inc(self, v: bytes) -> None:
        self.tm.inc(int.from_bytes(v, "little"))

    def _block_dec(self, v: bytes) -> None:
        """The btree drops an array block: the last reference takes its values' references along."""
        b = int.from_bytes(v, "little")
        if self.tm.ref(b) == 1 and self.value_type.dec is not None:
            ab = self._read(b)
            for i in range(ab.nr_entries):
                self.value_type.dec(ab.get(i))
        self.tm.dec(b)

    def _new_block(self, values: bytearray) -> int:
        blk = self.tm.new_block(ARRAY_BLOCK)
        blk.view = ArrayBlock(self.max_entries, self.value_type.size, values)
        self.tm.unlock(blk)
        return blk.location

    def _ablock_of(self, root: int, index: int) -> int:
        raw = self.btree.lookup_or_none(root, [index])
        if raw is None:
            raise MetadataError("array: no block %d" % index)
        return int.from_bytes(raw, "little")

    def _shadow(self, root: int, index: int) -> tuple[int, ArrayBlock]:
        """A writable array block ``index``: (new root, block view) (``shadow_ablock``).

        The btree path is made this array's own first, so an array block reachable through a
        shared node shows as shared (its count was raised when the node was copied) and is copied
        in turn, never changed under the other array.
        """
        b = self._ablock_of(root, index)
        root, _ = self._repoint.insert(root, [index], b.to_bytes(8, "little"))
        blk, inc = self.tm.shadow_block(b, ARRAY_BLOCK)
        ab = _view(blk)
        self.tm.unlock(blk)
        if inc and self.value_type.inc is not None:
            for i in range(ab.nr_entries):
                self.value_type.inc(ab.get(i))
        if blk.location != b:
            # the shadow moved this array's reference from b to the copy: repoint without a dec
            # (the kernel's inc-then-overwrite would drop b's values' references when b was unshared)
            root, _ = self._repoint.insert(root, [index], blk.location.to_bytes(8, "little"))
        return root, ab

    # -- the array --------------------------------------------------------------------------

    def empty(self) -> int:
        """``dm_array_empty``."""
        return self.btree.empty()

    def get(self, root: int, index: int) -> bytes:
        """``dm_array_get_value``."""
        block, entry = divmod(index, self.max_entries)
        ab = self._read(self._ablock_of(root, block))
        if entry >= ab.nr_entries:
            raise MetadataError("array: index %d beyond the array" % index)
        return ab.get(entry)

    def set(self, root: int, index: int, value: bytes) -> int:
        """``dm_array_set_value``: returns the new root."""
        if len(value) != self.value_type.size:
            raise ValueError("value of %d bytes for an array of %d-byte values" % (len(value), self.value_type.size))
        block, entry = divmod(index, self.max_entries)
        root, ab = self._shadow(root, block)
        if entry >= ab.nr_entries:
            raise MetadataError("array: index %d beyond the array" % index)
        old = ab.get(entry)
        vt = self.value_type
        if vt.dec is not None and (vt.equal is None or not vt.equal(old, value)):
            vt.dec(old)
            if vt.inc is not None:
                vt.inc(value)
        ab.set(entry, value)
        return root

    def resize(self, root: int, old_size: int, new_size: int, value: bytes) -> int:
        """``dm_array_resize``: grow with copies of ``value`` (each taking a reference) or shrink."""
        me = self.max_entries
        vs = self.value_type.size
        inc = self.value_type.inc
        if new_size > old_size:
            last_block, in_last = divmod(old_size, me)
            if in_last:
                root, ab = self._shadow(root, last_block)
                add = min(me - in_last, new_size - old_size)
                ab.values += value * add
                if inc is not None:
                    for _ in range(add):
                        inc(value)
                old_size += add
                last_block += 1
            while old_size < new_size:
                n = min(me, new_size - old_size)
                b = self._new_block(bytearray(value * n))
                if inc is not None:
                    for _ in range(n):
                        inc(value)
                root, _ = self.btree.insert(root, [last_block], b.to_bytes(8, "little"))
                old_size += n
                last_block += 1
        elif new_size < old_size:
            keep_blocks, in_last = divmod(new_size, me)
            nr_blocks = -(-old_size // me)
            first_gone = keep_blocks + (1 if in_last else 0)
            for blk_index in range(nr_blocks - 1, first_gone - 1, -1):
                root = self.btree.remove(root, [blk_index])
            if in_last:
                root, ab = self._shadow(root, keep_blocks)
                dec = self.value_type.dec
                if dec is not None:
                    for i in range(in_last, ab.nr_entries):
                        dec(ab.get(i))
                del ab.values[in_last * vs:]
        return root

    def items(self, root: int) -> Iterator[tuple[int, bytes]]:
        """``dm_array_walk``: every (index, value) in order."""
        me = self.max_entries
        for block, raw in self.btree.items(root):
            ab = self._read(int.from_bytes(raw, "little"))
            for i in range(ab.nr_entries):
                yield block * me + i, ab.get(i)

    def delete(self, root: int) -> None:
        """``dm_array_del``: drop the array (values of unshared blocks lose their references)."""
        self.btree.delete(root)

    def blocks(self, root: int) -> Iterator[int]:
        """The array blocks (for reference counting checks)."""
        for _k, raw in self.btree.items(root):
            yield int.from_bytes(raw, "little")


def array_of(tm: TransactionManager, value_size: int, inc: Callable[[bytes], None] | None = None,
             dec: Callable[[bytes], None] | None = None) -> ArrayInfo:
    return ArrayInfo(tm, ValueType(value_size, inc=inc, dec=dec))
