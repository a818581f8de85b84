"""thin-pool: the kernel's table grammar, constructor errors, status, messages and pool modes,
in-process, with the metadata checked by thin-provisioning-tools where installed."""
import re
import shutil
import subprocess

import pytest
import trio
from hypothesis import settings
from hypothesis import strategies as hst
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import dmsim
from dmsim.errors import DMError
from dmsim.table import parse_table_text
from dmsim.thin_metadata import PoolMetadata, check_metadata

HAVE_THIN_CHECK = shutil.which("thin_check") is not None


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
def imgs(tmp_path):
    meta, data = str(tmp_path / "meta.img"), str(tmp_path / "data.img")
    for p, mib in ((meta, 4), (data, 64)):
        with open(p, "wb") as f:
            f.truncate(mib << 20)
    return meta, data


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


def pool_line(meta, data, rest="128 16", size=131072):
    return "0 %d thin-pool %s %s %s" % (size, meta, data, rest)


async def test_fresh_pool_status_and_table(imgs):
    meta, data = imgs
    async with dmsim.open_manager(durability="process") as m:
        await mk(m, "pool", pool_line(meta, data))
        # 1024 metadata blocks, a reserve of 102 counted as used; 1024 data blocks of 64 KiB
        assert st(m, "pool") == "0 131072 thin-pool 0 111/1024 0/1024 - rw discard_passdown queue_if_no_space - 256 "
        words = tb(m, "pool").split(" ")
        assert words[:3] == ["0", "131072", "thin-pool"] and words[5:] == ["128", "16", "0", ""]
        await m.remove("pool")
        await mk(m, "pool", pool_line(meta, data, "128 0 4 skip_block_zeroing ignore_discard no_discard_passdown "
                                                  "error_if_no_space"))
        assert tb(m, "pool").endswith(" 128 0 4 skip_block_zeroing ignore_discard no_discard_passdown "
                                      "error_if_no_space ")
        assert st(m, "pool").endswith(" - rw ignore_discard error_if_no_space - 256 ")
        await m.remove("pool")


@pytest.mark.parametrize("rest, error", [
    ("128", "Invalid argument count"),
    ("127 16", "Invalid block size"),
    ("192 16", "Invalid block size"),
    ("0 16", "Invalid block size"),
    ("4194304 16", "Invalid block size"),
    ("128 x", "Invalid low water mark"),
    ("128 16 5 a b c d e", "Invalid number of pool feature arguments"),
    ("128 16 2 skip_block_zeroing", "Invalid number of pool feature arguments"),
    ("128 16 1 bogus", "Unrecognised pool feature requested"),
])
async def test_constructor_errors(imgs, rest, error):
    meta, data = imgs
    async with dmsim.open_manager(durability="process") as m:
        with pytest.raises(DMError):
            await mk(m, "pool", pool_line(meta, data, rest))
        assert any(error in line for line in m.read_log()), error


async def test_same_metadata_and_data_device_refused(imgs):
    meta, _ = imgs
    async with dmsim.open_manager(durability="process") as m:
        with pytest.raises(DMError):
            await mk(m, "pool", "0 8192 thin-pool %s %s 128 0" % (meta, meta))
        assert any("Error setting metadata or data device" in line for line in m.read_log())


async def test_corrupt_metadata_refused_with_the_kernels_lines(imgs):
    meta, data = imgs
    with open(meta, "wb") as f:
        f.write(b"\1" * 4096)
        f.truncate(4 << 20)
    async with dmsim.open_manager(durability="process") as m:
        with pytest.raises(DMError):
            await mk(m, "pool", pool_line(meta, data))
        log = m.read_log()
        assert any("thin metadata: sb_check failed: blocknr" in line for line in log)
        assert any("block manager: superblock validator check failed for block 0" in line for line in log)
        assert any("thin metadata: couldn't read superblock" in line for line in log)
        assert any("Error creating metadata object" in line for line in log)
    with open(meta, "rb") as f:
        assert f.read(4096) == b"\1" * 4096


