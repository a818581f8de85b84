"""thin: a thinly provisioned device in a thin-pool.

Table: ``<pool dev> <dev id> [<external origin dev>]``

The device's blocks live in the pool's data device, mapped through the pool's metadata
(created there first with the pool's ``create_thin`` or ``create_snap`` message).  A read of
an unmapped block returns zeros, or the external origin's data where it has some.  The first
write to a block provisions one: a write of the whole block needs nothing more, a partial one
first zeroes the new block (unless ``skip_block_zeroing``) or copies the origin's data
there, with kcopyd.  A write to a block a snapshot may still share copies it first (breaking
sharing), as the kernel does when the block predates the device's last snapshot.  Whole-block
discards unmap (and, with passdown, discard the data block once nothing shares it); FLUSH and
FUA commit the pool's metadata after flushing the data device.  Requests are remapped, not
rebuilt: the data device sees each one's flags (REQ_SYNC, FUA, ...), as 6.1's remap does.

Status (info): ``<mapped sectors> <highest mapped sector|->`` (``Fail`` in a failed pool);
table: ``<pool dev> <dev id> [<origin dev>]``.  Kernel: drivers/md/dm-thin.c (thin_ctr,
thin_map, thin_status).
"""
from __future__ import annotations

import errno
from typing import Sequence

import trio

from dmsim.bio import Bio, Op, settle_read, to_bytes
from dmsim.errors import DMError, TargetError
from dmsim.persistent_data import NoSpace

from .base import STATUSTYPE_TABLE, Target, register
from .thin_pool import PM_FAIL, PM_OUT_OF_DATA_SPACE, PM_WRITE, Pool, ThinPool, lookup_pool, read_dev_id


