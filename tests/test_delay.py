"""delay: table/status strings, constructor errors, per-class delays on trio's clock,
held-request counts, and presuspend releasing held requests."""
import errno

import pytest
import trio
import trio.testing

import dmsim
from dmsim import DMError, parse_table_text


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
def imgs(tmp_path):
    """Two 1 MiB images: a's sector s holds byte s % 251 + 1, b's holds 0xbb."""
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(b"".join(bytes([s % 251 + 1]) * 512 for s in range(2048)))
    b.write_bytes(b"\xbb" * (1 << 20))
    return str(a), str(b)


def sector(img, s):
    with open(img, "rb") as f:
        f.seek(s * 512)
        return f.read(512)


async def make(m, params, name="d"):
    m.create(name)
    await m.load(name, parse_table_text("0 1024 delay " + params))
    await m.resume(name)
    return m.find(name)


def status(m, name="d"):
    return m.table_lines(name, "info")[0].params


async def test_tables_status_and_deps(imgs):
    a, b = imgs
    async with dmsim.open_manager() as m:
        for params in ("%s 0 100" % a, "%s 0 100 %s 8 200" % (a, b),
                       "%s 0 100 %s 8 200 %s 16 0" % (a, b, a)):
            await make(m, params)
            shown = params.replace(a, m.image_ref(a))        # 240:N: how tables print images
            shown = shown.replace(b, m.image_ref(b)) if b in params else shown
            assert m.table_lines("d", "table")[0].params == shown
            assert status(m) == "0 0 0"
            await m.remove("d")
        await make(m, "%s 0 100 %s 8 200 %s 16 0" % (a, b, a))
        assert [d.path for d in m.deps("d")] == [b, a]    # kernel's list_add order
        with pytest.raises(DMError):
            await m.message("d", 0, "hello")


@pytest.mark.parametrize("params, error, err", [
    ("A 0", "Requires exactly 3, 6 or 9 arguments", errno.EINVAL),
    ("A 0 1 B", "Requires exactly 3, 6 or 9 arguments", errno.EINVAL),
    ("A 0 1 B 0 1 A 0 1 x", "Requires exactly 3, 6 or 9 arguments", errno.EINVAL),
    ("A x 1", "Invalid device sector", errno.EINVAL),
    ("A 0 x", "Invalid delay", errno.EINVAL),
    ("A 0 -5", "Invalid delay", errno.EINVAL),
    ("A 0 1 B 0 y", "Invalid delay", errno.EINVAL),
    ("A 0 1 B z 1", "Invalid device sector", errno.EINVAL),
    ("A 0 1 B 0 1 A 0 q", "Invalid delay", errno.EINVAL),
    ("/nonexistent/dev 0 1", "Device lookup failed", errno.ENODEV),
    ("A 0 1 /nonexistent/dev 0 1", "Device lookup failed", errno.ENODEV),
    ("/nonexistent/dev x 1", "Invalid device sector", errno.EINVAL),   # parsed before lookup
])
async def test_constructor_errors(imgs, params, error, err):
    a, b = imgs
    async with dmsim.open_manager() as m:
        m.create("g")
        with pytest.raises(DMError) as ei:
            await m.load("g", parse_table_text("0 1024 delay " + params.replace("A", a).replace("B", b)))
        assert ei.value.errno == err
        assert m.read_log()[0] == "device-mapper: table: 253:0: delay: %s (%s)" % (
            error, "-" + errno.errorcode[err])


async def test_zero_delay_passes_at_once(imgs, autojump_clock):
    a, _ = imgs
    async with dmsim.open_manager() as m:
        md = await make(m, "%s 4 0" % a)
        t0 = trio.current_time()
        assert await md.read(0, 1) == sector(a, 4)
        await md.write(0, b"\x42" * 512)
        assert trio.current_time() == t0
        assert sector(a, 4) == b"\x42" * 512


