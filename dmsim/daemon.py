"""``dmsim daemon``: one process owning the devices, their FUSE files and the socket.

One Trio root nursery holds the FUSE session, the control socket server, the
:class:`~dmsim.manager.Manager` and the signal watcher.  Files in the state directory
(default: the socket's directory): ``pid``, ``lock`` (flock'd while the daemon runs, so a
second daemon on the same state directory is refused), ``klog`` (every kernel-log line,
appended), ``daemon.log`` (stderr of a ``--background`` daemon).

Shutdown (SIGTERM, SIGINT, or the mount going away): stop taking control requests,
flush every active device, fail held I/O and destroy the tables (``Manager.shutdown``),
unmount, remove the socket and the pid file.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import sys
from dataclasses import dataclass

import trio

from .client import default_socket_path
from .errors import DMError, collapse_groups

log = logging.getLogger("dmsim.daemon")

FLUSH_TIMEOUT_SECONDS = 10


class DaemonError(Exception):
    """Refusal to start, with a message for the user."""


@dataclass
class DaemonOptions:
    mount: str
    socket: str | None = None
    state_dir: str | None = None
    background: bool = False
    direct_io: bool | None = None     # None: per open, like a block device (see dmsim.fuse)
    io_mode: str = "inline"
    durability: str = "fsync"
    resync_throttle: int = 100
    debug: bool = False
    nbd: tuple[str, ...] = ()         # NBD export addresses (dmsim.nbd.serve_nbd), none by default

    def resolve(self) -> "DaemonOptions":
        self.mount = os.path.abspath(self.mount)
        self.socket = os.path.abspath(self.socket or default_socket_path())
        self.state_dir = os.path.abspath(self.state_dir or os.path.dirname(self.socket))
        return self


def _mounted_at(path: str) -> str | None:
    """The fs type mounted exactly at ``path``, if any."""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[1].encode().decode("unicode_escape") == path:
                    return parts[2]
    except OSError:
        pass
    return None


def check_mount_dir(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise DaemonError("%s: a dead FUSE mount is still there; run: fusermount3 -u %s" % (path, path)) from None
        raise DaemonError("%s: %s" % (path, e.strerror)) from None
    if not os.path.isdir(path):
        raise DaemonError("%s: not a directory" % path)
    fstype = _mounted_at(path)
    if fstype is not None:
        raise DaemonError("%s is already a mount point (%s); another dmsim daemon?" % (path, fstype))
    del st


class StateDir:
    """The daemon's files; holding the lock means owning the directory."""

    def __init__(self, path: str):
        self.path = path
        self.lock_fd: int | None = None
        self.klog = None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def acquire(self) -> None:
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        fd = os.open(self.file("lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            try:
                with open(self.file("pid")) as f:
                    pid = f.read().strip()
            except OSError:
                pid = "?"
            raise DaemonError("another dmsim daemon (pid %s) is running with state directory %s"
                              % (pid, self.path)) from None
        self.lock_fd = fd
        with open(self.file("pid"), "w") as f:
            f.write("%d\n" % os.getpid())
        self.klog = open(self.file("klog"), "a", buffering=1)

    def write_klog(self, line: str) -> None:
        try:
            self.klog.write(line + "\n")
        except (OSError, ValueError):
            pass

    def release(self) -> None:
        if self.klog is not None:
            self.klog.close()
            self.klog = None
        for name in ("pid",):
            try:
                os.unlink(self.file(name))
            except OSError:
                pass
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


async def serve_daemon(opts: DaemonOptions, state: StateDir, ready) -> None:
    """Run until a signal or an external unmount; ``ready()`` once mount and socket are up."""
    from . import open_manager
    from .control import LocalControl
    from .fuse import Mount
    from .nbd import serve_nbd
    from .server import serve

    from .targets import mirror

    # raid1_resync_throttle: the share of time mirror resync I/O may be in flight
    mirror.resync_throttle.percent = opts.resync_throttle
    if opts.resync_throttle < 100:
        log.info("mirror resync limited to %d%% of the time (raid1_resync_throttle)", opts.resync_throttle)
    async with open_manager(mount_dir=opts.mount, io_mode=opts.io_mode, durability=opts.durability) as m:
        m.log_listeners.append(state.write_klog)
        fs = Mount(m, opts.mount, direct_io=opts.direct_io, debug=opts.debug)
        try:
            fs.mount()
        except Exception as e:
            raise DaemonError("cannot mount %s: %s" % (opts.mount, e)) from None
        try:
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                server_scope = trio.CancelScope()

                async def run_server(task_status=trio.TASK_STATUS_IGNORED):
                    with server_scope:
                        async with trio.open_nursery() as exports:   # NBD exports stop with the socket
                            for address in opts.nbd:
                                await exports.start(serve_nbd, m, address)
                            await serve(LocalControl(m), opts.socket, task_status=task_status)

                async def run_fuse():
                    await fs.run()
                    log.warning("the mount %s went away; shutting down", opts.mount)
                    fs.mounted = False
                    stop.set()

                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    try:
                        await nursery.start(run_server)
                    except DMError as e:
                        raise DaemonError(e.message or e.strerror) from None
                    nursery.start_soon(run_fuse)
                    ready()

                    async def watch_signals():
                        async for signum in signals:
                            log.info("signal %d: shutting down", signum)
                            stop.set()
                            return

                    nursery.start_soon(watch_signals)
                    await stop.wait()
                server_scope.cancel()
                await _release_all(m)
                await _flush_files(m)
                with trio.CancelScope(shield=True):
                    await m.shutdown()
                    await fs.ops.quiesce()
                nursery.cancel_scope.cancel()
        finally:
            fs.unmount()


async def _release_all(m) -> None:
    """Suspend every running device, as dm's remove does (``__dm_destroy``), top of a stack
    first: presuspend releases what targets hold (delay's queued bios), lock_fs writes the
    FUSE buffer cache back and in-flight I/O drains, so no FUSE request is left waiting;
    requests held by the suspension fail at the removal."""
    with trio.move_on_after(FLUSH_TIMEOUT_SECONDS):
        for md in sorted(m.devices.values(), key=lambda md: md.open_count):
            if md.live is not None and not md.suspended and not md.removed:
                try:
                    await m.suspend(md.name)
                except Exception as e:  # a failing device must not stop the shutdown
                    log.warning("suspend of %s failed: %s", md.name, e)


async def _flush_files(m) -> None:
    """Flush the image files under the devices (the devices are suspended now)."""
    with trio.move_on_after(FLUSH_TIMEOUT_SECONDS):
        for dev, _refs in list(getattr(m, "_files", {}).values()):
            if not getattr(dev, "read_only", False) and not getattr(dev, "closed", False):
                try:
                    await dev.flush()
                except Exception as e:
                    log.warning("flush of %s failed: %s", getattr(dev, "path", dev), e)


def run_daemon(opts: DaemonOptions) -> int:
    """``dmsim daemon``; returns the exit status."""
    opts.resolve()
    try:
        check_mount_dir(opts.mount)
    except DaemonError as e:
        print("dmsim daemon: %s" % e, file=sys.stderr)
        return 1
    if opts.background:
        return _background(opts)
    logging.basicConfig(level=logging.DEBUG if opts.debug else logging.INFO,
                        format="dmsim daemon: %(levelname)s %(name)s: %(message)s")

    def ready():
        print("ready pid=%d mount=%s socket=%s" % (os.getpid(), opts.mount, opts.socket), flush=True)

    return _run(opts, ready)


def _serve(opts: DaemonOptions, state, ready) -> None:
    """Run the daemon; a lone error leaves as itself, not inside an ExceptionGroup."""
    with collapse_groups():
        trio.run(serve_daemon, opts, state, ready)


def _run(opts: DaemonOptions, ready) -> int:
    state = StateDir(opts.state_dir)
    try:
        state.acquire()
        _serve(opts, state, ready)
    except (DaemonError, DMError) as e:
        print("dmsim daemon: %s" % e, file=sys.stderr, flush=True)
        return 1
    finally:
        state.release()
    return 0


def _background(opts: DaemonOptions) -> int:
    """Fork; the parent returns once the child reports ready (or its error)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(rfd)
        try:
            os.setsid()
            os.makedirs(opts.state_dir, mode=0o700, exist_ok=True)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            logfd = os.open(os.path.join(opts.state_dir, "daemon.log"),
                            os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(logfd, 1)
            os.dup2(logfd, 2)
            os.close(null)
            os.close(logfd)
            logging.basicConfig(level=logging.DEBUG if opts.debug else logging.INFO,
                                format="%(asctime)s dmsim daemon: %(levelname)s %(name)s: %(message)s")
            reported = False

            def ready():
                nonlocal reported
                os.write(wfd, ("ready pid=%d mount=%s socket=%s\n"
                               % (os.getpid(), opts.mount, opts.socket)).encode())
                os.close(wfd)
                reported = True

            state = StateDir(opts.state_dir)
            rc = 1
            try:
                state.acquire()
                _serve(opts, state, ready)
                rc = 0
            except DaemonError as e:
                print("dmsim daemon: %s" % e, file=sys.stderr, flush=True)
                if not reported:
                    os.write(wfd, ("error %s\n" % e).encode())
            except BaseException as e:
                logging.exception("daemon failed")
                if not reported:
                    os.write(wfd, ("error %s: %s\n" % (type(e).__name__, e)).encode())
            finally:
                state.release()
        finally:
            os._exit(locals().get("rc", 1))
    os.close(wfd)
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(rfd, 4096)
        if not chunk:
            break
        data += chunk
    os.close(rfd)
    line = data.decode(errors="replace").strip()
    if line.startswith("ready"):
        print(line, flush=True)
        return 0
    if line.startswith("error "):
        print("dmsim daemon: %s" % line[6:], file=sys.stderr)
    else:
        print("dmsim daemon: the daemon exited before it was ready; see %s"
              % os.path.join(opts.state_dir, "daemon.log"), file=sys.stderr)
    os.waitpid(pid, 0)
    return 1
