"""mirror (dm-raid1 6.1): the in-process equivalents of the kernel-recorded conformance
cases 03-mirror and 04-mirror-failures (status lines, log lines, image md5s), plus the
behaviours around them: resync across suspend/resume, writes during resync, held writes,
events, throttle, constructor errors."""
import errno
import hashlib
import random
import re

import pytest
import trio
import trio.testing

import dmsim
from dmsim import DMError, parse_table_text
from dmsim.bio import SECTOR_SIZE
from dmsim.targets import mirror as mirror_mod

MIB = 1 << 20


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


def mkimg(path, mib, seed=None):
    """A conformance ``disks`` image: random per MiB from one generator, or zero."""
    with open(path, "wb") as f:
        if seed is None:
            f.truncate(mib * MIB)
        else:
            r = random.Random(seed)
            for _ in range(mib):
                f.write(r.randbytes(MIB))
    return str(path)


def md5_file(path, sector=0, count=None):
    with open(path, "rb") as f:
        f.seek(sector * SECTOR_SIZE)
        data = f.read(-1 if count is None else count * SECTOR_SIZE)
    return hashlib.md5(data).hexdigest()


def sector_bytes(path, sector, n=16):
    with open(path, "rb") as f:
        f.seek(sector * SECTOR_SIZE)
        return f.read(n)


class Env:
    """A manager plus the dialect's symbolic names for images and dm devices."""

    def __init__(self, m, disks):
        self.m = m
        self.names = {path: "DISK%d" % i for i, path in enumerate(disks, 1)}

    def norm(self, text):
        for path, name in self.names.items():
            text = text.replace(path, name)
        for number, path in self.m.image_files().items():    # 240:N: how tables print images
            if path in self.names:
                text = re.sub(r"\b%d:%d\b" % number, self.names[path], text)
        for name, md in self.m.devices.items():
            text = text.replace(md.mm, "dm:" + name)
        return text

    async def create(self, name, table):
        self.m.create(name)
        try:
            await self.m.load(name, parse_table_text(table))
        except DMError:
            await self.m.remove(name)
            raise
        await self.m.resume(name)
        return self.m.find(name)

    def status(self, name):
        return self.norm(str(self.m.table_lines(name, "info")[0]))

    def table(self, name):
        return self.norm(str(self.m.table_lines(name, "table")[0]))

    async def wait_sync(self, name, timeout=60):
        with trio.fail_after(timeout):
            while True:
                fields = str(self.m.table_lines(name, "info")[0]).split()
                a, b = fields[4 + int(fields[3])].split("/")
                if a == b:
                    return
                await trio.sleep(0.01)

    def klog(self):
        return ["kernel: " + line for line in self.m.read_log()]


