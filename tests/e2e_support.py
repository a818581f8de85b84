"""What the end-to-end tests share: running commands with a timeout, and a ``world``
that undoes everything whatever failed (umount, losetup -d, the daemon by pid, the FUSE
mount).  Those tests need root (losetup, mount) and /dev/fuse; CI runs them as root."""
import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

TIMEOUT_SECONDS = 120
MiB = 1 << 20


def require_root_and_fuse():
    if os.geteuid() != 0:
        pytest.skip("needs root: losetup and mount are privileged (CI runs this as root)",
                    allow_module_level=True)
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing: the FUSE daemon cannot run here", pytrace=False)


def sh(*cmd, check=True, input=None, env=None):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, input=input, env=env)
    if check and r.returncode:
        raise AssertionError("%s failed (%d): %s%s" % (" ".join(cmd), r.returncode, r.stdout, r.stderr))
    return r


def mounted(path):
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


class World(dict):
    """Paths of one test (``dir``, ``mnt`` for the daemon, ``fs`` for ext4) and what it
    started (``loop``, ``pid``)."""

    def dmsim(self, *args):
        return sh(sys.executable, "-m", "dmsim", *args, env=self["env"])

    def start_daemon(self):
        out = self.dmsim("daemon", "--mount", self["mnt"], "--background").stdout
        self["pid"] = int(out.split()[1].split("=")[1])

    def stop_daemon(self):
        """``dmsim daemon stop``: returns once the daemon has unmounted and exited."""
        self.dmsim("daemon", "stop")
        self["pid"] = None

    def wait_closed(self, name):
        """A loop device lets go of its file asynchronously after ``losetup -d``."""
        for _ in range(50):
            if self.dmsim("info", "-c", "--noheadings", "-o", "open", name).stdout.strip() == "0":
                return
            time.sleep(0.1)


@pytest.fixture
def world(tmp_path):
    w = World(dir=str(tmp_path), mnt=str(tmp_path / "mnt"), fs=str(tmp_path / "fs"),
              img=str(tmp_path / "disk.img"), loop=None, pid=None)
    os.mkdir(w["mnt"])
    os.mkdir(w["fs"])
    w["env"] = dict(os.environ, DMSIM_SOCKET=str(tmp_path / "state" / "control"))
    try:
        yield w
    finally:
        if mounted(w["fs"]):
            subprocess.run(["umount", "-l", w["fs"]], capture_output=True)
        if w["loop"]:
            subprocess.run(["losetup", "-d", w["loop"]], capture_output=True)
        if w["pid"]:
            r = subprocess.run([sys.executable, "-m", "dmsim", "daemon", "stop", "--timeout", "30"],
                               env=w["env"], capture_output=True, timeout=60)
            if r.returncode:   # not stopped in time (or never ours): end it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w["pid"], signal.SIGKILL)
        if mounted(w["mnt"]):
            subprocess.run(["fusermount3", "-u", "-z", w["mnt"]], capture_output=True)
