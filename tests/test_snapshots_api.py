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


async def test_origin_created_first_is_resumed_around_the_snapshot(dm, snapshot_stack):
    """Issue 11 item 7: with the origin device created before the snapshot, the
    fixture (take_snapshot) suspends and resumes it, so a multi-chunk origin write
    copies every chunk out, not only its first."""
    stack = await snapshot_stack(origin_mib=1, cow_mib=1, origin_first=True)
    before = await dm.read(stack.snapshot_name, 0, 64 << 10)
    await dm.write(stack.origin_name, 0, b"n" * (64 << 10))        # 16 chunks at once
    assert await dm.read(stack.snapshot_name, 0, 64 << 10) == before
    assert dm.status(stack.snapshot_name)[0].params == "144/2048 16"   # 16 + header + area


async def test_take_snapshot_resumes_every_origin_device_of_the_image(dm, images):
    """An origin device of another name over the same image is suspended and resumed
    around a new snapshot too: it copies out every chunk of a multi-chunk write."""
    from dmsim.snapshots import take_snapshot

    img, cow = images.random(mib=1, seed=3), images.zero(mib=1)
    await dm.create("disk", "0 2048 snapshot-origin %s" % img)
    await take_snapshot(dm.manager, img, cow, name="snap")
    assert sorted(dm.manager.devices) == ["disk", "snap", "snap-origin"]
    before = await dm.read("snap", 0, 32 << 10)
    await dm.write("disk", 0, b"d" * (32 << 10))
    assert await dm.read("snap", 0, 32 << 10) == before
