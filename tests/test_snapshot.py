"""snapshot / snapshot-origin / snapshot-merge, in-process against the kernel's records
(conformance case 02-snapshot, spec/snapshot.md)."""
import errno
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
    ORIG, C = disks
    SZ = 131072
    async with dmsim.open_manager() as m:
        snap = await mk(m, "snap", "0 %d snapshot %s %s P 8" % (SZ, ORIG, C))
        orig = await md5_dev(snap)
        origin = await mk(m, "origin", "0 %d snapshot-origin %s" % (SZ, ORIG))
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
        with open(ORIG, "rb") as f:
            f.seek(2048 * 512)
            assert await origin.read(2048, 8) == f.read(4096)
        assert st(m, "snap") == "0 131072 snapshot 184/32768 16"
        assert tb(m, "snap") == "0 131072 snapshot %s %s P 8" % (m.image_ref(ORIG), m.image_ref(C))
        assert tb(m, "origin") == "0 131072 snapshot-origin %s" % m.image_ref(ORIG)
        snapmd5 = await md5_dev(snap)
        await m.remove("origin")
        await m.remove("snap")
        snap = await mk(m, "snap", "0 %d snapshot %s %s P 8" % (SZ, ORIG, C))
        assert st(m, "snap") == "0 131072 snapshot 184/32768 16"
        assert await md5_dev(snap) == snapmd5
        await m.remove("snap")
        m.read_log()
        await mk(m, "snap", "0 %d snapshot %s %s P 16" % (SZ, ORIG, C))
        assert tb(m, "snap") == "0 131072 snapshot %s %s P 8" % (m.image_ref(ORIG), m.image_ref(C))
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
    assert md5_file(ORIG) == "cfe1335a4fa0bfcd16146f4dd4b3a301"
    assert hashlib.md5(cow).hexdigest() == "a3e38f890643d98fddc8c301cfbd71aa"


# -- smaller fixtures for the rest ------------------------------------------------------------
@pytest.fixture
def small(tmp_path):
    """8 MiB random origin, 16 MiB zero COW, 1 MiB zero COW."""
    o, c, small_cow = str(tmp_path / "o.img"), str(tmp_path / "c.img"), str(tmp_path / "l.img")
    make_random(o, 8, 7)
    make_zero(c, 16)
    make_zero(small_cow, 1)
    return o, c, small_cow


def read_at(path, offset, n):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


SZ8 = 16384


@pytest.mark.parametrize("params, error", [
    ("{ORIG} {C} P", "requires 4 or more arguments"),
    ("{ORIG} {C} N 0", "Chunk size not set"),
    ("{ORIG} {C} P 12", "Couldn't create exception store"),
    ("{ORIG} {C} X 8", "Couldn't create exception store"),
    ("{ORIG} {C} P abc", "Couldn't create exception store"),
    ("{ORIG} {C} P 4194304", "Couldn't create exception store"),
    ("{ORIG} {C} PX 8", "Couldn't create exception store"),
    ("{ORIG} {ORIG} P 8", "COW device cannot be the same as origin device"),
    ("{ORIG} {C} P 8 1 discard_passdown_origin", "discard_passdown_origin feature depends on discard_zeroes_cow"),
    ("{ORIG} {C} P 8 1 foo", "Unrecognised feature requested"),
    ("{ORIG} {C} P 8 3 a b c", "Invalid number of feature arguments"),
    ("/nonexistent {C} P 8", "Cannot get origin device"),
    ("{ORIG} /nonexistent P 8", "Cannot get COW device"),
])
async def test_constructor_errors(small, params, error):
    ORIG, C, _ = small
    async with dmsim.open_manager() as m:
        with pytest.raises(DMError):
            await mk(m, "s", "0 %d snapshot %s" % (SZ8, params.format(ORIG=ORIG, C=C)))
        log = m.read_log()
        assert any(line.startswith("device-mapper: table: 253:0: snapshot: %s (-" % error) for line in log), log
    assert read_at(C, 0, 4096) == bytes(4096)


async def test_persistent_store_option_logged(small):
    ORIG, C, _ = small
    async with dmsim.open_manager() as m:
        with pytest.raises(DMError):
            await mk(m, "s", "0 %d snapshot %s %s PX 8" % (SZ8, ORIG, C))
        assert m.read_log()[0] == "device-mapper: persistent snapshot: Unsupported persistent store option: X"


async def test_origin_errors(small):
    ORIG, _, _ = small
    async with dmsim.open_manager() as m:
        with pytest.raises(DMError):
            await mk(m, "o", "0 %d snapshot-origin %s extra" % (SZ8, ORIG))
        assert "snapshot-origin: origin: incorrect number of arguments (-EINVAL)" in m.read_log()[0]


async def test_table_forms_and_default_chunk(small):
    ORIG, C, _ = small
    async with dmsim.open_manager() as m:
        await mk(m, "s", "0 %d snapshot %s %s P 0" % (SZ8, ORIG, C))
        assert st(m, "s") == "0 16384 snapshot 64/32768 64"
        assert tb(m, "s") == "0 16384 snapshot %s %s P 32" % (m.image_ref(ORIG), m.image_ref(C))
        await m.remove("s")
        assert read_at(C, 12, 4) == b"\x20\x00\x00\x00"
        make_zero(C, 16)
        await mk(m, "s", "0 %d snapshot %s %s po 8 2 discard_zeroes_cow discard_passdown_origin" % (SZ8, ORIG, C))
        assert tb(m, "s") == "0 16384 snapshot %s %s PO 8 2 discard_zeroes_cow discard_passdown_origin" % (
            m.image_ref(ORIG), m.image_ref(C))


