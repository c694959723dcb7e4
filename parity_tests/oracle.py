"""Check your own implementation of a GPT-2 layer against the float64 NumPy oracle.

You wrote a layer norm in Triton, CUDA or plain PyTorch. Give it the same keyword arguments as
the oracle layer of the same name (see `parity_tests.layer_specs.SPECS`: `x, w, b, eps` for
`layernorm`) and call:

    from parity_tests.oracle import check_layer
    report = check_layer("layernorm", my_layernorm, dtype="float32", device="cuda")

Hypothesis draws sizes (batch, time, heads, head size, vocabulary) and input values; for each
draw your function runs on torch tensors of `dtype` on `device`, its output and its input
gradients (through torch autograd, against a random upstream gradient) are compared with the
oracle's. The oracle runs on the *same* values your function saw (inputs are rounded to `dtype`
first), so the comparison measures your arithmetic, not the rounding of the inputs. A mismatch
raises AssertionError naming the layer, the tensor, its shape and dtype, the errors, the
tolerance and the worst element; hypothesis shrinks it to a small failing case first.

A NumPy implementation (forward returning `(out, cache)`, backward returning the gradients)
is checked with `check_numpy_layer` the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from parity_tests.compare import Comparison, compare
from parity_tests.layer_specs import LayerSpec, Sizes, get_spec, run_oracle
from parity_tests.tolerances import Tol, forward_tol, gradient_tol


@dataclass
class Report:
    """Every comparison made, and the worst error seen per tensor."""

    layer: str
    dtype: str
    comparisons: list[Comparison] = field(default_factory=list)

    examples: int = 0

    def worst(self) -> dict[str, float]:
        """Worst max-abs error per tensor (`out`, `dx`, `dw`, ...) over every draw."""
        out: dict[str, float] = {}
        for c in self.comparisons:
            key = c.name.rsplit(" ", 1)[1]
            out[key] = max(out.get(key, 0.0), c.max_abs)
        return out


@st.composite
def sizes(draw, max_batch: int = 3, max_time: int = 9, max_heads: int = 4, max_head_size: int = 8) -> Sizes:
    """Sizes valid by construction; B=1 and T=1 are reachable and T never exceeds the context."""
    T = draw(st.integers(1, max_time))
    return Sizes(
        B=draw(st.integers(1, max_batch)),
        T=T,
        nh=draw(st.integers(1, max_heads)),
        hs=draw(st.integers(1, max_head_size)),
        V=draw(st.integers(2, 40)),
        Tc=draw(st.integers(T, max_time + 3)),
    )


def _quantize(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float64 values to what `dtype` can hold, returned as float64."""
    if dtype in ("float64",):
        return x
    if dtype in ("float32", "tf32"):
        return x.astype(np.float32).astype(np.float64)
    import torch

    tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return torch.from_numpy(x).to(tdtype).to(torch.float64).numpy()


def _torch_dtype(dtype: str):
    import torch

    return {
        "float64": torch.float64,
        "float32": torch.float32,
        "tf32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[dtype]


def compare_torch_layer(
    spec: LayerSpec, fn: Callable, inputs: dict, *, dtype: str, device: str = "cpu",
    tol_forward: Tol | None = None, tol_grad: Tol | None = None, label: str = "", upstream_seed: int = 0,
) -> list[Comparison]:
    """One input set: run `fn` in torch and the oracle in float64; return every comparison."""
    import torch

    quantized = {k: (_quantize(v, dtype) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v) for k, v in inputs.items()}
    oracle = run_oracle(spec, quantized, upstream_seed=upstream_seed)
    tdtype = _torch_dtype(dtype)
    targs = {}
    for k, v in quantized.items():
        if isinstance(v, np.ndarray):
            t = torch.from_numpy(v.copy()).to(device)
            if v.dtype.kind == "f":
                t = t.to(tdtype).requires_grad_(k in spec.differentiable)
            targs[k] = t
        else:
            targs[k] = v
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        out = fn(**targs)
        diff_inputs = [targs[k] for k in spec.differentiable]
        upstream = torch.as_tensor(oracle.upstream, dtype=out.dtype, device=out.device)
        grads = torch.autograd.grad(out, diff_inputs, upstream, allow_unused=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    tol_f = tol_forward or forward_tol(dtype)
    tol_g = tol_grad or gradient_tol(dtype)
    prefix = f"{label}{spec.name}"
    results = [compare(f"{prefix} out", out, oracle.out, tol_f)]
    for k, g in zip(spec.differentiable, grads):
        if g is None:
            g = torch.zeros_like(targs[k])
        results.append(compare(f"{prefix} d{k}", g, oracle.grads[k], tol_g))
    return results


def check_layer(
    name: str, fn: Callable, *, dtype: str = "float32", device: str = "cpu", max_examples: int = 25,
    tol_forward: Tol | None = None, tol_grad: Tol | None = None, derandomize: bool = False,
) -> Report:
    """Check a torch implementation of oracle layer `name` over hypothesis-drawn inputs.

    `fn` takes the layer's keyword arguments as torch tensors (static ones, like `eps` and
    `n_heads`, as Python values) and returns the output; gradients come from torch autograd.
    Raises AssertionError on the first mismatch (after shrinking); returns a Report otherwise.
    """
    spec = get_spec(name)
    report = Report(layer=name, dtype=dtype)

    @settings(max_examples=max_examples, deadline=None, derandomize=derandomize, database=None)
    @given(s=sizes(), seed=st.integers(0, 2**31 - 1))
    def _property(s: Sizes, seed: int) -> None:
        inputs = spec.make_inputs(np.random.default_rng(seed), s)
        results = compare_torch_layer(
            spec, fn, inputs, dtype=dtype, device=device, tol_forward=tol_forward, tol_grad=tol_grad,
            label=f"[sizes={s}, seed={seed}] ", upstream_seed=seed,
        )
        bad = [r for r in results if not r.ok]
        assert not bad, f"{name} ({dtype}, {device}) differs from the oracle: " + bad[0].message()
        report.comparisons.extend(results)
        report.examples += 1

    _property()
    return report


def check_numpy_layer(
    name: str, forward: Callable, backward: Callable, *, max_examples: int = 25,
    tol_forward: Tol | None = None, tol_grad: Tol | None = None, derandomize: bool = False,
) -> Report:
    """Check a float64 NumPy pair (forward -> (out, cache); backward(dout, cache) -> grads)."""
    spec = get_spec(name)
    report = Report(layer=name, dtype="float64")
    tol_f = tol_forward or forward_tol("float64")
    tol_g = tol_grad or gradient_tol("float64")

    @settings(max_examples=max_examples, deadline=None, derandomize=derandomize, database=None)
    @given(s=sizes(), seed=st.integers(0, 2**31 - 1))
    def _property(s: Sizes, seed: int) -> None:
        inputs = spec.make_inputs(np.random.default_rng(seed), s)
        oracle = run_oracle(spec, inputs, upstream_seed=seed)
        out, cache = forward(**{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in inputs.items()})
        grads = backward(oracle.upstream, cache)
        grads = grads if isinstance(grads, tuple) else (grads,)
        label = f"[sizes={s}, seed={seed}] {name}"
        results = [compare(f"{label} out", out, oracle.out, tol_f)]
        results += [compare(f"{label} d{k}", g, oracle.grads[k], tol_g) for k, g in zip(spec.differentiable, grads)]
        bad = [r for r in results if not r.ok]
        assert not bad, f"{name} (numpy) differs from the oracle: " + bad[0].message()
        report.comparisons.extend(results)
        report.examples += 1

    _property()
    return report
