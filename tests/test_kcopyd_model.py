"""Model test of kcopyd (issue 11, item 2): a hypothesis state machine submits random copy
and zero jobs to one client, over memory devices and image files with injected read and
write errors, several in flight at once, and checks each job against a plain reference
(one bytearray per device) when its completion arrives.

Why a model: kcopyd runs a job inline (in the submitter's call, file to file) or queued
(a task with up to 8 slots, pages waited for in FIFO order), splits it into sub-jobs, and
its error semantics (read_err 0/1, write_err bit i for ``dests[i]``, stop claiming after
an error unless IGNORE_ERROR, WRITE_SEQ ordering) depend on which sub-jobs ran.  The
reference knows none of that machinery, only the kernel's rules:

* sub-jobs are ``[0, s), [s, 2s), ...`` with ``s`` from the client's split rule; a sub-job
  whose source range holds a bad sector fails its read, a destination whose range holds
  one fails its write (both devices fail before writing anything in that request; an
  in-kernel copy that fails may have copied a prefix);
* IGNORE_ERROR: every sub-job runs, failed reads write zeros; otherwise the sub-jobs that
  ran are a prefix ``0..k`` reaching at least the first failing one, a failed read writes
  nothing, and the bits are the OR over the prefix; WRITE_SEQ: everything before the
  first failing sub-job is exact, nothing is written after a read hole;
* a destination range whose write failed may hold anything; nothing outside the
  destinations of the jobs in flight ever changes; every callback runs exactly once, in
  the client's worker; pages are all back and nothing is outstanding once every job has
  completed; ``destroy`` returns only after every callback.

The kernel does not check overlapping regions (the chunks run concurrently: undefined),
so the model never submits a destination that overlaps its own source, another of its
destinations, or any region of a job in flight, nor a source that overlaps a destination
in flight.

Trio runs as a *guest* of the hypothesis thread with an autojump clock: nothing moves
between two rules, ``advance`` lets virtual time pass (memory devices take 0-2 s per
request), and an example replays exactly.  Both modes are driven and counted: file-to-file
jobs run inline when pages are free, and queue behind memory jobs that hold the pages.

``DMSIM_MODEL_EXAMPLES`` multiplies the number of examples (a soak).
"""
from __future__ import annotations

import collections
import errno
import os
import queue
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import outcome
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dmsim.bio import Op, to_bytes
from dmsim.blockdev import FileDevice, MemoryDevice
from dmsim.errors import DMError
from dmsim.kcopyd import (
    COPY_INLINE,
    FLAG_IGNORE_ERROR,
    FLAG_WRITE_SEQ,
    MAX_REGIONS,
    WRITE_ERR_ALL,
    KcopydClient,
    Region,
    pages_for,
)

SOAK = int(os.environ.get("DMSIM_MODEL_EXAMPLES") or "1")
EXAMPLES = 60 * SOAK
STEPS = 40
SIZE = 1024                      # sectors per device
JOB_VIRTUAL_SECONDS = 3600.0     # a call still blocked after this (virtual) time has hung
JOB_REAL_SECONDS = 60.0          # ... or after this much real time (a busy loop)
MEMORY = ("M0", "M1", "M2")      # memory devices (faults, delays)
FAULTY_FILES = ("F0", "F1")      # image files with faults (their own submit and copy_to)
PLAIN_FILES = ("P0", "P1")       # plain image files (dmsim.fanout writes them)
FILES = FAULTY_FILES + PLAIN_FILES
DEVICES = MEMORY + FILES
COUNTS = [0, 1, 7, 8, 9, 16, 24, 63, 64, 65, 127, 128, 129, 200, 256, 300, 513]
FLAGS = [0, 0, 1, FLAG_IGNORE_ERROR, FLAG_IGNORE_ERROR, FLAG_WRITE_SEQ,
         FLAG_WRITE_SEQ | FLAG_IGNORE_ERROR]

OPS: collections.Counter = collections.Counter()     # operations and modes, for the soak
MODES = ("inline", "inline, then queued", "queued", "clean", "errors")   # counted, not operations


_BASE: list[bytes] = []


