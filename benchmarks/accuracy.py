"""The error budget: how far each fast-path setting lands from the float64 NumPy oracle.

For one batch and one set of float64 weights the oracle gives logits, loss and every parameter
gradient. Each setting runs the same batch on the same weights and reports the maximum absolute
deviation of each, and whether it is within the project's tolerance for its dtype
(`parity_tests.tolerances`). Settings:

- numpy float32: numpy_ref's fused path in float32;
- torch fp32 (SDPA default kernel) and torch fp32 (SDPA math kernel);
- torch TF32 (CUDA only), torch bf16 autocast, torch.compile (fp32);
- fused AdamW: one optimizer step from the oracle's gradients, torch's fused AdamW in float32
  against numpy_ref's AdamW in float64 (max deviation of the updated parameters).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np

from benchmarks.backends import BETAS, EPS, LR, WEIGHT_DECAY, numpy_optimizer, torch_model
from benchmarks.bench_model import batch


def oracle(config_d: dict, params: dict, ids: np.ndarray, targets: np.ndarray, dtype: str = "float64") -> dict:
    from numpy_ref.config import GPTConfig
    from numpy_ref.model import GPTModel

    model = GPTModel(GPTConfig(**config_d), seed=0, dtype=getattr(np, dtype))
    for k, v in params.items():
        model.params[k][...] = v
    logits, loss, cache = model.forward(ids, targets)
    grads = model.backward(cache)
    return {"logits": np.asarray(logits, dtype=np.float64), "loss": float(loss),
            "grads": {k: np.asarray(g, dtype=np.float64) for k, g in grads.items()}}


def _torch_run(config_d, params, ids, targets, mode: str, device: str) -> dict:
    import torch

    model = torch_model(config_d, params, device)
    model.train()
    dev = device.split(":")[0]
    ctx = contextlib.nullcontext()
    if mode == "bf16":
        ctx = torch.autocast(dev, dtype=torch.bfloat16)
    elif mode == "sdpa-math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = sdpa_kernel(SDPBackend.MATH)
    fwd = torch.compile(model) if mode == "compile" else model
    from torch_impl.device import tf32_matmuls

    # TF32 is a CUDA matmul mode: its switches are touched on CUDA only (as they were set, after)
    with tf32_matmuls(mode == "tf32") if dev == "cuda" else contextlib.nullcontext(), ctx:
        logits, loss = fwd(torch.from_numpy(ids).to(device), torch.from_numpy(targets).to(device))
    loss.backward()
    grads = {k: p.grad.detach().double().cpu().numpy() for k, p in model.named_parameters() if p.grad is not None}
    return {"logits": logits.detach().double().cpu().numpy(), "loss": float(loss.detach()), "grads": grads}


def deviation(run: dict, ref: dict, dtype: str, scales: dict[str, float] | None = None,
              targets: np.ndarray | None = None) -> dict:
    """Max deviations of a run from the oracle, and whether it is within the tolerance for `dtype`:
    the logits, the loss (against the oracle's at the forward tolerance, and, given `targets`,
    against the float64 cross-entropy of the run's own logits at own_logits_loss_tol, as `gpt-oracle
    check` does: a fast path takes its loss apart from the logits it returns, and a loss-only bug
    would pass the logits), and every gradient. Gradients in bf16 / fp16 / tf32 are judged per
    tensor by tolerances.GRADIENT_NORM (as `gpt-oracle check` judges whole-model gradients): the
    elementwise rule's atol is larger than most of a model's gradients and would pass a missing
    one. `scales`: checks.position_grad_scales of the same batch, needed for those dtypes."""
    from numpy_ref.cross_entropy import cross_entropy_forward
    from parity_tests.checks import compare_grad_norm
    from parity_tests.compare import compare
    from parity_tests.tolerances import forward_tol, gradient_norm_tol, gradient_tol, own_logits_loss_tol

    logits = compare("logits", run["logits"], ref["logits"], forward_tol(dtype))
    losses = [compare("loss", np.asarray(run["loss"]), np.asarray(ref["loss"]), forward_tol(dtype))]
    if targets is not None:
        own = float(cross_entropy_forward(run["logits"], targets)[0])
        losses.append(compare("loss vs its own logits", np.asarray(run["loss"]), np.asarray(own),
                              own_logits_loss_tol(dtype)))
    norm_tol = gradient_norm_tol(dtype)
    if norm_tol is not None and scales is None:
        raise ValueError(f"deviation: {dtype} gradients are judged per tensor and need the position scales")
    shared = [k for k in ref["grads"] if k in run["grads"]]
    if norm_tol is None:
        grads = [compare(f"d{k}", run["grads"][k], ref["grads"][k], gradient_tol(dtype)) for k in shared]
    else:
        grads = [compare_grad_norm(f"d{k}", run["grads"][k], ref["grads"][k], scales[k], norm_tol) for k in shared]
    worst = max(grads, key=lambda c: c.max_abs) if grads else None
    missing = sorted(set(ref["grads"]) - set(run["grads"]))
    failed = [c.name for c in grads if not c.ok]
    note = f"worst grad {worst.name}" if worst else ""
    if norm_tol is not None:
        note += f"; gradients per tensor, ||err|| <= {norm_tol.rel:.3g} s"
    failed = [c.name for c in losses if not c.ok] + failed  # a NaN loss fails its comparison too
    if failed or missing:
        note += f"; over tolerance: {(failed + [f'd{k} (none)' for k in missing])[:3]}"
    return {"logits": logits.max_abs, "loss": abs(run["loss"] - ref["loss"]),
            "grads": worst.max_abs if worst else None, "worst_grad": worst.name if worst else None,
            "within_tolerance": bool(logits.ok and not failed and not missing),
            "tolerance_dtype": dtype, "note": note}


def adamw_deviation(config_d: dict, params: dict, grads: dict, device: str) -> dict:
    """One AdamW step from the same weights and gradients: torch fused (float32) vs numpy_ref (float64)."""
    import torch

    np_params = {k: v.copy() for k, v in params.items()}
    numpy_optimizer(np_params).step({k: grads[k] for k in np_params})
    model = torch_model(config_d, params, device)
    named = dict(model.named_parameters())
    for k, p in named.items():
        p.grad = torch.from_numpy(grads[k]).to(device=device, dtype=p.dtype)
    from torch_impl.optim import build_optimizer

    opt = build_optimizer(model, "adamw", lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    name = "fused" if opt.defaults.get("fused") else "foreach"
    opt.step()
    worst = max((float(np.max(np.abs(named[k].detach().double().cpu().numpy() - v))), k) for k, v in np_params.items())
    return {"params_after_step": worst[0], "worst": worst[1], "optimizer": name}


def error_budget(config_name: str, config_d: dict, params: dict, *, B: int = 2, T: int = 32, device: str = "cpu",
                 compile_ok: bool = True, progress: Callable[[str], None] = lambda s: None,
                 compile_skipped_why: str = "compilation takes minutes on CPU; see the first config") -> list[dict]:
    T = min(T, config_d["context_length"])
    ids, targets = batch(config_d, B, T, seed=1)
    progress(f"error budget {config_name}: float64 oracle")
    rows: list[dict] = []

    scales: dict[str, float] = {}

    def position_scales() -> dict[str, float]:
        """checks.position_grad_scales of this batch (B*T oracle passes), once, when a bf16 row needs it."""
        if not scales:
            from numpy_ref.config import GPTConfig
            from numpy_ref.model import GPTModel
            from parity_tests.checks import position_grad_scales

            progress(f"error budget {config_name}: per-position gradient scales ({targets.size} oracle passes)")
            model = GPTModel(GPTConfig(**config_d), seed=0, dtype=np.float64)
            for k, v in params.items():
                model.params[k][...] = v
            scales.update(position_grad_scales(model, ids, targets))
        return scales

    def row(setting, fn, dtype):
        from parity_tests.tolerances import gradient_norm_tol

        try:
            d = fn()
        except Exception as exc:  # noqa: BLE001 - the setting did not run: not measured, with why
            d = {"note": f"not measured: {type(exc).__name__}: {str(exc)[:120]}", "within_tolerance": None}
        else:
            if "logits" in d:
                try:
                    d = deviation(d, ref, dtype, position_scales() if gradient_norm_tol(dtype) else None, targets)
                except AssertionError as exc:  # the comparison refused what the setting returned: a NO
                    d = {"note": f"{type(exc).__name__}: {str(exc)[:160]}", "within_tolerance": False}
        rows.append({"config": config_name, "setting": setting, "B": B, "T": T, **d})

    try:
        ref = oracle(config_d, params, ids, targets)
    except Exception as exc:  # noqa: BLE001
        return [{"config": config_name, "setting": "float64 oracle", "within_tolerance": None,
                 "note": f"not measured: {type(exc).__name__}: {exc}"}]
    progress(f"error budget {config_name}: numpy float32")
    row("numpy float32 (fused)", lambda: oracle(config_d, params, ids, targets, "float32"), "float32")
    for setting, mode, dtype in (("torch fp32 (SDPA default kernel)", "fp32", "float32"),
                                 ("torch fp32 (SDPA math kernel)", "sdpa-math", "float32"),
                                 ("torch TF32", "tf32", "tf32"),
                                 ("torch bf16 autocast", "bf16", "bfloat16"),
                                 ("torch.compile fp32", "compile", "float32")):
        if mode == "tf32" and not device.startswith("cuda"):
            rows.append({"config": config_name, "setting": setting, "within_tolerance": None,
                         "note": "n/a: TF32 is a CUDA matmul mode"})
            continue
        if mode == "compile" and not compile_ok:
            rows.append({"config": config_name, "setting": setting, "within_tolerance": None,
                         "note": f"not measured here ({compile_skipped_why})"})
            continue
        progress(f"error budget {config_name}: {setting}")
        row(setting, lambda mode=mode: _torch_run(config_d, params, ids, targets, mode, device), dtype)
    progress(f"error budget {config_name}: AdamW step")
    try:
        a = adamw_deviation(config_d, params, ref["grads"], device)
        rows.append({"config": config_name, "setting": f"AdamW step ({a['optimizer']}, fp32)",
                     "reference": "numpy_ref AdamW float64", "params": a["params_after_step"],
                     "within_tolerance": None, "note": f"max |dparam| after one step {a['params_after_step']:.2e} "
                     f"({a['worst']})"})
    except Exception as exc:  # noqa: BLE001
        rows.append({"config": config_name, "setting": "AdamW step", "within_tolerance": None,
                     "note": f"not measured: {type(exc).__name__}: {str(exc)[:120]}"})
    return rows
