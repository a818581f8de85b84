"""thin: provisioning, zeroing, snapshots breaking sharing, external origins, discards, commits
on FLUSH/FUA, status, constructor errors; and a model test of random I/O and snapshots against
bytearrays, whose metadata must then pass our check and thin_check."""
import os
import random
import shutil
import subprocess

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from test_thin_pool import mk, pool_line
from test_thin_pool import st as status

import dmsim
from dmsim.errors import DMError
from dmsim.thin_metadata import PoolMetadata, check_metadata

HAVE_THIN_CHECK = shutil.which("thin_check") is not None
BLOCK = 128  # sectors per data block in these pools (64 KiB)


def images(d, data_fill=None, mib=64):
    meta, data = os.path.join(d, "meta.img"), os.path.join(d, "data.img")
    with open(meta, "wb") as f:
        f.truncate(4 << 20)
    with open(data, "wb") as f:
        if data_fill is None:
            f.truncate(mib << 20)
        else:
            f.write(data_fill * (mib << 20))
    return meta, data


async def pool_and_thin(m, meta, data, features="", dev=0):
    await mk(m, "pool", pool_line(meta, data, "128 0" + (" " + features if features else "")))
    await m.message("pool", 0, "create_thin %d" % dev)
    return await mk(m, "thin", "0 65536 thin /dev/mapper/pool %d" % dev)


async def test_unprovisioned_reads_zero_and_writes_provision(tmp_path):
    meta, data = images(str(tmp_path), data_fill=b"\xee")
    async with dmsim.open_manager(durability="process") as m:
        thin = await pool_and_thin(m, meta, data)
        assert status(m, "thin") == "0 65536 thin 0 -"
        assert await thin.read(0, 8) == bytes(4096)
        await thin.write(130, b"p" * 512)           # partial write: the new block is zeroed first
        assert await thin.read(128, 4) == bytes(1024) + b"p" * 512 + bytes(512)
        await thin.write(BLOCK * 5, b"w" * (BLOCK * 512))  # whole block: no zeroing needed
        assert status(m, "thin") == "0 65536 thin 256 767"
        assert " 2/1024 " in status(m, "pool")
        await m.remove("thin")
        await m.remove("pool")


async def test_skip_block_zeroing_leaves_old_data(tmp_path):
    meta, data = images(str(tmp_path), data_fill=b"\xee")
    async with dmsim.open_manager(durability="process") as m:
        thin = await pool_and_thin(m, meta, data, "1 skip_block_zeroing")
        await thin.write(0, b"p" * 512)
        assert await thin.read(1, 1) == b"\xee" * 512
        await m.remove("thin")
        await m.remove("pool")


async def test_snapshot_shares_until_written(tmp_path):
    meta, data = images(str(tmp_path))
    async with dmsim.open_manager(durability="process") as m:
        thin = await pool_and_thin(m, meta, data)
        await thin.write(0, b"a" * (BLOCK * 512))
        await thin.write(BLOCK, b"b" * 512)
        await m.suspend("thin")
        await m.message("pool", 0, "create_snap 1 0")
        await m.resume("thin")
        snap = await mk(m, "snap", "0 65536 thin /dev/mapper/pool 1")
        assert " 2/1024 " in status(m, "pool")         # shared: no new data blocks
        await thin.write(8, b"c" * 512)                 # breaks sharing: copy, then write
        assert await thin.read(0, 10) == b"a" * 4096 + b"c" * 512 + b"a" * 512
        assert await snap.read(0, 10) == b"a" * 5120
        await snap.write(BLOCK, b"d" * (BLOCK * 512))   # whole block: no copy
        assert await thin.read(BLOCK, 1) == b"b" * 512
        assert await snap.read(BLOCK, 1) == b"d" * 512
        assert " 4/1024 " in status(m, "pool")
        await m.remove("snap")
        await m.remove("thin")
        await m.remove("pool")
    if HAVE_THIN_CHECK:
        subprocess.run(["thin_check", meta], check=True, capture_output=True, timeout=60)


