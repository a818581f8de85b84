"""mirror: keep 2 to 9 copies ("legs") of a range identical (dm-raid1).

Table: ``<log_type> <#log_args> <log_args>... <#legs> <dev> <offset> [<dev> <offset>]...
[<#features> <feature>...]``

``log_type`` is ``core`` (``<region_size> [sync|nosync]``) or ``disk``
(``<log_dev> <region_size> [sync|nosync]``), see :mod:`dmsim.dirty_log`; features are
``handle_errors`` and ``keep_log`` (which needs handle_errors).

The range is cut in regions of ``region_size`` sectors, whose state (clean, dirty,
out of sync, recovering) lives in a region hash backed by the dirty log.  One worker
task (the kernel's kmirrord) runs passes: update region states and flush the log,
start the next region's resync, dispatch reads, classify and dispatch writes (the log
records a region dirty before any data write reaches a leg), then handle failed writes.
Each request's own task does its leg I/O once the worker has dispatched it.

Resync copies one region at a time with kcopyd, from the default leg to every other
leg; it starts at resume and stops at presuspend.  Its speed is limited by the
kcopyd throttle :data:`resync_throttle` (the kernel's ``raid1_resync_throttle`` module
parameter, percent of time; 100 = unlimited).

Status (info): ``<#legs> <leg>... <in_sync>/<regions> 1 <health> <log status>`` with one
health character per leg (A alive, F flush, D write, S sync, R read error, U unknown).
Kernel: drivers/md/dm-raid1.c, dm-region-hash.c, dm-log.c (6.1).

Deliberate differences from the kernel, each where it loses data or hangs (found by
tests/test_mirror_model.py; tables, status and messages are unchanged):

* without handle_errors, a region is never copied from a leg that failed or lost
  writes (the kernel copies from the default leg whatever happened to it: kcopyd then
  writes a failed read's zero-filled pages, or stale data, over the good legs);
* a leg that lost writes stays "stale" for reads and resync after the in-sync reset of
  its error flags, until a resync reached it without a failure;
* a suspend interrupted by the caller gives back the recovery slot it took and lets the
  resync go on (``presuspend_undo``; the kernel's mirror has none);
* a recovering region whose writes end after a flush failure is still copied (the
  kernel leaves it out of sync with its recovery slot taken, and the next suspend hangs).
"""
from __future__ import annotations

import errno

import trio

from dmsim import fanout
from dmsim.bio import Bio, Op
from dmsim.blockdev import FileDevice
from dmsim.device import Requeue
from dmsim.dirty_log import CoreLog, DirtyLogError, create_dirty_log
from dmsim.errors import DMError, TargetError
from dmsim.kcopyd import FLAG_IGNORE_ERROR, Throttle
from dmsim.kcopyd import Region as KRegion

from .base import STATUSTYPE_INFO, Target, register

MAX_NR_MIRRORS = 9        # kcopyd's 8 destinations + the source
MAX_RECOVERY = 1          # regions resynced in parallel

WRITE_ERROR, FLUSH_ERROR, SYNC_ERROR, READ_ERROR = range(4)
CLEAN, DIRTY, NOSYNC, RECOVERING = "clean", "dirty", "nosync", "recovering"

#: ``raid1_resync_throttle``: one kcopyd throttle shared by every mirror (percent)
resync_throttle = Throttle(100)

_ratelimit_state: trio.lowlevel.RunVar[list[float] | None] = trio.lowlevel.RunVar("dm_ratelimit_state",
                                                                                   default=None)
RATELIMIT_INTERVAL_SECONDS = 5.0
RATELIMIT_BURST = 10


def _ratelimit() -> bool:
    """``dm_ratelimit()``: at most 10 messages per 5 s across device-mapper."""
    now = trio.current_time()
    state = _ratelimit_state.get()
    if state is None or now - state[0] >= RATELIMIT_INTERVAL_SECONDS:
        state = [now, 0]
        _ratelimit_state.set(state)
    if state[1] < RATELIMIT_BURST:
        state[1] += 1
        return True
    return False


class _Leg:
    """One leg.  ``error_count``/``error_type`` are the kernel's (status, events, reset when
    the mirror gets back in sync).  ``stale`` is ours: the leg missed data (a write, a
    flush or a region copy to it failed) and is not read or copied from while another
    leg can be, even after that reset, until a resync reached it without a failure."""

    __slots__ = ("dev", "offset", "error_count", "error_type", "stale", "recovery_failed")

    def __init__(self, dev, offset: int):
        self.dev = dev
        self.offset = offset
        self.error_count = 0
        self.error_type: set[int] = set()
        self.stale = False
        self.recovery_failed = False     # a copy to it failed since it went stale

    def status_char(self) -> str:
        if not self.error_count:
            return "A"
        for kind, ch in ((FLUSH_ERROR, "F"), (WRITE_ERROR, "D"), (SYNC_ERROR, "S"), (READ_ERROR, "R")):
            if kind in self.error_type:
                return ch
        return "U"


