"""The daemon as a process: start, CLI over the socket, refusal of a second one, shutdown,
``daemon stop``, the directories it trusts, its files' permissions for other users, and
random names and tables through the CLI."""
import contextlib
import errno
import grp
import os
import pathlib
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("pyfuse3", reason="pyfuse3 is an optional dependency (dmsim[fuse])")
if not os.path.exists("/dev/fuse"):
    pytest.skip("no /dev/fuse on this machine", allow_module_level=True)

DMSIM = [sys.executable, "-m", "dmsim.cli"]


def is_mounted(path):
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


def _gone(pid):
    """Exited (a zombie too: the daemon is not our child, and init here may not reap)."""
    from dmsim.daemon import _process_gone

    return _process_gone(pid)


def dmsim(*args, env, input=None, timeout=30):
    return subprocess.run(DMSIM + list(args), env=env, input=input, capture_output=True,
                          text=True, timeout=timeout)


class Daemon:
    def __init__(self, tmp_path, name="d"):
        self.mnt = str(tmp_path / (name + "-mnt"))
        os.mkdir(self.mnt)
        self.state = str(tmp_path / (name + "-state"))
        self.socket = os.path.join(self.state, "control")
        self.env = dict(os.environ, DMSIM_SOCKET=self.socket)
        self.pid = None

    def start(self):
        r = dmsim("daemon", "--mount", self.mnt, "--background", env=self.env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("ready pid=")
        self.pid = int(r.stdout.split()[1].split("=")[1])
        return r

    def stop(self, sig=None, timeout=30):
        """``dmsim daemon stop`` (or the signal ``sig``), then wait until the pid is gone
        (it is not our child); SIGKILL if it is still there after ``timeout``."""
        if self.pid is None:
            return
        if sig is None:
            dmsim("daemon", "stop", "--timeout", str(timeout), env=self.env, timeout=timeout + 10)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and os.path.exists(os.path.join(self.state, "pid")):
            time.sleep(0.05)
        while time.monotonic() < deadline:
            if _gone(self.pid):
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.pid = None

    def cleanup(self):
        if self.pid is not None:
            self.stop(timeout=10)
        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", self.mnt], capture_output=True)


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    d.start()
    yield d
    d.cleanup()


def test_background_start_cli_and_clean_stop(daemon, tmp_path):
    assert is_mounted(daemon.mnt)
    assert os.path.exists(daemon.socket)
    with open(os.path.join(daemon.state, "pid")) as f:
        assert int(f.read()) == daemon.pid
    img = tmp_path / "a.img"
    img.write_bytes(bytes(1 << 20))
    # table on stdin, through the plain-verb form
    r = dmsim("create", "lin", env=daemon.env, input="0 2048 linear %s 0\n" % img)
    assert r.returncode == 0, r.stderr
    r = dmsim("dmsetup", "ls", env=daemon.env)
    assert r.stdout == "lin\t(253:0)\n"
    assert os.path.getsize(os.path.join(daemon.mnt, "lin")) == 1 << 20
    # a failing command: dmsetup's text and exit status, and the kernel log
    r = dmsim("create", "bad", "--table", "0 8 linear /nonexistent 0", env=daemon.env)
    assert r.returncode == 1 and "Command failed." in r.stderr
    r = dmsim("klog", env=daemon.env)
    assert "device-mapper: table: 253:1: linear: Device lookup failed" in r.stdout
    assert dmsim("klog", env=daemon.env).stdout == ""        # read_log clears
    with open(os.path.join(daemon.state, "klog")) as f:      # ... the file keeps them
        assert "linear: Device lookup failed" in f.read()
    # writes through the FUSE file land in the image; stop flushes and cleans up
    with open(os.path.join(daemon.mnt, "lin"), "r+b") as f:
        f.seek(4096)
        f.write(b"persist")
    daemon.stop()
    assert not is_mounted(daemon.mnt)
    assert not os.path.exists(daemon.socket)
    assert not os.path.exists(os.path.join(daemon.state, "pid"))
    with open(img, "rb") as f:
        f.seek(4096)
        assert f.read(7) == b"persist"


def test_second_daemon_refused(daemon, tmp_path):
    # same mount, other socket
    other = dict(daemon.env, DMSIM_SOCKET=str(tmp_path / "s2" / "control"))
    r = dmsim("daemon", "--mount", daemon.mnt, "--background", env=other)
    assert r.returncode == 1 and "already a mount point" in r.stderr
    # same socket, other mount, other state dir
    os.mkdir(tmp_path / "m2")
    r = dmsim("daemon", "--mount", str(tmp_path / "m2"), "--socket", daemon.socket,
              "--state-dir", str(tmp_path / "st2"), "--background", env=daemon.env)
    assert r.returncode == 1 and "already listening on" in r.stderr
    assert not is_mounted(str(tmp_path / "m2"))
    # same state dir
    r = dmsim("daemon", "--mount", str(tmp_path / "m2"), "--state-dir", daemon.state,
              "--socket", str(tmp_path / "s3"), "--background", env=daemon.env)
    assert r.returncode == 1 and "another dmsim daemon (pid %d)" % daemon.pid in r.stderr
    assert not is_mounted(str(tmp_path / "m2"))
    # the first one is unharmed
    assert dmsim("ls", env=daemon.env).stdout == "No devices found\n"


def test_no_daemon_message(tmp_path):
    env = dict(os.environ, DMSIM_SOCKET=str(tmp_path / "nothing"))
    r = dmsim("ls", env=env)
    assert r.returncode == 1 and "cannot connect to the dmsim daemon" in r.stderr


def test_shutdown_fails_held_io(daemon):
    assert dmsim("create", "z", "--table", "0 8 zero", env=daemon.env).returncode == 0
    assert dmsim("suspend", "z", env=daemon.env).returncode == 0
    fd = os.open(os.path.join(daemon.mnt, "z"), os.O_RDONLY)
    result = []

    def reader():
        try:
            result.append(os.pread(fd, 512, 0))
        except OSError as e:
            result.append(e.errno)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.3)
    assert not result                      # held while suspended
    daemon.stop(signal.SIGINT)
    t.join(10)
    try:
        os.close(fd)
    except OSError as e:
        assert e.errno == errno.ENOTCONN   # the mount is gone: FUSE's flush on close fails
    assert result and result[0] in (errno.ENXIO, errno.EIO), result   # failed, not answered
    assert not is_mounted(daemon.mnt)


