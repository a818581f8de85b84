"""thin-pool: the kernel's table grammar, constructor errors, status, messages and pool modes,
in-process, with the metadata checked by thin-provisioning-tools where installed."""
import re
import shutil
import subprocess

import pytest
import trio

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