def _base_pattern() -> bytes:
    """One random device image, made once (a fresh one per example costs more than the
    example); examples take rotations of it."""
    if not _BASE:
        _BASE.append(random.Random(0).randbytes(to_bytes(SIZE)))
    return _BASE[0]


def _rotated(base: bytes, seed: int) -> bytes:
    cut = (seed * 4099) % len(base)
    return base[cut:] + base[:cut]


def overlaps(a0: int, a1: int, b0: int, b1: int) -> bool:
    return a0 < b1 and b0 < a1


class Faults:
    """Bad sectors of one device: a request touching one fails with EIO."""

    def __init__(self) -> None:
        self.read: set[int] = set()
        self.write: set[int] = set()

    def hits(self, bad: set[int], sector: int, count: int) -> bool:
        return any(sector <= s < sector + count for s in bad)


class FaultyMemory(MemoryDevice):
    """A memory device with bad sectors and a per-request delay (virtual time)."""

    def __init__(self, name: str, data: bytes, delay_seconds: float):
        super().__init__(SIZE, data, name=name)
        self.faults = Faults()
        self.delay_seconds = delay_seconds

    async def submit(self, bio):
        if self.delay_seconds:
            await trio.sleep(self.delay_seconds)
        bad = self.faults.read if bio.op is Op.READ else self.faults.write
        if self.faults.hits(bad, bio.sector, bio.sectors):
            await trio.lowlevel.checkpoint()
            raise DMError(errno.EIO)
        return await super().submit(bio)


class CheckedCopyFile(FileDevice):
    """An image file whose in-kernel copy honours injected bad sectors on either side:
    it copies the part before the first one, then fails (a real copy can stop midway).
    Its own requests are FileDevice's, so :mod:`dmsim.fanout` writes it."""

    def copy_to(self, dst, src_sector, dst_sector, sectors):
        bad = []
        for dev, side, start in ((self, "read", src_sector), (dst, "write", dst_sector)):
            faults = getattr(dev, "faults", None)
            if faults is not None:
                bad += [s - start for s in getattr(faults, side) if start <= s < start + sectors]
        if bad:
            if min(bad):
                super().copy_to(dst, src_sector, dst_sector, min(bad))
            raise DMError(errno.EIO, "injected copy failure")
        return super().copy_to(dst, src_sector, dst_sector, sectors)


class FaultyFile(CheckedCopyFile):
    """An image file with bad sectors (its own submit: not written by the fan-out)."""

    def __init__(self, path: str):
        super().__init__(path, io_mode="inline", durability="process")
        self.faults = Faults()

    async def submit(self, bio):
        bad = self.faults.read if bio.op is Op.READ else self.faults.write
        if self.faults.hits(bad, bio.sector, bio.sectors):
            raise DMError(errno.EIO)
        return await super().submit(bio)


# -- Trio as a guest of the hypothesis thread ---------------------------------------------------
class GuestLoop:
    """A Trio run stepped by this thread: work runs through :meth:`call`; between two
    calls nothing in Trio moves.  The autojump clock gives every guest tick a zero
    timeout, so the run never leaves this thread."""

    def __init__(self) -> None:
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._done: outcome.Outcome | None = None
        self._stop: trio.Event | None = None
        self.nursery: trio.Nursery | None = None
        trio._core._run._r.seed(0)      # trio shuffles its run queue: make it replayable
        trio.lowlevel.start_guest_run(
            self._main, run_sync_soon_threadsafe=self._todo.put, done_callback=self._finished,
            clock=trio.testing.MockClock(autojump_threshold=0))
        self._pump(lambda: self.nursery is not None)

    def _finished(self, result: outcome.Outcome) -> None:
        self._done = result

    async def _main(self) -> None:
        self._stop = trio.Event()
        self.token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def _pump(self, ready) -> None:
        deadline = time.monotonic() + JOB_REAL_SECONDS
        while not ready():
            if self._done is not None:
                self._done.unwrap()
                raise RuntimeError("the Trio run ended")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Trio still busy after %.0f s of real time" % JOB_REAL_SECONDS)
            self._todo.get(timeout=left)()

    def spawn(self, async_fn, *args) -> list:
        """Start ``async_fn(*args)`` as a task; the returned box gets its outcome."""
        box: list = []

        async def job():
            box.append(await outcome.acapture(async_fn, *args))

        assert self.nursery is not None
        self.token.run_sync_soon(self.nursery.start_soon, job)
        return box

    def call(self, async_fn, *args):
        """Run ``async_fn(*args)`` in Trio (a hang fails after a long virtual timeout)."""
        async def bounded():
            with trio.fail_after(JOB_VIRTUAL_SECONDS):
                return await async_fn(*args)

        box = self.spawn(bounded)
        self._pump(lambda: box)
        return box[0].unwrap()

    def run(self, fn, *args):
        """Run a plain ``fn(*args)`` inside Trio (kcopyd's sync API needs the run)."""
        async def sync():
            return fn(*args)
        return self.call(sync)

    def run_until(self, ready) -> None:
        """Let Trio run, without waiting for virtual time, until ``ready()``."""
        self._pump(ready)

    def wait_for(self, ready) -> None:
        """Let Trio run (virtual time passing) until ``ready()``."""
        async def waiting():
            while not ready():
                await trio.sleep(0.25)
        self.call(waiting)

    def close(self) -> None:
        if self._done is None and self._stop is not None:
            self.token.run_sync_soon(self._stop.set)
            self._pump(lambda: self._done is not None)
        if self._done is not None:
            self._done.unwrap()


