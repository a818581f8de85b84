"""dust: constructor checks, every message's reply and log lines, bad-block I/O with
block numbers counted from the underlying device start."""
import errno

import pytest

import dmsim
from dmsim import DMError, parse_table_text


@pytest.fixture
def img(tmp_path):
    """A 4 MiB image (8192 sectors) whose sector s is filled with byte s % 251 + 1."""
    path = tmp_path / "a.img"
    path.write_bytes(b"".join(bytes([s % 251 + 1]) * 512 for s in range(8192)))
    return str(path)


def sector(img, s):
    with open(img, "rb") as f:
        f.seek(s * 512)
        return f.read(512)


async def make(m, table, name="du"):
    m.create(name)
    await m.load(name, parse_table_text(table))
    await m.resume(name)
    return m.find(name)


async def msg(m, words, name="du"):
    """(reply or errno name, log lines) of one message."""
    try:
        reply = await m.message(name, 0, words)
    except DMError as e:
        reply = errno.errorcode[e.errno]
    return reply, m.read_log()


def dust_log(*lines):
    return ["device-mapper: dust: " + line for line in lines]


async def test_table_and_status(img):
    async with dmsim.open_manager() as m:
        await make(m, "0 4096 dust %s 8 4096" % img)
        ref = m.image_ref(img)                 # 240:N: how tables and status print an image
        assert m.table_lines("du", "table")[0].params == "%s 8 4096" % ref
        assert m.table_lines("du", "info")[0].params == "%s bypass verbose" % ref
        await m.message("du", 0, "enable")
        await m.message("du", 0, "quiet")
        assert m.table_lines("du", "info")[0].params == "%s fail_read_on_bad_block quiet" % ref


@pytest.mark.parametrize("params, error", [
    ("IMG 0", "Invalid argument count"),
    ("IMG 0 4096 x", "Invalid argument count"),
    ("IMG 0 0", "Invalid block size parameter"),
    ("IMG 0 abc", "Invalid block size parameter"),
    ("IMG 0 -512", "Invalid block size parameter"),
    ("IMG 0 4294967296", "Invalid block size parameter"),
    ("IMG 0 256", "Block size must be at least 512"),
    ("IMG 0 1000", "Block size must be a power of 2"),
    ("IMG x 1000", "Block size must be a power of 2"),      # block size is checked first
    ("IMG x 4096", "Invalid device offset sector"),
    ("/nonexistent/dev x 4096", "Invalid device offset sector"),
])
async def test_constructor_errors(img, params, error):
    async with dmsim.open_manager() as m:
        m.create("g")
        with pytest.raises(DMError) as ei:
            await m.load("g", parse_table_text("0 4096 dust " + params.replace("IMG", img)))
        assert ei.value.errno == errno.EINVAL
        assert m.read_log()[0] == "device-mapper: table: 253:0: dust: %s (-EINVAL)" % error


async def test_block_size_limits_and_lookup_errno(img):
    async with dmsim.open_manager() as m:
        m.create("g")
        with pytest.raises(DMError):
            await m.load("g", parse_table_text("0 8 dust %s 0 8192" % img))
        assert m.read_log()[0].endswith("dust: Block size is too large (-EINVAL)")
        await m.load("g", parse_table_text("0 8 dust %s 0 4096" % img))    # 8 sectors: fits
        await m.load("g", parse_table_text("0 8 dust %s 0 +512" % img))    # kstrtouint takes '+'
        with pytest.raises(DMError) as ei:
            await m.load("g", parse_table_text("0 8 dust /nonexistent/dev 0 4096"))
        assert ei.value.errno == errno.EINVAL          # dust hides dm_get_device's errno
        assert m.read_log()[0].endswith("dust: Device lookup failed (-EINVAL)")


async def test_messages_replies_and_logs(img):
    async with dmsim.open_manager() as m:
        await make(m, "0 8192 dust %s 0 4096" % img)
        assert await msg(m, "countbadblocks") == ("countbadblocks: 0 badblock(s) found", [])
        assert await msg(m, "listbadblocks") == ("No blocks in badblocklist", [])
        assert await msg(m, "queryblock 5") == ("dust_query_block: block 5 not found in badblocklist", [])
        assert await msg(m, "clearbadblocks") == ("dust_clear_badblocks: no badblocks found", [])
        assert await msg(m, "addbadblock 5") == (
            "", dust_log("dust_add_block: badblock added at block 5 with write fail count 0"))
        await msg(m, "addbadblock 60")
        assert await msg(m, "addbadblock 7 3") == (
            "", dust_log("dust_add_block: badblock added at block 7 with write fail count 3"))
        assert await msg(m, "addbadblock 5") == (
            "EINVAL", dust_log("dust_add_block: block 5 already in badblocklist"))
        assert await msg(m, "countbadblocks") == ("countbadblocks: 3 badblock(s) found", [])
        assert await msg(m, "listbadblocks") == ("5\n7\n60\n", [])
        assert await msg(m, "QueryBlock 5") == ("dust_query_block: block 5 found in badblocklist", [])
        assert await msg(m, "removebadblock 6") == (
            "EINVAL", dust_log("dust_remove_block: block 6 not found in badblocklist"))
        assert await msg(m, "removebadblock 60") == (
            "", dust_log("dust_remove_block: badblock removed at block 60"))
        assert await msg(m, "enable") == ("", dust_log("enabling read failures on bad sectors"))
        assert await msg(m, "disable") == ("", dust_log("disabling read failures on bad sectors"))
        assert await msg(m, "clearbadblocks") == ("dust_clear_badblocks: badblocks cleared", [])
        assert await msg(m, "countbadblocks") == ("countbadblocks: 0 badblock(s) found", [])


