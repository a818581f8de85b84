"""NBD export: every mapped device served over the NBD protocol.

``serve_nbd(manager, "unix:PATH")`` or ``"tcp:HOST:PORT"`` listens until cancelled; the
export name is the device name.  The protocol is the fixed newstyle handshake of
NetworkBlockDevice/nbd ``doc/proto.md`` (no TLS, no oldstyle; a client that does not
set NBD_FLAG_C_FIXED_NEWSTYLE may only send EXPORT_NAME):

* handshake flags FIXED_NEWSTYLE and NO_ZEROES; options EXPORT_NAME, GO, INFO (replies
  NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE always, NBD_INFO_NAME and NBD_INFO_DESCRIPTION
  when asked), LIST (devices with a live table), ABORT and STRUCTURED_REPLY; any other
  option gets NBD_REP_ERR_UNSUP.  The default export ``""`` is refused, as nbdkit's file
  plugin refuses it in directory mode: there is no one obvious device to give.
* commands READ, WRITE, FLUSH, TRIM (the target's discard), WRITE_ZEROES (the target's
  write zeroes, which may punch a hole; with NO_HOLE a write of zeros) and DISC, TRIM and
  WRITE_ZEROES in pieces of at most :data:`MAX_PAYLOAD_BYTES`; the FUA flag on every
  command (a WRITE is a FUA bio, TRIM and WRITE_ZEROES are followed by a flush); DF on
  reads once structured replies are on (a read is always one chunk).  Size constraints:
  the minimum block is the device's logical block size, the preferred one a page (or
  that block), payloads up to :data:`MAX_PAYLOAD_BYTES`.  Errors as the spec and nbdkit
  give them: out of range EINVAL (ENOSPC for writes and write-zeroes), unaligned EINVAL,
  a read-only device EPERM, unknown commands or flags EINVAL, target failures EIO.
  Structured replies carry a message with each error.  Transmission flags: FLUSH, FUA,
  TRIM, WRITE_ZEROES, CAN_MULTI_CONN (every connection reaches the same device, no cache
  of its own), READ_ONLY for a read-only table.

An export in transmission is an open of the device (its open count), so removing it fails
with EBUSY while the client is connected.  Requests go to ``MappedDevice.submit`` as a
FUSE file's do: a suspended device holds them until resume.  The requests of one
connection run concurrently (replies by cookie, in completion order) up to
:data:`MAX_INFLIGHT_REQUESTS` and :data:`MAX_INFLIGHT_BYTES` (every request but FLUSH
counts its length, up to the payload maximum); past either the connection stops
reading.  A client that hangs up lets its requests under way finish (cancelling a target
mid-request is not safe), then its open is dropped.  Malformed input (bad magic,
truncation, oversized option or write payload, too many options, a handshake slower
than :data:`HANDSHAKE_TIMEOUT_SECONDS`) closes that connection only.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import socket as _stdsocket
import struct

import trio

from .bio import PAGE_SIZE, SECTOR_SIZE, Bio, Op, to_bytes, to_sectors
from .device import MappedDevice
from .errors import DMError
from .manager import Manager
from .server import bind_socket

log = logging.getLogger("dmsim.nbd")

# -- the protocol's numbers (doc/proto.md) ------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0           # handshake flags (server)
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0         # client flags
FLAG_C_NO_ZEROES = 1 << 1

FLAG_HAS_FLAGS = 1 << 0                # transmission flags
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_ERROR = (1 << 15) + 1

NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ESHUTDOWN = 108

# -- limits ---------------------------------------------------------------------------------------
#: the largest READ or WRITE payload (the spec's interoperable maximum, 2^25)
MAX_PAYLOAD_BYTES = 32 << 20
#: option data larger than this gets NBD_REP_ERR_TOO_BIG and a hang-up (names are <= 4 KiB)
MAX_OPTION_BYTES = 64 << 10
MAX_OPTIONS = 256
MAX_INFLIGHT_REQUESTS = 64
MAX_INFLIGHT_BYTES = 128 << 20
MAX_CONNECTIONS = 1024
HANDSHAKE_TIMEOUT_SECONDS = 60
#: connections waiting to be accepted (a full Unix socket backlog fails connect with EAGAIN)
LISTEN_BACKLOG = 1024
_RECV_BYTES = 64 << 10
_IOV_MAX = 1024
_SOCKET_BUFFER_BYTES = 2 << 20

#: the (st_dev, st_ino) of every Unix socket a serve_nbd listens on, and its manager: a
#: table naming one of its own manager's sockets uses the device in-process
#: (dmsim.nbd_client.own_export)
LISTENING_SOCKETS: dict[tuple[int, int], Manager] = {}

_REQUEST = struct.Struct(">IHHQQI")
_OPTION = struct.Struct(">QII")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")

_TO_NBD_ERRNO = {
    errno.EPERM: NBD_EPERM, errno.EROFS: NBD_EPERM, errno.EACCES: NBD_EPERM,
    errno.EIO: NBD_EIO, errno.ENOMEM: NBD_ENOMEM, errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC, errno.EDQUOT: NBD_ENOSPC, errno.EFBIG: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW, errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def nbd_errno(e: BaseException) -> int:
    """The NBD error value for a failed request (the spec's small set; EIO otherwise)."""
    err = getattr(e, "errno", None)
    return _TO_NBD_ERRNO.get(err, NBD_EIO) if isinstance(err, int) else NBD_EIO


def parse_address(address: str) -> tuple[str, str, int]:
    """``unix:PATH`` -> ("unix", PATH, 0); ``tcp:HOST:PORT`` -> ("tcp", HOST, PORT)
    (``[v6]`` brackets allowed)."""
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest:
        return "unix", rest, 0
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if host and port.isdigit() and int(port) < 65536:
            return "tcp", host, int(port)
    raise DMError(errno.EINVAL, "bad NBD address %r (want unix:PATH or tcp:HOST:PORT)" % address)


class _Hangup(Exception):
    """This connection ends (the peer left or broke the protocol)."""


class _RequestError(Exception):
    """One request fails with an NBD error value and a message for the client."""

    def __init__(self, nbd_err: int, message: str):
        super().__init__(message)
        self.nbd_errno = nbd_err
        self.message = message


class _Budget:
    """The requests and payload bytes of one connection under way; the reader waits
    while either is at its cap (one request may always start, however large)."""

    def __init__(self, max_requests: int, max_bytes: int):
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0
        self.nbytes = 0
        self._lot = trio.lowlevel.ParkingLot()

    async def acquire(self, nbytes: int) -> None:
        while self.requests >= self.max_requests or (self.requests and self.nbytes + nbytes > self.max_bytes):
            await self._lot.park()
        self.requests += 1
        self.nbytes += nbytes

    def release(self, nbytes: int) -> None:
        self.requests -= 1
        self.nbytes -= nbytes
        self._lot.unpark_all()


def describe(md: MappedDevice) -> str:
    """NBD_INFO_DESCRIPTION and LIST's detail: the target types and the dm number."""
    types = ",".join(dict.fromkeys(t.name for t in md.live.targets)) if md.live else "no table"
    return "%s (%s)" % (types, md.mm)


class NBDServer:
    """The connections of one listening address (or several) over one manager."""

    def __init__(self, manager: Manager):
        self.manager = manager
        self.connections = 0

    def exports(self) -> list[MappedDevice]:
        """What LIST shows: the devices that GO would accept."""
        return [self.manager.devices[n] for n in self.manager.names()
                if self.manager.devices[n].live is not None]

    def lookup(self, name: str) -> tuple[MappedDevice | None, str]:
        """The device exported as ``name``, or None and why not."""
        if not name:
            return None, "no default export: name a device"
        md = self.manager.devices.get(name)
        if md is None or md.removed:
            return None, "no device %s" % name
        if md.live is None:
            return None, "device %s has no live table" % name
        return md, ""

    async def handle(self, stream: trio.SocketStream) -> None:
        if self.connections >= MAX_CONNECTIONS:
            log.warning("NBD: %d connections already; refusing another", self.connections)
            with trio.CancelScope(shield=True):
                await stream.aclose()
            return
        self.connections += 1
        for opt in (_stdsocket.SO_SNDBUF, _stdsocket.SO_RCVBUF):
            # room for a whole 1 MiB request or reply: one syscall, not five waits
            with contextlib.suppress(OSError):
                stream.socket.setsockopt(_stdsocket.SOL_SOCKET, opt, _SOCKET_BUFFER_BYTES)
        try:
            await _Connection(self, stream).run()
        finally:
            self.connections -= 1


class _Connection:
    def __init__(self, server: NBDServer, stream: trio.SocketStream):
        self.server = server
        self.manager = server.manager
        self.stream = stream
        self.sock = stream.socket
        self.buf = bytearray()
        self._chunk = bytearray(_RECV_BYTES)     # recv lands here (no allocation per recv)
        # replies waiting to go out, numbered: one task at a time sends whatever is queued
        self._queue: collections.deque[tuple[int, list[memoryview]]] = collections.deque()
        self._queued = 0                         # number of the last message queued
        self._sent = 0                           # ... and of the last one sent
        self._sending = False
        self._sent_lot = trio.lowlevel.ParkingLot()
        self.broken = False
        self.structured = False
        self.no_zeroes = False
        self.md: MappedDevice | None = None
        self.size_bytes = 0
        self.min_block_bytes = SECTOR_SIZE
        self.budget = _Budget(MAX_INFLIGHT_REQUESTS, MAX_INFLIGHT_BYTES)

    async def run(self) -> None:
        try:
            with trio.move_on_after(HANDSHAKE_TIMEOUT_SECONDS) as timer:
                go = await self.handshake()
            if timer.cancelled_caught:
                log.debug("NBD: handshake timed out")
            elif go:
                await self.transmission()
        except _Hangup as e:
            if str(e):
                log.debug("NBD: closing a connection: %s", e)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:  # a bug here must end this connection only
            log.exception("NBD connection failed")
        finally:
            if self.md is not None and not self.md.removed:
                self.manager.close(self.md)
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    # -- bytes in and out --------------------------------------------------------------------------
    async def _recv_into(self, buf) -> int:
        """A plain ``readv`` while data is there (no scheduler pass per read; the reader
        still yields when the socket is empty or its requests are at the cap), else wait."""
        while True:
            try:
                return os.readv(self.sock.fileno(), [buf])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
            except OSError as e:
                raise _Hangup("") from e

    async def _fill(self) -> None:
        got = await self._recv_into(self._chunk)
        if not got:
            raise _Hangup("")
        self.buf += memoryview(self._chunk)[:got]

    async def recv_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def recv_payload(self, n: int) -> bytearray:
        """``n`` bytes into a buffer of their own (straight from the socket past what is
        buffered: a 1 MiB write is not copied through ``self.buf``)."""
        out = bytearray(n)
        mv = memoryview(out)
        have = min(n, len(self.buf))
        mv[:have] = self.buf[:have]
        del self.buf[:have]
        pos = have
        while pos < n:
            got = await self._recv_into(mv[pos:])
            if not got:
                raise _Hangup("truncated write payload")
            pos += got
        return out

    async def send(self, *parts) -> None:
        """Send one message (its parts back to back, never interleaved with another's) and
        return once it is out.  Messages queued while a send is under way go out together
        in the next ``writev``, and with other requests in flight the sender waits one
        scheduler pass for theirs: at queue depth 16 the replies finished in one pass cost
        one syscall and one wake-up of the client, not 16.  A peer that has gone
        is noted, not raised: its reader sees the end too."""
        if self.broken:
            return
        self._queued += 1
        number = self._queued
        self._queue.append((number, [memoryview(p) for p in parts if len(p)]))
        while self._sent < number and not self.broken:
            if self._sending:
                await self._sent_lot.park()
            else:
                await self._drain()

    async def _drain(self) -> None:
        self._sending = True
        try:
            if self.budget.requests > 1:
                # others in flight may finish in this scheduler pass: let them queue
                # their replies behind this one, then send all with one syscall
                await trio.lowlevel.cancel_shielded_checkpoint()
            while self._queue and not self.broken:
                views: list[memoryview] = []
                last = 0
                while self._queue and (not views or len(views) + len(self._queue[0][1]) <= _IOV_MAX):
                    last, message = self._queue.popleft()
                    views += message
                while views:
                    try:   # a plain writev first: no scheduler pass when the socket has room
                        sent = os.writev(self.sock.fileno(), views)
                    except BlockingIOError:
                        sent = await self.sock.sendmsg(views)
                    while views and sent >= len(views[0]):
                        sent -= len(views.pop(0))
                    if sent:
                        views[0] = views[0][sent:]
                self._sent = last
                self._sent_lot.unpark_all()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.broken = True
            self._queue.clear()
        finally:
            self._sending = False
            self._sent_lot.unpark_all()

    # -- handshake ---------------------------------------------------------------------------------
    async def handshake(self) -> bool:
        """Option haggling; True when the client entered transmission."""
        await self.send(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", await self.recv_exact(4))
        if cflags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            raise _Hangup("unknown client flags 0x%x" % cflags)
        self.no_zeroes = bool(cflags & FLAG_C_NO_ZEROES)
        fixed = bool(cflags & FLAG_C_FIXED_NEWSTYLE)
        for _ in range(MAX_OPTIONS):
            magic, opt, length_bytes = _OPTION.unpack(await self.recv_exact(_OPTION.size))
            if magic != IHAVEOPT:
                raise _Hangup("bad option magic 0x%x" % magic)
            if length_bytes > MAX_OPTION_BYTES:
                await self.opt_reply(opt, REP_ERR_TOO_BIG, "option data of %d bytes is too large" % length_bytes)
                raise _Hangup("option of %d bytes" % length_bytes)
            data = await self.recv_exact(length_bytes)
            if not fixed and opt != OPT_EXPORT_NAME:
                # plain newstyle knows no option replies: EXPORT_NAME is all it may send
                raise _Hangup("option %d from a client without fixed newstyle" % opt)
            if opt == OPT_EXPORT_NAME:
                await self.export_name(data)
                return True
            if opt == OPT_ABORT:
                await self.opt_reply(opt, REP_ACK)
                return False
            if opt in (OPT_INFO, OPT_GO):
                if await self.info_go(opt, data):
                    return True
            elif opt == OPT_LIST:
                await self.list_exports(data)
            elif opt == OPT_STRUCTURED_REPLY:
                if data:
                    await self.opt_reply(opt, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
                else:
                    self.structured = True
                    await self.opt_reply(opt, REP_ACK)
            else:
                await self.opt_reply(opt, REP_ERR_UNSUP, "option %d is not supported" % opt)
        raise _Hangup("more than %d options" % MAX_OPTIONS)

    async def opt_reply(self, opt: int, reply: int, data: bytes | str = b"") -> None:
        if isinstance(data, str):
            data = data.encode()
        await self.send(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, reply, len(data)) + data)

    def transmission_flags(self, md: MappedDevice) -> int:
        flags = (FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM
                 | FLAG_SEND_WRITE_ZEROES | FLAG_CAN_MULTI_CONN)
        if self.structured:
            flags |= FLAG_SEND_DF
        if md.read_only:
            flags |= FLAG_READ_ONLY
        return flags

    def enter(self, md: MappedDevice) -> None:
        """Transmission on ``md``: open it (held until the connection ends)."""
        self.md = self.manager.open(md.name)
        self.size_bytes = to_bytes(md.size_sectors)
        self.min_block_bytes = max(md.logical_block_size, SECTOR_SIZE)

    async def export_name(self, data: bytes) -> None:
        """NBD_OPT_EXPORT_NAME: no error reply exists, so a refusal is a hang-up."""
        try:
            name = data.decode()
        except UnicodeDecodeError:
            raise _Hangup("export name is not UTF-8") from None
        md, why = self.server.lookup(name)
        if md is None or self.manager.closed:
            raise _Hangup(why or "shutting down")
        self.enter(md)
        reply = struct.pack(">QH", self.size_bytes, self.transmission_flags(md))
        await self.send(reply if self.no_zeroes else reply + bytes(124))

    async def info_go(self, opt: int, data: bytes) -> bool:
        if len(data) < 6:
            await self.opt_reply(opt, REP_ERR_INVALID, "option data too short")
            return False
        (name_len,) = struct.unpack_from(">I", data)
        if name_len > len(data) - 6:
            await self.opt_reply(opt, REP_ERR_INVALID, "name length beyond the option data")
            return False
        (count,) = struct.unpack_from(">H", data, 4 + name_len)
        if len(data) != 6 + name_len + 2 * count:
            await self.opt_reply(opt, REP_ERR_INVALID, "information request list does not match the length")
            return False
        wanted = struct.unpack_from(">%dH" % count, data, 6 + name_len)
        try:
            name = data[4:4 + name_len].decode()
        except UnicodeDecodeError:
            await self.opt_reply(opt, REP_ERR_INVALID, "export name is not UTF-8")
            return False
        if self.manager.closed:
            await self.opt_reply(opt, REP_ERR_SHUTDOWN, "the daemon is shutting down")
            return False
        md, why = self.server.lookup(name)
        if md is None:
            await self.opt_reply(opt, REP_ERR_UNKNOWN, why)
            return False
        if opt == OPT_GO:
            self.enter(md)   # opened before any reply goes out: md cannot go away meanwhile
        block = max(md.logical_block_size, SECTOR_SIZE)
        infos = [struct.pack(">HQH", INFO_EXPORT, to_bytes(md.size_sectors), self.transmission_flags(md)),
                 struct.pack(">HIII", INFO_BLOCK_SIZE, block, max(block, PAGE_SIZE), MAX_PAYLOAD_BYTES)]
        if INFO_NAME in wanted:
            infos.append(struct.pack(">H", INFO_NAME) + name.encode())
        if INFO_DESCRIPTION in wanted:
            infos.append(struct.pack(">H", INFO_DESCRIPTION) + describe(md).encode())
        for info in infos:
            await self.opt_reply(opt, REP_INFO, info)
        await self.opt_reply(opt, REP_ACK)
        return opt == OPT_GO

    async def list_exports(self, data: bytes) -> None:
        if data:
            await self.opt_reply(OPT_LIST, REP_ERR_INVALID, "LIST takes no data")
            return
        for md in self.server.exports():
            name = md.name.encode()
            await self.opt_reply(OPT_LIST, REP_SERVER, struct.pack(">I", len(name)) + name + describe(md).encode())
        await self.opt_reply(OPT_LIST, REP_ACK)

    # -- transmission ------------------------------------------------------------------------------
    async def transmission(self) -> None:
        """Read requests and start each as a task; at the end (DISC, hang-up or bad input)
        the requests under way finish before the connection closes."""
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    header = await self.recv_exact(_REQUEST.size)
                except _Hangup:
                    break
                magic, flags, cmd, cookie, offset_bytes, length_bytes = _REQUEST.unpack(header)
                if magic != REQUEST_MAGIC:
                    log.debug("NBD: bad request magic 0x%x; closing", magic)
                    break
                if cmd == CMD_DISC:
                    break
                # TRIM and WRITE_ZEROES count too: a target may zero through a buffer
                cost_bytes = min(length_bytes, MAX_PAYLOAD_BYTES) if cmd != CMD_FLUSH else 0
                data = None
                if cmd == CMD_WRITE:
                    if length_bytes > MAX_PAYLOAD_BYTES:
                        log.debug("NBD: write payload of %d bytes; closing", length_bytes)
                        break
                    await self.budget.acquire(cost_bytes)
                    try:
                        data = await self.recv_payload(length_bytes)
                    except _Hangup:
                        self.budget.release(cost_bytes)
                        break
                else:
                    await self.budget.acquire(cost_bytes)
                nursery.start_soon(self.request, cmd, flags, cookie, offset_bytes, length_bytes, data, cost_bytes)

    async def request(self, cmd: int, flags: int, cookie: int, offset_bytes: int, length_bytes: int,
                      data: bytearray | None, cost_bytes: int) -> None:
        try:
            try:
                result = await self.execute(cmd, flags, offset_bytes, length_bytes, data)
            except _RequestError as e:
                await self.reply_error(cmd, cookie, e.nbd_errno, e.message)
            except (DMError, OSError) as e:
                text = getattr(e, "message", "") or os.strerror(e.errno or errno.EIO)
                await self.reply_error(cmd, cookie, nbd_errno(e), text)
            except Exception as e:   # an engine bug fails this request, not the daemon
                log.exception("NBD request failed")
                await self.reply_error(cmd, cookie, NBD_EIO, "%s: %s" % (type(e).__name__, e))
            else:
                await self.reply(cmd, cookie, offset_bytes, result)
        finally:
            self.budget.release(cost_bytes)

    async def execute(self, cmd: int, flags: int, offset_bytes: int, length_bytes: int, data: bytearray | None):
        md = self.md
        assert md is not None
        known = CMD_FLAG_FUA
        if cmd == CMD_WRITE_ZEROES:
            known |= CMD_FLAG_NO_HOLE
        elif cmd == CMD_READ and self.structured:
            known |= CMD_FLAG_DF
        if flags & ~known:
            raise _RequestError(NBD_EINVAL, "command flags 0x%x not valid for command %d" % (flags & ~known, cmd))
        if cmd == CMD_FLUSH:
            if offset_bytes or length_bytes:
                raise _RequestError(NBD_EINVAL, "flush with an offset or length")
            await md.flush()
            return None
        if cmd not in (CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
            raise _RequestError(NBD_EINVAL, "unknown command %d" % cmd)
        if cmd == CMD_READ and length_bytes > MAX_PAYLOAD_BYTES:
            raise _RequestError(NBD_EINVAL, "read of %d bytes exceeds the maximum payload" % length_bytes)
        end_bytes = min(self.size_bytes, to_bytes(md.size_sectors))
        if offset_bytes + length_bytes > end_bytes:
            err = NBD_ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else NBD_EINVAL
            raise _RequestError(err, "%d bytes at %d: beyond the end of the export (%d bytes)"
                                % (length_bytes, offset_bytes, end_bytes))
        if offset_bytes % self.min_block_bytes or length_bytes % self.min_block_bytes:
            raise _RequestError(NBD_EINVAL, "%d bytes at %d: not aligned to the %d byte block"
                                % (length_bytes, offset_bytes, self.min_block_bytes))
        sector, sectors = to_sectors(offset_bytes), to_sectors(length_bytes)
        if cmd == CMD_READ:
            return await md.read(sector, sectors) if sectors else b""
        if not sectors:
            return None
        if cmd == CMD_WRITE:
            await md.write(sector, data, fua=bool(flags & CMD_FLAG_FUA))
            return None
        op = Op.DISCARD if cmd == CMD_TRIM else Op.WRITE_ZEROES
        step_sectors = to_sectors(MAX_PAYLOAD_BYTES)    # a 4 GiB zeroing need not be one 4 GiB buffer
        for first_sector in range(sector, sector + sectors, step_sectors):
            piece_sectors = min(step_sectors, sector + sectors - first_sector)
            if cmd == CMD_WRITE_ZEROES and flags & CMD_FLAG_NO_HOLE:   # allocated, not a punched hole
                await md.write(first_sector, bytes(to_bytes(piece_sectors)))
            else:
                await md.submit(Bio(op, first_sector, piece_sectors))
        if flags & CMD_FLAG_FUA:
            await md.flush()
        return None

    async def reply(self, cmd: int, cookie: int, offset_bytes: int, result) -> None:
        if cmd != CMD_READ:
            await self.send(_SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cookie))
            return
        if self.structured:
            if not len(result):
                await self.send(_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0))
                return
            header = _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie,
                                 8 + len(result)) + struct.pack(">Q", offset_bytes)
        else:
            header = _SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cookie)
        await self.send(header, result)

    async def reply_error(self, cmd: int, cookie: int, err: int, message: str) -> None:
        if self.structured:
            text = message.encode()[:4096]
            await self.send(_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie,
                                        6 + len(text)) + struct.pack(">IH", err, len(text)) + text)
        else:
            await self.send(_SIMPLE.pack(SIMPLE_REPLY_MAGIC, err, cookie))


