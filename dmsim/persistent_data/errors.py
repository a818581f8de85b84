"""Errors of the persistent-data layer, as :class:`dmsim.errors.DMError` with the kernel's errno.

The kernel returns -EILSEQ for a block that fails its validator, -ENOSPC when a space map
has no free block and -ENODATA for a key a btree does not hold; callers above (thin
metadata, the targets) turn these into their own messages once.
"""
import errno

from dmsim.errors import DMError


class MetadataError(DMError):
    """A block failed its validator or a structure is inconsistent (-EILSEQ)."""

    def __init__(self, message: str, err: int = errno.EILSEQ):
        super().__init__(err, message)


class NoSpace(DMError):
    """A space map has no free block left (-ENOSPC)."""

    def __init__(self, message: str = "no free space"):
        super().__init__(errno.ENOSPC, message)


class NoData(DMError):
    """A btree lookup or remove found no such key (-ENODATA)."""

    def __init__(self, message: str = "no such key"):
        super().__init__(errno.ENODATA, message)


class LockError(DMError):
    """A block lock request conflicts with one held (the kernel would BUG or -EWOULDBLOCK)."""

    def __init__(self, message: str):
        super().__init__(errno.EWOULDBLOCK, message)
