"""Thin-pool metadata: the kernel's format, checked by Debian's thin-provisioning-tools.

Metadata dmsim writes must pass ``thin_check`` and ``thin_dump`` must show exactly the
mappings made; metadata ``thin_restore`` builds from an XML written here must open with the
same mappings; a state machine runs pool operations against a dict, commits, aborts and
reopens, and ends every example with ``thin_check``.  The tools are skipped when absent.
"""
import errno
import os
import random
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dmsim.errors import DMError
from dmsim.persistent_data import MetadataError, NoData, NoSpace
from dmsim.thin_metadata import PoolMetadata, check_metadata, format_metadata

HAVE_TOOLS = all(shutil.which(t) for t in ("thin_check", "thin_dump", "thin_restore"))
needs_tools = pytest.mark.skipif(not HAVE_TOOLS, reason="thin-provisioning-tools not installed")
TOOL_TIMEOUT = 60


def make_meta(tmp_path, mib=8, name="meta.img"):
    p = tmp_path / name
    with open(p, "wb") as f:
        f.truncate(mib << 20)
    return str(p)


def run_tool(*args):
    return subprocess.run(args, capture_output=True, text=True, timeout=TOOL_TIMEOUT)


def thin_check(path):
    r = run_tool("thin_check", path)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def thin_dump(path, *opts):
    r = run_tool("thin_dump", *opts, path)
    assert r.returncode == 0, r.stderr
    return ET.fromstring(r.stdout)


def dumped_mappings(sb: ET.Element) -> dict[int, dict[int, tuple[int, int]]]:
    """{dev: {vblock: (data block, time)}} from thin_dump's XML (single and range mappings)."""
    out: dict[int, dict[int, tuple[int, int]]] = {}
    for dev in sb.iter("device"):
        m = out[int(dev.get("dev_id", "-1"))] = {}
        for e in dev:
            if e.tag == "single_mapping":
                m[int(e.get("origin_block", ""))] = (int(e.get("data_block", "")), int(e.get("time", "")))
            elif e.tag == "range_mapping":
                ob, db, n = (int(e.get(a, "")) for a in ("origin_begin", "data_begin", "length"))
                for i in range(n):
                    m[ob + i] = (db + i, int(e.get("time", "")))
    return out


def our_mappings(md: PoolMetadata) -> dict[int, dict[int, tuple[int, int]]]:
    return {dev: {vb: (b, t) for vb, b, t in md.mappings(dev)} for dev in md.device_ids()}


def populate(md: PoolMetadata, rnd: random.Random) -> None:
    """Several thins, snapshots of thins and of snapshots, thousands of mappings, overwrites, deletes."""
    md.create_thin(0)
    for vb in rnd.sample(range(40000), 3000):
        md.insert_block(0, vb, md.alloc_data_block())
    md.commit()
    md.create_snap(1, 0)
    for vb, _b, _t in list(md.mappings(1))[:400]:
        md.insert_block(1, vb, md.alloc_data_block())  # break sharing
    md.create_thin(2)
    for vb in range(1500):
        md.insert_block(2, vb, md.alloc_data_block())
    md.create_snap(3, 1)
    for vb, _b, _t in list(md.mappings(0))[::3]:
        md.remove_block(0, vb)
    md.create_thin(9)
    md.insert_block(9, 7, md.alloc_data_block())
    md.commit()
    md.delete_thin(9)
    md.remove_range(2, 100, 900)
    md.set_transaction_id(0, 5)
    md.commit()


# -- interop ----------------------------------------------------------------------------------

@needs_tools
def test_dmsim_metadata_passes_thin_check_and_dumps_the_same(tmp_path):
    path = make_meta(tmp_path)
    format_metadata(path, 128, 20000, durable=False)
    with PoolMetadata(path, 128, durable=False) as md:
        populate(md, random.Random(1))
        assert check_metadata(md) == []
        want = our_mappings(md)
        details = {d: md.device_details(d) for d in md.device_ids()}
    assert sorted(want) == [0, 1, 2, 3]
    assert sum(len(m) for m in want.values()) > 6000
    thin_check(path)
    sb = thin_dump(path)
    assert sb.get("transaction") == "5" and sb.get("data_block_size") == "128"
    assert sb.get("nr_data_blocks") == "20000" and sb.get("time") == "2"
    assert dumped_mappings(sb) == want
    for dev in sb.iter("device"):
        d = details[int(dev.get("dev_id", ""))]
        assert int(dev.get("mapped_blocks", "")) == d.mapped_blocks == len(want[d.dev_id])
        assert (int(dev.get("creation_time", "")), int(dev.get("snap_time", ""))) == (d.creation_time,
                                                                                      d.snapshotted_time)


