"""Dirty region logs for the mirror target: ``core`` and ``disk`` (kernel dm-log.c).

Log table arguments (after ``<type> <#args>`` in the mirror line)::

    core <region_size> [sync|nosync]
    disk <log_dev> <region_size> [sync|nosync]

A log keeps three bitsets of ``region_count`` bits (region ``r`` is byte ``r // 8``,
bit ``r % 8``, in 64-bit words as the kernel's little-endian ``unsigned long``s):
*clean* (the set a disk log persists), *sync* (``sync_count`` is its popcount) and
*recovering*.  As in the kernel, setting any bit marks the log "touched_cleaned" and
clearing any bit "touched_dirtied"; a disk log writes itself on ``flush`` only when
touched.

Disk format (byte-for-byte the kernel's): one buffer of
``round_up(1024 + bitset_bytes, logical_block_size)`` bytes at sector 0 of the log
device; ``u32 LE magic 0x4D695272`` (stored ``72 52 69 4d``), ``u32 LE version 2``,
``u64 LE nr_regions``; bytes 16..1023 are written back as read; the clean bitset at
byte 1024.
"""
from __future__ import annotations

import errno
import struct
from typing import Awaitable, Callable, Sequence

from .bio import SECTOR_SHIFT, Bio, to_sectors
from .errors import DMError

MIRROR_MAGIC = 0x4D695272
MIRROR_DISK_VERSION = 2
LOG_OFFSET_SECTORS = 2          # the clean bitset starts at sector 2 (byte 1024)
BITS_PER_LONG = 64
HEADER = struct.Struct("<IIQ")

DEFAULTSYNC, NOSYNC, FORCESYNC = "default", "nosync", "sync"

PREFIX = "dirty region log: "


