"""Bio: the kernel's bi_opf as targets see it, and flags that survive remaps and splits."""
from dmsim.bio import (
    DIRECT_WRITE_FLAGS,
    REQ_FUA,
    REQ_IDLE,
    REQ_OP_DISCARD,
    REQ_OP_READ,
    REQ_OP_WRITE,
    REQ_OP_WRITE_ZEROES,
    REQ_PREFLUSH,
    REQ_SYNC,
    Bio,
    Op,
    bi_opf,
)


def test_flag_values_are_6_1s():
    """The values flakey's corrupt_bio_flags masks are written in (blk_types.h of 6.1;
    IDLE and SYNC confirmed on the oracle with O_DIRECT writes)."""
    assert (REQ_SYNC, REQ_IDLE, REQ_FUA, REQ_PREFLUSH) == (0x800, 0x8000, 0x20000, 0x40000)
    assert DIRECT_WRITE_FLAGS == 0x8800


def test_bi_opf_puts_op_flags_and_fua_together():
    assert bi_opf(Bio.read(0, 8)) == REQ_OP_READ
    assert bi_opf(Bio.write(0, bytes(512))) == REQ_OP_WRITE
    assert bi_opf(Bio.write(0, bytes(512), fua=True, flags=DIRECT_WRITE_FLAGS)) == \
        REQ_OP_WRITE | REQ_SYNC | REQ_IDLE | REQ_FUA
    # dm core's empty flush to its targets: __send_empty_flush
    assert bi_opf(Bio.flush()) == REQ_OP_WRITE | REQ_PREFLUSH | REQ_SYNC
    assert bi_opf(Bio(Op.DISCARD, 0, 8)) == REQ_OP_DISCARD
    assert bi_opf(Bio(Op.WRITE_ZEROES, 0, 8)) == REQ_OP_WRITE_ZEROES


def test_remap_and_slice_keep_flags():
    """A target's remap or a split at a target boundary is a clone: same bi_opf."""
    bio = Bio.write(10, bytes(4096), fua=True, flags=REQ_SYNC)
    assert bi_opf(bio.remap(99)) == bi_opf(bio)
    piece = bio.slice(2, 4, 0)
    assert (piece.sector, piece.sectors, bi_opf(piece)) == (0, 4, bi_opf(bio))
    assert Bio.read(0, 1).flags == 0
