"""Thin-pool metadata (dm-thin-metadata.c): devices, mappings and their sharing, on the kernel's format.

The metadata device is the kernel's, byte for byte in layout (checked with Debian's
thin-provisioning-tools: thin_check accepts it, thin_dump shows it, thin_restore's output
opens here).  Block 0 is the superblock::

    le32 csum (crc32c ^ 160774), le32 flags (1: needs_check), le64 blocknr, u8 uuid[16],
    le64 magic 27022010, le32 version 2, le32 time, le64 trans_id, le64 held_root,
    u8 data_space_map_root[128], u8 metadata_space_map_root[128],
    le64 data_mapping_root, le64 device_details_root, le32 data_block_size (sectors),
    le32 metadata_block_size (8), le64 metadata_nr_blocks, le32 compat, compat_ro, incompat

``data_mapping_root`` is a two-level btree: thin device id -> (virtual block -> le64
``data_block << 24 | time``); ``device_details_root`` maps a device id to 24 bytes (mapped
blocks, transaction id, creation time, snapshotted time).  A snapshot is one more reference on
its origin's mapping tree; writes to either side later copy the shared nodes apart (the
btree's shadowing) and take references on the data blocks they still share.

Everything here is synchronous file I/O on the metadata device: callers in Trio code run it
off the event loop.  A failed operation leaves the transaction to :meth:`PoolMetadata.abort`,
which goes back to the last commit; nothing committed is ever overwritten.
"""
import errno
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dmsim.errors import DMError
from dmsim.persistent_data.block_manager import METADATA_BLOCK_SIZE, BlockManager, Store
from dmsim.persistent_data.btree import BTreeInfo, ValueType
from dmsim.persistent_data.checksum import THIN_SUPERBLOCK_CSUM_XOR, block_checksum
from dmsim.persistent_data.errors import MetadataError, NoData
from dmsim.persistent_data.space_map import (
    METADATA_MAX_BLOCKS,
    SPACE_MAP_ROOT_SIZE,
    DiskSpaceMap,
    MetadataSpaceMap,
)
from dmsim.persistent_data.transaction_manager import TransactionManager
from dmsim.persistent_data.validators import NO_VALIDATOR, Validator

THIN_SUPERBLOCK_MAGIC = 27022010
THIN_SUPERBLOCK_LOCATION = 0
THIN_VERSION = 2
THIN_METADATA_BLOCK_SIZE_SECTORS = METADATA_BLOCK_SIZE // 512
# DM_SM_METADATA_MAX_SECTORS: 255 bitmaps of 2^14 blocks, in sectors
THIN_METADATA_MAX_SECTORS = 255 * (1 << 14) * THIN_METADATA_BLOCK_SIZE_SECTORS
MAX_DEV_ID = (1 << 24) - 1
THIN_FEATURE_COMPAT_SUPP = 0
THIN_FEATURE_COMPAT_RO_SUPP = 0
THIN_FEATURE_INCOMPAT_SUPP = 0
SUPERBLOCK_NEEDS_CHECK = 1
METADATA_RESERVE_MAX_BLOCKS = 4096

_SB = struct.Struct("<IIQ16sQIIQQ128s128sQQIIQIII")
_DETAILS = struct.Struct("<QQII")


class SuperblockValidator(Validator):
    """``sb_validator``: block number, then the magic, then the checksum."""

    name = "superblock"
    prefix = "thin metadata"
    csum_xor = THIN_SUPERBLOCK_CSUM_XOR
    what = "sb_check"
    sep = ":"

    def check(self, data: bytes | bytearray, location: int) -> None:
        (blocknr,) = struct.unpack_from("<Q", data, 8)
        if blocknr != location:
            raise MetadataError("sb_check failed: blocknr %d: wanted %d" % (blocknr, location), errno.ENOTBLK)
        (magic,) = struct.unpack_from("<Q", data, 32)
        if magic != THIN_SUPERBLOCK_MAGIC:
            raise MetadataError("sb_check failed: magic %d: wanted %d" % (magic, THIN_SUPERBLOCK_MAGIC))
        (disk,) = struct.unpack_from("<I", data, 0)
        want = block_checksum(data, self.csum_xor)
        if disk != want:
            raise MetadataError("sb_check failed: csum %d: wanted %d" % (want, disk))


