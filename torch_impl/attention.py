"""Causal multi-head self-attention.

    [q | k | v] = x @ w_attn + b_attn                          (B, T, C) -> (B, T, 3C)
    split into heads: head j of q is q[..., j*hs : (j+1)*hs]    (B, T, C) -> (B, nh, T, hs)
    scores = q k^T / sqrt(hs)                                   (B, nh, T, hs) -> (B, nh, T, Tk)
    scores[t, s] = -inf where key s is in the future of query t (s > P + t)
    att = softmax(scores, axis=-1) * dropout_mask               (B, nh, T, Tk)
    y = att @ v, heads merged back side by side                 (B, nh, T, hs) -> (B, T, C)
    out = y @ w_proj + b_proj                                   (B, T, C) -> (B, T, C)

With a KV cache of P past positions, Tk = P + T and query t (0-based in the new chunk) sees
keys 0 .. P + t: the mask is aligned to the bottom-right corner of the (T, Tk) score matrix.
(`is_causal=True` in `scaled_dot_product_attention` aligns it to the top-left corner, which is
right only when P = 0.)

Reference: Vaswani et al. 2017, "Attention Is All You Need"; openai/gpt-2 `model.py` `attn`.
numpy_ref/attention.py writes out the backward; here autograd does it.

Two algorithms for the weighted sum, as two named functions:
- `sdpa_attention`: `F.scaled_dot_product_attention`, which never materialises the (T, Tk)
  matrix on CUDA (flash / memory-efficient kernels) and uses a fused kernel on the CPU. Its
  dropout, when asked for, is drawn by torch.
- `explicit_attention`: the scores, softmax and an explicit dropout mask multiplied in, step by
  step. SDPA cannot take a dropout mask, so this is the path the parity tests use to feed both
  trees the same attention-dropout draws; torch.func.vmap and forward-mode AD take it too (SDPA
  has no vmap rule and its fused kernels no forward derivative).

Training under bf16 autocast on a CPU with bf16 units, torch's CPU flash kernel in bf16 costs
more than in float32 for short sequences: its backward carries a fixed cost of several ms per
call. Measured on a 2-core Xeon with AMX, 12 heads of 64, forward + backward: B x T = 4 x 64
2.7 ms float32 vs 8.2 ms bf16; 1 x 256 5.0 vs 6.5; 1 x 512 18.3 vs 17.7; 1 x 1024 52.7 vs 47.9.
So below SDPA_FP32_BELOW_T queries that training step takes the attention in float32 (q, k, v
widened exactly; the output is rounded to bf16 by the next product, as autocast would round it).
Without grad (evaluation, decoding) bf16 is faster at every length and stays.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from torch_impl.device import cpu_has_fast_bf16, plain_eager, under_forward_ad, under_vmap
from torch_impl.kv_cache import LayerKV
from torch_impl.linear import linear_forward

SDPA_FP32_BELOW_T = 512  # CPU bf16 training: float32 attention below this many queries (see top)


def causal_mask(T: int, Tk: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(T, Tk) boolean, True where key s is in the future of query t (s > P + t, P = Tk - T): the
    entries masked out, aligned to the bottom-right corner, as numpy_ref's causal_mask.
    SDPA's boolean attn_mask means the opposite (True: may attend), so it gets ~causal_mask."""
    past = Tk - T
    return torch.ones(T, Tk, dtype=torch.bool, device=device).triu(diagonal=past + 1)  # (T, Tk)


def fp32_attention_pays(q: torch.Tensor) -> bool:
    """CPU bf16 autocast training with bf16 units and fewer than SDPA_FP32_BELOW_T queries: the
    float32 kernel is the faster one there (see top)."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[2] < SDPA_FP32_BELOW_T
            and torch.is_grad_enabled() and q.requires_grad and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and plain_eager() and cpu_has_fast_bf16())


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) + causal) v through the fused kernel; dropout_p drawn by torch."""
    if fp32_attention_pays(q):
        with torch.autocast("cpu", enabled=False):  # autocast would cast the float32 inputs back to bf16
            return sdpa_attention(q.float(), k.float(), v.float(), dropout_p)  # (B, nh, T, hs), float32
    T, Tk = q.shape[2], k.shape[2]
    if T == Tk:
        # No cache (or an empty one): the top-left and bottom-right alignments coincide.
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)  # -> (B, nh, T, hs)
    if T == 1:
        # One new query at the end sees every key: no mask at all.
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, nh, 1, hs)
    allowed = ~causal_mask(T, Tk, q.device)  # (T, Tk), True where query t may see key s; broadcast over (B, nh)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)  # -> (B, nh, T, hs)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The same attention, step by step, with an explicit dropout mask on the weights."""
    T, Tk, hs = q.shape[2], k.shape[2], q.shape[3]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, hs) @ (B, nh, hs, Tk) -> (B, nh, T, Tk)
    scores = scores.masked_fill(causal_mask(T, Tk, q.device), float("-inf"))  # future keys get weight 0
    att = torch.softmax(scores, dim=-1)  # every row keeps at least key 0, so no row is all -inf
    if dropout_mask is not None:
        if tuple(dropout_mask.shape) != tuple(att.shape):
            raise ValueError(f"attention dropout mask has shape {tuple(dropout_mask.shape)}; expected {tuple(att.shape)}")
        att = att * dropout_mask.to(att.dtype)
    return att @ v  # (B, nh, T, Tk) @ (B, nh, Tk, hs) -> (B, nh, T, hs)


