"""The block manager (dm-block-manager.c): fixed-size metadata blocks of a device, locked and validated.

Blocks are read once through a cache and checked by their validator on that first read; a
block read under one validator may not be taken under another (the kernel's "validator
mismatch").  Locks are the kernel's: many readers or one writer, and asking for a conflicting
lock is a bug in the caller (:class:`LockError`), never a wait, since all metadata work runs
on one thread.  A write lock marks the block dirty; :meth:`BlockManager.flush` stamps and
writes every dirty block, then syncs.

A block may carry a decoded *view* (a btree node, say) that is authoritative over its bytes
while the block is cached: the bytes are regenerated from the view (``view.encode(data)``)
when the block is written, so hot structures are not re-parsed on every access.

The bytes live in a *store*: :class:`FileStore` (an image file or block device, plain
system calls) or :class:`ImageStore` (a dm device's contents held in memory; its writes and
syncs are queued, in order, for the owner to send down the dm device, since all of this is
synchronous code and dm devices are reached with ``await``).
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


class FileStore:
    """Blocks of an image file or block device, by plain system calls."""

    def __init__(self, path: str, read_only: bool = False, durable: bool = True):
        self.path = path
        self.durable = durable
        self.fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)

    def size_bytes(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_END)

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def pwritev(self, bufs: list[bytearray], offset: int) -> None:
        want = sum(len(b) for b in bufs)
        done = os.pwritev(self.fd, bufs, offset)
        if done != want:
            data = b"".join(bufs)
            while done < want:
                n = os.pwrite(self.fd, data[done:], offset + done)
                if n <= 0:
                    raise DMError(errno.EIO, "short write of metadata at byte %d" % (offset + done))
                done += n

    def sync(self) -> None:
        if self.durable:
            os.fsync(self.fd)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ImageStore:
    """A device's contents in memory, for metadata on a dm device.

    Reads come from the image; each write updates it and is queued in ``pending`` as
    ``(offset_bytes, bytes)``, each sync as ``None``, for the owner to replay on the device
    in order (:meth:`take_pending`).  The image is what the device holds once the queue is
    replayed, so an aborted transaction (dirty blocks dropped) reads back committed bytes.
    """

    def __init__(self, data: bytes | bytearray, name: str = "image"):
        self.path = name
        self.image = bytearray(data)
        self.pending: list[tuple[int, bytes] | None] = []
        self.closed = False

    def size_bytes(self) -> int:
        return len(self.image)

    def pread(self, length: int, offset: int) -> bytes:
        return bytes(self.image[offset:offset + length])

    def pwritev(self, bufs: list[bytearray], offset: int) -> None:
        data = b"".join(bufs)
        if offset + len(data) > len(self.image):
            raise DMError(errno.EIO, "metadata write beyond the device at byte %d" % offset)
        self.image[offset:offset + len(data)] = data
        self.pending.append((offset, data))

    def sync(self) -> None:
        if self.pending and self.pending[-1] is not None:
            self.pending.append(None)

    def grow(self, tail: bytes) -> None:
        """The device grew: its new bytes (read by the owner) join the image."""
        self.image += tail

    def take_pending(self) -> list[tuple[int, bytes] | None]:
        out, self.pending = self.pending, []
        return out

    def close(self) -> None:
        self.closed = True


Store = FileStore | ImageStore


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
    """Metadata blocks of one store (a path is opened as a :class:`FileStore`), ``block_size``
    bytes each.

    ``durable`` syncs the file at every flush (the kernel's promise at commit); tests on
    throw-away files may turn it off.
    """

    def __init__(self, path: str | Store, *, block_size: int = METADATA_BLOCK_SIZE, read_only: bool = False,
                 durable: bool = True, cache_blocks: int = 4096, log: Callable[[str], None] | None = None):
        self.path = path
        #: receives the kernel's log lines (without ``device-mapper: ``) for blocks that fail a check
        self.log = log or (lambda line: None)
        self.block_size = block_size
        self.read_only = read_only
        self.durable = durable
        self.cache_blocks = cache_blocks
        self.store: Store = FileStore(path, read_only, durable) if isinstance(path, str) else path
        self.nr_blocks = self.store.size_bytes() // block_size
        self._cache: dict[int, Block] = {}
        # clean blocks in use order, the candidates for eviction; dirty blocks are pinned
        self._lru: OrderedDict[int, Block] = OrderedDict()
        self._dirty: dict[int, Block] = {}
        self.reads = 0
        self.writes = 0

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        self.store.close()

    @property
    def closed(self) -> bool:
        return self.store.closed

    def __enter__(self) -> "BlockManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def refresh_size(self) -> int:
        """Re-read the device size (after the metadata device grew); returns ``nr_blocks``."""
        self.nr_blocks = self.store.size_bytes() // self.block_size
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
            data = self.store.pread(self.block_size, location * self.block_size)
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
            self.store.pwritev(bufs, todo[i] * self.block_size)
            i = j
        for loc in todo:
            blk = self._dirty.pop(loc)
            blk.dirty = False
            self._lru[loc] = blk
        self.writes += len(todo)
        if todo:
            self.store.sync()
        return len(todo)

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
        self.store.pwritev([bytearray(data)], location * self.block_size)

    def read_raw(self, location: int) -> bytes:
        blk = self._cache.get(location)
        if blk is not None and blk.dirty:
            return bytes(self.encode(blk))
        return self.store.pread(self.block_size, location * self.block_size)
