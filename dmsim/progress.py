"""Progress of a long background job, read from the status line as a user would:
a mirror's resync (``<in-sync>/<regions>``) or a snapshot-merge (allocated sectors
shrinking to the metadata sectors).  ``dmsim progress NAME`` shows it as a bar on a
terminal (tqdm) and as plain lines otherwise.
"""
from __future__ import annotations

import sys

import trio

from .table import TableLine


def job_state(lines: list[TableLine]) -> tuple[str, int, int] | None:
    """``(kind, remaining, total)`` of the first mirror or snapshot-merge line; for a merge
    ``total`` is the work still to do in sectors and grows no larger than first seen."""
    for ln in lines:
        words = ln.params.split()
        if ln.type == "mirror" and words and words[0].isdigit():
            legs = int(words[0])
            done, _, total = words[legs + 1].partition("/") if len(words) > legs + 1 else ("", "", "")
            if done.isdigit() and total.isdigit():
                return "resync", int(total) - int(done), int(total)
        if ln.type == "snapshot-merge" and len(words) == 2 and "/" in words[0]:
            used = int(words[0].split("/")[0])
            meta = int(words[1])
            return "merge", used - meta, used - meta
        if ln.type == "snapshot-merge" and ln.params in ("Invalid", "Merge failed", "Overflow"):
            raise RuntimeError("%s: %s" % (ln.type, ln.params))
    return None


async def follow(ctl, name: str, interval: float = 0.5, out=sys.stderr, bar: bool | None = None) -> int:
    """Poll ``name``'s status until its resync or merge is complete; return exit status."""
    if bar is None:
        bar = out.isatty()
    first_total = None
    last_pct = -1
    pbar = None
    try:
        while True:
            lines = await ctl.table_lines(name, "info") or []
            try:
                state = job_state(lines)
            except RuntimeError as e:
                print("dmsim progress: %s" % e, file=out)
                return 1
            if state is None:
                print("dmsim progress: %s has no mirror or snapshot-merge target" % name, file=out)
                return 1
            kind, remaining, total = state
            if first_total is None:
                first_total = max(total, 1)
            done = max(0, first_total - remaining) if kind == "merge" else total - remaining
            total_shown = first_total if kind == "merge" else total
            if bar:
                if pbar is None:
                    from tqdm import tqdm

                    pbar = tqdm(total=total_shown, desc="%s %s" % (name, kind), unit="region"
                                if kind == "resync" else "sector", file=out)
                pbar.n = done
                pbar.refresh()
            else:
                pct = 100 * done // max(total_shown, 1)
                if pct != last_pct:
                    print("%s %s: %d/%d (%d%%)" % (name, kind, done, total_shown, pct), file=out, flush=True)
                    last_pct = pct
            if remaining <= 0:
                return 0
            await trio.sleep(interval)
    finally:
        if pbar is not None:
            pbar.close()
