"""Causal multi-head self-attention, GPT-2's: fused QKV projection, heads, softmax, projection.

Dimensions: B batch, T new positions, P positions already in a KV cache (0 without one),
Tk = P + T keys, C channels, nh heads, hs = C / nh head size.

    qkv  = x @ w_attn + b_attn                (B, T, C) -> (B, T, 3C), split [q | k | v]
    q, k, v                                   (B, T, C) -> (B, nh, T, hs) each; head j = columns j*hs:(j+1)*hs
    s    = q @ k^T / sqrt(hs)                 (B, nh, T, hs) @ (B, nh, hs, Tk) -> (B, nh, T, Tk)
    s[t, j] = -inf where j > P + t            causal: query t sees keys 0 .. P + t
    a    = softmax(s) over the keys           (B, nh, T, Tk); each row sums to 1
    a    = a * mask                           optional dropout on the weights (mask 0 or 1/(1-p))
    y    = a @ v                              (B, nh, T, Tk) @ (B, nh, Tk, hs) -> (B, nh, T, hs)
    y    = merge heads                        (B, nh, T, hs) -> (B, T, C)
    out  = y @ w_proj + b_proj                (B, T, C) -> (B, T, C)

Backward (docs/derivations.md, "Softmax and attention"), each line undoing one line above:

    dy = dout @ w_proj^T (linear_backward);   split heads
    da = dy @ v^T,   dv = a^T @ dy            (the product y = a @ v)
    da = da * mask                            (dropout)
    ds = a * (da - sum_j(da * a))             (softmax: J = diag(a) - a a^T, row by row)
    dq = ds @ k / sqrt(hs),   dk = ds^T @ q / sqrt(hs)
    dqkv = [dq | dk | dv] heads merged, then dx = dqkv @ w_attn^T (linear_backward)

Masked entries have a = 0, so ds = 0 there and no gradient leaks to future keys.
Reference: Vaswani et al. 2017; openai/gpt-2 `model.py` `attn`; llm.c `attention_forward` /
`attention_backward`; the book's `MultiHeadAttention` (chapter 3). Every head is done at once in
batched matmuls: no Python loop over heads or positions.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from numpy_ref.linear import linear_backward, linear_forward


def causal_mask(T: int, Tk: int) -> np.ndarray:
    """(T, Tk) boolean, True where key j is in the future of query t (j > P + t, P = Tk - T)."""
    P = Tk - T
    return np.arange(Tk)[None, :] > (np.arange(T)[:, None] + P)  # (1, Tk) > (T, 1) -> (T, Tk)


def attention_forward(x: np.ndarray, w_attn: np.ndarray, b_attn: np.ndarray | None, w_proj: np.ndarray,
                      b_proj: np.ndarray, n_heads: int, attn_dropout_mask: np.ndarray | None = None, *,
                      kv_cache=None):
    """(out, cache). `kv_cache`: a `LayerKV` (numpy_ref/kv_cache.py) for inference; the new
    chunk's keys and values are appended to it and queries attend to all P + T of them."""
    if x.ndim != 3:
        raise ValueError(f"attention: x must be (B, T, C), got shape {x.shape}")
    B, T, C = x.shape
    if B < 1 or T < 1:
        raise ValueError(f"attention: x must have B >= 1 and T >= 1, got shape {x.shape}")
    if isinstance(n_heads, bool) or not isinstance(n_heads, numbers.Integral):
        raise TypeError(f"attention: n_heads must be an int, got {n_heads!r} ({type(n_heads).__name__})")
    if n_heads < 1:
        raise ValueError(f"attention: n_heads must be >= 1, got {n_heads}")
    if C % n_heads != 0:
        raise ValueError(f"attention: C={C} is not divisible by n_heads={n_heads}")
    if w_attn.shape != (C, 3 * C) or w_proj.shape != (C, C):
        raise ValueError(f"attention: w_attn {w_attn.shape} and w_proj {w_proj.shape} must be {(C, 3 * C)} and "
                         f"{(C, C)} for C={C}")
    hs = C // n_heads
    qkv, lin_attn = linear_forward(x, w_attn, b_attn)  # (B, T, C) -> (B, T, 3C)
    qkv = qkv.reshape(B, T, 3, n_heads, hs).transpose(2, 0, 3, 1, 4)  # (B, T, 3C) -> (3, B, nh, T, hs)
    q, k, v = np.ascontiguousarray(qkv)  # 3 x (B, nh, T, hs), contiguous for the batched GEMMs
    if kv_cache is not None:
        k, v = kv_cache.append(k, v)  # (B, nh, T, hs) -> (B, nh, Tk, hs)
    Tk = k.shape[2]
    scale = 1.0 / math.sqrt(hs)
    s = q @ k.transpose(0, 1, 3, 2)  # (B, nh, T, hs) @ (B, nh, hs, Tk) -> (B, nh, T, Tk)
    s *= scale
    s[:, :, causal_mask(T, Tk)] = -np.inf  # exp(-inf) = 0: future keys get exactly zero weight
    s -= s.max(axis=-1, keepdims=True)  # the max is subtracted only for numerical stability
    a = np.exp(s, out=s)  # (B, nh, T, Tk), reusing the scores' memory
    a /= a.sum(axis=-1, keepdims=True)  # softmax: every row sums to 1 (key 0 is always visible)
    if attn_dropout_mask is not None:
        if attn_dropout_mask.shape != a.shape:
            raise ValueError(f"attention dropout mask has shape {attn_dropout_mask.shape}; expected {a.shape}")
        attn_dropout_mask = attn_dropout_mask.astype(a.dtype, copy=False)
        a_used = a * attn_dropout_mask  # (B, nh, T, Tk)
    else:
        a_used = a
    y = a_used @ v  # (B, nh, T, Tk) @ (B, nh, Tk, hs) -> (B, nh, T, hs)
    y = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, nh, T, hs) -> (B, T, nh, hs) -> (B, T, C)
    out, lin_proj = linear_forward(y, w_proj, b_proj)  # (B, T, C) -> (B, T, C)
    cache = dict(lin_attn=lin_attn, lin_proj=lin_proj, q=q, k=k, v=v, att=a, att_used=a_used,
                 mask=attn_dropout_mask, scale=scale, n_heads=n_heads, cached=kv_cache is not None)
    return out, cache


