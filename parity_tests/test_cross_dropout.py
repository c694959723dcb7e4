"""Dropout with the same explicit masks gives the same logits, loss and gradients in both trees;
an all-ones mask is the same as no dropout."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parity_tests import models
from parity_tests.compare import assert_close, assert_dicts_close, to_numpy
from parity_tests.strategies import config_dicts, seeds
from parity_tests.tolerances import forward_tol, gradient_tol


def _torch_run(t_model, ids, targets, masks):
    t_model.train()
    t_model.zero_grad(set_to_none=True)
    t_masks = {k: torch.from_numpy(v) for k, v in masks.items()}
    logits, loss = t_model(torch.from_numpy(ids), torch.from_numpy(targets), dropout_masks=t_masks)
    loss.backward()
    grads = {k: to_numpy(p.grad) for k, p in t_model.named_parameters()}
    return to_numpy(logits), float(loss.detach()), grads


@settings(max_examples=8)
@given(cfg=config_dicts(max_layers=2, max_heads=3, max_head_size=4, max_context=8, max_vocab=30, dropout=True),
       seed=seeds(), B=st.integers(1, 3), data=st.data())
def test_same_masks_same_results_in_both_trees(cfg, seed, B, data):
    cfg = dict(cfg, drop_rate=max(cfg["drop_rate"], 0.1))
    T = data.draw(st.integers(1, cfg["context_length"]), label="T")
    np_model = models.build_numpy_model(cfg, seed=seed % 1000)
    masks = np_model.dropout_masks(B, T, np.random.default_rng(seed))
    assert masks and all(set(np.unique(m)) <= {0.0, 1.0 / (1.0 - cfg["drop_rate"])} for m in masks.values())
    ids, targets = models.random_batch(cfg, B, T, seed)
    logits, loss, cache = np_model.forward(ids, targets, dropout_masks=masks)
    grads = np_model.backward(cache)
    t_logits, t_loss, t_grads = _torch_run(models.build_torch_model(cfg, np_model.params), ids, targets, masks)
    assert_close("logits with dropout masks", t_logits, logits, forward_tol("float64"))
    assert_close("loss with dropout masks", np.array(t_loss), np.array(loss), forward_tol("float64"))
    assert_dicts_close("grads with dropout masks", t_grads, grads, gradient_tol("float64"), order=list(np_model.params))


@settings(max_examples=5)
@given(cfg=config_dicts(max_layers=2, max_context=6, max_vocab=20, dropout=True), seed=seeds())
def test_all_ones_masks_equal_no_dropout(cfg, seed):
    cfg = dict(cfg, drop_rate=max(cfg["drop_rate"], 0.1))
    np_model = models.build_numpy_model(cfg, seed=seed % 1000)
    B, T = 2, cfg["context_length"]
    ones = {k: np.ones_like(v) for k, v in np_model.dropout_masks(B, T, np.random.default_rng(0)).items()}
    ids, targets = models.random_batch(cfg, B, T, seed)
    plain, _, _ = np_model.forward(ids, targets)
    masked, _, _ = np_model.forward(ids, targets, dropout_masks=ones)
    assert_close("numpy: all-ones masks vs none", masked, plain, forward_tol("float64"))
    t_model = models.build_torch_model(cfg, np_model.params)
    t_masked, _, _ = _torch_run(t_model, ids, targets, ones)
    assert_close("torch: all-ones masks vs oracle without dropout", t_masked, plain, forward_tol("float64"))


def test_bad_masks_raise_the_same_exception_in_both_trees():
    """docs/design.md: an input with two faults raises the same exception in both trees. 1-D float
    ids with a mask were a ValueError ("must be 2-D") in numpy_ref and a TypeError in torch_impl; a
    non-string key a TypeError and a ValueError; a None mask a ValueError and an AttributeError."""
    from numpy_ref.config import GPTConfig as NumpyConfig
    from numpy_ref.model import GPTModel as NumpyModel
    from torch_impl.config import GPTConfig as TorchConfig
    from torch_impl.model import GPTModel as TorchModel

    cfg = dict(vocab_size=11, context_length=4, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.1, qkv_bias=True,
               tie_embeddings=True, ln_eps=1e-5)
    n_model, t_model = NumpyModel(NumpyConfig(**cfg), seed=0), TorchModel(TorchConfig(**cfg), seed=0)
    ids = np.array([[1, 2]])
    ones = np.ones((1, 2, 8))
    cases = [  # (ids, masks, exception type, message)
        (np.array([1.0, 2.0]), {"embedding": ones}, TypeError, "integer dtype"),
        (ids, {0: ones}, TypeError, "dropout mask keys are strings, got 0"),
        (ids, {"embedding": None}, ValueError, r"dropout mask 'embedding' has shape \(\); expected \(1, 2, 8\)"),
        (ids, {"h.0.bogus": ones}, ValueError, "unknown dropout mask 'h.0.bogus'"),
        (ids, {"embedding": np.ones((1, 3, 8))}, ValueError, "dropout mask 'embedding' has shape"),
    ]
    for bad_ids, masks, error, match in cases:
        with pytest.raises(error, match=match):
            n_model.forward(bad_ids, dropout_masks=masks)
        t_masks = {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in masks.items()}
        with pytest.raises(error, match=match):
            t_model(torch.from_numpy(bad_ids), dropout_masks=t_masks)
