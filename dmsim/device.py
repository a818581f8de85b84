"""A mapped device: two table slots, suspend state, open and event counters.

``submit`` is dm core's I/O path: it holds new requests while the device is suspended,
counts in-flight requests so that suspend can drain them, splits a request at target
boundaries (and at a target's ``max_io_len``) and sends each piece to its target with
target-relative sectors.
"""
from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Callable

import trio

from .bio import SECTOR_SIZE, Bio, Op, settle_read, to_bytes
from .blockdev import BlockDevice
from .errors import DMError

if TYPE_CHECKING:  # pragma: no cover
    from .manager import Manager
    from .table import Table

DM_MAJOR = 253


class Requeue(Exception):
    """Raised by a target's ``map`` to push a request back to dm core
    (``DM_MAPIO_REQUEUE``): held until resume during a noflush suspend, else EIO."""


async def _map_clones(clones) -> list:
    """Map the pieces of a split request concurrently, as dm core submits its clones:
    targets that commit in batches (snapshot exceptions) see them together.  The request
    fails with the first piece's error; a requeue wins over errors (core resubmits)."""
    results = [None] * len(clones)
    failures: list[BaseException] = []

    async def one(i, target, clone):
        try:
            results[i] = await target.map(clone)
        except (DMError, Requeue) as e:
            failures.append(e)

    async with trio.open_nursery() as nursery:
        for i, (target, clone) in enumerate(clones):
            nursery.start_soon(one, i, target, clone)
    if failures:
        raise next((e for e in failures if isinstance(e, Requeue)), failures[0])
    return results