RESTORE_XML = """<superblock uuid="" time="3" transaction="42" flags="0" version="2" data_block_size="256"
  nr_data_blocks="5000">
  <device dev_id="1" mapped_blocks="1202" transaction="7" creation_time="0" snap_time="2">
    <range_mapping origin_begin="0" data_begin="100" length="1000" time="0"/>
    <single_mapping origin_block="5000" data_block="7" time="1"/>
    <range_mapping origin_begin="6000" data_begin="2000" length="200" time="2"/>
    <single_mapping origin_block="9999" data_block="3" time="2"/>
  </device>
  <device dev_id="4" mapped_blocks="1001" transaction="9" creation_time="2" snap_time="2">
    <range_mapping origin_begin="0" data_begin="100" length="1000" time="0"/>
    <single_mapping origin_block="1234567" data_block="4999" time="3"/>
  </device>
</superblock>
"""


def restore(tmp_path, xml_text, name="restored.img"):
    path = make_meta(tmp_path, name=name)
    xml = tmp_path / (name + ".xml")
    xml.write_text(xml_text)
    r = run_tool("thin_restore", "-i", str(xml), "-o", path)
    assert r.returncode == 0, r.stdout + r.stderr
    return path


@needs_tools
def test_thin_restore_output_opens_with_the_same_mappings(tmp_path):
    path = restore(tmp_path, RESTORE_XML)
    want = dumped_mappings(ET.fromstring(RESTORE_XML))
    with PoolMetadata(path, 256, format_device=False, durable=False) as md:
        assert md.transaction_id == 42 and md.time == 3
        assert md.data_dev_size() == 5000
        assert our_mappings(md) == want
        r = md.find_block(1, 5000)
        assert r is not None and (r.block, r.shared) == (7, True)  # time 1 < snap_time 2
        r = md.find_block(1, 9999)
        assert r is not None and (r.block, r.shared) == (3, False)
        assert md.block_is_shared(150) and not md.block_is_shared(7)
        d = md.device_details(4)
        assert (d.mapped_blocks, d.transaction_id, d.creation_time, d.snapshotted_time) == (1001, 9, 2, 2)
        assert check_metadata(md, allocated=False) == []
        # and dmsim carries on from there: break sharing, unmap, snapshot, delete
        md.insert_block(4, 10, md.alloc_data_block())
        want[4][10] = (md.find_block(4, 10).block, 3)  # type: ignore[union-attr]
        md.remove_block(1, 0)
        del want[1][0]
        md.create_snap(5, 4)
        want[5] = dict(want[4])
        md.delete_thin(1)
        del want[1]
        md.commit()
        assert check_metadata(md, allocated=False) == []
        assert our_mappings(md) == want
    thin_check(path)
    assert dumped_mappings(thin_dump(path)) == want


@needs_tools
def test_round_trip_through_thin_dump_and_thin_restore(tmp_path):
    """dmsim -> thin_dump -> thin_restore -> dmsim: the same devices, details and mappings."""
    path = make_meta(tmp_path)
    format_metadata(path, 128, 20000, durable=False)
    with PoolMetadata(path, 128, durable=False) as md:
        populate(md, random.Random(2))
        want = our_mappings(md)
    r = run_tool("thin_dump", path)
    assert r.returncode == 0
    back = restore(tmp_path, r.stdout, name="back.img")
    with PoolMetadata(back, 128, format_device=False, durable=False) as md:
        assert our_mappings(md) == want
        assert md.transaction_id == 5
        assert check_metadata(md, allocated=False) == []


