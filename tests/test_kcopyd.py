"""kcopyd engine: conformance section A (items noted as ``A.n``) plus properties.

The fake devices record every request as ``(op, device, start_sector, count)`` in a log
shared by all devices of a test, so request order across devices can be checked.
No sleeps: timing-dependent tests use the autojump clock or explicit gates.
"""
from __future__ import annotations

import errno
import os

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmsim.bio import Op, to_bytes
from dmsim.blockdev import BlockDevice, MemoryDevice
from dmsim.errors import DMError
from dmsim.kcopyd import (
    FLAG_IGNORE_ERROR,
    FLAG_WRITE_SEQ,
    IGNORE_ERROR,
    MAX_REGIONS,
    WRITE_SEQ,
    KcopydClient,
    Region,
    Throttle,
    open_kcopyd_client,
    subjob_sectors_from_kb,
)

pytestmark = pytest.mark.trio

SIZE_SECTORS = 16384
OPS = {Op.READ: "R", Op.WRITE: "W", Op.WRITE_ZEROES: "Z"}


class RecordingDevice(MemoryDevice):
    """A memory device that logs requests, tracks concurrency and injects failures.

    ``fail_read`` / ``fail_write`` are sets of sectors: a request touching one fails
    with EIO (``fail_write="all"`` fails every write).  With ``hold_reads`` each read
    waits until the test calls :meth:`release`.  ``delay_seconds`` makes each request
    take that long (use with the autojump clock).
    """

    def __init__(self, name, log, size_sectors=SIZE_SECTORS, data=None, fail_read=(),
                 fail_write=(), hold_reads=False, delay_seconds=0.0):
        super().__init__(size_sectors, data, name=name)
        self.log = log
        self.fail_read = fail_read if fail_read == "all" else set(fail_read)
        self.fail_write = fail_write if fail_write == "all" else set(fail_write)
        self.hold_reads = hold_reads
        self.held: dict[int, trio.Event] = {}
        self.delay_seconds = delay_seconds
        self.in_flight = 0
        self.max_in_flight = 0

    def _fails(self, failset, bio):
        if failset == "all":
            return True
        return any(bio.sector <= s < bio.end_sector for s in failset)

    def release(self, sector):
        self.held.pop(sector).set()

    async def submit(self, bio):
        self.log.append((OPS[bio.op], self.kname, bio.sector, bio.sectors))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay_seconds:
                await trio.sleep(self.delay_seconds)
            if bio.op is Op.READ:
                if self.hold_reads:
                    ev = self.held[bio.sector] = trio.Event()
                    await ev.wait()
                if self._fails(self.fail_read, bio):
                    await trio.lowlevel.checkpoint()
                    self.log.append(("R-fail", self.kname, bio.sector, bio.sectors))
                    raise DMError(errno.EIO)
            elif self._fails(self.fail_write, bio):
                await trio.lowlevel.checkpoint()
                self.log.append(("W-fail", self.kname, bio.sector, bio.sectors))
                raise DMError(errno.EIO)
            return await super().submit(bio)
        finally:
            self.in_flight -= 1


def pattern(sectors):
    return os.urandom(to_bytes(sectors))


def make(log, n_dests=1, src_kwargs=None, dest_kwargs=None, size_sectors=SIZE_SECTORS):
    src = RecordingDevice("S", log, size_sectors, pattern(size_sectors), **(src_kwargs or {}))
    dests = [RecordingDevice("D%d" % i, log, size_sectors, **((dest_kwargs or {}).get(i, {})))
             for i in range(n_dests)]
    return src, dests


def reads(log, dev="S"):
    return [(s, n) for op, d, s, n in log if op == "R" and d == dev]


def writes(log, dev="D0"):
    return [(s, n) for op, d, s, n in log if op == "W" and d == dev]


def same(a, b, start, count):
    lo, hi = to_bytes(start), to_bytes(start + count)
    return a.buf[lo:hi] == b.buf[lo:hi]


class Recorder:
    """A notify callback that records ``(read_err, write_err)`` and the running task."""

    def __init__(self):
        self.calls = []
        self.tasks = []

    def __call__(self, read_err, write_err, context):
        self.calls.append((read_err, write_err))
        self.tasks.append(trio.lowlevel.current_task())


# --------------------------------------------------------------------------- basics

async def test_constants():
    assert MAX_REGIONS == 8
    assert (IGNORE_ERROR, WRITE_SEQ) == (1, 2)
    assert (FLAG_IGNORE_ERROR, FLAG_WRITE_SEQ) == (2, 4)
    assert subjob_sectors_from_kb(0) == 1024
    assert subjob_sectors_from_kb(512) == 1024
    assert subjob_sectors_from_kb(4096) == 2048


async def test_a1_copy_two_dests():
    log = []
    src, (d0, d1) = make(log, 2)
    cb = Recorder()
    async with open_kcopyd_client() as kc:
        kc.copy(Region(src, 0, 2048), [Region(d0, 0, 2048), Region(d1, 0, 2048)], 0, cb, "ctx")
    assert cb.calls == [(0, 0)]
    assert same(src, d0, 0, 2048) and same(src, d1, 0, 2048)


async def test_a2_split_at_1024():
    log = []
    src, (d0,) = make(log)
    async with open_kcopyd_client() as kc:
        assert await kc.copy_async(Region(src, 0, 2048), [Region(d0, 0, 2048)]) == (0, 0)
    assert reads(log) == [(0, 1024), (1024, 1024)]
    assert sorted(writes(log)) == [(0, 1024), (1024, 1024)]


