"""MappedDevice's I/O path and suspend/resume semantics (autojump clock).

Suspend drains in-flight I/O, I/O submitted while suspended waits for resume, requests
are split at target boundaries and ``max_io_len``, read-only tables refuse writes, and a
target's :class:`~dmsim.device.Requeue` during a noflush suspend parks the request until
resume.  The test-only targets below (``test-hold``, ``test-slow``, ``test-hooks``) are
registered by the ``test_targets`` fixture; ``tests/test_manager.py`` uses them too.
"""
import errno

import pytest
import trio
import trio.testing

import dmsim
from dmsim.bio import Bio, Op, to_bytes
from dmsim.device import Requeue
from dmsim.errors import DMError
from dmsim.table import parse_table_text
from dmsim.targets import base as tbase

INSTANCES: list = []


class Hold(tbase.Target):
    name = "test-hold"

    async def ctr(self, args):
        self.dev = self.ctx.get_device(args[0])
        self.offset = int(args[1])
        self.requeue = "requeue" in args[2:]
        self.released = trio.Event()
        self.mapped = 0
        INSTANCES.append(self)

    def release(self):
        self.released.set()

    async def presuspend(self, noflush=False):
        if noflush and self.requeue:
            self.release()

    async def map(self, bio):
        self.mapped += 1
        await self.released.wait()
        if self.requeue and self.ctx.noflush_suspending():
            raise Requeue()
        return await tbase.passthrough(self.dev, bio, self.offset)

    def iterate_devices(self):
        return [(self.dev, self.offset, self.len)]


class Slow(tbase.Target):
    name = "test-slow"

    async def ctr(self, args):
        self.seconds = float(args[0])
        self.done = 0
        INSTANCES.append(self)

    async def map(self, bio):
        await trio.sleep(self.seconds)
        self.done += 1
        return bytes(to_bytes(bio.sectors)) if bio.op is Op.READ else None


class Hooks(tbase.Target):
    name = "test-hooks"

    async def ctr(self, args):
        self.calls = []
        INSTANCES.append(self)

    async def map(self, bio):
        return bytes(to_bytes(bio.sectors)) if bio.op is Op.READ else None

    async def message(self, argv):
        if argv == ["event"]:
            self.ctx.event()
            return None
        return "echo " + " ".join(argv)

    async def dtr(self):
        self.calls.append("dtr")

    async def presuspend(self, noflush=False):
        self.calls.append("presuspend(%s)" % noflush)

    async def presuspend_undo(self):
        self.calls.append("presuspend_undo")

    async def postsuspend(self):
        self.calls.append("postsuspend")

    async def preresume(self):
        self.calls.append("preresume")

    async def resume(self):
        self.calls.append("resume")


class Stall(tbase.Target):
    """``test-stall DEV PHASE SECONDS``: holds DEV and sleeps in PHASE (ctr, preresume or
    dtr), so that a test can cancel a load, resume or remove right there."""

    name = "test-stall"

    async def ctr(self, args):
        self.dev = self.ctx.get_device(args[0])
        self.phase, self.seconds = args[1], float(args[2])
        INSTANCES.append(self)
        if self.phase == "ctr":
            await trio.sleep(self.seconds)

    async def map(self, bio):
        return await tbase.passthrough(self.dev, bio)

    async def preresume(self):
        if self.phase == "preresume":
            await trio.sleep(self.seconds)

    async def dtr(self):
        await trio.sleep(self.seconds if self.phase == "dtr" else 0)

    def iterate_devices(self):
        return [(self.dev, 0, self.len)]


ALL = (Hold, Slow, Hooks, Stall)


def register_all():
    INSTANCES.clear()
    for cls in ALL:
        tbase.register(cls)


def unregister_all():
    INSTANCES.clear()
    for cls in ALL:
        tbase._registry.pop(cls.name, None)
        if cls.name in tbase._order:
            tbase._order.remove(cls.name)


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
def test_targets():
    register_all()
    yield INSTANCES
    unregister_all()


@pytest.fixture
async def m():
    async with dmsim.open_manager() as mgr:
        yield mgr


@pytest.fixture
def img(tmp_path):
    """A 1 MiB image whose sector ``s`` is filled with byte ``s % 251``."""
    path = tmp_path / "vda"
    path.write_bytes(b"".join(bytes([s % 251]) * 512 for s in range(2048)))
    return str(path)


def sector_bytes(s, n=1):
    return b"".join(bytes([(s + k) % 251]) * 512 for k in range(n))


async def mk(m, name, table, read_only=False):
    m.create(name)
    await m.load(name, parse_table_text(table), read_only)
    await m.resume(name)
    return m.find(name)