@needs_tools
def test_metadata_snapshot_is_what_thin_dump_m_shows(tmp_path):
    """reserve_metadata_snap holds the committed trees; thin_dump -m dumps them, later changes aside."""
    path = make_meta(tmp_path)
    format_metadata(path, 128, 5000, durable=False)
    with PoolMetadata(path, 128, durable=False) as md:
        md.create_thin(0)
        for vb in range(600):
            md.insert_block(0, vb, md.alloc_data_block())
        held = md.reserve_metadata_snap()
        assert held and md.held_root == held
        snap_view = our_mappings(md)
        with pytest.raises(DMError) as e:
            md.reserve_metadata_snap()
        assert e.value.errno == errno.EBUSY
        for vb in range(0, 600, 2):
            md.remove_block(0, vb)
        md.create_thin(1)
        md.insert_block(1, 0, md.alloc_data_block())
        md.commit()
        assert check_metadata(md) == []
        live_view = our_mappings(md)
    thin_check(path)
    assert dumped_mappings(thin_dump(path, "-m")) == snap_view
    assert dumped_mappings(thin_dump(path)) == live_view
    with PoolMetadata(path, 128, durable=False) as md:
        md.release_metadata_snap()
        assert md.held_root == 0
        md.commit()
        assert check_metadata(md) == []
        with pytest.raises(DMError) as e:
            md.release_metadata_snap()
        assert e.value.errno == errno.EINVAL
    thin_check(path)


@needs_tools
def test_thin_ls_counts_exclusive_and_shared(tmp_path):
    path = make_meta(tmp_path)
    format_metadata(path, 128, 5000, durable=False)
    with PoolMetadata(path, 128, durable=False) as md:
        md.create_thin(0)
        for vb in range(100):
            md.insert_block(0, vb, md.alloc_data_block())
        md.create_snap(1, 0)
        for vb in range(30):
            md.insert_block(1, vb, md.alloc_data_block())
    if not shutil.which("thin_ls"):
        pytest.skip("no thin_ls")
    r = run_tool("thin_ls", "--no-headers", "-o", "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS", path)
    assert r.returncode == 0, r.stderr
    rows = sorted(tuple(int(x) for x in line.split()) for line in r.stdout.splitlines() if line.strip())
    assert rows == [(0, 100, 30, 70), (1, 100, 30, 70)]


@needs_tools
def test_thin_delta_sees_what_a_snapshot_changed(tmp_path):
    """thin_delta between an origin and its snapshot: the blocks rewritten, unmapped and added."""
    if not shutil.which("thin_delta"):
        pytest.skip("no thin_delta")
    path = make_meta(tmp_path)
    format_metadata(path, 128, 1000, durable=False)
    with PoolMetadata(path, 128, durable=False) as md:
        md.create_thin(0)
        for vb in range(20):
            md.insert_block(0, vb, md.alloc_data_block())
        md.create_snap(1, 0)
        for vb in (3, 4, 5, 10):
            md.insert_block(1, vb, md.alloc_data_block())
        md.remove_block(1, 15)
        md.insert_block(1, 30, md.alloc_data_block())
    r = run_tool("thin_delta", "--snap1", "0", "--snap2", "1", path)
    assert r.returncode == 0, r.stderr
    diff = [(e.tag, int(e.get("begin", "")), int(e.get("length", ""))) for e in ET.fromstring(r.stdout).iter()
            if e.tag in ("same", "different", "left_only", "right_only")]
    assert diff == [("same", 0, 3), ("different", 3, 3), ("same", 6, 4), ("different", 10, 1), ("same", 11, 4),
                    ("left_only", 15, 1), ("same", 16, 4), ("right_only", 30, 1)]


# -- errors -----------------------------------------------------------------------------------

def test_unformatted_device_refused_without_format(tmp_path):
    with pytest.raises(DMError) as e:
        PoolMetadata(make_meta(tmp_path), 128, format_device=False)
    assert e.value.errno == errno.EPERM


def test_corrupt_superblock_refused_and_nothing_written(tmp_path):
    path = make_meta(tmp_path)
    format_metadata(path, 128, 100, durable=False)
    with open(path, "r+b") as f:
        f.seek(300)
        f.write(b"\x55")
    with open(path, "rb") as f:
        before = f.read()
    logs: list[str] = []
    with pytest.raises(MetadataError, match=r"sb_check failed: csum \d+: wanted \d+") as e:
        PoolMetadata(path, 128, log=logs.append)
    assert e.value.errno == errno.EILSEQ
    assert logs[-1] == "thin metadata: couldn't read superblock"
    with open(path, "rb") as f:
        assert f.read() == before