async def test_a3_no_split_at_1024():
    log = []
    src, (d0,) = make(log)
    async with open_kcopyd_client() as kc:
        await kc.copy_async(Region(src, 0, 1024), [Region(d0, 0, 1024)])
    assert log == [("R", "S", 0, 1024), ("W", "D0", 0, 1024)]


async def test_a4_1025_sectors():
    log = []
    src, (d0,) = make(log)
    async with open_kcopyd_client() as kc:
        assert await kc.copy_async(Region(src, 0, 1025), [Region(d0, 0, 1025)]) == (0, 0)
    assert reads(log) == [(0, 1024), (1024, 1)]
    assert same(src, d0, 0, 1025)


async def test_a5_legacy_split_rule():
    log = []
    src, (d0,) = make(log)
    async with open_kcopyd_client(16) as kc:
        assert kc.legacy
        await kc.copy_async(Region(src, 0, 127), [Region(d0, 0, 127)])
        assert reads(log) == [(0, 127)]
        log.clear()
        await kc.copy_async(Region(src, 0, 128), [Region(d0, 0, 128)])
        assert reads(log) == [(0, 128)]
        log.clear()
        await kc.copy_async(Region(src, 0, 300), [Region(d0, 0, 300)])
        assert reads(log) == [(0, 128), (128, 128), (256, 44)]
    assert same(src, d0, 0, 300)


async def test_a6_ascending_claims_at_most_8_in_flight():
    log = []
    src, (d0,) = make(log)
    async with open_kcopyd_client() as kc:
        assert await kc.copy_async(Region(src, 0, SIZE_SECTORS), [Region(d0, 0, SIZE_SECTORS)]) == (0, 0)
    assert [s for s, _ in reads(log)] == list(range(0, SIZE_SECTORS, 1024))
    assert src.max_in_flight <= 8 and d0.max_in_flight <= 8
    assert same(src, d0, 0, SIZE_SECTORS)


async def test_a6_in_flight_limit_with_slow_devices(autojump_clock):
    """With I/O that takes time, exactly 8 chunks overlap, never more."""
    log = []
    src, (d0,) = make(log, src_kwargs={"delay_seconds": 1}, dest_kwargs={0: {"delay_seconds": 1}})
    async with open_kcopyd_client() as kc:
        await kc.copy_async(Region(src, 0, SIZE_SECTORS), [Region(d0, 0, SIZE_SECTORS)])
    assert src.max_in_flight == 8
    assert src.max_in_flight + d0.max_in_flight <= 16
    assert same(src, d0, 0, SIZE_SECTORS)


# --------------------------------------------------------------------------- errors

async def test_a7_failing_destination_sets_its_bit_only():
    log = []
    src, (d0, d1, d2) = make(log, 3, dest_kwargs={1: {"fail_write": "all"}})
    async with open_kcopyd_client() as kc:
        assert await kc.copy_async(Region(src, 0, 64), [Region(d, 0, 64) for d in (d0, d1, d2)]) == (0, 2)
    assert same(src, d0, 0, 64) and same(src, d2, 0, 64)
    assert not any(d1.buf)


async def test_a8_two_failing_destinations():
    log = []
    src, ds = make(log, 3, dest_kwargs={0: {"fail_write": "all"}, 2: {"fail_write": "all"}})
    async with open_kcopyd_client() as kc:
        assert await kc.copy_async(Region(src, 0, 64), [Region(d, 0, 64) for d in ds]) == (0, 5)
    assert same(src, ds[1], 0, 64)


async def test_write_err_accumulates_across_chunks():
    """A failure in an early chunk is still reported (2.6 reported the last chunk)."""
    log = []
    src, ds = make(log, 2, dest_kwargs={0: {"fail_write": {0}}, 1: {"fail_write": {5000}}})
    async with open_kcopyd_client() as kc:
        r = await kc.copy_async(Region(src, 0, 8192), [Region(d, 0, 8192) for d in ds],
                                FLAG_IGNORE_ERROR)
    assert r == (0, 3)


async def test_a9_read_error_skips_write():
    log = []
    src, (d0,) = make(log, src_kwargs={"fail_read": {0}})
    async with open_kcopyd_client() as kc:
        assert await kc.copy_async(Region(src, 0, 512), [Region(d0, 0, 512)]) == (1, 0)
    assert writes(log) == []


async def test_a10_read_error_ignored_writes_zeros():
    log = []
    src, (d0,) = make(log, src_kwargs={"fail_read": {0}})
    d0.buf[:] = b"\xff" * len(d0.buf)
    async with open_kcopyd_client() as kc:
        r = await kc.copy_async(Region(src, 0, 512), [Region(d0, 0, 512)], 1 << IGNORE_ERROR)
    assert r == (1, 0)
    assert writes(log) == [(0, 512)]
    assert d0.buf[:to_bytes(512)] == bytes(to_bytes(512))


async def test_a11_raw_constant_1_does_not_ignore():
    log = []
    src, (d0,) = make(log, src_kwargs={"fail_read": {0}})
    async with open_kcopyd_client() as kc:
        assert await kc.copy_async(Region(src, 0, 512), [Region(d0, 0, 512)], 1) == (1, 0)
    assert writes(log) == []


