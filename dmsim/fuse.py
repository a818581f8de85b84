"""The FUSE mapping: every mapped device is a regular file ``<mount>/<name>``.

The file's size is the device's (0 without a live table); reads and writes become bios
(unaligned byte ranges are read-modify-written), fsync is a flush, a write at or past
the end gets ENOSPC, size changes and O_TRUNC are ignored as on a block device.  Each
FUSE open is an open of the device (its ``Open count``), so removing an open device
fails with EBUSY.  A suspended device simply holds the request until resume.

Entry and attribute timeouts are zero: names and sizes change under dmsetup's control
(create, remove, rename, a resume with a new table) and the kernel must ask again.
This is the only module that imports pyfuse3.

pyfuse3 3.5 has no fallocate hook, so FALLOC_FL_PUNCH_HOLE (mkfs's discard) gets
EOPNOTSUPP from the kernel; that is harmless for mkfs.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import time

import pyfuse3
import trio
from pyfuse3 import FUSEError

from .bio import SECTOR_SIZE, to_bytes
from .device import MappedDevice
from .errors import DMError
from .manager import Manager

ROOT = pyfuse3.ROOT_INODE
log = logging.getLogger("dmsim.fuse")


def _fuse_error(e: BaseException) -> FUSEError:
    if isinstance(e, DMError):
        return FUSEError(e.errno)
    if isinstance(e, OSError) and e.errno:
        return FUSEError(e.errno)
    log.error("I/O request failed", exc_info=e)
    return FUSEError(errno.EIO)


class DeviceFS(pyfuse3.Operations):
    """The mount's operations over a :class:`Manager`."""

    supports_dot_lookup = True

    def __init__(self, manager: Manager, direct_io: bool = True, keep_cache: bool = False):
        super().__init__()
        self.m = manager
        self.direct_io = direct_io
        self.keep_cache = keep_cache
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.t0_ns = time.time_ns()
        self._next_ino = ROOT + 1
        self._ino_of: dict[MappedDevice, int] = {}
        self._md_of: dict[int, MappedDevice] = {}
        self._next_fh = 1
        self._open: dict[int, MappedDevice] = {}

    # -- inodes ------------------------------------------------------------------------------
    def _ino(self, md: MappedDevice) -> int:
        ino = self._ino_of.get(md)
        if ino is None:
            ino = self._ino_of[md] = self._next_ino
            self._md_of[ino] = md
            self._next_ino += 1
        return ino

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        if inode == ROOT:
            e.st_mode = stat.S_IFDIR | 0o755
            e.st_nlink = 2
            e.st_size = 0
        else:
            md = self._md_of.get(inode)
            if md is None:
                raise FUSEError(errno.ENOENT)
            size = to_bytes(md.size_sectors) if not md.removed else 0
            e.st_mode = stat.S_IFREG | (0o444 if md.read_only else 0o644)
            e.st_nlink = 0 if md.removed else 1
            e.st_size = size
            e.st_blocks = size // 512
            e.st_rdev = os.makedev(*md.devno)
        e.st_ino = inode
        e.st_uid = self.uid
        e.st_gid = self.gid
        e.st_blksize = 4096
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = self.t0_ns
        e.attr_timeout = 0
        e.entry_timeout = 0
        e.generation = 0
        return e

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != ROOT:
            raise FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return self._attr(ROOT)
        md = self.m.devices.get(os.fsdecode(name))
        if md is None:
            raise FUSEError(errno.ENOENT)
        return self._attr(self._ino(md))

    async def forget(self, inode_list):
        for inode, _ in inode_list:
            md = self._md_of.get(inode)
            if md is not None and md.removed and md not in self._open.values():
                del self._md_of[inode]
                del self._ino_of[md]

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        return self._attr(inode)  # a block device: size, mode and times stay

    async def opendir(self, inode, ctx):
        if inode != ROOT:
            raise FUSEError(errno.ENOTDIR)
        return ROOT

    async def readdir(self, fh, start_id, token):
        names = self.m.names()
        for i, name in enumerate(names[start_id:], start_id + 1):
            md = self.m.devices[name]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(self._ino(md)), i):
                break

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = sum(md.size_sectors for md in self.m.devices.values()) // 8
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.m.devices) + 1
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- opens -------------------------------------------------------------------------------
    async def open(self, inode, flags, ctx):
        md = self._md_of.get(inode)
        if md is None or md.removed:
            raise FUSEError(errno.ENXIO)
        try:
            self.m.open(md.name)
        except DMError as e:
            raise FUSEError(e.errno) from None
        fh = self._next_fh
        self._next_fh += 1
        self._open[fh] = md
        return pyfuse3.FileInfo(fh=fh, direct_io=self.direct_io, keep_cache=self.keep_cache)

    async def release(self, fh):
        md = self._open.pop(fh, None)
        if md is not None and not md.removed:
            self.m.close(md)

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        md = self._open.get(fh)
        if md is None:
            raise FUSEError(errno.EBADF)
        try:
            await md.flush()
        except Exception as e:
            raise _fuse_error(e) from None

    # -- I/O ---------------------------------------------------------------------------------
    async def read(self, fh, off, size):
        md = self._open.get(fh)
        if md is None:
            raise FUSEError(errno.EBADF)
        try:
            dev_bytes = to_bytes(md.size_sectors)
            if off >= dev_bytes:
                return b""
            n = min(size, dev_bytes - off)
            if not off % SECTOR_SIZE and not n % SECTOR_SIZE:
                return await md.read(off // SECTOR_SIZE, n // SECTOR_SIZE)
            return await md.pread(off, n)
        except Exception as e:
            raise _fuse_error(e) from None

    async def write(self, fh, off, buf):
        md = self._open.get(fh)
        if md is None:
            raise FUSEError(errno.EBADF)
        try:
            dev_bytes = to_bytes(md.size_sectors)
            if off >= dev_bytes:
                raise FUSEError(errno.ENOSPC)
            n = min(len(buf), dev_bytes - off)
            if n != len(buf):
                buf = memoryview(buf)[:n]
            if not off % SECTOR_SIZE and not n % SECTOR_SIZE:
                await md.write(off // SECTOR_SIZE, buf)
            else:
                await md.pwrite(off, buf)
            return n
        except FUSEError:
            raise
        except Exception as e:
            raise _fuse_error(e) from None


class Mount:
    """One pyfuse3 session (pyfuse3 allows one per process)."""

    def __init__(self, manager: Manager, mount_dir: str, direct_io: bool = True,
                 keep_cache: bool = False, debug: bool = False):
        self.ops = DeviceFS(manager, direct_io=direct_io, keep_cache=keep_cache)
        self.mount_dir = mount_dir
        opts = set(pyfuse3.default_options)
        opts |= {"fsname=dmsim", "subtype=dmsim"}
        if os.getuid() == 0:
            opts.add("allow_other")
        if debug:
            opts.add("debug")
        self.opts = opts
        self.mounted = False

    def mount(self) -> None:
        pyfuse3.init(self.ops, self.mount_dir, self.opts)
        self.mounted = True

    async def run(self) -> None:
        """Serve requests until unmounted from outside or cancelled."""
        await pyfuse3.main(min_tasks=4, max_tasks=256)

    def unmount(self) -> None:
        if self.mounted:
            self.mounted = False
            pyfuse3.close(unmount=True)
