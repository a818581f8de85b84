"""The NBD export: a raw protocol client for the corners, real clients from Debian packages
(nbdinfo, nbdcopy, qemu-io, qemu-img, python3-libnbd) for interoperability, a model test of
a connection against an in-memory disk, and fuzzing that must leave the devices intact."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
from types import SimpleNamespace

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from dmsim import nbd
from dmsim.errors import DMError

MiB = 1 << 20
TOOL_TIMEOUT_SECONDS = 60
SYSTEM_PYTHON = "/usr/bin/python3"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip("%s is not installed (scripts/setup installs it)" % tool)
    return path


def system_python_nbd() -> str:
    """The system python with python3-libnbd's ``nbd`` module (skip when absent)."""
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("no %s" % SYSTEM_PYTHON)
    r = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True, timeout=30)
    if r.returncode:
        pytest.skip("python3-libnbd is not installed for %s" % SYSTEM_PYTHON)
    return SYSTEM_PYTHON


async def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """A client as a subprocess; killed (test failed) if it takes too long."""
    with trio.fail_after(TOOL_TIMEOUT_SECONDS):
        r = await trio.run_process(list(argv), capture_stdout=True, capture_stderr=True, check=False)
    if check and r.returncode:
        raise AssertionError("%s failed (%d): %s%s" % (" ".join(argv), r.returncode,
                                                      r.stdout.decode(), r.stderr.decode()))
    return r


# -- a raw client, to send what no well-behaved client sends ------------------------------------------
class Raw:
    """The protocol by hand over one socket."""

    def __init__(self, stream: trio.SocketStream):
        self.s = stream
        self.buf = bytearray()
        self.pending: dict[int, tuple[int, int]] = {}
        self.structured = False
        self.cookie = 0

    @classmethod
    async def connect(cls, address: str) -> "Raw":
        kind, where, port = nbd.parse_address(address)
        if kind == "unix":
            return cls(await trio.open_unix_socket(where))
        return cls(await trio.open_tcp_stream(where, port))

    async def recv_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = await self.s.receive_some(1 << 20)
            if not data:
                raise EOFError("server closed the connection")
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def closed_by_server(self) -> bool:
        """Whether the server closes (EOF) with nothing more sent."""
        try:
            data = await self.s.receive_some(1 << 16)
        except (trio.BrokenResourceError, OSError):
            return True
        return not data and not self.buf

    async def send(self, data: bytes) -> None:
        await self.s.send_all(data)

    async def aclose(self) -> None:
        await self.s.aclose()

    async def greet(self, cflags: int = nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES) -> int:
        magic, opt_magic, hflags = struct.unpack(">QQH", await self.recv_exact(18))
        assert (magic, opt_magic) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
        await self.send(struct.pack(">I", cflags))
        return hflags

    async def send_option(self, opt: int, data: bytes = b"") -> None:
        await self.send(struct.pack(">QII", nbd.IHAVEOPT, opt, len(data)) + data)

    async def replies(self, opt: int) -> list[tuple[int, bytes]]:
        """The replies to one option, up to its final one (ACK or an error)."""
        out = []
        while True:
            magic, ropt, rtype, n = struct.unpack(">QIII", await self.recv_exact(20))
            assert magic == nbd.OPT_REPLY_MAGIC and ropt == opt
            out.append((rtype, await self.recv_exact(n)))
            if rtype == nbd.REP_ACK or rtype & (1 << 31):
                return out

    async def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        await self.send_option(opt, data)
        return await self.replies(opt)

    @staticmethod
    def info_data(name: str, infos=(nbd.INFO_BLOCK_SIZE,)) -> bytes:
        raw = name.encode()
        return struct.pack(">I", len(raw)) + raw + struct.pack(">H%dH" % len(infos), len(infos), *infos)

    async def go(self, name: str, structured: bool = True, opt: int = nbd.OPT_GO,
                 infos=(nbd.INFO_BLOCK_SIZE, nbd.INFO_NAME, nbd.INFO_DESCRIPTION)) -> dict:
        """STRUCTURED_REPLY (optionally) and GO; the INFO replies decoded."""
        await self.greet()
        if structured:
            assert await self.option(nbd.OPT_STRUCTURED_REPLY) == [(nbd.REP_ACK, b"")]
            self.structured = True
        out: dict = {}
        for rtype, data in await self.option(opt, self.info_data(name, infos)):
            if rtype == nbd.REP_INFO:
                (kind,) = struct.unpack_from(">H", data)
                if kind == nbd.INFO_EXPORT:
                    out["size"], out["flags"] = struct.unpack_from(">QH", data, 2)
                elif kind == nbd.INFO_BLOCK_SIZE:
                    out["block"] = struct.unpack_from(">III", data, 2)
                elif kind == nbd.INFO_NAME:
                    out["name"] = data[2:].decode()
                elif kind == nbd.INFO_DESCRIPTION:
                    out["description"] = data[2:].decode()
            else:
                out["final"] = rtype
                out["message"] = data.decode(errors="replace")
        return out

    async def request(self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0) -> int:
        self.cookie += 1
        self.pending[self.cookie] = (cmd, length)
        await self.send(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, cmd, self.cookie, offset, length) + data)
        return self.cookie

    async def reply(self) -> SimpleNamespace:
        """One reply: cookie, error (0 = success), data (reads), message (structured errors)."""
        (magic,) = struct.unpack(">I", await self.recv_exact(4))
        if magic == nbd.SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">IQ", await self.recv_exact(12))
            cmd, length = self.pending.pop(cookie)
            assert not (cmd == nbd.CMD_READ and self.structured), "simple reply to a structured read"
            data = await self.recv_exact(length) if cmd == nbd.CMD_READ and not err else b""
            return SimpleNamespace(cookie=cookie, error=err, data=data, message="")
        assert magic == nbd.STRUCTURED_REPLY_MAGIC, hex(magic)
        data, err, message = bytearray(), 0, ""
        while True:
            flags, rtype, cookie, n = struct.unpack(">HHQI", await self.recv_exact(16))
            payload = await self.recv_exact(n)
            if rtype == nbd.REPLY_TYPE_OFFSET_DATA:
                (offset,) = struct.unpack_from(">Q", payload)
                data += payload[8:]
            elif rtype == nbd.REPLY_TYPE_ERROR:
                err, mlen = struct.unpack_from(">IH", payload)
                message = payload[6:6 + mlen].decode()
            else:
                assert rtype == nbd.REPLY_TYPE_NONE and not n
            if flags & nbd.REPLY_FLAG_DONE:
                break
            (magic,) = struct.unpack(">I", await self.recv_exact(4))
        self.pending.pop(cookie)
        return SimpleNamespace(cookie=cookie, error=err, data=bytes(data), message=message)

    async def call(self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0):
        cookie = await self.request(cmd, offset, length, data, flags)
        r = await self.reply()
        assert r.cookie == cookie
        return r


