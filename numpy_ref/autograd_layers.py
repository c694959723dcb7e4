"""The GPT-2 layers on the autograd engine, two ways, and one model forward that runs on either.

- FUSED: each hand-derived forward/backward pair of this package becomes ONE engine operation
  (`tensor.custom_op`): fast, and the engine only sees a handful of nodes per block.
- COMPOSED: the same layers written with the engine's primitives (matmul, mean, sqrt, exp,
  getitem, where, ...): transparent, every gradient derived by the engine from primitive VJPs.

`gpt_forward_autograd(ops, params, ids, config, targets)` is the model of numpy_ref/model.py,
line for line, over either set; `loss.backward()` then fills every parameter's `.grad`. The two
sets must agree to float64 reassociation noise (parity_tests/test_numpy_model.py checks ~1e-10),
which ties the hand-derived backwards to an independent derivation.

Shapes: as in the layer files (B batch, T time, C channels, nh heads, hs head size, V vocab).
Dropout masks: the dict of numpy_ref/model.py (keys "embedding", "h.{i}.attn.weights",
"h.{i}.attn.out", "h.{i}.mlp.out"), checked by that model's own `split_masks`: an unknown key
or a wrong shape is refused, never ignored or broadcast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from numpy_ref import functional as F
from numpy_ref.attention import attention_backward, attention_forward, causal_mask
from numpy_ref.cross_entropy import cross_entropy_backward, cross_entropy_forward
from numpy_ref.embedding import check_ids, embedding_backward, embedding_forward
from numpy_ref.layernorm import layernorm_backward, layernorm_forward
from numpy_ref.mlp import mlp_backward, mlp_forward
from numpy_ref.model import split_masks
from numpy_ref.params import block_param_shapes
from numpy_ref.tensor import Tensor, custom_op, getitem, masked_fill, matmul, sqrt, transpose


# ---- FUSED: one engine op per layer ----------------------------------------------------------
# Small adapters make each pair fit custom_op's contract: one gradient per input, None for
# constants (token ids, targets) and no None inputs (a missing bias gets its own forward).


def fused_embedding(ids, wte: Tensor, wpe: Tensor) -> Tensor:
    return custom_op(embedding_forward, _embedding_vjp, ids, wte, wpe)


def _embedding_vjp(dout, cache):
    return (None, *embedding_backward(dout, cache))  # the ids get no gradient


def fused_layernorm(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    return custom_op(layernorm_forward, layernorm_backward, x, w, b, eps=eps)


def fused_attention(x: Tensor, w_attn: Tensor, b_attn: Tensor | None, w_proj: Tensor, b_proj: Tensor, n_heads: int,
                    attn_dropout_mask: np.ndarray | None = None) -> Tensor:
    if b_attn is None:
        return custom_op(_attention_nobias_forward, _attention_nobias_backward, x, w_attn, w_proj, b_proj,
                         n_heads=n_heads, attn_dropout_mask=attn_dropout_mask)
    return custom_op(attention_forward, attention_backward, x, w_attn, b_attn, w_proj, b_proj,
                     n_heads=n_heads, attn_dropout_mask=attn_dropout_mask)


def _attention_nobias_forward(x, w_attn, w_proj, b_proj, n_heads, attn_dropout_mask):
    return attention_forward(x, w_attn, None, w_proj, b_proj, n_heads, attn_dropout_mask)


def _attention_nobias_backward(dout, cache):
    dx, dw_attn, _, dw_proj, db_proj = attention_backward(dout, cache)
    return dx, dw_attn, dw_proj, db_proj


def fused_mlp(x: Tensor, w_fc: Tensor, b_fc: Tensor, w_proj: Tensor, b_proj: Tensor) -> Tensor:
    return custom_op(mlp_forward, mlp_backward, x, w_fc, b_fc, w_proj, b_proj)


def fused_cross_entropy(logits: Tensor, targets, ignore_index: int | None = None) -> Tensor:
    return custom_op(cross_entropy_forward, _cross_entropy_vjp, logits, np.asarray(targets), ignore_index=ignore_index)


def _cross_entropy_vjp(dloss, cache):
    return cross_entropy_backward(dloss, cache), None  # the targets get no gradient


# ---- COMPOSED: the same layers from the engine's primitives ----------------------------------


def composed_embedding(ids, wte: Tensor, wpe: Tensor) -> Tensor:
    ids = check_ids(ids, wte.shape[0], wpe.shape[0])
    T = ids.shape[1]
    return getitem(wte, ids) + getitem(wpe, slice(0, T))  # (B, T, C) + (T, C) -> (B, T, C)


def composed_linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    out = x @ w  # (..., C_in) @ (C_in, C_out) -> (..., C_out)
    return out if b is None else out + b


def composed_layernorm(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    mu = x.mean(axis=-1, keepdims=True)  # (..., C) -> (..., 1)
    xc = x - mu
    var = (xc * xc).mean(axis=-1, keepdims=True)  # (..., C) -> (..., 1), biased
    return xc / sqrt(var + eps) * w + b


def composed_gelu(x: Tensor) -> Tensor:
    return F.gelu(x)


def composed_attention(x: Tensor, w_attn: Tensor, b_attn: Tensor | None, w_proj: Tensor, b_proj: Tensor, n_heads: int,
                       attn_dropout_mask: np.ndarray | None = None) -> Tensor:
    B, T, C = x.shape
    if C % n_heads != 0:  # the fused attention's message, not a reshape error
        raise ValueError(f"attention: C={C} is not divisible by n_heads={n_heads}")
    hs = C // n_heads
    qkv = composed_linear(x, w_attn, b_attn)  # (B, T, C) -> (B, T, 3C)
    qkv = qkv.reshape(B, T, 3, n_heads, hs).permute(2, 0, 3, 1, 4)  # (B, T, 3C) -> (3, B, nh, T, hs)
    q, k, v = qkv[0], qkv[1], qkv[2]  # 3 x (B, nh, T, hs)
    s = matmul(q, transpose(k)) * (1.0 / math.sqrt(hs))  # (B, nh, T, hs) @ (B, nh, hs, T) -> (B, nh, T, T)
    s = masked_fill(s, causal_mask(T, T), -np.inf)
    a = F.softmax(s, axis=-1)  # (B, nh, T, T)
    if attn_dropout_mask is not None:
        a = a * attn_dropout_mask.astype(a.dtype, copy=False)
    y = matmul(a, v)  # (B, nh, T, T) @ (B, nh, T, hs) -> (B, nh, T, hs)
    y = y.permute(0, 2, 1, 3).reshape(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
    return composed_linear(y, w_proj, b_proj)  # (B, T, C) -> (B, T, C)


def composed_mlp(x: Tensor, w_fc: Tensor, b_fc: Tensor, w_proj: Tensor, b_proj: Tensor) -> Tensor:
    return composed_linear(composed_gelu(composed_linear(x, w_fc, b_fc)), w_proj, b_proj)  # C -> 4C -> C


def composed_cross_entropy(logits: Tensor, targets, ignore_index: int | None = None) -> Tensor:
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)


# ---- the two sets and the model over either ----------------------------------------------------


@dataclass(frozen=True)
class LayerOps:
    name: str
    embedding: Callable
    layernorm: Callable
    attention: Callable
    mlp: Callable
    cross_entropy: Callable


FUSED = LayerOps("fused", fused_embedding, fused_layernorm, fused_attention, fused_mlp, fused_cross_entropy)
COMPOSED = LayerOps("composed", composed_embedding, composed_layernorm, composed_attention, composed_mlp,
                    composed_cross_entropy)


def _drop(x: Tensor, mask: np.ndarray | None) -> Tensor:
    return x if mask is None else x * np.asarray(mask).astype(x.dtype, copy=False)


def gpt_forward_autograd(ops: LayerOps, params: Mapping[str, Tensor], ids, config, targets=None, *,
                         dropout_masks: Mapping[str, np.ndarray] | None = None, ignore_index: int | None = None):
    """(logits, loss) as Tensors; loss is None without targets. The model of numpy_ref/model.py."""
    x = ops.embedding(ids, params["wte.weight"], params["wpe.weight"])  # (B, T) -> (B, T, C)
    # {"embedding": mask or None, i: {"attn.weights": ..., ...}}: keys and shapes checked as the
    # hand-written model checks them (a mis-typed key must not silently mean "no dropout").
    masks = split_masks(dropout_masks, config, np.asarray(ids), 0, x.dtype)
    x = _drop(x, masks["embedding"])
    for i in range(config.n_layers):
        p = {name: params[f"h.{i}.{name}"] for name, _ in block_param_shapes(config)}
        a = ops.layernorm(x, p["ln_1.weight"], p["ln_1.bias"], config.ln_eps)  # (B, T, C)
        a = ops.attention(a, p["attn.c_attn.weight"], p.get("attn.c_attn.bias"), p["attn.c_proj.weight"],
                          p["attn.c_proj.bias"], config.n_heads, masks[i].get("attn.weights"))  # (B, T, C)
        x = x + _drop(a, masks[i].get("attn.out"))
        m = ops.layernorm(x, p["ln_2.weight"], p["ln_2.bias"], config.ln_eps)  # (B, T, C)
        m = ops.mlp(m, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"], p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])
        x = x + _drop(m, masks[i].get("mlp.out"))
    f = ops.layernorm(x, params["ln_f.weight"], params["ln_f.bias"], config.ln_eps)  # (B, T, C)
    head = params["wte.weight"] if config.tie_embeddings else params["lm_head.weight"]
    logits = matmul(f, transpose(head))  # (B, T, C) @ (C, V) -> (B, T, V)
    loss = None if targets is None else ops.cross_entropy(logits, targets, ignore_index)
    return logits, loss


def autograd_loss_and_grads(ops: LayerOps, params: Mapping[str, np.ndarray], ids, targets, config, *,
                            dropout_masks=None, ignore_index: int | None = None):
    """(logits array, loss float, grads dict) with every parameter a fresh leaf Tensor."""
    leaves = {name: Tensor(value, requires_grad=True) for name, value in params.items()}
    logits, loss = gpt_forward_autograd(ops, leaves, ids, config, targets, dropout_masks=dropout_masks,
                                        ignore_index=ignore_index)
    loss.backward()
    grads = {name: (t.grad if t.grad is not None else np.zeros_like(t.data)) for name, t in leaves.items()}
    return logits.data, float(loss.data), grads
