"""The control interface: dm's ioctls as a small set of async calls.

dmsetup's logic (:mod:`dmsim.dmsetup`) talks to a *control*: :class:`LocalControl`
calls a :class:`~dmsim.manager.Manager` in-process; the daemon's socket client
(:mod:`dmsim.client`) offers the same methods remotely.  Arguments and results are
plain data (:func:`to_wire` / :func:`from_wire` convert them for the socket), errors are
:class:`~dmsim.errors.DMError`.
"""
from __future__ import annotations

import dataclasses
import errno
import os
from dataclasses import dataclass

from .blockdev import FileDevice
from .errors import DMError
from .manager import DRIVER_VERSION, DeviceInfo, Manager
from .table import TableLine

#: the methods a control offers; the socket server dispatches exactly these
METHODS = ("version", "create", "load", "suspend", "resume", "clear", "remove", "remove_all",
           "rename", "message", "info", "names", "table_lines", "deps", "wait", "versions",
           "read_log", "mount_dir", "set_geometry")


@dataclass
class Dep:
    """One underlying device as ``deps`` reports it."""

    major: int | None     # None for a device with no number (an image has one: IMAGE_MAJOR)
    minor: int | None
    name: str             # dm name, or the kernel-style name of a block device / image
    kname: str            # dm-N, loop0, ... (blkdevname)
    ref: str              # how tables print it: major:minor or a path
    path: str | None = None   # the file an image's number stands for (None: a device)


class LocalControl:
    """Controls a manager in the same process."""

    def __init__(self, manager: Manager):
        self.m = manager

    async def version(self) -> str:
        return "%d.%d.%d" % DRIVER_VERSION

    async def create(self, name: str, uuid: str = "") -> DeviceInfo:
        md = self.m.create(name, uuid)
        return self.m.info(md.name)

    async def load(self, name: str, lines: list[TableLine], read_only: bool = False,
                   cwd: str | None = None) -> None:
        """``cwd``: the caller's working directory, for relative device paths (the CLI
        sends its own; without it they resolve against this process's)."""
        if cwd is not None and not os.path.isabs(cwd):
            raise DMError(errno.EINVAL, "cwd must be an absolute path")
        await self.m.load(name, lines, read_only, cwd)

    async def suspend(self, name: str, noflush: bool = False) -> None:
        await self.m.suspend(name, noflush)

    async def resume(self, name: str, noflush: bool = False) -> None:
        await self.m.resume(name, noflush)

    async def clear(self, name: str) -> None:
        await self.m.clear(name)

    async def remove(self, name: str, deferred: bool = False) -> None:
        await self.m.remove(name, deferred)

    async def remove_all(self) -> int:
        return await self.m.remove_all()

    async def rename(self, name: str, new_name: str | None = None, new_uuid: str | None = None) -> None:
        self.m.rename(name, new_name, new_uuid)

    async def set_geometry(self, name: str, geometry: str) -> None:
        """``DM_DEV_SET_GEO``: ``geometry`` is dmsetup's ``"cyl heads sectors start"``."""
        self.m.set_geometry(name, geometry)

    async def message(self, name: str, sector: int, message: str) -> str:
        return await self.m.message(name, sector, message)

    async def info(self, name: str, inactive: bool = False) -> DeviceInfo:
        return self.m.info(name, inactive)

    async def names(self) -> list[str]:
        return self.m.names()

    async def table_lines(self, name: str, kind: str = "table", inactive: bool = False,
                          noflush: bool = False) -> list[TableLine] | None:
        return self.m.table_lines(name, kind, inactive, noflush)

    async def deps(self, name: str, inactive: bool = False) -> list[Dep]:
        out = []
        for dev in self.m.deps(name, inactive):
            major, minor = dev.devno if dev.devno else (None, None)
            path = dev.path if isinstance(dev, FileDevice) and not dev.is_blockdev and dev.devno else None
            out.append(Dep(major, minor, getattr(dev, "name", None) or dev.kname, dev.kname, dev.ref, path))
        return out

    async def wait(self, name: str, event_nr: int = 0) -> DeviceInfo:
        return await self.m.wait(name, event_nr)

    async def versions(self) -> list[tuple[str, tuple[int, int, int]]]:
        return self.m.versions()

    async def read_log(self) -> list[str]:
        return self.m.read_log()

    async def mount_dir(self) -> str | None:
        return self.m.mount_dir


# -- wire form ------------------------------------------------------------------------------
_TYPES = {"DeviceInfo": DeviceInfo, "TableLine": TableLine, "Dep": Dep}


def to_wire(value):
    """Plain JSON-able data; dataclasses become ``{"__type__": name, ...fields}``."""
    if dataclasses.is_dataclass(value):
        d = {"__type__": type(value).__name__}
        d.update({f.name: to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)})
        return d
    if isinstance(value, (list, tuple)):
        return [to_wire(v) for v in value]
    return value


def from_wire(value):
    if isinstance(value, dict):
        kind = value.get("__type__")
        fields = {k: from_wire(v) for k, v in value.items() if k != "__type__"}
        if kind in _TYPES:
            return _TYPES[kind](**fields)
        return fields
    if isinstance(value, list):
        return [from_wire(v) for v in value]
    return value