@pytest.mark.parametrize("durability", ["fsync", "process"])
async def test_transient_store(small, durability):
    ORIG, C, _ = small
    async with dmsim.open_manager(durability=durability) as m:
        s = await mk(m, "s", "0 %d snapshot %s %s N 8" % (SZ8, ORIG, C))
        o = await mk(m, "o", "0 %d snapshot-origin %s" % (SZ8, ORIG))
        assert st(m, "s") == "0 16384 snapshot 0/32768 0"
        assert tb(m, "s") == "0 16384 snapshot %s %s N 8" % (m.image_ref(ORIG), m.image_ref(C))
        old = read_at(ORIG, 0, 4096)
        await o.write(0, fill(1, 8))
        assert st(m, "s") == "0 16384 snapshot 8/32768 0"
        assert read_at(C, 0, 4096) == old
        assert await s.read(0, 8) == old
        # snapshot writes: a whole chunk lands in the next COW chunk, a partial one
        # after its origin chunk was copied there
        orig = read_at(ORIG, 0, 64 * 512)
        await s.write(16, fill(7, 8))
        await s.write(40 + 2, fill(8, 3))
        assert st(m, "s") == "0 16384 snapshot 24/32768 0"
        assert read_at(C, 4096, 4096) == fill(7, 8)
        assert read_at(C, 8192, 4096) == orig[40 * 512:42 * 512] + fill(8, 3) + orig[45 * 512:48 * 512]
        assert await s.read(16, 32) == fill(7, 8) + orig[24 * 512:42 * 512] + fill(8, 3) + orig[45 * 512:48 * 512]
        assert read_at(ORIG, 16 * 512, 32 * 512) == orig[16 * 512:48 * 512]
        with pytest.raises(DMError):
            await mk(m, "m", "0 %d snapshot-merge %s %s N 8" % (SZ8, ORIG, C))
        assert "Snapshot exception store does not support snapshot-merge." in m.read_log()[-2]


@pytest.mark.parametrize("durability", ["fsync", "process"])
async def test_partial_snapshot_write_copies_then_overlays(small, durability):
    ORIG, C, _ = small
    async with dmsim.open_manager(durability=durability) as m:
        s = await mk(m, "s", "0 %d snapshot %s %s P 8" % (SZ8, ORIG, C))
        before = read_at(ORIG, 0, SZ8 * 512)
        await s.write(9, fill(0xAB, 1))
        data = await s.read(8, 8)
        assert data[512:1024] == fill(0xAB, 1)
        assert data[:512] == before[8 * 512:9 * 512] and data[1024:] == before[10 * 512:16 * 512]
        assert read_at(ORIG, 0, SZ8 * 512) == before
        assert read_at(C, 4096, 16) == struct.pack("<QQ", 1, 2)
        assert st(m, "s") == "0 16384 snapshot 24/32768 16"


@pytest.mark.parametrize("durability", ["fsync", "process"])
async def test_concurrent_origin_writes_share_one_copy(small, durability):
    ORIG, C, _ = small
    async with dmsim.open_manager(durability=durability) as m:
        s = await mk(m, "s", "0 %d snapshot %s %s P 8" % (SZ8, ORIG, C))
        o = await mk(m, "o", "0 %d snapshot-origin %s" % (SZ8, ORIG))
        old = read_at(ORIG, 0, 4096)
        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(o.write, i, fill(0x10 + i, 1))
        assert st(m, "s") == "0 16384 snapshot 24/32768 16"
        assert await s.read(0, 8) == old
        assert await o.read(0, 8) == b"".join(fill(0x10 + i, 1) for i in range(8))


@pytest.mark.parametrize("durability", ["fsync", "process"])
async def test_full_cow_invalidates(small, durability):
    ORIG, _, L = small
    async with dmsim.open_manager(durability=durability) as m:
        s = await mk(m, "s", "0 %d snapshot %s %s P 8" % (SZ8, ORIG, L))
        o = await mk(m, "o", "0 %d snapshot-origin %s" % (SZ8, ORIG))
        assert st(m, "s") == "0 16384 snapshot 16/2048 16"
        for c in range(254):
            await o.write(c * 8, fill(1, 8))
        assert st(m, "s") == "0 16384 snapshot 2048/2048 16"
        events = m.info("s").event_nr
        m.read_log()
        await o.write(254 * 8, fill(2, 8))            # the origin keeps working
        assert await o.read(254 * 8, 1) == fill(2, 1)
        assert st(m, "s") == "0 16384 snapshot Invalid"
        assert m.read_log() == ["device-mapper: snapshots: Invalidating snapshot: Unable to allocate exception."]
        assert m.info("s").event_nr == events + 1
        assert read_at(L, 4, 4) == bytes(4)
        with pytest.raises(DMError):
            await s.read(0, 8)
        await m.remove("o")
        await m.remove("s")
        await mk(m, "s", "0 %d snapshot %s %s P 8" % (SZ8, ORIG, L))
        assert st(m, "s") == "0 16384 snapshot Invalid"
        assert m.read_log() == ["device-mapper: snapshots: Snapshot is marked invalid."]


def break_cow_writes(monkeypatch, cow_path, from_offset):
    """Make writes to the COW file at or after ``from_offset`` bytes fail with EIO."""
    from dmsim.blockdev import FileDevice
    real = FileDevice._write

    def write(self, off, data):
        if self.path == cow_path and off >= from_offset:
            raise OSError(errno.EIO, "EIO")
        return real(self, off, data)
    monkeypatch.setattr(FileDevice, "_write", write)


def break_copies_and_reads(monkeypatch):
    """In-kernel copies fail, and so do the reads of the kcopyd job that redoes them."""
    from dmsim.blockdev import FileDevice

    def broken(*args):
        raise DMError(errno.EIO)

    def eio(*args):             # what the file layer raises (submit converts it)
        raise OSError(errno.EIO, "EIO")
    monkeypatch.setattr(FileDevice, "copy_to", broken)
    monkeypatch.setattr(FileDevice, "_read", eio)
    monkeypatch.setattr(FileDevice, "_read_into", eio)


@pytest.mark.parametrize("durability", ["fsync", "process"])
@pytest.mark.parametrize("fail", ["copy", "read", "area"])
async def test_origin_copy_out_failures(small, monkeypatch, fail, durability):
    """An origin copy-out that can't finish: a copy that copy_file_range can't make is
    redone as a kcopyd job (read + write); one whose reads fail too, or whose area write
    fails, invalidates the snapshot with the kernel's log line, and the origin write
    still goes through."""
    from dmsim.blockdev import FileDevice
    ORIG, C, _ = small
    old = read_at(ORIG, 80 * 512, 4096)
    async with dmsim.open_manager(durability=durability) as m:
        s = await mk(m, "s", "0 %d snapshot %s %s P 8" % (SZ8, ORIG, C))
        o = await mk(m, "o", "0 %d snapshot-origin %s" % (SZ8, ORIG))
        await o.write(0, fill(1, 8))
        assert st(m, "s") == "0 16384 snapshot 24/32768 16"
        if fail == "area":
            def broken(self, sector, data):
                raise DMError(errno.EIO)
            monkeypatch.setattr(FileDevice, "preflush_fua_write", broken)
        elif fail == "read":
            break_copies_and_reads(monkeypatch)
        else:
            def no_copy(*args):
                raise DMError(errno.EIO)
            monkeypatch.setattr(FileDevice, "copy_to", no_copy)
        m.read_log()
        await o.write(80, fill(2, 8))
        monkeypatch.undo()
        assert await o.read(80, 8) == fill(2, 8)
        if fail == "copy":
            assert st(m, "s") == "0 16384 snapshot 32/32768 16"
            assert await s.read(80, 8) == old
            return
        assert st(m, "s") == "0 16384 snapshot Invalid"
        assert m.read_log() == ["device-mapper: snapshots: Invalidating snapshot: Error reading/writing."]
        await m.remove("o")
        await m.remove("s")
        await mk(m, "s", "0 %d snapshot %s %s P 8" % (SZ8, ORIG, C))
        assert st(m, "s") == "0 16384 snapshot Invalid"


