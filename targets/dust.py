"""dust: a device with a list of bad blocks that fail reads (dust 1.0.0).

Table: ``<dev> <offset> <blksz>``

  blksz: block size in bytes, a power of 2, at least 512, at most the target length
  and 1 GiB.

Requests go to ``<dev>`` at ``offset + relative sector`` and are split at every
``blksz`` boundary counted from the target start.  A request's block number is counted
from the start of ``<dev>`` (offset included) and only its first block is checked.
In bypass mode (the initial state, and after ``disable``) all I/O passes.  After
``enable``, reads of a listed block fail with EIO; a write to a listed block fails while
the block's write-fail count is above 0 (decrementing it), otherwise it removes the
block from the list and passes.

Messages: ``addbadblock <block> [<write fail count>]``, ``removebadblock <block>``,
``queryblock <block>``, ``countbadblocks``, ``clearbadblocks``, ``listbadblocks``,
``enable``, ``disable``, ``quiet`` (toggles the add/remove log lines).
Status (info): ``<dev> <fail_read_on_bad_block|bypass> <quiet|verbose>``; table:
``<dev> <offset> <blksz>``.  Kernel: drivers/md/dm-dust.c (v6.1).
"""
from __future__ import annotations

import bisect
import errno
from collections.abc import Sequence

from dmsim.bio import SECTOR_SHIFT, Op
from dmsim.errors import DMError, TargetError

from .base import STATUSTYPE_INFO, STATUSTYPE_TABLE, Target, kstrtouint, passthrough, register, scan_uint

