"""Manager (the ioctl layer): minors, events, removal, stacking, failed loads."""
import errno
import os

import pytest
import trio
import trio.testing
from test_device import INSTANCES, register_all, unregister_all

import dmsim
from dmsim.errors import DMError
from dmsim.table import parse_table_text


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
def test_targets():
    register_all()
    yield INSTANCES
    unregister_all()


@pytest.fixture
async def m():
    async with dmsim.open_manager() as mgr:
        yield mgr


@pytest.fixture
def img(tmp_path):
    path = tmp_path / "vda"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    return str(path)


async def mk(m, name, table, read_only=False):
    m.create(name)
    await m.load(name, parse_table_text(table), read_only)
    await m.resume(name)
    return m.find(name)


def errno_of(excinfo):
    return excinfo.value.errno


async def test_minors_are_lowest_free(m):
    for name in "abcd":
        m.create(name)
    await m.remove("b")
    await m.remove("a")
    assert m.create("e").minor == 0
    assert m.create("f").minor == 1
    assert m.create("g").minor == 4


async def test_failed_create_reports_the_minor_it_held(m, img):
    from dmsim import dmsetup
    from dmsim.control import LocalControl

    m.create("a")
    m.create("b")
    await m.remove("a")
    out, err, rc = await dmsetup.run(LocalControl(m), ["create", "bad", "--table", "0 8 nosuch"])
    assert err.startswith("device-mapper: reload ioctl on bad (253:0) failed: Invalid argument\n")
    assert m.read_log()[0] == "device-mapper: table: 253:0: nosuch: unknown target type"
    assert m.create("c").minor == 0


async def test_failed_load_keeps_inactive_and_live(m, img):
    await mk(m, "x", "0 8 zero")
    await m.load("x", parse_table_text("0 16 zero"))
    with pytest.raises(DMError) as ei:
        await m.load("x", parse_table_text("0 8 linear %s" % img))
    assert errno_of(ei) == errno.EINVAL
    assert m.table_lines("x", inactive=True)[0].length == 16
    assert m.table_lines("x")[0].length == 8
    assert m._files == {}


async def test_failed_resume_check_releases_new_table(m, img, test_targets):
    await mk(m, "x", "0 8 test-hooks")
    await m.load("x", parse_table_text("0 8 test-hooks\n8 4000 linear %s 0" % img))
    old, new = test_targets
    with pytest.raises(DMError) as ei:
        await m.resume("x")
    assert errno_of(ei) == errno.EINVAL
    assert new.calls == ["dtr"] and m._files == {}
    assert old.calls == ["preresume", "resume", "presuspend(False)", "postsuspend"]
    info = m.info("x")
    assert info.suspended and info.live_table and not info.inactive_table
    await m.resume("x")
    assert old.calls[-2:] == ["preresume", "resume"]


async def test_event_counter_and_waiters(m, test_targets, autojump_clock):
    await mk(m, "e", "0 8 test-hooks")
    woke = []

    async def waiter(nr):
        woke.append((await m.wait("e", nr)).event_nr)

    async with trio.open_nursery() as n:
        n.start_soon(waiter, 0)
        await trio.sleep(1)
        assert woke == []
        assert await m.message("e", 0, "event") == ""
        await trio.sleep(0)
    assert woke == [1]
    m.rename("e", "e2")
    m.rename("e2", new_uuid="u")
    assert m.info("e2").event_nr == 3
    assert (await m.wait("e2", 1)).event_nr == 3
    assert await m.message("e2", 0, "hello  there") == "echo hello there"


async def test_event_counter_wraps_at_32_bits(m):
    md = m.create("w")
    md.event_nr = 0xFFFFFFFF
    md.raise_event()
    assert md.event_nr == 0


async def test_remove_open_device_and_deferred_through_a_stack(m, img):
    await mk(m, "base", "0 64 linear %s 0" % img)
    await mk(m, "top", "0 8 linear /dev/mapper/base 0")
    with pytest.raises(DMError) as ei:
        await m.remove("base")
    assert errno_of(ei) == errno.EBUSY
    await m.remove("base", deferred=True)
    assert m.info("base").deferred_remove
    await m.remove("top")
    await trio.testing.wait_all_tasks_blocked()
    assert m.names() == []
    assert m._files == {}


async def test_suspended_device_can_be_removed(m, img):
    await mk(m, "s", "0 64 linear %s 0" % img)
    await m.suspend("s")
    await m.remove("s")
    assert m.names() == []