async def test_messages_and_their_errors(imgs):
    meta, data = imgs
    async with dmsim.open_manager(durability="process") as m:
        await mk(m, "pool", pool_line(meta, data))
        await m.message("pool", 0, "create_thin 0")
        await m.message("pool", 0, "create_snap 1 0")
        await m.message("pool", 0, "set_transaction_id 0 7")
        assert st(m, "pool").startswith("0 131072 thin-pool 7 ")
        m.read_log()
        for msg, line in [
            ("create_thin 0", "Creation of new thinly-provisioned device with id 0 failed."),
            ("create_snap 2 9", "Creation of new snapshot 2 of device 9 failed."),
            ("delete 5", "Deletion of thin device 5 failed."),
            ("create_thin 16777216", "Message received with invalid device id: 16777216"),
            ("create_thin", "Incorrect number of arguments for 'create_thin' message"),
            ("set_transaction_id 1 2", "Failed to change transaction id from 1 to 2."),
            ("set_transaction_id x 2", "set_transaction_id message: Unrecognised current id x."),
            ("release_metadata_snap", "release_metadata_snap message failed."),
            ("frobnicate", "Unrecognised thin pool target message received: frobnicate"),
        ]:
            with pytest.raises(DMError):
                await m.message("pool", 0, msg)
            assert any(line in x for x in m.read_log()), line
        await m.message("pool", 0, "reserve_metadata_snap")
        held = st(m, "pool").split()[6]
        assert held != "-" and int(held) > 0
        with pytest.raises(DMError):
            await m.message("pool", 0, "reserve_metadata_snap")
        await m.message("pool", 0, "release_metadata_snap")
        assert st(m, "pool").split()[6] == "-"
        await m.message("pool", 0, "delete 1")
        await m.remove("pool")
    with PoolMetadata(meta, 128, format_device=False, durable=False) as md:
        assert md.device_ids() == [0] and md.transaction_id == 7
        assert check_metadata(md) == []
    if HAVE_THIN_CHECK:
        subprocess.run(["thin_check", meta], check=True, capture_output=True, timeout=60)


async def test_pool_reload_keeps_the_pool_and_grows_the_data_device(imgs):
    meta, data = imgs
    async with dmsim.open_manager(durability="process") as m:
        await mk(m, "pool", pool_line(meta, data, size=65536))
        await m.message("pool", 0, "create_thin 3")
        assert "/512 " in st(m, "pool")
        await m.load("pool", parse_table_text(pool_line(meta, data, size=131072)))
        await m.suspend("pool")
        await m.resume("pool")
        assert " 0/1024 " in st(m, "pool")
        assert any("thin: 253:0: growing the data device from 512 to 1024 blocks" in x for x in m.read_log())
        await m.remove("pool")
        # a second activation finds the devices it made
        await mk(m, "pool", pool_line(meta, data))
        thin = await mk(m, "t", "0 8192 thin /dev/mapper/pool 3")
        assert thin.size_sectors == 8192
        await m.remove("t")
        await m.remove("pool")


async def test_data_block_size_change_refused(imgs):
    meta, data = imgs
    async with dmsim.open_manager(durability="process") as m:
        await mk(m, "pool", pool_line(meta, data))
        await m.remove("pool")
        with pytest.raises(DMError):
            await mk(m, "pool", pool_line(meta, data, "256 16"))
        assert any("thin metadata: changing the data block size (from 128 to 256) is not supported" in x
                   for x in m.read_log())


async def test_out_of_data_space_error_mode_and_low_water_event(imgs, autojump_clock):
    meta, data = imgs
    async with dmsim.open_manager(durability="process") as m:
        pool = await mk(m, "pool", pool_line(meta, data, "128 2 1 error_if_no_space", size=128 * 4))
        await m.message("pool", 0, "create_thin 0")
        thin = await mk(m, "t", "0 8192 thin /dev/mapper/pool 0")
        ev = pool.event_nr
        for vb in range(4):
            await thin.write(vb * 128, b"x" * 512)
        assert pool.event_nr > ev
        with pytest.raises(DMError) as e:
            await thin.write(4 * 128, b"y" * 512)
        assert e.value.errno == 28  # ENOSPC
        log = m.read_log()
        assert any("thin: 253:0: reached low water mark for data device: sending event." in x for x in log)
        assert any("thin: 253:0: switching pool to out-of-data-space (error IO) mode" in x for x in log)
        assert " out_of_data_space " in st(m, "pool")
        assert (await thin.read(0, 1)) == b"x" * 512  # what was written stays readable
        await m.remove("t")
        await m.remove("pool")


