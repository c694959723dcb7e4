"""The user-facing oracle API (README, "Checking your own kernel against the oracle")."""

import numpy as np
import pytest
import torch

from parity_tests.layer_specs import SPECS, Sizes, run_oracle
from parity_tests.oracle import check_layer, check_numpy_layer


def my_layernorm(x, w, b, eps):  # the README's example, verbatim
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_readme_example_passes_and_reports_worst_errors(dtype):
    report = check_layer("layernorm", my_layernorm, dtype=dtype, device="cpu", max_examples=8, derandomize=True)
    worst = report.worst()
    assert set(worst) == {"out", "dx", "dw", "db"}, f"report covers {sorted(worst)}"
    assert report.comparisons and all(c.ok for c in report.comparisons)
    assert max(worst.values()) < (1e-9 if dtype == "float64" else 1e-3), worst


def test_bf16_kernel_is_judged_on_the_values_it_saw():
    def bf16_layernorm(x, w, b, eps):
        return torch.nn.functional.layer_norm(x.float(), x.shape[-1:], w.float(), b.float(), eps).to(x.dtype)

    report = check_layer("layernorm", bf16_layernorm, dtype="bfloat16", max_examples=5, derandomize=True)
    assert all(c.dtype == "bfloat16" for c in report.comparisons)


def test_unknown_layer_name_is_a_clear_error():
    with pytest.raises(KeyError, match="no oracle layer named 'layer_norm'"):
        check_layer("layer_norm", my_layernorm)


def test_numpy_pair_entry_point_accepts_the_oracle_itself():
    from numpy_ref.layernorm import layernorm_backward, layernorm_forward

    report = check_numpy_layer("layernorm", layernorm_forward, layernorm_backward, max_examples=5, derandomize=True)
    assert report.comparisons and all(c.max_abs == 0.0 for c in report.comparisons)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_spec_builds_valid_inputs_and_the_oracle_runs(name):
    spec = SPECS[name]
    inputs = spec.make_inputs(np.random.default_rng(0), Sizes())
    result = run_oracle(spec, inputs)
    assert set(result.grads) == set(spec.differentiable)
    for k in spec.differentiable:
        assert result.grads[k].shape == np.shape(inputs[k]), f"{name}: d{k} shape {result.grads[k].shape}"
    assert np.all(np.isfinite(result.out)), f"{name}: non-finite oracle output"
