"""The pytest plugin's fixtures (dm, dm_sync, images), used from a fresh test file."""
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
