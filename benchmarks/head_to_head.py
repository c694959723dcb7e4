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
by, with machine.py's kernels and sizes (machine.peak_now: the best of at least 5 calls and of
0.3 s of calls, so that one interrupted GEMM call does not make the pair's rate low):

    fraction = median_i  (step FLOPs / t_step(i)) / max(GEMM rate(i), run peak)   (higher is better)

where the run peak is the higher of the run's start and end measurements (machine.remeasure;
`finish_against_peak` divides again once the end is known). A GEMM is the fastest thing the
machine does with these FLOPs, so a pair's own measurement below the run's peak says the GEMM
was slowed, not that the machine was slower: dividing by it would raise that pair's fraction
(the 14:03 run on the AVX-512 EPYC reported 0.619 with one pair's GEMM at 218 GFLOP/s against
a run peak of 412; 0.558 divided by the higher). Dividing by the higher can only lower a
fraction, never flatter it. Each row keeps every pair: the steps, the pair's GEMM rate, the
rate divided by and the fraction. The higher divisor can also make a pair's fraction too low
(a machine slowed through the pairs, measured quiet at the start): `pair_verdict` judges "NOT
met" on the fractions over the pairs' own rates, "met" on these, so neither rests on the choice.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

from benchmarks.backends import make_runner
from benchmarks.bench_model import batch
from benchmarks.record import Result
from benchmarks.stats import spread_text, warm_up

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


# Untimed calls before the pairs: until the time stops falling (stats.warm_up), within these.
WARMUP_MIN, WARMUP_MAX = 3, 8

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
        # Warm-up, untimed, each side until its time stops falling (stats.warm_up), each finished
        # before the next starts: on CUDA the first timed call would otherwise also wait for the
        # other's warm-up kernels. One warm-up call left Hugging Face's step still speeding up
        # over the first pairs (in 7 of 8 runs on the AVX-512 EPYC), which favoured ours there.
        warm_ours = warm_up(fn_ours, min_calls=WARMUP_MIN, max_calls=WARMUP_MAX, sync=ours.sync)
        warm_theirs = warm_up(fn_theirs, min_calls=WARMUP_MIN, max_calls=WARMUP_MAX, sync=ours.sync)
        t_ours, t_theirs = alternate(fn_ours, fn_theirs, pairs, sync=ours.sync)
        ratio = paired_ratio(t_theirs, t_ours) if higher_better else paired_ratio(t_ours, t_theirs)
        pair_ratios = [(b / a if higher_better else a / b) for a, b in zip(t_ours, t_theirs)]
        rows.append(Result("head_to_head", config_name, f"{OURS} vs {THEIRS}", what,
                           B=1 if higher_better else B, T=decode_tokens if higher_better else T,
                           note=f"median of {pairs} alternating pairs: {ratio:.3f} ({spread_text(pair_ratios)})",
                           extra={"ratio": ratio, "ours_s": t_ours, "theirs_s": t_theirs, "pair_ratios": pair_ratios,
                                  "warmup_ours_s": warm_ours, "warmup_theirs_s": warm_theirs,
                                  "first": [("ours" if i % 2 == 0 else "theirs") for i in range(pairs)],
                                  "higher_is_better": higher_better}))
    return rows


# The steps whose targets divide by a GEMM rate: issue 3's numpy float32 step, issue 4's bf16 step.
AGAINST_PEAK = ("numpy-float32", "torch-bf16")

# Steps timed back to back in each pair, their mean the pair's step time: numpy_ref's float32
# step alternates fast and slow when run back to back (1.59, 2.57, 1.61, 2.08, 1.58 s in one
# table on the AVX-512 EPYC), and one step after a GEMM call ran faster than any table step in 3
# of 6 runs: training's rate is the mean over consecutive steps, which two of them cover.
STEPS_PER_PAIR = 2


