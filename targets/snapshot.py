"""snapshot, snapshot-origin, snapshot-merge: copy-on-write snapshots of a device.

Tables::

    snapshot        <origin> <COW device> <P|PO|N> <chunk size> [<#features> <feature>...]
    snapshot-merge  <origin> <COW device> <P|PO|N> <chunk size> [<#features> <feature>...]
    snapshot-origin <origin>

Features: ``discard_zeroes_cow``, ``discard_passdown_origin`` (needs the first).

A *snapshot* shows the origin as it was when the snapshot was activated: a read comes
from the COW device if its chunk was copied there, else from the origin; a write to the
snapshot copies the chunk to the COW first (kcopyd) unless it covers the chunk whole.
A *snapshot-origin* is the origin itself: before a write reaches the origin, every
snapshot of that origin without an exception for the chunk gets the old data copied out
(writes to the same chunk wait on the pending copy).  A *snapshot-merge* puts the
snapshot's chunks back into the origin in the background while staying usable.

Snapshots and origins find each other through the underlying origin device, as the
kernel's ``_origins`` hash does: here a module-level registry keyed by the device
(its real path for image files, the object for other devices) and the manager.

Exceptions are committed in allocation order through the exception store
(:mod:`dmsim.exception_store`), which keeps the kernel's persistent COW format.
Status (info): ``Invalid`` | ``Merge failed`` | ``Overflow`` |
``<sectors allocated>/<COW sectors> <metadata sectors>``; origin: empty.
Kernel: drivers/md/dm-snap.c (snapshot 1.16.0, snapshot-origin 1.9.0, snapshot-merge 1.5.0).
"""
from __future__ import annotations

import bisect
import errno
import itertools
import operator
from typing import Awaitable, Callable

import trio

from dmsim.bio import Bio, Op, settle_read, to_bytes
from dmsim.errors import DMError, TargetError
from dmsim.exception_store import StoreError, TransientStore, create_store
from dmsim.kcopyd import Region

from .base import STATUSTYPE_INFO, STATUSTYPE_TABLE, Target, passthrough, register

#: ``snapshot_cow_threshold``: copies in flight per snapshot before writes wait
COW_THRESHOLD = 2048
#: chunks per block of :class:`ExceptionTable`'s block index (a power of two)
LINEAR_BLOCK_SHIFT = 6
_FAR = 1 << 62      # see Snapshot._read_chunks

# -- the origin registry (``_origins`` / ``_dm_origins``) -------------------------------------
_origins: dict[tuple, list["Snapshot"]] = {}
_dm_origins: dict[tuple, "Origin"] = {}
_pending_done_count = 0
_pending_done_event: "trio.Event | None" = None    # created lazily inside Trio


def dev_key(ctx, dev) -> tuple:
    """The identity of an underlying device: one origin however it was opened."""
    path = getattr(dev, "path", None)       # (an image file; a dm device has no path)
    return (id(ctx.manager), path if path else ("obj", id(dev)))


async def _wait_pending_done(previous: int) -> None:
    global _pending_done_event
    while _pending_done_count == previous:
        if _pending_done_event is None:
            _pending_done_event = trio.Event()
        await _pending_done_event.wait()


def minimum_chunk_size(key) -> int:
    """``__minimum_chunk_size``: smallest chunk among an origin's snapshots (0: none)."""
    sizes = [s.store.chunk_sectors for s in _origins.get(key, ()) if s.store.chunk_sectors]
    return min(sizes, default=0)


class ExceptionTable:
    """A snapshot's completed exceptions (``s->complete``): origin chunk -> COW chunk.

    The one owner of the table: lookups, runs, inserts and removals go through it, and a
    handover swaps the object.  It keeps a block index beside the map: block ``b`` ->
    the COW chunk of origin chunk ``b << LINEAR_BLOCK_SHIFT``, for aligned blocks whose
    chunks are all exceptions consecutive on the COW (what sequential first writes
    leave), so that a large read or a rewrite of such blocks is one lookup per block,
    not per chunk.  Only this class updates either."""

    __slots__ = ("chunks", "blocks", "get", "has")

    def __init__(self) -> None:
        self.chunks: dict[int, int] = {}
        self.blocks: dict[int, int] = {}
        self.get = self.chunks.get              # (bound once: the hot paths call these)
        self.has = self.chunks.__contains__

    def __len__(self) -> int:
        return len(self.chunks)

    def lookups(self, first: int, last: int) -> list:
        """The COW chunk (or None) of each origin chunk ``first..last``."""
        return list(map(self.chunks.get, range(first, last + 1)))

    def missing(self, chunks: range) -> list:
        """The chunks of ``chunks`` without an exception (one lookup per block when every
        block they touch is indexed)."""
        blocks = self.blocks
        if blocks:
            span = range(chunks.start >> LINEAR_BLOCK_SHIFT, ((chunks.stop - 1) >> LINEAR_BLOCK_SHIFT) + 1)
            if all(map(blocks.__contains__, span)):
                return []
        return list(itertools.filterfalse(self.chunks.__contains__, chunks))

    def block_bases(self, first: int, last: int) -> list | None:
        """The COW chunk of each indexed block over chunks ``first..last``; None unless
        every one of them is indexed."""
        blocks = self.blocks
        if not blocks:
            return None
        bases = list(map(blocks.get, range(first >> LINEAR_BLOCK_SHIFT, (last >> LINEAR_BLOCK_SHIFT) + 1)))
        return None if None in bases else bases

    def insert_run(self, old: int, new: int, count: int) -> None:
        """``dm_insert_exception`` for ``count`` chunks ``old+i -> new+i``."""
        blocks = self.blocks
        if count == 1:                  # (a single chunk never completes a block)
            self.chunks[old] = new
            if blocks:
                blocks.pop(old >> LINEAR_BLOCK_SHIFT, None)
            return
        self.chunks.update(zip(range(old, old + count), range(new, new + count), strict=True))
        shift = LINEAR_BLOCK_SHIFT
        if blocks:          # a block the run covers in part is no longer known consecutive
            blocks.pop(old >> shift, None)
            blocks.pop((old + count - 1) >> shift, None)
        for b in range(-(-old >> shift), (old + count) >> shift):
            blocks[b] = new + (b << shift) - old

    def load(self, olds, news) -> None:
        """Exceptions read back from the COW (in bulk); the block index is rebuilt once
        the whole table is in (:meth:`index`)."""
        self.chunks.update(zip(olds, news, strict=True))

    def index(self) -> None:
        """Find the indexed blocks again in a loaded table (a million exceptions take
        ~0.1 s more to activate)."""
        chunks, shift = self.chunks, LINEAR_BLOCK_SHIFT
        size = 1 << shift
        get = chunks.get
        mask = size - 1
        for first in [old for old in chunks if not old & mask]:
            base = chunks[first]
            if (get(first + mask) == base + mask
                    and list(map(get, range(first, first + size))) == list(range(base, base + size))):
                self.blocks[first >> shift] = base

    def remove_run(self, old: int, count: int) -> None:
        """``dm_remove_exception`` for chunks ``old..old+count-1`` (a merge step)."""
        for c in range(old, old + count):
            self.chunks.pop(c, None)
            self.blocks.pop(c >> LINEAR_BLOCK_SHIFT, None)


