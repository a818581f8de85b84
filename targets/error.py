"""error: every request fails with EIO.

Table: any arguments, accepted and ignored (6.1's error 1.5.0).

The wildcard type: it may replace an immutable table, and ``remove --force`` loads it.
An empty flush succeeds (the kernel completes zero-length flushes without the target).
No status.  Kernel: drivers/md/dm-target.c.
"""
import errno

from dmsim.bio import Op
from dmsim.errors import DMError

from .base import Target, register


@register
class Error(Target):
    name = "error"
    version = (1, 5, 0)
    wildcard = True

    async def ctr(self, args):
        pass

    async def map(self, bio):
        if bio.op is Op.FLUSH and not bio.sectors:
            return None
        raise DMError(errno.EIO)
