"""NBD exports as backing devices: the client against dmsim's own export (a second manager
in the same Trio loop), against ``nbdkit memory`` and ``qemu-nbd`` as subprocesses; URIs,
sharing, errors, reconnects, and loads that fail (in bounded time) when nothing answers."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess

import pytest
import trio

from dmsim import nbd, nbd_client
from dmsim.api import open_dm
from dmsim.bio import Bio, Op
from dmsim.errors import DMError
from dmsim.nbd_client import NbdDevice, NbdUri, parse_uri

KiB, MiB = 1 << 10, 1 << 20
TOOL_TIMEOUT_SECONDS = 30


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip("%s is not installed (scripts/setup installs it)" % tool)
    return path


# -- URIs -----------------------------------------------------------------------------------------
def test_uri_forms():
    """The two forms of doc/uri.md, the default port, printing as tables print them."""
    u = parse_uri("nbd+unix:///disk?socket=/run/x.sock")
    assert u == NbdUri("disk", socket_path="/run/x.sock")
    assert str(u) == "nbd+unix:///disk?socket=/run/x.sock"
    assert parse_uri("nbd+unix:///d?socket=rel.sock", "/srv").socket_path == "/srv/rel.sock"
    u = parse_uri("nbd://example.org/vol%201")
    assert (u.host, u.port, u.export) == ("example.org", 10809, "vol 1")
    assert str(u) == "nbd://example.org:10809/vol%201"
    assert str(parse_uri("nbd://[::1]:1234/x")) == "nbd://[::1]:1234/x"
    assert parse_uri("nbd://h:99").export == ""


@pytest.mark.parametrize("word", ["nbds://h/x", "nbd+unix:///x", "nbd+unix://h/x?socket=/s",
                                  "nbd://h:notaport/x", "nbd:///x", "nbd+vsock:///x"])
def test_uri_refusals(word):
    with pytest.raises(DMError) as e:
        parse_uri(word)
    assert e.value.errno == errno.EINVAL


# -- against our own export, in the same loop ----------------------------------------------------------
@contextlib.asynccontextmanager
async def exporting(tmp_path, name="nbd.sock"):
    """A second manager (the "server"), serving its devices on a Unix socket."""
    sock = str(tmp_path / name)
    async with open_dm() as server, trio.open_nursery() as n:
        await n.start(nbd.serve_nbd, server.manager, "unix:" + sock)
        yield server, sock
        n.cancel_scope.cancel()


def uri(sock: str, export: str) -> str:
    return "nbd+unix:///%s?socket=%s" % (export, sock)


async def test_round_trip_flush_trim_zeroes(tmp_path, images):
    """Data written through a linear over the export lands in the server's image; every op
    goes through; the table prints the URI; two tables share one connection."""
    img = images.random(mib=4, seed=3, name="back.img")
    with open(img, "rb") as f:
        want = bytearray(f.read())
    async with exporting(tmp_path) as (server, sock), open_dm() as dm:
        await server.create("back", "0 8192 linear %s 0" % img)
        await dm.create("front", "0 4096 linear %s 4096" % uri(sock, "back"))
        await dm.create("front2", "0 64 linear %s 0" % uri(sock, "back"))
        assert (await dm.dmsetup("table", "front")).strip() == "0 4096 linear %s 4096" % uri(sock, "back")
        assert len(dm.manager._files) == 1
        dev = next(iter(dm.manager._files.values()))[0]
        assert isinstance(dev, NbdDevice) and dev.connects == 1 and dev.size_sectors == 8192
        assert await dm.read("front", 0, 4096) == bytes(want[2 * MiB:2 * MiB + 4096])
        data = os.urandom(64 * KiB)
        await dm.write("front", 4096, data)
        want[2 * MiB + 4096:2 * MiB + 4096 + len(data)] = data
        front = dm.manager.find("front")
        await front.submit(Bio.flush())
        await front.submit(Bio(Op.WRITE_ZEROES, 256, 16))
        want[2 * MiB + 256 * 512:2 * MiB + 272 * 512] = bytes(16 * 512)
        await front.submit(Bio(Op.DISCARD, 512, 8))    # the server's linear punches a hole
        want[2 * MiB + 512 * 512:2 * MiB + 520 * 512] = bytes(8 * 512)
        await front.submit(Bio.write(1000, os.urandom(4096), fua=True))
        assert await dm.read("front", 0, 4096) == await dm.read("front", 0, 4096)
        with open(img, "rb") as f:
            got = f.read()
        want[2 * MiB + 1000 * 512:2 * MiB + 1008 * 512] = got[2 * MiB + 1000 * 512:2 * MiB + 1008 * 512]
        assert got == bytes(want)
        # many requests in flight at once on the one connection
        chunks = {k: os.urandom(4096) for k in range(32)}
        async with trio.open_nursery() as n:
            for k, c in chunks.items():
                n.start_soon(dm.write, "front", 4096 * k, c)
        assert await dm.read("front", 0, 32 * 4096) == b"".join(chunks[k] for k in range(32))
        assert server.info("back").open_count == 1
        await dm.remove("front")
        assert len(dm.manager._files) == 1
        await dm.remove("front2")
        assert dm.manager._files == {}
        with trio.fail_after(10):
            while server.info("back").open_count:
                await trio.sleep(0.01)


async def test_tcp_uri_large_requests_in_pieces_and_read_into(tmp_path, images, monkeypatch):
    """``nbd://HOST:PORT/EXPORT``: requests larger than the payload limit go in pieces,
    a read with a buffer of its own fills it in place."""
    img = images.random(mib=2, seed=4, name="tcp.img")
    with open(img, "rb") as f:
        want = f.read()
    async with open_dm() as server, open_dm() as dm, trio.open_nursery() as n:
        await server.create("t", "0 4096 linear %s 0" % img)
        bound = await n.start(nbd.serve_nbd, server.manager, "tcp:127.0.0.1:0")
        port = int(bound.rpartition(":")[2])
        await dm.create("c", "0 4096 linear nbd://127.0.0.1:%d/t 0" % port)
        assert (await dm.dmsetup("table", "c")).split()[3] == "nbd://127.0.0.1:%d/t" % port
        dev = next(iter(dm.manager._files.values()))[0]
        dev.max_payload_bytes = 8 * KiB
        buf = bytearray(1 * MiB)
        got = await dev.submit(Bio.read_into(0, buf))
        assert got is buf and buf == want[:MiB]
        data = os.urandom(100 * KiB)
        await dev.submit(Bio.write(16, data, fua=True))
        assert await dev.submit(Bio.read(16, len(data) // 512)) == data
        await dm.remove("c")
        n.cancel_scope.cancel()


async def test_manager_closes_with_an_export_in_use(tmp_path, images):
    """A manager that ends with tables on an export still loaded hangs up cleanly (the
    server sees its client go) and raises nothing."""
    async with exporting(tmp_path) as (server, sock):
        await server.create("back", "0 2048 linear %s 0" % images.zero(mib=1, name="c.img"))
        with trio.fail_after(20):
            async with open_dm() as dm:
                await dm.create("f", "0 2048 linear %s 0" % uri(sock, "back"))
                await dm.write("f", 0, b"q" * 4096)
                assert server.info("back").open_count == 1
            while server.info("back").open_count:
                await trio.sleep(0.01)


async def test_own_socket_is_the_dm_device_in_process(tmp_path, images):
    """A URI naming one of this manager's own listeners is its dm device, used in-process
    (the export's open count does not change: no NBD connection)."""
    img = images.random(mib=1, seed=5, name="own.img")
    async with exporting(tmp_path) as (server, sock):
        await server.create("base", "0 2048 linear %s 0" % img)
        await server.create("top", "0 2048 linear %s 0" % uri(sock, "base"))
        md = server.manager.find("base")
        assert md.open_count == 1
        assert not any(isinstance(e[0], NbdDevice) for e in server.manager._files.values())
        assert (await server.dmsetup("table", "top")).split()[3] == md.mm
        with open(img, "rb") as f:
            assert await server.read("top", 0, 4096) == f.read(4096)
        with pytest.raises(DMError) as e:
            await server.create("bad", "0 8 linear %s 0" % uri(sock, "nosuch"))
        assert e.value.errno == errno.ENODEV


async def test_errors_read_only_and_refused_export(tmp_path, images):
    """An NBD error reply is EIO; a read-only export refuses writes (EPERM); an unknown
    export fails the load with ENODEV and "Device lookup failed"."""
    async with exporting(tmp_path) as (server, sock), open_dm() as dm:
        await server.create("err", "0 64 error")
        await server.create("ro", "0 2048 linear %s 0" % images.random(mib=1, seed=1, name="ro.img"),
                            read_only=True)
        await dm.create("e", "0 64 linear %s 0" % uri(sock, "err"))
        with pytest.raises(DMError) as e:
            await dm.read("e", 0, 512)
        assert e.value.errno == errno.EIO
        await dm.create("r", "0 2048 linear %s 0" % uri(sock, "ro"))
        with pytest.raises(DMError) as e:
            await dm.write("r", 0, bytes(512))
        assert e.value.errno in (errno.EPERM, errno.EIO)
        dm.manager.read_log()
        with pytest.raises(DMError) as e:
            await dm.create("u", "0 64 linear %s 0" % uri(sock, "nosuch"))
        assert e.value.errno == errno.ENODEV
        assert any("Device lookup failed" in line for line in dm.manager.read_log())
        assert dm.manager._files.keys() == {(uri(sock, "err"), True), (uri(sock, "ro"), True)}


async def test_unreachable_load_fails_in_bounded_time(tmp_path, autojump_clock):
    """No socket: ENODEV at once.  A server that accepts and never speaks: ENODEV after
    CONNECT_TIMEOUT_SECONDS, never a hang; nothing is left held either way."""
    silent = str(tmp_path / "silent.sock")
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(silent)
    listener.listen(8)
    async with open_dm() as dm:
        with trio.fail_after(1):
            with pytest.raises(DMError) as e:
                await dm.create("a", "0 8 linear %s 0" % uri(str(tmp_path / "none.sock"), "x"))
        assert e.value.errno == errno.ENODEV
        start = trio.current_time()
        with trio.fail_after(nbd_client.CONNECT_TIMEOUT_SECONDS + 5):
            with pytest.raises(DMError) as e:
                await dm.create("b", "0 8 linear %s 0" % uri(silent, "x"))
        assert e.value.errno == errno.ENODEV
        assert trio.current_time() - start >= nbd_client.CONNECT_TIMEOUT_SECONDS
        assert dm.manager._files == {}
        assert "b" not in dm.manager.devices or dm.manager.devices["b"].live is None
    listener.close()


async def test_unclaimed_connection_is_let_go(tmp_path, images, autojump_clock):
    """An export connected for a table whose constructor then failed is closed after
    UNCLAIMED_LINGER_SECONDS (not held for ever)."""
    async with exporting(tmp_path) as (server, sock), open_dm() as dm:
        await server.create("back", "0 2048 linear %s 0" % images.zero(mib=1, name="z.img"))
        with pytest.raises(DMError):    # linear parses its sector before it takes the device
            await dm.create("f", "0 8 linear %s nan" % uri(sock, "back"))
        assert server.info("back").open_count == 1 and len(dm.manager._files) == 1
        await trio.sleep(nbd_client.UNCLAIMED_LINGER_SECONDS + 1)
        assert dm.manager._files == {}
        with trio.fail_after(5):
            while server.info("back").open_count:
                await trio.sleep(0.01)


async def test_reconnect_after_the_server_restarts(tmp_path, images, autojump_clock):
    """Requests in flight when the connection goes fail with EIO; new ones fail while the
    export is away (reconnects spaced by the backoff) and work once it is back."""
    img = images.random(mib=1, seed=9, name="d.img")
    sock = str(tmp_path / "r.sock")
    async with open_dm() as server, open_dm() as dm:
        await server.create("slow", "0 2048 delay %s 0 0 %s 0 5000" % (img, img))

        async def serving(task_status=trio.TASK_STATUS_IGNORED):
            await nbd.serve_nbd(server.manager, "unix:" + sock, task_status=task_status)

        async with trio.open_nursery() as n:
            scope = await n.start(_cancellable, serving)
            await dm.create("f", "0 2048 linear %s 0" % uri(sock, "slow"))
            dev = next(iter(dm.manager._files.values()))[0]
            failed: list[int] = []

            async def write_in_flight():
                try:
                    await dm.write("f", 0, b"x" * 512)
                except DMError as e:
                    failed.append(e.errno)

            n.start_soon(write_in_flight)
            await trio.sleep(1)                 # the write is held by the server's delay
            scope.cancel()                      # the server goes
            with trio.fail_after(10):
                while not failed:
                    await trio.sleep(0.1)
            assert failed == [errno.EIO]
            with pytest.raises(DMError) as e:
                await dm.read("f", 0, 4096)
            assert e.value.errno == errno.EIO
            with pytest.raises(DMError):        # at once again: inside the backoff
                await dm.read("f", 0, 4096)
            await server.reload("slow", "0 2048 linear %s 0" % img)
            await server.resume("slow")
            scope = await n.start(_cancellable, serving)
            await trio.sleep(nbd_client.BACKOFF_MAX_SECONDS + 0.1)
            with open(img, "rb") as f:
                assert await dm.read("f", 0, 4096) == f.read(4096)
            assert dev.connects == 2
            await dm.remove("f")
            scope.cancel()


async def _cancellable(fn, task_status=trio.TASK_STATUS_IGNORED):
    """Run ``fn`` (a started task) under a cancel scope handed to the caller."""
    with trio.CancelScope() as scope:
        async def inner(task_status=trio.TASK_STATUS_IGNORED):
            await fn(task_status=task_status)
        async with trio.open_nursery() as n:
            await n.start(inner)
            task_status.started(scope)


# -- against other servers ------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def subprocess_server(argv: list[str], sock: str):
    """A server process; killed at the end whatever happened."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with trio.fail_after(TOOL_TIMEOUT_SECONDS):
            while not os.path.exists(sock):
                if proc.poll() is not None:
                    raise AssertionError("%s exited: %s" % (argv[0], proc.stderr.read() if proc.stderr else ""))
                await trio.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TOOL_TIMEOUT_SECONDS)
        if proc.stderr:
            proc.stderr.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)


async def _exercise(dm, name: str, sectors: int) -> None:
    data = os.urandom(256 * KiB)
    await dm.write(name, 64 * 512, data)
    md = dm.manager.find(name)
    await md.submit(Bio.flush())
    assert await dm.read(name, 64 * 512, len(data)) == data
    await md.submit(Bio(Op.WRITE_ZEROES, 64, 64))
    await md.submit(Bio(Op.DISCARD, 128, 64))
    got = await dm.read(name, 64 * 512, len(data))
    assert got[:64 * 512] == bytes(64 * 512)
    assert got[128 * 512:] == data[128 * 512:]
    await md.submit(Bio.write(sectors - 8, b"z" * 4096, fua=True))
    assert await dm.read(name, (sectors - 8) * 512, 4096) == b"z" * 4096


async def test_nbdkit_memory_round_trip_and_restart(tmp_path):
    """``nbdkit memory``: every op round-trips; nbdkit killed and started again, the same
    device reconnects (the new, empty memory disk reads zeros)."""
    need("nbdkit")
    sock = str(tmp_path / "k.sock")
    argv = ["nbdkit", "-f", "-U", sock, "memory", "16M"]
    async with open_dm() as dm:
        async with subprocess_server(argv, sock):
            await dm.create("k", "0 32768 linear nbd+unix:///?socket=%s 0" % sock)
            await _exercise(dm, "k", 32768)
        with pytest.raises(DMError) as e:
            await dm.read("k", 64 * 512, 4096)
        assert e.value.errno == errno.EIO
        async with subprocess_server(argv, sock):
            with trio.fail_after(TOOL_TIMEOUT_SECONDS):
                while True:
                    try:
                        assert await dm.read("k", 64 * 512, 4096) == bytes(4096)
                        break
                    except DMError:
                        await trio.sleep(0.2)
            await dm.remove("k")


async def test_qemu_nbd_round_trip(tmp_path, images):
    """``qemu-nbd`` over an image: every op round-trips and lands in the image."""
    need("qemu-nbd")
    img = images.random(mib=8, seed=2, name="q.img")
    sock = str(tmp_path / "q.sock")
    argv = ["qemu-nbd", "-t", "-k", sock, "-x", "disk", "-f", "raw", "--discard=unmap", img]
    async with open_dm() as dm, subprocess_server(argv, sock):
        await dm.create("q", "0 16384 linear nbd+unix:///disk?socket=%s 0" % sock)
        await _exercise(dm, "q", 16384)
        marker = b"qemu" * 128
        await dm.write("q", 3 * 512, marker)
        await dm.manager.find("q").submit(Bio.flush())
        with open(img, "rb") as f:
            f.seek(3 * 512)
            assert f.read(512) == marker
        await dm.remove("q")


# -- model ------------------------------------------------------------------------------------------
MODEL_BLOCKS = 16


async def test_connection_state_model(tmp_path, images, monkeypatch):
    """The device's connection states (connected, lost, reconnecting; no backoff here, the
    backoff has its own test) against a plain reference: while the server is up every
    request works (reconnecting when it must), while it is down every one fails with EIO,
    a write in flight when the server goes fails with EIO and leaves either the old or the
    new data, and what reads back is always what the reference allows."""
    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

    monkeypatch.setattr(nbd_client, "BACKOFF_MIN_SECONDS", 0.0)
    monkeypatch.setattr(nbd_client, "BACKOFF_MAX_SECONDS", 0.0)
    img = images.zero(mib=1, name="model.img")
    sock = str(tmp_path / "model.sock")
    token = trio.lowlevel.current_trio_token()

    def call(fn, *args):
        return trio.from_thread.run(fn, *args, trio_token=token)

    async with open_dm() as server, open_dm() as dm, trio.open_nursery() as nursery:
        await server.create("back", "0 %d linear %s 0" % (MODEL_BLOCKS * 8, img))
        served: list[trio.CancelScope] = []

        async def serving(task_status=trio.TASK_STATUS_IGNORED):
            await nbd.serve_nbd(server.manager, "unix:" + sock, task_status=task_status)

        async def up():
            served.append(await nursery.start(_cancellable, serving))

        async def down():
            served.pop().cancel()
            await gone()

        async def gone():
            """The server's connection and its socket file are gone (a new server may bind)."""
            with trio.fail_after(10):
                while server.info("back").open_count or os.path.exists(sock):
                    await trio.sleep(0.005)

        await up()
        await dm.create("front", "0 %d linear %s 0" % (MODEL_BLOCKS * 8, uri(sock, "back")))
        front = dm.manager.find("front")
        block = st.integers(0, MODEL_BLOCKS - 1)

        class Machine(RuleBasedStateMachine):
            def __init__(self):
                super().__init__()
                if not served:
                    call(up)
                call(server.manager.find("back").write, 0, bytes(MODEL_BLOCKS * 4096))
                # every value each block may hold: one, or two after a write cut off
                self.ref: list[set[bytes]] = [{bytes(4096)} for _ in range(MODEL_BLOCKS)]

            @property
            def up(self) -> bool:
                return bool(served)

            def expect(self, fn, *args):
                """``fn`` works while the server is up and fails with EIO while it is down."""
                try:
                    out = call(fn, *args)
                except DMError as e:
                    assert not self.up and e.errno == errno.EIO, e
                    return None
                assert self.up
                return out

            @rule(k=block, n=st.integers(1, 4), fill=st.integers(0, 255), fua=st.booleans())
            def write(self, k, n, fill, fua):
                n = min(n, MODEL_BLOCKS - k)
                data = bytes([fill]) * 4096
                if self.expect(front.submit, Bio.write(k * 8, data * n, fua)) is None and not self.up:
                    return
                for i in range(k, k + n):
                    self.ref[i] = {data}

            @rule(k=block, n=st.integers(1, 4))
            def read(self, k, n):
                n = min(n, MODEL_BLOCKS - k)
                got = self.expect(front.submit, Bio.read(k * 8, n * 8))
                if got is None:
                    return
                for i in range(n):
                    piece = bytes(got[i * 4096:(i + 1) * 4096])
                    assert piece in self.ref[k + i], (k + i, piece[:1])
                    self.ref[k + i] = {piece}

            @rule(k=block, n=st.integers(1, 4), trim=st.booleans())
            def zero(self, k, n, trim):
                n = min(n, MODEL_BLOCKS - k)
                op = Op.DISCARD if trim else Op.WRITE_ZEROES
                if self.expect(front.submit, Bio(op, k * 8, n * 8)) is None and not self.up:
                    return
                for i in range(k, k + n):
                    self.ref[i] = {bytes(4096)}

            @rule()
            def flush(self):
                self.expect(front.submit, Bio.flush())

            @rule()
            def server_down(self):
                if self.up:
                    call(down)

            @rule()
            def server_up(self):
                if not self.up:
                    call(up)

            @rule(k=block, fill=st.integers(0, 255))
            def write_cut_off(self, k, fill):
                """A write held by a suspended server device when the server goes: EIO to
                us; the server finishes it at resume, so the block holds either value."""
                if not self.up:
                    return
                data = bytes([fill]) * 4096

                async def go():
                    await server.suspend("back")
                    failed = []

                    async def write():
                        try:
                            await front.submit(Bio.write(k * 8, data))
                        except DMError as e:
                            failed.append(e.errno)

                    async with trio.open_nursery() as n:
                        n.start_soon(write)
                        await trio.sleep(0.01)
                        served.pop().cancel()
                        with trio.fail_after(10):
                            while not failed:
                                await trio.sleep(0.005)
                    await server.resume("back")
                    await gone()
                    return failed

                assert call(go) == [errno.EIO]
                self.ref[k] = self.ref[k] | {data}

            @invariant()
            def shared_one_device(self):
                assert [type(e[0]) for e in dm.manager._files.values()] == [NbdDevice]

        def run():
            run_state_machine_as_test(Machine, settings=settings(
                max_examples=int(25 * float(os.environ.get("DMSIM_MODEL_EXAMPLES", "1"))),
                stateful_step_count=25, deadline=None,
                suppress_health_check=list(HealthCheck)))

        with trio.fail_after(600):
            await trio.to_thread.run_sync(run)
        await dm.remove("front")
        nursery.cancel_scope.cancel()


def test_socket_paths_that_are_no_sockets(tmp_path):
    """A socket= path into the mount, or to a file, is ENODEV at resolution (never a
    connect that could wait on our own mount); a missing one is left to the connect."""
    from dmsim.resolve import Mount, resolve

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (tmp_path / "file").write_bytes(b"")
    mount = Mount.of(str(mnt))
    for path in (str(mnt / "x"), str(tmp_path / "file")):
        with pytest.raises(DMError) as e:
            resolve(uri(path, "e"), "/", mount)
        assert e.value.errno == errno.ENODEV
    r = resolve(uri(str(tmp_path / "none"), "e"), "/", mount)
    assert (r.kind, r.name, r.socket_id) == ("nbd", "e", None)
