"""Finite differences as a third oracle: check analytic gradients against central differences.

For a function f and a random upstream gradient G of f's output shape, the scalar
`s(x) = sum(f(x) * G)` has gradient `ds/dx = J^T G`, exactly what a VJP computes. Each input
element is nudged by +-h, h = eps * max(1, |x_j|), and

    ds/dx_j ~ (s(x + h e_j) - s(x - h e_j)) / ((x_j + h) - (x_j - h))     error O(h^2) + O(u/h)

in float64 (unit roundoff u ~ 1e-16): with eps = 1e-6 the rounding term is near 1e-10 relative
and the truncation term near 1e-12 (times the third derivative). The
step scales with |x_j| and the division is by the step actually taken: a fixed 1e-6 is lost in
the rounding of x_j = 1e11 (x_j + 1e-6 == x_j: every numerical gradient 0, and a backward that
returned zeros passed), and rounded at 1e8 (the estimate 5% off).

A check that cannot fail is refused: an input whose numerical gradient is non-zero but at most
atol everywhere (any analytic gradient as small passes: f = 1e-7 x^2 passed with a zero or a
negated backward) is a ValueError asking for a smaller atol or a scaled function, and so is a
call with no float input to differentiate.
A random G (not all ones, i.e. not `f(x).sum()`) is what catches a transposed or permuted
gradient: an all-ones cotangent cannot tell the positions apart.

Two entry points:
- `gradcheck(fn, inputs)`: `fn` takes Tensors and returns a Tensor; the engine's backward is checked.
- `gradcheck_vjp(f, vjp, arrays, G)`: `f` takes arrays and returns an array, `vjp(G)` returns
  one gradient per array (a hand-written backward, e.g. `lambda G: layer_backward(G, cache)`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from numpy_ref.tensor import Tensor, no_grad

# The defaults match parity_tests.tolerances.GRADCHECK (numpy_ref cannot import parity_tests).
DEFAULT_EPS = 1e-6
DEFAULT_ATOL = 1e-6
DEFAULT_RTOL = 1e-5


def numerical_vjp(f: Callable[..., np.ndarray], arrays: Sequence[np.ndarray], G: np.ndarray,
                  eps: float = DEFAULT_EPS) -> list[np.ndarray | None]:
    """Central-difference estimate of `J^T G` for every float array (None for the others).

    Inputs are never modified: each nudge is made on a private copy.
    """
    arrays = [np.asarray(a) for a in arrays]
    grads: list[np.ndarray | None] = []
    for i, a in enumerate(arrays):
        if a.dtype.kind != "f":
            grads.append(None)  # integer inputs (ids, targets) are constants
            continue
        if a.dtype != np.float64:
            raise TypeError(f"gradcheck: input {i} is {a.dtype}; finite differences need float64")
        grad = np.zeros_like(a)
        nudged = list(arrays)
        x = a.copy()
        nudged[i] = x
        for j in np.ndindex(a.shape):
            original = x[j]
            h = eps * max(1.0, abs(float(original)))  # relative past 1: see the top
            x[j] = original + h
            up = x[j]  # the values actually taken, after rounding
            plus = float(np.sum(np.asarray(f(*nudged)) * G))
            x[j] = original - h
            down = x[j]
            minus = float(np.sum(np.asarray(f(*nudged)) * G))
            x[j] = original
            grad[j] = (plus - minus) / (up - down)
        grads.append(grad)
    return grads


def compare_gradients(analytic: Sequence[np.ndarray | None], numeric: Sequence[np.ndarray | None],
                      atol: float, rtol: float) -> list[float]:
    """Raise AssertionError naming the input, the worst element and both values on a mismatch.

    Passes where `|analytic - numeric| <= atol + rtol * |numeric|` elementwise, both finite
    (a NaN or infinity on either side fails). Returns the
    max absolute error per input (0.0 for constants).
    """
    if len(analytic) != len(numeric):  # zip would silently check only the shorter list
        raise AssertionError(f"gradcheck: {len(analytic)} analytic gradients for {len(numeric)} numerical ones")
    errors = []
    for i, (a, n) in enumerate(zip(analytic, numeric)):
        if n is None:
            errors.append(0.0)
            continue
        if a is None:
            a = np.zeros_like(n)  # no gradient reached this input: it must be zero
        a = np.asarray(a, dtype=np.float64)
        if a.shape != n.shape:
            raise AssertionError(f"gradcheck: analytic gradient of input {i} has shape {a.shape}, expected {n.shape}")
        with np.errstate(invalid="ignore"):  # inf - inf: NaN, counted as a mismatch below
            diff = np.abs(a - n)
        diff = np.where(np.isnan(diff), np.inf, diff)
        # A NaN or infinite gradient on either side vouches for nothing: it counts as a mismatch
        # (a NaN in `excess` would be skipped by argmax's comparison and hide the rest).
        finite = np.isfinite(a) & np.isfinite(n)
        excess = np.where(finite, diff - (atol + rtol * np.abs(np.where(finite, n, 0.0))), np.inf)
        worst = np.unravel_index(int(np.argmax(excess)), n.shape) if n.size else ()
        if n.size and excess[worst] > 0:
            raise AssertionError(
                f"gradcheck: input {i} (shape {n.shape}): worst element {tuple(int(k) for k in worst)}: "
                f"analytic {float(a[worst])!r} vs numerical {float(n[worst])!r} (abs err {diff[worst]:.3e}; "
                f"atol={atol:.1e}, rtol={rtol:.1e}; max abs err over the input {diff.max():.3e})")
        largest = float(np.abs(n).max()) if n.size else 0.0
        if 0.0 < largest <= atol:
            raise ValueError(f"gradcheck: input {i}'s numerical gradient is at most {largest:.3e}, within atol={atol:.1e}: "
                             f"any gradient that small would pass; pass a smaller atol or scale the function up")
        errors.append(float(diff.max()) if n.size else 0.0)
    return errors


def _check_differentiable(arrays: Sequence[np.ndarray]) -> None:
    """A TypeError for complex inputs, a ValueError when no input is a float array to nudge."""
    for i, a in enumerate(arrays):
        if a.dtype.kind == "c":
            raise TypeError(f"gradcheck: input {i} is {a.dtype}; finite differences here are for real float64 inputs")
    if not any(a.dtype.kind == "f" for a in arrays):
        raise ValueError(f"gradcheck: no float input to differentiate (dtypes {[str(a.dtype) for a in arrays]}); "
                         f"integer and bool inputs are constants")


def _upstream(shape, upstream_seed: int, rng: np.random.Generator | None) -> np.ndarray:
    rng = rng if rng is not None else np.random.default_rng(upstream_seed)
    return rng.standard_normal(shape)


def gradcheck(fn: Callable[..., Tensor], inputs: Sequence[np.ndarray], *, upstream_seed: int = 0,
              rng: np.random.Generator | None = None, eps: float = DEFAULT_EPS,
              atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> list[float]:
    """Check the engine's gradients of `fn(*Tensors) -> Tensor` at float64 `inputs`.

    Float inputs become Tensors with `requires_grad`; integer inputs are passed as they are.
    The upstream gradient G is standard normal, from `rng` or `upstream_seed`. Returns the max
    absolute error per input; raises AssertionError naming the input on a mismatch.
    """
    arrays = [np.asarray(a) for a in inputs]
    _check_differentiable(arrays)
    for i, a in enumerate(arrays):
        if a.dtype.kind == "f" and a.dtype != np.float64:
            raise TypeError(f"gradcheck: input {i} is {a.dtype}; finite differences need float64")
    tensors = [Tensor(a, requires_grad=True) if a.dtype.kind == "f" else a for a in arrays]
    out = fn(*tensors)
    if not isinstance(out, Tensor):
        raise TypeError(f"gradcheck: fn must return a Tensor, got {type(out).__name__}")
    G = _upstream(out.shape, upstream_seed, rng)
    if out.requires_grad:
        out.backward(G)
    analytic = [t.grad if isinstance(t, Tensor) else None for t in tensors]

    def values(*xs):
        with no_grad():
            return fn(*[Tensor(x) if x.dtype.kind == "f" else x for x in xs]).data

    return compare_gradients(analytic, numerical_vjp(values, arrays, G, eps), atol, rtol)


def gradcheck_vjp(f: Callable[..., np.ndarray], vjp: Callable[[np.ndarray], Sequence], arrays: Sequence[np.ndarray],
                  G: np.ndarray | None = None, *, upstream_seed: int = 0, rng: np.random.Generator | None = None,
                  eps: float = DEFAULT_EPS, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> list[float]:
    """Check a hand-written backward: `vjp(G)` must equal `J^T G` of `f(*arrays)` for each array.

    `vjp` returns one gradient per array, in order (None for integer arrays). G defaults to a
    standard normal array of the output's shape. Returns the max absolute error per array.
    """
    arrays = [np.asarray(a) for a in arrays]
    _check_differentiable(arrays)
    out_shape = np.shape(f(*arrays))
    if G is None:
        G = _upstream(out_shape, upstream_seed, rng)
    elif np.shape(G) != out_shape:
        # A G that merely broadcasts (a 0-d G is an all-ones cotangent, which cannot tell a
        # permuted gradient from the right one) would weaken the check without a word.
        raise ValueError(f"gradcheck_vjp: G has shape {np.shape(G)}; the output has shape {out_shape}")
    analytic = vjp(G)
    analytic = (analytic,) if not isinstance(analytic, (tuple, list)) else tuple(analytic)
    if len(analytic) != len(arrays):
        raise AssertionError(f"gradcheck_vjp: vjp returned {len(analytic)} gradients for {len(arrays)} inputs")
    return compare_gradients(analytic, numerical_vjp(f, arrays, G, eps), atol, rtol)