class _Region:
    """A region hash entry (``struct dm_region``)."""

    __slots__ = ("key", "state", "pending", "delayed", "list")

    def __init__(self, key: int, state: str):
        self.key = key
        self.state = state
        self.pending = 0
        self.delayed: list = []
        self.list: dict | None = None


DONE, WRITE_ALL, WRITE_DEFAULT, READ = "done", "write_all", "write_default", "read"


class _Req:
    """One mapped request travelling between its own task and the worker.  A region's
    piece of a larger write is sliced only when something needs it on its own (the
    common case writes the whole request at once), and its event exists only while its
    task waits for the worker: a request the pass posts in its own task needs neither."""

    __slots__ = ("_bio", "_parent", "_off", "region", "action", "leg", "error", "data", "inc",
                 "cancelled", "_ev", "_posted", "accounted")

    def __init__(self, bio: Bio | None, region: int | None, parent: Bio | None = None,
                 off: tuple[int, int] = (0, 0)):
        self._bio = bio                 # None: the (offset, sectors) piece ``off`` of ``parent``
        self._parent = parent
        self._off = off
        self.accounted = region is not None     # takes part in region accounting
        self.region = -1 if region is None else region
        self.action = DONE
        self.leg: _Leg | None = None
        self.error: BaseException | None = None
        self.data: object = None
        self.inc = False
        self.cancelled = False
        self._ev: trio.Event | None = None
        self._posted = False

    @property
    def bio(self) -> Bio:
        if self._bio is None:
            assert self._parent is not None
            self._bio = self._parent.slice(*self._off)
        return self._bio

    def post(self, action: str, leg: _Leg | None = None) -> None:
        self.action = action
        self.leg = leg
        self._posted = True
        if self._ev is not None:
            self._ev.set()

    def posted(self, action: str) -> bool:
        """Whether ``action`` is posted and not yet taken by :meth:`next`."""
        return self._posted and self.action == action

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self.post(DONE)

    async def next(self) -> str:
        if not self._posted:            # (posted already: a pass in our own task; go on)
            self._ev = trio.Event()
            await self._ev.wait()
            self._ev = None
        self._posted = False
        return self.action


def _no_region(bio: Bio) -> bool:
    """Flushes and discards take no part in region accounting."""
    return bio.op in (Op.FLUSH, Op.DISCARD)