def test_shutdown_releases_held_delay_io_and_writes_back(daemon, tmp_path):
    """SIGTERM: buffered data is written back, delay's held bios are released (as at a
    removal's presuspend), every FUSE request is answered, and the log shows no error."""
    img = tmp_path / "a.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    assert dmsim("create", "lin", "--table", "0 2048 linear %s 0" % img, env=daemon.env).returncode == 0
    assert dmsim("create", "slow", "--table", "0 2048 delay %s 0 20000" % img,
                 env=daemon.env).returncode == 0
    wfd = os.open(os.path.join(daemon.mnt, "lin"), os.O_RDWR)
    os.pwrite(wfd, b"W" * 4096, 8192)                # in the buffer cache, no fsync
    rfd = os.open(os.path.join(daemon.mnt, "slow"), os.O_RDONLY)
    result = []

    def reader():
        try:
            result.append(os.pread(rfd, 512, 0))
        except OSError as e:
            result.append(e.errno)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.5)
    assert not result                                # held by delay for 20 s
    t0 = time.monotonic()
    daemon.stop(signal.SIGTERM)
    t.join(10)
    assert time.monotonic() - t0 < 10
    for fd in (rfd, wfd):
        try:
            os.close(fd)
        except OSError as e:
            assert e.errno == errno.ENOTCONN
    assert result == [bytes(512)]                    # released and completed
    with open(img, "rb") as f:
        f.seek(8192)
        assert f.read(4096) == b"W" * 4096
    assert not is_mounted(daemon.mnt)
    with open(os.path.join(daemon.state, "daemon.log")) as f:
        log = f.read()
    assert "ERROR" not in log and "Traceback" not in log and "WARNING" not in log, log


