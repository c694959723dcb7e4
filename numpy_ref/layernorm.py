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
    mu = x.mean(axis=-1, keepdims=True)  # (..., C) -> (..., 1)
    xc = x - mu  # (..., C)
    var = (xc * xc).mean(axis=-1, keepdims=True)  # (..., C) -> (..., 1)
    rstd = 1.0 / np.sqrt(var + eps)  # (..., 1)
    xhat = xc * rstd  # (..., C)
    out = xhat * w + b  # (..., C) * (C,) + (C,) -> (..., C)
    return out, (xhat, rstd, w)


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
