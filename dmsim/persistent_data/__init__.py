"""persistent-data: the kernel's on-disk metadata toolkit (drivers/md/persistent-data), in Python.

Layers, bottom up, each usable by dm-thin, dm-cache, dm-era or dm-clone metadata:

* :mod:`.checksum`, :mod:`.validators`: crc32c with the per-type salts; what every block must hold;
* :mod:`.block_manager`: 4 KiB blocks of a file (or of an in-memory image of a dm device),
  locked, validated, cached, flushed;
* :mod:`.transaction_manager`: shadowing (copy-on-write) and the two-step commit;
* :mod:`.space_map`: reference counts (bitmaps, index, overflow btree), disk and metadata maps;
* :mod:`.btree`: the kernel's btrees, one or several levels, with pluggable value types;
* :mod:`.array`, :mod:`.bitset`: arrays of fixed-size values and bitsets over btrees (dm-cache, dm-era).
"""
from .block_manager import METADATA_BLOCK_SIZE, Block, BlockManager
from .btree import BTreeInfo, Node, ValueType, calc_max_entries
from .errors import LockError, MetadataError, NoData, NoSpace
from .space_map import DiskSpaceMap, MetadataSpaceMap
from .transaction_manager import TransactionManager

__all__ = [
    "METADATA_BLOCK_SIZE", "BTreeInfo", "Block", "BlockManager", "DiskSpaceMap", "LockError", "MetadataError",
    "MetadataSpaceMap", "NoData", "NoSpace", "Node", "TransactionManager", "ValueType", "calc_max_entries",
]
