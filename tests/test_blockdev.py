"""Backing devices: image files and memory, in sectors, with the kernel's errnos."""
import errno
import os

import pytest

from dmsim.bio import Bio, Op
from dmsim.blockdev import FileDevice, MemoryDevice
from dmsim.errors import DMError


@pytest.fixture
def img(tmp_path):
    path = tmp_path / "vda"
    path.write_bytes(b"".join(bytes([s]) * 512 for s in range(64)))
    return str(path)


def errno_of(excinfo):
    return excinfo.value.errno


@pytest.mark.parametrize("io_mode", ["inline", "thread"])
async def test_file_device_read_write_flush(img, io_mode):
    dev = FileDevice(img, io_mode=io_mode)
    try:
        assert (dev.size_sectors, dev.kname, dev.ref, dev.devno) == (64, "vda", img, None)
        assert await dev.read(3, 2) == bytes([3]) * 512 + bytes([4]) * 512
        await dev.write(10, b"\xaa" * 1024, fua=True)
        await dev.flush()
        assert await dev.read(10, 2) == b"\xaa" * 1024
    finally:
        dev.close()
    with open(img, "rb") as f:
        f.seek(10 * 512)
        assert f.read(1024) == b"\xaa" * 1024


async def test_file_device_bounds_and_length(img):
    dev = FileDevice(img)
    try:
        for bio in (Bio.read(63, 2), Bio.read(64, 1), Bio.read(-1, 1), Bio.write(64, bytes(512))):
            with pytest.raises(DMError) as ei:
                await dev.submit(bio)
            assert errno_of(ei) == errno.EIO
        with pytest.raises(DMError) as ei:
            await dev.submit(Bio(Op.WRITE, 0, 2, bytes(512)))
        assert errno_of(ei) == errno.EINVAL
        assert await dev.submit(Bio.read(64, 0)) == b""
    finally:
        dev.close()


async def test_file_device_read_only(img):
    dev = FileDevice(img, read_only=True)
    try:
        for bio in (Bio.write(0, bytes(512)), Bio(Op.DISCARD, 0, 1), Bio(Op.WRITE_ZEROES, 0, 1)):
            with pytest.raises(DMError) as ei:
                await dev.submit(bio)
            assert errno_of(ei) == errno.EPERM
        assert await dev.read(1, 1) == bytes([1]) * 512
    finally:
        dev.close()


@pytest.mark.parametrize("op", [Op.DISCARD, Op.WRITE_ZEROES])
async def test_file_device_discard_and_write_zeroes_read_back_zero(img, op):
    dev = FileDevice(img)
    try:
        await dev.submit(Bio(op, 8, 16))
        assert await dev.read(8, 16) == bytes(16 * 512)
        assert await dev.read(7, 1) == bytes([7]) * 512
        assert await dev.read(24, 1) == bytes([24]) * 512
        assert os.path.getsize(img) == 64 * 512
    finally:
        dev.close()


async def test_file_shorter_than_whole_sector(tmp_path):
    path = tmp_path / "odd"
    path.write_bytes(b"\x01" * 1000)
    dev = FileDevice(str(path))
    try:
        assert dev.size_sectors == 1
        assert await dev.read(0, 1) == b"\x01" * 512
    finally:
        dev.close()


def test_file_device_open_errors(tmp_path):
    with pytest.raises(DMError) as ei:
        FileDevice(str(tmp_path / "missing"))
    assert errno_of(ei) == errno.ENOENT
    with pytest.raises(DMError) as ei:
        FileDevice(str(tmp_path))
    assert errno_of(ei) in (errno.ENOTBLK, errno.EISDIR)


async def test_memory_device():
    dev = MemoryDevice(16, data=b"\x05" * 600, name="m0")
    assert dev.ref == "mem:m0" and dev.kname == "m0"
    assert await dev.read(0, 2) == b"\x05" * 600 + bytes(424)
    await dev.write(15, b"\x09" * 512)
    assert await dev.read(15, 1) == b"\x09" * 512
    await dev.discard(15, 1)
    assert await dev.read(15, 1) == bytes(512)
    await dev.flush()
    with pytest.raises(DMError) as ei:
        await dev.read(16, 1)
    assert errno_of(ei) == errno.EIO
    dev.read_only = True
    with pytest.raises(DMError) as ei:
        await dev.write(0, bytes(512))
    assert errno_of(ei) == errno.EPERM


@pytest.mark.parametrize("io_mode", ["inline", "thread"])
async def test_file_device_read_fills_a_callers_buffer(img, io_mode):
    """A read carrying a buffer is filled in place (preadv) and returns the buffer."""
    dev = FileDevice(img, io_mode=io_mode)
    try:
        buf = bytearray(b"\xff" * 2048)
        piece = memoryview(buf)[512:1536]
        got = await dev.submit(Bio.read_into(5, piece))
        assert got is piece
        assert buf == b"\xff" * 512 + bytes([5]) * 512 + bytes([6]) * 512 + b"\xff" * 512
    finally:
        dev.close()


