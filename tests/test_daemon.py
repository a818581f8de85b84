"""The daemon as a process: start, CLI over the socket, refusal of a second one, shutdown."""
import errno
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("pyfuse3", reason="pyfuse3 is an optional dependency (dmsim[fuse])")
if not os.path.exists("/dev/fuse"):
    pytest.skip("no /dev/fuse on this machine", allow_module_level=True)

DMSIM = [sys.executable, "-m", "dmsim.cli"]


def is_mounted(path):
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


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

    def stop(self, sig=signal.SIGTERM, timeout=20):
        """Signal the daemon and wait until its pid file is gone (it is not our child)."""
        if self.pid is None:
            return
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and os.path.exists(os.path.join(self.state, "pid")):
            time.sleep(0.05)
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
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
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