async def test_stacking_by_mount_dir(tmp_path, img):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    async with dmsim.open_manager(mount_dir=str(mnt)) as m:
        await mk(m, "base", "0 64 linear %s 0" % img)
        top = await mk(m, "top", "0 8 linear %s 8" % os.path.join(str(mnt), "base"))
        assert m.table_lines("top")[0].params == "253:0 8"
        assert m.info("base").open_count == 1
        await top.write(0, b"\x33" * 512)
        with open(img, "rb") as f:
            f.seek(8 * 512)
            assert f.read(512) == b"\x33" * 512
        with pytest.raises(DMError) as ei:
            await mk(m, "bad", "0 8 linear %s 0" % os.path.join(str(mnt), "nosuch"))
        assert errno_of(ei) == errno.ENODEV


async def test_dm_device_by_number(m, img):
    await mk(m, "base", "0 64 linear %s 0" % img)
    await mk(m, "top", "0 8 linear 253:0 0")
    assert m.deps("top")[0] is m.find("base")
    with pytest.raises(DMError) as ei:
        await mk(m, "bad", "0 8 linear 253:9 0")
    assert errno_of(ei) == errno.ENXIO or errno_of(ei) == errno.ENODEV


async def test_read_only_table_opens_file_read_only_and_shares_rw(m, img):
    await mk(m, "ro", "0 8 linear %s 0" % img, read_only=True)
    await mk(m, "rw", "0 8 linear %s 0" % img)
    assert m.find("ro").live.targets[0].dev.read_only
    assert not m.find("rw").live.targets[0].dev.read_only
    await mk(m, "rw2", "0 8 linear %s 8" % img)
    assert m.find("rw2").live.targets[0].dev is m.find("rw").live.targets[0].dev


async def test_names_validated(m):
    """Names the kernel takes and a FUSE directory can show; the rest EINVAL, with the
    kernel's log line, and listing keeps working."""
    m.read_log()
    with pytest.raises(DMError) as ei:
        m.create("")
    assert errno_of(ei) == errno.EINVAL
    assert m.read_log() == ["device-mapper: ioctl: name not supplied when creating device"]
    for bad in ("a/b", "x" * 128, "a\0b", "a\udc80b", "\ud800", ".", "..", "\u00e9" * 64):
        with pytest.raises(DMError) as ei:
            m.create(bad)
        assert errno_of(ei) == errno.EINVAL, repr(bad)
        assert m.read_log() == ["device-mapper: ioctl: invalid device name"]
    m.create("x" * 127)
    m.create("\u00e9" * 63 + "x")                    # 127 bytes of UTF-8
    m.create("control")                               # 6.1 takes it (oracle)
    m.create("a b\t\x01")
    for bad in ("y" * 129, "u\0", "u\udcff"):
        with pytest.raises(DMError):
            m.create("u", uuid=bad)
    m.create("u", uuid="y" * 128)
    assert len(m.names()) == 5


async def test_rename_validates_the_new_name(m):
    m.create("r")
    m.read_log()
    for kw in ({"new_name": ""}, {"new_name": "x" * 128}, {"new_uuid": "u" * 129}, {"new_name": "a\0"}):
        with pytest.raises(DMError) as ei:
            m.rename("r", **kw)
        assert errno_of(ei) == errno.EINVAL
        assert m.read_log() == ["device-mapper: ioctl: Invalid new mapped device name or uuid string supplied."]
    for bad in ("a/b", ".", ".."):
        with pytest.raises(DMError):
            m.rename("r", new_name=bad)
        assert m.read_log() == ["device-mapper: ioctl: invalid device name"]
    m.rename("r", new_name="s")
    assert m.names() == ["s"]


async def test_shutdown_with_held_io_and_stacks(tmp_path, img, test_targets, autojump_clock):
    got = []
    async with dmsim.open_manager() as m:
        await mk(m, "base", "0 64 linear %s 0" % img)
        await mk(m, "top", "0 8 linear /dev/mapper/base 0")
        md = m.find("top")
        await m.suspend("top")

        async def reader():
            try:
                await md.read(0, 1)
            except DMError as e:
                got.append(e.errno)

        m.nursery.start_soon(reader)
        await trio.sleep(1)
    assert got == [errno.EIO]


