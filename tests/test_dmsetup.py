"""dmsetup output, byte for byte: conformance.md section B (items 24-61) and tables.md.

Each test drives :func:`dmsim.dmsetup.run` over a :class:`LocalControl`.  A 16 MiB image
file named ``vda`` stands in for ``/dev/vda``: where the kernel prints ``254:0`` dmsim
prints the image's number (``240:N``), and its log lines name the file's basename, ``vda``.
"""
import errno
import os

import pytest
import trio
import trio.testing

import dmsim
from dmsim import dmsetup
from dmsim.bio import Op
from dmsim.blockdev import BlockDevice
from dmsim.control import LocalControl
from dmsim.errors import DMError
from dmsim.targets import base as tbase

VDA_SECTORS = 32768
EINVAL_RELOAD = "device-mapper: reload ioctl on %s (253:%d) failed: Invalid argument\nCommand failed.\n"


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


class Env:
    def __init__(self, m, vda, vdb):
        self.m = m
        self.ctl = LocalControl(m)
        self.vda = vda
        self.vdb = vdb

    async def sh(self, *argv, stdin=None):
        return await dmsetup.run(self.ctl, list(argv), stdin)

    async def ok(self, *argv, stdin=None) -> str:
        out, err, rc = await self.sh(*argv, stdin=stdin)
        assert (err, rc) == ("", 0), (argv, out, err)
        return out

    def klog(self):
        return self.m.read_log()

    def num(self, path) -> str:
        """How tables print an image file: its device number (issue 13, item 7)."""
        return self.m.image_ref(path)


@pytest.fixture
async def env(tmp_path):
    vda = tmp_path / "vda"
    vda.write_bytes(b"")
    with open(vda, "r+b") as f:
        f.truncate(VDA_SECTORS * 512)
    vdb = tmp_path / "vdb"
    with open(vdb, "wb") as f:
        f.truncate(16384 * 512)
    async with dmsim.open_manager() as m:
        yield Env(m, str(vda), str(vdb))


def lz_table(vda):
    return "0 8192 linear %s 0\n8192 4096 zero\n12288 8192 linear %s 16384" % (vda, vda)


async def make_lz(env):
    await env.ok("create", "lz", "--table", lz_table(env.vda))


# -- 24-30: listing an empty system and a three-segment device -----------------------------
@pytest.mark.parametrize("argv", [["ls"], ["info"], ["info", "-c"], ["status"], ["table"], ["deps"]])
async def test_24_no_devices(env, argv):
    assert await env.sh(*argv) == ("No devices found\n", "", 0)


async def test_25_26_table_status_size(env):
    await make_lz(env)
    v = env.num(env.vda)
    assert await env.ok("table", "lz") == \
        "0 8192 linear %s 0\n8192 4096 zero \n12288 8192 linear %s 16384\n" % (v, v)
    assert await env.ok("status", "lz") == "0 8192 linear \n8192 4096 zero \n12288 8192 linear \n"
    assert env.m.find("lz").size_sectors == 20480
    assert env.klog() == []


async def test_27_info_block(env):
    await make_lz(env)
    assert await env.ok("info", "lz") == (
        "Name:              lz\n"
        "State:             ACTIVE\n"
        "Read Ahead:        256\n"
        "Tables present:    LIVE\n"
        "Open count:        0\n"
        "Event number:      0\n"
        "Major, minor:      253, 0\n"
        "Number of targets: 3\n"
        "\n")


async def test_28_info_columns(env):
    await make_lz(env)
    out = await env.ok("info", "-c", "lz")
    head = "Name             Maj Min Stat Open Targ Event  UUID                            "
    row = "lz               253   0 L--w    0    3      0                                 "
    assert out == head + "\n" + row + "\n"
    assert len(head) == len(row) == 79


async def test_29_noheadings_ls_deps(env):
    await make_lz(env)
    assert await env.ok("info", "-c", "--noheadings", "lz") == "lz:253:0:L--w:0:3:0:\n"
    assert await env.ok("ls") == "lz\t(253:0)\n"
    assert await env.ok("deps", "lz") == "1 dependencies\t: (%s)\n" % env.num(env.vda).replace(":", ", ")
    assert await env.ok("deps", "-o", "devname", "lz") == "1 dependencies\t: (%s)\n" % os.path.realpath(env.vda)
    assert await env.ok("deps", "-o", "blkdevname", "lz") == "1 dependencies\t: (vda)\n"


async def test_30_all_devices_prefixed_and_sorted(env):
    await make_lz(env)
    await env.ok("create", "e1", "--table", "0 100 error")
    v = env.num(env.vda)
    assert await env.ok("table") == (
        "e1: 0 100 error \n"
        "lz: 0 8192 linear %s 0\n"
        "lz: 8192 4096 zero \n"
        "lz: 12288 8192 linear %s 16384\n" % (v, v))
    assert await env.ok("ls") == "e1\t(253:1)\nlz\t(253:0)\n"


async def test_ls_sorted_by_bytes_not_creation(env):
    for name in ("b", "B", "a", "_"):
        await env.ok("create", name, "--table", "0 8 zero")
    assert await env.ok("ls") == "B\t(253:1)\n_\t(253:3)\na\t(253:2)\nb\t(253:0)\n"


# -- 31-37: refused creates ---------------------------------------------------------------------
async def test_31_duplicate_name(env):
    await make_lz(env)
    assert await env.sh("create", "lz", "--table", "0 8 zero") == \
        ("", "device-mapper: create ioctl on lz  failed: Device or resource busy\nCommand failed.\n", 1)
    assert await env.ok("table", "lz") != ""   # the original is untouched
    assert env.m.find("lz").size_sectors == 20480


@pytest.mark.parametrize("name,table", [("g1", "0 8 zero\n16 8 zero"), ("g2", "8 8 zero"),
                                        ("g3", "0 8 zero\n4 8 zero")])
async def test_32_gap_in_table(env, name, table):
    assert await env.sh("create", name, "--table", table) == ("", EINVAL_RELOAD % (name, 0), 1)
    assert await env.sh("ls") == ("No devices found\n", "", 0)
    assert env.klog() == ["device-mapper: table: 253:0: zero: Gap in table (-EINVAL)",
                          "device-mapper: ioctl: error adding target to table"]


async def test_33_zero_length_and_unknown_type(env):
    await env.ok("create", "keep", "--table", "0 8 zero")   # so the failures use minor 1
    assert await env.sh("create", "g", "--table", "0 0 zero") == ("", EINVAL_RELOAD % ("g", 1), 1)
    assert env.klog() == ["device-mapper: table: 253:1: zero-length target",
                          "device-mapper: ioctl: error adding target to table"]
    assert await env.sh("create", "g", "--table", "0 8 nosuchtarget") == ("", EINVAL_RELOAD % ("g", 1), 1)
    assert env.klog() == ["device-mapper: table: 253:1: nosuchtarget: unknown target type",
                          "device-mapper: ioctl: error adding target to table"]
    assert await env.ok("ls") == "keep\t(253:0)\n"


