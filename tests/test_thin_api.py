"""dmsim.thin: the three-line pool, twenty snapshots of one volume each keeping its moment,
external-origin snapshots of an image, reopening a pool from its files, the thin_pool fixture,
the README example, bad input; and a model test of volumes, snapshots, writes, deletes and
reopens against bytearrays."""
import errno
import os
import re

import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import dmsim
from dmsim.errors import DMError
from dmsim.thin import PoolStatus, ThinStatus, create_pool

BLOCK_BYTES = 128 * 512


def files(d, data_mib=64, meta_mib=4):
    meta, data = os.path.join(str(d), "meta.img"), os.path.join(str(d), "data.img")
    for path, size in ((meta, meta_mib << 20), (data, data_mib << 20)):
        with open(path, "wb") as f:
            f.truncate(size)
    return meta, data


async def test_three_line_pool(tmp_path):
    meta, data = files(tmp_path)
    async with dmsim.open_manager(durability="process") as m:
        pool = await create_pool(m, meta, data, name="pool", block_sectors=128)
        vol = await pool.create_thin("vol", size_sectors=8192)
        await vol.pwrite(0, b"a" * 4096)
        snap = await pool.snapshot(vol, "snap1")
        await vol.pwrite(0, b"b" * 4096)
        assert await snap.pread(0, 4096) == b"a" * 4096
        assert await vol.pread(0, 4096) == b"b" * 4096
        s = pool.status()
        assert (s.used_data_blocks, s.total_data_blocks, s.mode, s.needs_check) == (2, 1024, "rw", False)
        assert pool.thin_status(vol) == ThinStatus(128, 127)
        assert pool.device_ids() == [0, 1]
        assert not m.find("vol").suspended
        await pool.delete(snap)
        assert pool.device_ids() == [0] and pool.status().used_data_blocks == 1
        await pool.close()
        assert list(m.devices) == []


