"""Btrees of 64-bit keys (dm-btree.c, dm-btree-remove.c, dm-btree-internal.h), the kernel's node layout.

A node is one metadata block::

    le32 csum, le32 flags (1 internal, 2 leaf), le64 blocknr,
    le32 nr_entries, le32 max_entries, le32 value_size, le32 padding,
    le64 keys[max_entries], then values[max_entries] of value_size bytes

``max_entries`` is the kernel's ``calc_max_entries``: the most (key, value) pairs that fit,
rounded down to a multiple of three.  Internal nodes hold le64 child block numbers, keyed by
the lowest key below them; every node but a root holds at least ``max_entries // 3`` entries
(thin_check refuses less), which insertion (split in halves) and removal (rebalance with one or
two siblings, the kernel's thresholds) keep.

Trees are functional like the kernel's: every change takes a root and returns the new one,
shadowing (copy-on-write) the path it touches through the transaction manager.  A
:class:`BTreeInfo` with ``levels > 1`` is a tree of trees: the values of the upper levels are
roots of the level below (thin's device -> (block -> mapping) tree).  Values are bytes; a
:class:`ValueType` says how to take and drop references on what a value points at, which is
all that differs between a tree of data mappings, of subtree roots or of plain records.
"""
import struct
import sys
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence

from .block_manager import Block
from .errors import MetadataError, NoData
from .transaction_manager import TransactionManager
from .validators import BTREE_NODE

INTERNAL_NODE = 1
LEAF_NODE = 2
NODE_HEADER_SIZE = 32
_HEADER = struct.Struct("<IIQIIII")
_FLAGS = struct.Struct("<I")
_COUNTS = struct.Struct("<IIII")
_LITTLE = sys.byteorder == "little"