class PendingTable:
    """A snapshot's pending exceptions (``s->pending``): origin chunk -> the
    :class:`_Pending` copying it, until its completion.

    The one owner of them.  A single-chunk exception is keyed by its chunk; a run by its
    first chunk, found through a sorted list of those (bisect), so that a 1 MiB first
    write registers one entry instead of 256 (which, with their removal, cost more than
    the rest of the write's bookkeeping: ~40% of its instructions, measured with
    callgrind).  Runs never overlap: a chunk is pending once.  ``get`` is the dict's own
    (C) lookup while no run is pending."""

    __slots__ = ("chunks", "starts", "runs", "get")

    def __init__(self) -> None:
        self.chunks: dict[int, _Pending] = {}
        self.starts: list[int] = []             # first chunks of the pending runs, sorted
        self.runs: dict[int, _Pending] = {}     # first chunk -> run
        self.get: Callable[[int], _Pending | None] = self.chunks.get

    def __bool__(self) -> bool:
        return bool(self.chunks) or bool(self.runs)

    def _get(self, chunk: int) -> "_Pending | None":
        pe = self.chunks.get(chunk)
        if pe is None:
            i = bisect.bisect_right(self.starts, chunk)
            if i:
                pe = self.runs[self.starts[i - 1]]
                if chunk >= pe.old_chunk + pe.count:
                    return None
        return pe

    def add(self, pe: "_Pending") -> None:
        if pe.count == 1:
            self.chunks[pe.old_chunk] = pe
            return
        bisect.insort(self.starts, pe.old_chunk)
        self.runs[pe.old_chunk] = pe
        self.get = self._get

    def remove(self, pe: "_Pending") -> None:
        if pe.count == 1:
            if self.chunks.get(pe.old_chunk) is pe:
                del self.chunks[pe.old_chunk]
            return
        if self.runs.get(pe.old_chunk) is pe:
            del self.runs[pe.old_chunk]
            self.starts.remove(pe.old_chunk)
            if not self.runs:
                self.get = self.chunks.get


class _Pending:
    """``dm_snap_pending_exception`` for a run: ``count`` consecutive origin chunks from
    ``old_chunk`` going to consecutive COW chunks from ``new_chunk``.  The kernel keeps
    one per chunk; here the chunks a request allocates together share one (its copy,
    its commit), which is what makes a 1 MiB first write cost tens of microseconds of
    bookkeeping instead of milliseconds.  What reaches the COW is the same.  Its event
    exists only once someone waits: an exception copied and committed in the task that
    allocated it (the uncontended case) never needs one."""

    __slots__ = ("old_chunk", "new_chunk", "count", "seq", "copy_error", "ok", "finished", "_event")

    def __init__(self, old_chunk: int, new_chunk: int, count: int, seq: int):
        self.old_chunk = old_chunk
        self.new_chunk = new_chunk
        self.count = count
        self.seq = seq
        self.copy_error = False
        self.ok = False
        self.finished = False
        self._event: trio.Event | None = None

    def new_of(self, chunk: int) -> int:
        """The COW chunk of origin chunk ``chunk`` (which this run holds)."""
        return self.new_chunk + chunk - self.old_chunk

    async def wait(self) -> None:
        """Until :meth:`Snapshot._pending_complete` has run for this exception."""
        if not self.finished:
            if self._event is None:
                self._event = trio.Event()
            await self._event.wait()


def _chunks_of(pes: list) -> int:
    """Chunks held by a list of pending exceptions."""
    return pes[0].count if len(pes) == 1 else sum(pe.count for pe in pes)


def _run_end(pes: list, i: int) -> tuple[int, int]:
    """The run of ``pes`` (in allocation order) from ``pes[i]`` on that is consecutive
    in both origin and COW chunks (one kcopyd job, one COW write): the index past it
    and its chunks."""
    pe = pes[i]
    old, new, count = pe.old_chunk, pe.new_chunk, pe.count
    j = i + 1
    while j < len(pes) and pes[j].old_chunk == old + count and pes[j].new_chunk == new + count:
        count += pes[j].count
        j += 1
    return j, count


def _consecutive(chunks: list):
    """Split a sorted list of chunk numbers into ``(first, count)`` runs."""
    if chunks[-1] - chunks[0] == len(chunks) - 1:
        yield chunks[0], len(chunks)
        return
    start = prev = chunks[0]
    for c in chunks[1:]:
        if c != prev + 1:
            yield start, prev + 1 - start
            start = c
        prev = c
    yield start, prev + 1 - start


def _origin_write(snapshots, start: int, end: int, waits: list) -> Awaitable[None] | None:
    """``__origin_write`` for every chunk of ``[start, end)`` at once: each snapshot
    with neither an exception nor a pending copy for a chunk allocates one (runs of
    chunks allocate together, in chunk order, as the kernel's chunk-by-chunk loop
    would) and copies it out, here in the caller's task (:meth:`Snapshot.copy_out`).
    Adds to ``waits`` the exceptions still being copied that the write must wait for
    (none: the write may go to the origin).  A plain call: what it returns instead
    (a copy-out or an invalidation that must be awaited) is awaited by the caller,
    who then makes the pass again (``retry_origin_bios``)."""
    for snap in snapshots:
        if snap.merging or not snap.valid or not snap.active:
            continue
        size = snap.table_size
        if start >= size:
            continue
        shift = snap.store.chunk_shift
        first, last = start >> shift, ((end if end < size else size) - 1) >> shift
        if first == last:               # (the common case, without the lists)
            if snap.complete.has(first):
                continue
            pe = snap.pending.get(first)
            if pe is not None:
                waits.append(pe)
                continue
            mine = snap.insert_pending_run(first, 1)
            if not mine:
                return snap.invalidate(errno.ENOMEM)
            rest = snap.copy_out(mine)
            if rest is not None:
                return rest
            if not mine[0].finished:
                waits.append(mine[0])
            continue
        else:
            missing = snap.complete.missing(range(first, last + 1))
            if not missing:
                continue
            pending = snap.pending
            if pending:
                found = list(map(pending.get, missing))
                seen = {id(pe): pe for pe in found if pe is not None}
                if seen:
                    waits.extend(seen.values())
                    missing = list(itertools.compress(missing, map(operator.not_, found)))
        if not missing:
            continue
        mine = []
        no_space = False
        for run_first, n in _consecutive(missing):
            pes = snap.insert_pending_run(run_first, n)
            mine.extend(pes)
            if not pes or (n > 1 and _chunks_of(pes) < n):
                no_space = True
                break
        if mine:
            rest = snap.copy_out(mine)
            if rest is not None:
                return rest     # (the next pass finds the chunks without space again)
            waits.extend(pe for pe in mine if not pe.finished)
        if no_space:
            return snap.invalidate(errno.ENOMEM)
    return None


