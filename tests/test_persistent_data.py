"""persistent-data: checksums, block manager, transaction manager, space maps and btrees.

The btree state machine runs against a dict and re-derives every reference count from the
trees after each commit, so a leak or a double free shows as soon as it happens; the format
itself is checked against thin-provisioning-tools in tests/test_thin_metadata.py.
"""
import errno
import os
import struct

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dmsim.persistent_data import (
    BlockManager,
    BTreeInfo,
    LockError,
    MetadataError,
    MetadataSpaceMap,
    NoData,
    NoSpace,
    TransactionManager,
    ValueType,
    calc_max_entries,
)
from dmsim.persistent_data.block_manager import ImageStore
from dmsim.persistent_data.checksum import BTREE_CSUM_XOR, bm_checksum
from dmsim.persistent_data.space_map import (
    ENTRIES_PER_BITMAP,
    SPACE_MAP_ROOT_SIZE,
    DiskSpaceMap,
    decode_bitmap,
    encode_bitmap,
)
from dmsim.persistent_data.validators import BITMAP, BTREE_NODE, NO_VALIDATOR
from dmsim.thin_metadata import RefCounter


def make_file(tmp_path, blocks=1024, name="meta.img"):
    p = tmp_path / name
    with open(p, "wb") as f:
        f.truncate(blocks * 4096)
    return str(p)


class Store:
    """A minimal client of the stack: block 0 holds the metadata space map root and tree roots."""

    def __init__(self, path, create, nr_roots=0, cache_blocks=24):
        # a small cache, so eviction and re-reads happen inside transactions
        self.bm = BlockManager(path, durable=False, cache_blocks=cache_blocks)
        self.tm = TransactionManager(self.bm)
        if create:
            self.sm = MetadataSpaceMap.create(self.tm, self.bm.nr_blocks)
            self.roots = [0] * nr_roots
        else:
            raw = self.bm.read_raw(0)
            self.sm = MetadataSpaceMap.open(self.tm, raw[:SPACE_MAP_ROOT_SIZE])
            (n,) = struct.unpack_from("<I", raw, SPACE_MAP_ROOT_SIZE)
            self.roots = list(struct.unpack_from("<%dQ" % n, raw, SPACE_MAP_ROOT_SIZE + 4))

    def commit(self):
        self.tm.pre_commit()
        blk = self.bm.write_lock_zero(0, NO_VALIDATOR)
        blk.data[:SPACE_MAP_ROOT_SIZE] = self.sm.root_bytes()
        struct.pack_into("<I%dQ" % len(self.roots), blk.data, SPACE_MAP_ROOT_SIZE, len(self.roots), *self.roots)
        self.tm.commit(blk)

    def close(self):
        self.bm.close()


# -- checksums and bitmaps --------------------------------------------------------------------

def test_checksum_is_raw_crc32c_salted():
    """dm_bm_checksum is crc32c seeded with ~0 and no final inversion, then the salt."""
    assert bm_checksum(b"123456789", 0) == 0xE3069283 ^ 0xFFFFFFFF
    assert bm_checksum(b"123456789", BTREE_CSUM_XOR) == 0xE3069283 ^ 0xFFFFFFFF ^ BTREE_CSUM_XOR


def test_bitmap_bits_are_high_bit_first():
    """A count of 1 sets the entry's second bit, 2 its first (sm_lookup_bitmap), 3 both."""
    entries = bytearray(ENTRIES_PER_BITMAP)
    entries[0], entries[1], entries[2], entries[33] = 1, 2, 3, 1
    words = encode_bitmap(entries)
    assert words[0] == 0b11_01_10
    assert words[8] == 0b1000  # entry 33: second entry of the second word
    assert decode_bitmap(words) == entries


def test_bitmap_round_trip_random():
    import random
    rnd = random.Random(4)
    entries = bytearray(rnd.choice(b"\0\1\2\3") for _ in range(ENTRIES_PER_BITMAP))
    assert decode_bitmap(encode_bitmap(entries)) == entries


