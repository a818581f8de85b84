"""persistent-data arrays and bitsets against lists, with shared (cloned) arrays and value references.

Values carry references (a counter per value, like a data block each entry would own), so a
copy of a shared array block that forgets to take them, or a drop that forgets to release
them, shows in the counts; metadata block counts are re-derived from the trees after commits.
"""
import os
import tempfile
from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_persistent_data import Store, make_file

from dmsim.persistent_data.array import ArrayInfo, calc_max_entries
from dmsim.persistent_data.bitset import Bitset, new_bitset
from dmsim.persistent_data.btree import ValueType
from dmsim.thin_metadata import RefCounter


def test_array_block_capacity():
    assert calc_max_entries(8) == 509
    assert calc_max_entries(4) == 1018


def _check(store: Store, arrays: list[tuple[ArrayInfo, int]]) -> None:
    c = RefCounter()
    c.ref(0)
    for info, root in arrays:
        # array blocks are referenced once per btree leaf holding them (shared leaves once)
        c.tree(info.btree, root, lambda _k, v: c.ref(int.from_bytes(v, "little")))
    c.space_map(store.sm)
    assert c.problems == []
    assert store.sm.counts() == c.meta


class ArrayMachine(RuleBasedStateMachine):
    """Arrays of referenced values against lists: resize, set, clone (shared blocks), delete, commit."""

    def __init__(self):
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        path = os.path.join(self.dir.name, "meta.img")
        with open(path, "wb") as f:
            f.truncate(2048 * 4096)
        self.store = Store(path, True, 0)
        self.refs: Counter[int] = Counter()
        vt = ValueType(8, inc=lambda v: self.refs.update([int.from_bytes(v, "little")]),
                       dec=lambda v: self.refs.subtract([int.from_bytes(v, "little")]))
        self.info = ArrayInfo(self.store.tm, vt)
        self.model: list[list[int]] = []

    def teardown(self):
        self.store.close()
        self.dir.cleanup()

    @initialize()
    def first(self):
        self.store.roots.append(self.info.empty())
        self.model.append([])

    def _i(self, a):
        return a % len(self.model)

    @rule(a=st.integers(0, 3), size=st.integers(0, 2500), v=st.integers(1, 9))
    def resize(self, a, size, v):
        a = self._i(a)
        old = len(self.model[a])
        self.store.roots[a] = self.info.resize(self.store.roots[a], old, size, v.to_bytes(8, "little"))
        self.model[a] = (self.model[a] + [v] * size)[:size]

    @rule(a=st.integers(0, 3), i=st.integers(0, 2500), v=st.integers(1, 9))
    def set(self, a, i, v):
        a = self._i(a)
        if i >= len(self.model[a]):
            return
        self.store.roots[a] = self.info.set(self.store.roots[a], i, v.to_bytes(8, "little"))
        self.model[a][i] = v

    @precondition(lambda self: len(self.model) < 4)
    @rule(a=st.integers(0, 3))
    def clone(self, a):
        a = self._i(a)
        self.store.tm.inc(self.store.roots[a])
        self.store.roots.append(self.store.roots[a])
        self.model.append(list(self.model[a]))

    @precondition(lambda self: len(self.model) > 1)
    @rule(a=st.integers(0, 3))
    def delete(self, a):
        a = self._i(a)
        self.info.delete(self.store.roots.pop(a))
        self.model.pop(a)

    @rule()
    def commit(self):
        self.store.commit()
        _check(self.store, [(self.info, r) for r in self.store.roots])

    @invariant()
    def same(self):
        if not self.model:
            return
        for root, m in zip(self.store.roots, self.model, strict=True):
            got = [int.from_bytes(v, "little") for _i, v in self.info.items(root)]
            assert got == m
        want = Counter(v for m in self.model for v in m)
        # values held by array blocks: one reference per block entry, shared blocks counted once
        held: Counter[int] = Counter()
        seen = set()
        for root in self.store.roots:
            for b in self.info.blocks(root):
                if b not in seen:
                    seen.add(b)
                    ab = self.info._read(b)
                    held.update(int.from_bytes(ab.get(i), "little") for i in range(ab.nr_entries))
        assert +self.refs == held
        assert set(want) <= set(held) | {0}


TestArray = ArrayMachine.TestCase
TestArray.settings = settings(max_examples=25, stateful_step_count=25, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])


def test_bitset_set_clear_resize_reopen(tmp_path):
    path = make_file(tmp_path)
    s = Store(path, True, 1)
    bs = new_bitset(s.tm, 1000)
    for b in (0, 1, 63, 64, 500, 999):
        bs.set(b)
    bs.clear(1)
    assert bs.test(63) and not bs.test(1) and not bs.test(2)
    bs.resize(1000, 5000, default=True)
    s.roots[0] = bs.flush()
    s.commit()
    s.close()
    s = Store(path, False)
    bs = Bitset(s.tm, s.roots[0])
    bits = bs.bits()
    assert bits[:5] == [0, 63, 64, 500, 999]
    assert bits[5] == 1024 and len(bits) == 5 + (5056 - 1024)  # new words come all set
    bs.resize(5000, 70, default=False)
    assert bs.bits() == [0, 63, 64]
    s.roots[0] = bs.flush()
    s.commit()
    _check(s, [(bs.array, s.roots[0])])
    s.close()
