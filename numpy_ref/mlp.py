"""GPT-2's feed-forward network: expand four times, GELU, project back.

    h   = x @ w_fc + b_fc          (B, T, C) -> (B, T, 4C)
    g   = gelu(h)                  (B, T, 4C)
    out = g @ w_proj + b_proj      (B, T, 4C) -> (B, T, C)

Backward: the three lines in reverse, each by its own layer's backward (linear.py, gelu.py).
Reference: openai/gpt-2 `model.py` `mlp`; the book's `FeedForward` (chapter 4).
"""

from __future__ import annotations

import numpy as np

from numpy_ref.gelu import gelu_backward, gelu_forward
from numpy_ref.linear import linear_backward, linear_forward


def mlp_forward(x: np.ndarray, w_fc: np.ndarray, b_fc: np.ndarray, w_proj: np.ndarray, b_proj: np.ndarray):
    """(out, cache)."""
    h, fc_cache = linear_forward(x, w_fc, b_fc)  # (B, T, C) -> (B, T, 4C)
    g, gelu_cache = gelu_forward(h)  # (B, T, 4C)
    out, proj_cache = linear_forward(g, w_proj, b_proj)  # (B, T, 4C) -> (B, T, C)
    return out, (fc_cache, gelu_cache, proj_cache)


def mlp_backward(dout: np.ndarray, cache):
    """(dx, dw_fc, db_fc, dw_proj, db_proj)."""
    fc_cache, gelu_cache, proj_cache = cache
    dg, dw_proj, db_proj = linear_backward(dout, proj_cache)  # (B, T, C) -> (B, T, 4C)
    dh = gelu_backward(dg, gelu_cache)  # (B, T, 4C)
    dx, dw_fc, db_fc = linear_backward(dh, fc_cache)  # (B, T, 4C) -> (B, T, C)
    return dx, dw_fc, db_fc, dw_proj, db_proj
