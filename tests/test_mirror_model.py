"""Model test of the mirror target (issue 11, item 2): a hypothesis state machine drives a
mirror of 2 or 3 legs (image files, or ``linear`` devices over them that a rule swaps for
``error``), core or disk log, sync/nosync/default, handle_errors and keep_log, region sizes
2-32 sectors, against a plain reference of what each sector may read back.

Why a model: the mirror's write path has fast lanes (whole-request writes over file legs,
one pass run in the request's task) beside the general one, and its failure handling
(held writes, out-of-sync regions, the disk log's clean bits) has to stay right in every
interleaving with the resync.  The reference knows nothing of regions or workers: each
sector has the set of write ids a read may return (one id once a write is acknowledged
and nothing else is in flight over it; old *or* new where a write failed or is held).

What is checked, besides every read: after the resync settles on healthy legs, every
leg's image holds exactly what the reference allows (then the reference collapses to
it); the status line's form, and its exact sync count and health characters when a leg
fails on a mirror known to be in sync (the kernel's ``D``, one region out of sync per
region written); with a disk log, at every step, every region the on-disk log calls clean
is identical on all legs' images (the crash-consistency promise of the log), and a
reactivated mirror starts with exactly the on-disk clean regions in sync.

Trio runs as a *guest* of this (hypothesis) thread with an autojump clock: it only runs
inside a rule, so what the resync does between two operations is chosen by the rules
(``background`` steps, ``settle``), and an example replays exactly.

``DMSIM_MODEL_EXAMPLES`` multiplies the number of examples (a soak: e.g. 400).
"""
from __future__ import annotations

import collections
import os
import queue
import shutil
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import outcome
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import dmsim
from dmsim import DMError, parse_table_text, syncthread
from dmsim.bio import SECTOR_SIZE, Bio
from dmsim.dirty_log import MIRROR_MAGIC, parse_disk_log

SOAK = int(os.environ.get("DMSIM_MODEL_EXAMPLES") or "1")
EXAMPLES = 100 * SOAK
STEPS = 40
JOB_VIRTUAL_SECONDS = 600.0      # a job still blocked after this (virtual) time has hung
JOB_REAL_SECONDS = 60.0          # ... or after this much real time (a busy loop)
ZERO = 0                         # id of a zeroed sector
INITIAL = 1                      # id of leg 0's initial content

OPS = collections.Counter()      # operations run, by rule (reported by the soak)
#: what went wrong first in a run, shown if hypothesis can only report a consequence of it
#: (a run that cannot end makes the next example fail with "run() inside a run()")
FIRST_FAILURES: list[str] = []