SB_VALIDATOR = SuperblockValidator()


@dataclass
class Superblock:
    """The fields of ``struct thin_disk_superblock`` (checksum and block number aside)."""

    flags: int = 0
    uuid: bytes = bytes(16)
    magic: int = THIN_SUPERBLOCK_MAGIC
    version: int = THIN_VERSION
    time: int = 0
    trans_id: int = 0
    held_root: int = 0
    data_sm_root: bytes = bytes(SPACE_MAP_ROOT_SIZE)
    metadata_sm_root: bytes = bytes(SPACE_MAP_ROOT_SIZE)
    data_mapping_root: int = 0
    device_details_root: int = 0
    data_block_size: int = 0
    metadata_block_size: int = THIN_METADATA_BLOCK_SIZE_SECTORS
    metadata_nr_blocks: int = 0
    compat_flags: int = 0
    compat_ro_flags: int = 0
    incompat_flags: int = 0

    @classmethod
    def unpack(cls, data: bytes | bytearray) -> "Superblock":
        f = _SB.unpack_from(data, 0)
        return cls(f[1], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10], f[11], f[12], f[13], f[14], f[15],
                   f[16], f[17], f[18])

    def pack_into(self, data: bytearray) -> None:
        """Every field but csum and blocknr (the validator stamps those); the rest of the block zeroed."""
        data[:] = bytes(len(data))
        _SB.pack_into(data, 0, 0, self.flags, 0, self.uuid, self.magic, self.version, self.time, self.trans_id,
                      self.held_root, self.data_sm_root, self.metadata_sm_root, self.data_mapping_root,
                      self.device_details_root, self.data_block_size, self.metadata_block_size,
                      self.metadata_nr_blocks, self.compat_flags, self.compat_ro_flags, self.incompat_flags)


@dataclass
class DeviceDetails:
    """``struct disk_device_details`` plus whether it changed since the last commit."""

    dev_id: int
    mapped_blocks: int = 0
    transaction_id: int = 0
    creation_time: int = 0
    snapshotted_time: int = 0
    changed: bool = False

    def pack(self) -> bytes:
        return _DETAILS.pack(self.mapped_blocks, self.transaction_id, self.creation_time, self.snapshotted_time)

    @classmethod
    def unpack(cls, dev_id: int, raw: bytes) -> "DeviceDetails":
        return cls(dev_id, *_DETAILS.unpack(raw))


@dataclass(frozen=True)
class LookupResult:
    """``dm_thin_lookup_result``: the data block, and whether a snapshot may still share it."""

    block: int
    shared: bool
    time: int


def pack_block_time(block: int, time: int) -> bytes:
    return ((block << 24) | (time & 0xFFFFFF)).to_bytes(8, "little")


def unpack_block_time(raw: bytes) -> tuple[int, int]:
    v = int.from_bytes(raw, "little")
    return v >> 24, v & 0xFFFFFF


def _sb_all_zeroes(bm: BlockManager) -> bool:
    blk = bm.read_lock(THIN_SUPERBLOCK_LOCATION, NO_VALIDATOR)
    try:
        return not any(blk.data)
    finally:
        bm.unlock(blk)


