"""striped: a range spread over several devices in chunks, round robin (RAID 0).

Table: ``<#stripes> <chunk size> [<dev> <offset>]{#stripes}``

  #stripes and chunk size (sectors) are ``kstrtouint`` numbers above 0; the target length
  must divide by #stripes, and each stripe's share (the width) by the chunk size; any
  chunk size goes, a power of two or not.  Offsets are ``sscanf %llu`` (they wrap).

Chunk ``c`` of the target (``c = offset // chunk size``) lives on stripe ``c % #stripes``
at ``offset + (c // #stripes) * chunk size`` there.  Requests are split at chunk
boundaries (``max_io_len``), so each goes to one stripe; an empty flush goes to every
stripe.  A failed request (other than EOPNOTSUPP) counts an error on its stripe and raises
a table event while that count is below 15; the error still reaches the caller.
No messages.  Status (info): ``<#stripes> <dev>... 1 <A|D per stripe>`` (``D``: an error
was seen); table: ``<#stripes> <chunk size> [<dev> <offset>]...``.
Kernel: drivers/md/dm-stripe.c (striped 1.6.0 on 6.1).
"""
from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass

from dmsim.bio import Bio, Op
from dmsim.blockdev import BlockDevice
from dmsim.errors import DMError, TargetError

from .base import STATUSTYPE_INFO, STATUSTYPE_TABLE, Target, kstrtouint, register, scan_uint

#: dm-stripe's DM_IO_ERROR_THRESHOLD: errors on a stripe that still raise events
IO_ERROR_THRESHOLD = 15


@dataclass
class Stripe:
    dev: BlockDevice
    physical_start_sector: int
    error_count: int = 0


@register
class Striped(Target):
    name = "striped"
    version = (1, 6, 0)

    async def ctr(self, args: Sequence[str]) -> None:
        if len(args) < 2:
            raise TargetError("Not enough arguments")
        n = kstrtouint(args[0])
        if not n:
            raise TargetError("Invalid stripe count")
        chunk = kstrtouint(args[1])
        if not chunk:
            raise TargetError("Invalid chunk_size")
        if self.len % n:
            raise TargetError("Target length not divisible by number of stripes")
        self.width_sectors = self.len // n
        if self.width_sectors % chunk:
            raise TargetError("Target length not divisible by chunk size")
        if len(args) != 2 + 2 * n:
            raise TargetError("Not enough destinations specified")
        self.chunk_sectors = chunk
        self.max_io_len = chunk
        self.stripes: list[Stripe] = []
        for i in range(n):      # (devices are held by the table, released with it)
            start = scan_uint(args[3 + 2 * i])
            if start is None:
                raise TargetError("Couldn't parse stripe destination")
            try:
                dev = self.ctx.get_device(args[2 + 2 * i])
            except DMError as e:
                raise TargetError("Couldn't parse stripe destination", e.errno) from None
            self.stripes.append(Stripe(dev, start))

    def map_sector(self, sector: int) -> tuple[Stripe, int]:
        """``stripe_map_sector``: the stripe of a target sector and the sector on it."""
        chunk, offset = divmod(sector, self.chunk_sectors)
        row, i = divmod(chunk, len(self.stripes))
        s = self.stripes[i]
        return s, s.physical_start_sector + row * self.chunk_sectors + offset

    async def map(self, bio: Bio):
        if bio.op is Op.FLUSH and not bio.sectors:
            for s in self.stripes:
                await self._io(s, bio)
            return None
        # split at chunks by dm core (max_io_len): the request is inside one chunk
        s, sector = self.map_sector(bio.sector)
        return await self._io(s, bio.remap(sector))

    async def _io(self, s: Stripe, bio: Bio):
        try:
            return await s.dev.submit(bio)
        except DMError as e:
            if e.errno != errno.EOPNOTSUPP:
                self._stripe_error(s.dev)
            raise

    def _stripe_error(self, dev: BlockDevice) -> None:
        """``stripe_end_io``: every stripe on the failed device counts the error."""
        for s in self.stripes:
            if s.dev is dev:
                s.error_count += 1
                if s.error_count < IO_ERROR_THRESHOLD:
                    self.ctx.event()

    def status(self, kind, noflush=False):
        if kind == STATUSTYPE_INFO:
            return "%d %s 1 %s" % (len(self.stripes), " ".join(s.dev.ref for s in self.stripes),
                                   "".join("D" if s.error_count else "A" for s in self.stripes))
        if kind == STATUSTYPE_TABLE:
            return "%d %d" % (len(self.stripes), self.chunk_sectors) + "".join(
                " %s %d" % (s.dev.ref, s.physical_start_sector) for s in self.stripes)
        return ""

    def iterate_devices(self):
        return [(s.dev, s.physical_start_sector, self.width_sectors) for s in self.stripes]
