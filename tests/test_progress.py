"""dmsim progress: reading resync and merge progress off status lines."""
import io

import pytest

from dmsim.progress import follow, job_state
from dmsim.table import TableLine


def test_mirror_state():
    ln = TableLine(0, 131072, "mirror", "2 254:0 254:16 37/128 1 AA 1 core")
    assert job_state([ln]) == ("resync", 91, 128)


def test_merge_state_and_failure():
    assert job_state([TableLine(0, 8, "snapshot-merge", "184/32768 16")]) == ("merge", 168, 168)
    with pytest.raises(RuntimeError):
        job_state([TableLine(0, 8, "snapshot-merge", "Merge failed")])
    assert job_state([TableLine(0, 8, "linear", "")]) is None


class FakeControl:
    """Status lines of a resync advancing by 32 regions per poll."""

    def __init__(self):
        self.done = 0

    async def table_lines(self, name, kind):
        line = TableLine(0, 8, "mirror", "2 a b %d/128 1 AA 1 core" % self.done)
        self.done = min(128, self.done + 32)
        return [line]


async def test_follow_prints_until_in_sync(autojump_clock):
    out = io.StringIO()
    assert await follow(FakeControl(), "m", interval=1, out=out, bar=False) == 0
    assert out.getvalue().splitlines() == [
        "m resync: 0/128 (0%)", "m resync: 32/128 (25%)", "m resync: 64/128 (50%)",
        "m resync: 96/128 (75%)", "m resync: 128/128 (100%)"]


@pytest.fixture
def autojump_clock():
    import trio.testing
    return trio.testing.MockClock(autojump_threshold=0)