def calc_max_entries(value_size: int, block_size: int = 4096) -> int:
    """``calc_max_entries``: pairs that fit after the header, a multiple of three."""
    total = (block_size - NODE_HEADER_SIZE) // (8 + value_size)
    return 3 * (total // 3)


class Node:
    """A decoded btree node over its block's bytes: keys in an ``array('Q')``, values packed in
    one bytearray, and every change written through to ``raw`` at once.

    Writing through after each change leaves the slots past ``nr_entries`` holding what the
    kernel's memmoves leave there (a removed entry's stale copy, a split's moved half), so the
    blocks are the kernel's byte for byte, not only in their live entries.
    """

    __slots__ = ("flags", "max_entries", "value_size", "keys", "values", "raw")

    def __init__(self, flags: int, max_entries: int, value_size: int, keys: array | None = None,
                 values: bytearray | None = None, raw: bytearray | None = None):
        self.flags = flags
        self.max_entries = max_entries
        self.value_size = value_size
        self.keys = keys if keys is not None else array("Q")
        self.values = values if values is not None else bytearray()
        self.raw = raw
        if raw is not None:
            self.sync()

    @classmethod
    def decode(cls, data: bytearray) -> "Node":
        _csum, flags, _blocknr, nr, max_entries, value_size, _pad = _HEADER.unpack_from(data, 0)
        keys = array("Q")
        keys.frombytes(bytes(data[NODE_HEADER_SIZE:NODE_HEADER_SIZE + 8 * nr]))
        if not _LITTLE:
            keys.byteswap()
        vstart = NODE_HEADER_SIZE + 8 * max_entries
        n = cls(flags, max_entries, value_size, keys, bytearray(data[vstart:vstart + value_size * nr]))
        n.raw = data
        return n

    def sync(self) -> None:
        """Write the header and the live entries into ``raw`` (nothing past them)."""
        data = self.raw
        if data is None:
            return
        nr = len(self.keys)
        # csum and blocknr are left alone: the validator stamps them when the block is written
        _FLAGS.pack_into(data, 4, self.flags)
        _COUNTS.pack_into(data, 16, nr, self.max_entries, self.value_size, 0)
        keys = self.keys
        if not _LITTLE:
            keys = array("Q", keys)
            keys.byteswap()
        data[NODE_HEADER_SIZE:NODE_HEADER_SIZE + 8 * nr] = keys.tobytes()
        vstart = NODE_HEADER_SIZE + 8 * self.max_entries
        data[vstart:vstart + len(self.values)] = self.values

    def encode(self, data: bytearray) -> None:
        if data is not self.raw:
            self.raw = data
        self.sync()

    def copy(self) -> "Node":
        return Node(self.flags, self.max_entries, self.value_size, array("Q", self.keys), bytearray(self.values))

    @property
    def is_leaf(self) -> bool:
        return bool(self.flags & LEAF_NODE)

    @property
    def nr_entries(self) -> int:
        return len(self.keys)

    def value(self, i: int) -> bytes:
        vs = self.value_size
        return bytes(self.values[i * vs:(i + 1) * vs])

    def value64(self, i: int) -> int:
        return int.from_bytes(self.values[i * 8:i * 8 + 8], "little")

    def set_value(self, i: int, value: bytes) -> None:
        vs = self.value_size
        self.values[i * vs:(i + 1) * vs] = value
        if self.raw is not None:
            at = NODE_HEADER_SIZE + 8 * self.max_entries + i * vs
            self.raw[at:at + vs] = value

    def set_value64(self, i: int, v: int) -> None:
        self.set_value(i, v.to_bytes(8, "little"))

    def set_key(self, i: int, key: int) -> None:
        self.keys[i] = key
        if self.raw is not None:
            at = NODE_HEADER_SIZE + 8 * i
            self.raw[at:at + 8] = key.to_bytes(8, "little")

    def lower_bound(self, key: int) -> int:
        """Index of the last key <= ``key``, -1 if none (the kernel's ``lower_bound``)."""
        return bisect_right(self.keys, key) - 1

    def insert_at(self, i: int, key: int, value: bytes) -> None:
        self.keys.insert(i, key)
        vs = self.value_size
        self.values[i * vs:i * vs] = value
        self.sync()

    def delete_at(self, i: int) -> None:
        del self.keys[i]
        vs = self.value_size
        del self.values[i * vs:(i + 1) * vs]
        self.sync()

    def take(self, start: int, end: int) -> tuple[array, bytearray]:
        vs = self.value_size
        return self.keys[start:end], self.values[start * vs:end * vs]

    def set_entries(self, keys: array, values: bytearray) -> None:
        self.keys = keys
        self.values = values
        self.sync()

    def full(self) -> bool:
        return len(self.keys) >= self.max_entries


class ValueType:
    """How a tree's values hold references: ``inc``/``dec`` on one value, ``equal`` to skip a dec."""

    def __init__(self, size: int, inc: Callable[[bytes], None] | None = None,
                 dec: Callable[[bytes], None] | None = None,
                 equal: Callable[[bytes, bytes], bool] | None = None):
        self.size = size
        self.inc = inc
        self.dec = dec
        self.equal = equal


def le64(v: int) -> bytes:
    return v.to_bytes(8, "little")


def node_of(blk: Block) -> Node:
    """The decoded view of a node block (decoded once, then kept on the block)."""
    n = blk.view
    if n is None:
        n = blk.view = Node.decode(blk.data)
    return n


class BTreeInfo:
    """A btree family: the transaction manager, the number of levels and the bottom value type."""

    def __init__(self, tm: TransactionManager, value_type: ValueType, levels: int = 1):
        if levels < 1:
            raise ValueError("a btree has at least one level")
        self.tm = tm
        self.levels = levels
        self.value_type = value_type
        # upper levels of a multi-level tree hold subtree roots: a reference per block
        self.le64_type = ValueType(8, inc=lambda v: tm.inc(int.from_bytes(v, "little")),
                                   dec=lambda v: tm.dec(int.from_bytes(v, "little")))

    def _vt(self, level: int) -> ValueType:
        return self.value_type if level == self.levels - 1 else self.le64_type

    # -- reading ----------------------------------------------------------------------------

    def read_node(self, b: int) -> Node:
        return node_of(self.tm.peek(b, BTREE_NODE))

    def empty(self) -> int:
        """``dm_btree_empty``: a new root, an empty leaf; returns its block."""
        blk = self.tm.new_block(BTREE_NODE)
        blk.view = Node(LEAF_NODE, calc_max_entries(self.value_type.size), self.value_type.size, raw=blk.data)
        self.tm.unlock(blk)
        return blk.location

    def _lookup1(self, root: int, key: int) -> bytes | None:
        n = self.read_node(root)
        while not n.is_leaf:
            i = n.lower_bound(key)
            if i < 0:
                return None
            n = self.read_node(n.value64(i))
        i = n.lower_bound(key)
        if i < 0 or n.keys[i] != key:
            return None
        return n.value(i)

    def lookup(self, root: int, keys: Sequence[int]) -> bytes:
        """The value of ``keys`` (one per level); :class:`NoData` if absent."""
        v = self.lookup_or_none(root, keys)
        if v is None:
            raise NoData()
        return v

    def lookup_or_none(self, root: int, keys: Sequence[int]) -> bytes | None:
        if len(keys) != self.levels:
            raise ValueError("%d keys for a %d-level btree" % (len(keys), self.levels))
        for level, key in enumerate(keys):
            v = self._lookup1(root, key)
            if v is None or level == self.levels - 1:
                return v
            root = int.from_bytes(v, "little")
        return None

    def lookup_next(self, root: int, key: int) -> tuple[int, bytes] | None:
        """The first (key, value) at or after ``key`` in a one-level tree (``dm_btree_lookup_next``)."""
        for k, v in self.items(root, start=key):
            return k, v
        return None

    def items(self, root: int, start: int = 0) -> Iterator[tuple[int, bytes]]:
        """Every (key, value) of the top level in key order from ``start`` (``dm_btree_walk``)."""
        n = self.read_node(root)
        if n.is_leaf:
            i = max(n.lower_bound(start), 0)
            if i < n.nr_entries and n.keys[i] < start:
                i += 1
            for j in range(i, n.nr_entries):
                yield n.keys[j], n.value(j)
            return
        i = max(n.lower_bound(start), 0)
        children = [n.value64(j) for j in range(i, n.nr_entries)]
        for child in children:
            yield from self.items(child, start)

    def find_highest(self, root: int) -> tuple[int, bytes] | None:
        """The largest key of a one-level tree and its value (``dm_btree_find_highest_key``)."""
        n = self.read_node(root)
        while not n.is_leaf:
            if not n.nr_entries:
                return None
            n = self.read_node(n.value64(n.nr_entries - 1))
        if not n.nr_entries:
            return None
        return n.keys[n.nr_entries - 1], n.value(n.nr_entries - 1)

    def walk(self, root: int) -> Iterator[tuple[tuple[int, ...], bytes]]:
        """Every (keys per level, bottom value) of a multi-level tree, in key order."""
        yield from self._walk(root, 0, ())

    def _walk(self, root: int, level: int, prefix: tuple[int, ...]) -> Iterator[tuple[tuple[int, ...], bytes]]:
        for k, v in self.items(root):
            if level == self.levels - 1:
                yield prefix + (k,), v
            else:
                yield from self._walk(int.from_bytes(v, "little"), level + 1, prefix + (k,))

    def count_entries(self, root: int) -> int:
        n = self.read_node(root)
        if n.is_leaf:
            return n.nr_entries
        return sum(self.count_entries(n.value64(i)) for i in range(n.nr_entries))

    def nodes(self, root: int) -> Iterator[tuple[int, Node]]:
        """Every node block of a one-level tree (block, node), parents first."""
        n = self.read_node(root)
        yield root, n
        if not n.is_leaf:
            for i in range(n.nr_entries):
                yield from self.nodes(n.value64(i))

    # -- shadowing --------------------------------------------------------------------------

    def _inc_children(self, n: Node, vt: ValueType) -> None:
        """A shared node was copied: everything it points at gains a referrer."""
        if not n.is_leaf:
            for i in range(n.nr_entries):
                self.tm.inc(n.value64(i))
        elif vt.inc is not None:
            for i in range(n.nr_entries):
                vt.inc(n.value(i))

    def _shadow(self, b: int, vt: ValueType) -> tuple[int, Node]:
        blk, inc = self.tm.shadow_block(b, BTREE_NODE)
        n = node_of(blk)
        self.tm.unlock(blk)
        if inc:
            self._inc_children(n, vt)
        return blk.location, n

    def _new_node(self, like: Node, keys: array, values: bytearray) -> tuple[int, Node]:
        blk = self.tm.new_block(BTREE_NODE)
        n = blk.view = Node(like.flags, like.max_entries, like.value_size, keys, values, raw=blk.data)
        self.tm.unlock(blk)
        return blk.location, n

    # -- insert -----------------------------------------------------------------------------

    def _insert_raw(self, root: int, vt: ValueType, key: int,
                    parent: Node | None, parent_i: int) -> tuple[int, Node, int]:
        """Walk down from ``root`` shadowing, making room in full nodes; (new root, leaf, index to insert at).

        ``parent``/``parent_i`` is the upper-level leaf slot holding ``root`` (patched to the shadow).
        """
        top = True
        new_root = -1
        loc = root
        while True:
            b, n = self._shadow(loc, vt)
            if parent is not None:
                parent.set_value64(parent_i, b)
            if top:
                new_root = b
            if not self._has_space_for_insert(n, key):
                if top:
                    # the walk goes on from the root, now internal over the two halves, so that
                    # a key below the lowest lowers the root's first key on the way down
                    self._split_beneath(n)
                else:
                    assert parent is not None
                    n = self._rebalance_or_split(parent, parent_i, n, vt, key)
            i = n.lower_bound(key)
            if n.is_leaf:
                break
            if i < 0:
                n.set_key(0, key)
                i = 0
            parent, parent_i = n, i
            loc = n.value64(i)
            top = False
        if i < 0 or n.keys[i] != key:
            i += 1
        return new_root, n, i

    @staticmethod
    def _has_space_for_insert(n: Node, key: int) -> bool:
        """A full leaf still takes an overwrite of a key it holds (``has_space_for_insert``)."""
        if not n.full():
            return True
        if n.is_leaf:
            i = n.lower_bound(key)
            return i >= 0 and n.keys[i] == key
        return False

    def _split_beneath(self, n: Node) -> None:
        """A full root: its entries go to two new children, the root becomes internal over them
        (``btree_split_beneath``; the spine stays at the root: with the old kernels' step down to
        the child, a key below the lowest left the root's first key above it, unreachable)."""
        nr = n.nr_entries
        nr_left = nr // 2
        lb, left = self._new_node(n, *n.take(0, nr_left))
        rb, right = self._new_node(n, *n.take(nr_left, nr))
        n.flags = INTERNAL_NODE
        n.value_size = 8
        n.max_entries = calc_max_entries(8)
        n.set_entries(array("Q", [left.keys[0], right.keys[0]]), bytearray(le64(lb) + le64(rb)))

    # SPACE_THRESHOLD: a sibling with fewer free entries is not worth moving entries to
    SPACE_THRESHOLD = 8

    def _rebalance_or_split(self, parent: Node, pi: int, n: Node, vt: ValueType, key: int) -> Node:
        """Make room in a full non-root node (dm-btree.c ``rebalance_or_split``): move entries to an
        unshared sibling with room, else split one node into two (at either end of the parent, or
        next to a shared sibling) or two into three; returns the node now covering ``key``."""
        tm = self.tm
        nr_parent = parent.nr_entries
        left_shared = right_shared = False
        if pi > 0:
            lb = parent.value64(pi - 1)
            left_shared = tm.ref(lb) > 1
            if not left_shared:
                sib = self.read_node(lb)
                if sib.max_entries - sib.nr_entries >= self.SPACE_THRESHOLD:
                    left = self._shadow_child(parent, pi - 1, vt)
                    self._redistribute(parent, pi - 1, [left, n])
                    return left if key < n.keys[0] else n
        if pi < nr_parent - 1:
            rb = parent.value64(pi + 1)
            right_shared = tm.ref(rb) > 1
            if not right_shared:
                sib = self.read_node(rb)
                if sib.max_entries - sib.nr_entries >= self.SPACE_THRESHOLD:
                    right = self._shadow_child(parent, pi + 1, vt)
                    self._redistribute(parent, pi, [n, right])
                    return n if key < right.keys[0] else right
        if left_shared or right_shared or nr_parent <= 2 or pi == 0 or pi + 1 == nr_parent:
            # split_one_into_two
            _rb, right = self._new_node(n, array("Q"), bytearray())
            parent.insert_at(pi + 1, 0, le64(_rb))
            self._redistribute(parent, pi, [n, right])
            return n if key < right.keys[0] else right
        # split_two_into_three: the node and its left sibling, a new middle between them
        left = self._shadow_child(parent, pi - 1, vt)
        mb, middle = self._new_node(n, array("Q"), bytearray())
        parent.insert_at(pi, 0, le64(mb))
        self._redistribute(parent, pi - 1, [left, middle, n], three=True)
        if key < middle.keys[0]:
            return left
        return middle if key < n.keys[0] else n

    @staticmethod
    def _redistribute(parent: Node, first: int, nodes: list[Node], three: bool = False) -> None:
        """Spread the entries of adjacent siblings (``redistribute2``/``redistribute3``) and fix the
        parent's keys; ``first`` is the parent index of ``nodes[0]``."""
        keys = array("Q")
        values = bytearray()
        for m in nodes:
            keys += m.keys
            values += m.values
        total = len(keys)
        if three:
            t_left = total // 3
            t_center = (total - t_left) // 2
            sizes = [t_left, t_center, total - t_left - t_center]
        else:
            sizes = [total // 2, total - total // 2]
        vs = nodes[0].value_size
        at = 0
        for j, (m, size) in enumerate(zip(nodes, sizes, strict=True)):
            m.set_entries(keys[at:at + size], values[at * vs:(at + size) * vs])
            if j:
                parent.set_key(first + j, m.keys[0])
            at += size

    def insert(self, root: int, keys: Sequence[int], value: bytes) -> tuple[int, bool]:
        """``dm_btree_insert_notify``: (new root, whether the key was new).

        Overwriting drops the old value's reference unless ``equal`` says it is the same.
        """
        if len(keys) != self.levels:
            raise ValueError("%d keys for a %d-level btree" % (len(keys), self.levels))
        if len(value) != self.value_type.size:
            raise ValueError("value of %d bytes for a tree of %d-byte values" % (len(value), self.value_type.size))
        parent: Node | None = None
        parent_i = -1
        new_root = -1
        block = root
        for level in range(self.levels):
            last = level == self.levels - 1
            vt = self._vt(level)
            r, n, i = self._insert_raw(block, vt, keys[level], parent, parent_i)
            if level == 0:
                new_root = r
            need_insert = i >= n.nr_entries or n.keys[i] != keys[level]
            if not last:
                if need_insert:
                    sub = BTreeInfo(self.tm, self.value_type).empty() if level == self.levels - 2 \
                        else BTreeInfo(self.tm, self.le64_type).empty()
                    n.insert_at(i, keys[level], le64(sub))
                parent, parent_i = n, i
                block = n.value64(i)
                continue
            if need_insert:
                n.insert_at(i, keys[level], value)
                return new_root, True
            old = n.value(i)
            if vt.dec is not None and (vt.equal is None or not vt.equal(old, value)):
                vt.dec(old)
            n.set_value(i, value)
            return new_root, False
        raise AssertionError("unreachable")

    # -- remove -----------------------------------------------------------------------------

    def remove(self, root: int, keys: Sequence[int]) -> int:
        """``dm_btree_remove``: the new root; :class:`NoData` (nothing changed) if ``keys`` is absent."""
        if self.lookup_or_none(root, keys) is None:
            raise NoData()
        parent: Node | None = None
        parent_i = -1
        new_root = -1
        block = root
        for level in range(self.levels):
            vt = self._vt(level)
            r, n, i = self._remove_raw(block, vt, keys[level], parent, parent_i)
            if level == 0:
                new_root = r
            if i < 0 or i >= n.nr_entries or n.keys[i] != keys[level]:
                raise MetadataError("btree remove: key %d vanished during rebalancing" % keys[level])
            if level != self.levels - 1:
                parent, parent_i = n, i
                block = n.value64(i)
                continue
            if vt.dec is not None:
                vt.dec(n.value(i))
            n.delete_at(i)
        return new_root

    def _remove_raw(self, root: int, vt: ValueType, key: int,
                    parent: Node | None, parent_i: int) -> tuple[int, Node, int]:
        top = True
        new_root = -1
        loc = root
        while True:
            b, n = self._shadow(loc, vt)
            if parent is not None:
                parent.set_value64(parent_i, b)
            if top:
                new_root = b
            if n.is_leaf:
                return new_root, n, n.lower_bound(key)
            self._rebalance_children(n, vt, key)
            if n.is_leaf:
                return new_root, n, n.lower_bound(key)
            i = n.lower_bound(key)
            if i < 0:
                raise NoData()
            parent, parent_i = n, i
            loc = n.value64(i)
            top = False

    def remove_leaves(self, root: int, first_key: int, end_key: int) -> tuple[int, int, int]:
        """``dm_btree_remove_leaves`` on a one-level tree: remove the keys from ``first_key`` on
        while they are present and below ``end_key``; (new root, how many, the next key).

        Each removal walks down on its own (``remove_one``), and the last, failing, walk still
        shadows and rebalances its path, as the kernel's does."""
        if self.levels != 1:
            raise ValueError("remove_leaves works on one-level trees")
        removed = 0
        vt = self.value_type
        while True:
            root, n, index = self._remove_nearest(root, vt, first_key)
            if n is None:
                break
            if index < 0:
                index = 0
            if index >= n.nr_entries:
                break
            k = n.keys[index]
            if not first_key <= k < end_key:
                break
            if vt.dec is not None:
                vt.dec(n.value(index))
            n.delete_at(index)
            removed += 1
            first_key = k + 1
        return root, removed, first_key

    def _remove_nearest(self, root: int, vt: ValueType, key: int) -> tuple[int, Node | None, int]:
        """``remove_nearest``: shadow and rebalance down to the leaf for ``key``; (new root, the
        leaf or None if an internal level has nothing at or below ``key``, lower bound in it)."""
        top = True
        new_root = root
        parent: Node | None = None
        parent_i = -1
        loc = root
        while True:
            b, n = self._shadow(loc, vt)
            if parent is not None:
                parent.set_value64(parent_i, b)
            if top:
                new_root = b
            if n.is_leaf:
                return new_root, n, n.lower_bound(key)
            try:
                self._rebalance_children(n, vt, key)
            except NoData:
                return new_root, None, -1
            if n.is_leaf:
                return new_root, n, n.lower_bound(key)
            i = n.lower_bound(key)
            if i < 0:
                return new_root, None, -1
            parent, parent_i = n, i
            loc = n.value64(i)
            top = False

    def _shadow_child(self, parent: Node, i: int, vt: ValueType) -> Node:
        b, n = self._shadow(parent.value64(i), vt)
        parent.set_value64(i, b)
        return n

    def _rebalance_children(self, n: Node, vt: ValueType, key: int) -> None:
        """Before descending into the child that holds ``key``, give it more than the minimum."""
        while n.nr_entries == 1 and not n.is_leaf:
            # a root with a single child takes the child's place: its bytes copied whole, as
            # the kernel's memcpy; a shared child's children gain this root as a referrer
            child_b = n.value64(0)
            child_blk = self.tm.peek(child_b, BTREE_NODE)
            child = node_of(child_blk)
            assert n.raw is not None
            n.raw[:] = child_blk.data
            n.flags, n.max_entries, n.value_size = child.flags, child.max_entries, child.value_size
            n.keys, n.values = array("Q", child.keys), bytearray(child.values)
            if self.tm.ref(child_b) > 1:
                self._inc_children(n, vt)
            self.tm.dec(child_b)
        if n.is_leaf:
            return
        i = n.lower_bound(key)
        if i < 0:
            raise NoData()
        if i == 0:
            self._rebalance2(n, 0, vt)
        elif i == n.nr_entries - 1:
            self._rebalance2(n, i - 1, vt)
        else:
            self._rebalance3(n, i - 1, vt)

    def _rebalance2(self, parent: Node, li: int, vt: ValueType) -> None:
        left = self._shadow_child(parent, li, vt)
        right = self._shadow_child(parent, li + 1, vt)
        self._rebalance2_nodes(parent, li, left, right)

    def _rebalance2_nodes(self, parent: Node, li: int, left: Node, right: Node) -> None:
        nl, nr = left.nr_entries, right.nr_entries
        threshold = 2 * (left.max_entries // 3 + 1)
        keys = left.keys + right.keys
        values = left.values + right.values
        if nl + nr < threshold:
            left.set_entries(keys, values)
            rb = parent.value64(li + 1)
            parent.delete_at(li + 1)
            self.tm.dec(rb)
        else:
            target_left = (nl + nr) // 2
            vs = left.value_size
            left.set_entries(keys[:target_left], values[:target_left * vs])
            right.set_entries(keys[target_left:], values[target_left * vs:])
            parent.set_key(li + 1, right.keys[0])

    def _rebalance3(self, parent: Node, li: int, vt: ValueType) -> None:
        left = self._shadow_child(parent, li, vt)
        center = self._shadow_child(parent, li + 1, vt)
        right = self._shadow_child(parent, li + 2, vt)
        if not left.max_entries == center.max_entries == right.max_entries:
            raise MetadataError("bad btree metadata, max_entries differ")
        nl, nc, nr = left.nr_entries, center.nr_entries, right.nr_entries
        total = nl + nc + nr
        vs = left.value_size
        keys = left.keys + center.keys + right.keys
        values = left.values + center.values + right.values
        t = left.max_entries // 3
        if total < 4 * t + 1:
            # delete the center node: left fills up, the rest goes to right, then balance the two
            to_left = nl + min(left.max_entries - nl, nc)
            left.set_entries(keys[:to_left], values[:to_left * vs])
            right.set_entries(keys[to_left:], values[to_left * vs:])
            cb = parent.value64(li + 1)
            parent.set_key(li + 2, right.keys[0])
            parent.delete_at(li + 1)
            self.tm.dec(cb)
            self._rebalance2_nodes(parent, li, left, right)
            return
        target_right = total // 3
        target_left = target_right + (1 if target_right * 3 != total else 0)
        c_end = total - target_right
        left.set_entries(keys[:target_left], values[:target_left * vs])
        center.set_entries(keys[target_left:c_end], values[target_left * vs:c_end * vs])
        right.set_entries(keys[c_end:], values[c_end * vs:])
        parent.set_key(li + 1, center.keys[0])
        parent.set_key(li + 2, right.keys[0])

    # -- delete -----------------------------------------------------------------------------

    def delete(self, root: int) -> None:
        """``dm_btree_del``: drop a whole tree; shared subtrees only lose one reference."""
        self._del(root, 0)

    def _del(self, b: int, level: int) -> None:
        tm = self.tm
        if tm.ref(b) > 1:
            tm.dec(b)
            return
        n = self.read_node(b)
        if not n.is_leaf:
            for i in range(n.nr_entries):
                self._del(n.value64(i), level)
        elif level < self.levels - 1:
            for i in range(n.nr_entries):
                self._del(n.value64(i), level + 1)
        elif self.value_type.dec is not None:
            for i in range(n.nr_entries):
                self.value_type.dec(n.value(i))
        tm.dec(b)
