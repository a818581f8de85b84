"""dmsim.fanout: the same data to several devices at once, one result per destination."""
import errno
import os
import threading

import pytest

import dmsim
from dmsim import fanout, parse_table_text
from dmsim.bio import Op, to_bytes
from dmsim.blockdev import FileDevice, MemoryDevice

BIG_SECTORS = 2 * fanout.PARALLEL_MIN_BYTES // 512     # goes through the worker threads
SMALL_SECTORS = 8                                       # stays serial


@pytest.fixture
def files(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / ("leg%d.img" % i)
        p.write_bytes(bytes(1 << 20))
        paths.append(str(p))
    yield paths


def opened(paths, **kwargs):
    return [FileDevice(p, **kwargs) for p in paths]


def content(path, sector, sectors):
    with open(path, "rb") as f:
        f.seek(to_bytes(sector))
        return f.read(to_bytes(sectors))


def pattern(sectors, seed=1):
    return bytes((seed + i) & 0xFF for i in range(to_bytes(sectors)))


@pytest.mark.parametrize("io_mode", ["inline", "thread"])
@pytest.mark.parametrize("sectors", [SMALL_SECTORS, BIG_SECTORS])
async def test_writes_every_destination(files, io_mode, sectors):
    devs = opened(files, io_mode=io_mode)
    data = pattern(sectors)
    try:
        results = await fanout.write([(devs[0], 0), (devs[1], 16), (devs[2], 100)], sectors, data)
    finally:
        for d in devs:
            d.close()
    assert results == [None, None, None]
    assert content(files[0], 0, sectors) == content(files[1], 16, sectors) == data
    assert content(files[2], 100, sectors) == data
    assert content(files[1], 0, 16) == bytes(to_bytes(16))    # nothing else touched


@pytest.mark.parametrize("sectors", [SMALL_SECTORS, BIG_SECTORS])
async def test_errors_are_per_destination(files, tmp_path, sectors):
    small = tmp_path / "small.img"
    small.write_bytes(bytes(to_bytes(sectors)))
    ro = FileDevice(files[1], read_only=True)
    tiny = FileDevice(str(small))
    ok = FileDevice(files[2])
    data = pattern(sectors, 7)
    try:
        results = await fanout.write([(ro, 0), (tiny, 1), (ok, 0)], sectors, data)
    finally:
        for d in (ro, tiny, ok):
            d.close()
    assert [e.errno if e else None for e in results] == [errno.EPERM, errno.EIO, None]
    assert content(files[2], 0, sectors) == data
    assert content(files[1], 0, sectors) == bytes(to_bytes(sectors))


@pytest.mark.parametrize("sectors", [SMALL_SECTORS, BIG_SECTORS])
async def test_os_error_of_one_leg_does_not_hide_the_others(files, sectors):
    """A write that fails in the OS (here EBADF: an fd opened read-only) fails its own
    leg only, whether it ran here or in a worker thread."""
    devs = opened(files)
    bad = FileDevice(files[1], read_only=True)
    bad.read_only = False                    # so the pwrite itself fails
    data = pattern(sectors, 3)
    try:
        for order in ([devs[0], bad, devs[2]], [bad, devs[0], devs[2]]):
            results = await fanout.write([(d, 0) for d in order], sectors, data)
            assert [e.errno if e else None for e in results] == \
                [errno.EBADF if d is bad else None for d in order]
    finally:
        for d in devs + [bad]:
            d.close()
    assert content(files[0], 0, sectors) == content(files[2], 0, sectors) == data


async def test_short_data_is_refused_by_every_file(files):
    devs = opened(files[:2])
    try:
        results = await fanout.write([(d, 0) for d in devs], BIG_SECTORS, bytes(to_bytes(BIG_SECTORS) - 512))
    finally:
        for d in devs:
            d.close()
    assert [e.errno for e in results] == [errno.EINVAL, errno.EINVAL]
    assert content(files[0], 0, 1) == bytes(512)


@pytest.mark.parametrize("sectors", [SMALL_SECTORS, BIG_SECTORS])
async def test_mapped_device_leg_uses_its_own_submit(files, sectors):
    """A dm device under a leg is not written by the file fan-out: its own target runs
    (an error target fails, a linear one writes), next to file legs."""
    data = pattern(sectors, 5)
    async with dmsim.open_manager() as m:
        m.create("err")
        await m.load("err", parse_table_text("0 2048 error"))
        await m.resume("err")
        m.create("lin")
        await m.load("lin", parse_table_text("0 2048 linear %s 0" % files[2]))
        await m.resume("lin")
        err, lin = m.find("err"), m.find("lin")
        assert not fanout.fans_out(err) and not fanout.fans_out(lin)
        dev = FileDevice(files[0])
        mem = MemoryDevice(2048)
        try:
            results = await fanout.write([(dev, 0), (err, 0), (lin, 8), (mem, 4)], sectors, data)
        finally:
            dev.close()
        assert [e.errno if e else None for e in results] == [None, errno.EIO, None, None]
        assert bytes(mem.buf[2048:2048 + len(data)]) == data
    assert content(files[0], 0, sectors) == content(files[2], 8, sectors) == data


async def test_subclass_and_closed_file_fall_back(files):
    calls = []

    class Counting(FileDevice):
        async def submit(self, bio):
            calls.append(bio.op)
            return await super().submit(bio)

    sub = Counting(files[0])
    closed = FileDevice(files[1])
    closed.close()
    try:
        assert not fanout.fans_out(sub) and not fanout.fans_out(closed)
        results = await fanout.write([(sub, 0), (closed, 0)], BIG_SECTORS, pattern(BIG_SECTORS))
    finally:
        sub.close()
    assert calls == [Op.WRITE]
    assert results[0] is None and results[1].errno == errno.EBADF


@pytest.mark.parametrize("durability,synced", [("fsync", True), ("process", False)])
@pytest.mark.parametrize("io_mode", ["inline", "thread"])
async def test_fua_syncs_each_file_off_the_trio_thread(files, monkeypatch, durability, synced, io_mode):
    seen = []
    real = os.fdatasync

    def fdatasync(fd):
        seen.append((fd, threading.current_thread() is threading.main_thread()))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    devs = opened(files[:2], durability=durability, io_mode=io_mode)
    try:
        results = await fanout.write([(d, 0) for d in devs], BIG_SECTORS, pattern(BIG_SECTORS), fua=True)
        assert results == [None, None]
        if synced:
            assert sorted(fd for fd, _ in seen) == sorted(d.fd for d in devs)
            assert not any(on_main for _, on_main in seen)
        else:
            assert seen == []
        seen.clear()
        await fanout.write([(d, 0) for d in devs], BIG_SECTORS, pattern(BIG_SECTORS))
        assert seen == []                      # no FUA, no sync
    finally:
        for d in devs:
            d.close()


async def test_fua_sync_failure_is_per_leg(files, monkeypatch):
    real = os.fdatasync
    devs = opened(files[:2])

    def fdatasync(fd):
        if fd == devs[1].fd:
            raise OSError(errno.EIO, "boom")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    try:
        results = await fanout.write([(d, 0) for d in devs], SMALL_SECTORS, pattern(SMALL_SECTORS), fua=True)
    finally:
        for d in devs:
            d.close()
    assert results[0] is None and results[1].errno == errno.EIO


async def test_workers_are_daemon_threads(files):
    devs = opened(files)
    try:
        await fanout.write([(d, 0) for d in devs], BIG_SECTORS, pattern(BIG_SECTORS))
    finally:
        for d in devs:
            d.close()
    workers = [t for t in threading.enumerate() if t.name == "dmsim-fanout"]
    assert workers and all(t.daemon for t in workers)
    assert len(workers) <= fanout.MAX_WORKERS