@pytest.mark.parametrize("durability", ["fsync", "process"])
@pytest.mark.parametrize("fail", [None, "whole", "partial"])
async def test_single_chunk_snapshot_writes(small, monkeypatch, fail, durability):
    """Single-chunk snapshot writes: a whole chunk goes straight to its COW chunk, a
    partial one has the origin chunk copied first; both read back and reload.  A failed
    data write or copy-out fails the write with EIO and invalidates the snapshot."""
    ORIG, C, _ = small
    original = read_at(ORIG, 0, 64 * 512)
    async with dmsim.open_manager(durability=durability) as m:
        s = await mk(m, "s", "0 %d snapshot %s %s P 8" % (SZ8, ORIG, C))
        await s.write(8, fill(1, 8))                    # whole chunk 1
        await s.write(16 + 3, fill(2, 2))               # part of chunk 2
        assert st(m, "s") == "0 16384 snapshot 32/32768 16"
        expect = bytearray(original)
        expect[8 * 512:16 * 512] = fill(1, 8)
        expect[19 * 512:21 * 512] = fill(2, 2)
        assert await s.read(0, 64) == bytes(expect)
        if fail is not None:
            if fail == "whole":
                break_cow_writes(monkeypatch, C, 4 * 4096)      # the data chunks after these
            else:
                break_copies_and_reads(monkeypatch)
            m.read_log()
            with pytest.raises(DMError):
                await s.write(40 if fail == "whole" else 41, fill(3, 8 if fail == "whole" else 1))
            monkeypatch.undo()
            assert st(m, "s") == "0 16384 snapshot Invalid"
            assert m.read_log() == ["device-mapper: snapshots: Invalidating snapshot: Error reading/writing."]
            return
        await m.remove("s")
        s = await mk(m, "s", "0 %d snapshot %s %s P 8" % (SZ8, ORIG, C))
        assert await s.read(0, 64) == bytes(expect)
    assert read_at(ORIG, 0, 64 * 512) == original


@pytest.mark.parametrize("durability", ["fsync", "process"])
@pytest.mark.parametrize("store", ["P", "PO"])
async def test_full_cow_snapshot_write(small, store, durability):
    ORIG, _, L = small
    async with dmsim.open_manager(durability=durability) as m:
        s = await mk(m, "s", "0 %d snapshot %s %s %s 8" % (SZ8, ORIG, L, store))
        for c in range(254):
            await s.write(c * 8, fill(3, 8))
        with pytest.raises(DMError):
            await s.write(254 * 8, fill(3, 8))
        if store == "P":
            assert st(m, "s") == "0 16384 snapshot Invalid"
            assert read_at(L, 4, 4) == bytes(4)
        else:
            assert st(m, "s") == "0 16384 snapshot Overflow"
            assert m.read_log()[-1] == "device-mapper: snapshots: Snapshot overflowed: Unable to allocate exception."
            assert await s.read(0, 1) == fill(3, 1)
            assert read_at(L, 4, 4) == b"\x01\x00\x00\x00"
            with pytest.raises(DMError):
                await s.write(0, fill(4, 8))


@pytest.mark.parametrize("durability", ["fsync", "process"])
async def test_second_area_and_reload(small, durability):
    ORIG, C, _ = small
    async with dmsim.open_manager(durability=durability) as m:
        s = await mk(m, "s", "0 %d snapshot %s %s P 8" % (SZ8, ORIG, C))
        o = await mk(m, "o", "0 %d snapshot-origin %s" % (SZ8, ORIG))
        for c in range(300):
            await o.write(c * 8, fill(5, 8))
        assert st(m, "s") == "0 16384 snapshot %d/32768 24" % ((2 + 300 + 1) * 8)
        view = await md5_dev(s)
        await m.remove("o")
        await m.remove("s")
        s = await mk(m, "s", "0 %d snapshot %s %s P 8" % (SZ8, ORIG, C))
        assert st(m, "s") == "0 16384 snapshot %d/32768 24" % ((2 + 300 + 1) * 8)
        assert await md5_dev(s) == view
    assert read_at(C, 258 * 4096, 16) == struct.pack("<QQ", 256, 259)
    assert read_at(C, 258 * 4096 + 44 * 16, 16) == bytes(16)


async def test_256_exceptions_zero_next_area(small):
    ORIG, C, _ = small
    with open(C, "r+b") as f:                 # junk where area 1 will be: it must be zeroed
        f.seek(258 * 4096)
        f.write(b"\xff" * 4096)
    async with dmsim.open_manager() as m:
        await mk(m, "s", "0 %d snapshot %s %s P 8" % (SZ8, ORIG, C))
        o = await mk(m, "o", "0 %d snapshot-origin %s" % (SZ8, ORIG))
        for c in range(256):
            await o.write(c * 8, fill(6, 8))
        assert st(m, "s") == "0 16384 snapshot 2072/32768 24"
    assert read_at(C, 258 * 4096, 4096) == bytes(4096)


@pytest.mark.parametrize("header, log", [
    (b"\xef\xbe\xad\xde", "device-mapper: persistent snapshot: Invalid or corrupt snapshot"),
    (struct.pack("<4I", 0x70416E53, 1, 2, 8),
     "device-mapper: persistent snapshot: unable to handle snapshot disk version 2"),
])
async def test_bad_header_refuses_and_writes_nothing(small, header, log):
    ORIG, C, _ = small
    with open(C, "r+b") as f:
        f.write(header)
    before = md5_file(C)
    async with dmsim.open_manager() as m:
        with pytest.raises(DMError):
            await mk(m, "s", "0 %d snapshot %s %s P 8" % (SZ8, ORIG, C))
        lines = m.read_log()
        assert lines[0] == log
        assert "snapshot: Failed to read snapshot metadata (-" in lines[1]
    assert md5_file(C) == before