async def test_a12_error_stops_claiming():
    log = []
    src, (d0,) = make(log, src_kwargs={"fail_read": {0}})
    async with open_kcopyd_client() as kc:
        r = await kc.copy_async(Region(src, 0, SIZE_SECTORS), [Region(d0, 0, SIZE_SECTORS)])
    assert r == (1, 0)
    assert sorted(s for s, _ in reads(log)) == [i * 1024 for i in range(8)]
    assert sorted(s for s, _ in writes(log)) == [i * 1024 for i in range(1, 8)]


async def test_a13_error_ignored_copies_everything_else():
    log = []
    src, (d0,) = make(log, src_kwargs={"fail_read": {0}})
    async with open_kcopyd_client() as kc:
        r = await kc.copy_async(Region(src, 0, SIZE_SECTORS), [Region(d0, 0, SIZE_SECTORS)],
                                FLAG_IGNORE_ERROR)
    assert r == (1, 0)
    assert sorted(s for s, _ in reads(log)) == list(range(0, SIZE_SECTORS, 1024))
    assert sorted(s for s, _ in writes(log)) == list(range(0, SIZE_SECTORS, 1024))
    assert same(src, d0, 1024, SIZE_SECTORS - 1024)
    assert not any(d0.buf[:to_bytes(1024)])


async def test_a14_zero_length():
    log = []
    src, (d0,) = make(log)
    async with open_kcopyd_client() as kc:
        assert await kc.copy_async(Region(src, 5, 0), [Region(d0, 7, 0)]) == (0, 0)
        assert await kc.zero_async([Region(d0, 7, 0)]) == (0, 0)
    assert log == []


# --------------------------------------------------------------------------- zeroing

async def test_a15_zero_two_dests():
    log = []
    _, (d0, d1) = make(log, 2)
    for d in (d0, d1):
        d.buf[:] = b"\xaa" * len(d.buf)
    async with open_kcopyd_client() as kc:
        assert await kc.zero_async([Region(d0, 0, 16), Region(d1, 0, 16)]) == (0, 0)
    assert not [e for e in log if e[0] == "R"]
    for d in (d0, d1):
        assert not any(d.buf[:to_bytes(16)])
        assert d.buf[to_bytes(16)] == 0xaa


async def test_a16_zero_split():
    log = []
    _, (d0,) = make(log)
    async with open_kcopyd_client() as kc:
        assert await kc.zero_async([Region(d0, 0, 4096)]) == (0, 0)
    assert sorted((s, n) for op, _, s, n in log) == [(0, 1024), (1024, 1024), (2048, 1024), (3072, 1024)]
    assert {op for op, *_ in log} == {"Z"}


class NoWriteZeroes(RecordingDevice):
    async def submit(self, bio):
        if bio.op is Op.WRITE_ZEROES:
            raise DMError(errno.EOPNOTSUPP)
        return await super().submit(bio)


async def test_zero_falls_back_to_writes_of_zeros():
    log = []
    d0 = NoWriteZeroes("D0", log, 64, b"\x55" * to_bytes(64))
    d1 = RecordingDevice("D1", log, 64, b"\x55" * to_bytes(64))
    d1.supports_write_zeroes = False
    async with open_kcopyd_client() as kc:
        assert await kc.zero_async([Region(d0, 8, 16), Region(d1, 8, 16)]) == (0, 0)
    assert sorted(log) == [("W", "D0", 8, 16), ("W", "D1", 8, 16)]
    for d in (d0, d1):
        assert d.buf == b"\x55" * to_bytes(8) + bytes(to_bytes(16)) + b"\x55" * to_bytes(40)


# --------------------------------------------------------------------------- pages

async def test_a17_legacy_one_page_serialises_jobs():
    log = []
    src, (d0,) = make(log)
    cb_a, cb_b = Recorder(), Recorder()
    async with open_kcopyd_client(1) as kc:
        kc.copy(Region(src, 0, 8), [Region(d0, 0, 8)], 0, cb_a, None)
        kc.copy(Region(src, 8, 8), [Region(d0, 8, 8)], 0, cb_b, None)
    assert log == [("R", "S", 0, 8), ("W", "D0", 0, 8), ("R", "S", 8, 8), ("W", "D0", 8, 8)]
    assert cb_a.calls == [(0, 0)] and cb_b.calls == [(0, 0)]
    assert kc.pages.peak_in_use == 1


async def test_a18_job_needing_more_pages_than_owned_is_rejected():
    log = []
    src, (d0,) = make(log)
    cb = Recorder()
    async with open_kcopyd_client(1) as kc:
        with pytest.raises(DMError) as e:
            kc.copy(Region(src, 0, 16), [Region(d0, 0, 16)], 0, cb, None)
        assert e.value.errno == errno.EINVAL
        assert kc.outstanding_jobs == 0
    assert cb.calls == [] and log == []


async def test_jobs_wait_for_pages_fifo():
    """Many jobs larger than half the pool: they run one at a time, in submission order."""
    log = []
    src, (d0,) = make(log)
    cbs = [Recorder() for _ in range(20)]
    async with open_kcopyd_client(16) as kc:
        for i, cb in enumerate(cbs):
            kc.copy(Region(src, i * 100, 100), [Region(d0, i * 100, 100)], 0, cb, None)
    assert reads(log) == [(i * 100, 100) for i in range(20)]
    assert all(cb.calls == [(0, 0)] for cb in cbs)
    assert kc.pages.peak_in_use <= 16 and kc.pages.in_use == 0
    assert same(src, d0, 0, 2000)


