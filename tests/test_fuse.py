"""The FUSE mapping, mounted in-process (file I/O from worker threads)."""
import errno
import os

import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import dmsim
from dmsim.bio import BACKGROUND_WRITEBACK_FLAGS, SYNC_WRITEBACK_FLAGS, Bio, Op
from dmsim.table import TableLine

pyfuse3 = pytest.importorskip("pyfuse3", reason="pyfuse3 is an optional dependency (dmsim[fuse])")
if not os.path.exists("/dev/fuse"):
    pytest.skip("no /dev/fuse on this machine", allow_module_level=True)

import dmsim.fuse as dmfuse  # noqa: E402
from dmsim.fuse import Mount  # noqa: E402

MiB = 1 << 20


@pytest.fixture
async def mounted_fs(tmp_path, request):
    """(manager, mount dir, a 4 MiB zero image, the Mount); a test marked
    ``invalidate_kernel_cache`` gets a mount that drops the kernel's page cache on
    foreign writes (the opt-in of dmsim.fuse.DeviceFS)."""
    invalidate = request.node.get_closest_marker("invalidate_kernel_cache") is not None
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    img = tmp_path / "a.img"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
    async with dmsim.open_manager(mount_dir=str(mnt)) as m:
        fs = Mount(m, str(mnt), invalidate_kernel_cache=invalidate)
        fs.mount()
        try:
            async with trio.open_nursery() as n:
                n.start_soon(fs.run)
                yield m, str(mnt), str(img), fs
                n.cancel_scope.cancel()
        finally:
            fs.unmount()


@pytest.fixture
async def mounted(mounted_fs):
    yield mounted_fs[:3]


def run(fn, *args):
    return trio.to_thread.run_sync(fn, *args)


async def make_error(m, name, sectors=8):
    """An ``error`` device: every bio fails (EIO), buffered writes fail at writeback."""
    m.create(name)
    await m.load(name, [TableLine(0, sectors, "error")])
    await m.resume(name)


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
    await make_error(m, "err")
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


# -- block-device emulation: O_DIRECT opens direct, buffered opens through page/buffer cache --

def test_buffer_bytes_like_set_init_blocksize():
    from dmsim.fuse import buffer_bytes
    assert buffer_bytes(8192 * 512) == 4096
    assert buffer_bytes(8191 * 512) == 512          # an odd-sized device: 512-byte buffers
    assert buffer_bytes(8190 * 512) == 1024
    assert buffer_bytes(12 * 512) == 2048
    assert buffer_bytes(0) == 4096
    assert buffer_bytes(8191 * 512, 4096) == 4096   # never below the logical block size


def _aligned(data: bytes):
    import mmap
    buf = mmap.mmap(-1, max(len(data), 4096))
    buf[:len(data)] = data
    return memoryview(buf)[:len(data)]


def _sector_writes(path, flags, count):
    """``count`` one-sector writes of zeros from sector 0, then fsync (like dd bs=512)."""
    fd = os.open(path, os.O_RDWR | flags)
    try:
        for i in range(count):
            os.pwrite(fd, _aligned(bytes(512)), i * 512)
        os.fsync(fd)
    finally:
        os.close(fd)


async def test_buffered_writes_reach_the_device_as_whole_buffers(mounted):
    """corrupt_bio_byte 513 hits only a bio of more than 512 bytes: the kernel writes
    dd's eight 512-byte writes back as one 4 KiB bio; O_DIRECT keeps them separate."""
    m, mnt, img = mounted
    for name, flags, start in (("buf", 0, 0), ("dio", os.O_DIRECT, 64)):
        m.create(name)
        await m.load(name, [TableLine(0, 4096, "flakey",
                                      "%s %d 0 1 5 corrupt_bio_byte 513 w 255 0" % (img, start))])
        await m.resume(name)
        await run(_sector_writes, mnt + "/" + name, flags, 8)
    with open(img, "rb") as f:
        data = f.read(72 * 512)
    assert data[512] == 0xFF and data[:512] == bytes(512) and data[513:4096] == bytes(4096 - 513)
    assert data[64 * 512:72 * 512] == bytes(4096)


async def test_odd_sized_device_writes_single_sectors_without_reading(mounted):
    """8191 sectors -> 512-byte buffers: a one-sector write is one bio, no read first, so
    dust's write to a bad block (failing reads) succeeds and clears it."""
    m, mnt, img = mounted
    m.create("dw")
    await m.load("dw", [TableLine(0, 8191, "dust", "%s 0 4096" % img)])
    await m.resume("dw")
    await m.message("dw", 0, "addbadblock 7")
    await m.message("dw", 0, "enable")
    fd = await run(os.open, mnt + "/dw", os.O_RDWR)
    try:
        await run(os.pwrite, fd, b"A" * 512, 57 * 512)
        await run(os.fsync, fd)
    finally:
        await run(os.close, fd)
    assert (await m.message("dw", 0, "countbadblocks")).startswith("countbadblocks: 0")
    with open(img, "rb") as f:
        f.seek(57 * 512)
        assert f.read(512) == b"A" * 512


