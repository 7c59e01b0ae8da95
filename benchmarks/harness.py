"""The shared measuring loop: interleaved repetitions, medians, ratios, table + JSON output."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Stats:
    """Timings of one case, in seconds."""

    median: float
    min: float
    max: float
    runs: int


def interleaved(
    cases: Mapping[str, Callable[[], object]], repeats: int = 20, warmup: int = 3
) -> dict[str, Stats]:
    """Time each case ``repeats`` times, interleaved A B C A B C ..., after ``warmup`` rounds.

    Interleaving spreads machine noise (other processes, frequency changes) evenly over the
    cases, so their ratios are far steadier than their absolute times.
    """
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(warmup + repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(elapsed)
    return {name: Stats(statistics.median(t), min(t), max(t), len(t)) for name, t in times.items()}


def fmt_seconds(seconds: float) -> str:
    """Human units: s, ms or µs."""
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def report(title: str, rows: Sequence[Mapping[str, object]], *, as_json: bool = False) -> None:
    """Print ``rows`` (dicts with the same keys) as an aligned table, or as one JSON line."""
    if as_json:
        print(json.dumps({"benchmark": title, "rows": list(map(dict, rows))}))
        return
    print(f"\n## {title}")
    if not rows:
        return
    keys = list(rows[0])
    cells = [[_cell(row[k]) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))


def stats_dict(stats: Stats) -> dict[str, float]:
    """A Stats as a plain dict (for JSON)."""
    return asdict(stats)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
