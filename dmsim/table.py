"""Tables: parsing table text and building a validated ``dm_table``.

Two sides, as in the real system:

* :func:`parse_table_text` is dmsetup's side: comments, blank lines, ``Invalid format``.
* :func:`build_table` is the kernel's ``table_load``: the per-line checks in the kernel's
  order with its log lines, the target constructors, then the queue-limit checks
  (:func:`check_limits`), which the caller runs at load or at resume as the kernel does.
"""
from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import trio

from .bio import SECTOR_SIZE
from .errors import DMError, errno_name

if TYPE_CHECKING:  # pragma: no cover
    from .blockdev import BlockDevice
    from .device import MappedDevice
    from .manager import Manager

MAX_U64 = (1 << 64) - 1
#: ``LLONG_MAX >> SECTOR_SHIFT``: a table ending beyond this is ``too large device``
MAX_DEVICE_SECTORS = ((1 << 63) - 1) >> 9

pylog = logging.getLogger("dmsim.table")


@dataclass(frozen=True)
class TableLine:
    start: int
    length: int
    type: str
    params: str = ""

    def __str__(self):
        return "%d %d %s %s" % (self.start, self.length, self.type, self.params)


def parse_table_text(text: str, source: str = "") -> list[TableLine]:
    """dmsetup's reading of table text (``_parse_line``: ``sscanf("%llu %llu %s %n")``).

    ``source`` names the input in the error (``""`` for ``--table``, ``"on stdin"``, or
    a file name), as in ``Invalid format on line 1 of table .``.  Numbers read as
    ``strtoull`` does (a sign is allowed, ``-1`` is 2^64-1, an overflow saturates): the
    kernel, not dmsetup, refuses a device too large; a ``#`` starts a comment only at the
    start of a line or after the target type.
    """
    lines = []
    for n, raw in enumerate(text.split("\n"), 1):
        line = raw.strip(_C_SPACE)
        if not line or line[0] == "#":
            continue
        start = _scan_llu(line, 0)
        length = _scan_llu(line, start[1]) if start else None
        ttype = _scan_word(line, length[1]) if length else None
        if start is None or length is None or ttype is None:
            raise DMError(errno.EINVAL, "Invalid format on line %d of table %s." % (n, source))
        kind, i = ttype
        if len(kind.encode("utf-8", "surrogateescape")) >= DM_MAX_TYPE_NAME:
            raise DMError(errno.EINVAL, "Target type name %s is too long." % kind)
        params = line[i:].lstrip(_C_SPACE).split("#", 1)[0].rstrip(_C_SPACE)
        lines.append(TableLine(start[0], length[0], kind, params))
    return lines


_C_SPACE = " \t\n\v\f\r"        # C's isspace in the C locale
DM_MAX_TYPE_NAME = 16


def _scan_llu(s: str, i: int) -> tuple[int, int] | None:
    """``%llu`` at ``s[i:]``: (value, index after it), or None without digits."""
    while i < len(s) and s[i] in _C_SPACE:
        i += 1
    negative = i < len(s) and s[i] == "-"
    if i < len(s) and s[i] in "+-":
        i += 1
    j = i
    while j < len(s) and "0" <= s[j] <= "9":
        j += 1
    if j == i:
        return None
    value = int(s[i:j])
    if value > MAX_U64:
        value = MAX_U64                  # strtoull's ERANGE
    elif negative:
        value = -value & MAX_U64
    return value, j


def _scan_word(s: str, i: int) -> tuple[str, int] | None:
    """``%s`` at ``s[i:]``: the next run of non-space characters, or None."""
    while i < len(s) and s[i] in _C_SPACE:
        i += 1
    j = i
    while j < len(s) and s[j] not in _C_SPACE:
        j += 1
    return (s[i:j], j) if j > i else None


_KERNEL_SPACE = frozenset(" \t\n\v\f\r")


def split_args(params: str) -> list[str]:
    """The kernel's ``dm_split_args``: whitespace separates, backslash escapes.

    Whitespace is the kernel's ``isspace`` (ASCII only: Python's ``str.isspace`` would
    also split on U+001C-U+001F and Unicode spaces); a backslash at the very end has
    nothing to quote and stays literal."""
    args, cur, have, esc = [], [], False, False
    for ch in params:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            esc, have = True, True
        elif ch in _KERNEL_SPACE:
            if have:
                args.append("".join(cur))
                cur, have = [], False
        else:
            cur.append(ch)
            have = True
    if esc:
        cur.append("\\")
    if have:
        args.append("".join(cur))
    return args