async def test_out_of_data_space_queue_mode_waits_for_growth(imgs, autojump_clock):
    meta, data = imgs
    async with dmsim.open_manager(durability="process") as m:
        await mk(m, "pool", pool_line(meta, data, "128 0", size=128 * 2))
        await m.message("pool", 0, "create_thin 0")
        thin = await mk(m, "t", "0 8192 thin /dev/mapper/pool 0")
        await thin.write(0, b"a" * 512)
        await thin.write(128, b"b" * 512)
        done = trio.Event()

        async def blocked_write():
            await thin.write(256, b"c" * 512)
            done.set()

        async with trio.open_nursery() as n:
            n.start_soon(blocked_write)
            with trio.fail_after(30):
                while " out_of_data_space " not in st(m, "pool"):
                    await trio.sleep(0.5)  # (metadata commits run in a thread: real time passes)
            await trio.sleep(5)
            assert not done.is_set()
            await m.load("pool", parse_table_text(pool_line(meta, data, "128 0", size=128 * 8)))
            await m.suspend("pool")
            await m.resume("pool")
        assert done.is_set()
        assert (await thin.read(256, 1)) == b"c" * 512
        assert " rw " in st(m, "pool")
        await m.remove("t")
        await m.remove("pool")


async def test_metadata_full_aborts_to_read_only_with_needs_check(tmp_path):
    """A metadata device too small for its reserve (64 blocks: 6 reserved) runs out inside a
    commit: the write fails, the pool aborts to the last commit, flags needs_check, goes ro.
    Every committed mapping stays; the one block 6.1 allocates and commits (alloc_data_block
    commits before the reserve is touched) ahead of a mapping the abort then drops leaks."""
    meta, data = str(tmp_path / "meta.img"), str(tmp_path / "data.img")
    with open(meta, "wb") as f:
        f.truncate(64 * 4096)
    with open(data, "wb") as f:
        f.truncate(4 << 30)  # sparse
    async with dmsim.open_manager(durability="process") as m:
        await mk(m, "pool", "0 %d thin-pool %s %s 128 0 1 skip_block_zeroing" % (8 << 20, meta, data))
        await m.message("pool", 0, "create_thin 0")
        thin = await mk(m, "t", "0 %d thin /dev/mapper/pool 0" % (8 << 20))
        written = []
        with pytest.raises(DMError):
            for i in range(100000):
                vb = (i * 7919) % 65536
                await thin.write(vb * 128, b"m" * 512)
                written.append(vb)
                if i % 500 == 499:
                    await thin.flush()
        log = m.read_log()
        assert any("metadata operation" in x and "error = -28" in x for x in log), log[-5:]
        assert any("thin: 253:0: switching pool to read-only mode" in x for x in log)
        s = st(m, "pool")
        assert " ro " in s and " needs_check " in s
        unmapped = next(vb for vb in range(65536) if vb not in set(written))
        with pytest.raises(DMError):
            await thin.write(unmapped * 128, b"x" * 512)     # would need a new block
        await thin.write(written[1] * 128, b"x" * 512)        # a mapped one takes writes (6.1)
        assert await thin.read(written[0] * 128, 1) == b"m" * 512
        with pytest.raises(DMError):
            await m.message("pool", 0, "create_thin 1")
        await m.remove("t")
        await m.remove("pool")
    with PoolMetadata(meta, 128, format_device=False, durable=False, read_only=True) as md:
        assert md.needs_check
        problems = check_metadata(md)
        assert len(problems) <= 1 and all(re.fullmatch(r"data block \d+: count 1, referenced 0 times", p)
                                          for p in problems), problems