# -- 03-mirror ----------------------------------------------------------------------------------
async def test_conformance_03_mirror(tmp_path):
    A = mkimg(tmp_path / "a.img", 64, 3)
    B = mkimg(tmp_path / "b.img", 64)
    L = mkimg(tmp_path / "log.img", 1)
    async with dmsim.open_manager() as m:
        e = Env(m, [A, B, L])
        md = await e.create("m", "0 131072 mirror core 1 1024 2 %s 0 %s 0" % (A, B))
        assert e.table("m") == "0 131072 mirror core 1 1024 2 DISK1 0 DISK2 0"
        await e.wait_sync("m")
        assert e.status("m") == "0 131072 mirror 2 DISK1 DISK2 128/128 1 AA 1 core"
        assert md5_file(B) == md5_file(A)
        assert hashlib.md5(await md.read(0, 131072)).hexdigest() == "acde67614beb12f399a79d5abcda5bc0"
        await md.write(4096, b"\xaa" * 4096)
        assert sector_bytes(A, 4096) == sector_bytes(B, 4096) == b"\xaa" * 16
        await m.remove("m")

        # nosync: regions start in sync, nothing is copied
        await e.create("m", "0 131072 mirror core 2 1024 nosync 2 %s 0 %s 0" % (A, B))
        assert e.table("m") == "0 131072 mirror core 2 1024 nosync 2 DISK1 0 DISK2 0"
        assert e.status("m") == "0 131072 mirror 2 DISK1 DISK2 128/128 1 AA 1 core"
        await m.remove("m")

        await e.create("m", "0 131072 mirror disk 2 %s 1024 2 %s 0 %s 0" % (L, A, B))
        assert e.table("m") == "0 131072 mirror disk 2 DISK3 1024 2 DISK1 0 DISK2 0"
        await e.wait_sync("m")
        assert e.status("m") == "0 131072 mirror 2 DISK1 DISK2 128/128 1 AA 3 disk DISK3 A"
        await m.remove("m")

        # reactivate: the disk log remembers that every region is in sync
        await e.create("m", "0 131072 mirror disk 2 %s 1024 2 %s 0 %s 0" % (L, A, B))
        assert e.status("m") == "0 131072 mirror 2 DISK1 DISK2 128/128 1 AA 3 disk DISK3 A"
        await m.remove("m")
        with open(L, "rb") as f:
            log = f.read()
        assert log[:16] == bytes.fromhex("7252694d020000008000000000000000")
        assert log[1024:1040] == b"\xff" * 16 and log[1040:1536] == bytes(496)

        m.read_log()
        for params in ("core 1 1000 2 %s 0 %s 0" % (A, B), "core 1 1024 1 %s 0" % A,
                       "core 1 1024 2 %s 0 %s 0 1 nosuchfeature" % (A, B)):
            with pytest.raises(DMError) as ei:
                await e.create("bad", "0 131072 mirror " + params)
            assert ei.value.errno == errno.EINVAL
        assert e.klog() == [
            "kernel: device-mapper: dirty region log: invalid region size 1000",
            "kernel: device-mapper: table: 253:0: mirror: Error creating mirror dirty log (-EINVAL)",
            "kernel: device-mapper: ioctl: error adding target to table",
            "kernel: device-mapper: table: 253:0: mirror: Invalid number of mirrors (-EINVAL)",
            "kernel: device-mapper: ioctl: error adding target to table",
            "kernel: device-mapper: table: 253:0: mirror: Unrecognised feature requested (-EINVAL)",
            "kernel: device-mapper: ioctl: error adding target to table",
        ]
    assert md5_file(A) == md5_file(B) == "9f361af04322f416aa9e00460fbd12e2"
    assert md5_file(L) == "4c750c0b85c327c25ace74bbf2e5ad98"


