"""Backing block devices: image files, real block devices, memory.

A :class:`BlockDevice` takes :class:`~dmsim.bio.Bio` requests in sectors.  The file
layer here and the FUSE layer are the only places that speak bytes.

File I/O runs inline on the Trio thread by default: measured by ``scripts/bench``
(see README), an ``os.pread`` of 1 MiB from the page cache costs less than a
``trio.to_thread`` hand-off, and 4 KiB requests are 3-6x faster inline.  ``fsync`` is the
exception: it can take milliseconds to seconds, so it always goes through a thread
(:mod:`dmsim.syncthread`, a cheaper hand-off than ``trio.to_thread``).

Durability (``FileDevice(durability=...)``): ``"fsync"`` (the default) makes a FLUSH an
``fdatasync`` of the file (data plus the metadata needed to read it back: what
REQ_PREFLUSH promises; fsync would also write timestamps) and a FUA write a write
followed by ``fdatasync``: acknowledged data survives a power loss.  ``"process"``
makes FLUSH and FUA no-ops: a completed ``pwrite`` is in the kernel's page cache, which
outlives the process, so every acknowledged write still survives a crash or SIGKILL of
the daemon and any order of writes is seen in order by later readers -- but not a
power loss or kernel crash (like qemu's ``cache=unsafe``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import threading
from typing import Awaitable

import trio

from . import syncthread
from .bio import REQ_SYNC, SECTOR_SHIFT, SECTOR_SIZE, Bio, Op, to_bytes, to_sectors
from .errors import DMError

#: copy_to uses copy_file_range only where the destination is aligned to the copy's
#: size (up to this), see FileDevice._copy_through_buffer
_ALIGNED_COPY_BYTES = 1 << 20
#: from this size on splice beats copy_file_range even at aligned offsets (measured, ext4,
#: fresh destination, per copy: 256 KiB 150 vs 160 us, 1 MiB 534 vs 664 us; 512 MiB in
#: 512 KiB copies 0.216 vs 0.259 s, cp 0.266 s); below it copy_file_range (one syscall)
#: is as fast or faster (4 KiB 9.3 vs 10.0 us, 64 KiB 40 vs 44 us)
_SPLICE_MIN_BYTES = 256 << 10
_copy_buffer: bytearray | None = None
_splice = threading.local()     # .pipe: (read fd, write fd) of 1 MiB, or False: no splice
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = None


def _punch_hole(fd: int, offset: int, length: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class BlockDevice:
    """Something that takes bios.  Subclasses implement :meth:`submit`.

    ``size_sectors`` is the device size, ``logical_block_size`` in bytes.  ``ref`` is how
    tables print the device (``major:minor`` or a path); ``kname`` is the short name the
    kernel uses in log lines (``vda``, ``dm-0``, ``loop0``).
    """

    size_sectors: int = 0
    logical_block_size: int = SECTOR_SIZE
    read_only: bool = False
    devno: tuple[int, int] | None = None
    path: str | None = None
    kname: str = "?"

    @property
    def ref(self) -> str:
        if self.devno is not None:
            return "%d:%d" % self.devno
        return self.path or self.kname

    async def submit(self, bio: Bio):
        raise NotImplementedError

    # conveniences in sectors
    async def read(self, sector: int, sectors: int) -> bytes:
        return await self.submit(Bio.read(sector, sectors))

    async def write(self, sector: int, data, fua: bool = False) -> None:
        await self.submit(Bio.write(sector, data, fua))

    async def flush(self) -> None:
        await self.submit(Bio.flush())

    async def discard(self, sector: int, sectors: int) -> None:
        await self.submit(Bio(Op.DISCARD, sector, sectors))

    async def write_preflush_fua(self, sector: int, data) -> None:
        """A ``REQ_PREFLUSH | REQ_FUA`` write (a snapshot's exception area): what was
        written before is durable before this write is, and this one is on return.
        dm core turns the preflush into an empty flush ahead of the write, as here."""
        rest = self.preflush_fua_write(sector, data)
        if rest is not None:
            await rest

    def preflush_fua_write(self, sector: int, data) -> Awaitable[None] | None:
        """:meth:`write_preflush_fua` as a plain call: done on return (None) where the
        device's I/O is at once, else what is left to await.  ``data`` is not copied
        before the write ends: the caller keeps it unchanged until then."""
        return self._flush_then_fua_write(sector, data)

    def write_plain(self, sector: int, data, fua: bool = False, flags: int = 0) -> Awaitable[None] | None:
        """A write of ``data`` at ``sector`` as a plain call: done on return (None) where
        the device's I/O is at once, else what is left to await (here: :meth:`submit`'s
        coroutine).  A target's at-once mode writes through it: no request object, no
        coroutine, for a write that can't wait anyway."""
        return self.submit(Bio(Op.WRITE, sector, to_sectors(len(data)), data, fua, flags))

    async def _flush_then_fua_write(self, sector: int, data) -> None:
        # sync dm-io, as 6.1's area_io: below dm core an empty flush, then WRITE|FUA|SYNC
        await self.flush()
        await self.submit(Bio(Op.WRITE, sector, to_sectors(len(data)), data, True, REQ_SYNC))

    #: whether :meth:`submit` and :meth:`write_preflush_fua` finish without a scheduling
    #: point (no other task runs meanwhile): a snapshot's copy-out then needs no shield
    io_at_once = False

    def check_bounds(self, bio: Bio) -> None:
        if bio.sectors and (bio.sector < 0 or bio.end_sector > self.size_sectors):
            raise DMError(errno.EIO, "access beyond end of device")
        if bio.data is not None and len(bio.data) != to_bytes(bio.sectors):
            raise DMError(errno.EINVAL, "bio data length does not match its sector count")


