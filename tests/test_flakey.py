"""flakey (6.1 semantics): table strings, constructor errors in the kernel's order,
up/down timing on trio's clock, and each feature's down-interval behaviour."""
import errno

import pytest
import trio
import trio.testing

import dmsim
from dmsim import DMError, parse_table_text
from dmsim.bio import REQ_FUA, REQ_IDLE, REQ_PREFLUSH, REQ_SYNC, Bio, Op


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
def img(tmp_path):
    """A 1 MiB image whose sector s is filled with byte s % 251 + 1."""
    path = tmp_path / "a.img"
    path.write_bytes(b"".join(bytes([s % 251 + 1]) * 512 for s in range(2048)))
    return str(path)


def sector(img, s):
    with open(img, "rb") as f:
        f.seek(s * 512)
        return f.read(512)


async def make(m, params, name="f"):
    m.create(name)
    await m.load(name, parse_table_text("0 1024 flakey " + params))
    await m.resume(name)
    return m.find(name)


async def ctr_error(params, img):
    async with dmsim.open_manager() as m:
        m.create("f")
        with pytest.raises(DMError) as ei:
            await m.load("f", parse_table_text("0 1024 flakey " + params.replace("IMG", img)))
        log = m.read_log()
        return ei.value.errno, log[0]


@pytest.mark.parametrize("params, table", [
    ("IMG 0 5 0", "IMG 0 5 0 0 "),
    ("IMG 8 1 2 1 drop_writes", "IMG 8 1 2 1 drop_writes "),
    ("IMG 8 1 2 1 DROP_WRITES", "IMG 8 1 2 1 drop_writes "),
    ("IMG 0 1 2 1 Error_Writes", "IMG 0 1 2 1 error_writes "),
    ("IMG 0 1 2 6 drop_writes corrupt_bio_byte 32 r 1 0",
     "IMG 0 1 2 6 drop_writes corrupt_bio_byte 32 r 1 0 "),
    ("IMG 0 1 2 5 corrupt_bio_byte 1 W 255 4294967295",
     "IMG 0 1 2 5 corrupt_bio_byte 1 w 255 4294967295 "),
    ("IMG 0 1 2 0", "IMG 0 1 2 0 "),
    ("IMG 0 1 2 1 drop_writes extra words", "IMG 0 1 2 1 drop_writes "),   # ignored
    ("IMG 0 4294967296 1", "IMG 0 0 1 0 "),                               # %u wraps
])
async def test_table_strings(img, params, table):
    async with dmsim.open_manager() as m:
        await make(m, params.replace("IMG", img))
        assert m.table_lines("f", "table")[0].params == table.replace("IMG", m.image_ref(img))
        assert m.table_lines("f", "info")[0].params == ""