# -- shutdown and removal with held I/O (issue 11 bug 2) ----------------------------------------
async def _origin_and_snapshot(m, tmp_path):
    origin = tmp_path / "origin"
    origin.write_bytes(b"o" * (1 << 20))
    cow = tmp_path / "cow"
    cow.write_bytes(bytes(1 << 20))
    snap = await mk(m, "snap", "0 2048 snapshot %s %s P 8" % (origin, cow))
    org = await mk(m, "org", "0 2048 snapshot-origin %s" % origin)
    return str(origin), str(cow), org, snap


async def test_shutdown_fails_held_origin_write_and_keeps_snapshot(tmp_path, autojump_clock):
    """A write held by a suspended origin fails at shutdown; it must not reach the origin
    after the snapshot is gone (it would be lost to the snapshot: no copy-out)."""
    got = []
    async with dmsim.open_manager() as m:
        origin, cow, org, _ = await _origin_and_snapshot(m, tmp_path)
        await m.suspend("org")

        async def writer():
            try:
                await org.write(0, b"N" * 4096)
                got.append("written")
            except DMError as e:
                got.append(e.errno)

        m.nursery.start_soon(writer)
        await trio.sleep(1)
        assert got == []                     # held
    assert got == [errno.EIO]
    with open(origin, "rb") as f:
        assert f.read(4096) == b"o" * 4096
    async with dmsim.open_manager() as m:   # the snapshot reactivated still reads old data
        snap = await mk(m, "snap", "0 2048 snapshot %s %s P 8" % (origin, cow))
        assert await snap.read(0, 8) == b"o" * 4096


async def test_remove_of_suspended_device_fails_held_write(m, img, autojump_clock):
    """remove (and remove_all) of a suspended device fails its held writes with EIO
    rather than letting them through to the table being destroyed."""
    for verb in ("remove", "remove_all"):
        md = await mk(m, "l", "0 8 linear %s 0" % img)
        await m.suspend("l")
        got = []

        async def writer(md=md, got=got):
            try:
                await md.write(0, b"w" * 512)
                got.append("written")
            except DMError as e:
                got.append(e.errno)

        async with trio.open_nursery() as n:
            n.start_soon(writer)
            await trio.sleep(1)
            await (m.remove("l") if verb == "remove" else m.remove_all())
        assert got == [errno.EIO], verb
        with open(img, "rb") as f:
            assert f.read(512) == bytes(512)
        assert m._files == {}


async def test_deferred_remove_fails_held_write(m, img, autojump_clock):
    md = await mk(m, "l", "0 8 linear %s 0" % img)
    h = m.open("l")
    await m.remove("l", deferred=True)
    await m.suspend("l")
    got = []

    async def writer():
        try:
            await md.write(0, b"w" * 512)
        except DMError as e:
            got.append(e.errno)

    async with trio.open_nursery() as n:
        n.start_soon(writer)
        await trio.sleep(1)
        m.close(h)
    await trio.sleep(1)
    assert got == [errno.EIO] and "l" not in m.devices and m._files == {}


async def test_shutdown_lets_inflight_io_finish_before_tables_go(tmp_path, test_targets, autojump_clock):
    """In-flight I/O is drained (bounded) before any table is destroyed."""
    got = []
    async with dmsim.open_manager() as m:
        md = await mk(m, "s", "0 64 test-slow 5")

        async def reader():
            try:
                await md.read(0, 1)
                got.append("read")
            except DMError as e:
                got.append(e.errno)

        m.nursery.start_soon(reader)
        await trio.sleep(0.01)
    assert got == ["read"]


# -- interrupted ioctls (issue 11 item 4) ---------------------------------------------------------
async def test_interrupted_resume_puts_the_table_back(m, img, test_targets, autojump_clock):
    """A resume cancelled while it suspends (in-flight I/O not drained yet) leaves the
    inactive table in its slot: the device under it stays removable after a clear."""
    await mk(m, "base", "0 64 linear %s 0" % img)
    top = await mk(m, "top", "0 64 test-slow 5")
    await m.load("top", parse_table_text("0 8 linear /dev/mapper/base 0"))
    assert m.info("base").open_count == 1
    async with trio.open_nursery() as n:
        n.start_soon(top.read, 0, 1)          # in flight for 5 s
        await trio.sleep(0.1)
        with trio.move_on_after(1):
            await m.resume("top")
        info = m.info("top")
        assert info.inactive_table and not info.suspended
        assert m.table_lines("top", inactive=True)[0].params == "253:0 0"
    await m.clear("top")
    assert m.info("base").open_count == 0
    await m.remove("base")