class Thin(Target):
    name = "thin"
    version = (1, 22, 0)
    module = "dm_thin_pool"

    pool: Pool

    async def ctr(self, args: Sequence[str]) -> None:
        if len(args) not in (2, 3):
            raise TargetError("Invalid argument count")
        self.origin_dev = None
        if len(args) == 3:
            if args[0] == args[2]:
                raise TargetError("Error setting origin device")
            try:
                self.origin_dev = self.ctx.get_device(args[2], False)
            except DMError as e:
                raise TargetError("Error opening origin device", e.errno) from None
        try:
            self.pool_dev = self.ctx.get_device(args[0])
        except DMError as e:
            raise TargetError("Error opening pool device", e.errno) from None
        dev_id = read_dev_id(args[1])
        if dev_id is None:
            raise TargetError("Invalid device id")
        self.dev_id = dev_id
        if not hasattr(self.pool_dev, "live"):
            raise TargetError("Couldn't get pool mapped device")
        pool = lookup_pool(self.ctx, self.pool_dev)
        if pool is None:
            raise TargetError("Couldn't find pool object")
        if pool.pf.mode == PM_FAIL:
            raise TargetError("Couldn't open thin device, Pool is in fail mode")
        try:
            pool.md.open_device(dev_id)
        except DMError as e:
            raise TargetError("Couldn't open thin internal device", e.errno) from None
        if pool.suspended:
            pool.md.close_device(dev_id)
            raise TargetError("Unable to activate thin device while pool is suspended")
        pool.refs += 1
        self.pool = pool
        # the pool's block size is the target's max io length; map() splits (not dm core), so
        # discards reach the target whole as in 6.1
        self.max_io_len = 0

    async def dtr(self) -> None:
        self.pool.md.close_device(self.dev_id)
        await self.pool.release()

    # -- I/O --------------------------------------------------------------------------------

    async def map(self, bio: Bio):
        pool = self.pool
        if pool.pf.mode == PM_FAIL:
            raise DMError(errno.EIO)
        op = bio.op
        if op is Op.FLUSH and not bio.sectors:
            await self._commit(bio)
            return None
        if op is Op.DISCARD:
            await self._discard(bio)   # whole: the kernel does not split a thin's discards
            return None
        if op is Op.WRITE_ZEROES:
            bio = Bio(Op.WRITE, bio.sector, bio.sectors, bytes(to_bytes(bio.sectors)), bio.fua, bio.flags)
        # reads and writes go block by block (dm_set_target_max_io_len(ti, sectors_per_block)),
        # the pieces one after the other, as the pool's worker takes the split bios in order
        spb = pool.sectors_per_block
        first = bio.sector // spb
        if (bio.end_sector - 1) // spb == first:
            pieces = [bio]
        else:
            if op is Op.READ and bio.data is None:
                bio = Bio(Op.READ, bio.sector, bio.sectors, bytearray(to_bytes(bio.sectors)))
            pieces = []
            done = 0
            while done < bio.sectors:
                n = min(bio.sectors - done, spb - (bio.sector + done) % spb)
                pieces.append(bio.slice(done, n))
                done += n
        if op is Op.READ:
            if len(pieces) == 1:
                return await self._read(bio)
            for piece in pieces:
                settle_read(piece, await self._read(piece))
            return bio.data
        for piece in pieces:
            await self._write(piece)
        if bio.fua:
            await self._commit(bio)
        return None

    async def _commit(self, bio: Bio) -> None:
        """A flush or FUA: the pool's commit (which flushes the data device first).  A pool
        that cannot commit passes the request to the data device as the kernel's read-only
        worker does: through the mapping of the request's block, an unmapped one failing."""
        pool = self.pool
        if pool.pf.mode in (PM_WRITE, PM_OUT_OF_DATA_SPACE):
            await pool.commit_locked()
            return
        if pool.md.find_block(self.dev_id, bio.sector // pool.sectors_per_block) is None:
            raise DMError(errno.EIO)
        await pool.data_dev.flush()

    def _origin_sectors(self, vblock: int) -> int:
        """Sectors of the external origin inside virtual block ``vblock`` (0 if none)."""
        if self.origin_dev is None:
            return 0
        spb = self.pool.sectors_per_block
        start = vblock * spb
        return max(0, min(spb, self.origin_dev.size_sectors - start))

    async def _read(self, bio: Bio):
        pool = self.pool
        spb = pool.sectors_per_block
        vblock, offset = divmod(bio.sector, spb)
        await pool.io_enter()
        try:
            r = pool.md.find_block(self.dev_id, vblock)
            if r is not None:
                sub = bio.remap(r.block * spb + offset)
                return settle_read(sub, await pool.data_dev.submit(sub))
        finally:
            pool.io_exit()
        have = self._origin_sectors(vblock)
        if have > offset:
            n = min(bio.sectors, have - offset)
            data = bytearray(to_bytes(bio.sectors))
            data[:to_bytes(n)] = await self.origin_dev.read(bio.sector, n)  # type: ignore[union-attr]
            return settle_read(bio, bytes(data))
        return settle_read(bio, bytes(to_bytes(bio.sectors)))

    async def _write(self, bio: Bio) -> None:
        pool = self.pool
        spb = pool.sectors_per_block
        vblock, offset = divmod(bio.sector, spb)
        # the fast lane: a block this device alone maps is written in place, without the pool
        # lock (an in-flight I/O holds off the next commit, so the block cannot be reused under it)
        await pool.io_enter()
        try:
            r = pool.md.find_block(self.dev_id, vblock)
            if r is not None and not r.shared:
                await pool.data_dev.submit(bio.remap(r.block * spb + offset))
                return
        finally:
            pool.io_exit()
        async with pool.lock:
            r = pool.md.find_block(self.dev_id, vblock)
            if r is not None and not r.shared:
                await pool.data_dev.submit(bio.remap(r.block * spb + offset))
                return
            while True:
                if pool.is_read_only() or pool.pf.mode == PM_FAIL:
                    raise DMError(errno.EIO)   # handle_unserviceable_bio
                if pool.pf.mode != PM_OUT_OF_DATA_SPACE:
                    try:
                        new = await pool.alloc_data_block()
                        break
                    except NoSpace:
                        if pool.pf.mode != PM_OUT_OF_DATA_SPACE:
                            raise DMError(errno.EIO) from None   # retry_bios_on_resume: the mode errors it
                    except DMError as e:
                        pool.log("%s: alloc_data_block() failed: error = %d"
                                 % ("break_sharing" if r is not None else "provision_block", -e.errno))
                        raise DMError(errno.EIO) from None
                # out of data space: an error, or queued until the pool grows (or the timeout)
                pool.lock.release()
                try:
                    await pool.wait_for_space()
                finally:
                    with trio.CancelScope(shield=True):
                        await pool.lock.acquire()
                r = pool.md.find_block(self.dev_id, vblock)
            whole = offset == 0 and bio.sectors == spb
            have = 0 if r is not None else self._origin_sectors(vblock)
            # the kernel prepares the block in its worker (a copy, a zeroing, or the write of
            # the whole block itself) unless there is nothing to prepare (skip_block_zeroing)
            prepared = r is not None or have > 0 or pool.pf.zero_new_blocks
            if not whole:
                if r is not None:
                    await pool.copy_block(pool.data_dev, r.block * spb, spb, new)
                else:
                    # schedule_external_copy / schedule_zero: the origin's part is copied, a
                    # tail past the origin's end (or a block past it) zeroed unless skipped
                    if have < spb and pool.pf.zero_new_blocks:
                        await pool.zero_block(new)
                    if have:
                        await pool.copy_block(self.origin_dev, vblock * spb, have, new)
            elif prepared:
                await pool.data_dev.submit(bio.remap(new * spb + offset))   # the overwrite
            if prepared and (pool.is_read_only() or pool.pf.mode == PM_FAIL):
                # process_prepared_mapping_fail: the pool stopped changing metadata meanwhile
                raise DMError(errno.EIO)
            if not (whole and prepared):
                await pool.data_dev.submit(bio.remap(new * spb + offset))
            try:
                pool.md.insert_block(self.dev_id, vblock, new)
            except DMError as e:
                pool.metadata_operation_failed("dm_thin_insert_block", e)
                raise DMError(errno.EIO) from None

    async def _discard(self, bio: Bio) -> None:
        """``process_discard_bio``: the whole blocks the discard covers are unmapped, run by run
        of consecutive data blocks (``break_up_discard_bio``); with passdown each run's data
        blocks that nothing else maps are discarded on the data device."""
        pool = self.pool
        if not pool.pf.discard_enabled:
            raise DMError(errno.EOPNOTSUPP)  # ignore_discard: the device takes no discards
        spb = pool.sectors_per_block
        begin = -(-bio.sector // spb)
        end = bio.end_sector // spb
        if begin >= end:
            return  # less than a block: nothing to unmap
        if pool.is_read_only():
            return  # process_bio_success: a read-only pool completes discards, unmapping nothing
        md = pool.md
        async with pool.lock:
            while begin != end:
                found = md.find_mapped_range(self.dev_id, begin, end)
                if found is None:
                    break
                virt_begin, virt_end, data_begin, maybe_shared = found
                data_end = data_begin + (virt_end - virt_begin)
                try:
                    md.remove_range(self.dev_id, virt_begin, virt_end)
                    if pool.pf.discard_passdown:
                        # held while the passdown runs, so the blocks are not reallocated under it
                        md.inc_data_range(data_begin, data_end)
                except DMError as e:
                    pool.metadata_operation_failed("dm_thin_remove_range", e)
                    raise DMError(errno.EIO) from None
                if pool.pf.discard_passdown:
                    await self._passdown(data_begin, data_end, maybe_shared)
                    try:
                        md.dec_data_range(data_begin, data_end)
                    except DMError as e:
                        pool.metadata_operation_failed("dm_pool_dec_data_range", e)
                        raise DMError(errno.EIO) from None
                begin = virt_end

    async def _passdown(self, data_begin: int, data_end: int, maybe_shared: bool) -> None:
        """Discard data blocks on the data device; runs still shared (count above the one the
        passdown holds) are left alone (``passdown_double_checking_shared_status``)."""
        pool = self.pool
        spb = pool.sectors_per_block
        b = data_begin
        while b < data_end:
            if maybe_shared and pool.md.data_sm.get_count(b) > 1:
                b += 1
                continue
            e = b + 1
            while e < data_end and not (maybe_shared and pool.md.data_sm.get_count(e) > 1):
                e += 1
            await pool.data_dev.discard(b * spb, (e - b) * spb)
            b = e

    # -- status -----------------------------------------------------------------------------

    def status(self, kind: str, noflush: bool = False) -> str:
        pool = self.pool
        if pool.pf.mode == PM_FAIL:
            return "Fail"
        if kind == STATUSTYPE_TABLE:
            out = "%s %d" % (self.pool_dev.ref, self.dev_id)
            if self.origin_dev is not None:
                out += " %s" % self.origin_dev.ref
            return out
        md = pool.md
        if not md.device_exists(self.dev_id):
            return "-"
        spb = pool.sectors_per_block
        mapped = md.device_details(self.dev_id).mapped_blocks
        highest = md.highest_mapped_block(self.dev_id)
        return "%d %s" % (mapped * spb, "-" if highest is None else "%d" % ((highest + 1) * spb - 1))

    def iterate_devices(self):
        """``thin_iterate_devices``: the pool device as far as the bound pool target reaches."""
        pool = self.pool
        if pool.ti is None:
            return []
        blocks = pool.ti.len // pool.sectors_per_block
        return [(self.pool_dev, 0, pool.sectors_per_block * blocks)] if blocks else []


register(Thin)
register(ThinPool)