async def test_34_device_too_small_at_first_load(env):
    assert await env.sh("create", "g", "--table", "0 40000 linear %s 0" % env.vda) == \
        ("", EINVAL_RELOAD % ("g", 0), 1)
    assert env.klog() == [
        "device-mapper: table: 253:0: vda too small for target: start=0, len=40000, dev_size=32768",
        "device-mapper: core: Cannot calculate initial queue limits",
        "device-mapper: ioctl: unable to set up device queue for new table.",
    ]
    assert env.m.devices == {}
    assert env.m._files == {}   # the image was released again


async def test_35_last_sectors_of_the_device(env):
    await env.ok("create", "g", "--table", "0 8 linear %s 32760" % env.vda)
    assert await env.sh("create", "h", "--table", "0 8 linear %s 32761" % env.vda) == \
        ("", EINVAL_RELOAD % ("h", 1), 1)
    assert env.klog()[0] == \
        "device-mapper: table: 253:1: vda too small for target: start=32761, len=8, dev_size=32768"


async def test_36_client_side_refusals(env):
    assert await env.sh("create", "g", "--table", "garbage") == \
        ("", "Invalid format on line 1 of table .\nCommand failed.\n", 1)
    assert await env.sh("create", "bad/name", "--table", "0 8 zero") == \
        ("", 'Name "bad/name" invalid. It contains "/".\nCommand failed.\n', 1)
    long = "n" * 128
    assert await env.sh("create", long, "--table", "0 8 zero") == \
        ("", 'Name "%s" too long.\nCommand failed.\n' % long, 1)
    assert env.m.devices == {}
    await env.ok("create", "n" * 127, "--table", "0 8 zero")
    assert env.klog() == []


async def test_36_invalid_format_names_its_line_and_source(env, tmp_path):
    assert await env.sh("create", "g", "--table", "0 8 zero\n\n# c\n8 x zero") == \
        ("", "Invalid format on line 4 of table .\nCommand failed.\n", 1)
    assert await env.sh("create", "g", stdin="0 8\n") == \
        ("", "Invalid format on line 1 of table on stdin.\nCommand failed.\n", 1)
    f = tmp_path / "t.tab"
    f.write_text("0 8 zero\n1\n")
    assert await env.sh("create", "g", str(f)) == \
        ("", "Invalid format on line 2 of table %s.\nCommand failed.\n" % f, 1)
    assert env.m.devices == {}


@pytest.mark.parametrize("argv", [["info", "nosuch"], ["info", "-c", "nosuch"], ["status", "nosuch"]])
async def test_37_missing_device_info(env, argv):
    assert await env.sh(*argv) == ("", "Device does not exist.\nCommand failed.\n", 1)


@pytest.mark.parametrize("verb", ["table", "remove", "deps", "suspend", "resume", "clear"])
async def test_37_missing_device_ioctl(env, verb):
    op = {"table": "table"}.get(verb, verb)
    assert await env.sh(verb, "nosuch") == \
        ("", "device-mapper: %s ioctl on nosuch  failed: No such device or address\nCommand failed.\n" % op, 1)


async def test_37_missing_device_load_rename_message_wait(env):
    nx = "device-mapper: %s ioctl on nosuch  failed: No such device or address\nCommand failed.\n"
    assert await env.sh("load", "nosuch", "--table", "0 8 zero") == ("", nx % "reload", 1)
    assert await env.sh("rename", "nosuch", "x") == ("", nx % "rename", 1)
    assert await env.sh("message", "nosuch", "0", "hi") == ("", nx % "message", 1)
    assert await env.sh("wait", "nosuch") == ("", nx % "waitevent", 1)


# -- 38-45: a device through its table slots ---------------------------------------------------
async def test_38_to_45_table_slots(env):
    await env.ok("create", "nt", "--notable")
    assert (await env.ok("info", "-c", "--noheadings", "nt")) == "nt:253:0:---w:0:0:0:\n"
    assert await env.ok("table", "nt") == "\n"
    assert await env.ok("deps", "nt") == "0 dependencies\t:\n"
    # 39
    await env.ok("load", "nt", "--table", "0 16 zero")
    assert await env.ok("info", "-c", "--noheadings", "nt") == "nt:253:0:-I-w:0:0:0:\n"
    assert await env.ok("table", "nt") == "\n"
    assert await env.ok("table", "--inactive", "nt") == "0 16 zero \n"
    info = await env.ok("info", "nt")
    assert "Tables present:    INACTIVE\n" in info and "Number of targets: 0\n" in info
    # 40
    await env.ok("resume", "nt")
    assert await env.ok("info", "-c", "--noheadings", "nt") == "nt:253:0:L--w:0:1:0:\n"
    # 41
    await env.ok("load", "nt", "--table", "0 32 error")
    assert "Tables present:    LIVE & INACTIVE\n" in await env.ok("info", "nt")
    assert await env.ok("info", "-c", "--noheadings", "-o", "attr", "nt") == "LI-w\n"
    assert await env.ok("table", "nt") == "0 16 zero \n"
    assert await env.ok("table", "--inactive", "nt") == "0 32 error \n"
    await env.ok("clear", "nt")
    assert "Tables present:    LIVE\n" in await env.ok("info", "nt")
    await env.ok("clear", "nt")   # no inactive table: a no-op
    # 42
    await env.ok("suspend", "nt")
    assert "State:             SUSPENDED\n" in await env.ok("info", "nt")
    assert await env.ok("info", "-c", "--noheadings", "-o", "attr", "nt") == "L-sw\n"
    await env.ok("suspend", "nt")
    assert await env.ok("info", "-c", "--noheadings", "-o", "attr", "nt") == "L-sw\n"
    # 43
    await env.ok("load", "nt", "--table", "0 64 zero")
    await env.ok("resume", "nt")
    assert env.m.find("nt").size_sectors == 64
    info = await env.ok("info", "nt")
    assert "State:             ACTIVE\n" in info and "Event number:      0\n" in info
    # 44
    await env.ok("rename", "nt", "nt2")
    assert "Event number:      1\n" in await env.ok("info", "nt2")
    await env.ok("rename", "nt2", "--setuuid", "myuuid-1")
    info = await env.ok("info", "nt2")
    assert "Event number:      2\n" in info and info.endswith("UUID: myuuid-1\n\n")
    assert await env.ok("info", "-c", "nt2") == (
        "Name             Maj Min Stat Open Targ Event  UUID                            \n"
        "nt2              253   0 L--w    0    1      2 myuuid-1                        \n")
    # 45
    assert await env.sh("rename", "nt2", "--setuuid", "other") == \
        ("", "device-mapper: rename ioctl on nt2  failed: Invalid argument\nCommand failed.\n", 1)
    assert env.klog()[-1] == ("device-mapper: ioctl: Unable to change uuid of mapped device nt2 to other "
                              "because uuid is already set to myuuid-1")
    await make_lz(env)
    busy = "device-mapper: rename ioctl on nt2  failed: Device or resource busy\nCommand failed.\n"
    assert await env.sh("rename", "nt2", "lz") == ("", busy, 1)
    assert await env.sh("rename", "nt2", "nt2") == ("", busy, 1)
    assert env.klog() == [
        "device-mapper: ioctl: Unable to change name on mapped device nt2 to one that already exists: lz",
        "device-mapper: ioctl: Unable to change name on mapped device nt2 to one that already exists: nt2"]
    assert "Event number:      2\n" in await env.ok("info", "nt2")


