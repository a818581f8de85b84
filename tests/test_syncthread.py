"""The sync hand-off: results, exceptions, parallel calls and cancellation semantics."""
import errno
import os
import threading
import time

import pytest
import trio

from dmsim import syncthread


async def test_returns_the_result_from_another_thread():
    here = threading.get_ident()
    assert await syncthread.run_sync(lambda a, b: (a + b, threading.get_ident() != here), 2, 3) == (5, True)


async def test_raises_the_calls_exception(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    os.close(fd)
    with pytest.raises(OSError) as ei:
        await syncthread.run_sync(os.fdatasync, fd)       # a closed descriptor
    assert ei.value.errno == errno.EBADF


async def test_calls_run_in_parallel():
    """Four calls that only finish together: each needs its own worker."""
    barrier = threading.Barrier(4, timeout=10)
    async with trio.open_nursery() as n:
        for _ in range(4):
            n.start_soon(syncthread.run_sync, barrier.wait)
    assert barrier.n_waiting == 0 and not barrier.broken


async def test_a_started_call_runs_to_its_end_when_cancelled():
    """Like trio.to_thread without abandon_on_cancel: the call completes, then the
    cancellation takes effect."""
    done = []

    def slow():
        time.sleep(0.2)
        done.append(True)

    t0 = time.monotonic()
    with trio.move_on_after(0.01) as scope:
        await syncthread.run_sync(slow)
        await trio.lowlevel.checkpoint()
    assert scope.cancelled_caught and done == [True]
    assert time.monotonic() - t0 >= 0.2


async def test_an_already_cancelled_caller_does_not_start_the_call():
    ran = []
    with trio.CancelScope() as scope:
        scope.cancel()
        await syncthread.run_sync(ran.append, 1)
    assert ran == [] and scope.cancelled_caught