class MappedDevice(BlockDevice):
    def __init__(self, manager: "Manager", name: str, uuid: str, minor: int):
        self.manager = manager
        self.name = name
        self.uuid = uuid
        self.minor = minor
        self.devno: tuple[int, int] = (DM_MAJOR, minor)
        self.kname = "dm-%d" % minor
        self.live: "Table | None" = None
        self.inactive: "Table | None" = None
        self.suspended = False
        self.noflush_suspending = False
        self.deferred_remove = False
        self.removed = False
        self.live_logical_block_size = SECTOR_SIZE   # the queue limit, set at the swap
        self.has_disk = False            # set by the first table load (the kernel's add_disk)
        self.dying = False               # kill_io: every request fails, none reaches a target
        self.quiesced = False            # the manager's last suspend before destruction ran
        self.open_count = 0
        self.event_nr = 0
        self._event = trio.Event()
        self.suspend_lock = trio.Lock()  # md->suspend_lock: one suspend/resume at a time
        self._resumed = trio.Event()
        self._resumed.set()
        self._blocked = trio.Event()     # set while I/O is blocked (suspended)
        self._inflight = 0
        self._drained = trio.Event()
        self._drained.set()
        #: called with each write-type bio after it completes (or fails), while set: the
        #: mount's buffer cache invalidates what a write from another path made stale
        self.write_observer: Callable[[Bio], None] | None = None

    @property
    def mm(self) -> str:
        return "%d:%d" % (DM_MAJOR, self.minor)

    # properties over BlockDevice's plain attributes: they follow the live table
    @property
    def size_sectors(self) -> int:  # type: ignore[override]
        return self.live.size_sectors if self.live else 0

    @property
    def logical_block_size(self) -> int:  # type: ignore[override]
        """The live table's, as computed when it was swapped in (the kernel's queue
        limits): never a walk down the stack."""
        return self.live_logical_block_size if self.live else SECTOR_SIZE

    @property
    def read_only(self) -> bool:  # type: ignore[override]
        return bool(self.live and self.live.read_only)

    # -- events --------------------------------------------------------------------------
    def raise_event(self) -> None:
        self.event_nr = (self.event_nr + 1) & 0xFFFFFFFF
        self._event.set()
        self._event = trio.Event()

    async def wait_event(self, event_nr: int) -> None:
        while self.event_nr == event_nr and not self.removed:
            await self._event.wait()
        if self.removed and self.event_nr == event_nr:
            # the kernel would sleep on forever (no table, no removal event): fail instead
            raise DMError(errno.ENXIO)

    # -- suspend / resume (the I/O side; the ioctl logic is in the manager) ----------------
    def block_io(self) -> None:
        self.suspended = True
        self._resumed = trio.Event()
        self._blocked.set()

    def unblock_io(self) -> None:
        self.suspended = False
        self._resumed.set()
        blocked, self._blocked = self._blocked, trio.Event()
        # a request requeued by a noflush presuspend waits on the old event: a suspend
        # undone before it blocked I/O must send it round again, not leave it waiting
        blocked.set()

    def kill_io(self) -> None:
        """The device is going away: fail the requests a suspend holds and every new one
        with EIO, before they reach a target (the kernel fails held bios at removal).

        Releasing them instead would let a held origin write through after its snapshot
        is gone: data the snapshot had to keep, overwritten without a copy-out."""
        self.dying = True
        self._resumed.set()      # held by a suspend
        self._blocked.set()      # requeued by a noflush presuspend

    async def wait_drained(self) -> None:
        while self._inflight:
            await self._drained.wait()

    # -- I/O -------------------------------------------------------------------------------
    async def submit(self, bio: Bio):
        while True:
            while self.suspended and not self.dying:
                await self._resumed.wait()
            if self.dying or self.removed:
                raise DMError(errno.EIO)
            self._inflight += 1
            if self._inflight == 1:
                self._drained = trio.Event()
            try:
                return await self._map(bio)
            except Requeue:
                if self.dying or (not self.noflush_suspending and not self.suspended):
                    raise DMError(errno.EIO) from None
                if not self.suspended:   # requeued from presuspend: held until resume
                    await self._blocked.wait()
            finally:
                self._inflight -= 1
                if not self._inflight:
                    self._drained.set()
                if self.write_observer is not None and bio.op is not Op.READ:
                    self.write_observer(bio)

    async def _map(self, bio: Bio):
        table = self.live
        if table is None:
            raise DMError(errno.EIO)
        if bio.op.is_write and bio.op is not Op.FLUSH and table.read_only:
            raise DMError(errno.EPERM)
        if bio.op is Op.FLUSH and not bio.sectors:
            for t in table.targets:
                await t.map(Bio(Op.FLUSH))
            return None
        if bio.sector < 0 or bio.end_sector > table.size_sectors:
            raise DMError(errno.EIO)
        if len(table.targets) == 1 and not table.targets[0].max_io_len:
            t = table.targets[0]
            return await t.map(bio if t.begin == 0 else bio.remap(bio.sector - t.begin))
        clones = []
        done = 0
        if bio.op is Op.READ and bio.data is None and bio.sectors > self._first_piece(table, bio):
            # the pieces land in one buffer (see dmsim.bio): no join of the parts
            bio = Bio(Op.READ, bio.sector, bio.sectors, bytearray(to_bytes(bio.sectors)))
        while done < bio.sectors:
            sector = bio.sector + done
            t = table.find_target(sector)
            rel = sector - t.begin
            n = min(bio.sectors - done, t.len - rel)
            if t.max_io_len:
                n = min(n, t.max_io_len - rel % t.max_io_len)
            clones.append((t, bio.slice(done, n, rel)))
            done += n
        if len(clones) == 1:
            t, clone = clones[0]
            return await t.map(clone)
        results = await _map_clones(clones)
        if bio.op is Op.READ:
            for (_, clone), result in zip(clones, results, strict=True):
                settle_read(clone, result)
            return bio.data
        return None

    @staticmethod
    def _first_piece(table, bio: Bio) -> int:
        """Sectors of ``bio`` that go to its first target piece."""
        t = table.find_target(bio.sector)
        rel = bio.sector - t.begin
        n = min(bio.sectors, t.len - rel)
        if t.max_io_len:
            n = min(n, t.max_io_len - rel % t.max_io_len)
        return n

    # -- convenience for in-process users (byte offsets, any alignment) ----------------------
    async def pread(self, offset_bytes: int, length_bytes: int) -> bytes:
        first = offset_bytes // SECTOR_SIZE
        last = -(-(offset_bytes + length_bytes) // SECTOR_SIZE)
        data = await self.read(first, last - first)
        skip = offset_bytes - to_bytes(first)
        return data[skip:skip + length_bytes]

    async def pwrite(self, offset_bytes: int, data) -> None:
        first = offset_bytes // SECTOR_SIZE
        last = -(-(offset_bytes + len(data)) // SECTOR_SIZE)
        skip = offset_bytes - to_bytes(first)
        if skip or len(data) != to_bytes(last - first):
            buf = bytearray(await self.read(first, last - first))
            buf[skip:skip + len(data)] = data
            data = buf
        await self.write(first, data)