async def test_create_load_resume_suspend_clear_message_raise_no_event(env):
    await env.ok("create", "d", "--table", "0 8 zero")
    for argv in (["load", "d", "--table", "0 16 zero"], ["suspend", "d"], ["resume", "d"],
                 ["load", "d", "--table", "0 8 zero"], ["clear", "d"], ["suspend", "--noflush", "d"],
                 ["resume", "d"]):
        await env.ok(*argv)
    assert env.m.find("d").event_nr == 0


# -- 46-49: read-only, uuids, open counts, deferred remove ------------------------------------
async def test_46_read_only_table(env):
    await env.ok("create", "ro1", "-r", "--table", "0 16 linear %s 0" % env.vda)
    assert "State:             ACTIVE (READ-ONLY)\n" in await env.ok("info", "ro1")
    assert await env.ok("info", "-c", "--noheadings", "-o", "attr", "ro1") == "L--r\n"
    md = env.m.find("ro1")
    with pytest.raises(DMError) as ei:
        await md.write(0, bytes(4096))
    assert ei.value.errno == errno.EPERM
    assert await md.read(0, 8) == bytes(4096)
    await env.ok("suspend", "ro1")
    assert "State:             SUSPENDED (READ-ONLY)\n" in await env.ok("info", "ro1")
    assert await env.ok("info", "-c", "--noheadings", "-o", "attr", "ro1") == "L-sr\n"


async def test_46_inactive_read_only_reported_with_inactive(env):
    await env.ok("create", "rw", "--table", "0 16 zero")
    await env.ok("load", "rw", "-r", "--table", "0 16 zero")
    assert await env.ok("info", "-c", "--noheadings", "-o", "attr", "rw") == "LI-w\n"
    assert await env.ok("info", "-c", "--noheadings", "--inactive", "-o", "attr", "rw") == "LI-r\n"
    await env.ok("resume", "rw")
    assert await env.ok("info", "-c", "--noheadings", "-o", "attr", "rw") == "L--r\n"


async def test_47_duplicate_uuid(env):
    await env.ok("create", "u1", "-u", "some-uuid", "--table", "0 16 zero")
    assert await env.sh("create", "u2", "-u", "some-uuid", "--table", "0 8 zero") == \
        ("", "device-mapper: create ioctl on u2 some-uuid failed: Device or resource busy\nCommand failed.\n", 1)
    assert await env.ok("ls") == "u1\t(253:0)\n"


async def test_48_open_device_cannot_be_removed(env):
    await env.ok("create", "ro1", "-r", "--table", "0 16 linear %s 0" % env.vda)
    md = env.m.open("ro1")
    assert "Open count:        1\n" in await env.ok("info", "ro1")
    assert await env.sh("remove", "ro1") == \
        ("", "device-mapper: remove ioctl on ro1  failed: Device or resource busy\nCommand failed.\n", 1)
    env.m.close(md)
    await env.ok("remove", "ro1")
    assert await env.ok("ls") == "No devices found\n"


async def test_49_deferred_remove(env):
    await env.ok("create", "dr", "--table", "0 16 zero")
    md = env.m.open("dr")
    await env.ok("remove", "--deferred", "dr")
    assert "State:             ACTIVE (DEFERRED REMOVE)\n" in await env.ok("info", "dr")
    env.m.close(md)
    await trio.testing.wait_all_tasks_blocked()
    assert await env.sh("info", "dr") == ("", "Device does not exist.\nCommand failed.\n", 1)


async def test_49_cancel_deferred_remove(env):
    await env.ok("create", "dr", "--table", "0 16 zero")
    md = env.m.open("dr")
    await env.ok("remove", "--deferred", "dr")
    assert await env.ok("message", "dr", "0", "@cancel_deferred_remove") == ""
    assert "State:             ACTIVE\n" in await env.ok("info", "dr")
    env.m.close(md)
    await trio.testing.wait_all_tasks_blocked()
    assert await env.ok("ls") == "dr\t(253:0)\n"


async def test_deferred_remove_of_unopened_device_is_immediate(env):
    await env.ok("create", "dr", "--table", "0 16 zero")
    await env.ok("remove", "--deferred", "dr")
    assert await env.ok("ls") == "No devices found\n"


# -- 50: stacking ------------------------------------------------------------------------------
async def test_50_stacking(env):
    await env.ok("create", "base", "--table", "0 16384 linear %s 0" % env.vda)
    await env.ok("create", "top", "--table", "0 100 linear /dev/mapper/base 10")
    assert await env.ok("table", "top") == "0 100 linear 253:0 10\n"
    assert "Open count:        1\n" in await env.ok("info", "base")
    assert await env.ok("deps", "-o", "devname", "top") == "1 dependencies\t: (base)\n"
    assert await env.ok("deps", "-o", "blkdevname", "top") == "1 dependencies\t: (dm-0)\n"
    assert await env.ok("deps", "top") == "1 dependencies\t: (253, 0)\n"
    assert await env.sh("remove", "base") == \
        ("", "device-mapper: remove ioctl on base  failed: Device or resource busy\nCommand failed.\n", 1)
    await env.ok("remove_all")
    assert await env.ok("ls") == "No devices found\n"
    assert env.m._files == {}


async def test_50_stack_by_number_and_data_path(env):
    with open(env.vda, "r+b") as f:
        f.seek(10 * 512)
        f.write(b"\x5a" * 512)
    await env.ok("create", "base", "--table", "0 16384 linear %s 0" % env.vda)
    await env.ok("create", "mid", "--table", "0 1000 linear 253:0 8")
    await env.ok("create", "top", "--table", "0 100 linear /dev/mapper/mid 2")
    assert await env.ok("table", "top") == "0 100 linear 253:1 2\n"
    assert await env.m.find("top").read(0, 1) == b"\x5a" * 512
    assert await env.ok("info", "-c", "--noheadings", "-o", "name,open") == "base:1\nmid:1\ntop:0\n"
    await env.ok("remove", "top")
    assert await env.ok("info", "-c", "--noheadings", "-o", "name,open") == "base:1\nmid:0\n"


