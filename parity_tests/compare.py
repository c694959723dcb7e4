"""The one bridge between the trees: array conversion and comparisons that say where they failed.

`compare(name, actual, expected, tol)` returns a `Comparison` (max abs / rel error, worst index,
verdict); `assert_close` raises an AssertionError whose message names the tensor, its shape and
dtype, both errors, the tolerance and the worst element. Model-level helpers compare whole
parameter dicts and name the first entry (in model order) that diverged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from parity_tests.tolerances import Tol


def to_numpy(x: Any) -> np.ndarray:
    """A torch tensor (any device, any dtype, with or without grad) or array-like -> ndarray.

    bf16/fp16 tensors come back as float32 ndarrays (NumPy has no bf16); values are unchanged.
    """
    if type(x).__module__.startswith("torch"):
        import torch

        t = x.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return t.numpy()
    return np.asarray(x)


def to_torch(x: np.ndarray, dtype=None, device=None):
    """ndarray -> torch tensor (a copy), optionally cast and moved."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x).copy())
    if dtype is not None or device is not None:
        t = t.to(device=device, dtype=dtype)
    return t


@dataclass
class Comparison:
    name: str
    shape: tuple
    dtype: str
    max_abs: float
    max_rel: float | None  # None: no oracle entry exceeds atol, so no relative error means anything
    worst_index: tuple
    actual_at_worst: float
    expected_at_worst: float
    tol: Tol
    ok: bool

    def describe(self) -> str:
        """What was compared and how far apart it is, without the verdict."""
        return (
            f"{self.name} shape={self.shape} dtype={self.dtype} "
            f"max_abs={self.max_abs:.3e} max_rel={format_rel(self.max_rel, self.tol)} "
            f"(atol={self.tol.atol:.1e}{f' or {self.tol.floor:.0e} of the tensor max' if self.tol.floor else ''}, "
            f"rtol={self.tol.rtol:.1e}{' of the tensor max' if self.tol.per_tensor else ''}: {self.tol.why}); "
            f"worst at index {self.worst_index}: actual={self.actual_at_worst!r} expected={self.expected_at_worst!r}"
        )

    def message(self) -> str:
        return f"{'ok' if self.ok else 'MISMATCH'}: {self.describe()}"


def format_rel(max_rel: float | None, tol: Tol | None = None, spec: str = ".3e") -> str:
    """A max relative error for people: "n/a (...)" where no oracle entry exceeds atol."""
    if max_rel is None:
        return f"n/a (every |expected| <= atol {tol.atol:.1e})" if tol is not None else "n/a"
    return format(max_rel, spec)


def compare(name: str, actual: Any, expected: Any, tol: Tol) -> Comparison:
    """Compare `actual` against the oracle `expected` elementwise under `tol`.

    Shapes must match exactly (no broadcasting: a (T, C) vs (C, T) mix-up must not pass), and
    a NaN or inf anywhere that the oracle does not have is a failure.
    """
    a_raw = to_numpy(actual)
    e = to_numpy(expected).astype(np.float64)
    dtype = str(getattr(actual, "dtype", a_raw.dtype)).replace("torch.", "")
    if a_raw.shape != e.shape:
        raise AssertionError(f"{name}: shape {a_raw.shape} differs from the oracle's {e.shape}")
    a = a_raw.astype(np.float64)
    if a.size == 0:  # nothing to differ; no relative error either (None, not 0)
        return Comparison(name, a.shape, dtype, 0.0, None, (), 0.0, 0.0, tol, True)
    both_nonfinite_same = (~np.isfinite(a)) & (~np.isfinite(e)) & (np.isnan(a) == np.isnan(e)) & (
        np.nan_to_num(a) == np.nan_to_num(e)
    )
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a - e)
    diff = np.where(both_nonfinite_same, 0.0, diff)
    diff = np.where(np.isnan(diff), np.inf, diff)
    scale = np.abs(np.nan_to_num(e, posinf=0.0, neginf=0.0))
    atol = max(tol.atol, tol.floor * float(scale.max()))  # Tol.floor: near-zero results of wide sums
    if tol.per_tensor:
        scale = np.full_like(scale, scale.max())
    excess = diff - (atol + tol.rtol * scale)
    worst_flat = int(np.argmax(excess)) if np.any(excess > 0) else int(np.argmax(diff))
    worst = tuple(int(i) for i in np.unravel_index(worst_flat, a.shape))
    # Relative error only where the oracle is larger than atol: near zero it means nothing (a
    # gradient that is zero in exact arithmetic comes out as a 1e-17 residue, and any roundoff
    # of it is a relative error of 1e10). Where no entry is that large the relative error is
    # None, "n/a", never 0: a tensor of small values, all of them wrong, is not "0% off".
    magnitude = np.abs(np.nan_to_num(e))
    significant = magnitude > tol.atol
    max_rel = float(np.max(diff[significant] / magnitude[significant])) if significant.any() else None
    ok = bool(np.all(excess <= 0))
    return Comparison(
        name=name,
        shape=tuple(a.shape),
        dtype=dtype,
        max_abs=float(diff.max()),
        max_rel=max_rel,
        worst_index=worst,
        actual_at_worst=float(a.flat[worst_flat]),
        expected_at_worst=float(e.flat[worst_flat]),
        tol=tol,
        ok=ok,
    )