async def test_buffered_reads_come_as_pages(mounted):
    """dust with 512-byte blocks and block 3 bad: reading sector 0 buffered fetches the
    whole page and fails; an O_DIRECT read of sector 0 alone succeeds."""
    m, mnt, img = mounted
    m.create("du5")
    await m.load("du5", [TableLine(0, 64, "dust", "%s 0 512" % img)])
    await m.resume("du5")
    await m.message("du5", 0, "addbadblock 3")
    await m.message("du5", 0, "enable")

    def read(flags):
        fd = os.open(mnt + "/du5", os.O_RDONLY | flags)
        try:
            buf = _aligned(bytes(512))
            return os.preadv(fd, [buf], 0), bytes(buf)
        except OSError as e:
            return e.errno
        finally:
            os.close(fd)

    assert await run(read, 0) == errno.EIO
    assert await run(read, os.O_DIRECT) == (512, bytes(512))


async def test_writeback_error_reported_by_fsync(mounted):
    """A whole-buffer write lands in the buffer cache; the failing writeback is fsync's EIO."""
    m, mnt, img = mounted
    await make_error(m, "err")

    def io():
        fd = os.open(mnt + "/err", os.O_RDWR)
        try:
            n = os.pwrite(fd, b"x" * 4096, 0)
            try:
                os.fsync(fd)
                return n, None
            except OSError as e:
                return n, e.errno
        finally:
            os.close(fd)

    assert await run(io) == (4096, errno.EIO)


def _fsyncs(*fds):
    """fsync each of ``fds`` in turn: 0 or the errno of each."""
    out = []
    for fd in fds:
        try:
            os.fsync(fd)
            out.append(0)
        except OSError as e:
            out.append(e.errno)
    return out


async def test_writeback_error_reaches_every_open_once(mounted):
    """errseq: a failed writeback is every open's next fsync's EIO, not only the first
    fsync's (another open of the file would be told 0 for data that is gone), and once."""
    m, mnt, img = mounted
    await make_error(m, "err")

    def io():
        fds = [os.open(mnt + "/err", os.O_RDWR) for _ in range(2)]
        try:
            os.pwrite(fds[0], b"x" * 4096, 0)
            return _fsyncs(fds[0], fds[1], fds[0], fds[1])
        finally:
            for fd in fds:
                os.close(fd)

    assert await run(io) == [errno.EIO, errno.EIO, 0, 0]


async def test_direct_fsync_writes_back_other_opens_buffers(mounted):
    """blkdev_fsync writes back the device's dirty buffers whichever open dirtied them:
    an O_DIRECT open's fsync that returns 0 has another open's buffered write on disk
    (it had stayed in the buffer cache; 6.1: tests/kernel_probes/fsync_errseq.c, case A)."""
    m, mnt, img = mounted
    await make_linear(m, "lin", img, 2048)

    def io():
        buffered = os.open(mnt + "/lin", os.O_RDWR)
        direct = os.open(mnt + "/lin", os.O_RDWR | os.O_DIRECT)
        try:
            os.pwrite(buffered, b"A" * 4096, 0)
            rc = _fsyncs(direct)
            with open(img, "rb") as f:
                return rc, f.read(4096)
        finally:
            os.close(buffered)
            os.close(direct)

    assert await run(io) == ([0], b"A" * 4096)


async def test_writeback_error_reaches_direct_opens_fsync(mounted):
    """errseq covers every open of the device: the O_DIRECT open's fsync reports the
    failed writeback of another open's buffer, and each open is told once (case B)."""
    m, mnt, img = mounted
    await make_error(m, "err")

    def io():
        buffered = os.open(mnt + "/err", os.O_RDWR)
        direct = os.open(mnt + "/err", os.O_RDWR | os.O_DIRECT)
        try:
            os.pwrite(buffered, b"x" * 4096, 0)
            return _fsyncs(direct, buffered, direct, buffered)
        finally:
            os.close(buffered)
            os.close(direct)

    assert await run(io) == [errno.EIO, errno.EIO, 0, 0]


@pytest.mark.parametrize("reopen_flags", [0, os.O_DIRECT])
async def test_writeback_error_of_the_last_close_is_told_to_the_next_opener(mounted, reopen_flags):
    """The bdev keeps its errseq past the last close: the writeback that close makes
    fails, and the next open's first fsync reports it (buffered or O_DIRECT: cases C, D);
    once an fsync has reported an error, a later open is not told it (case E)."""
    m, mnt, img = mounted
    await make_error(m, "err")

    def io():
        fd = os.open(mnt + "/err", os.O_RDWR)
        os.pwrite(fd, b"x" * 4096, 0)
        os.close(fd)                    # (close reports nothing)
        fd = os.open(mnt + "/err", os.O_RDWR | reopen_flags)
        try:
            told = _fsyncs(fd, fd)
        finally:
            os.close(fd)
        fd = os.open(mnt + "/err", os.O_RDWR)
        try:
            os.pwrite(fd, b"y" * 4096, 0)
            first = _fsyncs(fd)
            later = os.open(mnt + "/err", os.O_RDWR | reopen_flags)
            try:
                return told, first + _fsyncs(later)
            finally:
                os.close(later)
        finally:
            os.close(fd)

    assert await run(io) == ([errno.EIO, 0], [errno.EIO, 0])