async def test_stacking_on_a_missing_dm_device_fails_enodev(env):
    await env.ok("create", "keep", "--table", "0 8 zero")
    out, err, rc = await env.sh("create", "top", "--table", "0 8 linear /dev/mapper/nosuch 0")
    assert (out, err, rc) == ("", "device-mapper: reload ioctl on top (253:1) failed: No such device\n"
                                  "Command failed.\n", 1)
    assert env.klog() == ["device-mapper: table: 253:1: linear: Device lookup failed (-ENODEV)",
                          "device-mapper: ioctl: error adding target to table"]


async def test_remove_all_leaves_open_devices(env):
    await env.ok("create", "a", "--table", "0 8 zero")
    await env.ok("create", "b", "--table", "0 8 zero")
    md = env.m.open("a")
    await env.ok("remove_all")
    assert await env.ok("ls") == "a\t(253:0)\n"
    assert env.klog() == ["device-mapper: ioctl: remove_all left 1 open device(s)"]
    env.m.close(md)


# -- 51: wait --------------------------------------------------------------------------------------
async def test_51_wait(env, autojump_clock):
    await env.ok("create", "ev", "--table", "0 8 zero")
    results = []

    async def waiter(*argv):
        results.append(await env.sh(*argv))

    async with trio.open_nursery() as n:
        n.start_soon(waiter, "wait", "ev", "0")
        await trio.sleep(10)
        assert results == []
        await env.ok("rename", "ev", "ev2")
        await trio.sleep(0.1)
        assert results == [("", "", 0)]
    with trio.fail_after(0.01):
        assert await env.sh("wait", "ev2", "0") == ("", "", 0)
        assert await env.sh("wait", "ev2", "5") == ("", "", 0)
        assert await env.sh("wait", "ev2") == ("", "", 0)
    results.clear()
    async with trio.open_nursery() as n:
        n.start_soon(waiter, "wait", "ev2", "1")
        await trio.sleep(10)
        assert results == []
        await env.ok("rename", "ev2", "ev3")
    assert results == [("", "", 0)]
    assert (await env.ok("wait", "-v", "ev3", "0")).startswith("Name:              ev3\n")


async def test_wait_on_fresh_device_defaults_to_zero_and_blocks(env, autojump_clock):
    await env.ok("create", "ev", "--table", "0 8 zero")
    with trio.move_on_after(100) as cs:
        await env.sh("wait", "ev")
    assert cs.cancelled_caught


async def test_wait_released_by_remove(env, autojump_clock):
    await env.ok("create", "ev", "--table", "0 8 zero")
    results = []

    async def waiter():
        results.append(await env.sh("wait", "ev", "0"))

    async with trio.open_nursery() as n:
        n.start_soon(waiter)
        await trio.sleep(1)
        await env.ok("remove", "ev")
    # the kernel raises a table event at removal: the waiter returns success (oracle)
    assert results == [("", "", 0)]


async def test_wait_on_removed_device_without_table_fails(env, autojump_clock):
    """No live table, so removal raises no event: the kernel waiter sleeps on; dmsim fails
    it with ENXIO instead of leaving it hanging."""
    await env.ok("create", "ev", "--notable")
    results = []

    async def waiter():
        results.append(await env.sh("wait", "ev", "0"))

    async with trio.open_nursery() as n:
        n.start_soon(waiter)
        await trio.sleep(1)
        await env.ok("remove", "ev")
    assert results == [("", "device-mapper: waitevent ioctl on ev  failed: No such device or address\n"
                            "Command failed.\n", 1)]


# -- 52-55: load/resume edge cases --------------------------------------------------------------
async def test_52_failed_limits_at_resume(env):
    await env.ok("create", "x", "--table", "0 8 linear %s 0" % env.vda)
    await env.ok("load", "x", "--table", "0 40000 linear %s 0" % env.vda)
    assert env.klog() == []
    assert await env.sh("resume", "x") == \
        ("", "device-mapper: resume ioctl on x  failed: Invalid argument\nCommand failed.\n", 1)
    assert env.klog() == [
        "device-mapper: table: 253:0: vda too small for target: start=0, len=40000, dev_size=32768"]
    info = await env.ok("info", "x")
    assert "State:             SUSPENDED\n" in info and "Tables present:    LIVE\n" in info
    assert await env.ok("table", "x") == "0 8 linear %s 0\n" % env.num(env.vda)
    await env.ok("resume", "x")
    assert "State:             ACTIVE\n" in await env.ok("info", "x")
    assert env.m.find("x").size_sectors == 8


async def test_53_notable_suspend_resume_message(env):
    await env.ok("create", "nt", "--notable")
    await env.ok("suspend", "nt")
    assert await env.sh("resume", "nt") == \
        ("", "device-mapper: resume ioctl on nt  failed: Invalid argument\nCommand failed.\n", 1)
    assert await env.ok("info", "-c", "--noheadings", "-o", "attr", "nt") == "--sw\n"
    env.klog()
    # 6.1 (conformance 31-notable): a device with no live table refuses messages
    assert await env.sh("message", "nt", "0", "hello") == \
        ("", "device-mapper: message ioctl on nt  failed: Invalid argument\nCommand failed.\n", 1)
    assert env.klog() == ["device-mapper: ioctl: The device has no table."]


async def test_54_empty_table(env):
    await make_lz(env)
    assert await env.sh("load", "lz", "--table", "") == \
        ("", "device-mapper: reload ioctl on lz  failed: Invalid argument\nCommand failed.\n", 1)
    assert env.klog() == ["device-mapper: ioctl: populate_table: no targets specified"]
    await env.ok("create", "emp", "--table", "")
    out, err, rc = await env.sh("info", "emp")      # no table loaded: no disk, as --notable
    assert "Tables present:    None\n" in out and "Read Ahead" not in out and rc == 0
    assert err == "/dev/mapper/emp: open failed: No such file or directory\n"
    await env.ok("create", "emp2", "--table", "# only a comment\n\n")
    assert await env.ok("info", "-c", "--noheadings", "-o", "attr", "emp2") == "---w\n"


async def test_55_comments_blank_lines_file_and_stdin(env, tmp_path):
    text = "# c\n\n  0 8 zero  # t\n8 8 error\n"
    f = tmp_path / "t.tab"
    f.write_text(text)
    await env.ok("create", "a", str(f))
    assert await env.ok("table", "a") == "0 8 zero \n8 8 error \n"
    await env.ok("create", "b", stdin=text)
    assert await env.ok("table", "b") == "0 8 zero \n8 8 error \n"
    await env.ok("create", "c", "--table", text)
    assert await env.ok("table", "c") == "0 8 zero \n8 8 error \n"
    await env.ok("load", "c", stdin="0 4 zero\n")
    assert await env.ok("table", "--inactive", "c") == "0 4 zero \n"


