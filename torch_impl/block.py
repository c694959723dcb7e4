"""One pre-LN transformer block of GPT-2.

    x = x + drop(attn(ln_1(x)))                                (B, T, C) -> (B, T, C)
    x = x + drop(mlp(ln_2(x)))                                 (B, T, C) -> (B, T, C)

Reference: openai/gpt-2 `model.py` `block` (layer norm before each sub-layer, residual around
it: Xiong et al. 2020 call this "pre-LN"). numpy_ref/block.py chains the layer backwards in
reverse; here autograd does it.

`p` maps the block's own GPT-2 parameter names (`ln_1.weight`, `attn.c_attn.weight`, ...,
`mlp.c_proj.bias`; `attn.c_attn.bias` absent without qkv bias) to tensors: the model's
`h.{i}.` names without the prefix.

Dropout masks for this block (`masks`, every key optional; docs/design.md "Dropout masks"):
`attn.weights` (B, nh, T, P + T) on the attention weights, `attn.out` (B, T, C) on the attention
branch, `mlp.out` (B, T, C) on the MLP branch.
"""

from __future__ import annotations

from typing import Mapping

import torch

from torch_impl.attention import attention_forward
from torch_impl.dropout import dropout_forward
from torch_impl.kv_cache import LayerKV
from torch_impl.layernorm import layernorm_forward
from torch_impl.mlp import mlp_forward

BLOCK_MASK_KEYS = ("attn.weights", "attn.out", "mlp.out")


def block_forward(x: torch.Tensor, p: Mapping[str, torch.Tensor], n_heads: int, eps: float, *,
                  kv_cache: LayerKV | None = None, masks: Mapping[str, torch.Tensor] | None = None,
                  drop_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """x + attention branch, then + MLP branch; dropout from `masks`, else torch's when training."""
    masks = masks or {}
    unknown = [key for key in masks if key not in BLOCK_MASK_KEYS]  # not sorted: keys of mixed types
    if unknown:
        raise ValueError(f"unknown block dropout mask(s) {unknown}; known: {BLOCK_MASK_KEYS}")
    attn_mask = masks.get("attn.weights")
    a = layernorm_forward(x, p["ln_1.weight"], p["ln_1.bias"], eps)  # (B, T, C)
    a = attention_forward(a, p["attn.c_attn.weight"], p.get("attn.c_attn.bias"), p["attn.c_proj.weight"],
                          p["attn.c_proj.bias"], n_heads, attn_mask, kv_cache=kv_cache,
                          attn_dropout_p=drop_p if training and attn_mask is None else 0.0)  # (B, T, C)
    x = x + dropout_forward(a, drop_p, training, masks.get("attn.out"))  # (B, T, C)
    m = layernorm_forward(x, p["ln_2.weight"], p["ln_2.bias"], eps)  # (B, T, C)
    m = mlp_forward(m, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"], p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])
    return x + dropout_forward(m, drop_p, training, masks.get("mlp.out"))  # (B, T, C)
