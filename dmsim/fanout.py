"""Fan-out writes: the same data to several devices at once (mirror legs, kcopyd dests).

Why: with inline file I/O (see :mod:`dmsim.blockdev`) the Trio thread copies the data
into each image file in turn, so two mirror legs take twice as long as one.  Measured
on the 2-core development VM (1 GiB of 1 MiB ``pwrite``s into page-cache files,
medians): one file 0.18-0.19 s, two files one after the other 0.36-0.38 s (serial legs
cap a 2-leg mirror at 0.5x of linear), two files from two threads at once 0.20-0.24 s
on a quiet machine, 0.27-0.34 s on 1 GiB files whose pages are cold in the CPU caches
(memory bandwidth then limits two copies at once to ~1.3x of one).
``trio.to_thread.run_sync`` costs ~200 us per call even for a no-op, so it is no use
per request; a persistent worker fed by a ``queue.SimpleQueue`` wakes in 12-30 us.

So: the calling (Trio) thread writes the first file itself while persistent worker
threads write the others, then waits for them.  The Trio thread is blocked for as long
as the slowest copy takes -- exactly what inline I/O already does -- but the legs
proceed in parallel.  Writes below :data:`PARALLEL_MIN_BYTES` stay serial inline: the
hand-off costs more than the copy it saves (measured, 2 files, per write: 16 KiB
14 us serial vs 39 us parallel, 64 KiB 36 vs 47, 128 KiB 63 vs 67-73, 256 KiB 110-124
vs 95-108, 512 KiB 222-237 vs 160-169).

What fans out: plain :class:`~dmsim.blockdev.FileDevice` s (not a subclass that changes
how they do I/O), open.  With ``io_mode="thread"`` the whole fan-out (and any FUA
``fdatasync``) runs in one :mod:`dmsim.syncthread` call, so the loop never blocks and pays one
hand-off for all legs instead of one per leg.  Every other device (a dm device stacked
under a leg, memory, a closed file) gets its own ``submit`` as before, concurrently, so
its failures and delays still happen.  FUA on a file with ``durability="fsync"`` is a
``fdatasync`` after the write, always in a thread (milliseconds to seconds), the legs'
in parallel.

Errors are per destination: ``write`` returns one entry per destination, ``None`` or the
:class:`~dmsim.errors.DMError` that destination's write raised (OSError converted here,
once), so one failed leg never hides another's success.
"""
from __future__ import annotations

import atexit
import errno
import os
import queue
import threading
from typing import Sequence

import trio

from . import syncthread
from .bio import Bio, Op, to_bytes
from .blockdev import BlockDevice, FileDevice
from .errors import DMError

__all__ = ["write", "PARALLEL_MIN_BYTES", "MAX_WORKERS", "fans_out"]

#: writes at least this long go to several files in parallel; shorter ones serially
PARALLEL_MIN_BYTES = 256 << 10
#: at most this many worker threads (kcopyd's 8 destinations, a mirror's 9 legs)
MAX_WORKERS = 8
#: a worker idle this long exits (a new one starts on demand)
IDLE_SECONDS = 30.0


class _Job:
    """One file's part of a fan-out, run by a worker; ``done`` is released when over."""

    __slots__ = ("fn", "args", "error", "done")

    def __init__(self, fn, args):
        self.fn = fn
        self.args = args
        self.error: DMError | None = None
        self.done = threading.Lock()
        self.done.acquire()

    def run(self) -> None:
        try:
            self.fn(*self.args)
        except OSError as e:
            self.error = DMError(e.errno or errno.EIO)
        except BaseException as e:     # a bug: report it on the leg, keep the worker
            self.error = DMError(errno.EIO, "fanout: %r" % (e,))
        finally:
            self.done.release()

    def wait(self) -> DMError | None:
        self.done.acquire()
        return self.error


