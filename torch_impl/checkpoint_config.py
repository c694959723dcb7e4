"""config.json: our GPTConfig as Hugging Face GPT2Config fields, and a GPTConfig back from them.

`hf_config_dict` writes GPT2Config's fields, then our own GPTConfig.to_dict() under
`gpt_oracle`. `config_from_hf` reads the `gpt_oracle` object when there is one (and requires
the Hugging Face fields beside it to agree), else derives the config from the Hugging Face
fields, as for a checkpoint `transformers` wrote. It rejects, with a CheckpointError naming the
file and the key, a value of the wrong type (`"false"` for a boolean, null for a number) and
configurations this model would not reproduce (a model_type other than gpt2, another activation,
n_inner or attention scaling, n_ctx unlike n_positions, three different dropout rates).
numpy_ref/checkpoint_config.py is the same contract written without torch.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from torch_impl.checkpoint_files import CheckpointError
from torch_impl.config import GPTConfig

__all__ = ["hf_config_dict", "config_from_hf"]


def hf_config_dict(config: GPTConfig) -> dict[str, Any]:
    """Hugging Face GPT2Config fields for `config`, then our own config under `gpt_oracle`."""
    eot = 50256 if config.vocab_size > 50256 else None  # <|endoftext|>, when the vocabulary has it
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size, "n_positions": config.context_length, "n_ctx": config.context_length,
        "n_embd": config.emb_dim, "n_layer": config.n_layers, "n_head": config.n_heads,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",  # tanh-approximated GELU
        "layer_norm_epsilon": config.ln_eps,
        "resid_pdrop": config.drop_rate, "embd_pdrop": config.drop_rate, "attn_pdrop": config.drop_rate,
        "scale_attn_weights": True, "tie_word_embeddings": config.tie_embeddings, "dtype": "float32",
        "bos_token_id": eot, "eos_token_id": eot,
        "gpt_oracle": config.to_dict(),
    }


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0  # JSON true is a Python int too


def _number(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)  # json reads NaN
    except OverflowError:  # an integer with no float64 (10**400): unusable, named by the caller
        return False


# Each GPT-2 field config.json's values are read from: key -> (is the value usable, what is expected).
_HF_FIELDS = {
    "vocab_size": (_positive_int, "a positive integer"),
    "n_positions": (_positive_int, "a positive integer"),
    "n_ctx": (_positive_int, "a positive integer"),
    "n_embd": (_positive_int, "a positive integer"),
    "n_layer": (_positive_int, "a positive integer"),
    "n_head": (_positive_int, "a positive integer"),
    "layer_norm_epsilon": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "resid_pdrop": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "embd_pdrop": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "attn_pdrop": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "tie_word_embeddings": (lambda v: isinstance(v, bool), "true or false (a JSON boolean, not a string)"),
}


def config_from_hf(hf: Mapping[str, Any], path) -> GPTConfig:
    """GPTConfig from config.json: the `gpt_oracle` object when present, else the HF fields."""
    for key, (ok, want) in _HF_FIELDS.items():
        if key in hf and not ok(hf[key]):
            raise CheckpointError(f"{path}: key {key!r} = {hf[key]!r}: expected {want}")
    unsupported = {
        "model_type": (lambda v: v == "gpt2", "'gpt2'"),
        "activation_function": (lambda v: v in ("gelu_new", "gelu_pytorch_tanh"), "the tanh GELU 'gelu_new'"),
        "n_inner": (lambda v: v is None or (_positive_int(v) and v == 4 * hf.get("n_embd", -1)),
                    "null or 4 * n_embd"),
        "scale_attn_weights": (lambda v: v is True, "true"),
        "scale_attn_by_inverse_layer_idx": (lambda v: v is False, "false"),
    }
    for key, (ok, want) in unsupported.items():
        if key in hf and not ok(hf[key]):
            raise CheckpointError(f"{path}: key {key!r} = {hf[key]!r} is not supported (need {want})")
    # Older transformers releases made GPT-2's causal mask n_ctx x n_ctx and its wpe n_positions
    # long: with the two unequal, the writer's model did not attend over n_positions tokens as ours.
    if "n_positions" in hf and "n_ctx" in hf and hf["n_positions"] != hf["n_ctx"]:
        raise CheckpointError(f"{path}: key 'n_ctx' = {hf['n_ctx']!r} differs from key 'n_positions' = "
                              f"{hf['n_positions']!r}; this GPT-2 has one context length for both")
    if "gpt_oracle" in hf:
        try:
            config = GPTConfig.from_dict(hf["gpt_oracle"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: key 'gpt_oracle': {e}") from None
        pairs = {"vocab_size": config.vocab_size, "n_positions": config.context_length, "n_ctx": config.context_length,
                 "n_embd": config.emb_dim, "n_layer": config.n_layers, "n_head": config.n_heads,
                 "layer_norm_epsilon": config.ln_eps, "tie_word_embeddings": config.tie_embeddings,
                 "resid_pdrop": config.drop_rate, "embd_pdrop": config.drop_rate, "attn_pdrop": config.drop_rate}
        for key, ours in pairs.items():
            if key in hf and hf[key] != ours:
                raise CheckpointError(f"{path}: key {key!r} = {hf[key]!r} disagrees with gpt_oracle's {ours!r}")
        return config
    required = ["vocab_size", "n_embd", "n_layer", "n_head"]
    missing = [k for k in required if k not in hf] + ([] if "n_positions" in hf or "n_ctx" in hf else ["n_positions"])
    if missing:
        raise CheckpointError(f"{path}: key(s) {missing} missing (needed to build a GPT-2 config)")
    drops = {k: hf.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}  # GPT2Config's defaults
    if any(v != drops["resid_pdrop"] for v in drops.values()):
        raise CheckpointError(f"{path}: keys {drops} differ; this GPT-2 has one drop_rate for the embeddings, "
                              f"the attention weights and the residual branches")
    if hf["n_embd"] % hf["n_head"]:
        raise CheckpointError(f"{path}: key 'n_embd' = {hf['n_embd']} is not divisible by key 'n_head' = "
                              f"{hf['n_head']} (C = nh * hs)")
    try:
        return GPTConfig(vocab_size=hf["vocab_size"], context_length=hf.get("n_positions", hf.get("n_ctx")),
                         emb_dim=hf["n_embd"], n_heads=hf["n_head"], n_layers=hf["n_layer"],
                         drop_rate=float(drops["resid_pdrop"]),
                         qkv_bias=True,  # Hugging Face GPT-2's c_attn always has a bias
                         tie_embeddings=hf.get("tie_word_embeddings", True),  # GPT2Config's default
                         ln_eps=float(hf.get("layer_norm_epsilon", 1e-5)))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
