"""The kernel's metadata checksums: crc32c over a block minus its first word, salted per type.

``dm_bm_checksum(data, len, xor)`` is ``crc32c(~0, data, len) ^ xor`` without crc32c's final
inversion; the ``crc32c`` package returns the standard (inverted) value, hence the extra
``^ 0xffffffff``.  The XOR salts are those of drivers/md (and thin-provisioning-tools), so a
block of one type never validates as another.
"""
import crc32c as _crc32c

THIN_SUPERBLOCK_CSUM_XOR = 160774
CACHE_SUPERBLOCK_CSUM_XOR = 9031977
ERA_SUPERBLOCK_CSUM_XOR = 146538381
BITMAP_CSUM_XOR = 240779
INDEX_CSUM_XOR = 160478
BTREE_CSUM_XOR = 121107
ARRAY_CSUM_XOR = 595846735

_crc = _crc32c.crc32c


def bm_checksum(data: bytes | bytearray | memoryview, init_xor: int) -> int:
    """``dm_bm_checksum``: raw crc32c seeded with ~0, then XORed with the type's salt."""
    return (_crc(data) ^ 0xFFFFFFFF ^ init_xor) & 0xFFFFFFFF


def block_checksum(block: bytes | bytearray | memoryview, init_xor: int) -> int:
    """The checksum stored in a block's first word: over everything after that word."""
    return bm_checksum(memoryview(block)[4:], init_xor)