# -- suspend drains, suspended I/O waits ---------------------------------------------------------
async def test_suspend_waits_for_in_flight_io(m, test_targets, autojump_clock):
    md = await mk(m, "s", "0 64 test-slow 5")
    slow = test_targets[0]
    done = []

    async def reader():
        done.append(await md.read(0, 8))

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.sleep(1)
        assert done == [] and md._inflight == 1
        await m.suspend("s")
        # suspend returned only after the read finished, at t=5
        assert done == [bytes(4096)] and slow.done == 1
        assert trio.current_time() == pytest.approx(5)
        assert md.suspended


async def test_io_while_suspended_waits_for_resume(m, test_targets, autojump_clock):
    md = await mk(m, "s", "0 64 test-slow 0")
    await m.suspend("s")
    done = []

    async def writer():
        await md.write(0, b"\x01" * 512)
        done.append(trio.current_time())

    async with trio.open_nursery() as n:
        n.start_soon(writer)
        await trio.sleep(100)
        assert done == [] and test_targets[0].done == 0
        await m.resume("s")
    assert done == [pytest.approx(100)]
    assert test_targets[0].done == 1


async def test_resume_swaps_tables_only_at_resume(m, img):
    md = await mk(m, "lin", "0 8 linear %s 0" % img)
    await m.load("lin", parse_table_text("0 16 linear %s 100" % img))
    assert await md.read(0, 1) == sector_bytes(0)      # still the old table
    assert md.size_sectors == 8
    await m.resume("lin")
    assert await md.read(0, 1) == sector_bytes(100)
    assert md.size_sectors == 16
    assert m.info("lin").inactive_table is False


async def test_resume_with_new_table_drains_the_old_one_first(m, img, test_targets, autojump_clock):
    md = await mk(m, "s", "0 64 test-slow 3")
    old = test_targets[0]
    await m.load("s", parse_table_text("0 64 linear %s 0" % img))
    got = []

    async def reader():
        got.append(await md.read(1, 1))

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.sleep(1)
        await m.resume("s")     # implicit suspend: the read on the old table finishes first
        assert got == [bytes(512)] and old.done == 1
        assert trio.current_time() == pytest.approx(3)
    assert await md.read(1, 1) == sector_bytes(1)
    assert not md.suspended


async def test_hooks_order(m, test_targets):
    md = await mk(m, "h", "0 8 test-hooks")
    t = test_targets[0]
    assert t.calls == ["preresume", "resume"]
    await m.suspend("h")
    await m.suspend("h")                     # already suspended: nothing runs
    await m.resume("h")
    await m.resume("h")                      # not suspended, no inactive table: no-op
    assert t.calls[2:] == ["presuspend(False)", "postsuspend", "preresume", "resume"]
    await m.suspend("h", noflush=True)
    assert t.calls[6:] == ["presuspend(True)", "postsuspend"]
    await m.load("h", parse_table_text("0 8 zero"))
    await m.resume("h")
    assert t.calls[8:] == ["dtr"]
    assert md.live.targets[0].name == "zero"


async def test_cancelled_suspend_is_undone(m, img, test_targets, autojump_clock):
    """A suspend interrupted while draining (a signal in the kernel: EINTR) undoes itself:
    the device is not left suspended, the presuspend is undone, I/O flows again."""
    md = await mk(m, "h", "0 8 test-hooks\n8 8 test-hold %s 0" % img)
    hooks, hold = test_targets
    async with trio.open_nursery() as n:
        n.start_soon(md.read, 8, 1)
        await trio.sleep(1)
        with trio.move_on_after(5):
            await m.suspend("h")
        assert not md.suspended
        assert hooks.calls[-2:] == ["presuspend(False)", "presuspend_undo"]
        assert await md.read(0, 1) == bytes(512)     # not blocked
        hold.release()
    assert "postsuspend" not in hooks.calls


# -- requeue during noflush suspend ---------------------------------------------------------------
async def test_requeue_in_noflush_suspend_parks_bio_until_resume(m, img, test_targets, autojump_clock):
    md = await mk(m, "mp", "0 64 test-hold %s 0 requeue" % img)
    hold = test_targets[0]
    got = []

    async def reader():
        got.append(await md.read(3, 1))

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.sleep(1)
        assert hold.mapped == 1
        await m.suspend("mp", noflush=True)     # presuspend releases; map requeues
        assert got == [] and md._inflight == 0 and md.suspended
        await trio.sleep(50)
        assert got == []
        await m.resume("mp")
    assert got == [sector_bytes(3)]
    assert hold.mapped == 2                     # mapped again after resume


async def test_requeue_without_noflush_suspend_is_eio(m, img, test_targets):
    md = await mk(m, "mp", "0 64 test-hold %s 0" % img)

    class Always(tbase.Target):
        name = "test-requeue"

        async def ctr(self, args):
            pass

        async def map(self, bio):
            raise Requeue()

    tbase.register(Always)
    try:
        await m.load("mp", parse_table_text("0 64 test-requeue"))
        await m.resume("mp")
        with pytest.raises(DMError) as ei:
            await md.read(0, 1)
        assert ei.value.errno == errno.EIO
    finally:
        tbase._registry.pop(Always.name)
        tbase._order.remove(Always.name)