async def test_flushing_suspend_writes_back_buffered_data(mounted):
    """Suspend's lock_fs writes back dirty buffers (no fsync needed); noflush does not."""
    m, mnt, img = mounted
    await make_linear(m, "lin", img, 2048)
    fd = await run(os.open, mnt + "/lin", os.O_RDWR)
    try:
        await run(os.pwrite, fd, b"N" * 4096, 0)
        await m.suspend("lin", noflush=True)
        with open(img, "rb") as f:
            assert f.read(4096) == bytes(4096)       # still only in the buffer cache
        await m.resume("lin")
        await run(os.pwrite, fd, b"S" * 4096, 4096)
        await m.suspend("lin")
        with open(img, "rb") as f:
            assert f.read(8192) == b"N" * 4096 + b"S" * 4096
        await m.resume("lin")
        # the buffered fd still reads its data, and sees a bigger table's size at once
        assert await run(os.pread, fd, 4, 4094) == b"NNSS"
        await m.load("lin", [TableLine(0, 4096, "linear", "%s 0" % img)])
        await m.resume("lin")
        assert (await run(os.fstat, fd)).st_size == 2 * MiB
    finally:
        await run(os.close, fd)


async def test_direct_read_sees_buffered_write(mounted):
    """An O_DIRECT read writes the buffer cache's range back first, as the kernel's does."""
    m, mnt, img = mounted
    await make_linear(m, "lin", img, 2048)
    fd = await run(os.open, mnt + "/lin", os.O_RDWR)
    dfd = await run(os.open, mnt + "/lin", os.O_RDONLY | os.O_DIRECT)
    try:
        await run(os.pwrite, fd, b"D" * 512, 512)    # partial buffer: read, then dirty
        buf = _aligned(bytes(4096))
        assert await run(os.preadv, dfd, [buf], 0) == 4096
        assert bytes(buf) == bytes(512) + b"D" * 512 + bytes(3072)
        with open(img, "rb") as f:
            assert f.read(1024) == bytes(512) + b"D" * 512
    finally:
        await run(os.close, dfd)
        await run(os.close, fd)


# -- the edge: last-resort handler, sizes and names FUSE cannot show, permissions ---------------

def test_every_operation_has_the_last_resort_handler():
    from dmsim.fuse import OPERATIONS, DeviceFS

    defined = [n for n in OPERATIONS if n in vars(DeviceFS)]
    assert {"lookup", "getattr", "readdir", "open", "read", "write", "fsync", "release", "create"} <= set(defined)
    assert all(getattr(DeviceFS, n).last_resort for n in defined)


async def test_a_bug_in_an_operation_fails_that_request_only(mounted, monkeypatch, caplog):
    """An unexpected exception in open is that open's EIO, with the traceback in the log;
    the mount goes on serving (before, pyfuse3.main died and left a dead mount)."""
    m, mnt, img = mounted
    await make_linear(m, "lin", img, 8)

    def broken(name):
        raise RuntimeError("bug in open")

    monkeypatch.setattr(m, "open", broken)
    with pytest.raises(OSError) as e:
        await run(os.open, mnt + "/lin", os.O_RDONLY)
    assert e.value.errno == errno.EIO
    assert "FUSE open failed" in caplog.text and "RuntimeError: bug in open" in caplog.text
    monkeypatch.undo()
    assert await run(os.listdir, mnt) == ["lin"]
    fd = await run(os.open, mnt + "/lin", os.O_RDONLY)
    try:
        assert await run(os.pread, fd, 512, 0) == bytes(512)
    finally:
        await run(os.close, fd)


async def test_huge_device_and_unlistable_names_never_break_ls(mounted, monkeypatch):
    """A size past what st_size holds is clamped; names no directory entry can carry (a lone
    surrogate, NUL) are left out of the listing instead of ending the session."""
    from dmsim.fuse import MAX_FILE_BYTES
    from dmsim.table import Table

    m, mnt, img = mounted
    for name in ("big", "bad1", "bad2", "ok"):
        m.create(name)
        await m.load(name, [TableLine(0, 8, "zero")])
        await m.resume(name)
    monkeypatch.setattr(Table, "size_sectors", property(lambda self: 1 << 60))
    m.devices["\ud800x"] = m.devices.pop("bad1")
    m.devices["a\x00b"] = m.devices.pop("bad2")
    try:
        assert sorted(await run(os.listdir, mnt)) == ["big", "ok"]
        assert (await run(os.stat, mnt + "/big")).st_size == MAX_FILE_BYTES
        await run(os.statvfs, mnt)
    finally:
        m.devices["bad1"] = m.devices.pop("\ud800x")
        m.devices["bad2"] = m.devices.pop("a\x00b")
        monkeypatch.undo()
    assert sorted(await run(os.listdir, mnt)) == ["bad1", "bad2", "big", "ok"]


