"""The FUSE mapping, mounted in-process (file I/O from worker threads)."""
import errno
import os

import pytest
import trio

import dmsim
from dmsim.table import TableLine

pyfuse3 = pytest.importorskip("pyfuse3", reason="pyfuse3 is an optional dependency (dmsim[fuse])")
if not os.path.exists("/dev/fuse"):
    pytest.skip("no /dev/fuse on this machine", allow_module_level=True)

from dmsim.fuse import Mount  # noqa: E402

MiB = 1 << 20


@pytest.fixture
async def mounted(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    img = tmp_path / "a.img"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
    async with dmsim.open_manager(mount_dir=str(mnt)) as m:
        fs = Mount(m, str(mnt))
        fs.mount()
        try:
            async with trio.open_nursery() as n:
                n.start_soon(fs.run)
                yield m, str(mnt), str(img)
                n.cancel_scope.cancel()
        finally:
            fs.unmount()


def run(fn, *args):
    return trio.to_thread.run_sync(fn, *args)


async def make_linear(m, name, img, sectors, offset=0):
    m.create(name)
    await m.load(name, [TableLine(0, sectors, "linear", "%s %d" % (img, offset))])
    await m.resume(name)


async def test_files_follow_devices(mounted):
    m, mnt, img = mounted
    assert await run(os.listdir, mnt) == []
    m.create("empty")
    await make_linear(m, "lin", img, 2048)
    assert sorted(await run(os.listdir, mnt)) == ["empty", "lin"]
    assert (await run(os.stat, mnt + "/empty")).st_size == 0
    assert (await run(os.stat, mnt + "/lin")).st_size == MiB
    m.rename("lin", "lin2")
    assert not await run(os.path.exists, mnt + "/lin")
    assert (await run(os.stat, mnt + "/lin2")).st_size == MiB
    await m.remove("empty")
    assert await run(os.listdir, mnt) == ["lin2"]
    # a resume with a bigger table shows the new size at once
    await m.load("lin2", [TableLine(0, 4096, "linear", "%s 0" % img)])
    await m.resume("lin2")
    assert (await run(os.stat, mnt + "/lin2")).st_size == 2 * MiB


async def test_read_write_unaligned_and_enospc(mounted):
    m, mnt, img = mounted
    await make_linear(m, "lin", img, 2048, offset=8)   # starts 4 KiB into the image

    def io():
        fd = os.open(mnt + "/lin", os.O_RDWR)
        try:
            os.pwrite(fd, b"A" * 4096, 0)
            os.pwrite(fd, b"xyz", 1000)                 # unaligned: read-modify-write
            data = os.pread(fd, 4096, 0)
            tail = os.pread(fd, 100, MiB - 10)          # clipped at the end
            try:
                os.pwrite(fd, b"q", MiB)
                end_err = None
            except OSError as e:
                end_err = e.errno
            os.fsync(fd)
            return data, tail, end_err
        finally:
            os.close(fd)

    data, tail, end_err = await run(io)
    assert data == b"A" * 1000 + b"xyz" + b"A" * 93 + b"A" * 3000
    assert len(tail) == 10
    assert end_err == errno.ENOSPC
    with open(img, "rb") as f:
        f.seek(4096)
        assert f.read(1003)[-3:] == b"xyz"


async def test_open_counts_and_remove_busy(mounted):
    m, mnt, img = mounted
    await make_linear(m, "lin", img, 8)
    fd = await run(os.open, mnt + "/lin", os.O_RDONLY)
    try:
        assert m.info("lin").open_count == 1
        with pytest.raises(dmsim.DMError) as e:
            await m.remove("lin")
        assert e.value.errno == errno.EBUSY
    finally:
        await run(os.close, fd)
    await trio.sleep(0.05)  # release is asynchronous in FUSE
    for _ in range(100):
        if m.info("lin").open_count == 0:
            break
        await trio.sleep(0.01)
    assert m.info("lin").open_count == 0
    await m.remove("lin")
    assert not await run(os.path.exists, mnt + "/lin")


async def test_suspend_holds_io_until_resume(mounted):
    m, mnt, img = mounted
    await make_linear(m, "lin", img, 8)
    fd = await run(os.open, mnt + "/lin", os.O_RDWR)
    try:
        await m.suspend("lin")
        done = []

        async def writer():
            await run(os.pwrite, fd, b"B" * 512, 0)
            done.append(True)

        async with trio.open_nursery() as n:
            n.start_soon(writer)
            await trio.sleep(0.2)
            assert not done
            await m.resume("lin")
        assert done
        assert await run(os.pread, fd, 512, 0) == b"B" * 512
    finally:
        await run(os.close, fd)


async def test_errors_map_to_errno(mounted):
    m, mnt, img = mounted
    m.create("err")
    await m.load("err", [TableLine(0, 8, "error")])
    await m.resume("err")
    m.create("ro")
    await m.load("ro", [TableLine(0, 8, "zero")], read_only=True)
    await m.resume("ro")

    def io():
        out = []
        fd = os.open(mnt + "/err", os.O_RDWR)
        try:
            os.pread(fd, 512, 0)
        except OSError as e:
            out.append(e.errno)
        finally:
            os.close(fd)
        fd = os.open(mnt + "/ro", os.O_RDONLY)
        try:
            out.append(os.pread(fd, 512, 0))
        finally:
            os.close(fd)
        return out

    assert await run(io) == [errno.EIO, bytes(512)]
