"""kcopyd: copy a range of sectors from one device to up to eight others.

A userspace rebuild of the kernel's ``dm-kcopyd.c`` (used by mirror resync, snapshot
copy-on-write and merge, thin, cache, clone).  Kernel semantics kept here:

* A *client* owns a page reservation and a worker.  Every job's completion callback
  ``notify(read_err, write_err, context)`` runs exactly once, in the client's worker
  task, never concurrently with another callback of the same client; callbacks may
  submit new jobs.  Pages are returned before the callback runs.
* A job reads the source once and then writes the same buffer to every destination
  at once (no destination is written before the read completed).  ``read_err`` is 0/1;
  ``write_err`` has bit *i* set when some write to ``dests[i]`` failed, OR-accumulated
  over all chunks (the modern fix of 2.6's ``&=`` and last-chunk-wins bugs).
* Jobs larger than the sub-job size are split into chunks claimed in ascending order
  by at most 8 slots (``SPLIT_COUNT``); a slot claims the next chunk when its chunk is
  done.  Without IGNORE_ERROR a failed read skips that chunk's write and no chunk is
  claimed after any error; with it, failed reads write zero-filled pages and every
  chunk runs.  WRITE_SEQ issues chunk writes in ascending order, clears IGNORE_ERROR
  and fails later chunks without I/O (``write_err = ~0``) once a write failed.
* Jobs wait for pages in FIFO order (head-of-line blocking), never failing for lack of
  them.  Modern clients reserve one sub-job's pages plus a bounded "system" pool;
  legacy clients (``num_pages``) own exactly ``num_pages`` pages, use 128-sector
  chunks and split when ``count >= 128``.
* ``destroy`` waits until every submitted job's callback has returned.

Deliberate differences from the kernel (a rebuild contract, not a bug copy):
bad destination counts (0 or > 8), unequal region counts and unsplit jobs that need
more pages than the client owns are rejected at submit with ``DMError(EINVAL)`` instead
of corrupting memory or hanging; zero-length jobs complete with ``(0, 0)`` in both
modes; split chunks are clamped to the client's pages so that a 1-page legacy client
still completes any large copy (8-sector chunks); under WRITE_SEQ a chunk whose read
failed leaves a hole after which later chunks are skipped without I/O (the kernel would
wait forever for the hole to be written); legacy page-queue retry keeps FIFO order.

One copy path, as the kernel's ``dm_kcopyd_copy`` -> ``dispatch_job`` ->
``run_pages_job``/``run_io_job`` -> ``complete_io``: every job (``copy``, ``zero``,
``copy_async``, ``copy_now``) is a :class:`_Job` built by one constructor, dispatched by
:meth:`KcopydClient._dispatch`, its sub-jobs claimed by :meth:`_Job.claim` (its
:meth:`_Job.claim_next` where no error can stop claiming) in ascending order, an
in-kernel copy made by one sub-job step (:meth:`KcopydClient._copy_now`), and ended by
one completion (:meth:`KcopydClient._complete`: the callback queued for the worker).
Two things about a job decide how it runs; they are properties of the job, not other
code:

* ``copy_mode``: how a sub-job moves its data.  Image file to image file with one
  destination is one in-kernel copy (:meth:`FileDevice.copy_to`): as a plain call when
  both files do inline I/O, in a :mod:`dmsim.syncthread` call when either does thread
  I/O; anything else reads into pages and writes the pages to every destination.  An
  in-kernel copy that fails turns the mode off for the rest of the job, whose sub-jobs
  then read and write, so read_err and write_err are exact.
* ``inline``: a job whose sub-jobs are all plain calls (in-kernel copies as plain
  calls, at most 8 sub-jobs: the job's ``inline_pages``; no throttle limiting, pages
  free with nobody queued for them: the client's state at dispatch) runs them one after
  another in the submitter's call, holding its largest sub-job's pages meanwhile, and
  completes there (a callback still runs from the worker, and only that counts as
  outstanding; ``copy_async`` and ``copy_now`` just return).  Anything else is
  *queued*: a task in the client's nursery with up to 8 slot tasks, each claiming
  sub-jobs in ascending order, waiting for pages in FIFO order; the worker task runs
  the callbacks.  An inline job whose copy fails is queued from that sub-job on
  (``copy_now``, which can not wait, then reports False instead).  Page requests are
  queued synchronously at dispatch/claim time, so FIFO start order does not depend on
  Trio's scheduling order.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, NamedTuple, Sequence

import trio

from . import fanout, syncthread
from .bio import PAGE_SECTORS, Bio, Op, to_bytes
from .errors import DMError, collapse_groups

log = logging.getLogger("dmsim.kcopyd")

__all__ = [
    "Region", "KcopydClient", "open_kcopyd_client", "PagePool", "Throttle",
    "MAX_REGIONS", "IGNORE_ERROR", "WRITE_SEQ", "FLAG_IGNORE_ERROR", "FLAG_WRITE_SEQ",
    "SPLIT_COUNT", "DEFAULT_SUB_JOB_SECTORS", "LEGACY_SUB_JOB_SECTORS", "WRITE_ERR_ALL",
    "subjob_sectors_from_kb",
]

MAX_REGIONS = 8
#: flag *bit numbers*, as in the kernel headers (pass ``1 << IGNORE_ERROR``)
IGNORE_ERROR = 1
WRITE_SEQ = 2
#: flag *values*
FLAG_IGNORE_ERROR = 1 << IGNORE_ERROR
FLAG_WRITE_SEQ = 1 << WRITE_SEQ

SPLIT_COUNT = 8
DEFAULT_SUB_JOB_SECTORS = 1024          # kcopyd_subjob_size_kb=512
MAX_SUB_JOB_SECTORS = 2048              # kcopyd_subjob_size_kb max 1024
LEGACY_SUB_JOB_SECTORS = 128            # 2.6 SUB_JOB_SIZE
#: an aborted job's ``write_err``: every bit of an unsigned long, not just N
WRITE_ERR_ALL = (1 << 64) - 1
#: modern default for the bounded "system" pages, in sub-jobs beyond the reserve
DEFAULT_SYSTEM_SUB_JOBS = 15

THROTTLE_SLEEP_SECONDS = 0.1
THROTTLE_MAX_SLEEPS = 10
THROTTLE_ACCOUNT_SECONDS = 1.0          # ~2^SHIFT_HZ jiffies

Notify = Callable[[int, int, Any], None]
#: how the engine holds a region inside: any ``(dev, sector, count)`` tuple (a
#: :class:`Region`, or a plain tuple where building Regions would cost: copy_now)
RegionTuple = tuple[Any, int, int]


class Region(NamedTuple):
    """``struct dm_io_region``: ``count`` sectors of ``dev`` from ``sector``."""

    dev: Any
    sector: int
    count: int  # type: ignore[assignment]  # the kernel's name; shadows tuple.count


def subjob_sectors_from_kb(kb: int) -> int:
    """The module parameter rule: 0 means the default, above the max is clamped."""
    if kb <= 0:
        return DEFAULT_SUB_JOB_SECTORS
    return min(kb * 2, MAX_SUB_JOB_SECTORS)


def pages_for(sectors: int) -> int:
    """Pages a (sub-)job of ``sectors`` needs, taken all at once."""
    return -(-sectors // PAGE_SECTORS)


class _Grant:
    """A queued page request; ``granted`` flips when the pool hands the pages over."""

    __slots__ = ("pages", "granted", "event")

    def __init__(self, pages: int):
        self.pages = pages
        self.granted = False
        self.event: trio.Event | None = None

    async def wait(self) -> None:
        if not self.granted:
            self.event = trio.Event()
            await self.event.wait()


class PagePool:
    """Page accounting with FIFO, head-of-line waiting.

    Only counts are tracked: the buffer a read returns *is* the data, so pages bound how
    much copy data can be in flight.  ``reserve_pages`` is what the client owns;
    ``system_pages`` models the general allocator (bounded here so memory stays
    bounded).  A request is granted only when nothing queued before it is waiting.
    """

    def __init__(self, reserve_pages: int, system_pages: int = 0):
        self.reserve_pages = reserve_pages
        self.system_pages = system_pages
        self.capacity = reserve_pages + system_pages
        self.in_use = 0
        self.peak_in_use = 0
        self._waiters: collections.deque[_Grant] = collections.deque()

    @property
    def free(self) -> int:
        return self.capacity - self.in_use

    def try_take(self, n: int) -> bool:
        if self._waiters or n > self.capacity - self.in_use:
            return False
        self._take(n)
        return True

    def request(self, n: int) -> _Grant:
        """Queue a request now (fixing its FIFO position); await ``grant.wait()``."""
        grant = _Grant(n)
        if self.try_take(n):
            grant.granted = True
        else:
            self._waiters.append(grant)
        return grant

    async def take(self, n: int) -> None:
        grant = self.request(n)
        try:
            await grant.wait()
        except BaseException:
            self.cancel(grant)
            raise

    def cancel(self, grant: _Grant) -> None:
        """Withdraw a request (cancellation); returns its pages if already granted."""
        if grant.granted:
            grant.granted = False
            self.give(grant.pages)
        else:
            with contextlib.suppress(ValueError):
                self._waiters.remove(grant)
            self._grant_waiters()

    def give(self, n: int) -> None:
        self.in_use -= n
        if self._waiters:
            self._grant_waiters()

    def _take(self, n: int) -> None:
        self.in_use += n
        if self.in_use > self.peak_in_use:
            self.peak_in_use = self.in_use

    def _grant_waiters(self) -> None:
        waiters = self._waiters
        while waiters and waiters[0].pages <= self.capacity - self.in_use:
            grant = waiters.popleft()
            self._take(grant.pages)
            grant.granted = True
            if grant.event is not None:
                grant.event.set()


class Throttle:
    """``struct dm_kcopyd_throttle``: limit the share of time copy I/O is in flight.

    May be shared by several clients of one Trio run.  ``percent >= 100`` disables it;
    it is re-read on every check so it can be changed live.  Before each I/O phase, if
    the decayed ``io_period`` exceeds ``percent`` of the wall time, sleep 100 ms and
    re-check, at most 10 times, then issue anyway.
    """

    def __init__(self, percent: int = 100):
        self.percent = percent
        self.io_jobs = 0
        self.io_period_seconds = 0.0
        self.total_period_seconds = 0.0
        self._last: float | None = None
        self.sleeps = 0

    def _account(self) -> None:
        now = trio.current_time()
        if self._last is None:
            self._last = now
        diff = now - self._last
        self._last = now
        if self.io_jobs:
            self.io_period_seconds += diff
        self.total_period_seconds += diff
        if self.total_period_seconds >= THROTTLE_ACCOUNT_SECONDS:
            shift = int(self.total_period_seconds / THROTTLE_ACCOUNT_SECONDS).bit_length()
            self.total_period_seconds /= 1 << shift
            self.io_period_seconds /= 1 << shift

    async def io_start(self) -> None:
        slept = 0
        while self.percent < 100:
            self._account()
            skew = self.io_period_seconds - self.percent * self.total_period_seconds / 100
            if skew <= 0 or slept >= THROTTLE_MAX_SLEEPS:
                break
            slept += 1
            self.sleeps += 1
            await trio.sleep(THROTTLE_SLEEP_SECONDS)
        self.io_jobs += 1

    def io_finish(self) -> None:
        if self.percent < 100:
            self._account()
        self.io_jobs -= 1


#: a job's ``copy_mode``: how its sub-jobs move data (see the module docstring)
COPY_PAGES = 0          # read into pages, write them to every destination
COPY_INLINE = 1         # FileDevice.copy_to as a plain call
COPY_THREAD = 2         # FileDevice.copy_to in a syncthread call


class _Job:
    """A submitted copy/zero (the kernel's master job); its sub-jobs share this state.

    The constructor sets what every job has of its own and what the inline mode reads;
    the rest starts as the class defaults below, and the queued mode sets its own state
    when it starts (:meth:`KcopydClient._queue`).  (Python 3.11 reads an instance's
    attribute fast, but one that falls back to the class default costs as much as ~9
    bytecodes: measured.)
    """

    copy_mode = COPY_PAGES
    #: pages an inline run takes (its largest sub-job's): 0 when the job can never run
    #: inline (not COPY_INLINE, more than 8 sub-jobs, or nothing to copy)
    inline_pages = 0
    inline = False                              # running (or ran) in the submitter's call
    read_err = 0
    write_err = 0
    # sub-jobs issue their first I/O in claim (ascending) order
    issue_offset = 0
    issue_lot: trio.lowlevel.ParkingLot | None = None
    # WRITE_SEQ: next offset allowed to write, first offset whose read failed
    write_offset = 0
    seq_hole: int | None = None
    seq_lot: trio.lowlevel.ParkingLot | None = None

    def __init__(self, kc: KcopydClient, source: RegionTuple | None, dests: tuple[RegionTuple, ...],
                 count_sectors: int, flags: int = 0, notify: Notify | None = None, context: Any = None):
        self.source = source
        self.dests = dests
        self.count_sectors = count_sectors
        self.progress_sectors = 0               # claimed so far
        self.flags = flags
        self.notify = notify
        self.context = context
        # the sub-job size: the client's split rule (2.6 splits from count >= 128)
        if count_sectors > kc.unsplit_max_sectors:
            self.chunk_sectors = chunk = kc.copy_chunk_sectors if source is not None else kc.sub_job_sectors
        else:
            self.chunk_sectors = chunk = count_sectors
        if source is not None and len(dests) == 1:
            can = getattr(source[0], "can_copy_to", None)
            if can is not None:
                dest_dev = dests[0][0]
                if can(dest_dev):
                    self.copy_mode = COPY_INLINE
                    if count_sectors <= SPLIT_COUNT * chunk:
                        self.inline_pages = (chunk + PAGE_SECTORS - 1) // PAGE_SECTORS   # pages_for
                elif can(dest_dev, in_thread=True):
                    self.copy_mode = COPY_THREAD

    def claim(self) -> tuple[int, int] | None:
        """Next unclaimed sub-job ``(offset, sectors)``, or None: no work or stop on error."""
        if (self.read_err or self.write_err) and not self.flags & FLAG_IGNORE_ERROR:
            return None
        if self.progress_sectors >= self.count_sectors:
            return None
        return self.claim_next()

    def claim_next(self) -> tuple[int, int]:
        """The next sub-job, when there is one and no error stops claiming."""
        offset = self.progress_sectors
        sectors = self.count_sectors - offset
        if sectors > self.chunk_sectors:
            sectors = self.chunk_sectors
        self.progress_sectors = offset + sectors
        return offset, sectors


class _PreparedCallback:
    """``dm_kcopyd_prepare_callback``'s descriptor: an outstanding non-copy job."""

    __slots__ = ("notify", "context", "read_err", "write_err", "done")

    def __init__(self, notify: Notify, context: Any):
        self.notify = notify
        self.context = context
        self.read_err = 0
        self.write_err = 0
        self.done = False


class KcopydClient:
    """A kcopyd client: page reservation, worker, outstanding-job counter.

    ``num_pages=None`` is the modern client: a reserve of one sub-job's pages plus up
    to ``max_system_pages`` more (default 15 sub-jobs' worth: memory stays bounded).
    An int is the legacy ``kcopyd_client_create(num_pages)``: exactly that many pages
    and, unless ``legacy=False``, 2.6 splitting (128-sector chunks, split when
    ``count >= 128``).  ``legacy=True`` requires ``num_pages``.  ``throttle`` is a
    :class:`Throttle` (shareable) or a percentage.

    Start the worker with ``await nursery.start(kc.run)`` or use
    :func:`open_kcopyd_client`.
    """

    def __init__(self, num_pages: int | None = None, *, sub_job_sectors: int | None = None,
                 legacy: bool | None = None, throttle: Throttle | int | None = None,
                 max_system_pages: int | None = None):
        if legacy is None:
            legacy = num_pages is not None
        if legacy and num_pages is None:
            raise DMError(errno.EINVAL, "kcopyd: legacy client needs num_pages")
        if num_pages is not None and (not isinstance(num_pages, int) or num_pages <= 0):
            raise DMError(errno.EINVAL, "kcopyd: num_pages must be a positive integer")
        if sub_job_sectors is None:
            sub_job_sectors = LEGACY_SUB_JOB_SECTORS if legacy else DEFAULT_SUB_JOB_SECTORS
        if not isinstance(sub_job_sectors, int) or sub_job_sectors <= 0:
            raise DMError(errno.EINVAL, "kcopyd: sub_job_sectors must be a positive integer")
        self.legacy = legacy
        self.sub_job_sectors = sub_job_sectors
        # the split rule: larger jobs are split (2.6 splits from count >= 128)
        self.unsplit_max_sectors = sub_job_sectors - 1 if legacy else sub_job_sectors
        if num_pages is None:
            reserve = pages_for(sub_job_sectors)
            if max_system_pages is None:
                max_system_pages = DEFAULT_SYSTEM_SUB_JOBS * reserve
            self.pages = PagePool(reserve, max(0, max_system_pages))
        else:
            self.pages = PagePool(num_pages)
        # split chunks are clamped to what the client can ever hold at once
        self.copy_chunk_sectors = min(sub_job_sectors, self.pages.capacity * PAGE_SECTORS)
        if isinstance(throttle, int):
            throttle = Throttle(throttle)
        self.throttle: Throttle | None = throttle
        self._nursery: trio.Nursery | None = None
        self._worker_task: trio.lowlevel.Task | None = None
        self._state = "new"                # new -> running -> stopped
        self._stopping = False
        self._outstanding = 0
        self._completions: collections.deque[_Job | _PreparedCallback] = collections.deque()
        self._wake = trio.Event()
        self._stopped = trio.Event()
        self._flush_waiters: list[trio.Event] = []
        self._zero_buf: memoryview | None = None

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[KcopydClient] = trio.TASK_STATUS_IGNORED) -> None:
        """The worker: runs callbacks until :meth:`destroy` and no job is outstanding."""
        if self._state != "new":
            raise DMError(errno.EBUSY, "kcopyd: client already started")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._worker_task = trio.lowlevel.current_task()
                self._state = "running"
                task_status.started(self)
                while True:
                    self._run_completions()
                    if self._flush_waiters:
                        waiters, self._flush_waiters = self._flush_waiters, []
                        for ev in waiters:
                            ev.set()
                    if self._stopping and self._outstanding == 0:
                        break
                    await self._wake.wait()
                    self._wake = trio.Event()
        finally:
            self._state = "stopped"
            self._nursery = None
            self._stopped.set()

    async def destroy(self) -> None:
        """``dm_kcopyd_client_destroy``: wait for every callback to return, then stop.

        Calling it from one of this client's callbacks would wait for itself (the
        kernel deadlocks); that raises ``DMError(EDEADLK)`` instead.
        """
        if self._state == "new":
            self._state = "stopped"
            self._stopped.set()
            return
        if trio.lowlevel.current_task() is self._worker_task and self._state == "running":
            raise DMError(errno.EDEADLK, "kcopyd: destroy called from the client's own callback")
        self._stopping = True
        self._kick()
        await self._stopped.wait()

    async def flush(self) -> None:
        """``dm_kcopyd_client_flush``: wait until the worker drained what is queued now.

        Not "wait for all jobs": jobs still doing I/O are not waited for.
        """
        if self._state != "running":
            await trio.lowlevel.checkpoint()
            return
        ev = trio.Event()
        self._flush_waiters.append(ev)
        self._kick()
        await ev.wait()

    @property
    def outstanding_jobs(self) -> int:
        """Submitted jobs and prepared callbacks whose callback has not returned."""
        return self._outstanding

    # ------------------------------------------------------------------ submission

    def copy(self, from_region: Region, dest_regions: Sequence[Region], flags: int = 0,
             notify: Notify | None = None, context: Any = None) -> None:
        """``dm_kcopyd_copy``: queue a copy; ``notify(read_err, write_err, context)`` later.

        Never waits and never fails for lack of memory; bad arguments raise
        ``DMError(EINVAL)`` here (no callback then).  A job that can run inline (see the
        module docstring) is copied in this call; its callback still runs from the
        worker (a mirror resync region then costs no job or slot task).
        """
        if from_region is None:
            raise DMError(errno.EINVAL, "kcopyd: copy needs a source region (use zero())")
        self._dispatch(self._new_job(from_region, dest_regions, flags, notify, context))

    def zero(self, dest_regions: Sequence[Region], flags: int = 0,
             notify: Notify | None = None, context: Any = None) -> None:
        """``dm_kcopyd_zero``: write zeros to every destination (no read, no pages)."""
        self._dispatch(self._new_job(None, dest_regions, flags, notify, context))

    async def copy_async(self, from_region: Region, dest_regions: Sequence[Region],
                         flags: int = 0) -> tuple[int, int]:
        """Submit a copy and wait for its ``(read_err, write_err)``.

        A job that runs inline is complete when its dispatch returns: no job task, slot
        or worker callback, the three scheduler hops that were ~90 of the ~110 us a
        4 KiB snapshot copy-out took (measured).
        """
        if from_region is None:
            raise DMError(errno.EINVAL, "kcopyd: copy needs a source region (use zero())")
        return await self._dispatch_and_wait(self._new_job(from_region, dest_regions, flags, None, None))

    async def zero_async(self, dest_regions: Sequence[Region], flags: int = 0) -> tuple[int, int]:
        """Submit a zeroing job and wait for its ``(read_err, write_err)``."""
        return await self._dispatch_and_wait(self._new_job(None, dest_regions, flags, None, None))

    def copy_now(self, src_dev: Any, src_sector: int, dest_dev: Any, dest_sector: int, count: int) -> bool:
        """Copy one region to one destination here and now: the job run inline, as a
        plain call (it never checkpoints, so a caller may rely on nothing else running
        meanwhile).

        False when the job can't run inline (not two image files doing inline I/O, a
        throttle, more than 8 sub-jobs, pages short or someone queued for them, bad
        arguments): nothing is done then.  False too when an in-kernel copy failed: the
        destination range is then undefined, and the caller submits the copy as a job,
        which redoes it and reports exact error bits.
        """
        if self._nursery is None or count < 0 or src_sector < 0 or dest_sector < 0:  # (None: not running)
            return False
        # plain region tuples: two Regions would cost a quarter of this call (measured)
        return self._dispatch(_Job(self, (src_dev, src_sector, count), ((dest_dev, dest_sector, count),), count),
                              False)

    def prepare_callback(self, notify: Notify, context: Any = None) -> _PreparedCallback:
        """Reserve a callback slot that counts as an outstanding job until it has run."""
        self._check_open()
        self._outstanding += 1
        return _PreparedCallback(notify, context)

    def do_callback(self, job: _PreparedCallback, read_err: int = 0, write_err: int = 0) -> None:
        """Queue a prepared callback to run in the worker (Trio thread only; from a
        foreign thread use ``trio.from_thread.run_sync(kc.do_callback, ...)``)."""
        if not isinstance(job, _PreparedCallback) or job.done:
            raise DMError(errno.EINVAL, "kcopyd: do_callback needs a fresh prepared job")
        job.done = True
        job.read_err = read_err
        job.write_err = write_err
        self._queue_completion(job)

    async def _dispatch_and_wait(self, job: _Job) -> tuple[int, int]:
        if self._dispatch(job):
            # complete in the call: inline, where every copy succeeded (one that fails
            # queues the job), or zero-length
            await trio.lowlevel.checkpoint_if_cancelled()
            return 0, 0
        # queued: no task of it has run yet, so its completion will see this notify
        done = trio.Event()
        job.notify = lambda _read_err, _write_err, _context: done.set()
        await done.wait()
        return job.read_err, job.write_err

    def _check_open(self) -> None:
        if self._state != "running":
            raise DMError(errno.EINVAL, "kcopyd: client is not running (start run() first)"
                          if self._state == "new" else "kcopyd: client destroyed")

    def _new_job(self, source: Region | None, dest_regions: Sequence[Region], flags: int,
                 notify: Notify | None, context: Any) -> _Job:
        """Check a submission and build its job; a bad one raises EINVAL (no callback)."""
        self._check_open()
        dests = tuple(dest_regions)
        if not 1 <= len(dests) <= MAX_REGIONS:
            raise DMError(errno.EINVAL, "kcopyd: %d destinations (1..%d allowed)"
                          % (len(dests), MAX_REGIONS))
        for r in dests if source is None else (source, *dests):
            if not isinstance(r, tuple) or len(r) != 3 or r[1] < 0 or r[2] < 0:
                raise DMError(errno.EINVAL, "kcopyd: bad region %r" % (r,))
        count = source[2] if source is not None else dests[0][2]
        if any(d[2] != count for d in dests):
            raise DMError(errno.EINVAL, "kcopyd: region counts differ")
        if flags & FLAG_WRITE_SEQ:
            flags &= ~FLAG_IGNORE_ERROR
        job = _Job(self, source, dests, count, flags, notify, context)
        if source is not None and pages_for(job.chunk_sectors) > self.pages.capacity:
            raise DMError(errno.EINVAL, "kcopyd: job needs %d pages, client owns %d"
                          % (pages_for(job.chunk_sectors), self.pages.capacity))
        return job

    # ------------------------------------------------------------------ execution

    def _dispatch(self, job: _Job, may_queue: bool = True) -> bool:
        """``dispatch_job``: run the job inline when it can, else queue it (not when
        ``may_queue`` is false: nothing is left behind then).  True when the job is
        complete on return (inline, or zero-length).

        Inline when every sub-job is a plain call: in-kernel copies as plain calls, no
        throttle limiting, at most 8 sub-jobs (bounds how long the Trio thread is held;
        the job's ``inline_pages`` says these two), its largest sub-job's pages free and
        nobody queued for pages.  The inline mode takes the pages of its largest (first)
        sub-job once, runs the job's sub-jobs one after another in this call, in claim
        order as the slots would issue them, each copying (:meth:`_copy_now`), and gives
        the pages back (nobody waits for pages: checked here, and nothing else runs
        meanwhile; the peak is what sub-job by sub-job would have taken); then the one
        completion.  A sub-job whose copy fails is unclaimed again, the ones before it
        are done (and count as issued and written, for WRITE_SEQ), and the rest of the
        job is queued.  A job counts as outstanding once something of it is left for
        later: from here when it is queued, else from its completion if it has a
        callback.
        """
        pages = job.inline_pages
        if pages:
            throttle, pool = self.throttle, self.pages
            used = pool.in_use + pages
            if (throttle is None or throttle.percent >= 100) and not pool._waiters and used <= pool.capacity:
                job.inline = True
                pool.in_use = used                  # PagePool.try_take, known to succeed
                if used > pool.peak_in_use:
                    pool.peak_in_use = used
                try:
                    while True:                     # (no error can stop claiming here)
                        offset, sectors = job.claim_next()
                        if not self._copy_now(job, offset, sectors):
                            job.progress_sectors = offset   # unclaimed: the rest is queued
                            break
                        if job.progress_sectors == job.count_sectors:
                            break
                finally:                # (a bug raising here fails this call, the client goes on)
                    pool.in_use -= pages            # PagePool.give, with nobody waiting
                if job.copy_mode:                   # (a failed copy turned it off)
                    self._complete(job)
                    return True
        elif not job.count_sectors:
            job.inline = True           # no I/O at all: complete at once
            self._complete(job)
            return True
        if may_queue:
            self._outstanding += 1
            self._queue(job)
        return False

    def _queue(self, job: _Job) -> None:
        """The queued mode: claim the first sub-jobs (one per slot, up to 8) and queue
        their page requests now, so FIFO order is dispatch order whatever order Trio
        runs tasks in; then start the master task.  The queued mode's state starts
        here, on the job itself (fast to read, see :class:`_Job`): issuing and WRITE_SEQ
        writing go on from the first sub-job not yet done (an inline run that failed
        did the ones before it)."""
        job.inline = False
        job.read_err = job.write_err = 0
        job.issue_offset = job.write_offset = job.progress_sectors
        job.issue_lot = job.seq_lot = None
        job.seq_hole = None
        if job.flags & FLAG_WRITE_SEQ:
            job.seq_lot = trio.lowlevel.ParkingLot()
            job.copy_mode = COPY_PAGES      # writes must be issued in order
        else:
            job.copy_mode = job.copy_mode   # (its own, if still the class default)
        first: list[tuple[int, int, _Grant | None]] = []
        while len(first) < SPLIT_COUNT and (chunk := job.claim()) is not None:
            grant = self.pages.request(pages_for(chunk[1])) if job.source is not None else None
            first.append((chunk[0], chunk[1], grant))
        nursery = self._nursery
        assert nursery is not None, "kcopyd: dispatch on a client that is not running"
        nursery.start_soon(self._run_job, job, first)

    def _complete(self, job: _Job) -> None:
        """The one completion of every job, however it ran (its pages are back): its
        callback is queued for the worker, and the job is outstanding until it has
        run.  A job without one (copy_now, or copy_async done inline, which read the
        result themselves) is over here: a queued one stops counting as outstanding,
        an inline one never counted.  ``job.notify`` is read now, so copy_async may set
        it after dispatching a queued job."""
        if job.notify is None:
            if not job.inline:
                self._outstanding -= 1
                if self._stopping and not self._outstanding:
                    self._kick()
        else:
            if job.inline:
                self._outstanding += 1
            self._queue_completion(job)

    def _kick(self) -> None:
        self._wake.set()

    def _queue_completion(self, job: _Job | _PreparedCallback) -> None:
        self._completions.append(job)
        self._kick()

    def _run_completions(self) -> None:
        """Run the queued callbacks.  One that raises is a bug in its client: its
        traceback goes to the log and the job still counts as complete, so that the
        worker goes on with the client's later jobs (the kernel's callbacks can't fail)."""
        completions = self._completions
        while completions:
            job = completions.popleft()
            try:
                if job.notify is not None:
                    job.notify(job.read_err, job.write_err, job.context)
            except Exception:
                log.exception("kcopyd: a notify callback failed (%r)", job.notify)
            finally:
                self._outstanding -= 1

    async def _run_job(self, job: _Job, first: list[tuple[int, int, _Grant | None]]) -> None:
        """The master: run the first sub-jobs' slots, then the one completion."""
        if len(first) == 1:
            await self._slot(job, *first[0])
        else:
            async with trio.open_nursery() as nursery:
                for offset, sectors, grant in first:
                    nursery.start_soon(self._slot, job, offset, sectors, grant)
        self._complete(job)

    async def _slot(self, job: _Job, offset: int, sectors: int, grant: _Grant | None) -> None:
        """One of the 8 sub-job slots: run a sub-job, release pages, claim the next."""
        pool = self.pages
        while True:
            try:
                if grant is not None and not grant.granted:
                    await grant.wait()
                else:
                    # fairness: devices completing inline never yield otherwise
                    await trio.lowlevel.checkpoint()
                await self._run_chunk(job, offset, sectors)
            finally:
                if grant is not None:
                    pool.cancel(grant)    # returns granted pages, or leaves the queue
            chunk = job.claim()
            if chunk is None:
                return
            offset, sectors = chunk
            grant = pool.request(pages_for(sectors)) if job.source is not None else None

    async def _run_chunk(self, job: _Job, offset: int, sectors: int) -> None:
        """A queued sub-job: wait for its turn to issue, then copy in the kernel
        (``job.copy_mode``) or read once (unless zeroing) and write every destination;
        errors go to the job."""
        if job.issue_offset != offset:
            # the kernel issues dispatched sub-jobs in queue (claim) order; Trio may run
            # the slot tasks in any order, so wait for the sub-jobs claimed before this one
            if job.issue_lot is None:
                job.issue_lot = trio.lowlevel.ParkingLot()
            while job.issue_offset != offset:
                await job.issue_lot.park()
        job.issue_offset += sectors
        if job.issue_lot is not None:
            job.issue_lot.unpark_all()
        throttle = self.throttle
        if job.copy_mode and (throttle is None or throttle.percent >= 100):
            if job.copy_mode == COPY_INLINE:
                if self._copy_now(job, offset, sectors):
                    return
            elif await self._copy_in_thread(job, offset, sectors):
                return
        source, seq_lot = job.source, job.seq_lot
        data = None
        if source is not None:
            if seq_lot is not None and job.write_err:
                job.read_err = 1              # cancelled before its read (kernel -EIO)
                return
            data = await self._read(source, offset, sectors)
            if data is None:
                job.read_err = 1
                if not job.flags & FLAG_IGNORE_ERROR:
                    if seq_lot is not None:
                        if job.seq_hole is None or offset < job.seq_hole:
                            job.seq_hole = offset
                        seq_lot.unpark_all()
                    return
                data = self._zeros(sectors)         # dm-io zero-fills failed reads
        if seq_lot is not None:
            while not (job.write_offset == offset or job.write_err
                       or (job.seq_hole is not None and offset > job.seq_hole)):
                await seq_lot.park()
            if job.write_err:
                job.write_err |= WRITE_ERR_ALL  # cancelled sequential chunk
                seq_lot.unpark_all()
                return
            if job.write_offset != offset:
                return                        # after a read hole: not writable in order
            job.write_offset += sectors
            seq_lot.unpark_all()
        await self._write(job, offset, sectors, data)

    def _copy_now(self, job: _Job, offset: int, sectors: int) -> bool:
        """A sub-job as one in-kernel copy (:meth:`FileDevice.copy_to`), a plain call:
        both files do inline I/O.  A failure turns the job's copy mode off and returns
        False; the sub-job is then read and written, which reports exact error bits."""
        src_dev, src_sector, _ = job.source     # type: ignore[misc]  # (a copy: a source)
        dest_dev, dest_sector, _ = job.dests[0]
        try:
            src_dev.copy_to(dest_dev, src_sector + offset, dest_sector + offset, sectors)
        except DMError:
            job.copy_mode = COPY_PAGES
            return False
        return True

    async def _copy_in_thread(self, job: _Job, offset: int, sectors: int) -> bool:
        """:meth:`_copy_now` in one :mod:`dmsim.syncthread` call, for thread I/O, where
        a read and a write cost two hand-offs and a copy through Python (a 1 GiB resync:
        2.7 s against 0.55 s for cp)."""
        assert job.source is not None
        src_dev, src_sector, _ = job.source
        dest_dev, dest_sector, _ = job.dests[0]
        try:
            await syncthread.run_sync(src_dev.copy_to, dest_dev, src_sector + offset,
                                      dest_sector + offset, sectors)
        except DMError:
            job.copy_mode = COPY_PAGES
            return False
        return True

    async def _read(self, src: RegionTuple, offset: int, sectors: int) -> Any:
        throttle = self.throttle
        if throttle is not None:
            await throttle.io_start()
        try:
            dev, sector, _ = src
            data = await dev.submit(Bio(Op.READ, sector + offset, sectors))
        except (DMError, OSError):
            return None
        finally:
            if throttle is not None:
                throttle.io_finish()
        if data is None or len(data) != to_bytes(sectors):
            return None
        return data

    async def _write(self, job: _Job, offset: int, sectors: int, data: Any) -> None:
        throttle = self.throttle
        if throttle is not None:
            await throttle.io_start()
        try:
            dests = job.dests
            if len(dests) == 1:
                await self._write_dest(job, 0, offset, sectors, data)
            elif data is not None:
                # image files are written in parallel threads (dmsim.fanout), any other
                # destination by its own submit; a failure sets only its own bit
                results = await fanout.write([(d[0], d[1] + offset) for d in dests], sectors, data)
                for i, err in enumerate(results):
                    if err is not None:
                        job.write_err |= 1 << i
                        if job.seq_lot is not None:
                            job.seq_lot.unpark_all()
            else:
                async with trio.open_nursery() as nursery:
                    for i in range(len(dests)):
                        nursery.start_soon(self._write_dest, job, i, offset, sectors, data)
        finally:
            if throttle is not None:
                throttle.io_finish()

    async def _write_dest(self, job: _Job, i: int, offset: int, sectors: int, data: Any) -> None:
        """Write one destination; its failure sets only bit ``i``."""
        dev, sector, _ = job.dests[i]
        sector += offset
        try:
            if data is not None:
                await dev.submit(Bio(Op.WRITE, sector, sectors, data))
            elif getattr(dev, "supports_write_zeroes", True):
                try:
                    await dev.submit(Bio(Op.WRITE_ZEROES, sector, sectors))
                except DMError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
                        raise
                    await dev.submit(Bio(Op.WRITE, sector, sectors, self._zeros(sectors)))
            else:
                await dev.submit(Bio(Op.WRITE, sector, sectors, self._zeros(sectors)))
        except (DMError, OSError):
            job.write_err |= 1 << i
            if job.seq_lot is not None:
                job.seq_lot.unpark_all()

    def _zeros(self, sectors: int) -> memoryview:
        """A read-only view of ``sectors`` sectors of one shared zero buffer."""
        nbytes = to_bytes(sectors)
        if self._zero_buf is None or len(self._zero_buf) < nbytes:
            self._zero_buf = memoryview(bytes(max(nbytes, to_bytes(self.sub_job_sectors))))
        return self._zero_buf[:nbytes]


@asynccontextmanager
async def open_kcopyd_client(num_pages: int | None = None, **kwargs: Any) -> AsyncIterator[KcopydClient]:
    """``async with open_kcopyd_client() as kc``: worker in its own nursery.

    A normal exit destroys the client (waits for every job's callback).  An exception
    in the body cancels outstanding jobs instead of waiting for them.
    """
    kc = KcopydClient(num_pages, **kwargs)
    with collapse_groups():
        async with trio.open_nursery() as nursery:
            await nursery.start(kc.run)
            try:
                yield kc
            except BaseException:
                nursery.cancel_scope.cancel()
                raise
            await kc.destroy()