def step_against_peak(config_name: str, config_d: dict, params: dict, B: int, T: int, backend: str, *,
                      pairs: int = 5, steps_per_pair: int = STEPS_PER_PAIR, device: str = "cpu", quick: bool = False,
                      run_peaks: dict | None = None, progress: Callable[[str], None] = lambda s: None,
                      clock: Callable[[], float] = time.perf_counter) -> list[Result]:
    """One row, section "head_to_head": `backend`'s train step as a fraction of its peak GEMM rate,
    the two measured in alternation, each pair's step divided by the higher of the pair's GEMM
    rate and the run's measured peak for it so far (`run_peaks`, machine.py's "peaks"; see top).
    A pair's step time is the mean of `steps_per_pair` consecutive steps (see STEPS_PER_PAIR)."""
    if steps_per_pair < 1:
        raise ValueError(f"need steps_per_pair >= 1, got {steps_per_pair}")
    from benchmarks import machine
    from benchmarks.flops import training_flops

    ids, targets = batch(config_d, B, T)
    progress(f"step against the GEMM rate {config_name}: build {backend}")
    runner = make_runner(backend, config_d, params, ids, targets, device)
    if machine.peak_now(runner.peak_name, quick) is None:
        raise ValueError(f"{backend}: its peak {runner.peak_name!r} is not one machine.peak_now measures")
    rates: list[float] = []
    progress(f"step against the GEMM rate {config_name}: {backend} ({pairs} alternating pairs)")
    warm = warm_up(runner.train_step, min_calls=WARMUP_MIN, max_calls=WARMUP_MAX, sync=runner.sync, clock=clock)
    each: list[list[float]] = []  # each pair's consecutive steps

    def steps() -> None:
        t = []
        for _ in range(steps_per_pair):
            start = clock()
            runner.train_step()
            runner.sync()
            t.append(clock() - start)
        each.append(t)

    alternate(steps, lambda: rates.append(machine.peak_now(runner.peak_name, quick)), pairs, sync=runner.sync,
              clock=clock)
    step_s = [statistics.fmean(t) for t in each]
    row = Result("head_to_head", config_name, f"{backend} vs {runner.peak_name} GEMM", "train step / GEMM rate",
                 B=B, T=T, extra={"step_s": step_s, "steps_s": each, "warmup_s": warm,
                                  "gemm_flops_per_s": rates, "flops": training_flops(config_d, B, T),
                                  "peak_name": runner.peak_name, "higher_is_better": True,
                                  "first": [("step" if i % 2 == 0 else "gemm") for i in range(pairs)]})
    return [finish_against_peak(row, (run_peaks or {}).get(runner.peak_name))]


def finish_against_peak(row: Result, run_peak: float | None) -> Result:
    """(Re)compute a step_against_peak row's fractions, each pair's step FLOP rate over the higher
    of the pair's GEMM rate and `run_peak`; the runner calls it again with the peak of the whole
    run (start and end) once the end has been measured."""
    x = row.extra
    divisors = [max(rate, run_peak or 0.0) for rate in x["gemm_flops_per_s"]]
    fractions = [x["flops"] / s / d for s, d in zip(x["step_s"], divisors)]
    # Over the pair's own rate: what the pair alone says. A slow-down of the whole machine during
    # the pairs lowers `fractions` (divided by a quiet peak) but not these; report.pair_verdict
    # judges "NOT met" on these, "met" on `fractions`.
    own = [x["flops"] / s / r for s, r in zip(x["step_s"], x["gemm_flops_per_s"])]
    ratio = statistics.median(fractions)
    x.update(run_peak=run_peak, divisors=divisors, fractions=fractions, fractions_own=own, pair_ratios=fractions,
             ratio=ratio)
    raised = sum(d > r for d, r in zip(divisors, x["gemm_flops_per_s"]))
    row.note = (f"median of {len(fractions)} alternating pairs: {ratio:.3f} ({spread_text(fractions)}); each step "
                f"over the higher of its pair's GEMM rate and the run's peak"
                + (f" ({run_peak / 1e9:.0f} GFLOP/s, higher in {raised} of {len(divisors)} pairs)" if run_peak else ""))
    return row