async def test_modern_pages_bounded(autojump_clock):
    log = []
    src, (d0, d1) = make(log, 2, src_kwargs={"delay_seconds": 1})
    async with open_kcopyd_client(max_system_pages=128) as kc:
        assert kc.pages.capacity == 256
        kc.copy(Region(src, 0, 8192), [Region(d0, 0, 8192)], 0, None, None)
        kc.copy(Region(src, 8192, 8192), [Region(d1, 0, 8192)], 0, None, None)
    assert kc.pages.peak_in_use == 256 and kc.pages.in_use == 0
    assert src.max_in_flight == 2
    assert same(src, d0, 0, 8192)


async def test_fixed_pool_with_modern_splitting():
    """``legacy=False`` with ``num_pages``: modern split rule, chunks clamped to the pool."""
    log = []
    src, (d0,) = make(log)
    async with open_kcopyd_client(4, legacy=False) as kc:
        assert not kc.legacy and kc.copy_chunk_sectors == 32
        with pytest.raises(DMError):     # unsplit (<= 1024 sectors) needs 128 pages
            kc.copy(Region(src, 0, 1024), [Region(d0, 0, 1024)], 0, None, None)
        assert await kc.copy_async(Region(src, 0, 2048), [Region(d0, 0, 2048)]) == (0, 0)
    assert reads(log) == [(s, 32) for s in range(0, 2048, 32)]
    assert kc.pages.peak_in_use == 4
    assert same(src, d0, 0, 2048)


