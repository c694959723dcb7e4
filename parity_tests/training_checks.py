"""`gpt-oracle check`'s training rows (checks.py runs them on the embedded `tiny`): both trees'
trainers from the same weights on the same batches, evaluation of a model with dropout, and the
dropout masks each trainer draws.
Rows, tolerances and the model builders are checks.py's."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from parity_tests.compare import compare
from parity_tests.tolerances import forward_tol, gradient_tol

if TYPE_CHECKING:
    from parity_tests.checks import Row


TRAINING_STEPS = 6
TRAINING_COMMON = dict(steps=TRAINING_STEPS, grad_accum=2, warmup_steps=2, eval_every=TRAINING_STEPS // 2,
                       eval_batches=2, progress=False)
# AdamW clips at a norm that some of its steps exceed and some do not (on `tiny`, seed 0: norms
# 0.61 to 0.86, a test holds the split): a clip that scaled every gradient to the threshold, or
# none, would pass a run where every step clips. SGD with momentum does not clip: unlike AdamW it
# sees the gradient's scale (an accumulated gradient left unscaled by 1/grad_accum moves it twice
# as far; AdamW only through eps). AdamW's eps is not the default 1e-8, so that an optimiser that
# drops the setting fails.
TRAINING_RUNS = {"AdamW": dict(optimizer="adamw", max_lr=1e-2, min_lr=1e-3, weight_decay=0.1, grad_clip=0.75,
                               eps=1e-5),
                 "SGD": dict(optimizer="sgd", momentum=0.9, max_lr=0.5, min_lr=0.05, weight_decay=0.1,
                             grad_clip=None)}

# The training loader's drop_last, one way for each run: 42 windows in batches of 4 leave a short
# batch that one run drops and the other trains on (a loader that ignored the setting either way
# passed when the windows filled whole batches).
TRAINING_DROP_LAST = {"AdamW": True, "SGD": False}


def training_rows(config_name: str, config_d: dict, seed: int = 0, device: str = "cpu") -> list[Row]:
    """Both trees' trainers (torch_impl's model on `device`, float64) from the same weights on the
    same batches (TRAINING_RUNS: AdamW and SGD), two micro-batches per step, warmup then cosine,
    evaluations of both sets at steps 3 and 6 on validation tokens of their own. The loss at every
    step, the evaluation losses and the weights at the end agree."""
    import torch

    from numpy_ref import data as ndata
    from numpy_ref.train import Trainer as NpTrainer
    from numpy_ref.train_run import TrainSettings as NpSettings
    from parity_tests import models
    from parity_tests.checks import DROP_RATE, guarded, perturbed_numpy_model, row_from
    from torch_impl import data as tdata
    from torch_impl.train import Trainer as TTrainer
    from torch_impl.train_run import TrainSettings as TSettings

    steps = TRAINING_STEPS

    def one(optimizer: str) -> list[Row]:
        label = f"train[{config_name}] {optimizer}"
        settings = {**TRAINING_COMMON, **TRAINING_RUNS[optimizer]}
        T = min(config_d["context_length"], 8)
        np_model = perturbed_numpy_model(config_d, seed)
        t_model = models.build_torch_model(config_d, np_model.params, dtype="float64", device=device).train()
        rng = np.random.default_rng(seed + 5)
        # 42 windows in batches of 4: 10 and a short one of 2, which the 12 micro-batches reach
        ids, val_ids = (rng.integers(0, config_d["vocab_size"], n * T + 1) for n in (42, 16))

        def loader(tree, tokens):
            return tree.DataLoader(tree.SlidingWindowDataset(tokens, T, T), 4, shuffle=True,
                                   drop_last=TRAINING_DROP_LAST[optimizer], seed=seed + 3)

        n_res = NpTrainer(np_model, loader(ndata, ids), loader(ndata, val_ids), NpSettings(**settings)).fit()
        t_ids, t_val = torch.from_numpy(ids), torch.from_numpy(val_ids)
        t_res = TTrainer(t_model, loader(tdata, t_ids), loader(tdata, t_val), TSettings(**settings)).fit()
        if not (n_res.ok and t_res.ok):
            raise RuntimeError(f"a training run stopped: numpy {n_res.message!r}, torch {t_res.message!r}")
        n_steps, t_steps = np.array(n_res.history["steps"]), np.array(t_res.history["steps"])
        if n_steps.shape != (steps, 3) or t_steps.shape != (steps, 3):
            raise AssertionError(f"{label}: logged steps numpy {n_steps.shape}, torch {t_steps.shape}; expected ({steps}, 3)")
        evals = np.array(n_res.history["evals"])  # (evaluations, 4): step, tokens, train loss, val loss
        if evals.shape != (2, 4) or np.any(evals[:, 2] == evals[:, 3]):
            raise AssertionError(f"{label}: expected 2 evaluations with different training and validation "
                                 f"losses (else a swap of the two sets passes), got {evals.tolist()}")
        tf, tg = forward_tol("float64"), gradient_tol("float64")
        weights = {k: models.to_numpy(v) for k, v in t_model.state_dict().items()}
        return [
            row_from(f"{label} loss at each of {steps} steps", "float64",
                     [compare(f"{label} step losses", t_steps[:, 2], n_steps[:, 2], tf)], tf),
            row_from(f"{label} evaluation losses", "float64",
                     [compare(f"{label} eval losses", np.array(t_res.history["evals"]),
                              np.array(n_res.history["evals"]), tf)], tf),
            row_from(f"{label} weights after {steps} steps ({len(weights)} tensors)", "float64",
                     [compare(f"{label} {k}", weights[k], v, tg) for k, v in np_model.params.items()], tg),
        ]

    def evaluation_with_dropout() -> list[Row]:
        """Each tree's `evaluate` on a model with dropout 0.25, the torch one left in training mode:
        evaluation must run without dropout (numpy_ref's model drops only through explicit masks)."""
        from numpy_ref.train import evaluate as np_evaluate
        from torch_impl.train import evaluate as t_evaluate

        label = f"train[{config_name}] evaluation of a model with dropout, in training mode"
        cfg = {**config_d, "drop_rate": DROP_RATE}
        T = min(config_d["context_length"], 8)
        np_model = perturbed_numpy_model(cfg, seed)
        t_model = models.build_torch_model(cfg, np_model.params, dtype="float64", device=device).train()
        tokens = np.random.default_rng(seed + 9).integers(0, config_d["vocab_size"], 8 * T + 1)
        batches = [(tokens[i * T:(i + 1) * T].reshape(1, T), tokens[i * T + 1:(i + 1) * T + 1].reshape(1, T))
                   for i in range(8)]
        expected = np_evaluate(np_model, batches)
        got = t_evaluate(t_model, [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in batches])
        if not t_model.training:
            raise AssertionError(f"{label}: torch_impl's evaluate left the model in eval mode")
        tf = forward_tol("float64")
        return [row_from(label, "float64", [compare(label, np.array(got), np.array(expected), tf)], tf)]

    rows = []
    for optimizer in TRAINING_RUNS:
        rows += guarded(f"train[{config_name}] {optimizer}", "float64", lambda optimizer=optimizer: one(optimizer))
    rows += guarded(f"train[{config_name}] evaluation with dropout", "float64", evaluation_with_dropout)
    rows += guarded(f"train[{config_name}] dropout masks", "float64",
                    lambda: [dropout_mask_row(config_name, config_d, seed, device)])
    return rows


MASK_SHARE_ATOL = 0.02  # |dropped share - p|: 8.9 binomial standard deviations on `tiny` at 8 x 16 (36864 entries)


def dropout_mask_row(config_name: str, config_d: dict, seed: int = 0, device: str = "cpu") -> Row:
    """The masks each trainer draws at p = DROP_RATE (the trees draw from their own generators,
    so not the same masks): the same sites and shapes in both, every entry 0 or 1/(1-p) (inverted
    dropout: the expected activation unchanged), and a share within MASK_SHARE_ATOL of p dropped.
    The training rows above run without dropout, so a trainer's mask drawn wrongly passed them."""
    import torch

    from parity_tests import models
    from parity_tests.checks import DROP_RATE, Row, perturbed_numpy_model
    from torch_impl.train import dropout_masks as t_dropout_masks

    p = DROP_RATE
    cfg = {**config_d, "drop_rate": p}
    B, T = 8, min(config_d["context_length"], 16)
    np_model = perturbed_numpy_model(cfg, seed)
    t_model = models.build_torch_model(cfg, np_model.params, dtype="float64", device=device)
    drawn = {"numpy": np_model.dropout_masks(B, T, np.random.default_rng(seed)),
             "torch": {k: v.cpu().numpy() for k, v in t_dropout_masks(
                 t_model, B, T, torch.Generator(device=t_model.device).manual_seed(seed)).items()}}
    problems = []
    if {k: v.shape for k, v in drawn["numpy"].items()} != {k: v.shape for k, v in drawn["torch"].items()}:
        problems.append("sites or shapes differ: numpy " + str({k: v.shape for k, v in drawn["numpy"].items()})
                        + ", torch " + str({k: v.shape for k, v in drawn["torch"].items()}))
    worst_share = 0.0
    for tree, masks in drawn.items():
        if not masks:
            problems.append(f"{tree} drew no masks at p = {p}")
            continue
        values = np.concatenate([m.ravel() for m in masks.values()])
        odd = np.setdiff1d(np.unique(values), [0.0, 1.0 / (1.0 - p)])
        if odd.size:
            problems.append(f"{tree}: values {odd[:4].tolist()} besides 0 and 1/(1-p) = {1 / (1 - p):g}")
        share = float(np.mean(values == 0.0))
        worst_share = max(worst_share, abs(share - p))
        if abs(share - p) > MASK_SHARE_ATOL:
            problems.append(f"{tree}: {share:.3f} of {values.size} entries dropped at p = {p}")
    return Row(f"train[{config_name}] dropout masks as each trainer draws them", "float64", worst_share, None,
               f"values 0 or 1/(1-p); dropped share within {MASK_SHARE_ATOL} of p",
               "MISMATCH" if problems else "ok", "; ".join(problems))