# -- 04-mirror-failures ------------------------------------------------------------------------
async def test_conformance_04_mirror_failures(tmp_path):
    disks = [mkimg(tmp_path / "a.img", 32, 4), mkimg(tmp_path / "b.img", 32),
             mkimg(tmp_path / "c.img", 32, 5), mkimg(tmp_path / "d.img", 32),
             mkimg(tmp_path / "e.img", 32, 6), mkimg(tmp_path / "f.img", 32)]
    D1, D2, D3, D4, D5, D6 = disks
    SZ = 65536
    async with dmsim.open_manager() as m:
        e = Env(m, disks)

        # 1. write failure on leg 2 (flakey error_writes), no handle_errors
        await e.create("fl", "0 %d flakey %s 0 3600 0" % (SZ, D2))
        md = await e.create("m1", "0 %d mirror core 1 1024 2 %s 0 253:0 0" % (SZ, D1))
        await e.wait_sync("m1")
        assert m.info("m1").event_nr == 1
        await m.suspend("fl")
        await m.load("fl", parse_table_text("0 %d flakey %s 0 0 3600 1 error_writes" % (SZ, D2)))
        await m.resume("fl")
        await md.write(4096, b"\xfc" * 4096)          # acknowledged
        assert e.status("m1") == "0 65536 mirror 2 DISK1 dm:fl 63/64 1 AD 1 core"
        assert m.info("m1").event_nr == 1              # no event without handle_errors
        assert e.klog() == []
        await m.remove("m1")
        await m.remove("fl")

        # 2. read failure on leg 1 (dust bad block), no handle_errors
        await e.create("dA", "0 %d dust %s 0 4096" % (SZ, D3))
        md = await e.create("m2", "0 %d mirror core 1 1024 2 253:0 0 %s 0" % (SZ, D4))
        await e.wait_sync("m2")
        for msg in ("addbadblock 100", "enable"):
            await m.message("dA", 0, msg)
        data = await md.read(800, 8)
        assert hashlib.md5(data).hexdigest() == md5_file(D3, 800, 8) == "60a4ecc052f9e012c6bc2f123f875978"
        assert e.status("m2") == "0 65536 mirror 2 dm:dA DISK4 64/64 1 RA 1 core"
        assert "kernel: device-mapper: raid1: Mirror read failed from 253:0. Trying alternative device." \
            in e.klog()
        await m.remove("m2")
        await m.remove("dA")

        # 3. leg 2 fails during the initial resync
        await e.create("fl", "0 %d flakey %s 0 0 3600 1 error_writes" % (SZ, D6))
        await e.create("m3", "0 %d mirror core 1 1024 2 %s 0 253:0 0" % (SZ, D5))
        saw_S = False
        with trio.fail_after(60):
            while not e.status("m3").endswith(" 64/64 1 AA 1 core"):
                saw_S = saw_S or " 1 AS 1 core" in e.status("m3")
                await trio.sleep(0)
        assert saw_S
        assert e.status("m3") == "0 65536 mirror 2 DISK5 dm:fl 64/64 1 AA 1 core"
        assert sorted(set(e.klog())) == ["kernel: device-mapper: raid1: Write error during recovery (error = 0x1)"]
        await m.remove("m3")
        await m.remove("fl")

        # 4. write failure with handle_errors: the write waits for a new table
        await e.create("fl", "0 %d flakey %s 0 3600 0" % (SZ, D2))
        md = await e.create("m4", "0 %d mirror core 1 1024 2 %s 0 253:0 0 1 handle_errors" % (SZ, D1))
        await e.wait_sync("m4")
        await m.suspend("fl")
        await m.load("fl", parse_table_text("0 %d flakey %s 0 0 3600 1 error_writes" % (SZ, D2)))
        await m.resume("fl")
        results = []

        async def held_write():
            try:
                await md.write(8192, b"\xfd" * 4096)
                results.append("held write finished")
            except DMError:
                results.append("held write failed")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(held_write)
            await trio.sleep(0.5)
            assert results == []
            assert e.status("m4") == "0 65536 mirror 2 DISK1 dm:fl 63/64 1 AD 1 core"
            assert m.info("m4").event_nr == 2
            await m.suspend("m4", noflush=True)
            await m.load("m4", parse_table_text("0 %d linear %s 0" % (SZ, D1)))
            await m.resume("m4")
        assert results == ["held write finished"]
        assert e.table("m4") == "0 65536 linear DISK1 0"
        assert sector_bytes(D1, 8192) == b"\xfd" * 16
        assert e.klog() == []
        await m.remove("m4")
        await m.remove("fl")
    expected = ["851b88a929a19934fd26b26b0abc349e", "35394cb3e40423016d1c84a749ae24f8",
                "79ad0927b4477c5a67c75b4805b9c6b1", "79ad0927b4477c5a67c75b4805b9c6b1",
                "e1e5823353f96de01f95a6dd754ba89e", "58f06dd588d8ffb3beb46ada6309436b"]
    assert [md5_file(d) for d in disks] == expected


# -- smaller behaviours (memory-light images) ---------------------------------------------------
@pytest.fixture
def legs(tmp_path):
    return [mkimg(tmp_path / "a.img", 4, 11), mkimg(tmp_path / "b.img", 4),
            mkimg(tmp_path / "c.img", 4), mkimg(tmp_path / "l.img", 1)]