def test_external_unmount_stops_daemon(daemon):
    subprocess.run(["fusermount3", "-u", daemon.mnt], check=True)
    deadline = time.monotonic() + 10
    while os.path.exists(daemon.socket) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(daemon.socket)
    daemon.pid = None


def test_durability_option(tmp_path):
    """The daemon takes --durability process (flushes are free; what that means for the
    image files is tested in test_blockdev and test_snapshot_crash) and refuses others;
    --resync-throttle sets the mirrors' shared kcopyd throttle and says so in its log."""
    import subprocess as sp
    import sys as _sys

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    img = tmp_path / "a.img"
    img.write_bytes(bytes(1 << 20))
    env = dict(os.environ, DMSIM_SOCKET=str(tmp_path / "st" / "control"))
    run = lambda *a: sp.run([_sys.executable, "-m", "dmsim", *a], env=env, capture_output=True,  # noqa: E731
                            text=True, timeout=60)
    out = run("daemon", "--mount", str(mnt), "--background", "--durability", "process",
              "--resync-throttle", "50")
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[1].split("=")[1])
    try:
        assert run("create", "l", "--table", "0 2048 linear %s 0" % img).returncode == 0
        fd = os.open(mnt / "l", os.O_RDWR)
        try:
            os.pwrite(fd, b"\x5a" * 4096, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        assert img.read_bytes()[:4096] == b"\x5a" * 4096
        with open(tmp_path / "st" / "daemon.log") as f:
            assert "mirror resync limited to 50% of the time" in f.read()
        assert run("daemon", "--mount", str(tmp_path), "--durability", "bogus").returncode != 0
    finally:
        if run("daemon", "stop").returncode:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if is_mounted(str(mnt)):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


# -- daemon stop, bounded shutdown -------------------------------------------------------------

def test_daemon_stop_verb(daemon):
    """``dmsim daemon stop`` returns once the daemon has exited and unmounted; without a
    daemon it says so and fails."""
    r = dmsim("daemon", "stop", env=daemon.env)
    assert r.returncode == 0, r.stderr
    assert _gone(daemon.pid) and not is_mounted(daemon.mnt)
    assert not os.path.exists(daemon.socket)
    daemon.pid = None
    r = dmsim("daemon", "stop", env=daemon.env)
    assert r.returncode == 1 and "no dmsim daemon is running" in r.stderr
    r = dmsim("daemon", "stop", "--state-dir", daemon.state + "-none", env=daemon.env)
    assert r.returncode == 1 and "no dmsim daemon is running" in r.stderr


def test_sigterm_with_dd_blocked_on_a_suspended_device(daemon, tmp_path):
    """A writer held by a suspended device does not keep the daemon up: SIGTERM ends it
    within the shutdown bound, and the writer gets an error instead of hanging."""
    img = tmp_path / "a.img"
    img.write_bytes(bytes(1 << 20))
    assert dmsim("create", "lin", "--table", "0 2048 linear %s 0" % img, env=daemon.env).returncode == 0
    assert dmsim("suspend", "lin", env=daemon.env).returncode == 0
    dd = subprocess.Popen(["dd", "if=/dev/zero", "of=" + os.path.join(daemon.mnt, "lin"), "bs=4096",
                           "count=1", "oflag=direct", "conv=notrunc"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        assert dd.poll() is None                   # held by the suspension
        t0 = time.monotonic()
        os.kill(daemon.pid, signal.SIGTERM)
        deadline = t0 + 25
        while not _gone(daemon.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(daemon.pid), "the daemon did not exit within 25 s of SIGTERM"
        daemon.pid = None
        _, err = dd.communicate(timeout=10)
        assert dd.returncode != 0, err             # failed, not completed
        assert not is_mounted(daemon.mnt)
    finally:
        if dd.poll() is None:
            dd.kill()
            dd.wait()


def test_watchdog_unmounts_and_exits(tmp_path, monkeypatch):
    """The last resort of a stuck shutdown: lazy unmount, socket and pid removed, exit(1)."""
    from dmsim import daemon as d

    calls = []
    monkeypatch.setattr(d.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or
                        subprocess.CompletedProcess(cmd, 0))
    (tmp_path / "control").write_text("")
    (tmp_path / "pid").write_text("1\n")
    opts = d.DaemonOptions(mount=str(tmp_path / "mnt"), socket=str(tmp_path / "control"),
                           state_dir=str(tmp_path))
    codes = []
    w = d.Watchdog(opts, exit=codes.append)
    w.arm(0.05)
    for _ in range(100):
        if codes:
            break
        time.sleep(0.05)
    assert calls == [["fusermount3", "-u", "-z", opts.mount]] and codes == [1]
    assert not (tmp_path / "control").exists() and not (tmp_path / "pid").exists()
    w.fire("again")                                # once only
    assert codes == [1]


def test_second_signal_fires_the_watchdog():
    """A first signal asks the loop to stop and arms the watchdog; a second ends at once."""
    from dmsim import daemon as d

    class FakeWatchdog:
        def __init__(self):
            self.armed, self.fired = [], []

        def arm(self, s):
            self.armed.append(s)

        def fire(self, why):
            self.fired.append(why)

    w = FakeWatchdog()
    sig = d.SignalThread(w)  # not started: deliver() is what its thread calls
    stops = []
    sig.deliver(signal.SIGTERM)                    # before the loop is there: remembered
    sig.attach(type("T", (), {"run_sync_soon": lambda self, fn: fn()})(), lambda: stops.append(1))
    assert stops == [1] and len(w.armed) == 1 and not w.fired
    sig.deliver(signal.SIGINT)
    assert w.fired and stops == [1]


# -- directories the daemon trusts, and its mount directory ------------------------------------

def test_unsafe_directories_and_socket_in_mount_refused(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    env = dict(os.environ)

    def start(*extra):
        return dmsim("daemon", "--mount", str(mnt), "--background", *extra, env=env)

    os.chmod(state, 0o777)
    r = start("--state-dir", str(state), "--socket", str(tmp_path / "s" / "control"))
    assert r.returncode == 1 and "writable by others" in r.stderr, r.stderr
    os.chmod(state, 0o770)
    r = start("--state-dir", str(state), "--socket", str(tmp_path / "s" / "control"))
    assert r.returncode == 1 and "writable by its group" in r.stderr, r.stderr
    os.chmod(state, 0o700)
    if os.geteuid() == 0:
        os.chown(state, 54321, 54321)
        r = start("--state-dir", str(state), "--socket", str(tmp_path / "s" / "control"))
        assert r.returncode == 1 and "belongs to uid 54321" in r.stderr, r.stderr
        os.chown(state, 0, 0)
    # a symlink planted where the lock or pid file goes is not followed
    os.symlink(str(tmp_path / "elsewhere"), state / "lock")
    r = start("--state-dir", str(state), "--socket", str(tmp_path / "s" / "control"))
    assert r.returncode == 1 and "symlink" in r.stderr, r.stderr
    assert not (tmp_path / "elsewhere").exists()
    os.unlink(state / "lock")
    # the socket (or the state directory) inside the mount would make the daemon wait on itself
    r = start("--socket", str(mnt / "control"))
    assert r.returncode == 1 and "inside the mount" in r.stderr, r.stderr
    r = start("--socket", str(tmp_path / "s2" / "control"), "--state-dir", str(mnt / "st"))
    assert r.returncode == 1 and "inside the mount" in r.stderr, r.stderr
    assert not is_mounted(str(mnt))
    r = start("--socket", str(tmp_path / "s3" / "control"), "--mode", "9")
    assert r.returncode == 1 and "not an octal number" in r.stderr
    r = start("--socket", str(tmp_path / "s3" / "control"), "--owner", "no-such-user-dmsim")
    assert r.returncode == 1 and "no such user" in r.stderr


def test_missing_mount_dir_is_made_and_removed(tmp_path):
    """``--mount DIR`` for a DIR that is not there (``/dev/mapper`` without dm) makes it,
    serves there (stacked tables name devices by DIR/NAME), and removes it at exit."""
    mnt = tmp_path / "mapper"
    img = tmp_path / "a.img"
    img.write_bytes(os.urandom(1 << 20))
    env = dict(os.environ, DMSIM_SOCKET=str(tmp_path / "st" / "control"))
    r = dmsim("daemon", "--mount", str(mnt), "--background", env=env)
    assert r.returncode == 0, r.stderr
    pid = int(r.stdout.split()[1].split("=")[1])
    try:
        assert is_mounted(str(mnt))
        assert dmsim("create", "base", "--table", "0 2048 linear %s 0" % img, env=env).returncode == 0
        r = dmsim("create", "top", "--table", "0 1024 linear %s/base 1024" % mnt, env=env)
        assert r.returncode == 0, r.stderr
        with open(mnt / "top", "rb") as f:
            assert f.read(4096) == img.read_bytes()[512 * 1024:512 * 1024 + 4096]
    finally:
        r = dmsim("daemon", "stop", env=env)
        if r.returncode:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    assert r.returncode == 0, r.stderr
    assert not mnt.exists()


def _dev_mapper_free():
    if os.geteuid() != 0:
        return "needs root"
    if is_mounted("/dev/mapper"):
        return "/dev/mapper is a mount point already"
    if os.path.isdir("/dev/mapper") and set(os.listdir("/dev/mapper")) - {"control"}:
        return "/dev/mapper holds kernel dm devices"
    if not os.path.isdir("/dev"):
        return "no /dev"
    return None


@pytest.mark.skipif(_dev_mapper_free() is not None, reason=str(_dev_mapper_free()))
def test_daemon_at_dev_mapper(tmp_path):
    """The dmsetup-compatible setup: the daemon mounted at /dev/mapper, tables naming
    /dev/mapper/NAME (resolved in-process, never through the mount), I/O through the files."""
    mnt = "/dev/mapper"
    img = tmp_path / "a.img"
    img.write_bytes(os.urandom(1 << 20))
    env = dict(os.environ, DMSIM_SOCKET=str(tmp_path / "st" / "control"))
    r = dmsim("daemon", "--mount", mnt, "--background", env=env)
    if r.returncode and "already a mount point" in r.stderr:
        pytest.skip("another daemon took /dev/mapper meanwhile")
    assert r.returncode == 0, r.stderr
    pid = int(r.stdout.split()[1].split("=")[1])
    try:
        assert dmsim("create", "dmsim-base", "--table", "0 2048 linear %s 0" % img, env=env).returncode == 0
        r = dmsim("create", "dmsim-top", "--table", "0 1024 linear /dev/mapper/dmsim-base 1024", env=env,
                  timeout=10)
        assert r.returncode == 0, r.stderr
        assert dmsim("table", "dmsim-top", env=env).stdout == "0 1024 linear 253:0 1024\n"
        with open("/dev/mapper/dmsim-top", "rb") as f:
            assert f.read(4096) == img.read_bytes()[512 * 1024:512 * 1024 + 4096]
        st_ = os.stat("/dev/mapper/dmsim-base")
        assert stat.S_IMODE(st_.st_mode) == 0o660 and st_.st_uid == 0
        assert dmsim("remove", "dmsim-top", env=env).returncode == 0
        assert dmsim("remove", "dmsim-base", env=env).returncode == 0
    finally:
        r = dmsim("daemon", "stop", env=env)
        if r.returncode:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mnt)


# -- permissions: device files for other users -------------------------------------------------

def _unused_id():
    for n in range(54321, 54400):
        try:
            pwd.getpwuid(n)
        except KeyError:
            try:
                grp.getgrgid(n)
            except KeyError:
                return n
    pytest.skip("no unused uid")


@pytest.fixture
def public_daemon():
    """A daemon whose mount other users can reach (pytest's tmp_path is private)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to act as another user")
    base = tempfile.mkdtemp(prefix="dmsim-perm-", dir="/tmp")
    os.chmod(base, 0o711)
    d = Daemon(pathlib.Path(base))
    try:
        d.start()
        os.chmod(d.mnt, 0o755)
        yield d, base
    finally:
        d.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def as_user(uid, *cmd, groups=None):
    pre = ["setpriv", "--reuid=%d" % uid, "--regid=%d" % uid]
    pre += ["--groups=%s" % ",".join(map(str, groups))] if groups else ["--clear-groups"]
    return subprocess.run(pre + list(cmd), capture_output=True, text=True, timeout=30)


def test_device_files_refuse_other_users(public_daemon):
    """0660 root:disk like /dev/dm-N: another user can neither read nor write a device
    (the image is private), a member of ``disk`` can; nobody makes names on the mount."""
    d, base = public_daemon
    img = os.path.join(base, "secret.img")
    with open(img, "wb") as f:
        f.write(b"S" * (1 << 20))
    os.chmod(img, 0o600)
    assert dmsim("create", "sec", "--table", "0 2048 linear %s 0" % img, env=d.env).returncode == 0
    dev = os.path.join(d.mnt, "sec")
    st_ = os.stat(dev)
    disk = grp.getgrnam("disk").gr_gid if "disk" in [g.gr_name for g in grp.getgrall()] else 0
    assert (stat.S_IMODE(st_.st_mode), st_.st_uid, st_.st_gid) == (0o660, 0, disk)
    uid = _unused_id()
    r = as_user(uid, "head", "-c", "16", dev)
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    r = as_user(uid, "dd", "if=/dev/zero", "of=" + dev, "bs=512", "count=1", "conv=notrunc")
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    r = as_user(uid, "touch", os.path.join(d.mnt, "new"))
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    if disk:
        r = as_user(uid, "head", "-c", "16", dev, groups=[disk])
        assert r.returncode == 0 and r.stdout == "S" * 16, r
    # root is refused names too (like a /dev directory it cannot write), not ENOSYS
    with pytest.raises(PermissionError):
        os.open(os.path.join(d.mnt, "new"), os.O_CREAT | os.O_WRONLY, 0o600)
    with pytest.raises(PermissionError):
        os.mkdir(os.path.join(d.mnt, "dir"))
    with pytest.raises(PermissionError):
        os.unlink(dev)
    assert os.listdir(d.mnt) == ["sec"]
    # the client refuses a socket another user made (it would see every request)
    fake = os.path.join(base, "fake")
    os.mkdir(fake)
    import socket as _socket
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.bind(os.path.join(fake, "control"))
        s.listen(1)
        os.chown(os.path.join(fake, "control"), uid, uid)
        r = dmsim("--socket", os.path.join(fake, "control"), "ls", env=d.env)
        assert r.returncode == 1 and "belongs to uid %d" % uid in r.stderr, r.stderr
    finally:
        s.close()


def test_owner_group_mode_options(tmp_path):
    d = Daemon(tmp_path)
    r = dmsim("daemon", "--mount", d.mnt, "--background", "--owner", "54321", "--group", "54322",
              "--mode", "640", env=d.env)
    assert r.returncode == 0, r.stderr
    d.pid = int(r.stdout.split()[1].split("=")[1])
    try:
        r = dmsim("create", "z", "--table", "0 8 zero", env=d.env)
        assert r.returncode == 0, r.stderr
        st_ = os.stat(os.path.join(d.mnt, "z"))
        assert (stat.S_IMODE(st_.st_mode), st_.st_uid, st_.st_gid) == (0o640, 54321, 54322)
    finally:
        d.cleanup()


# -- fuzz: random names and tables through the CLI -----------------------------------------------

@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("fuzz"))
    d.start()
    yield d
    d.cleanup()


_names = st.one_of(
    st.text(min_size=1, max_size=140),
    st.text(alphabet=st.sampled_from("ab/\x00\udcff\ud800.-_ "), min_size=1, max_size=8),
    st.sampled_from([".", "..", "control", "a" * 127, "a" * 128, "é" * 64]),
)
_words = st.sampled_from(["0", "8", "-1", "18446744073709551616", str(1 << 54), str(1 << 60),
                          "zero", "error", "linear", "striped", "snapshot", "mirror", "delay", "flakey",
                          "dust", "/dev/null", "/nonexistent", "253:0", "core", "2", "x", ""])
_tables = st.one_of(
    st.lists(_words, min_size=0, max_size=8).map(" ".join),
    st.text(max_size=80),
    st.tuples(st.integers(0, 1 << 64), st.integers(-1, 1 << 64)).map(lambda t: "%d %d zero" % t),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=_names, table=_tables, other=_names,
       verb=st.sampled_from(["info", "table", "status", "deps", "suspend", "resume", "remove", "rename",
                             "message", "reload"]))
def test_cli_fuzz_names_and_tables(fuzz_daemon, name, table, other, verb):
    """Whatever the name and table, the CLI answers (an error or success, never a
    traceback), and afterwards the daemon still lists its devices and the mount lists too."""
    from dmsim import cli

    d = fuzz_daemon
    old = os.environ.get("DMSIM_SOCKET")
    os.environ["DMSIM_SOCKET"] = d.socket
    try:
        then = {"rename": [name, other], "message": [name, "0", other], "reload": [name, "--table", table]}
        for argv in (["create", name, "--table", table], [verb] + then.get(verb, [name])):
            try:
                rc = cli.main(argv)
            except SystemExit as e:      # argparse's usage errors
                rc = e.code
            assert rc in (0, 1, 2)
        cli.main(["resume", other if verb == "rename" else name])
        os.listdir(d.mnt)                # never a dead mount
        assert cli.main(["remove_all"]) == 0
    finally:
        if old is None:
            os.environ.pop("DMSIM_SOCKET", None)
        else:
            os.environ["DMSIM_SOCKET"] = old
    assert trio.run(_names, d.socket) == []


async def _names(path):
    from dmsim.client import RemoteControl

    async with RemoteControl(path) as c:
        return await c.names()


async def test_shut_down_is_bounded_whatever_hangs(autojump_clock, caplog):
    """A suspend that never completes (I/O stuck in a target), a flush that never returns
    and a table destroy that never ends: the shutdown sequence still returns by its deadline."""
    from dmsim import daemon as d

    class StuckDevice:
        live, suspended, removed, open_count = object(), False, False, 0
        read_only = closed = False

        def __init__(self, name="img"):
            self.name = name

        async def flush(self):
            await trio.sleep_forever()

    class StuckManager:
        def __init__(self):
            self.devices = {"stuck": StuckDevice("stuck"), "other": StuckDevice("other")}
            self._files = {("img", True): [StuckDevice(), 1]}
            self.suspends = []

        async def suspend(self, name):
            self.suspends.append(name)
            await trio.sleep_forever()

        async def shutdown(self):
            await trio.sleep_forever()

    class Ops:
        async def quiesce(self):
            pass

    m = StuckManager()
    t0 = trio.current_time()
    await d.shut_down(m, Ops(), t0 + d.SHUTDOWN_SECONDS)
    assert trio.current_time() - t0 <= d.SHUTDOWN_SECONDS + 0.01
    assert m.suspends == ["stuck", "other"]       # one stuck device does not starve the next
    assert "took too long" in caplog.text


def test_daemon_stop_gives_up_with_a_message(tmp_path):
    """A "daemon" that ignores SIGTERM (it holds the lock, its pid in the pid file):
    ``daemon stop --timeout`` gives up after that long, says so, and fails."""
    state = tmp_path / "st"
    state.mkdir(mode=0o700)
    code = ("import fcntl, os, signal, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "fd = os.open(sys.argv[1] + '/lock', os.O_RDWR | os.O_CREAT, 0o600)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "open(sys.argv[1] + '/pid', 'w').write('%d\\n' % os.getpid())\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(state)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready\n"
        t0 = time.monotonic()
        r = dmsim("daemon", "stop", "--state-dir", str(state), "--timeout", "1", env=dict(os.environ))
        assert r.returncode == 1 and "(pid %d) has not stopped after 1 s" % p.pid in r.stderr, r.stderr
        assert time.monotonic() - t0 < 10
    finally:
        p.kill()
        p.wait()