async def test_corrupt_area_refuses(small):
    ORIG, C, _ = small
    with open(C, "r+b") as f:
        f.write(struct.pack("<4I", 0x70416E53, 1, 1, 8))
        f.seek(4096)
        f.write(struct.pack("<QQ", 0, 99999999))
    before = md5_file(C)
    async with dmsim.open_manager() as m:
        with pytest.raises(DMError):
            await mk(m, "s", "0 %d snapshot %s %s P 8" % (SZ8, ORIG, C))
        assert any("Failed to read snapshot metadata" in line for line in m.read_log())
    assert md5_file(C) == before


@pytest.mark.parametrize("durability", ["fsync", "process"])
async def test_merge_puts_snapshot_back(small, durability):
    ORIG, C, _ = small
    async with dmsim.open_manager(durability=durability) as m:
        s = await mk(m, "s", "0 %d snapshot %s %s P 8" % (SZ8, ORIG, C))
        o = await mk(m, "o", "0 %d snapshot-origin %s" % (SZ8, ORIG))
        for c in list(range(40)) + [100, 7, 2047]:
            await o.write(c * 8 + 1, fill(7, 3))
        await s.write(50 * 8, fill(8, 8))
        await s.write(60 * 8 + 2, fill(9, 1))
        view = await md5_dev(s)
        await m.remove("o")
        await m.remove("s")
        mg = await mk(m, "m", "0 %d snapshot-merge %s %s P 8" % (SZ8, ORIG, C))
        assert await md5_dev(mg) == view            # usable during the merge
        seen = []
        while True:
            line = st(m, "m")
            seen.append(line)
            if line == "0 16384 snapshot-merge 16/32768 16":
                break
            await trio.sleep(0.001)
        assert await md5_dev(mg) == view
        await mk(m, "o", "0 %d snapshot-origin %s" % (SZ8, ORIG))
    assert hashlib.md5(read_at(ORIG, 0, SZ8 * 512)).hexdigest() == view
    assert read_at(C, 4096, 4096) == bytes(4096)
    assert read_at(C, 4, 4) == b"\x01\x00\x00\x00"


@pytest.mark.parametrize("durability", ["fsync", "process"])
async def test_merge_with_writes_during_merge(small, durability):
    ORIG, C, _ = small
    async with dmsim.open_manager(durability=durability) as m:
        s = await mk(m, "s", "0 %d snapshot %s %s P 8" % (SZ8, ORIG, C))
        o = await mk(m, "o", "0 %d snapshot-origin %s" % (SZ8, ORIG))
        for c in range(600):
            await o.write(c * 8, fill(1, 8))
        expect = bytearray(await md5_raw(s))
        await m.remove("o")
        await m.remove("s")
        mg = await mk(m, "m", "0 %d snapshot-merge %s %s P 8" % (SZ8, ORIG, C))
        for c in range(0, 600, 7):
            await mg.write(c * 8 + 1, fill(0xEE, 2))
            expect[(c * 8 + 1) * 512:(c * 8 + 3) * 512] = fill(0xEE, 2)
        while st(m, "m") != "0 16384 snapshot-merge 16/32768 16":
            await trio.sleep(0.001)
        assert await mg.read(0, SZ8) == bytes(expect)
    assert read_at(ORIG, 0, SZ8 * 512) == bytes(expect)


async def md5_raw(dev):
    return await dev.read(0, dev.size_sectors)


@pytest.mark.parametrize("durability", ["fsync", "process"])
async def test_handover_to_new_table(small, durability):
    ORIG, C, _ = small
    async with dmsim.open_manager(durability=durability) as m:
        s = await mk(m, "s", "0 %d snapshot %s %s P 8" % (SZ8, ORIG, C))
        o = await mk(m, "o", "0 %d snapshot-origin %s" % (SZ8, ORIG))
        await o.write(0, fill(1, 8))
        view = await md5_dev(s)
        await m.load("s", parse_table_text("0 %d snapshot %s %s P 8" % (SZ8, ORIG, C)))
        await m.suspend("s")
        await m.resume("s")
        assert st(m, "s") == "0 16384 snapshot 24/32768 16"
        assert await md5_dev(s) == view
        await o.write(8, fill(2, 8))
        assert st(m, "s") == "0 16384 snapshot 32/32768 16"


# -- interop with COWs written by the 6.1 kernel (tests/fixtures/snapshot-kernel/record.sh) --------
KFIX = os.path.join(HERE, "fixtures", "snapshot-kernel")


def kernel_pattern_origin(path):
    with open(path, "wb") as f:
        for b in range(2048):
            f.write(struct.pack("<Q", b) * 512)


def gunzip(name, dest):
    with gzip.open(os.path.join(KFIX, name)) as f, open(dest, "wb") as out:
        out.write(f.read())


def kernel_record():
    with open(os.path.join(KFIX, "kernel.txt")) as f:
        status, md5line = f.read().splitlines()[:2]
    return status, md5line.split()[-1]


async def test_kernel_made_cow_activates(tmp_path):
    """A COW written by the kernel (3 exception areas) gives the kernel's status and the
    kernel's snapshot contents on dmsim."""
    o, c = str(tmp_path / "o.img"), str(tmp_path / "c.img")
    gunzip("kernel-origin.img.gz", o)
    gunzip("kernel-cow.img.gz", c)
    status, md5 = kernel_record()
    async with dmsim.open_manager() as m:
        s = await mk(m, "snap", "0 16384 snapshot %s %s P 8" % (o, c))
        assert st(m, "snap") == status
        assert await md5_dev(s) == md5


def count_waits(monkeypatch):
    """Record, for every wait on a pending exception, whether it had to block (the
    exception not finished yet): with process durability and one request at a time,
    none does (copy, commit and completion run at once in the writer's task)."""
    from dmsim.targets.snapshot import _Pending
    waited = []
    real = _Pending.wait

    async def spy(self):
        waited.append(not self.finished)
        await real(self)
    monkeypatch.setattr(_Pending, "wait", spy)
    return waited


