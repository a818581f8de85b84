"""The ``dmsim`` command's own verbs and daemon options (dmsetup's verbs: test_dmsetup.py)."""
import os
import subprocess
import sys

import pytest

import dmsim
from dmsim import cli, dmsetup
from dmsim.control import LocalControl


async def sh(ctl, *argv):
    out, err, rc = await dmsetup.run(ctl, list(argv))
    assert (err, rc) == ("", 0), argv
    return out


async def test_image_lines_list_every_image_in_use_by_number(tmp_path):
    """``dmsim images``: number, file and devices per image a live or inactive table holds,
    by number; a dm device below is not an image, and a file no table holds is not listed."""
    paths = []
    for name in ("a.img", "b.img", "c.img"):
        p = tmp_path / name
        p.write_bytes(bytes(1 << 20))
        paths.append(str(p))
    a, b, c = paths
    async with dmsim.open_manager() as m:
        ctl = LocalControl(m)
        assert await cli.image_lines(ctl) == []
        await sh(ctl, "create", "one", "--table", "0 8 linear %s 0\n8 8 linear %s 0" % (b, a))
        await sh(ctl, "create", "two", "--table", "0 8 linear %s 0" % a)
        await sh(ctl, "create", "top", "--table", "0 8 linear /dev/mapper/two 0")
        await sh(ctl, "load", "top", "--table", "0 8 linear %s 0" % c)
        assert await cli.image_lines(ctl) == [
            "240:0\t%s\tone" % b, "240:1\t%s\tone,two" % a, "240:2\t%s\ttop" % c]
        await m.remove("one")
        await sh(ctl, "clear", "top")
        assert await cli.image_lines(ctl) == ["240:1\t%s\ttwo" % a]
        assert m.image_path("240:0") == b              # still its number: tables may name it


async def test_image_lines_empty_with_image_paths(tmp_path):
    img = tmp_path / "a.img"
    img.write_bytes(bytes(4096))
    async with dmsim.open_manager(image_numbers=False) as m:
        ctl = LocalControl(m)
        await sh(ctl, "create", "one", "--table", "0 8 linear %s 0" % img)
        assert await cli.image_lines(ctl) == []


def _dmsim(*args, env, cwd=None, timeout=30):
    return subprocess.run([sys.executable, "-m", "dmsim.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_daemon_refuses_a_bad_image_numbers_value(tmp_path):
    """A mistyped DMSIM_IMAGE_NUMBERS stops the daemon before it starts, saying why."""
    env = dict(os.environ, DMSIM_IMAGE_NUMBERS="yes", DMSIM_SOCKET=str(tmp_path / "s" / "control"))
    r = _dmsim("daemon", "--mount", str(tmp_path / "mnt"), "--background", env=env)
    assert r.returncode == 2
    assert "DMSIM_IMAGE_NUMBERS='yes': use 1" in r.stderr
    assert not (tmp_path / "mnt").exists()


needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")


@needs_fuse
@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["default", "--image-paths", "DMSIM_IMAGE_NUMBERS=0"])
def test_daemon_image_numbers_and_opt_outs(tmp_path, how):
    """Through a daemon: tables print 240:N by default and ``dmsim images`` names the file;
    ``--image-paths`` or DMSIM_IMAGE_NUMBERS=0 print the path (and list no numbers)."""
    pytest.importorskip("pyfuse3")
    from test_daemon import Daemon

    d = Daemon(tmp_path)
    img = tmp_path / "a.img"
    img.write_bytes(bytes(1 << 20))
    args = ["daemon", "--mount", d.mnt, "--background"]
    if how == "--image-paths":
        args.append(how)
    elif how != "default":
        d.env["DMSIM_IMAGE_NUMBERS"] = "0"
    try:
        r = _dmsim(*args, env=d.env)
        assert r.returncode == 0, r.stderr
        d.pid = int(r.stdout.split()[1].split("=")[1])
        assert _dmsim("create", "lz", "--table", "0 2048 linear %s 0" % img, env=d.env).returncode == 0
        table = _dmsim("table", "lz", env=d.env).stdout
        images = _dmsim("images", env=d.env).stdout
        if how == "default":
            assert table == "0 2048 linear 240:0 0\n"
            assert images == "240:0\t%s\tlz\n" % img
        else:
            assert table == "0 2048 linear %s 0\n" % img
            assert images == ""
        assert _dmsim("images", "extra", env=d.env).returncode == 2
    finally:
        d.cleanup()
