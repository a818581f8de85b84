"""The FUSE mapping: every mapped device is a regular file ``<mount>/<name>``.

The file's size is the device's (0 without a live table); reads and writes become bios
(unaligned byte ranges are read-modify-written), fsync is a flush, a write at or past
the end gets ENOSPC, size changes and O_TRUNC are ignored as on a block device.

Like a block device node, each open takes one of two paths.  An ``O_DIRECT`` open gets
FUSE ``direct_io``: each request reaches the device as it was issued (the fast path).
A buffered open goes through the kernel's FUSE page cache (dropped at open, as a block
device's page cache is dropped at last close), so reads arrive as whole pages with
readahead, as the block layer would send them; its writes land in a :class:`BufferCache`
that plays the block device's buffer cache of Linux 6.1: buffers of the largest power of
two <= 4096 bytes dividing the device size, a partial write first reads its buffer, and
dirty buffers are written back one bio per buffer, in order, at fsync (of any open,
O_DIRECT ones too, as blkdev_fsync), at last close, or past ``DIRTY_LIMIT_BYTES``.  (The
FUSE writeback cache would be the obvious tool, but it reads a whole page before any
partial write, ignores the daemon's file size once enabled, and sends fsync's flush
separately; measured against the kernel's recorded outputs it got dust's odd-sized device
and delay's held writes wrong.)  Each FUSE open is an open of the device (its ``Open
count``), so removing an open device fails with EBUSY.  A suspended device simply holds
the request until resume.

Entry and attribute timeouts are zero: names and sizes change under dmsetup's control
(create, remove, rename, a resume with a new table) and the kernel must ask again.
This is the only module that imports pyfuse3.

Files are owned and moded like the kernel's ``/dev/dm-N`` (uid 0, group ``disk``, 0660 for
a root daemon; ``--owner/--group/--mode`` change it); the mount has ``default_permissions``,
so the kernel checks them, also for other users on an ``allow_other`` mount.  Creating,
linking or removing names fails with EACCES, like a ``/dev`` directory the caller cannot
write.  Every operation runs under one last-resort handler (:func:`_guard_operations`): an
unexpected exception fails that request with EIO and logs its traceback, and the session
keeps serving.

Writes reach the device with the ``bi_opf`` flags 6.1's block device gives them (recorded
on the kernel with flakey's corrupt_bio_flags): an O_DIRECT write is REQ_SYNC|REQ_IDLE,
plus REQ_FUA and a following empty flush for an O_DSYNC/O_SYNC open (blkdev_fsync via
generic_write_sync; FUSE sends no fsync for direct_io files, so the daemon adds it);
buffered data is written back REQ_SYNC when an fsync, a last close or a suspend forces it
(WB_SYNC_ALL; an O_DSYNC buffered write arrives here as write + fsync), REQ_BACKGROUND past
the dirty limit; fsync's flush is dm's empty REQ_PREFLUSH.

Writes that reach a device by another path (NBD, the in-process API, a device stacked on
it, kcopyd) go through ``MappedDevice.submit`` like ours, so a device with buffered opens
has a ``write_observer``: any write bio but the cache's own writeback drops the clean
buffers it overlaps (dirty ones are the opener's newer data, written back later, as the
kernel's dirty pages) and, with ``invalidate_kernel_cache`` (off by default: see
:meth:`DeviceFS.invalidator` for why), marks the file's inode for the kernel to drop its page cache.
That invalidation (``pyfuse3.invalidate_inode``) may wait on pages whose reads are waiting
for this daemon, so a worker thread makes it, coalesced per inode, off the request path
(:meth:`DeviceFS.invalidator`, run by :meth:`Mount.run`); it trails the write by a thread
hop.

pyfuse3 3.5 has no fallocate hook, so FALLOC_FL_PUNCH_HOLE (mkfs's discard) gets
EOPNOTSUPP from the kernel; that is harmless for mkfs.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import grp
import inspect
import logging
import os
import stat
import time

import pyfuse3
import trio
from pyfuse3 import FUSEError

from .bio import (
    BACKGROUND_WRITEBACK_FLAGS,
    DIRECT_WRITE_FLAGS,
    SECTOR_SIZE,
    SYNC_WRITEBACK_FLAGS,
    Bio,
    Op,
    to_bytes,
)
from .device import DM_MAJOR, MappedDevice
from .errors import DMError
from .manager import Manager

ROOT = pyfuse3.ROOT_INODE
log = logging.getLogger("dmsim.fuse")


def _errno_of(e: BaseException) -> int | None:
    """The errno an expected failure stands for (None: a bug)."""
    if isinstance(e, FUSEError):
        return e.errno
    if isinstance(e, DMError):
        return e.errno
    if isinstance(e, OSError) and e.errno:
        return e.errno
    return None


def _fuse_error(e: BaseException) -> FUSEError:
    err = _errno_of(e)
    if err is None:
        log.error("I/O request failed", exc_info=e)
        return FUSEError(errno.EIO)
    return FUSEError(err)


#: every pyfuse3 request handler (the ones :class:`DeviceFS` defines get the guard)
OPERATIONS = tuple(n for n, fn in vars(pyfuse3.Operations).items()
                   if not n.startswith("_") and inspect.iscoroutinefunction(fn))


def _last_resort(op):
    """Errors become the request's errno; anything unexpected is logged and answered EIO
    (an exception escaping a handler would end ``pyfuse3.main``, and the daemon with it)."""
    @functools.wraps(op)
    async def guarded(self, *args, **kwargs):
        try:
            return await op(self, *args, **kwargs)
        except Exception as e:
            err = _errno_of(e)
            if err is None:
                log.exception("FUSE %s failed; answering EIO", op.__name__)
                err = errno.EIO
            if op.__name__ == "forget":   # no reply to carry an error
                return None
            raise FUSEError(err) from None

    guarded.last_resort = True
    return guarded


def _guard_operations(cls):
    """Put :func:`_last_resort` around every request handler ``cls`` defines."""
    for name in OPERATIONS:
        fn = cls.__dict__.get(name)
        if fn is not None:
            setattr(cls, name, _last_resort(fn))
    return cls


#: the largest size a file can show (st_size is a signed 64-bit off_t)
MAX_FILE_BYTES = (1 << 63) - SECTOR_SIZE
DEFAULT_MODE = 0o660


def disk_gid() -> int:
    """The ``disk`` group's id (0 where there is none), the group of ``/dev/dm-N``."""
    try:
        return grp.getgrnam("disk").gr_gid
    except KeyError:
        return 0


