"""scripts/soak-crash: its per-sector check (what a crash may and may not leave), and a tiny
run of the whole soak so that CI keeps it working; the real soak is run by hand."""
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "soak-crash")


def load_soak():
    loader = importlib.machinery.SourceFileLoader("soak_crash", SCRIPT)
    spec = importlib.util.spec_from_loader("soak_crash", loader)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["soak_crash"] = mod          # dataclasses look their module up
    loader.exec_module(mod)
    return mod


soak = load_soak()
N = soak.DEVICE_SECTORS


class Run:
    seed, chain, cycle = 7, 3, 1


def initial():
    return soak.pattern(soak.MAGIC_INIT, Run.seed, Run.chain, 0, 0, soak.IMAGE_DEV, 0, 0, N)


def data(w, sector=None, count=None):
    sector = w.sector if sector is None else sector
    count = w.count if count is None else count
    return soak.pattern(soak.MAGIC_WRITE, Run.seed, Run.chain, Run.cycle, w.writer, w.dev, w.seq, sector, count)


def put(buf, sector, blob):
    buf[sector * 512:sector * 512 + len(blob)] = blob


def test_acknowledged_write_must_read_back_and_misplaced_block_is_named():
    base = initial()
    w = soak.Write(writer=0, seq=5, dev=1, sector=10, count=3, issue_ns=100, end_ns=200, acked=True)
    got = bytearray(base)
    assert len(soak.check_view("snapshot", 1, bytes(got), base, [w], Run)) == 3      # lost
    put(got, 10, data(w))
    assert soak.check_view("snapshot", 1, bytes(got), base, [w], Run) == []
    assert soak.check_view("origin", 0, bytes(got), base, [w], Run) != []           # other device
    put(got, 12, data(w, 11, 1))                                                    # one sector off
    (msg,) = soak.check_view("snapshot", 1, bytes(got), base, [w], Run)
    assert "sector 12: holds chain 3 trial 1 writer 0 write #5 to snapshot sector 11" in msg


def test_a_write_in_flight_may_leave_old_or_new_per_sector():
    base = initial()
    w = soak.Write(writer=1, seq=0, dev=0, sector=100, count=4, issue_ns=100, errno=5, end_ns=300)
    got = bytearray(base)
    put(got, 101, data(w, 101, 1))
    put(got, 103, data(w, 103, 1))
    assert soak.check_view("origin", 0, bytes(got), base, [w], Run) == []
    put(got, 102, bytes(512))
    assert "holds zeros" in soak.check_view("origin", 0, bytes(got), base, [w], Run)[0]


def test_last_acknowledged_write_wins_unless_the_writes_overlapped_in_time():
    base = initial()
    first = soak.Write(writer=0, seq=1, dev=0, sector=0, count=8, issue_ns=100, end_ns=200, acked=True)
    later = soak.Write(writer=1, seq=2, dev=0, sector=4, count=8, issue_ns=300, end_ns=400, acked=True)
    got = bytearray(base)
    put(got, 0, data(first))
    assert soak.check_view("origin", 0, bytes(got), base, [first, later], Run) != []   # later lost
    put(got, 4, data(later))
    assert soak.check_view("origin", 0, bytes(got), base, [first, later], Run) == []
    # concurrent (later issued before first was acknowledged): either order may land
    concurrent = soak.Write(writer=1, seq=2, dev=0, sector=4, count=8, issue_ns=150, end_ns=400, acked=True)
    got = bytearray(base)
    put(got, 4, data(concurrent))
    put(got, 0, data(first))
    assert soak.check_view("origin", 0, bytes(got), base, [first, concurrent], Run) == []


def test_writer_log_parsing(tmp_path):
    """Acknowledged, failed, in flight; a line cut short is not there."""
    log = tmp_path / "w.log"
    log.write_bytes(b"R\nI 0 1 8 2 10\nA 0 20\nI 1 0 16 4 30\nE 1 5 40\nI 2 0 64 1 50\nA 2 6")
    writes, ready = soak.parse_log(str(log), 1)
    assert ready
    w0, w1, w2 = writes
    assert (w0.writer, w0.dev, w0.sector, w0.count, w0.acked, w0.end_ns) == (1, 1, 8, 2, True, 20)
    assert (w1.acked, w1.errno, w1.end_ns) == (False, 5, 40)
    assert not w2.acked and w2.end_ns == float("inf")


def fuse_usable():
    return os.geteuid() == 0 and os.path.exists("/dev/fuse") and shutil.which("fusermount3")


