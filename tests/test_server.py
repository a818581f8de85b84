"""The control socket: RemoteControl against a served LocalControl, and garbage input."""
import errno
import json
import os
import random
import stat
import struct

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dmsim
from dmsim.client import RemoteControl
from dmsim.control import METHODS, LocalControl
from dmsim.errors import DMError
from dmsim.server import MAX_FRAME_BYTES, encode_frame, serve
from dmsim.table import TableLine


@pytest.fixture
async def served(tmp_path):
    path = str(tmp_path / "ctl")
    async with dmsim.open_manager() as m, trio.open_nursery() as n:
        await n.start(serve, LocalControl(m), path)
        yield m, path
        n.cancel_scope.cancel()


async def raw_exchange(path, data: bytes) -> bytes:
    """Send raw bytes, half-close, return everything the server answers."""
    s = await trio.open_unix_socket(path)
    async with s:
        await s.send_all(data)
        await s.send_eof()
        out = b""
        with trio.move_on_after(5):
            while True:
                chunk = await s.receive_some(1 << 16)
                if not chunk:
                    break
                out += chunk
        return out


def frames(data: bytes) -> list:
    out = []
    while len(data) >= 4:
        (n,) = struct.unpack(">I", data[:4])
        out.append(json.loads(data[4:4 + n]))
        data = data[4 + n:]
    return out


async def test_socket_mode_and_roundtrip(served, tmp_path):
    m, path = served
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    async with RemoteControl(path) as c:
        info = await c.create("z1")
        assert info.name == "z1" and info.minor == 0 and not info.live_table
        await c.load("z1", [TableLine(0, 8, "zero")])
        await c.resume("z1")
        assert (await c.info("z1")).live_table
        assert await c.names() == ["z1"]
        assert [str(t) for t in await c.table_lines("z1")] == ["0 8 zero "]
        assert ("linear", (1, 4, 0)) in [(n, tuple(v)) for n, v in await c.versions()]
        with pytest.raises(DMError) as e:
            await c.remove("nope")
        assert e.value.errno == errno.ENXIO
        await c.rename("z1", new_name="z2")
        assert (await c.info("z2")).event_nr == 1
        assert m.devices["z2"].event_nr == 1


async def test_wait_blocks_only_its_client(served):
    m, path = served
    async with RemoteControl(path) as c1, RemoteControl(path) as c2:
        await c1.create("w")
        got = []

        async def waiter():
            got.append(await c1.wait("w", 0))

        async with trio.open_nursery() as n:
            n.start_soon(waiter)
            await trio.sleep(0.05)
            assert not got
            # the other client is served while c1 waits
            await c2.rename("w", new_uuid="U1")
            await trio.sleep(0)
        assert got[0].event_nr == 1 and got[0].uuid == "U1"


async def test_client_hangup_cancels_wait(served):
    m, path = served
    async with RemoteControl(path) as c:
        await c.create("h")
    s = await trio.open_unix_socket(path)
    await s.send_all(encode_frame({"v": 1, "method": "wait", "args": {"name": "h", "event_nr": 0}}))
    await trio.sleep(0.05)
    await s.aclose()
    await trio.sleep(0.05)
    # the waiter is gone: the device's event hasn't any pending listener task left to leak,
    # and the daemon still serves
    async with RemoteControl(path) as c:
        assert await c.names() == ["h"]


@pytest.mark.parametrize("payload,code", [
    (b"not json", errno.EINVAL),
    (json.dumps([1, 2]).encode(), errno.EINVAL),
    (json.dumps({"v": 2, "method": "names", "args": {}}).encode(), errno.EPROTONOSUPPORT),
    (json.dumps({"v": 1, "method": "__init__", "args": {}}).encode(), errno.EINVAL),
    (json.dumps({"v": 1, "method": "m", "args": {}}).encode(), errno.EINVAL),
    (json.dumps({"v": 1, "method": "create", "args": {"name": 5}}).encode(), errno.EINVAL),
    (json.dumps({"v": 1, "method": "create", "args": {"nam": "x"}}).encode(), errno.EINVAL),
    (json.dumps({"v": 1, "method": "create", "args": {"name": "x", "self": 1}}).encode(), errno.EINVAL),
    (json.dumps({"v": 1, "method": "load", "args": {"name": "x", "lines": ["0 8 zero"]}}).encode(), errno.EINVAL),
    (json.dumps({"v": 1, "method": "load",
                 "args": {"name": "x", "lines": [{"__type__": "TableLine", "bad": 1}]}}).encode(), errno.EINVAL),
    (json.dumps({"v": 1, "method": "suspend", "args": {"name": "x", "noflush": 1}}).encode(), errno.EINVAL),
    (json.dumps({"v": 1, "method": "message",
                 "args": {"name": "x", "sector": 1.5, "message": "a"}}).encode(), errno.EINVAL),
    (b"[" * 100000, errno.EINVAL),
    (b"\xff\xfe", errno.EINVAL),
])
async def test_bad_requests_get_errors(served, payload, code):
    m, path = served
    # a bad request, then a good one on the same connection: both answered
    out = frames(await raw_exchange(path, encode_frame_raw(payload)
                                    + encode_frame({"v": 1, "method": "names", "args": {}})))
    assert out[0]["error"]["errno"] == code
    assert out[1] == {"v": 1, "ok": []}


