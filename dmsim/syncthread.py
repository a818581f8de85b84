"""Blocking calls (``fdatasync``) off the Trio thread, with a cheaper hand-off.

Why: a sync can take milliseconds to seconds, so it must not run on the Trio thread,
but ``trio.to_thread.run_sync`` costs 150-200 us per call on the 2-core VM even for a
no-op (capacity limiter, context copy, its general thread cache), and 640-720 us for a
4 KiB write plus ``fdatasync`` against 460-620 us with this module (one run of 300
each, same file; inline ``fdatasync`` alone: 250-370 us).  Every FLUSH, FUA write and
snapshot commit of an image file with ``durability="fsync"`` pays one hand-off.

How: persistent daemon worker threads take ``(fn, args, token, task)`` from a queue,
run ``fn`` and hand the outcome back with ``token.run_sync_soon(reschedule, ...)``.
The caller waits with ``wait_task_rescheduled`` and an abort function that refuses:
like ``to_thread`` (without ``abandon_on_cancel``), a call once started runs to its end
and a cancellation takes effect at the caller's next checkpoint.  A worker is started
whenever none is idle, up to :data:`MAX_WORKERS` (more calls queue); workers never
exit, and a forked child starts with none.
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading

import outcome
import trio

__all__ = ["run_sync", "MAX_WORKERS"]

#: at most this many worker threads (concurrent syncs beyond it wait in the queue)
MAX_WORKERS = 8


class _Pool:
    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.workers = 0
        self.idle = 0

    def submit(self, job) -> None:
        with self.lock:
            if not self.idle and self.workers < MAX_WORKERS:
                self.workers += 1
                self.idle += 1
                threading.Thread(target=self._work, name="dmsim-sync", daemon=True).start()
            self.idle -= 1                     # this job takes an idle worker (or queues)
        self.jobs.put(job)

    def _work(self) -> None:
        while True:
            fn, args, token, task = self.jobs.get()
            result = outcome.capture(fn, *args)
            with self.lock:
                self.idle += 1
            with contextlib.suppress(trio.RunFinishedError):   # not while the caller waits
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    def after_fork(self) -> None:
        _Pool.__init__(self)       # a forked child has none of the parent's threads


_pool = _Pool()
os.register_at_fork(after_in_child=_pool.after_fork)


async def run_sync(fn, *args):
    """Run ``fn(*args)`` in a worker thread; return its result or raise its exception."""
    await trio.lowlevel.checkpoint_if_cancelled()
    _pool.submit((fn, args, trio.lowlevel.current_trio_token(), trio.lowlevel.current_task()))
    return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