async def test_files_are_root_disk_0660_and_names_cannot_be_made(mounted):
    """As /dev/dm-N: 0660, the daemon's user (root), group disk; a read-only table drops the
    write bits.  O_CREAT of a missing name, mkdir, unlink: EACCES (not ENOSYS)."""
    from dmsim.fuse import disk_gid

    m, mnt, img = mounted
    await make_linear(m, "lin", img, 8)
    m.create("ro")
    await m.load("ro", [TableLine(0, 8, "zero")], read_only=True)
    await m.resume("ro")
    st = await run(os.stat, mnt + "/lin")
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o660, os.getuid(),
                                                           disk_gid() if os.getuid() == 0 else os.getgid())
    assert (await run(os.stat, mnt + "/ro")).st_mode & 0o7777 == 0o440

    def attempts():
        out = []
        for fn in (lambda: os.open(mnt + "/new", os.O_CREAT | os.O_WRONLY, 0o600),
                   lambda: os.mkdir(mnt + "/d"), lambda: os.unlink(mnt + "/lin"),
                   lambda: os.rename(mnt + "/lin", mnt + "/lin2"), lambda: os.symlink("x", mnt + "/s")):
            try:
                fn()
                out.append(0)
            except OSError as e:
                out.append(e.errno)
        return out

    assert await run(attempts) == [errno.EACCES] * 5
    assert sorted(await run(os.listdir, mnt)) == ["lin", "ro"]


async def test_owner_group_mode_are_configurable(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    async with dmsim.open_manager(mount_dir=str(mnt)) as m:
        fs = Mount(m, str(mnt), uid=54321, gid=54322, mode=0o640)
        assert "default_permissions" in fs.opts
        fs.mount()
        try:
            async with trio.open_nursery() as n:
                n.start_soon(fs.run)
                m.create("z")
                st = await run(os.stat, str(mnt / "z"))
                assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o640, 54321, 54322)
                n.cancel_scope.cancel()
        finally:
            fs.unmount()


# -- request flags (issue 13 item 5) ---------------------------------------------------------
REQ_SYNC, REQ_IDLE, REQ_FUA, REQ_BACKGROUND = 0x800, 0x8000, 0x20000, 0x100000
O_SYNC_ONLY = os.O_SYNC & ~os.O_DSYNC

#: what 6.1 did, recorded on the oracle (flakey down, corrupt_bio_byte 1 w 85 MASK, a
#: static helper writing 4 KiB): which write methods got their first byte corrupted
#: (tests/fixtures/oracle-write-flags has the helper, the scenario and its output)
KERNEL_CORRUPTED = {
    0: {"close", "fsync", "fdatasync", "dsync", "sync", "direct", "direct-dsync",
        "direct-sync", "direct-fsync"},
    REQ_SYNC: {"close", "fsync", "fdatasync", "dsync", "sync", "direct", "direct-dsync",
               "direct-sync", "direct-fsync"},
    REQ_IDLE: {"direct", "direct-dsync", "direct-sync", "direct-fsync"},
    REQ_FUA: {"direct-dsync", "direct-sync"},
    REQ_BACKGROUND: set(),
}
METHODS = {   # name: (open flags, call after the write)
    "close": (0, None), "fsync": (0, os.fsync), "fdatasync": (0, os.fdatasync),
    "dsync": (os.O_DSYNC, None), "sync": (os.O_SYNC, None),
    "direct": (os.O_DIRECT, None), "direct-dsync": (os.O_DIRECT | os.O_DSYNC, None),
    "direct-sync": (os.O_DIRECT | os.O_SYNC, None), "direct-fsync": (os.O_DIRECT, os.fsync),
}


async def test_write_flags_are_the_kernels(mounted):
    """Each way of writing gives the bio the flags 6.1's block device gives it, so a
    flakey flags mask corrupts exactly the writes it corrupts on the kernel."""
    import mmap
    m, mnt, img = mounted
    assert O_SYNC_ONLY   # O_SYNC is O_DSYNC plus __O_SYNC on Linux
    buf = mmap.mmap(-1, 4096)          # page-aligned, for O_DIRECT
    buf.write(b"\xaa" * 4096)
    got = {}
    block = 0
    for mask in KERNEL_CORRUPTED:
        m.create("f")
        await m.load("f", [TableLine(0, 8192, "flakey", "%s 0 0 1 5 corrupt_bio_byte 1 w 85 %d"
                                     % (img, mask))])
        await m.resume("f")
        for name, (flags, after) in METHODS.items():
            def write(flags=flags, after=after, block=block):
                fd = os.open(mnt + "/f", os.O_WRONLY | flags)
                try:
                    os.pwrite(fd, buf, block * 4096)
                    if after is not None:
                        after(fd)
                finally:
                    os.close(fd)
            await run(write)
            with open(img, "rb") as f:
                f.seek(block * 4096)
                first = f.read(1)
            if first == b"\x55":
                got.setdefault(mask, set()).add(name)
            else:
                assert first == b"\xaa", (mask, name, first)
            block += 1
        await wait_closed(m, "f")
        await m.remove("f")
    assert {mask: got.get(mask, set()) for mask in KERNEL_CORRUPTED} == KERNEL_CORRUPTED