def attention_backward(dout: np.ndarray, cache):
    """(dx, dw_attn, db_attn, dw_proj, db_proj); db_attn is None when the forward had no b_attn.

    Not for a forward run with a KV cache (that is inference), even an empty one: the keys of
    cached positions came from earlier calls, so their gradients have nowhere to go, and the k and
    v saved here are views of the cache's buffer, which later calls overwrite.
    """
    q, k, v, a, a_used, mask = cache["q"], cache["k"], cache["v"], cache["att"], cache["att_used"], cache["mask"]
    B, nh, T, hs = q.shape
    if cache["cached"]:
        raise ValueError("attention_backward: the forward used a KV cache (inference); backward through "
                         "cached keys is not supported")
    C = nh * hs
    dy, dw_proj, db_proj = linear_backward(dout, cache["lin_proj"])  # (B, T, C)
    dy = dy.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)  # (B, T, C) -> (B, nh, T, hs)
    da = dy @ v.transpose(0, 1, 3, 2)  # (B, nh, T, hs) @ (B, nh, hs, T) -> (B, nh, T, T)
    dv = a_used.transpose(0, 1, 3, 2) @ dy  # (B, nh, T, T) @ (B, nh, T, hs) -> (B, nh, T, hs)
    if mask is not None:
        da *= mask
    ds = da - (da * a).sum(axis=-1, keepdims=True)  # (B, nh, T, T) - (B, nh, T, 1)
    ds *= a  # softmax VJP: a * (da - <da, a>)
    ds *= cache["scale"]  # through s = q k^T * scale
    dqkv = np.empty((B, T, 3, nh, hs), dtype=np.result_type(dout, q))  # [dq | dk | dv] per head; merged to (B, T, 3C) below
    dqkv[:, :, 0] = (ds @ k).transpose(0, 2, 1, 3)  # (B, nh, T, T) @ (B, nh, T, hs) -> (B, T, nh, hs)
    dqkv[:, :, 1] = (ds.transpose(0, 1, 3, 2) @ q).transpose(0, 2, 1, 3)  # -> (B, T, nh, hs)
    dqkv[:, :, 2] = dv.transpose(0, 2, 1, 3)  # (B, nh, T, hs) -> (B, T, nh, hs)
    dx, dw_attn, db_attn = linear_backward(dqkv.reshape(B, T, 3 * C), cache["lin_attn"])  # (B, T, 3C) -> (B, T, C)
    return dx, dw_attn, db_attn, dw_proj, db_proj