@register
class Mirror(Target):
    name = "mirror"
    version = (1, 14, 0)

    # -- constructor ------------------------------------------------------------------------
    async def ctr(self, args):
        if len(args) < 2:
            raise TargetError("Insufficient mirror log arguments")
        w = args[1]
        if not (w.isascii() and w.isdigit() and int(w) < (1 << 32)):
            raise TargetError("Invalid mirror log argument count")
        used = 2 + int(w)
        if len(args) < used:
            raise TargetError("Insufficient mirror log arguments")
        try:
            self.log = create_dirty_log(args[0], self.ctx, self.len, args[2:used], self._flush_legs)
        except DirtyLogError:
            raise TargetError("Error creating mirror dirty log") from None
        rest = args[used:]
        w = rest[0] if rest else ""
        if not (w.isascii() and w.isdigit()) or not 2 <= int(w) <= MAX_NR_MIRRORS:
            raise TargetError("Invalid number of mirrors")
        nr = int(w)
        rest = rest[1:]
        if len(rest) < 2 * nr:
            raise TargetError("Too few mirror arguments")
        self.region_size = self.log.get_region_size()
        self.nr_regions = -(-self.len // self.region_size)
        self.legs: list[_Leg] = []
        for i in range(nr):
            dev_name, off = rest[2 * i], rest[2 * i + 1]
            if not (off.isascii() and off.isdigit() and int(off) < (1 << 64)):
                raise TargetError("Invalid offset")
            try:
                dev = self.ctx.get_device(dev_name)
            except DMError as e:
                raise TargetError("Device lookup failure", e.errno) from None
            self.legs.append(_Leg(dev, int(off)))
        rest = rest[2 * nr:]
        self.handle_errors = self.keep_log = False
        if rest:
            w = rest[0]
            if not (w.isascii() and w.isdigit() and int(w) < (1 << 32)):
                raise TargetError("Invalid number of features")
            n = int(w)
            rest = rest[1:]
            if n > len(rest):
                raise TargetError("Not enough arguments to support feature count")
            for word in rest[:n]:
                if word == "handle_errors":
                    self.handle_errors = True
                elif word == "keep_log":
                    self.keep_log = True
                else:
                    raise TargetError("Unrecognised feature requested")
            if self.keep_log and not self.handle_errors:
                raise TargetError("keep_log feature requires the handle_errors feature")
            rest = rest[n:]
        if rest:
            raise TargetError("Too many mirror arguments")
        # dm core splits requests at regions for the mirror (max_io_len).  When every leg
        # is a plain image file the split is not observable below us, so the mirror
        # takes whole requests and splits only its region accounting (_pieces): one
        # worker pass and one parallel write per request instead of one per region
        self.max_io_len = 0 if all(fanout.fans_out(leg.dev) for leg in self.legs) else self.region_size
        self._legs_inline = all(isinstance(leg.dev, FileDevice) and leg.dev.io_mode == "inline"
                                for leg in self.legs)

        self.default = 0
        self.in_sync = False
        self.log_failure = False
        self.leg_failure = False
        self.suspend = False
        self._noflush = False
        self._live = False
        self._log_resume_failed = False
        # region hash
        self.regions: dict[int, _Region] = {}
        self.clean_regions: dict[int, _Region] = {}
        self.quiesced: dict[int, _Region] = {}
        self.recovered: dict[int, _Region] = {}
        self.failed_recovered: dict[int, _Region] = {}
        self.flush_failure = False
        # recovery slots (0 until resume); trio's semaphore hands a released slot to a
        # waiting stop_recovery first, like the kernel's FIFO down()
        self.recovery_count = trio.Semaphore(0)
        #: slots held by suspend (all of them until the first resume): what resume or an
        #: interrupted suspend's undo gives back
        self._stopped_slots = MAX_RECOVERY
        self.recovery_in_flight = 0
        self._recovery_changed = trio.Event()
        # worker queues
        self.reads: list[_Req] = []
        self.writes: list[_Req] = []
        self.failures: list[_Req] = []
        self.holds: list[_Req] = []
        self._wake_ev = trio.Event()
        self._idle_waiters: list[trio.Event] = []
        self._busy = False
        # passes never overlap: True while one runs (a flag, not a trio.Lock: taking and
        # releasing one cost ~8 us of a 1 MiB write's ~70 us of Python); the worker waits
        # on _pass_over for a pass a request's task runs
        self._in_pass = False
        self._pass_over: trio.Event | None = None
        # a core log's flush is a no-op: a pass then never yields (no cancel scope needed)
        self._pass_yields = type(self.log).flush is not CoreLog.flush

        self.kc = await self.ctx.kcopyd_client()
        self.kc.throttle = resync_throttle
        # the constructor's wakeup pass: a nosync log is in sync before the table is live
        if self.log.get_sync_count() == self.nr_regions:
            self.in_sync = True
        self.ctx.start_task(self._kmirrord, name="kmirrord")
        self._wake()

    async def dtr(self):
        if self._live and not self.suspend:
            # dm core suspends a live table before destroying it (__dm_destroy)
            await self.presuspend(False)
            await self.postsuspend()
        await self.kc.destroy()
        for req in self.reads + self.writes + self.failures + self.holds:
            req.finish(DMError(errno.EIO))
        for reg in self.regions.values():
            for req in reg.delayed:
                req.finish(DMError(errno.EIO))
        self.log.dtr()

    # -- helpers ---------------------------------------------------------------------------
    def _log(self, msg: str) -> None:
        self.ctx.log("raid1: " + msg)

    def _table_live(self) -> bool:
        return self.ctx.md.live is self.ctx.table

    def _event(self) -> None:
        """``dm_table_event``: lost while the table is not bound to the device."""
        if self._table_live():
            self.ctx.event()

    def _wake(self) -> None:
        self._wake_ev.set()

    def _region_of(self, bio: Bio) -> int:
        return bio.sector // self.region_size

    def _remap(self, leg: _Leg, bio: Bio) -> Bio:
        if not bio.sectors:
            return bio
        return bio.remap(leg.offset + bio.sector)

    def _default_leg(self) -> _Leg:
        return self.legs[self.default]

    def _valid_leg(self) -> _Leg | None:
        for leg in self.legs:
            if not leg.error_count:
                return leg
        return None

    def _choose_leg(self) -> _Leg | None:
        """The default leg, else the next error-free one searching backwards
        (``choose_mirror``); a leg known to be stale only when no other is error-free."""
        n = len(self.legs)
        fallback = None
        i = self.default
        for _ in range(n):
            leg = self.legs[i]
            if not leg.error_count:
                if not leg.stale:
                    return leg
                fallback = fallback or leg
            i = (i - 1) % n
        return fallback

    def _mark_stale(self, leg: _Leg, recovery: bool = False) -> None:
        leg.stale = True
        leg.recovery_failed = leg.recovery_failed or recovery

    def _default_ok(self) -> bool:
        return not self._default_leg().error_count

    def _mirror_available(self, region: int) -> bool:
        return self.log.in_sync(region) and self._choose_leg() is not None

    def _fail_mirror(self, leg: _Leg, error_type: int) -> None:
        self.leg_failure = True
        leg.error_count += 1
        if error_type in leg.error_type:
            return
        leg.error_type.add(error_type)
        if not self.handle_errors:
            return
        if leg is self._default_leg():
            if not self.in_sync:
                self._log("Primary mirror (%s) failed while out-of-sync: Reads may fail." % leg.dev.ref)
            else:
                new = self._valid_leg()
                if new is not None:
                    self.default = self.legs.index(new)
                else:
                    self._log("All sides of mirror have failed.")
        self._event()

    async def _io_all(self, bio: Bio) -> int:
        """One dm-io request over every leg at once; returns the per-leg error bitmask.

        Shielded once sent, except reads: a bio is not taken back from the legs.  A
        write cancelled between legs (its caller gone: a suspend's writeback at SIGTERM,
        an NBD client) left one leg new and one old in a region that then went back to
        clean, so nothing resynced it."""
        if bio.op is Op.READ or (self._legs_inline and not bio.fua):
            # (inline file legs without a sync never yield: nothing to shield, no scope)
            return await self._io_all_legs(bio)
        with trio.CancelScope(shield=True):
            bits = await self._io_all_legs(bio)
        return bits

    async def _io_all_legs(self, bio: Bio) -> int:
        legs = self.legs
        errors = 0
        if bio.op is Op.WRITE:
            # image-file legs are written in parallel threads (see dmsim.fanout), others
            # by their own submit; each leg's failure is its own.  do_write gives dm-io the
            # bio's bi_opf: REQ_SYNC, REQ_FUA, ... reach the legs (a flakey leg sees them)
            results = await fanout.write([(leg.dev, leg.offset + bio.sector) for leg in legs],
                                         bio.sectors, bio.data, bio.fua, bio.flags)
            for i, err in enumerate(results):
                if err is not None:
                    errors |= 1 << i
            return errors

        async def one(i: int) -> None:
            nonlocal errors
            leg = legs[i]
            try:
                await leg.dev.submit(self._remap(leg, bio))
            except DMError:
                errors |= 1 << i

        if self._legs_inline:
            # file legs doing inline I/O never yield mid-request: tasks would only add
            # overhead
            for i in range(len(legs)):
                await one(i)
            return errors
        async with trio.open_nursery() as nursery:
            for i in range(1, len(legs)):
                nursery.start_soon(one, i)
            await one(0)
        return errors

    async def _flush_legs(self) -> bool:
        """``mirror_flush``, the disk log's callback: True when some leg failed."""
        bits = await self._io_all(Bio.flush())
        for i, leg in enumerate(self.legs):
            if bits & (1 << i):
                self._fail_mirror(leg, FLUSH_ERROR)
                self._mark_stale(leg)
        return bool(bits)

    # -- region hash (dm-region-hash.c) ---------------------------------------------------------
    def _rh_find(self, region: int) -> _Region:
        reg = self.regions.get(region)
        if reg is None:
            reg = _Region(region, CLEAN if self.log.in_sync(region) else NOSYNC)
            self.regions[region] = reg
            if reg.state == CLEAN:
                self._list_move(reg, self.clean_regions)
        return reg

    @staticmethod
    def _list_move(reg: _Region, lst: dict | None) -> None:
        if reg.list is not None:
            reg.list.pop(reg.key, None)
        reg.list = lst
        if lst is not None:
            lst[reg.key] = reg

    def _rh_state(self, region: int) -> str:
        reg = self.regions.get(region)
        if reg is not None:
            return reg.state
        return CLEAN if self.log.in_sync(region) else NOSYNC

    def _rh_inc(self, region: int) -> None:
        reg = self._rh_find(region)
        reg.pending += 1
        if reg.state == CLEAN:
            reg.state = DIRTY
            self._list_move(reg, None)
            self.log.mark_region(region)

    def _rh_dec(self, region: int) -> None:
        reg = self.regions[region]
        reg.pending -= 1
        if reg.pending == 0:
            if reg.state == RECOVERING:
                # before the flush-failure rule (the kernel checks that first and leaves
                # the region NOSYNC, its recovery slot never given back: the next suspend
                # waits forever); the copy that follows resyncs the region anyway
                self._list_move(reg, self.quiesced)
            elif self.flush_failure:
                reg.state = NOSYNC
            elif reg.state == DIRTY:
                reg.state = CLEAN
                self._list_move(reg, self.clean_regions)
            self._wake()

    def _rh_mark_nosync(self, req: _Req) -> None:
        if req.bio.op is Op.FLUSH:
            self.flush_failure = True
            return
        if req.bio.op is Op.DISCARD:
            return
        self.log.set_region_sync(req.region, False)
        reg = self._rh_find(req.region)
        recovering = reg.state == RECOVERING
        reg.state = NOSYNC
        if recovering:
            self._complete_resync_work(reg, False)

    def _complete_resync_work(self, reg: _Region, success: bool) -> None:
        self.log.set_region_sync(reg.key, success)
        delayed, reg.delayed = reg.delayed, []
        for req in delayed:
            self._queue(self.writes, req)
        self.recovery_in_flight -= 1
        self.recovery_count.release()
        self._recovery_changed.set()
        self._recovery_changed = trio.Event()

    async def _rh_update_states(self) -> None:
        clean, self.clean_regions = self.clean_regions, {}
        recovered, self.recovered = self.recovered, {}
        failed, self.failed_recovered = self.failed_recovered, {}
        for lst in (clean, recovered, failed):
            for reg in lst.values():
                reg.list = None
                self.regions.pop(reg.key, None)
        for reg in recovered.values():
            self.log.clear_region(reg.key)
            self._complete_resync_work(reg, True)
        for reg in failed.values():
            self._complete_resync_work(reg, not self.handle_errors)
        for reg in clean.values():
            self.log.clear_region(reg.key)
        await self.log.flush()

    def _recovery_prepare(self) -> None:
        if self.log.resync_search_done():
            return                      # the loop below would start nothing, wake no one
        before = self.recovery_in_flight
        self.recovery_in_flight += 1
        while True:
            try:
                self.recovery_count.acquire_nowait()
            except trio.WouldBlock:
                break
            self.recovery_in_flight += 1
            region = self.log.get_resync_work()
            if region is None:
                self.recovery_in_flight -= 1
                self.recovery_count.release()
                break
            reg = self._rh_find(region)
            reg.state = RECOVERING
            self._list_move(reg, None if reg.pending else self.quiesced)
        self.recovery_in_flight -= 1
        if self.recovery_in_flight != before:       # nothing started: nobody to wake
            self._recovery_changed.set()
            self._recovery_changed = trio.Event()

    # -- recovery -----------------------------------------------------------------------------
    def _recovery_source(self) -> _Leg:
        """The leg a region is copied from: the default one (the kernel's choice).

        One deliberate difference: without handle_errors, a default leg that has failed
        is never replaced, and the kernel copies from it anyway; kcopyd, told to ignore
        errors, then writes the zero-filled pages of the failed read over every good leg,
        and writes the mirror had acknowledged are gone.  Here such a region is copied
        from the leg reads use instead (the next error-free one, as ``choose_mirror``)."""
        leg = self._default_leg()
        if (leg.error_count or leg.stale) and not self.handle_errors:
            return self._choose_leg() or leg
        return leg

    def _recover(self, reg: _Region) -> None:
        src_leg = self._recovery_source()
        start = reg.key * self.region_size
        count = min(self.region_size, self.len - start)
        src = KRegion(src_leg.dev, src_leg.offset + start, count)
        dest_legs = [leg for leg in self.legs if leg is not src_leg]
        dests = [KRegion(leg.dev, leg.offset + start, count) for leg in dest_legs]
        flags = 0 if self.handle_errors else FLAG_IGNORE_ERROR
        try:
            self.kc.copy(src, dests, flags, self._recovery_complete, (reg, src_leg, dest_legs))
        except DMError:
            self._recovery_end(reg, False)

    def _recovery_complete(self, read_err: int, write_err: int,
                           context: tuple[_Region, _Leg, list[_Leg]]) -> None:
        reg, src_leg, dest_legs = context
        if read_err:
            if _ratelimit():
                self._log("Unable to read primary mirror during recovery")
            self._fail_mirror(src_leg, SYNC_ERROR)
            if not self.handle_errors:
                for leg in dest_legs:           # kcopyd wrote them the zero-filled read
                    self._mark_stale(leg, True)
        if write_err:
            if _ratelimit():
                self._log("Write error during recovery (error = 0x%x)" % write_err)
            # bits are destinations: every leg but the source, in leg order
            for bit, leg in enumerate(dest_legs):
                if write_err & (1 << bit):
                    self._fail_mirror(leg, SYNC_ERROR)
                    self._mark_stale(leg, True)
        self._recovery_end(reg, not (read_err or write_err))

    def _recovery_end(self, reg: _Region, success: bool) -> None:
        self._list_move(reg, self.recovered if success else self.failed_recovered)
        self._wake()

    def _do_recovery(self) -> None:
        self._recovery_prepare()
        while self.quiesced:
            key = next(iter(self.quiesced))
            reg = self.quiesced[key]
            self._list_move(reg, None)
            self._recover(reg)
        if not self.in_sync and self.log.get_sync_count() == self.nr_regions:
            self._event()
            self.in_sync = True
            self.leg_failure = False
            for leg in self.legs:
                leg.error_count = 0
                if leg.stale and not leg.recovery_failed:
                    leg.stale = False           # every region copied to it since
                leg.recovery_failed = False
                leg.error_type.clear()

    # -- the worker ---------------------------------------------------------------------------
    def _queue(self, lst: list, req: _Req) -> None:
        lst.append(req)
        self._wake()

    async def _kmirrord(self) -> None:
        while True:
            await self._wake_ev.wait()
            while self._in_pass:            # a request's task is running one: wait it out
                if self._pass_over is None:
                    self._pass_over = trio.Event()
                await self._pass_over.wait()
            if self._wake_ev.is_set():      # not already taken by a request's task
                self._in_pass = True
                try:
                    await self._pass()
                finally:
                    self._end_pass()

    def _end_pass(self) -> None:
        self._in_pass = False
        if self._pass_over is not None:
            self._pass_over.set()
            self._pass_over = None

    async def _pass(self) -> None:
        """One kmirrord pass; the caller has set ``_in_pass`` (passes never overlap)."""
        self._wake_ev = trio.Event()
        self._busy = True
        try:
            if self._pass_yields:
                with trio.CancelScope(shield=True):   # a pass runs to its end, as the worker's
                    await self._do_mirror()
            else:
                await self._do_mirror()              # no checkpoint inside: nothing to shield
        finally:
            self._busy = False
            if not self._wake_ev.is_set():
                waiters, self._idle_waiters = self._idle_waiters, []
                for ev in waiters:
                    ev.set()

    async def _pass_now(self) -> None:
        """Run the worker's pass in this task when the worker is not in one: what
        kmirrord would do once scheduled, without the two task switches of a hand-off
        (a pass is still serialised with every other, and handles everything queued)."""
        if self._in_pass or not self._wake_ev.is_set():
            return
        self._in_pass = True
        try:
            await self._pass()
        finally:
            self._end_pass()

    async def _flush_worker(self) -> None:
        """``flush_workqueue``: wait until the worker has nothing queued."""
        if not self._busy and not self._wake_ev.is_set():
            return
        ev = trio.Event()
        self._idle_waiters.append(ev)
        await ev.wait()

    async def _do_mirror(self) -> None:
        reads, self.reads = self.reads, []
        writes, self.writes = self.writes, []
        failures, self.failures = self.failures, []
        await self._rh_update_states()
        self._do_recovery()
        self._do_reads([r for r in reads if not r.cancelled])
        await self._do_writes([w for w in writes if not w.cancelled])
        self._do_failures(failures)

    def _do_reads(self, reads: list[_Req]) -> None:
        for req in reads:
            leg: _Leg | None = self._default_leg()
            if self._rh_state(req.region) in (CLEAN, DIRTY):
                leg = self._choose_leg()
            elif self._default_leg().error_count:
                leg = None
            if leg is not None:
                req.post(READ, leg)
            else:
                req.finish(DMError(errno.EIO))

    async def _do_writes(self, writes: list[_Req]) -> None:
        if not writes:
            return
        sync, nosync, recover = [], [], []
        for req in writes:
            if not req.accounted:           # flushes and discards
                sync.append(req)
                continue
            state = self._rh_state(req.region)
            if state in (CLEAN, DIRTY):
                sync.append(req)
            elif state == NOSYNC:
                nosync.append(req)
            else:
                recover.append(req)
        for req in sync + nosync:
            if req.accounted:
                self._rh_inc(req.region)
                req.inc = True
        if await self.log.flush():
            self.log_failure = True
        if self.log_failure and self.handle_errors:
            self.failures.extend(sync)
            self._wake()
        else:
            for req in sync:
                req.post(WRITE_ALL)
        for req in recover:
            self._rh_find(req.region).delayed.append(req)
        for req in nosync:
            if self.leg_failure and self.handle_errors and not self.keep_log:
                self._queue(self.failures, req)
            else:
                req.post(WRITE_DEFAULT, self._default_leg())

    def _do_failures(self, failures: list[_Req]) -> None:
        for req in failures:
            if not self.log_failure:
                # also for a request whose caller went meanwhile: its legs differ all the
                # same, and the region must not go back to clean
                self.in_sync = False
                self._rh_mark_nosync(req)
            if req.cancelled:
                continue
            if self._valid_leg() is None or (self.keep_log and self.log_failure):
                req.finish(DMError(errno.EIO))
            elif self.handle_errors and not self.keep_log:
                self._hold(req)
            else:
                req.finish()

    def _hold(self, req: _Req) -> None:
        """Keep a failed write until the device is suspended (``hold_bio``)."""
        if self.suspend:
            if self._noflush or self.ctx.noflush_suspending():
                req.finish(Requeue())
            else:
                req.finish(DMError(errno.EIO))
            return
        self.holds.append(req)

    # -- I/O ------------------------------------------------------------------------------------
    def _pieces(self, bio: Bio) -> list[tuple[int, int]]:
        """``(offset, sectors)`` of ``bio`` per region, as dm core's split would cut it."""
        rs = self.region_size
        pieces = []
        done = 0
        while done < bio.sectors:
            n = min(bio.sectors - done, rs - (bio.sector + done) % rs)
            pieces.append((done, n))
            done += n
        return pieces or [(0, 0)]

    async def map(self, bio: Bio):
        if bio.op is Op.READ:
            pieces = self._pieces(bio)
            if len(pieces) == 1:
                return await self._map_read(bio)
            return await self._map_read_split(bio, pieces)
        if _no_region(bio):
            reqs = [_Req(bio, None)]
        else:
            rs = self.region_size
            reqs = [_Req(bio if n == bio.sectors else None, (bio.sector + off) // rs, bio, (off, n))
                    for off, n in self._pieces(bio)]
        self.writes.extend(reqs)
        self._wake()
        try:
            await self._pass_now()
            if (len(reqs) > 1 and bio.op is Op.WRITE and all(r.posted(WRITE_ALL) for r in reqs)
                    and not await self._io_all(bio)):
                # one pass sent every region to all legs: written as one request.  If a
                # leg failed, each region redoes its own write so failures stay per region
                return None
            if len(reqs) == 1:
                await self._run(reqs[0])
            else:
                async with trio.open_nursery() as nursery:
                    for req in reqs:
                        nursery.start_soon(self._run, req)
        finally:
            for req in reqs:
                req.cancelled = True
                if req.inc:
                    req.inc = False
                    self._rh_dec(req.region)
        errors = [r.error for r in reqs if r.error is not None]
        if errors:
            # like dm core's clones: a requeue wins, else the first error
            raise next((e for e in errors if isinstance(e, Requeue)), errors[0])
        return None

    async def _map_read_split(self, bio: Bio, pieces: list[tuple[int, int]]):
        """A read over several regions (legs are plain files, see ``max_io_len``)."""
        first, last = self._region_of(bio), (bio.end_sector - 1) // self.region_size
        if all(self.log.in_sync(r) for r in range(first, last + 1)):
            leg = self._choose_leg()
            if leg is not None:
                try:
                    return await leg.dev.submit(self._remap(leg, bio))
                except DMError:
                    pass        # per region below: each fails over (and logs) as the kernel's
        parts = [bio.slice(off, n) for off, n in pieces]
        results: list = [None] * len(parts)
        errors: list[BaseException] = []

        async def one(i: int) -> None:
            try:
                results[i] = await self._map_read(parts[i])
            except DMError as e:
                errors.append(e)

        async with trio.open_nursery() as nursery:
            for i in range(len(parts)):
                nursery.start_soon(one, i)
        if errors:
            raise errors[0]
        if bio.data is None:
            return b"".join(results)
        # a read into the caller's buffer: each part lands in its slice
        for part, result in zip(parts, results, strict=True):
            assert part.data is not None
            if result is not part.data:
                memoryview(part.data)[:] = result
        return bio.data

    async def _map_read(self, bio: Bio):
        region = self._region_of(bio)
        if self.log.in_sync(region):
            leg = self._choose_leg()
            if leg is None:
                raise DMError(errno.EIO)
            try:
                return await leg.dev.submit(self._remap(leg, bio))
            except DMError as e:
                if e.errno == errno.EOPNOTSUPP:
                    raise
                self._log("Mirror read failed from %s. Trying alternative device." % leg.dev.ref)
                self._fail_mirror(leg, READ_ERROR)
                if not (self._default_ok() or self._mirror_available(region)):
                    self._log("All replicated volumes dead, failing I/O")
                    raise
        req = _Req(bio, region)
        self._queue(self.reads, req)
        try:
            await self._run(req)
        finally:
            req.cancelled = True
        if req.error is not None:
            raise req.error
        return req.data

    async def _run(self, req: _Req) -> None:
        """Carry out what the worker decides for ``req`` until it is done."""
        bio = req.bio
        while True:
            action = await req.next()
            if action == DONE:
                return
            if action == WRITE_ALL:
                bits = await self._io_all(bio)
                if not bits:
                    return
                if bio.op is Op.DISCARD:
                    req.error = DMError(errno.EOPNOTSUPP)
                    return
                for i, leg in enumerate(self.legs):
                    if bits & (1 << i):
                        self._fail_mirror(leg, WRITE_ERROR)
                        self._mark_stale(leg)
                self._queue(self.failures, req)
            elif action == WRITE_DEFAULT:
                dest = req.leg
                assert dest is not None
                try:
                    await dest.dev.submit(self._remap(dest, bio))
                except DMError as e:
                    req.error = e
                return
            elif action == READ:
                src = req.leg
                assert src is not None
                try:
                    req.data = await src.dev.submit(self._remap(src, bio))
                    return
                except DMError:
                    self._fail_mirror(src, READ_ERROR)
                    if self._default_ok() or self._mirror_available(req.region):
                        if _ratelimit():
                            self._log("Read failure on mirror device %s.  Trying alternative device."
                                      % src.dev.ref)
                        self._queue(self.reads, req)
                    else:
                        if _ratelimit():
                            self._log("Read failure on mirror device %s.  Failing I/O." % src.dev.ref)
                        req.error = DMError(errno.EIO)
                        return

    # -- suspend / resume -----------------------------------------------------------------------
    async def presuspend(self, noflush=False):
        self.suspend = True
        self._noflush = noflush
        holds, self.holds = self.holds, []
        for req in holds:
            self._hold(req)
        # dm_rh_stop_recovery: take every recovery slot, then wait for in-flight copies.
        # Counted one by one, so that an interrupted suspend gives back what it took
        while self._stopped_slots < MAX_RECOVERY:
            await self.recovery_count.acquire()
            self._stopped_slots += 1
        while self.recovery_in_flight:
            await self._recovery_changed.wait()
        await self._flush_worker()

    async def presuspend_undo(self):
        """An interrupted suspend: the mirror goes on as before it (recovery restarts from
        where it stopped).  The kernel's mirror has no undo and stays stopped until the
        next resume; a suspend that the caller gave up must not leave that behind."""
        self.suspend = False
        self._noflush = False
        self._start_recovery()
        self._wake()

    def _start_recovery(self) -> None:
        """``dm_rh_start_recovery``: give back the slots suspend took."""
        while self._stopped_slots:
            self._stopped_slots -= 1
            self.recovery_count.release()

    async def postsuspend(self):
        self._noflush = False
        if await self.log.postsuspend():
            self._log("log postsuspend failed")

    async def preresume(self):
        # the log is read back before I/O resumes (the kernel's resume hook runs while
        # dm core still blocks I/O)
        self._log_resume_failed = bool(await self.log.resume())

    async def resume(self):
        self.suspend = False
        self._live = True
        if self._log_resume_failed:
            self._log("log resume failed")
        self._start_recovery()
        self._wake()

    # -- status -----------------------------------------------------------------------------------
    def status(self, kind, noflush=False):
        if kind == STATUSTYPE_INFO:
            health = "".join(leg.status_char() for leg in self.legs)
            return "%d %s %d/%d 1 %s %s" % (len(self.legs), " ".join(leg.dev.ref for leg in self.legs),
                                             self.log.get_sync_count(), self.nr_regions, health,
                                             self.log.status("info"))
        out = self.log.status("table") + "%d" % len(self.legs)
        for leg in self.legs:
            out += " %s %d" % (leg.dev.ref, leg.offset)
        nfeat = int(self.handle_errors) + int(self.keep_log)
        if nfeat:
            out += " %d" % nfeat
            if self.handle_errors:
                out += " handle_errors"
            if self.keep_log:
                out += " keep_log"
        return out

    def iterate_devices(self):
        return [(leg.dev, leg.offset, self.len) for leg in self.legs]
