"""The outputs of a run: terminal table, JSON, markdown summary, and the issue targets as ratios.

The targets are reported, never asserted: each is a ratio measured in this run, the target it is
held to, and whether it was met: True, False, or None when a piece needed for it did not run, when
it was measured on a configuration the goal is not set for, or when its alternating pairs (a sign
test, `pair_verdict`) or, without pairs, its rows' interquartile ranges (`span_verdict`) do not
settle it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Callable, Iterable

from benchmarks.record import Result
from benchmarks.stats import Timing, percentile, spread

TARGET_CONFIG = "124M"

# A verdict from alternating pairs is a one-sided sign test at this level (`pair_verdict`).
SIGN_TEST_ALPHA = 0.05


def sign_test_p(k: int, n: int) -> float:
    """P(at least k of n pairs on one side) when each pair falls on either side with probability
    1/2 (the goal sits exactly at the true ratio): the binomial tail sum_{i >= k} C(n, i) / 2**n."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n


def pairs_needed(n: int, alpha: float = SIGN_TEST_ALPHA) -> int | None:
    """The fewest of n pairs on one side that the sign test accepts at `alpha` (None: n is too few;
    5 pairs need 5, 9 pairs 8)."""
    return next((k for k in range(n + 1) if sign_test_p(k, n) <= alpha), None)


def pair_verdict(values: list[float], goal: float, higher_is_better: bool,
                 optimistic: list[float] | None = None) -> tuple[bool | None, str]:
    """The verdict on a goal from the pairs' ratios, by a one-sided sign test: met if so many pairs
    meet the goal that, were the true ratio on the goal, at least that many would do so with
    probability <= SIGN_TEST_ALPHA; NOT met if that many miss it; else undetermined (None): the
    pairs do not settle which side of the goal the ratio is on. A pair exactly on the goal is
    evidence for neither side and is left out of the test (n counts the others). Each pair is a
    ratio of two calls made back to back, so the machine's drift over minutes cancels in it; what
    is left is taken as noise symmetric about the true ratio.

    `optimistic`: where a pair's value had a choice of divisor and `values` took the one that can
    only lower it (head_to_head.finish_against_peak), the same pairs with the other divisor. "met"
    is judged on `values`, "NOT met" on `optimistic`, so neither verdict rests on the choice."""
    if not values:
        raise ValueError("a verdict needs at least one pair")
    if optimistic is not None and len(optimistic) != len(values):
        raise ValueError(f"optimistic has {len(optimistic)} pairs, values {len(values)}")

    def tally(vs: list[float]) -> tuple[int, int, int]:
        meet = sum((v > goal) if higher_is_better else (v < goal) for v in vs)
        tied = sum(v == goal for v in vs)
        return meet, len(vs) - meet - tied, tied

    n_all = len(values)
    meet, _, tied = tally(values)
    _, miss, tied_o = tally(optimistic if optimistic is not None else values)
    n, n_o = n_all - tied, n_all - tied_o
    if optimistic is None:
        counts = f"{meet}/{n_all} pairs meet the goal, {miss}/{n_all} miss it"
    else:
        counts = (f"{meet}/{n_all} pairs meet the goal over the higher divisor, {miss}/{n_all} miss it over "
                  f"their own pair's rate")
    counts += f", {max(tied, tied_o)} on it (left out)" if max(tied, tied_o) else ""
    if n and sign_test_p(meet, n) <= SIGN_TEST_ALPHA:
        return True, f"{counts} (sign test p = {sign_test_p(meet, n):.2g})"
    if n_o and sign_test_p(miss, n_o) <= SIGN_TEST_ALPHA:
        return False, f"{counts} (sign test p = {sign_test_p(miss, n_o):.2g})"
    k = pairs_needed(n)
    need = (f"{k}/{n} of the pairs on one side" if k is not None else
            f"more than {n} pairs off the goal" if n else "pairs off the goal")
    return None, f"undetermined: {counts} (a verdict needs {need}: a one-sided sign test at the " \
                 f"{SIGN_TEST_ALPHA:.0%} level)"