def test_max_entries_match_the_kernel():
    """calc_max_entries for the value sizes dm-thin uses (thin_check wants multiples of 3)."""
    assert calc_max_entries(8) == 252
    assert calc_max_entries(24) == 126
    assert calc_max_entries(4) == 336
    assert calc_max_entries(16) == 168


# -- block manager ----------------------------------------------------------------------------

def test_block_manager_locks_conflict(tmp_path):
    """Many readers or one writer; a conflicting request is a caller bug, raised at once."""
    with BlockManager(make_file(tmp_path), durable=False) as bm:
        r1 = bm.read_lock(3)
        r2 = bm.read_lock(3)
        with pytest.raises(LockError):
            bm.write_lock(3)
        bm.unlock(r1)
        bm.unlock(r2)
        w = bm.write_lock(3)
        with pytest.raises(LockError):
            bm.read_lock(3)
        bm.unlock(w)
        with pytest.raises(LockError):
            bm.unlock(w)


def test_block_manager_validates_on_read(tmp_path):
    """A block stamped by one validator reads back; a flipped bit or a wrong place is refused."""
    path = make_file(tmp_path)
    with BlockManager(path, durable=False) as bm:
        blk = bm.write_lock_zero(5, BITMAP)
        blk.data[100] = 7
        bm.unlock(blk)
        assert bm.flush() == 1
    with BlockManager(path, durable=False) as bm:
        assert bm.read_lock(5, BITMAP).data[100] == 7
        with pytest.raises(MetadataError, match="validator mismatch"):
            bm.read_lock(5, BTREE_NODE)
    with open(path, "rb") as f:
        raw = bytearray(f.read(6 * 4096)[5 * 4096:])
    with open(path, "r+b") as f:
        f.seek(6 * 4096)
        f.write(raw)  # the same block at the wrong location
        raw[200] ^= 1
        f.seek(5 * 4096)
        f.write(raw)
    with BlockManager(path, durable=False) as bm:
        with pytest.raises(MetadataError, match=r"^bitmap check failed: csum \d+ != wanted \d+$") as e:
            bm.read_lock(5, BITMAP)
        assert e.value.errno == errno.EILSEQ
        with pytest.raises(MetadataError, match="bitmap check failed: blocknr 5 != wanted 6") as e:
            bm.read_lock(6, BITMAP)
        assert e.value.errno == errno.ENOTBLK


def test_block_manager_discard_forgets_dirty(tmp_path):
    path = make_file(tmp_path)
    with BlockManager(path, durable=False) as bm:
        blk = bm.write_lock_zero(2, NO_VALIDATOR)
        blk.data[0] = 1
        bm.unlock(blk)
        bm.discard_dirty()
        assert bm.flush() == 0
        assert bm.read_lock(2).data[0] == 0


def test_block_beyond_device_is_an_error(tmp_path):
    with BlockManager(make_file(tmp_path, blocks=4), durable=False) as bm, pytest.raises(Exception, match="beyond"):
        bm.read_lock(4)


# -- transaction manager and space maps -----------------------------------------------------

def test_shadow_copies_once_per_transaction(tmp_path):
    """First shadow: a new block, the original released; second shadow: in place; shared: copied."""
    s = Store(make_file(tmp_path), True, 1)
    info = BTreeInfo(s.tm, ValueType(8))
    s.roots[0] = info.empty()
    s.commit()
    root = s.roots[0]
    blk, inc = s.tm.shadow_block(root, BTREE_NODE)
    s.tm.unlock(blk)
    assert blk.location != root and not inc and s.sm.get_count(root) == 0
    again, inc = s.tm.shadow_block(blk.location, BTREE_NODE)
    s.tm.unlock(again)
    assert again.location == blk.location and not inc
    s.tm.inc(blk.location)
    shared, inc = s.tm.shadow_block(blk.location, BTREE_NODE)
    s.tm.unlock(shared)
    assert shared.location != blk.location and inc and s.sm.get_count(blk.location) == 1
    s.close()