class DirtyLogError(DMError):
    """The log constructor failed (the mirror reports ``Error creating mirror dirty log``)."""


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class CoreLog:
    """``core``: bitsets in memory only; ``flush`` is a no-op."""

    type_name = "core"

    def __init__(self, ctx, target_len_sectors: int, args: Sequence[str], flush_callback=None):
        self.ctx = ctx
        self.flush_callback: Callable[[], Awaitable[bool]] | None = flush_callback
        self._create_context(target_len_sectors, args)

    # -- construction ---------------------------------------------------------------------
    def _warn(self, msg: str) -> None:
        self.ctx.log(PREFIX + msg)

    def _create_context(self, target_len: int, args: Sequence[str]) -> None:
        """``create_log_context``: parse ``<region_size> [sync|nosync]``."""
        if len(args) < 1 or len(args) > 2:
            self._warn("wrong number of arguments to dirty region log")
            raise DirtyLogError(errno.EINVAL)
        self.sync = DEFAULTSYNC
        if len(args) > 1:
            if args[1] == "sync":
                self.sync = FORCESYNC
            elif args[1] == "nosync":
                self.sync = NOSYNC
            else:
                self._warn("unrecognised sync argument to dirty region log: %s" % args[1])
                raise DirtyLogError(errno.EINVAL)
        word = args[0]
        rs = int(word) if word.isascii() and word.isdigit() else -1
        if not (0 <= rs < (1 << 32)) or rs < 2 or rs > target_len or rs & (rs - 1):
            self._warn("invalid region size %s" % word)
            raise DirtyLogError(errno.EINVAL)
        self.region_size = rs
        self.region_count = -(-target_len // rs)
        self.bitset_bytes = _round_up(self.region_count, BITS_PER_LONG) // 8
        self.touched_dirtied = False
        self.touched_cleaned = False
        self.flush_failed = False
        self.clean_bits = self._alloc_clean(self.bitset_bytes)
        self.clean_bits[:] = b"\xff" * self.bitset_bytes
        fill = b"\xff" if self.sync == NOSYNC else b"\x00"
        self.sync_bits = bytearray(fill * self.bitset_bytes)
        self.sync_count = self.region_count if self.sync == NOSYNC else 0
        self.recovering_bits = bytearray(self.bitset_bytes)
        self.sync_search = 0

    def _alloc_clean(self, nbytes: int):
        return bytearray(nbytes)

    # -- bit helpers (log_set_bit / log_clear_bit touch the log) ----------------------------
    @staticmethod
    def _test(bits, r: int) -> bool:
        return bool(bits[r >> 3] & (1 << (r & 7)))

    def _set(self, bits, r: int) -> None:
        bits[r >> 3] |= 1 << (r & 7)
        self.touched_cleaned = True

    def _clear(self, bits, r: int) -> None:
        bits[r >> 3] &= ~(1 << (r & 7)) & 0xFF
        self.touched_dirtied = True

    # -- the dm_dirty_log_type operations ------------------------------------------------------
    def get_region_size(self) -> int:
        return self.region_size

    def is_clean(self, region: int) -> bool:
        return self._test(self.clean_bits, region)

    def in_sync(self, region: int, block: bool = False) -> bool:
        return self._test(self.sync_bits, region)

    def mark_region(self, region: int) -> None:
        self._clear(self.clean_bits, region)

    def clear_region(self, region: int) -> None:
        if not self.flush_failed:
            self._set(self.clean_bits, region)

    def resync_search_done(self) -> bool:
        """Whether :meth:`get_resync_work` would return None and change nothing (its
        cursor is past the last region: as in the kernel, a region that falls out of
        sync later waits for the next resume)."""
        return self.sync_search >= self.region_count

    def get_resync_work(self) -> int | None:
        """Next region >= the cursor that is out of sync and not recovering."""
        while self.sync_search < self.region_count:
            region = self._next_zero(self.sync_bits, self.sync_search)
            self.sync_search = region + 1
            if region >= self.region_count:
                return None
            if not self._test(self.recovering_bits, region):
                self._set(self.recovering_bits, region)
                return region
        return None

    def _next_zero(self, bits, start: int) -> int:
        n = self.region_count
        r = start
        while r < n:
            byte = bits[r >> 3]
            if byte == 0xFF and not r & 7:
                r += 8
                continue
            if not byte & (1 << (r & 7)):
                return r
            r += 1
        return n

    def set_region_sync(self, region: int, in_sync: bool) -> None:
        self._clear(self.recovering_bits, region)
        if in_sync:
            self._set(self.sync_bits, region)
            self.sync_count += 1
        elif self._test(self.sync_bits, region):
            self.sync_count -= 1
            self._clear(self.sync_bits, region)

    def get_sync_count(self) -> int:
        return self.sync_count

    async def flush(self) -> int:
        return 0

    async def resume(self) -> int:
        self.sync_search = 0
        return 0

    async def postsuspend(self) -> int:
        return 0

    def _sync_word(self) -> str:
        if self.sync == DEFAULTSYNC:
            return ""
        return "nosync " if self.sync == NOSYNC else "sync "

    def status(self, kind: str) -> str:
        if kind == "info":
            return "1 core"
        return "core %d %d %s" % (1 if self.sync == DEFAULTSYNC else 2, self.region_size, self._sync_word())

    def dtr(self) -> None:
        pass


class DiskLog(CoreLog):
    """``disk``: the clean bitset lives in a header+bitset buffer on a log device."""

    type_name = "disk"

    def __init__(self, ctx, target_len_sectors: int, args: Sequence[str], flush_callback=None):
        self.ctx = ctx
        self.flush_callback = flush_callback
        if len(args) < 2 or len(args) > 3:
            self._warn("wrong number of arguments to disk dirty region log")
            raise DirtyLogError(errno.EINVAL)
        try:
            self.log_dev = ctx.get_device(args[0])
        except DMError as e:
            raise DirtyLogError(e.errno) from None
        self.log_dev_failed = False
        self.log_dev_flush_failed = False
        self._create_context(target_len_sectors, args[1:])

    def _alloc_clean(self, nbytes: int):
        lbs = self.log_dev.logical_block_size
        buf_size = _round_up((LOG_OFFSET_SECTORS << SECTOR_SHIFT) + nbytes, lbs)
        if buf_size > (self.log_dev.size_sectors << SECTOR_SHIFT):
            self._warn("log device %s too small: need %d bytes" % (self.log_dev.ref, buf_size))
            raise DirtyLogError(errno.EINVAL)
        self.buf_size = buf_size
        self.disk_header = bytearray(buf_size)
        off = LOG_OFFSET_SECTORS << SECTOR_SHIFT
        self.header_magic = 0
        self.header_version = 0
        self.header_nr_regions = 0
        return memoryview(self.disk_header)[off:off + nbytes]

    # -- I/O --------------------------------------------------------------------------------
    async def _rw_header(self, write: bool) -> bool:
        """Read or write the whole buffer at sector 0; True on success."""
        try:
            if write:
                await self.log_dev.submit(Bio.write(0, bytes(self.disk_header)))
            else:
                data = await self.log_dev.read(0, to_sectors(self.buf_size))
                self.disk_header[:] = data
        except DMError:
            return False
        return True

    async def _flush_header(self) -> bool:
        try:
            await self.log_dev.submit(Bio.flush())
        except DMError:
            return False
        return True

    def _fail_log_device(self) -> None:
        if self.log_dev_failed:
            return
        self.log_dev_failed = True
        self.ctx.event()

    def _header_to_disk(self) -> None:
        HEADER.pack_into(self.disk_header, 0, self.header_magic, self.header_version,
                         self.header_nr_regions)

    async def _read_header(self) -> bool:
        if not await self._rw_header(False):
            return False
        self.header_magic, self.header_version, self.header_nr_regions = \
            HEADER.unpack_from(self.disk_header, 0)
        if self.sync != DEFAULTSYNC or self.header_magic != MIRROR_MAGIC:
            self.header_magic = MIRROR_MAGIC
            self.header_version = MIRROR_DISK_VERSION
            self.header_nr_regions = 0
        if self.header_version == 1:
            self.header_version = 2
        if self.header_version != MIRROR_DISK_VERSION:
            self._warn("incompatible disk log version")
            return False
        return True

    async def resume(self) -> int:
        """``disk_resume``: read the log, reconcile its size, write it back, flush."""
        if not await self._read_header():
            self._warn("%s: Failed to read header on dirty region log device" % self.log_dev.ref)
            self._fail_log_device()
            self.header_nr_regions = 0
        first = min(self.header_nr_regions, self.region_count)
        for r in range(first, self.region_count):
            if self.sync == NOSYNC:
                self._set(self.clean_bits, r)
            else:
                self._clear(self.clean_bits, r)
        r = self.region_count
        while r % BITS_PER_LONG:
            self._clear(self.clean_bits, r)
            r += 1
        self.sync_bits[:] = self.clean_bits
        self.sync_count = sum(bin(b).count("1") for b in bytes(self.clean_bits))
        self.sync_search = 0
        self.header_magic = self.header_magic or MIRROR_MAGIC
        self.header_version = self.header_version or MIRROR_DISK_VERSION
        self.header_nr_regions = self.region_count
        self._header_to_disk()
        ok = await self._rw_header(True)
        if ok:
            ok = await self._flush_header()
            if not ok:
                self.log_dev_flush_failed = True
        if not ok:
            self._warn("%s: Failed to write header on dirty region log device" % self.log_dev.ref)
            self._fail_log_device()
            return -errno.EIO
        return 0

    async def flush(self) -> int:
        """``disk_flush``: write the buffer if anything changed since the last flush.

        Cleaned bits are only recorded after every leg has flushed its cache (the
        mirror's flush callback); if that fails, every region is marked dirty."""
        if not self.touched_cleaned and not self.touched_dirtied:
            return 0
        if self.touched_cleaned and self.flush_callback is not None and await self.flush_callback():
            self.flush_failed = True
            for r in range(self.region_count):
                self._clear(self.clean_bits, r)
        if not await self._rw_header(True):
            self._fail_log_device()
            return -errno.EIO
        if self.touched_dirtied:
            if not await self._flush_header():
                self.log_dev_flush_failed = True
                self._fail_log_device()
                return -errno.EIO
            self.touched_dirtied = False
        self.touched_cleaned = False
        return 0

    async def postsuspend(self) -> int:
        return await self.flush()

    def status(self, kind: str) -> str:
        if kind == "info":
            ch = "F" if self.log_dev_flush_failed else "D" if self.log_dev_failed else "A"
            return "3 disk %s %s" % (self.log_dev.ref, ch)
        return "disk %d %s %d %s" % (2 if self.sync == DEFAULTSYNC else 3, self.log_dev.ref,
                                     self.region_size, self._sync_word())


LOG_TYPES = {"core": CoreLog, "disk": DiskLog}


def create_dirty_log(type_name: str, ctx, target_len_sectors: int, args: Sequence[str],
                     flush_callback=None) -> CoreLog:
    """``dm_dirty_log_create``: look the type up by its exact name and construct it."""
    cls = LOG_TYPES.get(type_name)
    if cls is None:
        ctx.log(PREFIX + 'Module for logging type "%s" not found.' % type_name)
        raise DirtyLogError(errno.EINVAL)
    return cls(ctx, target_len_sectors, args, flush_callback)


def parse_disk_log(image: bytes) -> dict:
    """Decode a disk log image (header fields and the list of clean regions)."""
    magic, version, nr_regions = HEADER.unpack_from(image, 0)
    off = LOG_OFFSET_SECTORS << SECTOR_SHIFT
    clean = [r for r in range(nr_regions) if image[off + (r >> 3)] & (1 << (r & 7))]
    return {"magic": magic, "version": version, "nr_regions": nr_regions, "clean": clean}