async def test_held_write_fails_on_flush_suspend(tmp_path, legs):
    A, B, _, _ = legs
    async with dmsim.open_manager() as m:
        e = Env(m, legs)
        await e.create("bad", "0 8192 error")
        md = await e.create("m", "0 8192 mirror core 2 1024 nosync 2 %s 0 253:0 0 1 handle_errors" % A)
        results = []

        async def w():
            try:
                await md.write(0, b"\x01" * 512)
                results.append("ok")
            except DMError as err:
                results.append(err.errno)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(w)
            await trio.sleep(0.2)
            assert e.status("m") == "0 8192 mirror 2 DISK1 dm:bad 7/8 1 AD 1 core"
            await m.suspend("m")
        assert results == [errno.EIO]


async def test_write_during_resync_reaches_every_leg(legs):
    A, B, C, _ = legs
    async with dmsim.open_manager() as m:
        e = Env(m, legs)
        md = await e.create("m", "0 8192 mirror core 1 256 3 %s 0 %s 0 %s 0" % (A, B, C))
        assert e.status("m").startswith("0 8192 mirror 3 DISK1 DISK2 DISK3 ")
        await md.write(0, b"\x77" * 4096)
        await md.write(8000, b"\x78" * 512)
        await e.wait_sync("m")
        assert e.status("m") == "0 8192 mirror 3 DISK1 DISK2 DISK3 32/32 1 AAA 1 core"
        assert md5_file(A) == md5_file(B) == md5_file(C)
        assert sector_bytes(B, 0) == b"\x77" * 16 and sector_bytes(C, 8000) == b"\x78" * 16


async def test_partial_last_region_and_events(tmp_path, legs):
    A, B, _, _ = legs
    async with dmsim.open_manager() as m:
        e = Env(m, legs)
        await e.create("m", "0 1000 mirror core 1 256 2 %s 0 %s 0" % (A, B))
        await e.wait_sync("m")
        assert e.status("m") == "0 1000 mirror 2 DISK1 DISK2 4/4 1 AA 1 core"
        assert m.info("m").event_nr == 1
        assert md5_file(A, 0, 1000) == md5_file(B, 0, 1000)
        assert md5_file(B, 1000, 100) == hashlib.md5(bytes(51200)).hexdigest()   # not copied past the end
        await m.remove("m")
        await e.create("n", "0 1000 mirror core 2 256 nosync 2 %s 0 %s 0" % (A, B))
        assert m.info("n").event_nr == 0        # in sync before the table was live


async def test_resync_stops_at_suspend_and_restarts(autojump_clock, legs):
    A, B, _, _ = legs
    async with dmsim.open_manager() as m:
        e = Env(m, legs)
        await e.create("m", "0 8192 mirror core 1 128 2 %s 0 %s 0" % (A, B))
        await m.suspend("m")                  # early: at most a region or so recovered
        first = e.status("m")
        await trio.sleep(5)
        assert e.status("m") == first
        assert int(first.split()[6].split("/")[0]) < 64
        await m.resume("m")
        while e.status("m").split()[6] == "0/64":
            await trio.sleep(0)
        await m.suspend("m")                  # midway: the in-flight region completes
        frozen = e.status("m")
        await trio.sleep(5)
        assert e.status("m") == frozen
        done = int(frozen.split()[6].split("/")[0])
        assert 0 < done < 64
        assert md5_file(A, 0, done * 128) == md5_file(B, 0, done * 128)
        assert md5_file(B, done * 128, 128) != md5_file(A, done * 128, 128)
        await m.resume("m")
        await e.wait_sync("m")
        assert md5_file(A, 0, 8192) == md5_file(B, 0, 8192)
        assert m.find("m").live.targets[0].kc.throttle is mirror_mod.resync_throttle


