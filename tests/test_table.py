"""Table text and table building: dmsetup's parser, the kernel's dm_split_args, and
property tests that any input gives a table or a DMError (never another exception), and
that requests split across random linear/zero tables land where a model says."""
import contextlib
import errno

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dmsim
from dmsim.errors import DMError
from dmsim.table import TableLine, parse_table_text, split_args

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# -- dmsetup's parser ---------------------------------------------------------------------------
def test_parse_comments_blanks_and_params():
    text = "# head\n\n  0 8 zero  # tail\n8\t8  error   a  b \n16 8 linear /x 0#c"
    assert parse_table_text(text) == [TableLine(0, 8, "zero", ""), TableLine(8, 8, "error", "a  b"),
                                      TableLine(16, 8, "linear", "/x 0")]


@pytest.mark.parametrize("text,n", [("garbage", 1), ("0 8", 1), ("0 8 zero\nx 8 zero", 2),
                                    ("0 - zero", 1), ("0 \uff18 zero", 1), ("\n\n0 8", 3), ("+ 8 zero", 1)])
def test_parse_invalid_format(text, n):
    with pytest.raises(DMError) as ei:
        parse_table_text(text, "on stdin")
    assert ei.value.errno == errno.EINVAL
    assert ei.value.message == "Invalid format on line %d of table on stdin." % n


def test_parse_u64_max_is_accepted():
    assert parse_table_text("0 18446744073709551615 zero")[0].length == (1 << 64) - 1


@pytest.mark.parametrize("text,line", [
    # what dmsetup 1.02.185 sends (recorded on the oracle): sscanf's %llu and %s
    ("0 -1 zero", TableLine(0, (1 << 64) - 1, "zero")),
    ("0 -18446744073709551615 zero", TableLine(0, 1, "zero")),
    ("0 18446744073709551616 zero", TableLine(0, (1 << 64) - 1, "zero")),
    ("0 +8 zero", TableLine(0, 8, "zero")),
    ("+8 8 zero", TableLine(8, 8, "zero")),
    ("0 0x10 zero", TableLine(0, 0, "x10", "zero")),
    ("0 8abc zero", TableLine(8 - 8, 8, "abc", "zero")),
    ("0 1e3 zero", TableLine(0, 1, "e3", "zero")),
    ("0 8 zero#x", TableLine(0, 8, "zero#x")),
    ("0 8 zero # c", TableLine(0, 8, "zero")),
    ("\v0\f8\rzero\t a \t", TableLine(0, 8, "zero", "a")),
])
def test_parse_like_sscanf(text, line):
    assert parse_table_text(text) == [line]


def test_parse_target_type_too_long():
    with pytest.raises(DMError) as ei:
        parse_table_text("0 8 abcdefghijklmnopq")
    assert ei.value.message == "Target type name abcdefghijklmnopq is too long."
    assert parse_table_text("0 8 abcdefghijklmno")[0].type == "abcdefghijklmno"


# -- dm_split_args ----------------------------------------------------------------------------------
@pytest.mark.parametrize("params,args", [
    ("", []), ("   ", []), ("a b", ["a", "b"]), ("  a\t\tb  ", ["a", "b"]),
    ("a\\ b", ["a b"]), ("a\\\\b", ["a\\b"]), ("\\a", ["a"]), ("'a b'", ["'a", "b'"]),
    ('"a b"', ['"a', 'b"']), ("a\\", ["a\\"]), ("\\", ["\\"]), ("a \\", ["a", "\\"]),
    ("a\\\tb", ["a\tb"]), ("x\x0by", ["x", "y"]), ("é\u2003ü", ["é\u2003ü"]), ("a\x1cb", ["a\x1cb"]),
])
def test_split_args_like_the_kernel(params, args):
    """Only ASCII whitespace separates (the kernel's isspace on bytes); a backslash quotes
    the next character, and a backslash at the very end stays literal."""
    assert split_args(params) == args


_KSPACE = " \t\n\v\f\r"


def _escape(arg: str) -> str:
    return "".join("\\" + c if c in _KSPACE or c == "\\" else c for c in arg)


@given(st.lists(st.text(min_size=1, max_size=12), max_size=8), st.sampled_from([" ", "\t", "  \n "]))
def test_split_args_roundtrip(args, sep):
    assert split_args(sep.join(_escape(a) for a in args)) == args


@given(st.text(max_size=200))
def test_split_args_never_fails(text):
    out = split_args(text)
    assert all(out) and all(isinstance(a, str) for a in out)


# -- any text to the parser and the builder --------------------------------------------------------
_word = st.one_of(
    st.sampled_from(["0", "8", "16", "4096", "-1", "0x10", "18446744073709551615", "18446744073709551616",
                     "99999999999999999999999999", "linear", "zero", "error", "flakey", "delay", "dust",
                     "nosuch", "#", "\\", "\\ ", "/dev/mapper/x", "253:0", "253:99", "1:2:3", "", "é", "\x00"]),
    st.integers(min_value=0, max_value=1 << 70).map(str),
    st.text(max_size=6),
)
_line = st.lists(_word, max_size=9).map(" ".join)
_table_text = st.one_of(st.lists(_line, max_size=5).map("\n".join), st.text(max_size=120))


@given(_table_text)
def test_parse_any_text(text):
    try:
        lines = parse_table_text(text)
    except DMError as e:
        assert e.message.startswith("Invalid format on line ") or e.message.endswith(" is too long.")
        return
    for ln in lines:
        assert 0 <= ln.start < 1 << 64 and 0 <= ln.length < 1 << 64 and ln.type


