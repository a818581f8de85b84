"""NBD exports as backing devices: the client inside the daemon.

A table names an export by the URI form of NetworkBlockDevice/nbd ``doc/uri.md``:
``nbd+unix:///EXPORT?socket=PATH`` or ``nbd://HOST[:PORT]/EXPORT`` (port 10809 by
default).  :func:`dmsim.resolve.resolve` recognises the words lexically;
:func:`open_exports` (called from the manager's async name resolution, before any
constructor runs) connects to each new export with a bounded timeout, so the
constructors' synchronous ``get_device`` only looks the device up.  One
:class:`NbdDevice` per URI is shared by every table, refcounted in ``Manager._files``
like an image file.

The protocol is the fixed newstyle handshake with ``NBD_OPT_GO`` asking for
``NBD_INFO_BLOCK_SIZE`` (``NBD_OPT_EXPORT_NAME`` when a server does not know GO) and
simple replies.  Requests of all callers share one connection, many in flight, matched to
replies by cookie.  A lost connection fails the requests under way with EIO (the kernel
nbd driver's ``BLK_STS_IOERR``); a new request reconnects, at most once per backoff
interval (doubling up to :data:`BACKOFF_MAX_SECONDS`), and fails with EIO while the export
cannot be reached: to a target the export is a disk that failed, and one that works again
once the server is back.  Every NBD error reply is EIO too, as in the kernel.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import struct
import urllib.parse
from dataclasses import dataclass

import trio

from . import nbd
from .bio import SECTOR_SIZE, Bio, Op, to_bytes, to_sectors
from .blockdev import BlockDevice
from .errors import DMError
from .resolve import Resolved

log = logging.getLogger("dmsim.nbd_client")

NBD_DEFAULT_PORT = 10809
#: a table load waits at most this long for a new export (connect plus handshake)
CONNECT_TIMEOUT_SECONDS = 10.0
#: a request that finds the connection gone waits at most this long for a new one
RECONNECT_TIMEOUT_SECONDS = 5.0
BACKOFF_MIN_SECONDS = 0.05
BACKOFF_MAX_SECONDS = 2.0
#: a request's bytes must leave within this (a server that stops reading is gone)
SEND_TIMEOUT_SECONDS = 30.0
#: an export connected for a table load that then used none of it is closed after this
UNCLAIMED_LINGER_SECONDS = 30.0
#: TRIM and WRITE_ZEROES lengths are 32 bits: pieces of at most this
_MAX_RANGE_BYTES = 1 << 30
_MAX_OPTION_REPLY_BYTES = 64 << 10
_RECV_BYTES = 256 << 10

_REQUEST = struct.Struct(">IHHQQI")
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_SIMPLE = struct.Struct(">IIQ")


# -- URIs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NbdUri:
    """One export: by Unix socket (``socket_path``) or by TCP (``host``, ``port``)."""

    export: str
    socket_path: str = ""
    host: str = ""
    port: int = NBD_DEFAULT_PORT

    def __str__(self) -> str:
        name = urllib.parse.quote(self.export, safe="")
        if self.socket_path:
            return "nbd+unix:///%s?socket=%s" % (name, urllib.parse.quote(self.socket_path, safe="/"))
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "nbd://%s:%d/%s" % (host, self.port, name)


def looks_like_uri(word: str) -> bool:
    """Whether a table word is meant as an NBD URI (then it never names a path)."""
    return word.startswith(("nbd://", "nbd+", "nbds://", "nbds+"))


def parse_uri(word: str, cwd: str = "/") -> NbdUri:
    """The export a URI names; DMError(EINVAL) for one this client cannot use (TLS,
    vsock, no socket, a bad port).  A relative ``socket=`` path is taken from ``cwd``."""
    u = urllib.parse.urlsplit(word)
    if u.scheme.startswith("nbds"):
        raise DMError(errno.EINVAL, "NBD over TLS is not supported: %s" % word)
    export = urllib.parse.unquote(u.path[1:] if u.path.startswith("/") else u.path)
    query = urllib.parse.parse_qs(u.query, keep_blank_values=True)
    if u.scheme == "nbd+unix":
        if u.netloc:
            raise DMError(errno.EINVAL, "an nbd+unix URI has no host: %s" % word)
        sockets = query.get("socket", [])
        if len(sockets) != 1 or not sockets[0]:
            raise DMError(errno.EINVAL, "an nbd+unix URI needs one socket=PATH: %s" % word)
        return NbdUri(export, socket_path=os.path.normpath(os.path.join(cwd, sockets[0])))
    if u.scheme in ("nbd", "nbd+tcp"):
        try:
            port = u.port
        except ValueError:
            raise DMError(errno.EINVAL, "bad port in %s" % word) from None
        if not u.hostname:
            raise DMError(errno.EINVAL, "an nbd URI needs a host: %s" % word)
        return NbdUri(export, host=u.hostname, port=NBD_DEFAULT_PORT if port is None else port)
    raise DMError(errno.EINVAL, "unsupported NBD URI scheme %r" % u.scheme)


# -- one connection -------------------------------------------------------------------------
class _Lost(Exception):
    """The connection is gone or the server broke the protocol."""


@dataclass
class ExportInfo:
    size_bytes: int
    flags: int
    min_block_bytes: int = 1
    max_payload_bytes: int = nbd.MAX_PAYLOAD_BYTES


class _Request:
    __slots__ = ("cmd", "length_bytes", "done", "error", "data")

    def __init__(self, cmd: int, length_bytes: int):
        self.cmd = cmd
        self.length_bytes = length_bytes
        self.done = trio.Event()
        self.error = 0                   # the NBD error value, or -1: connection lost
        self.data: bytes = b""


class _Connection:
    """A socket in transmission: callers send under a lock, one reader task matches
    replies to requests by cookie."""

    def __init__(self, stream: trio.SocketStream, info: ExportInfo):
        self.stream = stream
        self.info = info
        self.buf = bytearray()
        self._chunk = bytearray(_RECV_BYTES)
        self.pending: dict[int, _Request] = {}
        self.send_lock = trio.Lock()
        self.cookie = 0
        self.dead = False
        self.reader_scope = trio.CancelScope()

    async def recv_exact(self, n: int) -> bytes:
        """``n`` bytes; received into one reused buffer (``receive_some`` would allocate
        its whole maximum for every call: measured, a third of a 4 KiB request's cost)."""
        sock = self.stream.socket
        while len(self.buf) < n:
            try:
                got = await sock.recv_into(self._chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise _Lost(str(e) or type(e).__name__) from None
            if not got:
                raise _Lost("the server closed the connection")
            self.buf += memoryview(self._chunk)[:got]
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def request(self, cmd: int, flags: int, offset_bytes: int, length_bytes: int, data=None) -> bytes:
        """One command and its reply; DMError(EIO) when it fails or the connection goes."""
        if self.dead:
            raise DMError(errno.EIO, "NBD connection lost")
        self.cookie += 1
        cookie = self.cookie
        req = _Request(cmd, length_bytes)
        self.pending[cookie] = req
        header = _REQUEST.pack(nbd.REQUEST_MAGIC, flags, cmd, cookie, offset_bytes, length_bytes)
        # a request cut off half-sent would garble every later one: sends are shielded,
        # bounded by their own deadline instead (one scope for both: each costs ~10% of
        # a 4 KiB request)
        with trio.CancelScope(shield=True, deadline=trio.current_time() + SEND_TIMEOUT_SECONDS) as scope:
            async with self.send_lock:
                if self.dead:
                    self.pending.pop(cookie, None)
                    raise DMError(errno.EIO, "NBD connection lost")
                try:
                    await self.stream.send_all(header if data is None else header + bytes(data))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    self.fail("send failed")
        if scope.cancelled_caught:
            self.fail("send timed out")
        await req.done.wait()
        if req.error:
            raise DMError(errno.EIO, "NBD connection lost" if req.error < 0 else
                          "NBD server error %d" % req.error)
        return req.data

    async def read_replies(self) -> None:
        """Until the connection ends: every reply to its request (a reply to no request,
        or a structured one we never asked for, ends the connection)."""
        why = "closed"
        try:
            with self.reader_scope:
                while True:
                    magic, err, cookie = _SIMPLE.unpack(await self.recv_exact(_SIMPLE.size))
                    if magic != nbd.SIMPLE_REPLY_MAGIC:
                        raise _Lost("bad reply magic %#x" % magic)
                    req = self.pending.pop(cookie, None)
                    if req is None:
                        raise _Lost("reply to unknown cookie %d" % cookie)
                    if req.cmd == nbd.CMD_READ and not err:
                        req.data = await self.recv_exact(req.length_bytes)
                    req.error = err
                    req.done.set()
        except _Lost as e:
            why = str(e)
        except Exception as e:    # a bug here ends this connection, never the daemon
            log.exception("NBD client reader failed")
            why = repr(e)
        finally:                  # (also when the manager's nursery is cancelled)
            self.fail(why)

    def fail(self, why: str) -> None:
        """The connection is over: requests under way fail (EIO), the socket closes."""
        if self.dead:
            return
        self.dead = True
        (log.info if why in ("closed", "disconnected") else log.warning)("NBD connection ended: %s", why)
        self.reader_scope.cancel()
        for req in self.pending.values():
            req.error = -1
            req.done.set()
        self.pending.clear()
        self.stream.socket.close()

    async def disconnect(self) -> None:
        """NBD_CMD_DISC, then close (best effort: the server may be gone)."""
        if self.dead:
            return
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 1):
            async with self.send_lock:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    await self.stream.send_all(_REQUEST.pack(nbd.REQUEST_MAGIC, 0, nbd.CMD_DISC, 0, 0, 0))
        self.fail("disconnected")


async def _open_stream(uri: NbdUri) -> trio.SocketStream:
    if uri.socket_path:
        return await trio.open_unix_socket(uri.socket_path)
    return await trio.open_tcp_stream(uri.host, uri.port)


async def handshake(conn: _Connection, export: str) -> ExportInfo:
    """Fixed newstyle: GO with nbd.INFO_BLOCK_SIZE (EXPORT_NAME for a server without GO)."""
    magic, opt_magic, hflags = struct.unpack(">QQH", await conn.recv_exact(18))
    if magic != nbd.NBDMAGIC or opt_magic != nbd.IHAVEOPT:
        raise _Lost("not a newstyle NBD server")
    if not hflags & nbd.FLAG_FIXED_NEWSTYLE:
        raise _Lost("the server does not speak fixed newstyle")
    no_zeroes = bool(hflags & nbd.FLAG_NO_ZEROES)
    name = export.encode()
    cflags = nbd.FLAG_C_FIXED_NEWSTYLE | (nbd.FLAG_C_NO_ZEROES if no_zeroes else 0)
    await conn.stream.send_all(struct.pack(">I", cflags))
    data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, nbd.INFO_BLOCK_SIZE)
    await conn.stream.send_all(_OPTION.pack(nbd.IHAVEOPT, nbd.OPT_GO, len(data)) + data)
    info: ExportInfo | None = None
    min_block, max_payload = 1, nbd.MAX_PAYLOAD_BYTES
    while True:
        rmagic, ropt, rtype, rlen = _OPTION_REPLY.unpack(await conn.recv_exact(_OPTION_REPLY.size))
        if rmagic != nbd.OPT_REPLY_MAGIC or ropt != nbd.OPT_GO or rlen > _MAX_OPTION_REPLY_BYTES:
            raise _Lost("bad option reply")
        body = await conn.recv_exact(rlen)
        if rtype == nbd.REP_INFO and len(body) >= 2:
            kind = struct.unpack(">H", body[:2])[0]
            if kind == nbd.INFO_EXPORT and len(body) == 12:
                size, flags = struct.unpack(">QH", body[2:])
                info = ExportInfo(size, flags)
            elif kind == nbd.INFO_BLOCK_SIZE and len(body) == 14:
                min_block, _pref, max_payload = struct.unpack(">III", body[2:])
        elif rtype == nbd.REP_ACK:
            break
        elif rtype == nbd.REP_ERR_UNSUP:       # an old server: EXPORT_NAME has no way to say no
            await conn.stream.send_all(_OPTION.pack(nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME, len(name)) + name)
            size, flags = struct.unpack(">QH", await conn.recv_exact(10))
            if not no_zeroes:
                await conn.recv_exact(124)
            return ExportInfo(size, flags)
        elif rtype & (1 << 31):
            raise _Lost("the server refused export %r: %s" % (export, body[4:].decode(errors="replace")
                                                             or "error %#x" % rtype))
    if info is None:
        raise _Lost("the server sent no NBD_INFO_EXPORT")
    info.min_block_bytes = min_block
    info.max_payload_bytes = max(min_block, min(max_payload, nbd.MAX_PAYLOAD_BYTES))
    return info


