"""Snapshot exception stores: where a snapshot records which chunks it copied.

Two stores, as in the kernel (``dm-exception-store.c``, ``dm-snap-persistent.c``,
``dm-snap-transient.c``):

* :class:`PersistentStore` (``P``, ``PO``) keeps the kernel's on-disk COW format byte for
  byte: chunk 0 is the header ``{magic "SnAp", valid, version 1, chunk_size}``; metadata
  area ``k`` is chunk ``1 + k*(E+1)`` holding ``E = chunk_bytes/16`` little-endian
  ``(old_chunk, new_chunk)`` u64 pairs, followed by the ``E`` data chunks it describes.
  The first entry with ``new_chunk == 0`` ends the list.
* :class:`TransientStore` (``N``) allocates COW chunks from 0 and writes nothing.

Commit order is the kernel's: an exception is committed only after its data chunk was
copied, the area write carries PREFLUSH+FUA (here: flush, then a FUA write), so the
on-disk metadata never references a chunk whose data is not durable.  Callers commit
runs of exceptions in allocation order (``commit_exceptions``, the one commit path);
the area is written once no exception is pending or it is full, and the callbacks of
everything it holds run after that.
"""
from __future__ import annotations

import errno
import struct
import sys
from array import array
from typing import Any, Awaitable, Callable, Generator, Sequence

from .bio import REQ_SYNC, SECTOR_SHIFT, Bio, Op, to_bytes
from .errors import DMError

SNAP_MAGIC = 0x70416E53
SNAPSHOT_DISK_VERSION = 1
NUM_SNAPSHOT_HDR_CHUNKS = 1
DM_CHUNK_SIZE_DEFAULT_SECTORS = 32
INT_MAX = (1 << 31) - 1
_HEADER = struct.Struct("<4I")
_PAIR = struct.Struct("<QQ")
_pack_pair = _PAIR.pack_into

#: an exception's completion, ``callback(context, valid)`` (the kernel's callback and
#: callback_context: no closure per exception); returns what is left to await, if any
Callback = Callable[[Any, bool], "Awaitable[None] | None"]
AddException = Callable[[Sequence[int], Sequence[int]], None]     # (old chunks, new chunks)
#: a step-by-step operation: a generator yielding what it must await (:func:`_run_steps_rest`)
Steps = Generator[Awaitable[None], None, None]


async def _run_steps_rest(steps: Steps, awaitable: Awaitable[None]) -> None:
    """The rest of ``steps`` (run as a plain call up to ``awaitable``, the first thing
    it must await): exceptions of an awaited step are thrown back into ``steps`` where
    it yielded, as an ``await`` there would raise them."""
    while True:
        try:
            await awaitable
        except BaseException as e:      # (Cancelled too: the step sees it and cleans up)
            try:
                awaitable = steps.throw(e)
            except StopIteration:
                return
            continue
        try:
            awaitable = next(steps)
        except StopIteration:
            return