async def wait_closed(m, name):
    """FUSE release is asynchronous: wait for the opens to go."""
    with trio.fail_after(10):
        while m.info(name).open_count:
            await trio.sleep(0.01)


async def test_writeback_past_the_dirty_limit_is_background(mounted, monkeypatch):
    """balance_dirty_pages' writeback is the flusher's (REQ_BACKGROUND, no REQ_SYNC)."""
    import dmsim.fuse
    from dmsim.bio import REQ_BACKGROUND as BACKGROUND
    from dmsim.bio import REQ_SYNC as SYNC
    monkeypatch.setattr(dmsim.fuse, "DIRTY_LIMIT_BYTES", 8192)
    m, mnt, img = mounted
    await make_linear(m, "lin", img, 2048)
    seen = []
    lower = m.find("lin").live.targets[0].dev
    real_submit = lower.submit

    async def spy(bio):
        if bio.op.is_write and bio.sectors:
            seen.append(bio.flags)
        return await real_submit(bio)

    monkeypatch.setattr(lower, "submit", spy)

    def io():
        fd = os.open(mnt + "/lin", os.O_WRONLY)
        try:
            os.pwrite(fd, b"x" * 4096 * 3, 0)     # over the limit: background writeback
            os.pwrite(fd, b"y" * 4096, 65536)
            os.fsync(fd)                           # data integrity writeback
        finally:
            os.close(fd)

    await run(io)
    assert seen == [BACKGROUND] * 3 + [SYNC]


@pytest.mark.invalidate_kernel_cache
# -- cache coherence: writes by other paths -------------------------------------------------
async def test_foreign_writes_invalidate_a_buffered_open(mounted_fs):
    """A buffered open must not keep serving old data after a write that reached the
    device by another path: the in-process API (NBD's path: MappedDevice.submit), a
    device stacked on it, and an O_DIRECT open of the same file."""
    m, mnt, img, fs = mounted_fs
    await make_linear(m, "L", img, 2048)
    m.create("top")
    await m.load("top", [TableLine(0, 2048, "linear", "/dev/mapper/L 0")])
    await m.resume("top")
    fd = await run(os.open, mnt + "/L", os.O_RDWR)
    try:
        await run(os.pwrite, fd, b"A" * 4096, 0)
        await run(os.fsync, fd)
        assert await run(os.pread, fd, 4096, 0) == b"A" * 4096      # cached (kernel and ours)
        before = fs.ops.invalidations

        await m.find("L").write(0, b"B" * 4096)                       # in-process / NBD
        await fs.ops.invalidations_done()
        assert await run(os.pread, fd, 4096, 0) == b"B" * 4096
        assert fs.ops.invalidations > before

        await m.find("top").write(0, b"C" * 4096)                     # stacked device
        await fs.ops.invalidations_done()
        assert await run(os.pread, fd, 4096, 0) == b"C" * 4096

        def direct_write():
            import mmap
            buf = mmap.mmap(-1, 4096)
            buf.write(b"D" * 4096)
            dfd = os.open(mnt + "/L", os.O_WRONLY | os.O_DIRECT)
            try:
                os.pwrite(dfd, buf, 0)
            finally:
                os.close(dfd)
        await run(direct_write)
        await fs.ops.invalidations_done()
        assert await run(os.pread, fd, 4096, 0) == b"D" * 4096

        # our own buffered writes and their writeback invalidate nothing
        count = fs.ops.invalidations
        await run(os.pwrite, fd, b"E" * 4096, 8192)
        await run(os.fsync, fd)
        await fs.ops.invalidations_done()
        assert fs.ops.invalidations == count
        assert await run(os.pread, fd, 4096, 8192) == b"E" * 4096
    finally:
        await run(os.close, fd)
    with trio.fail_after(10):                                          # unwatched at last close
        while m.find("L").write_observer is not None:
            await trio.sleep(0.01)