def attention_forward(x: torch.Tensor, w_attn: torch.Tensor, b_attn: torch.Tensor | None, w_proj: torch.Tensor,
                      b_proj: torch.Tensor, n_heads: int, attn_dropout_mask: torch.Tensor | None = None, *,
                      kv_cache: LayerKV | None = None, attn_dropout_p: float = 0.0) -> torch.Tensor:
    """Causal self-attention of x (optionally after `kv_cache.past` cached positions).

    attn_dropout_mask (B, nh, T, P + T): explicit dropout on the attention weights (takes the
    explicit path). attn_dropout_p: torch-drawn dropout inside SDPA (pass 0 in evaluation). The
    two are exclusive: a mask with attn_dropout_p > 0 is refused (it would drop twice, or the
    mask would silently replace p).
    """
    if x.ndim != 3:
        raise ValueError(f"attention: x must be (B, T, C), got shape {tuple(x.shape)}")
    B, T, C = x.shape
    if B < 1 or T < 1:
        raise ValueError(f"attention: x must have B >= 1 and T >= 1, got shape {tuple(x.shape)}")
    if isinstance(n_heads, bool) or not isinstance(n_heads, numbers.Integral):
        raise TypeError(f"attention: n_heads must be an int, got {n_heads!r} ({type(n_heads).__name__})")
    if n_heads < 1:
        raise ValueError(f"attention: n_heads must be >= 1, got {n_heads}")
    if C % n_heads != 0:
        raise ValueError(f"attention: C={C} is not divisible by n_heads={n_heads}")
    if tuple(w_attn.shape) != (C, 3 * C) or tuple(w_proj.shape) != (C, C):
        raise ValueError(f"attention: w_attn {tuple(w_attn.shape)} and w_proj {tuple(w_proj.shape)} must be "
                         f"{(C, 3 * C)} and {(C, C)} for C={C}")
    if attn_dropout_mask is not None and attn_dropout_p != 0.0:
        raise ValueError(f"attention: an attn_dropout_mask and attn_dropout_p={attn_dropout_p} were both given; "
                         "pass the mask with attn_dropout_p=0, or p without a mask")
    if attn_dropout_p != 0.0 and (under_vmap() or under_forward_ad()):
        raise ValueError(f"attention: attn_dropout_p={attn_dropout_p} is drawn inside SDPA, which has no vmap rule "
                         "and no forward-mode derivative; pass explicit attention dropout masks instead")
    n_heads = int(n_heads)
    hs = C // n_heads
    qkv = linear_forward(x, w_attn, b_attn)  # (B, T, C) -> (B, T, 3C)
    qkv = qkv.view(B, T, 3, n_heads, hs)  # (B, T, 3C) -> (B, T, 3, nh, hs): [q | k | v], heads side by side
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, T, 3, nh, hs) -> 3 x (B, nh, T, hs)
    if kv_cache is not None:
        k, v = kv_cache.append(k, v)  # (B, nh, T, hs) -> (B, nh, P + T, hs)
    if attn_dropout_mask is not None or under_vmap() or under_forward_ad():
        # Explicit masks need the explicit path; so do torch.func.vmap, for which torch's SDPA
        # kernels have no batching rule (a slow per-sample fallback with a warning), and
        # forward-mode AD (torch.func.jvp, forward_ad), for which the fused kernels have no derivative.
        y = explicit_attention(q, k, v, attn_dropout_mask)  # -> (B, nh, T, hs)
    else:
        y = sdpa_attention(q, k, v, attn_dropout_p)  # -> (B, nh, T, hs)
    y = y.transpose(1, 2).reshape(B, T, C)  # (B, nh, T, hs) -> (B, T, nh, hs) -> (B, T, C)
    return linear_forward(y, w_proj, b_proj)  # (B, T, C) -> (B, T, C)