async def test_classes_go_to_their_devices_after_their_delays(imgs, autojump_clock):
    a, b = imgs
    async with dmsim.open_manager() as m:
        md = await make(m, "%s 0 100 %s 8 200 %s 16 1000" % (a, b, a))
        t0 = trio.current_time()
        assert await md.read(1, 1) == sector(a, 1)
        assert trio.current_time() - t0 == pytest.approx(0.1)
        t0 = trio.current_time()
        await md.write(0, b"\x77" * 512)
        assert trio.current_time() - t0 == pytest.approx(0.2)
        assert sector(b, 8) == b"\x77" * 512 and sector(a, 0) == bytes([1]) * 512
        t0 = trio.current_time()
        await md.flush()
        assert trio.current_time() - t0 == pytest.approx(1.0)
        t0 = trio.current_time()
        await md.discard(0, 8)                   # a discard is in the write class
        assert trio.current_time() - t0 == pytest.approx(0.2)


async def test_three_and_six_argument_forms_share_triples(imgs, autojump_clock):
    a, b = imgs
    async with dmsim.open_manager() as m:
        md = await make(m, "%s 0 0 %s 8 300" % (a, b))
        t0 = trio.current_time()
        await md.flush()                         # 6 args: flush uses the write triple
        assert trio.current_time() - t0 == pytest.approx(0.3)
        await m.remove("d")
        md = await make(m, "%s 0 500" % a)
        t0 = trio.current_time()
        await md.write(0, b"\x01" * 512)
        await md.flush()
        assert trio.current_time() - t0 == pytest.approx(1.0)


async def test_delay_rounds_up_to_a_jiffy(imgs, autojump_clock):
    a, _ = imgs
    async with dmsim.open_manager() as m:
        md = await make(m, "%s 0 1" % a)          # 1 ms -> one 4 ms tick at HZ=250
        t0 = trio.current_time()
        await md.read(0, 1)
        assert trio.current_time() - t0 == pytest.approx(0.004)


async def test_status_counts_held_requests(imgs, autojump_clock):
    a, b = imgs
    async with dmsim.open_manager() as m:
        md = await make(m, "%s 0 3000 %s 0 3000 %s 0 3000" % (a, b, a))
        async with trio.open_nursery() as n:
            n.start_soon(md.read, 0, 8)
            n.start_soon(md.read, 8, 8)
            n.start_soon(md.write, 0, bytes(512))
            n.start_soon(md.flush)
            await trio.sleep(1)
            assert status(m) == "2 1 1"
        assert status(m) == "0 0 0"


async def test_suspend_releases_held_read(imgs, autojump_clock):
    a, _ = imgs
    async with dmsim.open_manager() as m:
        md = await make(m, "%s 0 3000" % a)
        done = []

        async def reader():
            done.append(await md.read(0, 8))

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await trio.sleep(1)
            assert status(m) == "1 0 0"
            t0 = trio.current_time()
            await m.suspend("d")
            assert done and trio.current_time() - t0 < 0.5   # released, not waited out
            assert status(m) == "0 0 0"
        await m.resume("d")
        t0 = trio.current_time()
        await md.read(0, 1)                      # resume re-enables delaying
        assert trio.current_time() - t0 == pytest.approx(3.0)


async def test_noflush_suspend_releases_and_queued_reads_delay_after_resume(imgs, autojump_clock):
    a, _ = imgs
    async with dmsim.open_manager() as m:
        md = await make(m, "%s 0 2000" % a)
        finished = {}

        async def reader(tag):
            await md.read(0, 8)
            finished[tag] = trio.current_time()

        async with trio.open_nursery() as n:
            n.start_soon(reader, 1)
            await trio.sleep(1)
            await m.suspend("d", noflush=True)
            assert 1 in finished
            n.start_soon(reader, 2)
            await trio.sleep(5)
            assert 2 not in finished             # held by dm core while suspended
            t_resume = trio.current_time()
            await m.resume("d")
        assert finished[2] - t_resume == pytest.approx(2.0)
