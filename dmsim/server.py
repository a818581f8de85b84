"""The daemon's control socket: dm's ioctls over a Unix socket.

Wire format (protocol version 1), both directions: a frame is a 4-byte big-endian
length followed by that many bytes of UTF-8 JSON.  A request is
``{"v": 1, "method": M, "args": {...}}`` where ``M`` is one of
:data:`dmsim.control.METHODS` and ``args`` are its keyword arguments in wire form
(:func:`dmsim.control.to_wire`); the reply is ``{"v": 1, "ok": RESULT}`` or
``{"v": 1, "error": {"errno": N, "message": TEXT}}``.  Frames over
:data:`MAX_FRAME_BYTES` close the connection after an error reply; any other bad input
gets an error reply and the connection stays usable.  Each connection is served by its
own task, so a blocking ``wait`` holds up only its own client; a client that hangs up
cancels its pending call.

Device names are checked here, before any method runs: no NUL, no lone surrogate (JSON
carries them, no file name can), at most ``DM_NAME_LEN - 1`` bytes (uuids
``DM_UUID_LEN - 1``), and no ``/`` in a name being made (create, rename's new name).
:func:`dispatch` is the one last-resort handler of a request: a bug in a method becomes
that request's EIO reply, its traceback goes to the log, and the daemon keeps serving.
"""
from __future__ import annotations

import contextlib
import errno
import inspect
import json
import logging
import os
import socket as _stdsocket
import struct
import typing

import trio

from .control import METHODS, LocalControl, from_wire, to_wire
from .errors import DMError
from .table import TableLine

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 16 << 20
_HEADER = struct.Struct(">I")
DM_NAME_LEN = 128      # with the terminating NUL, as in <linux/dm-ioctl.h>
DM_UUID_LEN = 129
_NAME_ARGS = ("name", "new_name")
_UUID_ARGS = ("uuid", "new_uuid")
_MADE_NAMES = {("create", "name"), ("rename", "new_name")}

log = logging.getLogger("dmsim.server")


class ProtocolError(Exception):
    """The peer broke framing; the connection cannot continue."""


def encode_frame(obj) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _HEADER.pack(len(body)) + body


class FrameReader:
    """Splits a byte stream into frames; keeps bytes that arrive early."""

    def __init__(self, stream: trio.abc.ReceiveStream):
        self.stream = stream
        self.buf = bytearray()
        self.eof = False

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(1 << 16)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def next_frame(self) -> bytes | None:
        """The next frame's body, or None at a clean end of stream."""
        while len(self.buf) < _HEADER.size:
            if not await self._fill():
                if self.buf:
                    raise ProtocolError("truncated frame header")
                return None
        (n,) = _HEADER.unpack_from(self.buf)
        if n > MAX_FRAME_BYTES:
            raise ProtocolError("frame of %d bytes exceeds the %d byte limit" % (n, MAX_FRAME_BYTES))
        while len(self.buf) < _HEADER.size + n:
            if not await self._fill():
                raise ProtocolError("truncated frame")
        body = bytes(self.buf[_HEADER.size:_HEADER.size + n])
        del self.buf[:_HEADER.size + n]
        return body

    async def wait_hangup(self) -> None:
        """Return when the peer closes its end (bytes that come meanwhile are kept)."""
        while not self.eof:
            if len(self.buf) > MAX_FRAME_BYTES + _HEADER.size:
                return  # a flood while a call is pending: treat as a hang-up
            try:
                if not await self._fill():
                    return
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return


# -- argument checking ----------------------------------------------------------------------
_HINTS = {m: typing.get_type_hints(getattr(LocalControl, m)) for m in METHODS}
_SIGS = {m: inspect.signature(getattr(LocalControl, m)) for m in METHODS}


def _fits(value, hint) -> bool:
    if hint is typing.Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(hint) or (typing.Any,)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if hint is TableLine:
        return (isinstance(value, TableLine) and _fits(value.start, int) and _fits(value.length, int)
                and _fits(value.type, str) and _fits(value.params, str))
    return False


