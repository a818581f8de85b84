"""flakey: a device that is periodically unreliable (Debian 6.1 behaviour, flakey 1.5.0).

Table: ``<dev> <offset> <up interval> <down interval> [<#feature args> [<arg>]*]``

  Feature args (at most 6 words on 6.1):
    [drop_writes]
    [error_writes]
    [corrupt_bio_byte <Nth_byte> <direction r|w> <value> <bio_flags>]

The device is *up* for ``up`` seconds, then *down* for ``down`` seconds, counted from
construction (table load).  Up: every request passes through like linear.  Down:

* no feature: every request fails with EIO;
* ``drop_writes``: writes succeed without touching the device, reads pass;
* ``error_writes``: writes fail with EIO, reads pass;
* ``corrupt_bio_byte N w V F``: byte N (1-based) of matching writes is set to V *in the
  caller's buffer* and the write goes on; reads pass.  ``r`` direction: on 6.1 the read
  corruption is never applied (end_io walks an already-consumed iterator), so reads and
  writes just pass.

Status (info) is empty; table prints every item followed by a space (6.1), e.g.
``254:0 0 1 2 6 drop_writes corrupt_bio_byte 32 r 1 0 ``.  No messages.
Kernel: drivers/md/dm-flakey.c (v6.1).
"""
from __future__ import annotations

import errno

import trio

from dmsim.bio import (
    REQ_FUA,
    REQ_IDLE,
    REQ_OP_DISCARD,
    REQ_OP_READ,
    REQ_OP_WRITE,
    REQ_OP_WRITE_ZEROES,
    REQ_PREFLUSH,
    REQ_SYNC,
    Op,
    bi_opf,
)
from dmsim.errors import DMError, TargetError

from .base import STATUSTYPE_TABLE, U32_MAX, Target, passthrough, register, scan_uint

MAX_FEATURE_ARGS = 6          # 6.1 (7 on 6.4, 11 on >= 6.5)

# bi_opf bits as 6.1 defines them live in dmsim.bio; re-exported for the flags mask
__all__ = ["Flakey", "bi_opf", "REQ_OP_READ", "REQ_OP_WRITE", "REQ_OP_DISCARD",
           "REQ_OP_WRITE_ZEROES", "REQ_SYNC", "REQ_IDLE", "REQ_FUA", "REQ_PREFLUSH"]


