"""Each layer's forward and backward, timed alone, in both trees.

Inputs come from `parity_tests.layer_specs` (the same table the parity tests use), at the
sizes of the configuration being benchmarked. NumPy: `<layer>_forward(**inputs)` then
`<layer>_backward(dout, cache)`. torch: `<layer>_forward(**tensors)`, and the backward is
`torch.autograd.grad` on a kept graph (retain_graph) so that only the backward is timed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from benchmarks import flops as F
from benchmarks.backends import matmul_precision
from benchmarks.memory import peak_bytes
from benchmarks.record import Result, guarded
from benchmarks.stats import time_call

LAYERS = ("embedding", "layernorm", "linear", "gelu", "attention", "mlp", "cross_entropy")


def _sizes(config_d: dict, B: int, T: int):
    from parity_tests.layer_specs import Sizes

    nh = config_d["n_heads"]
    return Sizes(B=B, T=T, nh=nh, hs=config_d["emb_dim"] // nh, V=config_d["vocab_size"],
                 Tc=config_d["context_length"])


def _numpy_layer(name: str, inputs: dict, dtype: str):
    from parity_tests.layer_specs import get_spec

    forward, backward = get_spec(name).numpy_pair()
    args = {k: (v.astype(dtype) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v) for k, v in inputs.items()}
    out, cache = forward(**args)
    dout = np.asarray(np.random.default_rng(1).standard_normal(np.shape(out)), dtype=dtype)
    if np.ndim(out) == 0:
        dout = np.asarray(1.0, dtype=dtype)
    fwd = lambda: forward(**args)  # noqa: E731
    bwd = lambda: backward(dout, cache)  # noqa: E731
    return fwd, bwd, (lambda: None)


def _torch_layer(name: str, inputs: dict, mode: str, device: str, diff: tuple[str, ...]):
    import contextlib

    import torch

    from parity_tests.layer_specs import get_spec

    fn = get_spec(name).torch_forward()
    args = {}
    for k, v in inputs.items():
        if isinstance(v, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(v)).to(device)
            if v.dtype.kind == "f":
                t = t.float().requires_grad_(k in diff)
            args[k] = t
        else:
            args[k] = v
    dev = device.split(":")[0]
    ctx = (lambda: torch.autocast(dev, dtype=torch.bfloat16)) if mode == "bf16" else contextlib.nullcontext
    with ctx():
        out = fn(**args)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=out.dtype)
    leaves = [args[k] for k in diff if isinstance(args.get(k), torch.Tensor) and args[k].requires_grad]

    precision = matmul_precision(device, tf32=False)  # float32 rows time float32 matmuls (backends.py)

    def fwd():
        precision()
        with torch.no_grad(), ctx():
            return fn(**args)

    def bwd():
        precision()
        return torch.autograd.grad(out, leaves, dout, retain_graph=True, allow_unused=True)

    sync = (lambda: torch.cuda.synchronize(device)) if dev == "cuda" else (lambda: None)
    return fwd, bwd, sync


def bench_layers(config_name: str, config_d: dict, B: int, T: int, backends: list[str], device: str = "cpu",
                 repeats: int = 5, budget_s: float = 3.0, progress: Callable[[str], None] = lambda s: None
                 ) -> list[Result]:
    results: list[Result] = []
    for name in LAYERS:
        for backend in backends:
            progress(f"layers {config_name}: {name} {backend}")
            results += guarded(lambda: _one(name, config_name, config_d, B, T, backend, device, repeats, budget_s),
                               "layer", config_name, backend, f"{name} forward/backward")
    return results


def _one(name, config_name, config_d, B, T, backend, device, repeats, budget_s) -> list[Result]:
    from parity_tests.layer_specs import get_spec

    spec = get_spec(name)
    sizes = _sizes(config_d, B, T)
    inputs = spec.make_inputs(np.random.default_rng(0), sizes)
    if backend.startswith("numpy-"):
        dtype = backend.split("-", 1)[1]
        fwd, bwd, sync = _numpy_layer(name, inputs, dtype)
        kind, peak = "numpy", f"numpy_{dtype}"
    else:
        mode = backend.split("-", 1)[1]
        fwd, bwd, sync = _torch_layer(name, inputs, mode, device, spec.differentiable)
        kind = "torch"
        peak = f"{'cuda' if device.startswith('cuda') else 'torch'}_{'bfloat16' if mode == 'bf16' else 'float32'}"
    out = []
    for direction, fn, fl in (("forward", fwd, F.layer_forward_flops(name, B, T, sizes.C, sizes.V)),
                              ("backward", bwd, F.layer_backward_flops(name, B, T, sizes.C, sizes.V))):
        timing = time_call(fn, warmup=1, repeats=repeats, budget_s=budget_s, sync=sync)
        out.append(Result("layer", config_name, backend, f"{name} {direction}", B=B, T=T, tokens=B * T, flops=fl,
                          peak_name=peak, timing=timing, memory=peak_bytes(fn, kind, device)))
    return out