def test_freed_blocks_wait_for_the_commit(tmp_path):
    """A block freed in a transaction is not reallocated before the commit (old metadata may use it)."""
    s = Store(make_file(tmp_path), True)
    b = s.sm.new_block()
    s.commit()
    s.sm.dec(b)
    seen = {s.sm.new_block() for _ in range(50)}
    assert b not in seen
    s.commit()
    s.sm.begin = 0
    assert b in {s.sm.new_block() for _ in range(60)}
    s.close()


def test_overflow_counts_survive_reopen(tmp_path):
    """Counts above 2 live in the overflow btree; dropping back to 2 removes the entry."""
    path = make_file(tmp_path)
    s = Store(path, True)
    b = s.sm.new_block()
    c = s.sm.new_block()
    for _ in range(6):
        s.sm.inc(b)
    s.sm.inc(c)
    s.commit()
    s.close()
    s = Store(path, False)
    assert s.sm.get_count(b) == 7 and s.sm.get_count(c) == 2
    assert s.sm.ref_info.lookup(s.sm.ref_count_root, [b]) == (7).to_bytes(4, "little")
    for _ in range(5):
        s.sm.dec(b)
    s.commit()
    assert s.sm.get_count(b) == 2
    with pytest.raises(NoData):
        s.sm.ref_info.lookup(s.sm.ref_count_root, [b])
    _check_store(s, [], {b: 2, c: 2})
    s.close()


def test_decrement_below_zero_refused(tmp_path):
    s = Store(make_file(tmp_path), True)
    with pytest.raises(MetadataError, match="below 0"):
        s.sm.dec(10)
    s.close()


def test_metadata_space_map_runs_out(tmp_path):
    """A full metadata device is -ENOSPC, not a crash."""
    s = Store(make_file(tmp_path, blocks=16), True)
    with pytest.raises(NoSpace) as e:
        for _ in range(20):
            s.sm.new_block()
    assert e.value.errno == errno.ENOSPC
    s.close()


def test_metadata_free_count_and_threshold_follow_6_1(tmp_path):
    """6.1's metadata map: every block handed out lowers the free count at once (its own
    bitmap moves too), frees only count after the commit; the threshold function runs
    once each time an allocation crosses down to the mark, not again while below it."""
    s = Store(make_file(tmp_path, blocks=64), True)
    s.commit()
    fired = []
    s.sm.register_threshold(40, lambda: fired.append(s.sm.nr_free()))
    free0 = s.sm.nr_free()
    b = s.sm.new_block()           # the first change moves the bitmap too: two blocks out
    assert s.sm.nr_free() == free0 - 2
    s.sm.dec(b)
    assert s.sm.nr_free() == free0 - 2   # the free waits for the commit
    got = []
    while s.sm.nr_free() > 40:
        got.append(s.sm.new_block())
    assert fired == [40]
    got.append(s.sm.new_block())
    assert fired == [40]           # still below: no second call
    for b in got[:6]:
        s.sm.dec(b)
    s.commit()                     # the frees count now: well above the mark again
    assert s.sm.nr_free() > 42
    s.sm.new_block()               # an allocation above the mark re-arms it
    while s.sm.nr_free() > 40:
        s.sm.new_block()
    assert fired == [40, 40]
    s.close()


def test_image_store_replays_writes_in_order(tmp_path):
    """A block manager over an in-memory image: reads from the image, each flush's writes
    then a sync queued for the owner, in order; an aborted transaction's blocks never leave."""
    store = ImageStore(bytes(16 * 4096))
    bm = BlockManager(store)
    assert bm.nr_blocks == 16
    blk = bm.write_lock_zero(3)
    blk.data[:4] = b"abcd"
    bm.unlock(blk)
    blk = bm.write_lock_zero(4)
    bm.unlock(blk)
    bm.flush()
    ops = store.take_pending()
    assert [op if op is None else (op[0], len(op[1])) for op in ops] == [(3 * 4096, 8192), None]
    assert ops[0] is not None and ops[0][1][:4] == b"abcd"
    blk = bm.write_lock(3)
    blk.data[:4] = b"zzzz"
    bm.unlock(blk)
    bm.discard_dirty()
    assert store.take_pending() == [] and bm.read_raw(3)[:4] == b"abcd"
    store.grow(bytes(4 * 4096))
    assert bm.refresh_size() == 20
    bm.close()
    assert store.closed


