"""pytest plugin (entry point ``pytest11``): dm devices in tests, no root, no FUSE.

Fixtures:

``dm``
    an :class:`dmsim.api.AsyncDM` over a fresh manager, for ``async def`` tests (pytest-trio);
    every device is removed at the end.  Image files print as device numbers (``240:N``;
    ``dm.image_ref(path)`` is the string to expect, ``dm.image_path("240:0")`` the file);
    a test marked ``@pytest.mark.dmsim_image_paths`` gets paths instead.
``dm_sync``
    the blocking :class:`dmsim.api.DM`, for plain tests.
``images``
    a factory of image files in the test's tmp_path: ``images.zero(mib=1)``,
    ``images.random(mib=1, seed=0)`` (the conformance cases' generator),
    ``images.of(data)``; sizes may also be given as ``sectors=``.
``snapshot_stack``
    an async factory of snapshot stacks (origin + snapshot devices over image files,
    persistent COW), with ``merge()``; ``origin_first=True`` creates the origin device
    before the snapshot, which is then suspended and resumed around the snapshot's
    creation (the kernel's rule: see ``dmsim.snapshots.take_snapshot``).
``thin_pool``
    an async factory of thin pools over two fresh image files (``dmsim.thin.create_pool``):
    ``pool = await thin_pool(data_mib=64)``; its thin devices and the pool are removed at the
    end, the test passing or not.
"""
from __future__ import annotations

import os
import random

import pytest

from .bio import SECTOR_SIZE


class ImageFactory:
    def __init__(self, directory):
        self.dir = str(directory)
        self.count = 0

    def _path(self, name):
        self.count += 1
        return os.path.join(self.dir, name or "disk%d.img" % self.count)

    @staticmethod
    def _size(mib, sectors):
        return sectors * SECTOR_SIZE if sectors is not None else int(mib * (1 << 20))

    def zero(self, mib: float = 1, sectors: int | None = None, name: str | None = None) -> str:
        """A sparse all-zero image."""
        path = self._path(name)
        with open(path, "wb") as f:
            f.truncate(self._size(mib, sectors))
        return path

    def random(self, mib: float = 1, seed: int = 0, sectors: int | None = None, name: str | None = None) -> str:
        """Pseudo-random contents: each MiB is ``random.Random(seed).randbytes(1 MiB)`` from
        one generator, as the conformance ``disks`` files define it."""
        path = self._path(name)
        size = self._size(mib, sectors)
        gen = random.Random(seed)
        with open(path, "wb") as f:
            left = size
            while left > 0:
                block = gen.randbytes(1 << 20)
                f.write(block[:left])
                left -= len(block)
        return path

    def of(self, data: bytes, name: str | None = None) -> str:
        """An image holding ``data`` (padded with zeros to whole sectors)."""
        path = self._path(name)
        pad = -len(data) % SECTOR_SIZE
        with open(path, "wb") as f:
            f.write(bytes(data) + bytes(pad))
        return path


def pytest_configure(config):
    config.addinivalue_line("markers", "dmsim_image_paths: the dm and dm_sync fixtures print image "
                                       "files by path instead of as 240:N device numbers")


def _image_numbers(request) -> bool | None:
    """False for a test marked ``dmsim_image_paths``; else the default (numbers)."""
    return False if request.node.get_closest_marker("dmsim_image_paths") else None


@pytest.fixture
def images(tmp_path):
    return ImageFactory(tmp_path)


@pytest.fixture
async def dm(request):
    from .api import open_dm

    async with open_dm(image_numbers=_image_numbers(request)) as d:
        yield d


@pytest.fixture
def dm_sync(request):
    from .api import DM

    with DM(image_numbers=_image_numbers(request)) as d:
        yield d


@pytest.fixture
async def snapshot_stack(dm, images):
    """Factory of snapshot stacks over image files (``dmsim.snapshots.take_snapshot``)::

        stack = await snapshot_stack(origin_mib=8, cow_mib=4)
        await dm.write(stack.origin_name, 0, b"new")   # the snapshot keeps the old data
        await stack.merge()                             # and merging puts it back
    """
    from types import SimpleNamespace

    from .snapshots import merge_snapshot, take_snapshot

    async def make(origin: str | None = None, origin_mib: float = 8, cow_mib: float = 4,
                   chunk_sectors: int = 8, store: str = "P", name: str = "snap",
                   origin_first: bool = False):
        origin = origin or images.random(mib=origin_mib, seed=1)
        cow = images.zero(mib=cow_mib)
        if origin_first:
            sectors = os.path.getsize(origin) // SECTOR_SIZE
            await dm.create(name + "-origin", "0 %d snapshot-origin %s" % (sectors, origin))
        origin_md, snap_md = await take_snapshot(dm.manager, origin, cow, name=name,
                                                 chunk_sectors=chunk_sectors, store=store)

        async def merge():
            return await merge_snapshot(dm.manager, name)

        return SimpleNamespace(origin=origin_md, snapshot=snap_md, origin_name=origin_md.name,
                               snapshot_name=name, origin_path=origin, cow_path=cow, merge=merge)

    yield make


@pytest.fixture
async def thin_pool(dm, images):
    """Factory of thin pools over image files (``dmsim.thin.create_pool``)::

        pool = await thin_pool(data_mib=64)
        vol = await pool.create_thin("vol", size_sectors=8192)
        snap = await pool.snapshot(vol, "snap")
    """
    from .thin import create_pool

    pools = []

    async def make(name: str = "pool", data_mib: float = 64, metadata_mib: float = 4,
                   block_sectors: int = 128, features: tuple[str, ...] = ()):
        meta = images.zero(mib=metadata_mib, name=name + "-meta.img")
        data = images.zero(mib=data_mib, name=name + "-data.img")
        pool = await create_pool(dm.manager, meta, data, name=name, block_sectors=block_sectors,
                                 features=features)
        pools.append(pool)
        return pool

    try:
        yield make
    finally:
        for pool in reversed(pools):       # thins first, then their pool; dm removes the rest
            await pool.close()
