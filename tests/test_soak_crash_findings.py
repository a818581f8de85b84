"""What scripts/soak-crash found and is not fixed yet, as tests that fail until it is.

A SIGKILLed daemon that cannot finish dying: its page-cache invalidator thread
(``pyfuse3.invalidate_inode``, dmsim/fuse.py) sits in D state in
``invalidate_inode_pages2_range`` -> ``__folio_lock`` on a page that a buffered writer
holds locked in ``fuse_perform_write`` while it waits for the dead daemon's answer.  The
process stays a zombie, /dev/fuse stays open, the connection is never aborted, and the
writers hang (an O_DIRECT writer of the same file in D state, even SIGKILL does not end it)
until the buffered writer is killed or the connection is aborted in /sys/fs/fuse.
Seen in ~2-5% of SIGKILL trials (snapshot and mirror) since the write observer (8c149bd).

An fsync acknowledged during a SIGTERM shutdown that races a flushing suspend of the
origin, whose first (partial) 4 KiB buffer was not on the origin after the restart (soak
seed 70, chain 8385, trial 3, fsync durability, chunk 1: origin sectors 1462-1463 of a
43-sector buffered write at 1462 held the old data; its fsync returned 27 ms after the
SIGTERM, the suspend was sent 7 ms before it).  Once in 705 trials; the test below tries
that timing a few times and rarely caught it.  Cause: the suspend's lock_fs was writing
that buffer back when SIGTERM cancelled the control server's request; the cancelled
writeback dropped the buffer (neither dirty nor written) and the fsync behind it wrote the
rest and said yes.  Fixed in dmsim/fuse.py; the test below now has to pass.
"""
import os
import shutil
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "soak-crash")


@pytest.mark.skipif(not (os.geteuid() == 0 and os.path.exists("/dev/fuse") and shutil.which("fusermount3")),
                    reason="needs root, /dev/fuse and fusermount3")
@pytest.mark.xfail(reason="a SIGKILLed daemon's invalidator thread waits on a page lock held by a buffered "
                          "write that waits for the daemon (dmsim/fuse.py); intermittent", strict=False)
def test_sigkilled_daemon_exits_under_buffered_and_direct_writers(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, "--trials", "24", "--cycles", "2", "--kind", "mirror",
                        "--durability", "process", "--signal", "kill", "--jobs", "2", "--seed", "1",
                        "--minutes", "0.6", "--tmpdir", str(tmp_path)], capture_output=True, text=True, timeout=170)
    assert "did not exit within" not in r.stdout, r.stdout[:3000]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr


def _dmsim(*args, env):
    return subprocess.run([sys.executable, "-m", "dmsim", *args], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.skipif(not (os.geteuid() == 0 and os.path.exists("/dev/fuse") and shutil.which("fusermount3")),
                    reason="needs root, /dev/fuse and fusermount3")
def test_fsync_acknowledged_at_sigterm_during_suspend_is_on_disk(tmp_path):
    """Buffered 43-sector write at a sector not 4 KiB aligned to a snapshot-origin (chunk 1,
    fsync durability), then fsync, while the origin is being suspended and SIGTERM comes
    ~7 ms later: if fsync said yes, every sector must be in the origin image (the write in
    flight at the end may have landed or not).  Fixed in dmsim/fuse.py (a cancelled
    writeback keeps its buffer dirty); tests/test_fuse.py has the deterministic form."""
    import signal
    import threading
    import time

    lost = []
    for attempt in range(6):
        d = tmp_path / ("a%d" % attempt)
        (d / "mnt").mkdir(parents=True)
        origin, cow = d / "o.img", d / "c.img"
        origin.write_bytes(b"o" * (2 << 20))
        with open(cow, "wb") as f:
            f.truncate(5 << 20)
        env = dict(os.environ, DMSIM_SOCKET=str(d / "st" / "control"))
        r = _dmsim("daemon", "--mount", str(d / "mnt"), "--background", "--durability", "fsync", env=env)
        assert r.returncode == 0, r.stderr
        pid = int(r.stdout.split()[1].split("=")[1])
        try:
            assert _dmsim("create", "snap", "--table", "0 4096 snapshot %s %s P 1" % (origin, cow),
                          env=env).returncode == 0
            assert _dmsim("create", "orig", "--table", "0 4096 snapshot-origin %s" % origin, env=env).returncode == 0
            fd = os.open(d / "mnt" / "orig", os.O_RDWR)
            acked = []
            issued = []

            def writer(fd=fd, acked=acked, issued=issued):
                try:
                    for i in range(200):
                        sector = 1462 + (i % 40) * 64
                        issued.append((sector, 65 + i % 26))
                        n = os.pwrite(fd, bytes([65 + i % 26]) * (43 * 512), sector * 512)
                        if n != 43 * 512:
                            return
                        os.fsync(fd)
                        acked.append((sector, 65 + i % 26))
                except OSError:
                    pass

            t = threading.Thread(target=writer)
            t.start()
            time.sleep(0.05 + (0.013 * attempt) % 0.1)
            suspend = subprocess.Popen([sys.executable, "-m", "dmsim", "suspend", "orig"], env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.007)
            os.kill(pid, signal.SIGTERM)
            t.join(30)
            suspend.wait(30)
            for _ in range(300):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            with contextlib_suppress():
                os.close(fd)
        finally:
            with contextlib_suppress():
                os.kill(pid, signal.SIGKILL)
            subprocess.run(["fusermount3", "-u", "-z", str(d / "mnt")], capture_output=True)
        image = origin.read_bytes()
        last = {}
        for sector, byte in acked:
            for s in range(sector, sector + 43):
                last[s] = byte
        maybe = {}      # the write not acknowledged: its sectors may hold it instead
        if len(issued) > len(acked):
            sector, byte = issued[-1]
            maybe = {s: byte for s in range(sector, sector + 43)}
        bad = [s for s, byte in sorted(last.items())
               if image[s * 512:(s + 1) * 512] not in (bytes([byte]) * 512, bytes([maybe.get(s, byte)]) * 512)]
        if bad:
            lost.append((attempt, bad[:8]))
    assert not lost, "acknowledged sectors not on the origin: %r" % lost


def contextlib_suppress():
    import contextlib
    return contextlib.suppress(OSError, ProcessLookupError)
