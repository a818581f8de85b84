"""targets.base: the argument helpers every target shares (the kernel's sscanf/kstrtouint)."""
import pytest

from dmsim.errors import TargetError
from dmsim.targets.base import kstrtouint, parse_uint, scan_uint


@pytest.mark.parametrize("word,bits,value", [
    ("0", 64, 0), ("18446744073709551615", 64, (1 << 64) - 1),
    ("18446744073709551616", 64, 0),          # wraps, as 6.1's linear takes it (offset 0)
    ("4294967296", 32, 0), ("4294967297", 32, 1), ("007", 32, 7),
    ("", 64, None), ("+1", 64, None), ("-1", 64, None), ("1x", 64, None), ("١", 64, None),
    (None, 64, None),
])
def test_scan_uint_is_sscanf(word, bits, value):
    assert scan_uint(word, bits) == value


def test_parse_uint_fails_the_constructor_with_the_reason():
    assert parse_uint("12", "Invalid device sector") == 12
    with pytest.raises(TargetError) as ei:
        parse_uint("x", "Invalid device sector")
    assert ei.value.message == "Invalid device sector"


@pytest.mark.parametrize("word,value", [
    ("512", 512), ("+512", 512), ("512\n", 512), ("4294967295", (1 << 32) - 1),
    ("4294967296", None), ("", None), ("-1", None), ("1 ", None),
])
def test_kstrtouint_refuses_out_of_range(word, value):
    assert kstrtouint(word) == value


async def test_linear_offset_wraps_like_the_kernel(tmp_path):
    """6.1 accepts ``linear DEV 18446744073709551616`` and shows offset 0 (recorded on the
    kernel oracle; sscanf's %llu wraps)."""
    from dmsim.api import open_dm

    img = tmp_path / "a.img"
    img.write_bytes(bytes(8 << 20))
    async with open_dm() as dm:
        await dm.create("l1", "0 8 linear %s 18446744073709551616" % img)
        assert (await dm.dmsetup("table", "l1")).split()[-1] == "0"