async def test_table_file_missing(env, tmp_path):
    out, err, rc = await env.sh("create", "a", str(tmp_path / "nope"))
    assert (out, rc) == ("", 1) and err.endswith("Command failed.\n")
    assert env.m.devices == {}


async def test_device_given_as_major_minor_of_a_dm_device_prints_as_such(env):
    await env.ok("create", "base", "--table", "0 64 zero")
    await env.ok("create", "t", "--table", "0 8 linear 253:0 0\n8 8 linear /dev/mapper/base 8")
    assert await env.ok("table", "t") == "0 8 linear 253:0 0\n8 8 linear 253:0 8\n"
    # the kernel opens each device once per table
    assert await env.ok("deps", "t") == "1 dependencies\t: (253, 0)\n"
    assert "Open count:        1\n" in await env.ok("info", "base")


async def test_backslash_escapes_in_arguments(env, tmp_path):
    d = tmp_path / "a b"
    d.mkdir()
    img = d / "img"
    with open(img, "wb") as f:
        f.truncate(64 * 512)
    await env.ok("create", "sp", "--table", "0 8 linear %s 0" % str(img).replace(" ", "\\ "))
    assert env.m.find("sp").live.targets[0].dev.path == str(img)


@pytest.mark.parametrize("word", ["x", "-1", "0x10", "8s", "1.5", "１"])
async def test_numbers_are_strict_decimal(env, word):
    assert await env.sh("create", "g", "--table", "0 8 linear %s %s" % (env.vda, word)) == \
        ("", EINVAL_RELOAD % ("g", 0), 1)
    assert env.klog() == ["device-mapper: table: 253:0: linear: Invalid device sector (-EINVAL)",
                          "device-mapper: ioctl: error adding target to table"]


@pytest.mark.parametrize("line", ["x 8 zero", "0 y zero", "- 8 zero", "0 \uff18 zero"])
async def test_start_and_length_must_be_numbers(env, line):
    assert await env.sh("create", "g", "--table", line) == \
        ("", "Invalid format on line 1 of table .\nCommand failed.\n", 1)


@pytest.mark.parametrize("line,klog", [
    # read as sscanf's %llu reads them; the kernel refuses them (oracle)
    ("-1 8 zero", "table: 253:0: too large device"),
    ("0 -1 zero", "table: 253:0: too large device"),
    ("0 18446744073709551616 zero", "table: 253:0: too large device"),
    ("0 0x8 zero", "table: 253:0: zero-length target"),
    ("0 8abc zero", "table: 253:0: abc: unknown target type"),
    ("0 8 zero#x", "table: 253:0: zero#x: unknown target type"),
])
async def test_numbers_read_as_strtoull(env, line, klog):
    assert await env.sh("create", "g", "--table", line) == \
        ("", "device-mapper: reload ioctl on g (253:0) failed: Invalid argument\nCommand failed.\n", 1)
    assert env.klog() == ["device-mapper: " + klog, "device-mapper: ioctl: error adding target to table"]


async def test_target_type_name_too_long(env):
    assert await env.sh("create", "g", "--table", "0 8 abcdefghijklmnopq") == \
        ("", "Target type name abcdefghijklmnopq is too long.\nCommand failed.\n", 1)
    assert await env.ok("ls") == "No devices found\n"


# -- 56-58: messages and --target -------------------------------------------------------------
async def test_56_message_routing(env):
    await env.ok("create", "lz2", "--table", "0 8 zero\n8 8192 dust %s 0 512" % env.vda)
    env.klog()
    assert await env.sh("message", "lz2", "8", "countbadblocks") == \
        ("countbadblocks: 0 badblock(s) found\n", "", 0)
    einval = "device-mapper: message ioctl on lz2  failed: Invalid argument\nCommand failed.\n"
    assert await env.sh("message", "lz2", "0", "countbadblocks") == ("", einval, 1)
    assert env.klog() == ["device-mapper: ioctl: Target type does not support messages"]
    assert await env.sh("message", "lz2", "8199", "countbadblocks") == \
        ("countbadblocks: 0 badblock(s) found\n", "", 0)
    assert await env.sh("message", "lz2", "8200", "countbadblocks") == ("", einval, 1)
    assert env.klog() == ["device-mapper: ioctl: Target message sector outside device."]


async def test_57_message_client_errors(env):
    await env.ok("create", "m", "--table", "0 8 zero")
    assert await env.sh("message", "m", "0") == \
        ("", "No message supplied.\ndevice-mapper: message ioctl on m  failed: Invalid argument\n"
             "Command failed.\n", 1)
    assert env.klog() == ["device-mapper: ioctl: Empty message received."]
    assert await env.sh("message", "m", "x", "hi") == ("", "Invalid sector.\nCommand failed.\n", 1)
    assert env.klog() == []


async def test_58_target_filters(env):
    await make_lz(env)
    await env.ok("create", "e1", "--table", "0 100 error")
    assert await env.ok("ls", "--target", "zero") == "lz\t(253, 0)\n"
    assert await env.ok("ls", "--target", "error") == "e1\t(253, 1)\n"
    assert await env.sh("table", "--target", "linear", "e1") == ("", "", 0)
    assert await env.ok("table", "--target", "zero", "lz") == "8192 4096 zero \n"
    assert await env.ok("status", "--target", "linear") == "lz: 0 8192 linear \nlz: 12288 8192 linear \n"


async def test_ls_output_options(env):
    await make_lz(env)
    assert await env.ok("ls", "-o", "devname") == "lz\t(lz)\n"
    assert await env.ok("ls", "-o", "blkdevname") == "lz\t(dm-0)\n"


# -- 59-60: logical block size alignment -----------------------------------------------------------
class _Dev4k(BlockDevice):
    logical_block_size = 4096
    kname = "fake4k"

    def __init__(self, size_sectors):
        self.size_sectors = size_sectors

    async def submit(self, bio):
        return bytes(bio.sectors * 512) if bio.op is Op.READ else None


class Lbs4k(tbase.Target):
    """A device of 4096-byte logical blocks, standing in for crypt's ``sector_size:4096``."""

    name = "test-lbs4k"

    async def ctr(self, args):
        self.dev = _Dev4k(self.len)

    async def map(self, bio):
        return await self.dev.submit(bio)

    def iterate_devices(self):
        return [(self.dev, 0, self.len)]


@pytest.fixture
def lbs4k():
    tbase.register(Lbs4k)
    yield
    tbase._registry.pop(Lbs4k.name, None)
    tbase._order.remove(Lbs4k.name)