def test_foreign_superblock_refused(tmp_path):
    path = make_meta(tmp_path)
    with open(path, "r+b") as f:
        f.write(b"not a thin pool")
    with pytest.raises(MetadataError, match="sb_check failed: blocknr"):
        PoolMetadata(path, 128)


def test_data_block_size_must_match(tmp_path):
    path = make_meta(tmp_path)
    format_metadata(path, 128, 100, durable=False)
    logs: list[str] = []
    with pytest.raises(DMError, match=r"changing the data block size \(from 128 to 256\) is not supported"):
        PoolMetadata(path, 256, log=logs.append)
    assert logs == ["thin metadata: changing the data block size (from 128 to 256) is not supported"]


def test_message_errors(tmp_path):
    """The errnos dm-thin turns into its message failures; none of them changes anything."""
    path = make_meta(tmp_path)
    format_metadata(path, 128, 100, durable=False)
    with PoolMetadata(path, 128, durable=False) as md:
        md.create_thin(1)
        with pytest.raises(DMError) as e:
            md.create_thin(1)
        assert e.value.errno == errno.EEXIST
        with pytest.raises(DMError) as e:
            md.create_snap(2, 7)
        assert e.value.errno == errno.ENODATA
        with pytest.raises(DMError) as e:
            md.create_snap(1, 1)
        assert e.value.errno == errno.EEXIST
        with pytest.raises(NoData):
            md.delete_thin(3)
        with pytest.raises(DMError) as e:
            md.set_transaction_id(1, 2)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(NoData):
            md.remove_block(1, 5)
        with pytest.raises(DMError):
            md.create_thin(1 << 24)
        md.commit()
        assert md.device_ids() == [1]
        assert check_metadata(md) == []


def test_out_of_data_space_then_commit(tmp_path):
    path = make_meta(tmp_path)
    format_metadata(path, 128, 10, durable=False)
    with PoolMetadata(path, 128, durable=False) as md:
        md.create_thin(0)
        for vb in range(10):
            md.insert_block(0, vb, md.alloc_data_block())
        assert md.free_data_blocks() == 0
        with pytest.raises(NoSpace):
            md.alloc_data_block()
        md.commit()
        md.remove_block(0, 3)
        with pytest.raises(NoSpace):
            md.alloc_data_block()  # freed blocks come back only after the commit
        md.commit()
        b = md.alloc_data_block()
        assert b == 3
        md.insert_block(0, 3, b)
        md.resize_data_dev(20)
        assert md.free_data_blocks() == 10
        with pytest.raises(DMError, match="cannot reduce size of space map"):
            md.resize_data_dev(5)
        md.commit()
        assert check_metadata(md) == []


def test_abort_goes_back_to_the_last_commit(tmp_path):
    path = make_meta(tmp_path)
    format_metadata(path, 128, 100, durable=False)
    with PoolMetadata(path, 128, durable=False) as md:
        md.create_thin(0)
        md.insert_block(0, 1, md.alloc_data_block())
        md.commit()
        md.insert_block(0, 2, md.alloc_data_block())
        md.create_thin(1)
        md.abort()
        assert md.device_ids() == [0]
        assert [vb for vb, _b, _t in md.mappings(0)] == [1]
        assert md.device_details(0).mapped_blocks == 1
        md.commit()
        assert check_metadata(md) == []


def test_read_only_metadata_refuses_changes_until_an_abort(tmp_path):
    """A pool in a read-only mode makes its metadata refuse changes (-EPERM); the abort of a
    failed operation reopens it writable, as 6.1's fresh block manager is, so needs_check
    can still be set (the pool then goes read-only again)."""
    path = make_meta(tmp_path)
    format_metadata(path, 128, 100, durable=False)
    with PoolMetadata(path, 128, durable=False) as md:
        md.create_thin(0)
        md.commit()
        md.set_read_only(True)
        with pytest.raises(DMError) as e:
            md.insert_block(0, 1, md.alloc_data_block())
        assert e.value.errno == errno.EPERM
        md.abort()
        md.set_needs_check()
        assert md.needs_check and check_metadata(md) == []