# -- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture
async def served(dm, images, tmp_path):
    """Devices (lin: linear over a random image; ro: read-only; err: the error target;
    slow: writes delayed 500 ms; scratch: for fuzzing; empty: no table) exported on a
    Unix socket and on TCP."""
    m = dm.manager
    lin_img = images.random(mib=4, seed=7, name="lin.img")
    await dm.create("lin", "0 8192 linear %s 0" % lin_img)
    await dm.create("ro", "0 2048 linear %s 0" % images.random(mib=1, seed=8, name="ro.img"), read_only=True)
    await dm.create("err", "0 64 error")
    slow_img = images.zero(mib=1, name="slow.img")
    await dm.create("slow", "0 2048 delay %s 0 0 %s 0 500" % (slow_img, slow_img))
    await dm.create("scratch", "0 2048 linear %s 0" % images.zero(mib=1, name="scratch.img"))
    m.create("empty")
    sock = str(tmp_path / "nbd.sock")
    async with trio.open_nursery() as n:
        unix = await n.start(nbd.serve_nbd, m, "unix:" + sock)
        tcp = await n.start(nbd.serve_nbd, m, "tcp:127.0.0.1:0")
        yield SimpleNamespace(dm=dm, m=m, sock=sock, unix=unix, tcp=tcp, lin_img=lin_img, tmp=tmp_path,
                              uri=lambda name: "nbd+unix:///%s?socket=%s" % (name, sock))
        n.cancel_scope.cancel()


async def wait_closed(m, name: str) -> None:
    """A connection's open is dropped once its handler has finished."""
    with trio.fail_after(10):
        while m.devices[name].open_count:
            await trio.sleep(0.01)


# -- handshake ----------------------------------------------------------------------------------------------
async def test_socket_mode_and_addresses(served):
    assert stat.S_IMODE(os.stat(served.sock).st_mode) == 0o600
    assert served.unix == "unix:" + served.sock
    assert served.tcp.startswith("tcp:127.0.0.1:") and not served.tcp.endswith(":0")
    for bad in ("", "unix:", "tcp:", "tcp:host", "tcp:host:99999", "udp:x:1", "/path"):
        with pytest.raises(DMError) as e:
            nbd.parse_address(bad)
        assert e.value.errno == errno.EINVAL
    assert nbd.parse_address("tcp:[::1]:10809") == ("tcp", "::1", 10809)


async def test_handshake_flags_and_export_name(served):
    for address in (served.unix, served.tcp):
        c = await Raw.connect(address)
        assert await c.greet() == nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES
        await c.send_option(nbd.OPT_EXPORT_NAME, b"lin")
        size, flags = struct.unpack(">QH", await c.recv_exact(10))
        assert size == 4 * MiB
        assert flags & nbd.FLAG_HAS_FLAGS and flags & nbd.FLAG_SEND_FLUSH and flags & nbd.FLAG_SEND_FUA
        assert flags & nbd.FLAG_SEND_TRIM and flags & nbd.FLAG_SEND_WRITE_ZEROES and flags & nbd.FLAG_CAN_MULTI_CONN
        assert not flags & (nbd.FLAG_READ_ONLY | nbd.FLAG_SEND_DF)
        r = await c.call(nbd.CMD_READ, 0, 4096)
        assert r.error == 0 and r.data == await served.m.find("lin").pread(0, 4096)
        await c.aclose()
    # without NO_ZEROES the reply carries 124 zero bytes
    c = await Raw.connect(served.unix)
    await c.greet(cflags=nbd.FLAG_C_FIXED_NEWSTYLE)
    await c.send_option(nbd.OPT_EXPORT_NAME, b"lin")
    assert (await c.recv_exact(134))[10:] == bytes(124)
    await c.aclose()


async def test_export_name_refusals_hang_up(served):
    for name in (b"", b"nope", b"empty", b"\xff\xfe"):
        c = await Raw.connect(served.unix)
        await c.greet()
        await c.send_option(nbd.OPT_EXPORT_NAME, name)
        assert await c.closed_by_server(), name
    c = await Raw.connect(served.unix)
    await c.recv_exact(18)
    await c.send(struct.pack(">I", 1 << 5))          # a client flag nobody defined
    assert await c.closed_by_server()
    c = await Raw.connect(served.unix)                # plain newstyle: EXPORT_NAME works, nothing else
    await c.greet(cflags=0)
    await c.send_option(nbd.OPT_EXPORT_NAME, b"lin")
    assert struct.unpack(">QH", (await c.recv_exact(134))[:10])[0] == 4 * MiB
    await c.aclose()
    c = await Raw.connect(served.unix)
    await c.greet(cflags=0)
    await c.send_option(nbd.OPT_LIST)
    assert await c.closed_by_server()


