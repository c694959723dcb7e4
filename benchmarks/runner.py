"""The plan of a run and its execution: machine first, then each benchmark, then the outputs.

`run_bench(quick, out_dir, device, configs)` returns the payload it also writes as JSON. Every
piece is guarded: a model file not written yet, or a path the device lacks, becomes an `n/a` row
with the reason, and the run goes on.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from typing import Callable

from benchmarks import flops as F
from benchmarks import machine, plots, report
from benchmarks.record import Result, guarded

# Benchmark configurations. Dropout is off everywhere: masks are inputs in numpy_ref, and the
# comparison with Hugging Face needs the same function on both sides.
# "124M" is GPT-2 small as OpenAI released it and as Hugging Face's GPT2LMHeadModel builds it:
# biases on c_attn and the output head tied to wte, 124,439,808 parameters. (The book's
# GPT_CONFIG_124M drops the c_attn biases and keeps a separate head, 163,009,536 parameters; the
# matmul FLOPs and the weights a decoded token reads are the same; the optimizer updates 38.6M more.)
GPT2_SMALL = dict(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12, drop_rate=0.0,
                  qkv_bias=True, tie_embeddings=True, ln_eps=1e-5)
CONFIGS = {
    "tiny": dict(vocab_size=101, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True,
                 tie_embeddings=False, ln_eps=1e-5),
    "small": dict(vocab_size=2048, context_length=1024, emb_dim=256, n_heads=4, n_layers=4, drop_rate=0.0,
                  qkv_bias=False, tie_embeddings=False, ln_eps=1e-5),
    "124M": GPT2_SMALL,
}
ALIASES = {"gpt2-small": "124M", "gpt2": "124M"}
BATCH = {"tiny": (2, 16), "small": (4, 64), "124M": (4, 64)}  # issue 3 and 4 measure 124M at B=4, T=64


def resolve_config(name: str) -> tuple[str, dict]:
    name = ALIASES.get(name, name)
    if name in CONFIGS:
        return name, dict(CONFIGS[name])
    try:
        from numpy_ref.config import get_config

        d = dict(get_config(name).to_dict())
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"unknown benchmark config {name!r}; known: {sorted(CONFIGS)} or a numpy_ref preset "
                         f"({type(exc).__name__}: {exc})") from exc
    d["drop_rate"] = 0.0
    return name, d


class Progress:
    """One line per step on stderr, with the elapsed time: works in a terminal and in a log."""

    def __init__(self, enabled: bool = True, stream=sys.stderr):
        self.start = time.perf_counter()
        self.enabled = enabled
        self.stream = stream
        self.steps = 0

    def __call__(self, message: str) -> None:
        self.steps += 1
        if self.enabled:
            print(f"[{time.perf_counter() - self.start:7.1f} s] {message}", file=self.stream, flush=True)


def _cpu_has_fast_bf16() -> bool:
    """AMX / AVX-512 BF16 present (torch_impl.device's test): there bf16 is the fast CPU path."""
    from torch_impl.device import cpu_has_fast_bf16

    return cpu_has_fast_bf16()


def plan(quick: bool, device: str, configs: list[str] | None) -> dict:
    names = configs or (["tiny", "small"] if quick else ["tiny", "small", "124M"])
    cuda = device.startswith("cuda")
    backends = ["numpy-float64", "numpy-float32", "torch-fp32", "torch-bf16"]
    if cuda:
        backends.append("torch-tf32")
    if not quick:
        backends.append("torch-compile")
    backends.append("hf-fp32")
    largest = names[-1]
    return {
        "configs": names,
        "backends": backends,
        "layer_config": largest,
        "layer_backends": ["numpy-float64", "numpy-float32", "torch-fp32"] + ([] if quick else ["torch-bf16"]),
        "sweep_config": "small" if "small" in names else largest,
        "sweep_T": [32, 256] if quick else [32, 64, 128, 256, 512, 1024],
        "sweep_backends": ["numpy-float32", "torch-fp32"] if quick else ["numpy-float64", "numpy-float32", "torch-fp32"],
        "accuracy_configs": [n for n in names if n != "tiny"] or names,
        "repeats": 3 if quick else 5,
        "budget_s": 1.5 if quick else 10.0,
        "decode_tokens": 8 if quick else 32,
        "max_step_s": 5.0 if quick else 60.0,  # skip a backend whose estimated step is slower than this
        # bf16 on a CPU without native bf16 units is slow; --quick shows it on tiny only there
        "skip": ({"small": {"torch-bf16": "skipped in --quick on a CPU without bf16 units (bf16 is timed on tiny)"}}
                 if quick and not cuda and not _cpu_has_fast_bf16() else {}),
    }


def _estimated_skips(config_d: dict, B: int, T: int, backends: list[str], peaks: dict, max_step_s: float,
                     device: str = "cpu", peak_now: Callable[[str], float | None] = lambda name: None) -> dict:
    """Backends whose training step, at the measured peak rate, would take longer than max_step_s.
    Before a skip the peak is measured again (`peak_now`) and the higher one used: the start of a
    run under another tenant's load once measured rates 5-8x low, enough to skip wrongly."""
    skips = {}
    for b in backends:
        bf16_name = "cuda_bfloat16" if device.startswith("cuda") else "torch_bfloat16"
        name = {"torch-bf16": bf16_name, "numpy-float64": "numpy_float64"}.get(b)
        peak = peaks.get(name) if name else None
        if peak:
            flops = F.training_flops(config_d, B, T)
            if flops / peak > max_step_s:
                peak = max(peak, peak_now(name) or 0.0)
            est = flops / peak
            if est > max_step_s:
                skips[b] = (f"skipped: a step would take >= {est:.0f} s even at the measured GEMM peak "
                            f"({peak / 1e9:.1f} GFLOP/s)")
    return skips


def refinish_against_peak(results: list[Result], peaks: dict) -> None:
    """The step / GEMM-rate pairs divide each step by the higher of its pair's GEMM rate and the
    run's peak; the peak of the whole run is known only after the end's measurement: divide again."""
    from benchmarks.head_to_head import finish_against_peak

    for r in results:
        if r.section == "head_to_head" and r.status == "ok" and "gemm_flops_per_s" in r.extra:
            finish_against_peak(r, peaks.get(r.extra["peak_name"]))


def check_out_dir(out_dir: str) -> None:
    """ValueError unless `out_dir` is (or can be made) a writable directory."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir!r} exists and is not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out_dir!r} cannot be created: {e.strerror or e}") from None
    if not os.access(out_dir, os.W_OK):
        raise ValueError(f"--out {out_dir!r} is not writable")


def run_bench(quick: bool = False, out_dir: str = "bench-results", device: str = "cpu",
              configs: list[str] | None = None, progress: Callable[[str], None] | None = None,
              tokenizer: bool = True, layers: bool = True, sweep: bool = True) -> dict:
    from benchmarks.accuracy import error_budget
    from benchmarks.backends import numpy_params
    from benchmarks.bench_layers import bench_layers
    from benchmarks.bench_model import bench_model, bench_sweep

    started = time.perf_counter()
    started_at = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    progress = progress or Progress()
    check_out_dir(out_dir)  # before minutes of measuring, not after
    p = plan(quick, device, configs)
    resolved = dict(resolve_config(n) for n in p["configs"])
    progress(f"plan: configs {list(resolved)}, backends {p['backends']}")
    info = machine.measure(quick=quick, device=device, progress=progress)
    peaks = info["peaks"]
    results: list[Result] = []
    accuracy: list[dict] = []
    errors: list[str] = []
    params_by_config: dict[str, dict] = {}
    for name, config_d in resolved.items():
        progress(f"weights {name}")
        try:
            params_by_config[name] = numpy_params(config_d)
        except Exception as exc:  # noqa: BLE001 - without numpy_ref's model nothing model-level can run
            errors.append(f"{name}: no weights ({type(exc).__name__}: {exc})")
            results.append(Result("train_step", name, "all", "model", status="n/a",
                                  note=f"numpy_ref.model not available: {type(exc).__name__}: {exc}"))
    tok: dict = {}
    if tokenizer:
        progress("tokenizer throughput")
        try:
            from benchmarks import bench_tokenizer

            tok = bench_tokenizer.run(quick=quick)
        except Exception as exc:  # noqa: BLE001
            tok = {"status": "n/a", "note": f"{type(exc).__name__}: {exc}"}
    for name, config_d in resolved.items():
        if name not in params_by_config:
            continue
        B, T = BATCH.get(name, (4, min(64, config_d["context_length"])))
        skips = {**_estimated_skips(config_d, B, T, p["backends"], peaks, p["max_step_s"], device,
                                    peak_now=lambda peak: machine.peak_now(peak, quick)),
                 **p["skip"].get(name, {})}
        results += bench_model(name, config_d, params_by_config[name], B, T, p["backends"], device=device,
                               repeats=p["repeats"], budget_s=p["budget_s"], decode_tokens=p["decode_tokens"],
                               progress=progress, skip=skips, max_step_s=p["max_step_s"])
    if not quick and report.TARGET_CONFIG in params_by_config:
        # Issue 4's ratios against Hugging Face once more, the two alternating call by call.
        from benchmarks.head_to_head import head_to_head

        name = report.TARGET_CONFIG
        B, T = BATCH[name]
        results += guarded(lambda: head_to_head(name, resolved[name], params_by_config[name], B, T, device=device,
                                                decode_tokens=p["decode_tokens"], progress=progress),
                           "head_to_head", name, "torch-fp32 vs hf-fp32", "alternating pairs")
        # Issue 3's and 4's CPU steps against the GEMM rate, the two alternating, where the tables
        # timed the step (on CUDA, issue 4's bf16 target is the MFU at 16 x 1024 below).
        from benchmarks.head_to_head import AGAINST_PEAK, step_against_peak

        for backend in AGAINST_PEAK:
            if device == "cpu" and any(r.section == "train_step" and r.backend == backend and r.config == name and r.status == "ok"
                   and (r.B, r.T) == (B, T) for r in results):
                results += guarded(lambda: step_against_peak(name, resolved[name], params_by_config[name], B, T,
                                                             backend, device=device, progress=progress,
                                                             run_peaks=peaks),
                                   "head_to_head", name, f"{backend} vs GEMM", "alternating pairs")
    if device.startswith("cuda") and not quick and "124M" in params_by_config:
        # Issue 4's CUDA target: GPT-2 124M training in bf16 at B x T = 16 x 1024.
        results += bench_model("124M", resolved["124M"], params_by_config["124M"], 16, 1024,
                               ["torch-bf16", "torch-compile-bf16"], device=device, repeats=p["repeats"],
                               budget_s=p["budget_s"], decode_tokens=0, progress=progress, max_step_s=p["max_step_s"])
    lc = p["layer_config"]
    if layers and lc in resolved:
        B, T = BATCH.get(lc, (4, 64))
        results += bench_layers(lc, resolved[lc], B, T, p["layer_backends"], device=device, repeats=p["repeats"],
                                budget_s=p["budget_s"] / 2, progress=progress)
    sc = p["sweep_config"]
    if sweep and sc in params_by_config:
        Ts = [t for t in p["sweep_T"] if t <= resolved[sc]["context_length"]]
        results += bench_sweep(sc, resolved[sc], params_by_config[sc], Ts, p["sweep_backends"], device=device,
                               repeats=p["repeats"], budget_s=p["budget_s"], progress=progress)
    for name in p["accuracy_configs"]:
        if name in params_by_config:
            # torch.compile's error budget once, on the smaller config: compiling 124M again costs minutes.
            compile_ok = not quick and (name == p["accuracy_configs"][0] or device.startswith("cuda"))
            why = "not run with --quick" if quick else "compilation takes minutes on CPU; see the first config"
            accuracy += error_budget(name, resolved[name], params_by_config[name], B=1 if name == "124M" else 2,
                                     device=device, compile_ok=compile_ok, progress=progress, compile_skipped_why=why)
    progress("machine: peaks again, at the end")
    info = machine.remeasure(info, quick=quick, device=device, progress=progress)
    peaks = info["peaks"]
    refinish_against_peak(results, peaks)
    target_config = "124M" if "124M" in resolved else list(resolved)[-1]
    bounds = {k: (info["peaks_at_start"].get(k), info["peaks_at_end"].get(k)) for k in info.get("peaks_at_start", {})}
    tgts = report.targets(results, peaks, tok, target_config, resolved[target_config], peak_bounds=bounds)
    os.makedirs(out_dir, exist_ok=True)
    progress("plots")
    written = plots.write_all(results, accuracy, out_dir, errors)  # a failed plot is named in "errors"
    payload = {
        "meta": {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "started": started_at,
                 "quick": quick, "device": device, "configs": resolved, "plan": p,
                 "machine_name": f"{'cuda' if device.startswith('cuda') else 'cpu'}-{machine.short_name(info)}",
                 "seconds": time.perf_counter() - started, "flop_formula": F.__doc__.strip().splitlines()[0]},
        "machine": info,
        "targets": tgts,
        "accuracy": accuracy,
        "tokenizer": tok,
        "results": [r.to_dict(peaks) for r in results],
        "errors": errors,
        "plots": written,
    }
    report.to_json(payload, os.path.join(out_dir, "results.json"))
    table = report.format_table(report.rows_for_table(results, peaks))
    report.write_text_atomic(os.path.join(out_dir, "table.txt"), report.table_heading(payload) + table + "\n")
    report.write_text_atomic(os.path.join(out_dir, "summary.md"), report.markdown_summary(payload, results, written))
    payload["_table"] = table
    return payload
