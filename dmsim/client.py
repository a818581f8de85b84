"""The daemon's socket client: :class:`RemoteControl` has LocalControl's async methods.

Finding the socket: ``--socket`` (the ``path`` argument), else ``$DMSIM_SOCKET``, else
``$XDG_RUNTIME_DIR/dmsim/control``, else ``/run/dmsim/control`` (root) or
``/tmp/dmsim-<uid>/control`` (others).  The daemon's other files (pid, klog, log) live
next to the socket, in its state directory.

Before it connects, the client checks that the socket belongs to the caller or to root:
another user could have made ``/tmp/dmsim-<uid>/control`` first, and would then see
(and answer) every request.
"""
from __future__ import annotations

import errno
import inspect
import json
import os
import stat
from typing import Any

import trio

from .control import METHODS, LocalControl, from_wire, to_wire
from .errors import DMError
from .server import _HEADER, MAX_FRAME_BYTES, PROTOCOL_VERSION, encode_frame


def default_socket_path() -> str:
    env = os.environ.get("DMSIM_SOCKET")
    if env:
        return env
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "dmsim", "control")
    if os.geteuid() == 0:
        return "/run/dmsim/control"
    return "/tmp/dmsim-%d/control" % os.geteuid()


class RemoteControl:
    """A control whose manager lives in a daemon.  ``async with RemoteControl(path) as c:``.

    Calls on one RemoteControl are serialized on one connection; a blocking ``wait``
    wants its own RemoteControl if other calls must go on meanwhile.
    """

    def __init__(self, path: str | None = None):
        self.path = path or default_socket_path()
        self._stream: trio.SocketStream | None = None
        self._lock = trio.Lock()
        self._buf = bytearray()

    async def connect(self) -> trio.SocketStream:
        if self._stream is None:
            check_socket_owner(self.path)
            try:
                self._stream = await trio.open_unix_socket(self.path)
            except OSError as e:
                err = e.errno or errno.ECONNREFUSED
                raise DMError(err, "cannot connect to the dmsim daemon at %s: %s"
                              % (self.path, os.strerror(err))) from None
        return self._stream

    async def aclose(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            self._buf.clear()
            await stream.aclose()

    async def __aenter__(self):
        await self.connect()
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    async def _recv_exactly(self, stream: trio.SocketStream, n: int) -> bytes:
        while len(self._buf) < n:
            data = await stream.receive_some(1 << 16)
            if not data:
                raise DMError(errno.ECONNRESET, "the dmsim daemon closed the connection")
            self._buf += data
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def call(self, method: str, **kwargs):
        """One request; returns the result or raises the daemon's DMError."""
        async with self._lock:
            stream = await self.connect()
            try:
                await stream.send_all(encode_frame(
                    {"v": PROTOCOL_VERSION, "method": method, "args": {k: to_wire(v) for k, v in kwargs.items()}}))
                (n,) = _HEADER.unpack(await self._recv_exactly(stream, _HEADER.size))
                if n > MAX_FRAME_BYTES:
                    raise DMError(errno.EMSGSIZE, "oversized reply from the daemon")
                reply = json.loads(await self._recv_exactly(stream, n))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                await self.aclose()
                raise DMError(getattr(e, "errno", None) or errno.ECONNRESET,
                              "lost the connection to the dmsim daemon") from None
            except BaseException:
                # a cancelled or failed exchange leaves the stream mid-frame
                with trio.CancelScope(shield=True):
                    await self.aclose()
                raise
        if "error" in reply:
            err = reply["error"]
            raise DMError(int(err.get("errno", errno.EIO)), err.get("message", ""))
        return from_wire(reply.get("ok"))


def check_socket_owner(path: str) -> None:
    """Refuse a socket that is not the caller's or root's (or not a socket)."""
    try:
        st = os.stat(path)
    except OSError:
        return  # connecting reports it
    uid = os.geteuid()
    if st.st_uid not in (uid, 0):
        raise DMError(errno.EPERM, "refusing the dmsim socket %s: it belongs to uid %d, not to you (uid %d) or root"
                      % (path, st.st_uid, uid))
    if not stat.S_ISSOCK(st.st_mode):
        raise DMError(errno.ENOTSOCK, "%s is not a socket" % path)


def _make_method(name: str):
    sig = inspect.signature(getattr(LocalControl, name))

    async def method(self, *args, **kwargs):
        bound = sig.bind(None, *args, **kwargs)
        params = dict(bound.arguments)
        params.pop("self", None)
        return await self.call(name, **params)

    method.__name__ = name
    method.__doc__ = getattr(LocalControl, name).__doc__
    fn: Any = method
    fn.__signature__ = sig
    return method


for _name in METHODS:
    setattr(RemoteControl, _name, _make_method(_name))
del _name