class StoreError(Exception):
    """A store constructor failure; ``reason`` is what the kernel puts in ``*error``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def chunk_size_error(chunk_sectors: int, cow, origin) -> str | None:
    """``dm_exception_store_set_chunk_size``: the reason a chunk size is illegal."""
    if chunk_sectors <= 0 or chunk_sectors & (chunk_sectors - 1):
        return "Chunk size is not a power of 2"
    if (chunk_sectors % max(1, cow.logical_block_size >> SECTOR_SHIFT)
            or chunk_sectors % max(1, origin.logical_block_size >> SECTOR_SHIFT)):
        return "Chunk size is not a multiple of device blocksize"
    if chunk_sectors > INT_MAX >> SECTOR_SHIFT:
        return "Chunk size is too high"
    return None


def parse_chunk_size(word: str) -> int:
    """``kstrtouint(arg, 10)``: optional ``+``, decimal digits, fits in 32 bits."""
    digits = word[1:] if word.startswith("+") else word
    if digits.endswith("\n"):
        digits = digits[:-1]
    if not digits or not digits.isascii() or not digits.isdigit() or int(digits) > 0xFFFFFFFF:
        raise StoreError("Invalid chunk size")
    return int(digits)


def _u64_pairs(area: bytes) -> tuple[array, array]:
    """Split an area into (old_chunks, new_chunks) arrays, fast (no per-entry Python)."""
    a = array("Q")
    a.frombytes(area)
    if sys.byteorder != "little":
        a.byteswap()
    return a[0::2], a[1::2]


class ExceptionStore:
    """What the snapshot target needs from a store (``dm_exception_store_type``)."""

    persistent = False
    can_merge = False

    def __init__(self, cow, origin, chunk_sectors: int, log: Callable[[str], None]):
        self.cow = cow
        self.origin = origin
        self.set_chunk_sectors(chunk_sectors)
        self.log = log
        self.userspace_supports_overflow = False
        self.valid = 1              # 0 once the snapshot is invalid (the header says so)

    def set_chunk_sectors(self, chunk_sectors: int) -> None:
        """The chunk size and its shift (a plain attribute: the hot paths read it)."""
        self.chunk_sectors = chunk_sectors
        self.chunk_shift = chunk_sectors.bit_length() - 1

    async def read_metadata(self, add: AddException) -> int:
        """Load the exceptions on the COW through ``add``: 0, or 1 for an invalid one."""
        raise NotImplementedError

    def prepare_run(self, count: int) -> tuple[int, int]:
        """``prepare_exception`` for up to ``count`` consecutive COW chunks at once:
        ``(first new chunk, n)``, ``n`` < ``count`` where the run must stop (a metadata
        area, or the COW full: ``n`` 0 when not one chunk is left); callers wanting more
        ask again."""
        raise NotImplementedError

    def commit_exceptions(self, e: Any, valid: bool, callback: Callback, context: Any) -> Awaitable[None] | None:
        """Commit a run of exceptions (``e``: its ``old_chunk``, ``new_chunk`` and ``count``,
        the kernel's ``struct dm_exception``); ``callback(context, valid)`` once it is durable.  A
        plain call: None when the commit (callback included) is done on return, else
        what is left of it to await."""
        raise NotImplementedError

    async def drop_snapshot(self) -> None:
        """Mark the snapshot invalid where the store keeps its state."""

    async def prepare_merge(self) -> tuple[int, int, int]:
        raise NotImplementedError       # (only stores that can_merge)

    async def commit_merge(self, nr_merged: int) -> None:
        raise NotImplementedError

    def usage(self) -> tuple[int, int, int]:
        """(total_sectors, sectors_allocated, metadata_sectors)."""
        raise NotImplementedError

    def table(self) -> str:
        raise NotImplementedError


class TransientStore(ExceptionStore):
    """``N``: COW chunks from 0 up, nothing on disk, commit always succeeds."""

    def __init__(self, cow, origin, chunk_sectors, log, options: str | None = None):
        super().__init__(cow, origin, chunk_sectors, log)
        self.next_free_sectors = 0

    async def read_metadata(self, add: AddException) -> int:
        return 0

    def prepare_run(self, count: int) -> tuple[int, int]:
        """Up to ``count`` chunks from the next free one (fewer when the COW fills up)."""
        used = self.next_free_sectors
        n = (self.cow.size_sectors - used) // self.chunk_sectors
        if n > count:
            n = count
        elif n <= 0:
            return 0, 0
        self.next_free_sectors = used + n * self.chunk_sectors
        return used // self.chunk_sectors, n

    def commit_exceptions(self, e: Any, valid: bool, callback: Callback, context: Any) -> Awaitable[None] | None:
        return callback(context, valid)

    async def drop_snapshot(self) -> None:
        pass

    def usage(self) -> tuple[int, int, int]:
        """(total_sectors, sectors_allocated, metadata_sectors)."""
        return self.cow.size_sectors, self.next_free_sectors, 0

    def table(self) -> str:
        return "N %d" % self.chunk_sectors


class PersistentStore(ExceptionStore):
    """``P`` / ``PO``: the kernel's persistent COW format (see the module docstring)."""

    persistent = True
    can_merge = True

    def __init__(self, cow, origin, chunk_sectors, log, options: str | None = None):
        super().__init__(cow, origin, chunk_sectors, log)
        if options:
            if options[0].upper() == "O":
                self.userspace_supports_overflow = True
            else:
                log("persistent snapshot: Unsupported persistent store option: %s" % options)
                raise StoreError("Exception store type constructor failed")
        self.version = SNAPSHOT_DISK_VERSION
        self.next_free = NUM_SNAPSHOT_HDR_CHUNKS + 1
        self.current_area = 0
        self.current_committed = 0
        self.pending_count = 0
        self.callbacks: list[tuple[Callback, Any]] = []
        self.area = bytearray()
        self.exceptions_per_area = 0

    # -- geometry ----------------------------------------------------------------------------
    @property
    def chunk_bytes(self) -> int:
        return to_bytes(self.chunk_sectors)

    def area_location(self, area: int) -> int:
        return NUM_SNAPSHOT_HDR_CHUNKS + (self.exceptions_per_area + 1) * area

    def _skip_metadata(self) -> None:
        if self.next_free % (self.exceptions_per_area + 1) == NUM_SNAPSHOT_HDR_CHUNKS:
            self.next_free += 1

    async def _chunk_read(self, chunk: int, flags: int = REQ_SYNC) -> bytes:
        """``chunk_io`` of a read: synchronous dm-io, so REQ_SYNC (``flags=0``: the
        exception areas read at activation, which the kernel reads through dm-bufio)."""
        return await self.cow.submit(Bio(Op.READ, chunk * self.chunk_sectors, self.chunk_sectors, None, False, flags))

    async def _chunk_write(self, chunk: int, data, preflush_fua: bool = False) -> None:
        """``chunk_io`` of a write: synchronous dm-io (REQ_SYNC); the area writes add
        REQ_PREFLUSH|REQ_FUA."""
        if preflush_fua:
            await self.cow.write_preflush_fua(chunk * self.chunk_sectors, bytes(data))
        else:
            await self.cow.submit(Bio(Op.WRITE, chunk * self.chunk_sectors, self.chunk_sectors, bytes(data),
                                      False, REQ_SYNC))

    # -- metadata ------------------------------------------------------------------------------
    async def _read_header(self) -> bool:
        """Read chunk 0; returns True for a new (all-zero magic) COW."""
        supplied = True
        if not self.chunk_sectors:
            self.set_chunk_sectors(max(DM_CHUNK_SIZE_DEFAULT_SECTORS, self.cow.logical_block_size >> SECTOR_SHIFT))
            supplied = False
        data = await self._chunk_read(0)
        magic, valid, version, chunk_sectors = _HEADER.unpack_from(data)
        if magic == 0:
            return True
        if magic != SNAP_MAGIC:
            self.log("persistent snapshot: Invalid or corrupt snapshot")
            raise DMError(errno.ENXIO, "Invalid or corrupt snapshot")
        self.valid, self.version = valid, version
        if chunk_sectors == self.chunk_sectors:
            return False
        if supplied:
            self.log("persistent snapshot: chunk size %d in device metadata overrides table chunk size of %d."
                     % (chunk_sectors, self.chunk_sectors))
        err = chunk_size_error(chunk_sectors, self.cow, self.origin)
        if err:
            self.log("persistent snapshot: invalid on-disk chunk size %d: %s." % (chunk_sectors, err))
            raise DMError(errno.EINVAL, err)
        self.set_chunk_sectors(chunk_sectors)
        return False

    async def write_header(self) -> None:
        header = bytearray(self.chunk_bytes)
        _HEADER.pack_into(header, 0, SNAP_MAGIC, self.valid, self.version, self.chunk_sectors)
        await self._chunk_write(0, header)

    async def read_metadata(self, add: AddException) -> int:
        """``persistent_read_metadata``: 0 ok, 1 valid metadata of an invalidated
        snapshot; raises DMError (after the kernel's log line) when unusable."""
        new = await self._read_header()
        self.exceptions_per_area = self.chunk_bytes // 16
        self.area = bytearray(self.chunk_bytes)
        if new:
            try:
                await self.write_header()
            except DMError:
                self.log("persistent snapshot: write_header failed")
                raise
            self.current_area = 0
            try:
                await self._chunk_write(self.area_location(0), self.area)
            except DMError:
                self.log("persistent snapshot: zero_disk_area(0) failed")
                raise
            return 0
        if self.version != SNAPSHOT_DISK_VERSION:
            self.log("persistent snapshot: unable to handle snapshot disk version %d" % self.version)
            raise DMError(errno.EINVAL)
        if not self.valid:
            return 1
        await self._read_exceptions(add)
        return 0

    async def _read_exceptions(self, add: AddException) -> None:
        full = True
        self.current_area = 0
        while full:
            area = await self._chunk_read(self.area_location(self.current_area), 0)
            olds, news = _u64_pairs(area)
            try:
                n = news.index(0)
                full = False
                self.current_committed = n
                olds, news = olds[:n], news[:n]
            except ValueError:
                n = len(news)
            if n:
                top = max(news)
                limit = self.cow.size_sectors >> self.chunk_shift
                if top >= limit or min(news) <= NUM_SNAPSHOT_HDR_CHUNKS - 1:
                    self.log("persistent snapshot: exception area %d is corrupt: COW chunk %d outside the COW"
                             " (%d chunks)" % (self.current_area, top if top >= limit else 0, limit))
                    raise DMError(errno.EINVAL, "corrupt exception area")
                if self.next_free <= top:
                    self.next_free = top + 1
                add(olds, news)
            if not full:
                self.area[:] = area
            self.current_area += 1
        self.current_area -= 1
        self._skip_metadata()

    # -- exceptions ---------------------------------------------------------------------------
    def prepare_run(self, count: int) -> tuple[int, int]:
        """``persistent_prepare_exception`` up to ``count`` times at once: ``(first new
        chunk, n)``, stopping at the next metadata area or when the COW is full."""
        first = self.next_free
        room = (NUM_SNAPSHOT_HDR_CHUNKS - first) % (self.exceptions_per_area + 1)   # data chunks before the next area
        n = count if count < room else room
        cs = self.chunk_sectors
        if (first + n) * cs > self.cow.size_sectors:        # the COW fills up
            n = self.cow.size_sectors // cs - first
            if n <= 0:
                return first, 0
        self.next_free = first + n + 1 if n == room else first + n      # (past a full area's chunk: _skip_metadata)
        self.pending_count += n
        return first, n

    def commit_exceptions(self, e: Any, valid: bool, callback: Callback, context: Any) -> Awaitable[None] | None:
        """``persistent_commit_exception`` for ``e.count`` consecutive exceptions
        ``e.old_chunk+i -> e.new_chunk+i``, as ``count`` calls of it would be (same area
        writes at the same points: when no exception is pending any more, or the area
        is full), the entries packed in bulk.  Callers commit in allocation order;
        ``callback`` runs, with the others of its area write, once all are durable.  A
        plain call up to the first write or callback that must be awaited
        (:func:`_run_steps_rest`): with a COW whose I/O is at once and callbacks that
        finish, the whole commit."""
        if not valid:
            self.valid = 0
        steps = self._commit_steps(e.old_chunk, e.new_chunk, e.count, callback, context)
        for awaitable in steps:         # (a plain call up to the first thing to await)
            return _run_steps_rest(steps, awaitable)
        return None

    def _commit_steps(self, old: int, new: int, count: int, callback: Callback, context: Any) -> Steps:
        per_area = self.exceptions_per_area
        while True:
            committed = self.current_committed
            k = per_area - committed
            if count < k:
                k = count
            if k == 1:
                _pack_pair(self.area, committed * 16, old, new)
            else:
                pairs = array("Q", bytes(16 * k))
                pairs[0::2] = array("Q", range(old, old + k))
                pairs[1::2] = array("Q", range(new, new + k))
                if sys.byteorder != "little":
                    pairs.byteswap()
                self.area[16 * committed:16 * (committed + k)] = pairs.tobytes()
            committed += k
            self.current_committed = committed
            self.pending_count -= k
            count -= k
            full = committed == per_area
            if not count:
                self.callbacks.append((callback, context))
                # the area is written when nothing else is pending or it is full (not
                # full: this call packed all it had), then the callbacks of all it holds
                if self.pending_count and not full:
                    return
            location = NUM_SNAPSHOT_HDR_CHUNKS + (per_area + 1) * self.current_area    # area_location
            if full:        # the next area zeroed first (``zero_disk_area``): a plain call at once
                try:
                    rest = self.cow.write_plain((location + per_area + 1) * self.chunk_sectors,
                                                bytes(self.chunk_bytes), False, REQ_SYNC)
                    if rest is not None:
                        yield rest
                except DMError:
                    self.valid = 0
            if self.valid:
                cow = self.cow
                area = self.area
                try:
                    # (at once the write is over on return: the area itself, no copy)
                    rest = cow.preflush_fua_write(location * self.chunk_sectors,
                                                  area if cow.io_at_once else bytes(area))
                    if rest is not None:
                        yield rest
                except DMError:
                    self.valid = 0
            if full:
                self.current_committed = 0
                self.current_area += 1
                self.area = bytearray(self.chunk_bytes)
            valid = bool(self.valid)
            callbacks, self.callbacks = self.callbacks, []
            for cb, ctx in callbacks:
                rest = cb(ctx, valid)
                if rest is not None:
                    yield rest
            if not count:
                return
            old += k
            new += k

    async def drop_snapshot(self) -> None:
        self.valid = 0
        try:
            await self.write_header()
        except DMError:
            self.log("persistent snapshot: write header failed")

    # -- merge --------------------------------------------------------------------------------
    async def prepare_merge(self) -> tuple[int, int, int]:
        """(n consecutive, last old, last new) of the newest entries; n == 0: done."""
        if not self.current_committed:
            if not self.current_area:
                return 0, 0, 0
            self.current_area -= 1
            self.area = bytearray(await self._chunk_read(self.area_location(self.current_area)))
            self.current_committed = self.exceptions_per_area
        last_old, last_new = struct.unpack_from("<QQ", self.area, 16 * (self.current_committed - 1))
        n = 1
        while n < self.current_committed:
            old, new = struct.unpack_from("<QQ", self.area, 16 * (self.current_committed - 1 - n))
            if old != last_old - n or new != last_new - n:
                break
            n += 1
        return n, last_old, last_new

    async def commit_merge(self, nr_merged: int) -> None:
        for i in range(nr_merged):
            struct.pack_into("<QQ", self.area, 16 * (self.current_committed - 1 - i), 0, 0)
        await self._chunk_write(self.area_location(self.current_area), self.area, preflush_fua=True)
        self.current_committed -= nr_merged
        self.next_free = self.area_location(self.current_area) + self.current_committed + 1

    # -- status -------------------------------------------------------------------------------
    def usage(self) -> tuple[int, int, int]:
        """(total_sectors, sectors_allocated, metadata_sectors)."""
        return (self.cow.size_sectors, self.next_free * self.chunk_sectors,
                (self.current_area + 1 + NUM_SNAPSHOT_HDR_CHUNKS) * self.chunk_sectors)

    def table(self) -> str:
        return "%s %d" % ("PO" if self.userspace_supports_overflow else "P", self.chunk_sectors)


def create_store(args, cow, origin, log) -> ExceptionStore:
    """``dm_exception_store_create``: ``<P|PO|N> <chunk_size>``; raises StoreError."""
    if len(args) < 2:
        raise StoreError("Insufficient exception store arguments")
    kind = args[0][:1].upper()
    cls: type[ExceptionStore]
    if kind == "P":
        cls = PersistentStore
    elif kind == "N":
        cls = TransientStore
    else:
        raise StoreError("Exception store type is not P or N")
    chunk_sectors = parse_chunk_size(args[1])
    if chunk_sectors:
        err = chunk_size_error(chunk_sectors, cow, origin)
        if err:
            raise StoreError(err)
    return cls(cow, origin, chunk_sectors, log, args[0][1:] or None)
