"""One pre-LN transformer block of GPT-2, with its backward.

    a = ln_1(x)                      (B, T, C)
    a = attn(a) * mask_attn_out      (B, T, C)       dropout on the branch (mask optional)
    x1 = x + a                       (B, T, C)       residual
    m = ln_2(x1)                     (B, T, C)
    m = mlp(m) * mask_mlp_out        (B, T, C)
    out = x1 + m                     (B, T, C)

Backward, line by line in reverse: a residual add passes its gradient to both operands, so the
gradient of x1 is dout plus what comes back through the MLP branch, and likewise for x.

`p` maps the block's own GPT-2 names (`ln_1.weight`, `ln_1.bias`, `attn.c_attn.weight`,
[`attn.c_attn.bias`], `attn.c_proj.weight`, `attn.c_proj.bias`, `ln_2.*`, `mlp.c_fc.*`,
`mlp.c_proj.*`: the model's `h.{i}.` names without the prefix) to arrays; the backward returns
the gradients under the same names.

Dropout masks (`masks`, every key optional; a mask holds 0 or 1/(1 - drop_rate)):
`attn.weights` (B, nh, T, P + T) on the attention weights after the softmax, `attn.out` (B, T, C)
on the attention branch, `mlp.out` (B, T, C) on the MLP branch.

Reference: openai/gpt-2 `model.py` `block`; the book's `TransformerBlock` (chapter 4).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from numpy_ref.attention import attention_backward, attention_forward
from numpy_ref.layernorm import layernorm_backward, layernorm_forward
from numpy_ref.mlp import mlp_backward, mlp_forward

BLOCK_MASK_KEYS = ("attn.weights", "attn.out", "mlp.out")


def block_forward(x: np.ndarray, p: Mapping[str, np.ndarray], config, masks: Mapping[str, np.ndarray] | None = None,
                  *, kv_cache=None):
    """(out, cache). `config` supplies n_heads and ln_eps; `kv_cache` is a LayerKV (inference)."""
    masks = masks or {}
    unknown = [key for key in masks if key not in BLOCK_MASK_KEYS]  # not sorted: keys of mixed types
    if unknown:
        raise ValueError(f"unknown block dropout mask(s) {unknown}; known: {BLOCK_MASK_KEYS}")
    a, ln1 = layernorm_forward(x, p["ln_1.weight"], p["ln_1.bias"], config.ln_eps)  # (B, T, C)
    a, attn = attention_forward(a, p["attn.c_attn.weight"], p.get("attn.c_attn.bias"), p["attn.c_proj.weight"],
                                p["attn.c_proj.bias"], config.n_heads, masks.get("attn.weights"),
                                kv_cache=kv_cache)  # (B, T, C)
    mask_a = _mask(masks.get("attn.out"), a)
    x1 = x + (a * mask_a if mask_a is not None else a)  # (B, T, C)
    m, ln2 = layernorm_forward(x1, p["ln_2.weight"], p["ln_2.bias"], config.ln_eps)  # (B, T, C)
    m, mlp = mlp_forward(m, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"], p["mlp.c_proj.weight"],
                         p["mlp.c_proj.bias"])  # (B, T, C)
    mask_m = _mask(masks.get("mlp.out"), m)
    out = x1 + (m * mask_m if mask_m is not None else m)  # (B, T, C)
    return out, (ln1, attn, mask_a, ln2, mlp, mask_m, "attn.c_attn.bias" in p)


def block_backward(dout: np.ndarray, cache):
    """(dx, grads): grads maps the block's parameter names to their gradients."""
    ln1, attn, mask_a, ln2, mlp, mask_m, has_qkv_bias = cache
    g = {}
    dx1 = dout  # out = x1 + m: x1 gets dout directly
    dm = dout * mask_m if mask_m is not None else dout
    dm, g["mlp.c_fc.weight"], g["mlp.c_fc.bias"], g["mlp.c_proj.weight"], g["mlp.c_proj.bias"] = mlp_backward(dm, mlp)
    dres, g["ln_2.weight"], g["ln_2.bias"] = layernorm_backward(dm, ln2)
    dx1 = dx1 + dres  # ... and its share of the MLP branch
    dx = dx1  # x1 = x + a
    da = dx1 * mask_a if mask_a is not None else dx1
    da, g["attn.c_attn.weight"], db_attn, g["attn.c_proj.weight"], g["attn.c_proj.bias"] = attention_backward(da, attn)
    if has_qkv_bias:
        g["attn.c_attn.bias"] = db_attn
    dres, g["ln_1.weight"], g["ln_1.bias"] = layernorm_backward(da, ln1)
    dx = dx + dres
    return dx, g


def _mask(mask: np.ndarray | None, like: np.ndarray) -> np.ndarray | None:
    """The mask in the activation's dtype (float32 stays float32), shape-checked."""
    if mask is None:
        return None
    if mask.shape != like.shape:
        raise ValueError(f"block dropout mask has shape {mask.shape}; expected {like.shape}")
    return mask.astype(like.dtype, copy=False)
