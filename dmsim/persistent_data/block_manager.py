"""The block manager (dm-block-manager.c): fixed-size metadata blocks of a file, locked and validated.

Blocks are read once through a cache and checked by their validator on that first read; a
block read under one validator may not be taken under another (the kernel's "validator
mismatch").  Locks are the kernel's: many readers or one writer, and asking for a conflicting
lock is a bug in the caller (:class:`LockError`), never a wait, since all metadata work runs
on one thread.  A write lock marks the block dirty; :meth:`BlockManager.flush` stamps and
writes every dirty block, then syncs.

A block may carry a decoded *view* (a btree node, say) that is authoritative over its bytes
while the block is cached: the bytes are regenerated from the view (``view.encode(data)``)
when the block is written, so hot structures are not re-parsed on every access.
"""
import errno
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from dmsim.errors import DMError

from .errors import LockError, MetadataError
from .validators import NO_VALIDATOR, Validator

METADATA_BLOCK_SIZE = 4096
SECTOR_SIZE = 512


class BlockView(Protocol):
    """A decoded form of a block's contents."""

    def encode(self, data: bytearray) -> None: ...

    def copy(self) -> "BlockView": ...


class Block:
    """One cached metadata block: its bytes, validator, optional decoded view and lock state."""

    __slots__ = ("location", "data", "validator", "view", "dirty", "readers", "writer", "checked")

    def __init__(self, location: int, data: bytearray, validator: Validator):
        self.location = location
        self.data = data
        self.validator = validator
        self.view: Any = None
        self.dirty = False
        self.readers = 0
        self.writer = False
        self.checked = False

    def __repr__(self) -> str:
        return "Block(%d, %s%s)" % (self.location, self.validator.name, ", dirty" if self.dirty else "")


