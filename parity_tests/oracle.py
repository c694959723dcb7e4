"""Check your own implementation of a GPT-2 layer against the float64 NumPy oracle.

You wrote a layer norm in Triton, CUDA or plain PyTorch. Give it the same keyword arguments as
the oracle layer of the same name (see `parity_tests.layer_specs.SPECS`: `x, w, b, eps` for
`layernorm`) and call:

    from parity_tests.oracle import check_layer
    report = check_layer("layernorm", my_layernorm, dtype="float32", device="cuda")

Hypothesis draws sizes (batch, time, heads, head size, vocabulary; small by default, larger with
`sizes=`, see `sizes` below) and input values; for each
draw your function runs on torch tensors of `dtype` on `device` and returns one tensor, of the
oracle's shape and of that same dtype (compute in higher precision inside if you like, but cast
the result back: a float64 result would leave the float32 arithmetic untested); its output and
its input gradients (through torch autograd, against a random upstream gradient) are compared
with the oracle's. The oracle runs on the *same* values your function saw (inputs are rounded
to `dtype` first), so the comparison measures your arithmetic, not the rounding of the inputs.
A mismatch raises AssertionError naming the layer, the tensor, its shape and dtype, the errors,
the tolerance and the worst element; hypothesis shrinks it to a small failing case first. So
does an output that is not such a tensor, saying what came back.

A NumPy implementation (forward returning `(out, cache)`, backward returning the gradients)
is checked with `check_numpy_layer` the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from parity_tests.compare import Comparison, compare
from parity_tests.failure_report import ONE_FAILURE, failure_message, note_on_error, own_name, replay_lines
from parity_tests.layer_specs import LayerSpec, OracleResult, Sizes, get_spec, run_oracle
from parity_tests.tolerances import Tol, layer_forward_tol, layer_gradient_tol

if TYPE_CHECKING:
    import torch




@dataclass
class Report:
    """Every comparison made, and the worst error seen per tensor."""

    layer: str
    dtype: str
    comparisons: list[Comparison] = field(default_factory=list)

    examples: int = 0

    def worst(self) -> dict[str, float]:
        """Worst max-abs error per tensor (`out`, `dx`, `dw`, ...) over every draw and row group."""
        out: dict[str, float] = {}
        for c in self.comparisons:
            key = c.name.rsplit(" ", 1)[1]
            out[key] = max(out.get(key, 0.0), c.max_abs)
        return out


@st.composite
def sizes(draw, max_batch: int = 3, max_time: int = 9, max_heads: int = 4, max_head_size: int = 8, *,
          min_time: int = 1, min_head_size: int = 1, head_sizes: tuple[int, ...] | None = None,
          max_vocab: int = 40) -> Sizes:
    """Sizes valid by construction; B=1 and T=1 are reachable (with the default minima) and T
    never exceeds the context. The defaults are small, so hypothesis can shrink a failure to a
    readable case; a kernel that tiles (blocks of 16, 64, ...) should also be checked at sizes
    that cross its tiles, e.g. `sizes(max_time=80, min_head_size=16, max_head_size=64)`, or
    `head_sizes=(16, 32, 64)` for a kernel that takes only those."""
    if min_time < 1 or min_head_size < 1:
        raise ValueError(f"sizes: min_time and min_head_size must be >= 1 (an empty tensor cannot fail a check), "
                         f"got {min_time} and {min_head_size}")
    T = draw(st.integers(min_time, max_time))
    return Sizes(
        B=draw(st.integers(1, max_batch)),
        T=T,
        nh=draw(st.integers(1, max_heads)),
        hs=draw(st.sampled_from(head_sizes) if head_sizes else st.integers(min_head_size, max_head_size)),
        V=draw(st.integers(2, max_vocab)),
        Tc=draw(st.integers(T, max_time + 3)),
    )


def _size_strategy(given_sizes) -> st.SearchStrategy:
    """check_layer's `sizes`: None (the small defaults), one Sizes (always those; the values are
    still drawn), or a hypothesis strategy of Sizes (`sizes(...)` with other limits)."""
    if given_sizes is None:
        return sizes()
    if isinstance(given_sizes, Sizes):
        return st.just(given_sizes)
    if isinstance(given_sizes, st.SearchStrategy):
        return given_sizes
    raise TypeError(f"sizes must be None, a parity_tests.layer_specs.Sizes or a hypothesis strategy of them "
                    f"(parity_tests.oracle.sizes(...)), got {type(given_sizes).__name__}")


def _layer_failure(name: str, where: str, results: list[Comparison], replay: list[str], autograd: bool) -> str:
    """failure_message for one layer: with the forward right, a hint at what the gradients mean
    (with autograd, a forward error under tolerance can surface first in the gradients, as the
    backward differentiates whatever the forward computed)."""
    forward = [r for r in results if r.name.endswith(" out")]
    hint = ""
    if forward and all(r.ok for r in forward):
        worst = max(forward, key=lambda r: r.max_abs)
        why = ("with gradients from autograd, a forward bug below the tolerance can still show first in them, so "
               "check the forward's formula too") if autograd else \
            "the backward is wrong, or the forward by less than the tolerance"
        hint = f"the forward passed ({worst.name}: max_abs={worst.max_abs:.3e}, within its tolerance); {why}"
    return failure_message(f"{name} ({where}) differs from the oracle", results, hint, replay)


_LAYER_IMPORTS = ["import numpy as np", "from parity_tests.oracle import compare_numpy_layer, compare_torch_layer",
                  "from parity_tests.layer_specs import Sizes, get_spec", "from parity_tests.tolerances import Tol"]


def _with_tols(call: str, tol_forward: Tol | None, tol_grad: Tol | None) -> str:
    """`call`, closed, with the tolerances the check was given."""
    return call + (f", tol_forward={tol_forward!r}" if tol_forward else "") + \
        (f", tol_grad={tol_grad!r}" if tol_grad else "") + ")"


# Accepted spellings of each dtype (a torch.dtype is read by its name: torch.float32 -> "float32").
DTYPES = {
    "float64": ("float64", "fp64", "double"),
    "float32": ("float32", "fp32", "float"),
    "tf32": ("tf32",),  # float32 tensors, matmuls in TF32 (torch.backends.cuda.matmul.allow_tf32)
    "bfloat16": ("bfloat16", "bf16"),
    "float16": ("float16", "fp16", "half"),
}


def canonical_dtype(dtype) -> str:
    """The harness's name for `dtype`: "fp32", "float32" and torch.float32 all give "float32"."""
    text = str(dtype).removeprefix("torch.") if type(dtype).__module__ == "torch" else dtype
    if isinstance(text, str):
        for name, spellings in DTYPES.items():
            if text.lower() in spellings:
                return name
    known = ", ".join(f"{name} ({'/'.join(spellings)})" for name, spellings in DTYPES.items())
    raise ValueError(f"dtype={dtype!r} is not one the oracle checks; use one of: {known}, or the torch dtype")