def _structured(img):
    dev = st.sampled_from([img, "253:0", "/dev/mapper/base", "/nonexistent", "x"])
    num = st.one_of(st.integers(0, 70000).map(str), st.sampled_from(["-1", "x", "0x8", "1.5", "99999999999999999999"]))
    args = st.lists(st.one_of(dev, num, st.sampled_from(["drop_writes", "error_writes", "1", "2"])), max_size=7)
    line = st.tuples(st.sampled_from(["linear", "zero", "error", "flakey", "delay", "dust", "nosuch"]),
                     st.integers(0, 4096), args)
    return st.lists(line, min_size=0, max_size=4)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "vda"
    with open(path, "wb") as f:
        f.truncate(2048 * 512)
    return str(path)


async def _load_any(lines, read_only=False):
    """Load ``lines`` into a fresh device next to a ``base`` device; every outcome must be
    a table or a DMError, with every device released afterwards."""
    async with dmsim.open_manager() as m:
        m.create("base")
        await m.load("base", [TableLine(0, 64, "zero")])
        await m.resume("base")
        md = m.create("t")
        try:
            await m.load("t", lines, read_only)
        except DMError as e:
            assert e.errno
            assert md.inactive is None
        else:
            assert md.inactive is not None
            await m.resume("t")    # the resume may refuse it too, but only with DMError
        with trio.fail_after(5):
            await m.clear("t") if m.info("t").inactive_table else None
            try:
                await m.remove("t")
            except DMError:
                pytest.fail("remove failed")
        assert m.info("base").open_count == 0
        assert m._files == {}


@SETTINGS
@given(data=st.data())
async def test_build_structured_tables(image, data):
    rows = data.draw(_structured(image))
    lines, start = [], 0
    for kind, length, args in rows:
        start_at = start if data.draw(st.booleans()) else data.draw(st.integers(0, 9000))
        lines.append(TableLine(start_at, length, kind, " ".join(args)))
        start = start_at + length
    with contextlib.suppress(DMError):   # a failed resume (limits) is a DMError too
        await _load_any(lines, data.draw(st.booleans()))


@SETTINGS
@given(text=_table_text)
async def test_build_any_text(text):
    try:
        lines = parse_table_text(text)
    except DMError:
        return
    with contextlib.suppress(DMError):
        await _load_any(lines)


# -- splitting across targets against a model --------------------------------------------------------
IMG_SECTORS = 512


@SETTINGS
@given(data=st.data())
async def test_random_tables_and_io_match_a_model(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("model") / "img"
    init = bytes(range(256)) * (IMG_SECTORS * 2)
    path.write_bytes(init)
    model = bytearray(init)
    # segments: ("linear", length, offset) or ("zero", length)
    segs, start = [], 0
    for _ in range(data.draw(st.integers(1, 6))):
        length = data.draw(st.integers(1, 64))
        if data.draw(st.booleans()):
            off = data.draw(st.integers(0, IMG_SECTORS - length))
            segs.append((start, length, off))
        else:
            segs.append((start, length, None))
        start += length
    size = start
    table = "\n".join("%d %d linear %s %d" % (s, n, path, off) if off is not None else "%d %d zero" % (s, n)
                      for s, n, off in segs)

    def where(sector):
        for s, n, off in segs:
            if s <= sector < s + n:
                return None if off is None else off + sector - s
        raise AssertionError(sector)

    def model_read(sector, count):
        out = bytearray()
        for k in range(count):
            w = where(sector + k)
            out += bytes(512) if w is None else model[w * 512:(w + 1) * 512]
        return bytes(out)

    async with dmsim.open_manager() as m:
        m.create("d")
        await m.load("d", parse_table_text(table))
        await m.resume("d")
        md = m.find("d")
        for _ in range(data.draw(st.integers(1, 12))):
            sector = data.draw(st.integers(0, size - 1))
            count = data.draw(st.integers(1, size - sector))
            if data.draw(st.booleans()):
                payload = bytes([data.draw(st.integers(0, 255))]) * (count * 512)
                await md.write(sector, payload)
                for k in range(count):
                    w = where(sector + k)
                    if w is not None:
                        model[w * 512:(w + 1) * 512] = payload[k * 512:(k + 1) * 512]
            else:
                assert await md.read(sector, count) == model_read(sector, count)
        assert await md.read(0, size) == model_read(0, size)
    assert path.read_bytes() == bytes(model)


# -- the kernel's size limit (dm_table_add_target) ---------------------------------------------------
@pytest.mark.parametrize("text", ["0 18014398509481984 zero", "0 -1 zero", "0 18446744073709551616 zero",
                                  "0 9223372036854775807 zero", "18014398509481983 1 zero",
                                  "0 8 zero\n8 18014398509481984 nosuch", "0 18014398509481984 nosuch"])
async def test_too_large_device(text):
    """A table ending at 2^54 sectors or beyond (``LLONG_MAX >> SECTOR_SHIFT``) is refused
    before the type lookup and the gap check, with the kernel's lines (oracle)."""
    async with dmsim.open_manager() as m:
        m.create("big")
        with pytest.raises(DMError) as ei:
            await m.load("big", parse_table_text(text))
        assert ei.value.errno == errno.EINVAL
        assert m.read_log() == ["device-mapper: table: 253:0: too large device",
                                "device-mapper: ioctl: error adding target to table"]


async def test_largest_device_and_zero_length_first():
    async with dmsim.open_manager() as m:
        m.create("big")
        await m.load("big", parse_table_text("0 18014398509481983 zero"))
        await m.resume("big")
        assert m.find("big").size_sectors == (1 << 54) - 1
        m.create("z")
        with pytest.raises(DMError):
            await m.load("z", parse_table_text("18014398509481984 0 zero"))
        assert m.read_log() == ["device-mapper: table: 253:1: zero-length target",
                                "device-mapper: ioctl: error adding target to table"]