@pytest.mark.parametrize("params, error", [
    ("IMG 0 1", "Invalid argument count"),
    ("IMG x 1 1", "Invalid device sector"),
    ("IMG -1 1 1", "Invalid device sector"),
    ("IMG 0x10 1 1", "Invalid device sector"),
    ("IMG 0 1 x", "Invalid up interval"),
    ("IMG 0 -1 1", "Invalid up interval"),
    ("IMG 0 1 y", "Invalid up interval"),          # 6.1 reuses the up message
    ("IMG 0 0 0", "Total (up + down) interval is zero"),
    ("IMG 0 4294967295 1", "Total (up + down) interval is zero"),
    ("IMG 0 4294967295 2", "Interval overflow"),
    ("IMG 0 1 1 2 drop_writes error_writes", "Feature error_writes conflicts with feature drop_writes"),
    ("IMG 0 1 1 2 error_writes drop_writes", "Feature drop_writes conflicts with feature error_writes"),
    ("IMG 0 1 1 2 drop_writes drop_writes", "Feature drop_writes duplicated"),
    ("IMG 0 1 1 2 error_writes ERROR_WRITES", "Feature error_writes duplicated"),
    ("IMG 0 1 1 1 bogus", "Unrecognised flakey feature requested"),
    ("IMG 0 1 1 1 error_reads", "Unrecognised flakey feature requested"),
    ("IMG 0 1 1 x drop_writes", "Invalid number of feature args"),
    ("IMG 0 1 1 2 drop_writes", "Invalid number of feature args"),
    ("IMG 0 1 1 7 drop_writes corrupt_bio_byte 1 r 0 0 x", "Invalid number of feature args"),
    ("IMG 0 1 1 8 corrupt_bio_byte 1 r 256 0", "Invalid number of feature args"),
    ("IMG 0 1 1 1 corrupt_bio_byte", "Feature corrupt_bio_byte requires parameters"),
    ("IMG 0 1 1 5 corrupt_bio_byte 0 r 0 0", "Invalid corrupt bio byte"),
    ("IMG 0 1 1 5 corrupt_bio_byte x r 0 0", "Invalid corrupt bio byte"),
    ("IMG 0 1 1 5 corrupt_bio_byte 1 x 0 0", "Invalid corrupt bio direction (r or w)"),
    ("IMG 0 1 1 5 corrupt_bio_byte 1 r 256 0", "Invalid corrupt value to write into bio byte (0-255)"),
    ("IMG 0 1 1 5 corrupt_bio_byte 1 r 1 x", "Invalid corrupt bio flags mask"),
    ("IMG 0 1 1 5 drop_writes corrupt_bio_byte 1 w 0", "Invalid corrupt bio flags mask"),
    ("IMG 0 1 1 3 corrupt_bio_byte 1 r", "Invalid corrupt value to write into bio byte (0-255)"),
    # the unsigned count wraps below zero inside corrupt_bio_byte, so the loop goes on
    ("IMG 0 1 1 2 corrupt_bio_byte 1 r 0 0", "Insufficient feature arguments"),
    # 6.1 oopses here; we answer as >= 6.16 does
    ("IMG 0 1 1 2 corrupt_bio_byte 1", "Feature corrupt_bio_byte requires 4 parameters"),
    ("IMG 0 1 1 6 drop_writes corrupt_bio_byte 1 w 0 0",
     "drop_writes is incompatible with corrupt_bio_byte with the WRITE flag set"),
    ("IMG 0 1 1 6 corrupt_bio_byte 1 w 0 0 error_writes",
     "error_writes is incompatible with corrupt_bio_byte with the WRITE flag set"),
    ("IMG 0 1 1 1 drop_writes bogus", None),      # accepted: words after the group ignored
    ("/nonexistent/dev 0 1 1 1 bogus", "Unrecognised flakey feature requested"),
])
async def test_constructor_errors(img, params, error):
    if error is None:
        async with dmsim.open_manager() as m:
            await make(m, params.replace("IMG", img))
        return
    err, line = await ctr_error(params, img)
    assert err == errno.EINVAL
    assert line == "device-mapper: table: 253:0: flakey: %s (-EINVAL)" % error


async def test_device_lookup_failed_is_last_and_keeps_errno(img):
    err, line = await ctr_error("/nonexistent/dev 0 1 1", img)
    assert err == errno.ENODEV
    assert line == "device-mapper: table: 253:0: flakey: Device lookup failed (-ENODEV)"


async def test_up_down_cycle_follows_the_clock(img, autojump_clock):
    async with dmsim.open_manager() as m:
        md = await make(m, img + " 0 1 1")
        results = []
        for _ in range(4):
            try:
                await md.read(0, 8)
                results.append("ok")
            except DMError as e:
                results.append(errno.errorcode[e.errno])
            await trio.sleep(1)
        assert results == ["ok", "EIO", "ok", "EIO"]


async def test_intervals_counted_from_load_not_resume(img, autojump_clock):
    async with dmsim.open_manager() as m:
        m.create("f")
        await m.load("f", parse_table_text("0 1024 flakey %s 0 2 3" % img))
        await trio.sleep(2.5)               # loaded but not yet resumed: already down
        await m.resume("f")
        md = m.find("f")
        with pytest.raises(DMError):
            await md.read(0, 8)
        await trio.sleep(2.6)               # 5.1 s: second cycle, up again
        await md.read(0, 8)


async def test_up_forever_passes_everything(img):
    async with dmsim.open_manager() as m:
        md = await make(m, img + " 8 3600 0")
        assert await md.read(0, 1) == sector(img, 8)
        await md.write(0, b"\x55" * 512)
        await md.flush()
        assert sector(img, 8) == b"\x55" * 512


async def test_down_without_features_fails_everything(img):
    async with dmsim.open_manager() as m:
        for params in (" 0 0 5 0", " 0 0 5"):
            md = await make(m, img + params)
            for call in (md.read(0, 8), md.write(0, bytes(4096)), md.flush()):
                with pytest.raises(DMError) as ei:
                    await call
                assert ei.value.errno == errno.EIO
            await m.remove("f")
        assert sector(img, 0) == bytes([1]) * 512


