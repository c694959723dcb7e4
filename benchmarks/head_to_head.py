"""Issue 4's two ratios against Hugging Face, measured head to head: the calls alternate.

On a shared machine the speed drifts by 20-30% over minutes (the summary records both ends of
a run). The main tables time one backend's repeats and then the next backend's, minutes apart,
so a ratio of two of their medians carries that drift. Here torch_impl and Hugging Face run in
turns, one call each per pair (the order swapped every other pair), and the ratio is the median
over the pairs of (ours / theirs): drift slower than a pair cancels in each pair's ratio.

    train step:  ratio = median_i  t_ours(i) / t_hf(i)                 (lower is better)
    decoding:    ratio = median_i  t_hf(i) / t_ours(i)  = tok/s ours / tok/s HF   (higher)
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

from benchmarks.backends import make_runner
from benchmarks.bench_model import batch
from benchmarks.record import Result

OURS, THEIRS = "torch-fp32", "hf-fp32"


def alternate(ours: Callable[[], object], theirs: Callable[[], object], pairs: int,
              sync: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.perf_counter
              ) -> tuple[list[float], list[float]]:
    """Seconds of `pairs` calls of each, alternating (ours first in even pairs, theirs in odd)."""
    if pairs < 1:
        raise ValueError(f"need pairs >= 1, got {pairs}")
    t_ours, t_theirs = [], []
    for i in range(pairs):
        order = ((ours, t_ours), (theirs, t_theirs)) if i % 2 == 0 else ((theirs, t_theirs), (ours, t_ours))
        for fn, out in order:
            start = clock()
            fn()
            sync()
            out.append(clock() - start)
    return t_ours, t_theirs


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median over pairs of numerator / denominator."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(f"need equal, non-empty lists, got {len(numerators)} and {len(denominators)}")
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def head_to_head(config_name: str, config_d: dict, params: dict, B: int, T: int, *, pairs: int = 5,
                 decode_tokens: int = 32, device: str = "cpu", progress: Callable[[str], None] = lambda s: None
                 ) -> list[Result]:
    """Two rows, section "head_to_head": the train-step time ratio and the KV-decode tok/s ratio."""
    ids, targets = batch(config_d, B, T)
    progress(f"head to head {config_name}: build {OURS} and {THEIRS}")
    ours, theirs = (make_runner(b, config_d, params, ids, targets, device) for b in (OURS, THEIRS))
    rows = []
    for what, fn_ours, fn_theirs, higher_better in (
            ("train step time, ours / HF", ours.train_step, theirs.train_step, False),
            ("KV-cache decode tok/s, ours / HF", lambda: ours.decode(decode_tokens, True),
             lambda: theirs.decode(decode_tokens, True), True)):
        progress(f"head to head {config_name}: {what} ({pairs} alternating pairs)")
        fn_ours(), fn_theirs()  # warm-up, untimed
        t_ours, t_theirs = alternate(fn_ours, fn_theirs, pairs, sync=ours.sync)
        ratio = paired_ratio(t_theirs, t_ours) if higher_better else paired_ratio(t_ours, t_theirs)
        rows.append(Result("head_to_head", config_name, f"{OURS} vs {THEIRS}", what,
                           B=1 if higher_better else B, T=decode_tokens if higher_better else T,
                           note=f"median of {pairs} alternating pairs: {ratio:.3f}",
                           extra={"ratio": ratio, "ours_s": t_ours, "theirs_s": t_theirs,
                                  "higher_is_better": higher_better}))
    return rows