def quartile_span(value: float | None, rows: list[tuple[Result, int]],
                  peak_range: float = 1.0) -> tuple[float, float] | None:
    """The range a value from table medians takes over the rows' middle halves: `value` is
    proportional to the product of each row's seconds to the power e (rows: (row, e); a ratio of
    step times is (ours, 1), (theirs, -1), a fraction of the peak (row, -1)), so its lowest is
    with the 25th percentile where e > 0 and the 75th where e < 0, its highest the other way. None
    where a row has fewer than 3 samples (no spread to speak of).

    `peak_range`: for a fraction of the peak, the run's higher peak measurement over its lower
    (start and end, `peak_range_of`). The peak is a measurement too, not an exact number, and the
    two ends' disagreement is the one measure of its uncertainty the run has: the span is widened
    by that factor both ways (a peak measured low at both ends, as on the Xeon run whose bf16 GEMM
    rate came out 41% below another run's, would be as far above the higher as the lower is
    below it)."""
    if value is None:
        return None
    r = max(peak_range, 1.0)
    lo, hi = value / r, value * r
    for row, e in rows:
        t = row.timing if row is not None else None
        if t is None or len(t.samples) < 3 or t.median <= 0:
            return None
        q25, q75 = percentile(t.samples, 25) / t.median, percentile(t.samples, 75) / t.median
        lo *= (q25 if e > 0 else q75) ** e
        hi *= (q75 if e > 0 else q25) ** e
    return lo, hi


def peak_range_of(peak_bounds: dict | None, name: str | None) -> float:
    """The higher over the lower of a peak's start and end measurements (1.0 if not both known)."""
    lo_hi = (peak_bounds or {}).get(name) if name else None
    if not lo_hi or not all(v and v > 0 for v in lo_hi):
        return 1.0
    return max(lo_hi) / min(lo_hi)


def span_verdict(span: tuple[float, float], goal: float, higher_is_better: bool) -> tuple[bool | None, str]:
    """A verdict without pairs: met when the whole quartile span meets the goal, NOT met when the
    whole span misses it, else undetermined."""
    lo, hi = span
    text = f"no alternating pairs: over the rows' interquartile ranges the value spans {lo:.3g}-{hi:.3g}"
    if higher_is_better:
        met = True if lo >= goal else False if hi < goal else None
    else:
        met = True if hi <= goal else False if lo > goal else None
    return met, text if met is not None else f"undetermined: {text}, across the goal"