@pytest.mark.invalidate_kernel_cache
async def test_qemu_io_over_nbd_invalidates_a_buffered_open(mounted_fs, tmp_path):
    """The NBD engineer's reproducer: a buffered open, a write through qemu-io over NBD,
    then a read through the open fd sees the new data."""
    import shutil
    import subprocess
    if shutil.which("qemu-io") is None:
        pytest.skip("no qemu-io")
    from dmsim import nbd
    m, mnt, img, fs = mounted_fs
    await make_linear(m, "L", img, 2048)
    sock = str(tmp_path / "nbd.sock")
    async with trio.open_nursery() as n:
        await n.start(nbd.serve_nbd, m, "unix:" + sock)
        fd = await run(os.open, mnt + "/L", os.O_RDWR)
        try:
            await run(os.pwrite, fd, b"\x11" * 4096, 0)
            await run(os.fsync, fd)
            assert await run(os.pread, fd, 4096, 0) == b"\x11" * 4096
            with trio.fail_after(30):
                await trio.run_process(["qemu-io", "-f", "raw", "nbd+unix:///L?socket=%s" % sock,
                                        "-c", "write -P 0xff 0 4k"], stdout=subprocess.DEVNULL)
            await fs.ops.invalidations_done()
            assert await run(os.pread, fd, 4096, 0) == b"\xff" * 4096
        finally:
            await run(os.close, fd)
        n.cancel_scope.cancel()


@pytest.mark.invalidate_kernel_cache
async def test_snapshot_merge_into_a_device_with_a_buffered_open(mounted_fs, tmp_path):
    """kcopyd's merge writes into the origin's device L: a buffered open of L then reads
    the merged data, not what it had cached."""
    from dmsim.snapshots import merge_snapshot
    m, mnt, img, fs = mounted_fs
    await make_linear(m, "L", img, 2048)
    cow = tmp_path / "cow.img"
    with open(cow, "wb") as f:
        f.truncate(MiB)
    for name, kind, params in [("snap", "snapshot", "/dev/mapper/L %s P 8" % cow),
                               ("snap-origin", "snapshot-origin", "/dev/mapper/L")]:
        m.create(name)
        await m.load(name, [TableLine(0, 2048, kind, params)])
        await m.resume(name)
    fd = await run(os.open, mnt + "/L", os.O_RDWR)
    try:
        await run(os.pwrite, fd, b"A" * 4096, 0)       # through L itself: under the origin
        await run(os.fsync, fd)
        assert await run(os.pread, fd, 4096, 0) == b"A" * 4096
        await m.find("snap").write(0, b"S" * 4096)       # the snapshot's own view
        await merge_snapshot(m, "snap")
        await fs.ops.invalidations_done()
        assert await run(os.pread, fd, 4096, 0) == b"S" * 4096
    finally:
        await run(os.close, fd)


# -- model: the buffer cache against a plain reference ------------------------------------------


class FakeDevice:
    """A device in memory that calls its write observer after each write, as
    MappedDevice.submit does; it records the writes (sector, sectors, flags)."""

    logical_block_size = 512

    def __init__(self, size_bytes: int):
        self.buf = bytearray(size_bytes)
        self.size_sectors = size_bytes // 512
        self.write_observer = None
        self.writes: list[tuple[int, int, int]] = []
        #: (k, "fail" | "cancel", cancel scope): from the k-th write on (counted from the
        #: last clear of ``writes``) fail with EIO, or cancel the scope before the k-th lands
        self.plan = None

    async def submit(self, bio):
        lo, hi = bio.sector * 512, bio.end_sector * 512
        if bio.op is Op.READ:
            return bytes(self.buf[lo:hi])
        if self.plan is not None and len(self.writes) >= self.plan[0]:
            if self.plan[1] == "fail":
                raise dmsim.DMError(errno.EIO)
            self.plan[2].cancel()
            await trio.lowlevel.checkpoint()
        self.buf[lo:hi] = bio.data
        self.writes.append((bio.sector, bio.sectors, bio.flags))
        if self.write_observer is not None:
            self.write_observer(bio)

    async def read(self, sector, sectors):
        return bytes(self.buf[sector * 512:(sector + sectors) * 512])

    async def pread(self, off, n):
        return bytes(self.buf[off:off + n])


