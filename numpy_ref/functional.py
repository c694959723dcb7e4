"""Functions composed from the engine's primitives: their gradients come from the primitives' VJPs.

    softmax(x)_i      = e^(x_i - m) / sum_j e^(x_j - m)          m = max_j x_j (stability only)
    log_softmax(x)_i  = (x_i - m) - log sum_j e^(x_j - m)
    gelu(x)           = 0.5 x (1 + tanh(u)) = x sigmoid(2u)     u = sqrt(2/pi) (x + 0.044715 x^3)
    sigmoid(x)        = 1 / (1 + e^-x) = e^x / (1 + e^x)    the form whose exponent is <= 0
    bce(p, y)         = -mean(y log p + (1 - y) log(1 - p))
    cross_entropy     = -mean over counted targets of log_softmax(logits)[target]
    dropout(x)        = x * mask,  mask in {0, 1/(1-p)}

References: Hendrycks & Gimpel 2016 (GELU, the tanh approximation GPT-2 uses); PyTorch's
`nn.functional` (the semantics each function is compared against in parity_tests).
"""

from __future__ import annotations

import math

import numpy as np

from numpy_ref.cross_entropy import check_targets
from numpy_ref.tensor import Tensor, _operands, exp, log, take_along_axis, where


def softmax(x, axis: int = -1) -> Tensor:
    """Probabilities along `axis`; stable for inputs of any magnitude (no overflow at 1e4)."""
    (x,) = _operands(x)
    # The max is subtracted only for numerical stability: softmax(x - m) = softmax(x) for any
    # constant m, so m is taken off the graph (its gradient would be exactly zero anyway).
    shifted = x - Tensor(x.data.max(axis=axis, keepdims=True))  # (..., n) - (..., 1) -> (..., n)
    e = exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)  # (..., n) / (..., 1) -> (..., n)


def log_softmax(x, axis: int = -1) -> Tensor:
    """`log(softmax(x))` without forming the softmax: no log(0) when a probability underflows."""
    (x,) = _operands(x)
    shifted = x - Tensor(x.data.max(axis=axis, keepdims=True))  # (..., n) - (..., 1) -> (..., n)
    return shifted - log(exp(shifted).sum(axis=axis, keepdims=True))  # (..., n) - (..., 1) -> (..., n)


def gelu(x) -> Tensor:
    """GPT-2's GELU, the tanh approximation (the exact erf form differs by up to ~1e-3).

    Composed as x sigmoid(2u), equal to 0.5 x (1 + tanh(u)) since 1 + tanh(u) = 2 sigmoid(2u):
    `1 + tanh(u)` cancels for x <= -4 (exactly 0 from about x = -7.2 in float64), the sigmoid keeps its
    digits (see numpy_ref/gelu.py, whose hand-derived form is the same).
    """
    (x,) = _operands(x)
    c = math.sqrt(2.0 / math.pi)
    return x * sigmoid(2.0 * c * (x + 0.044715 * x * x * x))


def sigmoid(x) -> Tensor:
    """Logistic function, accurate to a few ulp over the whole range and never overflowing.

    With e = e^-|x| (in [0, 1], so it cannot overflow):

        x >= 0:  1 / (1 + e^-x) = 1 / (1 + e)
        x <  0:  1 / (1 + e^-x) = e^x / (1 + e^x) = e / (1 + e)

    Both branches divide by 1 + e in [1, 2]: no cancellation. The half-tanh form
    (1 + tanh(x/2)) / 2 loses everything for negative x, where 1 + tanh(x/2) cancels
    (0 at x = -20 in float32, at x = -38 in float64). Both branches are finite everywhere, so
    the branch `where` does not take sends back a finite zero gradient, never `0 * inf`.
    Gradient: e / (1 + e)^2 = sigmoid(x) (1 - sigmoid(x)) on either side.

    Where e^-x overflows (x below about -88.7 in float32, -709.8 in float64) torch returns 0;
    this returns the tiny (subnormal) true value.
    """
    (x,) = _operands(x)
    nonneg = x.data >= 0  # NaN takes the x < 0 branch, and stays NaN
    e = exp(where(nonneg, -x, x))  # e^-|x|
    return where(nonneg, 1.0 / (1.0 + e), e / (1.0 + e))


