"""Snapshots against a model: a hypothesis state machine drives an origin and one or two
snapshots (in-process manager, no FUSE) and checks every read against plain bytearrays.

It covers writes and reads of 1 sector to several chunks at any offset on each device,
concurrent writes over shared chunks, reactivation over the same files, handover (reload +
resume), merge, chunk sizes 1-128, P, PO and N stores, both durabilities and both I/O
modes, and the origin device created before or after its snapshots (before needs the
origin suspended and resumed around each snapshot's creation, as the kernel does;
``dmsim.snapshots.take_snapshot`` does it).

``DMSIM_MODEL_EXAMPLES=N`` runs N examples (a soak); ``DMSIM_MODEL_STEPS`` the steps per
example.  The default is small enough for CI.
"""
from __future__ import annotations

import os
import random
import struct
import threading
import time

import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import dmsim
from dmsim.snapshots import merge_snapshot, take_snapshot
from dmsim.table import TableLine

EXAMPLES = int(os.environ.get("DMSIM_MODEL_EXAMPLES", "100"))
STEPS = int(os.environ.get("DMSIM_MODEL_STEPS", "30"))
SECTOR = 512
ORIGIN = "origin"
#: operations run, over all examples (printed by the soak)
OPS = [0]


class Loop:
    """A Trio loop with a manager, in a helper thread (hypothesis' rules are plain calls).
    Nothing here waits for time; a hang fails after 120 s."""

    def __init__(self, durability: str, io_mode: str):
        self.manager = None
        self.error: BaseException | None = None
        ready = threading.Event()

        async def main():
            self._stop = trio.Event()
            self.token = trio.lowlevel.current_trio_token()
            async with dmsim.open_manager(durability=durability, io_mode=io_mode) as m:
                self.manager = m
                ready.set()
                await self._stop.wait()

        def run():
            try:
                trio.run(main)
            except BaseException as e:      # re-raised by close()
                self.error = e
            finally:
                ready.set()

        self.thread = threading.Thread(target=run, name="model-trio", daemon=True)
        self.thread.start()
        if not ready.wait(60) or self.manager is None:
            raise RuntimeError("the Trio loop did not start") from self.error

    def call(self, fn, *args):
        """Run ``await fn(*args)`` on the loop; a hang fails after 120 s."""
        async def timed():
            with trio.fail_after(120):
                return await fn(*args)
        return trio.from_thread.run(timed, trio_token=self.token)

    def close(self) -> None:
        trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self.thread.join(120)
        if self.error is not None:
            raise self.error