async def test_external_origin(tmp_path):
    meta, data = images(str(tmp_path))
    origin = str(tmp_path / "origin.img")
    rnd = random.Random(1)
    content = rnd.randbytes(BLOCK * 512 * 3 + 4096)  # three blocks and a bit
    with open(origin, "wb") as f:
        f.write(content)
    async with dmsim.open_manager(durability="process") as m:
        await mk(m, "pool", pool_line(meta, data))
        await m.message("pool", 0, "create_thin 0")
        thin = await mk(m, "thin", "0 65536 thin /dev/mapper/pool 0 %s" % origin)
        assert status(m, "thin") == "0 65536 thin 0 -"
        words = str(m.table_lines("thin", "table")[0]).split()
        assert words[2:3] == ["thin"] and words[4] == "0" and len(words) == 6  # pool, id, origin
        assert await thin.read(0, 16) == content[:8192]
        n = len(content) // 512
        assert await thin.read(BLOCK * 3, 16) == content[BLOCK * 3 * 512:] + bytes(8192 - 4096)
        await thin.write(2, b"z" * 512)                     # copies the origin's block first
        assert await thin.read(0, 4) == content[:1024] + b"z" * 512 + content[1536:2048]
        await thin.write(BLOCK * 3 + 1, b"q" * 512)         # the origin's partial last block
        assert await thin.read(BLOCK * 3, 16) == content[BLOCK * 3 * 512:BLOCK * 3 * 512 + 512] + b"q" * 512 + \
            content[BLOCK * 3 * 512 + 1024:] + bytes(8192 - 4096)
        with open(origin, "rb") as f:
            assert f.read() == content                       # the origin is never written
        assert n
        await m.remove("thin")
        await m.remove("pool")


async def test_external_origin_is_copied_even_without_zeroing(tmp_path):
    """skip_block_zeroing skips zeroing, never the copy of the origin's data under a partial write."""
    meta, data = images(str(tmp_path), data_fill=b"\xee")
    origin = str(tmp_path / "origin.img")
    content = random.Random(2).randbytes(BLOCK * 512 + 2048)
    with open(origin, "wb") as f:
        f.write(content)
    async with dmsim.open_manager(durability="process") as m:
        await mk(m, "pool", pool_line(meta, data, "128 0 1 skip_block_zeroing"))
        await m.message("pool", 0, "create_thin 0")
        thin = await mk(m, "thin", "0 65536 thin /dev/mapper/pool 0 %s" % origin)
        await thin.write(1, b"w" * 512)
        assert await thin.read(0, BLOCK) == content[:512] + b"w" * 512 + content[1024:BLOCK * 512]
        await thin.write(BLOCK + 1, b"v" * 512)        # the origin ends 4 sectors into this block
        got = await thin.read(BLOCK, 8)
        assert got[:512] == content[BLOCK * 512:BLOCK * 512 + 512] and got[512:1024] == b"v" * 512
        assert got[1024:2048] == content[BLOCK * 512 + 1024:]
        assert got[2048:] == b"\xee" * 2048                # not zeroed: skip_block_zeroing
        await m.remove("thin")
        await m.remove("pool")


async def test_discard_unmaps_whole_blocks(tmp_path):
    meta, data = images(str(tmp_path))
    async with dmsim.open_manager(durability="process") as m:
        thin = await pool_and_thin(m, meta, data)
        for vb in range(3):
            await thin.write(vb * BLOCK, b"x" * 512)
        await thin.discard(BLOCK, BLOCK)          # one whole block
        await thin.discard(2 * BLOCK, 8)          # part of one: nothing happens
        assert await thin.read(BLOCK, 1) == bytes(512)
        assert await thin.read(2 * BLOCK, 1) == b"x" * 512
        await thin.flush()
        assert status(m, "thin") == "0 65536 thin 256 383"
        assert " 2/1024 " in status(m, "pool")
        await m.remove("thin")
        await m.remove("pool")