def encode_frame_raw(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


async def test_oversized_and_truncated_frames(served):
    m, path = served
    out = frames(await raw_exchange(path, struct.pack(">I", MAX_FRAME_BYTES + 1) + b"{}"))
    assert out[0]["error"]["errno"] == errno.EMSGSIZE
    out = frames(await raw_exchange(path, struct.pack(">I", 100) + b"{"))
    assert out[0]["error"]["errno"] == errno.EPROTO
    assert frames(await raw_exchange(path, b"\x00\x00")) == [
        {"v": 1, "error": {"errno": errno.EPROTO, "message": "truncated frame header"}}]
    async with RemoteControl(path) as c:
        assert await c.names() == []


async def test_fuzz_random_bytes_leave_daemon_up(served):
    m, path = served
    rng = random.Random(1234)
    good = encode_frame({"v": 1, "method": "create", "args": {"name": "f"}})
    for i in range(200):
        kind = i % 4
        if kind == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        elif kind == 1:  # a valid frame with bytes flipped
            b = bytearray(good)
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            data = bytes(b)
        elif kind == 2:  # a valid frame cut short
            data = good[:rng.randrange(len(good))]
        else:  # random JSON values as args
            val = rng.choice([None, True, -1, 2 ** 70, "x" * 300, [], {}, {"__type__": "DeviceInfo"},
                              {"__type__": "TableLine", "start": 0, "length": -5, "type": "zero"}])
            method = rng.choice(["create", "load", "info", "wait", "remove", "message", "rename"])
            data = encode_frame({"v": 1, "method": method, "args": {"name": val, "lines": val, "sector": val,
                                                                      "message": val}})
        with trio.fail_after(10):
            await raw_exchange(path, data)
    with trio.fail_after(10):
        async with RemoteControl(path) as c:
            names = await c.names()
            await c.create("alive")
            assert "alive" in await c.names() and len(names) <= 2


async def test_second_server_on_same_socket_refused(served):
    m, path = served
    with pytest.raises(DMError) as e:
        await serve(LocalControl(m), path)  # fails at bind, before serving
    assert e.value.errno == errno.EADDRINUSE
    async with RemoteControl(path) as c:
        assert await c.names() == []


async def test_no_daemon_error(tmp_path):
    with pytest.raises(DMError) as e:
        async with RemoteControl(str(tmp_path / "none")) as c:
            await c.names()
    assert "cannot connect" in e.value.message


# -- names, the last-resort handler, the client's trust in the socket ---------------------------

def request(method, **args):
    return encode_frame({"v": 1, "method": method, "args": args})


@pytest.mark.parametrize("method,args,text", [
    ("create", {"name": "a\x00b"}, 'Name "a\\0b" invalid. It contains NUL.'),
    ("create", {"name": "\ud800x"}, 'Name "\\ud800x" invalid. It is not valid UTF-8.'),
    ("create", {"name": "x" * 128}, 'Name "%s" too long.' % ("x" * 128)),
    ("create", {"name": "é" * 64}, 'Name "%s" too long.' % ("é" * 64)),
    ("create", {"name": "a/b"}, 'Name "a/b" invalid. It contains "/".'),
    ("create", {"name": "u", "uuid": "U" * 129}, 'UUID "%s" too long.' % ("U" * 129)),
    ("rename", {"name": "x", "new_name": "a/b"}, 'Name "a/b" invalid. It contains "/".'),
    ("info", {"name": "\udcff"}, 'Name "\\udcff" invalid. It is not valid UTF-8.'),
    ("remove", {"name": "a\x00"}, 'Name "a\\0" invalid. It contains NUL.'),
])
async def test_names_no_device_can_have_are_refused(served, method, args, text):
    m, path = served
    out = frames(await raw_exchange(path, request(method, **args) + request("names")))
    assert out[0]["error"] == {"errno": errno.EINVAL, "message": text}
    assert out[1] == {"v": 1, "ok": []}
    assert not m.devices


async def test_longest_name_accepted_and_lookups_with_slash_not_refused(served):
    m, path = served
    async with RemoteControl(path) as c:
        await c.create("x" * 127)
        assert await c.names() == ["x" * 127]
        with pytest.raises(DMError) as e:   # no such device, as the kernel says
            await c.info("/dev/mapper/nope")
        assert e.value.errno == errno.ENXIO


async def test_a_bug_in_a_method_is_that_requests_eio(served, monkeypatch, caplog):
    """One last-resort handler: the request gets EIO with the exception's text, the log
    gets the traceback, the connection and the daemon go on."""
    m, path = served

    async def broken(self):
        raise RuntimeError("boom")

    async def unencodable(self, name, inactive=False):
        return object()   # json cannot carry it

    monkeypatch.setattr(LocalControl, "names", broken)
    monkeypatch.setattr(LocalControl, "info", unencodable)
    out = frames(await raw_exchange(path, request("names") + request("info", name="x") + request("version")))
    assert out[0]["error"] == {"errno": errno.EIO, "message": "RuntimeError: boom"}
    assert out[1]["error"]["errno"] == errno.EIO
    assert "ok" in out[2]
    assert "control request failed" in caplog.text and "RuntimeError: boom" in caplog.text


async def test_client_refuses_a_socket_that_is_not_a_socket(tmp_path):
    (tmp_path / "control").write_text("")
    with pytest.raises(DMError) as e:
        async with RemoteControl(str(tmp_path / "control")):
            pass
    assert e.value.errno == errno.ENOTSOCK


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the socket away")
async def test_client_refuses_a_socket_of_another_user(served):
    m, path = served
    os.chown(path, 54321, 54321)
    with pytest.raises(DMError) as e:
        async with RemoteControl(path) as c:
            await c.names()
    assert e.value.errno == errno.EPERM and "belongs to uid 54321" in e.value.message
    os.chown(path, 0, 0)
    async with RemoteControl(path) as c:
        assert await c.names() == []


# -- fuzz: hypothesis frames ---------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.sampled_from(["\ud800", "a\x00b", "a/b", "x" * 200, "TableLine"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["__type__", "name", "lines", "start", "length", "type", "params", "new_name",
                         "uuid", "sector", "message", "event_nr", "noflush", "kind", "x"]), inner, max_size=5),
    max_leaves=12)
