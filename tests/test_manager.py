"""Manager (the ioctl layer): minors, events, removal, stacking, failed loads."""
import errno
import os

import pytest
import trio
import trio.testing

import dmsim
from dmsim.errors import DMError
from dmsim.table import parse_table_text
from test_device import INSTANCES, register_all, unregister_all


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
    for bad in ("", "a/b", "x" * 128):
        with pytest.raises(DMError) as ei:
            m.create(bad)
        assert errno_of(ei) == errno.EINVAL
    m.create("x" * 127)
    with pytest.raises(DMError):
        m.create("u", uuid="y" * 129)


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
    assert got == [errno.ENXIO]