async def test_flush_commits_and_a_reopen_finds_the_data(tmp_path):
    meta, data = images(str(tmp_path))
    async with dmsim.open_manager(durability="process") as m:
        thin = await pool_and_thin(m, meta, data)
        await thin.write(0, b"1" * 512)
        await thin.flush()
        await thin.write(BLOCK, b"2" * 512, fua=True)
        # what a crash now would find: the committed metadata, read by a second opener
        with PoolMetadata(meta, 128, format_device=False, durable=False, read_only=True) as md:
            assert [vb for vb, _b, _t in md.mappings(0)] == [0, 1]
        await m.remove("thin")
        await m.remove("pool")
        thin = await mk(m, "pool", pool_line(meta, data))
        thin = await mk(m, "thin", "0 65536 thin /dev/mapper/pool 0")
        assert await thin.read(BLOCK, 1) == b"2" * 512
        await m.remove("thin")
        await m.remove("pool")


@pytest.mark.parametrize("table, error", [
    ("/dev/mapper/pool", "Invalid argument count"),
    ("/dev/mapper/pool x", "Invalid device id"),
    ("/dev/mapper/pool 16777216", "Invalid device id"),
    ("/dev/mapper/pool 9", "Couldn't open thin internal device"),
    ("/dev/mapper/pool 0 /dev/mapper/pool", "Error setting origin device"),
    ("/nonexistent 0", "Error opening pool device"),
])
async def test_constructor_errors(tmp_path, table, error):
    meta, data = images(str(tmp_path))
    async with dmsim.open_manager(durability="process") as m:
        await mk(m, "pool", pool_line(meta, data))
        await m.message("pool", 0, "create_thin 0")
        m.read_log()
        with pytest.raises(DMError):
            await mk(m, "thin", "0 8192 thin " + table)
        assert any(error in line for line in m.read_log()), error
        await m.remove("pool")


async def test_thin_over_a_non_pool_device(tmp_path):
    meta, data = images(str(tmp_path))
    async with dmsim.open_manager(durability="process") as m:
        await mk(m, "z", "0 8192 zero")
        with pytest.raises(DMError):
            await mk(m, "thin", "0 8192 thin /dev/mapper/z 0")
        assert any("Couldn't find pool object" in line for line in m.read_log())


# -- model test -------------------------------------------------------------------------------

OPS = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 2), st.integers(0, 40 * BLOCK - 1), st.integers(1, 300),
              st.integers(0, 255)),
    st.tuples(st.just("discard"), st.integers(0, 2), st.integers(0, 39), st.integers(1, 3)),
    st.tuples(st.just("snap"), st.integers(0, 2), st.integers(0, 2)),
    st.tuples(st.just("flush"), st.integers(0, 2)),
), min_size=1, max_size=25)