def check_dtype_on_device(dtype: str, device) -> None:
    """ValueError for "tf32" off CUDA: TF32 is a mode of NVIDIA tensor cores for float32 matmuls;
    elsewhere the function would run in plain float32 and be judged by TF32's looser tolerance
    (gpt_oracle/user_input.check_dtype_on_device refuses the same on the command line)."""
    import torch

    if dtype == "tf32" and torch.device(device).type != "cuda":
        raise ValueError(f"dtype='tf32' on device={str(device)!r}: TF32 is a CUDA matmul mode; on {device} the "
                         f"products are plain float32, which dtype='float32' checks at its own, tighter tolerance")


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


def _compare_outputs(
    spec: LayerSpec, prefix: str, out, grads: dict, oracle: OracleResult, tol_f: Tol, tol_g: Tol,
    dtype: str = "float64",
) -> list[Comparison]:
    """`out` and each gradient against the oracle's, split into the spec's row groups if it has any.

    A tensor shaped like the rows (the output, and dx where x is shaped like it) is compared once
    per group, the other groups' elements set to 0 in both (so shapes and worst indices stay those
    of the whole tensor, and a per-tensor scale is the group's own); the rest is compared whole.
    """
    groups = spec.row_groups(oracle.inputs) if spec.row_groups else {}
    if groups and not np.all(sum(m.astype(int) for m in groups.values()) == 1):
        raise AssertionError(f"{spec.name}: row groups {sorted(groups)} must put every row in exactly one group")

    def one(tensor: str, actual, expected, tol: Tol) -> list[Comparison]:
        shape = tuple(np.shape(expected))
        # Before any mask: `_where` broadcasts, so a (T, C) output at B = 1 would pass as (1, T, C).
        got = tuple(actual.shape) if hasattr(actual, "shape") else tuple(np.shape(actual))
        if got != shape:
            raise AssertionError(f"{prefix} {tensor}: the function under test returned shape {got}; "
                                 f"the oracle's {tensor} has shape {shape}")
        results = []
        for group, mask in groups.items():
            if shape[: mask.ndim] != mask.shape or not mask.any():
                continue
            keep = mask.reshape(mask.shape + (1,) * (len(shape) - mask.ndim))
            name = f"{prefix} ({group}) {tensor}" if group else f"{prefix} {tensor}"
            group_tol = spec.group_tol(group, tol, dtype) if spec.group_tol else tol
            results.append(compare(name, _where(keep, actual), np.where(keep, expected, 0.0), group_tol))
        return results or [compare(f"{prefix} {tensor}", actual, expected, tol)]

    results = one("out", out, oracle.out, tol_f)
    for k in spec.differentiable if grads is not None else ():
        results += one(f"d{k}", grads[k], oracle.grads[k], tol_g)
    return results