async def test_info_go_list_and_option_errors(served):
    c = await Raw.connect(served.unix)
    info = await c.go("lin", opt=nbd.OPT_INFO)
    assert info["final"] == nbd.REP_ACK and info["size"] == 4 * MiB
    assert info["block"] == (512, 4096, nbd.MAX_PAYLOAD_BYTES)
    assert info["name"] == "lin" and info["description"] == "linear (253:0)"
    assert served.m.devices["lin"].open_count == 0     # INFO does not open
    listed = await c.option(nbd.OPT_LIST)
    names = [d[4:4 + struct.unpack_from(">I", d)[0]].decode() for t, d in listed if t == nbd.REP_SERVER]
    assert names == ["err", "lin", "ro", "scratch", "slow"] and listed[-1] == (nbd.REP_ACK, b"")
    assert (await c.option(nbd.OPT_LIST, b"x"))[-1][0] == nbd.REP_ERR_INVALID
    assert (await c.option(nbd.OPT_STRUCTURED_REPLY, b"x"))[-1][0] == nbd.REP_ERR_INVALID
    for opt in (nbd.OPT_STARTTLS, 4, 9, 10, 11, 0x7FFF, 0xFFFFFFFF):
        rtype, message = (await c.option(opt))[-1]
        assert rtype == nbd.REP_ERR_UNSUP and b"not supported" in message
    for name, why in (("nope", b"no device nope"), ("", b"no default export"), ("empty", b"no live table")):
        replies = await c.option(nbd.OPT_GO, Raw.info_data(name))
        assert replies == [(nbd.REP_ERR_UNKNOWN, replies[0][1])] and why in replies[0][1]
    for bad in (b"", b"\0\0\0\x09lin\0\0", b"\0\0\0\x03lin\0\x01", b"\0\0\0\x02\xff\xfe\0\0"):
        assert (await c.option(nbd.OPT_INFO, bad))[-1][0] == nbd.REP_ERR_INVALID
    ro = await c.option(nbd.OPT_INFO, Raw.info_data("ro"))
    flags = [struct.unpack_from(">HQH", d)[2] for t, d in ro if t == nbd.REP_INFO and d[:2] == b"\0\0"]
    assert flags[0] & nbd.FLAG_READ_ONLY
    assert await c.option(nbd.OPT_ABORT) == [(nbd.REP_ACK, b"")]
    assert await c.closed_by_server()


async def test_oversized_option_and_too_many_options(served):
    c = await Raw.connect(served.unix)
    await c.greet()
    await c.send(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, nbd.MAX_OPTION_BYTES + 1))
    assert (await c.replies(nbd.OPT_GO))[-1][0] == nbd.REP_ERR_TOO_BIG
    assert await c.closed_by_server()
    c = await Raw.connect(served.unix)
    await c.greet()
    await c.send(struct.pack(">QII", nbd.IHAVEOPT, 99, 0) * (nbd.MAX_OPTIONS + 1))
    for _ in range(nbd.MAX_OPTIONS):
        assert (await c.replies(99))[-1][0] == nbd.REP_ERR_UNSUP
    assert await c.closed_by_server()
    c = await Raw.connect(served.unix)
    await c.greet()
    await c.send(struct.pack(">QII", 0x1234, nbd.OPT_LIST, 0))   # bad option magic
    assert await c.closed_by_server()


async def test_handshake_times_out(served, autojump_clock):
    c = await Raw.connect(served.unix)
    await c.recv_exact(18)
    with trio.fail_after(nbd.HANDSHAKE_TIMEOUT_SECONDS + 5):
        assert await c.closed_by_server()


# -- transmission -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structured", [True, False])
async def test_commands_and_errors(served, structured):
    m = served.m
    c = await Raw.connect(served.unix)
    info = await c.go("lin", structured=structured)
    assert info["final"] == nbd.REP_ACK and bool(info["flags"] & nbd.FLAG_SEND_DF) == structured
    assert m.devices["lin"].open_count == 1
    data = random.Random(1).randbytes(64 << 10)
    assert (await c.call(nbd.CMD_WRITE, 4096, len(data), data)).error == 0
    assert (await c.call(nbd.CMD_READ, 4096, len(data))).data == data
    assert await m.find("lin").pread(4096, len(data)) == data
    assert (await c.call(nbd.CMD_WRITE, 0, 512, b"\1" * 512, flags=nbd.CMD_FLAG_FUA)).error == 0
    assert (await c.call(nbd.CMD_FLUSH)).error == 0
    assert (await c.call(nbd.CMD_TRIM, 4096, 8192)).error == 0
    assert (await c.call(nbd.CMD_WRITE_ZEROES, 16384, 4096, flags=nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)).error == 0
    expect = bytearray(data)
    expect[0:8192] = bytes(8192)
    expect[12288:16384] = bytes(4096)
    assert await m.find("lin").pread(4096, len(data)) == bytes(expect)
    if structured:
        assert (await c.call(nbd.CMD_READ, 0, 4096, flags=nbd.CMD_FLAG_DF)).error == 0
    assert (await c.call(nbd.CMD_READ, 0, 0)).data == b""
    size = 4 * MiB
    cases = [
        ((nbd.CMD_READ, size - 512, 1024), nbd.NBD_EINVAL, "beyond the end"),
        ((nbd.CMD_TRIM, size, 512), nbd.NBD_EINVAL, "beyond the end"),
        ((nbd.CMD_WRITE_ZEROES, size - 512, 1024), nbd.NBD_ENOSPC, "beyond the end"),
        ((nbd.CMD_READ, 1, 512), nbd.NBD_EINVAL, "not aligned"),
        ((nbd.CMD_READ, 0, 100), nbd.NBD_EINVAL, "not aligned"),
        ((nbd.CMD_READ, 0, nbd.MAX_PAYLOAD_BYTES + 512), nbd.NBD_EINVAL, "maximum payload"),
        ((nbd.CMD_FLUSH, 512, 0), nbd.NBD_EINVAL, "flush with"),
        ((5, 0, 512), nbd.NBD_EINVAL, "unknown command"),       # CACHE: not offered
        ((7, 0, 512), nbd.NBD_EINVAL, "unknown command"),       # BLOCK_STATUS: not negotiated
        ((99, 0, 0), nbd.NBD_EINVAL, "unknown command"),
    ]
    for args, err, text in cases:
        r = await c.call(*args)
        assert r.error == err, (args, r)
        assert not structured or text in r.message, (args, r.message)
    for cmd, flags in ((nbd.CMD_READ, nbd.CMD_FLAG_NO_HOLE), (nbd.CMD_WRITE_ZEROES, 1 << 4), (nbd.CMD_FLUSH, 1 << 9)):
        assert (await c.call(cmd, 0, 0 if cmd == nbd.CMD_FLUSH else 512, flags=flags)).error == nbd.NBD_EINVAL
    r = await c.call(nbd.CMD_WRITE, size, 512, b"x" * 512)
    assert r.error == nbd.NBD_ENOSPC
    assert await m.find("lin").pread(4096, len(data)) == bytes(expect)   # nothing written by the failures
    await c.send(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_DISC, 0, 0, 0))
    assert await c.closed_by_server()
    await wait_closed(m, "lin")


