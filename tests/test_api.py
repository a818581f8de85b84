"""The Python API: AsyncDM (in Trio) and the blocking DM (a loop in a helper thread)."""
import errno

import pytest

from dmsim.api import DM, DmsetupError, open_dm
from dmsim.errors import DMError


@pytest.fixture
def img(tmp_path):
    path = tmp_path / "vda"
    path.write_bytes(bytes(range(256)) * 2 * 64)
    return str(path)


async def test_async_create_read_write_and_dmsetup(img):
    async with open_dm() as dm:
        info = await dm.create("lz", "0 32 linear %s 0\n32 32 zero" % img)
        assert (info.name, info.minor, info.target_count, info.live_table) == ("lz", 0, 2, True)
        await dm.write("lz", 1000, b"hello")
        assert await dm.read("lz", 998, 9) == bytes([230, 231]) + b"hello" + bytes([237, 238])
        await dm.write("lz", 32 * 512, b"dropped")
        assert await dm.read("lz", 32 * 512, 7) == bytes(7)
        await dm.flush("lz")
        assert await dm.dmsetup("status", "lz") == "0 32 linear \n32 32 zero \n"
        assert [ln.type for ln in dm.status("lz")] == ["linear", "zero"]
        assert dm.table("lz")[0].params == "240:0 0"       # image files print as numbers
        assert dm.image_path("240:0") == img and dm.image_ref(img) == "240:0"
        r = await dm.run("info", "nosuch")
        assert (r.stdout, r.stderr, r.rc) == ("", "Device does not exist.\nCommand failed.\n", 1)
        with pytest.raises(DmsetupError) as ei:
            await dm.dmsetup("remove", "nosuch")
        assert ei.value.rc == 1
        assert "No such device or address" in ei.value.stderr
    with open(img, "rb") as f:
        f.seek(1000)
        assert f.read(5) == b"hello"


async def test_async_failed_create_removes_device_and_logs(img):
    async with open_dm() as dm:
        with pytest.raises(DMError) as ei:
            await dm.create("bad", "0 8 linear %s" % img)
        assert ei.value.errno == errno.EINVAL
        assert dm.klog() == ["device-mapper: table: 253:0: linear: Invalid argument count (-EINVAL)",
                             "device-mapper: ioctl: error adding target to table"]
        assert dm.manager.names() == []
        with pytest.raises(DMError):
            await dm.create("big", "0 99999 linear %s 0" % img)
        assert dm.manager.names() == []


async def test_async_reload_suspend_message_wait(img):
    async with open_dm() as dm:
        await dm.create("r", "0 8 zero", uuid="u-1")
        assert dm.info("r").uuid == "u-1"
        await dm.reload("r", "0 16 linear %s 0" % img)
        assert dm.info("r").target_count == 1 and dm.device("r").size_sectors == 16
        assert await dm.read("r", 0, 2) == bytes([0, 1])
        await dm.suspend("r")
        assert dm.info("r").suspended
        await dm.resume("r")
        with pytest.raises(DMError) as ei:
            await dm.message("r", 0, "hello")
        assert ei.value.errno == errno.EINVAL
        await dm.dmsetup("rename", "r", "r2")
        assert (await dm.wait("r2", 0)).event_nr == 1
        await dm.remove("r2")
        assert await dm.dmsetup("ls") == "No devices found\n"


def test_blocking_dm(img):
    with DM() as dm:
        dm.create("z", "0 8 zero")
        assert dm.read("z", 0, 4096) == bytes(4096)
        dm.create("l", "0 8 linear %s 8" % img)
        dm.write("l", 0, b"\xff" * 512)
        assert dm.read("l", 0, 513) == b"\xff" * 512 + bytes([0])
        assert dm.dmsetup("ls") == "l\t(253:1)\nz\t(253:0)\n"
        assert dm.info("z").target_count == 1
        with pytest.raises(DmsetupError):
            dm.dmsetup("info", "nosuch")
        with pytest.raises(DMError) as ei:
            dm.create("z", "0 8 zero")
        assert ei.value.errno == errno.EBUSY
    with open(img, "rb") as f:
        f.seek(8 * 512)
        assert f.read(512) == b"\xff" * 512


async def test_tables_take_paths_and_numbers_and_print_numbers(img, tmp_path):
    """A table names an image by path or by the number it got; output shows the number,
    which image_path maps back (what a test needs to compare strings)."""
    other = tmp_path / "vdb"
    other.write_bytes(bytes(8192))
    async with open_dm() as dm:
        await dm.create("a", "0 16 linear %s 0" % other)
        await dm.create("b", "0 8 linear %s 0\n8 8 linear 240:0 8" % img)
        assert [ln.params for ln in dm.table("b")] == ["240:1 0", "240:0 8"]
        assert (dm.image_path("240:1"), dm.image_path((240, 0))) == (img, str(other))
        assert await dm.dmsetup("deps", "-o", "devname", "b") == \
            "2 dependencies\t: (%s) (%s)\n" % (other, img)
        for bad in ("240:9", "253:0", "vda", "240:x"):
            with pytest.raises(DMError) as ei:
                dm.image_path(bad)
            assert ei.value.errno == errno.ENODEV
        with pytest.raises(DMError):
            dm.image_ref(str(tmp_path / "never-opened"))


async def test_image_paths_opt_out(img):
    """image_numbers=False: image files print by their symlink-free path, as before."""
    async with open_dm(image_numbers=False) as dm:
        await dm.create("lz", "0 8 linear %s 0" % img)
        assert dm.table("lz")[0].params == "%s 0" % img
        assert dm.image_ref(img) == img


def test_blocking_image_paths_opt_out(img):
    """The blocking DM takes the same opt-out."""
    with DM(image_numbers=False) as dm:
        dm.create("lz", "0 8 linear %s 0" % img)
        assert dm.dmsetup("table", "lz") == "0 8 linear %s 0\n" % img


def test_blocking_dm_rejects_private_attributes():
    with DM() as dm:
        with pytest.raises(AttributeError):
            _ = dm._nothing
        assert dm.manager.names() == []


def test_import_without_pyfuse3():
    """In-process users need only trio: the engine, API and targets import with pyfuse3
    missing (only dmsim.fuse needs it)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['pyfuse3'] = None\n"
            "import dmsim, dmsim.api, dmsim.dmsetup, dmsim.pytest_plugin, dmsim.daemon\n"
            "from dmsim.targets import base; assert {t.name for t in base.registered()} >= "
            "{'linear', 'zero', 'error', 'flakey', 'dust', 'delay', 'snapshot', 'snapshot-origin', "
            "'snapshot-merge', 'mirror'}\n"
            "try:\n    import dmsim.fuse\nexcept ImportError:\n    print('fuse needs pyfuse3')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "fuse needs pyfuse3\n"
