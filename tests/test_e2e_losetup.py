"""End to end: daemon, linear device, loop device on its FUSE file, ext4, files back.

Needs root (losetup, mount) and /dev/fuse; CI runs as root.  Everything is undone in
the fixture's finalizer, whatever failed: umount, losetup -d, the device, the daemon
(by pid), the FUSE mount.
"""
import hashlib
import os
import shutil
import time

import pytest
from e2e_support import (
    MiB,
    mounted,
    require_root_and_fuse,
    sh,
    world,  # noqa: F401  (the fixture)
)

require_root_and_fuse()
pytest.importorskip("pyfuse3", reason="pyfuse3 is an optional dependency (dmsim[fuse])")


def dmsim(w, *args):
    return w.dmsim(*args)


@pytest.mark.parametrize("loop_direct_io", ["off", "on"])
def test_ext4_on_loop_on_fuse_file(world, loop_direct_io):  # noqa: F811
    w = world
    assert shutil.which("mkfs.ext4") and shutil.which("losetup"), "e2fsprogs and util-linux are needed"
    with open(w["img"], "wb") as f:
        f.truncate(64 * MiB)
    out = dmsim(w, "daemon", "--mount", w["mnt"], "--background").stdout
    w["pid"] = int(out.split()[1].split("=")[1])
    # the device covers the image from 1 MiB on: the filesystem sits at an offset in it
    dmsim(w, "create", "e2e", "--table", "0 %d linear %s 2048" % (63 * 2048, w["img"]))
    dev = os.path.join(w["mnt"], "e2e")
    assert os.path.getsize(dev) == 63 * MiB
    w["loop"] = sh("losetup", "--direct-io=" + loop_direct_io, "--show", "-f", dev).stdout.strip()
    sh("mkfs.ext4", "-q", "-F", w["loop"])
    sh("mount", w["loop"], w["fs"])
    payload = os.urandom(3 * MiB + 123)
    with open(os.path.join(w["fs"], "data.bin"), "wb") as f:
        f.write(payload)
    with open(os.path.join(w["fs"], "hello.txt"), "w") as f:
        f.write("hello\n")
    sh("sync")
    sh("umount", w["fs"])
    sh("mount", w["loop"], w["fs"])
    with open(os.path.join(w["fs"], "data.bin"), "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(payload).digest()
    with open(os.path.join(w["fs"], "hello.txt")) as f:
        assert f.read() == "hello\n"
    assert dmsim(w, "info", "-c", "--noheadings", "-o", "open", "e2e").stdout.strip() == "1"  # the loop
    sh("umount", w["fs"])
    sh("losetup", "-d", w["loop"])
    w["loop"] = None
    for _ in range(50):  # loop detach lets go of the file asynchronously
        if dmsim(w, "info", "-c", "--noheadings", "-o", "open", "e2e").stdout.strip() == "0":
            break
        time.sleep(0.1)
    dmsim(w, "remove", "e2e")
    # the filesystem is on the image at the linear offset, and it is clean
    part = os.path.join(os.path.dirname(w["img"]), "part.img")
    sh("dd", "if=" + w["img"], "of=" + part, "bs=1M", "skip=1", "status=none")
    sh("fsck.ext4", "-fn", part)
    w.stop_daemon()
    assert not mounted(w["mnt"])


def test_table_naming_a_loop_over_our_own_file(world):  # noqa: F811
    """A table that names a loop device backed by one of our FUSE files must not send its
    I/O out through the loop and back into the same daemon (a deadlock): the manager
    maps that loop device to the dm device itself."""
    w = world
    with open(w["img"], "wb") as f:
        f.write(os.urandom(4 * MiB))
    out = dmsim(w, "daemon", "--mount", w["mnt"], "--background").stdout
    w["pid"] = int(out.split()[1].split("=")[1])
    dmsim(w, "create", "base", "--table", "0 8192 linear %s 0" % w["img"])
    w["loop"] = sh("losetup", "-f", "--show", os.path.join(w["mnt"], "base")).stdout.strip()
    dmsim(w, "create", "top", "--table", "0 4096 linear %s 2048" % w["loop"])
    assert dmsim(w, "table", "top").stdout == "0 4096 linear 253:0 2048\n"
    assert dmsim(w, "deps", "-o", "devname", "top").stdout == "1 dependencies\t: (base)\n"
    data = os.urandom(4096)
    fd = os.open(os.path.join(w["mnt"], "top"), os.O_RDWR)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(w["img"], "rb") as f:
        f.seek(2048 * 512)
        assert f.read(4096) == data
    dmsim(w, "remove", "top")
    sh("losetup", "-d", w["loop"])
    w["loop"] = None
    dmsim(w, "remove", "base")