async def serve_nbd(manager: Manager, address: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Export every device of ``manager`` at ``address`` (``unix:PATH``, the socket mode
    0600 like the control socket; or ``tcp:HOST:PORT``) until cancelled.  ``started``
    gets the bound address (a TCP port 0 replaced by the port bound)."""
    kind, where, port = parse_address(address)
    server = NBDServer(manager)
    st = None
    if kind == "unix":
        try:
            sock = await bind_socket(where)
        except OSError as e:
            raise DMError(e.errno or errno.EINVAL, "cannot listen on %s: %s" % (address, e.strerror)) from None
        sock.listen(LISTEN_BACKLOG)
        st = os.stat(where)
        LISTENING_SOCKETS[(st.st_dev, st.st_ino)] = manager
        listeners: list = [trio.SocketListener(sock)]
        bound = "unix:" + where
    else:
        try:
            listeners = list(await trio.open_tcp_listeners(port, host=where, backlog=LISTEN_BACKLOG))
        except OSError as e:
            raise DMError(e.errno or errno.EADDRNOTAVAIL,
                          "cannot listen on %s: %s" % (address, e.strerror or e)) from None
        name = listeners[0].socket.getsockname()
        host = name[0]
        bound = "tcp:%s:%d" % ("[%s]" % host if listeners[0].socket.family == _stdsocket.AF_INET6 else host,
                               name[1])
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, server.handle, listeners)
            log.info("NBD: serving on %s", bound)
            task_status.started(bound)
    finally:
        if st is not None:
            LISTENING_SOCKETS.pop((st.st_dev, st.st_ino), None)
            try:   # remove only our own socket file, not one a successor bound meanwhile
                cur = os.stat(where)
                if (cur.st_ino, cur.st_dev) == (st.st_ino, st.st_dev):
                    os.unlink(where)
            except OSError:
                pass
