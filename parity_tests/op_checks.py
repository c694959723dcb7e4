"""Op-level parity: every primitive and composite of numpy_ref's autograd engine against torch.

`run_op_checks(dtype)` runs each op on fixed random inputs (a few shapes, broadcasting
included) in both engines, in the same dtype, and compares the output and every input's
gradient under a random upstream gradient (never only `.sum()`: an all-ones cotangent cannot
see a transposed gradient). `gpt-oracle check` prints one row per op.

The op tables (`UNARY`, `BINARY`) and `compare_op` are shared with the hypothesis tests in
`test_autograd.py` and `test_autograd_vs_torch.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import numpy_ref.functional as nf
import numpy_ref.tensor as nt
from parity_tests.compare import Comparison, compare
from parity_tests.tolerances import forward_tol, gradient_tol

# ---- input domains: where an op is smooth and defined ----------------------------------------


def to_domain(raw: np.ndarray, domain: str) -> np.ndarray:
    """Map unconstrained values into an op's domain, keeping them away from poles and edges."""
    if domain == "real":
        return raw
    if domain == "positive":  # log, sqrt, a base raised to a tensor power
        return np.abs(raw) + 0.5
    if domain == "nonzero":  # a divisor
        return np.where(raw >= 0, 1.0, -1.0) * (np.abs(raw) + 0.5)
    if domain == "unit":  # a probability, strictly inside (0, 1)
        return 0.05 + 0.9 / (1.0 + np.exp(-raw))
    raise ValueError(f"unknown input domain {domain!r}")


@dataclass(frozen=True)
class OpDef:
    numpy_fn: Callable  # Tensors -> Tensor
    torch_fn: Callable  # torch tensors -> torch tensor
    domains: tuple[str, ...]


# Elementwise ops of one input, and whole-array composites whose last axis is the class axis.
UNARY: dict[str, OpDef] = {
    "neg": OpDef(nt.neg, torch.neg, ("real",)),
    "exp": OpDef(nt.exp, torch.exp, ("real",)),
    "log": OpDef(nt.log, torch.log, ("positive",)),
    "tanh": OpDef(nt.tanh, torch.tanh, ("real",)),
    "sqrt": OpDef(nt.sqrt, torch.sqrt, ("positive",)),
    "relu": OpDef(nt.relu, torch.relu, ("real",)),
    "pow": OpDef(lambda x: x ** 3, lambda x: x ** 3, ("real",)),
    "pow_half": OpDef(lambda x: x ** 0.5, lambda x: x ** 0.5, ("positive",)),
    "softmax": OpDef(lambda x: nf.softmax(x, axis=-1), lambda x: torch.softmax(x, dim=-1), ("real",)),
    "log_softmax": OpDef(lambda x: nf.log_softmax(x, axis=-1), lambda x: torch.log_softmax(x, dim=-1), ("real",)),
    "gelu": OpDef(nf.gelu, lambda x: F.gelu(x, approximate="tanh"), ("real",)),
    "sigmoid": OpDef(nf.sigmoid, torch.sigmoid, ("real",)),
}

# Elementwise ops of two broadcasting inputs.
BINARY: dict[str, OpDef] = {
    "add": OpDef(nt.add, torch.add, ("real", "real")),
    "sub": OpDef(nt.sub, torch.sub, ("real", "real")),
    "mul": OpDef(nt.mul, torch.mul, ("real", "real")),
    "div": OpDef(nt.div, torch.div, ("real", "nonzero")),
    "maximum": OpDef(nt.maximum, torch.maximum, ("real", "real")),
    "pow_tensor": OpDef(nt.pow, torch.pow, ("positive", "real")),
    "matmul": OpDef(nt.matmul, torch.matmul, ("real", "real")),
}


# ---- one comparison --------------------------------------------------------------------------