def printable(text: str) -> str:
    """``text`` safe to print and encode (lone surrogates as backslash escapes)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_name(method: str, key: str, value: str) -> None:
    """Refuse a device name or uuid no kernel device can have (dmsetup's wording)."""
    what = "Name" if key in _NAME_ARGS else "UUID"
    shown = printable(value)
    try:
        size_bytes = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise DMError(errno.EINVAL, '%s "%s" invalid. It is not valid UTF-8.' % (what, shown)) from None
    if "\0" in value:
        raise DMError(errno.EINVAL, '%s "%s" invalid. It contains NUL.' % (what, shown.replace("\0", "\\0")))
    if size_bytes >= (DM_NAME_LEN if key in _NAME_ARGS else DM_UUID_LEN):
        raise DMError(errno.EINVAL, '%s "%s" too long.' % (what, shown))
    if (method, key) in _MADE_NAMES and "/" in value:
        raise DMError(errno.EINVAL, '%s "%s" invalid. It contains "/".' % (what, shown))


def check_request(obj) -> tuple[str, dict]:
    """Validate a decoded request; return (method, keyword arguments) or raise DMError."""
    if not isinstance(obj, dict):
        raise DMError(errno.EINVAL, "request must be a JSON object")
    if obj.get("v") != PROTOCOL_VERSION:
        raise DMError(errno.EPROTONOSUPPORT, "unsupported protocol version %r (want %d)"
                      % (obj.get("v"), PROTOCOL_VERSION))
    method = obj.get("method")
    if not isinstance(method, str) or method not in METHODS:
        raise DMError(errno.EINVAL, "unknown method %r" % (method,))
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise DMError(errno.EINVAL, "args must be a JSON object")
    try:
        kwargs = from_wire(args)
    except Exception:
        raise DMError(errno.EINVAL, "malformed arguments") from None
    if not isinstance(kwargs, dict) or "self" in kwargs:
        raise DMError(errno.EINVAL, "malformed arguments")
    try:
        _SIGS[method].bind(None, **kwargs)
    except TypeError as e:
        raise DMError(errno.EINVAL, "bad arguments for %s: %s" % (method, e)) from None
    hints = _HINTS[method]
    for key, value in kwargs.items():
        if key in hints and not _fits(value, hints[key]):
            raise DMError(errno.EINVAL, "bad type for %s argument %r" % (method, key))
        if key in _NAME_ARGS + _UUID_ARGS and isinstance(value, str):
            check_name(method, key, value)
    return method, kwargs


def _error_reply(err: int, message: str) -> dict:
    return {"v": PROTOCOL_VERSION, "error": {"errno": err, "message": printable(message)}}


async def dispatch(control, body: bytes) -> bytes:
    """One request frame in, one reply frame out; never raises for bad input or a bug in a
    method (the last-resort handler: EIO reply, traceback in the log)."""
    try:
        try:
            obj = json.loads(body.decode("utf-8"))
        except Exception:
            raise DMError(errno.EINVAL, "request is not valid UTF-8 JSON") from None
        method, kwargs = check_request(obj)
        result = await getattr(control, method)(**kwargs)
        return encode_frame({"v": PROTOCOL_VERSION, "ok": to_wire(result)})
    except DMError as e:
        return encode_frame(_error_reply(e.errno, e.message or e.strerror or os.strerror(e.errno)))
    except Exception as e:  # an engine bug must not take the daemon down
        log.exception("control request failed")
        return encode_frame(_error_reply(errno.EIO, "%s: %s" % (type(e).__name__, e)))


async def _call_unless_hangup(control, reader: FrameReader, body: bytes) -> bytes | None:
    """The request's reply, or None if the client went away (its call is cancelled)."""
    reply = None
    async with trio.open_nursery() as nursery:
        async def call():
            nonlocal reply
            reply = await dispatch(control, body)
            nursery.cancel_scope.cancel()

        async def watch():
            await reader.wait_hangup()
            if reader.eof or len(reader.buf) > MAX_FRAME_BYTES:
                nursery.cancel_scope.cancel()

        nursery.start_soon(call)
        nursery.start_soon(watch)
    return reply


async def handle_connection(control, stream: trio.SocketStream) -> None:
    """Serve one client until it hangs up; anything unexpected ends only this connection."""
    reader = FrameReader(stream)
    try:
        while True:
            try:
                body = await reader.next_frame()
            except ProtocolError as e:
                code = errno.EMSGSIZE if "limit" in str(e) else errno.EPROTO
                await stream.send_all(encode_frame(_error_reply(code, str(e))))
                return
            if body is None:
                return
            reply = await _call_unless_hangup(control, reader, body)
            if reply is None:  # the client went away mid-call
                return
            await stream.send_all(reply)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    except Exception:
        log.exception("control connection failed")
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def bind_socket(path: str) -> trio.socket.SocketType:
    """A listening Unix socket at ``path``, mode 0600 from the start.

    Refuses (EADDRINUSE) if a live daemon answers there; a stale socket file is replaced
    (one that goes meanwhile, removed by a daemon exiting or a second starter, is no error).
    """
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, mode=0o700, exist_ok=True)
    probe = _stdsocket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM)
    try:
        probe.connect(path)
    except FileNotFoundError:
        pass                 # nothing there
    except OSError:
        with contextlib.suppress(FileNotFoundError):   # removed meanwhile: as good
            os.unlink(path)  # stale: nobody listens
    else:
        raise DMError(errno.EADDRINUSE, "a dmsim daemon is already listening on %s" % path)
    finally:
        probe.close()
    sock = trio.socket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            await sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(control, path: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``control`` on a Unix socket at ``path`` until cancelled; removes the socket."""
    sock = await bind_socket(path)
    st = os.stat(path)
    try:
        listener = trio.SocketListener(sock)
        async with trio.open_nursery() as nursery:
            async def handler(stream):
                await handle_connection(control, stream)

            await nursery.start(trio.serve_listeners, handler, [listener])
            task_status.started(path)
    finally:
        try:
            # remove only our own socket file (not one a successor bound meanwhile)
            cur = os.stat(path)
            if (cur.st_ino, cur.st_dev) == (st.st_ino, st.st_dev):
                os.unlink(path)
        except OSError:
            pass
