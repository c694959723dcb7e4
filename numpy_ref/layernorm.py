"""Layer norm over the channel axis, as GPT-2 computes it.

For one row x of C channels (every (b, t) position independently):

    mu   = (1/C) sum_i x_i                       two passes: the mean first, then
    var  = (1/C) sum_i (x_i - mu)^2              the biased variance (divide by C, not C - 1)
    rstd = 1 / sqrt(var + eps)                   eps inside the square root
    xhat = (x - mu) * rstd
    out  = xhat * w + b                          w, b (C,)

Backward (derivation in docs/derivations.md, "Layer norm"), with g = dout and gh = g * w:

    db = sum over rows of g                dw = sum over rows of g * xhat
    dx = rstd * (gh - mean(gh) - xhat * mean(gh * xhat))        means over the C channels

The two subtracted means are the gradient's components along the directions layer norm removes:
the constant shift (mean) and the overall scale (xhat itself).

A finite row whose sum or squares overflow (|x| near 1e154 in float64, 1e19 in float32) is
computed from the row divided by its largest |x| (`_scaled_rows`): xhat does not depend on the
row's scale, and such rows gave the bias alone (xhat 0) or NaN. torch's F.layer_norm gives NaN.

Reference: Ba et al. 2016, "Layer Normalization"; openai/gpt-2 `model.py` `norm`; llm.c
`layernorm_forward`/`layernorm_backward` and its doc/layernorm tutorial. Shapes: x (..., C),
w and b (C,), out (..., C).
"""

from __future__ import annotations

import numpy as np


def layernorm_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-5):
    """(out, cache); the cache keeps xhat and rstd (mu and var are not needed again)."""
    C = x.shape[-1]
    if w.shape != (C,) or b.shape != (C,):  # a (1,) w would broadcast, and dw come back (C,)
        raise ValueError(f"layernorm: w {w.shape} and b {b.shape} must both be ({C},) for x of shape {x.shape}")
    with np.errstate(over="ignore", invalid="ignore"):  # overflowing rows are redone below
        mu = x.mean(axis=-1, keepdims=True)  # (..., C) -> (..., 1)
        xc = x - mu  # (..., C)
        var = (xc * xc).mean(axis=-1, keepdims=True)  # (..., C) -> (..., 1)
        rstd = 1.0 / np.sqrt(var + eps)  # (..., 1)
        xhat = xc * rstd  # (..., C)
    not_finite = ~np.isfinite(var[..., 0])  # (...,)
    if not_finite.any():
        overflowed = not_finite & np.isfinite(x).all(axis=-1)  # finite rows only: an inf or NaN x stays so
        xhat[overflowed], rstd[overflowed] = _scaled_rows(x[overflowed], eps)
    out = xhat * w + b  # (..., C) * (C,) + (C,) -> (..., C)
    return out, (xhat, rstd, w)


def _scaled_rows(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(xhat, rstd) of rows (n, C) whose sum or square overflowed (|x| near 1e154 in float64, 1e19
    in float32: mu or var was inf, and xhat came back 0 or NaN), from the rows divided by
    s = max |x|, which leaves xhat as it is:

        y = x / s,   xhat = (y - mean y) / sqrt(var_y + eps / s^2),   rstd = 1 / sqrt(s^2 var_y + eps)

    eps / s^2 is 0 at such s (it is below var_y's rounding), and a constant row has xhat 0 and
    rstd 1/sqrt(eps), as for any other constant row."""
    s = np.abs(x).max(axis=-1, keepdims=True)  # (n, 1) > 0: a row of zeros cannot overflow
    y = x / s
    yc = y - y.mean(axis=-1, keepdims=True)  # (n, C)
    var_y = (yc * yc).mean(axis=-1, keepdims=True)  # (n, 1)
    constant = var_y == 0
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # the branch np.where does not take
        xhat = np.where(constant, 0.0, yc / np.sqrt(var_y + eps / (s * s)))  # (n, C)
        rstd = np.where(constant, 1.0 / np.sqrt(eps), 1.0 / (s * np.sqrt(var_y)))  # (n, 1): eps is negligible
    return xhat.astype(x.dtype, copy=False), rstd.astype(x.dtype, copy=False)


def layernorm_backward(dout: np.ndarray, cache):
    """(dx, dw, db)."""
    xhat, rstd, w = cache
    C = xhat.shape[-1]
    rows = tuple(range(dout.ndim - 1))  # every axis but the channels
    db = dout.sum(axis=rows)  # (..., C) -> (C,)
    dw = (dout * xhat).sum(axis=rows)  # (..., C) -> (C,)
    gh = dout * w  # dL/dxhat, (..., C)
    mean_gh = gh.sum(axis=-1, keepdims=True) / C  # (..., C) -> (..., 1)
    mean_gh_xhat = (gh * xhat).sum(axis=-1, keepdims=True) / C  # (..., C) -> (..., 1)
    dx = rstd * (gh - mean_gh - xhat * mean_gh_xhat)  # (..., C)
    return dx, dw, db