async def test_read_only_and_target_errors(served):
    c = await Raw.connect(served.unix)
    await c.go("ro")
    assert (await c.call(nbd.CMD_WRITE, 0, 512, b"x" * 512)).error == nbd.NBD_EPERM
    assert (await c.call(nbd.CMD_WRITE_ZEROES, 0, 512)).error == nbd.NBD_EPERM
    assert (await c.call(nbd.CMD_TRIM, 0, 512)).error == nbd.NBD_EPERM
    assert (await c.call(nbd.CMD_READ, 0, 512)).error == 0
    c2 = await Raw.connect(served.unix)
    await c2.go("err", structured=False)
    assert (await c2.call(nbd.CMD_READ, 0, 512)).error == nbd.NBD_EIO
    assert (await c2.call(nbd.CMD_WRITE, 0, 512, b"x" * 512)).error == nbd.NBD_EIO
    assert (await c2.call(nbd.CMD_FLUSH)).error == 0     # an empty flush succeeds on error
    await c.aclose()
    await c2.aclose()


async def test_engine_bug_fails_the_request_only(served, monkeypatch):
    md = served.m.find("lin")
    c = await Raw.connect(served.unix)
    await c.go("lin")

    async def broken(sector, sectors):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(md, "read", broken)
    r = await c.call(nbd.CMD_READ, 0, 512)
    assert r.error == nbd.NBD_EIO and "ZeroDivisionError" in r.message
    monkeypatch.undo()
    assert (await c.call(nbd.CMD_READ, 0, 512)).data == await md.pread(0, 512)


async def test_replies_out_of_order_by_cookie(served, autojump_clock):
    """A delayed write does not hold up a read sent after it on the same connection."""
    c = await Raw.connect(served.unix)
    await c.go("slow")
    w = await c.request(nbd.CMD_WRITE, 0, 4096, b"w" * 4096)
    r = await c.request(nbd.CMD_READ, 8192, 4096)
    t0 = trio.current_time()
    first = await c.reply()
    assert first.cookie == r and first.error == 0 and trio.current_time() - t0 < 0.1
    second = await c.reply()
    assert second.cookie == w and second.error == 0 and trio.current_time() - t0 >= 0.5


async def test_many_requests_in_flight(served):
    """More requests than the cap pipelined at once: all answered, by cookie."""
    md = served.m.find("lin")
    want = await md.pread(0, 4 * MiB)
    c = await Raw.connect(served.unix)
    await c.go("lin")
    cookies = {}
    for i in range(3 * nbd.MAX_INFLIGHT_REQUESTS):
        off = (i * 7919 % 1024) * 4096
        cookies[await c.request(nbd.CMD_READ, off, 4096)] = off
    for _ in range(len(cookies)):
        r = await c.reply()
        off = cookies.pop(r.cookie)
        assert r.error == 0 and r.data == want[off:off + 4096]
    assert not cookies


async def test_budget_caps_requests_and_bytes(autojump_clock):
    b = nbd._Budget(max_requests=2, max_bytes=100)
    await b.acquire(80)
    await b.acquire(10)
    with trio.move_on_after(1) as scope:
        await b.acquire(0)           # request cap
    assert scope.cancelled_caught
    b.release(10)
    with trio.move_on_after(1) as scope:
        await b.acquire(30)          # byte cap
    assert scope.cancelled_caught
    b.release(80)
    await b.acquire(500)             # alone, any size may start
    assert (b.requests, b.nbytes) == (1, 500)


async def test_open_client_blocks_remove(served):
    m = served.m
    c = await Raw.connect(served.unix)
    await c.go("scratch")
    assert m.info("scratch").open_count == 1
    with pytest.raises(DMError) as e:
        await m.remove("scratch")
    assert e.value.errno == errno.EBUSY
    await c.aclose()                 # a hard disconnect drops the open too
    await wait_closed(m, "scratch")
    await m.remove("scratch")
    c = await Raw.connect(served.unix)
    assert (await c.go("scratch"))["final"] == nbd.REP_ERR_UNKNOWN


async def test_suspended_device_holds_requests(served, autojump_clock):
    m = served.m
    c = await Raw.connect(served.unix)
    await c.go("scratch")
    await m.suspend("scratch")
    cookie = await c.request(nbd.CMD_WRITE, 0, 512, b"s" * 512)
    with trio.move_on_after(30) as scope:
        await c.reply()
    assert scope.cancelled_caught            # held while suspended
    await m.resume("scratch")
    r = await c.reply()
    assert (r.cookie, r.error) == (cookie, 0)
    assert await m.find("scratch").pread(0, 512) == b"s" * 512


async def test_hangup_with_requests_held_lets_them_finish(served, autojump_clock):
    """A client gone while its writes are held by a suspend: the writes still complete at
    resume, then the open is dropped."""
    m = served.m
    c = await Raw.connect(served.unix)
    await c.go("scratch")
    await m.suspend("scratch")
    await c.request(nbd.CMD_WRITE, 512, 512, b"h" * 512)
    await trio.sleep(1)
    await c.aclose()
    await trio.sleep(1)
    assert m.info("scratch").open_count == 1
    await m.resume("scratch")
    await wait_closed(m, "scratch")
    assert await m.find("scratch").pread(512, 512) == b"h" * 512


# -- real clients -------------------------------------------------------------------------------------------
async def test_nbdinfo_list_sizes_and_tcp(served):
    need("nbdinfo")
    r = await run("nbdinfo", "--list", "--json", served.uri(""))
    exports = {e["export-name"]: e for e in json.loads(r.stdout)["exports"]}
    assert sorted(exports) == ["err", "lin", "ro", "scratch", "slow"]
    lin = exports["lin"]
    assert lin["export-size"] == 4 * MiB
    assert (lin["block_size_minimum"], lin["block_size_preferred"], lin["block_size_maximum"]) == \
        (512, 4096, nbd.MAX_PAYLOAD_BYTES)
    assert lin["is_read_only"] is False and exports["ro"]["is_read_only"] is True
    assert lin["can_flush"] and lin["can_fua"] and lin["can_trim"] and lin["can_zero"] and lin["can_multi_conn"]
    assert lin["description"] == "linear (253:0)"
    host, port = served.tcp.split(":")[1:]
    r = await run("nbdinfo", "--size", "nbd://%s:%s/ro" % (host, port))
    assert int(r.stdout) == MiB
    r = await run("nbdinfo", served.uri(""), check=False)       # no default export
    assert r.returncode and b"default export" in r.stderr