def pattern(write_id: int, sector: int) -> bytes:
    """512 bytes naming the write and the mirror sector they belong to."""
    return struct.pack("<QQ", write_id, sector) * (SECTOR_SIZE // 16)


def decode(data: bytes, sector: int) -> int:
    """The write id a sector's bytes carry; -1 for anything no write put there."""
    if data == bytes(SECTOR_SIZE):
        return ZERO
    write_id, where = struct.unpack_from("<QQ", data)
    if where != sector or data != pattern(write_id, sector):
        return -1
    return write_id


def _task_tree(task, depth: int = 0) -> list[str]:
    """Each task's name and where it waits, for a hang report."""
    lines = ["  " * depth + task.name]
    coro = task.coro
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        lines.append("  " * depth + "    %s:%d %s" % (os.path.basename(frame.f_code.co_filename), frame.f_lineno,
                                                      frame.f_code.co_name))
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            lines += _task_tree(child, depth + 1)
    return lines


# -- Trio as a guest of the hypothesis thread ---------------------------------------------------
async def _run_sync_inline(fn, *args, **kwargs):
    """``to_thread.run_sync`` done in the calling thread (see :class:`GuestLoop`)."""
    await trio.lowlevel.checkpoint()
    return fn(*args)


class GuestLoop:
    """A Trio run stepped by this thread: jobs run through :meth:`call`, and between two
    calls nothing in Trio moves.  With an autojump clock every guest tick has a zero
    timeout, so the run never leaves this thread (no I/O thread wait); the few blocking
    calls dmsim hands to threads (path lookups, syncs) are made inline meanwhile: a thread
    would let the autojump clock run out its timeouts, and make a run unrepeatable."""

    def __init__(self):
        self._saved = (trio.to_thread.run_sync, syncthread.run_sync)
        trio.to_thread.run_sync = syncthread.run_sync = _run_sync_inline
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._done: outcome.Outcome | None = None
        self._stop: trio.Event | None = None
        self.manager = None
        self.nursery: trio.Nursery | None = None
        self.events: dict[int, trio.Event] = {}
        trio._core._run._r.seed(0)      # trio shuffles its run queue: make it replayable
        trio.lowlevel.start_guest_run(
            self._main, run_sync_soon_threadsafe=self._todo.put, done_callback=self._finished,
            clock=trio.testing.MockClock(autojump_threshold=0))
        self._pump(lambda: self.manager is not None)

    def _finished(self, result: outcome.Outcome) -> None:
        self._done = result

    async def _main(self) -> None:
        self.root = trio.lowlevel.current_root_task()
        self._stop = trio.Event()
        self.token = trio.lowlevel.current_trio_token()
        async with dmsim.open_manager(io_mode="inline", durability="process") as m, \
                trio.open_nursery() as nursery:
            self.nursery = nursery
            self.manager = m
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def _pump(self, ready) -> None:
        deadline = time.monotonic() + JOB_REAL_SECONDS
        while not ready():
            if self._done is not None:
                self._done.unwrap()
                raise RuntimeError("the Trio run ended")
            left = deadline - time.monotonic()
            if left <= 0:
                sys.stderr.write("mirror model: Trio job still running after %.0f s; tasks:\n%s\n"
                                 % (JOB_REAL_SECONDS, "\n".join(_task_tree(self.root))))
                raise TimeoutError("Trio job still running after %.0f s of real time; tasks:\n%s"
                                   % (JOB_REAL_SECONDS, "\n".join(_task_tree(self.root))))
            self._todo.get(timeout=left)()

    def mirror_state(self) -> str:
        """The mirror target's recovery and region state, for a hang report."""
        md = self.manager.devices.get("m") if self.manager else None
        t = md.live.targets[0] if md is not None and md.live is not None else None
        if t is None:
            return "(no live mirror)"
        regions = {k: (r.state, r.pending, len(r.delayed)) for k, r in t.regions.items()}
        return ("suspend=%s slots_stopped=%s free=%s in_flight=%s quiesced=%s holds=%d regions=%s"
                % (t.suspend, t._stopped_slots, t.recovery_count.value, t.recovery_in_flight,
                   list(t.quiesced), len(t.holds), regions))

    def spawn(self, async_fn, *args) -> list:
        """Start ``async_fn`` as a task; returns a box that gets its outcome, then an event
        set once it is there."""
        box: list = []
        done = trio.Event()

        async def job():
            box.append(await outcome.acapture(async_fn, *args))
            done.set()

        self.token.run_sync_soon(lambda: self.nursery.start_soon(job))
        self.events[id(box)] = done
        return box

    def call(self, async_fn, *args):
        """Run ``async_fn(*args)`` in Trio (a hang fails after a long virtual timeout)."""
        async def bounded():
            with trio.fail_after(JOB_VIRTUAL_SECONDS):
                return await async_fn(*args)

        box = self.spawn(bounded)
        try:
            self._pump(lambda: box)
            return box[0].unwrap()
        except DMError:
            raise                   # an I/O error: the rule judges it
        except BaseException:
            FIRST_FAILURES.append(traceback.format_exc())
            raise

    def close(self) -> None:
        """End the run (cancelling whatever still runs); its errors are raised here."""
        if self._done is None and self._stop is not None:
            self.token.run_sync_soon(self._stop.set)
            try:
                self._pump(lambda: self._done is not None)
            except RuntimeError:
                pass                                     # the run ended: unwrapped below
            except TimeoutError:
                # the run cannot end (a hang in shutdown): say where, since the next
                # example can only fail with "run() inside a run()"
                sys.stderr.write("mirror model: Trio run would not end; tasks:\n%s\nmirror: %s\n"
                                 % ("\n".join(_task_tree(self.root)), self.mirror_state()))
                raise
        trio.to_thread.run_sync, syncthread.run_sync = self._saved
        if self._done is not None:
            self._done.unwrap()


# -- the model ---------------------------------------------------------------------------------
@dataclass
class Leg:
    path: str                    # the image file
    dm: str | None               # the linear device over it, or None: the file itself
    offset: int                  # sectors
    #: None, "all" (the dm device's table is ``error``) or "writes" (the image file's
    #: device refuses writes, as a leg whose disk went read-only)
    failed: str | None = None

    def ref(self) -> str:
        return "/dev/mapper/" + self.dm if self.dm else self.path


@dataclass
class Write:
    id: int
    sector: int
    count: int
    start: int                   # the model's clock when it was submitted
    end: int | None = None       # ... when it completed (None: in flight)
    ok: bool | None = None
    box: list | None = None      # a held write's outcome box


@dataclass
class Incident:
    """A leg failed on a mirror known to be in sync, no resync since: exact predictions."""

    leg: int
    nosync: set = field(default_factory=set)     # regions a failed write took out of sync
    write_error: bool = False                    # the leg saw a write error (D)
    read_error: bool = False                     # ... a read error (R)


@st.composite
def configs(draw):
    rs = draw(st.sampled_from([2, 4, 8, 16, 32]))
    nr = draw(st.integers(2, 10))
    length = rs * nr - draw(st.integers(0, rs - 1))
    legs = draw(st.integers(2, 3))
    kinds = draw(st.lists(st.booleans(), min_size=legs, max_size=legs))   # True: a dm leg
    offsets = draw(st.lists(st.sampled_from([0, 0, 1, 8, 13]), min_size=legs, max_size=legs))
    handle_errors = draw(st.booleans())
    return {
        "rs": rs, "length": length, "legs": kinds, "offsets": offsets,
        "log": draw(st.sampled_from(["core", "disk"])),
        "sync": draw(st.sampled_from(["", "", "nosync", "sync"])),
        "handle_errors": handle_errors,
        "keep_log": handle_errors and draw(st.booleans()),
    }


class MirrorMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tmp = os.path.realpath(tempfile.mkdtemp(prefix="dmsim-mirror-model-"))
        self.loop = GuestLoop()
        self.m = self.loop.manager
        self.clock = 0
        self.next_id = INITIAL + 1
        self.writes: dict[int, Write] = {}
        self.inflight: list[Write] = []
        self.images = 0
        self.active = False
        self.flushes: list[list] = []       # held flushes' outcome boxes

    def teardown(self):
        try:
            self.loop.close()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------------------
    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def new_image(self, content_id: int | None) -> str:
        """An image file for a leg: ``content_id``'s pattern over the mirror's range, else zero."""
        self.images += 1
        path = os.path.join(self.tmp, "leg%d.img" % self.images)
        return path

    def fill_image(self, path: str, offset: int, content_id: int | None) -> None:
        with open(path, "wb") as f:
            f.truncate((offset + self.length) * SECTOR_SIZE)
            if content_id is not None:
                f.seek(offset * SECTOR_SIZE)
                f.write(b"".join(pattern(content_id, s) for s in range(self.length)))

    def table(self, sync: str | None = None) -> str:
        sync = self.sync if sync is None else sync
        words = [str(self.rs)] + ([sync] if sync else [])
        if self.log == "disk":
            words.insert(0, self.log_path)
        legs = " ".join("%s %d" % (leg.ref(), leg.offset) for leg in self.legs)
        feats = [w for w, on in (("handle_errors", self.handle_errors), ("keep_log", self.keep_log)) if on]
        feat = " %d %s" % (len(feats), " ".join(feats)) if feats else ""
        return "0 %d mirror %s %d %s %d %s%s" % (self.length, self.log, len(words), " ".join(words),
                                                len(self.legs), legs, feat)

    async def _load_resume(self, name: str, table: str, create: bool = False, noflush: bool = False):
        if create:
            self.m.create(name)
        await self.m.load(name, parse_table_text(table))
        await self.m.resume(name, noflush=noflush)

    def status_fields(self) -> tuple[int, int, str]:
        """(in sync, regions, health) of the mirror's status line, whose form is checked."""
        words = str(self.m.table_lines("m", "info")[0]).split()
        n = len(self.legs)
        assert words[:4] == ["0", str(self.length), "mirror", str(n)], words
        done, total = (int(x) for x in words[4 + n].split("/"))
        assert words[5 + n] == "1"
        health = words[6 + n]
        assert len(health) == n and set(health) <= set("AFDSRU"), words
        if self.log == "core":
            assert words[7 + n:] == ["1", "core"], words
        else:
            assert words[7 + n:9 + n] == ["3", "disk"] and words[10 + n] in "ADF", words
        assert 0 <= done <= total == self.nr_regions, words
        return done, total, health

    def regions_of(self, sector: int, count: int) -> set[int]:
        return set(range(sector // self.rs, (sector + count - 1) // self.rs + 1))

    def leg_image(self, leg: Leg) -> list[int]:
        with open(leg.path, "rb") as f:
            f.seek(leg.offset * SECTOR_SIZE)
            data = f.read(self.length * SECTOR_SIZE)
        return [decode(data[i * SECTOR_SIZE:(i + 1) * SECTOR_SIZE], i) for i in range(self.length)]

    def healthy(self) -> bool:
        return not self.degraded and not any(leg.failed for leg in self.legs)

    # -- reference updates ----------------------------------------------------------------------
    def started(self, w: Write) -> None:
        self.writes[w.id] = w
        for s in range(w.sector, w.sector + w.count):
            self.allowed[s].add(w.id)

    def completed(self, batch: list[Write]) -> None:
        """Writes that completed in one step (in an order the model does not know)."""
        now = self.tick()
        for w in batch:
            w.end = now
            if w in self.inflight:
                self.inflight.remove(w)
        for w in batch:
            if not w.ok:
                continue            # a failed write may have landed on some sectors: keep it
            for s in range(w.sector, w.sector + w.count):
                keep = {x for x in self.allowed[s]
                        if x > INITIAL and (self.writes[x].end is None or self.writes[x].end > w.start)}
                self.allowed[s] = keep | {w.id}
                # writes in flight together over a sector may land in different orders on
                # different legs (the kernel's mirror does not order them either): the legs
                # may then differ there, each holding one of them, even in a clean region
                if any(self.writes[x].ok is not False for x in keep):
                    self.torn.add(s)
                else:
                    self.torn.discard(s)

    def check_read(self, sector: int, data: bytes) -> None:
        for i in range(len(data) // SECTOR_SIZE):
            s = sector + i
            got = decode(data[i * SECTOR_SIZE:(i + 1) * SECTOR_SIZE], s)
            assert got in self.allowed[s], "sector %d read write %d, allowed %s" % (s, got, sorted(self.allowed[s]))

    def reap(self) -> None:
        """Record held writes (and flushes) that have completed since the last step."""
        for box in [b for b in self.flushes if b]:
            self.flushes.remove(box)
            if isinstance(box[0], outcome.Error):
                assert isinstance(box[0].error, DMError), box[0].error
        done = [w for w in self.inflight if w.box]
        for w in done:
            w.ok = not isinstance(w.box[0], outcome.Error)
            if not w.ok:
                err = w.box[0].error
                assert isinstance(err, DMError), err
        if done:
            self.completed(done)

    # -- setup ----------------------------------------------------------------------------------
    @initialize(cfg=configs())
    def setup(self, cfg):
        self.rs, self.length, self.log, self.sync = cfg["rs"], cfg["length"], cfg["log"], cfg["sync"]
        self.handle_errors, self.keep_log = cfg["handle_errors"], cfg["keep_log"]
        self.nr_regions = -(-self.length // self.rs)
        self.allowed = [{INITIAL} for _ in range(self.length)]
        self.torn: set[int] = set()      # sectors overlapping writes in flight together wrote
        self.blind_clean = False         # a nosync disk log was resumed: clean says nothing
        self.legs = []
        for i, (is_dm, off) in enumerate(zip(cfg["legs"], cfg["offsets"], strict=True)):
            path = self.new_image(None)
            self.fill_image(path, off, INITIAL if i == 0 or self.sync == "nosync" else None)
            leg = Leg(path, "leg%d" % i if is_dm else None, off)
            self.legs.append(leg)
            if is_dm:
                self.loop.call(self._load_resume, leg.dm, "0 %d linear %s 0" % (off + self.length, path), True)
        if self.log == "disk":
            self.log_path = os.path.join(self.tmp, "log.img")
            with open(self.log_path, "wb") as f:
                f.truncate(64 << 10)
        self.loop.call(self._load_resume, "m", self.table(), True)
        self.md = self.m.find("m")
        self.active = True
        self.degraded = False            # a leg failed since this table was loaded
        self.in_sync = self.sync == "nosync"     # known: every region in sync, no failure since
        self.incident: Incident | None = None
        self.default = 0                 # the model's idea of the kernel's default leg
        done, total, health = self.status_fields()
        if self.sync == "nosync":
            assert (done, health) == (total, "A" * len(self.legs))
        elif self.log == "core" or self.sync == "sync":
            assert done == 0

    # -- I/O ------------------------------------------------------------------------------------
    def sector_range(self, data, max_count):
        sector = data.draw(st.integers(0, self.length - 1), label="sector")
        count = data.draw(st.integers(1, min(max_count, self.length - sector)), label="count")
        return sector, count

    def predict_write(self, regions: set[int]) -> str:
        """"ok", "eio" or "held" when the model can tell (a leg failed on a synced mirror)."""
        inc = self.incident
        assert inc is not None
        if self.handle_errors and not self.keep_log:
            return "held"
        outcome_ = "ok"
        for r in sorted(regions):
            if r in inc.nosync and self.default == inc.leg:
                outcome_ = "eio"
        return outcome_

    def incident_write(self, regions: set[int]) -> None:
        inc = self.incident
        for r in regions:
            if r not in inc.nosync:
                inc.nosync.add(r)       # written to all legs: fails on the dead one
                self.notice(WRITE)
        return None

    def notice(self, kind: str) -> None:
        inc = self.incident
        first = not (inc.write_error or inc.read_error)
        if kind == WRITE:
            inc.write_error = True
        else:
            inc.read_error = True
        if first and self.handle_errors and self.default == inc.leg:
            self.default = next(i for i, leg in enumerate(self.legs) if not leg.failed)

    @precondition(lambda self: self.active)
    @rule(data=st.data())
    def write(self, data):
        sector, count = self.sector_range(data, 3 * self.rs)
        w = Write(self.next_id, sector, count, self.tick())
        self.next_id += 1
        payload = b"".join(pattern(w.id, s) for s in range(sector, sector + count))
        regions = self.regions_of(sector, count)
        predicted = None
        if self.incident is not None:
            predicted = self.predict_write(regions)
        fua = data.draw(st.booleans(), label="fua")
        self.started(w)
        w.box = self.loop.spawn(self.md.write, sector, payload, fua)
        self.loop.call(self._until_done_or_idle, w.box)
        OPS["write"] += 1
        if self.incident is not None:
            self.incident_write(regions)
        if not w.box:
            held_ok = self.handle_errors and not self.keep_log and not self.healthy()
            assert held_ok, "write %d (%d+%d) did not complete" % (w.id, sector, count)
            if predicted is not None:
                assert predicted == "held", (predicted, "held")
            self.inflight.append(w)
            self.check_incident_status()
            return
        w.ok = not isinstance(w.box[0], outcome.Error)
        if not w.ok:
            err = w.box[0].error
            assert isinstance(err, DMError), err
            assert not self.healthy(), "write %d+%d failed on a healthy mirror: %r" % (sector, count, err)
        if predicted is not None:
            assert predicted == ("ok" if w.ok else "eio"), (predicted, w.box[0])
        self.completed([w])
        self.check_incident_status()

    async def _until_done_or_idle(self, box) -> None:
        """Run until ``box`` has an outcome, or until everything waits (a held write: the
        autojump clock moves only when no task can run)."""
        with trio.move_on_after(1):
            await self.loop.events[id(box)].wait()

    def check_incident_status(self) -> None:
        inc = self.incident
        if inc is None:
            return
        done, total, health = self.status_fields()
        assert done == total - len(inc.nosync), (done, total, inc.nosync)
        want = "D" if inc.write_error else "R" if inc.read_error else "A"
        expect = "".join(want if i == inc.leg else "A" for i in range(len(self.legs)))
        assert health == expect, (health, expect)

    @precondition(lambda self: self.active)
    @rule(data=st.data())
    def read(self, data):
        sector, count = self.sector_range(data, 3 * self.rs)
        regions = self.regions_of(sector, count)
        try:
            got = self.loop.call(self.md.read, sector, count)
        except DMError:
            assert not self.healthy(), "read %d+%d failed on a healthy mirror" % (sector, count)
            got = None
        OPS["read"] += 1
        inc = self.incident
        if inc is not None:
            eio = any(r in inc.nosync for r in regions) and self.default == inc.leg
            assert (got is None) == eio, (sector, count, eio)
            if (self.default == inc.leg and self.legs[inc.leg].failed == "all"
                    and any(r not in inc.nosync for r in regions)):
                self.notice(READ)
            self.check_incident_status()
        if got is not None:
            self.check_read(sector, got)

    @precondition(lambda self: self.active)
    @rule()
    def flush(self):
        """An empty flush goes to every leg; on a failed one it fails like a write (no
        region of its own: every region going idle after it is left out of sync)."""
        box = self.loop.spawn(self.md.submit, Bio.flush())
        self.loop.call(self._until_done_or_idle, box)
        OPS["flush"] += 1
        self.incident = None        # regions going idle now stay out of sync: not modelled
        if not box:
            assert self.handle_errors and not self.keep_log and not self.healthy(), "flush held"
            self.flushes.append(box)
            return
        if isinstance(box[0], outcome.Error):
            assert isinstance(box[0].error, DMError), box[0].error
            assert not self.healthy(), "flush failed on a healthy mirror: %r" % box[0].error

    # -- the background ---------------------------------------------------------------------------
    @precondition(lambda self: self.active)
    @rule(steps=st.integers(1, 30))
    def background(self, steps):
        """Let the worker and the resync run for a few scheduling steps."""
        async def run():
            for _ in range(steps):
                await trio.lowlevel.checkpoint()
        self.loop.call(run)
        OPS["background"] += 1

    async def _idle(self) -> None:
        await trio.testing.wait_all_tasks_blocked()

    @precondition(lambda self: self.active)
    @rule()
    def settle(self):
        """Everything that can run has run: on healthy legs the resync is over and every
        leg holds what the reference allows."""
        self.loop.call(self._idle)
        OPS["settle"] += 1
        self.reap()
        if not self.healthy() or self.inflight or self.flushes:
            return
        done, total, health = self.status_fields()
        assert (done, health) == (total, "A" * len(self.legs)), (done, total, health)
        images = [self.leg_image(leg) for leg in self.legs]
        for s in range(self.length):
            got = {img[s] for img in images}
            assert got <= self.allowed[s], "sector %d holds %s, allowed %s" % (s, got, sorted(self.allowed[s]))
            if s in self.torn:
                continue
            assert len(got) == 1, "sector %d differs between legs: %s" % (s, [img[s] for img in images])
            self.allowed[s] = got
        self.in_sync = True

    # -- failures ------------------------------------------------------------------------------------
    def failable(self) -> list[int]:
        if any(leg.failed for leg in self.legs) or self.inflight or self.flushes or self.degraded:
            return []
        return [i for i in range(len(self.legs)) if i != 0 or self.in_sync]

    def file_device(self, path: str):
        """The device object the manager opened for the image file ``path``."""
        return next(dev for (real, write), (dev, _) in self.m._files.items() if real == path and write)

    async def _set_failed(self, leg: Leg, failed: bool, path: str | None = None) -> None:
        if leg.dm:
            table = "error" if failed else "linear %s 0" % leg.path
            await self._load_resume(leg.dm, "0 %d %s" % (leg.offset + self.length, table))
        else:
            self.file_device(path or leg.path).read_only = failed

    @precondition(lambda self: self.active and self.failable())
    @rule(data=st.data())
    def fail_leg(self, data):
        """A leg fails: a dm leg's table is swapped for ``error`` (every I/O fails), an
        image file leg refuses writes."""
        i = data.draw(st.sampled_from(self.failable()), label="leg")
        leg = self.legs[i]
        self.loop.call(self._set_failed, leg, True)
        leg.failed = "all" if leg.dm else "writes"
        self.degraded = True
        self.default = 0
        self.incident = Incident(i) if self.in_sync else None
        self.in_sync = False
        OPS["fail_leg"] += 1

    @precondition(lambda self: self.active and (self.degraded or any(leg.failed for leg in self.legs)))
    @rule(mode=st.sampled_from(["replace", "restore", "drop"]), noflush=st.booleans())
    def repair(self, mode, noflush):
        """What ``lvconvert --repair`` does: suspend the mirror (noflush keeps held writes),
        reload it with the healthy legs first and the failed one restored over its old
        image, replaced by a fresh image (a full resync), or dropped."""
        if mode == "drop" and len(self.legs) < 3:
            mode = "replace"
        survivors = [leg for leg in self.legs if not leg.failed]
        failed = [leg for leg in self.legs if leg.failed]
        new_legs = list(survivors)
        sync = self.sync if self.sync != "nosync" else ""
        if self.blind_clean:
            sync = "sync"           # what the log calls clean may differ: copy everything
        old_paths = [leg.path for leg in failed]
        for leg in failed:
            if mode == "drop":
                continue
            if mode == "replace":
                leg.path = self.new_image(None)
                self.fill_image(leg.path, leg.offset, None)
                sync = "sync"
            new_legs.append(leg)

        async def run():
            await self.m.suspend("m", noflush=noflush)
            for leg, path in zip(failed, old_paths, strict=True):
                await self._set_failed(leg, False, path)
            self.legs, old = new_legs, self.legs
            try:
                await self.m.load("m", parse_table_text(self.table(sync)))
            except BaseException:
                self.legs = old
                raise
            await self.m.resume("m")
            await trio.testing.wait_all_tasks_blocked()

        self.loop.call(run)
        OPS["repair"] += 1
        for leg in failed:
            leg.failed = None
            if mode == "drop" and leg.dm:
                self.loop.call(self.m.remove, leg.dm)
        self.sync = sync
        self.blind_clean = False
        self.reap()
        assert not self.inflight, "held writes still held after the repair: %s" % self.inflight
        assert not self.flushes, "a held flush still held after the repair"
        self.degraded = False
        self.incident = None
        self.in_sync = False
        self.default = 0

    # -- suspend / resume / reactivation ------------------------------------------------------------------
    @precondition(lambda self: self.active)
    @rule(noflush=st.booleans(), steps=st.integers(0, 10))
    def suspend_resume(self, noflush, steps):
        """While suspended nothing resyncs; after resume the resync starts over."""
        async def run():
            await self.m.suspend("m", noflush=noflush)
            before = self.m.table_lines("m", "info")[0]
            for _ in range(steps):
                await trio.lowlevel.checkpoint()
            await trio.sleep(1)
            assert self.m.table_lines("m", "info")[0] == before
            await self.m.resume("m")

        self.loop.call(run)
        OPS["suspend_resume"] += 1
        self.reap()
        self.resumed()
        self.status_fields()

    @precondition(lambda self: self.active)
    @rule(checkpoints=st.integers(0, 6))
    def interrupted_suspend(self, checkpoints):
        """A suspend cancelled part way (a client gone, a timeout) leaves the mirror
        running as before: not suspended, resyncing, holding failed writes."""
        async def run():
            with trio.CancelScope() as scope:
                async def cancel_later():
                    for _ in range(checkpoints):
                        await trio.lowlevel.checkpoint()
                    scope.cancel()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cancel_later)
                    await self.m.suspend("m")
                    nursery.cancel_scope.cancel()
            if self.m.find("m").suspended:
                await self.m.resume("m")

        self.loop.call(run)
        OPS["interrupted_suspend"] += 1
        self.reap()
        self.resumed()

    def resumed(self) -> None:
        """The same table resumed: the resync starts over (the regions a failure took out
        of sync are retried), and a disk log given ``sync`` is a new log at every resume."""
        self.incident = None
        if self.log == "disk" and self.sync == "sync":
            self.in_sync = False
        if self.log == "disk" and self.sync == "nosync":
            # every resume of a disk log given nosync marks every region clean, whatever
            # the legs hold (the kernel's rule: nosync is the user's word that they agree)
            self.blind_clean = True

    def disk_log_image(self) -> dict:
        with open(self.log_path, "rb") as f:
            return parse_disk_log(f.read())

    @precondition(lambda self: self.active and self.log == "disk" and not self.inflight
                  and not self.flushes and not any(leg.failed for leg in self.legs))
    @rule(sync=st.sampled_from(["", "", "sync"]))
    def reactivate(self, sync):
        """Remove the mirror and create it again over the same files: regions the disk log
        calls clean start in sync (are not copied), the others are resynced."""
        if self.blind_clean:
            sync = "sync"           # what the log calls clean may differ: copy everything
        self.loop.call(self.m.remove, "m")
        self.active = False
        self.check_disk_log()
        img = self.disk_log_image()
        clean = len(img["clean"]) if sync == "" else 0
        self.loop.call(self._load_resume, "m", self.table(sync), True)
        self.md = self.m.find("m")
        self.active = True
        self.sync = sync
        self.blind_clean = False
        done, total, health = self.status_fields()
        assert done == clean, (done, clean)
        self.degraded = False
        self.incident = None
        self.in_sync = False
        self.default = 0
        OPS["reactivate"] += 1

    @invariant()
    def check_disk_log(self):
        """Every region the on-disk log calls clean is the same on every leg's image."""
        if not hasattr(self, "legs") or self.log != "disk" or self.blind_clean:
            return
        img = self.disk_log_image()
        if img["magic"] != MIRROR_MAGIC:
            return
        assert img["nr_regions"] == self.nr_regions, img["nr_regions"]
        images = [self.leg_image(leg) for leg in self.legs]
        for r in img["clean"]:
            for s in range(r * self.rs, min((r + 1) * self.rs, self.length)):
                if s in self.torn:
                    continue
                got = [im[s] for im in images]
                assert len(set(got)) == 1, "region %d clean on disk, sector %d differs: %s" % (r, s, got)


WRITE, READ = "write", "read"

MirrorMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


@pytest.mark.timeout(600 * SOAK)
def test_mirror_model():
    start = time.monotonic()
    OPS.clear()
    FIRST_FAILURES.clear()
    try:
        MirrorMachine.TestCase("runTest").runTest()
    except BaseException:
        if FIRST_FAILURES:
            sys.stderr.write("mirror model: the first failure of the run was:\n%s\n" % FIRST_FAILURES[0])
        raise
    if os.environ.get("DMSIM_MODEL_EXAMPLES"):
        print("mirror model: %d operations in %.1f s: %s" % (sum(OPS.values()), time.monotonic() - start,
                                                           dict(OPS)))