def binary_cross_entropy(p, target) -> Tensor:
    """Mean over all elements of `-(y log p + (1 - y) log(1 - p))`; `p` must lie in (0, 1).

    `target` holds values in [0, 1] (usually 0 or 1) and gets no gradient.
    """
    (p,) = _operands(p)
    y = np.asarray(target.data if isinstance(target, Tensor) else target, dtype=p.dtype)
    if y.shape != p.shape:
        raise ValueError(f"binary_cross_entropy: target shape {y.shape} differs from the input's {p.shape}")
    outside = ~((p.data > 0) & (p.data < 1))  # written so that NaN counts as outside too
    if np.any(outside):
        where_bad = tuple(int(i) for i in np.argwhere(outside)[0])
        raise ValueError(f"binary_cross_entropy: probability {float(p.data[where_bad])!r} at {where_bad} is outside (0, 1)")
    outside = ~((y >= 0) & (y <= 1))  # torch refuses these too; NaN counts as outside
    if np.any(outside):
        where_bad = tuple(int(i) for i in np.argwhere(outside)[0])
        raise ValueError(f"binary_cross_entropy: target {float(y[where_bad])!r} at {where_bad} is outside [0, 1]")
    return -(y * log(p) + (1.0 - y) * log(1.0 - p)).mean()


def cross_entropy(logits, targets, ignore_index: int | None = None) -> Tensor:
    """Mean of `-log softmax(logits)[target]` over the targets that count.

    logits (..., V) and integer targets (...): usually (B, T, V) and (B, T). Targets equal to
    `ignore_index` do not count. Bad input is refused exactly as by the fused layer, with the
    same check (`numpy_ref.cross_entropy.check_targets`): non-integer targets, or an
    `ignore_index` that is not an int or None (`True`, `3.5`), are a TypeError; a counted target
    outside [0, V) is a ValueError naming the value, its position and V; no targets, or every
    target ignored, leave the mean undefined and are a ValueError rather than NaN.
    """
    (logits,) = _operands(logits)
    targets = targets.data if isinstance(targets, Tensor) else targets
    targets, counted, n_counted = check_targets(logits.shape, targets, ignore_index)
    safe = np.where(counted, targets, 0)  # ignored positions read class 0, then are masked out
    logp = log_softmax(logits, axis=-1)  # (..., V) -> (..., V)
    picked = take_along_axis(logp, safe[..., None], axis=-1)  # (..., V) -> (..., 1)
    picked = picked.reshape(targets.shape)  # (..., 1) -> (...)
    return -where(counted, picked, 0.0).sum() / float(n_counted)


def dropout_mask(shape, p: float, rng: np.random.Generator, dtype=np.float64) -> np.ndarray:
    """A mask for `dropout`: each entry 0 with probability p, else 1/(1-p) (expectation 1)."""
    _check_p(p)
    keep = rng.random(shape) >= p
    return (keep * (1.0 / (1.0 - p))).astype(dtype)


def dropout(x, p: float, mask: np.ndarray | None = None, rng: np.random.Generator | None = None) -> Tensor:
    """`x * mask`: the mask is given, or drawn from the explicit generator `rng`.

    With `p == 0` and neither given, `x` is returned unchanged. Randomness is never global:
    the same mask fed to both trees gives the same result.
    """
    (x,) = _operands(x)
    _check_p(p)
    if mask is None:
        if rng is None:
            if p == 0:
                return x
            raise ValueError(f"dropout with p={p} needs an explicit mask or an np.random.Generator")
        mask = dropout_mask(x.shape, p, rng, x.dtype)
    mask = np.asarray(mask)
    if mask.shape != x.shape:
        raise ValueError(f"dropout: mask shape {mask.shape} differs from the input's {x.shape}")
    scale = 1.0 / (1.0 - p)
    # Exactly 0, or 1/(1-p) up to float32 rounding (a float32 mask of a float64 p); np.isclose's
    # default atol let 1e-9 pass as a 0 and then multiplied it in.
    valid = (mask == 0.0) | np.isclose(mask, scale, rtol=1e-6, atol=0.0)
    if not np.all(valid):
        bad = tuple(int(i) for i in np.argwhere(~valid)[0])
        raise ValueError(f"dropout: mask value {float(mask[bad])!r} at {bad} is neither 0 nor 1/(1-p) = {scale!r}")
    return x * mask.astype(x.dtype)


def _check_p(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p={p!r} must be in [0, 1)")