SIZE = 40 * BLOCK


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=OPS)
def test_model_random_io_and_snapshots(tmp_path_factory, ops):
    """Thin devices as bytearrays: every read matches, and the metadata checks clean after."""
    d = str(tmp_path_factory.mktemp("thinmodel"))
    meta, data = images(d, mib=16)

    async def run():
        model: dict[int, bytearray] = {0: bytearray(SIZE * 512)}
        async with dmsim.open_manager(durability="process") as m:
            await mk(m, "pool", pool_line(meta, data, size=16 << 11))
            await m.message("pool", 0, "create_thin 0")
            devs = {0: await mk(m, "t0", "0 %d thin /dev/mapper/pool 0" % SIZE)}
            for op in ops:
                if op[0] == "write":
                    _, d_, sector, n, byte = op
                    if d_ not in devs:
                        continue
                    n = min(n, SIZE - sector)
                    payload = bytes([byte]) * (n * 512)
                    await devs[d_].write(sector, payload)
                    model[d_][sector * 512:(sector + n) * 512] = payload
                elif op[0] == "discard":
                    _, d_, vb, n = op
                    if d_ not in devs:
                        continue
                    n = min(n, 40 - vb)
                    await devs[d_].discard(vb * BLOCK, n * BLOCK)
                    model[d_][vb * BLOCK * 512:(vb + n) * BLOCK * 512] = bytes(n * BLOCK * 512)
                elif op[0] == "snap":
                    _, new, origin = op
                    if new in devs or origin not in devs:
                        continue
                    await m.suspend("t%d" % origin)
                    await m.message("pool", 0, "create_snap %d %d" % (new, origin))
                    await m.resume("t%d" % origin)
                    devs[new] = await mk(m, "t%d" % new, "0 %d thin /dev/mapper/pool %d" % (SIZE, new))
                    model[new] = bytearray(model[origin])
                else:
                    if op[1] in devs:
                        await devs[op[1]].flush()
            for d_, dev in devs.items():
                assert await dev.read(0, SIZE) == bytes(model[d_]), d_
            for d_ in devs:
                await m.remove("t%d" % d_)
            await m.remove("pool")

    trio.run(run)
    with PoolMetadata(meta, 128, format_device=False, durable=False) as md:
        assert check_metadata(md) == []
    if HAVE_THIN_CHECK:
        r = subprocess.run(["thin_check", meta], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


# -- against the kernel -----------------------------------------------------------------------
# tests/fixtures/thin-kernel: scenario.sh run on the oracle's 6.1 kernel (kernel-dm) over a
# 4 MiB metadata and a 64 MiB data image: its output, its log lines and the images it left.

KFIX = os.path.join(os.path.dirname(__file__), "fixtures", "thin-kernel")


def _gunzip(name, dest):
    import gzip
    with gzip.open(os.path.join(KFIX, name), "rb") as f, open(dest, "wb") as out:
        out.write(f.read())
    return dest


def _expected():
    with open(os.path.join(KFIX, "expected.txt")) as f:
        return f.read().splitlines()


def _pattern(word: bytes, n: int) -> bytes:
    return (word * (n // len(word) + 1))[:n]


async def test_kernel_made_pool_activates_with_the_same_status_and_data(tmp_path):
    """The pool the kernel left: dmsim opens it, reports the kernel's last status and data."""
    meta = _gunzip("meta.img.gz", str(tmp_path / "meta.img"))
    data = _gunzip("data.img.gz", str(tmp_path / "data.img"))
    exp = _expected()
    import hashlib
    async with dmsim.open_manager(durability="process") as m:
        await mk(m, "pool", pool_line(meta, data, "128 16"))
        assert status(m, "pool") == exp[exp.index("== done") - 1]
        t = await mk(m, "t", "0 65536 thin /dev/mapper/pool 0")
        s = await mk(m, "s", "0 65536 thin /dev/mapper/pool 1")
        after = exp.index("== after snap write")
        assert status(m, "t") == exp[after + 1] and status(m, "s") == exp[after + 2]
        assert hashlib.md5(await t.read(0, 1024)).hexdigest() + "  -" == exp[after + 4]
        assert hashlib.md5(await s.read(0, 1024)).hexdigest() + "  -" == exp[after + 5]
        # and dmsim carries on with it: a new block on the snapshot, a snapshot of the snapshot
        await s.write(7 * BLOCK, b"k" * 512)
        await m.message("pool", 0, "create_snap 2 1")
        await m.remove("s")
        await m.remove("t")
        await m.remove("pool")
    with PoolMetadata(meta, 128, format_device=False, durable=False) as md:
        assert check_metadata(md) == []
        assert [vb for vb, _b, _t in md.mappings(2)] == [2, 5, 7]
    if HAVE_THIN_CHECK:
        subprocess.run(["thin_check", meta], check=True, capture_output=True, timeout=60)


async def test_same_workload_as_the_kernel_writes_the_same_metadata(tmp_path):
    """scenario.sh's workload on dmsim: the kernel's statuses, data, log lines, and metadata
    identical to the kernel's: the same mappings, and the same image byte for byte."""
    import hashlib
    meta, data = images(str(tmp_path))
    exp = _expected()
    out: list[str] = []
    async with dmsim.open_manager(durability="process") as m:
        await mk(m, "pool", pool_line(meta, data, "128 16"))
        out.append(status(m, "pool"))
        await m.message("pool", 0, "create_thin 0")
        t = await mk(m, "t", "0 65536 thin /dev/mapper/pool 0")
        out.append(status(m, "t"))
        await t.write(2 * BLOCK, _pattern(b"abcdefgh\n", 65536))
        await t.flush()                            # dd conv=fsync: a flush, so a commit
        page = bytearray(4096)
        page[1024:1030] = b"kernel"               # printf 'kernel' at byte 332800, a page write
        await t.write(648, bytes(page))
        await t.flush()
        out += [status(m, "t"), status(m, "pool")]
        await m.suspend("t")
        await m.message("pool", 0, "create_snap 1 0")
        await m.resume("t")
        s = await mk(m, "s", "0 65536 thin /dev/mapper/pool 1")
        await t.write(33 * 8, _pattern(b"12345678\n", 4096))
        await t.flush()
        out += [status(m, "t"), status(m, "s"), status(m, "pool")]
        out.append(hashlib.md5(await t.read(0, 1024)).hexdigest() + "  -")
        out.append(hashlib.md5(await s.read(0, 1024)).hexdigest() + "  -")
        m.read_log()
        for msg in ("create_thin 0", "create_snap 5 9", "delete 7", "set_transaction_id 3 4"):
            with pytest.raises(DMError):
                await m.message("pool", 0, msg)
        for table in ("0 8192 thin /dev/mapper/pool 9", "0 8192 thin-pool %s %s 100 16" % (meta, data)):
            with pytest.raises(DMError):
                await mk(m, "bad", table)
        klog = [line for line in m.read_log() if line.startswith(("device-mapper: thin", "device-mapper: table"))]
        await m.message("pool", 0, "set_transaction_id 0 1")
        await m.message("pool", 0, "reserve_metadata_snap")
        held = status(m, "pool").split()
        await m.message("pool", 0, "release_metadata_snap")
        out.append(status(m, "pool"))
        await m.remove("s")
        await m.remove("t")
        await m.remove("pool")
    fresh = exp.index("== fresh")
    assert out[0] == exp[fresh + 1]
    assert out[1] == exp[fresh + 3]
    written = exp.index("== written")
    assert out[2:4] == exp[written + 1:written + 3]
    after = exp.index("== after snap write")
    assert out[4:9] == exp[after + 1:after + 6]
    assert held == exp[exp.index("== ids") + 1].split()  # the held root in the kernel's block too
    assert out[9] == exp[exp.index("== done") - 1]
    with open(os.path.join(KFIX, "expected-klog.txt")) as f:
        assert klog == f.read().splitlines()
    kmeta = _gunzip("meta.img.gz", str(tmp_path / "kernel-meta.img"))
    views = []
    for path in (meta, kmeta):
        with PoolMetadata(path, 128, format_device=False, durable=False, read_only=True) as md:
            views.append(({d: list(md.mappings(d)) for d in md.device_ids()},
                          {d: md.device_details(d) for d in md.device_ids()}, md.transaction_id, md.time))
    assert views[0] == views[1]
    if shutil.which("thin_dump"):
        dumps = [subprocess.run(["thin_dump", p], capture_output=True, text=True, timeout=60).stdout
                 for p in (meta, kmeta)]
        assert dumps[0] == dumps[1]
    # and byte for byte: every metadata block where the kernel put it, with the kernel's bytes
    # (stale ones included); the data image too
    for ours, theirs in ((meta, kmeta), (data, _gunzip("data.img.gz", str(tmp_path / "kernel-data.img")))):
        with open(ours, "rb") as a, open(theirs, "rb") as b:
            assert hashlib.md5(a.read()).hexdigest() == hashlib.md5(b.read()).hexdigest(), ours


async def test_delete_of_an_open_thin_is_busy(tmp_path):
    """As the kernel (``td->open_count``): a thin device with an active table cannot be deleted."""
    meta, data = images(str(tmp_path))
    async with dmsim.open_manager(durability="process") as m:
        await pool_and_thin(m, meta, data)
        with pytest.raises(DMError) as e:
            await m.message("pool", 0, "delete 0")
        assert e.value.errno == 16  # EBUSY
        assert any("Deletion of thin device 0 failed." in x for x in m.read_log())
        await m.remove("thin")
        await m.message("pool", 0, "delete 0")
        await m.remove("pool")


# -- state machine over the blocking API ------------------------------------------------------

class ThinIOMachine(RuleBasedStateMachine):
    """Thin devices against bytearrays through dmsim.api.DM: writes (whole and partial blocks),
    discards, snapshots of thins and of snapshots, flushes and pool reloads; every device reads
    back as its model, and the metadata left passes our check and thin_check."""

    NBLK = 20

    def __init__(self):
        super().__init__()
        import tempfile

        import dmsim.api
        self.dir = tempfile.TemporaryDirectory()
        self.meta, self.data = images(self.dir.name, mib=16)
        self.dm = dmsim.api.DM().__enter__()
        self.pool_table = pool_line(self.meta, self.data, size=256 * BLOCK)
        self.dm.create("pool", self.pool_table)
        self.dm.message("pool", 0, "create_thin", "0")
        self.size = self.NBLK * BLOCK
        self.dm.create("t0", "0 %d thin /dev/mapper/pool 0" % self.size)
        self.model = {0: bytearray(self.size * 512)}

    def teardown(self):
        try:
            for d in list(self.model):
                self.dm.remove("t%d" % d)
            self.dm.remove("pool")
        finally:
            self.dm.close()
        try:
            with PoolMetadata(self.meta, 128, format_device=False, durable=False) as md:
                assert check_metadata(md) == []
                assert sorted(md.device_ids()) == sorted(self.model)
            if HAVE_THIN_CHECK:
                r = subprocess.run(["thin_check", self.meta], capture_output=True, text=True, timeout=60)
                assert r.returncode == 0, r.stdout + r.stderr
        finally:
            self.dir.cleanup()

    devs = st.integers(0, 3)

    @rule(d=devs, sector=st.integers(0, NBLK * BLOCK - 1), n=st.integers(1, 2 * BLOCK), byte=st.integers(1, 255))
    def write(self, d, sector, n, byte):
        if d not in self.model:
            return
        n = min(n, self.size - sector)
        payload = bytes([byte]) * (n * 512)
        self.dm.write("t%d" % d, sector * 512, payload)
        self.model[d][sector * 512:(sector + n) * 512] = payload

    @rule(d=devs, vb=st.integers(0, NBLK - 1))
    def discard(self, d, vb):
        if d not in self.model:
            return
        dev = self.dm.device("t%d" % d)
        self.dm._call(dev.discard, vb * BLOCK, BLOCK)
        self.model[d][vb * BLOCK * 512:(vb + 1) * BLOCK * 512] = bytes(BLOCK * 512)

    @rule(new=devs, origin=devs)
    def snapshot(self, new, origin):
        if new in self.model or origin not in self.model:
            return
        self.dm.suspend("t%d" % origin)
        self.dm.message("pool", 0, "create_snap", str(new), str(origin))
        self.dm.resume("t%d" % origin)
        self.dm.create("t%d" % new, "0 %d thin /dev/mapper/pool %d" % (self.size, new))
        self.model[new] = bytearray(self.model[origin])

    @precondition(lambda self: len(self.model) > 1)
    @rule(d=devs)
    def delete(self, d):
        if d not in self.model:
            return
        self.dm.remove("t%d" % d)
        self.dm.message("pool", 0, "delete", str(d))
        del self.model[d]

    @rule(d=devs)
    def flush(self, d):
        if d in self.model:
            self.dm.flush("t%d" % d)

    @rule()
    def reload_pool(self):
        self.dm.reload("pool", self.pool_table)

    @invariant()
    def contents(self):
        for d, m in self.model.items():
            assert self.dm.read("t%d" % d, 0, self.size * 512) == bytes(m), d


TestThinIO = ThinIOMachine.TestCase
TestThinIO.settings = settings(max_examples=10, stateful_step_count=15, deadline=None,
                               suppress_health_check=list(HealthCheck))


async def test_concurrent_io_provisioning_and_commits(tmp_path):
    """Many tasks at once: first writes, rewrites, reads, discards and flushes on one thin and its
    snapshot; each task owns its blocks, so the end state is known; the metadata checks clean."""
    meta, data = images(str(tmp_path))
    async with dmsim.open_manager(durability="process") as m:
        thin = await pool_and_thin(m, meta, data)
        for vb in range(0, 64, 2):
            await thin.write(vb * BLOCK, bytes([vb]) * 512)
        await m.suspend("thin")
        await m.message("pool", 0, "create_snap 1 0")
        await m.resume("thin")
        snap = await mk(m, "snap", "0 65536 thin /dev/mapper/pool 1")
        want: dict[int, bytes] = {}

        async def worker(k: int) -> None:
            rnd = random.Random(k)
            for step in range(30):
                vb = k * 8 + rnd.randrange(8)           # the task's own eight blocks
                byte = bytes([(k * 31 + step) % 251 + 1])
                choice = rnd.random()
                if choice < 0.6:
                    await thin.write(vb * BLOCK + rnd.randrange(BLOCK), byte * 512)
                elif choice < 0.75:
                    await thin.discard(vb * BLOCK, BLOCK)
                elif choice < 0.9:
                    await thin.read(vb * BLOCK, BLOCK)
                else:
                    await thin.flush()
            for vb in range(k * 8, k * 8 + 8):
                want[vb] = await thin.read(vb * BLOCK, BLOCK)

        async with trio.open_nursery() as n:
            for k in range(8):
                n.start_soon(worker, k)
        for vb, content in want.items():
            assert await thin.read(vb * BLOCK, BLOCK) == content
        for vb in range(64):   # the snapshot kept the old contents throughout
            assert await snap.read(vb * BLOCK, 1) == (bytes([vb]) * 512 if vb % 2 == 0 else bytes(512))
        await m.remove("snap")
        await m.remove("thin")
        await m.remove("pool")
    with PoolMetadata(meta, 128, format_device=False, durable=False) as md:
        assert check_metadata(md) == []


async def test_larger_workload_writes_the_kernels_images_byte_for_byte(tmp_path):
    """tests/fixtures/thin-kernel-2's workload: splits past a leaf, snapshots of snapshots, broken
    sharing, a discard with passdown, a deleted snapshot; the kernel's output and both images'
    md5s."""
    import hashlib
    fix = os.path.join(os.path.dirname(__file__), "fixtures", "thin-kernel-2")
    with open(os.path.join(fix, "expected.txt")) as f:
        exp = f.read().splitlines()
    with open(os.path.join(fix, "expected-md5.txt")) as f:
        md5s = dict(line.split() for line in f)
    meta, data = images(str(tmp_path), mib=128)
    out: list[str] = []
    async with dmsim.open_manager(durability="process") as m:
        await mk(m, "pool", "0 262144 thin-pool %s %s 128 0" % (meta, data))
        await m.message("pool", 0, "create_thin 0")
        t = await mk(m, "t", "0 262144 thin /dev/mapper/pool 0")
        chunk = _pattern(b"abcdefgh\n", 1 << 20)
        for i in range(20):   # dd bs=65536 oflag=direct conv=fsync, 1 MiB a time
            for j in range(16):
                await t.write((i * 16 + j) * BLOCK, chunk[j * 65536:(j + 1) * 65536])
            await t.flush()
        out += ["== 320 blocks", status(m, "t"), status(m, "pool")]
        await m.suspend("t")
        for msg in ("create_snap 1 0", "create_snap 2 1", "create_snap 3 0"):
            await m.message("pool", 0, msg)
        await m.resume("t")
        out.append(status(m, "pool"))
        for sector, n in ((160 * 8, 4096), (1600 * 8, 4096), (400 * BLOCK, 65536)):
            await t.write(sector, _pattern(b"12345678\n", n))
            await t.flush()
        out += ["== broke sharing", status(m, "t"), status(m, "pool")]
        await t.discard(2048, 4096)                      # blkdiscard -o 1M -l 2M
        out += ["discard rc=0", status(m, "t"), status(m, "pool")]
        await m.message("pool", 0, "delete 2")
        out.append(status(m, "pool"))
        out.append(hashlib.md5(await t.read(0, 65536)).hexdigest() + "  -")
        await m.remove("t")
        await m.remove("pool")
    out.append("== done")
    assert out == exp
    for name, path in (("meta", meta), ("data", data)):
        with open(path, "rb") as f:
            assert hashlib.md5(f.read()).hexdigest() == md5s[name], name


async def test_request_flags_reach_the_data_device(tmp_path, monkeypatch):
    """The thin target remaps the request itself, as 6.1's remap_and_issue does: a flakey
    (corrupt_bio_flags) under the data device sees the request's bi_opf (REQ_SYNC, REQ_IDLE,
    FUA) on reads and writes to mapped blocks, on a whole-block first write, and on the
    write after a partial block's zeroing (kcopyd's own zeroing carries none)."""
    from dmsim.bio import DIRECT_WRITE_FLAGS, REQ_FUA, REQ_OP_READ, REQ_OP_WRITE, Bio, Op, bi_opf
    from dmsim.targets.flakey import Flakey

    meta, data = images(str(tmp_path))
    seen = []
    real_map = Flakey.map

    async def spy(self, bio):
        if bio.op in (Op.READ, Op.WRITE) and bio.sectors:
            seen.append((bi_opf(bio), bio.sector, bio.sectors))
        return await real_map(self, bio)

    monkeypatch.setattr(Flakey, "map", spy)
    direct_fua = REQ_OP_WRITE | DIRECT_WRITE_FLAGS | REQ_FUA
    async with dmsim.open_manager(durability="process") as m:
        await mk(m, "fd", "0 %d flakey %s 0 1 0" % ((64 << 20) // 512, data))
        thin = await pool_and_thin(m, meta, "/dev/mapper/fd")

        async def write(sector, sectors, byte):
            await thin.submit(Bio(Op.WRITE, sector, sectors, bytes([byte]) * (sectors * 512), True,
                                  DIRECT_WRITE_FLAGS))

        seen.clear()
        await write(BLOCK * 2, BLOCK, 1)                 # a whole-block first write: the overwrite
        assert seen == [(direct_fua, 0, BLOCK)]
        seen.clear()
        await write(BLOCK * 2 + 8, 8, 2)                 # a rewrite of a mapped block (the fast lane)
        assert seen == [(direct_fua, 8, 8)]
        seen.clear()
        await write(BLOCK * 7 + 1, 1, 3)                 # partial first write: zeroed by kcopyd, then it
        assert seen[-1] == (direct_fua, BLOCK + 1, 1)
        assert all(opf & ~REQ_OP_WRITE == 0 for opf, _s, _n in seen[:-1])
        seen.clear()
        got = await thin.submit(Bio(Op.READ, BLOCK * 2 + 8, 8, None, False, DIRECT_WRITE_FLAGS))
        assert bytes(got) == bytes([2]) * 4096
        assert seen == [(REQ_OP_READ | DIRECT_WRITE_FLAGS, 8, 8)]
        await m.remove("thin")
        await m.remove("pool")
        await m.remove("fd")
