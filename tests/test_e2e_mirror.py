"""End to end, the mirrored-device story: ext4 on a mirror of two image files; a leg fails
while files are being written and the filesystem sees no error; the failed leg is
replaced by a fresh image, resynced, and both legs end up equal.

Needs root (losetup, mount) and /dev/fuse; CI runs as root.  The fixture undoes
everything whatever failed: umount, losetup -d, the daemon (by pid), the FUSE mount.
"""
import filecmp
import hashlib
import os
import threading
import time

from e2e_support import TIMEOUT_SECONDS, MiB, require_root_and_fuse, sh, world  # noqa: F401

require_root_and_fuse()

SIZE_MIB = 64
SECTORS = SIZE_MIB * 2048


def test_lose_a_leg_keep_working_repair(world):  # noqa: F811
    w = world
    dmsim = w.dmsim
    img = {n: os.path.join(w["dir"], n + ".img") for n in ("a", "b", "c")}
    for path in img.values():
        with open(path, "wb") as f:
            f.truncate(SIZE_MIB * MiB)
    w.start_daemon()

    # leg B sits under a linear device, so that it can be failed by a table swap
    dmsim("create", "legb", "--table", "0 %d linear %s 0" % (SECTORS, img["b"]))
    dmsim("create", "m", "--table", "0 %d mirror core 1 1024 2 %s 0 %s/legb 0"
          % (SECTORS, img["a"], w["mnt"]))
    dmsim("progress", "m", "--interval", "0.1")
    assert dmsim("status", "m").stdout.split()[6] == "128/128"

    w["loop"] = sh("losetup", "--direct-io=on", "--show", "-f", os.path.join(w["mnt"], "m")).stdout.strip()
    sh("mkfs.ext4", "-q", "-F", w["loop"])
    sh("mount", w["loop"], w["fs"])

    # a writer keeps creating files while leg B fails underneath
    written, errors, stop = {}, [], threading.Event()

    def writer():
        k = 0
        while k < 100 and (not stop.is_set() or k < 40):  # at most 25 MiB of 64
            data = os.urandom(256 * 1024 + k)
            try:
                with open(os.path.join(w["fs"], "f%03d" % k), "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                errors.append(e)
                return
            written[k] = hashlib.sha256(data).hexdigest()
            k += 1
            time.sleep(0.01)

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(0.5)
        dmsim("suspend", "legb")
        dmsim("load", "legb", "--table", "0 %d error" % SECTORS)
        dmsim("resume", "legb")
        time.sleep(0.5)
    finally:
        stop.set()
        t.join(TIMEOUT_SECONDS)
    assert not errors, "the filesystem saw an error: %r" % errors
    assert len(written) >= 40
    status = dmsim("status", "m").stdout.split()
    assert status[8] == "AD", status          # leg B dead (write failure), leg A alive

    # repair: swap in a fresh image for the failed leg; the core log resyncs everything
    dmsim("suspend", "m")
    dmsim("load", "m", "--table", "0 %d mirror core 1 1024 2 %s 0 %s 0" % (SECTORS, img["a"], img["c"]))
    dmsim("resume", "m")
    dmsim("progress", "m", "--interval", "0.1")
    status = dmsim("status", "m").stdout.split()
    assert status[6] == "128/128" and status[8] == "AA", status

    # the files are intact, through the repaired mirror
    sh("umount", w["fs"])
    sh("mount", w["loop"], w["fs"])
    for k, digest in written.items():
        with open(os.path.join(w["fs"], "f%03d" % k), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest
    sh("umount", w["fs"])
    sh("losetup", "-d", w["loop"])
    w["loop"] = None
    # nothing writes any more: both legs are equal, byte for byte, and hold a clean ext4
    assert filecmp.cmp(img["a"], img["c"], shallow=False)
    sh("fsck.ext4", "-fn", img["c"])
    w.wait_closed("m")
    dmsim("remove", "m")
    dmsim("remove", "legb")
