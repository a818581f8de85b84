#!/usr/bin/env python3
"""The FUSE performance reference: one file, MOUNT/disk, passed straight to IMAGE.

    bench/passthrough.py IMAGE MOUNT [--direct-io] [--keep-cache]

Reads and writes are ``os.pread``/``os.pwrite`` on the Trio thread: no Python FUSE block
device can do much better, so ``scripts/bench-fuse`` reports dmsim as a ratio of this.
Block-device semantics: fixed size, writes at the end get ENOSPC.  Prints ``ready`` once
mounted; SIGTERM/SIGINT unmount.
"""
import argparse
import errno
import os
import signal
import stat

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE
DISK = ROOT + 1


class Passthrough(pyfuse3.Operations):
    def __init__(self, image, direct_io, keep_cache):
        super().__init__()
        self.fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size
        self.direct_io = direct_io
        self.keep_cache = keep_cache

    def _attr(self, inode):
        e = pyfuse3.EntryAttributes()
        if inode == ROOT:
            e.st_mode, e.st_nlink = stat.S_IFDIR | 0o755, 2
        elif inode == DISK:
            e.st_mode, e.st_nlink, e.st_size = stat.S_IFREG | 0o644, 1, self.size
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        e.st_ino = inode
        e.st_blksize = 4096
        e.attr_timeout = e.entry_timeout = 0
        return e

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == ROOT and name == b"disk":
            return self._attr(DISK)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def setattr(self, inode, attr, fields, fh, ctx):
        return self._attr(inode)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, b"disk", self._attr(DISK), 1)

    async def open(self, inode, flags, ctx):
        if inode != DISK:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=DISK, direct_io=self.direct_io, keep_cache=self.keep_cache)

    async def read(self, fh, off, size):
        return os.pread(self.fd, size, off)

    async def write(self, fh, off, buf):
        if off >= self.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        return os.pwrite(self.fd, memoryview(buf)[: self.size - off], off)

    async def fsync(self, fh, datasync):
        await trio.to_thread.run_sync(os.fsync, self.fd)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("image")
    p.add_argument("mount")
    p.add_argument("--direct-io", action="store_true")
    p.add_argument("--keep-cache", action="store_true")
    a = p.parse_args()
    ops = Passthrough(a.image, a.direct_io, a.keep_cache)
    pyfuse3.init(ops, a.mount, {"fsname=passthrough", "default_permissions"})

    async def run():
        async with trio.open_nursery() as n:
            async def on_signal():
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                    print("ready", flush=True)
                    async for _ in sigs:
                        n.cancel_scope.cancel()

            n.start_soon(on_signal)
            await pyfuse3.main()
            n.cancel_scope.cancel()

    try:
        trio.run(run)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