def compare_op(name: str, numpy_fn: Callable, torch_fn: Callable, inputs: Sequence[np.ndarray], dtype: str = "float64",
               upstream_seed: int = 0) -> list[Comparison]:
    """Forward and input gradients of `numpy_fn` (numpy_ref engine) vs `torch_fn` (torch autograd).

    Both run in `dtype` on the same values; both backward passes take the same random upstream
    gradient. Comparisons are named `<name> forward` and `<name> grad[i]`, torch as `actual`,
    numpy_ref as `expected`. Raises AssertionError if numpy_ref's output dtype drifted.
    """
    np_dtype = np.dtype(dtype)
    xs = [np.asarray(x).astype(np_dtype) for x in inputs]
    ts = [nt.Tensor(x.copy(), requires_grad=True) for x in xs]
    out = numpy_fn(*ts)
    if out.dtype != np_dtype:
        raise AssertionError(f"{name}: numpy_ref computed in {out.dtype} from {dtype} inputs")
    G = np.random.default_rng(upstream_seed).standard_normal(out.shape).astype(np_dtype)
    if out.requires_grad:
        out.backward(G)

    tts = [torch.tensor(x, requires_grad=True) for x in xs]
    t_out = torch_fn(*tts)
    if t_out.requires_grad:
        t_out.backward(torch.from_numpy(G))

    fwd, grd = forward_tol(dtype), gradient_tol(dtype)
    head, _, label = name.partition(" ")
    suffix = f" {label}" if label else ""
    results = [compare(f"{head} forward{suffix}", t_out, out.data, fwd)]
    for i, (t, tt) in enumerate(zip(ts, tts)):
        np_grad = t.grad if t.grad is not None else np.zeros_like(xs[i])
        t_grad = tt.grad if tt.grad is not None else torch.zeros_like(tt)
        results.append(compare(f"{head} grad[{i}]{suffix}", t_grad, np_grad, grd))
    return results


# ---- the fixed cases behind `gpt-oracle check` -----------------------------------------------


def _s(shape: tuple) -> str:
    """A shape without spaces, for case labels: (2, 1, 4) -> "(2,1,4)"."""
    return "(" + ",".join(str(n) for n in shape) + ")"