@pytest.mark.parametrize("durability", ["fsync", "process"])
async def test_same_workload_writes_the_kernels_cow_bytes(tmp_path, monkeypatch, durability):
    """guest.sh replayed in-process (page-cache writeback turns its 512-byte snapshot
    writes into whole 4 KiB pages) leaves the very COW image the kernel left, whether
    the origin's copy-outs wait for syncs (fsync) or are done at once (process, full
    areas included)."""
    o, c = str(tmp_path / "o.img"), str(tmp_path / "c.img")
    kernel_pattern_origin(o)
    make_zero(c, 4)
    waited = count_waits(monkeypatch)
    async with dmsim.open_manager(durability=durability) as m:
        s = await mk(m, "snap", "0 16384 snapshot %s %s P 8" % (o, c))
        org = await mk(m, "origin", "0 16384 snapshot-origin %s" % o)
        for i in range(600):
            await org.write(i * 37 % 2048 * 8, fill(i % 250 + 1, 8))
        for i in range(40):
            page = (i * 53 + 1) % 2048 * 8
            data = bytearray(await s.read(page, 8))
            data[3 * 512:4 * 512] = fill(0o252, 1)
            await s.write(page, bytes(data))
        status, md5 = kernel_record()
        assert st(m, "snap") == status
        assert await md5_dev(s) == md5
    assert not any(waited)
    with gzip.open(os.path.join(KFIX, "kernel-cow.img.gz")) as f:
        kernel_cow = f.read()
    with open(c, "rb") as f:
        assert f.read() == kernel_cow
    with gzip.open(os.path.join(KFIX, "kernel-origin.img.gz")) as f:
        assert md5_file(o) == hashlib.md5(f.read()).hexdigest()


# -- the other direction: a COW written by dmsim, activated on the kernel -----------------------
# (tests/fixtures/snapshot-kernel/record-dmsim.sh: dmsim runs DMSIM_WORKLOAD, the kernel
# activates the COW it left and records status and snapshot md5 in dmsim-cow-kernel.txt)

async def dmsim_interop_workload(m, o, c):
    """Deterministic (one request at a time): 200 unaligned origin writes of 1-40 sectors
    (runs of chunks allocated together) and 60 snapshot writes of 1-24 sectors (partial
    chunks copied first, whole ones not) on the pattern origin; 3 exception areas."""
    kernel_pattern_origin(o)
    make_zero(c, 4)
    s = await mk(m, "snap", "0 16384 snapshot %s %s P 8" % (o, c))
    org = await mk(m, "origin", "0 16384 snapshot-origin %s" % o)
    r = random.Random(5)
    for i in range(200):
        await org.write(r.randrange(16384 - 40), fill(i % 200 + 1, r.randrange(1, 40)))
    for _ in range(60):
        await s.write(r.randrange(16384 - 24), fill(0xCC, r.randrange(1, 24)))
    status, md5 = st(m, "snap"), await md5_dev(s)
    await m.remove("origin")
    await m.remove("snap")
    return status, md5


@pytest.mark.parametrize("durability", ["fsync", "process"])
async def test_dmsim_made_cow_activates_on_the_kernel(tmp_path, monkeypatch, durability):
    """dmsim writes the recorded COW byte for byte, and the kernel, activating that COW,
    printed the status and snapshot contents dmsim prints (with process durability,
    and one request at a time, every copy-out is done at once)."""
    o, c = str(tmp_path / "o.img"), str(tmp_path / "c.img")
    waited = count_waits(monkeypatch)
    async with dmsim.open_manager(durability=durability) as m:
        status, md5 = await dmsim_interop_workload(m, o, c)
        with open(os.path.join(KFIX, "dmsim-cow-kernel.txt")) as f:
            kernel = f.read().splitlines()
        assert kernel[:2] == [status, "snap md5 " + md5]
        assert status == "0 16384 snapshot 5376/8192 32"    # 3 areas (metadata 32 sectors)
        # and dmsim reads the COW back the same after a fresh activation
        s = await mk(m, "snap", "0 16384 snapshot %s %s P 8" % (o, c))
        assert (st(m, "snap"), await md5_dev(s)) == (status, md5)
    assert not any(waited)
    with gzip.open(os.path.join(KFIX, "dmsim-cow.img.gz")) as f:
        assert md5_file(c) == hashlib.md5(f.read()).hexdigest()


async def test_python_api_take_and_merge(small):
    from dmsim.snapshots import merge_snapshot, take_snapshot

    ORIG, C, L = small
    original = read_at(ORIG, 0, SZ8 * 512)
    async with dmsim.open_manager() as m:
        origin, snap = await take_snapshot(m, ORIG, C, name="s1")
        await origin.write(0, fill(1, 64))
        _, snap2 = await take_snapshot(m, ORIG, L, name="s2", origin_name="s1-origin", chunk_sectors=16)
        await origin.write(64, fill(2, 64))
        assert await snap.read(0, SZ8) == original
        assert (await snap2.read(0, 128))[:64 * 512] == fill(1, 64)
        await snap.write(0, fill(3, 8))
        expect = fill(3, 8) + original[8 * 512:]
        await merge_snapshot(m, "s1")
        assert st(m, "s1-origin") == "0 16384 snapshot-origin "
        assert await origin.read(0, SZ8) == expect
        # the other snapshot kept its view through the merge
        assert (await snap2.read(0, 128)) == fill(1, 64) + original[64 * 512:128 * 512]
    assert read_at(ORIG, 0, SZ8 * 512) == expect


