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