async def test_error_writes(img):
    async with dmsim.open_manager() as m:
        md = await make(m, img + " 0 0 5 1 error_writes")
        assert await md.read(3, 1) == sector(img, 3)
        with pytest.raises(DMError) as ei:
            await md.write(0, bytes(512))
        assert ei.value.errno == errno.EIO
        assert sector(img, 0) == bytes([1]) * 512


async def test_drop_writes(img):
    async with dmsim.open_manager() as m:
        md = await make(m, img + " 0 0 1 1 drop_writes")
        await md.write(0, bytes(4096))         # succeeds
        await md.flush()
        assert await md.read(0, 1) == bytes([1]) * 512
        assert sector(img, 0) == bytes([1]) * 512


async def test_corrupt_write_changes_callers_buffer(img):
    async with dmsim.open_manager() as m:
        md = await make(m, img + " 16 0 1 5 corrupt_bio_byte 1 w 7 0")
        buf = bytearray(4096)
        await md.write(0, buf)
        assert sector(img, 16) == b"\x07" + bytes(511)
        assert sector(img, 17) == bytes(512)
        assert buf[0] == 7                       # the kernel writes into the caller's pages
        frozen = bytes(4096)
        await md.write(8, frozen)                 # read-only buffer: corrupted copy
        assert sector(img, 24)[0] == 7 and frozen[0] == 0


async def test_corrupt_byte_beyond_bio_and_flag_mask(img):
    async with dmsim.open_manager() as m:
        md = await make(m, img + " 0 0 1 5 corrupt_bio_byte 513 w 255 0")
        await md.write(0, bytes(512))             # 512 bytes: byte 513 does not exist
        assert sector(img, 0) == bytes(512)
        await md.write(4, bytes(1024))
        assert sector(img, 5) == b"\xff" + bytes(511)
        await m.remove("f")
        md = await make(m, img + " 0 0 1 5 corrupt_bio_byte 1 w 9 131072")   # REQ_FUA
        await md.write(10, bytes(512))
        assert sector(img, 10) == bytes(512)
        await md.write(11, bytes(512), fua=True)
        assert sector(img, 11) == b"\x09" + bytes(511)


async def test_corrupt_read_is_never_applied_on_6_1(img):
    async with dmsim.open_manager() as m:
        md = await make(m, img + " 0 0 1 5 corrupt_bio_byte 1 r 7 0")
        assert await md.read(2, 1) == sector(img, 2)
        await md.write(0, b"\x33" * 512)          # writes pass
        assert sector(img, 0) == b"\x33" * 512


async def test_no_messages(img):
    async with dmsim.open_manager() as m:
        await make(m, img + " 0 1 1")
        with pytest.raises(DMError):
            await m.message("f", 0, "hello")
        assert m.read_log() == ["device-mapper: ioctl: Target type does not support messages"]


@pytest.mark.parametrize("mask, corrupted", [
    (0, [True, True, True, True]),
    (REQ_SYNC, [False, True, True, True]),
    (REQ_SYNC | REQ_IDLE, [False, False, True, True]),
    (REQ_FUA, [False, False, False, True]),
    (REQ_PREFLUSH, [False, False, False, False]),
    (0xFFFFFFFF, [False, False, False, False]),
])
async def test_flags_mask_matches_bi_opf_through_a_stack(img, mask, corrupted):
    """corrupt_bio_flags is matched against the whole bi_opf, as 6.1's
    all_corrupt_bio_flags_match does; the flags survive a linear device above."""
    async with dmsim.open_manager() as m:
        await make(m, img + " 0 0 1 5 corrupt_bio_byte 1 w 85 %d" % mask)
        m.create("top")
        await m.load("top", parse_table_text("0 1024 linear /dev/mapper/f 0"))
        await m.resume("top")
        top = m.find("top")
        kinds = [0, REQ_SYNC, REQ_SYNC | REQ_IDLE, REQ_SYNC | REQ_IDLE | REQ_FUA]
        for i, flags in enumerate(kinds):
            bio = Bio(Op.WRITE, i, 1, bytearray(512), bool(flags & REQ_FUA), flags & ~REQ_FUA)
            await top.submit(bio)
        assert [sector(img, i)[0] == 85 for i in range(4)] == corrupted
        await top.flush()                          # an empty PREFLUSH: nothing to corrupt