def _where(keep: np.ndarray, actual):
    """`actual` where `keep`, else 0, in `actual`'s own type and dtype (a bf16 tensor stays one)."""
    if type(actual).__module__.startswith("torch"):
        import torch

        zero = torch.zeros((), dtype=actual.dtype, device=actual.device)
        return torch.where(torch.from_numpy(keep).to(actual.device), actual.detach(), zero)
    return np.where(keep, actual, 0.0)


def _check_torch_output(spec: LayerSpec, label: str, out, expected: np.ndarray, tdtype, grads: bool = True) -> None:
    """What `fn` returned must be a tensor of the oracle's shape, in the dtype asked for, with a
    graph to the inputs; otherwise an AssertionError that says which and what came back."""
    import torch

    where = f"{label}{spec.name}: the function under test returned"
    if isinstance(out, (tuple, list)):
        raise AssertionError(
            f"{where} {_describe(out)}; expected the output tensor alone, of shape {tuple(expected.shape)} "
            f"(gradients come from autograd: return out, not (out, cache))"
        )
    if not isinstance(out, torch.Tensor):
        raise AssertionError(
            f"{where} {_describe(out)}; expected a torch.Tensor of shape {tuple(expected.shape)} and dtype "
            f"{tdtype}, computed from the input tensors with torch operations"
        )
    if tuple(out.shape) != tuple(expected.shape):
        raise AssertionError(f"{where} shape {tuple(out.shape)}; the oracle's output has shape {tuple(expected.shape)}")
    if out.dtype != tdtype:
        # Compared as it is, a float64 result would pass a float32 check without its float32
        # arithmetic ever being tested; compute in higher precision inside if you like, and cast back.
        raise AssertionError(
            f"{where} dtype {out.dtype}; the inputs were {tdtype} and the output must be too "
            f"(a kernel that accumulates in higher precision casts its result back, e.g. .to(x.dtype))"
        )
    if grads and spec.differentiable and not out.requires_grad:
        raise AssertionError(
            f"{where} a tensor that does not require grad, so the gradients for {', '.join(spec.differentiable)} "
            f"cannot be checked: compute it from the inputs without .detach(), .numpy(), .data or torch.no_grad(), "
            f"or wrap your kernel in a torch.autograd.Function with a backward"
        )


def compare_torch_layer(
    spec: LayerSpec, fn: Callable, inputs: dict, *, dtype: str | torch.dtype, device: str = "cpu",
    tol_forward: Tol | None = None, tol_grad: Tol | None = None, label: str = "", upstream_seed: int = 0,
    noncontiguous: bool = False, grads: bool = True,
) -> list[Comparison]:
    """One input set: run `fn` in torch and the oracle in float64; return every comparison.

    An output that is not a tensor, or not of the oracle's shape, or not of `dtype`, or without
    a graph to the inputs, raises AssertionError saying so (before any gradient is computed).
    `noncontiguous`: every float input of 2 or more dimensions is a transposed view (the same
    values, strides not in row-major order), as a slice or a `.mT` of a caller's tensor would be.
    `grads=False`: the forward only (a kernel for inference, under torch.no_grad, with no backward).
    """
    import torch

    dtype = canonical_dtype(dtype)
    check_dtype_on_device(dtype, device)
    quantized = {k: (_quantize(v, dtype) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v) for k, v in inputs.items()}
    oracle = run_oracle(spec, quantized, upstream_seed=upstream_seed)
    tdtype = _torch_dtype(dtype)
    targs = {}
    for k, v in quantized.items():
        if isinstance(v, np.ndarray):
            t = torch.from_numpy(v.copy()).to(device)
            if v.dtype.kind == "f":
                t = t.to(tdtype)
                if noncontiguous and t.ndim >= 2:
                    t = t.mT.contiguous().mT  # the same values in column-major strides: a leaf, as t was
                t = t.requires_grad_(grads and k in spec.differentiable)
            targs[k] = t
        else:
            targs[k] = v
    from torch_impl.device import set_tf32_switches, tf32_switches

    previous_tf32 = tf32_switches()  # through either of torch's APIs (torch_impl/device.py)
    set_tf32_switches(dtype == "tf32", dtype == "tf32")
    try:
        try:
            out = fn(**targs)
        except Exception as err:
            note_on_error(err, f"oracle layer {spec.name!r}", targs)
            raise
        _check_torch_output(spec, label, out, oracle.out, tdtype, grads)
        if grads:
            diff_inputs = [targs[k] for k in spec.differentiable]
            upstream = torch.as_tensor(oracle.upstream, dtype=out.dtype, device=out.device)
            found = torch.autograd.grad(out, diff_inputs, upstream, allow_unused=True)
    finally:
        set_tf32_switches(*previous_tf32)
    # An input the output does not depend on gets no gradient from autograd: that is a zero one.
    found = {k: (torch.zeros_like(targs[k]) if g is None else g)
             for k, g in zip(spec.differentiable, found)} if grads else None
    return _compare_outputs(spec, f"{label}{spec.name}", out, found, oracle,
                            tol_forward or layer_forward_tol(dtype, spec.elementwise),
                            tol_grad or layer_gradient_tol(dtype, spec.elementwise), dtype)