def _in_one_chunk(key, start: int, end: int) -> bool:
    """Whether ``[start, end)`` is inside one chunk of every snapshot of ``key`` and
    each of them has its exception (or is skipped) for it: nothing left to copy."""
    for s in _origins.get(key, ()):
        shift = s.store.chunk_shift
        if start >> shift != (end - 1) >> shift or not s.has_exception(start):
            return False
    return True


def do_origin(key, start: int, end: int, limit: bool) -> Awaitable[None] | None:
    """``do_origin``: hold an origin write of ``[start, end)`` until every snapshot has
    its chunks copied (re-checked after each wait, as ``retry_origin_bios`` does).  A
    plain call: None when the write may go on now (its copies done in this call, the
    at-once mode), else what to await first."""
    snaps = _origins.get(key, ())
    if limit:
        for s in snaps:
            if s.in_progress > COW_THRESHOLD:
                return _do_origin_waiting(key, start, end, True, None, None)
    waits: list = []
    rest = _origin_write(snaps, start, end, waits)
    if rest is None and not waits:
        return None
    return _do_origin_waiting(key, start, end, False, rest, waits)


async def _do_origin_waiting(key, start: int, end: int, limit: bool,
                             rest: Awaitable[None] | None, waits: list | None) -> None:
    """:func:`do_origin` once it must wait (``waits`` None: no pass made yet)."""
    if limit:
        for s in list(_origins.get(key, [])):
            if s.in_progress > COW_THRESHOLD:
                await s.wait_for_in_progress()
    while True:
        if waits is None:
            waits = []
            rest = _origin_write(_origins.get(key, ()), start, end, waits)
        if rest is not None:
            await rest
        elif not waits:
            return
        else:
            for pe in waits:
                if not pe.finished:
                    await pe.wait()
            if _in_one_chunk(key, start, end):
                return                        # the common retry, without a full pass
        waits = None


