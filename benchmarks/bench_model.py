"""The whole model: forward, training step (forward, backward, AdamW), decoding, and a T sweep.

Every backend starts from the same float64 weights and the same batch. FLOPs per call come from
`benchmarks.flops` (forward: B T (2 N_mm + 2 L C (T+1)); training step: 3x that); peak memory
is measured in one extra call outside the timed ones.
"""

from __future__ import annotations

import gc
from typing import Callable

import numpy as np

from benchmarks import flops as F
from benchmarks.backends import Runner, make_runner
from benchmarks.memory import peak_bytes
from benchmarks.record import Result, guarded
from benchmarks.stats import time_call


def batch(config_d: dict, B: int, T: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    V = config_d["vocab_size"]
    return rng.integers(0, V, size=(B, T), dtype=np.int64), rng.integers(0, V, size=(B, T), dtype=np.int64)


def _kind(backend: str) -> str:
    return "numpy" if backend.startswith("numpy") else "torch"


def bench_model(config_name: str, config_d: dict, params: dict, B: int, T: int, backends: list[str], *,
                device: str = "cpu", repeats: int = 5, budget_s: float = 10.0, decode_tokens: int = 16,
                progress: Callable[[str], None] = lambda s: None, skip: dict[str, str] | None = None,
                max_step_s: float = 60.0) -> list[Result]:
    """Forward, train step and decoding for each backend; `skip` maps backend -> reason not to run it.

    A backend whose forward already shows that a training step (about 3 forwards) would take more
    than `max_step_s` gets an `n/a` train step with that estimate instead of a measurement.
    """
    ids, targets = batch(config_d, B, T)
    results: list[Result] = []
    for backend in backends:
        if skip and backend in skip:
            results.append(Result("train_step", config_name, backend, "train step", B=B, T=T, status="n/a",
                                  note=skip[backend]))
            continue
        progress(f"model {config_name}: {backend} build")
        runner, failure = _build(backend, config_name, config_d, params, ids, targets, device)
        if runner is None:
            results.append(failure)
            continue
        progress(f"model {config_name}: {backend} forward")
        fwd = guarded(lambda: _timed(runner, "forward", config_name, config_d, B, T, repeats, budget_s, device),
                      "forward", config_name, backend, "forward")
        results += fwd
        fwd_s = fwd[0].seconds if fwd and fwd[0].seconds and not backend.startswith("torch-compile") else 0.0
        if 3 * fwd_s > max_step_s:
            results.append(Result("train_step", config_name, backend, "train step", B=B, T=T, status="n/a",
                                  note=f"skipped: ~{3 * fwd_s:.0f} s per step estimated from the forward "
                                       f"(limit {max_step_s:.0f} s)"))
        else:
            progress(f"model {config_name}: {backend} train step")
            results += guarded(lambda: _timed(runner, "train_step", config_name, config_d, B, T, repeats, budget_s,
                                              device), "train_step", config_name, backend, "train step")
        if decode_tokens and runner.decode is not None and not backend.startswith("torch-compile"):
            n = min(decode_tokens, config_d["context_length"] - 1)
            per_token_s = fwd_s / (B * T)  # a forward's cost per token, to estimate decoding's
            for use_cache in (True, False):
                label = ("generate" if runner.kind == "hf" else "decode") + (" (KV cache)" if use_cache else " (no cache)")
                tokens_run = n if use_cache else n * (n + 1) // 2  # without a cache every step reruns the prefix
                if tokens_run * per_token_s > max_step_s:
                    results.append(Result("decode", config_name, backend, label, B=1, T=n, status="n/a",
                                          note=f"skipped: ~{tokens_run * per_token_s:.0f} s per call estimated from "
                                               f"the forward (limit {max_step_s:.0f} s)"))
                    continue
                progress(f"model {config_name}: {backend} {label}")
                results += guarded(lambda: _decode(runner, config_name, config_d, decode_tokens, use_cache, label,
                                                   repeats, budget_s), "decode", config_name, backend, label)
        del runner  # free this backend's model and optimizer state before building the next
        gc.collect()
    return results


def _build(backend, config_name, config_d, params, ids, targets, device) -> tuple[Runner | None, Result | None]:
    """The runner, or (None, an n/a or error row saying why it could not be built)."""
    built: list[Runner] = []

    def make() -> list[Result]:
        built.append(make_runner(backend, config_d, params, ids, targets, device))
        return []

    rows = guarded(make, "train_step", config_name, backend, "build model")
    return (built[0], None) if built else (None, rows[0])


STEP_WARMUP_MAX = 6  # warm-up calls of a training step at most, until settled (stats.time_call)


def _timed(runner: Runner, op: str, config_name: str, config_d: dict, B: int, T: int, repeats: int,
           budget_s: float, device: str) -> Result:
    fn = runner.forward if op == "forward" else runner.train_step
    # A training step is warmed up until its time stops falling (stats.settled): Hugging Face's
    # kept falling over five timed calls after one warm-up call.
    warmup = 2 if runner.backend.startswith("torch-compile") else 1
    timing = time_call(fn, warmup=warmup, repeats=repeats, budget_s=budget_s, sync=runner.sync,
                       slow_s=None if runner.backend.startswith("torch-compile") else 2 * budget_s,
                       settle_max=None if op == "forward" else max(warmup, STEP_WARMUP_MAX))
    fl = F.forward_flops(config_d, B, T) if op == "forward" else F.training_flops(config_d, B, T)
    # Peak memory from one more call, unless a single call is already slower than the budget.
    memory = peak_bytes(fn, _kind(runner.backend), device) if timing.median < budget_s else None
    if memory is not None and op == "train_step" and runner.grad_bytes and memory.get("bytes") is not None:
        # with the gradients torch and HF hold between steps, as numpy_ref's figure has its own
        memory = dict(memory, in_call_bytes=memory["bytes"], held_grad_bytes=runner.grad_bytes,
                      bytes=memory["bytes"] + runner.grad_bytes)
    return Result(op, config_name, runner.backend, "forward" if op == "forward" else "train step", B=B, T=T,
                  tokens=B * T, flops=fl, peak_name=runner.peak_name, timing=timing, memory=memory,
                  note=runner.note if op == "train_step" else "")


def _decode(runner: Runner, config_name: str, config_d: dict, n: int, use_cache: bool, label: str, repeats: int,
            budget_s: float) -> Result:
    """Greedy decoding of `n` tokens from a 1-token prompt, B=1; timed as every other row (up to
    `repeats` within `budget_s`)."""
    n = min(n, config_d["context_length"] - 1)
    timing = time_call(lambda: runner.decode(n, use_cache), warmup=1, repeats=repeats, budget_s=budget_s,
                       sync=runner.sync, slow_s=2 * budget_s)
    fl = F.generate_flops(config_d, n, use_cache)
    return Result("decode", config_name, runner.backend, label, B=1, T=n, tokens=n, flops=fl,
                  peak_name=runner.peak_name, timing=timing,
                  note="FLOPs: " + ("KV-cache decode formula" if use_cache else "a full forward per new token, "
                                                                       "head at the last position"))


def bench_sweep(config_name: str, config_d: dict, params: dict, Ts: list[int], backends: list[str], *,
                B: int = 1, device: str = "cpu", repeats: int = 3, budget_s: float = 5.0,
                progress: Callable[[str], None] = lambda s: None) -> list[Result]:
    """Forward and train step at each T: attention grows as T^2 per sequence, the rest as T."""
    results: list[Result] = []
    for backend in backends:
        for T in Ts:
            progress(f"sweep {config_name}: {backend} T={T}")
            ids, targets = batch(config_d, B, T)

            def one(T=T, ids=ids, targets=targets):
                runner = make_runner(backend, config_d, params, ids, targets, device)
                out = []
                for op, fn, fl in (("forward", runner.forward, F.forward_flops(config_d, B, T)),
                                   ("train step", runner.train_step, F.training_flops(config_d, B, T))):
                    timing = time_call(fn, warmup=1, repeats=repeats, budget_s=budget_s, sync=runner.sync,
                                       slow_s=2 * budget_s)
                    out.append(Result("sweep", config_name, backend, op, B=B, T=T, tokens=B * T, flops=fl,
                                      peak_name=runner.peak_name, timing=timing))
                return out

            results += guarded(one, "sweep", config_name, backend, f"T={T}")
    return results
