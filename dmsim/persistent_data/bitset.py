"""Bitsets (dm-bitset.c): an array of le64 words, bit ``i`` is bit ``i % 64`` of word ``i // 64``.

dm-cache keeps its dirty and discard bits this way and dm-era its per-era write sets.  Like
the kernel's ``dm_disk_bitset``, the word being worked on is cached and written back on
:meth:`Bitset.flush` (or when another word is needed), so runs of bit updates in one word cost
one array write.
"""
from .array import ArrayInfo
from .btree import ValueType
from .transaction_manager import TransactionManager

BITS_PER_ARRAY_ENTRY = 64


class Bitset:
    """``struct dm_disk_bitset`` plus its root: the current root is :attr:`root` after :meth:`flush`."""

    def __init__(self, tm: TransactionManager, root: int = 0):
        self.array = ArrayInfo(tm, ValueType(8))
        self.root = root if root else self.array.empty()
        self._index = -1
        self._bits = 0
        self._dirty = False

    def resize(self, old_nr_bits: int, new_nr_bits: int, default: bool = False) -> None:
        """``dm_bitset_resize``: new bits are ``default`` (whole words, as the kernel pads)."""
        self.flush()
        old_words = -(-old_nr_bits // BITS_PER_ARRAY_ENTRY)
        new_words = -(-new_nr_bits // BITS_PER_ARRAY_ENTRY)
        word = (0xFFFFFFFFFFFFFFFF if default else 0).to_bytes(8, "little")
        self.root = self.array.resize(self.root, old_words, new_words, word)
        self._index = -1

    def _load(self, word: int) -> None:
        if word != self._index:
            self.flush()
            self._bits = int.from_bytes(self.array.get(self.root, word), "little")
            self._index = word

    def flush(self) -> int:
        """Write the cached word back; returns the root (``dm_bitset_flush``)."""
        if self._dirty:
            self.root = self.array.set(self.root, self._index, self._bits.to_bytes(8, "little"))
            self._dirty = False
        return self.root

    def test(self, bit: int) -> bool:
        word, b = divmod(bit, BITS_PER_ARRAY_ENTRY)
        self._load(word)
        return bool(self._bits >> b & 1)

    def set(self, bit: int) -> None:
        word, b = divmod(bit, BITS_PER_ARRAY_ENTRY)
        self._load(word)
        if not self._bits >> b & 1:
            self._bits |= 1 << b
            self._dirty = True

    def clear(self, bit: int) -> None:
        word, b = divmod(bit, BITS_PER_ARRAY_ENTRY)
        self._load(word)
        if self._bits >> b & 1:
            self._bits &= ~(1 << b)
            self._dirty = True

    def bits(self) -> list[int]:
        """Every set bit, in order (``dm_bitset_cursor`` walked to the end)."""
        self.flush()
        out = []
        for word, raw in self.array.items(self.root):
            v = int.from_bytes(raw, "little")
            while v:
                low = v & -v
                out.append(word * BITS_PER_ARRAY_ENTRY + low.bit_length() - 1)
                v ^= low
        return out

    def delete(self) -> None:
        self.array.delete(self.root)
        self.root = 0
        self._index = -1
        self._dirty = False


def new_bitset(tm: TransactionManager, nr_bits: int = 0, default: bool = False) -> Bitset:
    bs = Bitset(tm)
    if nr_bits:
        bs.resize(0, nr_bits, default)
    return bs