def _si(x: float | None, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    # Rounded to the three digits shown before the prefix is chosen: 999,600 is "1 M", not "1e+03 k".
    x = float(f"{x:.3g}")
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _ms(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    ms = float(f"{s * 1e3:.3g}")  # rounded first, as in _si: 0.9996 s is "1 s", not "1e+03 ms"
    return f"{ms:.3g} ms" if ms < 1e3 else f"{s:.3g} s"


def _spread(timing: Timing | None) -> str:
    """The IQR relative to the median, its whole width (not a +- half width); one sample has none."""
    if timing is None:
        return ""
    if timing.repeats < 2:
        return "1 run"
    return f"{100 * timing.rel_spread:.0f}%"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def rows_for_table(results: Iterable[Result], peaks: dict, note_chars: int | None = 60) -> list[list[str]]:
    """One row of strings per result; notes cut to `note_chars` (None: whole, as summary.md has them)."""
    rows = []
    for r in results:
        mem = r.memory.get("bytes") if r.memory else None
        rows.append([r.section, r.config, r.backend, r.what, f"{r.B}x{r.T}" if r.B else "",
                     _ms(r.seconds), _spread(r.timing), _si(r.tokens_per_s), _si(r.flop_per_s, "FLOP/s"),
                     _pct(r.fraction_of_peak(peaks)), _peak_text(r, peaks), _si(mem, "B") if mem is not None else "-",
                     r.status if r.status != "ok" else "", r.note[:note_chars]])
    return rows


HEADER = ["section", "config", "backend", "what", "BxT", "median", "IQR", "tok/s", "achieved", "of peak",
          "peak (divided by)", "peak mem", "status", "note"]


def _peak_text(r: Result, peaks: dict) -> str:
    """The peak a row's "of peak" divides by, named with its rate: rows sit side by side that
    divide by different peaks (a bf16 row by the bf16 GEMM rate, numpy by OpenBLAS's)."""
    rate = peaks.get(r.peak_name) if r.peak_name else None
    return f"{r.peak_name} {_si(rate, 'FLOP/s')}" if rate and r.fraction_of_peak(peaks) is not None else "-"


def table_heading(payload: dict) -> str:
    """The lines above table.txt's table: the machine, the date and what "of peak" means."""
    meta = payload["meta"]
    cuda = (payload.get("machine") or {}).get("cuda")
    return (f"{meta['machine_name']}{' (' + cuda['name'] + ')' if cuda else ''}: "
            f"{'quick' if meta['quick'] else 'full'} run, {meta.get('started', '?')} to {meta['date']}\n"
            "\"of peak\": achieved FLOP/s over the peak named beside it, the higher of its start and end "
            "measurements in this run\n\n")


def format_table(rows: list[list[str]], header: list[str] = HEADER) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(rows: list[list[str]], header: list[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None unless both are finite and positive (a median of 0 s is
    below the clock's resolution: no ratio, rather than a division by zero that loses the run)."""
    if numerator is None or denominator is None:
        return None
    if not (math.isfinite(numerator) and math.isfinite(denominator) and numerator > 0 and denominator > 0):
        return None
    return numerator / denominator


TARGET_BT = (4, 64)  # the issues' batch and sequence length for the training-step targets


def _find(results: list[Result], section: str, backend: str, config: str, what: str | None = None,
          bt: tuple[int, int] | None = None) -> Result | None:
    """The first ok row that matches; `bt` = (B, T) also pins the shape, so that a failed B=4 x 64
    row is not silently replaced by the same backend's 16 x 1024 row (CUDA runs both)."""
    for r in results:
        if r.section == section and r.backend == backend and r.config == config and r.status == "ok" and (
                what is None or r.what == what) and (bt is None or (r.B, r.T) == bt):
            return r
    return None


def targets(results: list[Result], peaks: dict, tokenizer: dict | None, config: str = TARGET_CONFIG,
            config_d: dict | None = None, peak_bounds: dict | None = None) -> list[dict]:
    """The issues' speed targets as ratios from this run (issue 3, 4 and 6); where a target sits
    beyond what the machine's measured peaks allow, the detail says so. Each entry: `value` (the
    median over the alternating pairs where they ran, else the ratio of the tables' medians),
    `goal`, `met` (True / False / None), `verdict` (its words), `pairs` (the pairs' ratios, or
    None) and `spread` (their n, min, max and IQR, or None), `detail`.

    Goals set for 124M are not judged on another configuration (a quick run ends on `small`):
    the target says "(small, not the target config)" and its `met` is None. `peak_bounds` maps a
    peak's name to its (start, end) measurements (machine.remeasure): a fraction of the peak
    judged without pairs spans both (quartile_span)."""
    judged = config == TARGET_CONFIG
    label = config if judged else f"{config}, not the target config"

    def entry(name, value, target, higher_is_better, detail, pairs=None, config_bound=True, span=None,
              optimistic=None):
        """span: without pairs, quartile_span over the rows the value came from (None: judged on
        the value alone, which only the tokenizer's one ratio and rows without 3 samples are);
        optimistic: the pairs over their own GEMM rates (pair_verdict)."""
        goal = (">= " if higher_is_better else "<= ") + f"{target:g}"
        if value is None:
            met, verdict = None, "not measured"
        elif config_bound and not judged:
            met, verdict = None, "not judged"
            detail += f"; not judged: the goal is set for {TARGET_CONFIG}, this is {config}"
        elif pairs or span:
            met, why = pair_verdict(pairs, target, higher_is_better, optimistic) if pairs else span_verdict(
                span, target, higher_is_better)
            verdict = {True: "met", False: "NOT met", None: "undetermined"}[met]
            detail += f"; {why}"
        else:
            met = value >= target if higher_is_better else value <= target
            verdict = "met" if met else "NOT met"
            detail += "; judged on this one value (no pairs, no spread)"
        return {"target": name, "value": value, "goal": goal, "met": met, "verdict": verdict,
                "pairs": list(pairs) if pairs else None, "spread": spread(pairs) if pairs else None,
                "detail": detail}

    out = []
    np32 = _find(results, "train_step", "numpy-float32", config, bt=TARGET_BT)
    value, detail, pairs, own = _prefer_against_peak(results, config, "numpy-float32",
                                                     np32.fraction_of_peak(peaks) if np32 else None, "issue 3")
    out.append(entry(f"numpy float32 train step ({label}) / numpy float32 GEMM rate", value, 0.45, True, detail,
                     pairs, span=quartile_span(value, [(np32, -1)], peak_range_of(peak_bounds, np32 and np32.peak_name)),
                     optimistic=own))
    ours = _find(results, "train_step", "torch-fp32", config, bt=TARGET_BT)
    hf = _find(results, "train_step", "hf-fp32", config, bt=TARGET_BT)
    detail = "issue 4"
    if ours and hf and ours.flops and peaks.get(ours.peak_name):
        # The matmuls alone, at the GEMM rate measured in this run, bound any implementation's step.
        floor_s, goal_s = ours.flops / peaks[ours.peak_name], 0.65 * hf.seconds
        detail += (f"; GEMM floor {_ms(floor_s)} (the step's FLOPs at the measured {ours.peak_name} GEMM rate) vs "
                   f"goal {_ms(goal_s)}" + (": unreachable on this machine" if floor_s > goal_s else ""))
    value = _ratio(ours.seconds, hf.seconds) if ours and hf else None
    span = quartile_span(value, [(ours, 1), (hf, -1)])
    value, detail, pairs = _prefer_head_to_head(results, config, "train step time, ours / HF", value, detail)
    out.append(entry(f"torch fp32 train step time / HF step time ({label})", value, 0.65, False, detail, pairs,
                     span=span))
    bf16 = _find(results, "train_step", "torch-bf16", config, bt=TARGET_BT)
    detail = "issue 4"
    if bf16 is None:
        # Why the target row did not run: a row at the target shape that is not ok (the note of an
        # ok row at another shape is its optimizer, not a reason).
        skipped = [r for r in results if r.section == "train_step" and r.backend == "torch-bf16" and r.config == config
                   and (r.B, r.T) == TARGET_BT and r.status != "ok"]
        others = [r for r in results if r.section == "train_step" and r.backend == "torch-bf16" and r.status == "ok"
                  and r.fraction_of_peak(peaks)]
        if skipped and skipped[0].note:
            detail += f"; {config}: {skipped[0].note}"
        if others:
            detail += "; measured on " + ", ".join(f"{r.config}: {r.fraction_of_peak(peaks):.3g}" for r in others)
    value, detail, pairs, own = _prefer_against_peak(results, config, "torch-bf16",
                                                     bf16.fraction_of_peak(peaks) if bf16 else None, detail)
    bf16_entry = entry(f"torch bf16 train step ({label}) / torch bf16 GEMM rate", value, 0.40, True, detail, pairs,
                       span=quartile_span(value, [(bf16, -1)], peak_range_of(peak_bounds, bf16 and bf16.peak_name)),
                       optimistic=own)
    if bf16 is not None and bf16.peak_name.startswith("cuda"):
        # runner.py: on CUDA issue 4's bf16 target is the MFU at 16 x 1024, not this 4 x 64 step.
        bf16_entry.update(met=None, verdict="not judged", detail=detail + "; not judged on CUDA: there the "
                          "bf16 target is the MFU at 16x1024 (its own row)")
    out.append(bf16_entry)
    ours_d = _find(results, "decode", "torch-fp32", config, "decode (KV cache)")
    hf_d = _find(results, "decode", "hf-fp32", config, "generate (KV cache)")
    detail = "issue 4"
    bandwidth = peaks.get("cuda_copy_bandwidth" if hf_d and hf_d.peak_name.startswith("cuda") else "copy_bandwidth")
    if hf_d and hf_d.tokens_per_s and config_d and bandwidth:
        # Each decoded token reads every matmul weight once (float32): a memory-bandwidth ceiling.
        from benchmarks.flops import matmul_params

        ceiling = bandwidth / (4 * matmul_params(config_d))
        detail += (f"; bandwidth ceiling ~{ceiling:.0f} tok/s (matmul weights in float32 / measured copy "
                   f"bandwidth) vs goal {1.5 * hf_d.tokens_per_s:.0f} tok/s")
    value = _ratio(ours_d.tokens_per_s, hf_d.tokens_per_s) if ours_d and hf_d else None
    span = quartile_span(value, [(ours_d, -1), (hf_d, 1)])
    value, detail, pairs = _prefer_head_to_head(results, config, "KV-cache decode tok/s, ours / HF", value, detail)
    out.append(entry(f"torch KV-cache decode tok/s / HF generate tok/s ({label}, B=1)", value, 1.5, True, detail,
                     pairs, span=span))
    ratio = tokenizer.get("ratio") if tokenizer and "ratio" in tokenizer else None
    detail = "issue 6"
    if tokenizer and tokenizer.get("note"):
        detail += f"; {tokenizer.get('status', 'n/a')}: {tokenizer['note']}"
    tok = entry("numpy_ref tokenizer time / tiktoken time", ratio, 5.0, False, detail, config_bound=False)
    if tokenizer and tokenizer.get("ids_equal") is False:
        # Not the same work: a time ratio between encoders that disagree says nothing about the goal.
        measured = f" (their time ratio {ratio:.3g} is not a measurement of the goal)" if ratio is not None else ""
        tok.update(value=None, met=False, verdict="NOT met",
                   detail=detail + f"; the two encoders' ids differ on the benchmark text{measured}")
    out.append(tok)
    big = [r for r in results if r.section == "train_step" and r.status == "ok" and r.backend.startswith("torch-")
           and r.peak_name == "cuda_bfloat16" and r.B * r.T >= 16 * 1024]
    if big:
        best = max(big, key=lambda r: r.fraction_of_peak(peaks) or 0.0)
        mfu = best.fraction_of_peak(peaks)
        out.append(entry(f"CUDA {best.backend} train step MFU at {best.B}x{best.T} ({best.config})",
                         mfu, 0.5, True, f"issue 4 (CUDA); the best of {len(big)} rows", config_bound=False,
                         span=quartile_span(mfu, [(best, -1)], peak_range_of(peak_bounds, best.peak_name))))
    return out


H2H_BACKEND = "torch-fp32 vs hf-fp32"


def _prefer_head_to_head(results: list[Result], config: str, what: str, blocked: float | None,
                         detail: str) -> tuple[float | None, str, list[float] | None]:
    """The alternating-pairs ratio (benchmarks/head_to_head.py) where it ran, else the ratio of the
    two backends' medians from the main tables; the detail names which, and gives the other. The
    third item is the pairs' ratios (None without pairs)."""
    h2h = _find(results, "head_to_head", H2H_BACKEND, config, what)
    if h2h is None or "ratio" not in h2h.extra:
        failed = [r for r in results if r.section == "head_to_head" and r.config == config
                  and r.backend == H2H_BACKEND and r.status != "ok"]
        if failed:
            detail += f"; alternating pairs not measured ({failed[0].status}: {failed[0].note})"
        return blocked, detail + ("; ratio of the two medians in the tables" if blocked is not None else ""), None
    ours, theirs = h2h.extra.get("ours_s", []), h2h.extra.get("theirs_s", [])
    pairs = h2h.extra.get("pair_ratios") or [
        (b / a if h2h.extra.get("higher_is_better") else a / b) for a, b in zip(ours, theirs)]
    other = f"{blocked:.3g}" if blocked is not None else "-"
    return h2h.extra["ratio"], (detail + f"; median of {len(ours)} alternating pairs (ratio of the tables' "
                                f"medians, timed minutes apart: {other})"), pairs or None


def _prefer_against_peak(results: list[Result], config: str, backend: str, table: float | None,
                         detail: str) -> tuple[float | None, str, list[float] | None, list[float] | None]:
    """The step / GEMM-rate fraction from alternating pairs (head_to_head.step_against_peak) where
    it ran, else the tables' step over the higher of the run's two peak measurements; the detail
    names which, and gives the other. The third item is the pairs' fractions, the fourth the same
    over each pair's own GEMM rate (both None without pairs)."""
    pair = next((r for r in results if r.section == "head_to_head" and r.config == config
                 and r.backend.startswith(f"{backend} vs ") and r.status == "ok" and "ratio" in r.extra), None)
    if pair is None:
        failed = [r for r in results if r.section == "head_to_head" and r.config == config
                  and r.backend.startswith(f"{backend} vs ") and r.status != "ok"]
        if failed:
            detail += f"; alternating pairs not measured ({failed[0].status}: {failed[0].note})"
        return (table, detail + ("; the tables' median step over the run's peak GEMM rate" if table is not None else ""),
                None, None)
    other = f"{table:.3g}" if table is not None else "-"
    rates = pair.extra["gemm_flops_per_s"]
    run_peak = pair.extra.get("run_peak")
    divided = (f"; each step over the higher of its pair's GEMM rate and the run's peak, "
               f"{run_peak / 1e9:.0f} GFLOP/s" if run_peak else "")
    detail += (f"; median of {len(rates)} pairs of a step and a GEMM-rate measurement "
               f"({min(rates) / 1e9:.0f}-{max(rates) / 1e9:.0f} GFLOP/s{divided}; the tables' "
               f"median step over the run's peak: {other})")
    return pair.extra["ratio"], detail, pair.extra.get("fractions"), pair.extra.get("fractions_own")


def _pairs_text(t: dict) -> str:
    """'9 pairs: 0.61-0.78, IQR 0.06' from a target's spread, or '-' without pairs."""
    s = t.get("spread")
    if not s:
        return "-"
    return f"{s['n']} pairs: {s['min']:.3g}-{s['max']:.3g}, IQR {s['iqr']:.2g}"


def format_targets(tgts: list[dict]) -> list[list[str]]:
    rows = []
    for t in tgts:
        verdict = t.get("verdict") or {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        rows.append([t["target"], value, t["goal"], verdict, _pairs_text(t), t["detail"]])
    return rows


TARGET_HEADER = ["target", "measured", "goal", "verdict", "pairs (range, IQR)", "from"]
ACC_HEADER = ["config", "setting", "compared with", "max abs dlogits", "abs dloss", "max abs dgrad", "within tolerance",
              "note"]


def format_accuracy(acc: list[dict]) -> list[list[str]]:
    f = lambda x: "-" if x is None else f"{x:.2e}"  # noqa: E731
    return [[a["config"], a["setting"], a.get("reference", "numpy float64"), f(a.get("logits")), f(a.get("loss")),
             f(a.get("grads")), {True: "yes", False: "NO", None: "-"}[a.get("within_tolerance")], a.get("note", "")]
            for a in acc]


def _new_file_mode() -> int:
    """0666 less the umask: the mode open() gives a new file (mkstemp's temporary files get 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_file_atomic(path: str, write: Callable[[str], bool]) -> bool:
    """Call `write(tmp)` on a temporary name beside `path` (ending like `path`, so that a writer
    choosing the format by extension chooses the same), then rename it over `path`: an interrupted
    write never leaves a truncated file where a previous good one was. `write` returns False when
    it had nothing to write; `path` is then left as it was."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".tmp" + os.path.splitext(name)[1], dir=directory)
    os.close(fd)
    try:
        wrote = write(tmp)
        if wrote:
            os.chmod(tmp, _new_file_mode())
            os.replace(tmp, path)
            return True
    except BaseException:
        os.unlink(tmp)
        raise
    os.unlink(tmp)
    return False


def write_text_atomic(path: str, text: str) -> None:
    """`text` into `path`, through a temporary file (write_file_atomic)."""
    def write(tmp: str) -> bool:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        return True

    write_file_atomic(path, write)


def _strict(o):
    """NaN and infinities as null: results.json is strict JSON (JSON has no NaN)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _strict(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_strict(v) for v in o]
    return o


def to_json(payload: dict, path: str) -> None:
    """results.json: strict JSON (non-finite numbers as null), written atomically."""
    def default(o):
        if hasattr(o, "to_dict"):
            return o.to_dict()
        if hasattr(o, "item"):
            return o.item()
        return str(o)

    plain = json.loads(json.dumps(payload, default=default, allow_nan=True))  # objects -> JSON types first
    write_text_atomic(path, json.dumps(_strict(plain), indent=1, allow_nan=False))


PAIR_HEADERS = {
    "hf": ["pair", "first", "ours (s)", "theirs (s)", "ratio"],
    "gemm": ["pair", "first", "step (s)", "pair's GEMM rate", "divided by", "fraction"],
}


def pairs_markdown(rows: list[Result]) -> list[str]:
    """Every alternating pair of the head-to-head rows, one table per row, in the order they ran."""
    lines = []
    for r in rows:
        x = r.extra
        if r.status != "ok" or "ratio" not in x:
            continue
        if "ours_s" in x:
            header = PAIR_HEADERS["hf"]
            ratios = x.get("pair_ratios") or [(b / a if x.get("higher_is_better") else a / b)
                                              for a, b in zip(x["ours_s"], x["theirs_s"])]
            first = x.get("first") or ["-"] * len(ratios)
            body = [[str(i + 1), f, f"{a:.4g}", f"{b:.4g}", f"{q:.3g}"]
                    for i, (f, a, b, q) in enumerate(zip(first, x["ours_s"], x["theirs_s"], ratios))]
        elif "divisors" in x:
            first = x.get("first") or ["-"] * len(x["step_s"])
            header = PAIR_HEADERS["gemm"]
            body = [[str(i + 1), f, f"{s:.4g}", _si(g, "FLOP/s"), _si(d, "FLOP/s"), f"{q:.3g}"]
                    for i, (f, s, g, d, q) in enumerate(zip(first, x["step_s"], x["gemm_flops_per_s"], x["divisors"],
                                                           x["pair_ratios"]))]
        else:
            continue
        lines += [f"### Pairs: {r.config} {r.backend}, {r.what} (median {x['ratio']:.3g})", "",
                  markdown_table(body, header), ""]
    return lines


def markdown_summary(payload: dict, results: list[Result], plots: list[str]) -> str:
    m = payload["machine"]
    peaks = m["peaks"]
    cpu = m["cpu"]
    lines = [f"# Benchmark summary: {payload['meta']['machine_name']}", "",
             f"{'Quick run' if payload['meta']['quick'] else 'Full run'} of `gpt-oracle bench` on "
             f"{payload['meta']['date']}, {payload['meta']['seconds']:.0f} s. FLOPs by the formula in "
             "`benchmarks/README.md`; \"of peak\" divides by the higher of the GEMM rates measured at the start and "
             "at the end of the same run.", "",
             "## Machine", "",
             f"- CPU: {cpu['model']}, {cpu['usable_cpus']} usable cores, SIMD {', '.join(cpu['simd']) or '-'}"
             + (f"; GPU: {m['cuda']['name']}" if m.get("cuda") else ""),
             "- libraries: " + ", ".join(f"{k} {v}" for k, v in m["libraries"].items() if v),
             f"- BLAS: numpy {m['blas'].get('numpy_blas')}; torch threads {m['blas'].get('torch_threads')}, "
             f"capability {m['blas'].get('torch_cpu_capability')}; env {m['blas'].get('env') or '{}'}",
             "- measured peaks (the higher of the start and the end of the run): " + ", ".join(
                 f"{k} {_si(v, 'B/s' if 'bandwidth' in k else 'FLOP/s')}" for k, v in peaks.items()),
             f"- load average at start {m.get('load_average_at_start')}, at end {m.get('load_average_at_end')}; "
             "peak drift end/start: " + ", ".join(f"{k} {100 * v:+.0f}%" for k, v in (m.get("peak_drift") or {}).items()),
             f"- torch_impl's default plan here: {m['blas'].get('torch_impl_default_plan', '-')}", "",
             "## Targets (ratios measured in this run)", "",
             markdown_table(format_targets(payload["targets"]), TARGET_HEADER), "",
             "## Error budget: each fast path against the float64 oracle", "",
             markdown_table(format_accuracy(payload["accuracy"]), ACC_HEADER), ""]
    for section, title in (("train_step", "Training step (forward, backward, AdamW)"), ("forward", "Model forward"),
                           ("decode", "Decoding"), ("head_to_head", "Head to head (alternating pairs)"),
                           ("sweep", "Sequence-length sweep"), ("layer", "Layers")):
        rows = rows_for_table([r for r in results if r.section == section], peaks, note_chars=None)
        if rows:
            lines += [f"## {title}", "", markdown_table([r[1:] for r in rows], HEADER[1:]), ""]
        if section == "head_to_head":
            lines += pairs_markdown([r for r in results if r.section == section])
    tok = payload.get("tokenizer") or {}
    if tok:
        lines += ["## Tokenizer", "", "| " + " | ".join(f"{k}" for k in tok) + " |", "|" + "---|" * len(tok),
                  "| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in tok.values()) + " |", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)