async def test_periodic_commit_survives_a_pool_reload(imgs, autojump_clock):
    meta, data = imgs
    async with dmsim.open_manager(durability="process") as m:
        await mk(m, "pool", pool_line(meta, data))
        await m.message("pool", 0, "create_thin 0")
        await m.load("pool", parse_table_text(pool_line(meta, data)))
        await m.suspend("pool")
        await m.resume("pool")
        thin = await mk(m, "t", "0 8192 thin /dev/mapper/pool 0")
        await thin.write(0, b"p" * 512)
        await trio.sleep(2)
        with PoolMetadata(meta, 128, format_device=False, durable=False, read_only=True) as md:
            assert [vb for vb, _b, _t in md.mappings(0)] == [0]
        await m.remove("t")
        await m.remove("pool")


async def test_read_only_pool_and_needs_check(imgs):
    """read_only: status ro, messages refused, thin writes fail, reads work; a pool whose
    metadata needs_check comes up read-only whatever the table asks."""
    meta, data = imgs
    async with dmsim.open_manager(durability="process") as m:
        await mk(m, "pool", pool_line(meta, data))
        await m.message("pool", 0, "create_thin 0")
        thin = await mk(m, "t", "0 8192 thin /dev/mapper/pool 0")
        await thin.write(0, b"r" * 512)
        await m.remove("t")
        await m.remove("pool")
        await mk(m, "pool", pool_line(meta, data, "128 16 1 read_only"))
        assert " - ro discard_passdown " in st(m, "pool")
        assert tb(m, "pool").endswith(" 128 16 1 read_only ")
        m.read_log()
        with pytest.raises(DMError):
            await m.message("pool", 0, "create_thin 1")
        assert any("thin: 253:0: unable to service pool target messages in READ_ONLY or FAIL mode" in x
                   for x in m.read_log())
        thin = await mk(m, "t", "0 8192 thin /dev/mapper/pool 0")
        assert await thin.read(0, 1) == b"r" * 512
        with pytest.raises(DMError):
            await thin.write(4096, b"w" * 512)       # unmapped: read-only pools allocate nothing
        await thin.write(0, b"w" * 512)              # mapped and unshared: written in place (6.1)
        await thin.flush()                           # block 0 mapped: the flush goes to the data device
        await m.remove("t")
        await m.remove("pool")
    with PoolMetadata(meta, 128, format_device=False, durable=False) as md:
        md.set_needs_check()
    async with dmsim.open_manager(durability="process") as m:
        await mk(m, "pool", pool_line(meta, data))
        assert " ro " in st(m, "pool") and " needs_check " in st(m, "pool")
        assert any("thin: 253:0: unable to switch pool to write mode until repaired." in x for x in m.read_log())
        await m.remove("pool")


async def _fill_metadata(m, thin):
    """Snapshots of thin 1, each followed by a write to its shared block 0 (one more btree
    leaf each), until the pool refuses the next snapshot; returns how many were made."""
    i = 2
    while True:
        try:
            await m.message("pool", 0, "create_snap %d 1" % i)
        except DMError:
            return i - 2
        await thin.write(i * 8, b"s" * 4096)
        await thin.flush()
        st(m, "pool")                                   # status commits, as the kernel's does
        i += 1