async def test_plain_suspend_of_requeue_target_completes_the_bio(m, img, test_targets, autojump_clock):
    md = await mk(m, "mp", "0 64 test-hold %s 0 requeue" % img)
    hold = test_targets[0]
    got = []

    async def reader():
        got.append(await md.read(5, 1))

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.sleep(1)
        hold.release()
        await m.suspend("mp")
        assert got == [sector_bytes(5)]
        await m.resume("mp")


# -- the I/O path ------------------------------------------------------------------------------------
async def test_read_only_table_refuses_writes(m, img):
    md = await mk(m, "ro", "0 64 linear %s 0" % img, read_only=True)
    for bio in (Bio.write(0, bytes(512)), Bio(Op.DISCARD, 0, 8), Bio(Op.WRITE_ZEROES, 0, 8)):
        with pytest.raises(DMError) as ei:
            await md.submit(bio)
        assert ei.value.errno == errno.EPERM
    assert await md.read(0, 1) == sector_bytes(0)
    with open(img, "rb") as f:
        assert f.read(512) == sector_bytes(0)
    # the underlying file was opened read-only
    assert md.live.targets[0].dev.read_only


async def test_out_of_range_and_no_table_are_eio(m, img):
    md = await mk(m, "l", "0 64 linear %s 0" % img)
    for bio in (Bio.read(60, 8), Bio.read(64, 1), Bio.write(63, bytes(1024))):
        with pytest.raises(DMError) as ei:
            await md.submit(bio)
        assert ei.value.errno == errno.EIO
    m.create("nt")
    with pytest.raises(DMError) as ei:
        await m.find("nt").read(0, 1)
    assert ei.value.errno == errno.EIO


async def test_split_at_target_boundaries_and_max_io_len(m, img):
    seen = []

    class Rec(tbase.Target):
        name = "test-rec"

        async def ctr(self, args):
            self.max_io_len = int(args[0])

        async def map(self, bio):
            seen.append((self.begin, bio.sector, bio.sectors))
            return bytes(to_bytes(bio.sectors)) if bio.op is Op.READ else None

    tbase.register(Rec)
    try:
        md = await mk(m, "r", "0 10 test-rec 0\n10 20 test-rec 8\n30 2 test-rec 0")
        assert await md.read(5, 27) == bytes(27 * 512)
        # relative sectors; the middle target is cut at multiples of 8 of its own sectors
        # (the pieces are mapped concurrently, so only the set is defined)
        assert sorted(seen) == [(0, 5, 5), (10, 0, 8), (10, 8, 8), (10, 16, 4), (30, 0, 2)]
        seen.clear()
        await md.write(12, b"\x07" * 512 * 7)
        assert sorted(seen) == [(10, 2, 6), (10, 8, 1)]
    finally:
        tbase._registry.pop(Rec.name)
        tbase._order.remove(Rec.name)


async def test_flush_goes_to_every_target(m, img, tmp_path):
    md = await mk(m, "f", "0 8 linear %s 0\n8 8 zero\n16 8 error" % img)
    await md.flush()   # linear passes it down, zero accepts, error accepts an empty flush


async def test_pread_pwrite_unaligned(m, img):
    md = await mk(m, "p", "0 64 linear %s 0" % img)
    await md.pwrite(1000, b"hello")
    assert await md.pread(998, 9) == bytes([1, 1]) + b"hello" + bytes([1, 1])
    assert await md.pread(1020, 8) == bytes([1, 1, 1, 1, 2, 2, 2, 2])
    with open(img, "rb") as f:
        f.seek(1000)
        assert f.read(5) == b"hello"


async def test_removed_device_fails_held_io(m, test_targets, autojump_clock):
    md = await mk(m, "s", "0 64 test-slow 0")
    await m.suspend("s")
    got = []

    async def reader():
        try:
            await md.read(0, 1)
        except DMError as e:
            got.append(e.errno)

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.sleep(1)
        await m.remove("s")
    assert got == [errno.EIO]


async def test_split_read_assembles_pieces_in_one_buffer(m, img):
    """A read over several targets: every piece is filled into one buffer, whether the
    target fills the piece in place (linear over a file) or returns bytes (zero)."""
    md = await mk(m, "mix", "0 4 linear %s 100\n4 4 zero\n8 4 linear %s 7" % (img, img))
    got = await md.read(2, 9)
    assert got == sector_bytes(102, 2) + bytes(4 * 512) + sector_bytes(7, 3)
    assert len(got) == 9 * 512
    assert await md.read(4, 2) == bytes(1024)          # a single piece: no buffer needed