async def test_read_into_past_a_files_end_zero_fills(tmp_path):
    """A file that shrank under the device reads zeros past its end, into the buffer too
    (as the plain read does)."""
    path = tmp_path / "shrinks"
    path.write_bytes(b"\x01" * 1024)
    dev = FileDevice(str(path))
    try:
        os.truncate(path, 700)
        buf = bytearray(b"\xee" * 1024)
        assert await dev.submit(Bio.read_into(0, buf)) is buf
        assert buf == b"\x01" * 700 + bytes(324)
        assert await dev.read(0, 2) == buf
    finally:
        dev.close()


async def test_memory_device_read_into_and_settle_read():
    from dmsim.bio import settle_read
    dev = MemoryDevice(4, data=b"\x07" * 2048)
    buf = bytearray(1024)
    bio = Bio.read_into(2, memoryview(buf)[512:])
    assert settle_read(bio, await dev.submit(bio)) is bio.data
    assert buf == bytes(512) + b"\x07" * 512
    # a device that returns other bytes: settle_read copies them into the buffer
    other = Bio.read_into(0, memoryview(buf)[:512])
    assert settle_read(other, b"\x09" * 512) is other.data
    assert buf[:512] == b"\x09" * 512
    # no buffer: the result itself
    assert settle_read(Bio.read(0, 1), b"x" * 512) == b"x" * 512


@pytest.mark.parametrize("dst_sector", [0, 2048, 8, 2056])
@pytest.mark.parametrize("splice", [True, False])
async def test_copy_to_aligned_or_through_a_buffer(tmp_path, monkeypatch, dst_sector, splice):
    """copy_to copies exactly whether it uses copy_file_range (small copies, destination
    aligned), splice through a pipe (large copies, or not aligned: a COW's runs between
    metadata chunks) or a buffer (not aligned, where splice is not available)."""
    from dmsim import blockdev
    used = []
    real = blockdev._splice_copy
    monkeypatch.setattr(blockdev, "_splice_copy",
                        lambda *a: used.append(a) or (real(*a) if splice else False))
    src_path, dst_path = tmp_path / "s", tmp_path / "d"
    payload = os.urandom(3 << 20)
    src_path.write_bytes(payload)
    dst_path.write_bytes(bytes(6 << 20))
    src, dst = FileDevice(str(src_path)), FileDevice(str(dst_path))
    try:
        src.copy_to(dst, 16, dst_sector, 2048 + 1024 + 8)      # more than one buffer's worth
        with open(dst_path, "rb") as f:
            f.seek(dst_sector * 512)
            assert f.read((2048 + 1024 + 8) * 512) == payload[16 * 512:(16 + 3080) * 512]
        assert len(used) == 1               # splice first for a copy this large or misaligned
        src.copy_to(dst, 0, 0, 16)          # small and aligned: copy_file_range only
        assert len(used) == 1
        with open(dst_path, "rb") as f:
            assert f.read(16 * 512) == payload[:16 * 512]
        with pytest.raises(DMError):
            src.copy_to(dst, 0, 12280, 16)                     # past the destination's end
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("durability", ["fsync", "process"])
async def test_preflush_fua_write_orders_sync_write_sync(img, durability, monkeypatch):
    """A PREFLUSH|FUA write (a snapshot's exception area): with syncs, the file is synced,
    then written, then synced again (in one thread hand-off); without, just written."""
    calls = []
    real_sync, real_pwrite = os.fdatasync, os.pwrite
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append("sync"), real_sync(fd))[1])
    monkeypatch.setattr(os, "pwrite", lambda fd, d, off: (calls.append("write"), real_pwrite(fd, d, off))[1])
    dev = FileDevice(img, durability=durability)
    try:
        await dev.write_preflush_fua(4, b"\x77" * 1024)
        assert calls == (["sync", "write", "sync"] if durability == "fsync" else ["write"])
        assert await dev.read(4, 2) == b"\x77" * 1024
        with pytest.raises(DMError) as ei:
            await dev.write_preflush_fua(63, b"\x77" * 1024)
        assert errno_of(ei) == errno.EIO
    finally:
        dev.close()
    ro = FileDevice(img, read_only=True, durability=durability)
    try:
        with pytest.raises(DMError) as ei:
            await ro.write_preflush_fua(0, b"\x01" * 512)
        assert errno_of(ei) == errno.EPERM
    finally:
        ro.close()


async def test_preflush_fua_write_default_is_flush_then_fua_write():
    """Any other device gets an empty flush, then a FUA write (dm core's split)."""
    seen = []

    class Rec(MemoryDevice):
        async def submit(self, bio):
            seen.append((bio.op, bio.fua))
            return await super().submit(bio)

    dev = Rec(8)
    await dev.write_preflush_fua(1, b"\x05" * 512)
    assert seen == [(Op.FLUSH, False), (Op.WRITE, True)]
    assert await dev.read(1, 1) == b"\x05" * 512
