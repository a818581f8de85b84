"""The transaction manager (dm-transaction-manager.c): copy-on-write of metadata blocks.

Nothing committed is ever written in place.  A block is changed through :meth:`shadow_block`:
the first time in a transaction it is copied to a newly allocated block (the original's
reference dropped), afterwards the copy is changed in place.  A shared block (reference count
above one) is copied every time and the caller must take a reference on whatever the copy
points at (``inc_children``), which is how btrees shared between snapshots come apart.
:meth:`commit` writes every dirty block, syncs, then writes the superblock and syncs again:
the superblock is the only block overwritten, and it flips the whole transaction at once.
"""
from typing import TYPE_CHECKING

from .block_manager import Block, BlockManager
from .validators import Validator

if TYPE_CHECKING:
    from .space_map import MetadataSpaceMap


class TransactionManager:
    """Shadowing over a :class:`BlockManager`, allocating from the metadata space map ``sm``."""

    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.sm: "MetadataSpaceMap"  # set by the space map that lives in this transaction
        self._shadows: set[int] = set()

    # -- allocation and reference counts ---------------------------------------------------

    def new_block(self, validator: Validator) -> Block:
        """A zeroed, write-locked block newly allocated in this transaction."""
        b = self.sm.new_block()
        blk = self.bm.write_lock_zero(b, validator)
        self._shadows.add(b)
        return blk

    def is_shadow(self, b: int) -> bool:
        return b in self._shadows

    def shadow_block(self, orig: int, validator: Validator) -> tuple[Block, bool]:
        """A writable version of ``orig``: (write-locked block, whether its children need a reference).

        ``orig`` itself when it was allocated in this transaction and is not shared, else a copy.
        """
        inc_children = self.sm.count_is_more_than_one(orig)
        if orig in self._shadows and not inc_children:
            return self.bm.write_lock(orig, validator), False
        new = self.sm.new_block()
        self.sm.dec(orig)
        src = self.bm.read_lock(orig, validator)
        try:
            if src.view is not None:
                src.view.encode(src.data)
            blk = self.bm.write_lock_zero(new, validator)
            blk.data[:] = src.data  # the whole block, as the kernel's memcpy (its view decodes anew)
        finally:
            self.bm.unlock(src)
        self._shadows.add(new)
        return blk, inc_children

    def inc(self, b: int) -> None:
        self.sm.inc(b)

    def dec(self, b: int) -> None:
        self.sm.dec(b)

    def ref(self, b: int) -> int:
        return self.sm.get_count(b)

    # -- locks ------------------------------------------------------------------------------

    def read_lock(self, b: int, validator: Validator) -> Block:
        return self.bm.read_lock(b, validator)

    def peek(self, b: int, validator: Validator) -> Block:
        return self.bm.peek(b, validator)

    def unlock(self, blk: Block) -> None:
        self.bm.unlock(blk)

    # -- commit -----------------------------------------------------------------------------

    def pre_commit(self) -> None:
        """Commit the metadata space map, then write every dirty block but the superblock."""
        self.sm.commit()
        self.bm.flush(exclude=self.superblock_location)

    superblock_location = 0

    def commit(self, superblock: Block) -> None:
        """Write the (write-locked) superblock after everything else: the transaction is durable."""
        self.bm.unlock(superblock)
        self.bm.flush()
        self._shadows.clear()
        self.sm.transaction_committed()

    def abort(self) -> None:
        """Forget this transaction's blocks; the caller reopens its structures from the superblock."""
        self.bm.discard_dirty()
        self._shadows.clear()


def replace_block(tm: TransactionManager, orig: int, validator: Validator) -> Block:
    """A shadow of ``orig`` (0: none yet) whose contents the caller rewrites whole: no copy made.

    In place when ``orig`` is already this transaction's; else a new block, ``orig`` released.
    """
    if orig and tm.is_shadow(orig) and tm.sm.get_count(orig) == 1:
        return tm.bm.write_lock(orig, validator)
    new = tm.sm.new_block()
    if orig:
        tm.sm.dec(orig)
    blk = tm.bm.write_lock_zero(new, validator)
    tm._shadows.add(new)
    return blk