async def test_qemu_io_write_read_trim_zero(served):
    need("qemu-io")
    md = served.m.find("lin")
    uri = served.uri("lin")
    await run("qemu-io", "-f", "raw", uri, "-c", "write -P 0xab 0 64k", "-c", "read -P 0xab 0 64k",
              "-c", "write -P 0xcd 64k 64k", "-c", "flush")
    assert await md.pread(0, 65536) == b"\xab" * 65536
    assert await md.pread(65536, 65536) == b"\xcd" * 65536
    await run("qemu-io", "-f", "raw", uri, "-c", "discard 0 16k", "-c", "read -P 0 0 16k",
              "-c", "write -z 64k 8k", "-c", "read -P 0 64k 8k", "-c", "read -P 0xcd 72k 56k")
    assert await md.pread(0, 16384) == bytes(16384)
    assert await md.pread(16384, 48 << 10) == b"\xab" * (48 << 10)
    assert await md.pread(65536, 8192) == bytes(8192)
    # qemu-io reports a failed command on stderr but exits 0: read its output
    r = await run("qemu-io", "-f", "raw", uri, "-c", "read 4m 4k", check=False)
    assert b"Input/output error" in r.stderr or b"Invalid argument" in r.stderr or r.returncode
    r = await run("qemu-io", "-f", "raw", served.uri("ro"), "-c", "read 0 4k", check=False)
    assert r.returncode and b"Permission denied" in r.stderr      # qemu opens read-write
    await run("qemu-io", "-r", "-f", "raw", served.uri("ro"), "-c", "read 0 4k")
    await wait_closed(served.m, "lin")


async def test_qemu_img_convert_and_nbdcopy(served):
    need("qemu-img")
    need("nbdcopy")
    md = served.m.find("lin")
    want = await md.pread(0, 4 * MiB)
    out = served.tmp / "out.img"
    await run("qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri("lin"), str(out))
    assert out.read_bytes() == want
    out2 = served.tmp / "out2.img"
    await run("nbdcopy", served.uri("lin"), str(out2))
    assert out2.read_bytes() == want
    src = served.tmp / "src.img"
    src.write_bytes(random.Random(3).randbytes(MiB))
    await run("nbdcopy", str(src), served.uri("scratch"))       # into a device
    assert await served.m.find("scratch").pread(0, MiB) == src.read_bytes()
    await run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), served.uri("lin"))
    assert await md.pread(0, MiB) == src.read_bytes()
    assert await md.pread(MiB, 3 * MiB) == want[MiB:]
    await wait_closed(served.m, "lin")


LIBNBD_SCRIPT = r"""
import json, sys, nbd
uri, ro_uri = sys.argv[1:3]
out = {}
h = nbd.NBD()
h.connect_uri(uri)
out["size"] = h.get_size()
out["structured"] = h.get_structured_replies_negotiated()
out["ro"], out["multi"], out["fua"] = h.is_read_only(), h.can_multi_conn(), h.can_fua()
out["min"] = h.get_block_size(nbd.SIZE_MINIMUM)
h.pwrite(b"\x5a" * 8192, 0, nbd.CMD_FLAG_FUA)
out["read"] = h.pread(8192, 0) == b"\x5a" * 8192
h.flush()
h.trim(4096, 0)
h.zero(4096, 4096)
out["after"] = h.pread(8192, 0) == bytes(8192)
# 32 reads in flight at once, completed in any order
bufs = [nbd.Buffer(4096) for _ in range(32)]
cookies = [h.aio_pread(b, 4096 * i) for i, b in enumerate(bufs)]
while h.aio_in_flight():
    h.poll(-1)
out["aio"] = sum(h.aio_command_completed(c) for c in cookies)
try:
    h.pread(4096, out["size"])
except nbd.Error as e:
    out["beyond"] = e.errno
h.shutdown()
r = nbd.NBD()
r.connect_uri(ro_uri)
try:
    r.pwrite(b"x" * 512, 0)
except nbd.Error as e:
    out["ro_write"] = e.errno
r.shutdown()
print(json.dumps(out))
"""


async def test_python_libnbd(served):
    py = system_python_nbd()
    r = await run(py, "-c", LIBNBD_SCRIPT, served.uri("scratch"), served.uri("ro"))
    out = json.loads(r.stdout)
    assert out == {"size": MiB, "structured": True, "ro": False, "multi": True, "fua": True, "min": 512,
                   "read": True, "after": True, "aio": 32, "beyond": "EINVAL", "ro_write": "EPERM"}
    await wait_closed(served.m, "scratch")


async def test_many_clients_at_once(served):
    need("nbdinfo")
    results = []

    async def one(i):
        r = await run("nbdinfo", "--size", served.uri(["lin", "ro", "scratch"][i % 3]))
        results.append(int(r.stdout))

    async with trio.open_nursery() as n:
        for i in range(12):
            n.start_soon(one, i)
    assert sorted(results) == sorted([4 * MiB, MiB, MiB] * 4)


# -- a model test: one connection against an in-memory disk --------------------------------------------
BLOCKS = 64          # the model device: 64 blocks of 4 KiB


