"""Dropout with the same explicit masks gives the same logits, loss and gradients in both trees;
an all-ones mask is the same as no dropout."""

import numpy as np
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