LIMITS_TAIL = ["device-mapper: core: Cannot calculate initial queue limits",
               "device-mapper: ioctl: unable to set up device queue for new table."]


async def test_59_target_area_alignment(env, lbs4k):
    await env.ok("create", "c", "--table", "0 64 test-lbs4k")
    assert env.m.find("c").logical_block_size == 4096
    assert await env.sh("create", "m", "--table", "0 8 linear /dev/mapper/c 1") == \
        ("", EINVAL_RELOAD % ("m", 1), 1)
    assert env.klog() == ["device-mapper: table: 253:1: start=1 not aligned to h/w logical block size "
                          "4096 of dm-0"] + LIMITS_TAIL
    assert await env.sh("create", "m", "--table", "0 9 linear /dev/mapper/c 0") == \
        ("", EINVAL_RELOAD % ("m", 1), 1)
    assert env.klog() == ["device-mapper: table: 253:1: len=9 not aligned to h/w logical block size "
                          "4096 of dm-0"] + LIMITS_TAIL


@pytest.mark.parametrize("table,line", [
    ("0 4 zero\n4 8 linear /dev/mapper/c 0\n12 4 zero", "table line 1 (start sect 4 len 8)"),
    ("0 8 zero\n8 8 linear /dev/mapper/c 0\n16 4 zero", "table line 3 (start sect 16 len 4)"),
    ("0 8 linear /dev/mapper/c 0\n8 4 zero", "table line 2 (start sect 8 len 4)"),
])
async def test_60_table_alignment(env, lbs4k, table, line):
    await env.ok("create", "c", "--table", "0 64 test-lbs4k")
    assert await env.sh("create", "m", "--table", table) == ("", EINVAL_RELOAD % ("m", 1), 1)
    assert env.klog() == ["device-mapper: table: 253:1: %s not aligned to h/w logical block size 4096"
                          % line] + LIMITS_TAIL


async def test_60_aligned_table_gets_the_large_block_size(env, lbs4k):
    await env.ok("create", "c", "--table", "0 64 test-lbs4k")
    await env.ok("create", "m", "--table", "0 4 zero\n4 4 zero\n8 8 linear /dev/mapper/c 0")
    assert env.m.find("m").logical_block_size == 4096
    assert env.m.find("m").size_sectors == 16


async def test_61_version(env):
    assert await env.sh("version") == \
        ("Library version:   1.02.185 (2022-05-18)\nDriver version:    4.47.0\n", "", 0)


async def test_targets_lists_builtin_types_newest_first(env):
    out = await env.ok("targets")
    lines = out.splitlines()
    for name, ver in (("linear", "v1.4.0"), ("zero", "v1.1.0"), ("error", "v1.5.0")):
        assert "%-16s %s" % (name, ver) in lines


# -- recorded on the oracle (6.1, dmsetup 1.02.185) ------------------------------------------------
async def test_oracle_missing_table_file(env):
    assert await env.sh("create", "g", "/nonexist") == \
        ("", "Couldn't open '/nonexist' for reading.\nCommand failed.\n", 1)


async def test_oracle_ls_target_without_match_prints_nothing(env):
    assert await env.sh("ls", "--target", "zero") == ("No devices found\n", "", 0)
    await env.ok("create", "e1", "--table", "0 100 error")
    assert await env.sh("ls", "--target", "nosuch") == ("", "", 0)


async def test_oracle_remove_stops_at_first_failure(env):
    await env.ok("create", "t", "--table", "0 8 zero")
    await env.ok("create", "u", "--table", "0 8 zero")
    assert await env.sh("remove", "nosuch", "t") == \
        ("", "device-mapper: remove ioctl on nosuch  failed: No such device or address\nCommand failed.\n", 1)
    assert await env.ok("ls") == "t\t(253:0)\nu\t(253:1)\n"
    await env.ok("remove", "t", "u")
    assert await env.ok("ls") == "No devices found\n"


async def test_oracle_inactive_info_reports_inactive_table(env):
    await env.ok("create", "e1", "--table", "0 100 error")
    await env.ok("load", "e1", "-r", "--table", "0 16 zero")
    assert await env.ok("info", "--inactive", "e1") == (
        "Name:              e1\n"
        "State:             ACTIVE (READ-ONLY)\n"
        "Read Ahead:        256\n"
        "Tables present:    LIVE & INACTIVE\n"
        "Open count:        0\n"
        "Event number:      0\n"
        "Major, minor:      253, 0\n"
        "Number of targets: 1\n\n")
    assert await env.ok("info", "-c", "-o", "name,open", "e1") == "Name             Open\ne1                  0\n"


async def test_getopt_errors_like_dmsetup():
    """Recorded on the oracle (tests/conformance/11-dust): a negative number is an option."""
    async with dmsim.open_manager() as m:
        ctl = LocalControl(m)
        assert await dmsetup.run(ctl, ["message", "du", "0", "addbadblock", "-1"]) == (
            "", "dmsetup: invalid option -- '1'\nCouldn't process command line.\n", 1)
        out, err, rc = await dmsetup.run(ctl, ["ls", "--nosuch"])
        assert (err, rc) == ("dmsetup: unrecognized option '--nosuch'\nCouldn't process command line.\n", 1)
        out, err, rc = await dmsetup.run(ctl, ["info", "-co", "name", "--noheadings"])
        assert (out, rc) == ("No devices found\n", 0)


# -- names as libdm takes them: checks and auto mangling (recorded on the oracle) ------------------
async def test_names_too_long_for_every_command(env):
    long = "x" * 128
    for verb in (["create", long, "--table", "0 8 zero"], ["info", long], ["remove", long]):
        assert await env.sh(*verb) == ("", 'Name "%s" too long.\nCommand failed.\n' % long, 1)
    await env.ok("create", "z", "--table", "0 8 zero")
    assert await env.sh("rename", "z", long) == ("", 'Name "%s" too long\nCommand failed.\n' % long, 1)
    assert await env.sh("rename", "z", "a/b") == ("", 'Name "a/b" invalid. It contains "/".\nCommand failed.\n', 1)
    assert await env.sh("rename", "z", "") == ("", "Non empty new name is required.\nCommand failed.\n", 1)
    u129 = "u" * 129
    assert await env.sh("rename", "z", "--setuuid", u129) == \
        ("", 'Uuid "%s" too long\nCommand failed.\n' % u129, 1)
    assert await env.sh("create", "u2", "-u", u129, "--table", "0 8 zero") == \
        ("", 'Mangled form of the UUID too long for "%s".\nFailed to mangle device uuid "%s".\nCommand failed.\n'
         % (u129, u129), 1)
    await env.ok("create", "u1", "-u", "u" * 128, "--table", "0 8 zero")
    assert await env.sh("create", "", "--table", "0 8 zero") == \
        ("", "device-mapper: create ioctl on   failed: Invalid argument\nCommand failed.\n", 1)
    assert env.klog() == ["device-mapper: ioctl: name not supplied when creating device"]
    assert await env.ok("ls") == "u1\t(253:1)\nz\t(253:0)\n"