class GeneratedDevice(BlockDevice):
    """A 1 GiB device that holds nothing: reads return a sector-numbered pattern, writes
    check that pattern (after ``shift_sectors``) and count coverage per 8-sector page."""

    PERIOD = 1021   # sectors, prime: a wrong offset almost never matches

    def __init__(self, size_sectors, shift_sectors=0):
        self.size_sectors = size_sectors
        self.kname = "gen"
        self.shift_sectors = shift_sectors
        self.table = memoryview(b"".join(
            (s % self.PERIOD).to_bytes(4, "little") * 128 for s in range(self.PERIOD + 64)))
        self.written_pages = bytearray(size_sectors // 8)
        self.bad_writes = 0

    def _data(self, sector, sectors):
        off = to_bytes(sector % self.PERIOD)
        return self.table[off:off + to_bytes(sectors)]

    async def submit(self, bio):
        self.check_bounds(bio)
        if bio.op is Op.READ:
            return self._data(bio.sector, bio.sectors)
        if bio.data != self._data(bio.sector - self.shift_sectors, bio.sectors):
            self.bad_writes += 1
        for p in range(bio.sector // 8, bio.end_sector // 8):
            self.written_pages[p] += 1


async def test_legacy_one_page_completes_1gib_copy():
    size = 2 * 1024 * 1024                      # 1 GiB in sectors
    src = GeneratedDevice(size + 8)
    dst = GeneratedDevice(size + 8, shift_sectors=8)
    async with open_kcopyd_client(1) as kc:
        r = await kc.copy_async(Region(src, 0, size), [Region(dst, 8, size)])
    assert r == (0, 0)
    assert dst.bad_writes == 0
    assert dst.written_pages[0] == 0 and set(dst.written_pages[1:]) == {1}
    assert kc.pages.peak_in_use == 1


# --------------------------------------------------------------------------- API edges

async def test_a19_destination_count_checked():
    log = []
    src, ds = make(log, 9, size_sectors=64)
    async with open_kcopyd_client() as kc:
        for dests in (ds, []):
            with pytest.raises(DMError) as e:
                kc.copy(Region(src, 0, 8), [Region(d, 0, 8) for d in dests], 0, None, None)
            assert e.value.errno == errno.EINVAL
        with pytest.raises(DMError):
            kc.zero([Region(d, 0, 8) for d in ds], 0, None, None)
        with pytest.raises(DMError):   # unequal counts
            kc.copy(Region(src, 0, 8), [Region(ds[0], 0, 8), Region(ds[1], 0, 16)], 0, None, None)
        with pytest.raises(DMError):
            kc.copy(Region(src, -1, 8), [Region(ds[0], 0, 8)], 0, None, None)
        assert kc.outstanding_jobs == 0
        # exactly 8 is fine
        assert await kc.copy_async(Region(src, 0, 8), [Region(d, 0, 8) for d in ds[:8]]) == (0, 0)
    assert log.count(("R", "S", 0, 8)) == 1


async def test_client_must_be_running():
    kc = KcopydClient()
    dev = MemoryDevice(64)
    with pytest.raises(DMError):
        kc.copy(Region(dev, 0, 8), [Region(dev, 8, 8)], 0, None, None)
    async with trio.open_nursery() as nursery:
        await nursery.start(kc.run)
        assert await kc.copy_async(Region(dev, 0, 8), [Region(dev, 8, 8)]) == (0, 0)
        await kc.destroy()
    with pytest.raises(DMError):
        kc.copy(Region(dev, 0, 8), [Region(dev, 8, 8)], 0, None, None)


async def test_bad_client_arguments():
    for kwargs in ({"num_pages": 0}, {"legacy": True}, {"sub_job_sectors": 0}):
        with pytest.raises(DMError):
            KcopydClient(**kwargs)


async def test_a20_destroy_waits_for_callbacks(autojump_clock):
    log = []
    src, (d0,) = make(log, src_kwargs={"delay_seconds": 1}, dest_kwargs={0: {"delay_seconds": 1}})
    events = []
    kc = KcopydClient()
    async with trio.open_nursery() as nursery:
        await nursery.start(kc.run)
        kc.copy(Region(src, 0, SIZE_SECTORS), [Region(d0, 0, SIZE_SECTORS)], 0,
                lambda r, w, ctx: events.append(("cb", r, w)), None)
        await kc.destroy()
        events.append("destroyed")
    assert events == [("cb", 0, 0), "destroyed"]
    assert trio.current_time() >= 4      # 16 chunks, 8 at a time, read+write 1 s each
    assert same(src, d0, 0, SIZE_SECTORS)


async def test_a21_callback_submits_job():
    log = []
    src, (d0,) = make(log)
    running = []
    tasks = set()
    order = []

    async with open_kcopyd_client() as kc:
        def cb_b(r, w, ctx):
            assert not running
            tasks.add(trio.lowlevel.current_task())
            order.append(("B", r, w))

        def cb_a(r, w, ctx):
            assert not running
            running.append(1)
            tasks.add(trio.lowlevel.current_task())
            order.append(("A", r, w))
            kc.copy(Region(src, 4096, 4096), [Region(d0, 4096, 4096)], 0, cb_b, None)
            running.pop()

        kc.copy(Region(src, 0, 4096), [Region(d0, 0, 4096)], 0, cb_a, None)
        me = trio.lowlevel.current_task()
    assert order == [("A", 0, 0), ("B", 0, 0)]
    assert len(tasks) == 1 and me not in tasks
    assert same(src, d0, 0, 8192)


async def test_callbacks_never_concurrent_many_jobs():
    log = []
    src, ds = make(log, 4)
    cb = Recorder()
    async with open_kcopyd_client(sub_job_sectors=64) as kc:
        for i in range(40):
            kc.copy(Region(src, i * 300, 300), [Region(d, i * 300, 300) for d in ds], 0, cb, i)
    assert len(cb.calls) == 40 and set(cb.calls) == {(0, 0)}
    assert len(set(cb.tasks)) == 1
    for d in ds:
        assert same(src, d, 0, 12000)


async def test_a22_write_seq_orders_writes():
    log = []
    src, (d0,) = make(log, src_kwargs={"hold_reads": True})
    async with open_kcopyd_client() as kc:
        cb = Recorder()
        kc.copy(Region(src, 0, 4096), [Region(d0, 0, 4096)], 1 << WRITE_SEQ, cb, None)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(src.held) == [0, 1024, 2048, 3072]
        for sector in (3072, 2048, 1024, 0):
            src.release(sector)
            await trio.testing.wait_all_tasks_blocked()
    assert cb.calls == [(0, 0)]
    assert writes(log) == [(0, 1024), (1024, 1024), (2048, 1024), (3072, 1024)]
    assert same(src, d0, 0, 4096)


async def test_without_write_seq_writes_follow_reads():
    log = []
    src, (d0,) = make(log, src_kwargs={"hold_reads": True})
    async with open_kcopyd_client() as kc:
        kc.copy(Region(src, 0, 4096), [Region(d0, 0, 4096)], 0, None, None)
        await trio.testing.wait_all_tasks_blocked()
        for sector in (3072, 2048, 1024, 0):
            src.release(sector)
            await trio.testing.wait_all_tasks_blocked()
    assert writes(log) == [(3072, 1024), (2048, 1024), (1024, 1024), (0, 1024)]


async def test_a23_write_seq_clears_ignore_error():
    log = []
    src, (d0,) = make(log, dest_kwargs={0: {"fail_write": {1024}}})
    async with open_kcopyd_client() as kc:
        r, w = await kc.copy_async(Region(src, 0, SIZE_SECTORS), [Region(d0, 0, SIZE_SECTORS)],
                                   (1 << WRITE_SEQ) | (1 << IGNORE_ERROR))
    assert w != 0      # r may be 1 too: chunks cancelled before their read (kernel 9.9)
    fail = log.index(("W-fail", "D0", 1024, 1024))
    assert not [e for e in log[fail:] if e[0] == "W"]
    written = [s for s, _ in writes(log)]
    assert written == sorted(written) and len(written) < SIZE_SECTORS // 1024


async def test_write_seq_read_hole_does_not_hang():
    log = []
    src, (d0,) = make(log, src_kwargs={"fail_read": {2048}})
    async with open_kcopyd_client() as kc:
        r = await kc.copy_async(Region(src, 0, SIZE_SECTORS), [Region(d0, 0, SIZE_SECTORS)],
                                FLAG_WRITE_SEQ)
    assert r[0] == 1
    written = [s for s, _ in writes(log)]
    assert written == [0, 1024]
    assert same(src, d0, 0, 2048)


# --------------------------------------------------------------------------- callbacks, flush, throttle

async def test_prepare_and_do_callback():
    cb = Recorder()
    done = []
    async with open_kcopyd_client() as kc:
        job = kc.prepare_callback(cb, "x")
        assert kc.outstanding_jobs == 1

        async def later():
            await trio.testing.wait_all_tasks_blocked()
            kc.do_callback(job, 0, 4)
            done.append(1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(later)
            await kc.destroy()      # waits for the prepared callback too
            assert done
        with pytest.raises(DMError):
            kc.do_callback(job)
    assert cb.calls == [(0, 4)]


async def test_raising_notify_is_logged_and_the_worker_goes_on(caplog):
    """A callback that raises is a client bug: logged with its traceback, its job counts
    as complete, and the client's later jobs (queued and inline) still complete."""
    log = []
    src, (d0,) = make(log)
    cb = Recorder()

    def broken(read_err, write_err, context):
        raise RuntimeError("bug in a client")

    with trio.fail_after(10):
        async with open_kcopyd_client() as kc:
            kc.copy(Region(src, 0, 8), [Region(d0, 0, 8)], 0, broken, None)
            kc.copy(Region(src, 8, 8), [Region(d0, 8, 8)], 0, cb, "a")
            await kc.flush()
            kc.do_callback(kc.prepare_callback(broken))
            kc.zero([Region(d0, 16, 8)], 0, cb, "b")
            assert await kc.copy_async(Region(src, 24, 4096), [Region(d0, 24, 4096)]) == (0, 0)
            kc.copy(Region(src, 32, 8), [Region(d0, 32, 8)], 0, cb, "c")
        assert kc.outstanding_jobs == 0       # destroy returned: every job completed
    assert cb.calls == [(0, 0)] * 3
    failures = [r for r in caplog.records if r.name == "dmsim.kcopyd"]
    assert len(failures) == 2 and all(r.exc_info and r.exc_info[0] is RuntimeError for r in failures)


async def test_flush_runs_queued_callbacks():
    cb = Recorder()
    async with open_kcopyd_client() as kc:
        kc.do_callback(kc.prepare_callback(cb))
        kc.zero([Region(MemoryDevice(8), 0, 0)], 0, cb, None)
        await kc.flush()
        assert cb.calls == [(0, 0), (0, 0)]


async def test_throttle_limits_io_share(autojump_clock):
    log = []
    src, (d0,) = make(log, src_kwargs={"delay_seconds": 0.05}, dest_kwargs={0: {"delay_seconds": 0.05}})
    throttle = Throttle(20)
    async with open_kcopyd_client(throttle=throttle, sub_job_sectors=256) as kc:
        t0 = trio.current_time()
        await kc.copy_async(Region(src, 0, 8192), [Region(d0, 0, 8192)])
        throttled = trio.current_time() - t0
        throttle.percent = 100
        t0 = trio.current_time()
        await kc.copy_async(Region(src, 0, 8192), [Region(d0, 8192, 8192)])
        free = trio.current_time() - t0
    assert throttle.sleeps > 0
    assert throttled > 2 * free
    assert same(src, d0, 0, 8192)


async def test_exception_in_body_cancels_jobs(autojump_clock):
    log = []
    src, (d0,) = make(log, src_kwargs={"delay_seconds": 100})
    cb = Recorder()
    with pytest.raises(RuntimeError):
        async with open_kcopyd_client() as kc:
            kc.copy(Region(src, 0, 64), [Region(d0, 0, 64)], 0, cb, None)
            raise RuntimeError("boom")
    assert cb.calls == []
    assert kc.pages.in_use == 0


# --------------------------------------------------------------------------- property

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    sub_job_sectors=st.sampled_from([8, 24, 64, 1024]),
    num_pages=st.sampled_from([None, None, 1, 3, 16]),
    flags=st.sampled_from([0, FLAG_IGNORE_ERROR, FLAG_WRITE_SEQ]),
    n_dests=st.integers(1, 4),
)
async def test_random_copies_are_byte_identical(data, sub_job_sectors, num_pages, flags, n_dests):
    size = 512
    jobs = data.draw(st.lists(st.tuples(st.integers(0, size), st.integers(0, size)), min_size=1, max_size=4))
    src = MemoryDevice(size, os.urandom(to_bytes(size)), name="S")
    plan = []
    for a, b in jobs:
        start, count = min(a, b), abs(a - b)
        if num_pages is not None and count < 128 and -(-count // 8) > num_pages:
            count = num_pages * 8   # keep unsplit legacy jobs within the reservation
        # each job gets its own destinations: jobs run concurrently, unordered
        dests = [MemoryDevice(size, name="D%d" % i) for i in range(n_dests)]
        offs = [data.draw(st.integers(0, size - count)) for _ in dests]
        plan.append((start, count, dests, offs))
    results = []
    kwargs = {} if num_pages is not None else {"sub_job_sectors": sub_job_sectors}
    async with open_kcopyd_client(num_pages, **kwargs) as kc:
        for i, (start, count, dests, offs) in enumerate(plan):
            kc.copy(Region(src, start, count), [Region(d, o, count) for d, o in zip(dests, offs, strict=True)],
                    flags, lambda r, w, ctx: results.append((ctx, r, w)), i)
    assert sorted(results) == [(i, 0, 0) for i in range(len(plan))]
    for start, count, dests, offs in plan:
        expected = src.buf[to_bytes(start):to_bytes(start + count)]
        for d, o in zip(dests, offs, strict=True):
            assert d.buf[to_bytes(o):to_bytes(o + count)] == expected
            assert not any(d.buf[:to_bytes(o)]) and not any(d.buf[to_bytes(o + count):])


async def test_file_to_file_copy_in_kernel_and_fallback(tmp_path):
    """Image file to image file goes through copy_file_range; a failing copy falls back
    to read + write, so the error bits stay exact."""
    import os as _os

    from dmsim.blockdev import FileDevice

    src_path, dst_path, small_path = tmp_path / "s", tmp_path / "d", tmp_path / "small"
    payload = _os.urandom(3000 * 512)
    src_path.write_bytes(payload)
    dst_path.write_bytes(bytes(len(payload)))
    small_path.write_bytes(bytes(1000 * 512))
    src, dst, small = FileDevice(str(src_path)), FileDevice(str(dst_path)), FileDevice(str(small_path))
    calls = []
    real = FileDevice.copy_to

    def spy(self, *a):
        calls.append(a[1:])
        return real(self, *a)

    FileDevice.copy_to = spy
    try:
        async with open_kcopyd_client() as kc:
            assert await kc.copy_async(Region(src, 0, 3000), [Region(dst, 0, 3000)]) == (0, 0)
            # past the end of the small file: copy_to fails, the ordinary path reports it
            r, w = await kc.copy_async(Region(src, 0, 1024), [Region(small, 500, 1024)])
    finally:
        FileDevice.copy_to = real
    assert dst_path.read_bytes() == payload
    assert calls[:3] == [(0, 0, 1024), (1024, 1024, 1024), (2048, 2048, 952)]
    assert (r, w) == (0, 1)
    for d in (src, dst, small):
        d.close()


@pytest.mark.parametrize("modes", [("thread", "thread"), ("inline", "thread")])
async def test_file_copy_with_thread_io_runs_in_a_worker_thread(tmp_path, monkeypatch, modes):
    """With thread I/O on either file, a file-to-file copy is still one in-kernel copy,
    made from a worker thread (never on the Trio thread), sub-job by sub-job; a copy that
    fails there falls back to read + write with exact error bits."""
    import threading

    from dmsim.blockdev import FileDevice

    src_path, dst_path, small_path = tmp_path / "s", tmp_path / "d", tmp_path / "small"
    payload = os.urandom(3000 * 512)
    src_path.write_bytes(payload)
    dst_path.write_bytes(bytes(len(payload)))
    small_path.write_bytes(bytes(1000 * 512))
    src = FileDevice(str(src_path), io_mode=modes[0])
    dst = FileDevice(str(dst_path), io_mode=modes[1])
    small = FileDevice(str(small_path), io_mode=modes[1])
    threads = []
    real = FileDevice.copy_to

    def spy(self, *a):
        threads.append(threading.current_thread() is threading.main_thread())
        return real(self, *a)
    monkeypatch.setattr(FileDevice, "copy_to", spy)
    try:
        async with open_kcopyd_client() as kc:
            assert await kc.copy_async(Region(src, 0, 3000), [Region(dst, 0, 3000)]) == (0, 0)
            assert threads and not any(threads)         # every sub-job off the Trio thread
            assert dst_path.read_bytes() == payload
            r, w = await kc.copy_async(Region(src, 0, 1024), [Region(small, 500, 1024)])
            assert (r, w) == (0, 1)
    finally:
        for dev in (src, dst, small):
            dev.close()


async def test_inline_job_counts_as_outstanding_only_until_its_callback(tmp_path):
    """An inline job is outstanding from its completion until its callback has run (one
    without a callback never is); destroy waits for that callback; an inline failure then
    queued counts until its callback too."""
    from dmsim.blockdev import FileDevice

    src_path, dst_path = tmp_path / "s", tmp_path / "d"
    payload = os.urandom(16 * 512)
    src_path.write_bytes(payload)
    dst_path.write_bytes(bytes(len(payload)))
    src, dst = FileDevice(str(src_path)), FileDevice(str(dst_path))
    cb = Recorder()
    try:
        async with open_kcopyd_client() as kc:
            assert kc.copy_now(src, 0, dst, 0, 8) and kc.outstanding_jobs == 0
            assert await kc.copy_async(Region(src, 0, 8), [Region(dst, 0, 8)]) == (0, 0)
            assert kc.outstanding_jobs == 0 and kc.pages.in_use == 0
            kc.copy(Region(src, 8, 8), [Region(dst, 8, 8)], 0, cb, None)
            assert kc.outstanding_jobs == 1 and cb.calls == []    # copied, callback queued
            await kc.flush()
            assert kc.outstanding_jobs == 0 and cb.calls == [(0, 0)]
            kc.zero([Region(dst, 0, 0)], 0, cb, None)             # zero-length: complete at once
            assert kc.outstanding_jobs == 1
            kc.copy(Region(src, 0, 16), [Region(dst, 0, 16)], 0, cb, None)
            assert kc.outstanding_jobs == 2                      # destroy waits for both
        assert cb.calls == [(0, 0)] * 3 and kc.outstanding_jobs == 0
        assert dst_path.read_bytes() == payload
    finally:
        src.close()
        dst.close()


async def test_small_file_copy_runs_inline_and_gives_pages_back(tmp_path):
    """A small file-to-file job runs inline, in the caller's call (it is never queued,
    the pages it took are back at once; the callback form still calls back from the
    worker); with no pages free the same job is queued instead, with the same result."""
    from dmsim.blockdev import FileDevice

    src_path, dst_path = tmp_path / "s", tmp_path / "d"
    payload = os.urandom(64 * 512)
    src_path.write_bytes(payload)
    dst_path.write_bytes(bytes(len(payload)))
    src, dst = FileDevice(str(src_path)), FileDevice(str(dst_path))
    try:
        async with open_kcopyd_client() as kc:
            queued = []
            real_queue = kc._queue
            kc._queue = lambda job: (queued.append(job), real_queue(job))[1]
            assert await kc.copy_async(Region(src, 0, 8), [Region(dst, 0, 8)]) == (0, 0)
            assert queued == [] and kc.pages.in_use == 0 and kc.outstanding_jobs == 0
            assert kc.pages.peak_in_use == 1
            assert await kc.copy_async(Region(src, 8, 8), [Region(dst, 8, 8)], IGNORE_ERROR) == (0, 0)
            got = []
            kc.copy(Region(src, 0, 8), [Region(dst, 0, 8)], WRITE_SEQ,
                    lambda r, w, ctx: got.append((r, w, ctx)), "ctx")
            assert got == [] and queued == []             # copied; the callback is queued
            await kc.flush()
            assert got == [(0, 0, "ctx")]
            held = kc.pages.capacity
            kc.pages.in_use += held                      # pool exhausted: must queue
            assert not kc.copy_now(src, 16, dst, 16, 48)  # copy_now can't queue: refuses
            assert queued == [] and kc.outstanding_jobs == 0
            async with trio.open_nursery() as n:
                n.start_soon(kc.copy_async, Region(src, 16, 48), [Region(dst, 16, 48)])
                await trio.testing.wait_all_tasks_blocked()
                assert len(queued) == 1 and not queued[0].inline   # waiting for pages
                kc.pages.give(held)
            assert kc.copy_now(src, 0, dst, 0, 64) and kc.outstanding_jobs == 0
        assert dst_path.read_bytes() == payload
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("flags", [0, FLAG_IGNORE_ERROR, FLAG_WRITE_SEQ])
async def test_inline_job_whose_copy_fails_is_queued_from_that_sub_job(tmp_path, monkeypatch, flags):
    """One path: an inline job whose in-kernel copy fails goes on as a queued job from the
    failed sub-job (the ones before it are not redone), reading and writing from there
    on, with exact error bits; its callback still runs once, from the worker."""
    from dmsim.blockdev import FileDevice

    src_path, dst_path = tmp_path / "s", tmp_path / "d"
    payload = os.urandom(24 * 512)
    src_path.write_bytes(payload)
    dst_path.write_bytes(bytes(len(payload)))
    src, dst = FileDevice(str(src_path)), FileDevice(str(dst_path))
    copies = []
    real = FileDevice.copy_to

    def flaky(self, dev, s, d, n):
        copies.append(s)
        if s == 8:
            raise DMError(errno.EIO, "copy stopped")
        return real(self, dev, s, d, n)
    monkeypatch.setattr(FileDevice, "copy_to", flaky)
    try:
        async with open_kcopyd_client(sub_job_sectors=8) as kc:
            queued = []
            real_queue = kc._queue
            kc._queue = lambda job: (queued.append(job.progress_sectors), real_queue(job))[1]
            cb = Recorder()
            kc.copy(Region(src, 0, 24), [Region(dst, 0, 24)], flags, cb, None)
            assert copies == [0, 8] and queued == [8]      # the failed sub-job on, queued
            assert cb.calls == []
            await trio.testing.wait_all_tasks_blocked()
            await kc.flush()
            assert cb.calls == [(0, 0)] and kc.outstanding_jobs == 0
            assert not kc.copy_now(src, 0, dst, 0, 24)     # fails at 8: refused, nothing left
            assert kc.outstanding_jobs == 0 and kc.pages.in_use == 0
        assert cb.calls == [(0, 0)] and len(cb.tasks) == 1
        assert copies == [0, 8, 0, 8]                    # sub-jobs 8 and 16 were read and written
        assert dst_path.read_bytes() == payload
    finally:
        src.close()
        dst.close()


async def test_copy_now_of_nothing_is_done():
    """A zero-length copy_now completes at once, whatever the devices (no I/O at all)."""
    async with open_kcopyd_client() as kc:
        dev = MemoryDevice(16)
        assert kc.copy_now(dev, 0, dev, 8, 0)
        assert not kc.copy_now(dev, 0, dev, 8, 8)        # memory devices: never inline
        assert kc.outstanding_jobs == 0


async def test_bug_in_an_inline_copy_fails_that_call_only(tmp_path, monkeypatch):
    """An unexpected exception inside an inline job's copy reaches the submitter and
    leaves nothing behind: no pages held, no job outstanding, the client still copies
    and destroy returns."""
    from dmsim.blockdev import FileDevice

    src_path, dst_path = tmp_path / "s", tmp_path / "d"
    payload = os.urandom(16 * 512)
    src_path.write_bytes(payload)
    dst_path.write_bytes(bytes(len(payload)))
    src, dst = FileDevice(str(src_path)), FileDevice(str(dst_path))
    real = FileDevice.copy_to

    def buggy(self, *a):
        raise RuntimeError("bug")
    try:
        async with open_kcopyd_client() as kc:
            monkeypatch.setattr(FileDevice, "copy_to", buggy)
            with pytest.raises(RuntimeError):
                await kc.copy_async(Region(src, 0, 16), [Region(dst, 0, 16)])
            with pytest.raises(RuntimeError):
                kc.copy_now(src, 0, dst, 0, 16)
            assert kc.outstanding_jobs == 0 and kc.pages.in_use == 0
            monkeypatch.setattr(FileDevice, "copy_to", real)
            assert await kc.copy_async(Region(src, 0, 16), [Region(dst, 0, 16)]) == (0, 0)
        assert dst_path.read_bytes() == payload
    finally:
        src.close()
        dst.close()