def test_status_counts(tmp_path):
    """Used/total as the pool's status reports them: the metadata reserve is not free."""
    path = make_meta(tmp_path, mib=8)
    format_metadata(path, 128, 1000, durable=False)
    with PoolMetadata(path, 128, durable=False) as md:
        assert md.metadata_dev_size() == 2048
        assert md.metadata_reserve == 204
        used = md.metadata_dev_size() - md.free_metadata_blocks()
        assert used == md.metadata_sm.nr_allocated + 204
        assert md.data_dev_size() - md.free_data_blocks() == 0


# -- state machine ----------------------------------------------------------------------------

class ThinMachine(RuleBasedStateMachine):
    """Pool operations against a dict {dev: {vblock: data block}}; commit, abort, reopen; thin_check last."""

    def __init__(self):
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "meta.img")
        with open(self.path, "wb") as f:
            f.truncate(8 << 20)
        format_metadata(self.path, 128, 3000, durable=False)
        self.md = PoolMetadata(self.path, 128, durable=False)
        self.model: dict[int, dict[int, int]] = {}
        self.committed: dict[int, dict[int, int]] = {}

    def teardown(self):
        try:
            self.md.commit()
            assert check_metadata(self.md) == []
            self.md.close()
            if HAVE_TOOLS:
                thin_check(self.path)
                got = dumped_mappings(thin_dump(self.path))
                assert {d: {vb: b for vb, (b, _t) in m.items()} for d, m in got.items()} == self.model
        finally:
            self.md.bm.close()
            self.dir.cleanup()

    devs = st.integers(0, 5)

    @initialize()
    def first(self):
        self.md.create_thin(0)
        self.model[0] = {}

    @rule(dev=devs)
    def create_thin(self, dev):
        if dev in self.model:
            with pytest.raises(DMError):
                self.md.create_thin(dev)
            return
        self.md.create_thin(dev)
        self.model[dev] = {}

    @rule(dev=devs, origin=devs)
    def create_snap(self, dev, origin):
        if dev in self.model or origin not in self.model:
            with pytest.raises(DMError):
                self.md.create_snap(dev, origin)
            return
        self.md.create_snap(dev, origin)
        self.model[dev] = dict(self.model[origin])

    @precondition(lambda self: len(self.model) > 1)
    @rule(dev=devs)
    def delete(self, dev):
        if dev not in self.model:
            with pytest.raises(DMError):
                self.md.delete_thin(dev)
            return
        self.md.delete_thin(dev)
        del self.model[dev]

    @rule(dev=devs, start=st.integers(0, 3000), n=st.integers(1, 300), step=st.integers(1, 5))
    def write(self, dev, start, n, step):
        """Provision or overwrite (break sharing) a run of blocks."""
        if dev not in self.model:
            return
        for vb in range(start, start + n * step, step):
            try:
                b = self.md.alloc_data_block()
            except NoSpace:
                return
            self.md.insert_block(dev, vb, b)
            self.model[dev][vb] = b

    @rule(dev=devs, start=st.integers(0, 3000), n=st.integers(1, 300))
    def discard(self, dev, start, n):
        if dev not in self.model:
            return
        removed = self.md.remove_range(dev, start, start + n)
        gone = [vb for vb in self.model[dev] if start <= vb < start + n]
        assert removed == len(gone)
        for vb in gone:
            del self.model[dev][vb]

    @rule(dev=devs, vb=st.integers(0, 3500))
    def lookup(self, dev, vb):
        if dev not in self.model:
            return
        r = self.md.find_block(dev, vb)
        assert (r.block if r else None) == self.model[dev].get(vb)

    @rule()
    def commit(self):
        self.md.commit()
        self.committed = {d: dict(m) for d, m in self.model.items()}
        assert check_metadata(self.md) == []

    @rule()
    def abort(self):
        self.md.abort()
        self.model = {d: dict(m) for d, m in self.committed.items()}

    @rule()
    def reopen(self):
        """Commit, close, open again from the file."""
        self.md.close()
        self.md = PoolMetadata(self.path, 128, format_device=False, durable=False)
        self.committed = {d: dict(m) for d, m in self.model.items()}

    @invariant()
    def same_mappings(self):
        if not self.model:
            return
        assert {d: {vb: b for vb, (b, _t) in m.items()} for d, m in our_mappings(self.md).items()} == self.model
        for d, m in self.model.items():
            assert self.md.device_details(d).mapped_blocks == len(m)