async def test_out_of_metadata_space_then_the_grown_device_recovers(tmp_path):
    """A 128-block metadata device (a linear dm device, as lvm's _tmeta) fills: low-water
    events (raw free <= 32), then out-of-metadata-space: status ro without needs_check,
    messages refused, a write needing a block fails, committed data reads back.  A plain
    suspend/resume changes nothing; the metadata device grown, a resume of the same pool
    table grows the space map and goes back to write mode.  thin_check accepts the result."""
    meta, data = str(tmp_path / "meta.img"), str(tmp_path / "data.img")
    with open(meta, "wb") as f:
        f.truncate(1 << 20)
    with open(data, "wb") as f:
        f.truncate(16 << 20)
    async with dmsim.open_manager(durability="process") as m:
        await mk(m, "meta", "0 1024 linear %s 0" % meta)
        await mk(m, "pool", pool_line("/dev/mapper/meta", data, "128 0", size=32768))
        await m.message("pool", 0, "create_thin 1")
        thin = await mk(m, "t", "0 8192 thin /dev/mapper/pool 1")
        await thin.write(0, b"a" * 4096)
        events = m.find("pool").event_nr
        made = await _fill_metadata(m, thin)
        assert 90 < made < 128
        log = m.read_log()
        assert "device-mapper: thin: No free metadata blocks" in log
        assert log[-1] == "device-mapper: thin: 253:1: unable to service pool target messages in READ_ONLY or FAIL mode"
        assert "device-mapper: thin: 253:1: switching pool to read-only mode" in log
        lows = [x for x in log if "reached low water mark for metadata device" in x]
        assert lows and m.find("pool").event_nr == events + len(lows) + 1
        s = st(m, "pool")
        assert " 0 128/128 " in s and " ro " in s and s.endswith(" - 32 ")
        with pytest.raises(DMError):
            await thin.write(0, b"x" * 4096)            # shared with the last snapshot
        assert await thin.read(8 * (made + 1), 8) == b"s" * 4096
        await m.suspend("pool")
        await m.resume("pool")
        assert " ro " in st(m, "pool")
        await m.load("meta", parse_table_text("0 2048 linear %s 0" % meta))
        await m.resume("meta")
        m.read_log()
        await m.suspend("pool")
        await m.resume("pool")
        assert m.read_log() == ["device-mapper: thin: 253:1: growing the metadata device from 128 to 256 blocks",
                                "device-mapper: thin: 253:1: switching pool to write mode"]
        s = st(m, "pool")
        assert " rw " in s and s.endswith(" - 64 ") and "/256 " in s
        await thin.write(0, b"y" * 4096)
        await thin.flush()
        assert await thin.read(0, 8) == b"y" * 4096
        await m.remove("t")
        await m.remove("pool")
        await m.remove("meta")
    with PoolMetadata(meta, 128, format_device=False, durable=False, read_only=True) as md:
        assert not md.needs_check and check_metadata(md) == []
    if shutil.which("thin_check"):
        subprocess.run(["thin_check", meta], check=True, capture_output=True)


async def test_needs_check_holds_the_pool_until_thin_check_clears_it(tmp_path, monkeypatch):
    """A failed metadata operation aborts to the last commit and sets needs_check: growing
    the metadata device then does nothing ("until repaired") and the pool stays ro across
    reloads; ``thin_check --clear-needs-check-flag`` on the inactive metadata clears it and
    the pool comes back in write mode with every committed mapping."""
    if not shutil.which("thin_check"):
        pytest.skip("thin_check (thin-provisioning-tools) not installed")
    from dmsim.persistent_data import NoSpace
    meta, data = str(tmp_path / "meta.img"), str(tmp_path / "data.img")
    with open(meta, "wb") as f:
        f.truncate(1 << 20)
    with open(data, "wb") as f:
        f.truncate(16 << 20)
    async with dmsim.open_manager(durability="process") as m:
        await mk(m, "meta", "0 1024 linear %s 0" % meta)
        await mk(m, "pool", pool_line("/dev/mapper/meta", data, "128 0", size=32768))
        await m.message("pool", 0, "create_thin 1")
        thin = await mk(m, "t", "0 8192 thin /dev/mapper/pool 1")
        await thin.write(0, b"k" * 4096)
        await thin.flush()
        pool = m.find("pool").live.targets[0].pool

        def no_space(*args):
            raise NoSpace("no free metadata blocks")

        monkeypatch.setattr(pool.md, "insert_block", no_space)
        with pytest.raises(DMError):
            await thin.write(128 * 3, b"n" * 4096)
        monkeypatch.undo()
        log = m.read_log()
        assert "device-mapper: thin: 253:1: metadata operation 'dm_thin_insert_block' failed: error = -28" in log
        assert log[-1] == "device-mapper: thin: 253:1: switching pool to read-only mode"
        assert " ro " in st(m, "pool") and " needs_check " in st(m, "pool")
        await m.load("meta", parse_table_text("0 2048 linear %s 0" % meta))
        await m.resume("meta")
        m.read_log()
        await m.load("pool", parse_table_text(pool_line("/dev/mapper/meta", data, "128 0", size=32768)))
        await m.resume("pool")
        assert m.read_log() == ["device-mapper: thin: 253:1: unable to switch pool to write mode until repaired.",
                                "device-mapper: thin: 253:1: unable to grow the metadata device until repaired."]
        assert " 128 needs_check " not in st(m, "pool") and "/128 " in st(m, "pool")
        await m.remove("t")
        await m.remove("pool")
        await m.remove("meta")
    subprocess.run(["thin_check", "--clear-needs-check-flag", meta], check=True, capture_output=True)
    async with dmsim.open_manager(durability="process") as m:
        await mk(m, "meta", "0 2048 linear %s 0" % meta)
        await mk(m, "pool", pool_line("/dev/mapper/meta", data, "128 0", size=32768))
        assert m.read_log()[-1] == "device-mapper: thin: 253:1: growing the metadata device from 128 to 256 blocks"
        s = st(m, "pool")
        assert " rw " in s and "/256 " in s and s.endswith(" - 64 ")
        thin = await mk(m, "t", "0 8192 thin /dev/mapper/pool 1")
        assert await thin.read(0, 8) == b"k" * 4096
        await thin.write(128 * 3, b"n" * 4096)
        await thin.flush()
        await m.remove("t")
        await m.remove("pool")
        await m.remove("meta")