class _Pool:
    """Persistent daemon worker threads, started lazily, exiting when idle or at exit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._workers = 0
        self._idle = 0

    def submit(self, job: _Job, wanted: int) -> None:
        """Queue ``job``; make sure ``min(wanted, MAX_WORKERS)`` workers exist."""
        with self._lock:
            # the put happens under the lock so an idle worker cannot exit between our
            # count and the put (it re-checks the queue under the same lock)
            self._queue.put(job)
            want = min(wanted, MAX_WORKERS)
            while self._workers < want:
                self._workers += 1
                threading.Thread(target=self._work, name="dmsim-fanout", daemon=True).start()

    def _work(self) -> None:
        q = self._queue
        while True:
            try:
                job = q.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if q.empty():
                        self._workers -= 1
                        return
                continue
            if job is None:
                with self._lock:
                    self._workers -= 1
                return
            job.run()

    def shutdown(self) -> None:
        """Ask every worker to exit once the queued jobs are done (at process exit)."""
        with self._lock:
            for _ in range(self._workers):
                self._queue.put(None)

    def _after_fork(self) -> None:
        _Pool.__init__(self)       # a forked child has none of the parent's threads


_pool = _Pool()
atexit.register(_pool.shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_pool._after_fork)


def fans_out(dev: BlockDevice) -> bool:
    """Whether ``dev`` is written by the file fan-out here (else by its own submit)."""
    if not isinstance(dev, FileDevice):
        return False
    cls = type(dev)
    return cls.submit is FileDevice.submit and cls._write is FileDevice._write and not dev.closed


def _pwrite_all(fd: int, data, off: int) -> None:
    mv = memoryview(data)
    while mv:
        done = os.pwrite(fd, mv, off)
        mv = mv[done:]
        off += done


def _run_parallel(calls: list) -> list[DMError | None]:
    """Run ``(fn, args)`` calls, the first one here and the others in workers at once."""
    if len(calls) == 1:
        fn, args = calls[0]
        try:
            fn(*args)
        except OSError as e:
            return [DMError(e.errno or errno.EIO)]
        return [None]
    jobs = [_Job(fn, args) for fn, args in calls[1:]]
    for job in jobs:
        _pool.submit(job, len(jobs))
    first = _Job(*calls[0])
    first.run()
    return [first.wait()] + [job.wait() for job in jobs]


def _run_serial(calls: list) -> list[DMError | None]:
    errors: list[DMError | None] = []
    for fn, args in calls:
        try:
            fn(*args)
            errors.append(None)
        except OSError as e:
            errors.append(DMError(e.errno or errno.EIO))
    return errors


def _write_files(fds: list[int], offs: list[int], data) -> list[DMError | None]:
    """Write ``data`` to every file, in parallel when it is worth a hand-off."""
    calls = [(_pwrite_all, (fd, data, off)) for fd, off in zip(fds, offs, strict=True)]
    return (_run_parallel if len(data) >= PARALLEL_MIN_BYTES else _run_serial)(calls)


def _sync_files(fds: list[int], errors: list[DMError | None], want: list[bool]) -> list[DMError | None]:
    """fdatasync (in parallel) every file that asked for it and whose write succeeded."""
    todo = [k for k, w in enumerate(want) if w and errors[k] is None]
    if todo:
        for k, err in zip(todo, _run_parallel([(os.fdatasync, (fds[k],)) for k in todo]), strict=True):
            errors[k] = err
    return errors


def _write_and_sync(fds, offs, data, want_sync):
    return _sync_files(fds, _write_files(fds, offs, data), want_sync)


async def write(dests: Sequence[tuple[BlockDevice, int]], sectors: int, data, fua: bool = False,
                flags: int = 0) -> list[DMError | None]:
    """Write ``sectors`` sectors of ``data`` at ``(dev, sector)`` of every destination.

    ``fua`` and ``flags`` (``bi_opf`` modifier bits, see :class:`~dmsim.bio.Bio`) go on
    each destination's bio: a mirror's leg writes carry the request's (dm-io is given
    ``bio->bi_opf``), kcopyd's copies none.

    Returns one entry per destination: ``None`` or the DMError its write raised.  Each
    file's own checks come first, in FileDevice's order (bounds and data length, then
    read-only).  Only Trio cancellation and non-I/O bugs propagate.
    """
    results: list[DMError | None] = [None] * len(dests)
    files: list[int] = []        # indexes of the destinations the file fan-out writes
    others: list[int] = []
    bad_length = data is not None and len(data) != to_bytes(sectors)
    for i, (dev, sector) in enumerate(dests):
        if not fans_out(dev):
            others.append(i)
            continue
        # BlockDevice.check_bounds, then the read-only check, without a Bio per leg
        if sectors and (sector < 0 or sector + sectors > dev.size_sectors):
            results[i] = DMError(errno.EIO, "access beyond end of device")
        elif bad_length:
            results[i] = DMError(errno.EINVAL, "bio data length does not match its sector count")
        elif dev.read_only:
            results[i] = DMError(errno.EPERM, "write to read-only device")
        else:
            files.append(i)
    if not others:
        if files:
            await _write_files_of(dests, files, data, fua, results)
        return results
    async with trio.open_nursery() as nursery:
        for i in others:
            nursery.start_soon(_submit_one, dests, i, sectors, data, fua, flags, results)
        if files:
            await _write_files_of(dests, files, data, fua, results)
    return results


async def _write_files_of(dests, files: list[int], data, fua: bool, results: list) -> None:
    devs = [dests[i][0] for i in files]
    fds = [dev.fd for dev in devs]
    offs = [to_bytes(dests[i][1]) for i in files]
    want_sync = [fua and dev.sync for dev in devs]
    if any(dev.io_mode == "thread" for dev in devs):
        errs = await syncthread.run_sync(_write_and_sync, fds, offs, data, want_sync)
    else:
        errs = _write_files(fds, offs, data)            # inline: the copies right here
        if fua and any(want_sync):
            errs = await syncthread.run_sync(_sync_files, fds, errs, want_sync)
    for i, err in zip(files, errs, strict=True):
        results[i] = err


async def _submit_one(dests, i: int, sectors: int, data, fua: bool, flags: int, results: list) -> None:
    """A destination that is not a plain file: its own submit, its own failures."""
    dev, sector = dests[i]
    try:
        await dev.submit(Bio(Op.WRITE, sector, sectors, data, fua, flags))
    except DMError as e:
        results[i] = e
    except OSError as e:
        results[i] = DMError(e.errno or errno.EIO)
