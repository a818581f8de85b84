"""Model test of the device lifecycle (the manager's ioctls) against a plain reference.

A hypothesis state machine creates, loads, clears, suspends, resumes, renames, opens,
closes and removes (now or deferred) devices whose tables are ``zero``, ``linear`` over
one image file or ``linear`` over another dm device, and writes and reads through them.
The reference knows names, table slots, which device each table uses, suspension, opens
and deferred removals, and the 8 sectors of the image; it says which errno each call must
give (ENXIO, EBUSY, EINVAL for a table that maps its own device or makes a cycle, ENODEV
for a device that is not there or has no disk yet), each device's open count (its opens
plus one per table that uses it), and what every read returns.  A rule writes to a
suspended device and then removes it: the held write must fail with EIO and leave the
image alone (the kernel fails held bios at removal; letting them through after the
tables are gone would bypass the target).  After every step, every device's info matches.

The manager lives in a Trio run on a thread of its own; each rule is one call into it
(``trio.from_thread.run``).  ``DMSIM_MODEL_EXAMPLES`` multiplies the number of examples.
"""
from __future__ import annotations

import errno
import os
import tempfile
import threading
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import dmsim
from dmsim.errors import DMError
from dmsim.table import TableLine

EXAMPLES = 40 * int(os.environ.get("DMSIM_MODEL_EXAMPLES") or "1")
SECTORS = 8
NAMES = ["a", "b", "c", "d"]


class Portal:
    """A Trio run on its own thread holding one manager; :meth:`run` calls into it."""

    def __init__(self):
        self.ready = threading.Event()
        self.thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self.thread.start()
        self.ready.wait(30)

    async def _main(self):
        self.token = trio.lowlevel.current_trio_token()
        self.stop = trio.Event()
        async with dmsim.open_manager(durability="process") as m, trio.open_nursery() as n:
            self.m, self.nursery = m, n
            self.ready.set()
            await self.stop.wait()
            n.cancel_scope.cancel()

    def run(self, fn, *args):
        async def call():
            with trio.fail_after(30):
                return await fn(*args)
        return trio.from_thread.run(call, trio_token=self.token)

    def close(self):
        trio.from_thread.run_sync(self.stop.set, trio_token=self.token)
        self.thread.join(30)


@dataclass
class Ref:
    """The reference's view of one device."""

    live: tuple | None = None          # ("zero",) | ("img",) | ("dm", name)
    inactive: tuple | None = None
    suspended: bool = False
    opens: int = 0
    deferred: bool = False
    has_disk: bool = False
    minor: int = 0


class ManagerModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="dmsim-model-")
        self.img = os.path.join(self.dir, "img")
        with open(self.img, "wb") as f:
            f.write(bytes(SECTORS * 512))
        self.data = bytearray(SECTORS * 512)        # the image's reference content
        self.p = Portal()
        self.m = self.p.m
        self.devs: dict[str, Ref] = {}
        self.handles: list[tuple[str, object]] = []

    def teardown(self):
        self.p.close()
        for f in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, f))
        os.rmdir(self.dir)

    # -- the reference ------------------------------------------------------------------------
    def uses(self, spec) -> str | None:
        return spec[1] if spec and spec[0] == "dm" else None

    def open_count(self, name: str) -> int:
        n = self.devs[name].opens
        for ref in self.devs.values():
            n += sum(1 for spec in (ref.live, ref.inactive) if self.uses(spec) == name)
        return n

    def reaches(self, start: str, goal: str) -> bool:
        todo, seen = [start], set()
        while todo:
            cur = todo.pop()
            if cur == goal:
                return True
            if cur in seen or cur not in self.devs:
                continue
            seen.add(cur)
            ref = self.devs[cur]
            todo.extend(x for x in (self.uses(ref.live), self.uses(ref.inactive)) if x)
        return False

    def chain(self, name: str) -> list[str] | None:
        """The devices a request to ``name`` goes through, or None if it ends without a
        live table."""
        out = []
        while True:
            ref = self.devs[name]
            out.append(name)
            if ref.live is None:
                return None
            below = self.uses(ref.live)
            if below is None:
                return out
            name = below

    def bottom(self, name: str):
        return self.devs[self.chain(name)[-1]].live

    def gone(self, name: str) -> None:
        del self.devs[name]
        self.sweep()

    def sweep(self) -> None:
        """Deferred removals whose last opener (a handle or a table) went: the device
        goes, which may release the last reference to another."""
        for name, ref in list(self.devs.items()):
            if name in self.devs and ref.deferred and self.open_count(name) == 0:
                self.gone(name)

    def expect(self, err, fn, *args):
        """Run ``fn`` in the manager; it must fail with ``err`` (or succeed for None)."""
        try:
            result = self.p.run(fn, *args)
            self.p.run(self._settle)          # a deferred remove the call set off runs
        except DMError as e:
            assert err is not None and e.errno == err, (fn.__name__, args, errno.errorcode[e.errno], err)
            return None
        assert err is None, (fn.__name__, args, "succeeded", err and errno.errorcode[err])
        return result

    async def _settle(self):
        await trio.testing.wait_all_tasks_blocked()

    def pick(self, data) -> str:
        """Mostly a device that exists (else any name: the errors are checked too)."""
        names = sorted(self.devs)
        if names and data.draw(st.integers(0, 9)) < 9:
            return data.draw(st.sampled_from(names))
        return data.draw(st.sampled_from(NAMES + ["e"]))

    @initialize()
    def two_devices(self):
        """``a`` over zero and ``b`` over the image, both running."""
        for name, kind in (("a", "zero"), ("b", "img")):
            self.p.run(self._create, name)
            self.devs[name] = Ref(minor=len(self.devs))
            self._load(name, kind, name)
            self._resume(name)

    async def _create(self, name):
        self.m.create(name)

    # -- rules --------------------------------------------------------------------------------
    @rule(name=st.sampled_from(NAMES))
    def create(self, name):
        async def do():
            self.m.create(name)
        err = errno.EBUSY if name in self.devs else None
        self.expect(err, do)
        if err is None:
            used = {r.minor for r in self.devs.values()}
            self.devs[name] = Ref(minor=next(i for i in range(len(used) + 1) if i not in used))

    @rule(data=st.data(), kind=st.sampled_from(["zero", "img", "dm", "dm-number"]))
    def load(self, data, kind):
        self._load(self.pick(data), kind, self.pick(data))

    def _load(self, name, kind, below):
        if kind == "zero":
            line, spec = "0 %d zero" % SECTORS, ("zero",)
        elif kind == "img":
            line, spec = "0 %d linear %s 0" % (SECTORS, self.img), ("img",)
        else:
            ref = "/dev/mapper/%s" % below
            if kind == "dm-number":
                ref = "253:%d" % (self.devs[below].minor if below in self.devs else 99)
            line, spec = "0 %d linear %s 0" % (SECTORS, ref), ("dm", below)
        if name not in self.devs:
            err = errno.ENXIO
        elif spec[0] == "dm" and (below not in self.devs or not self.devs[below].has_disk):
            err = errno.ENXIO if kind == "dm-number" else errno.ENODEV
        elif spec[0] == "dm" and self.reaches(below, name):
            err = errno.EINVAL
        else:
            err = None
        ln = line.split(None, 3)
        self.expect(err, self.m.load, name, [TableLine(int(ln[0]), int(ln[1]), ln[2], ln[3] if len(ln) > 3 else "")])
        if err is None:
            self.devs[name].inactive = spec
            self.devs[name].has_disk = True
            self.sweep()

    @rule(data=st.data(), by_number=st.booleans(), resume=st.booleans())
    def stack(self, data, by_number, resume):
        """Load a table over another device that has a disk (cycles and self-maps too),
        and maybe resume it at once."""
        disks = sorted(n for n, r in self.devs.items() if r.has_disk)
        if not disks or not self.devs:
            return
        name = data.draw(st.sampled_from(sorted(self.devs)))
        self._load(name, "dm-number" if by_number else "dm", data.draw(st.sampled_from(disks)))
        if resume and self.devs[name].inactive is not None:
            self._resume(name)

    @rule(data=st.data())
    def new_on_top(self, data):
        """A new device over a running one: stacks get deep."""
        free = [n for n in NAMES + ["e"] if n not in self.devs]
        running = sorted(n for n, r in self.devs.items() if r.live is not None and r.has_disk)
        if not free or not running:
            return
        name = free[0]
        self.p.run(self._create, name)
        used = {r.minor for r in self.devs.values()}
        self.devs[name] = Ref(minor=next(i for i in range(len(used) + 1) if i not in used))
        self._load(name, "dm", data.draw(st.sampled_from(running)))
        self._resume(name)

    @rule(data=st.data())
    def resume_some(self, data):
        """Resume a device with an inactive table (a second way in: swaps are what stack)."""
        waiting = sorted(n for n, r in self.devs.items() if r.inactive is not None)
        if waiting:
            self._resume(data.draw(st.sampled_from(waiting)))

    @rule(data=st.data())
    def clear(self, data):
        name = self.pick(data)
        err = None if name in self.devs else errno.ENXIO
        self.expect(err, self.m.clear, name)
        if err is None:
            self.devs[name].inactive = None
            self.sweep()

    @rule(data=st.data())
    def suspend(self, data):
        name = self.pick(data)
        err = None if name in self.devs else errno.ENXIO
        self.expect(err, self.m.suspend, name)
        if err is None:
            self.devs[name].suspended = True

    @rule(data=st.data())
    def resume(self, data):
        self._resume(self.pick(data))

    def _resume(self, name):
        ref = self.devs.get(name)
        if ref is None:
            err = errno.ENXIO
        elif ref.inactive is None and ref.suspended and ref.live is None:
            err = errno.EINVAL
        else:
            err = None
        self.expect(err, self.m.resume, name)
        if err is None:
            if ref.inactive is not None:
                ref.live, ref.inactive = ref.inactive, None
            ref.suspended = False
            self.sweep()

    @rule(data=st.data(), deferred=st.booleans())
    def remove(self, data, deferred):
        name = self.pick(data)
        ref = self.devs.get(name)
        if ref is None:
            err = errno.ENXIO
        elif self.open_count(name) and not deferred:
            err = errno.EBUSY
        else:
            err = None
        self.expect(err, self.m.remove, name, deferred)
        if err is None:
            if self.open_count(name):
                ref.deferred = True
            else:
                self.gone(name)
                self.p.run(self._settle)

    @rule(data=st.data(), new=st.sampled_from(NAMES + ["e"]))
    def rename(self, data, new):
        name = self.pick(data)
        async def do():
            self.m.rename(name, new)
        # dm_hash_rename's order: a taken new name (EBUSY) before a missing device (ENXIO)
        err = errno.EBUSY if new in self.devs else errno.ENXIO if name not in self.devs else None
        self.expect(err, do)
        if err is None:
            self.devs[new] = self.devs.pop(name)
            for r in self.devs.values():
                for slot in ("live", "inactive"):
                    if getattr(r, slot) == ("dm", name):
                        setattr(r, slot, ("dm", new))
            self.handles = [(new if n == name else n, h) for n, h in self.handles]

    @rule(data=st.data())
    def open(self, data):
        name = self.pick(data)
        async def do():
            return self.m.open(name)
        h = self.expect(None if name in self.devs else errno.ENXIO, do)
        if h is not None:
            self.devs[name].opens += 1
            self.handles.append((name, h))

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def close(self, data):
        i = data.draw(st.integers(0, len(self.handles) - 1))
        name, h = self.handles.pop(i)

        async def do():
            self.m.close(h)
            await trio.testing.wait_all_tasks_blocked()     # a deferred remove runs
        self.p.run(do)
        self.devs[name].opens -= 1
        self.sweep()

    @rule(data=st.data(), sector=st.integers(0, SECTORS - 1), byte=st.integers(1, 255))
    def write_and_read(self, data, sector, byte):
        """A write and a read through a running stack (the deepest one, mostly)."""
        ok = {}
        for n in sorted(self.devs):
            chain = self.chain(n)
            if chain is not None and not any(self.devs[x].suspended for x in chain):
                ok[n] = len(chain)
        if not ok:
            return
        deepest = max(ok.values())
        names = sorted(ok) if data.draw(st.booleans()) else sorted(n for n in ok if ok[n] == deepest)
        name = data.draw(st.sampled_from(names))
        md = self.m.find(name)
        payload = bytes([byte]) * 512
        self.p.run(md.write, sector, payload)
        if self.bottom(name) == ("img",):
            self.data[sector * 512:(sector + 1) * 512] = payload
            want = payload
        else:
            want = bytes(512)
        assert self.p.run(md.read, sector, 1) == want

    @rule(data=st.data(), sector=st.integers(0, SECTORS - 1))
    def held_write_then_remove(self, data, sector):
        """A write held by the suspended device fails with EIO when the device goes."""
        name = self.pick(data)
        ref = self.devs.get(name)
        if ref is None or not ref.suspended or self.open_count(name) or ref.live is None:
            return
        md = self.m.find(name)
        box = []

        async def do():
            async def writer():
                try:
                    await md.write(sector, b"\xee" * 512)
                    box.append("written")
                except DMError as e:
                    box.append(e.errno)
            self.p.nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            assert box == []                               # held
            await self.m.remove(name)
            await trio.testing.wait_all_tasks_blocked()
        self.p.run(do)
        assert box == [errno.EIO]
        self.gone(name)

    # -- invariants ---------------------------------------------------------------------------
    @invariant()
    def devices_match(self):
        if not hasattr(self, "devs"):
            return
        assert sorted(self.m.names()) == sorted(self.devs)
        for name, ref in self.devs.items():
            info = self.m.info(name)
            assert (info.live_table, info.inactive_table) == (ref.live is not None, ref.inactive is not None), name
            assert info.suspended == ref.suspended, name
            assert info.open_count == self.open_count(name), (name, info.open_count, self.open_count(name))
            assert info.deferred_remove == ref.deferred, name
            assert info.minor == ref.minor, name
        with open(self.img, "rb") as f:
            assert f.read() == bytes(self.data)


ManagerModel.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=30, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.timeout(600)
def test_manager_model():
    ManagerModel.TestCase("runTest").runTest()