async def test_remove_during_resync_cancels_it(legs):
    A, B, _, L = legs
    async with dmsim.open_manager() as m:
        e = Env(m, legs)
        await e.create("m", "0 8192 mirror disk 2 %s 8 2 %s 0 %s 0" % (L, A, B))
        await trio.sleep(0)
        await m.remove("m")
        # the disk log holds what was recovered when the table went away
        with open(L, "rb") as f:
            img = f.read(1024 + 128)
        assert img[8:16] == (1024).to_bytes(8, "little")


async def test_read_of_out_of_sync_region_uses_default_leg(legs):
    A, B, _, _ = legs
    async with dmsim.open_manager() as m:
        e = Env(m, legs)
        await e.create("bad", "0 8192 error")
        md = await e.create("m", "0 8192 mirror core 1 1024 2 %s 0 253:0 0 1 handle_errors" % A)
        with trio.fail_after(10):
            while "1 AS" not in e.status("m"):
                await trio.sleep(0.01)
        assert await md.read(0, 8) == sector_bytes(A, 0, 4096)
        # failed recoveries with handle_errors leave the regions out of sync
        assert e.status("m") == "0 8192 mirror 2 DISK1 dm:bad 0/8 1 AS 1 core"
        assert m.info("m").event_nr == 1


async def test_primary_read_error_falls_back(legs):
    A, B, _, _ = legs
    async with dmsim.open_manager() as m:
        e = Env(m, legs)
        await e.create("dA", "0 8192 dust %s 0 4096" % A)
        md = await e.create("m", "0 8192 mirror core 1 1024 2 253:0 0 %s 0" % B)
        await e.wait_sync("m")
        await m.message("dA", 0, "addbadblock 1")
        await m.message("dA", 0, "enable")
        m.read_log()
        assert await md.read(8, 8) == sector_bytes(A, 8, 4096)
        assert e.status("m") == "0 8192 mirror 2 dm:dA DISK2 8/8 1 RA 1 core"
        # the failed leg is skipped from now on
        assert await md.read(8, 8) == sector_bytes(B, 8, 4096)
        assert e.klog() == ["kernel: device-mapper: raid1: Mirror read failed from 253:0. Trying alternative device."]


@pytest.mark.parametrize("params, error", [
    ("core 9 1024 2 A 0 B 0", "Insufficient mirror log arguments"),
    ("core x 1024 2 A 0 B 0", "Invalid mirror log argument count"),
    ("core 3 1024 2 A 0 B 0", "Error creating mirror dirty log"),
    ("core 2 1024 block_on_error 2 A 0 B 0", "Error creating mirror dirty log"),
    ("foo 1 1024 2 A 0 B 0", "Error creating mirror dirty log"),
    ("core 1 16384 2 A 0 B 0", "Error creating mirror dirty log"),
    ("core 1 1024 10 A 0 B 0 A 0 B 0 A 0 B 0 A 0 B 0 A 0 B 0", "Invalid number of mirrors"),
    ("core 1 1024 2 A 0", "Too few mirror arguments"),
    ("core 1 1024 2 A 0 B x", "Invalid offset"),
    ("core 1 1024 2 A 0 /nonexistent 0", "Device lookup failure"),
    ("core 1 1024 2 A 0 B 0 x", "Invalid number of features"),
    ("core 1 1024 2 A 0 B 0 2 handle_errors", "Not enough arguments to support feature count"),
    ("core 1 1024 2 A 0 B 0 1 keep_log", "keep_log feature requires the handle_errors feature"),
    ("core 1 1024 2 A 0 B 0 1 bogus", "Unrecognised feature requested"),
    ("core 1 1024 2 A 0 B 0 1 handle_errors junk", "Too many mirror arguments"),
])
async def test_ctr_errors(legs, params, error):
    A, B, _, _ = legs
    async with dmsim.open_manager() as m:
        m.create("m")
        with pytest.raises(DMError):
            await m.load("m", parse_table_text("0 8192 mirror " + params.replace("A ", A + " ").replace("B ", B + " ")))
        lines = m.read_log()
        assert lines[-2].startswith("device-mapper: table: 253:0: mirror: %s (-E" % error)


