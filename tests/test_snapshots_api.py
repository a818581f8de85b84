"""The snapshot API in a few lines, through the pytest plugin's fixtures."""


async def test_snapshot_write_both_sides_and_merge(dm, snapshot_stack):
    stack = await snapshot_stack(origin_mib=2, cow_mib=1)
    before = await dm.read(stack.origin_name, 0, 8192)
    await dm.write(stack.origin_name, 100, b"origin side")
    await dm.write(stack.snapshot_name, 5000, b"snapshot side")
    assert await dm.read(stack.snapshot_name, 0, 4096) == before[:4096]       # old view kept
    assert await dm.read(stack.origin_name, 100, 11) == b"origin side"
    snap_view = await dm.read(stack.snapshot_name, 0, 2 << 20)
    await stack.merge()
    assert await dm.read(stack.origin_name, 0, 2 << 20) == snap_view          # merged back
    with open(stack.origin_path, "rb") as f:
        assert f.read() == snap_view
    assert dm.status(stack.origin_name)[0].type == "snapshot-origin"