DUST_MAX_BLKSZ_SECTORS = 2097152
@register
class Dust(Target):
    name = "dust"
    version = (1, 0, 0)

    async def ctr(self, args: Sequence[str]) -> None:
        if len(args) != 3:
            raise TargetError("Invalid argument count")
        blksz = kstrtouint(args[2])
        if not blksz:
            raise TargetError("Invalid block size parameter")
        if blksz < 512:
            raise TargetError("Block size must be at least 512")
        if blksz & (blksz - 1):
            raise TargetError("Block size must be a power of 2")
        if blksz >> SECTOR_SHIFT > min(self.len, DUST_MAX_BLKSZ_SECTORS):
            raise TargetError("Block size is too large")
        start = scan_uint(args[1], 64)
        if start is None:
            raise TargetError("Invalid device offset sector")
        try:
            self.dev = self.ctx.get_device(args[0])
        except DMError:
            # dust returns -EINVAL whatever dm_get_device said
            raise TargetError("Device lookup failed") from None
        self.blksz = blksz
        self.sect_per_block = blksz >> SECTOR_SHIFT
        self.sect_per_block_shift = self.sect_per_block.bit_length() - 1
        self.start = start
        self.fail_read_on_bb = False
        self.quiet_mode = False
        #: block -> remaining write-fail count; ``_sorted`` keeps listbadblocks ascending
        self.badblocks: dict[int, int] = {}
        self._sorted: list[int] = []
        self.max_io_len = self.sect_per_block

    def _log(self, msg: str) -> None:
        self.ctx.log("dust: " + msg)

    # -- the bad block list ------------------------------------------------------------------
    def _add(self, block: int, wr_fail_cnt: int) -> None:
        if block in self.badblocks:
            if not self.quiet_mode:
                self._log("dust_add_block: block %d already in badblocklist" % block)
            raise DMError(errno.EINVAL)
        self.badblocks[block] = wr_fail_cnt
        bisect.insort(self._sorted, block)
        if not self.quiet_mode:
            self._log("dust_add_block: badblock added at block %d with write fail count %d"
                      % (block, wr_fail_cnt))

    def _erase(self, block: int) -> None:
        del self.badblocks[block]
        self._sorted.pop(bisect.bisect_left(self._sorted, block))

    def _remove(self, block: int) -> None:
        if block not in self.badblocks:
            if not self.quiet_mode:
                self._log("dust_remove_block: block %d not found in badblocklist" % block)
            raise DMError(errno.EINVAL)
        self._erase(block)
        if not self.quiet_mode:
            self._log("dust_remove_block: badblock removed at block %d" % block)

    # -- I/O -------------------------------------------------------------------------------------
    async def map(self, bio):
        if bio.op is Op.FLUSH and not bio.sectors:
            return await passthrough(self.dev, bio)
        sector = self.start + bio.sector
        if self.fail_read_on_bb:
            block = sector >> self.sect_per_block_shift
            if bio.op is Op.READ:
                if block in self.badblocks:
                    raise DMError(errno.EIO)
            elif block in self.badblocks:
                if self.badblocks[block] > 0:
                    self.badblocks[block] -= 1
                    raise DMError(errno.EIO)
                self._erase(block)
                if not self.quiet_mode:
                    # the kernel divides the already shifted block number again
                    self._log("block %d removed from badblocklist by write" % (block // self.sect_per_block))
        return await passthrough(self.dev, bio, self.start)

    # -- messages ------------------------------------------------------------------------------
    async def message(self, argv):
        """``dust_message``: replies are returned; failures are EINVAL after the kernel's
        log line (if any)."""
        size_blocks = self.dev.size_sectors // self.sect_per_block
        word = argv[0].lower()
        if len(argv) == 1:
            if word in ("addbadblock", "removebadblock", "queryblock"):
                self._log("%s requires an additional argument" % argv[0])
            elif word == "disable":
                self._log("disabling read failures on bad sectors")
                self.fail_read_on_bb = False
                return None
            elif word == "enable":
                self._log("enabling read failures on bad sectors")
                self.fail_read_on_bb = True
                return None
            elif word == "countbadblocks":
                return "countbadblocks: %d badblock(s) found" % len(self.badblocks)
            elif word == "clearbadblocks":
                if not self.badblocks:
                    return "dust_clear_badblocks: no badblocks found"
                self.badblocks.clear()
                self._sorted.clear()
                return "dust_clear_badblocks: badblocks cleared"
            elif word == "quiet":
                self.quiet_mode = not self.quiet_mode
                return None
            elif word == "listbadblocks":
                if not self._sorted:
                    return "No blocks in badblocklist"
                return "".join("%d\n" % b for b in self._sorted)
            else:
                self._log("unrecognized message '%s' received" % argv[0])
            raise DMError(errno.EINVAL)
        if len(argv) == 2:
            block = scan_uint(argv[1], 64)
            if block is None:
                raise DMError(errno.EINVAL)
            if block > size_blocks:
                self._log("selected block value out of range")
                raise DMError(errno.EINVAL)
            if word == "addbadblock":
                self._add(block, 0)
                return None
            if word == "removebadblock":
                self._remove(block)
                return None
            if word == "queryblock":
                found = "found" if block in self.badblocks else "not found"
                return "dust_query_block: block %d %s in badblocklist" % (block, found)
            self._log("unrecognized message '%s' received" % argv[0])
            raise DMError(errno.EINVAL)
        if len(argv) == 3:
            block = scan_uint(argv[1], 64)
            count = scan_uint(argv[2], 32)
            if block is None or count is None:
                raise DMError(errno.EINVAL)
            if count > 255:
                self._log("selected write fail count out of range")
                raise DMError(errno.EINVAL)
            if block > size_blocks:
                self._log("selected block value out of range")
                raise DMError(errno.EINVAL)
            if word == "addbadblock":
                self._add(block, count)
                return None
            self._log("unrecognized message '%s' received" % argv[0])
            raise DMError(errno.EINVAL)
        self._log("invalid number of arguments '%d'" % len(argv))
        raise DMError(errno.EINVAL)

    # -- reporting -------------------------------------------------------------------------------
    def status(self, kind, noflush=False):
        if kind == STATUSTYPE_INFO:
            return "%s %s %s" % (self.dev.ref,
                                 "fail_read_on_bad_block" if self.fail_read_on_bb else "bypass",
                                 "quiet" if self.quiet_mode else "verbose")
        if kind == STATUSTYPE_TABLE:
            return "%s %d %d" % (self.dev.ref, self.start, self.blksz)
        return ""

    def iterate_devices(self):
        return [(self.dev, self.start, self.len)]