@pytest.mark.skipif(not fuse_usable(), reason="needs root, /dev/fuse and fusermount3")
def test_tiny_soak_passes_and_cleans_up(tmp_path):
    """Two chains of two trials per kind and durability, both signals: it finishes, finds
    nothing, and leaves no mount, process or file behind."""
    r = subprocess.run([sys.executable, SCRIPT, "--trials", "2", "--cycles", "2", "--kind", "both",
                        "--durability", "both", "--signal", "mixed", "--jobs", "2", "--seed", "1",
                        "--tmpdir", str(tmp_path)], capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "total: 8 trials, 0 failures" in r.stdout, r.stdout
    assert os.listdir(tmp_path) == []
    with open("/proc/self/mounts") as f:
        assert str(tmp_path) not in f.read()


@pytest.mark.skipif(not fuse_usable(), reason="needs root, /dev/fuse and fusermount3")
def test_one_trial_through_cli_processes(tmp_path):
    """``--cli``: the same trial with every dmsetup command a ``dmsim`` process."""
    r = subprocess.run([sys.executable, SCRIPT, "--trials", "1", "--kind", "snapshot", "--durability", "process",
                        "--signal", "kill", "--seed", "2", "--cli", "--tmpdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "snapshot kill process: 1 trials, 0 failures" in r.stdout, r.stdout
    assert os.listdir(tmp_path) == []


# -- thin ---------------------------------------------------------------------------------

def thin_initial(sectors=64):
    return soak.pattern(soak.MAGIC_INIT, Run.seed, Run.chain, 0, 0, soak.IMAGE_DEV, 0, 0, sectors)


def test_a_thin_discard_sets_only_the_whole_blocks_it_covers():
    """The pool unmaps whole blocks; a partly covered block keeps its data."""
    d = soak.Write(writer=0, seq=0, dev=0, sector=10, count=300, issue_ns=1, op="d")
    assert soak.op_sectors(d, 128) == range(128, 256)
    assert soak.op_sectors(soak.Write(0, 0, 0, 10, 100, 1, op="D"), 128) == range(128, 128)
    assert soak.op_sectors(soak.Write(0, 0, 0, 0, 0, 1, op="f"), 128) == range(0)
    assert soak.op_sectors(soak.Write(0, 0, 0, 5, 3, 1), 128) == range(5, 8)


def test_thin_after_a_kill_the_last_durable_write_or_a_later_one():
    """An acknowledged but unflushed write may be lost (the pool commits at flushes); a
    flushed one may not; a discard reads back as zeros."""
    base = thin_initial()
    flushed = soak.Write(writer=0, seq=1, dev=0, sector=0, count=8, issue_ns=100, end_ns=200, acked=True)
    unflushed = soak.Write(writer=0, seq=2, dev=0, sector=4, count=8, issue_ns=300, end_ns=400, acked=True)
    ops = [flushed, unflushed]

    def durable(w):
        return w is flushed

    got = bytearray(base)
    lost = soak.check_thin_view("thin", 0, bytes(got), base, ops, Run, 128, durable)
    assert lost[-1] == "8 wrong sectors in the thin in all"      # 0-7: the flushed write is lost
    put(got, 0, data(flushed))
    assert soak.check_thin_view("thin", 0, bytes(got), base, ops, Run, 128, durable) == []      # old 4-11
    put(got, 4, data(unflushed))
    assert soak.check_thin_view("thin", 0, bytes(got), base, ops, Run, 128, durable) == []      # new
    put(got, 8, bytes(512))
    assert "holds zeros" in soak.check_thin_view("thin", 0, bytes(got), base, ops, Run, 128, durable)[0]
    discard = soak.Write(writer=0, seq=3, dev=0, sector=0, count=64, issue_ns=500, end_ns=600, acked=True, op="d")
    ops.append(discard)
    assert soak.check_thin_view("thin", 0, bytes(got), base, ops, Run, 64, durable) == []       # in flight
    assert soak.check_thin_view("thin", 0, bytes(64 * 512), base, ops, Run, 64, lambda w: True) == []
    assert soak.check_thin_view("thin", 0, bytes(got), base, ops, Run, 64, lambda w: True) != []


def test_thin_snapshot_holds_its_origin_as_of_its_creation():
    """Writes acknowledged before the snapshot began are in it, writes issued after it took
    hold are not, writes in between may be."""
    base = thin_initial()
    before = soak.Write(writer=1, seq=1, dev=1, sector=0, count=2, issue_ns=100, end_ns=200, acked=True)
    during = soak.Write(writer=1, seq=2, dev=1, sector=8, count=2, issue_ns=250, end_ns=400, acked=True)
    after = soak.Write(writer=1, seq=3, dev=1, sector=16, count=2, issue_ns=600, end_ns=700, acked=True)
    ops = [before, during, after]

    def cut(w):
        return w.acked and w.end_ns < 300

    got = bytearray(base)
    put(got, 0, data(before))
    assert soak.check_thin_view("ro2", 1, bytes(got), base, ops, Run, 128, cut, before_ns=500) == []
    put(got, 8, data(during))
    assert soak.check_thin_view("ro2", 1, bytes(got), base, ops, Run, 128, cut, before_ns=500) == []
    put(got, 16, data(after))
    (msg, _more) = soak.check_thin_view("ro2", 1, bytes(got), base, ops, Run, 128, cut, before_ns=500)[:2]
    assert "ro2 sector 16: holds chain 3 trial 1 writer 1 write #3 to snapshot sector 16" in msg
    assert soak.check_thin_view("ro2", 1, bytes(base), base, ops, Run, 128, cut, before_ns=500) != []


@pytest.mark.skipif(not fuse_usable() or not shutil.which("thin_check"),
                    reason="needs root, /dev/fuse, fusermount3 and thin-provisioning-tools")
def test_tiny_thin_soak_passes_and_cleans_up(tmp_path):
    """Three thin trials (a chain: pool, thin, snapshots, a SIGKILL and two SIGTERMs,
    thin_check after each): they finish, find nothing, and leave no mount or file behind."""
    r = subprocess.run([sys.executable, SCRIPT, "--trials", "3", "--cycles", "3", "--kind", "thin",
                        "--durability", "fsync", "--signal", "mixed", "--jobs", "1", "--seed", "4",
                        "--tmpdir", str(tmp_path)], capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "total: 3 trials, 0 failures" in r.stdout, r.stdout
    assert os.listdir(tmp_path) == []
    with open("/proc/self/mounts") as f:
        assert str(tmp_path) not in f.read()
