"""The shared measuring loop: interleaved repetitions, medians, ratios, table + JSON output."""

from __future__ import annotations

import copy
import json
import math
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TypeVar

from torch import nn

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class Stats:
    """Timings of one case, in seconds.

    ``samples`` holds every timed run in round order, so two cases measured in the same
    `interleaved` call can be compared round by round (`paired_ratio`).
    """

    median: float
    min: float
    max: float
    runs: int
    samples: tuple[float, ...] = field(default=(), repr=False)


# Clocks for `interleaved`: wall time, or the CPU time of the calling thread. The latter leaves
# out the time the thread waits while other processes run, which on a shared machine is most
# of the noise; it sees all the work only when torch computes in the calling thread
# (``torch.set_num_threads(1)``).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


def interleaved(
    cases: Mapping[str, Callable[[], object]],
    repeats: int = 20,
    warmup: int = 3,
    *,
    clock: Callable[[], float] = time.perf_counter,
    best_of: int = 1,
) -> dict[str, Stats]:
    """Time each case ``repeats`` times, interleaved, after ``warmup`` rounds.

    Every round runs each case once, in a fresh random order (fixed seed), so that no case
    always runs first or right after the same other one (warm caches, allocator state).
    Interleaving spreads machine noise (other processes, frequency changes) evenly over the
    cases, so their ratios are far steadier than their absolute times. With ``best_of > 1``
    each sample is the fastest of that many back-to-back calls of its case, which drops most
    calls that another process interrupted.
    """
    names = list(cases)
    order = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        for name in order.sample(names, len(names)):
            fn = cases[name]
            elapsed = math.inf
            for _ in range(best_of):
                start = clock()
                fn()
                elapsed = min(elapsed, clock() - start)
            if round_ >= warmup:
                times[name].append(elapsed)
    return {
        name: Stats(statistics.median(t), min(t), max(t), len(t), tuple(t))
        for name, t in times.items()
    }


def paired_ratio(case: Stats, reference: Stats) -> float:
    """Median over rounds of ``case / reference`` (both from one `interleaved` call).

    Each round's two runs were taken moments apart, so a slow spell of the machine scales both;
    the median of the per-round ratios is steadier than the ratio of the medians.
    """
    ratios = [c / r for c, r in zip(case.samples, reference.samples, strict=True)]
    return statistics.median(ratios)


def overhead_ratio_interval(
    ours: Stats, theirs: Stats, base: Stats, level: float = 0.9, resamples: int = 2000
) -> tuple[float, float, float]:
    """The paired overhead ratio and a bootstrap confidence interval for it.

    The ratio is ``(paired_ratio(ours, base) - 1) / (paired_ratio(theirs, base) - 1)``: our
    overhead over the base as a fraction of theirs, each from per-round ratios. Rounds are
    resampled with replacement (``resamples`` times, fixed seed) and the interval is the
    central ``level`` of the resampled ratios. An interval that lies below a target settles
    it; one that straddles it says the machine's noise does.

    Returns:
        ``(ratio, low, high)``.
    """
    rounds = list(zip(ours.samples, theirs.samples, base.samples, strict=True))

    def ratio(sample: Sequence[tuple[float, float, float]]) -> float:
        mine = statistics.median(o / b for o, _, b in sample) - 1.0
        other = statistics.median(t / b for _, t, b in sample) - 1.0
        return mine / other if other > 0 else math.inf

    draw = random.Random(0)
    spread = sorted(ratio(draw.choices(rounds, k=len(rounds))) for _ in range(resamples))
    # round, not int: (1 - 0.9) / 2 * 2000 is 99.99999999999997 in floating point
    tail = round(resamples * (1.0 - level) / 2)
    return ratio(rounds), spread[tail], spread[resamples - 1 - tail]


def sharing_copy(model: M) -> M:
    """A deep copy of ``model``'s modules that shares its parameter and buffer tensors.

    Wrapping such copies lets lora_kit, PEFT and the bare base run on the very same weight
    memory, so differences in where each copy's weights landed (pages, cache sets) cannot
    masquerade as overhead.
    """
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, shared)


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


def stats_dict(stats: Stats) -> dict[str, object]:
    """A Stats as a plain dict (for JSON)."""
    return asdict(stats)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