class Table:
    """A constructed table: targets in order, the devices they hold, its mode."""

    def __init__(self, md: "MappedDevice", read_only: bool):
        self.md = md
        self.read_only = read_only
        self.targets: list = []
        self.devices: list["BlockDevice"] = []   # most recently first-used first
        self._holds: list["BlockDevice"] = []    # every get_device, to release at dtr
        self.scope: _TaskScopes | None = None   # cancel scopes of background tasks
        self.destroyed = False

    @property
    def size_sectors(self) -> int:
        if not self.targets:
            return 0
        last = self.targets[-1]
        return last.begin + last.len

    @property
    def logical_block_size(self) -> int:
        sizes = [dev.logical_block_size for t in self.targets for dev, _, _ in t.iterate_devices()]
        return max(sizes, default=SECTOR_SIZE)

    def lines(self, kind: str, noflush: bool = False) -> list[TableLine]:
        return [TableLine(t.begin, t.len, t.name, t.status(kind, noflush)) for t in self.targets]

    def find_target(self, sector: int):
        """The target holding ``sector`` (binary search over begin)."""
        lo, hi = 0, len(self.targets) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.targets[mid].begin <= sector:
                lo = mid
            else:
                hi = mid - 1
        return self.targets[lo]

    def hold(self, dev: "BlockDevice") -> bool:
        """Record a device the table uses; False when it already held it (the kernel
        opens each device once per table; later lines just share it)."""
        if any(d is dev for d in self.devices):
            return False
        self._holds.append(dev)
        self.devices.insert(0, dev)
        return True

    async def destroy(self) -> None:
        """Run every destructor and release the devices (``dm_table_destroy``).

        Shielded: the kernel's destroy cannot be interrupted, and one cut short by a
        cancelled caller would keep its devices open for good (never removable)."""
        if self.destroyed:
            return
        self.destroyed = True
        with trio.CancelScope(shield=True):
            try:
                for t in reversed(self.targets):
                    try:
                        await t.dtr()
                    except Exception:  # one broken dtr must not keep the devices held
                        pylog.exception("%s: destructor of %s failed", self.md.mm, t.name)
            finally:
                if self.scope is not None:
                    self.scope.cancel()
                for dev in self._holds:
                    self.md.manager.put_device(dev)
                self._holds.clear()


class _TaskScopes:
    """The cancel scopes of a table's background tasks (cancelled together)."""

    def __init__(self) -> None:
        self.scopes: set = set()
        self.cancelled = False

    def add(self, scope) -> None:
        if self.cancelled:
            scope.cancel()
        self.scopes.add(scope)

    def discard(self, scope) -> None:
        self.scopes.discard(scope)

    def cancel(self) -> None:
        self.cancelled = True
        for scope in list(self.scopes):
            scope.cancel()


class _Context:
    """The :class:`~dmsim.targets.base.TargetContext` of one table.

    Everything a target may use is declared here (no ``getattr`` probing in targets):
    the table it belongs to, that table's mapped device and the device's manager."""

    def __init__(self, table: Table, cwd: str = "/", resolved: dict | None = None):
        self.table: Table = table
        self.md: MappedDevice = table.md
        self.manager: Manager = table.md.manager
        self.cwd = cwd                   # relative device paths resolve against it
        self.resolved: dict = resolved or {}   # the table's words, resolved ahead (dmsim.resolve)

    @property
    def mm(self) -> str:
        return self.md.mm

    @property
    def read_only(self) -> bool:
        return self.table.read_only

    def get_device(self, name: str, write: bool = True):
        dev = self.manager.get_device(name, write and not self.table.read_only, holder=self.md,
                                      resolved=self.resolved.get(name), cwd=self.cwd)
        if not self.table.hold(dev):
            self.manager.put_device(dev)
        return dev

    def log(self, message: str) -> None:
        self.manager.log(message)

    def event(self) -> None:
        self.md.raise_event()

    def kcopyd_client(self, num_pages: int | None = None):
        return self.manager.kcopyd_client(num_pages)

    def start_task(self, async_fn, *args, name: str | None = None) -> None:
        if self.table.scope is None:
            self.table.scope = _TaskScopes()
        group = self.table.scope
        scope = trio.CancelScope()       # one scope per task: a CancelScope is single-use
        group.add(scope)

        async def runner():
            try:
                with scope:
                    await async_fn(*args)
            except Exception as e:      # a bug in one target's task must not end the manager
                self.manager.task_failed(e, "%s: background task of %s" % (self.md.mm, self.table.md.name))
            finally:
                group.discard(scope)

        self.manager.nursery.start_soon(runner, name=name or getattr(async_fn, "__name__", None))

    def noflush_suspending(self) -> bool:
        """Whether the device is in a noflush suspend (``dm_noflush_suspending``)."""
        return self.md.noflush_suspending


