"""The model configuration: one frozen dataclass and named presets (docs/design.md, "Config").

Written independently of numpy_ref/config.py on purpose; `parity_tests/test_cross_config.py`
checks that the two copies agree field by field and preset by preset.

The GPT-2 presets follow GPT_CONFIG_124M in "Build a Large Language Model (From Scratch)",
chapter 4, and its table of the larger models (context 1024, dropout 0.1, no qkv bias,
separate output head); `tiny` is for tests.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257  # V
    context_length: int = 1024  # Tc, the longest sequence
    emb_dim: int = 768  # C
    n_heads: int = 12  # nh
    n_layers: int = 12  # L
    drop_rate: float = 0.1  # embeddings, attention weights and residual branches
    qkv_bias: bool = False  # whether c_attn has a bias
    tie_embeddings: bool = False  # output head is wte itself, or a separate lm_head.weight
    ln_eps: float = 1e-5  # layer-norm epsilon, inside the square root

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"GPTConfig.{name} must be an int, got {value!r} ({type(value).__name__})")
            if value <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {value}")
        for name in ("drop_rate", "ln_eps"):  # any real number; kept as a Python float (JSON-ready)
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"GPTConfig.{name} must be a number, got {value!r} ({type(value).__name__})")
            try:
                as_float = float(value)
            except OverflowError:  # an int or Fraction past float64's range, such as 10**400 in a config.json
                magnitude = abs(int(value)).bit_length() - 1  # its repr can run to thousands of digits
                raise ValueError(f"GPTConfig.{name} is past float64's range (magnitude below 2**1024): got about "
                                 f"{'-' if value < 0 else ''}2**{magnitude} ({type(value).__name__})") from None
            object.__setattr__(self, name, as_float)
        for name in ("qkv_bias", "tie_embeddings"):  # a string such as "false" would count as True
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"GPTConfig.{name} must be True or False, got {value!r} ({type(value).__name__})")
        if self.emb_dim % self.n_heads != 0:
            raise ValueError(f"GPTConfig.emb_dim={self.emb_dim} is not divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"GPTConfig.drop_rate={self.drop_rate!r} must be in [0, 1)")
        if not (self.ln_eps > 0.0 and math.isfinite(self.ln_eps)):
            # 0 would divide 0 by 0 on a constant row (x - mean = 0, var = 0): a NaN, not an error
            raise ValueError(f"GPTConfig.ln_eps={self.ln_eps!r} must be finite and > 0")

    @property
    def head_size(self) -> int:
        """hs = C // nh."""
        return self.emb_dim // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        """Field name -> value, in field order (what checkpoints store under `gpt_oracle`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GPTConfig":
        """The inverse of `to_dict`: every field, no other key (a checkpoint's `gpt_oracle` object
        must not fall back to defaults); an unknown or missing key is a ValueError naming it."""
        if not isinstance(d, Mapping):
            raise TypeError(f"a GPTConfig dict must be a mapping of its fields, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        missing = [k for k in known if k not in d]
        if missing:
            raise ValueError(f"missing GPTConfig key(s) {missing}; every field is needed: {known}")
        unknown = [k for k in d if k not in known]
        if unknown:
            raise ValueError(f"unknown GPTConfig key(s) {unknown}; known keys are {known}")
        return cls(**dict(d))


_GPT2 = dict(vocab_size=50257, context_length=1024, drop_rate=0.1, qkv_bias=False, tie_embeddings=False, ln_eps=1e-5)

PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(vocab_size=101, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                      qkv_bias=True, tie_embeddings=False, ln_eps=1e-5),
    "gpt2-small": GPTConfig(emb_dim=768, n_layers=12, n_heads=12, **_GPT2),
    "gpt2-medium": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16, **_GPT2),
    "gpt2-large": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20, **_GPT2),
    "gpt2-xl": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25, **_GPT2),
}

# The book names the GPT-2 sizes by parameter count.
ALIASES: dict[str, str] = {"124M": "gpt2-small", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl"}


def get_config(name: str, **overrides: Any) -> GPTConfig:
    """The preset `name` (or its alias), with any fields replaced by `overrides`."""
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets {sorted(PRESETS)}, aliases {sorted(ALIASES)}")
    return dataclasses.replace(PRESETS[key], **overrides) if overrides else PRESETS[key]
