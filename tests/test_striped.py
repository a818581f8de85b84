"""striped (6.1's dm-stripe 1.6.0): where each chunk lands, flushes, a failing stripe in
status and events, and the constructor checks (the kernel-recorded conformance case
13-striped covers the texts)."""
import errno

import pytest

from dmsim import DMError
from dmsim.api import open_dm


@pytest.fixture
def imgs(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / ("s%d.img" % i)
        p.write_bytes(bytes(1 << 20))
        paths.append(str(p))
    return paths


def sectors_of(path, first, count):
    with open(path, "rb") as f:
        f.seek(first * 512)
        return f.read(count * 512)


@pytest.mark.parametrize("n,chunk", [(2, 8), (3, 8), (3, 5), (1, 16)])
async def test_chunks_go_round_robin(imgs, n, chunk):
    """Target chunk c lands on stripe c % n at offset + (c // n) * chunk: written one
    request over the whole device, each sector is found where the formula says."""
    width = 60 * chunk
    table = "0 %d striped %d %d " % (width * n, n, chunk) + " ".join(
        "%s %d" % (imgs[i], 7 * i) for i in range(n))
    data = b"".join(bytes([s % 251]) * 512 for s in range(width * n))
    async with open_dm() as dm:
        await dm.create("s", table)
        await dm.write("s", 0, data)
        await dm.flush("s")
        assert await dm.read("s", 0, len(data)) == data
        for s in (0, chunk - 1, chunk, 3 * chunk + 2, width * n - 1):
            c, off = divmod(s, chunk)
            row, i = divmod(c, n)
            assert sectors_of(imgs[i], 7 * i + row * chunk + off, 1) == bytes([s % 251]) * 512


async def test_a_failing_stripe_shows_D_and_raises_events(imgs):
    async with open_dm() as dm:
        await dm.create("e", "0 2048 error")
        await dm.create("s", "0 4096 striped 2 8 %s 0 /dev/mapper/e 0" % imgs[0])
        assert str(dm.status("s")[0]).endswith("1 AA")
        event = dm.info("s").event_nr
        assert await dm.read("s", 0, 4096) == bytes(4096)
        with pytest.raises(DMError) as ei:
            await dm.read("s", 8 * 512, 512)
        assert ei.value.errno == errno.EIO
        assert str(dm.status("s")[0]).endswith("1 AD")
        assert dm.info("s").event_nr == event + 1


async def test_events_stop_at_the_error_threshold(imgs):
    async with open_dm() as dm:
        await dm.create("e", "0 2048 error")
        await dm.create("s", "0 4096 striped 2 8 %s 0 /dev/mapper/e 0" % imgs[0])
        event = dm.info("s").event_nr
        for _ in range(20):
            with pytest.raises(DMError):
                await dm.read("s", 8 * 512, 512)
        assert dm.info("s").event_nr == event + 14      # DM_IO_ERROR_THRESHOLD 15


async def test_empty_flush_reaches_every_stripe(imgs, monkeypatch):
    from dmsim.blockdev import FileDevice

    flushed = []
    real = FileDevice.submit

    async def submit(self, bio):
        if bio.op.name == "FLUSH":
            flushed.append(self.path)
        return await real(self, bio)

    monkeypatch.setattr(FileDevice, "submit", submit)
    async with open_dm() as dm:
        await dm.create("s", "0 6144 striped 3 8 %s 0 %s 0 %s 0" % tuple(imgs))
        await dm.flush("s")
    assert sorted(set(flushed)) == sorted(imgs)


@pytest.mark.parametrize("params,error", [
    ("", "Not enough arguments"), ("2", "Not enough arguments"),
    ("0 8 A 0", "Invalid stripe count"), ("4294967296 8 A 0", "Invalid stripe count"),
    ("2 0 A 0 B 0", "Invalid chunk_size"), ("3 8 A 0 B 0 C 0", "Target length not divisible by number of stripes"),
    ("2 3 A 0 B 0", "Target length not divisible by chunk size"), ("2 8 A 0", "Not enough destinations specified"),
    ("2 8 A x B 0", "Couldn't parse stripe destination"),
])
async def test_constructor_errors(imgs, params, error):
    params = params.replace("A", imgs[0]).replace("B", imgs[1]).replace("C", imgs[2])
    async with open_dm() as dm:
        r = await dm.run("create", "s", "--table", "0 4096 striped " + params)
        assert r.rc != 0
        assert "striped: %s" % error in "\n".join(dm.klog())