class BlockManager:
    """Metadata blocks of one file (or block device), ``block_size`` bytes each.

    ``durable`` syncs the file at every flush (the kernel's promise at commit); tests on
    throw-away files may turn it off.
    """

    def __init__(self, path: str, *, block_size: int = METADATA_BLOCK_SIZE, read_only: bool = False,
                 durable: bool = True, cache_blocks: int = 4096, log: Callable[[str], None] | None = None):
        self.path = path
        #: receives the kernel's log lines (without ``device-mapper: ``) for blocks that fail a check
        self.log = log or (lambda line: None)
        self.block_size = block_size
        self.read_only = read_only
        self.durable = durable
        self.cache_blocks = cache_blocks
        self._fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        size = os.lseek(self._fd, 0, os.SEEK_END)
        self.nr_blocks = size // block_size
        self._cache: dict[int, Block] = {}
        # clean blocks in use order, the candidates for eviction; dirty blocks are pinned
        self._lru: OrderedDict[int, Block] = OrderedDict()
        self._dirty: dict[int, Block] = {}
        self.reads = 0
        self.writes = 0

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "BlockManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def refresh_size(self) -> int:
        """Re-read the device size (after the metadata device grew); returns ``nr_blocks``."""
        self.nr_blocks = os.lseek(self._fd, 0, os.SEEK_END) // self.block_size
        return self.nr_blocks

    # -- blocks -----------------------------------------------------------------------------

    def _get(self, location: int, validator: Validator, zero: bool) -> Block:
        if not 0 <= location < self.nr_blocks:
            raise DMError(errno.EIO, "metadata block %d beyond the end of the device (%d blocks)"
                          % (location, self.nr_blocks))
        blk = self._cache.get(location)
        if blk is not None:
            if not blk.dirty:
                self._lru.move_to_end(location)
            if zero:
                blk.data = bytearray(self.block_size)
                blk.view = None
                blk.validator = validator
                blk.checked = True
            elif blk.validator is not validator:
                if blk.validator is NO_VALIDATOR and not blk.checked:
                    self._check(validator, blk.data, location)
                    blk.validator = validator
                    blk.checked = True
                elif validator is not NO_VALIDATOR:
                    raise MetadataError("validator mismatch (old=%s vs new=%s) for block %d"
                                        % (blk.validator.name, validator.name, location), errno.EINVAL)
            return blk
        if zero:
            blk = Block(location, bytearray(self.block_size), validator)
            blk.checked = True
        else:
            data = os.pread(self._fd, self.block_size, location * self.block_size)
            self.reads += 1
            if len(data) != self.block_size:
                raise DMError(errno.EIO, "short read of metadata block %d" % location)
            self._check(validator, data, location)
            blk = Block(location, bytearray(data), validator)
            blk.checked = validator is not NO_VALIDATOR
        self._evict()
        self._cache[location] = blk
        self._lru[location] = blk
        return blk

    def _check(self, validator: Validator, data: bytes | bytearray, location: int) -> None:
        """The validator's check, logged as the kernel logs a failure (its line, then ours)."""
        try:
            validator.check(data, location)
        except MetadataError as e:
            self.log("%s: %s" % (validator.prefix, e.message))
            self.log("block manager: %s validator check failed for block %d" % (validator.name, location))
            raise

    def _evict(self) -> None:
        """Drop the least recently used clean blocks over the limit (dirty ones stay until flushed)."""
        lru = self._lru
        while len(lru) >= self.cache_blocks:
            loc, blk = lru.popitem(last=False)
            if blk.readers or blk.writer:
                lru[loc] = blk  # in use: keep, try the next
                if all(b.readers or b.writer for b in lru.values()):
                    return
                continue
            del self._cache[loc]

    def read_lock(self, location: int, validator: Validator = NO_VALIDATOR) -> Block:
        """A shared lock on a block, read and validated if not cached."""
        blk = self._get(location, validator, False)
        if blk.writer:
            raise LockError("block %d is write locked" % location)
        blk.readers += 1
        return blk

    def write_lock(self, location: int, validator: Validator = NO_VALIDATOR, *, zero: bool = False) -> Block:
        """The exclusive lock on a block, which is dirty from now on (``zero``: don't read it)."""
        if self.read_only:
            raise DMError(errno.EPERM, "metadata is read only")
        blk = self._get(location, validator, zero)
        if blk.writer or blk.readers:
            raise LockError("block %d is already locked" % location)
        blk.writer = True
        self._mark_dirty(blk)
        return blk

    def write_lock_zero(self, location: int, validator: Validator = NO_VALIDATOR) -> Block:
        return self.write_lock(location, validator, zero=True)

    def _mark_dirty(self, blk: Block) -> None:
        if not blk.dirty:
            blk.dirty = True
            self._dirty[blk.location] = blk
            self._lru.pop(blk.location, None)

    def unlock(self, blk: Block) -> None:
        if blk.writer:
            blk.writer = False
        elif blk.readers:
            blk.readers -= 1
        else:
            raise LockError("block %d is not locked" % blk.location)

    def peek(self, location: int, validator: Validator) -> Block:
        """A block for a short synchronous look or change, without holding a lock across calls."""
        return self._get(location, validator, False)

    def mark_dirty(self, blk: Block) -> None:
        """Note a change made through :meth:`peek` (the caller holds no conflicting lock)."""
        if self.read_only:
            raise DMError(errno.EPERM, "metadata is read only")
        self._mark_dirty(blk)

    def cached_blocks(self) -> int:
        return len(self._cache)

    def is_locked(self, location: int) -> bool:
        blk = self._cache.get(location)
        return blk is not None and (blk.writer or blk.readers > 0)

    def locked_blocks(self) -> list[int]:
        return [loc for loc, b in self._cache.items() if b.writer or b.readers]

    # -- writing ----------------------------------------------------------------------------

    def encode(self, blk: Block) -> bytearray:
        """The block's bytes as they go to disk: view encoded, number and checksum stamped."""
        if blk.view is not None:
            blk.view.encode(blk.data)
        blk.validator.prepare_for_write(blk.data, blk.location)
        return blk.data

    def flush(self, *, exclude: int | None = None) -> int:
        """Write every dirty block (but ``exclude``) in block order, then sync; returns blocks written."""
        todo = sorted(loc for loc in self._dirty if loc != exclude)
        i = 0
        while i < len(todo):
            j = i + 1
            while j < len(todo) and todo[j] == todo[j - 1] + 1 and j - i < 256:
                j += 1
            bufs = [self.encode(self._dirty[loc]) for loc in todo[i:j]]
            self._pwritev(bufs, todo[i] * self.block_size)
            i = j
        for loc in todo:
            blk = self._dirty.pop(loc)
            blk.dirty = False
            self._lru[loc] = blk
        self.writes += len(todo)
        if todo and self.durable:
            os.fsync(self._fd)
        return len(todo)

    def _pwritev(self, bufs: list[bytearray], offset: int) -> None:
        want = len(bufs) * self.block_size
        done = os.pwritev(self._fd, bufs, offset)
        if done != want:
            data = b"".join(bufs)
            while done < want:
                n = os.pwrite(self._fd, data[done:], offset + done)
                if n <= 0:
                    raise DMError(errno.EIO, "short write of metadata at byte %d" % (offset + done))
                done += n

    def dirty_count(self) -> int:
        return len(self._dirty)

    def discard_dirty(self) -> None:
        """Forget every change not yet flushed (an aborted transaction): dirty blocks leave the cache."""
        for loc, blk in self._dirty.items():
            blk.dirty = False
            self._cache.pop(loc, None)
        self._dirty.clear()
        self._evict()

    def invalidate(self) -> None:
        """Drop the whole cache (dirty blocks too): the next reads come from disk."""
        self._dirty.clear()
        self._cache.clear()
        self._lru.clear()

    def write_raw(self, location: int, data: bytes) -> None:
        """Write one block's bytes now, bypassing cache and validators (tests, zeroing)."""
        self._cache.pop(location, None)
        self._lru.pop(location, None)
        self._dirty.pop(location, None)
        os.pwrite(self._fd, data, location * self.block_size)

    def read_raw(self, location: int) -> bytes:
        blk = self._cache.get(location)
        if blk is not None and blk.dirty:
            return bytes(self.encode(blk))
        return os.pread(self._fd, self.block_size, location * self.block_size)
