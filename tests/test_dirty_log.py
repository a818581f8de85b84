"""Dirty region logs (dm-log.c): argument checks with the kernel's warnings, the three
bitsets, and the disk log's on-disk format and flush rules, checked against a log image
written by the real 6.1 kernel (tests/fixtures/mirror-disklog-kernel.img.gz).

The fixture was recorded with shared/oracle/kernel-dm: a 40000-sector mirror, region
1024 (40 regions), ``disk 2 /dev/vdd 1024``, legs ``/dev/vda`` and a device whose
sectors from 20480 on are an ``error`` target, ``1 handle_errors``; after the resync
settled at ``20/40 1 AS`` the mirror was removed.  Its first 4 KiB are stored (the rest
of the 1 MiB device was zero).  The same scenario on dmsim wrote the same bytes, and the
kernel, given a dmsim-written log with regions 0-19 clean, resynced only regions 20-39.
"""
import errno
import gzip
import os

import pytest

from dmsim.bio import Op
from dmsim.blockdev import MemoryDevice
from dmsim.dirty_log import MIRROR_MAGIC, CoreLog, DirtyLogError, DiskLog, create_dirty_log, parse_disk_log
from dmsim.errors import DMError

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "mirror-disklog-kernel.img.gz")


class Ctx:
    """The bits of a TargetContext a log uses."""

    def __init__(self, devices=None):
        self.lines = []
        self.events = 0
        self.devices = devices or {}

    def log(self, msg):
        self.lines.append("device-mapper: " + msg)

    def event(self):
        self.events += 1

    def get_device(self, name, write=True):
        if name not in self.devices:
            raise DMError(errno.ENODEV)
        return self.devices[name]


class CountingDevice(MemoryDevice):
    """A memory device that records the operations it receives and can fail them."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.ops = []
        self.fail_ops = set()

    async def submit(self, bio):
        self.ops.append(bio.op)
        if bio.op in self.fail_ops:
            raise DMError(errno.EIO)
        return await super().submit(bio)


def kernel_image() -> bytes:
    with gzip.open(FIXTURE) as f:
        return f.read()


@pytest.mark.parametrize("args, warning", [
    ([], "wrong number of arguments to dirty region log"),
    (["1024", "sync", "x"], "wrong number of arguments to dirty region log"),
    (["1000"], "invalid region size 1000"),
    (["1"], "invalid region size 1"),
    (["x"], "invalid region size x"),
    (["262144"], "invalid region size 262144"),
    (["1024", "block_on_error"], "unrecognised sync argument to dirty region log: block_on_error"),
])
def test_core_ctr_errors(args, warning):
    ctx = Ctx()
    with pytest.raises(DirtyLogError):
        create_dirty_log("core", ctx, 131072, args)
    assert ctx.lines == ["device-mapper: dirty region log: " + warning]


def test_unknown_type_and_disk_arg_count():
    ctx = Ctx()
    with pytest.raises(DirtyLogError):
        create_dirty_log("foo", ctx, 131072, ["1024"])
    with pytest.raises(DirtyLogError):
        create_dirty_log("disk", ctx, 131072, ["1024"])
    assert ctx.lines == ['device-mapper: dirty region log: Module for logging type "foo" not found.',
                         "device-mapper: dirty region log: wrong number of arguments to disk dirty region log"]


def test_disk_log_too_small():
    ctx = Ctx({"L": MemoryDevice(2, name="L")})
    with pytest.raises(DirtyLogError):
        create_dirty_log("disk", ctx, 131072, ["L", "1024"])
    assert ctx.lines == ["device-mapper: dirty region log: log device mem:L too small: need 1536 bytes"]


def test_core_bitsets_and_resync_cursor():
    log = CoreLog(Ctx(), 1000, ["256"])
    assert (log.region_count, log.get_sync_count()) == (4, 0)
    assert log.status("table") == "core 1 256 " and log.status("info") == "1 core"
    assert [log.get_resync_work() for _ in range(5)] == [0, 1, 2, 3, None]
    log.set_region_sync(1, True)
    log.set_region_sync(0, False)     # failed recovery of an out-of-sync region: no change
    assert log.get_sync_count() == 1 and log.in_sync(1) and not log.in_sync(0)
    log.set_region_sync(1, False)
    assert log.get_sync_count() == 0
    # the cursor only goes back at resume
    assert log.get_resync_work() is None


async def test_core_resume_resets_cursor():
    log = CoreLog(Ctx(), 1000, ["256", "nosync"])
    assert log.get_sync_count() == 4 and log.status("table") == "core 2 256 nosync "
    assert log.get_resync_work() is None
    log.set_region_sync(2, False)
    assert log.get_resync_work() is None
    await log.resume()
    assert log.get_resync_work() == 2


def test_mark_and_clear_touch_the_clean_bits():
    log = CoreLog(Ctx(), 4096, ["1024"])
    assert all(log.is_clean(r) for r in range(4))
    log.mark_region(2)
    assert not log.is_clean(2) and log.touched_dirtied
    log.clear_region(2)
    assert log.is_clean(2) and log.touched_cleaned
    log.flush_failed = True
    log.mark_region(3)
    log.clear_region(3)        # ignored after a leg-flush failure
    assert not log.is_clean(3)


async def test_disk_log_new_log_format():
    """A fresh (zeroed) log device after a full sync: the layout the kernel writes."""
    dev = MemoryDevice(2048, name="L")
    ctx = Ctx({"L": dev})
    log = create_dirty_log("disk", ctx, 131072, ["L", "1024"])
    assert log.buf_size == 1536
    assert await log.resume() == 0
    assert log.get_sync_count() == 0
    for r in range(128):
        log.set_region_sync(r, True)
        log.clear_region(r)
    assert await log.flush() == 0
    img = bytes(dev.buf)
    assert img[:16] == bytes.fromhex("7252694d020000008000000000000000")
    assert img[16:1024] == bytes(1008)
    assert img[1024:1040] == b"\xff" * 16
    assert img[1040:] == bytes(len(img) - 1040)
    assert log.status("info") == "3 disk mem:L A" and log.status("table") == "disk 2 mem:L 1024 "


async def test_disk_log_reads_kernel_made_log():
    image = kernel_image()
    assert parse_disk_log(image) == {"magic": MIRROR_MAGIC, "version": 2, "nr_regions": 40,
                                     "clean": list(range(20))}
    dev = MemoryDevice(8, image, name="L")
    log = DiskLog(Ctx({"L": dev}), 40000, ["L", "1024"])
    await log.resume()
    assert log.get_sync_count() == 20
    assert [r for r in range(40) if log.in_sync(r)] == list(range(20))
    assert log.get_resync_work() == 20
    # resume writes the buffer back: unchanged bytes for an unchanged state
    assert bytes(dev.buf) == image


async def test_disk_log_writes_what_the_kernel_wrote():
    """The dmsim side of the fixture's scenario: same state, same bytes."""
    dev = MemoryDevice(8, name="L")
    log = DiskLog(Ctx({"L": dev}), 40000, ["L", "1024"])
    await log.resume()
    for r in range(40):
        assert log.get_resync_work() == r
        ok = r < 20
        if ok:
            log.clear_region(r)
        log.set_region_sync(r, ok)
    await log.postsuspend()
    assert bytes(dev.buf) == kernel_image()


