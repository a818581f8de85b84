"""End to end, a mirror with one leg on another machine: leg B is the NBD export of a
second dmsim daemon.  That daemon is killed (SIGKILL) while a writer keeps writing through
the mirror's FUSE file: the mirror degrades (status ``AD``) and every write is still
acknowledged; the daemon comes back, the leg is repaired by a reload of the same table, it
resyncs, and both legs and the writer's reference agree at the end.

Needs root and /dev/fuse (two FUSE daemons); CI runs as root.  Both daemons are stopped
(or killed) and both mounts lazily unmounted whatever failed.
"""
import contextlib
import mmap
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from e2e_support import TIMEOUT_SECONDS, MiB, mounted, require_root_and_fuse, sh

require_root_and_fuse()

SIZE_MIB = 16
SECTORS = SIZE_MIB * 2048
BLOCK = 4096
BLOCKS = SIZE_MIB * MiB // BLOCK


class Daemon:
    """One dmsim daemon of the test: its mount, state directory and pid."""

    def __init__(self, root: str, name: str, nbd: str | None = None):
        self.mnt = os.path.join(root, name + "-mnt")
        self.state = os.path.join(root, name + "-state")
        os.makedirs(self.mnt, exist_ok=True)
        self.env = dict(os.environ, DMSIM_SOCKET=os.path.join(self.state, "control"))
        self.nbd = nbd
        self.pid: int | None = None

    def dmsim(self, *args, check=True):
        return sh(sys.executable, "-m", "dmsim", *args, env=self.env, check=check)

    def start(self) -> None:
        extra = ["--nbd", "unix:" + self.nbd] if self.nbd else []
        out = self.dmsim("daemon", "--mount", self.mnt, "--background", *extra).stdout
        self.pid = int(out.split()[1].split("=")[1])

    def kill(self) -> None:
        """SIGKILL: no unmount, no goodbye to NBD clients; the mount is undone after."""
        assert self.pid is not None
        os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while os.path.exists("/proc/%d" % self.pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, os.WNOHANG)
            time.sleep(0.05)
        self.pid = None
        self.unmount()

    def unmount(self) -> None:
        if mounted(self.mnt):
            subprocess.run(["umount", "-l", self.mnt], capture_output=True, timeout=TIMEOUT_SECONDS)

    def stop(self) -> None:
        if self.pid is not None:
            r = subprocess.run([sys.executable, "-m", "dmsim", "daemon", "stop", "--timeout", "30"],
                               env=self.env, capture_output=True, timeout=60)
            if r.returncode:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            self.pid = None
        self.unmount()


@pytest.fixture
def daemons(tmp_path):
    made: list[Daemon] = []

    def make(name, nbd=None):
        d = Daemon(str(tmp_path), name, nbd)
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in reversed(made):
            d.stop()


def health(d: Daemon, name: str) -> list[str]:
    return d.dmsim("status", name).stdout.split()


def wait_for(cond, what: str, timeout: float = TIMEOUT_SECONDS):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.1)


def test_remote_leg_killed_and_restarted_during_writes(tmp_path, daemons):
    a_img, b_img = str(tmp_path / "a.img"), str(tmp_path / "b.img")
    for path in (a_img, b_img):
        with open(path, "wb") as f:
            f.truncate(SIZE_MIB * MiB)
    sock = str(tmp_path / "remote.nbd")
    remote = daemons("remote", nbd=sock)
    local = daemons("local")
    remote.start()
    remote.dmsim("create", "legb", "--table", "0 %d linear %s 0" % (SECTORS, b_img))
    local.start()
    uri = "nbd+unix:///legb?socket=%s" % sock
    table = "0 %d mirror core 1 1024 2 %s 0 %s 0" % (SECTORS, a_img, uri)
    local.dmsim("create", "m", "--table", table)
    local.dmsim("progress", "m", "--interval", "0.1")
    st = health(local, "m")
    assert st[5] == uri and st[6] == "32/32" and st[8] == "AA", st
    assert local.dmsim("table", "m").stdout.split()[9] == uri

    # one writer, O_DIRECT 4 KiB writes at random blocks; the reference takes a block once
    # its pwrite has returned (acknowledged)
    ref: dict[int, bytes] = {}
    errors: list[BaseException] = []
    stop = threading.Event()
    count = [0]

    def writer():
        rng = random.Random(15)
        buf = mmap.mmap(-1, BLOCK)
        try:
            fd = os.open(os.path.join(local.mnt, "m"), os.O_RDWR | os.O_DIRECT)
        except OSError as e:
            errors.append(e)
            return
        try:
            while not stop.is_set():
                k = rng.randrange(BLOCKS)
                data = rng.randbytes(BLOCK)
                buf[:] = data
                try:
                    os.pwrite(fd, buf, k * BLOCK)
                except OSError as e:
                    errors.append(e)
                    return
                ref[k] = data
                count[0] += 1
                time.sleep(0.002)
        finally:
            os.close(fd)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        wait_for(lambda: count[0] >= 50, "the first writes")
        remote.kill()                              # leg B's machine goes away mid-write
        # leg B failed: D for a failed write (F had a flush failed first)
        wait_for(lambda: health(local, "m")[8] in ("AD", "AF"), "leg B to fail (status AD)")
        before = count[0]
        wait_for(lambda: count[0] >= before + 100, "writes acknowledged on one leg")
        assert not errors, errors

        remote.start()                             # it comes back, the device made again
        remote.dmsim("create", "legb", "--table", "0 %d linear %s 0" % (SECTORS, b_img))
        time.sleep(2.5)                            # past the client's reconnect backoff
        before = count[0]
        local.dmsim("suspend", "m")                # repair: the same table again
        local.dmsim("load", "m", "--table", table)
        local.dmsim("resume", "m")
        wait_for(lambda: count[0] >= before + 100, "writes during the resync")
    finally:
        stop.set()
        t.join(TIMEOUT_SECONDS)
    assert not t.is_alive() and not errors, errors
    local.dmsim("progress", "m", "--interval", "0.1")
    st = health(local, "m")
    assert st[6] == "32/32" and st[8] == "AA", st

    # no acknowledged write lost: the device, leg A and leg B all hold the reference
    want = bytearray(SIZE_MIB * MiB)
    for k, data in ref.items():
        want[k * BLOCK:(k + 1) * BLOCK] = data
    with open(os.path.join(local.mnt, "m"), "rb") as f:
        assert f.read() == want
    local.dmsim("remove", "m")
    remote.dmsim("remove", "legb")
    for path in (a_img, b_img):
        with open(path, "rb") as f:
            assert f.read() == want, path
