"""``dmsim daemon``: one process owning the devices, their FUSE files and the socket.

One Trio root nursery holds the FUSE session, the control socket server and the
:class:`~dmsim.manager.Manager`; SIGTERM and SIGINT are taken by a thread of their own
(:class:`SignalThread`).  Files in the state directory
(default: the socket's directory): ``pid``, ``lock`` (flock'd while the daemon runs, so a
second daemon on the same state directory is refused), ``klog`` (every kernel-log line,
appended), ``daemon.log`` (stderr of a ``--background`` daemon).  The state directory and
the socket's directory must belong to the daemon's user and be writable by no one else,
and lie outside the mount; the files in them are opened without following symlinks.

The mount directory is made if it is missing (``--mount /dev/mapper`` on a machine without
device-mapper) and removed again at exit.

Shutdown (SIGTERM, SIGINT, ``dmsim daemon stop``, or the mount going away): stop taking
control requests, suspend and flush every active device, fail held I/O and destroy the
tables (``Manager.shutdown``), unmount, remove the socket and the pid file.  The sequence
has :data:`SHUTDOWN_SECONDS` in all; a :class:`Watchdog` ends the process (after a lazy
unmount) if it is still there :data:`WATCHDOG_GRACE_SECONDS` later, or at a second signal.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import logging
import os
import pwd
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

import trio

from .client import default_socket_path
from .errors import DMError, collapse_groups

log = logging.getLogger("dmsim.daemon")

SHUTDOWN_SECONDS = 15           # suspend, flush, fail held I/O, destroy: all of it
WATCHDOG_GRACE_SECONDS = 5      # then the process ends whatever it waits on
STOP_TIMEOUT_SECONDS = SHUTDOWN_SECONDS + WATCHDOG_GRACE_SECONDS + 10
_OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW


class DaemonError(Exception):
    """Refusal to start, with a message for the user."""


@dataclass
class DaemonOptions:
    mount: str
    socket: str = ""
    state_dir: str = ""
    background: bool = False
    direct_io: bool | None = None     # None: per open, like a block device (see dmsim.fuse)
    io_mode: str = "inline"
    durability: str = "fsync"
    resync_throttle: int = 100
    debug: bool = False
    nbd: tuple[str, ...] = ()         # NBD export addresses (dmsim.nbd.serve_nbd), none by default
    owner: str | None = None          # device files' owner (name or uid); None: the daemon's user
    group: str | None = None          # ... group (name or gid); None: ``disk`` for root
    mode: str | None = None           # ... permission bits in octal; None: 0660
    uid: int | None = None            # resolved from the three above
    gid: int | None = None
    file_mode: int = 0o660
    image_numbers: bool | None = None  # image files as 240:N (None: DMSIM_IMAGE_NUMBERS, default on)

    def resolve(self) -> "DaemonOptions":
        """Absolute paths, and the device files' owner, group and mode (DaemonError if bad)."""
        self.mount = os.path.abspath(self.mount)
        self.socket = os.path.abspath(self.socket or default_socket_path())
        self.state_dir = os.path.abspath(self.state_dir or os.path.dirname(self.socket))
        if self.owner is not None:
            self.uid = _lookup_id(self.owner, pwd.getpwnam, "user")
        if self.group is not None:
            self.gid = _lookup_id(self.group, grp.getgrnam, "group")
        if self.mode is not None:
            try:
                self.file_mode = int(self.mode, 8)
            except ValueError:
                raise DaemonError("--mode %s: not an octal number" % self.mode) from None
            if not 0 <= self.file_mode <= 0o777:
                raise DaemonError("--mode %s: permission bits are 0 to 0777" % self.mode)
        return self


