"""The one FLOP count every benchmark reports (documented in benchmarks/README.md).

A multiply-add is 2 FLOPs. Only matrix products are counted:

    N_mm = L * 12 C^2 + V C                     # weights that enter a matmul, once per token:
                                                #   c_attn 3C^2, attn.c_proj C^2, c_fc 4C^2,
                                                #   mlp.c_proj 4C^2 per block, and the head V C
    forward FLOPs per token  = 2 N_mm + 2 L C (T + 1)
    training FLOPs per token = 3 x forward      # backward = 2 x forward (dX and dW products)

The attention term counts q k^T and a v over the pairs the causal mask keeps: query t (0-based)
sees t + 1 keys, each costing 2 hs FLOPs per head for the score and 2 hs for the weighted value,
so 4 C (t + 1) per layer; averaged over the T positions of a sequence this is 2 C (T + 1).
(Kaplan et al. 2020 write 2 L T C; PaLM's 6N + 12 L H Q T counts the masked half as well.)
Not counted: biases, layer norms, GELU, softmax, the mask, residual adds, the embedding lookup,
cross-entropy and the optimizer (all O(C) or O(V) per token, under 1% at GPT-2 sizes).

Decoding with a KV cache, one new token after P cached positions: 2 N_mm + 4 L C (P + 1).
Decoding n tokens greedily from a 1-token prompt runs n one-token forwards, at P = 0 .. n-1
(the prompt's forward gives the first token; the last token is never fed back).
Decoding without a cache recomputes the whole sequence of t = 1 .. n tokens for each new token,
but the output head only for its last position (both trees' `last_only`, Hugging Face's
`logits_to_keep`): the forward above minus 2 V C for each of the other t - 1 positions.
"""

from __future__ import annotations

from typing import Any, Mapping


def _fields(config: Any) -> tuple[int, int, int]:
    """(V, C, L) from a GPTConfig of either tree or a dict with the same fields."""
    get = config.get if isinstance(config, Mapping) else lambda k: getattr(config, k)
    return int(get("vocab_size")), int(get("emb_dim")), int(get("n_layers"))


def matmul_params(config: Any) -> int:
    """N_mm: parameters used as matmul weights, each once per token (head included, tied or not)."""
    V, C, L = _fields(config)
    return L * 12 * C * C + V * C


def attention_flops_per_token(config: Any, T: int) -> int:
    """2 L C (T + 1): q k^T and a v over the causal pairs, averaged over T positions."""
    _, C, L = _fields(config)
    return 2 * L * C * (T + 1)


def forward_flops_per_token(config: Any, T: int) -> int:
    return 2 * matmul_params(config) + attention_flops_per_token(config, T)


def forward_flops(config: Any, B: int, T: int) -> int:
    """FLOPs of one forward pass over a (B, T) batch."""
    if B < 1 or T < 1:
        raise ValueError(f"B and T must be positive, got B={B}, T={T}")
    return B * T * forward_flops_per_token(config, T)


def training_flops(config: Any, B: int, T: int) -> int:
    """Forward + backward: 3 x forward (the optimizer is not counted)."""
    return 3 * forward_flops(config, B, T)


def decode_flops(config: Any, P: int) -> int:
    """One new token after P cached positions (per sequence)."""
    _, C, L = _fields(config)
    return 2 * matmul_params(config) + 4 * L * C * (P + 1)


def generate_flops(config: Any, new_tokens: int, use_cache: bool) -> int:
    """Greedy decoding of `new_tokens` from a 1-token prompt, B = 1 (see the top): with a cache,
    one-token forwards at P = 0 .. n-1; without, a forward over t = 1 .. n tokens each, with the
    head at the last position only."""
    V, C, _ = _fields(config)
    if use_cache:
        return sum(decode_flops(config, P) for P in range(new_tokens))
    return sum(forward_flops(config, 1, t) - 2 * V * C * (t - 1) for t in range(1, new_tokens + 1))


# ---- per layer, for the layer benchmarks (same rules: matmuls only) --------------------------

def layer_forward_flops(name: str, B: int, T: int, C: int, V: int) -> int:
    """Forward FLOPs of one layer call on (B, T, C) inputs; 0 for layers without a matmul."""
    BT = B * T
    if name == "linear":
        return 2 * BT * C * (C + 3)  # parity_tests.layer_specs makes a (C, C + 3) weight
    if name == "attention":
        return 2 * BT * C * 3 * C + 2 * BT * C * C + B * 4 * C * (T * (T + 1) // 2)
    if name == "mlp":
        return 2 * BT * C * 4 * C * 2
    return 0


def layer_backward_flops(name: str, B: int, T: int, C: int, V: int) -> int:
    """Backward = 2 x forward for matmul layers (dX and dW)."""
    return 2 * layer_forward_flops(name, B, T, C, V)
