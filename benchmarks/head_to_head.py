"""The issues' ratios measured head to head: the two sides of each ratio alternate.

On a shared machine the speed drifts by 20-80% over minutes (the summary records both ends of
a run). The main tables time one backend's repeats and then the next backend's, minutes apart,
and the GEMM rates a step is divided by are measured at the start and the end of the run, so a
ratio of two of those numbers carries that drift. Here the two sides run in turns, one call each
per pair (the order swapped every other pair), and the ratio is the median over the pairs: drift
slower than a pair cancels in each pair's ratio.

Issue 4's ratios against Hugging Face (torch_impl and HF's GPT2LMHeadModel, `head_to_head`):

    train step:  ratio = median_i  t_ours(i) / t_hf(i)                 (lower is better)
    decoding:    ratio = median_i  t_hf(i) / t_ours(i)  = tok/s ours / tok/s HF   (higher)

A training step against the GEMM rate (issue 3's numpy float32 step, issue 4's bf16 step;
`step_against_peak`): each pair is one step and one measurement of the peak the step is divided
by, taken as machine.py takes it at the start of the run:

    fraction = median_i  (step FLOPs / t_step(i)) / GEMM rate(i)        (higher is better)
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


H2H_PAIRS = 9  # Hugging Face's step time spread 20-30% between pairs in one run; the median of 9 moves less than of 5


def head_to_head(config_name: str, config_d: dict, params: dict, B: int, T: int, *, pairs: int = H2H_PAIRS,
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


# The steps whose targets divide by a GEMM rate: issue 3's numpy float32 step, issue 4's bf16 step.
AGAINST_PEAK = ("numpy-float32", "torch-bf16")


def step_against_peak(config_name: str, config_d: dict, params: dict, B: int, T: int, backend: str, *,
                      pairs: int = 5, device: str = "cpu", quick: bool = False,
                      progress: Callable[[str], None] = lambda s: None) -> list[Result]:
    """One row, section "head_to_head": `backend`'s train step as a fraction of its peak GEMM rate,
    the two measured in alternation (see top)."""
    from benchmarks import machine
    from benchmarks.flops import training_flops

    ids, targets = batch(config_d, B, T)
    progress(f"step against the GEMM rate {config_name}: build {backend}")
    runner = make_runner(backend, config_d, params, ids, targets, device)
    if machine.peak_now(runner.peak_name, quick) is None:
        raise ValueError(f"{backend}: its peak {runner.peak_name!r} is not one machine.peak_now measures")
    rates: list[float] = []
    progress(f"step against the GEMM rate {config_name}: {backend} ({pairs} alternating pairs)")
    runner.train_step()  # warm-up, untimed
    step_s, _ = alternate(runner.train_step, lambda: rates.append(machine.peak_now(runner.peak_name, quick)), pairs,
                          sync=runner.sync)
    flops = training_flops(config_d, B, T)
    fractions = [flops / s / rate for s, rate in zip(step_s, rates)]
    ratio = statistics.median(fractions)
    return [Result("head_to_head", config_name, f"{backend} vs {runner.peak_name} GEMM", "train step / GEMM rate",
                   B=B, T=T, note=f"median of {pairs} alternating pairs: {ratio:.3f}",
                   extra={"ratio": ratio, "step_s": step_s, "gemm_flops_per_s": rates, "flops": flops,
                          "peak_name": runner.peak_name, "higher_is_better": True})]
