"""Affine map: the one layer every other layer leans on.

    out = x @ w + b                       x (..., C_in), w (C_in, C_out), b (C_out,) -> (..., C_out)

Backward, with G = dL/d(out) and every leading axis flattened into one row axis N:

    dx = G @ w^T          (N, C_out) @ (C_out, C_in) -> (N, C_in)      out_nj = sum_i x_ni w_ij
    dw = x^T @ G          (C_in, N) @ (N, C_out) -> (C_in, C_out)      so d out_nj / d w_ij = x_ni
    db = sum_n G_n        (N, C_out) -> (C_out,)                        b is added to every row

Reference: GPT-2's `conv1d` in openai/gpt-2 `model.py` (a linear layer with the weight stored
(in, out), as here); llm.c `matmul_forward`/`matmul_backward`. `b` may be None (no bias): then
`db` is None.
"""

from __future__ import annotations

import numpy as np


def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None):
    """(out, cache). Leading axes are flattened so every product is one 2-D GEMM."""
    C_in, C_out = w.shape
    if x.shape[-1] != C_in:
        raise ValueError(f"linear: input has {x.shape[-1]} features, the weight expects {C_in} (w shape {w.shape})")
    if b is not None and b.shape != (C_out,):  # a (1,) bias would broadcast, and db come back (C_out,)
        raise ValueError(f"linear: bias has shape {b.shape}; the weight {w.shape} needs ({C_out},)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, C_in)  # (..., C_in) -> (N, C_in), a view for a contiguous x
    out = x2 @ w  # (N, C_in) @ (C_in, C_out) -> (N, C_out)
    if b is not None:
        out += b  # in place: no second (N, C_out) array
    return out.reshape(*lead, C_out), (x2, w, b is not None, lead)  # (N, C_out) -> (..., C_out)


def linear_backward(dout: np.ndarray, cache):
    """(dx, dw, db); db is None when the forward had no bias."""
    x2, w, has_bias, lead = cache
    C_in, C_out = w.shape
    g = dout.reshape(-1, C_out)  # (..., C_out) -> (N, C_out)
    dx = (g @ w.T).reshape(*lead, C_in)  # (N, C_out) @ (C_out, C_in) -> (N, C_in) -> (..., C_in)
    dw = x2.T @ g  # (C_in, N) @ (N, C_out) -> (C_in, C_out)
    db = g.sum(axis=0, dtype=dw.dtype) if has_bias else None  # (N, C_out) -> (C_out,), in dw's precision
    return dx, dw, db