def _lookup_id(text: str, getter: Callable, what: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        entry = getter(text)
    except KeyError:
        raise DaemonError("no such %s: %s" % (what, text)) from None
    return entry.pw_uid if what == "user" else entry.gr_gid


def _inside(path: str, directory: str) -> bool:
    """Whether ``path`` is ``directory`` or below it (lexically, and after resolving
    symlinks: before the mount exists this touches no FUSE file)."""
    for p, d in ((os.path.abspath(path), os.path.abspath(directory)),
                 (os.path.realpath(path), os.path.realpath(directory))):
        if p == d or p.startswith(d.rstrip("/") + "/"):
            return True
    return False


def check_private_dir(path: str, what: str) -> None:
    """``path`` must be a directory of ours that no one else can write (so no one can
    plant a symlink or a socket of their own there)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DaemonError("%s %s: %s" % (what, path, e.strerror)) from None
    if not os.path.isdir(path):
        raise DaemonError("%s %s: not a directory" % (what, path))
    uid = os.geteuid()
    if st.st_uid != uid:
        raise DaemonError("%s %s belongs to uid %d, not to the daemon's user (uid %d); refusing it"
                          % (what, path, st.st_uid, uid))
    if st.st_mode & 0o022:
        raise DaemonError("%s %s is writable by %s (mode %04o); refusing it (use a directory "
                          "only the daemon's user can write)"
                          % (what, path, "others" if st.st_mode & 0o002 else "its group",
                             st.st_mode & 0o7777))


def check_daemon_paths(opts: DaemonOptions) -> None:
    """Socket and state directory: outside the mount, private; made if missing."""
    for what, path in (("the control socket", opts.socket), ("the state directory", opts.state_dir)):
        if _inside(path, opts.mount):
            raise DaemonError("%s %s is inside the mount %s (the daemon would wait on itself); "
                              "put it elsewhere" % (what, path, opts.mount))
    for what, path in (("the socket's directory", os.path.dirname(opts.socket)),
                       ("the state directory", opts.state_dir)):
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as e:
            raise DaemonError("%s %s: %s" % (what, path, e.strerror)) from None
        check_private_dir(path, what)


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


def check_mount_dir(path: str) -> bool:
    """Refuse a mount point in use; make a missing one (True: made, remove it at exit)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise DaemonError("%s: no such directory, nor its parent %s" % (path, parent)) from None
        try:
            os.mkdir(path, 0o755)
        except OSError as e:
            raise DaemonError("%s: cannot make the mount directory: %s" % (path, e.strerror)) from None
        return True
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise DaemonError("%s: a dead FUSE mount is still there; run: fusermount3 -u %s" % (path, path)) from None
        raise DaemonError("%s: %s" % (path, e.strerror)) from None
    if not os.path.isdir(path):
        raise DaemonError("%s: not a directory" % path)
    fstype = _mounted_at(path)
    if fstype is not None:
        raise DaemonError("%s is already a mount point (%s); another dmsim daemon?" % (path, fstype))
    return False


def _remove_made_dir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError as e:
        log.warning("cannot remove the mount directory %s made at start: %s", path, e.strerror)


def _read_pid(path: str) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    except OSError:
        return None
    try:
        text = os.read(fd, 64).decode(errors="replace").strip()
    finally:
        os.close(fd)
    return int(text) if text.isdigit() else None


class StateDir:
    """The daemon's files; holding the lock means owning the directory."""

    def __init__(self, path: str):
        self.path = path
        self.lock_fd: int | None = None
        self.klog: IO[str] | None = None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def open(self, name: str, flags: int) -> int:
        """A file of the state directory, never through a symlink."""
        try:
            return os.open(self.file(name), flags | _OPEN_FLAGS, 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise DaemonError("%s is a symlink; refusing it" % self.file(name)) from None
            raise DaemonError("%s: %s" % (self.file(name), e.strerror)) from None

    def running_pid(self) -> int | None:
        """The pid of the daemon holding the lock, None if none does (-1: pid unknown)."""
        try:
            fd = os.open(self.file("lock"), os.O_RDWR | _OPEN_FLAGS)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = _read_pid(self.file("pid"))
            return -1 if pid is None else pid
        finally:
            os.close(fd)
        return None

    def acquire(self) -> None:
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        fd = self.open("lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            pid = _read_pid(self.file("pid"))
            raise DaemonError("another dmsim daemon (pid %s) is running with state directory %s"
                              % ("?" if pid is None else pid, self.path)) from None
        self.lock_fd = fd
        pid_fd = self.open("pid", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            os.write(pid_fd, b"%d\n" % os.getpid())
        finally:
            os.close(pid_fd)
        self.klog = os.fdopen(self.open("klog", os.O_WRONLY | os.O_CREAT | os.O_APPEND), "a", buffering=1)

    def write_klog(self, line: str) -> None:
        if self.klog is not None:
            with contextlib.suppress(OSError, ValueError):
                self.klog.write(line + "\n")

    def release(self) -> None:
        if self.klog is not None:
            self.klog.close()
            self.klog = None
        if self.lock_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.file("pid"))
            os.close(self.lock_fd)
            self.lock_fd = None


class Watchdog:
    """Ends the process if shutdown takes too long: a lazy unmount (so no dead mount is
    left behind), the socket and pid file removed, then ``_exit``.  A thread, because
    what it guards against is the Trio loop waiting on something that never returns."""

    def __init__(self, opts: DaemonOptions, exit: Callable[[int], object] = os._exit):
        self.opts = opts
        self.exit = exit
        self.timer: threading.Timer | None = None
        self.fired = threading.Event()

    def arm(self, seconds: float) -> None:
        if self.timer is None:
            self.timer = threading.Timer(seconds, self.fire, args=("shutdown took over %g s" % seconds,))
            self.timer.daemon = True
            self.timer.start()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def fire(self, why: str) -> None:
        if self.fired.is_set():
            return
        self.fired.set()
        log.error("%s: ending the daemon now (a lazy unmount of %s)", why, self.opts.mount)
        for cmd in (["fusermount3", "-u", "-z", self.opts.mount], ["umount", "-l", self.opts.mount]):
            try:
                if subprocess.run(cmd, capture_output=True, timeout=5).returncode == 0:
                    break
            except (OSError, subprocess.TimeoutExpired):
                continue
        for path in (self.opts.socket, os.path.join(self.opts.state_dir, "pid")):
            with contextlib.suppress(OSError):
                os.unlink(path)
        sys.stderr.flush()
        self.exit(1)


class SignalThread:
    """SIGTERM and SIGINT, taken by a thread of their own (``sigwait``; the signals are
    blocked everywhere else), so that a stop is heard even while the Trio thread is stuck
    in a system call: the first arms the watchdog and asks the loop to stop, a second one
    ends the process at once."""

    SIGNALS = frozenset((signal.SIGTERM, signal.SIGINT))

    def __init__(self, watchdog: Watchdog):
        self.watchdog = watchdog
        self.lock = threading.Lock()
        self.token: trio.lowlevel.TrioToken | None = None
        self.stop: Callable[[], object] | None = None
        self.received = 0

    def start(self) -> None:
        """Block the signals (threads started later inherit that) and start the thread."""
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        threading.Thread(target=self._run, name="dmsim-signals", daemon=True).start()

    def attach(self, token: trio.lowlevel.TrioToken, stop: Callable[[], object]) -> None:
        """Where to deliver a stop (a signal that came earlier is delivered now)."""
        with self.lock:
            self.token, self.stop = token, stop
            pending = self.received
        if pending:
            stop()

    def _run(self) -> None:
        while True:
            signum = signal.sigwait(self.SIGNALS)
            self.deliver(signum)

    def deliver(self, signum: int) -> None:
        with self.lock:
            self.received += 1
            first = self.received == 1
            token, stop = self.token, self.stop
        if not first:
            self.watchdog.fire("signal %d during shutdown" % signum)
            return
        log.info("signal %d: shutting down", signum)
        self.watchdog.arm(SHUTDOWN_SECONDS + WATCHDOG_GRACE_SECONDS)
        if token is not None and stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(stop)


async def serve_daemon(opts: DaemonOptions, state: StateDir, ready, watchdog: Watchdog,
                       signals: "SignalThread") -> None:
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
    async with open_manager(mount_dir=opts.mount, io_mode=opts.io_mode, durability=opts.durability,
                            image_numbers=opts.image_numbers) as m:
        m.log_listeners.append(state.write_klog)
        fs = Mount(m, opts.mount, direct_io=opts.direct_io, debug=opts.debug,
                   uid=opts.uid, gid=opts.gid, mode=opts.file_mode)
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
                        await serve(LocalControl(m), opts.socket, task_status=task_status)

                async def run_fuse():
                    await fs.run()
                    log.warning("the mount %s went away; shutting down", opts.mount)
                    fs.mounted = False
                    stop.set()

                try:
                    await nursery.start(run_server)
                    for address in opts.nbd:   # NBD exports, served like the FUSE files to the end
                        await nursery.start(serve_nbd, m, address)
                except DMError as e:
                    raise DaemonError(e.message or e.strerror) from None
                nursery.start_soon(run_fuse)
                signals.attach(trio.lowlevel.current_trio_token(), stop.set)
                ready()
                await stop.wait()
                watchdog.arm(SHUTDOWN_SECONDS + WATCHDOG_GRACE_SECONDS)
                server_scope.cancel()
                await shut_down(m, fs.ops, trio.current_time() + SHUTDOWN_SECONDS)
                nursery.cancel_scope.cancel()
        finally:
            fs.unmount()


async def shut_down(m, ops, deadline: float) -> None:
    """Suspend, flush, fail held I/O and destroy, all by ``deadline`` (each stage gets
    what the earlier ones left, the last ones a reserve)."""
    reserve = SHUTDOWN_SECONDS / 3
    with trio.CancelScope(deadline=deadline - 2 * reserve) as scope:
        await _release_all(m)
    if scope.cancelled_caught:
        log.warning("suspending the devices took too long; failing their I/O")
    with trio.CancelScope(deadline=deadline - reserve) as scope:
        await _flush_files(m)
    if scope.cancelled_caught:
        log.warning("flushing the image files took too long")
    with trio.CancelScope(shield=True, deadline=deadline) as scope:
        await m.shutdown()
        await ops.quiesce()
    if scope.cancelled_caught:
        log.warning("destroying the tables took too long; unmounting")


async def _release_all(m) -> None:
    """Suspend every running device, as dm's remove does (``__dm_destroy``), top of a stack
    first: presuspend releases what targets hold (delay's queued bios), lock_fs writes the
    FUSE buffer cache back and in-flight I/O drains, so no FUSE request is left waiting;
    requests held by the suspension fail at the removal.  One device stuck (I/O that never
    completes in a target) uses its share of the time, not everyone's."""
    each = SHUTDOWN_SECONDS / 6
    for md in sorted(m.devices.values(), key=lambda md: md.open_count):
        if md.live is not None and not md.suspended and not md.removed:
            with trio.move_on_after(each) as scope:
                try:
                    await m.suspend(md.name)
                except Exception as e:  # a failing device must not stop the shutdown
                    log.warning("suspend of %s failed: %s", md.name, e)
            if scope.cancelled_caught:
                log.warning("suspend of %s took over %g s; going on without it", md.name, each)


async def _flush_files(m) -> None:
    """Flush the image files under the devices (the devices are suspended now)."""
    for dev, _refs in list(getattr(m, "_files", {}).values()):
        if not getattr(dev, "read_only", False) and not getattr(dev, "closed", False):
            try:
                await dev.flush()
            except Exception as e:
                log.warning("flush of %s failed: %s", getattr(dev, "path", dev), e)


def run_daemon(opts: DaemonOptions) -> int:
    """``dmsim daemon``; returns the exit status."""
    try:
        opts.resolve()
        check_daemon_paths(opts)
        made_mount = check_mount_dir(opts.mount)
    except DaemonError as e:
        print("dmsim daemon: %s" % e, file=sys.stderr)
        return 1
    if opts.background:
        return _background(opts, made_mount)
    logging.basicConfig(level=logging.DEBUG if opts.debug else logging.INFO,
                        format="dmsim daemon: %(levelname)s %(name)s: %(message)s")

    def ready():
        print("ready pid=%d mount=%s socket=%s" % (os.getpid(), opts.mount, opts.socket), flush=True)

    return _run(opts, ready, made_mount)


def _warn_hidden(mount: str) -> None:
    try:
        names = sorted(os.listdir(mount))
    except OSError:
        return
    if names:
        log.warning("the mount hides what %s holds while the daemon runs: %s", mount, " ".join(names[:10]))


def _run(opts: DaemonOptions, ready, made_mount: bool, on_error: Callable[[str], None] | None = None) -> int:
    """Lock the state directory, serve, clean up whatever happened; the exit status."""
    state = StateDir(opts.state_dir)
    watchdog = Watchdog(opts)
    signals = SignalThread(watchdog)
    signals.start()
    try:
        state.acquire()
        _warn_hidden(opts.mount)
        with collapse_groups():
            trio.run(serve_daemon, opts, state, ready, watchdog, signals)
        return 0
    except (DaemonError, DMError) as e:
        print("dmsim daemon: %s" % e, file=sys.stderr, flush=True)
        if on_error is not None:
            on_error(str(e))
        return 1
    finally:
        watchdog.cancel()
        state.release()
        if made_mount:
            _remove_made_dir(opts.mount)


def _background(opts: DaemonOptions, made_mount: bool) -> int:
    """Fork; the parent returns once the child reports ready (or its error)."""
    try:
        logfd = StateDir(opts.state_dir).open("daemon.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    except DaemonError as e:
        print("dmsim daemon: %s" % e, file=sys.stderr)
        return 1
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        rc = 1
        try:
            os.close(rfd)
            os.setsid()
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(logfd, 1)
            os.dup2(logfd, 2)
            os.close(null)
            os.close(logfd)
            logging.basicConfig(level=logging.DEBUG if opts.debug else logging.INFO,
                                format="%(asctime)s dmsim daemon: %(levelname)s %(name)s: %(message)s")
            reported = False

            def report(line: str) -> None:
                nonlocal reported
                if not reported:
                    reported = True
                    os.write(wfd, (line + "\n").encode(errors="replace"))
                    os.close(wfd)

            def ready():
                report("ready pid=%d mount=%s socket=%s" % (os.getpid(), opts.mount, opts.socket))

            try:
                rc = _run(opts, ready, made_mount, on_error=lambda msg: report("error " + msg))
            except BaseException as e:
                logging.exception("daemon failed")
                report("error %s: %s" % (type(e).__name__, e))
        finally:
            os._exit(rc)
    os.close(wfd)
    os.close(logfd)
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


def _process_gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie counts: it is not ours to reap)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def stop_daemon(socket: str | None = None, state_dir: str | None = None,
                timeout_seconds: float = STOP_TIMEOUT_SECONDS) -> int:
    """``dmsim daemon stop``: SIGTERM the daemon of the state directory (found like the
    daemon finds it: ``--state-dir``, else the socket's directory) and wait until it has
    let go of its lock and exited.  1 if there is no daemon or it did not stop in time."""
    socket = os.path.abspath(socket or default_socket_path())
    state_dir = os.path.abspath(state_dir or os.path.dirname(socket))
    try:
        check_private_dir(state_dir, "the state directory")
    except DaemonError as e:
        if not os.path.isdir(state_dir):
            print("dmsim daemon stop: no dmsim daemon is running (no state directory %s)" % state_dir,
                  file=sys.stderr)
        else:
            print("dmsim daemon stop: %s" % e, file=sys.stderr)
        return 1
    state = StateDir(state_dir)
    pid = state.running_pid()
    if pid is None:
        print("dmsim daemon stop: no dmsim daemon is running with state directory %s" % state_dir,
              file=sys.stderr)
        return 1
    if pid <= 0:
        print("dmsim daemon stop: a daemon holds %s but its pid file is unreadable" % state.file("lock"),
              file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    except PermissionError:
        print("dmsim daemon stop: not allowed to signal the daemon (pid %d)" % pid, file=sys.stderr)
        return 1
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if state.running_pid() is None and _process_gone(pid):
            return 0
        time.sleep(0.05)
    print("dmsim daemon stop: the daemon (pid %d) has not stopped after %g s; see %s"
          % (pid, timeout_seconds, state.file("daemon.log")), file=sys.stderr)
    return 1