async def test_twenty_snapshots_each_keep_their_moment(tmp_path):
    """Snapshot i is taken after the origin's i-th write and then written to itself: it must
    show the origin as it was then plus its own write, whatever came later elsewhere."""
    meta, data = files(tmp_path)
    size_bytes = 16 * BLOCK_BYTES
    async with dmsim.open_manager(durability="process") as m:
        pool = await create_pool(m, meta, data)
        vol = await pool.create_thin("vol", size_sectors=size_bytes // 512)
        origin = bytearray(size_bytes)
        want = {}
        for i in range(20):
            off = (i * 5000) % (size_bytes - 4096)
            chunk = bytes([i + 1]) * 3000                 # partial-block: breaks sharing by copying
            await vol.pwrite(off, chunk)
            origin[off:off + len(chunk)] = chunk
            snap = await pool.snapshot(vol, "snap%d" % i)
            view = bytearray(origin)
            own = (i * 7 * 4096) % size_bytes
            await snap.pwrite(own, b"s%02d " % i * 1024)
            view[own:own + 4096] = b"s%02d " % i * 1024
            want["snap%d" % i] = view
        for name, view in want.items():
            assert await m.find(name).pread(0, size_bytes) == bytes(view), name
        assert await vol.pread(0, size_bytes) == bytes(origin)
        assert pool.status().used_data_blocks <= 16 * 21
        await pool.close()


async def test_snapshots_of_an_image_leave_it_untouched(tmp_path):
    disk = os.path.join(str(tmp_path), "disk.img")
    image = os.urandom(1 << 20)
    with open(disk, "wb") as f:
        f.write(image)
    meta, data = files(tmp_path)
    async with dmsim.open_manager(durability="process") as m:
        pool = await create_pool(m, meta, data)
        a = await pool.create_thin("a", origin_path=disk)
        await a.pwrite(100, b"x" * 10)
        b = await pool.snapshot(a, "b")                   # keeps the external origin
        await a.pwrite(200, b"y" * 10)
        assert a.size_sectors == b.size_sectors == 2048
        assert await b.pread(0, 1 << 20) == image[:100] + b"x" * 10 + image[110:]
        assert await a.pread(190, 30) == image[190:200] + b"y" * 10 + image[210:220]
        await pool.close()
    with open(disk, "rb") as f:
        assert f.read() == image


async def test_reopen_from_the_files(tmp_path):
    meta, data = files(tmp_path)
    async with dmsim.open_manager(durability="process") as m:
        pool = await create_pool(m, meta, data)
        vol = await pool.create_thin("vol", size_sectors=4096)
        await vol.pwrite(0, b"kept" * 1024)
        snap = await pool.snapshot(vol, "snap")
        await snap.pwrite(4096, b"mine" * 1024)
        await pool.delete(await pool.create_thin("gone", size_sectors=4096))
        used = pool.status().used_data_blocks
        await pool.close()
    async with dmsim.open_manager(durability="process") as m:
        pool = await create_pool(m, meta, data)
        assert pool.device_ids() == [0, 1]
        assert pool.status().used_data_blocks == used
        vol = await pool.activate("vol", 0, 4096)
        snap = await pool.activate("snap", 1, 4096)
        assert await vol.pread(0, 8192) == b"kept" * 1024 + bytes(4096)
        assert await snap.pread(0, 8192) == b"kept" * 1024 + b"mine" * 1024
        assert (await pool.create_thin("new", size_sectors=8)).name == "new"
        assert pool.thins["new"] == 2                     # the next free id, not a reused one
        await pool.close()


async def test_fixture_makes_and_removes_pools(thin_pool, dm):
    pool = await thin_pool(data_mib=8)
    other = await thin_pool(name="other", data_mib=8, features=("skip_block_zeroing",))
    vol = await pool.create_thin("vol", size_sectors=2048)
    await other.create_thin("ovol", size_sectors=2048)
    await pool.snapshot(vol, "vsnap")
    assert pool.status().total_data_blocks == 128
    assert sorted(dm.manager.devices) == ["other", "ovol", "pool", "vol", "vsnap"]


async def test_bad_input_fails_cleanly(tmp_path):
    meta, data = files(tmp_path)
    tiny = os.path.join(str(tmp_path), "tiny.img")
    with open(tiny, "wb") as f:
        f.truncate(4096)
    async with dmsim.open_manager(durability="process") as m:
        with pytest.raises(DMError) as e:
            await create_pool(m, meta, tiny)
        assert e.value.errno == errno.EINVAL and list(m.devices) == []
        with pytest.raises(DMError):
            await create_pool(m, meta, data, block_sectors=100)   # not a multiple of 128
        assert list(m.devices) == []
        pool = await create_pool(m, meta, data)
        with pytest.raises(DMError) as e:
            await pool.snapshot("nope", "s")
        assert e.value.errno == errno.ENODEV
        with pytest.raises(DMError):
            await pool.delete("nope")
        await pool.create_thin("vol", size_sectors=8)
        with pytest.raises(DMError):
            await pool.create_thin("vol", size_sectors=8)        # name taken: id given back
        assert pool.device_ids() == [0] and sorted(m.devices) == ["pool", "vol"]
        with pytest.raises(DMError):
            await pool.create_thin("x")                          # no size and no origin
        await pool.close()


def test_status_parse():
    s = PoolStatus.parse("3 113/1024 2/1024 7 out_of_data_space ignore_discard error_if_no_space needs_check 256 ")
    assert (s.transaction_id, s.held_metadata_root, s.mode, s.needs_check, s.free_data_blocks) == \
        (3, 7, "out_of_data_space", True, 1022)
    assert PoolStatus.parse("Fail").mode == "Fail"
    assert ThinStatus.parse("0 -") == ThinStatus(0, None)
    assert ThinStatus.parse("Fail").failed
    with pytest.raises(ValueError):
        PoolStatus.parse("0 1/2")


def test_readme_example(tmp_path, monkeypatch):
    """The README's thin example, run as written (it calls trio.run itself)."""
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("**Thin provisioning:"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    out = []
    exec(compile(code, "README.md", "exec"), {"print": out.append})
    assert out == [20]
    assert os.path.getsize(tmp_path / "disk.img") == 8 << 20
    with open(tmp_path / "disk.img", "rb") as f:
        assert f.read(4096) == bytes(4096)


class ThinApiModel(RuleBasedStateMachine):
    """Random volumes, snapshots, writes and deletes through dmsim.thin against a dict of
    bytearrays; every step reopens the pool from its files, so each checks reopening too."""

    SIZE = 4 * BLOCK_BYTES

    def __init__(self):
        super().__init__()
        import tempfile
        self.dir = tempfile.TemporaryDirectory()
        self.meta, self.data = files(self.dir.name, data_mib=16)
        self.ref: dict[str, bytearray] = {}
        self.ids: dict[str, int] = {}         # what the pool holds, reactivated at each open
        self.count = 0

    def run(self, fn, *args):
        async def go():
            async with dmsim.open_manager(durability="process") as m:
                self.m = m
                self.pool = await create_pool(m, self.meta, self.data)
                for name, dev_id in self.ids.items():
                    await self.pool.activate(name, dev_id, self.SIZE // 512)
                result = await fn(*args)
                await self.pool.close()
                return result
        return trio.run(go)

    def _ids(self):
        self.ids = dict(self.pool.thins)

    @rule()
    def create(self):
        name = "v%d" % self.count
        self.count += 1

        async def go():
            await self.pool.create_thin(name, size_sectors=self.SIZE // 512)
            self._ids()
        self.run(go)
        self.ref[name] = bytearray(self.SIZE)

    @precondition(lambda self: self.ref)
    @rule(data=st.data())
    def snapshot(self, data):
        origin = data.draw(st.sampled_from(sorted(self.ref)))
        name = "v%d" % self.count
        self.count += 1

        async def go():
            await self.pool.snapshot(origin, name)
            self._ids()
        self.run(go)
        self.ref[name] = bytearray(self.ref[origin])

    @precondition(lambda self: self.ref)
    @rule(data=st.data(), off=st.integers(0, SIZE - 1), n=st.integers(1, 3 * 4096), byte=st.integers(1, 255))
    def write(self, data, off, n, byte):
        name = data.draw(st.sampled_from(sorted(self.ref)))
        n = min(n, self.SIZE - off)

        async def go():
            await self.m.find(name).pwrite(off, bytes([byte]) * n)
        self.run(go)
        self.ref[name][off:off + n] = bytes([byte]) * n

    @precondition(lambda self: self.ref)
    @rule(data=st.data())
    def delete(self, data):
        name = data.draw(st.sampled_from(sorted(self.ref)))

        async def go():
            await self.pool.delete(name)
            self._ids()
        self.run(go)
        del self.ref[name]

    @invariant()
    def views_match(self):
        async def go():
            return {n: await self.m.find(n).pread(0, self.SIZE) for n in self.ref}
        got = self.run(go)
        assert got == {n: bytes(v) for n, v in self.ref.items()}

    def teardown(self):
        self.dir.cleanup()


ThinApiModel.TestCase.settings = settings(max_examples=8, stateful_step_count=8, deadline=None,
                                          suppress_health_check=list(HealthCheck))
test_thin_api_model = ThinApiModel.TestCase