@pytest.mark.parametrize("word, expect_sync", [("sync", 0), ("nosync", 40), ("", 20)])
async def test_disk_log_sync_words_override_the_disk(word, expect_sync):
    dev = MemoryDevice(8, kernel_image(), name="L")
    args = ["L", "1024"] + ([word] if word else [])
    log = DiskLog(Ctx({"L": dev}), 40000, args)
    await log.resume()
    assert log.get_sync_count() == expect_sync
    assert parse_disk_log(bytes(dev.buf))["clean"] == [r for r in range(40) if log.is_clean(r)]


async def test_disk_log_grows_and_keeps_bytes_16_to_1023():
    image = bytearray(kernel_image())
    image[100] = 0x5A                     # not part of the header: written back as read
    dev = MemoryDevice(8, bytes(image), name="L")
    log = DiskLog(Ctx({"L": dev}), 50000, ["L", "1024"])   # 49 regions now
    await log.resume()
    assert log.get_sync_count() == 20
    hdr = parse_disk_log(bytes(dev.buf))
    assert hdr["nr_regions"] == 49 and hdr["clean"] == list(range(20))
    assert dev.buf[100] == 0x5A


async def test_disk_log_flush_rules():
    dev = CountingDevice(8, name="L")
    flushes = []

    async def flush_legs():
        flushes.append(1)
        return False

    log = DiskLog(Ctx({"L": dev}), 40000, ["L", "1024", "nosync"], flush_legs)
    await log.resume()
    assert dev.ops == [Op.READ, Op.WRITE, Op.FLUSH]
    # resume set bits without resetting the touched flags (as the kernel): one more write
    await log.flush()
    dev.ops.clear()
    flushes.clear()
    assert await log.flush() == 0 and dev.ops == []          # untouched: no I/O
    log.mark_region(3)                                       # dirtied: write + log flush
    await log.flush()
    assert dev.ops == [Op.WRITE, Op.FLUSH] and flushes == []
    dev.ops.clear()
    log.clear_region(3)                                      # cleaned: legs flush first
    await log.flush()
    assert dev.ops == [Op.WRITE] and flushes == [1]


async def test_disk_log_failures():
    dev = CountingDevice(8, name="L")
    ctx = Ctx({"L": dev})

    async def legs_fail():
        return True

    log = DiskLog(ctx, 40000, ["L", "1024", "nosync"], legs_fail)
    dev.fail_ops = {Op.READ}
    await log.resume()
    assert ctx.lines == ["device-mapper: dirty region log: mem:L: Failed to read header on dirty region log device"]
    assert ctx.events == 1 and log.status("info") == "3 disk mem:L D"
    dev.fail_ops = set()
    log.clear_region(0)
    await log.flush()                     # a failed leg flush marks every region dirty
    assert log.flush_failed and not any(log.is_clean(r) for r in range(40))
    dev.fail_ops = {Op.FLUSH}
    log.mark_region(1)
    assert await log.flush() == -errno.EIO
    assert log.status("info") == "3 disk mem:L F" and ctx.events == 1   # event only once
