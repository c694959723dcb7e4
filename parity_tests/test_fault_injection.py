"""Deliberately broken implementations must be caught, and the failure must name the right place.

Each fault is one a real kernel or port gets wrong: an unbiased variance in layer norm (torch's
`x.var()` default), a missing causal mask, a transposed weight, a wrong sign in a gradient.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from parity_tests.faults import gelu_with_scaled_backward
from parity_tests.oracle import check_layer, check_numpy_layer

FAST = dict(max_examples=20, derandomize=True)


def _layernorm_unbiased(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True)  # unbiased (divides by C-1): not what GPT-2 computes
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _attention(x, w_attn, b_attn, w_proj, b_proj, n_heads, causal=True, transpose_proj=False):
    B, T, C = x.shape
    q, k, v = (x @ w_attn + b_attn).split(C, dim=-1)
    q, k, v = (t.view(B, T, n_heads, C // n_heads).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    y = y.transpose(1, 2).reshape(B, T, C)
    return y @ (w_proj.T if transpose_proj else w_proj) + b_proj


def test_correct_reference_implementations_pass():
    # The fault tests below only mean something if the same code without the fault passes.
    check_layer("attention", _attention, dtype="float64", **FAST)
    check_layer("gelu", lambda x: F.gelu(x, approximate="tanh"), dtype="float64", **FAST)


def test_unbiased_variance_is_caught_in_the_layernorm_output():
    with pytest.raises(AssertionError, match=r"layernorm out"):
        check_layer("layernorm", _layernorm_unbiased, dtype="float32", **FAST)


def test_missing_causal_mask_is_caught_in_the_attention_output():
    with pytest.raises(AssertionError, match=r"attention out"):
        check_layer("attention", lambda **kw: _attention(**kw, causal=False), dtype="float64", **FAST)


def test_transposed_weight_is_caught():
    with pytest.raises(AssertionError, match=r"attention out"):
        check_layer("attention", lambda **kw: _attention(**kw, transpose_proj=True), dtype="float64", **FAST)


def test_wrong_sign_in_a_gradient_is_caught_in_that_gradient_only():
    # The forward is right, so the first mismatch reported is the gradient's.
    with pytest.raises(AssertionError, match=r"MISMATCH: \[sizes=.*\] gelu dx "):
        check_layer("gelu", gelu_with_scaled_backward(-1.0), dtype="float64", **FAST)


def test_wrong_sign_in_a_numpy_backward_is_caught():
    from numpy_ref.layernorm import layernorm_backward, layernorm_forward

    def broken_backward(dout, cache):
        dx, dw, db = layernorm_backward(dout, cache)
        return dx, -dw, db

    with pytest.raises(AssertionError, match=r"layernorm dw"):
        check_numpy_layer("layernorm", layernorm_forward, broken_backward, **FAST)


def test_model_level_transposed_weight_fails_check_and_names_the_tensor():
    from parity_tests import checks, models

    cfg = dict(checks.DEFAULT_CONFIGS["tiny"])
    np_model = models.build_numpy_model(cfg, seed=0)
    params = dict(np_model.params)
    ids, targets = models.random_batch(cfg, 2, 6, 0)
    ref = models.run_numpy(np_model, ids, targets)
    broken = dict(params)
    broken["h.1.attn.c_proj.weight"] = params["h.1.attn.c_proj.weight"].T.copy()
    t_model = models.build_torch_model(cfg, broken, dtype="float64")
    got = models.run_torch(t_model, ids, targets)
    from parity_tests.compare import assert_dicts_close, compare
    from parity_tests.tolerances import forward_tol, gradient_tol

    assert not compare("logits", got.logits, ref.logits, forward_tol("float64")).ok
    with pytest.raises(AssertionError, match=r"first divergence: MISMATCH: grads\[h\.1\."):
        # blocks before the fault get gradients that already flow through it, so the first
        # divergence in model order can be earlier; it must not be the embedding rows alone
        assert_dicts_close("grads", {k: v for k, v in got.grads.items() if k.startswith("h.1.")},
                           {k: v for k, v in ref.grads.items() if k.startswith("h.1.")}, gradient_tol("float64"))
    assert math.isfinite(got.loss)