@register
class Flakey(Target):
    name = "flakey"
    version = (1, 5, 0)

    async def ctr(self, args):
        if len(args) < 4:
            raise TargetError("Invalid argument count")
        self.start_time = trio.current_time()
        devname = args[0]
        offset = scan_uint(args[1], 64)
        if offset is None:
            raise TargetError("Invalid device sector")
        self.start = offset
        # 6.1 reads both intervals with the "up" dm_arg, hence its message for both
        up = scan_uint(args[2], 32)
        if up is None:
            raise TargetError("Invalid up interval")
        down = scan_uint(args[3], 32)
        if down is None:
            raise TargetError("Invalid up interval")
        self.up_interval, self.down_interval = up, down
        if (up + down) & U32_MAX == 0:
            raise TargetError("Total (up + down) interval is zero")
        if up + down > U32_MAX:
            raise TargetError("Interval overflow")
        self.drop_writes = self.error_writes = False
        self.corrupt_bio_byte = 0
        self.corrupt_bio_rw = "r"
        self.corrupt_bio_value = 0
        self.corrupt_bio_flags = 0
        self._parse_features(list(args[4:]))
        try:
            self.dev = self.ctx.get_device(devname)
        except DMError as e:
            raise TargetError("Device lookup failed", e.errno) from None

    def _parse_features(self, words: list[str]) -> None:
        """``parse_features`` of 6.1, including its unsigned ``argc`` arithmetic: words
        beyond the group are ignored, and corrupt_bio_byte may read past the group."""
        if not words:
            return
        argc = scan_uint(words.pop(0), 32)
        if argc is None or argc > MAX_FEATURE_ARGS or argc > len(words):
            raise TargetError("Invalid number of feature args")

        def shift():
            return words.pop(0) if words else None

        def read_arg(lo: int, hi: int, error: str) -> int:
            value = scan_uint(shift(), 32)
            if value is None or not lo <= value <= hi:
                raise TargetError(error)
            return value

        while argc:
            arg_name = shift()
            argc = (argc - 1) & U32_MAX
            if arg_name is None:
                raise TargetError("Insufficient feature arguments")
            word = arg_name.lower()
            if word == "drop_writes":
                if self.drop_writes:
                    raise TargetError("Feature drop_writes duplicated")
                self.drop_writes = True
                if self.error_writes:
                    raise TargetError("Feature drop_writes conflicts with feature error_writes")
                continue
            if word == "error_writes":
                if self.error_writes:
                    raise TargetError("Feature error_writes duplicated")
                self.error_writes = True
                if self.drop_writes:
                    raise TargetError("Feature error_writes conflicts with feature drop_writes")
                continue
            if word == "corrupt_bio_byte":
                if not argc:
                    raise TargetError("Feature corrupt_bio_byte requires parameters")
                self.corrupt_bio_byte = read_arg(1, U32_MAX, "Invalid corrupt bio byte")
                argc = (argc - 1) & U32_MAX
                direction = shift()
                if direction is None:
                    # 6.1 dereferences the missing word (oops); answer as >= 6.16 does
                    raise TargetError("Feature corrupt_bio_byte requires 4 parameters")
                if direction.lower() == "w":
                    self.corrupt_bio_rw = "w"
                elif direction.lower() == "r":
                    self.corrupt_bio_rw = "r"
                else:
                    raise TargetError("Invalid corrupt bio direction (r or w)")
                argc = (argc - 1) & U32_MAX
                self.corrupt_bio_value = read_arg(0, 255, "Invalid corrupt value to write into bio byte (0-255)")
                argc = (argc - 1) & U32_MAX
                self.corrupt_bio_flags = read_arg(0, U32_MAX, "Invalid corrupt bio flags mask")
                argc = (argc - 1) & U32_MAX
                continue
            raise TargetError("Unrecognised flakey feature requested")
        if self.drop_writes and self.corrupt_bio_rw == "w":
            raise TargetError("drop_writes is incompatible with corrupt_bio_byte with the WRITE flag set")
        if self.error_writes and self.corrupt_bio_rw == "w":
            raise TargetError("error_writes is incompatible with corrupt_bio_byte with the WRITE flag set")

    # -- I/O -----------------------------------------------------------------------------
    def is_down(self) -> bool:
        """Down iff the whole seconds since construction fall in the down part."""
        elapsed = int(trio.current_time() - self.start_time) & U32_MAX
        return elapsed % (self.up_interval + self.down_interval) >= self.up_interval

    async def map(self, bio):
        if not self.is_down():
            return await passthrough(self.dev, bio, self.start)
        if bio.op is Op.READ:
            if not (self.corrupt_bio_byte or self.drop_writes or self.error_writes):
                raise DMError(errno.EIO)
            # corrupt_bio_byte ... r is never applied on 6.1 (see module docstring)
            return await passthrough(self.dev, bio, self.start)
        if self.drop_writes:
            return None
        if self.error_writes:
            raise DMError(errno.EIO)
        if self.corrupt_bio_byte:
            if self.corrupt_bio_rw == "w" and self._flags_match(bio):
                bio = self._corrupt(bio)
            return await passthrough(self.dev, bio, self.start)
        raise DMError(errno.EIO)

    def _flags_match(self, bio) -> bool:
        return bi_opf(bio) & self.corrupt_bio_flags == self.corrupt_bio_flags

    def _corrupt(self, bio):
        """Set byte N of the write's data.  The kernel changes the caller's pages, so a
        writable buffer is changed in place; a read-only one is copied first."""
        index = self.corrupt_bio_byte - 1
        if bio.data is None or index >= len(bio.data):
            return bio
        mv = memoryview(bio.data)
        if mv.readonly:
            buf = bytearray(mv)
            buf[index] = self.corrupt_bio_value
            bio = bio.remap(bio.sector)
            bio.data = buf
        else:
            mv.cast("B")[index] = self.corrupt_bio_value
        return bio

    # -- reporting -------------------------------------------------------------------------
    def status(self, kind, noflush=False):
        if kind != STATUSTYPE_TABLE:
            return ""
        out = "%s %d %d %d " % (self.dev.ref, self.start, self.up_interval, self.down_interval)
        out += "%d " % (self.drop_writes + self.error_writes + (5 if self.corrupt_bio_byte else 0))
        if self.drop_writes:
            out += "drop_writes "
        elif self.error_writes:
            out += "error_writes "
        if self.corrupt_bio_byte:
            out += "corrupt_bio_byte %d %s %d %d " % (self.corrupt_bio_byte, self.corrupt_bio_rw,
                                                      self.corrupt_bio_value, self.corrupt_bio_flags)
        return out

    def iterate_devices(self):
        return [(self.dev, self.start, self.len)]