async def test_names_are_mangled_for_the_kernel_and_shown_unmangled(env):
    await env.ok("create", "a b", "--table", "0 8 zero")
    assert env.m.names() == ["a\\x20b"]                   # the kernel's name (udev's node name)
    assert await env.ok("ls") == "a b\t(253:0)\n"
    assert (await env.ok("info", "a b")).startswith("Name:              a b\n")
    assert await env.ok("table") == "a b: 0 8 zero \n"
    assert await env.sh("create", "a\\x20b", "--table", "0 8 zero") == \
        ("", "device-mapper: create ioctl on a\\x20b  failed: Device or resource busy\nCommand failed.\n", 1)
    assert (await env.ok("info", "a\\x20b")).startswith("Name:              a b\n")
    assert await env.sh("create", "a\\x20 b", "--table", "0 8 zero") == \
        ("", 'The name "a\\x20 b" contains mixed mangled and unmangled characters or it\'s already mangled '
             'improperly.\nFailed to mangle device name "a\\x20 b".\nCommand failed.\n', 1)
    assert await env.sh("create", "a\\x5cxb", "--table", "0 8 zero") == \
        ("", 'The name "a\\x5cxb" seems to be mangled more than once. This is not allowed in auto mode.\n'
             'Command failed.\n', 1)
    e40 = "\u00e9" * 40
    assert await env.sh("create", e40, "--table", "0 8 zero") == \
        ("", 'Mangled form of the name too long for "%s".\nFailed to mangle device name "%s".\nCommand failed.\n'
         % (e40, e40), 1)
    await env.ok("create", "u1", "-u", "u 1", "--table", "0 8 zero")
    assert "UUID: u 1\n" in await env.ok("info", "u1")
    assert env.m.info("u1").uuid == "u\\x201"
    await env.ok("create", "x\udcff", "--table", "0 8 zero")      # an argv byte that is not UTF-8
    assert "x\\xff" in env.m.names()
    await env.ok("rename", "a b", "c d")
    assert await env.ok("ls") == "c d\t(253:0)\nu1\t(253:1)\nx\udcff\t(253:2)\n"
    await env.ok("remove", "c d")
    # dmsetup's own quirk: a name typed mangled stays mangled, then shows unmangled and
    # cannot be found again under the name shown
    await env.ok("create", "q\\x41", "--table", "0 8 zero")
    assert (await env.sh("status"))[1].startswith("Device does not exist.\nCommand failed.\n")


async def test_names_given_as_paths(env):
    await env.ok("create", "u1", "--table", "0 8 zero")
    for path in ("/dev/mapper/u1", "mapper/u1"):
        assert (await env.ok("info", path)).startswith("Name:              u1\n")
    for path in ("nosuch/x", "/nosuch/x", "/dev/mapper/nosuch"):
        assert await env.sh("info", path) == ("", "Device %s not found\nCommand failed.\n" % path, 1)


# -- issue 13: dmsetup's own texts, table-less devices, verbs and options ----------------------
async def test_usage_help_unknown_and_argument_counts(env):
    """dmsetup's usage goes to stderr: alone for no command (exit 1) and for ``help`` (exit 0),
    after ``Unknown command.`` or ``Incorrect number of arguments.`` (conformance 30)."""
    assert await env.sh() == ("", dmsetup.USAGE, 1)
    assert await env.sh("help") == ("", dmsetup.USAGE, 0)
    assert await env.sh("--help") == ("", dmsetup.USAGE, 0)
    assert await env.sh("help", "-c") == ("", dmsetup.USAGE + dmsetup.field_help(), 0)
    assert await env.sh("nosuch") == ("", "Unknown command.\n" + dmsetup.USAGE, 1)
    for argv in (["rename"], ["message", "a"], ["setgeometry", "a", "1", "2", "3"], ["version", "x"],
                 ["create", "a", "b", "c"], ["rename", "a", "--setuuid", "u", "b"]):
        assert await env.sh(*argv) == ("", "Incorrect number of arguments.\n" + dmsetup.USAGE, 1), argv
    assert "\tsetgeometry <device> <cyl> <head> <sect> <start>\n" in dmsetup.USAGE


async def test_missing_arguments_messages(env):
    """Each verb's own message for a missing device, with ``Command failed.``."""
    failed = "\nCommand failed.\n"
    assert await env.sh("create") == ("", "Please provide a name for the new device." + failed, 1)
    assert await env.sh("load") == ("", "Please specify device." + failed, 1)
    for verb in ("suspend", "resume", "clear", "remove", "wait"):
        assert await env.sh(verb) == ("", "No device specified." + failed, 1), verb
    assert await env.sh("rename", "a") == ("", "No device specified." + failed, 1)
    assert await env.sh("message", "a", "x", "hi") == ("", "Invalid sector." + failed, 1)
    assert await env.sh("message", "a", "0") == \
        ("", "No message supplied.\ndevice-mapper: message ioctl on a  failed: No such device or address"
             + failed, 1)
    assert await env.sh("create", "n", "--notable", "--table", "0 8 zero") == \
        ("", "--table and --notable are incompatible.\nCouldn't process command line.\n", 1)


async def test_rename_of_missing_device_logs(env):
    assert (await env.sh("rename", "nosuch", "other"))[2] == 1
    assert (await env.sh("rename", "nosuch", "--setuuid", "u1"))[2] == 1
    assert env.klog() == ["device-mapper: ioctl: Unable to rename non-existent device, nosuch to other",
                          "device-mapper: ioctl: Unable to rename non-existent device, nosuch to uuid u1"]


async def test_stdout_after_errors_when_not_a_terminal(env):
    """A file or pipe gets dmsetup's stdout at exit, after the errors (stdio buffering)."""
    await env.ok("create", "t", "--table", "0 8 zero")
    chunks, rc = await dmsetup.run_chunks(env.ctl, ["status", "t", "nosuch"], stdout_tty=False)
    assert rc == 1
    assert "".join(t for _, t in chunks) == "Device does not exist.\nCommand failed.\nt: 0 8 zero \n"
    chunks, _ = await dmsetup.run_chunks(env.ctl, ["status", "t", "nosuch"], stdout_tty=True)
    assert "".join(t for _, t in chunks) == "t: 0 8 zero \nDevice does not exist.\nCommand failed.\n"


