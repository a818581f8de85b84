"""The request's flags reach a mirror's legs (dm-raid1's do_write gives dm-io the bio's
bi_opf); resync copies through kcopyd are plain writes.  Seen by flakey legs: a
``corrupt_bio_byte ... w 85 MASK`` flakey corrupts exactly the writes whose bi_opf has
every bit of MASK (issue 13 item 5)."""
import pytest
import trio

import dmsim
from dmsim import parse_table_text
from dmsim.bio import (
    BACKGROUND_WRITEBACK_FLAGS,
    DIRECT_WRITE_FLAGS,
    REQ_BACKGROUND,
    REQ_FUA,
    REQ_IDLE,
    REQ_SYNC,
    Bio,
    Op,
)

SECTORS = 2048
MARK = 0x55          # what flakey puts in the first byte of a write it corrupts
DATA = 0xAA

#: (name, fua, flags) of the writes sent to the mirror
WRITES = [("plain", False, 0), ("direct", False, DIRECT_WRITE_FLAGS),
          ("direct-dsync", True, DIRECT_WRITE_FLAGS), ("background", False, BACKGROUND_WRITEBACK_FLAGS)]
#: flakey mask -> the writes it corrupts (all bits of the mask in bi_opf; 0: every write)
CORRUPTED = {
    REQ_SYNC: {"direct", "direct-dsync"},
    REQ_IDLE: {"direct", "direct-dsync"},
    REQ_FUA: {"direct-dsync"},
    REQ_BACKGROUND: {"background"},
    REQ_SYNC | REQ_FUA: {"direct-dsync"},
    0: {"plain", "direct", "direct-dsync", "background"},
}


def image(path, byte=0):
    path.write_bytes(bytes([byte]) * (SECTORS * 512))
    return str(path)


async def create(m, name, table):
    m.create(name)
    await m.load(name, parse_table_text(table))
    await m.resume(name)
    return m.find(name)


async def flakey_legs(m, paths, mask):
    """One always-down flakey per image, corrupting the writes that match ``mask``."""
    out = []
    for i, path in enumerate(paths):
        md = await create(m, "f%d" % i, "0 %d flakey %s 0 0 1 5 corrupt_bio_byte 1 w %d %d"
                          % (SECTORS, path, MARK, mask))
        out.append(md.mm)
    return out


def first_bytes(path, sector, count):
    with open(path, "rb") as f:
        data = f.read()
    return [data[(sector + k) * 512] for k in range(count)]


@pytest.mark.parametrize("sectors", [8, 24])   # one region, and three (the whole-bio lane)
@pytest.mark.parametrize("mask", sorted(CORRUPTED))
async def test_leg_writes_carry_the_requests_flags(tmp_path, mask, sectors):
    paths = [image(tmp_path / "a.img"), image(tmp_path / "b.img")]
    async with dmsim.open_manager() as m:
        legs = await flakey_legs(m, paths, mask)
        md = await create(m, "m", "0 %d mirror core 2 8 nosync 2 %s 0 %s 0" % (SECTORS, legs[0], legs[1]))
        got = {}
        for k, (name, fua, flags) in enumerate(WRITES):
            sector = k * 64
            await md.submit(Bio(Op.WRITE, sector, sectors, bytes([DATA]) * (sectors * 512), fua, flags))
            for path in paths:
                # flakey corrupts the first byte of each bio it gets: of each region's
                # write, or of the whole request's
                firsts = first_bytes(path, sector, 1)
                assert firsts[0] in (MARK, DATA), (name, path, firsts)
                got.setdefault(path, set())
                if firsts[0] == MARK:
                    got[path].add(name)
        assert got == {path: CORRUPTED[mask] for path in paths}


async def test_resync_copies_are_plain_writes(tmp_path):
    """kcopyd's resync writes carry no REQ_SYNC: a REQ_SYNC-masked flakey on the
    destination leg leaves them alone (an every-write mask corrupts them: the check sees)."""
    for mask, corrupted in ((REQ_SYNC, False), (0, True)):
        d = tmp_path / str(mask)
        d.mkdir()
        src, dst = image(d / "a.img", DATA), image(d / "b.img")
        async with dmsim.open_manager() as m:
            leg = (await flakey_legs(m, [dst], mask))[0]
            md = await create(m, "m", "0 %d mirror core 1 64 2 %s 0 %s 0" % (SECTORS, src, leg))
            with trio.fail_after(60):
                while True:
                    fields = str(m.table_lines("m", "info")[0]).split()
                    done, total = fields[4 + int(fields[3])].split("/")
                    if done == total:
                        break
                    await trio.sleep(0.01)
            await m.remove(md.name)
        firsts = first_bytes(dst, 0, SECTORS)
        if corrupted:
            assert firsts[0] == MARK
        else:
            assert set(firsts) == {DATA}