async def test_interrupted_resume_after_the_swap_completes(m, img, test_targets, autojump_clock):
    """Once the table is swapped in, a cancelled caller no longer stops the resume: the
    device runs the new table and the old table's devices are released."""
    await mk(m, "a", "0 64 linear %s 0" % img)
    await mk(m, "b", "0 64 linear %s 0" % img)
    await mk(m, "top", "0 8 linear /dev/mapper/a 0")
    await m.load("top", parse_table_text("0 8 test-stall /dev/mapper/b preresume 5"))
    with trio.move_on_after(1) as scope:
        await m.resume("top")
    assert scope.cancel_called
    info = m.info("top")
    assert not info.suspended and info.live_table and not info.inactive_table
    assert m.table_lines("top")[0].type == "test-stall"
    assert m.info("a").open_count == 0 and m.info("b").open_count == 1
    await m.remove("a")


async def test_interrupted_load_releases_its_devices(m, img, test_targets, autojump_clock):
    """A load cancelled in its second ctr destroys what the first built, even when a
    destructor must wait."""
    await mk(m, "base", "0 64 linear %s 0" % img)
    m.create("top")
    with trio.move_on_after(1):
        await m.load("top", parse_table_text("0 8 test-stall /dev/mapper/base dtr 2\n"
                                             "8 8 test-stall %s ctr 5" % img))
    assert not m.info("top").inactive_table
    assert m.info("base").open_count == 0 and len(m._files) == 1   # base's own image
    await m.remove("base")


async def test_interrupted_remove_still_destroys_the_tables(m, img, test_targets, autojump_clock):
    await mk(m, "base", "0 64 linear %s 0" % img)
    await mk(m, "top", "0 8 test-stall /dev/mapper/base dtr 5")
    with trio.move_on_after(1):
        await m.remove("top")
    assert "top" not in m.devices and m.info("base").open_count == 0


async def test_interrupted_suspend_leaves_the_device_running(m, img, test_targets, autojump_clock):
    md = await mk(m, "s", "0 64 test-slow 5")
    async with trio.open_nursery() as n:
        n.start_soon(md.read, 0, 1)
        await trio.sleep(0.1)
        with trio.move_on_after(1):
            await m.suspend("s")
        assert not m.info("s").suspended
    await m.suspend("s")
    assert m.info("s").suspended
    await m.resume("s")


# -- tables that map their own device, cycles, deep stacks (issue 12) ----------------------------
LOOKUP_EINVAL = ["device-mapper: table: 253:%d: linear: Device lookup failed (-EINVAL)",
                 "device-mapper: ioctl: error adding target to table"]


@pytest.mark.parametrize("ref", ["/dev/mapper/s", "253:0", "/dev/dm-0"])
async def test_table_mapping_its_own_device_is_refused(m, ref):
    """blktests dm/001: reloading a device with a table that maps the device itself fails
    (dm_get_device: ``dev == disk_devt(t->md->disk)``), and nothing else changes."""
    await mk(m, "s", "0 8 zero")
    m.read_log()
    with pytest.raises(DMError) as ei:
        await m.load("s", parse_table_text("0 8 linear %s 0" % ref))
    assert errno_of(ei) == errno.EINVAL
    assert m.read_log() == [line % 0 if "%d" in line else line for line in LOOKUP_EINVAL]
    assert not m.info("s").inactive_table and m.info("s").open_count == 0
    assert await m.find("s").read(0, 1) == bytes(512)


async def test_cycles_are_refused_at_load(m):
    await mk(m, "a", "0 8 zero")
    await mk(m, "b", "0 8 linear /dev/mapper/a 0")
    await mk(m, "c", "0 8 linear /dev/mapper/b 0")
    m.read_log()
    for name, ref in (("a", "/dev/mapper/b"), ("a", "/dev/mapper/c"), ("b", "253:2")):
        with pytest.raises(DMError) as ei:
            await m.load(name, parse_table_text("0 8 linear %s 0" % ref))
        assert errno_of(ei) == errno.EINVAL, (name, ref)
        minor = m.find(name).minor
        assert m.read_log() == [line % minor if "%d" in line else line for line in LOOKUP_EINVAL]
    # through an inactive table too: d's inactive table maps a; a may not map d
    await mk(m, "d", "0 8 zero")
    await m.load("d", parse_table_text("0 8 linear /dev/mapper/a 0"))
    with pytest.raises(DMError):
        await m.load("a", parse_table_text("0 8 linear /dev/mapper/d 0"))
    assert [m.info(n).open_count for n in "abcd"] == [2, 1, 0, 0]