def fs_name(name: str) -> bytes | None:
    """``name`` as a directory entry, or None if no entry can carry it (a lone surrogate,
    NUL, '/', empty or over 255 bytes: the manager refuses such names, the mount ignores them)."""
    try:
        raw = os.fsencode(name)
    except UnicodeError:
        return None
    if not raw or b"\0" in raw or b"/" in raw or len(raw) > 255 or raw in (b".", b".."):
        return None
    return raw


PAGE_BYTES = 4096
DIRTY_LIMIT_BYTES = 16 << 20          # write back past this much dirty data (balance_dirty_pages)
CLEAN_LIMIT_BYTES = 64 << 20          # forget clean buffers past this much (reclaim)


def buffer_bytes(size_bytes: int, logical_block_bytes: int = SECTOR_SIZE) -> int:
    """The block device's buffer size (``set_init_blocksize``): the largest power of two
    from the logical block size up to a page that divides the device size."""
    bsize = max(logical_block_bytes, SECTOR_SIZE)
    while bsize < PAGE_BYTES and not size_bytes & bsize:
        bsize <<= 1
    return bsize


class WritebackErrors:
    """A device's ``mapping->wb_err`` (errseq): a write error met during writeback is
    reported by the next fsync of every open, O_DIRECT ones included, once each.  Kept as
    long as the device, not only while it has buffered opens: the error of the last
    close's writeback is told to the next opener that nobody told before it (the kernel's
    bdev inode keeps it; recorded on 6.1, see ``test_fuse.py``)."""

    def __init__(self) -> None:
        self.error: int | None = None     # the last writeback error (errseq's value) ...
        self.seq = 0                      # ... and how many there were
        self.seen = True                  # whether an fsync has reported the last one
        self.since: dict[int, int] = {}   # fh -> seq its last fsync reported (f_wb_err)

    def record(self, err: int) -> None:
        """A writeback failed (``mapping_set_error``)."""
        self.error = err
        self.seq += 1
        self.seen = False

    def open_fh(self, fh: int) -> None:
        """``errseq_sample`` at open: errors from here on, and one nobody was told of yet."""
        self.since[fh] = self.seq if self.seen else self.seq - 1

    def close_fh(self, fh: int) -> None:
        self.since.pop(fh, None)

    def check(self, fh: int) -> int | None:
        """``file_check_and_advance_wb_err``: the error of a writeback that failed since
        this open's last fsync (or its open), once per open; every open is told."""
        since = self.since.get(fh, 0)
        if since == self.seq:
            return None
        self.since[fh] = self.seq
        self.seen = True
        return self.error


