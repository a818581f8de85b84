"""The pytest plugin's fixtures (dm, dm_sync, images, snapshot_stack), used from a fresh test file."""
import random

pytest_plugins = ["pytester"]

CONFTEST_INI = """
[pytest]
trio_mode = true
"""


def test_fixtures_in_a_fresh_test_file(pytester):
    pytester.makeini(CONFTEST_INI)
    pytester.makepyfile(test_user="""
        import random
        import pytest

        async def test_dm_async(dm, images):
            img = images.zero(mib=1)
            await dm.create("lz", "0 2048 linear %s 0" % img)
            await dm.write("lz", 512, b"abc")
            assert await dm.read("lz", 512, 3) == b"abc"
            assert await dm.dmsetup("ls") == "lz\\t(253:0)\\n"

        def test_dm_sync(dm_sync, images):
            img = images.of(b"xyz")
            dm_sync.create("d", "0 1 linear %s 0" % img)
            assert dm_sync.read("d", 0, 4) == b"xyz\\0"

        def test_images(images):
            a = images.random(mib=2, seed=7)
            data = open(a, "rb").read()
            gen = random.Random(7)
            assert data == gen.randbytes(1 << 20) + gen.randbytes(1 << 20)
            b = images.zero(sectors=3, name="small.img")
            assert b.endswith("small.img") and open(b, "rb").read() == bytes(1536)
            c = images.of(b"\\1" * 513)
            assert open(c, "rb").read() == b"\\1" * 513 + bytes(511)
            assert len({a, c}) == 2

        async def test_fresh_manager_each_test(dm):
            assert await dm.dmsetup("ls") == "No devices found\\n"
            await dm.create("lz", "0 8 zero")
    """)
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)


def test_image_numbers_by_default_and_paths_by_marker(pytester):
    """dm and dm_sync print image files as 240:N, which image_ref/image_path map; the
    dmsim_image_paths marker (registered: no warning under --strict-markers) gives paths;
    snapshot_stack's merge reloads a table printed with numbers."""
    pytester.makeini(CONFTEST_INI)
    pytester.makepyfile(test_user="""
        import os
        import pytest

        async def test_numbers(dm, images):
            img = images.zero(mib=1)
            await dm.create("lz", "0 2048 linear %s 0" % img)
            assert await dm.dmsetup("table", "lz") == "0 2048 linear 240:0 0\\n"
            assert dm.image_ref(img) == "240:0" and dm.image_path("240:0") == os.path.realpath(img)

        def test_numbers_sync(dm_sync, images):
            img = images.zero(mib=1)
            dm_sync.create("lz", "0 2048 linear %s 0" % img)
            assert dm_sync.table("lz")[0].params == "240:0 0"

        @pytest.mark.dmsim_image_paths
        async def test_paths(dm, images):
            img = images.zero(mib=1)
            await dm.create("lz", "0 2048 linear %s 0" % img)
            assert dm.table("lz")[0].params == "%s 0" % os.path.realpath(img)

        @pytest.mark.dmsim_image_paths
        def test_paths_sync(dm_sync, images):
            img = images.zero(mib=1)
            dm_sync.create("lz", "0 2048 linear %s 0" % img)
            assert dm_sync.table("lz")[0].params == "%s 0" % os.path.realpath(img)

        async def test_merge_over_numbers(dm, snapshot_stack):
            stack = await snapshot_stack(origin_mib=1, cow_mib=1)
            await dm.write(stack.snapshot_name, 0, b"new")
            assert dm.table(stack.snapshot_name)[0].params.startswith("240:")
            await stack.merge()
            assert (await dm.read(stack.origin_name, 0, 3)) == b"new"
    """)
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", "--strict-markers")
    result.assert_outcomes(passed=5)


def test_failing_user_test_is_reported(pytester):
    """The fixtures do not swallow a user's assertion."""
    pytester.makeini(CONFTEST_INI)
    pytester.makepyfile(test_user="""
        async def test_wrong(dm):
            await dm.create("lz", "0 8 zero")
            assert await dm.read("lz", 0, 1) == b"\\1"
    """)
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)


def test_random_image_matches_conformance_generator(tmp_path):
    from dmsim.pytest_plugin import ImageFactory

    path = ImageFactory(tmp_path).random(mib=1.5, seed=3)
    gen = random.Random(3)
    expected = gen.randbytes(1 << 20) + gen.randbytes(1 << 20)[: 1 << 19]
    with open(path, "rb") as f:
        assert f.read() == expected
