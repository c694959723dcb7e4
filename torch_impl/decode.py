"""One new token per sequence through the whole model, on the CPU, in as few torch calls as possible.

Decoding with a KV cache feeds one token per sequence per step, so every product is a few rows
times a weight: it streams the weight from memory (linear.py). For GPT-2 small in float32 that
is 500 MB per token, about 24 ms on the AMD benchmark machine. The general forward (model.py ->
block.py -> attention.py -> linear.py) spends about 4-5 ms per token more, in Python and in ~45
small torch calls per layer (reshapes for any T, mask logic, per-product checks). This is the same
computation written for T = 1, with ~30 calls per layer and the residuals added in place:

    x = wte[ids] + wpe[P]                                        (B, 1) -> (B, C)
    for each block (block.py with T = 1):
        [q | k | v] = ln_1(x) @ w_attn + b_attn                  (B, C) -> (B, 3C) -> 3 x (B, nh, 1, hs)
        k_cache[:, :, P] = k,  v_cache[:, :, P] = v              into (B, nh, Tc, hs)
        y = softmax(q k_cache[:, :, :P+1]^T / sqrt(hs)) v_cache[:, :, :P+1]     (B, nh, 1, hs) -> (B, C)
        x += y @ w_proj + b_proj                                 (B, C)
        x += gelu(ln_2(x) @ w_fc + b_fc) @ w_mproj + b_mproj     (B, C) -> (B, 4C) -> (B, C)  (mlp.c_proj)
    logits = ln_f(x) @ head.T                                    (B, C) -> (B, 1, V)

The one new query is the last position, so it sees every cached key: no mask (attention.py says
the same for T = 1). Every product is linear.streamed_linear or head.head_streamed, the very
functions the general path calls for these shapes, and layer norm, GELU and attention are the
same torch calls, so the logits and the cache agree with the general path bit for bit
(parity_tests/test_decode.py checks it). GPTModel.forward takes this path only where that holds
(`decodes_fast`): no autograd, no autocast, no compile tracing, float weights on the CPU, a
cache in the weights' dtype, no dropout, at most SPLIT_MAX_ROWS sequences, C divisible by SPLIT_K.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torch_impl.device import plain_eager, stored_tensor
from torch_impl.embedding import check_ids
from torch_impl.head import head_streamed
from torch_impl.kv_cache import KVCache
from torch_impl.linear import SPLIT_K, SPLIT_MAX_ROWS, streamed_linear


def decodes_fast(model, ids, kv_cache: KVCache | None) -> bool:
    """Whether model(ids, kv_cache=kv_cache) may run `decode_step` (the caller has ruled out
    targets, dropout masks and dropout itself): one position per row, CPU, plain eager, no grad."""
    if kv_cache is None or torch.is_grad_enabled() or not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        return False
    w = stored_tensor(model.wte, "weight")  # its device and dtype, without computing a parametrized wte
    return (ids.shape[1] == 1 and 1 <= ids.shape[0] <= SPLIT_MAX_ROWS and ids.shape[0] == kv_cache.batch_size
            and w.device.type == "cpu" and kv_cache.k.dtype == w.dtype and kv_cache.k.device == w.device
            and model.config.emb_dim % SPLIT_K == 0 and not torch.is_autocast_enabled("cpu") and plain_eager())


def decode_step(model, ids: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
    """Logits (B, 1, V) for one new token per row, ids (B, 1), after the kv_cache's P positions;
    writes position P of every layer's cache, then advances it by 1.

    Only where `decodes_fast` says yes (GPTModel.forward asks it): under torch.no_grad(), with the
    cache's dtype, device and batch size the model's. Its in-place adds would break a graph, so
    grad mode is refused here by name."""
    if torch.is_grad_enabled():
        raise RuntimeError("decode_step runs without gradients (inference); call it under torch.no_grad(), "
                           "or call the model, which takes it only when decodes_fast allows")
    cfg = model.config
    P = kv_cache.length
    wte, wpe = model.wte.weight, model.wpe.weight
    ids = check_ids(ids, wte.shape[0], wpe.shape[0], pos_offset=P)  # embedding.py's errors and int64, same tables
    kv_cache.layer(0).check_room(1)  # attention's overflow error, before anything is written
    B, C, nh, hs, eps = ids.shape[0], cfg.emb_dim, cfg.n_heads, cfg.head_size, cfg.ln_eps
    x = F.embedding(ids, wte).view(B, C) + wpe[P]  # (B, 1) -> (B, C), + wpe[P] (C,)
    for i, block in enumerate(model.h):
        attn, mlp = block.attn, block.mlp
        a = F.layer_norm(x, (C,), block.ln_1.weight, block.ln_1.bias, eps)  # (B, C)
        qkv = streamed_linear(a, attn.c_attn.weight, attn.c_attn.bias)  # (B, C) -> (B, 3C)
        q, k, v = qkv.view(B, 3, nh, 1, hs).unbind(1)  # (B, 3C) -> 3 x (B, nh, 1, hs): [q | k | v], heads side by side
        k_cache, v_cache = kv_cache.k[i], kv_cache.v[i]  # (B, nh, Tc, hs)
        k_cache.narrow(2, P, 1).copy_(k)  # position P
        v_cache.narrow(2, P, 1).copy_(v)
        y = F.scaled_dot_product_attention(q, k_cache.narrow(2, 0, P + 1),
                                           v_cache.narrow(2, 0, P + 1))  # (B, nh, 1, hs) with P + 1 keys
        x.add_(streamed_linear(y.reshape(B, C), attn.c_proj.weight, attn.c_proj.bias))  # heads merged (B, C)
        m = F.layer_norm(x, (C,), block.ln_2.weight, block.ln_2.bias, eps)  # (B, C)
        m = F.gelu(streamed_linear(m, mlp.c_fc.weight, mlp.c_fc.bias), approximate="tanh")  # (B, C) -> (B, 4C)
        x.add_(streamed_linear(m, mlp.c_proj.weight, mlp.c_proj.bias))  # (B, 4C) -> (B, C)
    kv_cache.advance(1)
    x = F.layer_norm(x, (C,), model.ln_f.weight, model.ln_f.bias, eps)  # (B, C)
    head = wte if cfg.tie_embeddings else model.lm_head.weight  # wte read once (a parametrization runs per read)
    return head_streamed(x, head).view(B, 1, -1)  # (B, C) @ (C, V) -> (B, 1, V)