@register
class Snapshot(Target):
    name = "snapshot"
    version = (1, 16, 0)
    merging = False

    async def ctr(self, args):
        if len(args) < 4:
            raise TargetError("requires 4 or more arguments")
        self.discard_zeroes_cow = False
        self.discard_passdown_origin = False
        self._parse_features(args[4:])
        try:
            self.origin = self.ctx.get_device(args[0], write=self.merging)
        except DMError as e:
            raise TargetError("Cannot get origin device", e.errno) from None
        try:
            self.cow = self.ctx.get_device(args[1])
        except DMError as e:
            raise TargetError("Cannot get COW device", e.errno) from None
        self.key = dev_key(self.ctx, self.origin)
        if dev_key(self.ctx, self.cow) == self.key:
            raise TargetError("COW device cannot be the same as origin device")
        try:
            self.store = create_store(args[2:4], self.cow, self.origin, self.ctx.log)
        except StoreError:
            raise TargetError("Couldn't create exception store") from None
        self.valid = True
        self.active = False
        self.table_size = 0         # (set at resume, before active: origin writes look at it)
        self.snapshot_overflowed = False
        self.merge_failed = False
        self.complete = ExceptionTable()
        self.pending = PendingTable()
        self._start_seq = 0
        self._complete_seq = 0
        self._copied: dict[int, _Pending] = {}
        self._committing = False            # a task is committing (see _copies_done)
        self._complete_cb = self._pending_complete      # the store's callback (bound once)
        self._tracked: dict[int, int] = {}
        self._untracked: dict[int, trio.Event] = {}
        self._tracked_spans: list[tuple[int, int]] = []     # origin reads of whole chunk runs
        self._spans_changed = trio.Event()
        self.in_progress = 0
        self._in_progress_event = trio.Event()
        self._in_progress_waiters = 0
        self._idle: trio.Event | None = None     # made by dtr when it must wait
        # merge state
        self.first_merging_chunk = 0
        self.num_merging_chunks = 0
        self._merge_release = trio.Event()
        self._merge_release_ok = True
        self._merge_running = False
        self._merge_shutdown = False
        self._merge_stopped = trio.Event()
        self._merge_stopped.set()
        if self.merging and isinstance(self.store, TransientStore):
            raise TargetError("Snapshot exception store does not support snapshot-merge.")
        self.kc = await self.ctx.kcopyd_client()
        try:
            handover = self._register()
            if handover:
                self.store.set_chunk_sectors(0)
                return
            try:
                r = await self.store.read_metadata(self.complete.load)
            except DMError as e:
                self._unregister()
                raise TargetError("Failed to read snapshot metadata", e.errno) from None
            if r > 0:
                self.valid = False
                self.ctx.log("snapshots: Snapshot is marked invalid.")
            self.complete.index()
            if not self.store.chunk_sectors:
                self._unregister()
                raise TargetError("Chunk size not set")
            if self.merging:
                self.max_io_len = self.store.chunk_sectors
        except BaseException:
            await self.kc.destroy()
            raise

    def _parse_features(self, rest):
        if not rest:
            return
        word = rest[0]
        if not word.isdigit() or int(word) > 2 or int(word) > len(rest) - 1:
            raise TargetError("Invalid number of feature arguments")
        for arg in rest[1:1 + int(word)]:
            if arg.lower() == "discard_zeroes_cow":
                self.discard_zeroes_cow = True
            elif arg.lower() == "discard_passdown_origin":
                self.discard_passdown_origin = True
            else:
                raise TargetError("Unrecognised feature requested")
        if self.discard_passdown_origin and not self.discard_zeroes_cow:
            raise TargetError("discard_passdown_origin feature depends on discard_zeroes_cow")

    # -- registry ------------------------------------------------------------------------------
    def _sharing_cow(self):
        """``__find_snapshots_sharing_cow``: (count, src, dest, merging snapshot)."""
        count, src, dest, merge = 0, None, None, None
        cow = dev_key(self.ctx, self.cow)
        for s in _origins.get(self.key, ()):
            if s.merging:
                merge = s
            if dev_key(s.ctx, s.cow) != cow:
                continue
            if s.active:
                src = s
            else:
                dest = s
            count += 1
        return count, src, dest, merge

    def _register(self) -> bool:
        """``register_snapshot``: True when this snapshot awaits an exception handover."""
        count, src, dest, merge = self._sharing_cow()
        if count == 2 or dest is not None:
            raise TargetError("Snapshot cow pairing for exception table handover failed")
        handover = False
        if src is not None:
            if self.merging:
                if merge is not None:
                    raise TargetError("A snapshot is already merging.")
                if not src.store.can_merge:
                    raise TargetError("Snapshot exception store does not support snapshot-merge.")
            handover = True
        self._insert()
        return handover

    def _insert(self) -> None:
        snaps = _origins.setdefault(self.key, [])
        i = 0
        while i < len(snaps) and snaps[i].store.chunk_sectors >= self.store.chunk_sectors:
            i += 1
        snaps.insert(i, self)

    def _unregister(self) -> None:
        snaps = _origins.get(self.key)
        if snaps and self in snaps:
            snaps.remove(self)
            if not snaps:
                del _origins[self.key]


    def has_exception(self, sector: int) -> bool:
        """Whether an origin write at ``sector`` needs no copy for this snapshot (the
        checks of ``__origin_write`` that skip a snapshot, or an exception exists)."""
        return (self.complete.has(sector >> self.store.chunk_shift)    # (the common answer first)
                or self.merging or not self.valid or not self.active or sector >= self.table_size)

    # -- the exception lifecycle: allocate -> copy -> commit -> complete ----------------------
    def insert_pending_run(self, first: int, count: int) -> list:
        """``__insert_pending_exception`` for a run: allocate COW chunks for origin
        chunks ``first .. first+count-1``, one pending exception per run the store hands
        out (a metadata area splits a run), registered where writers to those chunks
        find them and wait; fewer chunks than asked when the COW is full."""
        pes = []
        add = self.pending.add
        prepare = self.store.prepare_run
        while count:
            new, n = prepare(count)
            if not n:
                break
            pe = _Pending(first, new, n, self._start_seq)
            self._start_seq += 1
            add(pe)
            pes.append(pe)
            first += n
            count -= n
        return pes

    def copy_out(self, pes: list) -> Awaitable[None] | None:
        """``start_copy`` for exceptions just allocated, in the caller's task: the origin
        chunks are copied to their COW chunks (runs consecutive on both as one kcopyd
        job; the kernel issues one per chunk, the bytes written are the same), then
        committed and completed (:meth:`_copies_done`).  A plain call: None when they
        are complete on return, else what is left to await.  Each await that can block
        is shielded (other writers of these chunks wait for them).  The at-once mode:
        with a COW whose writes are plain calls (:attr:`BlockDevice.io_at_once`) and no
        origin read to wait for, commit and completion never reach a scheduling point
        (no other task runs meanwhile, nothing can cancel them half done), the copy
        neither when kcopyd runs the job inline, and nothing is shielded."""
        at_once = self.cow.io_at_once and not self._tracked and not self._tracked_spans    # the at-once mode
        if len(pes) == 1:               # (one run: without the lists)
            pe = pes[0]
            n = pe.count
            self.in_progress += n
            cs = self.store.chunk_sectors
            src = pe.old_chunk * cs
            dst = pe.new_chunk * cs
            sectors = n * cs
            left = self.origin.size_sectors - src
            if sectors > left:          # (the origin's last chunk may be short)
                sectors = left
            if at_once and self.kc.copy_now(self.origin, src, self.cow, dst, sectors):
                return self._copies_done(pes, None, n)
            runs = [(src, dst, sectors, 1)]
            i = 0
        else:
            n = _chunks_of(pes)
            self.in_progress += n
            runs = self._copy_runs(pes)
            i = self._copy_inline(runs, 0) if at_once else 0
            if i == len(runs):
                return self._copies_done(pes, None, n)
        return self._copy_out_jobs(pes, runs, i, at_once, n)

    def _copy_runs(self, pes: list) -> list[tuple[int, int, int, int]]:
        """``pes`` (in allocation order) as runs consecutive in old and new chunks, one
        kcopyd job each: (origin sector, COW sector, sectors, exceptions in the run)."""
        cs = self.store.chunk_sectors
        end = self.origin.size_sectors
        runs = []
        i = 0
        while i < len(pes):
            pe = pes[i]
            j, count = _run_end(pes, i)
            src = pe.old_chunk * cs
            sectors = count * cs
            runs.append((src, pe.new_chunk * cs, sectors if sectors <= end - src else end - src, j - i))
            i = j
        return runs

    def _copy_inline(self, runs: list, i: int) -> int:
        """Copy ``runs`` from ``i`` on as kcopyd jobs in their inline mode, up to one that
        can't run inline: its index (``len(runs)``: all copied)."""
        copy_now, origin, cow = self.kc.copy_now, self.origin, self.cow
        n_runs = len(runs)
        while i < n_runs:
            src, dst, sectors, _ = runs[i]
            if not copy_now(origin, src, cow, dst, sectors):
                break
            i += 1
        return i

    async def _copy_out_jobs(self, pes: list, runs: list, i: int, at_once: bool, n: int) -> None:
        """:meth:`copy_out` from run ``i`` on, which must be awaited as a kcopyd job
        (later ones still go inline where they can), then the commit, shielded."""
        failed = [False] * len(runs)
        while i < len(runs):
            src, dst, sectors, _ = runs[i]
            try:
                with trio.CancelScope(shield=True):
                    read_err, write_err = await self.kc.copy_async(Region(self.origin, src, sectors),
                                                                   [Region(self.cow, dst, sectors)])
            except DMError:         # (a client destroyed under it): the copy failed, nothing hangs
                read_err, write_err = 1, 0
            failed[i] = bool(read_err or write_err)
            i = self._copy_inline(runs, i + 1) if at_once else i + 1
        errors = [err for (_, _, _, k), err in zip(runs, failed, strict=True) for _ in range(k)]
        with trio.CancelScope(shield=not at_once):
            rest = self._copies_done(pes, errors, n)
            if rest is not None:
                await rest

    async def write_out(self, pes: list, bio: Bio) -> None:
        """``start_full_bio``: whole-chunk writes to the snapshot go straight to their new
        COW chunks instead of a copy (``pes``, in allocation order: the exceptions for
        whole chunks of ``bio``; runs of them consecutive on the COW are one write),
        then the same commit and completion as :meth:`copy_out`, shielded the same way;
        then waits for their completion and fails (EIO) when one of them failed."""
        n_pes = len(pes)
        n = pes[0].count if n_pes == 1 else _chunks_of(pes)
        self.in_progress += n
        cow = self.cow
        at_once = cow.io_at_once and not self._tracked and not self._tracked_spans    # the at-once mode
        cs = self.store.chunk_sectors
        start = bio.sector
        errors = None
        i = 0
        while i < n_pes:
            pe = pes[i]
            if n_pes == 1:
                j, count = 1, pe.count
            else:
                j, count = _run_end(pes, i)
            offset = pe.old_chunk * cs - start
            whole = n_pes == 1 and not offset and bio.sectors == count * cs     # (the whole request)
            data = bio.data if whole else bio.data_of(offset, count * cs)
            try:
                rest = cow.write_plain(pe.new_chunk * cs, data, bio.fua, bio.flags)
                if rest is not None:
                    if at_once:
                        await rest
                    else:
                        with trio.CancelScope(shield=True):
                            await rest
            except DMError:
                if errors is None:
                    errors = [False] * n_pes
                errors[i:j] = [True] * (j - i)
            i = j
        rest = self._copies_done(pes, errors, n)
        if rest is not None:
            with trio.CancelScope(shield=not at_once):
                await rest
        failed = False
        for pe in pes:
            if not pe.finished:       # (finished, unless an earlier commit still runs)
                await pe.wait()
            if not pe.ok:
                failed = True
        if failed:
            raise DMError(errno.EIO)

    def _copies_done(self, pes: list, errors: list | None, n: int) -> Awaitable[None] | None:
        """``copy_callback``: commit exceptions strictly in allocation order.  Whichever
        task finds the next one in line commits it and every later one that is ready;
        a task finding a commit under way leaves its exceptions to that task (the
        store writes its area once no exception is pending, so exceptions copied
        while an area write runs share the next one).  ``errors``: whether each copy
        failed (None: none did); ``n``: the chunks they hold.  A plain call: None when
        done on return, else what is left to await (a commit that waits)."""
        copied = self._copied
        if errors is None:
            for pe in pes:
                copied[pe.seq] = pe
        else:
            for pe, err in zip(pes, errors, strict=True):
                pe.copy_error = err
                copied[pe.seq] = pe
        if not self._committing:
            self._committing = True
            try:
                rest = self._commit_ready()
            except BaseException:
                self._committing = False
                raise
            if rest is not None:
                return self._commit_waiting(rest, n)
            self._committing = False
        self.in_progress -= n
        if self._in_progress_waiters:
            self._wake_in_progress()
        return None

    def _commit_ready(self) -> Awaitable[None] | None:
        """Commit the copied exceptions next in line, up to one whose commit must be
        awaited (returned; call again after it)."""
        copied = self._copied
        seq = self._complete_seq
        commit, done = self.store.commit_exceptions, self._complete_cb
        pe = copied.pop(seq, None)
        while pe is not None:
            self._complete_seq = seq + 1
            rest = commit(pe, not pe.copy_error, done, pe)
            if rest is not None:
                return rest
            seq = self._complete_seq
            pe = copied.pop(seq, None)
        return None

    async def _commit_waiting(self, rest: Awaitable[None], n: int) -> None:
        try:
            while True:
                await rest
                more = self._commit_ready()
                if more is None:
                    break
                rest = more
        finally:
            self._committing = False
        self.in_progress -= n
        if self._in_progress_waiters:
            self._wake_in_progress()

    def _wake_in_progress(self) -> None:
        """Copies were released: writers held over ``COW_THRESHOLD`` look again."""
        self._in_progress_event.set()
        self._in_progress_event = trio.Event()

    def _pending_complete(self, pe: _Pending, success: bool, waited: bool = False) -> Awaitable[None] | None:
        """``pending_complete``: the one end of every exception, copied or not, committed
        or not: into the table (or the snapshot invalidated), out of the pending ones,
        its waiters and merges waiting on copies woken
        (``increment_pending_exceptions_done_count``).  The store's callback: it returns
        what is left to await when it must wait (an invalidation to record, an origin
        read of the chunk still in flight: :meth:`_pending_complete_waiting`, which
        calls back here with ``waited``), None when it is done."""
        global _pending_done_count, _pending_done_event
        if not waited:
            if not success or (self.valid and (self._tracked or self._tracked_spans)):
                return self._pending_complete_waiting(pe, success)
            success = self.valid            # (an invalid snapshot: no table to insert into)
            if success:
                self.complete.insert_run(pe.old_chunk, pe.new_chunk, pe.count)
        pending = self.pending
        pending.remove(pe)
        pe.ok = success
        pe.finished = True
        if pe._event is not None:
            pe._event.set()
        _pending_done_count += 1
        if _pending_done_event is not None:
            _pending_done_event.set()
            _pending_done_event = None
        if self._idle is not None and not pending:
            self._idle.set()
        return None

    async def _pending_complete_waiting(self, pe: _Pending, success: bool) -> None:
        if not success:
            await self.invalidate(errno.EIO)
        else:
            self.complete.insert_run(pe.old_chunk, pe.new_chunk, pe.count)
            for chunk in range(pe.old_chunk, pe.old_chunk + pe.count):
                await self._wait_untracked(chunk)
        self._pending_complete(pe, success, True)

    async def wait_for_in_progress(self) -> None:
        while self.in_progress > COW_THRESHOLD:
            self._in_progress_waiters += 1
            try:
                await self._in_progress_event.wait()
            finally:
                self._in_progress_waiters -= 1

    async def invalidate(self, err: int) -> None:
        """``__invalidate_snapshot``: unusable forever; recorded in the COW header."""
        if not self.valid:
            return
        if err == errno.EIO:
            self.ctx.log("snapshots: Invalidating snapshot: Error reading/writing.")
        elif err == errno.ENOMEM:
            self.ctx.log("snapshots: Invalidating snapshot: Unable to allocate exception.")
        self.valid = False
        self.ctx.event()
        await self.store.drop_snapshot()

    # -- tracked chunks (reads of the origin that a copy must not overtake) -----------------------
    def _track(self, chunk: int) -> None:
        self._tracked[chunk] = self._tracked.get(chunk, 0) + 1

    def _untrack(self, chunk: int) -> None:
        n = self._tracked[chunk] - 1
        if n:
            self._tracked[chunk] = n
            return
        del self._tracked[chunk]
        ev = self._untracked.pop(chunk, None)
        if ev is not None:
            ev.set()

    def _untrack_span(self, span) -> None:
        self._tracked_spans.remove(span)
        self._spans_changed.set()
        self._spans_changed = trio.Event()

    async def _wait_untracked(self, chunk: int) -> None:
        while True:
            if chunk in self._tracked:
                ev = self._untracked.setdefault(chunk, trio.Event())
                await ev.wait()
            elif any(lo <= chunk < hi for lo, hi in self._tracked_spans):
                await self._spans_changed.wait()
            else:
                return

    async def _tracked_io(self, dev, bio: Bio, chunk: int):
        self._track(chunk)
        try:
            return await dev.submit(bio)
        finally:
            self._untrack(chunk)

    # -- I/O ---------------------------------------------------------------------------------------
    def _remap(self, new_chunk: int, bio: Bio) -> Bio:
        cs = self.store.chunk_sectors
        return bio.remap(new_chunk * cs + (bio.sector & (cs - 1)))

    async def map(self, bio: Bio):
        op = bio.op
        if op is Op.READ or op is Op.WRITE:
            # the common case first, without the general path's checks: a request
            # inside one chunk that already has its exception goes to the COW
            shift = self.store.chunk_shift
            sector = bio.sector
            chunk = sector >> shift
            if chunk == (sector + bio.sectors - 1) >> shift and self.valid:
                new = self.complete.get(chunk)
                if op is Op.READ:
                    if new is not None:
                        return await self.cow.submit(
                            Bio(op, (new << shift) | (sector & ((1 << shift) - 1)), bio.sectors,
                                bio.data, False, bio.flags))
                elif self.in_progress <= COW_THRESHOLD and not self.snapshot_overflowed:
                    if new is not None:
                        return await self.cow.submit(
                            Bio(op, (new << shift) | (sector & ((1 << shift) - 1)), bio.sectors,
                                bio.data, bio.fua, bio.flags))
                    return await self._write_chunk(bio, chunk)      # (_map_chunk's checks are made)
        if bio.op is Op.FLUSH and not bio.sectors:
            return await self.cow.submit(bio)
        if bio.op is Op.WRITE_ZEROES:
            bio = Bio(Op.WRITE, bio.sector, bio.sectors, bytes(to_bytes(bio.sectors)), bio.fua, bio.flags)
        if bio.op is Op.DISCARD and not self.discard_zeroes_cow:
            raise DMError(errno.EOPNOTSUPP)
        shift = self.store.chunk_shift
        if bio.sector >> shift == (bio.end_sector - 1) >> shift:
            return await self._map_chunk(bio)
        # dm core does not split at chunks for us (max_io_len 0): a request spanning
        # chunks is mapped here, its runs of contiguous chunks as single I/Os
        if not self.valid:
            raise DMError(errno.EIO)
        if bio.op is Op.READ:
            return await self._read_chunks(bio)
        if bio.op is Op.WRITE:
            return await self._write_chunks(bio)
        cs = self.store.chunk_sectors
        sector = bio.sector
        while sector < bio.end_sector:          # discards: chunk by chunk, as split
            n = min(bio.end_sector, (sector & -cs) + cs) - sector
            await self._map_chunk(bio.slice(sector - bio.sector, n))
            sector += n
        return None

    async def _no_space(self) -> None:
        """No COW chunk left: overflow (``PO``) or invalidate; the write fails."""
        if self.store.userspace_supports_overflow:
            if self.valid and not self.snapshot_overflowed:
                self.snapshot_overflowed = True
                self.ctx.log("snapshots: Snapshot overflowed: Unable to allocate exception.")
        else:
            await self.invalidate(errno.ENOMEM)
        raise DMError(errno.EIO)

    async def _read_chunks(self, bio: Bio):
        """A read over several chunks: one read per run of chunks that is contiguous on
        the COW or on the origin (the lookups run in C: ``map`` over the table)."""
        shift = self.store.chunk_shift
        first = bio.sector >> shift
        last = (bio.end_sector - 1) >> shift
        bases = self.complete.block_bases(first, last)
        if bases is not None:           # all on the COW, in indexed blocks
            b0 = first >> LINEAR_BLOCK_SHIFT
            if len(bases) == 1:         # in one run: one read
                new = bases[0] + first - (b0 << LINEAR_BLOCK_SHIFT)
                dsec = (new << shift) | (bio.sector & ((1 << shift) - 1))
                return await self.cow.submit(Bio(Op.READ, dsec, bio.sectors, bio.data, False, bio.flags))
            return await self._read_blocks(bio, b0, bases)
        news = self.complete.lookups(first, last)
        n = len(news)
        holes = news.count(None)
        tracked: list[int] = []
        if holes == n:                   # all on the origin
            runs = [(0, n)]
        else:
            if holes:
                # origin chunk i stands for i - _FAR: origin runs are consecutive
                # numbers too, and never continue a COW run
                tracked = [first + i for i, v in enumerate(news) if v is None]
                news = [v if v is not None else i - _FAR for i, v in enumerate(news)]
            breaks = list(map((1).__ne__, map(operator.sub, news[1:], news[:-1])))
            runs = []
            i = 0
            while True:
                try:
                    j = breaks.index(True, i) + 1
                except ValueError:
                    runs.append((i, n))
                    break
                runs.append((i, j))
                i = j
        segs = []
        for i, j in runs:
            start = max(bio.sector, (first + i) << shift)
            end = min(bio.end_sector, (first + j) << shift)
            v = news[i]
            if v is None or v < 0:
                segs.append((self.origin, start, end - start))
            else:
                segs.append((self.cow, (v << shift) | (start & ((1 << shift) - 1)), end - start))
        if holes == n:
            span = (first, first + n)
            self._tracked_spans.append(span)
        for chunk in tracked:
            self._track(chunk)
        try:
            if len(segs) == 1:
                dev, dsec, k = segs[0]
                return await dev.submit(Bio(Op.READ, dsec, k, bio.data, False, bio.flags))
            # the runs land in one buffer (dmsim.bio): no join, one copy of the data
            buf = bio.data if bio.data is not None else bytearray(to_bytes(bio.sectors))
            mv = memoryview(buf)
            offset = 0
            for dev, dsec, k in segs:
                piece = Bio(Op.READ, dsec, k, mv[to_bytes(offset):to_bytes(offset + k)], False, bio.flags)
                settle_read(piece, await dev.submit(piece))
                offset += k
            return buf
        finally:
            for chunk in tracked:
                self._untrack(chunk)
            if holes == n:
                self._untrack_span(span)

    async def _read_blocks(self, bio: Bio, b0: int, bases: list):
        """A read whose chunks are all in indexed blocks (``bases``: the COW
        chunk of each block from ``b0``): one read per run of blocks consecutive on the
        COW (a sequential write's runs break only at metadata chunks), per-chunk lookups
        for none of them."""
        shift = self.store.chunk_shift
        block_sectors = 1 << (LINEAR_BLOCK_SHIFT + shift)
        segs: list[list[int]] = []
        sector = bio.sector
        end = bio.end_sector
        for i, base in enumerate(bases):
            b_start = (b0 + i) * block_sectors
            stop = min(end, b_start + block_sectors)
            dsec = (base << shift) + sector - b_start
            if segs and segs[-1][0] + segs[-1][1] == dsec:
                segs[-1][1] += stop - sector
            else:
                segs.append([dsec, stop - sector])
            sector = stop
        if len(segs) == 1:
            return await self.cow.submit(Bio(Op.READ, segs[0][0], bio.sectors, bio.data, False, bio.flags))
        buf = bio.data if bio.data is not None else bytearray(to_bytes(bio.sectors))
        mv = memoryview(buf)
        offset = 0
        for dsec, k in segs:
            piece = Bio(Op.READ, dsec, k, mv[to_bytes(offset):to_bytes(offset + k)], False, bio.flags)
            settle_read(piece, await self.cow.submit(piece))
            offset += k
        return buf

    async def _write_chunks(self, bio: Bio) -> None:
        if self.in_progress > COW_THRESHOLD:
            await self.wait_for_in_progress()
        if not self.valid or self.snapshot_overflowed:
            raise DMError(errno.EIO)
        cs = self.store.chunk_sectors
        shift = self.store.chunk_shift
        mask = cs - 1
        pending = self.pending
        first = bio.sector >> shift
        news = self.complete.lookups(first, (bio.end_sector - 1) >> shift)
        direct: list = []        # [COW sector, sectors, offset in bio]: chunks with exceptions
        full: list = []          # pes of whole chunks without one: the bio's data is theirs
        partial = []             # (pe, piece, chunk): written after the chunk's copy
        copies = []
        no_space = False
        start, end = bio.sector, bio.end_sector
        i, n_chunks = 0, len(news)
        while i < n_chunks:
            chunk = first + i
            lo = max(start, chunk << shift)
            new = news[i]
            if new is not None:
                j = i + 1                 # a run of exceptions consecutive on the COW
                while j < n_chunks and news[j] == new + j - i:
                    j += 1
                hi = min(end, (first + j) << shift)
                dsec = (new << shift) | (lo & mask)
                if (direct and direct[-1][0] + direct[-1][1] == dsec
                        and direct[-1][2] + direct[-1][1] == lo - start):
                    direct[-1][1] += hi - lo
                else:
                    direct.append([dsec, hi - lo, lo - start])
                i = j
                continue
            pe = pending.get(chunk)
            if pe is not None:
                hi = min(end, (chunk + 1) << shift)
                partial.append((pe, bio.slice(lo - start, hi - lo), chunk))
                i += 1
                continue
            j = i + 1                     # a run of chunks with neither: allocate together
            while j < n_chunks and news[j] is None and pending.get(first + j) is None:
                j += 1
            # a chunk the write covers only in part is copied first; whole ones are not
            head = 1 if lo & mask else 0
            tail = 1 if j - i > head and end < (first + j) << shift else 0
            wanted = j - i
            for c0, count, whole in ((chunk, head, False), (chunk + head, wanted - head - tail, True),
                                     (first + j - 1, tail, False)):
                if count <= 0 or no_space:
                    continue
                pes = self.insert_pending_run(c0, count)
                if whole:
                    full.extend(pes)
                else:
                    for pe in pes:
                        s0 = max(start, pe.old_chunk << shift)
                        s1 = min(end, (pe.old_chunk + pe.count) << shift)
                        copies.append(pe)
                        partial.append((pe, bio.slice(s0 - start, s1 - s0), pe.old_chunk))
                if sum(pe.count for pe in pes) < count:
                    no_space = True
            if no_space:
                break
            i = j
        if copies:
            rest = self.copy_out(copies)
            if rest is not None:
                await rest
        failed = False
        if full:
            try:
                await self.write_out(full, bio)
            except DMError:
                failed = True
        for pe, piece, chunk in partial:
            if not pe.finished:
                await pe.wait()
            if not pe.ok:
                failed = True
            elif not failed:
                await self.cow.submit(self._remap(pe.new_of(chunk), piece))
        if no_space:
            await self._no_space()
        if failed:
            raise DMError(errno.EIO)
        for dsec, n, offset in direct:
            await self.cow.submit(bio.slice(offset, n, dsec))
        return None

    async def _map_chunk(self, bio: Bio):
        """A request inside one chunk (``snapshot_map``)."""
        cs = self.store.chunk_sectors
        chunk = bio.sector >> self.store.chunk_shift
        if not self.valid:
            raise DMError(errno.EIO)
        write = bio.op.is_write
        if write and self.in_progress > COW_THRESHOLD:
            await self.wait_for_in_progress()
        if not self.valid or (self.snapshot_overflowed and write):
            raise DMError(errno.EIO)
        if bio.op is Op.DISCARD:
            if self.discard_passdown_origin:
                await self._tracked_io(self.origin, bio, chunk)
            new = self.complete.get(chunk)
            if new is None:
                return None      # no exception: nothing to discard, no copy-out
            if bio.sectors == cs:
                self.in_progress += 1
                try:
                    _, write_err = await self.kc.zero_async([Region(self.cow, new * cs, cs)])
                finally:
                    self.in_progress -= 1
                if write_err:
                    raise DMError(errno.EIO)
                return None
            return await self.cow.submit(self._remap(new, bio))
        new = self.complete.get(chunk)
        if new is not None:
            return await self.cow.submit(self._remap(new, bio))
        if not write:
            return await self._tracked_io(self.origin, bio, chunk)
        return await self._write_chunk(bio, chunk)

    def _write_chunk(self, bio: Bio, chunk: int) -> Awaitable[None]:
        """A write inside chunk ``chunk``, which has no exception: a whole-chunk write
        becomes the exception's data (:meth:`write_out`), a partial one waits for the
        chunk's copy-out (its own, or the one pending) and is then remapped.  Returns
        what the caller awaits (a plain call up to it: one coroutine less)."""
        pe = self.pending.get(chunk)
        rest = None
        if pe is None:
            pes = self.insert_pending_run(chunk, 1)
            if not pes:
                return self._no_space()                 # (raises EIO)
            if bio.sectors == self.store.chunk_sectors:
                return self.write_out(pes, bio)
            pe = pes[0]
            rest = self.copy_out(pes)
        return self._write_after_copy(bio, chunk, pe, rest)

    async def _write_after_copy(self, bio: Bio, chunk: int, pe: _Pending, rest: Awaitable[None] | None) -> None:
        if rest is not None:
            await rest
        if not pe.finished:
            await pe.wait()
        if not pe.ok:
            raise DMError(errno.EIO)
        return await self.cow.submit(self._remap(pe.new_of(chunk), bio))

    # -- suspend / resume / handover ------------------------------------------------------------
    async def preresume(self):
        _, src, dest, _ = self._sharing_cow()
        if src is not None and dest is not None:
            if self is src:
                self.ctx.log("snapshots: Unable to resume snapshot source until handover completes.")
                raise DMError(errno.EINVAL)
            if not src.ctx.md.suspended:
                self.ctx.log("snapshots: Unable to perform snapshot handover until source is suspended.")
                raise DMError(errno.EINVAL)

    async def resume(self):
        _, src, dest, _ = self._sharing_cow()
        if src is not None and dest is not None:
            dest._take_over(src)
        self._unregister()
        self._insert()
        self.table_size = self.ctx.table.size_sectors     # (complete by now; never changes)
        self.active = True

    def _take_over(self, src: "Snapshot") -> None:
        """``__handover_exceptions``: move the table and store from the live instance."""
        overflow = self.store.userspace_supports_overflow
        self.complete, src.complete = src.complete, self.complete
        self.store, src.store = src.store, self.store
        self.store.userspace_supports_overflow = overflow
        self.store.cow, self.store.origin, self.store.log = self.cow, self.origin, self.ctx.log
        if self.merging:
            self.max_io_len = self.store.chunk_sectors
        self.valid = src.valid
        self.snapshot_overflowed = src.snapshot_overflowed
        src.valid = False

    async def dtr(self):
        _, src, dest, _ = self._sharing_cow()
        if src is self and dest is not None:
            # a table replacing this one resumes (and takes the exceptions over) before
            # this one is destroyed, so a destination still waiting never gets them
            dest.valid = False
            self.ctx.log("snapshots: Cancelling snapshot handover.")
        await self.stop_merge()
        self._unregister()
        while self.pending:            # (every pending exception holds its chunks there)
            self._idle = trio.Event()
            await self._idle.wait()
        await self.kc.destroy()

    async def stop_merge(self) -> None:
        pass

    # -- status ----------------------------------------------------------------------------------
    def status(self, kind, noflush=False):
        if kind == STATUSTYPE_INFO:
            if not self.valid:
                return "Invalid"
            if self.merge_failed:
                return "Merge failed"
            if self.snapshot_overflowed:
                return "Overflow"
            total, allocated, metadata = self.store.usage()
            return "%d/%d %d" % (allocated, total, metadata)
        if kind == STATUSTYPE_TABLE:
            text = "%s %s %s" % (self.origin.ref, self.cow.ref, self.store.table())
            n = self.discard_zeroes_cow + self.discard_passdown_origin
            if n:
                text += " %d" % n
                if self.discard_zeroes_cow:
                    text += " discard_zeroes_cow"
                if self.discard_passdown_origin:
                    text += " discard_passdown_origin"
            return text
        return ""

    def iterate_devices(self):
        return [(self.origin, 0, self.len), (self.cow, 0, self.cow.size_sectors)]