def pattern(op: int, sector: int, sectors: int) -> bytes:
    """Data no other write has: every sector names its write and its own position."""
    return b"".join(struct.pack("<QQ", op, sector + i) * (SECTOR // 16) for i in range(sectors))


def next_free_after(allocations: int, chunk_sectors: int) -> int:
    """The persistent store's ``next_free`` after ``allocations`` exceptions (header, then
    areas of ``chunk_bytes/16`` entries each followed by their data chunks)."""
    stride = chunk_sectors * SECTOR // 16 + 1
    n = 2
    for _ in range(allocations):
        n += 1
        if n % stride == 1:
            n += 1
    return n


class SnapModel:
    """What one snapshot shows, and which of its chunks have exceptions."""

    def __init__(self, name: str, cow: str, chunk: int, view: bytearray):
        self.name = name
        self.cow = cow
        self.chunk = chunk
        self.view = view
        self.exceptions: set[int] = set()

    def chunks(self, sector: int, sectors: int, size: int) -> range:
        end = min(sector + sectors, size)
        return range(sector // self.chunk, (end - 1) // self.chunk + 1)


class SnapshotMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.loop: Loop | None = None
        self.snaps: list[SnapModel] = []
        self.op = 0
        self.made = 0

    # -- setup -------------------------------------------------------------------------------
    @initialize(chunk_log=st.integers(0, 7), store=st.sampled_from(["P", "PO", "N"]),
                durability=st.sampled_from(["process", "fsync"]),
                io_mode=st.sampled_from(["inline", "thread"]), origin_first=st.booleans(),
                trim=st.integers(0, 127), nsnaps=st.integers(1, 2), seed=st.integers(0, 1 << 16),
                second_chunk_log=st.integers(0, 7),
                nchunks=st.one_of(st.integers(3, 12), st.integers(13, 80)))
    def setup(self, chunk_log, store, durability, io_mode, origin_first, trim, nsnaps, seed,
              second_chunk_log, nchunks):
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="snapmodel.")
        self.store = store
        self.chunk = 1 << chunk_log
        nchunks = min(nchunks, 4096 // self.chunk)      # small: requests meet; 80: several areas
        self.size = nchunks * self.chunk - trim % self.chunk      # not always whole chunks
        self.origin_path = os.path.join(self.dir, "origin.img")
        data = random.Random(seed).randbytes(self.size * SECTOR)
        with open(self.origin_path, "wb") as f:
            f.write(data)
        self.origin = bytearray(data)
        self.origin_first = origin_first
        self.loop = Loop(durability, io_mode)
        self.m = self.loop.manager
        if origin_first:
            self._create_origin()
        for i in range(nsnaps):
            self._take(self.chunk if i == 0 else 1 << second_chunk_log)

    def _create_origin(self):
        async def create():
            self.m.create(ORIGIN)
            await self.m.load(ORIGIN, [TableLine(0, self.size, "snapshot-origin", self.origin_path)])
            await self.m.resume(ORIGIN)
        self.loop.call(create)

    def _cow_sectors(self, chunk: int) -> int:
        nchunks = -(-self.size // chunk)
        return (nchunks + nchunks // (chunk * SECTOR // 16) + 4) * chunk

    def _take(self, chunk: int, cow: str | None = None) -> SnapModel:
        """A new snapshot (fresh COW) or, with ``cow``, one over an existing COW."""
        fresh = cow is None
        if fresh:
            self.made += 1
            cow = os.path.join(self.dir, "cow%d.img" % self.made)
            with open(cow, "wb") as f:
                f.truncate(self._cow_sectors(chunk) * SECTOR)
        names = {s.name for s in self.snaps}
        name = next("snap%d" % i for i in range(3) if "snap%d" % i not in names)
        self.loop.call(take_snapshot, self.m, self.origin_path, cow, name, ORIGIN, chunk, self.store)
        s = SnapModel(name, cow, chunk, bytearray(self.origin))
        self.snaps.append(s)
        return s

    def teardown(self):
        if self.loop is None:
            return
        try:
            if self.snaps:
                self.check_all()
        finally:
            try:
                self.loop.close()
            finally:
                import shutil

                shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers -----------------------------------------------------------------------------
    def _dev(self, name: str):
        return self.m.find(name)

    def _apply_write(self, target: int, sector: int, data: bytes) -> None:
        """The model of a write: ``target`` -1 is the origin, else a snapshot's index."""
        n = len(data) // SECTOR
        if target < 0:
            for s in self.snaps:
                s.exceptions.update(s.chunks(sector, n, self.size))
            self.origin[sector * SECTOR:sector * SECTOR + len(data)] = data
        else:
            s = self.snaps[target]
            s.exceptions.update(s.chunks(sector, n, self.size))
            s.view[sector * SECTOR:sector * SECTOR + len(data)] = data

    def _name(self, target: int) -> str:
        return ORIGIN if target < 0 else self.snaps[target].name

    def _view(self, target: int) -> bytearray:
        return self.origin if target < 0 else self.snaps[target].view

    def _extent(self, data, max_chunks=4):
        """(sector, sectors) of a request: 1 sector up to several chunks, anywhere."""
        sectors = data.draw(st.one_of(
            st.integers(1, min(self.size, max_chunks * self.chunk)),
            st.sampled_from([self.chunk * k for k in (1, 2, 3) if self.chunk * k <= self.size])))
        if data.draw(st.booleans()):           # chunk aligned
            top = (self.size - sectors) // self.chunk
            sector = data.draw(st.integers(0, top)) * self.chunk
        else:
            sector = data.draw(st.integers(0, self.size - sectors))
        return sector, sectors

    def _target(self, data) -> int:
        return data.draw(st.integers(-1, len(self.snaps) - 1))

    # -- rules -------------------------------------------------------------------------------
    @rule(data=st.data())
    def write(self, data):
        target = self._target(data)
        sector, sectors = self._extent(data)
        self.op += 1
        payload = pattern(self.op, sector, sectors)
        self.loop.call(self._dev(self._name(target)).write, sector, payload)
        self._apply_write(target, sector, payload)
        OPS[0] += 1

    @rule(data=st.data())
    def read(self, data):
        target = self._target(data)
        sector, sectors = self._extent(data, max_chunks=8)
        got = self.loop.call(self._dev(self._name(target)).read, sector, sectors)
        want = bytes(self._view(target)[sector * SECTOR:(sector + sectors) * SECTOR])
        assert got == want, "%s: read of %d+%d differs from the model" % (self._name(target), sector, sectors)
        OPS[0] += 1

    @rule(data=st.data(), n=st.integers(2, 8))
    def concurrent(self, data, n):
        """Several writes at once (sharing chunks, never sectors) and, meanwhile, reads of
        the snapshots where no write of the batch goes through them."""
        writes: list[tuple[int, int, bytes]] = []
        used: list[tuple[int, int]] = []
        for _ in range(n):
            target = self._target(data)
            sector, sectors = self._extent(data, max_chunks=2)
            if any(sector < e and s < sector + sectors for s, e in used):
                continue
            used.append((sector, sector + sectors))
            self.op += 1
            writes.append((target, sector, pattern(self.op, sector, sectors)))
        written = {t for t, _, _ in writes}
        reads = [(t, *self._extent(data, max_chunks=4)) for t in range(len(self.snaps))
                 if t not in written and data.draw(st.booleans())]
        wants = [bytes(self._view(t)[s * SECTOR:(s + k) * SECTOR]) for t, s, k in reads]
        got: dict[int, bytes] = {}

        async def batch():
            async def one_read(i, t, s, k):
                got[i] = await self._dev(self._name(t)).read(s, k)

            async with trio.open_nursery() as nursery:
                for t, s, payload in writes:
                    nursery.start_soon(self._dev(self._name(t)).write, s, payload)
                for i, (t, s, k) in enumerate(reads):
                    nursery.start_soon(one_read, i, t, s, k)
        self.loop.call(batch)
        for t, s, payload in writes:
            self._apply_write(t, s, payload)
        for i, want in enumerate(wants):
            assert got[i] == want, "concurrent read of %s at %d differs" % (self._name(reads[i][0]), reads[i][1])
        OPS[0] += len(writes) + len(reads)

    @rule(order=st.booleans())
    def reactivate(self, order):
        """Every table removed, then re-created over the same files (origin first or last).
        A persistent COW keeps its exceptions; a transient one starts again."""
        async def remove_all():
            for s in self.snaps:
                await self.m.remove(s.name)
            await self.m.remove(ORIGIN)
        self.loop.call(remove_all)
        old, self.snaps = self.snaps, []
        if order or not old:
            self._create_origin()
        for s in old:
            if self.store == "N":
                self._take(s.chunk)
            else:
                again = self._take(s.chunk, s.cow)
                again.view, again.exceptions = s.view, s.exceptions
        OPS[0] += 1

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def handover(self, data):
        """``dmsetup reload`` of a snapshot with its own table, then ``resume``: the new
        table takes the exceptions over."""
        s = self.snaps[data.draw(st.integers(0, len(self.snaps) - 1))]

        async def reload():
            lines = self.m.table_lines(s.name, "table")
            await self.m.load(s.name, lines)
            await self.m.resume(s.name)
        self.loop.call(reload)
        OPS[0] += 1

    @precondition(lambda self: self.snaps and self.store != "N")
    @rule(data=st.data(), during=st.integers(0, 3))
    def merge(self, data, during):
        """Merge a snapshot into the origin (with a few origin writes while it runs); then
        the origin shows what the snapshot showed, and the other snapshot is unchanged."""
        i = data.draw(st.integers(0, len(self.snaps) - 1))
        s = self.snaps.pop(i)
        for other in self.snaps:        # the merge's origin writes copy out of the others
            for c in s.exceptions:
                other.exceptions.update(other.chunks(c * s.chunk, s.chunk, self.size))
        self.origin[:] = s.view
        writes = []
        for _ in range(during):
            sector, sectors = self._extent(data, max_chunks=2)
            self.op += 1
            writes.append((sector, pattern(self.op, sector, sectors)))

        async def run():
            await merge_snapshot(self.m, s.name, ORIGIN, wait=False)
            dev = self._dev(ORIGIN)
            for sector, payload in writes:
                await dev.write(sector, payload)
            await merge_snapshot_wait(self.m)
        self.loop.call(run)
        for sector, payload in writes:
            self._apply_write(-1, sector, payload)
        OPS[0] += 1 + len(writes)

    @precondition(lambda self: len(self.snaps) < 2)
    @rule(chunk_log=st.integers(0, 7))
    def snapshot(self, chunk_log):
        """Another snapshot of the origin as it is now (the origin exists: suspended and
        resumed around it)."""
        self._take(1 << chunk_log)
        OPS[0] += 1

    @invariant()
    def statuses(self):
        """Each snapshot holds one exception per chunk that needed one, no more."""
        if self.loop is None:
            return
        for s in self.snaps:
            info = self.m.table_lines(s.name, "info")[0].params
            allocated = int(info.split("/")[0])
            n = len(s.exceptions)
            want = n * s.chunk if self.store == "N" else next_free_after(n, s.chunk) * s.chunk
            assert allocated == want, "%s: %s, %d exceptions expected" % (s.name, info, n)

    def check_all(self):
        async def read_all():
            out = {ORIGIN: await self._dev(ORIGIN).read(0, self.size)}
            for s in self.snaps:
                out[s.name] = await self._dev(s.name).read(0, self.size)
            return out
        got = self.loop.call(read_all)
        assert got[ORIGIN] == self.origin, "origin differs from the model"
        for s in self.snaps:
            assert got[s.name] == s.view, "%s differs from the model" % s.name


async def merge_snapshot_wait(m) -> None:
    """Wait for the merge on the origin device to end, then make it a plain origin again
    (the second half of :func:`dmsim.snapshots.merge_snapshot`)."""
    md = m.find(ORIGIN)
    while True:
        target = md.live.targets[0]
        _, allocated, metadata = target.store.usage()
        assert target.valid and not target.merge_failed, target.status("info")
        if allocated == metadata:
            break
        await target.wait_merge_stopped()
    size = md.size_sectors
    path = target.origin.path
    await m.load(ORIGIN, [TableLine(0, size, "snapshot-origin", path)])
    await m.resume(ORIGIN)


SnapshotMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
    suppress_health_check=list(HealthCheck))
TestSnapshotModel = SnapshotMachine.TestCase


if __name__ == "__main__":          # the soak: DMSIM_MODEL_EXAMPLES=5000 python3 tests/test_snapshot_model.py
    import unittest

    t0 = time.monotonic()
    unittest.main(exit=False, argv=["soak"])
    print("%d operations in %.0f s" % (OPS[0], time.monotonic() - t0))