async def test_connection_model(served):
    """Random sequences of commands (pipelined, with bad ones mixed in) read back what an
    in-memory disk says, over structured and simple replies, across reconnects."""
    m = served.m
    await served.dm.create("model", "0 %d linear %s 0" % (BLOCKS * 8, served.tmp / "scratch.img"))
    md = m.find("model")
    await md.write(0, bytes(BLOCKS * 4096))
    token = trio.lowlevel.current_trio_token()

    def call(fn, *args):
        return trio.from_thread.run(fn, *args, trio_token=token)

    block = st.integers(0, BLOCKS - 1)

    class Machine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.model = bytearray(BLOCKS * 4096)
            self.c: Raw | None = None
            call(md.write, 0, bytes(BLOCKS * 4096))

        async def _open(self, structured):
            self.c = await Raw.connect(served.unix)
            assert (await self.c.go("model", structured=structured))["final"] == nbd.REP_ACK

        @initialize(structured=st.booleans())
        def connect(self, structured):
            call(self._open, structured)

        @rule(start=block, n=st.integers(1, 8), fill=st.integers(0, 255), fua=st.booleans())
        def write(self, start, n, fill, fua):
            n = min(n, BLOCKS - start)
            data = bytes([fill]) * (n * 4096)
            r = call(self.c.call, nbd.CMD_WRITE, start * 4096, len(data), data, nbd.CMD_FLAG_FUA if fua else 0)
            assert r.error == 0
            self.model[start * 4096:(start + n) * 4096] = data

        @rule(start=block, n=st.integers(1, 8))
        def read(self, start, n):
            n = min(n, BLOCKS - start)
            r = call(self.c.call, nbd.CMD_READ, start * 4096, n * 4096)
            assert r.error == 0 and r.data == self.model[start * 4096:(start + n) * 4096]

        @rule(start=block, n=st.integers(1, 8), trim=st.booleans())
        def zero(self, start, n, trim):
            n = min(n, BLOCKS - start)
            r = call(self.c.call, nbd.CMD_TRIM if trim else nbd.CMD_WRITE_ZEROES, start * 4096, n * 4096)
            assert r.error == 0       # linear over a file: a trim punches a hole, reads as zeros
            self.model[start * 4096:(start + n) * 4096] = bytes(n * 4096)

        @rule()
        def flush(self):
            assert call(self.c.call, nbd.CMD_FLUSH).error == 0

        @rule(start=block, fill=st.integers(0, 255))
        def write_while_suspended(self, start, fill):
            """Held while the device is suspended (no reply), done at resume."""
            data = bytes([fill]) * 4096

            async def go():
                await m.suspend("model")
                cookie = await self.c.request(nbd.CMD_WRITE, start * 4096, 4096, data)
                with trio.move_on_after(0.02):
                    early = await self.c.s.receive_some(1 << 16)
                    raise AssertionError("a reply while suspended: %r" % early)
                await m.resume("model")
                r = await self.c.reply()
                assert (r.cookie, r.error) == (cookie, 0)

            call(go)
            self.model[start * 4096:(start + 1) * 4096] = data

        @rule(blocks=st.lists(block, min_size=2, max_size=12, unique=True), fill=st.integers(0, 255))
        def pipelined(self, blocks, fill):
            """Writes to distinct blocks and reads of others, all sent before any reply."""
            async def go():
                writes = blocks[: len(blocks) // 2]
                sent = {}
                for b in writes:
                    sent[await self.c.request(nbd.CMD_WRITE, b * 4096, 4096, bytes([fill]) * 4096)] = ("w", b)
                for b in blocks[len(blocks) // 2:]:
                    sent[await self.c.request(nbd.CMD_READ, b * 4096, 4096)] = ("r", b)
                return sent, [await self.c.reply() for _ in sent]

            sent, replies = call(go)
            for b in blocks[: len(blocks) // 2]:
                self.model[b * 4096:(b + 1) * 4096] = bytes([fill]) * 4096
            for r in replies:
                kind, b = sent.pop(r.cookie)
                assert r.error == 0
                if kind == "r":
                    assert r.data == self.model[b * 4096:(b + 1) * 4096]
            assert not sent

        @rule(kind=st.sampled_from(["range", "unaligned", "command", "flags"]), start=block)
        def bad(self, kind, start):
            args = {"range": (nbd.CMD_WRITE, start * 4096, (BLOCKS + 1 - start) * 4096),
                    "unaligned": (nbd.CMD_WRITE, start * 4096 + 100, 512),
                    "command": (42, start * 4096, 512),
                    "flags": (nbd.CMD_WRITE, start * 4096, 512)}[kind]
            data = b"\xee" * args[2] if args[0] == nbd.CMD_WRITE else b""
            flags = 1 << 7 if kind == "flags" else 0
            r = call(self.c.call, *args, data, flags)
            assert r.error == (nbd.NBD_ENOSPC if kind == "range" else nbd.NBD_EINVAL)

        @precondition(lambda self: self.c is not None)
        @rule(structured=st.booleans())
        def reconnect(self, structured):
            call(self.c.aclose)
            call(wait_closed, m, "model")
            call(self._open, structured)

        @invariant()
        def one_opener(self):
            if self.c is not None:
                assert md.open_count == 1

        def teardown(self):
            if self.c is not None:
                call(self.c.aclose)
                call(wait_closed, m, "model")
            assert call(md.pread, 0, BLOCKS * 4096) == self.model

    await trio.to_thread.run_sync(lambda: run_state_machine_as_test(
        Machine, settings=settings(max_examples=40, stateful_step_count=25, deadline=None,
                                   suppress_health_check=list(HealthCheck))))


# -- fuzzing -------------------------------------------------------------------------------------------------
def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _exchange(address: str, data: bytes, half_close: bool = True) -> None:
    """Send raw bytes; then either half-close and drain what comes back until the server
    closes, or drop the connection at once."""
    s = await Raw.connect(address)
    try:
        with trio.fail_after(20):
            try:
                await s.send(data)
                if half_close:
                    await s.s.send_eof()
                    while await s.s.receive_some(1 << 16):
                        pass
            except (trio.BrokenResourceError, OSError):
                pass
    finally:
        await s.aclose()


def _option(opt, data=b"", length=None):
    return struct.pack(">QII", nbd.IHAVEOPT, opt, len(data) if length is None else length) + data


_options = st.one_of(
    st.binary(max_size=64),
    st.builds(_option, st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 0x7FFFFFFF, 0xFFFFFFFF]),
              st.binary(max_size=40)),
    st.builds(_option, st.sampled_from([6, 7]), st.builds(Raw.info_data, st.sampled_from(["lin", "", "nope", "ro"]),
                                                          st.lists(st.integers(0, 0xFFFF), max_size=4))),
    st.builds(_option, st.integers(0, 12), st.binary(max_size=8), st.integers(0, (1 << 32) - 1)),
)


def _request(flags, cmd, offset, length, payload):
    return struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, cmd, 7, offset, length) + payload


