"""Thin provisioning from Python: the dmsetup choreography lvm2 runs for thin pools.

::

    async with dmsim.open_manager() as m:
        pool = await create_pool(m, "meta.img", "data.img", name="pool", block_sectors=128)
        vol = await pool.create_thin("vol", size_sectors=1 << 20)
        snap = await pool.snapshot(vol, "snap1")   # shares every block until one side writes

The pool's metadata lives on the metadata image (an all-zero one is formatted at the first
load), so ``create_pool`` over the same two files later reopens it: ``pool.device_ids()``
lists the thin devices the metadata holds and ``pool.activate`` shows one of them again.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from .errors import DMError
from .table import TableLine


@dataclass(frozen=True)
class PoolStatus:
    """The thin-pool's info status line, parsed (``Fail`` once the pool failed)."""

    transaction_id: int
    used_metadata_blocks: int
    total_metadata_blocks: int
    used_data_blocks: int
    total_data_blocks: int
    held_metadata_root: int | None
    mode: str                       # rw, ro, out_of_data_space or Fail
    discards: str                   # ignore_discard, discard_passdown or no_discard_passdown
    no_space_policy: str            # error_if_no_space or queue_if_no_space
    needs_check: bool
    metadata_low_watermark: int

    @classmethod
    def parse(cls, text: str) -> "PoolStatus":
        w = text.split()
        if w == ["Fail"]:
            return cls(0, 0, 0, 0, 0, None, "Fail", "", "", True, 0)
        if len(w) != 9:
            raise ValueError("not a thin-pool status: %r" % text)
        um, tm = w[1].split("/")
        ud, td = w[2].split("/")
        return cls(int(w[0]), int(um), int(tm), int(ud), int(td),
                   None if w[3] == "-" else int(w[3]), w[4], w[5], w[6], w[7] == "needs_check", int(w[8]))

    @property
    def free_data_blocks(self) -> int:
        return self.total_data_blocks - self.used_data_blocks


@dataclass(frozen=True)
class ThinStatus:
    """A thin device's info status: mapped sectors and the highest mapped sector (or None);
    ``failed`` when its pool failed (the kernel then prints only ``Fail``)."""

    mapped_sectors: int
    highest_mapped_sector: int | None
    failed: bool = False

    @classmethod
    def parse(cls, text: str) -> "ThinStatus":
        w = text.split()
        if w == ["Fail"]:
            return cls(0, None, True)
        if len(w) != 2:
            raise ValueError("not a thin status: %r" % text)
        return cls(int(w[0]), None if w[1] == "-" else int(w[1]))


def _info(manager, name: str) -> str:
    lines = manager.table_lines(name, "info")
    return str(lines[0]).split(None, 3)[3] if lines else ""