@pytest.mark.parametrize("store", ["P", "N"])
@pytest.mark.parametrize("durability", ["fsync", "process"])
async def test_multi_chunk_requests_match_a_model(small, durability, store):
    """Requests spanning chunks are mapped whole by the snapshot target (runs of chunks
    contiguous on the COW or the origin become single I/Os): random multi-chunk reads and
    writes of both devices, concurrent, agree with a byte model; the COW reloads the same."""
    ORIG, C, _ = small
    r = random.Random(7)
    sectors = 2048
    origin_model = bytearray(read_at(ORIG, 0, sectors * 512))
    snap_model = bytearray(origin_model)
    async with dmsim.open_manager(durability=durability) as m:
        s = await mk(m, "s", "0 %d snapshot %s %s %s 8" % (sectors, ORIG, C, store))
        o = await mk(m, "o", "0 %d snapshot-origin %s" % (sectors, ORIG))
        for _round in range(30):
            ops = []
            used = set()
            for _ in range(6):           # concurrent requests on disjoint chunks
                start = r.randrange(sectors - 64)
                count = r.randrange(1, 64)
                chunks = set(range(start // 8, (start + count - 1) // 8 + 1))
                if chunks & used:
                    continue
                used |= chunks
                ops.append((r.choice("os"), start, count, r.randrange(1, 256)))
            async with trio.open_nursery() as n:
                for kind, start, count, byte in ops:
                    dev = o if kind == "o" else s
                    n.start_soon(dev.write, start, fill(byte, count))
            for kind, start, count, byte in ops:
                if kind == "o":          # the snapshot model keeps the old bytes (copy-out)
                    origin_model[start * 512:(start + count) * 512] = fill(byte, count)
                else:
                    snap_model[start * 512:(start + count) * 512] = fill(byte, count)
            for _ in range(4):
                start = r.randrange(sectors - 200)
                count = r.randrange(1, 200)
                assert await s.read(start, count) == snap_model[start * 512:(start + count) * 512]
                assert await o.read(start, count) == origin_model[start * 512:(start + count) * 512]
        assert await s.read(0, sectors) == snap_model
        if store == "P":
            await m.remove("o")
            await m.remove("s")
            s = await mk(m, "s", "0 %d snapshot %s %s P 8" % (sectors, ORIG, C))
            assert await s.read(0, sectors) == snap_model
    assert read_at(ORIG, 0, sectors * 512) == origin_model


@pytest.mark.parametrize("durability", ["fsync", "process"])
async def test_large_runs_read_back_through_block_index_and_after_reactivation(small, durability):
    """Origin writes of whole runs of chunks (blocks of 64 chunks that are one COW run)
    and partial ones: snapshot reads spanning linear blocks, partial blocks and untouched
    chunks agree with the original bytes, live and after the COW is activated again (the
    block index is rebuilt from what the COW holds)."""
    ORIG, C, _ = small
    original = read_at(ORIG, 0, SZ8 * 512)
    r = random.Random(3)
    async with dmsim.open_manager(durability=durability) as m:
        s = await mk(m, "s", "0 %d snapshot %s %s P 8" % (SZ8, ORIG, C))
        o = await mk(m, "o", "0 %d snapshot-origin %s" % (SZ8, ORIG))
        await o.write(0, fill(1, 2048))                 # 4 whole blocks
        await o.write(4096 + 3, fill(2, 1500))          # unaligned: partial blocks
        await o.write(8192, fill(3, 1024))              # 2 blocks
        await o.write(8192 + 512 + 8, fill(4, 8))       # a rewrite inside a linear block
        target = m.find("s").live.targets[0]
        assert len(target.complete.blocks) >= 6

        async def check(dev):
            for _ in range(40):
                start = r.randrange(SZ8 - 3000)
                count = r.randrange(1, 3000)
                assert await dev.read(start, count) == original[start * 512:(start + count) * 512]
            assert await dev.read(0, SZ8) == original

        await check(s)
        await m.remove("o")
        await m.remove("s")
        s = await mk(m, "s", "0 %d snapshot %s %s P 8" % (SZ8, ORIG, C))
        again = m.find("s").live.targets[0]
        assert again.complete.blocks == target.complete.blocks
        await check(s)


async def test_reads_over_linear_blocks_split_only_at_metadata_chunks(small, monkeypatch):
    """Sequential 1 MiB origin writes leave 256-chunk COW runs broken by the next area's
    metadata chunk, each run whole blocks of the index: a snapshot read across the break
    is one read per run, without per-chunk lookups (``_read_blocks``)."""
    from dmsim.targets.snapshot import Snapshot
    ORIG, C, _ = small
    original = read_at(ORIG, 0, SZ8 * 512)
    calls = []
    real = Snapshot._read_blocks

    async def spy(self, bio, b0, bases):
        calls.append(bases)
        return await real(self, bio, b0, bases)
    monkeypatch.setattr(Snapshot, "_read_blocks", spy)
    async with dmsim.open_manager() as m:
        s = await mk(m, "s", "0 %d snapshot %s %s P 8" % (SZ8, ORIG, C))
        o = await mk(m, "o", "0 %d snapshot-origin %s" % (SZ8, ORIG))
        await o.write(0, fill(1, 2048))
        await o.write(2048, fill(2, 2048))
        target = m.find("s").live.targets[0]
        assert target.complete.blocks == {0: 2, 1: 66, 2: 130, 3: 194, 4: 259, 5: 323, 6: 387, 7: 451}
        assert await s.read(1000, 2001) == original[1000 * 512:3001 * 512]
        assert calls == [[66, 130, 194, 259, 323]]
        assert await s.read(512, 1024) == original[512 * 512:1536 * 512]    # one run
        assert len(calls) == 2


async def test_two_snapshots_copy_out_the_same_in_both_durabilities(tmp_path, monkeypatch):
    """Two snapshots of one origin (chunks of 4 and 8 KiB): with process durability each
    origin write copies out to both at once; both COWs end up byte for byte as with
    fsync durability (commits waiting for syncs), and both snapshots still read the
    original."""
    results = {}
    for durability in ("fsync", "process"):
        d = tmp_path / durability
        d.mkdir()
        ORIG, C1, C2 = str(d / "o.img"), str(d / "c1.img"), str(d / "c2.img")
        make_random(ORIG, 8, 7)
        make_zero(C1, 16)
        make_zero(C2, 16)
        original = read_at(ORIG, 0, SZ8 * 512)
        waited = count_waits(monkeypatch)
        r = random.Random(21)
        async with dmsim.open_manager(durability=durability) as m:
            s1 = await mk(m, "s1", "0 %d snapshot %s %s P 8" % (SZ8, ORIG, C1))
            s2 = await mk(m, "s2", "0 %d snapshot %s %s P 16" % (SZ8, ORIG, C2))
            o = await mk(m, "o", "0 %d snapshot-origin %s" % (SZ8, ORIG))
            for i in range(120):
                start = r.randrange(SZ8 - 64)
                await o.write(start, fill(i % 250 + 1, r.choice([1, 8, 16, 40, 64])))
            assert await s1.read(0, SZ8) == original
            assert await s2.read(0, SZ8) == original
            status = (st(m, "s1"), st(m, "s2"))
        monkeypatch.undo()
        results[durability] = (status, md5_file(C1), md5_file(C2), md5_file(ORIG))
        assert not any(waited)
    assert results["fsync"] == results["process"]


@pytest.mark.parametrize("store", ["P", "N"])
@pytest.mark.parametrize("durability", ["fsync", "process"])
async def test_concurrent_overlapping_origin_writes_keep_the_snapshot_view(small, durability, store):
    """Many origin writes at once, overlapping each other's chunks, of every size from a
    sector to several blocks of chunks: whatever order they finish in, every chunk is
    copied out once, before the first write to it, so the snapshot reads the original
    bytes (and, persistent, reads them again from the COW after reactivation); no write
    waits forever on a copy another one started."""
    ORIG, C, _ = small
    original = read_at(ORIG, 0, SZ8 * 512)
    r = random.Random(11)

    async def check_read(dev, start, count):      # the snapshot view holds during writes
        assert await dev.read(start, count) == original[start * 512:(start + count) * 512]

    async with dmsim.open_manager(durability=durability) as m:
        s = await mk(m, "s", "0 %d snapshot %s %s %s 8" % (SZ8, ORIG, C, store))
        o = await mk(m, "o", "0 %d snapshot-origin %s" % (SZ8, ORIG))
        for round_ in range(4):
            with trio.fail_after(60):
                async with trio.open_nursery() as n:
                    for i in range(40):
                        count = r.choice([1, 7, 8, 9, 64, 511, 1024, 1500])
                        start = r.randrange(SZ8 - count)
                        n.start_soon(o.write, start, fill(round_ * 40 + i + 1, count))
                    for _ in range(10):
                        count = r.randrange(1, 1200)
                        n.start_soon(check_read, s, r.randrange(SZ8 - count), count)
            assert await s.read(0, SZ8) == original
        if store == "P":
            await m.remove("o")
            await m.remove("s")
            s = await mk(m, "s", "0 %d snapshot %s %s P 8" % (SZ8, ORIG, C))
            assert await s.read(0, SZ8) == original


@pytest.mark.parametrize("durability", ["fsync", "process"])
async def test_snapshot_write_over_cow_runs_not_contiguous_in_the_request(tmp_path, durability):
    """Issue 11, bug 1: chunks 0 and 2 copied out to consecutive COW chunks; one write to
    the snapshot over chunks 0-2 must not merge their COW runs (the request is not
    contiguous there: chunk 1 lies between), or chunk 2 gets chunk 1's data."""
    o, c = str(tmp_path / "o.img"), str(tmp_path / "c.img")
    with open(o, "wb") as f:
        f.write(b"o" * (1 << 20))
    make_zero(c, 1)
    async with dmsim.open_manager(durability=durability) as m:
        s = await mk(m, "s", "0 2048 snapshot %s %s P 8" % (o, c))
        org = await mk(m, "o", "0 2048 snapshot-origin %s" % o)
        await org.write(0, b"X" * 4096)
        await org.write(16, b"Y" * 4096)
        await s.write(0, b"A" * 4096 + b"B" * 4096 + b"C" * 4096)
        assert await s.read(0, 24) == b"A" * 4096 + b"B" * 4096 + b"C" * 4096
        assert await org.read(0, 24) == b"X" * 4096 + b"o" * 4096 + b"Y" * 4096
        await m.remove("o")
        await m.remove("s")
        s = await mk(m, "s", "0 2048 snapshot %s %s P 8" % (o, c))
        assert await s.read(0, 24) == b"A" * 4096 + b"B" * 4096 + b"C" * 4096


@pytest.mark.parametrize("side", ["o", "s"])
async def test_concurrent_first_writes_share_syncs(small, monkeypatch, side):
    """Issue 11 item 5: with fsync durability, 16 concurrent 4 KiB first writes (to the
    origin, or whole chunks to the snapshot) share area writes as the kernel's
    persistent store does (the area is written when no other exception is pending):
    well under the 2 fdatasyncs per first write that one area write each would take."""
    ORIG, C, _ = small
    calls = []
    real = os.fdatasync

    def counting(fd):
        calls.append(fd)
        return real(fd)

    async with dmsim.open_manager(durability="fsync") as m:
        s = await mk(m, "s", "0 %d snapshot %s %s P 8" % (SZ8, ORIG, C))
        o = await mk(m, "o", "0 %d snapshot-origin %s" % (SZ8, ORIG))
        dev = o if side == "o" else s
        monkeypatch.setattr(os, "fdatasync", counting)
        async with trio.open_nursery() as n:
            for i in range(16):
                n.start_soon(dev.write, i * 64, fill(0x40 + i, 8))
        monkeypatch.undo()
        per_write = len(calls) / 16
        print("fdatasyncs per first write: %.2f" % per_write)
        assert per_write < 1, "%d fdatasyncs for 16 first writes" % len(calls)
        assert st(m, "s") == "0 16384 snapshot %d/32768 16" % (8 * 18)


async def test_origin_resumed_before_its_snapshot_copies_out_only_first_chunks(small):
    """The kernel's rule, kept for conformance (issue 11 item 7): a snapshot-origin
    resumed while it had no snapshot has no split boundary, and a multi-chunk write
    through it copies out only its first chunk; after a suspend/resume of the origin
    every chunk is copied out."""
    ORIG, C, _ = small
    original = read_at(ORIG, 0, 64 * 512)
    async with dmsim.open_manager() as m:
        o = await mk(m, "o", "0 %d snapshot-origin %s" % (SZ8, ORIG))
        s = await mk(m, "s", "0 %d snapshot %s %s P 8" % (SZ8, ORIG, C))
        await o.write(0, fill(1, 24))                       # chunks 0-2
        got = await s.read(0, 24)
        assert got[:4096] == original[:4096] and got[4096:] == fill(1, 16)
        await m.suspend("o")
        await m.resume("o")
        await o.write(32, fill(2, 24))                      # chunks 4-6
        assert await s.read(32, 24) == original[32 * 512:56 * 512]


def test_exception_table_matches_a_dict():
    """ExceptionTable (the one owner of a snapshot's exceptions and its block index)
    answers lookups, missing chunks and indexed blocks as a plain dict would, through
    inserts of runs, removals and a reload from bulk (index rebuilt)."""
    from hypothesis import given, settings
    from hypothesis import strategies as hst

    from dmsim.targets.snapshot import LINEAR_BLOCK_SHIFT, ExceptionTable

    op = hst.tuples(hst.sampled_from(["insert", "remove"]), hst.integers(0, 400), hst.integers(1, 140),
                    hst.integers(0, 1000))

    def check(t, ref):
        assert t.chunks == ref
        for first, last in ((0, 600), (5, 5), (64, 127), (100, 300)):
            assert t.lookups(first, last) == [ref.get(c) for c in range(first, last + 1)]
            assert t.missing(range(first, last + 1)) == [c for c in range(first, last + 1) if c not in ref]
            bases = t.block_bases(first, last)
            if bases is not None:       # every indexed block is whole and consecutive on the COW
                for i, base in enumerate(bases):
                    b0 = ((first >> LINEAR_BLOCK_SHIFT) + i) << LINEAR_BLOCK_SHIFT
                    assert [ref.get(b0 + k) for k in range(1 << LINEAR_BLOCK_SHIFT)] == \
                        list(range(base, base + (1 << LINEAR_BLOCK_SHIFT)))

    @settings(max_examples=150, deadline=None)
    @given(hst.lists(op, max_size=25))
    def run(ops):
        t, ref = ExceptionTable(), {}
        for kind, old, count, new in ops:
            if kind == "insert":
                t.insert_run(old, new, count)
                ref.update(zip(range(old, old + count), range(new, new + count), strict=True))
            else:
                t.remove_run(old, count)
                for c in range(old, old + count):
                    ref.pop(c, None)
            check(t, ref)
        again = ExceptionTable()
        again.load(list(ref), list(ref.values()))
        again.index()
        check(again, ref)
        assert set(t.blocks) <= set(again.blocks)      # the rebuilt index finds them all
    run()


# -- request flags on the devices below a snapshot (issue 13 item 5) -------------------------------
def _flakey_spy(monkeypatch, paths):
    """Record ``(which, bi_opf, sector, sectors)`` of every request a flakey target
    passes down, ``which`` the name of the file under it (``paths``: path -> name)."""
    from dmsim.bio import bi_opf
    from dmsim.targets.flakey import Flakey

    seen = []
    real_map = Flakey.map

    async def spy(self, bio):
        seen.append((paths[self.dev.path], bi_opf(bio), bio.sector, bio.sectors))
        return await real_map(self, bio)

    monkeypatch.setattr(Flakey, "map", spy)
    return seen


async def _flakey_stack(m, ORIG, C):
    """fo/fc: flakey (always up) over the origin and COW files; s and o above them."""
    await mk(m, "fo", "0 %d flakey %s 0 1 0" % (SZ8, ORIG))
    await mk(m, "fc", "0 %d flakey %s 0 1 0" % (32768, C))
    s = await mk(m, "s", "0 %d snapshot /dev/mapper/fo /dev/mapper/fc P 8" % SZ8)
    o = await mk(m, "o", "0 %d snapshot-origin /dev/mapper/fo" % SZ8)
    return s, o


@pytest.mark.parametrize("durability", ["fsync", "process"])
async def test_request_flags_reach_the_devices_below_as_the_kernels(small, monkeypatch, durability):
    """dm clones keep the request's bi_opf: a snapshot's remapped, whole-chunk and split
    writes reach the COW with the flags the request had, an origin write reaches the
    origin with its own; the copy-out is kcopyd's (a plain read, a plain write), and the
    store's own I/O is synchronous dm-io (REQ_SYNC).  A flakey under the origin and the
    COW (corrupt_bio_flags) sees what it would see on 6.1."""
    from dmsim.bio import (
        DIRECT_WRITE_FLAGS,
        REQ_FUA,
        REQ_OP_READ,
        REQ_OP_WRITE,
        REQ_PREFLUSH,
        REQ_SYNC,
        Bio,
        Op,
    )

    ORIG, C, _ = small
    seen = _flakey_spy(monkeypatch, {ORIG: "O", C: "C"})
    W = REQ_OP_WRITE
    FLUSH = W | REQ_PREFLUSH | REQ_SYNC          # dm core's empty flush
    direct_dsync = W | DIRECT_WRITE_FLAGS | REQ_FUA
    async with dmsim.open_manager(durability=durability) as m:
        s, o = await _flakey_stack(m, ORIG, C)
        # activation of a new COW: header read, header and first area written, all sync dm-io
        assert [x for x in seen if x[0] == "C"] == [
            ("C", REQ_OP_READ | REQ_SYNC, 0, 8), ("C", W | REQ_SYNC, 0, 8), ("C", W | REQ_SYNC, 8, 8)]

        def write(dev, sector, sectors, byte):
            return dev.submit(Bio(Op.WRITE, sector, sectors, fill(byte, sectors), True, DIRECT_WRITE_FLAGS))

        def data_writes():     # what reached the COW that is neither copy-out nor commit
            return [x for x in seen if x[0] == "C" and x[1] == direct_dsync]

        # an origin first write: copy-out (kcopyd), commit, then the write itself
        seen.clear()
        await write(o, 0, 8, 1)
        copy_and_commit = [("O", REQ_OP_READ, 0, 8), ("C", W, 16, 8), ("C", FLUSH, 0, 0)]
        assert seen[:3] == copy_and_commit and seen[-1] == ("O", direct_dsync, 0, 8)
        # a whole-chunk snapshot first write goes to its COW chunk with its flags
        seen.clear()
        await write(s, 64, 8, 2)
        assert data_writes() == [("C", direct_dsync, 24, 8)]
        # a partial one: copy-out, commit, then the remapped write with its flags
        seen.clear()
        await write(s, 73, 1, 3)
        assert seen[:3] == [("O", REQ_OP_READ, 72, 8), ("C", W, 32, 8), ("C", FLUSH, 0, 0)]
        assert seen[-1] == ("C", direct_dsync, 33, 1)
        # a rewrite (the table's fast lane) and a write over two chunks with exceptions
        seen.clear()
        await write(s, 64, 8, 4)
        await write(s, 68, 8, 5)
        assert seen == [("C", direct_dsync, 24, 8), ("C", direct_dsync, 28, 8)]
        # a write spanning chunks without exceptions: split pieces keep the flags
        seen.clear()
        await write(s, 84, 12, 6)
        assert sorted(data_writes()) == [("C", direct_dsync, 44, 4), ("C", direct_dsync, 48, 8)]
        # reads keep theirs too, from the COW and from the origin
        seen.clear()
        await s.submit(Bio(Op.READ, 64, 16, None, False, REQ_SYNC))
        await s.submit(Bio(Op.READ, 120, 16, None, False, REQ_SYNC))
        assert seen == [("C", REQ_OP_READ | REQ_SYNC, 24, 16), ("O", REQ_OP_READ | REQ_SYNC, 120, 16)]
        assert await s.read(64, 8) == fill(4, 4) + fill(5, 4)


async def test_exception_area_write_is_sync_fua(small, monkeypatch):
    """``persistent_commit_exception`` writes its area with REQ_PREFLUSH|REQ_FUA|REQ_SYNC:
    below dm core that is an empty flush and a WRITE|FUA|SYNC of the area."""
    from dmsim.bio import REQ_FUA, REQ_OP_WRITE, REQ_PREFLUSH, REQ_SYNC

    ORIG, C, _ = small
    seen = _flakey_spy(monkeypatch, {ORIG: "O", C: "C"})
    async with dmsim.open_manager(durability="process") as m:
        s, o = await _flakey_stack(m, ORIG, C)
        seen.clear()
        await o.write(0, fill(1, 8))
        assert [x for x in seen if x[0] == "C"][1:] == [
            ("C", REQ_OP_WRITE | REQ_PREFLUSH | REQ_SYNC, 0, 0),
            ("C", REQ_OP_WRITE | REQ_FUA | REQ_SYNC, 8, 8)]