_requests = st.one_of(
    st.binary(max_size=64),
    st.builds(_request, st.integers(0, 0xFFFF), st.integers(0, 10),
              st.one_of(st.integers(0, MiB + 4096), st.integers(0, (1 << 64) - 1)),
              st.one_of(st.sampled_from([0, 1, 512, 4096, nbd.MAX_PAYLOAD_BYTES + 1]), st.integers(0, (1 << 32) - 1)),
              st.binary(max_size=600)),
    st.builds(_request, st.sampled_from([0, 1]), st.sampled_from([0, 1, 3, 4, 6]),
              st.integers(0, 255).map(lambda b: b * 4096), st.just(4096), st.just(b"\xf0" * 4096)),
)


async def test_fuzz_handshake_and_requests_leave_devices_intact(served):
    m = served.m
    lin = m.find("lin")
    before = _digest(await lin.pread(0, 4 * MiB))
    token = trio.lowlevel.current_trio_token()
    greeting = struct.pack(">I", nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES)
    go_scratch = (greeting + _option(nbd.OPT_STRUCTURED_REPLY)
                  + _option(nbd.OPT_GO, Raw.info_data("scratch")))

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(cflags=st.one_of(st.just(greeting), st.binary(max_size=4)), options=st.lists(_options, max_size=6),
           close=st.booleans())
    def handshakes(cflags, options, close):
        trio.from_thread.run(_exchange, served.unix, cflags + b"".join(options), close, trio_token=token)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(structured=st.booleans(), requests=st.lists(_requests, max_size=8), close=st.booleans())
    def transmissions(structured, requests, close):
        prefix = go_scratch if structured else greeting + _option(nbd.OPT_EXPORT_NAME, b"scratch")
        trio.from_thread.run(_exchange, served.unix, prefix + b"".join(requests), close, trio_token=token)

    await trio.to_thread.run_sync(handshakes)
    await trio.to_thread.run_sync(transmissions)
    await wait_closed(m, "scratch")
    assert m.info("lin").open_count == 0
    assert _digest(await lin.pread(0, 4 * MiB)) == before
    c = await Raw.connect(served.unix)              # and a normal client still works
    await c.go("lin")
    r = await c.call(nbd.CMD_READ, 0, 4 * MiB)
    assert r.error == 0 and _digest(r.data) == before


async def test_many_connections_opened_and_dropped(served):
    m = served.m
    rng = random.Random(5)
    greeting = struct.pack(">I", nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES)

    async def one(i):
        """Dropped at a random point of the handshake."""
        c = await Raw.connect(served.unix if i % 2 else served.tcp)
        try:
            stage = rng.randrange(4)
            if stage >= 1:
                await c.recv_exact(18)
            if stage == 1:
                await c.send(greeting[: rng.randrange(1, 4)])
            if stage >= 2:
                await c.send(greeting + _option(nbd.OPT_GO, Raw.info_data("lin"))[: rng.randrange(1, 20)])
            if stage == 3:
                await c.send(rng.randbytes(rng.randrange(1, 100)))
        finally:
            await c.aclose()

    async def go_and_drop(i):
        c = await Raw.connect(served.unix)
        try:
            await c.go("lin")
            for k in range(rng.randrange(0, 8)):
                await c.request(nbd.CMD_READ, k * 4096, 4096)
        finally:
            await c.aclose()

    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            for i in range(200):
                n.start_soon(one, i)
                if i % 4 == 0:
                    n.start_soon(go_and_drop, i)
    await wait_closed(m, "lin")
    c = await Raw.connect(served.tcp)
    await c.go("lin")
    assert (await c.call(nbd.CMD_READ, 0, 4096)).data == await m.find("lin").pread(0, 4096)


# -- the daemon ------------------------------------------------------------------------------------------------
def _fuzz_streams(rng: random.Random, count: int) -> list[bytes]:
    """Random garbage, and valid prefixes (greeting, options, GO) followed by garbage."""
    greeting = struct.pack(">I", nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES)
    go = greeting + _option(nbd.OPT_STRUCTURED_REPLY) + _option(nbd.OPT_GO, Raw.info_data("lin"))
    out = []
    for _ in range(count):
        tail = rng.randbytes(rng.randrange(0, 300))
        kind = rng.randrange(5)
        if kind == 0:
            out.append(tail)
        elif kind == 1:
            out.append(greeting + tail)
        elif kind == 2:
            out.append(greeting + _option(rng.randrange(0, 12), tail[:8], rng.randrange(0, 1 << 32)) + tail)
        elif kind == 3:      # reads and bad requests, never a write: lin must stay as it was
            cmd = rng.choice([nbd.CMD_READ, nbd.CMD_FLUSH, 5, 7, 42])
            out.append(go + _request(rng.randrange(1 << 16), cmd, rng.randrange(1 << 64), rng.randrange(1 << 32),
                                     b""))
        else:
            out.append(go + struct.pack(">IHHQ", nbd.REQUEST_MAGIC ^ rng.randrange(1, 1 << 32), 0, 0, 1) + tail)
    return out