class PoolMetadata:
    """``struct dm_pool_metadata``: one pool's metadata device, opened or formatted.

    ``data_block_size`` is in sectors and must match a formatted device's.  ``format_device``
    formats a device whose superblock is all zeroes (else such a device is refused, -EPERM).
    ``log`` receives the kernel's log lines without the ``device-mapper: `` prefix.
    """

    def __init__(self, path: str | Store, data_block_size: int, *, format_device: bool = True, read_only: bool = False,
                 durable: bool = True, log: Callable[[str], None] | None = None):
        self.path = path
        self.data_block_size = data_block_size
        self.read_only = read_only
        self._log = log or (lambda line: None)
        self.fail_io = False
        self._open_counts: dict[int, int] = {}
        self.bm = BlockManager(path, read_only=read_only, durable=durable, log=self._log)
        try:
            self._create_objects(format_device)
        except BaseException:
            self.bm.close()
            raise
        self._set_metadata_reserve()

    def log(self, message: str) -> None:
        self._log("thin metadata: " + message)

    # -- open / format ----------------------------------------------------------------------

    def _setup_btrees(self) -> None:
        data_sm = self.data_sm
        tm = self.tm

        def data_inc(v: bytes) -> None:
            data_sm.inc(int.from_bytes(v, "little") >> 24)

        def data_dec(v: bytes) -> None:
            data_sm.dec(int.from_bytes(v, "little") >> 24)

        def data_equal(a: bytes, b: bytes) -> bool:
            return int.from_bytes(a, "little") >> 24 == int.from_bytes(b, "little") >> 24

        data_vt = ValueType(8, inc=data_inc, dec=data_dec, equal=data_equal)
        self.info = BTreeInfo(tm, data_vt, levels=2)
        self.bl_info = BTreeInfo(tm, data_vt)
        bl_info = self.bl_info
        self.tl_info = BTreeInfo(tm, ValueType(8, inc=lambda v: tm.inc(int.from_bytes(v, "little")),
                                               dec=lambda v: bl_info.delete(int.from_bytes(v, "little")),
                                               equal=lambda a, b: a == b))
        self.details_info = BTreeInfo(tm, ValueType(_DETAILS.size))

    def _create_objects(self, format_device: bool) -> None:
        if self.bm.nr_blocks == 0:
            raise DMError(errno.EINVAL, "metadata device too small")
        self.tm = TransactionManager(self.bm)
        if _sb_all_zeroes(self.bm):
            if not format_device:
                raise DMError(errno.EPERM, "metadata device is not formatted")
            self._format()
        else:
            self._open()
        self._begin_transaction()

    def _format(self) -> None:
        if self.read_only:
            raise DMError(errno.EPERM, "cannot format read-only metadata")
        bdev_sectors = min(self.bm.nr_blocks * THIN_METADATA_BLOCK_SIZE_SECTORS, THIN_METADATA_MAX_SECTORS)
        self.metadata_sm = MetadataSpaceMap.create(self.tm, self.bm.nr_blocks)
        self.data_sm = DiskSpaceMap.create(self.tm, 0)
        self._setup_btrees()
        self.sb = Superblock(data_block_size=self.data_block_size,
                             metadata_nr_blocks=bdev_sectors // THIN_METADATA_BLOCK_SIZE_SECTORS)
        self.sb.data_mapping_root = self.info.empty()
        self.sb.device_details_root = self.details_info.empty()
        self.devices: dict[int, DeviceDetails] = {}
        self.root = self.sb.data_mapping_root
        self.details_root = self.sb.device_details_root
        self.time = 0
        self.trans_id = 0
        self.flags = 0
        self._commit()

    def _read_superblock(self) -> Superblock:
        try:
            blk = self.bm.read_lock(THIN_SUPERBLOCK_LOCATION, SB_VALIDATOR)
        except MetadataError:
            self.log("couldn't read superblock")  # after the validator's and the block manager's lines
            raise
        try:
            return Superblock.unpack(blk.data)
        finally:
            self.bm.unlock(blk)

    def _open(self) -> None:
        sb = self._read_superblock()
        if sb.data_block_size != self.data_block_size:
            msg = "changing the data block size (from %d to %d) is not supported" % (
                sb.data_block_size, self.data_block_size)
            self.log(msg)
            raise DMError(errno.EINVAL, msg)
        features = sb.incompat_flags & ~THIN_FEATURE_INCOMPAT_SUPP
        if features:
            msg = "could not access metadata due to unsupported optional features (%x)." % features
            self.log(msg)
            raise DMError(errno.EINVAL, msg)
        features = sb.compat_ro_flags & ~THIN_FEATURE_COMPAT_RO_SUPP
        if features and not self.read_only:
            msg = "could not access metadata RDWR due to unsupported optional features (%x)." % features
            self.log(msg)
            raise DMError(errno.EINVAL, msg)
        try:
            self.metadata_sm = MetadataSpaceMap.open(self.tm, sb.metadata_sm_root)
        except DMError:
            self.log("tm_open_with_sm failed")
            raise
        try:
            self.data_sm = DiskSpaceMap.open(self.tm, sb.data_sm_root)
        except DMError:
            self.log("sm_disk_open failed")
            raise
        self._setup_btrees()

    def _begin_transaction(self) -> None:
        sb = self.sb = self._read_superblock()
        self.time = sb.time
        self.root = sb.data_mapping_root
        self.details_root = sb.device_details_root
        self.trans_id = sb.trans_id
        self.flags = sb.flags
        self.devices = {}

    def _set_metadata_reserve(self) -> None:
        self.metadata_reserve = min(METADATA_RESERVE_MAX_BLOCKS, self.metadata_sm.nr_blocks // 10)

    def close(self) -> None:
        """Commit what is pending (unless read-only or failed) and release the device."""
        try:
            if not self.read_only and not self.fail_io and not self.bm.closed:
                self.commit()
        finally:
            self.bm.close()

    def __enter__(self) -> "PoolMetadata":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commit / abort ---------------------------------------------------------------------

    def _check_io(self) -> None:
        if self.fail_io:
            raise DMError(errno.EINVAL, "pool metadata failed")

    def _write_changed_details(self) -> None:
        for td in sorted(self.devices.values(), key=lambda d: d.dev_id):
            if td.changed:
                self.details_root, _ = self.details_info.insert(self.details_root, [td.dev_id], td.pack())
                td.changed = False

    def _commit(self) -> None:
        self._write_changed_details()
        self.data_sm.commit()
        self.tm.pre_commit()
        sb = self.sb
        sb.metadata_sm_root = self.metadata_sm.root_bytes()
        sb.data_sm_root = self.data_sm.root_bytes()
        sb.time = self.time
        sb.data_mapping_root = self.root
        sb.device_details_root = self.details_root
        sb.trans_id = self.trans_id
        sb.flags = self.flags
        blk = self.bm.write_lock_zero(THIN_SUPERBLOCK_LOCATION, SB_VALIDATOR)
        sb.pack_into(blk.data)
        self.tm.commit(blk)
        self.data_sm.transaction_committed()

    def commit(self) -> None:
        """``dm_pool_commit_metadata``: make everything so far durable, superblock last."""
        self._check_io()
        if self.read_only:
            raise DMError(errno.EPERM, "metadata is read only")
        try:
            self._commit()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """``dm_pool_abort_metadata``: forget everything since the last commit and reopen it
        (on a fresh block manager in 6.1: writable again unless opened read-only)."""
        self.tm.abort()
        self.bm.invalidate()
        self.bm.read_only = self.read_only
        try:
            self.tm = TransactionManager(self.bm)
            self._open()
            self._begin_transaction()
        except BaseException:
            self.fail_io = True
            raise

    # -- devices ----------------------------------------------------------------------------

    def _details(self, dev_id: int) -> DeviceDetails | None:
        td = self.devices.get(dev_id)
        if td is not None:
            return td
        raw = self.details_info.lookup_or_none(self.details_root, [dev_id])
        if raw is None:
            return None
        td = self.devices[dev_id] = DeviceDetails.unpack(dev_id, raw)
        return td

    def _device(self, dev_id: int) -> DeviceDetails:
        td = self._details(dev_id)
        if td is None:
            raise NoData("thin device %d does not exist" % dev_id)
        return td

    def device_exists(self, dev_id: int) -> bool:
        return self._details(dev_id) is not None

    def device_details(self, dev_id: int) -> DeviceDetails:
        self._check_io()
        td = self._device(dev_id)
        return DeviceDetails(td.dev_id, td.mapped_blocks, td.transaction_id, td.creation_time, td.snapshotted_time,
                             td.changed)

    def device_ids(self) -> list[int]:
        """Every thin device, committed or created in this transaction."""
        ids = {k for k, _ in self.details_info.items(self.details_root)}
        ids.update(self.devices)
        return sorted(ids)

    def _new_device(self, dev_id: int) -> DeviceDetails:
        td = DeviceDetails(dev_id, 0, self.trans_id, self.time, self.time, changed=True)
        self.devices[dev_id] = td
        return td

    @staticmethod
    def _check_dev_id(dev_id: int) -> None:
        if not 0 <= dev_id <= MAX_DEV_ID:
            raise DMError(errno.EINVAL, "invalid thin device id %d" % dev_id)

    def create_thin(self, dev_id: int) -> None:
        """``dm_pool_create_thin``: a new device with no mappings (-EEXIST if the id is taken)."""
        self._check_io()
        self._check_dev_id(dev_id)
        if self._details(dev_id) is not None:
            raise DMError(errno.EEXIST, "thin device %d already exists" % dev_id)
        dev_root = self.bl_info.empty()
        self.root, _ = self.tl_info.insert(self.root, [dev_id], dev_root.to_bytes(8, "little"))
        self._new_device(dev_id)

    def create_snap(self, dev_id: int, origin_id: int) -> None:
        """``dm_pool_create_snap``: ``dev_id`` shares every mapping of ``origin_id`` (one reference on its tree)."""
        self._check_io()
        self._check_dev_id(dev_id)
        if self._details(dev_id) is not None:
            raise DMError(errno.EEXIST, "thin device %d already exists" % dev_id)
        raw = self.tl_info.lookup_or_none(self.root, [origin_id])
        if raw is None:
            raise NoData("origin thin device %d does not exist" % origin_id)
        origin_root = int.from_bytes(raw, "little")
        self.tm.inc(origin_root)
        self.root, _ = self.tl_info.insert(self.root, [dev_id], raw)
        self.time += 1
        td = self._new_device(dev_id)
        origin = self._device(origin_id)
        origin.changed = True
        origin.snapshotted_time = self.time
        td.mapped_blocks = origin.mapped_blocks
        td.snapshotted_time = self.time

    def open_device(self, dev_id: int) -> None:
        """``dm_pool_open_thin_device``: a user (a thin target) holds the device (-ENODATA if none)."""
        self._check_io()
        self._device(dev_id)
        self._open_counts[dev_id] = self._open_counts.get(dev_id, 0) + 1

    def close_device(self, dev_id: int) -> None:
        n = self._open_counts.get(dev_id, 0) - 1
        if n > 0:
            self._open_counts[dev_id] = n
        else:
            self._open_counts.pop(dev_id, None)

    def delete_thin(self, dev_id: int) -> None:
        """``dm_pool_delete_thin_device``: drop a device, its mappings and the data only it held
        (-EBUSY while a thin target has it open)."""
        self._check_io()
        self._device(dev_id)
        if self._open_counts.get(dev_id):
            raise DMError(errno.EBUSY, "thin device %d is open" % dev_id)
        self.devices.pop(dev_id, None)
        if self.details_info.lookup_or_none(self.details_root, [dev_id]) is not None:
            self.details_root = self.details_info.remove(self.details_root, [dev_id])
        self.root = self.tl_info.remove(self.root, [dev_id])

    def set_transaction_id(self, current_id: int, new_id: int) -> None:
        """``dm_pool_set_metadata_transaction_id``: compare and set."""
        self._check_io()
        if self.trans_id != current_id:
            self.log("mismatched transaction id")
            raise DMError(errno.EINVAL, "mismatched transaction id")
        self.trans_id = new_id

    @property
    def transaction_id(self) -> int:
        return self.trans_id

    # -- metadata snapshot ------------------------------------------------------------------

    def reserve_metadata_snap(self) -> int:
        """``dm_pool_reserve_metadata_snap``: commit, then hold a copy of the superblock and its trees."""
        self._check_io()
        self.commit()
        if self.sb.held_root:
            # (the 6.1 kernel leaves no trace of the refused copy in the metadata: checked first)
            self.log("Pool metadata snapshot already exists: release this before taking another.")
            raise DMError(errno.EBUSY, "Pool metadata snapshot already exists: release this before taking another.")
        self.metadata_sm.inc(THIN_SUPERBLOCK_LOCATION)
        copy, inc = self.tm.shadow_block(THIN_SUPERBLOCK_LOCATION, SB_VALIDATOR)
        assert inc
        held = copy.location
        data = copy.data
        data[64:64 + 2 * SPACE_MAP_ROOT_SIZE] = bytes(2 * SPACE_MAP_ROOT_SIZE)
        snap = Superblock.unpack(data)
        self.tm.unlock(copy)
        self.tm.inc(snap.data_mapping_root)
        self.tm.inc(snap.device_details_root)
        self.sb.held_root = held
        return held

    def release_metadata_snap(self) -> None:
        """``dm_pool_release_metadata_snap``: drop the held copy and whatever only it kept."""
        self._check_io()
        held = self.sb.held_root
        self.sb.held_root = 0
        if not held:
            self.log("No pool metadata snapshot found: nothing to release.")
            raise DMError(errno.EINVAL, "No pool metadata snapshot found: nothing to release.")
        blk = self.tm.peek(held, SB_VALIDATOR)
        snap = Superblock.unpack(blk.data)
        self.info.delete(snap.data_mapping_root)
        self.details_info.delete(snap.device_details_root)
        self.metadata_sm.dec(held)

    @property
    def held_root(self) -> int:
        """``dm_pool_get_metadata_snap``: the held superblock copy's block, 0 if none."""
        return self.sb.held_root

    # -- mappings ---------------------------------------------------------------------------

    def find_block(self, dev_id: int, vblock: int) -> LookupResult | None:
        """``dm_thin_find_block``: where ``vblock`` of a device lives, or None if unmapped."""
        self._check_io()
        td = self._device(dev_id)
        raw = self.info.lookup_or_none(self.root, [dev_id, vblock])
        if raw is None:
            return None
        block, time = unpack_block_time(raw)
        return LookupResult(block, td.snapshotted_time > time, time)

    def mappings(self, dev_id: int, start: int = 0) -> Iterator[tuple[int, int, int]]:
        """Every (virtual block, data block, time) of a device from ``start``, in order."""
        self._check_io()
        self._device(dev_id)
        raw = self.tl_info.lookup(self.root, [dev_id])
        for vblock, v in self.bl_info.items(int.from_bytes(raw, "little"), start):
            block, time = unpack_block_time(v)
            yield vblock, block, time

    def find_next_mapped_block(self, dev_id: int, vblock: int) -> tuple[int, LookupResult] | None:
        td = self._device(dev_id)
        for vb, block, time in self.mappings(dev_id, vblock):
            return vb, LookupResult(block, td.snapshotted_time > time, time)
        return None

    def insert_block(self, dev_id: int, vblock: int, data_block: int) -> None:
        """``dm_thin_insert_block``: map ``vblock`` to an allocated data block (the mapping owns its reference)."""
        self._check_io()
        td = self._device(dev_id)
        if not 0 <= data_block < self.data_sm.nr_blocks:
            raise DMError(errno.EINVAL, "data block %d beyond the data device (%d blocks)"
                          % (data_block, self.data_sm.nr_blocks))
        self.root, inserted = self.info.insert(self.root, [dev_id, vblock], pack_block_time(data_block, self.time))
        td.changed = True
        if inserted:
            td.mapped_blocks += 1

    def remove_block(self, dev_id: int, vblock: int) -> None:
        """``dm_thin_remove_block``: unmap ``vblock`` (-ENODATA if unmapped); its data block loses a reference."""
        self._check_io()
        td = self._device(dev_id)
        self.root = self.info.remove(self.root, [dev_id, vblock])
        td.mapped_blocks -= 1
        td.changed = True

    def remove_range(self, dev_id: int, begin: int, end: int) -> int:
        """``dm_thin_remove_range``: unmap every mapped block in [begin, end); returns how many.

        As ``__remove_range``: the device's tree leaves the top level (a reference kept), runs
        of mapped blocks are removed leaf by leaf, and the tree goes back in."""
        self._check_io()
        td = self._device(dev_id)
        raw = self.tl_info.lookup(self.root, [dev_id])
        mapping_root = int.from_bytes(raw, "little")
        self.tm.inc(mapping_root)
        self.root = self.tl_info.remove(self.root, [dev_id])
        total = 0
        while begin < end:
            nxt = self.bl_info.lookup_next(mapping_root, begin)
            if nxt is None:
                break
            begin = nxt[0]
            if begin >= end:
                break
            mapping_root, count, begin = self.bl_info.remove_leaves(mapping_root, begin, end)
            total += count
        td.mapped_blocks -= total
        td.changed = True
        self.root, _ = self.tl_info.insert(self.root, [dev_id], mapping_root.to_bytes(8, "little"))
        return total

    def find_mapped_range(self, dev_id: int, begin: int, end: int) -> tuple[int, int, int, bool] | None:
        """``dm_thin_find_mapped_range``: the first run in [begin, end) of virtual blocks mapped
        to consecutive data blocks with one sharing status: (virt begin, virt end, data begin,
        maybe shared), or None."""
        self._check_io()
        if end < begin:
            return None
        found = self.find_next_mapped_block(dev_id, begin)
        if found is None:
            return None
        begin, first = found
        if begin >= end:
            return None
        virt_begin, data_begin, shared = begin, first.block, first.shared
        begin += 1
        data_end = data_begin + 1
        while begin != end:
            r = self.find_block(dev_id, begin)
            if r is None or r.block != data_end or r.shared != shared:
                break
            data_end += 1
            begin += 1
        return virt_begin, begin, data_begin, shared

    def highest_mapped_block(self, dev_id: int) -> int | None:
        """``dm_thin_get_highest_mapped_block``: None if the device maps nothing."""
        self._check_io()
        self._device(dev_id)
        raw = self.tl_info.lookup(self.root, [dev_id])
        found = self.bl_info.find_highest(int.from_bytes(raw, "little"))
        return None if found is None else found[0]

    def changed_this_transaction(self) -> bool:
        return any(td.changed for td in self.devices.values())

    # -- data blocks ------------------------------------------------------------------------

    def alloc_data_block(self) -> int:
        """``dm_pool_alloc_data_block``: a free data block with one reference (-ENOSPC if none)."""
        self._check_io()
        return self.data_sm.new_block()

    def block_is_shared(self, data_block: int) -> bool:
        return self.data_sm.get_count(data_block) > 1

    def inc_data_range(self, begin: int, end: int) -> None:
        for b in range(begin, end):
            self.data_sm.inc(b)

    def dec_data_range(self, begin: int, end: int) -> None:
        for b in range(begin, end):
            self.data_sm.dec(b)

    # -- counts for status ------------------------------------------------------------------

    def free_data_blocks(self) -> int:
        return self.data_sm.nr_free()

    def data_dev_size(self) -> int:
        """Data blocks the pool knows of (``dm_pool_get_data_dev_size``)."""
        return self.data_sm.nr_blocks

    def free_metadata_blocks(self) -> int:
        """Free metadata blocks as status reports them: the commit reserve excluded."""
        free = self.metadata_sm.nr_free()
        return 0 if free < self.metadata_reserve else free - self.metadata_reserve

    def metadata_dev_size(self) -> int:
        return self.metadata_sm.nr_blocks

    def resize_data_dev(self, new_nr_blocks: int) -> None:
        """``dm_pool_resize_data_dev``: grow the data space map (never shrink)."""
        self._check_io()
        old = self.data_sm.nr_blocks
        if new_nr_blocks == old:
            return
        if new_nr_blocks < old:
            self.log("cannot reduce size of space map")
            raise DMError(errno.EINVAL, "cannot reduce size of space map")
        self.data_sm.extend(new_nr_blocks - old)

    def resize_metadata_dev(self, new_nr_blocks: int) -> None:
        """``dm_pool_resize_metadata_dev``: grow onto a larger metadata device."""
        self._check_io()
        self.bm.refresh_size()
        new_nr_blocks = min(new_nr_blocks, METADATA_MAX_BLOCKS, self.bm.nr_blocks)
        old = self.metadata_sm.nr_blocks
        if new_nr_blocks == old:
            return
        if new_nr_blocks < old:
            self.log("cannot reduce size of space map")
            raise DMError(errno.EINVAL, "cannot reduce size of space map")
        self.metadata_sm.extend(new_nr_blocks - old)
        self._set_metadata_reserve()

    def register_metadata_threshold(self, threshold: int, fn: Callable[[], None]) -> None:
        """``dm_pool_register_metadata_threshold``: ``fn`` when free metadata blocks (the
        reserve included) fall to ``threshold``."""
        self._check_io()
        self.metadata_sm.register_threshold(threshold, fn)

    def set_read_only(self, read_only: bool) -> None:
        """``dm_pool_metadata_read_only`` / ``_read_write``: block writes refused (-EPERM) or
        allowed again (never on metadata opened read-only)."""
        self.bm.read_only = read_only or self.read_only

    # -- flags ------------------------------------------------------------------------------

    @property
    def needs_check(self) -> bool:
        return bool(self.flags & SUPERBLOCK_NEEDS_CHECK)

    def set_needs_check(self) -> None:
        """``dm_pool_metadata_set_needs_check``: flag the superblock for thin_check, committed now."""
        self._check_io()
        self.flags |= SUPERBLOCK_NEEDS_CHECK
        self.commit()


def format_metadata(path: str, data_block_size: int, nr_data_blocks: int = 0, *, durable: bool = True) -> None:
    """Zero a metadata device's superblock and format it for a pool of ``nr_data_blocks``."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes(METADATA_BLOCK_SIZE), 0)
    finally:
        os.close(fd)
    with PoolMetadata(path, data_block_size, durable=durable) as md:
        md.resize_data_dev(nr_data_blocks)


# -- consistency check (our own, before thin_check sees it) ----------------------------------

class RefCounter:
    """Expected reference counts from walking the structures, and the problems found on the way."""

    def __init__(self, md: PoolMetadata | None = None):
        self.md = md
        self.meta: dict[int, int] = {}
        self.data: dict[int, int] = {}
        self.problems: list[str] = []

    def ref(self, b: int) -> bool:
        """Count a reference to metadata block ``b``; whether this is the first (walk below it)."""
        self.meta[b] = self.meta.get(b, 0) + 1
        return self.meta[b] == 1

    def tree(self, info: BTreeInfo, root: int, on_value: Callable[[int, bytes], None] | None = None,
             lo: int = 0, is_root: bool = True) -> None:
        if not self.ref(root):
            return
        try:
            n = info.read_node(root)
        except DMError as e:
            self.problems.append("block %d: %s" % (root, e.message))
            return
        keys = list(n.keys)
        if keys != sorted(set(keys)):
            self.problems.append("block %d: keys out of order" % root)
        if keys and keys[0] < lo:
            self.problems.append("block %d: lowest key %d below the parent's %d" % (root, keys[0], lo))
        if not is_root and n.nr_entries < n.max_entries // 3:
            self.problems.append("block %d: %d entries, fewer than %d" % (root, n.nr_entries, n.max_entries // 3))
        if n.is_leaf:
            if n.value_size != info.value_type.size:
                self.problems.append("block %d: value size %d, wants %d" % (root, n.value_size, info.value_type.size))
            if on_value is not None:
                for i in range(n.nr_entries):
                    on_value(n.keys[i], n.value(i))
            return
        for i in range(n.nr_entries):
            self.tree(info, n.value64(i), on_value, n.keys[i], False)

    def space_map(self, sm: DiskSpaceMap | MetadataSpaceMap) -> None:
        for ie in sm.bitmaps:
            if ie.location:
                self.ref(ie.location)
        self.tree(sm.ref_info, sm.ref_count_root)
        if isinstance(sm, DiskSpaceMap):
            self.tree(sm.index_info, sm.index_root)
        else:
            self.ref(sm.index_location)

    def mapping(self, root: int) -> None:
        md = self.md
        assert md is not None

        def on_data(_vb: int, v: bytes) -> None:
            b = int.from_bytes(v, "little") >> 24
            self.data[b] = self.data.get(b, 0) + 1

        def on_dev(_dev: int, v: bytes) -> None:
            self.tree(md.bl_info, int.from_bytes(v, "little"), on_data)

        self.tree(md.tl_info, root, on_dev)


def check_metadata(md: PoolMetadata, *, allocated: bool = True) -> list[str]:
    """Problems in *committed* metadata: tree shape and every reference count, metadata and data.

    Walks what the superblock names (call right after a commit): node order and fill, value
    sizes, and counts recomputed from every reference, compared with both space maps.
    ``allocated`` also compares the roots' ``nr_allocated`` with the blocks in use (thin_restore
    writes a metadata count one higher, which thin_check accepts).
    """
    c = RefCounter(md)
    c.ref(THIN_SUPERBLOCK_LOCATION)
    c.mapping(md.root)
    c.tree(md.details_info, md.details_root)
    c.space_map(md.data_sm)
    c.space_map(md.metadata_sm)
    if md.sb.held_root:
        c.ref(md.sb.held_root)
        snap = Superblock.unpack(md.tm.peek(md.sb.held_root, SB_VALIDATOR).data)
        c.mapping(snap.data_mapping_root)
        c.tree(md.details_info, snap.device_details_root)
    for name, want, sm in (("metadata", c.meta, md.metadata_sm), ("data", c.data, md.data_sm)):
        have = sm.counts()
        for b in sorted(set(want) | set(have)):
            if want.get(b, 0) != have.get(b, 0):
                c.problems.append("%s block %d: count %d, referenced %d times" % (name, b, have.get(b, 0),
                                                                                 want.get(b, 0)))
        if allocated and sm.nr_allocated != len(have):
            c.problems.append("%s space map: nr_allocated %d, %d blocks in use" % (name, sm.nr_allocated, len(have)))
    return c.problems
