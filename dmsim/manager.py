"""The device manager: dm core's ioctl interface, in-process.

Every method is one ``DM_*`` ioctl with the kernel's semantics and errnos (see
``shared/spec/tables.md``).  It owns the devices, the shared backing files, the kernel
log, and a nursery for targets' background work.  Formatting as dmsetup prints is
:mod:`dmsim.dmsetup`'s job, not this module's.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import weakref
from dataclasses import dataclass
from typing import Sequence

import trio

from .blockdev import BlockDevice, FileDevice
from .device import MappedDevice
from .errors import DMError, collapse_groups
from .resolve import IMAGE_MAJOR, Mount, Resolved, resolve, resolve_all
from .table import TableLine, build_table, check_limits, split_args

DRIVER_VERSION = (4, 47, 0)
MAX_NAME = 127          # bytes: DM_NAME_LEN with its NUL
MAX_UUID = 128          # bytes: DM_UUID_LEN with its NUL
#: how long a removal (or shutdown) waits for in-flight I/O before destroying the tables
DRAIN_SECONDS = 10.0
#: dm devices stacked at most this deep (dmsim's limit: each level nests the I/O path)
MAX_STACK_DEPTH = 64

pylog = logging.getLogger("dmsim.manager")
#: ``0`` in the environment: image files print by path instead of by number (``1``: numbers)
IMAGE_NUMBERS_ENV = "DMSIM_IMAGE_NUMBERS"


def image_numbers_default() -> bool:
    """Whether image files get device numbers when the caller does not say: yes, unless
    :data:`IMAGE_NUMBERS_ENV` is ``0`` (lvm2's parsers need numbers; paths are the opt-out).
    Any other value than ``0``, ``1`` or empty is a mistake, refused rather than guessed."""
    value = os.environ.get(IMAGE_NUMBERS_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError("%s=%r: use 1 (image files as 240:N, the default) or 0 (as paths)"
                         % (IMAGE_NUMBERS_ENV, value))
    return value != "0"


@dataclass
class DeviceInfo:
    """What ``DM_DEV_STATUS`` returns (plus the table-slot facts dmsetup shows)."""

    name: str
    uuid: str
    major: int
    minor: int
    open_count: int
    event_nr: int
    suspended: bool
    read_only: bool
    live_table: bool
    inactive_table: bool
    deferred_remove: bool
    target_count: int
    #: the gendisk exists (a first table was loaded); dmsetup reads read-ahead from its node
    has_disk: bool = True


class Manager:
    """All mapped devices of one daemon or one test.

    Use :func:`open_manager` (it provides the nursery); ``mount_dir`` lets tables name a
    device by its FUSE path, as ``/dev/mapper/NAME`` and ``253:N`` always can.
    """

    def __init__(self, nursery: trio.Nursery, mount_dir: str | None = None, io_mode: str = "inline",
                 durability: str = "fsync", image_numbers: bool | None = None):
        self.nursery = nursery
        self.mount_dir = os.path.abspath(mount_dir) if mount_dir else None
        self.io_mode = io_mode
        self.durability = durability       # of image files: see dmsim.blockdev
        self.devices: dict[str, MappedDevice] = {}
        self._files: dict[tuple[str, bool], list] = {}   # (realpath, write) -> [dev, refs]
        #: each device's CHS geometry from DM_DEV_SET_GEO (cylinders, heads, sectors, start)
        self.geometries: weakref.WeakKeyDictionary[MappedDevice, tuple[int, int, int, int]] = \
            weakref.WeakKeyDictionary()
        #: image files get device numbers (:meth:`image_devno`), printed where the kernel
        #: prints major:minor; off: their paths.  Default: on, unless ``DMSIM_IMAGE_NUMBERS=0``
        self.image_numbers = image_numbers_default() if image_numbers is None else image_numbers
        self._image_minors: dict[str, int] = {}          # image file -> its IMAGE_MAJOR minor
        self._image_paths: dict[int, str] = {}
        self._log: list[str] = []
        self.log_listeners: list = []
        # async fn(md) run by a flushing suspend after presuspend (dm's lock_fs: a FUSE
        # mount writes back its buffered data for the device there)
        self.lock_fs_hooks: list = []
        self.closed = False
        self.task_failures: list[BaseException] = []
        #: the mount root's (st_dev, st_ino) as last seen from a worker thread
        self.mount_root_id: tuple[int, int] | None = None

    # -- kernel log ---------------------------------------------------------------------------
    def log(self, message: str) -> None:
        line = "device-mapper: " + message
        self._log.append(line)
        del self._log[:-10000]
        for fn in self.log_listeners:
            fn(line)

    def read_log(self) -> list[str]:
        """The log lines since the last call (the dialect's ``klog``)."""
        lines, self._log = self._log, []
        return lines

    # -- lookups ------------------------------------------------------------------------------
    def find(self, name: str) -> MappedDevice:
        md = self.devices.get(name)
        if md is None:
            raise DMError(errno.ENXIO)
        return md

    def find_by_minor(self, minor: int) -> MappedDevice | None:
        for md in self.devices.values():
            if md.minor == minor:
                return md
        return None

    async def resolve_names(self, names: Sequence[str], cwd: str) -> dict[str, Resolved | DMError]:
        """Resolve a table's device names in a worker thread (see :mod:`dmsim.resolve`):
        nothing here waits on our own mount or on a slow path from the Trio thread."""
        from .nbd_client import open_exports  # (NBD URIs: connected before the constructors)

        resolved, root_id = await resolve_all(names, cwd, self.mount_dir, in_thread=self.mount_dir is not None,
                                              images=dict(self._image_paths))
        if root_id is not None:
            self.mount_root_id = root_id
        await open_exports(self, resolved)
        return resolved

    def get_device(self, name: str, write: bool = True, *, holder: MappedDevice | None = None,
                   resolved: Resolved | DMError | None = None, cwd: str | None = None) -> BlockDevice:
        """``dm_get_device``: open (and hold) an underlying device by path or number.

        ``resolved`` is the name's :func:`resolve_names` answer; without it the same
        resolution runs here (it never enters the mount; only a path reaching the mount
        by a way not known yet could wait on it).  ``holder`` is the device whose table
        is being loaded: a table may not map its own device, nor one that maps it
        (EINVAL: a cycle would recurse for ever)."""
        if resolved is None:
            try:
                resolved = resolve(name, cwd or _getcwd(), Mount.of(self.mount_dir, self.mount_root_id),
                                   self._image_paths)
            except DMError as e:
                resolved = e
        if isinstance(resolved, DMError):
            raise DMError(resolved.errno, resolved.message)
        if resolved.kind == "nbd":                 # connected by resolve_names (dmsim.nbd_client)
            from .nbd_client import get_export, own_export
            mine = own_export(self, resolved)
            if mine is None:
                return get_export(self, resolved)
            resolved = mine
        if resolved.kind != "file":
            md = self._dm_of(resolved)
            if holder is not None:
                self._check_acyclic(md, holder)
            md.open_count += 1
            return md
        key = (resolved.path, write)
        entry = self._files.get(key)
        if entry is None:
            dev = FileDevice(resolved.path, read_only=not write, io_mode=self.io_mode,
                             durability=self.durability)
            if self.image_numbers and not dev.is_blockdev:
                dev.devno = self.image_devno(resolved.path)
            entry = self._files[key] = [dev, 0]
        entry[1] += 1
        return entry[0]

    def image_devno(self, path: str) -> tuple[int, int]:
        """The device number of an image file (``path`` symlink-free): one minor of
        :data:`IMAGE_MAJOR` per file, given at its first open and kept while this manager
        lives, so that tables and status print numbers as the kernel does (lvm2's parsers
        need them) and take them back."""
        minor = self._image_minors.get(path)
        if minor is None:
            minor = self._image_minors[path] = len(self._image_minors)
            self._image_paths[minor] = path
        return IMAGE_MAJOR, minor

    def image_files(self) -> dict[tuple[int, int], str]:
        """Every image number given so far and its file."""
        return {(IMAGE_MAJOR, minor): path for minor, path in self._image_paths.items()}

    def image_path(self, number: str | tuple[int, int]) -> str:
        """The image file behind a number that tables and status print (``"240:3"`` or
        ``(240, 3)``): what a test or a script needs to turn output back into files.
        DMError(ENODEV), as a table naming it gets, when no image has that number."""
        if isinstance(number, str):
            major_text, _, minor_text = number.partition(":")
            if not (major_text.isascii() and major_text.isdigit() and minor_text.isascii()
                    and minor_text.isdigit()):
                raise DMError(errno.ENODEV, "%r is not a major:minor device number" % number)
            number = (int(major_text), int(minor_text))
        path = self._image_paths.get(number[1]) if number[0] == IMAGE_MAJOR else None
        if path is None:
            raise DMError(errno.ENODEV, "no image file has the number %d:%d" % tuple(number))
        return path

    def image_ref(self, path: str) -> str:
        """How tables and status print the image file ``path`` once a table opened it:
        ``240:N``, or its symlink-free path when image numbers are off (the expected
        string of a test).  ``path`` is resolved with ``realpath``: call it from tests and
        scripts, never from the daemon's Trio thread with a path into its own mount.
        DMError(ENODEV) for a file no table has opened yet (it has no number)."""
        real = os.path.realpath(path)
        if not self.image_numbers:
            return real
        minor = self._image_minors.get(real)
        if minor is None:
            raise DMError(errno.ENODEV, "%s has no device number yet: no table has opened it" % path)
        return "%d:%d" % (IMAGE_MAJOR, minor)

    def _dm_of(self, r: Resolved) -> MappedDevice:
        """The dm device a resolution names; one that never had a table has no disk yet
        (the kernel adds it at the first load): ENXIO by number, ENODEV by path (no node)."""
        if r.kind == "dm-minor":
            md = self.find_by_minor(r.minor)
            if md is None or not md.has_disk:
                raise DMError(errno.ENXIO)
            return md
        md = self.devices.get(r.name)
        if md is None or not md.has_disk:
            raise DMError(errno.ENODEV)
        return md

    def _check_acyclic(self, md: MappedDevice, holder: MappedDevice) -> None:
        """EINVAL if ``md`` is ``holder`` or stacks on it through any live or inactive
        table (a cycle would recurse for ever), or if the stack through ``holder`` would
        get deeper than :data:`MAX_STACK_DEPTH` (each level nests the I/O path once).
        Iterative: a deep stack must not exhaust Python's stack here either."""
        below = _longest_path(md, _lower_devices, stop=holder)
        if below is None:
            raise DMError(errno.EINVAL)
        above = _longest_path(holder, self._upper_devices)
        if (above or 1) + below > MAX_STACK_DEPTH:
            self.log("table: %s: dm device stack deeper than %d levels" % (holder.mm, MAX_STACK_DEPTH))
            raise DMError(errno.EINVAL)

    def _upper_devices(self, md: MappedDevice) -> list[MappedDevice]:
        return [o for o in self.devices.values() if md in _lower_devices(o)]

    def put_device(self, dev: BlockDevice) -> None:
        if isinstance(dev, MappedDevice):
            dev.open_count -= 1
            self._maybe_deferred_remove(dev)
            return
        for key, entry in list(self._files.items()):
            if entry[0] is dev:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._files[key]
                    dev.close()
                return

    async def kcopyd_client(self, num_pages: int | None = None):
        """A kcopyd client whose worker runs in this manager's nursery."""
        from .kcopyd import KcopydClient

        kc = KcopydClient(num_pages)
        await self.nursery.start(self._guarded, kc.run, "kcopyd worker")
        return kc

    async def _guarded(self, fn, what: str, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run a background ``fn(task_status=...)``; an error in it is :meth:`task_failed`,
        not the end of the manager's nursery (and of every other device)."""
        try:
            await fn(task_status=task_status)
        except Exception as e:
            self.task_failed(e, what)

    def task_failed(self, exc: BaseException, what: str) -> None:
        """A background task died of a bug: log it with its traceback and keep serving;
        :func:`open_manager` raises the first such error when it closes, so that tests
        still see it."""
        pylog.error("%s failed", what, exc_info=exc)
        self.task_failures.append(exc)

    # -- DM_DEV_CREATE ----------------------------------------------------------------------
    def create(self, name: str, uuid: str = "") -> MappedDevice:
        if not name:
            self.log("ioctl: name not supplied when creating device")
            raise DMError(errno.EINVAL)
        self._check_name(name)
        if uuid:
            self._check_uuid(uuid)
        if name in self.devices or (uuid and any(md.uuid == uuid for md in self.devices.values())):
            raise DMError(errno.EBUSY)
        used = {md.minor for md in self.devices.values()}
        minor = next(i for i in range(len(used) + 1) if i not in used)
        md = MappedDevice(self, name, uuid, minor)
        self.devices[name] = md
        return md

    def _check_name(self, name: str) -> None:
        """A name the kernel takes (``check_name``, the ioctl's DM_NAME_LEN), and one a
        FUSE directory and every client can show: no ``/``, NUL, lone surrogate, ``.``
        or ``..``, at most 127 bytes of UTF-8."""
        if "/" in name or name in (".", "..") or _bad_bytes(name) or len(name.encode()) > MAX_NAME:
            self.log("ioctl: invalid device name")
            raise DMError(errno.EINVAL)

    @staticmethod
    def _check_uuid(uuid: str) -> None:
        if _bad_bytes(uuid) or len(uuid.encode()) > MAX_UUID:
            raise DMError(errno.EINVAL)

    # -- DM_TABLE_LOAD / DM_TABLE_CLEAR --------------------------------------------------------
    async def load(self, name: str, lines: Sequence[TableLine], read_only: bool = False,
                   cwd: str | None = None) -> None:
        """``DM_TABLE_LOAD``; relative device paths resolve against ``cwd`` (the caller's:
        the CLI sends it), else this process's working directory."""
        md = self.find(name)
        table = await build_table(md, lines, read_only, cwd or _getcwd())   # destroys a failed table itself
        try:
            if md.live is None:
                try:
                    check_limits(table)
                except DMError:
                    self.log("core: Cannot calculate initial queue limits")
                    self.log("ioctl: unable to set up device queue for new table.")
                    raise
            if md.removed:       # removed while the table was built
                raise DMError(errno.ENXIO)
        except BaseException:
            await table.destroy()
            raise
        old, md.inactive = md.inactive, table
        md.has_disk = True       # dm_setup_md_queue: the disk exists from the first load on
        if old is not None:
            await old.destroy()

    async def clear(self, name: str) -> None:
        md = self.find(name)
        old, md.inactive = md.inactive, None
        if old is not None:
            await old.destroy()

    # -- DM_DEV_SUSPEND ---------------------------------------------------------------------
    async def suspend(self, name: str, noflush: bool = False) -> None:
        md = self.find(name)
        async with md.suspend_lock:
            await self._suspend(md, noflush)

    async def _suspend(self, md: MappedDevice, noflush: bool) -> None:
        """``__dm_suspend``: interruptible until I/O has drained (then undone, as the
        kernel's EINTR path does); the postsuspend hooks after that always run."""
        if md.suspended:
            return
        targets = md.live.targets if md.live else []
        # DMF_NOFLUSH_SUSPENDING is set before presuspend (targets requeue from there)
        md.noflush_suspending = noflush
        try:
            for t in targets:
                await t.presuspend(noflush)
            if not noflush:
                for hook in self.lock_fs_hooks:
                    await hook(md)
            md.block_io()
            await md.wait_drained()
        except BaseException:
            # interrupted (the kernel's EINTR): undo everything, as __dm_suspend does
            md.unblock_io()
            with trio.CancelScope(shield=True):
                for t in targets:
                    await t.presuspend_undo()
            raise
        finally:
            md.noflush_suspending = False
        with trio.CancelScope(shield=True):
            for t in targets:
                await t.postsuspend()

    async def resume(self, name: str, noflush: bool = False) -> None:
        """``do_resume``: swap in the inactive table (suspending first) and resume.

        A cancelled caller (client gone, Ctrl-C, timeout) can interrupt only the suspend;
        the table then goes back to the inactive slot.  From the swap on, everything runs
        to the end, shielded, as the kernel's ioctl does: a half-done resume would keep
        the old table's devices open for good."""
        md = self.find(name)
        async with md.suspend_lock:
            new, md.inactive = md.inactive, None       # taken out of the slot, as the kernel does
            if new is None:
                if not md.suspended:
                    return
                old = None
            else:
                try:
                    if not md.suspended:
                        await self._suspend(md, noflush)
                    check_limits(new)
                except BaseException as e:
                    with trio.CancelScope(shield=True):
                        if isinstance(e, DMError) or md.inactive is not None or md.removed:
                            await new.destroy()            # the kernel drops it (dm_swap_table failed)
                        else:
                            md.inactive = new              # interrupted: nothing happened
                    raise
                old, md.live = md.live, new
                md.live_logical_block_size = new.logical_block_size
            with trio.CancelScope(shield=True):
                try:
                    live = md.live
                    if live is None:
                        raise DMError(errno.EINVAL)
                    for t in live.targets:
                        await t.preresume()
                    md.unblock_io()          # (a device being removed stays dying: no I/O)
                    for t in live.targets:
                        await t.resume()
                finally:
                    # do_resume: the old table is destroyed after the new one resumed (or
                    # failed to), so targets can hand state over in their resume hooks
                    if old is not None:
                        await old.destroy()

    # -- DM_DEV_REMOVE / DM_REMOVE_ALL ------------------------------------------------------------
    async def remove(self, name: str, deferred: bool = False) -> None:
        md = self.find(name)
        if md.open_count > 0:
            if deferred:
                md.deferred_remove = True
                return
            raise DMError(errno.EBUSY)
        await self._destroy(md)

    def _maybe_deferred_remove(self, md: MappedDevice) -> None:
        if md.deferred_remove and md.open_count == 0 and not md.removed:
            self.nursery.start_soon(self._deferred_destroy, md)

    async def _deferred_destroy(self, md: MappedDevice) -> None:
        """A deferred remove runs in the manager's nursery: an error in it is logged,
        never allowed to take the manager (and the daemon) down."""
        try:
            await self._destroy(md)
        except Exception:
            pylog.exception("deferred remove of %s failed", md.name)

    async def _destroy(self, md: MappedDevice) -> None:
        """``__dm_destroy``: unlist the device, fail its held I/O, suspend its live table
        if it runs (presuspend releases what targets hold), let in-flight I/O finish
        (bounded), then destroy both tables (always, even for a cancelled caller)."""
        if md.removed:
            return
        md.removed = True
        del self.devices[md.name]
        if md.live is not None:   # __hash_remove: dm_table_event on the live table
            md.raise_event()
        else:                     # no event, but waiters must notice the removal
            md._event.set()
        md.kill_io()
        deadline = trio.current_time() + DRAIN_SECONDS
        locked = False
        try:
            # md->suspend_lock: a suspend or resume under way finishes first (bounded: a
            # suspend stuck on I/O that never drains does not keep the device for ever)
            with trio.move_on_at(deadline):
                await md.suspend_lock.acquire()
                locked = True
            await self._quiesce(md, deadline)
        finally:
            with trio.CancelScope(shield=True):
                for table in (md.inactive, md.live):
                    if table is not None:
                        await table.destroy()
                md.inactive = md.live = None
            if locked:
                md.suspend_lock.release()

    async def _quiesce(self, md: MappedDevice, deadline: float) -> None:
        """The last suspend of a dying device (after :meth:`MappedDevice.kill_io`): the
        presuspend and postsuspend hooks of a running table, and in-flight I/O drained
        until ``deadline`` (what is still in flight then meets the destructors)."""
        if md.quiesced:
            return
        md.quiesced = True
        table = md.live if not md.suspended else None
        if table is not None:
            for t in table.targets:
                try:
                    await t.presuspend(False)
                except Exception:
                    pylog.exception("%s: presuspend of %s at removal failed", md.mm, t.name)
        with trio.move_on_at(deadline):
            await md.wait_drained()
        if table is not None:
            with trio.CancelScope(shield=True):
                for t in table.targets:
                    try:
                        await t.postsuspend()
                    except Exception:
                        pylog.exception("%s: postsuspend of %s at removal failed", md.mm, t.name)

    async def remove_all(self) -> int:
        """Remove every unopened device, repeating while that frees more; return the number
        of devices left open."""
        while True:
            idle = [md for md in self.devices.values() if md.open_count == 0]
            if not idle:
                break
            for md in idle:
                await self._destroy(md)
        left = len(self.devices)
        if left:
            self.log("ioctl: remove_all left %d open device(s)" % left)
        return left

    # -- DM_DEV_RENAME --------------------------------------------------------------------------
    def rename(self, name: str, new_name: str | None = None, new_uuid: str | None = None) -> None:
        """``DM_DEV_RENAME``: the checks in ``dm_hash_rename``'s order (a taken new name or
        uuid, then a missing device, then a uuid already set), each with its log line."""
        new = new_uuid if new_uuid is not None else new_name
        if not new or _bad_bytes(new) or len(new.encode()) > (MAX_UUID if new_uuid is not None else MAX_NAME):
            self.log("ioctl: Invalid new mapped device name or uuid string supplied.")
            raise DMError(errno.EINVAL)
        if new_uuid is not None:
            self._check_uuid(new_uuid)
        else:
            assert new_name is not None
            self._check_name(new_name)
        what = "uuid" if new_uuid is not None else "name"
        taken = any(o.uuid == new_uuid for o in self.devices.values()) if new_uuid is not None \
            else new in self.devices
        if taken:
            self.log("ioctl: Unable to change %s on mapped device %s to one that already exists: %s"
                     % (what, name, new))
            raise DMError(errno.EBUSY)
        md = self.devices.get(name)
        if md is None:
            self.log("ioctl: Unable to rename non-existent device, %s to %s%s"
                     % (name, "uuid " if new_uuid is not None else "", new))
            raise DMError(errno.ENXIO)
        if new_uuid is not None:
            if md.uuid:
                self.log("ioctl: Unable to change uuid of mapped device %s to %s because uuid is already set to %s"
                         % (md.name, new_uuid, md.uuid))
                raise DMError(errno.EINVAL)
            md.uuid = new_uuid
        else:
            assert new_name is not None
            del self.devices[md.name]
            md.name = new_name
            self.devices[new_name] = md
        md.raise_event()

    # -- DM_DEV_SET_GEO -------------------------------------------------------------------------
    def set_geometry(self, name: str, geometry: str) -> None:
        """``DM_DEV_SET_GEO`` with dmsetup's string ``"cyl heads sectors start"``: parsed
        as the kernel's ``sscanf("%lu %lu %lu %lu%c")``, then its range checks."""
        md = self.find(name)
        values = _parse_geometry(geometry)
        if values is None:
            self.log("ioctl: Unable to interpret geometry settings.")
            raise DMError(errno.EINVAL)
        cylinders, heads, sectors, start_sector = values
        if cylinders > 65535 or heads > 255 or sectors > 255:
            self.log("ioctl: Geometry exceeds range limits.")
            raise DMError(errno.EINVAL)
        if start_sector > cylinders * heads * sectors:
            self.log("core: Start sector is beyond the geometry limits.")
            raise DMError(errno.EINVAL)
        self.geometries[md] = values

    # -- DM_TARGET_MSG ------------------------------------------------------------------------
    async def message(self, name: str, sector: int, message: str) -> str:
        md = self.find(name)
        argv = split_args(message)
        if not argv:
            self.log("ioctl: Empty message received.")
            raise DMError(errno.EINVAL)
        if argv[0].lower() == "@cancel_deferred_remove":
            if not md.deferred_remove:
                raise DMError(errno.ENXIO)
            md.deferred_remove = False
            return ""
        if argv[0].startswith("@"):
            self.log("ioctl: Unsupported message '%s'" % argv[0])
            raise DMError(errno.EINVAL)
        table = md.live
        if table is None:
            self.log("ioctl: The device has no table.")
            raise DMError(errno.EINVAL)
        if sector < 0 or sector >= table.size_sectors:
            self.log("ioctl: Target message sector outside device.")
            raise DMError(errno.EINVAL)
        target = table.find_target(sector)
        if not target.has_messages():
            self.log("ioctl: Target type does not support messages")
            raise DMError(errno.EINVAL)
        reply = await target.message(argv)
        return reply or ""

    # -- DM_DEV_STATUS / DM_TABLE_STATUS / DM_TABLE_DEPS / DM_LIST_DEVICES ---------------------
    def info(self, name: str, inactive: bool = False) -> DeviceInfo:
        return self._info(self.find(name), inactive)

    @staticmethod
    def _info(md: MappedDevice, inactive: bool = False) -> DeviceInfo:
        table = md.inactive if inactive else md.live
        return DeviceInfo(
            name=md.name, uuid=md.uuid, major=md.devno[0], minor=md.minor,
            open_count=md.open_count, event_nr=md.event_nr, suspended=md.suspended,
            read_only=bool(table and table.read_only),
            live_table=md.live is not None, inactive_table=md.inactive is not None,
            deferred_remove=md.deferred_remove,
            target_count=len(table.targets) if table else 0,
            has_disk=md.has_disk,
        )

    def names(self) -> list[str]:
        return sorted(self.devices, key=lambda n: n.encode())

    def table_lines(self, name: str, kind: str = "table", inactive: bool = False,
                    noflush: bool = False) -> list[TableLine] | None:
        """The live (or inactive) table as status or table text; None without a table."""
        md = self.find(name)
        table = md.inactive if inactive else md.live
        return None if table is None else table.lines(kind, noflush)

    def deps(self, name: str, inactive: bool = False) -> list[BlockDevice]:
        md = self.find(name)
        table = md.inactive if inactive else md.live
        return list(table.devices) if table else []

    async def wait(self, name: str, event_nr: int = 0) -> DeviceInfo:
        md = self.find(name)
        await md.wait_event(event_nr)
        return self._info(md)

    @staticmethod
    def versions() -> list[tuple[str, tuple[int, int, int]]]:
        from .targets.base import registered

        return [(cls.name, cls.version) for cls in registered()]

    # -- opens (FUSE files, API handles) ----------------------------------------------------------
    def open(self, name: str) -> MappedDevice:
        md = self.find(name)
        md.open_count += 1
        return md

    def close(self, md: MappedDevice) -> None:
        md.open_count -= 1
        self._maybe_deferred_remove(md)

    async def shutdown(self) -> None:
        """Fail held I/O on every device, let in-flight I/O finish (bounded), then
        destroy every table, stacks top-down.

        Every device is killed and drained before any table goes: an origin write in
        flight still finds its snapshots, and one held by a suspend fails (EIO) instead
        of being let through after the snapshots are gone."""
        self.closed = True
        devices = list(self.devices.values())
        for md in devices:
            md.kill_io()
        deadline = trio.current_time() + DRAIN_SECONDS
        for md in devices:
            await self._quiesce(md, deadline)
        while self.devices:
            idle = [md for md in self.devices.values() if md.open_count == 0] or list(self.devices.values())
            for md in idle:
                md.open_count = 0
                await self._destroy(md)


_GEOMETRY = re.compile(r"\s*([+-]?\d+)\s*([+-]?\d+)\s*([+-]?\d+)\s*([+-]?\d+)")
ULONG_MAX = (1 << 64) - 1


def _parse_geometry(text: str) -> tuple[int, int, int, int] | None:
    """Four ``%lu`` (a sign allowed, a negative value wraps, an overflow saturates at
    ULONG_MAX) and nothing after them, as ``sscanf(..., "%lu %lu %lu %lu%c") == 4``."""
    m = _GEOMETRY.fullmatch(text)
    if m is None:
        return None
    out = []
    for word in m.groups():
        value = int(word)
        if abs(value) > ULONG_MAX:
            value = ULONG_MAX
        out.append(value % (1 << 64))
    return out[0], out[1], out[2], out[3]


def _bad_bytes(text: str) -> bool:
    """A NUL (C strings end there) or a lone surrogate (no UTF-8 form) in ``text``."""
    if "\0" in text:
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _lower_devices(md: MappedDevice) -> list[MappedDevice]:
    """The dm devices ``md``'s live and inactive tables use."""
    out: list[MappedDevice] = []
    for table in (md.live, md.inactive):
        if table is not None:
            out.extend(d for d in table.devices if isinstance(d, MappedDevice) and d not in out)
    return out


def _longest_path(start: MappedDevice, edges, stop: MappedDevice | None = None) -> int | None:
    """Levels on the longest path from ``start`` along ``edges`` (``start`` alone: 1),
    or None if ``stop`` is reachable.  Iterative depth-first search with memo."""
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[MappedDevice, list[MappedDevice] | None]] = [(start, None)]
    while stack:
        node, children = stack.pop()
        if node is stop:
            return None
        if children is None:
            if id(node) in depth:
                continue
            on_path.add(id(node))
            kids = edges(node)
            stack.append((node, kids))
            stack.extend((k, None) for k in kids if id(k) not in depth and id(k) not in on_path)
        else:
            on_path.discard(id(node))
            depth[id(node)] = 1 + max((depth.get(id(k), 0) for k in children), default=0)
    return depth[id(start)]


def _getcwd() -> str:
    try:
        return os.getcwd()
    except OSError:          # removed under us
        return "/"


@contextlib.asynccontextmanager
async def open_manager(mount_dir: str | None = None, io_mode: str = "inline",
                       durability: str = "fsync", image_numbers: bool | None = None):
    """``async with open_manager() as m:`` -- a manager and the nursery it owns."""
    with collapse_groups():
        async with trio.open_nursery() as nursery:
            m = Manager(nursery, mount_dir, io_mode, durability, image_numbers)
            try:
                yield m
            finally:
                with trio.CancelScope(shield=True):
                    await m.shutdown()
                nursery.cancel_scope.cancel()
            if m.task_failures:
                raise m.task_failures[0]