async def test_daemon_exports_and_survives_garbage(tmp_path, images):
    """``dmsim daemon --nbd`` (twice): garbage on its NBD socket leaves the daemon up and the
    device's FUSE file as it was; a connected client makes ``dmsim remove`` fail EBUSY."""
    pytest.importorskip("pyfuse3")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    need("nbdinfo")
    mnt, state = tmp_path / "mnt", tmp_path / "state"
    mnt.mkdir()
    state.mkdir(mode=0o700)
    env = dict(os.environ, DMSIM_SOCKET=str(state / "control"))
    sock1, sock2 = str(tmp_path / "nbd1.sock"), str(tmp_path / "nbd2.sock")
    img = images.random(mib=4, seed=11, name="d.img")
    with open(img, "rb") as f:
        want = f.read()
    cli = [sys.executable, "-m", "dmsim"]

    async def dmsim_cmd(*args, check=True):
        with trio.fail_after(TOOL_TIMEOUT_SECONDS):
            r = await trio.run_process(cli + list(args), env=env, capture_stdout=True, capture_stderr=True,
                                       check=False)
        if check:
            assert r.returncode == 0, r.stderr
        return r

    pid = None
    try:
        r = await dmsim_cmd("daemon", "--mount", str(mnt), "--background", "--nbd", "unix:" + sock1,
                            "--nbd", "unix:" + sock2)
        pid = int(r.stdout.split()[1].split(b"=")[1])
        assert stat.S_IMODE(os.stat(sock1).st_mode) == 0o600 and os.path.exists(sock2)
        await dmsim_cmd("create", "lin", "--table", "0 8192 linear %s 0" % img)
        rng = random.Random(12)
        for stream in _fuzz_streams(rng, 300):
            await _exchange("unix:" + rng.choice([sock1, sock2]), stream, half_close=rng.random() < 0.7)
        os.kill(pid, 0)                                   # still there
        assert (await trio.to_thread.run_sync((mnt / "lin").read_bytes)) == want
        assert int((await run("nbdinfo", "--size", "nbd+unix:///lin?socket=" + sock2)).stdout) == 4 * MiB
        c = await Raw.connect("unix:" + sock1)
        await c.go("lin")
        r = await dmsim_cmd("remove", "lin", check=False)
        assert r.returncode and b"busy" in r.stderr
        assert (await c.call(nbd.CMD_READ, 0, 4096)).data == want[:4096]
        await c.aclose()
        with trio.fail_after(10):
            while (await dmsim_cmd("remove", "lin", check=False)).returncode:
                await trio.sleep(0.05)
        await dmsim_cmd("create", "keep", "--table", "0 8192 linear %s 0" % img)
        c = await Raw.connect("unix:" + sock2)        # connected through the shutdown
        await c.go("keep")
        assert (await c.call(nbd.CMD_READ, 0, 4096)).data == want[:4096]
        os.kill(pid, signal.SIGTERM)
        with trio.fail_after(30):
            while os.path.exists(state / "pid"):
                await trio.sleep(0.05)
            assert await c.closed_by_server()
        assert not os.path.exists(sock1) and not os.path.exists(sock2)
        pid = None
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=30)


async def test_connection_cap(served, monkeypatch):
    monkeypatch.setattr(nbd, "MAX_CONNECTIONS", 2)
    a, b = await Raw.connect(served.unix), await Raw.connect(served.unix)
    await a.recv_exact(18)
    await b.recv_exact(18)
    c = await Raw.connect(served.unix)
    assert await c.closed_by_server()          # the third is closed at once
    await a.aclose()
    with trio.fail_after(10):
        while True:                             # a slot frees when a connection ends
            d = await Raw.connect(served.unix)
            try:
                await d.recv_exact(18)
                break
            except EOFError:
                await trio.sleep(0.01)
    await b.aclose()
    await d.aclose()


async def test_large_trim_and_zeroes_go_in_pieces(served, monkeypatch):
    """A TRIM or WRITE_ZEROES longer than the payload maximum reaches the device in pieces
    no longer than it; NO_HOLE zeroing is a write of zeros (no hole punched)."""
    monkeypatch.setattr(nbd, "MAX_PAYLOAD_BYTES", 64 << 10)
    md = served.m.find("lin")
    seen = []
    submit = md.submit

    async def spy(bio):
        seen.append((bio.op.name, bio.sectors))
        return await submit(bio)

    monkeypatch.setattr(md, "submit", spy)
    c = await Raw.connect(served.unix)
    await c.go("lin")
    for cmd, flags in ((nbd.CMD_TRIM, 0), (nbd.CMD_WRITE_ZEROES, 0), (nbd.CMD_WRITE_ZEROES, nbd.CMD_FLAG_NO_HOLE)):
        seen.clear()
        assert (await c.call(cmd, 0, MiB, flags=flags)).error == 0
        assert len(seen) == 16 and all(n == 128 for _, n in seen), seen
        assert {op for op, _ in seen} == {"DISCARD" if cmd == nbd.CMD_TRIM else "WRITE" if flags else "WRITE_ZEROES"}
    assert await md.pread(0, MiB) == bytes(MiB)


async def test_replies_finished_together_go_out_in_one_syscall(served, monkeypatch):
    """16 reads sent at once: their replies leave in a few writev calls, not 16."""
    calls = []
    writev = os.writev

    def counting(fd, buffers):
        calls.append(len(buffers))
        return writev(fd, buffers)

    c = await Raw.connect(served.unix)
    await c.go("lin")
    monkeypatch.setattr(os, "writev", counting)
    batch = b""
    for i in range(16):
        c.cookie += 1
        c.pending[c.cookie] = (nbd.CMD_READ, 4096)
        batch += struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, c.cookie, i * 4096, 4096)
    await c.send(batch)
    replies = [await c.reply() for _ in range(16)]
    assert sorted(r.cookie for r in replies) == list(range(1, 17)) and all(not r.error for r in replies)
    assert len(calls) <= 4 and sum(calls) == 32, calls


async def test_table_shrunk_under_a_client_and_deferred_remove(served):
    """A reload to a smaller table: requests past the new end fail (EINVAL), the export
    keeps its size; a deferred remove happens when the last client goes."""
    m, dm = served.m, served.dm
    c = await Raw.connect(served.unix)
    assert (await c.go("scratch"))["size"] == MiB
    await dm.reload("scratch", "0 1024 linear %s 0" % (served.tmp / "scratch.img"))
    assert (await c.call(nbd.CMD_READ, 512 * 1024 - 4096, 4096)).error == 0
    r = await c.call(nbd.CMD_READ, 512 * 1024, 4096)
    assert r.error == nbd.NBD_EINVAL and "beyond the end" in r.message
    await m.remove("scratch", deferred=True)
    assert "scratch" in m.devices and m.info("scratch").deferred_remove
    assert (await c.call(nbd.CMD_READ, 0, 4096)).error == 0
    await c.aclose()
    with trio.fail_after(10):
        while "scratch" in m.devices:
            await trio.sleep(0.01)
