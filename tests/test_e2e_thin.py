"""End to end: daemon, thin-pool and thin devices, a loop device on the thin device's FUSE
file, ext4 with files, a snapshot that keeps them while the origin changes, and metadata that
thin_check accepts and thin_dump shows afterwards.

Needs root (losetup, mount) and /dev/fuse; everything is undone in the fixture's finalizer
(umount, losetup -d, the daemon by pid, the FUSE mount), whatever failed.
"""
import hashlib
import os
import shutil
import subprocess
import time

import pytest
from e2e_support import (
    MiB,
    require_root_and_fuse,
    sh,
    world,  # noqa: F401  (the fixture)
)

require_root_and_fuse()
pytest.importorskip("pyfuse3", reason="pyfuse3 is an optional dependency (dmsim[fuse])")


def wait_closed(w, name):
    for _ in range(100):
        if w.dmsim("info", "-c", "--noheadings", "-o", "open", name).stdout.strip() == "0":
            return
        time.sleep(0.1)


def test_ext4_on_a_thin_device_and_its_snapshot(world):  # noqa: F811
    w = world
    assert shutil.which("mkfs.ext4") and shutil.which("losetup"), "e2fsprogs and util-linux are needed"
    meta, data = os.path.join(w["dir"], "meta.img"), os.path.join(w["dir"], "data.img")
    with open(meta, "wb") as f:
        f.truncate(16 * MiB)
    with open(data, "wb") as f:
        f.truncate(256 * MiB)
    w.start_daemon()
    w.dmsim("create", "pool", "--table", "0 %d thin-pool %s %s 128 32" % (256 * 2048, meta, data))
    w.dmsim("message", "pool", "0", "create_thin 0")
    w.dmsim("create", "thin", "--table", "0 %d thin /dev/mapper/pool 0" % (128 * 2048))
    dev = os.path.join(w["mnt"], "thin")
    assert os.path.getsize(dev) == 128 * MiB
    w["loop"] = sh("losetup", "--show", "-f", dev).stdout.strip()
    sh("mkfs.ext4", "-q", "-F", w["loop"])
    sh("mount", w["loop"], w["fs"])
    payload = os.urandom(5 * MiB + 321)
    with open(os.path.join(w["fs"], "data.bin"), "wb") as f:
        f.write(payload)
    sh("sync")
    sh("umount", w["fs"])
    status = w.dmsim("status", "thin").stdout.split()
    assert int(status[3]) >= 5 * 2048  # mapped sectors: the file and the filesystem's metadata
    # a snapshot of the (quiet) origin, then the origin changes
    w.dmsim("suspend", "thin")
    w.dmsim("message", "pool", "0", "create_snap 1 0")
    w.dmsim("resume", "thin")
    sh("mount", w["loop"], w["fs"])
    with open(os.path.join(w["fs"], "data.bin"), "wb") as f:
        f.write(b"changed")
    sh("sync")
    sh("umount", w["fs"])
    sh("losetup", "-d", w["loop"])
    w["loop"] = None
    wait_closed(w, "thin")
    w.dmsim("create", "snap", "--table", "0 %d thin /dev/mapper/pool 1" % (128 * 2048))
    w["loop"] = sh("losetup", "--show", "-f", os.path.join(w["mnt"], "snap")).stdout.strip()
    sh("fsck.ext4", "-fn", w["loop"])
    sh("mount", "-o", "ro", w["loop"], w["fs"])
    with open(os.path.join(w["fs"], "data.bin"), "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(payload).digest()
    sh("umount", w["fs"])
    sh("losetup", "-d", w["loop"])
    w["loop"] = None
    wait_closed(w, "snap")
    pool_status = w.dmsim("status", "pool").stdout.split()
    assert pool_status[2:4] == ["thin-pool", "0"] and pool_status[6] == "-" and pool_status[7] == "rw"
    for name in ("snap", "thin", "pool"):
        w.dmsim("remove", name)
    w.stop_daemon()
    if shutil.which("thin_check"):
        r = subprocess.run(["thin_check", meta], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        dump = subprocess.run(["thin_dump", meta], capture_output=True, text=True, timeout=60).stdout
        assert dump.count("<device ") == 2
