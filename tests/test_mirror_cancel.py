"""A mirror write whose caller goes (cancelled: a suspend's writeback at SIGTERM, an NBD
client, an API caller) still ends as one that completed: every leg written, or the
region out of sync.  Never a clean region whose legs differ."""
import trio
import trio.testing

import dmsim
from dmsim import parse_table_text
from dmsim.bio import Bio, Op

SECTORS = 2048


async def create(m, name, table):
    m.create(name)
    await m.load(name, parse_table_text(table))
    await m.resume(name)
    return m.find(name)


def sync_count(m, name):
    fields = str(m.table_lines(name, "info")[0]).split()
    done, total = fields[4 + int(fields[3])].split("/")
    return int(done), int(total)


async def cancelled_write(md, after_seconds):
    """A 4 KiB write at 0 whose caller is cancelled ``after_seconds`` into it."""
    with trio.move_on_after(after_seconds):
        await md.submit(Bio(Op.WRITE, 0, 8, b"N" * 4096))


async def test_write_cancelled_between_legs_reaches_both(tmp_path, autojump_clock):
    """The second leg is slow (delay 100 ms): the write is cancelled when the first leg has
    it.  Before, the region went back to clean with leg 1 new and leg 2 old."""
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    for p in (a, b):
        p.write_bytes(bytes(SECTORS * 512))
    async with dmsim.open_manager() as m:
        slow = await create(m, "slow", "0 %d delay %s 0 0 %s 0 100" % (SECTORS, b, b))
        md = await create(m, "m", "0 %d mirror core 2 64 nosync 2 %s 0 %s 0" % (SECTORS, a, slow.mm))
        await cancelled_write(md, 0.01)
        await trio.testing.wait_all_tasks_blocked()
        assert sync_count(m, "m") == (32, 32)
        assert a.read_bytes()[:4096] == b.read_bytes()[:4096] == b"N" * 4096


async def test_write_failed_on_a_leg_then_cancelled_leaves_the_region_out_of_sync(tmp_path, autojump_clock):
    """The second leg fails the write (an error device behind a 100 ms delay) and the
    caller is cancelled before kmirrord took the failure: the region must still go out of
    sync (dm_rh_mark_nosync), not back to clean."""
    a = tmp_path / "a.img"
    a.write_bytes(bytes(SECTORS * 512))
    async with dmsim.open_manager() as m:
        bad = await create(m, "bad", "0 %d error" % SECTORS)
        slow = await create(m, "slowbad", "0 %d delay %s 0 0 %s 0 100" % (SECTORS, bad.mm, bad.mm))
        md = await create(m, "m", "0 %d mirror core 2 64 nosync 2 %s 0 %s 0" % (SECTORS, a, slow.mm))
        await cancelled_write(md, 0.05)
        await trio.testing.wait_all_tasks_blocked()
        done, total = sync_count(m, "m")
        assert done < total
        assert a.read_bytes()[:4096] == b"N" * 4096
