"""`gpt-oracle check`'s derivation rows (checks.py runs them for every configuration): numpy_ref's
hand-derived backward (model.py, each layer's backward written out) against numpy_ref's own
autograd engine over the same model written with primitive operations only (autograd_layers.py
COMPOSED: matmul, mean, sqrt, exp, where, ...; every gradient derived by the engine from the
primitives' VJPs). Two derivations of the same float64 gradients inside the oracle, so that the
oracle is not only held against torch_impl, which a mistake shared by both trees would pass.
Rows, tolerances and the model builders are checks.py's."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from parity_tests.compare import compare
from parity_tests.tolerances import forward_tol, gradient_tol

if TYPE_CHECKING:
    from parity_tests.checks import Row


def derivation_rows(config_name: str, config_d: dict, seed: int = 0, B: int = 2, T: int | None = None) -> list[Row]:
    """Logits, loss and every gradient of the oracle model (perturbed biases and layer norms),
    hand-derived against the engine over COMPOSED layers, with a third of the targets ignored and
    dropout masks at every site: the paths of model_rows' three variants at once."""
    from numpy_ref.autograd_layers import COMPOSED, autograd_loss_and_grads
    from numpy_ref.config import GPTConfig
    from parity_tests import models
    from parity_tests.checks import (IGNORED, guarded, oracle_dropout_masks, perturbed_numpy_model, row_from,
                                     with_ignored_targets)

    label = f"oracle[{config_name}] hand-derived vs autograd over primitives"

    def run() -> list[Row]:
        T_ = T or min(config_d["context_length"], 8)
        np_model = perturbed_numpy_model(config_d, seed)
        ids, targets = models.random_batch(config_d, B, T_, seed + 3)
        targets = with_ignored_targets(targets, seed)
        masks = oracle_dropout_masks(config_d, B, T_, seed)
        ref = models.run_numpy(np_model, ids, targets, ignore_index=IGNORED, dropout_masks=masks)
        logits, loss, grads = autograd_loss_and_grads(COMPOSED, np_model.params, ids, targets, GPTConfig(**config_d),
                                                      dropout_masks=masks, ignore_index=IGNORED)
        tf, tg = forward_tol("float64"), gradient_tol("float64")
        order = list(np_model.params)
        return [
            row_from(f"{label}: logits", "float64", [compare(f"{label} logits", logits, ref.logits, tf)], tf),
            row_from(f"{label}: loss", "float64",
                     [compare(f"{label} loss", np.array(loss), np.array(ref.loss), tf)], tf),
            row_from(f"{label}: grads ({len(order)} tensors)", "float64",
                     [compare(f"{label} d{k}", grads[k], ref.grads[k], tg) for k in order], tg),
        ]

    return guarded(label, "float64", run)