class _FakeMetadata:
    needs_check = False
    read_only_now = False

    def set_read_only(self, read_only):
        self.read_only_now = read_only


class _FakeCtx:
    def __init__(self):
        self.lines = []

    def log(self, line):
        self.lines.append(line)


MODES = ["write", "out-of-data-space", "out-of-metadata-space", "read-only", "fail"]


class PoolModeMachine(RuleBasedStateMachine):
    """``set_pool_mode`` against a plain model of 6.1's rules: never to write mode while
    needs_check is set (read-only instead, or the old mode), never out of fail mode, the
    metadata refusing changes in the read-only and fail modes, one log line per change."""

    def __init__(self):
        super().__init__()
        from targets.thin_pool import PM_WRITE, Pool

        class _Md:
            mm = "253:0"

        self.ctx = _FakeCtx()
        self.md = _FakeMetadata()
        self.pool = Pool(self.ctx, _Md(), None, None, 128, self.md)  # type: ignore[arg-type]
        self.mode = PM_WRITE
        self.needs_check = False

    @rule(mode=hst.sampled_from(MODES))
    def set_mode(self, mode):
        from targets.thin_pool import MODE_NAMES, PM_FAIL, PM_READ_ONLY, PM_WRITE
        before = len(self.ctx.lines)
        self.pool.set_mode(mode)
        want = mode
        expected_lines = []
        if mode == PM_WRITE and self.needs_check:
            expected_lines.append("thin: 253:0: unable to switch pool to write mode until repaired.")
            want = self.mode if self.mode != mode else PM_READ_ONLY
        if self.mode == PM_FAIL:
            want = PM_FAIL
        if want != self.mode:
            expected_lines.append("thin: 253:0: switching pool to %s%s mode" % (
                MODE_NAMES[want], " (queue IO)" if want == "out-of-data-space" else ""))
        self.mode = want
        assert self.ctx.lines[before:] == expected_lines

    @rule()
    def flag_needs_check(self):
        self.needs_check = self.md.needs_check = True

    @invariant()
    def agrees(self):
        from targets.thin_pool import PM_FAIL, PM_WRITE, is_read_only_mode
        assert self.pool.pf.mode == self.mode
        if self.mode == PM_FAIL or is_read_only_mode(self.mode):
            assert self.md.read_only_now
        elif self.mode == PM_WRITE:
            assert not self.md.read_only_now


TestPoolModes = PoolModeMachine.TestCase
TestPoolModes.settings = settings(max_examples=60, stateful_step_count=20, deadline=None)