async def test_device_without_a_table_has_no_disk(m):
    """The kernel adds the disk at the first table load: before it, a table naming the
    device fails by number with ENXIO and by path with ENODEV (no node), as on the oracle."""
    m.create("e")
    m.create("t")
    for ref, err in (("253:0", errno.ENXIO), ("/dev/mapper/e", errno.ENODEV)):
        with pytest.raises(DMError) as ei:
            await m.load("t", parse_table_text("0 8 linear %s 0" % ref))
        assert errno_of(ei) == err
    await m.load("e", parse_table_text("0 8 zero"))          # loaded, not resumed: it has a disk
    await m.load("t", parse_table_text("0 8 linear 253:0 0"))


async def test_stack_depth_is_bounded_without_recursion(m):
    """64 levels work (I/O and the limits, computed without walking the stack); a 65th,
    above or below, is refused."""
    from dmsim.manager import MAX_STACK_DEPTH

    await mk(m, "d0", "0 8 zero")
    for i in range(1, MAX_STACK_DEPTH):
        await mk(m, "d%d" % i, "0 8 linear /dev/mapper/d%d 0" % (i - 1))
    top = m.find("d%d" % (MAX_STACK_DEPTH - 1))
    assert await top.read(0, 8) == bytes(4096) and top.logical_block_size == 512
    m.create("over")
    with pytest.raises(DMError) as ei:
        await m.load("over", parse_table_text("0 8 linear %s 0" % top.mm))
    assert errno_of(ei) == errno.EINVAL
    await mk(m, "under", "0 8 zero")
    with pytest.raises(DMError):                              # d0 would be one level deeper
        await m.load("d0", parse_table_text("0 8 linear /dev/mapper/under 0"))


async def test_a_failing_background_task_does_not_end_the_manager(tmp_path, img, autojump_clock):
    """A bug in a target's task is logged and leaves every other device (and the
    manager) serving; open_manager still raises it when it closes, so tests see it."""
    from dmsim.targets import base as tbase

    class Buggy(tbase.Target):
        name = "test-bug"

        async def ctr(self, args):
            self.ctx.start_task(self.work)

        async def work(self):
            await trio.sleep(1)
            raise RuntimeError("bug in a background task")

        async def map(self, bio):
            return bytes(512 * bio.sectors)

    tbase.register(Buggy)
    try:
        with pytest.raises(RuntimeError, match="bug in a background task"):
            async with dmsim.open_manager() as m:
                await mk(m, "b", "0 8 test-bug")
                lin = await mk(m, "l", "0 8 linear %s 0" % img)
                await trio.sleep(2)
                assert len(m.task_failures) == 1
                await lin.write(0, b"k" * 512)
                assert await lin.read(0, 1) == b"k" * 512
                await m.remove("b")
    finally:
        tbase._registry.pop(Buggy.name)
        tbase._order.remove(Buggy.name)


async def test_remove_waits_for_a_resume_under_way(m, img, test_targets, autojump_clock):
    """remove takes md->suspend_lock: a resume in its preresume hooks finishes first, then
    the device goes, with nothing left open under it."""
    await mk(m, "b", "0 64 linear %s 0" % img)
    m.create("top")
    await m.load("top", parse_table_text("0 8 test-stall /dev/mapper/b preresume 3"))
    async with trio.open_nursery() as n:
        n.start_soon(m.resume, "top")
        await trio.sleep(1)
        await m.remove("top")
    assert "top" not in m.devices and m.info("b").open_count == 0


# -- issue 13: DM_DEV_SET_GEO, rename's checks in the kernel's order, image numbers -------------
async def test_set_geometry_parses_like_sscanf_and_checks_ranges(m, img):
    md = await mk(m, "g", "0 8 linear %s 0" % img)
    m.set_geometry("g", "  1 2 3 6")
    assert m.geometries[md] == (1, 2, 3, 6)
    m.read_log()
    cases = [("1 2 3", "ioctl: Unable to interpret geometry settings."),
             ("1 2 3 4 5", "ioctl: Unable to interpret geometry settings."),
             ("65536 0 0 0", "ioctl: Geometry exceeds range limits."),
             ("0 0 256 0", "ioctl: Geometry exceeds range limits."),
             ("-1 1 1 0", "ioctl: Geometry exceeds range limits."),          # %lu wraps
             ("0 0 0 1", "core: Start sector is beyond the geometry limits.")]
    for text, line in cases:
        with pytest.raises(DMError) as e:
            m.set_geometry("g", text)
        assert errno_of(e) == errno.EINVAL
        assert m.read_log() == ["device-mapper: " + line], text
    assert m.geometries[md] == (1, 2, 3, 6)
    with pytest.raises(DMError) as e:
        m.set_geometry("nosuch", "0 0 0 0")
    assert errno_of(e) == errno.ENXIO