def _splice_pipe():
    pipe = getattr(_splice, "pipe", None)
    if pipe is None:
        pipe = False
        if hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ"):
            r, w = os.pipe2(os.O_CLOEXEC)
            try:
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _ALIGNED_COPY_BYTES)
                pipe = (r, w)
            except OSError:
                os.close(r)
                os.close(w)
        _splice.pipe = pipe
    return pipe


def _drop_splice_pipe() -> None:
    pipe = getattr(_splice, "pipe", None)
    if pipe:
        os.close(pipe[0])
        os.close(pipe[1])
    _splice.pipe = None


def _splice_copy(fd_in: int, fd_out: int, off_in: int, off_out: int, left: int) -> bool:
    """Copy through a 1 MiB pipe with ``splice``: the source's page-cache pages go into
    the pipe by reference and are copied once, into writes of up to 1 MiB.  Measured
    (32 MiB as 1 MiB runs at a snapshot COW's offsets, into a fresh sparse file): 15 ms
    against 22 ms for ``copy_file_range`` and 33 ms for pread + pwrite (two copies),
    and the COW reads back as fast as after pwrite (large folios), where
    ``copy_file_range``'s page-sized writes leave small ones.  False when splice is not
    available for these files (the caller copies the whole range another way); I/O
    errors raise DMError."""
    pipe = _splice_pipe()
    if not pipe:
        return False
    r, w = pipe
    try:
        while left:
            got = os.splice(fd_in, w, min(left, _ALIGNED_COPY_BYTES), offset_src=off_in)
            if got <= 0:
                raise OSError(errno.EIO, "short read")
            off_in += got
            left -= got
            while got:
                put = os.splice(r, fd_out, got, offset_dst=off_out)
                off_out += put
                got -= put
    except OSError as e:
        _drop_splice_pipe()          # it may hold data now
        if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            return False
        raise DMError(e.errno or errno.EIO) from None
    return True


