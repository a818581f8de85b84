"""zero: reads return zeros, writes are dropped.

Table: no arguments.

Like the 6.1 kernel's dm-zero 1.1.0: discards fail, everything else succeeds.
No status.  Kernel: drivers/md/dm-zero.c.
"""
import errno

from dmsim.bio import Op, to_bytes
from dmsim.errors import DMError, TargetError

from .base import Target, register


@register
class Zero(Target):
    name = "zero"
    version = (1, 1, 0)

    async def ctr(self, args):
        if args:
            raise TargetError("No arguments required")

    async def map(self, bio):
        if bio.op is Op.READ:
            return bytes(to_bytes(bio.sectors))
        if bio.op is Op.DISCARD:
            raise DMError(errno.EIO)
        return None
