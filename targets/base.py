"""The target interface, shaped like the kernel's ``struct target_type``.

A target is constructed for one table line: ``await ctr(args)`` parses the line's
arguments (raise :class:`~dmsim.errors.TargetError` with the kernel's ``ti->error`` text),
``await map(bio)`` performs a request relative to the target's start (sector 0 is the
target's first sector) and returns the data of a read, ``status(kind)`` returns the INFO
or TABLE text.  Every other hook has a do-nothing default here, so a target overrides only
what it changes.

What the core gives a target is its :class:`TargetContext` (``self.ctx``): opening
underlying devices, kcopyd clients, log lines, table events and background tasks.
"""
from __future__ import annotations

import errno
import importlib
import pkgutil
from typing import TYPE_CHECKING, Sequence

from dmsim.bio import Bio, Op
from dmsim.errors import DMError, TargetError

if TYPE_CHECKING:  # pragma: no cover
    from dmsim.blockdev import BlockDevice
    from dmsim.device import MappedDevice
    from dmsim.manager import Manager
    from dmsim.table import Table

STATUSTYPE_INFO = "info"
STATUSTYPE_TABLE = "table"


class TargetContext:
    """What dm core lends a target; implemented by :mod:`dmsim.table`."""

    mm: str = "253:0"            # major:minor of the dm device, for log lines
    read_only: bool = False
    #: the table this target belongs to, its mapped device and that device's manager
    #: (always set by dm core; declared here so targets need no ``getattr`` probing)
    table: "Table"
    md: "MappedDevice"
    manager: "Manager"

    def noflush_suspending(self) -> bool:
        """``dm_noflush_suspending``: the device is in a noflush suspend."""
        return False

    def get_device(self, name: str, write: bool = True) -> "BlockDevice":
        raise NotImplementedError

    def log(self, message: str) -> None:
        """Log ``device-mapper: <message>`` (the ``klog`` of the dialect)."""

    def event(self) -> None:
        """``dm_table_event``: bump the device's event counter and wake waiters."""

    def kcopyd_client(self, num_pages: int | None = None):
        raise NotImplementedError

    def start_task(self, async_fn, *args, name: str | None = None) -> None:
        """Run a background task owned by the table; cancelled when the table dies."""
        raise NotImplementedError


class Target:
    """Base of every target.  Subclasses set ``name`` and ``version`` and implement
    :meth:`ctr` and :meth:`map`."""

    name: str = ""
    version: tuple[int, int, int] = (1, 0, 0)
    singleton: bool = False
    #: a kernel module loaded on first use (request_module): listed only once a table used it
    module: str | None = None
    immutable: bool = False
    always_writeable: bool = False
    wildcard: bool = False

    def __init__(self, ctx: TargetContext, begin: int, length: int):
        self.ctx = ctx
        self.begin = begin
        self.len = length
        #: split requests so that none crosses a multiple of this many sectors (0: none)
        self.max_io_len = 0
        self.error = "Unknown error"

    # -- mandatory ------------------------------------------------------------------
    async def ctr(self, args: Sequence[str]) -> None:
        raise NotImplementedError

    async def map(self, bio: Bio):
        raise NotImplementedError

    # -- optional hooks (defaults pass through / do nothing) ---------------------------
    async def dtr(self) -> None:
        pass

    def status(self, kind: str, noflush: bool = False) -> str:
        return ""

    async def message(self, argv: Sequence[str]) -> str | None:
        raise DMError(errno.EINVAL, "Target type does not support messages")

    def iterate_devices(self) -> list[tuple["BlockDevice", int, int]]:
        """(device, start sector, length) of every data area, for the size checks."""
        return []

    async def presuspend(self, noflush: bool = False) -> None:
        pass

    async def presuspend_undo(self) -> None:
        pass

    async def postsuspend(self) -> None:
        pass

    async def preresume(self) -> None:
        pass

    async def resume(self) -> None:
        pass

    @classmethod
    def has_messages(cls) -> bool:
        return cls.message is not Target.message


# -- helpers for constructors ------------------------------------------------------------
U32_MAX = (1 << 32) - 1


def scan_uint(word: str | None, bits: int = 64) -> int | None:
    """The kernel's ``sscanf(word, "%llu%c")`` (or ``"%u%c"`` with ``bits=32``): digits
    only, no sign; None where sscanf would not return 1.  An overlong number wraps, as
    ``simple_strntoull`` does (6.1 takes ``linear DEV 18446744073709551616`` as offset 0)."""
    if not word or not word.isascii() or not word.isdigit():
        return None
    return int(word) % (1 << 64) % (1 << bits)


def parse_uint(word: str | None, error: str, bits: int = 64) -> int:
    """:func:`scan_uint`, failing the constructor with ``error``."""
    value = scan_uint(word, bits)
    if value is None:
        raise TargetError(error)
    return value


def kstrtouint(word: str) -> int | None:
    """The kernel's ``kstrtouint(s, 10)``: optional ``+``, digits, optional final
    newline; out of range is an error (None), unlike sscanf."""
    if word.endswith("\n"):
        word = word[:-1]
    if word.startswith("+"):
        word = word[1:]
    if not word or not word.isascii() or not word.isdigit():
        return None
    value = int(word)
    return value if value <= U32_MAX else None


async def passthrough(dev: "BlockDevice", bio: Bio, offset: int = 0):
    """Send ``bio`` to ``dev`` at ``offset`` sectors further (linear's remap)."""
    if bio.op is Op.FLUSH and not bio.sectors:
        return await dev.submit(bio)
    return await dev.submit(bio.remap(bio.sector + offset))


# -- registry -----------------------------------------------------------------------------
_registry: dict[str, type[Target]] = {}
_order: list[str] = []
_loaded_all = False


def register(cls: type[Target]) -> type[Target]:
    """Class decorator: make a target type known by its ``name``."""
    _registry[cls.name] = cls
    if cls.name in _order:
        _order.remove(cls.name)
    _order.append(cls.name)
    return cls


def _load_all() -> None:
    global _loaded_all
    if _loaded_all:
        return
    _loaded_all = True
    import dmsim.targets as pkg
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name != "base":
            importlib.import_module("dmsim.targets." + info.name)


_demanded: set[str] = set()


def lookup(name: str) -> type[Target] | None:
    if name not in _registry:
        _load_all()
    cls = _registry.get(name)
    if cls is not None and cls.module:
        _demanded.add(cls.module)
    return cls


#: the order 6.1 registers the types in (built-ins, then the oracle's preloaded modules:
#: dm_zero dm_snapshot dm_mirror dm_flakey dm_delay dm_dust); ``dmsetup targets`` lists
#: the last registered first, and types not here as if loaded after these
KERNEL_ORDER = ("error", "linear", "striped", "zero", "snapshot", "snapshot-origin",
                "snapshot-merge", "mirror", "flakey", "delay", "dust")


def registered() -> list[type[Target]]:
    """Every known type, most recently registered first (``dmsetup targets``)."""
    _load_all()
    rank = {name: i for i, name in enumerate(KERNEL_ORDER)}
    names = sorted(_order, key=lambda n: (rank.get(n, len(rank)), _order.index(n)))
    return [_registry[n] for n in reversed(names) if not _registry[n].module or _registry[n].module in _demanded]