async def test_rename_checks_in_kernel_order(m):
    """dm_hash_rename: a taken new name (EBUSY) before a missing device (ENXIO), that
    before a uuid already set (EINVAL); each logs."""
    m.create("a", "ua")
    m.create("b")
    m.read_log()
    for args, err, line in [
            (("nosuch", "a"), errno.EBUSY, "Unable to change name on mapped device nosuch to one that "
                                           "already exists: a"),
            (("nosuch", "c"), errno.ENXIO, "Unable to rename non-existent device, nosuch to c"),
            (("nosuch", None, "ua"), errno.EBUSY, "Unable to change uuid on mapped device nosuch to one "
                                                  "that already exists: ua"),
            (("a", None, "u2"), errno.EINVAL, "Unable to change uuid of mapped device a to u2 because uuid "
                                              "is already set to ua")]:
        with pytest.raises(DMError) as e:
            m.rename(*args)
        assert errno_of(e) == err
        assert m.read_log() == ["device-mapper: ioctl: " + line]
    m.rename("b", None, "ub")
    assert m.info("b").uuid == "ub"


async def test_image_numbers(tmp_path, monkeypatch):
    """One minor of IMAGE_MAJOR per image file, first opened first, kept after the file is
    closed; a table names the image by it; on by default, paths with image_numbers=False or
    DMSIM_IMAGE_NUMBERS=0 (a value other than 0/1 is refused, not guessed)."""
    from dmsim.resolve import IMAGE_MAJOR
    paths = []
    for name in ("a", "b"):
        p = tmp_path / name
        p.write_bytes(bytes(1 << 20))
        paths.append(str(p))
    monkeypatch.delenv("DMSIM_IMAGE_NUMBERS", raising=False)
    async with dmsim.open_manager() as m:
        await mk(m, "x", "0 8 linear %s 0\n8 8 linear %s 0" % (paths[1], paths[0]))
        assert [t.params for t in m.table_lines("x")] == ["%d:0 0" % IMAGE_MAJOR, "%d:1 0" % IMAGE_MAJOR]
        await m.remove("x")
        assert m.image_files() == {(IMAGE_MAJOR, 0): paths[1], (IMAGE_MAJOR, 1): paths[0]}
        await mk(m, "y", "0 8 linear %d:1 0" % IMAGE_MAJOR)
        assert m.table_lines("y")[0].params == "%d:1 0" % IMAGE_MAJOR
        assert m.deps("y")[0].path == paths[0]
        assert (m.image_path("%d:1" % IMAGE_MAJOR), m.image_ref(paths[1])) == (paths[0], "%d:0" % IMAGE_MAJOR)
        with pytest.raises(DMError) as e:
            await mk(m, "z", "0 8 linear %d:7 0" % IMAGE_MAJOR)
        assert errno_of(e) == errno.ENODEV
    async with dmsim.open_manager(image_numbers=False) as m:
        await mk(m, "x", "0 8 linear %s 0" % paths[0])
        assert m.table_lines("x")[0].params == "%s 0" % paths[0]
        assert m.image_ref(paths[0]) == paths[0]
    monkeypatch.setenv("DMSIM_IMAGE_NUMBERS", "0")
    async with dmsim.open_manager() as m:
        await mk(m, "x", "0 8 linear %s 0" % paths[0])
        assert m.table_lines("x")[0].params == "%s 0" % paths[0]
    async with dmsim.open_manager(image_numbers=True) as m:     # the argument wins
        await mk(m, "x", "0 8 linear %s 0" % paths[0])
        assert m.table_lines("x")[0].params == "%d:0 0" % IMAGE_MAJOR
    monkeypatch.setenv("DMSIM_IMAGE_NUMBERS", "yes")
    with pytest.raises(ValueError, match="DMSIM_IMAGE_NUMBERS"):
        async with dmsim.open_manager():
            pass
