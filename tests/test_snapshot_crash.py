"""Crash safety of the persistent COW: a child process writing through snapshot-origin and
to the snapshot is SIGKILLed at random points (50 trials); afterwards the COW activates,
the snapshot still shows the origin as it was, and every acknowledged write is there.

Run as a script (``python tests/test_snapshot_crash.py child DIR SEED DURABILITY``) it is
the child.  Both durability modes of image files are tried: ``fsync`` and ``process``
(no syncs at all: the page cache outlives a killed process).
"""
import os
import random
import subprocess
import sys

import pytest
import trio

SECTORS = 4096            # 2 MiB origin, 512 chunks of 8 sectors
CHUNK = 8
WORKERS = 4
OPS = 400
TRIALS = 50


def ops_for(seed):
    """(worker, kind 'o'|'s', sector, count, byte) -- each op inside one chunk; worker w
    owns the chunks c with c % WORKERS == w, so a worker's ops are ordered."""
    r = random.Random(seed)
    ops = []
    for i in range(OPS):
        w = i % WORKERS
        chunk = r.randrange(SECTORS // CHUNK // WORKERS) * WORKERS + w
        off = r.randrange(CHUNK)
        count = CHUNK if r.random() < 0.3 else r.randrange(1, CHUNK - off + 1)
        if count == CHUNK:
            off = 0
        ops.append((w, "o" if r.random() < 0.7 else "s", chunk * CHUNK + off, count, i % 255 + 1))
    return ops


def images(d, seed):
    o, c = os.path.join(d, "o.img"), os.path.join(d, "c.img")
    with open(o, "wb") as f:
        f.write(random.Random(seed).randbytes(SECTORS * 512))
    with open(c, "wb") as f:
        f.truncate(4 << 20)
    return o, c


def table(kind, o, c=None):
    from dmsim.table import TableLine
    return [TableLine(0, SECTORS, kind, "%s %s P %d" % (o, c, CHUNK) if c else o)]


async def child(d, seed, durability):
    import dmsim
    o, c = os.path.join(d, "o.img"), os.path.join(d, "c.img")
    ops = ops_for(seed)
    async with dmsim.open_manager(durability=durability) as m:
        m.create("s")
        await m.load("s", table("snapshot", o, c))
        await m.resume("s")
        m.create("o")
        await m.load("o", table("snapshot-origin", o))
        await m.resume("o")
        devs = {"o": m.find("o"), "s": m.find("s")}
        os.write(1, b"READY\n")

        async def worker(w):
            for i, (ww, kind, sector, count, byte) in enumerate(ops):
                if ww == w:
                    await devs[kind].write(sector, bytes([byte]) * (count * 512))
                    os.write(1, b"A %d\n" % i)     # one write(2): a kill cannot split it

        async with trio.open_nursery() as n:
            for w in range(WORKERS):
                n.start_soon(worker, w)
        os.write(1, b"DONE\n")
        await trio.sleep_forever()


async def verify(d, seed, acked):
    import dmsim
    o, c = os.path.join(d, "o.img"), os.path.join(d, "c.img")
    original = random.Random(seed).randbytes(SECTORS * 512)
    ops = ops_for(seed)
    want = {"o": bytearray(original), "s": bytearray(original)}
    unsure = {"o": set(), "s": set()}
    first_unacked = set()
    for i, (w, kind, sector, count, byte) in enumerate(ops):
        if i in acked:
            want[kind][sector * 512:(sector + count) * 512] = bytes([byte]) * (count * 512)
        elif w not in first_unacked:          # possibly in flight when killed
            first_unacked.add(w)
            unsure[kind].update(range(sector, sector + count))
    with open(o, "rb") as f:
        got_origin = f.read()
    async with dmsim.open_manager() as m:
        m.create("s")
        await m.load("s", table("snapshot", o, c))
        await m.resume("s")
        status = str(m.table_lines("s", "info")[0])
        assert "Invalid" not in status, status
        got_snap = await m.find("s").read(0, SECTORS)
    for kind, got in (("o", got_origin), ("s", got_snap)):
        for s in range(SECTORS):
            if s not in unsure[kind] and got[s * 512:(s + 1) * 512] != want[kind][s * 512:(s + 1) * 512]:
                raise AssertionError("trial %d: %s sector %d wrong (%s)" % (seed, kind, s, status))


async def one_trial(tmp, seed, durability, kill_window_s):
    d = os.path.join(tmp, "t%d" % seed)
    os.makedirs(d)
    images(d, seed)
    rng = random.Random(1000 + seed)
    proc = await trio.lowlevel.open_process(
        [sys.executable, os.path.abspath(__file__), "child", d, str(seed), durability],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    acked = set()
    buf = b""
    ready = False
    deadline = 0.0
    kill_after = rng.uniform(0.0, kill_window_s)
    with trio.move_on_after(60):
        while True:
            with trio.move_on_at(deadline if ready else trio.current_time() + 30) as scope:
                data = await proc.stdout.receive_some(65536)
                if not data:
                    break
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line == b"READY":
                        ready = True
                        deadline = trio.current_time() + kill_after
                    elif line.startswith(b"A "):
                        acked.add(int(line.split()[1]))
            if scope.cancelled_caught:
                break
    proc.kill()                                 # SIGKILL
    await proc.wait()
    # lines already written before the kill are acknowledged writes too
    with trio.move_on_after(5):
        while True:
            data = await proc.stdout.receive_some(65536)
            if not data:
                break
            buf += data
    for line in buf.split(b"\n")[:-1]:     # complete lines only
        if line.startswith(b"A "):
            acked.add(int(line.split()[1]))
    await verify(d, seed, acked)
    return len(acked)


@pytest.mark.parametrize("durability, kill_window_s", [("fsync", 0.25), ("process", 0.05)])
async def test_sigkill_during_writes_keeps_cow_consistent(tmp_path, durability, kill_window_s):
    results = []
    limiter = trio.CapacityLimiter(4)

    async def run(seed):
        async with limiter:
            results.append(await one_trial(str(tmp_path), seed, durability, kill_window_s))

    async with trio.open_nursery() as n:
        for seed in range(TRIALS):
            n.start_soon(run, seed)
    assert len(results) == TRIALS
    # the kill points really were spread out: some trials died early, some late
    assert min(results) < OPS // 4 and max(results) > 0


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    trio.run(child, sys.argv[2], int(sys.argv[3]), sys.argv[4])