def test_disk_space_map_spans_bitmaps(tmp_path):
    """A data space map over three bitmaps: counts persist, nr_free follows the kernel's rule."""
    path = make_file(tmp_path)
    s = Store(path, True, 1)
    dsm = DiskSpaceMap.create(s.tm, 2 * ENTRIES_PER_BITMAP + 10)
    s.commit()
    blocks = [dsm.new_block() for _ in range(5)]
    dsm.set_count(ENTRIES_PER_BITMAP + 3, 4)
    dsm.set_count(2 * ENTRIES_PER_BITMAP + 9, 1)
    assert dsm.nr_free() == dsm.nr_blocks - 7  # every count leaving 0 counts, as sm_ll_inc does
    dsm.commit()
    s.roots = []
    raw = dsm.root_bytes()
    s.commit()
    dsm.transaction_committed()
    s2 = Store(path, False)
    d2 = DiskSpaceMap.open(s2.tm, raw)
    assert [d2.get_count(b) for b in blocks] == [1] * 5
    assert d2.get_count(ENTRIES_PER_BITMAP + 3) == 4
    assert d2.get_count(2 * ENTRIES_PER_BITMAP + 9) == 1
    assert d2.nr_allocated == 7
    assert d2.nr_free() == d2.nr_blocks - 7
    with pytest.raises(MetadataError, match="out of bounds"):
        d2.get_count(d2.nr_blocks)
    s.close()
    s2.close()


# -- btree ------------------------------------------------------------------------------------

def _check_store(s: Store, trees: list[tuple[BTreeInfo, int]], extra: dict[int, int] | None = None) -> None:
    """Tree shape and every metadata reference count, re-derived from the trees (+ ``extra`` references)."""
    c = RefCounter()
    c.ref(0)
    for b, n in (extra or {}).items():
        c.meta[b] = n
    for info, root in trees:
        c.tree(info, root)
    c.space_map(s.sm)
    have = s.sm.counts()
    assert c.problems == []
    assert have == c.meta
    assert s.sm.nr_allocated == len(have)


VALUE = ValueType(8)


class BTreeMachine(RuleBasedStateMachine):
    """Btrees against dicts: inserts, removes, lookups, clones sharing nodes, commits and reopens."""

    def __init__(self):
        super().__init__()
        import tempfile
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "meta.img")
        with open(self.path, "wb") as f:
            f.truncate(4096 * 4096)
        self.store = Store(self.path, True, 0)
        self.info = BTreeInfo(self.store.tm, VALUE)
        self.model: list[dict[int, bytes]] = []
        self.committed: list[dict[int, bytes]] = []

    @initialize()
    def start(self):
        self.store.roots.append(self.info.empty())
        self.model.append({})
        self.store.commit()
        self.committed = [dict(m) for m in self.model]

    def teardown(self):
        self.store.close()
        self.dir.cleanup()

    trees = st.integers(0, 3)

    def _tree(self, t):
        return t % len(self.model)

    @rule(t=trees, start=st.integers(0, 5000), n=st.integers(1, 400), step=st.integers(1, 7), v=st.integers(0, 99))
    def insert_run(self, t, start, n, step, v):
        t = self._tree(t)
        for k in range(start, start + n * step, step):
            val = (k * 1000 + v).to_bytes(8, "little")
            self.store.roots[t], new = self.info.insert(self.store.roots[t], [k], val)
            assert new == (k not in self.model[t])
            self.model[t][k] = val

    @rule(t=trees, start=st.integers(0, 5000), n=st.integers(1, 400), step=st.integers(1, 7))
    def remove_run(self, t, start, n, step):
        t = self._tree(t)
        for k in range(start, start + n * step, step):
            if k in self.model[t]:
                self.store.roots[t] = self.info.remove(self.store.roots[t], [k])
                del self.model[t][k]
            else:
                before = self.store.roots[t]
                with pytest.raises(NoData):
                    self.info.remove(before, [k])

    @rule(t=trees, k=st.integers(0, 8000))
    def lookup(self, t, k):
        t = self._tree(t)
        assert self.info.lookup_or_none(self.store.roots[t], [k]) == self.model[t].get(k)

    @precondition(lambda self: len(self.model) < 4)
    @rule(t=trees)
    def clone(self, t):
        """A second root on the same nodes (what a thin snapshot does): one more reference."""
        t = self._tree(t)
        self.store.tm.inc(self.store.roots[t])
        self.store.roots.append(self.store.roots[t])
        self.model.append(dict(self.model[t]))

    @precondition(lambda self: len(self.model) > 1)
    @rule(t=trees)
    def delete_tree(self, t):
        t = self._tree(t)
        self.info.delete(self.store.roots.pop(t))
        self.model.pop(t)

    @rule()
    def commit(self):
        self.store.commit()
        self.committed = [dict(m) for m in self.model]
        _check_store(self.store, [(self.info, r) for r in self.store.roots])

    @rule()
    def reopen_after_commit(self):
        self.store.commit()
        self.store.close()
        self.store = Store(self.path, False)
        self.info = BTreeInfo(self.store.tm, VALUE)
        self.committed = [dict(m) for m in self.model]
        assert len(self.store.roots) == len(self.model)

    @rule()
    def crash(self):
        """Close without committing: the last commit is what the file holds."""
        self.store.close()
        self.store = Store(self.path, False)
        self.info = BTreeInfo(self.store.tm, VALUE)
        self.model = [dict(m) for m in self.committed]

    @invariant()
    def contents(self):
        if not self.model:
            return
        for root, m in zip(self.store.roots, self.model, strict=True):
            assert dict(self.info.items(root)) == m


