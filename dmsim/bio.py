"""The request object that targets map: a userspace ``struct bio``.

Sectors are 512 bytes.  ``data`` is the payload of a write; a read's data is what
``submit`` returns.  A read may carry a writable buffer in ``data`` (a slice of a
larger one, say): a device may fill it in place and return it, or return other bytes;
:func:`settle_read` puts the result in the buffer either way.  This lets a target that
splits a read assemble the pieces in one buffer (one copy, where joining pieces costs
a second copy and, for large reads, a fresh allocation).  Only this module converts between sectors and bytes
(:func:`to_bytes` / :func:`to_sectors`).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT
PAGE_SIZE = 4096
PAGE_SECTORS = PAGE_SIZE >> SECTOR_SHIFT


def to_bytes(sectors: int) -> int:
    return sectors << SECTOR_SHIFT


def to_sectors(nbytes: int) -> int:
    return nbytes >> SECTOR_SHIFT


# bi_opf bits as 6.1 defines them (include/linux/blk_types.h): the op in the low 8 bits,
# modifier flags above it.  Targets that look at flags (flakey's corrupt_bio_flags) match
# against :func:`bi_opf`.
REQ_OP_READ, REQ_OP_WRITE, REQ_OP_DISCARD, REQ_OP_WRITE_ZEROES = 0, 1, 3, 9
REQ_SYNC = 1 << 11
REQ_META = 1 << 12
REQ_IDLE = 1 << 15
REQ_FUA = 1 << 17
REQ_PREFLUSH = 1 << 18
REQ_RAHEAD = 1 << 19
REQ_BACKGROUND = 1 << 20
#: what blkdev's O_DIRECT write gives its bios (dio_bio_write_op); O_DSYNC adds FUA
DIRECT_WRITE_FLAGS = REQ_SYNC | REQ_IDLE
#: what writeback an fsync, a last close or a freeze forces gives them (WB_SYNC_ALL)
SYNC_WRITEBACK_FLAGS = REQ_SYNC
#: background writeback past the dirty limit (wbc->for_background)
BACKGROUND_WRITEBACK_FLAGS = REQ_BACKGROUND


class Op(enum.Enum):
    READ = "read"
    WRITE = "write"
    FLUSH = "flush"
    DISCARD = "discard"
    WRITE_ZEROES = "write_zeroes"

    @property
    def is_write(self) -> bool:
        return self is not Op.READ


@dataclass
class Bio:
    """One request: ``op`` over ``sectors`` sectors from ``sector``.

    ``data`` (bytes-like, ``sectors * 512`` long) is a write's payload, or a read's
    optional destination buffer (writable).
    ``fua`` asks for the write to be durable on completion; an empty FLUSH carries no
    sectors.  ``flags`` holds the other ``bi_opf`` modifier bits the kernel would set
    (``REQ_SYNC``, ``REQ_IDLE``, ...; FUA and PREFLUSH are ``fua`` and ``Op.FLUSH``):
    a plain int, so that carrying it costs nothing.  :func:`bi_opf` puts them together.
    """

    op: Op
    sector: int = 0
    sectors: int = 0
    data: bytes | bytearray | memoryview | None = None
    fua: bool = False
    flags: int = 0
    #: free-form per-request context a target may set (like bi_private)
    private: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def end_sector(self) -> int:
        return self.sector + self.sectors

    def remap(self, sector: int) -> "Bio":
        """The same request at another sector (a target's remap)."""
        # the constructor directly: dataclasses.replace costs ~5 us, a third of a 4 KiB remap
        return Bio(self.op, sector, self.sectors, self.data, self.fua, self.flags)

    def data_of(self, offset_sectors: int, sectors: int) -> memoryview:
        """The payload of the part ``[offset, offset+sectors)`` (no copy)."""
        return memoryview(self.data)[to_bytes(offset_sectors):to_bytes(offset_sectors + sectors)]  # type: ignore[arg-type]

    def slice(self, offset_sectors: int, sectors: int, sector: int | None = None) -> "Bio":
        """The part ``[offset, offset+sectors)`` of this request, placed at ``sector``."""
        data = None if self.data is None else self.data_of(offset_sectors, sectors)
        start = self.sector + offset_sectors if sector is None else sector
        return Bio(self.op, start, sectors, data, self.fua, self.flags)

    @classmethod
    def read_into(cls, sector: int, buf) -> "Bio":
        """A read that fills ``buf`` (writable, a whole number of sectors)."""
        return cls(Op.READ, sector, to_sectors(len(buf)), buf)

    @classmethod
    def read(cls, sector: int, sectors: int) -> "Bio":
        return cls(Op.READ, sector, sectors)

    @classmethod
    def write(cls, sector: int, data, fua: bool = False, flags: int = 0) -> "Bio":
        return cls(Op.WRITE, sector, to_sectors(len(data)), data, fua, flags)

    @classmethod
    def flush(cls) -> "Bio":
        return cls(Op.FLUSH)


_OP_BITS = {Op.READ: REQ_OP_READ, Op.WRITE: REQ_OP_WRITE, Op.DISCARD: REQ_OP_DISCARD,
             Op.WRITE_ZEROES: REQ_OP_WRITE_ZEROES,
             # dm core sends targets its own empty flush: __send_empty_flush
             Op.FLUSH: REQ_OP_WRITE | REQ_PREFLUSH | REQ_SYNC}


def bi_opf(bio: Bio) -> int:
    """The kernel's ``bi_opf`` of ``bio`` as a target sees it: op, flags and FUA."""
    opf = _OP_BITS[bio.op] | bio.flags
    return opf | REQ_FUA if bio.fua else opf


def settle_read(bio: Bio, result):
    """After ``submit`` of a read that carried a buffer: make the buffer hold ``result``
    (a no-op when the device filled it in place) and return the buffer."""
    buf = bio.data
    if buf is None:
        return result
    if result is not buf:
        memoryview(buf)[:] = result
    return buf