def op_cases(rng: np.random.Generator) -> list[tuple[str, Callable, Callable, list[tuple[tuple, str]]]]:
    """(name, numpy_fn, torch_fn, [(shape, domain) per input]); constants drawn from `rng`."""
    cases = []
    for op, d in UNARY.items():
        cases.append((f"op:{op}", d.numpy_fn, d.torch_fn, [((3, 5), d.domains[0])]))
        cases.append((f"op:{op} {_s((2, 1, 4))}", d.numpy_fn, d.torch_fn, [((2, 1, 4), d.domains[0])]))
    for op, d in BINARY.items():
        if op == "matmul":
            continue
        for sa, sb in [((3, 4), (3, 4)), ((3, 4), (4,)), ((2, 1, 3), (4, 1))]:
            cases.append((f"op:{op} {_s(sa)}x{_s(sb)}", d.numpy_fn, d.torch_fn,
                          [(sa, d.domains[0]), (sb, d.domains[1])]))
    for sa, sb in [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((1, 3, 4), (2, 4, 2)), ((4,), (2, 4, 3)),
                   ((2, 3, 4), (4,)), ((4,), (4,))]:
        cases.append((f"op:matmul {_s(sa)}@{_s(sb)}", nt.matmul, torch.matmul, [(sa, "real"), (sb, "real")]))

    for axis, keep in [(None, False), (1, True), ((0, 2), False), (-1, False)]:
        label = f"axis={_s(axis) if isinstance(axis, tuple) else axis},keepdims={keep}"
        dims = tuple(range(3)) if axis is None else axis
        cases.append((f"op:sum {label}", lambda x, a=axis, k=keep: x.sum(a, k),
                      lambda x, d=dims, k=keep: x.sum(dim=d, keepdim=k), [((2, 3, 4), "real")]))
        cases.append((f"op:mean {label}", lambda x, a=axis, k=keep: x.mean(a, k),
                      lambda x, d=dims, k=keep: x.mean(dim=d, keepdim=k), [((2, 3, 4), "real")]))
        cases.append((f"op:max {label}", lambda x, a=axis, k=keep: x.max(a, k),
                      lambda x, d=dims, k=keep: torch.amax(x, dim=d, keepdim=k), [((2, 3, 4), "real")]))

    cases.append(("op:reshape", lambda x: x.reshape(4, 6), lambda x: x.reshape(4, 6), [((2, 3, 4), "real")]))
    cases.append(("op:permute", lambda x: x.permute(2, 0, 1), lambda x: x.permute(2, 0, 1), [((2, 3, 4), "real")]))
    cases.append(("op:transpose", lambda x: x.transpose(-2, -1), lambda x: x.transpose(-2, -1), [((2, 3, 4), "real")]))

    rows = rng.integers(0, 4, size=6)
    rows[1] = rows[0]  # a repeated index: its gradients must accumulate
    cases.append(("op:getitem slices", lambda x: x[1:, ::2], lambda x: x[1:, ::2], [((4, 5), "real")]))
    cases.append(("op:getitem repeated-rows", lambda x, r=rows: x[r], lambda x, r=rows: x[torch.from_numpy(r)],
                  [((4, 5), "real")]))
    idx = rng.integers(0, 5, size=(2, 3, 4))
    idx[0, 0, 1] = idx[0, 0, 0]
    cases.append(("op:take_along_axis", lambda x, i=idx: nt.take_along_axis(x, i, axis=-1),
                  lambda x, i=idx: torch.take_along_dim(x, torch.from_numpy(i), dim=-1), [((2, 3, 5), "real")]))
    cases.append(("op:concatenate", lambda a, b: nt.concatenate([a, b, a], axis=1),
                  lambda a, b: torch.cat([a, b, a], dim=1), [((2, 3), "real"), ((2, 4), "real")]))
    cases.append(("op:split", lambda x: nt.concatenate(nt.split(x, [1, 3], axis=1)[::-1], axis=1),
                  lambda x: torch.cat(torch.tensor_split(x, [1, 3], dim=1)[::-1], dim=1), [((2, 5), "real")]))
    cond = rng.random((3, 4)) < 0.5
    cases.append(("op:where", lambda a, b, c=cond: nt.where(c, a, b),
                  lambda a, b, c=cond: torch.where(torch.from_numpy(c), a, b), [((3, 4), "real"), ((4,), "real")]))
    cases.append(("op:masked_fill", lambda a, c=cond: nt.masked_fill(a, c, -3.5),
                  lambda a, c=cond: a.masked_fill(torch.from_numpy(c), -3.5), [((3, 4), "real")]))

    y = (rng.random((3, 4)) < 0.5).astype(np.float64)
    cases.append(("op:binary_cross_entropy", lambda p, y=y: nf.binary_cross_entropy(p, y.astype(p.dtype)),
                  lambda p, y=y: F.binary_cross_entropy(p, torch.from_numpy(y).to(p.dtype)), [((3, 4), "unit")]))
    targets = rng.integers(0, 7, size=(2, 5))
    targets[0, 2] = -100
    cases.append(("op:cross_entropy", lambda x, t=targets: nf.cross_entropy(x, t, ignore_index=-100),
                  lambda x, t=targets: F.cross_entropy(x.reshape(-1, 7), torch.from_numpy(t).reshape(-1), ignore_index=-100),
                  [((2, 5, 7), "real")]))
    mask = nf.dropout_mask((3, 4), 0.25, rng)
    cases.append(("op:dropout", lambda x, m=mask: nf.dropout(x, 0.25, mask=m),
                  lambda x, m=mask: x * torch.from_numpy(m).to(x.dtype), [((3, 4), "real")]))
    return cases


def run_op_checks(dtype: str = "float64", seed: int = 0) -> list[Comparison]:
    """Every op on fixed random inputs, numpy_ref vs torch in `dtype` (float64 or float32)."""
    if dtype not in ("float64", "float32"):
        raise ValueError(f"op checks run in float64 or float32 (numpy_ref's dtypes), not {dtype!r}")
    rng = np.random.default_rng(seed)
    results: list[Comparison] = []
    for k, (name, numpy_fn, torch_fn, specs) in enumerate(op_cases(rng)):
        inputs = [to_domain(rng.standard_normal(shape), domain) for shape, domain in specs]
        results += compare_op(name, numpy_fn, torch_fn, inputs, dtype=dtype, upstream_seed=seed * 1000 + k)
    return results