# -- the device ---------------------------------------------------------------------------------
class NbdDevice(BlockDevice):
    """An NBD export as a backing device, printed in tables by its URI.

    Construct with :meth:`open` (connects once, or fails).  ``nursery`` runs the
    connections' reader tasks (the manager's); :meth:`close` ends them."""

    def __init__(self, uri: NbdUri, nursery: trio.Nursery):
        self.uri = uri
        self.nursery = nursery
        self.kname = "nbd"
        self.path = None
        self.closed = False
        self._conn: _Connection | None = None
        self._connecting: trio.Event | None = None
        self._next_attempt = -math.inf       # trio time of the next reconnect allowed
        self._backoff = BACKOFF_MIN_SECONDS
        self.flags = 0
        self.max_payload_bytes = nbd.MAX_PAYLOAD_BYTES
        self.connects = 0                    # connections made (tests, status)

    @property
    def ref(self) -> str:
        return str(self.uri)

    @classmethod
    async def open(cls, uri: NbdUri, nursery: trio.Nursery,
                   timeout: float = CONNECT_TIMEOUT_SECONDS) -> "NbdDevice":
        """Connect and take the export's size and limits; DMError(ENODEV) if it cannot
        be reached within ``timeout``."""
        dev = cls(uri, nursery)
        why = await dev._connect(timeout)
        if why:
            raise DMError(errno.ENODEV, "cannot reach NBD export %s: %s" % (uri, why))
        return dev

    async def _connect(self, timeout: float) -> str:
        """One attempt; '' on success, else why it failed."""
        stream = None
        why = "timed out"
        try:
            with trio.move_on_after(timeout):
                try:
                    stream = await _open_stream(self.uri)
                    conn = _Connection(stream, ExportInfo(0, 0))
                    conn.info = await handshake(conn, self.uri.export)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, _Lost, struct.error) as e:
                    why = str(e) or type(e).__name__
                else:
                    why = self._adopt(conn)
                    if not why:
                        stream = None            # the connection owns it now
                        return ""
        finally:                                 # (cancelled too: no socket left open)
            if stream is not None:
                stream.socket.close()
        return why

    def _adopt(self, conn: _Connection) -> str:
        """Take a fresh connection (the first one sets size and limits; a later one must
        show the same export no smaller)."""
        info = conn.info
        size_sectors = to_sectors(info.size_bytes)
        if self.connects == 0:
            self.size_sectors = size_sectors
            block = info.min_block_bytes
            self.logical_block_size = block if SECTOR_SIZE <= block <= 4096 and not block & (block - 1) \
                else SECTOR_SIZE
            self.read_only = bool(info.flags & nbd.FLAG_READ_ONLY)
        elif size_sectors < self.size_sectors:
            return "the export shrank to %d sectors" % size_sectors
        self.flags = info.flags
        self.max_payload_bytes = max(self.logical_block_size,
                                     info.max_payload_bytes // self.logical_block_size * self.logical_block_size)
        self.connects += 1
        self._conn = conn
        self._backoff = BACKOFF_MIN_SECONDS
        self.nursery.start_soon(conn.read_replies, name="nbd reader %s" % self.uri)
        return ""

    async def _connection(self) -> _Connection:
        """The live connection, reconnecting if it was lost and the backoff allows;
        DMError(EIO) when there is none."""
        while True:
            if self.closed:
                raise DMError(errno.EIO, "NBD device closed")
            conn = self._conn
            if conn is not None and not conn.dead:
                return conn
            if self._connecting is not None:
                await self._connecting.wait()
                conn = self._conn
                if conn is not None and not conn.dead:
                    return conn
                raise DMError(errno.EIO, "NBD export %s unreachable" % self.uri)
            if trio.current_time() < self._next_attempt:
                raise DMError(errno.EIO, "NBD export %s unreachable" % self.uri)
            self._connecting = event = trio.Event()
            try:
                with trio.CancelScope(shield=True):     # waiters share this attempt
                    why = await self._connect(RECONNECT_TIMEOUT_SECONDS)
            finally:
                self._connecting = None
                event.set()
            if why:
                log.info("NBD: reconnect to %s failed: %s", self.uri, why)
                self._next_attempt = trio.current_time() + self._backoff
                self._backoff = min(self._backoff * 2, BACKOFF_MAX_SECONDS)
                raise DMError(errno.EIO, "NBD export %s unreachable" % self.uri)
            log.info("NBD: reconnected to %s", self.uri)

    async def _command(self, cmd: int, flags: int, offset_bytes: int, length_bytes: int, data=None) -> bytes:
        conn = await self._connection()
        return await conn.request(cmd, flags, offset_bytes, length_bytes, data)

    async def submit(self, bio: Bio):
        self.check_bounds(bio)
        off, n = to_bytes(bio.sector), to_bytes(bio.sectors)
        if bio.op is Op.READ:
            return await self._read(bio, off, n)
        if self.read_only:
            raise DMError(errno.EPERM, "write to read-only device")
        if bio.op is Op.WRITE:
            await self._write(off, bio.data if bio.data is not None else bytes(n), bio.fua)
        elif bio.op is Op.FLUSH:
            await self._flush()
        elif bio.op is Op.DISCARD:
            if not self.flags & nbd.FLAG_SEND_TRIM:
                raise DMError(errno.EOPNOTSUPP, "the export does not take TRIM")
            await self._ranges(nbd.CMD_TRIM, off, n)
        elif bio.op is Op.WRITE_ZEROES:
            if self.flags & nbd.FLAG_SEND_WRITE_ZEROES:
                await self._ranges(nbd.CMD_WRITE_ZEROES, off, n)
            else:
                zeros = bytes(min(n, self.max_payload_bytes))
                for pos in range(0, n, len(zeros)):
                    await self._write(off + pos, zeros[:min(len(zeros), n - pos)], False)
        return None

    async def _read(self, bio: Bio, off: int, n: int):
        step = self.max_payload_bytes
        if n <= step:
            data = await self._command(nbd.CMD_READ, 0, off, n)
            if bio.data is not None:
                memoryview(bio.data)[:] = data
                return bio.data
            return data
        out = bio.data if bio.data is not None else bytearray(n)
        mv = memoryview(out)
        for pos in range(0, n, step):
            length = min(step, n - pos)
            mv[pos:pos + length] = await self._command(nbd.CMD_READ, 0, off + pos, length)
        return out if bio.data is not None else bytes(out)

    async def _write(self, off: int, data, fua: bool) -> None:
        mv = memoryview(data)
        step = self.max_payload_bytes
        native_fua = fua and bool(self.flags & nbd.FLAG_SEND_FUA)
        for pos in range(0, len(mv), step):
            piece = mv[pos:pos + step]
            last = pos + step >= len(mv)
            await self._command(nbd.CMD_WRITE, nbd.CMD_FLAG_FUA if native_fua and last else 0, off + pos,
                                len(piece), piece)
        if fua and not native_fua:
            await self._flush()            # the block layer's FUA emulation: a flush after

    async def _flush(self) -> None:
        if self.flags & nbd.FLAG_SEND_FLUSH:   # no flush: no write cache to flush
            await self._command(nbd.CMD_FLUSH, 0, 0, 0)

    async def _ranges(self, cmd: int, off: int, n: int) -> None:
        step = _MAX_RANGE_BYTES
        for pos in range(0, n, step):
            await self._command(cmd, 0, off + pos, min(step, n - pos))

    def close(self) -> None:
        """Hang up (NBD_CMD_DISC in the background) and fail whatever is under way."""
        if self.closed:
            return
        self.closed = True
        conn, self._conn = self._conn, None
        if conn is not None and not conn.dead:
            try:
                self.nursery.start_soon(conn.disconnect, name="nbd disconnect")
            except RuntimeError:           # the nursery is closing: just close
                conn.fail("closed")


# -- tables -------------------------------------------------------------------------------------
def own_export(manager, r: Resolved) -> Resolved | None:
    """The dm device an ``nbd+unix`` URI names when the socket is one of ``manager``'s
    own NBD listeners: used in-process, never through the socket."""
    if r.socket_id is not None and nbd.LISTENING_SOCKETS.get(r.socket_id) is manager:
        return Resolved("dm-name", name=r.name)
    return None


async def open_exports(manager, resolved: dict) -> None:
    """Before a table's constructors run: connect to every export it names that the
    manager does not hold yet (concurrently, each bounded by
    :data:`CONNECT_TIMEOUT_SECONDS`), and put the device in ``manager._files`` for
    ``get_device``; an export that cannot be reached becomes DMError(ENODEV), so its
    target fails with "Device lookup failed".  ``resolved`` is updated in place."""
    todo: dict[str, list[str]] = {}
    for word, r in resolved.items():
        if not isinstance(r, Resolved) or r.kind != "nbd":
            continue
        mine = own_export(manager, r)
        if mine is not None:
            resolved[word] = mine
        elif (r.path, True) not in manager._files:
            todo.setdefault(r.path, []).append(word)
    if not todo:
        return

    async def one(key: str, words: list[str]) -> None:
        r = resolved[words[0]]
        assert isinstance(r, Resolved)
        uri = NbdUri(r.name, socket_path=r.socket_path, host=r.host, port=r.port)
        try:
            dev = await NbdDevice.open(uri, manager.nursery)
        except DMError as e:
            log.warning("%s", e.message)
            for w in words:
                resolved[w] = DMError(errno.ENODEV, "Device lookup failed")
            return
        entry = manager._files.get((key, True))
        if entry is not None:              # another load connected meanwhile: share its
            dev.close()
            return
        entry = manager._files[(key, True)] = [dev, 0]
        manager.nursery.start_soon(_close_unclaimed, manager, (key, True), entry)

    async with trio.open_nursery() as nursery:
        for key, words in todo.items():
            nursery.start_soon(one, key, words)


async def _close_unclaimed(manager, key, entry) -> None:
    """An export connected for a table that never held it (the load failed, or the
    word was no device after all) is let go after :data:`UNCLAIMED_LINGER_SECONDS`."""
    await trio.sleep(UNCLAIMED_LINGER_SECONDS)
    if manager._files.get(key) is entry and entry[1] == 0:
        del manager._files[key]
        entry[0].close()


def get_export(manager, r: Resolved) -> BlockDevice:
    """``get_device`` for an NBD URI: the shared device :func:`open_exports` connected
    (ENODEV when it did not: a name resolved without a connection attempt)."""
    key = (r.path, True)
    entry = manager._files.get(key)
    if entry is None:
        raise DMError(errno.ENODEV, "Device lookup failed")
    entry[1] += 1
    return entry[0]
