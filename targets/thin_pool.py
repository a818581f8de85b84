"""thin-pool: a pool of data blocks shared by thin devices, with the kernel's metadata.

Table: ``<metadata dev> <data dev> <data block size> <low water mark> [<#features> <feature>*]``

``data block size`` is in sectors (a multiple of 128, 64 KiB to 1 GiB), ``low water mark``
in data blocks (an event when free blocks fall to it); features are ``skip_block_zeroing``,
``ignore_discard``, ``no_discard_passdown``, ``read_only`` and ``error_if_no_space``.
The metadata device holds dm-thin-metadata's format (:mod:`dmsim.thin_metadata`, checked
with thin-provisioning-tools): an all-zero one is formatted at the first load.  I/O to the
pool device itself goes to the data device.

Status (info): ``<transaction id> <used>/<total> metadata blocks <used>/<total> data blocks
<held metadata root|-> <rw|ro|out_of_data_space> <ignore_discard|discard_passdown|
no_discard_passdown> <error_if_no_space|queue_if_no_space> <needs_check|-> <metadata low
watermark>``, committing first unless noflush (``Fail`` once the pool failed).  Messages:
``create_thin <id>``, ``create_snap <id> <origin id>``, ``delete <id>``,
``set_transaction_id <current> <new>``, ``reserve_metadata_snap``, ``release_metadata_snap``,
each committed on success.  The data device grows at resume to the pool target's length,
the metadata space map to the metadata device's.

Modes (6.1's ``set_pool_mode``): write; out-of-data-space (writes needing a block queue, or
fail with ``error_if_no_space``, until the data device grows); out-of-metadata-space, entered
at a commit that leaves no free metadata block beyond the reserve (min(4096, total/10)):
shown as ``ro`` and handled as read-only, left when the metadata device grows; read-only,
after a failed metadata operation (aborted to the last commit, ``needs_check`` set, which
only ``thin_check --clear-needs-check-flag`` on the inactive metadata clears); fail.  In the
read-only modes writes to mapped unshared blocks go on, discards complete unmapping nothing,
and a write that needs a block fails.  An allocation leaving min(1024, metadata blocks / 4)
or fewer free metadata blocks logs "reached low water mark for metadata device" and raises an
event, once per crossing.

Kernel: drivers/md/dm-thin.c (pool_ctr, pool_status, pool_message, pool_preresume).  Here a
metadata device that is an image file or a block device is read as a file; one that is a dm
device (lvm's ``_tmeta``, a linear) is held whole in memory, its writes sent down it at each
commit.  Provisioning is serialised pool-wide where the kernel locks per block (its bio
prison).
"""
from __future__ import annotations

import contextlib
import errno
import os
from typing import TYPE_CHECKING, Sequence

import trio

from dmsim.bio import Bio
from dmsim.errors import DMError, TargetError
from dmsim.kcopyd import Region
from dmsim.persistent_data import NoSpace
from dmsim.persistent_data.block_manager import ImageStore
from dmsim.thin_metadata import THIN_METADATA_MAX_SECTORS, PoolMetadata

from .base import STATUSTYPE_TABLE, Target, kstrtouint, passthrough

if TYPE_CHECKING:  # pragma: no cover
    from dmsim.blockdev import BlockDevice

DATA_DEV_BLOCK_SIZE_MIN_SECTORS = 128
DATA_DEV_BLOCK_SIZE_MAX_SECTORS = 2097152
MAX_DEV_ID = (1 << 24) - 1
COMMIT_PERIOD_SECONDS = 1.0
NO_SPACE_TIMEOUT_SECONDS = 60.0

PM_WRITE = "write"
PM_OUT_OF_DATA_SPACE = "out-of-data-space"
#: like read-only (and shown as it), but back to write mode when the metadata device grows
PM_OUT_OF_METADATA_SPACE = "out-of-metadata-space"
PM_READ_ONLY = "read-only"
PM_FAIL = "fail"
#: ``enum pool_mode``'s order: the kernel compares modes by how degraded they are
MODE_ORDER = {PM_WRITE: 0, PM_OUT_OF_DATA_SPACE: 1, PM_OUT_OF_METADATA_SPACE: 2, PM_READ_ONLY: 3, PM_FAIL: 4}
#: the names ``notify_of_pool_mode_change`` logs
MODE_NAMES = {PM_WRITE: "write", PM_OUT_OF_DATA_SPACE: "out-of-data-space", PM_OUT_OF_METADATA_SPACE: "read-only",
              PM_READ_ONLY: "read-only", PM_FAIL: "fail"}