class Pool:
    """A thin-pool device and the thin devices made through it (name -> device id)."""

    def __init__(self, manager, name: str, metadata_path: str, data_path: str, block_sectors: int):
        self.manager = manager
        self.name = name
        self.metadata_path = metadata_path
        self.data_path = data_path
        self.block_sectors = block_sectors
        self.thins: dict[str, int] = {}
        self.origins: dict[str, str | None] = {}   # external origin of each

    @property
    def device(self):
        return self.manager.find(self.name)

    def _md(self):
        return self.device.live.targets[0].pool.md

    def device_ids(self) -> list[int]:
        """The thin device ids the metadata holds (active or not)."""
        return sorted(self._md().device_ids())

    def _next_id(self) -> int:
        ids = self.device_ids()
        return ids[-1] + 1 if ids else 0

    def status(self) -> PoolStatus:
        """The pool's status (committing first, as ``dmsetup status`` does)."""
        return PoolStatus.parse(_info(self.manager, self.name))

    def thin_status(self, vol) -> ThinStatus:
        return ThinStatus.parse(_info(self.manager, self._name(vol)))

    async def message(self, text: str) -> str:
        return await self.manager.message(self.name, 0, text)

    async def activate(self, name: str, dev_id: int, size_sectors: int, origin_path: str | None = None):
        """Show thin device ``dev_id`` (already in the metadata) as device ``name``, reading
        its unmapped blocks from ``origin_path`` (an external read-only origin) if given."""
        self.manager.create(name)
        try:
            params = "/dev/mapper/%s %d" % (self.name, dev_id) + (" " + origin_path if origin_path else "")
            await self.manager.load(name, [TableLine(0, size_sectors, "thin", params)])
            await self.manager.resume(name)
        except BaseException:
            await self.manager.remove(name)
            raise
        self.thins[name] = dev_id
        self.origins[name] = origin_path
        return self.manager.find(name)

    async def create_thin(self, name: str, size_sectors: int | None = None, dev_id: int | None = None,
                          origin_path: str | None = None):
        """A new, fully unprovisioned thin device (``create_thin`` message, then its table).

        With ``origin_path`` it is a snapshot of that image file (the kernel's external
        origin: reads of unwritten blocks come from the file, which is never written), as
        long as the file unless ``size_sectors`` says otherwise."""
        if size_sectors is None:
            if origin_path is None:
                raise DMError(errno.EINVAL, "a thin device needs size_sectors or origin_path")
            size_sectors = os.path.getsize(origin_path) // 512
        dev_id = self._next_id() if dev_id is None else dev_id
        await self.message("create_thin %d" % dev_id)
        try:
            return await self.activate(name, dev_id, size_sectors, origin_path)
        except BaseException:
            await self.message("delete %d" % dev_id)
            raise

    def _name(self, vol) -> str:
        return vol if isinstance(vol, str) else vol.name

    async def snapshot(self, vol, name: str, dev_id: int | None = None):
        """Snapshot thin device ``vol`` as new device ``name``, of the same size.

        The origin is suspended around ``create_snap`` and resumed after it, as lvm does:
        the suspend flushes the origin's in-flight writes, so the snapshot sees all of them
        and none that come after (the kernel refuses nothing here, it just races)."""
        origin = self._name(vol)
        if origin not in self.thins:
            raise DMError(errno.ENODEV, "%s is not a thin device of pool %s" % (origin, self.name))
        md = self.manager.find(origin)
        dev_id = self._next_id() if dev_id is None else dev_id
        held = not md.suspended
        if held:
            await self.manager.suspend(origin)
        try:
            await self.message("create_snap %d %d" % (dev_id, self.thins[origin]))
        finally:
            if held:
                await self.manager.resume(origin)
        try:
            return await self.activate(name, dev_id, md.size_sectors, self.origins[origin])
        except BaseException:
            await self.message("delete %d" % dev_id)
            raise

    async def delete(self, vol) -> None:
        """Remove thin device ``vol`` and free its blocks (``delete`` message)."""
        name = self._name(vol)
        if name not in self.thins:
            raise DMError(errno.ENODEV, "%s is not a thin device of pool %s" % (name, self.name))
        dev_id = self.thins.pop(name)
        self.origins.pop(name, None)
        if name in self.manager.devices:
            await self.manager.remove(name)
        await self.message("delete %d" % dev_id)

    async def close(self) -> None:
        """Remove the thin devices and the pool, keeping the metadata (it can be reopened)."""
        for name in list(self.thins):
            if name in self.manager.devices:
                await self.manager.remove(name)
        self.thins.clear()
        self.origins.clear()
        if self.name in self.manager.devices:
            await self.manager.remove(self.name)


async def create_pool(manager, metadata_path: str, data_path: str, name: str = "pool",
                      block_sectors: int = 128, low_water_blocks: int = 0,
                      features: tuple[str, ...] = ()) -> Pool:
    """A thin-pool device ``name`` over two image files, as long as the data file's whole
    blocks.  An all-zero metadata file is formatted; one with a pool's metadata is reopened
    (its ``block_sectors`` must be the one it was made with: the kernel refuses others)."""
    data_sectors = os.path.getsize(data_path) // 512 // block_sectors * block_sectors
    if data_sectors == 0:
        raise DMError(errno.EINVAL, "data file %s is smaller than one %d-sector block" % (data_path, block_sectors))
    params = "%s %s %d %d" % (metadata_path, data_path, block_sectors, low_water_blocks)
    if features:
        params += " %d %s" % (len(features), " ".join(features))
    manager.create(name)
    try:
        await manager.load(name, [TableLine(0, data_sectors, "thin-pool", params)])
        await manager.resume(name)
    except BaseException:
        await manager.remove(name)
        raise
    return Pool(manager, name, metadata_path, data_path, block_sectors)
