"""Table device paths: resolved without entering our own mount, over a real FUSE mount too.

The unit tests run :func:`dmsim.resolve.resolve` over a plain directory standing for the
mount, with ``os.lstat``/``os.stat``/``os.readlink`` watched: nothing below the mount
directory (nor the directory itself) may be looked at.  The FUSE tests mount the daemon's
file system in-process and load tables naming devices through the mount, a symlink into
it, a udev-style link, a relative path from the caller's cwd, a bind mount of it and the
mount at /dev/mapper: each must resolve to the dm device in-process, within a timeout.
"""
import errno
import os
import subprocess
import sys

import pytest
import trio

import dmsim
from dmsim import resolve as rs
from dmsim.errors import DMError
from dmsim.table import TableLine


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """``mnt`` (the mount), ``a.img``, ``sub/`` and a watch on every lookup under mnt."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (tmp_path / "a.img").write_bytes(bytes(4096))
    (tmp_path / "sub").mkdir()
    touched = []
    for fn in ("lstat", "stat", "readlink"):
        real = getattr(os, fn)

        def watched(path, *a, _real=real, **kw):
            p = os.fspath(path)
            if p == str(mnt) or p.startswith(str(mnt) + "/"):
                touched.append(p)
            return _real(path, *a, **kw)

        monkeypatch.setattr(rs.os, fn, watched)
    yield tmp_path, mnt, touched
    assert touched == [], "looked inside the mount"


def res(name, cwd, mnt, root_id=None):
    return rs.resolve(name, str(cwd), rs.Mount.of(str(mnt), root_id))


def err(name, cwd, mnt):
    with pytest.raises(DMError) as ei:
        res(name, cwd, mnt)
    return ei.value.errno


def test_paths_into_the_mount_are_dm_devices(tree):
    tmp, mnt, _ = tree
    assert res(str(mnt / "z"), "/", mnt) == rs.Resolved("dm-name", name="z")
    assert res("mnt/z", tmp, mnt) == rs.Resolved("dm-name", name="z")           # relative to the cwd
    assert res("z", mnt, mnt) == rs.Resolved("dm-name", name="z")               # a cwd inside the mount
    assert res(str(mnt) + "/./z", "/", mnt).name == "z"
    assert res(str(tmp / "sub" / ".." / "mnt" / "z"), "/", mnt).name == "z"


def test_below_a_device_file_and_the_mount_itself(tree):
    tmp, mnt, _ = tree
    assert err(str(mnt / "z" / "x"), "/", mnt) == errno.ENODEV                 # ENOTDIR for the kernel
    assert err(str(mnt / "z") + "/..", "/", mnt) == errno.ENODEV
    assert err(str(mnt), "/", mnt) == errno.ENOTBLK
    assert err(str(mnt) + "/", "/", mnt) == errno.ENOTBLK


def test_symlinks_into_the_mount(tree):
    tmp, mnt, _ = tree
    os.symlink(str(mnt / "z"), tmp / "zl")                          # ln -s MNT/z zl
    assert res("zl", tmp, mnt).name == "z"
    byid = tmp / "dev" / "disk" / "by-id"
    byid.mkdir(parents=True)
    os.symlink("../../../mnt/z", byid / "dm-name-z")                # udev's relative links
    assert res(str(byid / "dm-name-z"), "/", mnt).name == "z"
    os.symlink(str(tmp / "mnt"), tmp / "ml")                        # a link to the mount directory
    assert res("ml/z", tmp, mnt).name == "z"
    os.symlink("zl", tmp / "zll")
    assert res("zll", tmp, mnt).name == "z"


def test_other_paths(tree):
    tmp, mnt, _ = tree
    assert res("a.img", tmp, mnt) == rs.Resolved("file", path=str(tmp / "a.img"))
    os.symlink("a.img", tmp / "al")
    assert res("al", tmp, mnt).path == str(tmp / "a.img")
    assert err("nosuch", tmp, mnt) == errno.ENODEV
    assert err("a.img/x", tmp, mnt) == errno.ENODEV
    assert err("sub", tmp, mnt) == errno.ENOTBLK
    os.symlink("loop1", tmp / "loop2")
    os.symlink("loop2", tmp / "loop1")
    assert err("loop1", tmp, mnt) == errno.ENODEV                   # ELOOP
    assert res("253:7", tmp, mnt) == rs.Resolved("dm-minor", minor=7)
    assert err("x:1", tmp, mnt) == errno.ENODEV
    # a NUL byte (the API takes any str): no such device, not a ValueError from lstat
    assert err("a.img\0x", tmp, mnt) == errno.ENODEV
    assert err("\0", tmp, mnt) == errno.ENODEV


def test_the_mount_reached_by_its_identity(tree):
    """A bind mount (another directory with the mount root's st_dev/st_ino) is the mount."""
    tmp, mnt, _ = tree
    other = tmp / "sub"
    st = os.stat(other)
    assert res(str(other / "z"), "/", mnt, (st.st_dev, st.st_ino)).name == "z"


def test_dev_mapper_without_and_with_a_mount(tree):
    tmp, mnt, _ = tree
    assert rs.resolve("/dev/mapper/x", "/", None) == rs.Resolved("mapper", name="x")
    assert res("/dev/mapper/dmsim-no-such-node", "/", mnt) == rs.Resolved("mapper", name="dmsim-no-such-node")
    at_mapper = rs.Mount("/dev/mapper", "/dev/mapper")
    assert rs.resolve("/dev/mapper/x", "/", at_mapper) == rs.Resolved("dm-name", name="x")
    assert rs.resolve("/dev/dm-3", "/", None) == rs.Resolved("dm-minor", minor=3)


def test_dev_mapper_on_a_machine_without_it(tree, monkeypatch):
    """No /dev/mapper directory at all (no dm module loaded, a fresh VM): /dev/mapper/NAME
    is still our device NAME with the daemon's mount, as without one."""
    tmp, mnt, _ = tree
    real = rs.os.lstat

    def lstat(path, *a, **kw):
        if os.fspath(path).startswith("/dev/mapper"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return real(path, *a, **kw)

    monkeypatch.setattr(rs.os, "lstat", lstat)
    assert res("/dev/mapper/pool", "/", mnt) == rs.Resolved("mapper", name="pool")
    assert rs.resolve("/dev/mapper/pool", "/", None) == rs.Resolved("mapper", name="pool")
    assert err("/dev/mapper/pool/x", "/", mnt) == errno.ENODEV


async def test_resolve_all_in_a_thread_and_inline(tree):
    tmp, mnt, _ = tree
    for in_thread in (True, False):
        out, _ = await rs.resolve_all(["mnt/z", "a.img", "nosuch"], str(tmp), str(mnt), (0, 0), in_thread)
        assert out["mnt/z"].name == "z" and out["a.img"].kind == "file"
        assert isinstance(out["nosuch"], DMError) and out["nosuch"].errno == errno.ENODEV


async def test_relative_table_paths_use_the_callers_cwd(tmp_path):
    (tmp_path / "a.img").write_bytes(b"\x07" * 4096)
    async with dmsim.open_manager() as m:
        m.create("r")
        await m.load("r", [TableLine(0, 8, "linear", "a.img 0")], cwd=str(tmp_path))
        await m.resume("r")
        assert m.table_lines("r")[0].params == "240:0 0"
        assert m.image_path("240:0") == str(tmp_path / "a.img")
        m.create("q")
        with pytest.raises(DMError) as ei:
            await m.load("q", [TableLine(0, 8, "linear", "a.img 0")], cwd="/")
        assert ei.value.errno == errno.ENODEV


# -- over a real FUSE mount -------------------------------------------------------------------------
pyfuse3 = pytest.importorskip("pyfuse3", reason="pyfuse3 is an optional dependency (dmsim[fuse])")
needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")


@pytest.fixture
async def mounted(tmp_path):
    from dmsim.fuse import Mount

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    img = tmp_path / "a.img"
    img.write_bytes(os.urandom(1 << 20))
    async with dmsim.open_manager(mount_dir=str(mnt)) as m:
        fs = Mount(m, str(mnt))
        fs.mount()
        try:
            async with trio.open_nursery() as n:
                n.start_soon(fs.run)
                m.create("base")
                await m.load("base", [TableLine(0, 2048, "linear", "%s 0" % img)])
                await m.resume("base")
                yield m, tmp_path, mnt, img
                n.cancel_scope.cancel()
        finally:
            fs.unmount()


async def _load(m, name, dev, cwd):
    """Load and resume ``name`` over ``dev`` (8 sectors at 8): must not hang."""
    with trio.fail_after(10):
        if name not in m.devices:
            m.create(name)
        await m.load(name, [TableLine(0, 8, "linear", "%s 8" % dev)], cwd=str(cwd))
        await m.resume(name)
        return m.find(name)


@needs_fuse
@pytest.mark.timeout(60)
async def test_fuse_paths_resolve_in_process(mounted):
    m, tmp, mnt, img = mounted
    want = img.read_bytes()[4096:8192]
    os.symlink(str(mnt / "base"), tmp / "zl")
    byid = tmp / "by-id"
    byid.mkdir()
    os.symlink("../mnt/base", byid / "dm-name-base")
    for k, (dev, cwd) in enumerate([(mnt / "base", "/"), ("zl", tmp), (byid / "dm-name-base", "/"),
                                    ("mnt/base", tmp), ("base", mnt)]):
        top = await _load(m, "t%d" % k, dev, cwd)
        assert m.deps("t%d" % k) == [m.find("base")], dev
        assert await top.read(0, 8) == want
    assert m.info("base").open_count == 5
    for bad in (mnt / "base" / "x", mnt / "nosuch", mnt):
        with pytest.raises(DMError) as ei:
            await _load(m, "bad", bad, "/")
        assert ei.value.errno in (errno.ENODEV, errno.ENOTBLK), bad
    # the files are there and served meanwhile
    assert sorted(await trio.to_thread.run_sync(os.listdir, str(mnt)))[:2] == ["bad", "base"]


@needs_fuse
@pytest.mark.timeout(60)
async def test_fuse_bind_mount_is_recognised(mounted):
    m, tmp, mnt, img = mounted
    if os.geteuid() != 0:
        pytest.skip("bind mounts need root")
    bind = tmp / "bind"
    bind.mkdir()
    r = await trio.to_thread.run_sync(lambda: subprocess.run(["mount", "--bind", str(mnt), str(bind)],
                                                             capture_output=True, timeout=10))
    if r.returncode:
        pytest.skip("mount --bind failed: %s" % r.stderr.decode().strip())
    try:
        top = await _load(m, "tb", bind / "base", "/")
        assert m.deps("tb") == [m.find("base")]
        assert await top.read(0, 1) == img.read_bytes()[4096:4608]
    finally:
        await trio.to_thread.run_sync(lambda: subprocess.run(["umount", "-l", str(bind)], capture_output=True,
                                                             timeout=10))


def _dev_mapper_free():
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.isdir("/dev/mapper"):
        return "no /dev/mapper"
    with open("/proc/self/mountinfo") as f:
        if any(line.split()[4] == "/dev/mapper" for line in f):
            return "/dev/mapper is a mount point already"
    if set(os.listdir("/dev/mapper")) - {"control"}:
        return "/dev/mapper holds kernel dm devices"
    return None


@needs_fuse
@pytest.mark.timeout(60)
@pytest.mark.skipif(_dev_mapper_free() is not None, reason=str(_dev_mapper_free()))
async def test_fuse_mounted_at_dev_mapper(tmp_path):
    """The dmsetup-compatible setup: tables name /dev/mapper/NAME, which is our mount."""
    from dmsim.fuse import Mount

    img = tmp_path / "a.img"
    img.write_bytes(os.urandom(1 << 20))
    async with dmsim.open_manager(mount_dir="/dev/mapper") as m:
        fs = Mount(m, "/dev/mapper")
        fs.mount()
        try:
            async with trio.open_nursery() as n:
                n.start_soon(fs.run)
                m.create("dmsim-base")
                await m.load("dmsim-base", [TableLine(0, 2048, "linear", "%s 0" % img)])
                await m.resume("dmsim-base")
                top = await _load(m, "dmsim-top", "/dev/mapper/dmsim-base", "/")
                assert m.table_lines("dmsim-top")[0].params == "253:0 8"
                assert await top.read(0, 1) == img.read_bytes()[4096:4608]

                def read():
                    with open("/dev/mapper/dmsim-top", "rb") as f:
                        return f.read(512)

                assert await trio.to_thread.run_sync(read) == img.read_bytes()[4096:4608]
                n.cancel_scope.cancel()
        finally:
            fs.unmount()


@needs_fuse
@pytest.mark.timeout(120)
def test_daemon_cli_paths(tmp_path):
    """Through the daemon: a relative table path is the CLI's (its cwd is sent with the
    load, the daemon's own cwd is elsewhere), and a symlink to a device file resolves to
    the dm device instead of hanging the daemon on its own mount."""
    from test_daemon import Daemon

    d = Daemon(tmp_path)
    try:
        d.start()
        work = tmp_path / "work"
        work.mkdir()
        (work / "a.img").write_bytes(os.urandom(1 << 20))

        def run(*args):
            return subprocess.run([sys.executable, "-m", "dmsim.cli", *args], env=d.env, cwd=str(work),
                                  capture_output=True, text=True, timeout=20)

        r = run("create", "base", "--table", "0 2048 linear a.img 0")
        assert r.returncode == 0, r.stderr
        assert run("table", "base").stdout == "0 2048 linear 240:0 0\n"
        assert run("deps", "-o", "devname", "base").stdout == "1 dependencies\t: (%s)\n" % (work / "a.img")
        os.symlink(os.path.join(d.mnt, "base"), work / "zl")
        r = run("create", "top", "--table", "0 8 linear zl 8")
        assert r.returncode == 0, r.stderr
        assert run("table", "top").stdout == "0 8 linear 253:0 8\n"
        r = run("create", "bad", "--table", "0 8 linear %s/base/x 0" % d.mnt)
        assert r.returncode == 1 and "No such device" in r.stderr
        assert run("ls").returncode == 0                     # still answering
    finally:
        d.cleanup()


def test_dm_nodes_reached_through_symlinks(tree):
    """udev's by-id links point at ../../dm-N; a link may lead to /dev/mapper/NAME."""
    tmp, mnt, _ = tree
    os.symlink("/dev/dm-5", tmp / "byid")
    os.symlink("/dev/mapper/dmsim-no-such-node", tmp / "ml2")
    assert res("byid", tmp, mnt) == rs.Resolved("dm-minor", minor=5)
    assert res("ml2", tmp, mnt) == rs.Resolved("mapper", name="dmsim-no-such-node")
    assert rs.resolve(str(tmp / "ml2"), "/", None) == rs.Resolved("mapper", name="dmsim-no-such-node")


async def test_a_hung_lookup_times_out(tree, monkeypatch):
    """A lookup that never returns (a hung NFS path) gives ENODEV after the timeout, in
    wall-clock time, and the loop keeps running meanwhile."""
    import time

    tmp, mnt, _ = tree
    real = rs.resolve

    def slow(name, cwd, mount):
        if name == "hung":
            time.sleep(1.0)
        return real(name, cwd, mount)

    monkeypatch.setattr(rs, "resolve", slow)
    monkeypatch.setattr(rs, "RESOLVE_TIMEOUT_SECONDS", 0.2)
    ticks = []

    async def ticker():
        while True:
            ticks.append(1)
            await trio.sleep(0.02)

    async with trio.open_nursery() as n:
        n.start_soon(ticker)
        t0 = time.monotonic()
        out, _ = await rs.resolve_all(["a.img", "hung"], str(tmp), str(mnt), (0, 0))
        assert time.monotonic() - t0 < 0.9
        n.cancel_scope.cancel()
    assert out["a.img"].kind == "file"
    assert isinstance(out["hung"], DMError) and out["hung"].errno == errno.ENODEV
    assert len(ticks) >= 3


@needs_fuse
@pytest.mark.timeout(60)
async def test_fuse_loop_device_over_a_file_is_the_dm_device(mounted):
    """A loop device whose backing file is one of our files is that dm device (I/O through
    the loop would come back to this same daemon); one with an offset is refused (EBUSY)."""
    import shutil

    m, tmp, mnt, img = mounted
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup")

    def sh(*cmd):
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20)

    loops = []
    try:
        for extra in ([], ["-o", "4096"]):
            r = await trio.to_thread.run_sync(sh, "losetup", "--show", "-f", *extra, str(mnt / "base"))
            if r.returncode:
                pytest.skip("losetup failed: %s" % r.stderr.strip())
            loops.append(r.stdout.strip())
        top = await _load(m, "tl", loops[0], "/")
        assert m.deps("tl") == [m.find("base")]
        assert await top.read(0, 1) == img.read_bytes()[4096:4608]
        with pytest.raises(DMError) as ei:
            await _load(m, "to", loops[1], "/")
        assert ei.value.errno == errno.EBUSY
    finally:
        for loop in loops:
            await trio.to_thread.run_sync(sh, "losetup", "-d", loop)
