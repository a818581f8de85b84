"""Block validators: what the kernel checks on every read and stamps on every write.

Each validator mirrors one ``struct dm_block_validator`` of drivers/md/persistent-data: it
writes the block's own number and its checksum before the block goes to disk, and refuses a
block read from disk whose number or checksum is wrong, with the kernel's message and errno
(-ENOTBLK for a block that claims another location, -EILSEQ for a bad checksum).
"""
import errno
import struct

from .checksum import ARRAY_CSUM_XOR, BITMAP_CSUM_XOR, BTREE_CSUM_XOR, INDEX_CSUM_XOR, block_checksum
from .errors import MetadataError

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class Validator:
    """A block type with its header layout: csum (le32) at 0, blocknr (le64) at ``blocknr_offset``."""

    name = "none"
    #: DM_MSG_PREFIX of the kernel file whose check logs the failure
    prefix = "persistent data"
    csum_xor = 0
    blocknr_offset = 8
    #: prefix of the kernel's DMERR lines for this type ("node_check failed")
    what = ""
    #: separator of the kernel's message ("!=" for most types, ":" for the superblock)
    sep = " !="

    def prepare_for_write(self, data: bytearray, location: int) -> None:
        """Stamp the block number, then the checksum over everything after the csum word."""
        _U64.pack_into(data, self.blocknr_offset, location)
        _U32.pack_into(data, 0, block_checksum(data, self.csum_xor))

    def check(self, data: bytes | bytearray, location: int) -> None:
        """Raise :class:`MetadataError` with the kernel's text if the block is not ours."""
        (blocknr,) = _U64.unpack_from(data, self.blocknr_offset)
        if blocknr != location:
            raise MetadataError("%s failed: blocknr %d%s wanted %d" % (self.what, blocknr, self.sep, location),
                                errno.ENOTBLK)
        self.check_more(data, location)
        (disk,) = _U32.unpack_from(data, 0)
        want = block_checksum(data, self.csum_xor)
        if disk != want:
            raise MetadataError("%s failed: csum %d%s wanted %d" % (self.what, want, self.sep, disk))

    def check_more(self, data: bytes | bytearray, location: int) -> None:
        """Checks a type makes between the block number and the checksum (the superblock's magic)."""


class NoValidator(Validator):
    """Raw blocks: nothing stamped, nothing checked (the kernel's NULL validator)."""

    name = "raw"

    def prepare_for_write(self, data: bytearray, location: int) -> None:
        pass

    def check(self, data: bytes | bytearray, location: int) -> None:
        pass


class BTreeNodeValidator(Validator):
    """``btree_node_validator`` (dm-btree-spine.c): plus the header's bounds."""

    name = "btree_node"
    prefix = "btree spine"
    csum_xor = BTREE_CSUM_XOR
    what = "node_check"

    def check(self, data: bytes | bytearray, location: int) -> None:
        super().check(data, location)
        flags, _blocknr, nr_entries, max_entries, value_size = struct.unpack_from("<IQIII", data, 4)
        if 32 + (8 + value_size) * max_entries > len(data):
            raise MetadataError("node_check failed: max_entries too large")
        if nr_entries > max_entries:
            raise MetadataError("node_check failed: too many entries")
        if not flags & 3:
            raise MetadataError("node_check failed: node is neither INTERNAL or LEAF")


class BitmapValidator(Validator):
    """``dm_sm_bitmap_validator`` (dm-space-map-common.c)."""

    name = "sm_bitmap"
    prefix = "space map common"
    csum_xor = BITMAP_CSUM_XOR
    what = "bitmap check"


class IndexValidator(Validator):
    """``index_validator``: the metadata space map's single index block."""

    name = "index"
    prefix = "space map metadata"
    csum_xor = INDEX_CSUM_XOR
    what = "index_check"


class ArrayBlockValidator(Validator):
    """``array_validator`` (dm-array.c): csum, max_entries, nr_entries, value_size, blocknr."""

    name = "array"
    prefix = "array"
    csum_xor = ARRAY_CSUM_XOR
    blocknr_offset = 16
    what = "array_block_check"


NO_VALIDATOR = NoValidator()
BTREE_NODE = BTreeNodeValidator()
BITMAP = BitmapValidator()
INDEX = IndexValidator()
ARRAY_BLOCK = ArrayBlockValidator()
