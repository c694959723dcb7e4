"""Hypothesis strategies whose draws are valid by construction.

Configs draw heads and head size, then set C = heads * head size; arrays are bounded; token ids
include repeats and both ends of the vocabulary; text covers the cases that break tokenizers.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


@st.composite
def config_dicts(draw, max_layers: int = 2, max_heads: int = 4, max_head_size: int = 8, max_context: int = 12,
                 max_vocab: int = 64, dropout: bool = False) -> dict:
    """A GPTConfig as a dict of field -> value (build it with either tree's `GPTConfig(**d)`)."""
    n_heads = draw(st.integers(1, max_heads))
    head_size = draw(st.integers(1, max_head_size))
    return dict(
        vocab_size=draw(st.integers(2, max_vocab)),
        context_length=draw(st.integers(1, max_context)),
        emb_dim=n_heads * head_size,
        n_heads=n_heads,
        n_layers=draw(st.integers(1, max_layers)),
        drop_rate=draw(st.sampled_from([0.0, 0.1, 0.5])) if dropout else 0.0,
        qkv_bias=draw(st.booleans()),
        tie_embeddings=draw(st.booleans()),
        ln_eps=1e-5,
    )


def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**32 - 1)


def floats_array(shape, low: float = -3.0, high: float = 3.0, dtype=np.float64) -> st.SearchStrategy[np.ndarray]:
    """A bounded, finite float array of a fixed shape."""
    return hnp.arrays(dtype, shape, elements=st.floats(low, high, allow_nan=False, allow_infinity=False, width=64 if dtype == np.float64 else 32))


def random_array(seed: int, shape, scale: float = 1.0, dtype=np.float64) -> np.ndarray:
    """A normal array from an explicit seed: cheaper than element-by-element draws for big shapes."""
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


@st.composite
def shapes(draw, min_dims: int = 1, max_dims: int = 3, max_side: int = 5) -> tuple:
    return tuple(draw(hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=1, max_side=max_side)))


@st.composite
def broadcastable_pair(draw, max_dims: int = 3, max_side: int = 4) -> tuple[tuple, tuple]:
    """Two shapes that broadcast against each other (either may have size-1 or missing axes)."""
    shapes_ = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=max_dims, max_side=max_side))
    return shapes_.input_shapes


@st.composite
def token_ids(draw, vocab_size: int, max_batch: int = 3, max_time: int = 8) -> np.ndarray:
    """(B, T) int64 ids with repeats likely and the ends 0 and V-1 reachable; B=1 and T=1 included."""
    B = draw(st.integers(1, max_batch))
    T = draw(st.integers(1, max_time))
    pool = draw(st.lists(st.integers(0, vocab_size - 1), min_size=1, max_size=4))
    pool += [0, vocab_size - 1]
    ids = draw(hnp.arrays(np.int64, (B, T), elements=st.sampled_from(pool) | st.integers(0, vocab_size - 1)))
    return ids


def texts() -> st.SearchStrategy[str]:
    """Unicode text (no surrogates, no unassigned code points) mixed with tokenizer edge cases."""
    pieces = st.sampled_from([
        " ", "  ", "\n", "\r\n", "\t", "   \n\n", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S",
        "123", "4567", " 89", "hello", " world", "Hello", "ÄÖÜ", "naïve", "日本語", "🙂", "👍🏽", "<|endoftext|>",
        "<|endoftext", "!!!", "...", "e\u0301", "\u00a0", "x" * 40,
    ])
    chars = st.text(st.characters(blacklist_categories=("Cs", "Cn")), max_size=30)
    return st.lists(pieces | chars, max_size=12).map("".join)