class FileDevice(BlockDevice):
    """An image file or a real block device opened by path."""

    def __init__(self, path: str, read_only: bool = False, io_mode: str = "inline",
                 durability: str = "fsync"):
        if durability not in ("fsync", "process"):
            raise ValueError("durability must be 'fsync' or 'process'")
        self.path = os.path.abspath(path)
        self.read_only = read_only
        self.io_mode = io_mode
        self.sync = durability == "fsync"
        self.io_at_once = not self.sync and io_mode == "inline"     # plain calls, never a sync
        flags = os.O_RDONLY if read_only else os.O_RDWR
        try:
            self.fd = os.open(self.path, flags | os.O_CLOEXEC)
        except OSError as e:
            raise DMError(e.errno or errno.EIO, "Device lookup failed") from None
        st = os.fstat(self.fd)
        self.is_blockdev = stat.S_ISBLK(st.st_mode)
        if self.is_blockdev:
            self.devno = (os.major(st.st_rdev), os.minor(st.st_rdev))
            size_bytes = os.lseek(self.fd, 0, os.SEEK_END)
            self.kname = os.path.basename(os.path.realpath(self.path))
        elif stat.S_ISREG(st.st_mode):
            size_bytes = st.st_size
            self.kname = os.path.basename(self.path)
        else:
            os.close(self.fd)
            raise DMError(errno.ENOTBLK, "Device lookup failed")
        self.size_sectors = to_sectors(size_bytes)
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def _read(self, off: int, n: int) -> bytes:
        data = os.pread(self.fd, n, off)
        if len(data) < n:  # a file shorter than its sector count (not a whole sector)
            data += bytes(n - len(data))
        return data

    def _read_into(self, off: int, buf):
        """Fill ``buf`` in place (``preadv``: no intermediate bytes object)."""
        mv = memoryview(buf)
        done = 0
        while done < len(mv):
            got = os.preadv(self.fd, [mv[done:]], off + done)
            if not got:         # past the end of a file shorter than its sector count
                mv[done:] = bytes(len(mv) - done)
                break
            done += got
        return buf

    def _write(self, off: int, data) -> None:
        mv = memoryview(data)
        while mv:
            done = os.pwrite(self.fd, mv, off)
            mv = mv[done:]
            off += done

    def _discard(self, off: int, n: int) -> None:
        if self.is_blockdev:
            import fcntl
            import struct
            BLKDISCARD = 0x1277
            fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", off, n))
        else:
            _punch_hole(self.fd, off, n)

    def _zero(self, off: int, n: int) -> None:
        try:
            self._discard(off, n)
        except OSError:
            self._write(off, bytes(n))

    def can_copy_to(self, dst: "BlockDevice", in_thread: bool = False) -> bool:
        """Whether :meth:`copy_to` may move data from here to ``dst`` inside the kernel:
        as a plain call (both files doing inline I/O), or with ``in_thread`` from a
        worker thread (either doing thread I/O: a call that blocks the loop is what
        thread I/O promises not to make)."""
        if not (isinstance(dst, FileDevice) and not dst.read_only and not self.closed and not dst.closed):
            return False
        inline = self.io_mode == "inline" and dst.io_mode == "inline"
        return not inline if in_thread else inline

    def copy_to(self, dst: "FileDevice", src_sector: int, dst_sector: int, sectors: int) -> None:
        """Copy sectors to another file inside the kernel (kcopyd's fast path): splice
        through a pipe for large or misaligned copies, ``copy_file_range`` for small
        aligned ones (see :data:`_SPLICE_MIN_BYTES`), a buffer where neither works."""
        if src_sector + sectors > self.size_sectors or dst_sector + sectors > dst.size_sectors:
            raise DMError(errno.EIO, "access beyond end of device")
        # (bytes by multiplication, and one modulo: 3.11 runs +, -, * and compares on
        # ints specialised, not shifts, % or calls; a snapshot's every copy-out is here)
        off_in, off_out, left = src_sector * SECTOR_SIZE, dst_sector * SECTOR_SIZE, sectors * SECTOR_SIZE
        misaligned = off_out % (left if left < _ALIGNED_COPY_BYTES else _ALIGNED_COPY_BYTES)
        if misaligned or left >= _SPLICE_MIN_BYTES:
            if _splice_copy(self.fd, dst.fd, off_in, off_out, left):
                return None
            if misaligned:
                return self._copy_through_buffer(dst, off_in, off_out, left)
        try:
            while left:
                n = os.copy_file_range(self.fd, dst.fd, left, off_in, off_out)
                if n <= 0:
                    raise OSError(errno.EIO, "short copy")
                off_in += n
                off_out += n
                left -= n
        except OSError as e:
            raise DMError(e.errno or errno.EIO) from None

    def _copy_through_buffer(self, dst: "FileDevice", off_in: int, off_out: int, left: int) -> None:
        """``copy_to`` for a destination not aligned to the copy's size where
        :func:`_splice_copy` can't run: pread + pwrite through one reused buffer.
        ``copy_file_range`` there leaves the destination's page cache in small folios,
        and reading it back is ~40% slower (measured: 32 MiB copied as 1 MiB runs at a
        snapshot COW's offsets, read back in 6.5 ms against 4.7 ms when written with
        pwrite); a snapshot's COW is read back all the time."""
        global _copy_buffer
        if _copy_buffer is None:
            _copy_buffer = bytearray(_ALIGNED_COPY_BYTES)
        mv = memoryview(_copy_buffer)
        try:
            while left:
                n = min(left, len(mv))
                got = os.preadv(self.fd, [mv[:n]], off_in)
                if got < n:
                    raise OSError(errno.EIO, "short read")
                out = mv[:n]
                while out:
                    done = os.pwrite(dst.fd, out, off_out + n - len(out))
                    out = out[done:]
                off_in += n
                off_out += n
                left -= n
        except OSError as e:
            raise DMError(e.errno or errno.EIO) from None

    def _sync_write_sync(self, off: int, data) -> None:
        os.fdatasync(self.fd)
        self._write(off, data)
        os.fdatasync(self.fd)

    def preflush_fua_write(self, sector: int, data) -> Awaitable[None] | None:
        """Flush, write, sync in one thread hand-off when syncing (a hand-off costs
        150-450 us here, the syncs themselves 0.2-2 ms); a plain write, done on return,
        when the I/O is at once (no sync, inline)."""
        if self.io_at_once:
            return self.write_plain(sector, data)
        if sector < 0 or sector + (len(data) >> SECTOR_SHIFT) > self.size_sectors:
            raise DMError(errno.EIO, "access beyond end of device")
        if self.read_only:
            raise DMError(errno.EPERM, "write to read-only device")
        return self._preflush_fua_in_thread(sector, data)

    def write_plain(self, sector: int, data, fua: bool = False, flags: int = 0) -> Awaitable[None] | None:
        """At once (no sync, inline I/O), the write itself, done on return: FUA and the
        flags ask for nothing more of a file that is never synced; else :meth:`submit`."""
        if not self.io_at_once:
            return self.submit(Bio(Op.WRITE, sector, to_sectors(len(data)), data, fua, flags))
        if sector < 0 or sector + (len(data) >> SECTOR_SHIFT) > self.size_sectors:
            raise DMError(errno.EIO, "access beyond end of device")
        if self.read_only:
            raise DMError(errno.EPERM, "write to read-only device")
        try:
            self._write(sector << SECTOR_SHIFT, data)
        except OSError as e:
            raise DMError(e.errno or errno.EIO) from None
        return None

    async def _preflush_fua_in_thread(self, sector: int, data) -> None:
        try:
            await syncthread.run_sync(self._sync_write_sync if self.sync else self._write,
                                      to_bytes(sector), data)
        except OSError as e:
            raise DMError(e.errno or errno.EIO) from None

    async def _call(self, fn, *args):
        if self.io_mode == "thread":
            return await syncthread.run_sync(fn, *args)
        return fn(*args)

    async def submit(self, bio: Bio):
        self.check_bounds(bio)
        off = to_bytes(bio.sector)
        n = to_bytes(bio.sectors)
        try:
            if bio.op is Op.READ:
                if bio.data is not None:
                    return await self._call(self._read_into, off, bio.data)
                return await self._call(self._read, off, n)
            if self.read_only:
                raise DMError(errno.EPERM, "write to read-only device")
            if bio.op is Op.WRITE:
                await self._call(self._write, off, bio.data)
                if bio.fua and self.sync:
                    await syncthread.run_sync(os.fdatasync, self.fd)
            elif bio.op is Op.FLUSH:
                if self.sync:
                    await syncthread.run_sync(os.fdatasync, self.fd)
            elif bio.op is Op.DISCARD:
                await self._call(self._discard, off, n)
            elif bio.op is Op.WRITE_ZEROES:
                await self._call(self._zero, off, n)
        except OSError as e:
            raise DMError(e.errno or errno.EIO) from None
        return None


class MemoryDevice(BlockDevice):
    """A device in memory, for tests and in-process users (no file at all)."""

    def __init__(self, size_sectors: int, data: bytes | None = None, name: str = "mem"):
        self.size_sectors = size_sectors
        self.buf = bytearray(to_bytes(size_sectors))
        if data:
            self.buf[:len(data)] = data
        self.kname = name
        self.path = None

    @property
    def ref(self) -> str:
        return "mem:%s" % self.kname

    async def submit(self, bio: Bio):
        self.check_bounds(bio)
        off, n = to_bytes(bio.sector), to_bytes(bio.sectors)
        await trio.lowlevel.checkpoint()
        if bio.op is Op.READ:
            if bio.data is not None:
                memoryview(bio.data)[:] = memoryview(self.buf)[off:off + n]
                return bio.data
            return bytes(self.buf[off:off + n])
        if self.read_only:
            raise DMError(errno.EPERM, "write to read-only device")
        if bio.op is Op.WRITE:
            self.buf[off:off + n] = bio.data if bio.data is not None else bytes(n)
        elif bio.op in (Op.DISCARD, Op.WRITE_ZEROES):
            self.buf[off:off + n] = bytes(n)
        return None
