"""lvm2's own status parsers (Debian's libdevmapper, through ctypes) on dmsim's status lines.

Every tool built on libdm reads ``dmsetup status`` with ``dm_get_status_*``; they need
``major:minor`` where the kernel prints numbers, so image files show device numbers
(issue 13, item 7; the default).  Skipped when libdevmapper is not installed (``scripts/setup`` installs
libdevmapper-dev).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

import pytest
import trio

from dmsim.resolve import IMAGE_MAJOR

LIB = ctypes.util.find_library("devmapper")
pytestmark = pytest.mark.skipif(LIB is None, reason="libdevmapper not installed (apt-get install libdevmapper-dev)")


class SnapshotStatus(ctypes.Structure):
    _fields_ = [("used_sectors", ctypes.c_uint64), ("total_sectors", ctypes.c_uint64),
                ("metadata_sectors", ctypes.c_uint64),
                ("has_metadata_sectors", ctypes.c_uint, 1), ("invalid", ctypes.c_uint, 1),
                ("merge_failed", ctypes.c_uint, 1), ("overflow", ctypes.c_uint, 1)]


class LegHealth(ctypes.Structure):
    _fields_ = [("health", ctypes.c_int), ("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class MirrorStatus(ctypes.Structure):
    _fields_ = [("total_regions", ctypes.c_uint64), ("insync_regions", ctypes.c_uint64),
                ("dev_count", ctypes.c_uint32), ("devs", ctypes.POINTER(LegHealth)),
                ("log_type", ctypes.c_char_p), ("log_count", ctypes.c_uint32),
                ("logs", ctypes.POINTER(LegHealth))]


class ThinPoolStatus(ctypes.Structure):
    _fields_ = [("transaction_id", ctypes.c_uint64), ("used_metadata_blocks", ctypes.c_uint64),
                ("total_metadata_blocks", ctypes.c_uint64), ("used_data_blocks", ctypes.c_uint64),
                ("total_data_blocks", ctypes.c_uint64), ("held_metadata_root", ctypes.c_uint64),
                ("read_only", ctypes.c_uint32), ("discards", ctypes.c_int),
                ("fail", ctypes.c_uint32, 1), ("error_if_no_space", ctypes.c_uint32, 1),
                ("out_of_data_space", ctypes.c_uint32, 1), ("needs_check", ctypes.c_uint32, 1),
                ("error", ctypes.c_uint32, 1), ("reserved", ctypes.c_uint32, 27)]


class ThinStatus(ctypes.Structure):
    _fields_ = [("mapped_sectors", ctypes.c_uint64), ("highest_mapped_sector", ctypes.c_uint64),
                ("fail", ctypes.c_uint32, 1), ("reserved", ctypes.c_uint32, 31)]


class Libdm:
    """The few libdevmapper calls the test needs; each parse in its own dm_pool."""

    def __init__(self):
        self.lib = ctypes.CDLL(LIB)
        self.lib.dm_pool_create.restype = ctypes.c_void_p
        self.lib.dm_pool_create.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        self.lib.dm_pool_destroy.argtypes = [ctypes.c_void_p]
        self.pools: list[int] = []

    def parse(self, fn: str, struct, params: str):
        """``dm_get_status_<fn>(pool, params, &status)``: the struct, or None when libdm
        refuses the line."""
        call = getattr(self.lib, "dm_get_status_" + fn)
        call.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.POINTER(struct))]
        call.restype = ctypes.c_int
        pool = self.lib.dm_pool_create(b"dmsim-test", 1024)
        self.pools.append(pool)
        out = ctypes.POINTER(struct)()
        if not call(pool, params.encode(), ctypes.byref(out)):
            return None
        return out.contents

    def close(self):
        for pool in self.pools:
            self.lib.dm_pool_destroy(pool)


@pytest.fixture
def libdm(dm):
    """libdevmapper (image files have device numbers by default: the dm fixture's manager)."""
    assert dm.manager.image_numbers
    lib = Libdm()
    yield lib
    lib.close()


def _params(dm, name: str) -> str:
    (line,) = dm.status(name)
    return line.params


def _devno(dm, path: str) -> tuple[int, int]:
    return dm.manager.image_devno(os.path.realpath(path))


async def test_mirror_status_over_image_files_parses(dm, images, libdm):
    """A core-log mirror and a disk-log mirror over image files: libdm reads each leg's
    number and health, the region counts and the log (its device number too)."""
    a, b, log = images.zero(1), images.zero(1), images.zero(1)
    await dm.create("m", "0 2048 mirror core 1 1024 2 %s 0 %s 0" % (a, b))
    with trio.fail_after(30):
        while True:
            params = _params(dm, "m")
            if "2/2" in params:
                break
            await trio.sleep(0.05)
    st = libdm.parse("mirror", MirrorStatus, params)
    assert st is not None, params
    assert (st.dev_count, st.insync_regions, st.total_regions) == (2, 2, 2)
    legs = [(st.devs[i].major, st.devs[i].minor, chr(st.devs[i].health)) for i in range(2)]
    assert legs == [_devno(dm, a) + ("A",), _devno(dm, b) + ("A",)]
    assert st.log_type == b"core"
    await dm.create("md", "0 2048 mirror disk 2 %s 1024 2 %s 0 %s 0" % (log, a, b))
    with trio.fail_after(30):
        while "2/2" not in _params(dm, "md"):
            await trio.sleep(0.05)
    st = libdm.parse("mirror", MirrorStatus, _params(dm, "md"))
    assert st is not None, _params(dm, "md")
    assert st.log_type == b"disk" and st.log_count == 1
    assert (st.logs[0].major, st.logs[0].minor, chr(st.logs[0].health)) == _devno(dm, log) + ("A",)
    assert st.devs[0].major == IMAGE_MAJOR


async def test_snapshot_status_parses(dm, images, libdm):
    """Snapshot status before and after writes, and an overflowed (invalid) snapshot."""
    origin, cow = images.random(1, seed=3), images.zero(1)
    await dm.create("base", "0 2048 snapshot-origin %s" % origin)
    await dm.create("s", "0 2048 snapshot %s %s P 8" % (origin, cow))
    await dm.suspend("base")
    await dm.resume("base")
    st = libdm.parse("snapshot", SnapshotStatus, _params(dm, "s"))
    assert st is not None and not st.invalid and not st.overflow
    used_before = st.used_sectors
    total = st.total_sectors
    assert total == 2048 and st.has_metadata_sectors
    await dm.write("base", 0, b"x" * 4096)
    params = _params(dm, "s")
    st = libdm.parse("snapshot", SnapshotStatus, params)
    assert st is not None
    words = params.split()
    assert "%d/%d" % (st.used_sectors, st.total_sectors) == words[0]
    assert st.metadata_sectors == int(words[1])
    assert st.used_sectors > used_before
    small = images.zero(sectors=24)          # header + one exception area + one chunk
    await dm.create("tiny", "0 2048 snapshot %s %s N 8" % (origin, small))
    await dm.suspend("base")
    await dm.resume("base")
    await dm.write("base", 64 * 512, b"y" * 8192)
    params = _params(dm, "tiny")
    st = libdm.parse("snapshot", SnapshotStatus, params)
    assert st is not None
    assert st.invalid == (params == "Invalid")
    assert st.overflow == (params == "Overflow")


async def test_image_numbers_stable_and_accepted_back(dm, images, libdm):
    """An image keeps its number while the manager runs (closed and reopened too), the
    number prints where the kernel prints one, and a table may name the image by it."""
    a, b = images.zero(1), images.zero(1)
    await dm.create("l", "0 2048 linear %s 0" % a)
    na = _devno(dm, a)
    assert dm.table("l")[0].params == "%d:%d 0" % na
    await dm.remove("l")
    await dm.create("l2", "0 1024 linear %s 0\n1024 1024 linear %d:%d 0" % (b, na[0], na[1]))
    nb = _devno(dm, b)
    assert nb != na
    assert [t.params for t in dm.table("l2")] == ["%d:%d 0" % nb, "%d:%d 0" % na]
    out = await dm.dmsetup("deps", "-o", "devname", "l2")
    # the kernel lists a table's devices last opened first
    assert out == "2 dependencies\t: (%s) (%s)\n" % (os.path.realpath(a), os.path.realpath(b))
    assert await dm.dmsetup("deps", "l2") == "2 dependencies\t: (%d, %d) (%d, %d)\n" % (na + nb)
    res = await dm.run("create", "bad", "--table", "0 8 linear %d:999 0" % IMAGE_MAJOR)
    assert res.rc == 1


async def test_striped_and_thin_status_parse(dm, images, libdm):
    """Striped status names its stripes by number; thin-pool and thin status parse."""
    a, b = images.zero(1), images.zero(1)
    await dm.create("st", "0 2048 striped 2 8 %s 0 %s 0" % (a, b))
    words = _params(dm, "st").split()
    assert words[:3] == ["2", "%d:%d" % _devno(dm, a), "%d:%d" % _devno(dm, b)]
    meta, data = images.zero(4), images.zero(8)
    try:
        await dm.create("pool", "0 16384 thin-pool %s %s 128 0" % (meta, data))
    except Exception as e:  # noqa: BLE001 - thin-pool not registered in this build
        pytest.skip("thin-pool: %s" % e)
    await dm.message("pool", 0, "create_thin", "0")
    await dm.create("thin", "0 4096 thin /dev/mapper/pool 0")
    await dm.write("thin", 0, b"t" * 65536)
    st = libdm.parse("thin_pool", ThinPoolStatus, _params(dm, "pool"))
    assert st is not None, _params(dm, "pool")
    words = _params(dm, "pool").split()
    assert st.transaction_id == int(words[0])
    assert "%d/%d" % (st.used_metadata_blocks, st.total_metadata_blocks) == words[1]
    assert "%d/%d" % (st.used_data_blocks, st.total_data_blocks) == words[2]
    assert st.used_data_blocks == 1
    th = libdm.parse("thin", ThinStatus, _params(dm, "thin"))
    assert th is not None and th.mapped_sectors == 128 and not th.fail