TestBTree = BTreeMachine.TestCase
TestBTree.settings = settings(max_examples=25, stateful_step_count=25, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])


def test_btree_multi_level(tmp_path):
    """A two-level tree (thin's shape): keys per level, subtrees made on first insert, walk in order."""
    s = Store(make_file(tmp_path), True, 1)
    info = BTreeInfo(s.tm, VALUE, levels=2)
    root = info.empty()
    want = {}
    for dev in (3, 1, 2):
        for k in range(0, 700, 3):
            root, new = info.insert(root, [dev, k], (dev * 10000 + k).to_bytes(8, "little"))
            assert new
            want[(dev, k)] = (dev * 10000 + k).to_bytes(8, "little")
    assert dict(info.walk(root)) == want
    assert info.lookup(root, [2, 300]) == (20300).to_bytes(8, "little")
    with pytest.raises(NoData):
        info.lookup(root, [4, 0])
    for k in range(0, 700, 6):
        root = info.remove(root, [1, k])
        del want[(1, k)]
    assert dict(info.walk(root)) == want
    s.roots[0] = root
    s.commit()
    c = RefCounter()
    c.ref(0)
    top = BTreeInfo(s.tm, ValueType(8))
    c.tree(top, root, lambda _k, v: c.tree(info, int.from_bytes(v, "little")))
    c.space_map(s.sm)
    assert c.problems == [] and s.sm.counts() == c.meta
    s.close()


def test_btree_key_below_a_full_root_leaf(tmp_path):
    """252 keys fill the root leaf; a key below them splits the root beneath and must still be
    found: the walk goes on from the new root, lowering its first key (conformance 36, 6.1's
    metadata byte for byte).  Stepping down to the child instead left key 0 unreachable."""
    s = Store(make_file(tmp_path), True, 1)
    info = BTreeInfo(s.tm, VALUE)
    root = info.empty()
    for k in range(1, 253):
        root, _ = info.insert(root, [k], k.to_bytes(8, "little"))
    root, new = info.insert(root, [0], b"\0" * 8)
    assert new
    assert info.lookup(root, [0]) == b"\0" * 8
    assert [k for (k,), _v in info.walk(root)] == list(range(253))
    assert info.read_node(root).keys[0] == 0
    s.roots[0] = root
    s.commit()
    c = RefCounter()
    c.ref(0)
    c.tree(info, root)
    c.space_map(s.sm)
    assert c.problems == [] and s.sm.counts() == c.meta
    s.close()
