"""The control socket: RemoteControl against a served LocalControl, and garbage input."""
import errno
import json
import os
import random
import stat
import struct

import pytest
import trio

import dmsim
from dmsim.client import RemoteControl
from dmsim.control import LocalControl
from dmsim.errors import DMError
from dmsim.server import MAX_FRAME_BYTES, encode_frame, serve
from dmsim.table import TableLine


@pytest.fixture
async def served(tmp_path):
    path = str(tmp_path / "ctl")
    async with dmsim.open_manager() as m:
        async with trio.open_nursery() as n:
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
    (json.dumps({"v": 1, "method": "load", "args": {"name": "x", "lines": [{"__type__": "TableLine", "bad": 1}]}}).encode(), errno.EINVAL),
    (json.dumps({"v": 1, "method": "suspend", "args": {"name": "x", "noflush": 1}}).encode(), errno.EINVAL),
    (json.dumps({"v": 1, "method": "message", "args": {"name": "x", "sector": 1.5, "message": "a"}}).encode(), errno.EINVAL),
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
    assert frames(await raw_exchange(path, b"\x00\x00")) == [{"v": 1, "error": {"errno": errno.EPROTO, "message": "truncated frame header"}}]
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