def check_layer(
    name: str, fn: Callable, *, dtype: str | torch.dtype = "float32", device: str = "cpu", max_examples: int = 25,
    tol_forward: Tol | None = None, tol_grad: Tol | None = None, derandomize: bool = False,
    sizes: Sizes | st.SearchStrategy | None = None, noncontiguous: bool = False, grads: bool = True,
) -> Report:
    """Check a torch implementation of oracle layer `name` over hypothesis-drawn inputs.

    `fn` takes the layer's keyword arguments as torch tensors (static ones, like `eps` and
    `n_heads`, as Python values) and returns the output, a tensor of the inputs' dtype; gradients
    come from torch autograd. `dtype` is a name ("float32", "fp32", "bf16", "tf32", ...) or a
    torch dtype. `sizes`: the small defaults (B <= 3, T <= 9, nh <= 4, hs <= 8, V <= 40), one
    `Sizes(B=, T=, nh=, hs=, V=, Tc=)`, or a strategy such as `oracle.sizes(max_time=80,
    min_head_size=16, max_head_size=64)`. `noncontiguous=True` passes every float input of 2 or
    more dimensions as a transposed view (a kernel that reads memory as if it were row-major
    computes garbage on those). `grads=False` checks the forward only (a kernel for inference,
    such as a decoding step, that has no backward). Raises AssertionError on a mismatch (after shrinking:
    every tensor over tolerance, and the lines that replay that case), or when `fn`
    returns something other than such a tensor; returns a Report otherwise.
    """
    spec = get_spec(name)
    dtype = canonical_dtype(dtype)
    check_dtype_on_device(dtype, device)
    report = Report(layer=name, dtype=dtype)

    @settings(max_examples=max_examples, deadline=None, derandomize=derandomize, database=None, **ONE_FAILURE)
    @given(s=_size_strategy(sizes), seed=st.integers(0, 2**31 - 1))
    def _property(s: Sizes, seed: int) -> None:
        inputs = spec.make_inputs(np.random.default_rng(seed), s, dtype)
        results = compare_torch_layer(
            spec, fn, inputs, dtype=dtype, device=device, tol_forward=tol_forward, tol_grad=tol_grad,
            label=f"[sizes={s}, seed={seed}] ", upstream_seed=seed, noncontiguous=noncontiguous, grads=grads,
        )
        fn_name = own_name(fn, "fn")
        call = _with_tols(f"compare_torch_layer(get_spec({name!r}), {fn_name}, get_spec({name!r}).make_inputs("
                          f"np.random.default_rng({seed}), {s}, {dtype!r}), dtype={dtype!r}, device={device!r}, "
                          f"upstream_seed={seed}" + (", noncontiguous=True" if noncontiguous else "")
                          + ("" if grads else ", grads=False"),
                          tol_forward, tol_grad)
        replay = replay_lines(_LAYER_IMPORTS, call, {fn_name: fn})
        assert all(r.ok for r in results), _layer_failure(name, f"{dtype}, {device}", results, replay, True)
        report.comparisons.extend(results)
        report.examples += 1

    _property()
    return report