class BufferCacheMachine(RuleBasedStateMachine):
    """BufferCache (with its write observer hooked up) against a reference: the disk's
    bytes plus the dirty buffers laid over them.  Invariant: every clean buffer is what
    the disk holds (a foreign write never leaves one stale), every dirty one is the
    reference's; writeback sends one bio per dirty buffer in order, with its flags."""

    @initialize(size_sectors=st.sampled_from([128, 130, 129]), limit_buffers=st.sampled_from([3, 1000]))
    def setup(self, size_sectors, limit_buffers):
        self.dev = FakeDevice(size_sectors * 512)
        self.cache = dmfuse.BufferCache(self.dev)
        self.dev.write_observer = self.cache.device_written
        self.bs = self.cache.block_bytes
        assert self.bs == {128: 4096, 130: 1024, 129: 512}[size_sectors]
        self.size = size_sectors * 512
        self.limit = limit_buffers * self.bs
        self.disk = bytearray(self.size)
        self.dirty: dict[int, bytearray] = {}
        self.fhs = (1, 2)                       # two opens of the device
        for fh in self.fhs:
            self.cache.errors.open_fh(fh)
        self.pending: dict[int, int] = {}       # fh -> the error its next fsync reports
        self.unseen: int | None = None          # the last error, until an fsync reported it

    def _run(self, fn, *args):
        saved = dmfuse.DIRTY_LIMIT_BYTES
        dmfuse.DIRTY_LIMIT_BYTES = self.limit
        try:
            return trio.run(fn, *args)
        finally:
            dmfuse.DIRTY_LIMIT_BYTES = saved

    def _write_back(self, first, end, flags):
        todo = sorted(i for i in self.dirty if (i + 1) * self.bs > first and (end is None or i * self.bs < end))
        for i in todo:
            self.disk[i * self.bs:(i + 1) * self.bs] = self.dirty.pop(i)
        return [(i * self.bs // 512, self.bs // 512, flags) for i in todo]

    @rule(data=st.data(), byte=st.integers(0, 255))
    def buffered_write(self, data, byte):
        off = data.draw(st.integers(0, self.size - 1))
        n = data.draw(st.integers(1, min(3 * self.bs, self.size - off)))
        self.dev.writes.clear()
        self._run(self.cache.write, off, bytes([byte]) * n)
        for pos in range(off, off + n):
            i = pos // self.bs
            if i not in self.dirty:
                self.dirty[i] = bytearray(self.disk[i * self.bs:(i + 1) * self.bs])
            self.dirty[i][pos % self.bs] = byte
        want = []
        if len(self.dirty) * self.bs > self.limit:
            want = self._write_back(0, None, BACKGROUND_WRITEBACK_FLAGS)
        assert self.dev.writes == want

    @rule(data=st.data())
    def buffered_read(self, data):
        off = data.draw(st.integers(0, self.size - 1))
        n = data.draw(st.integers(1, self.size - off))
        view = bytearray(self.disk)
        for i, b in self.dirty.items():
            view[i * self.bs:(i + 1) * self.bs] = b
        assert self._run(self.cache.read, off, n) == bytes(view[off:off + n])

    @rule(data=st.data(), byte=st.integers(0, 255))
    def foreign_write(self, data, byte):
        """NBD, the API, a stacked device, kcopyd: a write bio straight to the device."""
        sector = data.draw(st.integers(0, self.size // 512 - 1))
        sectors = data.draw(st.integers(1, min(24, self.size // 512 - sector)))
        payload = bytes([byte]) * (sectors * 512)
        self._run(self.dev.submit, Bio(Op.WRITE, sector, sectors, payload))
        self.disk[sector * 512:(sector + sectors) * 512] = payload

    @rule(data=st.data())
    def writeback(self, data):
        """fsync / last close / suspend (all of it) or before an O_DIRECT request (a range)."""
        if data.draw(st.booleans()):
            first, end = 0, None
        else:
            first = data.draw(st.integers(0, self.size - 1))
            end = data.draw(st.integers(first + 1, self.size))
        self.dev.writes.clear()
        self._run(self.cache.writeback, first, end)
        assert self.dev.writes == self._write_back(first, end, SYNC_WRITEBACK_FLAGS)

    @rule(data=st.data(), how=st.sampled_from(["fail", "cancel"]))
    def writeback_fails_or_is_cancelled(self, data, how):
        """From the k-th bio on the writeback fails (EIO: those buffers are gone, and every
        open's next fsync reports it) or is cancelled before the k-th lands (a suspend whose
        caller went: that buffer and the rest stay dirty, none is lost)."""
        todo = sorted(self.dirty)
        k = data.draw(st.integers(0, len(todo)))

        async def go():
            with trio.CancelScope() as scope:
                self.dev.plan = (k, how, scope)
                await self.cache.writeback()

        self.dev.writes.clear()
        try:
            self._run(go)
        finally:
            self.dev.plan = None
        assert self.dev.writes == self._write_back_only(todo[:k])
        if how == "fail":
            for i in todo[k:]:
                del self.dirty[i]
            if todo[k:]:
                self.pending = dict.fromkeys(self.fhs, errno.EIO)
                self.unseen = errno.EIO

    def _write_back_only(self, indexes):
        for i in indexes:
            self.disk[i * self.bs:(i + 1) * self.bs] = self.dirty.pop(i)
        return [(i * self.bs // 512, self.bs // 512, SYNC_WRITEBACK_FLAGS) for i in indexes]

    @rule(fh=st.sampled_from([1, 2]))
    def fsync_reports_errors_once_per_open(self, fh):
        got = self.cache.errors.check(fh)
        assert got == self.pending.pop(fh, None)
        if got is not None:
            self.unseen = None

    @rule(fh=st.sampled_from([1, 2]))
    def close_and_open_again(self, fh):
        """An open goes and the device is opened again (buffered or O_DIRECT: errseq is
        the device's): the new open is told an error no fsync has reported yet."""
        self.cache.errors.close_fh(fh)
        self.cache.errors.open_fh(fh)
        self.pending.pop(fh, None)
        if self.unseen is not None:
            self.pending[fh] = self.unseen

    @invariant()
    def buffers_match_the_reference(self):
        if not hasattr(self, "cache"):
            return
        assert set(self.cache.dirty) == set(self.dirty)
        for i, b in self.cache.dirty.items():
            assert b == self.dirty[i], i
        for i, b in self.cache.clean.items():
            assert i not in self.cache.dirty
            assert b == self.disk[i * self.bs:(i + 1) * self.bs], "stale clean buffer %d" % i


BufferCacheMachine.TestCase.settings = settings(
    max_examples=60 * int(os.environ.get("DMSIM_MODEL_EXAMPLES", "1")), stateful_step_count=30,
    deadline=None, suppress_health_check=[HealthCheck.too_slow])
test_buffer_cache_model = BufferCacheMachine.TestCase


async def test_page_cache_mode_invalidates_only_for_foreign_writes(tmp_path):
    """--page-cache (every open through the kernel's page cache, written through): the
    file's own writes keep the pages, a write by another path drops them."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    img = tmp_path / "a.img"
    with open(img, "wb") as f:
        f.truncate(MiB)
    async with dmsim.open_manager(mount_dir=str(mnt)) as m:
        fs = Mount(m, str(mnt), direct_io=False, invalidate_kernel_cache=True)
        fs.mount()
        try:
            async with trio.open_nursery() as n:
                n.start_soon(fs.run)
                await make_linear(m, "L", str(img), 2048)
                fd = await run(os.open, str(mnt / "L"), os.O_RDWR)
                try:
                    await run(os.pwrite, fd, b"A" * 4096, 0)
                    await run(os.pwrite, fd, b"xyz", 5000)      # unaligned
                    await fs.ops.invalidations_done()
                    assert fs.ops.invalidations == 0
                    assert await run(os.pread, fd, 4096, 4096) == bytes(904) + b"xyz" + bytes(3189)
                    await m.find("L").write(0, b"B" * 4096)
                    await fs.ops.invalidations_done()
                    assert fs.ops.invalidations == 1
                    assert await run(os.pread, fd, 4096, 0) == b"B" * 4096
                finally:
                    await run(os.close, fd)
                n.cancel_scope.cancel()
        finally:
            fs.unmount()


# -- issue 11: an fsync acknowledged while a cancelled suspend's writeback lost a buffer -------


async def _slow_origin(m, img, write_delay_ms=0):
    """``orig`` (linear) over ``slow`` (delay: writes take ``write_delay_ms``), 4096 sectors;
    a suspend of ``orig`` does not presuspend ``slow``, so its writebacks stay slow."""
    m.create("slow")
    await m.load("slow", [TableLine(0, 4096, "delay", "%s 0 0 %s 0 %d" % (img, img, write_delay_ms))])
    await m.resume("slow")
    m.create("orig")
    await m.load("orig", [TableLine(0, 4096, "linear", "%s 0" % m.devices["slow"].mm)])
    await m.resume("orig")


async def _buffered_open(ops, name):
    ino = (await ops.lookup(pyfuse3.ROOT_INODE, name.encode())).st_ino
    return (await ops.open(ino, os.O_RDWR, None)).fh


async def test_fsync_after_cancelled_flushing_suspend_has_every_buffer_on_disk(tmp_path, autojump_clock):
    """Soak seed 70 chain 8385 in process: a flushing suspend's lock_fs is writing back a
    buffered write (first buffer partial) when its caller goes (SIGTERM cancels the control
    server; a client's hangup does the same); the fsync queued behind it must still put
    every byte on the disk before it says yes.  The cancelled writeback dropped the buffer
    it had in flight: neither dirty nor written, so the fsync wrote the others and returned 0."""
    img = tmp_path / "o.img"
    img.write_bytes(b"o" * (2 * MiB))
    async with dmsim.open_manager() as m:
        ops = dmfuse.DeviceFS(m)
        await _slow_origin(m, str(img), write_delay_ms=50)
        fh = await _buffered_open(ops, "orig")
        await ops.write(fh, 1462 * 512, b"A" * (43 * 512))     # buffers 182 (partial) .. 188
        result = []
        async with trio.open_nursery() as n:
            suspend_scope = trio.CancelScope()

            async def suspend():
                with suspend_scope:
                    await m.suspend("orig")

            async def fsync():
                try:
                    await ops.fsync(fh, False)
                    result.append(0)
                except pyfuse3.FUSEError as e:
                    result.append(e.errno)

            n.start_soon(suspend)
            await trio.testing.wait_all_tasks_blocked()   # lock_fs: buffer 182 in the delay
            assert ops.caches[m.devices["orig"]].writing is not None
            n.start_soon(fsync)
            await trio.testing.wait_all_tasks_blocked()   # fsync waits for the cache lock
            suspend_scope.cancel()
        assert not m.devices["orig"].suspended
        assert result == [0]
        data = img.read_bytes()
        assert data[1462 * 512:1505 * 512] == b"A" * (43 * 512)
        assert data[1456 * 512:1462 * 512] == b"o" * (6 * 512)
        await ops.release(fh)
