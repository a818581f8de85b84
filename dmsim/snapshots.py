"""Snapshots from Python: the dmsetup choreography of ``lvcreate -s`` / ``lvconvert --merge``.

::

    async with dmsim.open_manager() as m:
        origin, snap = await take_snapshot(m, "disk.img", "cow.img", name="snap")
        ...                                  # write to origin; snap keeps the old view
        await merge_snapshot(m, "snap")      # put the snapshot's view back into disk.img
"""
from __future__ import annotations

import errno
import os

import trio

from .errors import DMError
from .table import TableLine


def _line(md_size: int, kind: str, params: str) -> list[TableLine]:
    return [TableLine(0, md_size, kind, params)]


def origin_devices(manager, origin_path: str) -> list[str]:
    """The devices whose live table maps ``origin_path`` through ``snapshot-origin`` or
    ``snapshot-merge`` (what the kernel's ``_origins`` hash would find for it)."""
    from .targets.snapshot import Origin, SnapshotMerge

    real = os.path.realpath(origin_path)
    names = []
    for name, md in manager.devices.items():
        for t in md.live.targets if md.live is not None else ():
            dev = t.dev if isinstance(t, Origin) else t.origin if isinstance(t, SnapshotMerge) else None
            if dev is not None and dev.path and os.path.realpath(dev.path) == real:
                names.append(name)
                break
    return names


async def take_snapshot(manager, origin_path: str, cow_path: str, name: str = "snap",
                        origin_name: str | None = None, chunk_sectors: int = 8,
                        store: str = "P"):
    """Create snapshot device ``name`` of ``origin_path`` with its COW on ``cow_path``,
    and the ``snapshot-origin`` device ``origin_name`` (default ``<name>-origin``) to
    write through, unless it exists.  Returns ``(origin_device, snapshot_device)``.

    Every origin device already over ``origin_path`` is suspended around the snapshot's
    creation and resumed after it, as lvm does: the kernel's snapshot-origin takes its
    split boundary (the smallest snapshot chunk) at resume, and an origin resumed
    before its snapshot existed copies out only the first chunk of a multi-chunk
    write.  Suspended ones that were suspended already are left suspended."""
    from .blockdev import FileDevice

    origin_name = origin_name or name + "-origin"
    probe = FileDevice(origin_path, read_only=True)
    size = probe.size_sectors
    probe.close()
    existing = origin_name in manager.devices
    origins = origin_devices(manager, origin_path)
    if existing and origin_name not in origins:
        origins.append(origin_name)
    held = [n for n in origins if not manager.find(n).suspended]
    for n in held:
        await manager.suspend(n)
    try:
        manager.create(name)
        try:
            await manager.load(name, _line(size, "snapshot",
                                           "%s %s %s %d" % (origin_path, cow_path, store, chunk_sectors)))
            await manager.resume(name)
        except BaseException:
            await manager.remove(name)
            raise
        if not existing:
            manager.create(origin_name)
            held.append(origin_name)
            await manager.load(origin_name, _line(size, "snapshot-origin", origin_path))
    finally:
        for n in held:
            await manager.resume(n)
    return manager.find(origin_name), manager.find(name)


async def merge_snapshot(manager, name: str, origin_name: str | None = None, wait: bool = True,
                         poll_seconds: float = 0.01):
    """Merge snapshot ``name`` back into its origin: the origin device's table becomes
    ``snapshot-merge`` (taking the snapshot's exceptions over), the snapshot device is
    removed, and with ``wait`` this returns once the merge is done, leaving the origin
    device as a plain ``snapshot-origin`` again."""
    origin_name = origin_name or name + "-origin"
    snap = manager.find(name).live.targets[0]
    size = manager.find(origin_name).size_sectors
    params = snap.status("table")
    await manager.load(origin_name, _line(size, "snapshot-merge", params))
    await manager.suspend(name)
    await manager.resume(origin_name)
    await manager.remove(name)
    if not wait:
        return manager.find(origin_name)
    while True:
        target = manager.find(origin_name).live.targets[0]
        total, allocated, metadata = target.store.usage()
        if target.merge_failed or not target.valid:
            raise DMError(errno.EIO, "snapshot merge failed: %s" % target.status("info"))
        if allocated == metadata:
            break
        if target.merge_running:
            await target.wait_merge_stopped()
        else:
            await trio.sleep(poll_seconds)          # suspended meanwhile: look again later
    origin_path = target.origin.path or target.origin.ref
    await manager.load(origin_name, _line(size, "snapshot-origin", origin_path))
    await manager.resume(origin_name)
    return manager.find(origin_name)