@register
class SnapshotMerge(Snapshot):
    name = "snapshot-merge"
    version = (1, 5, 0)
    merging = True

    async def map(self, bio: Bio):
        if bio.op is Op.FLUSH and not bio.sectors:
            await self.origin.submit(Bio(Op.FLUSH))
            return await self.cow.submit(Bio(Op.FLUSH))
        if bio.op is Op.DISCARD:
            return None              # once merging, discards no longer effect change
        chunk = bio.sector >> self.store.chunk_shift
        write = bio.op.is_write
        if self.valid:
            new = self.complete.get(chunk)
            if new is not None:
                if write and self.first_merging_chunk <= chunk < self.first_merging_chunk + self.num_merging_chunks:
                    release = self._merge_release
                    await release.wait()
                    if not self._merge_release_ok:
                        raise DMError(errno.EIO)
                    return await self.origin.submit(bio)
                if write:
                    return await self._tracked_io(self.cow, self._remap(new, bio), chunk)
                return await self.cow.submit(self._remap(new, bio))
        if write:
            rest = do_origin(self.key, bio.sector, bio.end_sector, False)
            if rest is not None:
                await rest
        return await self.origin.submit(bio)

    async def presuspend(self, noflush=False):
        await self.stop_merge()

    async def resume(self):
        await super().resume()
        self.max_io_len = minimum_chunk_size(self.key)
        self.start_merge()

    def start_merge(self) -> None:
        if self._merge_running:
            return
        self._merge_running = True
        self._merge_stopped = trio.Event()
        self.ctx.start_task(self._merge_loop, name="snapshot-merge")

    @property
    def merge_running(self) -> bool:
        return self._merge_running

    async def wait_merge_stopped(self) -> None:
        """Wait until the merge stops: done, failed, or stopped by a suspend."""
        await self._merge_stopped.wait()

    async def stop_merge(self) -> None:
        """``stop_merge``: let the current step finish, then wait for the merge to stop."""
        self._merge_shutdown = True
        await self._merge_stopped.wait()
        self._merge_shutdown = False

    async def _origin_write_extent(self, sector: int, size: int) -> bool:
        """Whether chunks of the extent are still being copied out (after this task's
        own copies of them, made here)."""
        while True:
            waits: list = []
            rest = _origin_write(_origins.get(self.key, ()), sector, sector + size, waits)
            if rest is None:
                return bool(waits)
            await rest

    def _release_queued(self, ok: bool) -> None:
        self.first_merging_chunk = 0
        self.num_merging_chunks = 0
        self._merge_release_ok = ok
        self._merge_release.set()
        self._merge_release = trio.Event()

    async def _merge_loop(self) -> None:
        """``snapshot_merge_next_chunks`` / ``merge_callback`` as one loop."""
        log = self.ctx.log
        try:
            while not self._merge_shutdown:
                if not self.valid:
                    log("snapshots: Snapshot is invalid: can't merge")
                    break
                try:
                    n, last_old, last_new = await self.store.prepare_merge()
                except DMError:
                    log("snapshots: Read error in exception store: shutting down merge")
                    self.merge_failed = True
                    break
                if n <= 0:
                    break
                cs = self.store.chunk_sectors
                old, new = last_old + 1 - n, last_new + 1 - n
                io_sectors = n * cs
                dest = old * cs
                count = min(io_sectors, self.origin.size_sectors - dest)
                while True:
                    previous = _pending_done_count
                    if not await self._origin_write_extent(dest, io_sectors):
                        break
                    await _wait_pending_done(previous)
                self.first_merging_chunk, self.num_merging_chunks = old, n
                for i in range(n):
                    await self._wait_untracked(old + i)
                read_err, write_err = await self.kc.copy_async(
                    Region(self.cow, new * cs, count), [Region(self.origin, dest, count)])
                failure = None
                if read_err or write_err:
                    failure = ("snapshots: Read error: shutting down merge." if read_err
                               else "snapshots: Write error: shutting down merge.")
                else:
                    try:
                        await self.origin.flush()
                    except DMError:
                        failure = "snapshots: Flush after merge failed: shutting down merge"
                if failure is None:
                    try:
                        await self.store.commit_merge(n)
                    except DMError:
                        failure = "snapshots: Write error in exception store: shutting down merge"
                if failure is not None:
                    log(failure)
                    self.merge_failed = True
                    self._release_queued(False)
                    break
                self.complete.remove_run(old, n)
                self._release_queued(True)
        finally:
            self._merge_running = False
            self._merge_stopped.set()


