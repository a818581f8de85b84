"""snapshot / snapshot-origin / snapshot-merge, in-process against the kernel's records
(conformance case 02-snapshot, spec/snapshot.md)."""
import gzip
import hashlib
import os
import random
import struct

import pytest
import trio

import dmsim
from dmsim.errors import DMError
from dmsim.table import parse_table_text

HERE = os.path.dirname(__file__)


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


def make_random(path, mib, seed):
    r = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(r.randbytes(1 << 20))


def make_zero(path, mib):
    with open(path, "wb") as f:
        f.truncate(mib << 20)


def md5_file(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


async def mk(m, name, table):
    m.create(name)
    try:
        await m.load(name, parse_table_text(table))
    except DMError:
        await m.remove(name)
        raise
    await m.resume(name)
    return m.find(name)


def st(m, name):
    return str(m.table_lines(name, "info")[0])


def tb(m, name):
    return str(m.table_lines(name, "table")[0])


async def md5_dev(dev, sector=0, count=None):
    count = dev.size_sectors - sector if count is None else count
    h = hashlib.md5()
    step = 2048
    for s in range(sector, sector + count, step):
        h.update(await dev.read(s, min(step, sector + count - s)))
    return h.hexdigest()


def fill(byte, count):
    return bytes([byte]) * (count * 512)


@pytest.fixture
def disks(tmp_path):
    o, c = str(tmp_path / "origin.img"), str(tmp_path / "cow.img")
    make_random(o, 64, 2)
    make_zero(c, 16)
    return o, c


async def test_case_02_snapshot_matches_kernel(disks):
    """The whole of conformance case 02-snapshot: statuses, data, and the COW image
    byte for byte (md5 recorded on the kernel)."""
    O, C = disks
    SZ = 131072
    async with dmsim.open_manager() as m:
        snap = await mk(m, "snap", "0 %d snapshot %s %s P 8" % (SZ, O, C))
        orig = await md5_dev(snap)
        origin = await mk(m, "origin", "0 %d snapshot-origin %s" % (SZ, O))
        assert st(m, "snap") == "0 131072 snapshot 16/32768 16"
        assert st(m, "origin") == "0 131072 snapshot-origin "
        for byte, sector, count in ((0o21, 0, 8), (0o42, 1000, 12), (0o63, 65536, 128), (0o104, 131071, 1)):
            await origin.write(sector, fill(byte, count))
            await origin.flush()
        assert await md5_dev(snap) == orig
        assert await md5_dev(origin) != orig
        assert (await origin.read(1000, 1))[:16] == b'"' * 16
        assert (await snap.read(1000, 1))[:16] == bytes.fromhex("3b962afe821dfd5da8c5e4748d2ab3dc")
        assert st(m, "snap") == "0 131072 snapshot 176/32768 16"
        await snap.write(2048, fill(0o125, 8))
        await snap.flush()
        assert (await snap.read(2048, 1))[:16] == b"U" * 16
        with open(O, "rb") as f:
            f.seek(2048 * 512)
            assert await origin.read(2048, 8) == f.read(4096)
        assert st(m, "snap") == "0 131072 snapshot 184/32768 16"
        assert tb(m, "snap") == "0 131072 snapshot %s %s P 8" % (O, C)
        assert tb(m, "origin") == "0 131072 snapshot-origin %s" % O
        snapmd5 = await md5_dev(snap)
        await m.remove("origin")
        await m.remove("snap")
        snap = await mk(m, "snap", "0 %d snapshot %s %s P 8" % (SZ, O, C))
        assert st(m, "snap") == "0 131072 snapshot 184/32768 16"
        assert await md5_dev(snap) == snapmd5
        await m.remove("snap")
        m.read_log()
        await mk(m, "snap", "0 %d snapshot %s %s P 16" % (SZ, O, C))
        assert tb(m, "snap") == "0 131072 snapshot %s %s P 8" % (O, C)
        await m.remove("snap")
        assert m.read_log() == ["device-mapper: persistent snapshot: chunk size 8 in device metadata "
                                "overrides table chunk size of 16."]
    with open(C, "rb") as f:
        cow = f.read()
    assert cow[:16] == bytes.fromhex("536e41700100000001000000080000 00".replace(" ", ""))
    assert cow[16:4096] == bytes(4080)
    pairs = [struct.unpack_from("<QQ", cow, 4096 + 16 * i) for i in range(22)]
    assert pairs == ([(0, 2), (125, 3), (126, 4)] + [(8192 + i, 5 + i) for i in range(16)]
                     + [(16383, 21), (256, 22), (0, 0)])
    assert md5_file(O) == "cfe1335a4fa0bfcd16146f4dd4b3a301"
    assert hashlib.md5(cow).hexdigest() == "a3e38f890643d98fddc8c301cfbd71aa"
