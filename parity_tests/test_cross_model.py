"""The whole model, both trees: logits, loss and every parameter gradient against the float64
oracle, on hypothesis-drawn configurations (tied and untied head, with and without qkv bias),
plus metamorphic properties that hold in both trees."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parity_tests import models
from parity_tests.compare import assert_close, assert_dicts_close
from parity_tests.strategies import config_dicts, seeds
from parity_tests.tolerances import forward_tol, gradient_tol


@st.composite
def model_case(draw):
    cfg = draw(config_dicts(max_layers=2, max_heads=3, max_head_size=6, max_context=10, max_vocab=40))
    seed = draw(seeds())
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, cfg["context_length"]))  # T = 1 and T = context length are both reachable
    return cfg, seed, B, T


def _params(cfg, seed):
    return models.scale_params(models.build_numpy_model(cfg, seed=seed % 1000).params, seed)


# Vocabulary rows per slice of torch_impl's CPU output head: 1 .. 40 slice every drawn vocabulary
# (max_vocab=40) at least once, mostly unevenly; 41 is the one-GEMM path. With a tied head the
# sliced path also hands its gradient to the embedding's backward (embedding.TiedHeadGrad).
head_rows = st.integers(1, 41)


def _check_model(cfg, seed, B, T, dtype, rows):
    params = _params(cfg, seed)
    np_model = models.build_numpy_model(cfg, params=params)
    ids, targets = models.random_batch(cfg, B, T, seed)
    ref = models.run_numpy(np_model, ids, targets)
    with models.head_slices(rows):
        got = models.run_torch(models.build_torch_model(cfg, params, dtype=dtype), ids, targets, dtype=dtype)
    assert_close(f"logits ({cfg}, head slices of {rows} rows)", got.logits, ref.logits, forward_tol(dtype))
    assert_close("loss", np.array(got.loss), np.array(ref.loss), forward_tol(dtype))
    assert_dicts_close("grads", got.grads, ref.grads, gradient_tol(dtype), order=list(params))


@given(case=model_case(), rows=head_rows)
def test_model_float64_matches_oracle_tightly(case, rows):
    _check_model(*case, "float64", rows)


@given(case=model_case(), rows=head_rows)
def test_model_float32_matches_oracle(case, rows):
    _check_model(*case, "float32", rows)


@settings(max_examples=4)
@given(case=model_case())
def test_model_bf16_autocast_within_budget(case):
    cfg, seed, B, T = case
    params = _params(cfg, seed)
    ids, targets = models.random_batch(cfg, B, T, seed)
    ref = models.run_numpy(models.build_numpy_model(cfg, params=params), ids, targets)
    got = models.run_torch(models.build_torch_model(cfg, params, dtype="bfloat16"), ids, targets, dtype="bfloat16")
    assert_close("logits", got.logits, ref.logits, forward_tol("bfloat16"))
    assert_close("loss", np.array(got.loss), np.array(ref.loss), forward_tol("bfloat16"))


# ---- metamorphic properties, both trees ------------------------------------------------------


def _both_logits(cfg, params, ids):
    np_model = models.build_numpy_model(cfg, params=params)
    t_model = models.build_torch_model(cfg, params, dtype="float64")
    with torch.no_grad():
        t = models.to_numpy(t_model(torch.from_numpy(ids)))
    return {"numpy_ref": np.asarray(np_model(ids)), "torch_impl": t}


@given(case=model_case(), data=st.data())
def test_causality(case, data):
    cfg, seed, B, T = case
    params = _params(cfg, seed)
    ids, _ = models.random_batch(cfg, B, T, seed)
    t = data.draw(st.integers(0, T - 1), label="t")
    changed = ids.copy()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1) % cfg["vocab_size"]
    before, after = _both_logits(cfg, params, ids), _both_logits(cfg, params, changed)
    for tree in before:
        assert_close(f"{tree} logits[:, :{t + 1}] after changing tokens past {t}", after[tree][:, :t + 1],
                     before[tree][:, :t + 1], forward_tol("float64"))


@given(case=model_case(), data=st.data())
def test_batch_independence_and_permutation(case, data):
    cfg, seed, B, T = case
    params = _params(cfg, seed)
    ids, _ = models.random_batch(cfg, B, T, seed)
    perm = np.array(data.draw(st.permutations(range(B)), label="perm"))
    whole, permuted = _both_logits(cfg, params, ids), _both_logits(cfg, params, ids[perm])
    for tree in whole:
        assert_close(f"{tree} logits of a permuted batch", permuted[tree], whole[tree][perm], forward_tol("float64"))
        alone = _both_logits(cfg, params, ids[-1:])[tree]
        assert_close(f"{tree} last row alone vs in its batch", alone, whole[tree][-1:], forward_tol("float64"))


@settings(max_examples=6)
@given(case=model_case(), rows=head_rows)
def test_gradient_accumulated_over_microbatches_equals_one_batch(case, rows):
    cfg, seed, _, T = case
    params = _params(cfg, seed)
    ids, targets = models.random_batch(cfg, 4, T, seed)
    np_model = models.build_numpy_model(cfg, params=params)
    t_model = models.build_torch_model(cfg, params, dtype="float64")
    for tree, run in (("numpy_ref", lambda i, t: models.run_numpy(np_model, i, t)),
                      ("torch_impl", lambda i, t: models.run_torch(t_model, i, t))):
        with models.head_slices(rows):
            full = run(ids, targets).grads
            halves = [run(ids[s], targets[s]).grads for s in (slice(0, 2), slice(2, 4))]
        # Equal-sized micro-batches with a mean loss: the full-batch gradient is their mean.
        accumulated = {k: 0.5 * (halves[0][k] + halves[1][k]) for k in full}
        assert_dicts_close(f"{tree} accumulated grads", accumulated, full, gradient_tol("float64"))