def check_numpy_layer(
    name: str, forward: Callable, backward: Callable, *, max_examples: int = 25,
    tol_forward: Tol | None = None, tol_grad: Tol | None = None, derandomize: bool = False,
    sizes: Sizes | st.SearchStrategy | None = None,
) -> Report:
    """Check a float64 NumPy pair (forward -> (out, cache); backward(dout, cache) -> grads).

    `backward` returns one gradient per differentiable input, in `SPECS[name].differentiable`'s
    order, as a tuple or list (a single array where there is only one); any other count or form
    raises AssertionError naming what was expected and what came back.
    """
    spec = get_spec(name)
    report = Report(layer=name, dtype="float64")
    tol_f = tol_forward or layer_forward_tol("float64")
    tol_g = tol_grad or layer_gradient_tol("float64")

    @settings(max_examples=max_examples, deadline=None, derandomize=derandomize, database=None, **ONE_FAILURE)
    @given(s=_size_strategy(sizes), seed=st.integers(0, 2**31 - 1))
    def _property(s: Sizes, seed: int) -> None:
        inputs = spec.make_inputs(np.random.default_rng(seed), s)
        results = compare_numpy_layer(spec, forward, backward, inputs, upstream_seed=seed, tol_forward=tol_f,
                                      tol_grad=tol_g, label=f"[sizes={s}, seed={seed}] ")
        f_name, b_name = own_name(forward, "forward"), own_name(backward, "backward")
        call = _with_tols(f"compare_numpy_layer(get_spec({name!r}), {f_name}, {b_name}, get_spec({name!r})"
                          f".make_inputs(np.random.default_rng({seed}), {s}), upstream_seed={seed}", tol_forward, tol_grad)
        replay = replay_lines(_LAYER_IMPORTS, call, {f_name: forward, b_name: backward})
        assert all(r.ok for r in results), _layer_failure(name, "numpy", results, replay, False)
        report.comparisons.extend(results)
        report.examples += 1

    _property()
    return report


def compare_numpy_layer(spec: LayerSpec, forward: Callable, backward: Callable, inputs: dict, *,
                        upstream_seed: int = 0, tol_forward: Tol | None = None, tol_grad: Tol | None = None,
                        label: str = "") -> list[Comparison]:
    """One input set: the NumPy pair against the oracle; every comparison (see check_numpy_layer)."""
    oracle = run_oracle(spec, inputs, upstream_seed=upstream_seed)
    where = f"{label}{spec.name}"
    returned = forward(**{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in inputs.items()})
    if not (isinstance(returned, tuple) and len(returned) == 2):
        raise AssertionError(f"{where}: forward returned {_describe(returned)}; expected a tuple (out, cache)")
    out, cache = returned
    grads = _gradient_list(where, spec, backward(oracle.upstream, cache))
    return _compare_outputs(spec, where, out, dict(zip(spec.differentiable, grads)), oracle,
                            tol_forward or layer_forward_tol("float64"), tol_grad or layer_gradient_tol("float64"))


def _gradient_list(label: str, spec: LayerSpec, returned) -> list:
    """A backward's gradients as a list, one per differentiable input, or an AssertionError that
    says how many were expected (for which inputs) and what came back."""
    expected = len(spec.differentiable)
    names = ", ".join(f"d{k}" for k in spec.differentiable)
    if isinstance(returned, (tuple, list)):
        grads = list(returned)
    elif expected == 1:
        grads = [returned]  # the house form for one gradient: gelu_backward returns dx alone
    else:
        raise AssertionError(
            f"{label}: backward returned {_describe(returned)}; expected a tuple of {expected} gradients "
            f"({names}), one for each of {', '.join(spec.differentiable)} in that order"
        )
    if len(grads) != expected:
        raise AssertionError(
            f"{label}: backward returned {len(grads)} gradient{'s' if len(grads) != 1 else ''}; expected {expected} "
            f"({names}), one for each of {', '.join(spec.differentiable)} in that order"
        )
    for k, g in zip(spec.differentiable, grads):
        if not (isinstance(g, np.ndarray) or np.isscalar(g)) or np.asarray(g).dtype.kind != "f":
            raise AssertionError(f"{label}: backward's gradient d{k} is {_describe(g)}; expected a float array")
    return grads


def _describe(value) -> str:
    """A short description of a returned value for an error message: its type, and shape or length."""
    if isinstance(value, np.ndarray):
        return f"a numpy.ndarray of shape {value.shape} and dtype {value.dtype}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    if value is None:
        return "None"
    module = type(value).__module__
    return f"a {type(value).__name__}" if module == "builtins" else f"a {module}.{type(value).__name__}"