TestThinMetadata = ThinMachine.TestCase
TestThinMetadata.settings = settings(max_examples=20, stateful_step_count=20, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])


# -- crash safety -----------------------------------------------------------------------------

def _committed_pool(tmp_path):
    path = make_meta(tmp_path)
    format_metadata(path, 128, 20000, durable=False)
    md = PoolMetadata(path, 128, durable=False)
    populate(md, random.Random(3))
    return path, md, our_mappings(md)


@pytest.mark.parametrize("writes_before_crash", [0, 1, "all-but-superblock"])
def test_crash_during_commit_keeps_the_last_commit(tmp_path, writes_before_crash):
    """Dying part way through a commit's writes leaves the previous commit intact and checkable."""
    path, md, committed = _committed_pool(tmp_path)
    for vb in range(20000, 21000):
        md.insert_block(0, vb, md.alloc_data_block())
    md.delete_thin(2)
    md.create_snap(7, 0)
    real = md.bm.store.pwritev
    calls = 0

    def dying(bufs, offset):
        nonlocal calls
        if writes_before_crash == "all-but-superblock" and offset == 0 or calls == writes_before_crash:
            real(bufs[:len(bufs) // 2], offset)  # a run of blocks half written
            raise OSError(errno.EIO, "simulated crash")
        calls += 1
        real(bufs, offset)

    md.bm.store.pwritev = dying  # type: ignore[method-assign]
    with pytest.raises(OSError):
        md._commit()
    md.bm.close()
    with PoolMetadata(path, 128, format_device=False, durable=False) as again:
        assert our_mappings(again) == committed
        assert again.transaction_id == 5
        assert check_metadata(again) == []
    if HAVE_TOOLS:
        thin_check(path)


CHILD = r"""
import sys
from dmsim.thin_metadata import PoolMetadata
md = PoolMetadata(sys.argv[1], 128)
md.create_thin(0)
md.commit()
vb = 0
for tid in range(1, 10**6):
    for _ in range(50):
        md.insert_block(0, vb, md.alloc_data_block())
        vb += 1
    md.set_transaction_id(tid - 1, tid)
    md.commit()
    print(tid, vb, flush=True)
"""


def test_sigkill_at_a_random_moment_leaves_checkable_metadata(tmp_path):
    """A process killed mid-stream: the metadata opens, holds at least every commit it reported."""
    import signal
    import sys
    import time
    path = make_meta(tmp_path, mib=16)
    format_metadata(path, 128, 1 << 20, durable=False)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, path], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first, "child died before its first commit"
        time.sleep(random.Random().uniform(0.05, 0.4))
    finally:
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=TOOL_TIMEOUT)
    reported = [tuple(map(int, line.split())) for line in (first + out).splitlines() if line.strip()]
    last_tid, last_vb = reported[-1]
    with PoolMetadata(path, 128, format_device=False, durable=False) as md:
        tid = md.transaction_id
        assert tid >= last_tid
        assert [vb for vb, _b, _t in md.mappings(0)] == list(range(tid * 50))
        assert check_metadata(md) == []
    if HAVE_TOOLS:
        thin_check(path)


def test_full_metadata_device_fails_the_operation_and_aborts_cleanly(tmp_path):
    """Out of metadata space: the operation fails with -ENOSPC, abort returns to the last commit."""
    path = make_meta(tmp_path, mib=1)  # 256 blocks
    format_metadata(path, 128, 1 << 20, durable=False)
    md = PoolMetadata(path, 128, durable=False)
    md.create_thin(0)
    rnd = random.Random(5)
    committed: dict[int, dict[int, tuple[int, int]]] = {}
    with pytest.raises(NoSpace):
        for round_ in range(1000):
            for vb in rnd.sample(range(10**6), 500):
                md.insert_block(0, vb, md.alloc_data_block())
            md.commit()
            committed = our_mappings(md)
            assert round_ < 999
    md.abort()
    assert our_mappings(md) == committed
    md.commit()
    assert check_metadata(md) == []
    md.close()
    if HAVE_TOOLS:
        thin_check(path)