async def test_table_with_features_and_disk_sync(legs):
    A, B, _, L = legs
    async with dmsim.open_manager() as m:
        e = Env(m, legs)
        await e.create("m", "0 8192 mirror core 1 1024 2 %s 0 %s 0 2 handle_errors keep_log" % (A, B))
        assert e.table("m") == "0 8192 mirror core 1 1024 2 DISK1 0 DISK2 0 2 handle_errors keep_log"
        await m.remove("m")
        await e.create("m", "0 8192 mirror disk 3 %s 1024 sync 2 %s 0 %s 0" % (L, A, B))
        assert e.table("m") == "0 8192 mirror disk 3 DISK4 1024 sync 2 DISK1 0 DISK2 0"
        await e.wait_sync("m")
        assert e.status("m") == "0 8192 mirror 2 DISK1 DISK2 8/8 1 AA 3 disk DISK4 A"


# -- found by the model test (tests/test_mirror_model.py) ----------------------------------------
@pytest.mark.parametrize("checkpoints", range(12))
async def test_interrupted_suspend_leaves_mirror_running(autojump_clock, legs, checkpoints):
    """A suspend given up part way (cancelled: a client gone, a timeout) must give back the
    recovery slot it took: the resync goes on, and the next suspend does not hang (it did
    when the cancel came while presuspend waited for the region copy in flight).  With
    ``process`` durability: the autojump clock must not outrun real fdatasync threads."""
    A, B, C, L = legs
    async with dmsim.open_manager(durability="process") as m:
        e = Env(m, legs)
        await e.create("la", "0 8192 linear %s 0" % A)     # a leg whose I/O yields
        await e.create("m", "0 156 mirror disk 3 %s 32 sync 3 253:0 0 %s 0 %s 0" % (L, B, C))
        with trio.CancelScope() as scope:
            async def cancel_later():
                for _ in range(checkpoints):
                    await trio.lowlevel.checkpoint()
                scope.cancel()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_later)
                await m.suspend("m")
                nursery.cancel_scope.cancel()
        if m.find("m").suspended:
            await m.resume("m")
        await e.wait_sync("m")
        assert md5_file(A, 0, 156) == md5_file(B, 0, 156) == md5_file(C, 0, 156)
        with trio.fail_after(10):
            await m.suspend("m")
            await m.resume("m")
            await m.remove("m")
        await m.remove("la")


async def test_resync_never_copies_from_a_failed_default_leg(legs):
    """Without handle_errors the default leg stays the default when it fails; the writes
    acknowledged since are on the other legs only.  A later resync must not copy the failed
    leg's (zero-filled) reads over them."""
    A, B, _, _ = legs
    async with dmsim.open_manager() as m:
        e = Env(m, legs)
        await e.create("la", "0 8192 linear %s 0" % A)
        md = await e.create("m", "0 8192 mirror core 2 1024 nosync 2 253:0 0 %s 0" % B)
        await m.suspend("la")
        await m.load("la", parse_table_text("0 8192 error"))
        await m.resume("la")
        await md.write(1024, b"\x5a" * 4096)          # acknowledged: leg B has it
        assert e.status("m") == "0 8192 mirror 2 dm:la DISK2 7/8 1 DA 1 core"
        await m.suspend("m")
        await m.resume("m")                           # resync of region 1
        await e.wait_sync("m")
        assert await md.read(1024, 8) == b"\x5a" * 4096
        assert sector_bytes(B, 1024) == b"\x5a" * 16
        await m.remove("m")
        await m.remove("la")


