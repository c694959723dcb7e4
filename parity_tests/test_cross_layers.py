"""Every layer, both trees: torch_impl's forward and autograd gradients against the NumPy
oracle's forward and hand-derived backward, on hypothesis-drawn sizes and values."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from parity_tests.layer_specs import SPECS
from parity_tests.oracle import compare_torch_layer, sizes

LAYERS = sorted(SPECS)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", LAYERS)
@given(s=sizes(), seed=st.integers(0, 2**31 - 1))
def test_torch_layer_matches_oracle(name, dtype, s, seed):
    spec = SPECS[name]
    inputs = spec.make_inputs(np.random.default_rng(seed), s)
    results = compare_torch_layer(spec, spec.torch_forward(), inputs, dtype=dtype, upstream_seed=seed)
    bad = [r for r in results if not r.ok]
    assert not bad, bad[0].message()


# Layer norm is in: its dx scales with 1/sigma of each row, and layer_specs keeps the ordinary
# rows spread out (std >= max(1, |mean|)) and judges its small-spread rows on their own scale.
@pytest.mark.parametrize("name", ["linear", "layernorm", "gelu", "attention", "mlp", "embedding", "cross_entropy"])
@given(s=sizes(max_batch=2, max_time=6), seed=st.integers(0, 2**31 - 1))
def test_torch_layer_bf16_within_budget(name, s, seed):
    spec = SPECS[name]
    inputs = spec.make_inputs(np.random.default_rng(seed), s, "bfloat16")
    results = compare_torch_layer(spec, spec.torch_forward(), inputs, dtype="bfloat16", upstream_seed=seed)
    bad = [r for r in results if not r.ok]
    assert not bad, bad[0].message()


# Attention's input checks, the same in both trees: the value and the limit named, never a
# reshape error from deep inside (or, for T = 0, an empty output from one tree and a NumPy
# reduction error from the other).
_ATTENTION_BAD = [
    ("x-2d", (3, 6), (6, 18), 2, ValueError, r"x must be \(B, T, C\), got shape \(3, 6\)"),
    ("T-0", (1, 0, 6), (6, 18), 2, ValueError, r"B >= 1 and T >= 1, got shape \(1, 0, 6\)"),
    ("B-0", (0, 3, 6), (6, 18), 2, ValueError, r"B >= 1 and T >= 1, got shape \(0, 3, 6\)"),
    ("nh-0", (1, 3, 6), (6, 18), 0, ValueError, "n_heads must be >= 1, got 0"),
    ("nh-negative", (1, 3, 6), (6, 18), -2, ValueError, "n_heads must be >= 1, got -2"),
    ("nh-float", (1, 3, 6), (6, 18), 2.0, TypeError, "n_heads must be an int, got 2.0"),
    ("nh-bool", (1, 3, 6), (6, 18), True, TypeError, "n_heads must be an int, got True"),
    ("nh-not-dividing", (1, 3, 6), (6, 18), 4, ValueError, "C=6 is not divisible by n_heads=4"),
    ("w_attn", (1, 3, 6), (6, 12), 2, ValueError, r"w_attn \(6, 12\) and w_proj \(6, 6\) must be \(6, 18\)"),
]


@pytest.mark.parametrize("tree", ["numpy_ref", "torch_impl"])
@pytest.mark.parametrize("case", _ATTENTION_BAD, ids=[c[0] for c in _ATTENTION_BAD])
def test_attention_refuses_bad_input_in_both_trees(tree, case):
    _, x_shape, w_attn_shape, n_heads, error, match = case
    if tree == "numpy_ref":
        from numpy_ref.attention import attention_forward
        x, w_attn, w_proj, b_proj = np.ones(x_shape), np.ones(w_attn_shape), np.ones((6, 6)), np.ones(6)
    else:
        import torch

        from torch_impl.attention import attention_forward
        x, w_attn, w_proj, b_proj = (torch.ones(s, dtype=torch.float64) for s in (x_shape, w_attn_shape, (6, 6), (6,)))
    with pytest.raises(error, match=match):
        attention_forward(x, w_attn, None, w_proj, b_proj, n_heads)


@pytest.mark.parametrize("T, P", [(1, 0), (3, 0), (1, 4), (3, 4), (5, 2)])
def test_causal_mask_means_the_same_in_both_trees(T, P):
    from numpy_ref.attention import causal_mask as numpy_mask
    from torch_impl.attention import causal_mask as torch_mask

    future = np.arange(P + T)[None, :] > (P + np.arange(T))[:, None]  # key s is after query t's position P + t
    assert np.array_equal(numpy_mask(T, P + T), future), f"numpy_ref causal_mask({T}, {P + T}) is not s > P + t"
    assert np.array_equal(torch_mask(T, P + T).numpy(), future), f"torch_impl causal_mask({T}, {P + T}) is not s > P + t"
