"""delay: hold requests for a while before sending them on (delay 1.3.0, Debian 6.1).

Table: ``<dev> <offset> <delay> [<write_dev> <write_offset> <write_delay>
[<flush_dev> <flush_offset> <flush_delay>]]``

  Delays are in milliseconds (u32).

Three classes of request: *read* (every non-write), *write* (write direction without
PREFLUSH, discards included) and *flush* (PREFLUSH).  With 3 arguments every class uses
the first triple; with 6 the flush class uses the write triple; with 9 each class has its
own.  A request goes to its class's device at ``offset + relative sector`` after
``delay`` ms (0: at once).  Presuspend stops delaying and releases every held request;
resume enables delaying again.

Status (info): ``<reads> <writes> <flushes>`` held right now.  Table: the given triples
joined by single spaces.  No messages.  Kernel: drivers/md/dm-delay.c (v6.1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import trio

from dmsim.bio import Op
from dmsim.errors import DMError, TargetError

from .base import STATUSTYPE_INFO, STATUSTYPE_TABLE, Target, passthrough, register, scan_uint

HZ = 250          # Debian's CONFIG_HZ: delays are rounded up to whole jiffies


@dataclass
class DelayClass:
    dev: object
    start_sector: int
    delay_ms: int
    held: int = 0          # requests of this class currently held (``ops``)

    def __str__(self):
        return "%s %d %d" % (self.dev.ref, self.start_sector, self.delay_ms)


@register
class Delay(Target):
    name = "delay"
    version = (1, 3, 0)

    async def ctr(self, args):
        if len(args) not in (3, 6, 9):
            raise TargetError("Requires exactly 3, 6 or 9 arguments")
        self.argc = len(args)
        self.may_delay = True
        self._release = trio.Event()   # set by presuspend: let every held request go
        self.read = self._class_ctr(args[0:3])
        if len(args) == 3:
            self.write = self._class_ctr(args[0:3])
            self.flush = self._class_ctr(args[0:3])
        else:
            self.write = self._class_ctr(args[3:6])
            self.flush = self._class_ctr(args[3:6] if len(args) == 6 else args[6:9])

    def _class_ctr(self, argv) -> DelayClass:
        start = scan_uint(argv[1], 64)
        if start is None:
            raise TargetError("Invalid device sector")
        delay = scan_uint(argv[2], 32)
        if delay is None:
            raise TargetError("Invalid delay")
        try:
            dev = self.ctx.get_device(argv[0])
        except DMError as e:
            raise TargetError("Device lookup failed", e.errno) from None
        return DelayClass(dev, start, delay)

    def _class_of(self, bio) -> DelayClass:
        if bio.op is Op.FLUSH:
            return self.flush
        if bio.op.is_write:
            return self.write
        return self.read

    async def map(self, bio):
        c = self._class_of(bio)
        if c.delay_ms and self.may_delay:
            jiffies = math.ceil(c.delay_ms * HZ / 1000)
            deadline = trio.current_time() + jiffies / HZ
            release = self._release
            c.held += 1
            try:
                with trio.move_on_at(deadline):
                    await release.wait()
            finally:
                c.held -= 1
        if bio.op is Op.FLUSH and not bio.sectors:
            return await passthrough(c.dev, bio)
        return await passthrough(c.dev, bio, c.start_sector)

    async def presuspend(self, noflush=False):
        """Stop delaying and release every held request, so that suspend can drain."""
        self.may_delay = False
        self._release.set()
        self._release = trio.Event()

    async def preresume(self):
        self.may_delay = True

    async def resume(self):
        self.may_delay = True

    def status(self, kind, noflush=False):
        if kind == STATUSTYPE_INFO:
            return "%d %d %d" % (self.read.held, self.write.held, self.flush.held)
        if kind == STATUSTYPE_TABLE:
            classes = [self.read, self.write, self.flush][:self.argc // 3]
            return " ".join(str(c) for c in classes)
        return ""

    def iterate_devices(self):
        return [(c.dev, c.start_sector, self.len) for c in (self.read, self.write, self.flush)]