# -- the reference ------------------------------------------------------------------------------
@dataclass
class Job:
    id: int
    api: str                             # copy, copy_async, zero, zero_async
    src: tuple[str, int] | None          # (device, sector); None: zeroing
    dests: list[tuple[str, int]]
    count: int
    flags: int
    chunk: int                           # sub-job size by the client's split rule
    src_data: bytes                      # what the source held (zeros when zeroing)
    old: list[bytes]                     # what each destination held
    rf: list[bool]                       # per sub-job: its read fails
    wf: list[int]                        # per sub-job: mask of destinations whose write fails
    calls: list[tuple[int, int]] = field(default_factory=list)
    tasks: list[Any] = field(default_factory=list)
    box: list | None = None              # copy_async / zero_async outcome

    @property
    def result(self) -> tuple[int, int] | None:
        if self.box is not None:
            if not self.box:
                return None
            if isinstance(self.box[0], outcome.Error):
                raise self.box[0].error
            return self.box[0].value
        return self.calls[0] if self.calls else None

    def ranges(self):
        """(device, start, end, writes) of every region the job touches."""
        if self.src is not None:
            yield self.src[0], self.src[1], self.src[1] + self.count, False
        for dev, sector in self.dests:
            yield dev, sector, sector + self.count, True


class KcopydMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop: GuestLoop | None = None
        self.tmp = tempfile.mkdtemp(prefix="kcopyd-model-")
        self.jobs: dict[int, Job] = {}           # in flight
        self.next_id = 0
        self.kc: KcopydClient | None = None
        self.prepared: list[tuple[Any, list]] = []
        #: devices given to kcopyd since the last check (it can write no others)
        self.touched: set[str] = set(DEVICES)

    # ---------------------------------------------------------------- set-up
    @initialize(client=st.sampled_from([
        ("modern", 8), ("modern", 16), ("modern", 64), ("modern", 1024),
        ("legacy", 1), ("legacy", 3), ("legacy", 16), ("fixed", 4)]),
        delays=st.lists(st.sampled_from([0.0, 0.0, 1.0, 2.0]), min_size=len(MEMORY), max_size=len(MEMORY)),
        seed=st.integers(0, 2**32 - 1),
        faults=st.lists(st.tuples(st.sampled_from(MEMORY + FAULTY_FILES), st.sampled_from(["read", "write"]),
                                  st.integers(0, SIZE - 1), st.sampled_from([1, 8, 64, 300])), max_size=4))
    def setup(self, client, delays, seed, faults):
        self.loop = GuestLoop()
        base = _base_pattern()
        self.ref: dict[str, bytearray] = {}
        self.devs: dict[str, Any] = {}
        for k, (name, delay) in enumerate(zip(MEMORY, delays, strict=True)):
            data = _rotated(base, seed + k)
            self.ref[name] = bytearray(data)
            self.devs[name] = FaultyMemory(name, data, delay)
        for k, name in enumerate(FILES):
            data = _rotated(base, seed + 7919 * (k + 1))
            path = os.path.join(self.tmp, name)
            with open(path, "wb") as f:
                f.write(data)
            self.ref[name] = bytearray(data)
            if name in FAULTY_FILES:
                self.devs[name] = FaultyFile(path)
            else:
                self.devs[name] = CheckedCopyFile(path, io_mode="inline", durability="process")
        for dev, kind, sector, length in faults:
            getattr(self.devs[dev].faults, kind).update(range(sector, min(sector + length, SIZE)))
        self.client = client
        self._start_client()

    def _start_client(self) -> None:
        kind, n = self.client
        if kind == "modern":
            kwargs: dict[str, Any] = {"sub_job_sectors": n}
            num_pages = None
        else:
            kwargs = {"legacy": False} if kind == "fixed" else {}
            num_pages = n
        kc = KcopydClient(num_pages, **kwargs)
        assert self.loop is not None
        self.worker = self.loop.spawn(kc.run)
        self.loop.wait_for(lambda: kc._state == "running")
        # count the modes (white box: the engine's two ways to run a job)
        dispatch, queue_job = kc._dispatch, kc._queue

        def counted_dispatch(job, may_queue=True):
            mode = job.copy_mode
            done = dispatch(job, may_queue)
            if done and job.count_sectors:
                OPS["inline"] += 1
            elif mode == COPY_INLINE and job.copy_mode != mode:    # an inline copy failed
                OPS["inline, then queued"] += 1
            return done

        def counted_queue(job):
            OPS["queued"] += 1
            return queue_job(job)

        kc._dispatch = counted_dispatch          # type: ignore[method-assign]
        kc._queue = counted_queue                # type: ignore[method-assign]
        self.kc = kc
        self.submitted = 0                      # jobs since this client started
        # the split rule, as the kernel states it (legacy: 128-sector sub-jobs from 128)
        self.capacity = kc.pages.capacity
        self.legacy = kind == "legacy"
        self.sub = 128 if self.legacy else n if kind == "modern" else 1024

    def chunk_for(self, count: int, copy: bool) -> int:
        """The sub-job size of a job: whole unless split (2.6 splits from 128 sectors, modern
        above the sub-job size), copies' sub-jobs clamped to the pages the client owns."""
        split = count >= self.sub if self.legacy else count > self.sub
        if not split:
            return count
        return min(self.sub, self.capacity * 8) if copy else self.sub

    def teardown(self) -> None:
        try:
            if self.loop is not None:
                if self.kc is not None and self.kc._state == "running":
                    for job, _ in self.prepared:
                        self.loop.run(self.kc.do_callback, job)
                    self.loop.call(self.kc.destroy)
                self.loop.close()
        finally:
            for dev in getattr(self, "devs", {}).values():
                if isinstance(dev, FileDevice):
                    dev.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ---------------------------------------------------------------- helpers
    def read_dev(self, name: str, sector: int, count: int) -> bytes:
        dev = self.devs[name]
        lo, hi = to_bytes(sector), to_bytes(sector + count)
        if isinstance(dev, MemoryDevice):
            return dev.buf[lo:hi]
        return os.pread(dev.fd, hi - lo, lo)

    def busy(self, name: str, start: int, end: int, writes: bool) -> bool:
        """Whether a new region would clash with a job in flight (writes: a destination)."""
        for job in self.jobs.values():
            for dev, s, e, w in job.ranges():
                if dev == name and overlaps(start, end, s, e) and (writes or w):
                    return True
        return False

    def pick_dests(self, data, count: int, src: tuple[str, int] | None, n: int, devices) -> list:
        dests: list[tuple[str, int]] = []
        for _ in range(n):
            name = data.draw(st.sampled_from(devices))
            sector = data.draw(st.integers(0, SIZE - count))
            end = sector + count
            if count and (self.busy(name, sector, end, True)
                          or (src is not None and src[0] == name and overlaps(sector, end, src[1], src[1] + count))
                          or any(d == name and overlaps(sector, end, s, s + count) for d, s in dests)):
                continue
            dests.append((name, sector))
        return dests

    def plan(self, src, dests, count, flags, api) -> Job:
        copy = src is not None
        chunk = self.chunk_for(count, copy)
        offsets = list(range(0, count, chunk)) if count else []
        src_faults = getattr(self.devs[src[0]], "faults", None) if src is not None else None
        rf, wf = [], []
        for off in offsets:
            n = min(chunk, count - off)
            rf.append(src_faults is not None and src_faults.hits(src_faults.read, src[1] + off, n))
            mask = 0
            for i, (d, s) in enumerate(dests):
                faults = getattr(self.devs[d], "faults", None)
                if faults is not None and faults.hits(faults.write, s + off, n):
                    mask |= 1 << i
            wf.append(mask)
        if src is not None:
            lo, hi = to_bytes(src[1]), to_bytes(src[1] + count)
            src_data = bytes(self.ref[src[0]][lo:hi])
        else:
            src_data = bytes(to_bytes(count))
        old = [bytes(self.ref[d][to_bytes(s):to_bytes(s + count)]) for d, s in dests]
        if flags & FLAG_WRITE_SEQ:
            flags &= ~FLAG_IGNORE_ERROR
        job = Job(self.next_id, api, src, dests, count, flags, chunk, src_data, old, rf, wf)
        self.next_id += 1
        self.touched.update(d for d, _ in dests)
        if src is not None:
            self.touched.add(src[0])
        return job

    def attempt(self, fn, *args) -> DMError | None:
        """Call kcopyd's sync API in Trio; a refusal must leave no job outstanding (both
        counts taken in the same step, so other jobs' completions don't interfere)."""
        kc = self.kc

        def call():
            before = kc.outstanding_jobs
            try:
                fn(*args)
            except DMError as e:
                assert kc.outstanding_jobs == before, "a refused job is outstanding"
                return e
            return None
        return self.loop.run(call)

    def submit(self, job: Job) -> None:
        kc = self.kc
        assert kc is not None and self.loop is not None
        src = Region(self.devs[job.src[0]], job.src[1], job.count) if job.src is not None else None
        dests = [Region(self.devs[d], s, job.count) for d, s in job.dests]
        unsplit_pages = pages_for(job.count) if job.chunk == job.count else 0
        too_big = src is not None and unsplit_pages > self.capacity

        def notify(read_err, write_err, context):
            assert context == job.id
            job.calls.append((read_err, write_err))
            job.tasks.append(trio.lowlevel.current_task())

        if job.api == "copy":
            error = self.attempt(kc.copy, src, dests, job.flags, notify, job.id)
        elif job.api == "zero":
            error = self.attempt(kc.zero, dests, job.flags, notify, job.id)
        else:
            started: list = []

            async def submit_async():
                before = kc.outstanding_jobs
                started.append(True)            # the dispatch follows without a checkpoint
                try:
                    if job.api == "copy_async":
                        return await kc.copy_async(src, dests, job.flags)
                    return await kc.zero_async(dests, job.flags)
                except DMError:
                    assert kc.outstanding_jobs == before, "a refused job is outstanding"
                    raise

            job.box = self.loop.spawn(submit_async)
            self.loop.run_until(lambda: started)
            error = None
            if job.box and isinstance(job.box[0], outcome.Error):
                error = job.box[0].error
        if error is not None:
            assert isinstance(error, DMError) and error.errno == errno.EINVAL and too_big, error
            assert not job.calls
            OPS["einval"] += 1
            return
        assert not too_big, "a job needing %d pages of %d was accepted" % (unsplit_pages, self.capacity)
        self.jobs[job.id] = job
        self.submitted += 1
        OPS[job.api] += 1

    # ---------------------------------------------------------------- checking a completed job
    def harvest(self) -> None:
        for job in list(self.jobs.values()):
            result = job.result
            if result is None:
                continue
            del self.jobs[job.id]
            if job.box is None:
                assert len(job.calls) == 1, job.calls
                assert job.tasks[0] is self.kc._worker_task, "callback outside the worker"
            actual = [self.read_dev(d, s, job.count) for d, s in job.dests]
            self.check_job(job, result, actual)
            for (d, s), data in zip(job.dests, actual, strict=True):
                self.ref[d][to_bytes(s):to_bytes(s + job.count)] = data
            OPS["errors" if result != (0, 0) else "clean"] += 1

    def chunk_obs(self, job: Job, actual: list[bytes]):
        """Per sub-job c and destination i: whether the destination holds its old data,
        what the sub-job writes, or (only where a read failed without IGNORE_ERROR: no
        write, but an in-kernel copy may have begun) old and source sectors mixed."""
        obs = []
        ignore = job.flags & FLAG_IGNORE_ERROR
        for c, off in enumerate(range(0, job.count, job.chunk) if job.count else []):
            lo, hi = to_bytes(off), to_bytes(min(off + job.chunk, job.count))
            row = []
            for i in range(len(job.dests)):
                got, old, src = actual[i][lo:hi], job.old[i][lo:hi], job.src_data[lo:hi]
                new = bytes(hi - lo) if job.src is None or (job.rf[c] and ignore) else src
                mix = job.rf[c] and not ignore and all(
                    got[k:k + 512] in (old[k:k + 512], src[k:k + 512]) for k in range(0, hi - lo, 512))
                row.append({"old": got == old, "new": got == new, "mix": mix})
            obs.append(row)
        return obs

    def fits(self, job: Job, obs, c: int, ran: bool) -> bool:
        """Whether sub-job c's destinations hold what running it (or not) leaves."""
        for i, o in enumerate(obs[c]):
            if not ran:
                ok = o["old"]
            elif job.rf[c] and not job.flags & FLAG_IGNORE_ERROR:
                ok = o["mix"]
            else:
                ok = bool(job.wf[c] >> i & 1) or o["new"]
            if not ok:
                return False
        return True

    def check_job(self, job: Job, result: tuple[int, int], actual: list[bytes]) -> None:
        r, w = result
        n = len(job.rf)
        obs = self.chunk_obs(job, actual)
        errs = [c for c in range(n) if job.rf[c] or job.wf[c]]
        first = errs[0] if errs else n - 1
        def what() -> str:             # (only formatted when an assertion fails)
            return "job %r: got %r" % (job, result)

        if n == 0:
            assert result == (0, 0), what()
            return
        if job.flags & FLAG_WRITE_SEQ:
            if not errs:
                assert result == (0, 0), what()
                assert all(self.fits(job, obs, c, True) for c in range(n)), what()
                return
            assert result != (0, 0), what()
            assert all(self.fits(job, obs, c, True) for c in range(first + 1)), what()
            for c in range(first + 1, n):
                # after a read hole nothing is written; after a write error a sub-job
                # may have been issued before it was seen, or cancelled
                assert self.fits(job, obs, c, False) or (not job.rf[first] and self.fits(job, obs, c, True)), what()
            if job.rf[first]:
                assert r == 1, what()
            elif w != WRITE_ERR_ALL:
                assert w & job.wf[first] == job.wf[first], what()
                any_wf = 0
                for m in job.wf:
                    any_wf |= m
                assert w & ~any_wf == 0, what()
            return
        ignore = bool(job.flags & FLAG_IGNORE_ERROR)
        candidates = [n - 1] if ignore or not errs else range(first, n)
        for k in candidates:
            exp_r = int(any(job.rf[:k + 1]))
            exp_w = 0
            for c in range(k + 1):
                if ignore or not job.rf[c]:
                    exp_w |= job.wf[c]
            if (r, w) != (exp_r, exp_w):
                continue
            if all(self.fits(job, obs, c, c <= k) for c in range(n)):
                return
        raise AssertionError("no prefix of sub-jobs explains " + what())

    # ---------------------------------------------------------------- rules
    @precondition(lambda self: self.kc is not None)
    @rule(data=st.data(), api=st.sampled_from(["copy", "copy", "copy_async"]),
          count=st.sampled_from(COUNTS), flags=st.sampled_from(FLAGS),
          n_dests=st.sampled_from([1, 1, 1, 2, 3, 8, 9]),
          files_only=st.booleans())
    def copy(self, data, api, count, flags, n_dests, files_only):
        self.harvest()
        devices = FILES if files_only else DEVICES
        name = data.draw(st.sampled_from(devices))
        sector = data.draw(st.integers(0, SIZE - count))
        if count and self.busy(name, sector, sector + count, False):
            return
        src = (name, sector)
        dests = self.pick_dests(data, count, src, n_dests, devices)
        if not dests:
            return
        if len(dests) > MAX_REGIONS:
            self.touched.update(d for d, _ in dests)
            self.touched.add(name)
            self.expect_einval(self.kc.copy, Region(self.devs[name], sector, count),
                               [Region(self.devs[d], s, count) for d, s in dests], flags, None, None)
            return
        self.submit(self.plan(src, dests, count, flags, api))
        self.harvest()

    @precondition(lambda self: self.kc is not None)
    @rule(data=st.data(), api=st.sampled_from(["zero", "zero_async"]),
          count=st.sampled_from(COUNTS), flags=st.sampled_from([0, FLAG_IGNORE_ERROR]),
          n_dests=st.integers(1, 3))
    def zero(self, data, api, count, flags, n_dests):
        self.harvest()
        dests = self.pick_dests(data, count, None, n_dests, DEVICES)
        if not dests:
            return
        self.submit(self.plan(None, dests, count, flags, api))
        self.harvest()

    def expect_einval(self, fn, *args) -> None:
        error = self.attempt(fn, *args)
        assert error is not None and error.errno == errno.EINVAL, error
        OPS["einval"] += 1

    @precondition(lambda self: self.kc is not None)
    @rule(data=st.data(), count=st.sampled_from(COUNTS), to_memory=st.booleans())
    def copy_now(self, data, count, to_memory):
        """The snapshot's first-write copy-out: done here and now or refused, having done
        nothing; the caller then submits the copy as a job (copy_async here)."""
        self.harvest()
        kc = self.kc
        name = data.draw(st.sampled_from(FILES))
        sector = data.draw(st.integers(0, SIZE - count))
        if count and self.busy(name, sector, sector + count, False):
            return
        dests = self.pick_dests(data, count, (name, sector), 1, MEMORY if to_memory else FILES)
        if not dests:
            return
        (dname, dsector), = dests
        job = self.plan((name, sector), dests, count, 0, "copy_async")
        chunk = job.chunk

        def now():
            """copy_now and what it may do, judged in the same step."""
            pool = kc.pages
            may = count == 0 or (not to_memory and count <= 8 * chunk and not pool._waiters
                                 and pages_for(chunk) <= pool.capacity - pool.in_use)
            before = kc.outstanding_jobs
            done = kc.copy_now(self.devs[name], sector, self.devs[dname], dsector, count)
            assert kc.outstanding_jobs == before, "copy_now left a job outstanding"
            return may, done

        clean = not any(job.rf) and not any(job.wf)
        may, done = self.loop.run(now)
        if done:
            assert may, "copy_now ran a job that can't run inline"
            assert clean, "copy_now succeeded over a bad sector"
            self.ref[dname][to_bytes(dsector):to_bytes(dsector + count)] = job.src_data
            OPS["copy_now"] += 1
            return
        assert not (may and clean), "copy_now refused a job it can run inline"
        OPS["copy_now refused"] += 1
        if may:
            # a copy failed midway: the destination range is undefined, the caller redoes it
            job.old = [self.read_dev(dname, dsector, count)]
        else:
            assert self.read_dev(dname, dsector, count) == job.old[0], "copy_now refused, but wrote"
        self.submit(job)
        self.harvest()

    @precondition(lambda self: self.kc is not None)
    @rule(seconds=st.sampled_from([0.0, 0.5, 1.0, 2.0, 5.0]))
    def advance(self, seconds):
        self.loop.call(trio.sleep, seconds)
        self.harvest()
        OPS["advance"] += 1

    @precondition(lambda self: self.kc is not None and (self.jobs or self.submitted % 3 == 0))
    @rule()
    def settle(self):
        self.loop.wait_for(lambda: all(job.result is not None for job in self.jobs.values()))
        self.harvest()
        assert not self.jobs
        kc = self.kc
        self.loop.wait_for(lambda: kc.outstanding_jobs == len(self.prepared))
        assert kc.pages.in_use == 0, kc.pages.in_use
        OPS["settle"] += 1

    @precondition(lambda self: self.kc is not None and not self.jobs)
    @rule(dev=st.sampled_from(MEMORY + FAULTY_FILES), kind=st.sampled_from(["read", "write"]),
          sector=st.integers(0, SIZE - 1), length=st.sampled_from([1, 1, 8, 64, 300]),
          clear=st.sampled_from([False, False, False, True]))
    def fault(self, dev, kind, sector, length, clear):
        """Bad sectors change only while no job is in flight (so each job's are fixed)."""
        faults = self.devs[dev].faults
        bad = faults.read if kind == "read" else faults.write
        if clear:
            bad.clear()
        else:
            bad.update(range(sector, min(sector + length, SIZE)))
        OPS["fault"] += 1

    @precondition(lambda self: self.kc is not None and len(self.prepared) < 3)
    @rule()
    def prepare_callback(self):
        calls: list = []
        job = self.loop.run(self.kc.prepare_callback, lambda r, w, ctx: calls.append((r, w, ctx)), "p")
        self.prepared.append((job, calls))
        OPS["prepare_callback"] += 1

    @precondition(lambda self: self.kc is not None and self.prepared)
    @rule(write_err=st.integers(0, 255))
    def do_callback(self, write_err):
        job, calls = self.prepared.pop(0)
        self.loop.run(self.kc.do_callback, job, 0, write_err)
        self.loop.call(self.kc.flush)
        assert calls == [(0, write_err, "p")]
        OPS["do_callback"] += 1

    @precondition(lambda self: self.kc is not None and not self.prepared and self.submitted >= 4)
    @rule()
    def destroy(self):
        """destroy waits for every job in flight; then a new client takes over."""
        kc = self.kc
        self.loop.call(kc.destroy)
        assert all(job.calls or job.box is not None for job in self.jobs.values())
        for job in self.jobs.values():
            if job.box is None:
                assert len(job.calls) == 1, "destroy returned before a callback"
        self.loop.wait_for(lambda: all(job.result is not None for job in self.jobs.values()))
        self.harvest()
        assert not self.jobs
        assert kc.outstanding_jobs == 0 and kc.pages.in_use == 0
        self.loop.wait_for(lambda: bool(self.worker))
        self.worker[0].unwrap()
        self.kc = None
        self._start_client()
        OPS["destroy"] += 1

    # ---------------------------------------------------------------- invariants
    @invariant()
    def untouched_outside_jobs(self):
        """Nothing outside the destinations in flight differs from the reference (on the
        devices kcopyd was given since the last check, or is still working on)."""
        if self.loop is None:
            return
        names = self.touched | {d for job in self.jobs.values() for d, _, _, _ in job.ranges()}
        self.touched = set()
        for name in sorted(names):
            cuts = sorted((s, e) for job in self.jobs.values() for d, s, e, w in job.ranges() if w and d == name)
            if not cuts:                    # (the whole device at once: one compare)
                dev = self.devs[name]
                whole = dev.buf if isinstance(dev, MemoryDevice) else self.read_dev(name, 0, SIZE)
                assert whole == self.ref[name], "%s changed outside any job" % name
                continue
            pos = 0
            for s, e in [*cuts, (SIZE, SIZE)]:
                if pos < s:
                    assert self.read_dev(name, pos, s - pos) == self.ref[name][to_bytes(pos):to_bytes(s)], \
                        "%s changed in [%d, %d) outside any job" % (name, pos, s)
                pos = max(pos, e)

    @invariant()
    def pages_accounted(self):
        kc = self.kc
        if kc is None:
            return
        assert 0 <= kc.pages.in_use <= kc.pages.capacity
        if not self.jobs:
            assert kc.pages.in_use == 0
        for job in self.jobs.values():
            assert len(job.calls) <= 1, "a callback ran twice"


KcopydMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


@pytest.mark.timeout(600 * SOAK)
def test_kcopyd_model():
    start = time.monotonic()
    OPS.clear()
    KcopydMachine.TestCase("runTest").runTest()
    ops = sum(v for k, v in OPS.items() if k not in MODES)
    if os.environ.get("DMSIM_MODEL_EXAMPLES"):
        print("kcopyd model: %d operations in %.1f s: %s" % (ops, time.monotonic() - start, dict(OPS)))
    assert OPS["inline"] and OPS["queued"] and OPS["errors"], "both modes, and errors: %s" % dict(OPS)