@register
class Origin(Target):
    name = "snapshot-origin"
    version = (1, 9, 0)

    async def ctr(self, args):
        if len(args) != 1:
            raise TargetError("origin: incorrect number of arguments")
        try:
            self.dev = self.ctx.get_device(args[0])
        except DMError as e:
            raise TargetError("Cannot get target device", e.errno) from None
        self.key = dev_key(self.ctx, self.dev)
        self.split_boundary = 0

    async def map(self, bio: Bio):
        if bio.op is Op.READ or (bio.op is Op.FLUSH and not bio.sectors):
            return await passthrough(self.dev, bio)
        split = self.split_boundary
        sector = bio.sector
        # the kernel splits origin writes at split_boundary and looks at each piece's
        # first chunk; with no boundary (no snapshot when it resumed) only the first
        # chunk of the write is looked at, as there
        end = sector + bio.sectors if split else sector + 1
        snaps = _origins.get(self.key)
        if snaps:
            # a write inside one chunk that every snapshot already has an exception for
            # (a rewrite) goes straight through, the rest through do_origin
            rest = None
            if split and end > sector - sector % split + split:    # (crosses a boundary)
                rest = do_origin(self.key, sector, end, True)
            elif len(snaps) == 1:           # one snapshot: two checks
                s = snaps[0]
                over = s.in_progress > COW_THRESHOLD
                if over or not s.has_exception(sector):
                    rest = do_origin(self.key, sector, end, over)
            elif not all(s.in_progress <= COW_THRESHOLD and s.has_exception(sector) for s in snaps):
                rest = do_origin(self.key, sector, end, True)
            if rest is not None:
                await rest
        return await self.dev.submit(bio)

    async def resume(self):
        self.split_boundary = minimum_chunk_size(self.key)
        _dm_origins[self.key] = self

    async def postsuspend(self):
        if _dm_origins.get(self.key) is self:
            del _dm_origins[self.key]

    async def dtr(self):
        await self.postsuspend()

    def status(self, kind, noflush=False):
        if kind == STATUSTYPE_TABLE:
            return self.dev.ref
        return ""

    def iterate_devices(self):
        return [(self.dev, 0, self.len)]