async def test_quiet_suppresses_add_remove_logs_only(img):
    async with dmsim.open_manager() as m:
        await make(m, "0 8192 dust %s 0 4096" % img)
        await msg(m, "quiet")
        assert await msg(m, "addbadblock 9") == ("", [])
        assert await msg(m, "addbadblock 9") == ("EINVAL", [])
        assert await msg(m, "removebadblock 10") == ("EINVAL", [])
        assert await msg(m, "enable") == ("", dust_log("enabling read failures on bad sectors"))
        assert await msg(m, "addbadblock") == ("EINVAL", dust_log("addbadblock requires an additional argument"))
        await msg(m, "quiet")
        assert m.table_lines("du", "info")[0].params.endswith(" verbose")


@pytest.mark.parametrize("words, log", [
    ("addbadblock", "addbadblock requires an additional argument"),
    ("REMOVEBADBLOCK", "REMOVEBADBLOCK requires an additional argument"),
    ("queryblock", "queryblock requires an additional argument"),
    ("addbadblock x", None),
    ("addbadblock -1", None),
    ("addbadblock 1 x", None),
    ("foo x", None),
    ("addbadblock 1025", "selected block value out of range"),
    ("queryblock 1025", "selected block value out of range"),
    ("addbadblock 1 256", "selected write fail count out of range"),
    ("addbadblock 99999 256", "selected write fail count out of range"),   # count checked first
    ("addbadblock 99999 255", "selected block value out of range"),
    ("foo", "unrecognized message 'foo' received"),
    ("foo 1", "unrecognized message 'foo' received"),
    ("foo 99999", "selected block value out of range"),
    ("foo 1 2", "unrecognized message 'foo' received"),
    ("queryblock 1 2", "unrecognized message 'queryblock' received"),
    ("a b c d", "invalid number of arguments '4'"),
])
async def test_message_errors(img, words, log):
    async with dmsim.open_manager() as m:
        await make(m, "0 8192 dust %s 0 4096" % img)      # 8192 sectors: blocks 0..1024
        assert await msg(m, words) == ("EINVAL", dust_log(log) if log else [])


async def test_block_bound_is_underlying_device_and_inclusive(img):
    async with dmsim.open_manager() as m:
        await make(m, "0 64 dust %s 0 512" % img)          # target 64 sectors, device 8192
        assert (await msg(m, "addbadblock 8192"))[0] == ""
        assert (await msg(m, "addbadblock 8193"))[0] == "EINVAL"
        assert (await msg(m, "ADDBADBLOCK 3"))[0] == ""


async def test_reads_and_writes_in_fail_mode(img):
    async with dmsim.open_manager() as m:
        md = await make(m, "0 8192 dust %s 0 4096" % img)
        for words in ("addbadblock 5", "addbadblock 7 3"):
            await m.message("du", 0, words)
        assert await md.read(40, 8) == b"".join(sector(img, s) for s in range(40, 48))   # bypass
        await m.message("du", 0, "enable")
        m.read_log()
        with pytest.raises(DMError) as ei:
            await md.read(40, 8)
        assert ei.value.errno == errno.EIO
        with pytest.raises(DMError):
            await md.read(47, 1)                  # any sector of the block
        assert await md.read(32, 8) == b"".join(sector(img, s) for s in range(32, 40))
        for _ in range(3):                        # write fail count 3: three failures
            with pytest.raises(DMError):
                await md.write(56, b"\x11" * 4096)
        assert sector(img, 56) == sector(img, 56)[:1] * 512 and sector(img, 56)[0] != 0x11
        await md.write(56, b"\x11" * 4096)        # the fourth removes the block
        assert sector(img, 56) == b"\x11" * 512
        await md.write(40, b"\x22" * 4096)
        assert await md.read(40, 8) == b"\x22" * 4096
        # the kernel logs the block number divided by sectors-per-block once more
        assert m.read_log() == dust_log("block 0 removed from badblocklist by write",
                                        "block 0 removed from badblocklist by write")
        assert await m.message("du", 0, "listbadblocks") == "No blocks in badblocklist"


async def test_block_numbers_count_from_device_start(img):
    async with dmsim.open_manager() as m:
        md = await make(m, "0 4096 dust %s 8 4096" % img, name="du9")
        await m.message("du9", 0, "addbadblock 1")
        await m.message("du9", 0, "enable")
        with pytest.raises(DMError):
            await md.read(0, 8)                   # target block 0 = device block 1
        assert await md.read(8, 8) == b"".join(sector(img, s) for s in range(16, 24))


async def test_requests_split_at_block_boundaries(img):
    async with dmsim.open_manager() as m:
        md = await make(m, "0 64 dust %s 0 512" % img)
        await m.message("du", 0, "addbadblock 3")
        await m.message("du", 0, "enable")
        assert await md.read(0, 3) == b"".join(sector(img, s) for s in range(3))
        with pytest.raises(DMError):
            await md.read(0, 8)                   # its piece at sector 3 fails
        await m.message("du", 0, "removebadblock 3")
        await m.message("du", 0, "addbadblock 3 1")
        with pytest.raises(DMError):
            await md.write(0, bytes(4096))        # the piece for block 3 fails
        assert sector(img, 0) == bytes(512)       # pieces before it were written