async def test_notable_info(env):
    """No disk before the first load: no ``Read Ahead:``, and dmsetup's failed open."""
    await env.ok("create", "n", "--notable")
    out, err, rc = await env.sh("info", "n")
    assert rc == 0 and "Read Ahead" not in out and "Tables present:    None\n" in out
    assert err == "/dev/mapper/n: open failed: No such file or directory\n"
    await env.ok("load", "n", "--table", "0 8 zero")
    assert "Read Ahead:        256\n" in await env.ok("info", "n")


async def test_setgeometry_ranges(env):
    """DM_DEV_SET_GEO: the kernel's three refusals and their log lines (conformance 32)."""
    await env.ok("create", "g", "--table", "0 8192 linear %s 0" % env.vda)
    await env.ok("setgeometry", "g", "65535", "255", "63", "8191")
    err = "device-mapper: setgeometry ioctl on g  failed: Invalid argument\nCommand failed.\n"
    for geo in (["65536", "1", "1", "0"], ["1", "256", "1", "0"], ["1", "1", "1", "2"],
                ["1", "1", "1", "18446744073709551616"], ["x", "1", "1", "0"], ["1", "1", "1", "4x"]):
        assert await env.sh("setgeometry", "g", *geo) == ("", err, 1), geo
    assert env.klog() == ["device-mapper: ioctl: Geometry exceeds range limits."] * 2 + \
        ["device-mapper: core: Start sector is beyond the geometry limits."] * 2 + \
        ["device-mapper: ioctl: Unable to interpret geometry settings."] * 2
    assert env.m.geometries[env.m.find("g")] == (65535, 255, 63, 8191)


async def test_selection_by_uuid_and_number(env):
    await env.ok("create", "a", "--table", "0 8 zero")
    await env.ok("create", "b", "-u", "b-uuid", "--table", "0 8 error")
    assert await env.ok("info", "-c", "-o", "name", "--noheadings", "-u", "b-uuid") == "b\n"
    assert await env.ok("info", "-c", "-o", "name", "--noheadings", "-j", "253", "-m", "0") == "a\n"
    assert await env.ok("table", "-u", "b-uuid") == "0 8 error \n"
    assert await env.sh("info", "-u", "nosuch") == ("", "Device does not exist.\nCommand failed.\n", 1)
    assert await env.sh("suspend", "-j", "253", "-m", "7") == \
        ("", "device-mapper: suspend ioctl on  (253:7) failed: No such device or address\nCommand failed.\n", 1)
    assert await env.sh("info", "-m", "0") == \
        ("", "Please specify both major number and minor number.\nCouldn't process command line.\n", 1)
    await env.ok("rename", "-u", "b-uuid", "c")
    assert await env.ok("ls") == "a\t(253:0)\nc\t(253:1)\n"


async def test_info_columns_fields_sort_and_help(env):
    await env.ok("create", "g", "--table", "0 8 linear %s 0" % env.vda)
    await env.ok("create", "s", "--table", "0 8 linear /dev/mapper/g 0")
    out = await env.ok("info", "-c", "-o", "name,devs_used,names_using_dev,read_ahead,device_count", "s", "g")
    assert out == ("Name             DevNamesUsed     RefNames RAhead #Devs\n"
                   "s                g                            256     1\n"
                   "g                vda              s           256     1\n")
    assert await env.ok("info", "-c", "--noheadings", "-o", "name,minor", "-O", "-minor") == "s:1\ng:0\n"
    assert await env.ok("info", "-c", "--separator", ",", "-o", "name,readahead", "g") == "Name,RAhead\ng,256\n"
    assert await env.sh("info", "-c", "-o", "live_table", "g") == \
        ("", dmsetup.field_help() + "Unrecognised field: live_table\n", 1)
    assert await env.sh("info", "-c", "-o", "help", "g") == ("", dmsetup.field_help(), 0)


async def test_ls_tree_options(env):
    """dm_tree as libdm links it, drawn as dmsetup draws it (ASCII: the C locale)."""
    await env.ok("create", "g", "--table", "0 8 linear %s 0" % env.vda)
    await env.ok("create", "h", "--table", "0 8 linear %s 0" % env.vdb)
    await env.ok("create", "s", "--table", "0 8 linear /dev/mapper/g 0\n8 8 linear /dev/mapper/h 0")
    a, b = env.num(env.vda), env.num(env.vdb)
    tree = dmsetup.DepTree()
    assert tree.num_children(tree.root, False) == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LC_ALL", "C")
        assert await env.ok("ls", "--tree") == \
            "s (253:2)\n |-h (253:1)\n |  `- (%s)\n `-g (253:0)\n    `- (%s)\n" % (b, a)
        assert await env.ok("ls", "--tree", "-o", "inverted,blkdevname,nodevice") == \
            " <vda>\n `-g <dm-0>\n    `-s <dm-2>\n <vdb>\n `-h <dm-1>\n    `-s <dm-2>\n"
        assert await env.ok("ls", "--tree", "-o", "compact") == \
            "s (253:2)-+-h (253:1)--- (%s)\n          `-g (253:0)--- (%s)\n" % (b, a)
        assert await env.ok("ls", "--tree", "-o", "active,open,rw,uuid") == \
            ("s (253:2) [ACTIVE, RW, 0, ]\n |-h (253:1) [ACTIVE, RW, 1, ]\n |  `- (%s)\n"
             " `-g (253:0) [ACTIVE, RW, 1, ]\n    `- (%s)\n" % (b, a))
        assert await env.sh("ls", "--tree", "-o", "devname") == \
            ("", "Tree options not recognised: devname.\nCouldn't process command line.\n", 1)
        mp.setenv("LC_ALL", "C.UTF-8")
        assert (await env.ok("ls", "--tree")).startswith("s (253:2)\n \u251c\u2500h")


async def test_mangle_reports_correct_forms(env):
    assert await env.ok("mangle") == "No devices found\n"
    await env.ok("create", "a", "--table", "0 8 zero")
    await env.ok("create", "b", "-u", "ub", "--table", "0 8 zero")
    assert await env.ok("mangle") == ("a: [no UUID]: name already in correct form\n"
                                      "b: ub: name and UUID already in correct form\n")
    assert await env.sh("mangle", "nosuch") == ("", "Command failed.\n", 1)


async def test_target_version_and_splitname(env):
    """Recorded in conformance 34-dmsetup-more."""
    assert await env.ok("target-version", "linear", "zero") == "linear           v1.4.0\nzero             v1.1.0\n"
    assert await env.sh("target-version", "nosuch") == \
        ("", "device-mapper: target-version ioctl on nosuch  failed: Invalid argument\nCommand failed.\n", 1)
    assert await env.ok("splitname", "vg-lv--x-layer") == "VG   LV   LVLayer\nvg   lv-x layer  \n"
    assert await env.ok("splitname", "vg-lv", "LVM") == "VG   LV   LVLayer\nvg   lv          \n"