def assert_close(name: str, actual: Any, expected: Any, tol: Tol) -> Comparison:
    """`compare`, raising AssertionError with the full message on a mismatch."""
    result = compare(name, actual, expected, tol)
    assert result.ok, result.message()
    return result


def compare_dicts(
    prefix: str, actual: Mapping[str, Any], expected: Mapping[str, Any], tol: Tol, order: Iterable[str] | None = None
) -> list[Comparison]:
    """Compare two name -> array mappings with the same keys, in `order` (default: expected's)."""
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing or extra:
        raise AssertionError(f"{prefix}: keys differ; missing {missing}, unexpected {extra}")
    keys = list(order) if order is not None else list(expected)
    return [compare(f"{prefix}[{k}]", actual[k], expected[k], tol) for k in keys]


def assert_dicts_close(
    prefix: str, actual: Mapping[str, Any], expected: Mapping[str, Any], tol: Tol, order: Iterable[str] | None = None
) -> list[Comparison]:
    """`compare_dicts`, failing on the first entry (in model order) that diverged, naming it."""
    results = compare_dicts(prefix, actual, expected, tol, order)
    bad = [r for r in results if not r.ok]
    if bad:
        others = f" ({len(bad) - 1} more entries also differ: {[r.name for r in bad[1:4]]}...)" if len(bad) > 1 else ""
        raise AssertionError("first divergence: " + bad[0].message() + others)
    return results


# ---- weights across the boundary -----------------------------------------------------------
# Both trees use the same parameter names and (in, out) layout (docs/design.md), so moving
# weights is a copy under the same key, with no transposes anywhere.


def numpy_params_to_torch(params: Mapping[str, np.ndarray], dtype=None, device=None) -> dict:
    import torch

    dtype = dtype or torch.float64
    return {k: to_torch(v, dtype=dtype, device=device) for k, v in params.items()}


def load_numpy_params_into_torch(model, params: Mapping[str, np.ndarray]) -> None:
    """Copy a numpy_ref parameter dict into a torch_impl model; keys and shapes must match."""
    import torch

    state = model.state_dict()
    missing = sorted(set(state) - set(params))
    extra = sorted(set(params) - set(state))
    if missing or extra:
        raise KeyError(f"parameter names differ between the trees: torch-only {missing}, numpy-only {extra}")
    with torch.no_grad():
        for k, t in state.items():
            v = params[k]
            if tuple(t.shape) != tuple(v.shape):
                raise ValueError(f"{k}: torch shape {tuple(t.shape)} vs numpy shape {v.shape}")
            t.copy_(torch.from_numpy(np.ascontiguousarray(v)).to(t.dtype))


def torch_params_to_numpy(model, dtype=np.float64) -> dict[str, np.ndarray]:
    return {k: to_numpy(v).astype(dtype) for k, v in model.state_dict().items()}
