"""Timing with warm-up and the statistics reported for it: median and spread over repeats.

The median is the headline (robust to one slow repeat caused by the OS); the spread is the
interquartile range relative to the median, plus min and max. Percentiles interpolate linearly
between order statistics (numpy.percentile's default "linear" method).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100), linear interpolation between sorted samples."""
    if not samples:
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q={q} is outside [0, 100]")
    xs = sorted(samples)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Timing:
    """Seconds per call over `repeats` timed calls after `warmup` untimed ones."""

    median: float
    minimum: float
    maximum: float
    iqr: float  # 75th minus 25th percentile
    repeats: int
    warmup: int
    samples: list[float] = field(default_factory=list)
    warmup_s: list[float] = field(default_factory=list)  # the untimed calls' seconds, for the record

    @property
    def rel_spread(self) -> float:
        """IQR / median: 0.05 means the middle half of the repeats spans 5% of the median (about
        +-2.5% around it when the spread is symmetric)."""
        return self.iqr / self.median if self.median > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rel_spread"] = self.rel_spread
        return d


def summarize(samples: Sequence[float], warmup: int = 0, warmup_s: Sequence[float] = ()) -> Timing:
    """Median, min, max and IQR of per-call times (`warmup_s`: the warm-up calls' times, kept
    beside the samples but never part of the statistics)."""
    if not samples:
        raise ValueError("no timing samples to summarize")
    if any(s < 0 or not math.isfinite(s) for s in samples):
        raise ValueError(f"timing samples must be finite and non-negative, got {list(samples)}")
    return Timing(
        median=percentile(samples, 50.0),
        minimum=min(samples),
        maximum=max(samples),
        iqr=percentile(samples, 75.0) - percentile(samples, 25.0),
        repeats=len(samples),
        warmup=warmup,
        samples=[float(s) for s in samples],
        warmup_s=[float(s) for s in warmup_s],
    )


# Warm-up until settled (`settled`, `time_call(settle_max=...)`): a call no faster than the best
# before it by more than this fraction says the time has stopped falling. Hugging Face's CPU
# training step kept falling for five calls after one warm-up call (2.36, 2.06, 1.80, 1.70,
# 1.53 s in one run on the AVX-512 EPYC), so its first timed calls were its slowest.
SETTLE_TOL = 0.03


def settled(warm_s: Sequence[float], tol: float = SETTLE_TOL) -> bool:
    """Whether the last of these warm-up times is no new best by more than `tol`: the time has
    stopped falling (needs two calls at least)."""
    return len(warm_s) >= 2 and warm_s[-1] >= (1.0 - tol) * min(warm_s[:-1])


def warm_up(fn: Callable[[], object], *, min_calls: int = 2, max_calls: int = 8,
            sync: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Untimed calls of `fn` until `settled` (at least `min_calls`, at most `max_calls`); their seconds."""
    if not 1 <= min_calls <= max_calls:
        raise ValueError(f"need 1 <= min_calls <= max_calls, got {min_calls} and {max_calls}")
    sync = sync or (lambda: None)
    warm_s: list[float] = []
    while len(warm_s) < max_calls and not (len(warm_s) >= min_calls and settled(warm_s)):
        start = clock()
        fn()
        sync()
        warm_s.append(clock() - start)
    return warm_s


def time_call(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5, budget_s: float | None = None,
              min_repeats: int = 2, sync: Callable[[], None] | None = None, slow_s: float | None = None,
              settle_max: int | None = None, clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Time `fn()`: `warmup` untimed calls, then up to `repeats` timed ones.

    `settle_max`: keep warming up after the `warmup` calls until the time has stopped falling
    (`settled`), up to `settle_max` warm-up calls in all, and no longer once the warm-ups have
    used `budget_s`.

    `budget_s` stops repeating once the timed calls have used that much time (after at least
    `min_repeats`), so a slow configuration costs a bounded time. `sync` runs before each clock
    read (torch.cuda.synchronize on CUDA: kernels are asynchronous, and the clock must wait).
    `slow_s`: if the first warm-up call takes longer, it stays a warm-up (a first call can pay
    one-time costs: allocation, kernel selection, caches), the other warm-ups are dropped, and the
    timed calls stop as soon as they have used `budget_s` (or `slow_s` without a budget), after
    at least one: a slow call costs one warm-up and one timed call, and what is reported is a warm
    call, never the cold one (whose time is kept in `warmup_s`).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    sync = sync or (lambda: None)
    if settle_max is not None and settle_max < max(warmup, 1):
        raise ValueError(f"need settle_max >= warmup (and >= 1), got settle_max={settle_max}, warmup={warmup}")
    warm_s: list[float] = []
    for i in range(warmup if settle_max is None else settle_max):
        if i >= warmup and (settled(warm_s) or (budget_s is not None and sum(warm_s) >= budget_s)):
            break
        start = clock()
        fn()
        sync()
        warm_s.append(clock() - start)
        if i == 0 and slow_s is not None and warm_s[0] > slow_s:
            # One call already costs more than a whole measurement may: time one more (warm) call
            # and stop there unless it turns out fast, rather than spend minutes on repeats.
            min_repeats = 1
            budget_s = budget_s if budget_s is not None else slow_s
            break
    samples: list[float] = []
    spent = 0.0
    for _ in range(repeats):
        start = clock()
        fn()
        sync()
        dt = clock() - start
        samples.append(dt)
        spent += dt
        if budget_s is not None and spent >= budget_s and len(samples) >= min_repeats:
            break
    return summarize(samples, warmup=len(warm_s), warmup_s=warm_s)


def spread(values: Sequence[float]) -> dict:
    """n, min, max and IQR (75th minus 25th percentile) of a list of values, e.g. pair ratios."""
    if not values:
        raise ValueError("spread of an empty list")
    return {"n": len(values), "min": min(values), "max": max(values),
            "iqr": percentile(values, 75.0) - percentile(values, 25.0)}


def spread_text(values: Sequence[float]) -> str:
    """'range 0.52-0.63, IQR 0.04' (three significant digits)."""
    s = spread(values)
    return f"range {s['min']:.3g}-{s['max']:.3g}, IQR {s['iqr']:.2g}"


def rate(work: float, timing: Timing) -> float:
    """Units of `work` per second at the median time."""
    return work / timing.median if timing.median > 0 else float("inf")