async def test_leg_that_lost_writes_is_not_read_after_resync(legs):
    """Without handle_errors, a resync that could not write a leg still counts its region in
    sync and resets every leg's error flags (status ``AA``, as the kernel).  A leg that
    lost writes (here: it rejects writes, reads work) must not become the leg reads or the
    next resync use again: its data is stale."""
    A, B, _, _ = legs
    async with dmsim.open_manager() as m:
        e = Env(m, legs)
        await e.create("la", "0 8192 linear %s 0" % A)
        md = await e.create("m", "0 8192 mirror core 2 1024 nosync 2 253:0 0 %s 0" % B)
        await m.suspend("la")
        await m.load("la", parse_table_text("0 8192 flakey %s 0 0 3600 1 error_writes" % A))
        await m.resume("la")
        await md.write(1024, b"\x6b" * 4096)          # acknowledged: only leg B has it
        assert e.status("m") == "0 8192 mirror 2 dm:la DISK2 7/8 1 DA 1 core"
        await m.suspend("m")
        await m.resume("m")                           # the copy to leg A fails: counted in sync
        await e.wait_sync("m")
        assert e.status("m") == "0 8192 mirror 2 dm:la DISK2 8/8 1 AA 1 core"
        assert await md.read(1024, 8) == b"\x6b" * 4096
        await m.suspend("m")
        await m.resume("m")
        await e.wait_sync("m")
        assert await md.read(1024, 8) == b"\x6b" * 4096
        assert sector_bytes(B, 1024) == b"\x6b" * 16
        await m.remove("m")
        await m.remove("la")


@pytest.mark.parametrize("checkpoints", range(4))
async def test_interrupted_noflush_suspend_releases_requeued_write(autojump_clock, legs, checkpoints):
    """A held write requeued by a noflush suspend that is cancelled at once must go back to
    the mirror (held again), so that the repair's noflush suspend and reload complete it."""
    A, B, _, _ = legs
    async with dmsim.open_manager(durability="process") as m:
        e = Env(m, legs)
        await e.create("lb", "0 8192 linear %s 0" % B)
        md = await e.create("m", "0 8192 mirror core 2 1024 nosync 2 %s 0 253:0 0 1 handle_errors" % A)
        await m.suspend("lb")
        await m.load("lb", parse_table_text("0 8192 error"))
        await m.resume("lb")
        results = []

        async def held_write():
            await md.write(0, b"\x3c" * 512)
            results.append("ok")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(held_write)
            await trio.sleep(1)
            assert results == []                       # held
            with trio.CancelScope() as scope:
                async def cancel_later():               # the client gives up
                    for _ in range(checkpoints):
                        await trio.lowlevel.checkpoint()
                    scope.cancel()
                async with trio.open_nursery() as inner:
                    inner.start_soon(cancel_later)
                    await m.suspend("m", noflush=True)
                    inner.cancel_scope.cancel()
            if m.find("m").suspended:
                await m.resume("m")
            with trio.fail_after(30):
                await m.suspend("m", noflush=True)
                await m.load("m", parse_table_text("0 8192 linear %s 0" % A))
                await m.resume("m")
                while not results:
                    await trio.sleep(0.1)
        assert results == ["ok"] and sector_bytes(A, 0) == b"\x3c" * 16


async def test_recovering_region_quiesces_after_a_flush_failure(autojump_clock, legs):
    """After a failed flush (every region going idle is left out of sync), a region whose
    resync waits for its writes must still be copied when they end: left NOSYNC instead,
    its recovery slot was never given back and the next suspend waited forever (found by
    the model test; here the state is set up directly)."""
    A, B, _, _ = legs
    async with dmsim.open_manager(durability="process") as m:
        e = Env(m, legs)
        await e.create("m", "0 8192 mirror core 2 1024 nosync 2 %s 0 %s 0" % (A, B))
        t = m.find("m").live.targets[0]
        t.flush_failure = True
        t.log.set_region_sync(3, False)
        reg = t._rh_find(3)
        reg.pending = 1                         # a write in flight when its resync starts
        t._wake()
        while t._rh_state(3) != mirror_mod.RECOVERING:
            await trio.sleep(0)
        t._rh_dec(3)                            # the write ends
        with trio.fail_after(10):
            await e.wait_sync("m")
            await m.suspend("m")
            await m.resume("m")
        assert e.status("m") == "0 8192 mirror 2 DISK1 DISK2 8/8 1 AA 1 core"
