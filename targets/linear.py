"""linear: map a range onto another device.

Table: ``<dev> <offset>``

Every operation passes through to ``<dev>`` at ``offset + relative sector``.
Status (info) is empty; table prints ``<dev> <offset>``.  Kernel: drivers/md/dm-linear.c.
"""
from dmsim.errors import DMError, TargetError

from .base import STATUSTYPE_TABLE, Target, parse_uint, passthrough, register


@register
class Linear(Target):
    name = "linear"
    version = (1, 4, 0)

    async def ctr(self, args):
        if len(args) != 2:
            raise TargetError("Invalid argument count")
        self.start = parse_uint(args[1], "Invalid device sector")
        try:
            self.dev = self.ctx.get_device(args[0])
        except DMError as e:
            raise TargetError("Device lookup failed", e.errno) from None

    async def map(self, bio):
        return await passthrough(self.dev, bio, self.start)

    def status(self, kind, noflush=False):
        if kind == STATUSTYPE_TABLE:
            return "%s %d" % (self.dev.ref, self.start)
        return ""

    def iterate_devices(self):
        return [(self.dev, self.start, self.len)]