_method = st.sampled_from(METHODS) | st.text(max_size=12)
_args = st.dictionaries(st.sampled_from(["name", "new_name", "new_uuid", "uuid", "lines", "sector", "message",
                                         "event_nr", "noflush", "deferred", "read_only", "kind", "inactive",
                                         "self", "bogus"]), _json, max_size=4)
_request = st.fixed_dictionaries({"v": st.sampled_from([1, 1, 1, 2, "1", None]), "method": _method, "args": _args})


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


_frames = st.one_of(
    _request.map(lambda r: encode_frame(r)),                                   # wrong types, unknown verbs
    _json.map(lambda v: encode_frame(v)),                                      # not a request at all
    st.binary(max_size=64).map(_frame),                                        # bad JSON, bad UTF-8
    st.text(max_size=40).map(lambda t: _frame(t.encode("utf-8", "surrogatepass"))),
    st.tuples(_request, st.integers(0, 64)).map(lambda t: encode_frame(t[0])[:t[1]]),   # truncated
    st.integers(MAX_FRAME_BYTES + 1, (1 << 32) - 1).map(lambda n: struct.pack(">I", n) + b"{}"),  # oversized
    st.binary(max_size=16),                                                    # raw garbage
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.lists(_frames, min_size=1, max_size=3))
async def test_fuzz_frames_then_a_normal_request(tmp_path, junk):
    """Random and malformed frames, then a normal request on a new connection: answered
    (each example runs in its own Trio run, so it serves its own socket)."""
    path = str(tmp_path / "fz")
    async with dmsim.open_manager() as m, trio.open_nursery() as n:
        await n.start(serve, LocalControl(m), path)
        with trio.fail_after(10):
            await raw_exchange(path, b"".join(junk))
            async with RemoteControl(path) as c:
                assert await c.version()
                assert isinstance(await c.names(), list)
        n.cancel_scope.cancel()


async def test_stale_socket_removed_meanwhile_is_no_error(tmp_path, monkeypatch):
    """bind_socket finds a stale socket, and someone else (an exiting daemon, a second
    starter) removes it before our unlink: ENOENT there means the path is free, not a failure."""
    import socket as stdsocket

    import dmsim.server as server

    path = str(tmp_path / "ctl")
    stale = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    stale.bind(path)
    stale.close()                       # the file stays, nobody listens: stale
    real_unlink = os.unlink
    raced = []

    def unlink_after_someone_else(p, *args, **kwargs):
        if p == path and not raced:
            raced.append(p)
            real_unlink(p)              # the other remover wins the race
        return real_unlink(p, *args, **kwargs)

    monkeypatch.setattr(server.os, "unlink", unlink_after_someone_else)
    sock = await server.bind_socket(path)
    try:
        assert raced == [path]
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        sock.close()
    monkeypatch.undo()
    sock = await server.bind_socket(str(tmp_path / "fresh"))   # and no file at all: fine too
    sock.close()