async def build_table(md: "MappedDevice", lines: Sequence[TableLine], read_only: bool,
                      cwd: str = "/") -> Table:
    """Construct every line with the kernel's checks (``populate_table``).

    Raises DMError with the errno the ioctl returns; the kernel's log lines go to the
    manager's log.  A failed table is destroyed again before the error leaves.  Every
    word of the table that could name a device is resolved first, off the Trio thread
    (relative ones against ``cwd``), so the constructors never wait on a path.
    """
    log = md.manager.log
    if not lines:
        log("ioctl: populate_table: no targets specified")
        raise DMError(errno.EINVAL)
    words = [w for line in lines for w in split_args(line.params)]
    resolved = await md.manager.resolve_names(words, cwd) if words else {}
    table = Table(md, read_only)
    ctx = _Context(table, cwd, resolved)
    immutable = None
    try:
        for line in lines:
            try:
                target = await _add_target(ctx, table, line, immutable)
            except DMError:
                log("ioctl: error adding target to table")
                raise
            if target.immutable and immutable is None:
                immutable = type(target)
            table.targets.append(target)
    except BaseException:
        await table.destroy()
        raise
    return table


async def _add_target(ctx: _Context, table: Table, line: TableLine, immutable):
    """``dm_table_add_target``: one line's checks, in the kernel's order, and its ctr."""
    from .targets.base import lookup

    log, mm = ctx.manager.log, ctx.mm
    if table.targets and table.targets[0].singleton:
        log("table: %s: target type %s must appear alone in table" % (mm, table.targets[0].name))
        raise DMError(errno.EINVAL)
    if line.length == 0:
        log("table: %s: zero-length target" % mm)
        raise DMError(errno.EINVAL)
    if line.start + line.length > MAX_DEVICE_SECTORS:      # (also a sector_t overflow)
        log("table: %s: too large device" % mm)
        raise DMError(errno.EINVAL)
    cls = lookup(line.type)
    if cls is None:
        log("table: %s: %s: unknown target type" % (mm, line.type))
        raise DMError(errno.EINVAL)
    target = cls(ctx, line.start, line.length)
    try:
        if cls.singleton and table.targets:
            raise DMError(errno.EINVAL, "singleton target type must appear alone in table")
        if cls.always_writeable and table.read_only:
            raise DMError(errno.EINVAL, "target type may not be included in a read-only table")
        if (immutable is not None and immutable is not cls) or \
                (immutable is None and cls.immutable and table.targets):
            raise DMError(errno.EINVAL, "immutable target type cannot be mixed with other target types")
        if line.start != table.size_sectors:
            raise DMError(errno.EINVAL, "Gap in table")
        await target.ctr(split_args(line.params))
    except DMError as e:
        # a failed ctr cleans up after itself (its devices go with the table)
        log("table: %s: %s: %s (%s)" % (mm, line.type, e.message or target.error, errno_name(e.errno)))
        raise DMError(e.errno) from None
    return target


def check_limits(table: Table) -> None:
    """The queue-limit checks (``dm_calculate_queue_limits``): device areas inside their
    devices, aligned to the logical block size; raise DMError(EINVAL) after logging."""
    log = table.md.manager.log
    mm = table.md.mm
    for t in table.targets:
        areas = t.iterate_devices()
        lt = max((dev.logical_block_size for dev, _, _ in areas), default=SECTOR_SIZE) // SECTOR_SIZE
        for dev, start, length in areas:
            size = dev.size_sectors
            if not size:
                continue
            if start >= size or start + length > size:
                log("table: %s: %s too small for target: start=%d, len=%d, dev_size=%d"
                    % (mm, dev.kname, start, length, size))
                raise DMError(errno.EINVAL)
            if start % lt:
                log("table: %s: start=%d not aligned to h/w logical block size %d of %s"
                    % (mm, start, lt * SECTOR_SIZE, dev.kname))
                raise DMError(errno.EINVAL)
            if length % lt:
                log("table: %s: len=%d not aligned to h/w logical block size %d of %s"
                    % (mm, length, lt * SECTOR_SIZE, dev.kname))
                raise DMError(errno.EINVAL)
    big = table.logical_block_size // SECTOR_SIZE
    pos = rem = 0
    for i, t in enumerate(table.targets):
        lt = max((dev.logical_block_size for dev, _, _ in t.iterate_devices()), default=SECTOR_SIZE) // SECTOR_SIZE
        if rem < t.len and rem % lt:
            _misaligned(table, i, t, big)
        pos = (pos + t.len) % big
        rem = big - pos if pos else 0
    if rem:
        _misaligned(table, len(table.targets), table.targets[-1], big)


def _misaligned(table: Table, i: int, t, big: int) -> None:
    table.md.manager.log("table: %s: table line %d (start sect %d len %d) not aligned to h/w logical block size %d"
                         % (table.md.mm, i, t.begin, t.len, big * SECTOR_SIZE))
    raise DMError(errno.EINVAL)