def is_read_only_mode(mode: str) -> bool:
    """``is_read_only_pool_mode``: out of metadata space or read-only."""
    return mode in (PM_OUT_OF_METADATA_SPACE, PM_READ_ONLY)


def metadata_threshold_blocks(metadata_dev_sectors: int) -> int:
    """``calc_metadata_threshold``: a quarter of the metadata device, at most 4 MiB of blocks."""
    return min(1024, min(metadata_dev_sectors, THIN_METADATA_MAX_SECTORS) // 8 // 4)


class PoolFeatures:
    """``struct pool_features``."""

    def __init__(self) -> None:
        self.mode = PM_WRITE
        self.zero_new_blocks = True
        self.discard_enabled = True
        self.discard_passdown = True
        self.error_if_no_space = False

    def copy(self) -> "PoolFeatures":
        pf = PoolFeatures()
        pf.__dict__.update(self.__dict__)
        return pf

    def emit(self) -> str:
        """``emit_flags``: the count, then each feature, each followed by a space."""
        words = []
        if not self.zero_new_blocks:
            words.append("skip_block_zeroing")
        if not self.discard_enabled:
            words.append("ignore_discard")
        if not self.discard_passdown:
            words.append("no_discard_passdown")
        if self.mode == PM_READ_ONLY:
            words.append("read_only")
        if self.error_if_no_space:
            words.append("error_if_no_space")
        return "".join(w + " " for w in ["%d" % len(words)] + words)


def parse_pool_features(args: list[str]) -> PoolFeatures:
    """``parse_pool_features``: ``<#args> <arg>*`` after the four fixed arguments."""
    pf = PoolFeatures()
    if not args:
        return pf
    n = kstrtouint(args[0])
    if n is None or n > 4 or n > len(args) - 1:
        raise TargetError("Invalid number of pool feature arguments")
    for word in args[1:1 + n]:
        w = word.lower()
        if w == "skip_block_zeroing":
            pf.zero_new_blocks = False
        elif w == "ignore_discard":
            pf.discard_enabled = False
        elif w == "no_discard_passdown":
            pf.discard_passdown = False
        elif w == "read_only":
            pf.mode = PM_READ_ONLY
        elif w == "error_if_no_space":
            pf.error_if_no_space = True
        else:
            raise TargetError("Unrecognised pool feature requested")
    return pf


def read_dev_id(word: str) -> int | None:
    """``read_dev_id``: a decimal id up to 2^24 - 1."""
    if not word.isascii() or not word.isdigit():
        return None
    v = int(word)
    return v if v <= MAX_DEV_ID else None


# -- the pool object (``struct pool``), one per pool device ----------------------------------

_pools: dict[tuple[int, int], "Pool"] = {}


def _key(ctx, md) -> tuple[int, int]:
    return id(ctx.manager), id(md)


def lookup_pool(ctx, pool_md) -> "Pool | None":
    """``__pool_table_lookup``: the pool a mapped device is, if any."""
    return _pools.get(_key(ctx, pool_md))


class Pool:
    """What a pool device's tables and its thin devices share: metadata, data device, mode."""

    def __init__(self, ctx, pool_md, metadata_dev: "BlockDevice", data_dev: "BlockDevice",
                 sectors_per_block: int, md: PoolMetadata, md_store: ImageStore | None = None):
        self.ctx = ctx
        self.pool_md = pool_md
        self.metadata_dev = metadata_dev
        self.data_dev = data_dev
        self.sectors_per_block = sectors_per_block
        self.md = md
        # metadata on a dm device: its image, whose queued writes drain_metadata() sends down
        self.md_store = md_store
        self._drain_lock = trio.Lock()
        self.pf = PoolFeatures()
        self.requested_error_if_no_space = False
        self.low_water_blocks = 0
        self.low_water_triggered = False
        self.suspended = True
        self.refs = 1
        self.lock = trio.Lock()
        self.kc = None
        self.space_event = trio.Event()
        self.ti: ThinPool | None = None
        self.held: list[BlockDevice] = []    # devices the pool holds beyond its tables
        self.committer_token = 0
        # I/O to mapped blocks outside the pool lock; a commit waits for it to drain, so a
        # block freed meanwhile cannot be reallocated while a stale read or write is in flight
        self.inflight = 0
        self.draining = False
        self._drained: trio.Event | None = None
        self._commit_done = trio.Event()

    @property
    def name(self) -> str:
        """``dm_device_name(pool->pool_md)``: the pool device's major:minor, as log lines show it."""
        return self.pool_md.mm

    def log(self, message: str) -> None:
        self.ctx.log("thin: " + message)

    def mode(self) -> str:
        return self.pf.mode

    def is_read_only(self) -> bool:
        return is_read_only_mode(self.pf.mode)

    def set_mode(self, mode: str) -> None:
        """``set_pool_mode``: never to write mode while needs_check is set, never out of fail
        mode; the metadata refuses changes in the read-only modes; an event and the kernel's
        log line when the mode changes."""
        old = self.pf.mode
        if mode == PM_WRITE and self.md.needs_check:
            self.log("%s: unable to switch pool to write mode until repaired." % self.name)
            mode = old if old != mode else PM_READ_ONLY
        if old == PM_FAIL:
            mode = old
        if mode == PM_FAIL or is_read_only_mode(mode):
            self.md.set_read_only(True)
        elif mode == PM_WRITE:
            self.pf.error_if_no_space = self.requested_error_if_no_space
            self.md.set_read_only(False)
        self.pf.mode = mode
        if self.ti is not None:
            self.ti.adjusted_mode = mode  # so that a resume of this table keeps the mode
        if mode != old:
            self.notify_mode_change()

    def notify_mode_change(self) -> None:
        """``notify_of_pool_mode_change``: an event, then the log line."""
        if self.ti is not None:
            self.ti.ctx.event()
        extra = ""
        if self.pf.mode == PM_OUT_OF_DATA_SPACE:
            extra = " (error IO)" if self.pf.error_if_no_space else " (queue IO)"
        self.log("%s: switching pool to %s%s mode" % (self.name, MODE_NAMES[self.pf.mode], extra))

    def metadata_low(self) -> None:
        """``metadata_low_callback``: the metadata device is getting full."""
        self.log("%s: reached low water mark for metadata device: sending event." % self.name)
        if self.ti is not None:
            self.ti.ctx.event()

    def check_for_metadata_space(self) -> None:
        """After a commit: no free metadata blocks (beyond the reserve) stops changes until
        the metadata device grows."""
        if not self.md.free_metadata_blocks() and not self.is_read_only():
            self.log("No free metadata blocks")
            self.set_mode(PM_OUT_OF_METADATA_SPACE)

    def check_for_data_space(self) -> None:
        """After a commit: an out-of-data-space pool with free blocks again writes again."""
        if self.pf.mode == PM_OUT_OF_DATA_SPACE and self.md.free_data_blocks():
            self.set_mode(PM_WRITE)
            self.space_event.set()
            self.space_event = trio.Event()

    async def drain_metadata(self) -> None:
        """Send the metadata writes and syncs queued so far down a dm metadata device, in order."""
        store = self.md_store
        if store is None:
            return
        async with self._drain_lock:
            while store.pending:
                for op in store.take_pending():
                    if op is None:
                        await self.metadata_dev.flush()
                    else:
                        await self.metadata_dev.write(op[0] // 512, op[1])

    def _drain_soon(self) -> None:
        """A commit made by plain calls (status): its queued writes go down in a task of the
        bound table (the first table, which made the pool, may be gone)."""
        if self.md_store is not None and self.md_store.pending:
            ctx = self.ti.ctx if self.ti is not None else self.ctx
            ctx.start_task(self._drain_task, name="thin-pool metadata writes")

    async def _drain_task(self) -> None:
        try:
            await self.drain_metadata()
        except DMError as e:
            if self.pf.mode != PM_FAIL:
                self.metadata_operation_failed("dm_pool_commit_metadata", e)

    async def commit(self) -> None:
        """``commit``: flush the data device, then commit the metadata.

        The metadata commit runs on the Trio thread, as plain calls: reads and status look
        the metadata up without the pool lock, so no other thread may change it meanwhile.
        """
        if MODE_ORDER[self.pf.mode] >= MODE_ORDER[PM_OUT_OF_METADATA_SPACE]:
            raise DMError(errno.EINVAL, "pool is read only")
        self.draining = True
        self._commit_done = trio.Event()
        try:
            while self.inflight:
                self._drained = trio.Event()
                await self._drained.wait()
            await self.data_dev.flush()
            try:
                self.md.commit()
                await self.drain_metadata()
            except DMError as e:
                self.metadata_operation_failed("dm_pool_commit_metadata", e)
                raise
        finally:
            self.draining = False
            self._drained = None
            self._commit_done.set()
        self.check_for_metadata_space()
        self.check_for_data_space()

    async def io_enter(self) -> None:
        """Start an I/O outside the pool lock (waits while a commit drains the others)."""
        while self.draining:
            await self._commit_done.wait()
        self.inflight += 1

    def io_exit(self) -> None:
        self.inflight -= 1
        if not self.inflight and self._drained is not None:
            self._drained.set()

    def metadata_operation_failed(self, op: str, e: DMError) -> None:
        """``metadata_operation_failed``: abort to the last commit, flag needs_check, go read-only."""
        self.log("%s: metadata operation '%s' failed: error = %d" % (self.name, op, -e.errno))
        self.log("%s: aborting current metadata transaction" % self.name)
        try:
            self.md.abort()
        except DMError:
            self.log("%s: failed to abort metadata transaction" % self.name)
            self.set_mode(PM_FAIL)
            return
        try:
            self.md.set_needs_check()
        except DMError:
            self.log("%s: failed to set 'needs_check' flag in metadata" % self.name)
            self.set_mode(PM_FAIL)
            return
        self._drain_soon()
        self.set_mode(PM_READ_ONLY)

    def try_commit_now(self) -> None:
        """pool_status's commit, as plain calls: only when nothing is half done and the data
        device can be flushed synchronously (an image file or block device)."""
        md = self.md
        if self.pf.mode != PM_WRITE or self.lock.locked() or self.inflight or self.draining or \
                not (md.changed_this_transaction() or md.bm.dirty_count()):
            return
        fd = getattr(self.data_dev, "fd", None)
        if fd is None:
            return
        try:
            if getattr(self.data_dev, "sync", False):
                os.fdatasync(fd)
            md.commit()
        except (OSError, DMError):
            return
        self._drain_soon()
        self.check_for_metadata_space()
        self.check_for_data_space()

    async def commit_locked(self) -> None:
        async with self.lock:
            await self.commit()

    async def committer(self, token: int) -> None:
        """The periodic commit (``COMMIT_PERIOD``): changes never wait longer than a second.
        One runs per pool: a newer table's resume starts another and this one stops."""
        while self.committer_token == token:
            await trio.sleep(COMMIT_PERIOD_SECONDS)
            if self.committer_token != token:
                return
            if self.suspended or self.pf.mode != PM_WRITE:
                continue
            async with self.lock:
                if self.md.changed_this_transaction() or self.md.bm.dirty_count():
                    with contextlib.suppress(DMError):
                        await self.commit()
                with contextlib.suppress(DMError):
                    await self.drain_metadata()

    async def alloc_data_block(self) -> int:
        """``alloc_data_block`` (pool lock held): low water event, a commit to free blocks,
        out-of-data-space mode; a commit before the metadata reserve is touched (which may
        leave the pool out of metadata space: the caller's mapping then fails)."""
        md = self.md
        if self.pf.mode != PM_WRITE:
            raise DMError(errno.EINVAL, "pool not in write mode")
        free = md.free_data_blocks()
        if free <= self.low_water_blocks and not self.low_water_triggered:
            self.log("%s: reached low water mark for data device: sending event." % self.name)
            self.low_water_triggered = True
            if self.ti is not None:
                self.ti.ctx.event()
        if not free:
            await self.commit()
            if not md.free_data_blocks():
                self.set_mode(PM_OUT_OF_DATA_SPACE)
                raise NoSpace("no free data blocks")
        try:
            b = md.alloc_data_block()
        except NoSpace:
            self.set_mode(PM_OUT_OF_DATA_SPACE)
            raise
        except DMError as e:
            self.metadata_operation_failed("dm_pool_alloc_data_block", e)
            raise
        if not md.free_metadata_blocks():
            await self.commit()
        return b

    async def wait_for_space(self) -> None:
        """Queue mode: wait for the pool to grow, or error once ``no_space_timeout`` passes."""
        if self.pf.error_if_no_space:
            raise DMError(errno.ENOSPC, "no free data blocks")
        with trio.move_on_after(NO_SPACE_TIMEOUT_SECONDS):
            await self.space_event.wait()
            return
        if self.pf.mode == PM_OUT_OF_DATA_SPACE and not self.pf.error_if_no_space:
            self.pf.error_if_no_space = True      # do_no_space_timeout
            self.notify_mode_change()
        raise DMError(errno.ENOSPC, "no free data blocks")

    def grew(self) -> None:
        self.space_event.set()
        self.space_event = trio.Event()
        if self.pf.mode == PM_OUT_OF_DATA_SPACE:
            self.set_mode(PM_WRITE)

    async def zero_block(self, b: int) -> None:
        spb = self.sectors_per_block
        assert self.kc is not None
        r, w = await self.kc.zero_async([Region(self.data_dev, b * spb, spb)])
        if r or w:
            raise DMError(errno.EIO, "zeroing data block %d failed" % b)

    async def copy_block(self, src_dev, src_sector: int, count: int, b: int) -> None:
        spb = self.sectors_per_block
        assert self.kc is not None
        r, w = await self.kc.copy_async(Region(src_dev, src_sector, count), [Region(self.data_dev, b * spb, count)])
        if r or w:
            raise DMError(errno.EIO, "copying to data block %d failed" % b)

    async def release(self) -> None:
        """One user fewer; the last one commits, closes the metadata and drops the pool."""
        self.refs -= 1
        if self.refs:
            return
        if _pools.get(_key(self.ctx, self.pool_md)) is self:
            del _pools[_key(self.ctx, self.pool_md)]
        try:
            if self.pf.mode == PM_WRITE or self.pf.mode == PM_OUT_OF_DATA_SPACE:
                await self.commit()
            await self.drain_metadata()
        except DMError:
            pass
        finally:
            self.md.fail_io = True  # committed above; close must not try again
            await trio.to_thread.run_sync(self.md.close)
            if self.kc is not None:
                await self.kc.destroy()
            for dev in self.held:
                self.ctx.manager.put_device(dev)
            self.held = []


class ThinPool(Target):
    name = "thin-pool"
    version = (1, 22, 0)
    module = "dm_thin_pool"
    singleton = True
    always_writeable = True
    immutable = True

    pool: Pool
    #: ``pt->adjusted_pf.mode``: what this table asks for, then the mode the pool reached under it
    adjusted_mode: str

    async def ctr(self, args: Sequence[str]) -> None:
        if len(args) < 4:
            raise TargetError("Invalid argument count")
        if args[0] == args[1]:
            raise TargetError("Error setting metadata or data device")
        pf = parse_pool_features(list(args[4:]))
        self.dev_names = (args[0], args[1])
        try:
            self.metadata_dev = self.ctx.get_device(args[0], pf.mode != PM_READ_ONLY)
        except DMError as e:
            raise TargetError("Error opening metadata block device", e.errno) from None
        if self.metadata_dev.size_sectors > THIN_METADATA_MAX_SECTORS:
            self.ctx.log("thin: Metadata device %s is larger than %d sectors: excess space will not be used."
                         % (self.metadata_dev.kname, THIN_METADATA_MAX_SECTORS))
        try:
            self.data_dev = self.ctx.get_device(args[1])
        except DMError as e:
            raise TargetError("Error getting data device", e.errno) from None
        bs = kstrtouint(args[2])
        if not bs or bs < DATA_DEV_BLOCK_SIZE_MIN_SECTORS or bs > DATA_DEV_BLOCK_SIZE_MAX_SECTORS or \
                bs & (DATA_DEV_BLOCK_SIZE_MIN_SECTORS - 1):
            raise TargetError("Invalid block size")
        w = args[3]
        if not w.isascii() or not w.lstrip("+").isdigit():
            raise TargetError("Invalid low water mark")
        self.low_water_blocks = int(w.lstrip("+"))
        self.requested_pf = pf
        self.adjusted_mode = pf.mode
        self.pool = await self._find_pool(bs, pf)
        if self.pool.refs > 1 and pf.discard_enabled != self.pool.pf.discard_enabled:
            await self.pool.release()
            raise TargetError("Discard support cannot be disabled once enabled")
        try:
            self.pool.md.register_metadata_threshold(metadata_threshold_blocks(self.metadata_dev.size_sectors),
                                                     self.pool.metadata_low)
        except DMError:
            await self.pool.release()
            raise TargetError("Error registering metadata threshold") from None
        self.max_io_len = 0

    async def _find_pool(self, bs: int, pf: PoolFeatures) -> Pool:
        """``__pool_find``: the pool of this device or of this metadata device, or a new one."""
        md_path = getattr(self.metadata_dev, "path", None)
        for pool in _pools.values():
            if pool.ctx.manager is self.ctx.manager and pool.metadata_dev is self.metadata_dev:
                if pool.pool_md is not self.ctx.md:
                    raise TargetError("metadata device already in use by a pool", errno.EBUSY)
                if pool.data_dev is not self.data_dev:
                    raise TargetError("data device already in use by a pool", errno.EBUSY)
                pool.refs += 1
                return pool
        existing = lookup_pool(self.ctx, self.ctx.md)
        if existing is not None:
            if existing.metadata_dev is not self.metadata_dev or existing.data_dev is not self.data_dev:
                raise TargetError("different pool cannot replace a pool")
            existing.refs += 1
            return existing
        store: ImageStore | None = None
        try:
            if not md_path:
                # a dm device: its contents held in memory, writes sent down at each commit
                n = min(self.metadata_dev.size_sectors, THIN_METADATA_MAX_SECTORS)
                store = ImageStore(await self.metadata_dev.read(0, n), self.metadata_dev.kname)
            durable = getattr(self.ctx.manager, "durability", "fsync") == "fsync"
            source = md_path or store
            assert source is not None
            md = await trio.to_thread.run_sync(lambda: PoolMetadata(
                source, bs, format_device=pf.mode != PM_READ_ONLY, read_only=pf.mode == PM_READ_ONLY,
                durable=durable, log=self.ctx.log))
        except DMError as e:
            raise TargetError("Error creating metadata object", e.errno) from None
        pool = Pool(self.ctx, self.ctx.md, self.metadata_dev, self.data_dev, bs, md, store)
        try:
            await pool.drain_metadata()    # a freshly formatted superblock
            pool.kc = await self.ctx.kcopyd_client()
        except BaseException:
            await trio.to_thread.run_sync(md.close)
            raise
        # the pool's own hold on its devices: it outlives this table while thins use it (a
        # shutdown may destroy the pool's device first), and its last commit needs them
        mgr = self.ctx.manager
        for name, dev, write in ((self.dev_names[0], self.metadata_dev, pf.mode != PM_READ_ONLY),
                                 (self.dev_names[1], self.data_dev, True)):
            try:
                again = mgr.get_device(name, write, resolved=getattr(self.ctx, "resolved", {}).get(name),
                                       cwd=getattr(self.ctx, "cwd", None))
            except DMError:
                continue
            if again is dev:
                pool.held.append(dev)
            else:
                mgr.put_device(again)
        _pools[_key(self.ctx, self.ctx.md)] = pool
        return pool

    async def dtr(self) -> None:
        if self.pool.ti is self:
            self.pool.ti = None
        await self.pool.release()

    async def preresume(self) -> None:
        """``pool_preresume``: take over the pool (features, low water), grow the data and metadata."""
        pool = self.pool
        # bind_control_target: the table's features, then its mode through set_pool_mode's
        # rules (a table resumed again keeps the mode the pool reached under it)
        old = pool.pf.mode
        new = self.adjusted_mode
        pool.ti = self
        pool.pf = self.requested_pf.copy()
        pool.pf.mode = old
        pool.requested_error_if_no_space = self.requested_pf.error_if_no_space
        pool.low_water_blocks = self.low_water_blocks
        md = pool.md
        if new == PM_WRITE and md.read_only:
            new = PM_READ_ONLY
        pool.set_mode(new)
        try:
            changed = self._maybe_resize_data_dev()
            changed = await self._maybe_resize_metadata_dev() or changed
        except DMError:
            if pool.pf.mode != PM_FAIL:
                raise
            return  # a failed pool resumes (to fail the I/O it holds)
        if changed:
            with contextlib.suppress(DMError):
                await pool.commit_locked()

    def _maybe_resize_data_dev(self) -> bool:
        """``maybe_resize_data_dev``: the table longer than the data space map grows it."""
        pool = self.pool
        md = pool.md
        data_size = self.len // pool.sectors_per_block
        sb_size = md.data_dev_size()
        if data_size < sb_size:
            self.ctx.log("thin: %s: pool target (%d blocks) too small: expected %d" % (pool.name, data_size, sb_size))
            raise DMError(errno.EINVAL)
        if data_size == sb_size or pool.is_read_only():
            return False
        if md.needs_check:
            self.ctx.log("thin: %s: unable to grow the data device until repaired." % pool.name)
            return False
        if sb_size:
            self.ctx.log("thin: %s: growing the data device from %d to %d blocks" % (pool.name, sb_size, data_size))
        try:
            md.resize_data_dev(data_size)
        except DMError as e:
            pool.metadata_operation_failed("dm_pool_resize_data_dev", e)
            raise
        pool.grew()
        return True

    async def _maybe_resize_metadata_dev(self) -> bool:
        """``maybe_resize_metadata_dev``: a grown metadata device grows the metadata space map,
        and takes a pool out of metadata space back to write mode (unless it needs a check)."""
        pool = self.pool
        md = pool.md
        meta_size = min(pool.metadata_dev.size_sectors, THIN_METADATA_MAX_SECTORS) // 8
        sb_meta = md.metadata_dev_size()
        if meta_size < sb_meta:
            self.ctx.log("thin: %s: metadata device (%d blocks) too small: expected %d"
                         % (pool.name, meta_size, sb_meta))
            raise DMError(errno.EINVAL)
        if meta_size == sb_meta:
            return False
        if md.needs_check:
            self.ctx.log("thin: %s: unable to grow the metadata device until repaired." % pool.name)
            return False
        self.ctx.log("thin: %s: growing the metadata device from %d to %d blocks" % (pool.name, sb_meta, meta_size))
        if pool.pf.mode == PM_OUT_OF_METADATA_SPACE:
            pool.set_mode(PM_WRITE)
        store = pool.md_store
        if store is not None and store.size_bytes() < meta_size * 8 * 512:
            have = store.size_bytes() // 512
            store.grow(await pool.metadata_dev.read(have, meta_size * 8 - have))
        try:
            md.resize_metadata_dev(meta_size)
        except DMError as e:
            pool.metadata_operation_failed("dm_pool_resize_metadata_dev", e)
            raise
        return True

    async def resume(self) -> None:
        pool = self.pool
        pool.low_water_triggered = False
        pool.suspended = False
        pool.committer_token += 1
        self.ctx.start_task(pool.committer, pool.committer_token, name="thin-pool commit")

    async def postsuspend(self) -> None:
        pool = self.pool
        pool.suspended = True
        if pool.pf.mode in (PM_WRITE, PM_OUT_OF_DATA_SPACE):
            with contextlib.suppress(DMError):
                await pool.commit_locked()

    async def map(self, bio: Bio):
        return await passthrough(self.data_dev, bio)

    def iterate_devices(self):
        return [(self.data_dev, 0, self.len)]

    # -- status -----------------------------------------------------------------------------

    def status(self, kind: str, noflush: bool = False) -> str:
        pool = self.pool
        if kind == STATUSTYPE_TABLE:
            return "%s %s %d %d %s" % (self.metadata_dev.ref, self.data_dev.ref, pool.sectors_per_block,
                                       self.low_water_blocks, self.requested_pf.emit())
        if pool.pf.mode == PM_FAIL:
            return "Fail"
        md = pool.md
        if not noflush and not pool.suspended:
            pool.try_commit_now()
        meta_total = md.metadata_dev_size()
        data_total = md.data_dev_size()
        out = "%d %d/%d %d/%d " % (md.transaction_id, meta_total - md.free_metadata_blocks(), meta_total,
                                   data_total - md.free_data_blocks(), data_total)
        out += "%d " % md.held_root if md.held_root else "- "
        if pool.pf.mode == PM_OUT_OF_DATA_SPACE:
            out += "out_of_data_space "
        elif pool.is_read_only():
            out += "ro "
        else:
            out += "rw "
        if not pool.pf.discard_enabled:
            out += "ignore_discard "
        elif pool.pf.discard_passdown:
            out += "discard_passdown "
        else:
            out += "no_discard_passdown "
        out += "error_if_no_space " if pool.pf.error_if_no_space else "queue_if_no_space "
        out += "needs_check " if md.needs_check else "- "
        out += "%d " % metadata_threshold_blocks(self.metadata_dev.size_sectors)
        return out

    # -- messages ---------------------------------------------------------------------------

    async def message(self, argv: Sequence[str]) -> str | None:
        pool = self.pool
        if MODE_ORDER[pool.pf.mode] >= MODE_ORDER[PM_OUT_OF_METADATA_SPACE]:
            self.ctx.log("thin: %s: unable to service pool target messages in READ_ONLY or FAIL mode" % pool.name)
            raise DMError(errno.EOPNOTSUPP)
        cmd = argv[0]
        want = {"create_thin": 2, "create_snap": 3, "delete": 2, "set_transaction_id": 3,
                "reserve_metadata_snap": 1, "release_metadata_snap": 1}.get(cmd.lower())
        if want is None:
            self.ctx.log("thin: Unrecognised thin pool target message received: %s" % cmd)
            raise DMError(errno.EINVAL)
        if len(argv) != want:
            self.ctx.log("thin: Incorrect number of arguments for '%s' message" % cmd)
            raise DMError(errno.EINVAL)
        async with pool.lock:
            await self._message(cmd.lower(), list(argv[1:]))
            with contextlib.suppress(DMError):
                await pool.commit()
        return None

    def _dev_id(self, word: str) -> int:
        v = read_dev_id(word)
        if v is None:
            self.ctx.log("thin: Message received with invalid device id: %s" % word)
            raise DMError(errno.EINVAL)
        return v

    async def _message(self, cmd: str, args: list[str]) -> None:
        md = self.pool.md
        log = self.ctx.log
        try:
            if cmd == "create_thin":
                dev = self._dev_id(args[0])
                try:
                    md.create_thin(dev)
                except DMError:
                    log("thin: Creation of new thinly-provisioned device with id %s failed." % args[0])
                    raise
            elif cmd == "create_snap":
                dev = self._dev_id(args[0])
                origin = self._dev_id(args[1])
                try:
                    md.create_snap(dev, origin)
                except DMError:
                    log("thin: Creation of new snapshot %s of device %s failed." % (args[0], args[1]))
                    raise
            elif cmd == "delete":
                dev = self._dev_id(args[0])
                try:
                    md.delete_thin(dev)
                except DMError:
                    log("thin: Deletion of thin device %s failed." % args[0])
                    raise
            elif cmd == "set_transaction_id":
                ids: list[int] = []
                for w in args:
                    if not w.isascii() or not w.isdigit():
                        log("thin: set_transaction_id message: Unrecognised %s id %s."
                            % ("current" if not ids else "new", w))
                        raise DMError(errno.EINVAL)
                    ids.append(int(w))
                try:
                    md.set_transaction_id(ids[0], ids[1])
                except DMError:
                    log("thin: Failed to change transaction id from %s to %s." % (args[0], args[1]))
                    raise
            elif cmd == "reserve_metadata_snap":
                try:
                    md.reserve_metadata_snap()
                except DMError:
                    log("thin: reserve_metadata_snap message failed.")
                    raise
            elif cmd == "release_metadata_snap":
                try:
                    md.release_metadata_snap()
                except DMError:
                    log("thin: release_metadata_snap message failed.")
                    raise
        except NoSpace:
            md.abort()
            raise


# dm-thin-pool.ko registers thin, then thin-pool (dm_thin_init): thin.py does both, in that order
from . import thin as _thin  # noqa: E402,F401