class BufferCache:
    """One device's buffered-I/O state while it has buffered opens (the bdev page cache).

    The buffer size is fixed at the first buffered open, as the kernel fixes it then.
    ``dirty`` and ``clean`` map buffer index -> bytearray; a write error met during
    writeback goes to the device's :class:`WritebackErrors` (``errors``)."""

    def __init__(self, md: MappedDevice, errors: WritebackErrors | None = None):
        self.md = md
        self.errors = errors if errors is not None else WritebackErrors()
        self.writing: Bio | None = None   # the writeback bio in flight (not a foreign write)
        self.opens = 0
        self.block_bytes = buffer_bytes(to_bytes(md.size_sectors), md.logical_block_size)
        self.dirty: dict[int, bytearray] = {}
        self.clean: dict[int, bytearray] = {}
        self.lock = trio.Lock()           # one buffered write or writeback at a time
        self.syncing = 0                  # fsyncs in progress (suspend's lock_fs waits)
        self.synced = trio.Event()

    def _extent(self, index: int) -> tuple[int, int]:
        """(first sector, sectors) of buffer ``index``, clipped to the device's end."""
        start = index * self.block_bytes
        n = min(self.block_bytes, to_bytes(self.md.size_sectors) - start)
        return start // SECTOR_SIZE, max(n, 0) // SECTOR_SIZE

    def cached(self, index: int):
        buf = self.dirty.get(index)
        return buf if buf is not None else self.clean.get(index)

    async def write(self, off: int, data) -> None:
        bs = self.block_bytes
        data = memoryview(data)
        async with self.lock:
            pos = 0
            while pos < len(data):
                index, skip = divmod(off + pos, bs)
                n = min(bs - skip, len(data) - pos)
                buf = self.cached(index)
                if buf is None:
                    if n == bs:
                        buf = bytearray(bs)
                    else:   # __block_write_begin: a partial write reads the buffer first
                        sector, sectors = self._extent(index)
                        buf = bytearray(await self.md.read(sector, sectors))
                        buf.extend(bytes(bs - len(buf)))
                buf[skip:skip + n] = data[pos:pos + n]
                self.clean.pop(index, None)
                self.dirty[index] = buf
                pos += n
            if len(self.dirty) * bs > DIRTY_LIMIT_BYTES:
                await self._writeback(flags=BACKGROUND_WRITEBACK_FLAGS)

    async def read(self, off: int, n: int) -> bytes:
        """Device data with cached buffers laid over it (uncached runs read as one bio)."""
        if not self.dirty and not self.clean:
            return await self.md.pread(off, n)
        bs = self.block_bytes
        out = bytearray()
        pos = off
        while pos < off + n:
            index, skip = divmod(pos, bs)
            buf = self.cached(index)
            if buf is not None:
                take = min(bs - skip, off + n - pos)
                out += buf[skip:skip + take]
            else:
                end = (index + 1) * bs
                while end < off + n and self.cached(end // bs) is None:
                    end += bs
                take = min(end, off + n) - pos
                out += await self.md.pread(pos, take)
            pos += take
        return bytes(out)

    async def writeback(self, first_byte: int = 0, end_byte: int | None = None) -> None:
        """Write back dirty buffers overlapping the range (all by default), as a data
        integrity writeback (REQ_SYNC)."""
        async with self.lock:
            await self._writeback(first_byte, end_byte)

    def forget(self, first_byte: int, end_byte: int | None) -> None:
        """Drop the clean buffers overlapping ``[first_byte, end_byte)``."""
        bs = self.block_bytes
        if end_byte is not None and (end_byte - first_byte) // bs < len(self.clean):
            for index in range(first_byte // bs, -(-end_byte // bs)):
                self.clean.pop(index, None)
            return
        for index in [i for i in self.clean if _overlaps(i, bs, first_byte, end_byte)]:
            del self.clean[index]

    def device_written(self, bio: Bio) -> bool:
        """A write reached the device: unless it is our own writeback, forget the clean
        buffers it overlaps.  True when the write came from elsewhere."""
        if bio is self.writing or not bio.sectors:
            return False
        self.forget(to_bytes(bio.sector), to_bytes(bio.end_sector))
        return True

    async def _writeback(self, first_byte: int = 0, end_byte: int | None = None,
                         flags: int = SYNC_WRITEBACK_FLAGS) -> None:
        bs = self.block_bytes
        todo = sorted(i for i in self.dirty if _overlaps(i, bs, first_byte, end_byte))
        if not todo:
            return
        # one bio per buffer in index order, as generic_writepages/block_write_full_page
        # submit them; one at a time keeps that order at the targets (snapshot exceptions
        # are allocated in arrival order)
        for index in todo:
            buf = self.dirty.pop(index)
            sector, sectors = self._extent(index)
            try:
                if sectors:
                    bio = self.writing = Bio(Op.WRITE, sector, sectors,
                                             memoryview(buf)[:to_bytes(sectors)], False, flags)
                    await self.md.submit(bio)
            except Exception as e:   # end_buffer_async_write: the error goes to errseq
                self.errors.record(_fuse_error(e).errno)
                continue
            except BaseException:
                # cancelled (a suspend whose caller went: SIGTERM, a client's hangup): the
                # bio may not have reached the disk, so the buffer stays dirty and a later
                # fsync writes it (redirty_page_for_writepage); dropped, that fsync would
                # say yes without it (soak seed 70 chain 8385)
                self.dirty.setdefault(index, buf)
                raise
            finally:
                self.writing = None
            self.clean[index] = buf
        if len(self.clean) * bs > CLEAN_LIMIT_BYTES:
            self.clean.clear()

    async def wait_synced(self) -> None:
        while self.syncing:
            await self.synced.wait()


def _overlaps(index: int, bs: int, first_byte: int, end_byte: int | None) -> bool:
    return (index + 1) * bs > first_byte and (end_byte is None or index * bs < end_byte)


@_guard_operations
class DeviceFS(pyfuse3.Operations):
    """The mount's operations over a :class:`Manager`."""

    supports_dot_lookup = True

    def __init__(self, manager: Manager, direct_io: bool | None = None, keep_cache: bool = False,
                 uid: int | None = None, gid: int | None = None, mode: int = DEFAULT_MODE,
                 invalidate_kernel_cache: bool = False):
        """``direct_io``: None (default) chooses per open like a block device (O_DIRECT or
        buffered, see the module docstring); True makes every open direct; False sends
        every open through the kernel's FUSE page cache, written through (``--page-cache``).
        ``uid``/``gid``/``mode``: the device files' owner, group and permission bits (by
        default the daemon's uid, and group ``disk`` for root, as ``/dev/dm-N``).
        ``invalidate_kernel_cache``: also drop the kernel's page cache of a file whose device
        another path wrote (off by default: see :meth:`invalidator`)."""
        self.invalidate_kernel_cache = invalidate_kernel_cache
        super().__init__()
        self.m = manager
        self.direct_io = direct_io
        self.keep_cache = keep_cache
        self.caches: dict[MappedDevice, BufferCache] = {}
        self._buffered: dict[int, BufferCache] = {}     # fh -> its device's cache
        self._wb_errors: dict[MappedDevice, WritebackErrors] = {}   # as long as the device
        self.inflight = 0                                  # read/write/fsync requests
        manager.lock_fs_hooks.append(self.lock_fs)
        self.uid = os.getuid() if uid is None else uid
        self.gid = (disk_gid() if os.getuid() == 0 else os.getgid()) if gid is None else gid
        self.mode = mode & 0o7777
        self.t0_ns = time.time_ns()
        self._next_ino = ROOT + 1
        self._ino_of: dict[MappedDevice, int] = {}
        self._md_of: dict[int, MappedDevice] = {}
        self._next_fh = 1
        self._open: dict[int, MappedDevice] = {}
        self._dsync_direct: set[int] = set()                 # O_DIRECT fhs with O_DSYNC/O_SYNC
        self._direct_fhs: set[int] = set()                   # fhs opened O_DIRECT
        self._page_cached: dict[MappedDevice, int] = {}      # opens using the kernel page cache
        self._page_cached_fhs: set[int] = set()
        self._own_writes: set[int] = set()                   # ids of --page-cache write bios
        self._stale: set[int] = set()                        # inodes to invalidate
        self._stale_event = trio.Event()
        self.invalidations = 0                               # invalidate_inode calls made
        self._invalidating = False
        self.in_thread = 0                                   # invalidate_inode calls under way

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
            e.st_uid = os.getuid()
            e.st_gid = os.getgid()
        else:
            md = self._md_of.get(inode)
            if md is None:
                raise FUSEError(errno.ENOENT)
            size = min(to_bytes(md.size_sectors), MAX_FILE_BYTES) if not md.removed else 0
            e.st_mode = stat.S_IFREG | (self.mode & ~0o222 if md.read_only else self.mode)
            e.st_nlink = 0 if md.removed else 1
            e.st_size = size
            e.st_blocks = size // 512
            e.st_rdev = os.makedev(DM_MAJOR, md.minor)
            e.st_uid = self.uid
            e.st_gid = self.gid
        e.st_ino = inode
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
                self._wb_errors.pop(md, None)

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        return self._attr(inode)  # a block device: size, mode and times stay

    async def opendir(self, inode, ctx):
        if inode != ROOT:
            raise FUSEError(errno.ENOTDIR)
        return ROOT

    async def readdir(self, fh, start_id, token):
        entries = []
        for name, md in self.m.devices.items():
            raw = fs_name(name)
            if raw is not None:
                entries.append((raw, md))
        entries.sort(key=lambda entry: entry[0])
        for i, (raw, md) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, raw, self._attr(self._ino(md)), i):
                break

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = min(sum(md.size_sectors for md in self.m.devices.values()) // 8, (1 << 64) - 1)
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.m.devices) + 1
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- names are dmsetup's to make: a directory the caller cannot write -------------------
    async def create(self, parent_inode, name, mode, flags, ctx):
        raise FUSEError(errno.EACCES)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise FUSEError(errno.EACCES)

    async def mkdir(self, parent_inode, name, mode, ctx):
        raise FUSEError(errno.EACCES)

    async def symlink(self, parent_inode, name, target, ctx):
        raise FUSEError(errno.EACCES)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise FUSEError(errno.EACCES)

    async def unlink(self, parent_inode, name, ctx):
        raise FUSEError(errno.EACCES)

    async def rmdir(self, parent_inode, name, ctx):
        raise FUSEError(errno.EACCES)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        raise FUSEError(errno.EACCES)

    # -- opens -------------------------------------------------------------------------------
    async def open(self, inode, flags, ctx):
        md = self._md_of.get(inode)
        if md is None or md.removed:
            raise FUSEError(errno.ENXIO)
        self.m.open(md.name)
        fh = self._next_fh
        self._next_fh += 1
        self._open[fh] = md
        errors = self._wb_errors.get(md)
        if errors is None:
            errors = self._wb_errors[md] = WritebackErrors()
        errors.open_fh(fh)
        direct = self.direct_io if self.direct_io is not None else bool(flags & os.O_DIRECT)
        if flags & os.O_DIRECT:
            self._direct_fhs.add(fh)
            if flags & os.O_DSYNC:     # O_SYNC includes the O_DSYNC bit
                self._dsync_direct.add(fh)
        if not direct:                 # the kernel keeps pages of this file: watch for writes
            self._page_cached_fhs.add(fh)
            count = self._page_cached.get(md, 0)
            self._page_cached[md] = count + 1
            if not count:
                md.write_observer = functools.partial(self._device_written, md)
        if self.direct_io is None and not direct:
            cache = self.caches.get(md)
            if cache is None:
                cache = self.caches[md] = BufferCache(md, errors)
            cache.opens += 1
            self._buffered[fh] = cache
        return pyfuse3.FileInfo(fh=fh, direct_io=direct, keep_cache=self.keep_cache)

    def _device_written(self, md: MappedDevice, bio: Bio) -> None:
        """``md.write_observer`` while the kernel may cache its pages (see module doc)."""
        if id(bio) in self._own_writes:
            return
        cache = self.caches.get(md)
        if cache is not None:
            if not cache.device_written(bio):
                return
        elif not bio.sectors:
            return
        ino = self._ino_of.get(md) if self.invalidate_kernel_cache else None
        if ino is not None:
            self._stale.add(ino)
            self._stale_event.set()

    def _page_cache_closed(self, md: MappedDevice) -> None:
        """The last open that may have pages in the kernel's cache went: stop watching."""
        count = self._page_cached.pop(md, 0) - 1
        if count > 0:
            self._page_cached[md] = count
        else:
            md.write_observer = None

    async def invalidator(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Ask the kernel to drop the page cache of inodes whose device was written by
        another path, from a worker thread (the kernel may wait on pages whose reads wait
        for us), one inode at a time, coalescing marks that come meanwhile.

        Only with ``invalidate_kernel_cache``: the kernel does this invalidation in the
        calling thread, waiting in D state on pages that buffered reads and writes hold
        locked while their requests wait for us (also requests still queued in /dev/fuse,
        which no count of ours sees).  Were the daemon SIGKILLed then, that thread keeps
        /dev/fuse open, so the connection is never aborted, the requests never answered,
        and the process never goes (scripts/soak-crash: 2 of 16 SIGKILL trials with
        O_DIRECT and buffered writers on one file).  Off, the daemon's own buffer cache is
        still kept coherent; the kernel's page cache of a buffered open can show data older
        than another path's write until that file is opened again."""
        task_status.started()
        while True:
            await self._stale_event.wait()
            self._stale_event = trio.Event()
            inodes, self._stale = self._stale, set()
            self._invalidating = True
            try:
                for ino in sorted(inodes):
                    try:
                        await trio.to_thread.run_sync(self._invalidate_inode, ino,
                                                      abandon_on_cancel=True)
                    except OSError as e:   # ENOENT: the kernel holds no such inode (no pages)
                        if e.errno != errno.ENOENT:
                            log.warning("invalidating inode %d failed: %s", ino, e)
                    self.invalidations += 1
            finally:
                self._invalidating = False

    def _invalidate_inode(self, ino: int) -> None:
        """(worker thread) ``in_thread`` lets :meth:`Mount.unmount` wait for the call to
        leave libfuse before the session goes."""
        self.in_thread += 1
        try:
            pyfuse3.invalidate_inode(ino, False)
        finally:
            self.in_thread -= 1

    async def invalidations_done(self) -> None:
        """Wait until no invalidation is pending (tests; a write's completion does not
        wait for it)."""
        while self._stale or self._stale_event.is_set() or self._invalidating:
            await trio.sleep(0.001)

    async def release(self, fh):
        md = self._open.pop(fh, None)
        errors = self._wb_errors.get(md) if md is not None else None
        if errors is not None:
            errors.close_fh(fh)
        self._direct_fhs.discard(fh)
        self._dsync_direct.discard(fh)
        cache = self._buffered.pop(fh, None)
        if fh in self._page_cached_fhs:
            self._page_cached_fhs.discard(fh)
            self._page_cache_closed(md)
        if cache is not None:
            cache.opens -= 1
            if not cache.opens:   # last close: sync_blockdev, then kill_bdev
                if self.caches.get(cache.md) is cache:
                    del self.caches[cache.md]
                if not md.removed:
                    await self._writeback_quietly(cache)
        if md is not None and not md.removed:
            self.m.close(md)

    async def _writeback_quietly(self, cache: BufferCache) -> None:
        try:
            await cache.writeback()
        except Exception as e:
            log.warning("writeback of %s failed: %s", cache.md.name, e)

    async def flush(self, fh):
        """close(2): the last buffered close writes back (its errors are not reported)."""
        cache = self._buffered.get(fh)
        if cache is not None and cache.opens == 1 and not cache.md.removed:
            await self._writeback_quietly(cache)

    async def fsync(self, fh, datasync):
        with self._request():
            return await self._fsync(fh)

    async def _fsync(self, fh):
        md = self._open.get(fh)
        if md is None:
            raise FUSEError(errno.EBADF)
        # blkdev_fsync: write back the device's buffers and wait, whichever open dirtied
        # them (an O_DIRECT open's fsync too), report a writeback error since this open's
        # last fsync, then flush
        cache = self._buffered.get(fh)
        if cache is None:
            cache = self.caches.get(md)
        if cache is not None:
            cache.syncing += 1
            if cache.syncing == 1:
                cache.synced = trio.Event()
        try:
            if cache is not None:
                await cache.writeback()
            errors = self._wb_errors.get(md)
            err = errors.check(fh) if errors is not None else None
            if err is not None:
                raise FUSEError(err)
            await md.flush()
        finally:
            if cache is not None:
                cache.syncing -= 1
                if not cache.syncing:
                    cache.synced.set()

    async def lock_fs(self, md: MappedDevice) -> None:
        """Suspend's lock_fs (freeze_bdev -> sync_blockdev): write back the device's dirty
        buffers and let fsyncs under way finish, before dm core blocks I/O."""
        cache = self.caches.get(md)
        if cache is not None:
            await cache.writeback()
            await cache.wait_synced()

    async def sync_all(self) -> None:
        """Write back every device's buffers (daemon shutdown)."""
        for cache in list(self.caches.values()):
            if not cache.md.removed and not cache.md.suspended:
                await self._writeback_quietly(cache)

    # -- I/O ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _request(self):
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    async def quiesce(self, quiet_seconds: float = 0.1, max_seconds: float = 2.0) -> None:
        """Before the session ends (shutdown): answer the I/O requests under way, and the
        retries the kernel sends when they fail (a failed readahead is retried page by
        page), so that none is left unanswered and aborted."""
        with trio.move_on_after(max_seconds):
            quiet_since = trio.current_time()
            while trio.current_time() - quiet_since < quiet_seconds:
                await trio.sleep(0.01)
                if self.inflight:
                    quiet_since = trio.current_time()

    async def read(self, fh, off, size):
        with self._request():
            return await self._read(fh, off, size)

    async def _read(self, fh, off, size):
        md = self._open.get(fh)
        if md is None:
            raise FUSEError(errno.EBADF)
        if md.removed:
            raise FUSEError(errno.ENXIO)
        dev_bytes = to_bytes(md.size_sectors)
        if off >= dev_bytes:
            return b""
        n = min(size, dev_bytes - off)
        cache = self._buffered.get(fh)
        if cache is not None:
            return await cache.read(off, n)
        cache = self.caches.get(md)
        if cache is not None and cache.dirty:   # O_DIRECT: write the range back first
            await cache.writeback(off, off + n)
        if not off % SECTOR_SIZE and not n % SECTOR_SIZE:
            return await md.read(off // SECTOR_SIZE, n // SECTOR_SIZE)
        return await md.pread(off, n)

    async def write(self, fh, off, buf):
        with self._request():
            return await self._write(fh, off, buf)

    async def _write(self, fh, off, buf):
        md = self._open.get(fh)
        if md is None:
            raise FUSEError(errno.EBADF)
        if md.removed:
            raise FUSEError(errno.ENXIO)
        dev_bytes = to_bytes(md.size_sectors)
        if off >= dev_bytes:
            raise FUSEError(errno.ENOSPC)
        n = min(len(buf), dev_bytes - off)
        if n != len(buf):
            buf = memoryview(buf)[:n]
        cache = self._buffered.get(fh)
        if cache is not None:
            await cache.write(off, buf)
            return n
        if fh in self._page_cached_fhs:   # --page-cache: the kernel's pages hold it already
            await self._write_through(md, off, buf)
            return n
        cache = self.caches.get(md)
        if cache is not None and cache.dirty:   # O_DIRECT: write the range back first
            await cache.writeback(off, off + n)
        # (the clean buffers it overlaps go when it completes: md.write_observer)
        if not off % SECTOR_SIZE and not n % SECTOR_SIZE:
            if fh in self._direct_fhs:   # dio_bio_write_op: SYNC|IDLE, FUA for O_DSYNC
                dsync = fh in self._dsync_direct
                await md.submit(Bio(Op.WRITE, off // SECTOR_SIZE, n // SECTOR_SIZE, buf,
                                    dsync, DIRECT_WRITE_FLAGS))
                if dsync:                # generic_write_sync -> blkdev_fsync's flush
                    await md.flush()
            else:
                await md.write(off // SECTOR_SIZE, buf)
        else:
            await md.pwrite(off, buf)
        return n

    async def _write_through(self, md: MappedDevice, off: int, buf) -> None:
        """A write from the kernel's page cache (``--page-cache``): like ``md.pwrite``, but
        the write observer knows the bio as ours and leaves the pages alone."""
        first, end = off // SECTOR_SIZE, -(-(off + len(buf)) // SECTOR_SIZE)
        skip = off - to_bytes(first)
        if skip or len(buf) != to_bytes(end - first):
            data = bytearray(await md.read(first, end - first))
            data[skip:skip + len(buf)] = buf
            buf = data
        bio = Bio(Op.WRITE, first, end - first, buf)
        self._own_writes.add(id(bio))
        try:
            await md.submit(bio)
        finally:
            self._own_writes.discard(id(bio))


class Mount:
    """One pyfuse3 session (pyfuse3 allows one per process)."""

    def __init__(self, manager: Manager, mount_dir: str, direct_io: bool | None = None,
                 keep_cache: bool = False, debug: bool = False, uid: int | None = None,
                 gid: int | None = None, mode: int = DEFAULT_MODE, invalidate_kernel_cache: bool = False):
        self.ops = DeviceFS(manager, direct_io=direct_io, keep_cache=keep_cache, uid=uid, gid=gid, mode=mode,
                            invalidate_kernel_cache=invalidate_kernel_cache)
        self.mount_dir = mount_dir
        opts = set(pyfuse3.default_options)
        # default_permissions: the kernel checks mode and owner (others are refused)
        opts |= {"fsname=dmsim", "subtype=dmsim", "default_permissions"}
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
        """Serve requests until unmounted from outside or cancelled (with the page cache
        invalidator beside them)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.ops.invalidator)
            await pyfuse3.main(min_tasks=4, max_tasks=256)
            nursery.cancel_scope.cancel()

    def unmount(self) -> None:
        if self.mounted:
            self.mounted = False
            # an abandoned invalidation may still be in libfuse: give it a moment (it
            # returns once the kernel has the notification, or fails when the fd closes)
            deadline = time.monotonic() + 1.0
            while self.ops.in_thread and time.monotonic() < deadline:
                time.sleep(0.01)
            pyfuse3.close(unmount=True)
