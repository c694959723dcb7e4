"""Training in both trees: parity in float64, kill-and-resume, non-finite stops, the commands.

- both trainers, from the same weights on the same batches (float64, gradient accumulation,
  clipping, warmup + cosine), report the same loss at every step and end at the same weights;
- gradient accumulation over two micro-batches is one step on their union;
- a run killed after a checkpoint and resumed ends bit for bit where an uninterrupted run ends
  (each tree, CPU, with dropout and across epoch boundaries);
- a non-finite loss stops training with a message naming the step, writes nothing, and the
  last checkpoint stays loadable and unchanged;
- evaluation sees the loaders' first batches, a short last one included, and logs the mean over
  every target; the batch stream refuses a used loader and a position its loader does not have;
- `gpt-oracle train` / `generate` / `train --resume` on a tiny config in a temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from numpy_ref import data as ndata
from numpy_ref.config import get_config as np_config
from numpy_ref.model import GPTModel as NumpyGPT
from numpy_ref import train_run as nrun
from numpy_ref.train import Trainer as NumpyTrainer
from numpy_ref.train import evaluate as numpy_evaluate
from numpy_ref.train_log import TextProgress
from numpy_ref.train_run import TrainSettings as NumpySettings
from parity_tests.compare import assert_close, assert_dicts_close, load_numpy_params_into_torch, to_numpy
from parity_tests.tolerances import forward_tol, gradient_tol
from torch_impl import data as tdata
from torch_impl.config import get_config as torch_config
from torch_impl.model import GPTModel as TorchGPT
from torch_impl import train_run as trun
from torch_impl.train import Trainer as TorchTrainer
from torch_impl.train import evaluate as torch_evaluate
from torch_impl.train_run import TrainSettings as TorchSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.py


IDS = np.random.default_rng(7).integers(0, 101, 300)  # 37 windows of 8: 9 batches of 4 per epoch


def _loader(tree: str, batch_size: int = 4, shuffle: bool = True):
    if tree == "numpy":
        return ndata.DataLoader(ndata.SlidingWindowDataset(IDS, 8, 8), batch_size, shuffle=shuffle,
                                drop_last=True, seed=3)
    return tdata.DataLoader(tdata.SlidingWindowDataset(torch.tensor(IDS), 8, 8), batch_size, shuffle=shuffle,
                            drop_last=True, seed=3)


def _model(tree: str, drop_rate: float = 0.0, seed: int = 0, dtype=None):
    if tree == "numpy":
        return NumpyGPT(np_config("tiny", context_length=8, drop_rate=drop_rate), seed=seed)
    return TorchGPT(torch_config("tiny", context_length=8, drop_rate=drop_rate), seed=seed,
                    dtype=dtype or torch.float32)


def _trainer(tree: str, model, settings: dict, **kwargs):
    cls, settings_cls = (NumpyTrainer, NumpySettings) if tree == "numpy" else (TorchTrainer, TorchSettings)
    return cls(model, _loader(tree), _loader(tree), settings_cls(**settings), **kwargs)


def _weights(tree: str, model) -> dict[str, np.ndarray]:
    if tree == "numpy":
        return {k: v.copy() for k, v in model.params.items()}
    return {k: to_numpy(v).copy() for k, v in model.state_dict().items()}


BASE = dict(steps=14, grad_accum=2, warmup_steps=3, max_lr=1e-2, min_lr=1e-3, grad_clip=0.5, eval_every=7,
            eval_batches=2, progress=False)


def test_both_trainers_agree_step_by_step_in_float64():
    n_model = _model("numpy", seed=1)
    t_model = _model("torch", seed=2, dtype=torch.float64)
    load_numpy_params_into_torch(t_model, n_model.params)
    n_result = _trainer("numpy", n_model, BASE).fit()
    t_result = _trainer("torch", t_model, BASE).fit()
    assert n_result.ok and t_result.ok, (n_result.message, t_result.message)
    n_steps, t_steps = np.array(n_result.history["steps"]), np.array(t_result.history["steps"])
    assert n_steps.shape == (14, 3), f"expected 14 logged steps, got {n_steps.shape}"
    assert np.array_equal(n_steps[:, :2], t_steps[:, :2]), "step numbers / tokens seen differ between the trees"
    assert n_steps[-1, 1] == 14 * 2 * 4 * 8, f"tokens seen {n_steps[-1, 1]} != steps * accum * B * T"
    assert_close("training loss per step (torch vs numpy)", t_steps[:, 2], n_steps[:, 2], forward_tol("float64"))
    assert_close("eval losses (torch vs numpy)", np.array(t_result.history["evals"]),
                 np.array(n_result.history["evals"]), forward_tol("float64"))
    assert n_steps[-1, 2] < n_steps[0, 2], f"the loss did not go down: {n_steps[:, 2]}"
    assert_dicts_close("weights after 14 steps", _weights("torch", t_model), n_model.params, gradient_tol("float64"))


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_gradient_accumulation_equals_one_step_on_the_union(tree):
    settings = dict(steps=1, optimizer="sgd", max_lr=0.1, min_lr=0.1, grad_clip=None, progress=False)
    results = []
    for B, accum in ((4, 1), (2, 2)):
        model = _model(tree, seed=3, dtype=torch.float64)
        cls, settings_cls = (NumpyTrainer, NumpySettings) if tree == "numpy" else (TorchTrainer, TorchSettings)
        cls(model, _loader(tree, B, shuffle=False), None, settings_cls(**settings, grad_accum=accum)).fit()
        results.append(_weights(tree, model))
    assert_dicts_close(f"{tree}: 2 micro-batches of 2 vs one batch of 4", results[1], results[0],
                       gradient_tol("float64"))


class _Kill(Exception):
    pass


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_kill_and_resume_ends_bit_for_bit_where_an_uninterrupted_run_ends(tree, tmp_path):
    """Checkpoints every 4 steps; the run dies at step 10 (after the step-8 checkpoint, with two
    steps lost) and resumes from step 8 into a model with other weights; 20 steps cross two
    epoch boundaries; dropout 0.1 makes the generator state matter."""
    settings = dict(steps=20, warmup_steps=3, max_lr=1e-2, min_lr=1e-3, grad_clip=0.5, eval_every=5,
                    eval_batches=2, checkpoint_every=4, progress=False)
    full_model = _model(tree, drop_rate=0.1)
    full = _trainer(tree, full_model, settings, out_dir=tmp_path / "full").fit()

    def die_at_10(trainer):
        if trainer.step == 10:
            raise _Kill

    with pytest.raises(_Kill):
        _trainer(tree, _model(tree, drop_rate=0.1), settings, out_dir=tmp_path / "killed", on_step=die_at_10).fit()
    latest = (tmp_path / "killed" / "latest").read_text().strip()
    assert latest == "step-00000008", f"the newest checkpoint should be step 8, got {latest}"
    cls = NumpyTrainer if tree == "numpy" else TorchTrainer
    resumed = cls.resume(tmp_path / "killed", _model(tree, drop_rate=0.1, seed=99), _loader(tree), _loader(tree))
    assert (resumed.step, resumed.stream.epoch, resumed.stream.index) == (8, 0, 8), "resumed at the wrong position"
    result = resumed.fit()
    assert full.ok and result.ok
    assert result.history["steps"] == full.history["steps"], "per-step losses differ after resuming"
    a, b = _weights(tree, full_model), _weights(tree, resumed.model)
    for k in a:
        assert np.array_equal(a[k], b[k]), f"{tree}: {k} differs after resume (max abs " \
                                           f"{np.abs(a[k] - b[k]).max():.3e}); expected bit-for-bit equality"


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_a_finished_run_resumed_and_killed_while_saving_keeps_latest_whole(tree, tmp_path, monkeypatch):
    """fit() saves at its end; a resumed finished run saves the same step again. Killed in the
    middle of that save, `latest` must still name a complete checkpoint that resumes."""
    ckpt_mod = __import__(f"{'numpy_ref' if tree == 'numpy' else 'torch_impl'}.checkpoint", fromlist=["x"])
    cls = NumpyTrainer if tree == "numpy" else TorchTrainer
    settings = dict(steps=4, checkpoint_every=2, progress=False)
    assert _trainer(tree, _model(tree), settings, out_dir=tmp_path).fit().ok
    assert (tmp_path / "latest").read_text().strip() == "step-00000004"
    before = _weights(tree, cls.resume(tmp_path, _model(tree, seed=5), _loader(tree), _loader(tree)).model)

    real = ckpt_mod.save_trainer_state

    def killed(*args, **kwargs):
        raise _Kill

    monkeypatch.setattr(ckpt_mod, "save_trainer_state", killed)
    with pytest.raises(_Kill):
        cls.resume(tmp_path, _model(tree, seed=5), _loader(tree), _loader(tree)).fit()
    monkeypatch.setattr(ckpt_mod, "save_trainer_state", real)
    latest = (tmp_path / "latest").read_text().strip()
    assert latest == "step-00000004", f"a killed save must not switch 'latest'; it names {latest}"
    again = cls.resume(tmp_path, _model(tree, seed=5), _loader(tree), _loader(tree))
    assert again.step == 4, f"resumed at step {again.step}, expected 4"
    after = _weights(tree, again.model)
    for k in before:
        assert np.array_equal(before[k], after[k]), f"{tree}: {k} of the checkpoint changed after a killed save"

    assert again.fit().ok  # this time the save completes: into a sibling, then 'latest' switches
    latest = (tmp_path / "latest").read_text().strip()
    assert latest == "step-00000004-1", f"the re-save should go to step-00000004-1, 'latest' names {latest}"
    final = _weights(tree, cls.resume(tmp_path, _model(tree, seed=5), _loader(tree), _loader(tree)).model)
    for k in before:
        assert np.array_equal(before[k], final[k]), f"{tree}: {k} differs in the re-saved checkpoint"


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tree, tmp_path):
    saved = {}

    def poison_after_4(trainer):
        if trainer.step == 4:
            saved.update(_weights(tree, trainer.model))
            if tree == "numpy":
                trainer.model.params["ln_f.weight"][:] = np.nan
            else:
                with torch.no_grad():
                    trainer.model.ln_f.weight.fill_(float("nan"))

    settings = dict(steps=10, checkpoint_every=2, progress=False)
    result = _trainer(tree, _model(tree), settings, out_dir=tmp_path, on_step=poison_after_4).fit()
    assert not result.ok, "a NaN loss must stop training"
    assert "non-finite loss nan at step 5" in result.message, result.message
    assert "step-00000004" in result.message, f"the message should name the last good checkpoint: {result.message}"
    assert result.step == 4, f"no optimiser step may run on a NaN loss; stopped at {result.step}"
    assert (tmp_path / "latest").read_text().strip() == "step-00000004"
    assert not (tmp_path / "step-00000005").exists()
    if tree == "numpy":
        from numpy_ref.checkpoint import load_checkpoint
        _, params = load_checkpoint(tmp_path / "step-00000004")
    else:
        from torch_impl.checkpoint import load_checkpoint
        _, params = load_checkpoint(tmp_path / "step-00000004", dtype=torch.float64)
    # model.safetensors is float32: the checkpointed weights are the step-4 weights, rounded.
    assert_dicts_close("checkpoint after the NaN stop", {k: to_numpy(v) for k, v in params.items()},
                       {k: v.astype(np.float32) for k, v in saved.items()}, forward_tol("float32"))


@pytest.mark.parametrize("tree", ["numpy", "torch"])
@pytest.mark.parametrize("where", ["evaluation", "checkpoint", "final save"])
def test_weights_a_step_left_non_finite_stop_the_run_with_its_message(tree, where, tmp_path):
    """A step whose loss and gradient norm were finite can leave weights that overflow: the
    evaluation's sample raised "logits contain NaN" and the checkpoint writer a CheckpointError,
    each a traceback out of fit(). Now each stops the run as a non-finite loss does."""
    def poison(trainer):  # past float32's range where a checkpoint writes it; NaN in an evaluation
        value = float("nan") if where == "evaluation" else (1e39 if tree == "numpy" else float("inf"))
        if tree == "numpy":
            trainer.model.params["ln_f.weight"][0] = value
        else:
            with torch.no_grad():
                trainer.model.ln_f.weight[0] = value

    steps = 2 if where == "final save" else 4
    settings = dict(steps=steps, progress=False, checkpoint_every=1 if where == "checkpoint" else 0,
                    eval_every=1 if where == "evaluation" else 0)
    trainer = _trainer(tree, _model(tree), settings, out_dir=tmp_path)
    real_step = trainer.train_step

    def step_then_poison():  # step 2's loss and gradient are finite; the weights it leaves are not
        loss = real_step()
        if trainer.step == 2:
            poison(trainer)
        return loss

    trainer.train_step = step_then_poison
    result = trainer.fit()
    assert not result.ok, f"{tree}, {where}: the run went on: {result.message}"
    want = "non-finite training evaluation loss nan after step 2" if where == "evaluation" else \
        "weights not finite in float32 after step 2 (ln_f.weight"
    assert want in result.message, f"{tree}, {where}: {result.message}"
    assert not (tmp_path / "step-00000002").exists(), "a checkpoint of the bad weights was written"


def test_train_and_generate_commands_smoke(tmp_path, capsys):
    from gpt_oracle.cli import main

    out = tmp_path / "run"
    common = ["--config", "tiny", "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1",
              "--checkpoint-every", "2", "--sample-tokens", "3", "--no-progress"]
    assert main(["train", "--backend", "torch", "--steps", "4", "--out", str(out), *common]) == 0
    printed = capsys.readouterr().out
    assert "done: 4 steps" in printed, printed
    for name in ("run.json", "log.jsonl", "loss.png", "latest", "step-00000004/model.safetensors",
                 "step-00000002/trainer_state.json"):
        assert (out / name).exists(), f"train did not write {name}"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "train_loss" in r] == [2, 4], log
    assert all(isinstance(r["sample"], str) and r["sample"].startswith("Every effort moves you") for r in log
               if "sample" in r), log

    # A run "killed" after step 2: resuming it must end on the uninterrupted run's weights.
    killed = tmp_path / "killed"
    shutil.copytree(out, killed)
    shutil.rmtree(killed / "step-00000004")
    (killed / "latest").write_text("step-00000002\n")
    assert main(["train", "--resume", str(killed)]) == 0
    capsys.readouterr()
    from torch_impl.checkpoint import load_checkpoint

    _, a = load_checkpoint(out / "step-00000004")
    _, b = load_checkpoint(killed / "step-00000004")
    for k in a:
        assert torch.equal(a[k], b[k]), f"CLI resume: {k} differs from the uninterrupted run"

    texts = {}
    for backend in ("torch", "numpy"):
        assert main(["generate", "--checkpoint", str(out), "--prompt", "Every effort", "--backend", backend,
                     "--max-new-tokens", "5", "--temperature", "0.8", "--top-k", "50", "--seed", "1"]) == 0
        texts[backend] = capsys.readouterr().out.strip()
        assert texts[backend].startswith("Every effort") and len(texts[backend]) > len("Every effort"), texts
    assert texts["torch"] == texts["numpy"], f"same checkpoint and seed, different text: {texts}"
    assert main(["generate", "--checkpoint", str(out), "--prompt", "x", "--top-p", "1.5", "--temperature", "1"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_numpy_train_command_runs(tmp_path, capsys):
    from gpt_oracle.cli import main

    assert main(["train", "--backend", "numpy", "--config", "tiny", "--steps", "2", "--batch-size", "1",
                 "--eval-every", "0", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    state = json.loads((tmp_path / "step-00000002" / "trainer_state.json").read_text())
    assert state["backend"] == "numpy" and state["step"] == 2 and state["settings"]["steps"] == 2, state


def test_settings_validation_names_the_field():
    for cls in (NumpySettings, TorchSettings):
        with pytest.raises(ValueError, match="warmup_steps=5 exceeds steps=3"):
            cls(steps=3, warmup_steps=5)
        with pytest.raises(ValueError, match="grad_accum must be >= 1, got 0"):
            cls(grad_accum=0)
        with pytest.raises(ValueError, match="unknown TrainSettings key"):
            cls.from_dict({"steps": 3, "lr": 1.0})
        assert cls.from_dict(cls(steps=7, betas=(0.8, 0.9)).to_dict()) == cls(steps=7, betas=(0.8, 0.9))


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_an_infinite_gradient_stops_the_run_without_clipping_too(tree, tmp_path, monkeypatch):
    """grad_clip=None: the gradient norm is still checked, so an inf gradient with a finite loss
    stops the run before the optimiser touches the weights."""
    model = _model(tree)
    before = _weights(tree, model)
    if tree == "numpy":
        real = model.backward

        def poisoned(cache, dloss=1.0):
            grads = real(cache, dloss)
            grads["ln_f.weight"][0] = np.inf
            return grads

        monkeypatch.setattr(model, "backward", poisoned)
    else:
        model.ln_f.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    result = _trainer(tree, model, dict(steps=3, grad_clip=None, progress=False), out_dir=tmp_path).fit()
    assert not result.ok and "non-finite gradient norm inf at step 1" in result.message, result.message
    after = _weights(tree, model)
    for k in before:
        assert np.array_equal(before[k], after[k]), f"{tree}: {k} changed although the gradient was inf"


@pytest.mark.parametrize("bad,error,match", [
    (dict(max_lr=1e-5), ValueError, "min_lr=4e-05 exceeds max_lr=1e-05"),
    (dict(max_lr=float("nan")), ValueError, "max_lr must be a finite number"),
    (dict(steps=2.5), TypeError, "steps must be an int"),
    (dict(eval_batches=1.5), TypeError, "eval_batches must be an int"),
    (dict(betas=(0.9, 1.0)), ValueError, "betas must be two numbers"),
    (dict(grad_clip=float("inf")), ValueError, "grad_clip must be a finite number > 0"),
    (dict(momentum=1.0), ValueError, "momentum must be < 1"),
    (dict(seed=-1), ValueError, r"seed must be in \[0, 2\*\*64\), got -1"),  # numpy's generator refused it late
    (dict(seed=2**64), ValueError, r"seed must be in \[0, 2\*\*64\), got 18446744073709551616"),  # torch's
    # accepted until the trainer built its optimiser, the first evaluation, or never
    (dict(decay="none"), ValueError, "decay must be 'gpt2' or 'all', got 'none'"),
    (dict(sample_prompt=5), TypeError, "sample_prompt must be a str, got 5"),
    (dict(progress="no"), TypeError, "progress must be True or False, got 'no'"),
    (dict(grad_clip=True), TypeError, "grad_clip must be a number or None, got True"),  # was a clip of 1.0
    (dict(max_lr="0.1"), TypeError, "max_lr must be a number, got '0.1'"),  # was a ValueError
    (dict(grad_clip="1.0"), TypeError, "grad_clip must be a number or None, got '1.0'"),  # was a ValueError
    (dict(betas=("a", 0.9)), TypeError, "betas must be two numbers"),  # was a ValueError
    (dict(betas=0.9), TypeError, "betas must be two numbers, got 0.9"),  # was "object of type 'float' has no len()"
])
def test_train_settings_refuse_bad_values_in_both_trees(bad, error, match):
    """Refused when the settings are made, not after the first forward and backward."""
    for cls in (NumpySettings, TorchSettings):
        with pytest.raises(error, match=f"TrainSettings.{match}"):
            cls(**bad)


# ---- evaluation batches and the batch stream -----------------------------------------------

TREE_PARTS = {"numpy": (ndata, nrun, NumpyTrainer, NumpySettings, numpy_evaluate),
              "torch": (tdata, trun, TorchTrainer, TorchSettings, torch_evaluate)}


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_fixed_batches_are_the_loaders_first_batches_short_one_included(tree):
    """8 windows in batches of 3: evaluation sees batches of 3, 3 and 2 (windows 0..7 in order,
    as the unshuffled loader gives them) unless the loader drops the short one; asking for more
    batches than there are gives all there are. The short batch used to be left out."""
    data, run, *_ = TREE_PARTS[tree]
    dataset = data.SlidingWindowDataset(list(range(33)), 4, 4)  # 8 windows, starting at 0, 4, ..., 28
    kept = data.DataLoader(dataset, 3, shuffle=True, drop_last=False, seed=1)
    batches = run.fixed_batches(kept, 5)
    assert [to_numpy(x)[:, 0].tolist() for x, _ in batches] == [[0, 4, 8], [12, 16, 20], [24, 28]], batches
    in_order = list(data.DataLoader(dataset, 3, shuffle=False, drop_last=False))
    for b, ((x, y), (x_ref, y_ref)) in enumerate(zip(batches, in_order, strict=True)):
        assert np.array_equal(to_numpy(x), to_numpy(x_ref)) and np.array_equal(to_numpy(y), to_numpy(y_ref)), \
            f"{tree}: evaluation batch {b} is not the unshuffled loader's batch {b}"
    assert kept.epochs_drawn == 0, "fixed_batches must not draw one of the loader's shuffles"
    assert [len(x) for x, _ in run.fixed_batches(kept, 2)] == [3, 3]
    dropped = data.DataLoader(dataset, 3, drop_last=True)
    assert [len(x) for x, _ in run.fixed_batches(dropped, 5)] == [3, 3], "a loader that drops the short batch"
    few = data.DataLoader(data.SlidingWindowDataset(list(range(9)), 4, 4), 3)  # 2 windows: one short batch
    assert [len(x) for x, _ in run.fixed_batches(few, 5)] == [2]


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_eval_loss_is_the_mean_over_every_validation_target(tree):
    """A validation set of 8 windows in batches of 3, 3 and 2: the logged validation loss is the
    mean over all 8 * T targets, the loss of one batch holding the 8 windows. (It used to be
    the mean of the first two batches only; a plain mean over the three batches would count the
    short batch's windows 1.5 times.)"""
    data, run, cls, settings_cls, evaluate = TREE_PARTS[tree]
    ids = np.random.default_rng(5).integers(0, 101, 8 * 8 + 1)  # 8 windows of 8
    dataset = data.SlidingWindowDataset(ids if tree == "numpy" else torch.tensor(ids), 8, 8)
    val = data.DataLoader(dataset, 3, drop_last=False)
    model = _model(tree, seed=4, dtype=torch.float64)
    trainer = cls(model, _loader(tree), val, settings_cls(steps=1, eval_batches=5, progress=False))
    record = run.record_eval(trainer, evaluate, TextProgress(1, enabled=False))
    whole = evaluate(model, [(dataset.inputs, dataset.targets)])  # (8, T): every target once
    three = [evaluate(model, [batch]) for batch in data.make_batches(dataset, 3)]  # (3, T), (3, T), (2, T)
    assert len(three) == 3 and abs(sum(three) / 3 - whole) > 1e-6, "the case must tell the two means apart"
    assert abs(record["val_loss"] - whole) <= 1e-12 * abs(whole), \
        f"{tree}: val loss {record['val_loss']!r}, the mean over every target is {whole!r}"
    assert trainer.history["evals"][-1][3] == record["val_loss"]


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_resume_refuses_a_data_position_past_the_loaders_epoch(tree, tmp_path):
    """A checkpoint at batch 8 of a 9-batch epoch resumed with a loader of 4 batches per epoch
    (other data, batch size or drop_last): an error naming both, where it used to go on silently
    at the start of the next epoch."""
    _, _, cls, _, _ = TREE_PARTS[tree]
    assert _trainer(tree, _model(tree), dict(steps=8, progress=False), out_dir=tmp_path).fit().ok
    fresh = _model(tree, seed=9)
    before = _weights(tree, fresh)
    with pytest.raises(ValueError, match="batch index 8 is past the end of an epoch of 4 batches"):
        cls.resume(tmp_path, fresh, _Unfingerprinted(_loader(tree, batch_size=8)), _loader(tree))
    changed = [k for k, v in _weights(tree, fresh).items() if not np.array_equal(v, before[k])]
    assert not changed, f"{tree}: a refused resume wrote the checkpoint into the caller's model: {changed[:3]}"
    resumed = cls.resume(tmp_path, _model(tree), _loader(tree), _loader(tree))
    assert (resumed.step, resumed.stream.epoch, resumed.stream.index) == (8, 0, 8)


@pytest.mark.parametrize("what", ["data position", "random state"])
@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_a_refused_restore_leaves_the_optimiser_as_it_was(tree, tmp_path, what):
    """Trainer.restore loaded the optimiser's state first and checked the data position and the
    random state after it: a state refused there left a trainer with another run's moments."""
    assert _trainer(tree, _model(tree), dict(steps=8, progress=False), out_dir=tmp_path).fit().ok
    run = nrun if tree == "numpy" else trun
    _, config, state, tensors, params = run.load_run(tmp_path, backend=tree)
    cls, settings_cls = (NumpyTrainer, NumpySettings) if tree == "numpy" else (TorchTrainer, TorchSettings)
    loader = _Unfingerprinted(_loader(tree, batch_size=8)) if what == "data position" else _loader(tree)
    trainer = cls(_model(tree, seed=9), loader, _loader(tree), settings_cls(steps=8, progress=False))
    if what == "random state":
        state = {**state, "rng": [1, 2, 3] if tree == "torch" else {"bit_generator": "MT19937", "state": {}}}
    with pytest.raises((ValueError, RuntimeError, TypeError, KeyError)):
        trainer.restore(state, tensors, params, config)
    moments = (len(trainer.optimizer.state) if tree == "torch"
               else trainer.optimizer.step_count)
    assert moments == 0, f"{tree}: a restore refused for its {what} loaded the optimiser's state ({moments})"


@pytest.mark.parametrize("edit, error, match", [
    (dict(step=2.5), TypeError, "step must be an int, got 2.5"),  # was cut to 2 while AdamW had stepped 4 times
    (dict(step=-3), ValueError, "step must be >= 0, got -3"),  # failed after a forward and backward
    (dict(step=99), ValueError, "step 99 is past the run's 6 steps"),  # counted as finished
    (dict(step=3), ValueError, "step 3 differs from the AdamW state's step 4"),
    (dict(tokens_seen=-7), ValueError, "tokens_seen must be >= 0, got -7"),
    (dict(tokens_seen=True), TypeError, "tokens_seen must be an int, got True"),
    (dict(history=None), TypeError, "history must be an object of lists"),  # an AttributeError traceback
    (dict(data=[]), TypeError, "data must be an object, got list"),  # an AttributeError traceback
    (dict(data={"epoch": 0, "index": "4"}), TypeError, "data.index must be an int, got '4'"),
])
@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_a_damaged_trainer_state_is_refused_naming_the_key_before_anything_changes(tree, tmp_path, edit, error,
                                                                                      match):
    """trainer_state.json's step, tokens_seen, data position and history were read with a bare int()
    or assumed well-formed: a damaged state resumed silently wrong or crashed with an AttributeError.
    Each is now refused by name, before the optimiser, data stream or model change."""
    assert _trainer(tree, _model(tree), dict(steps=4, progress=False), out_dir=tmp_path).fit().ok
    run = nrun if tree == "numpy" else trun
    _, config, state, tensors, params = run.load_run(tmp_path, backend=tree)
    cls, settings_cls = (NumpyTrainer, NumpySettings) if tree == "numpy" else (TorchTrainer, TorchSettings)
    model = _model(tree, seed=9)
    before = _weights(tree, model)
    trainer = cls(model, _loader(tree), _loader(tree), settings_cls(steps=6, progress=False))
    with pytest.raises(error, match=f"trainer state: {match}"):
        trainer.restore({**state, **edit}, tensors, params, config)
    moments = len(trainer.optimizer.state) if tree == "torch" else trainer.optimizer.step_count
    assert moments == 0 and trainer.step == 0, f"{tree}: a refused restore changed the trainer"
    assert all(np.array_equal(v, before[k]) for k, v in _weights(tree, model).items()), f"{tree}: the model changed"
    trainer.restore(state, tensors, params, config)  # the state as saved is accepted
    assert trainer.step == 4


def test_a_torch_random_state_of_the_wrong_size_is_a_value_error(tmp_path):
    """torch's Generator.set_state raised a RuntimeError ("Invalid mt19937 state"), which the
    command line reported as a traceback with exit status 1."""
    assert _trainer("torch", _model("torch"), dict(steps=2, progress=False), out_dir=tmp_path).fit().ok
    _, config, state, tensors, params = trun.load_run(tmp_path, backend="torch")
    trainer = TorchTrainer(_model("torch"), _loader("torch"), _loader("torch"), TorchSettings(steps=2, progress=False))
    with pytest.raises(ValueError, match="trainer state: rng is no random state of this generator"):
        trainer.restore({**state, "rng": [0] * 5056}, tensors, params, config)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_torch_trainers_dropout_masks_are_inverted_dropout_at_the_rate(p):
    """torch_impl.train.dropout_masks draws the trainer's masks: every value 0 or exactly 1/(1-p),
    the sites and shapes of numpy_ref's, and a keep rate of 1-p within 5 sigma (a mask scaled by
    1-p instead of divided by it went unnoticed: the parity tests feed numpy_ref's masks to both)."""
    from numpy_ref.model import GPTModel as NumpyModel
    from torch_impl.train import dropout_masks

    t_model = TorchGPT(torch_config("tiny", context_length=8, drop_rate=p), seed=0)
    n_model = NumpyModel(np_config("tiny", context_length=8, drop_rate=p), seed=0)
    masks = dropout_masks(t_model, 4, 8, torch.Generator().manual_seed(0))
    want = n_model.dropout_masks(4, 8, np.random.default_rng(0))
    assert {k: tuple(v.shape) for k, v in masks.items()} == {k: v.shape for k, v in want.items()}
    values = torch.cat([m.flatten() for m in masks.values()]).double()
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32).double()  # the float32 mask's value
    assert bool(((values == 0) | (values == scale)).all()), f"mask values {values.unique()[:5]} are not 0 or 1/(1-p)"
    n = values.numel()
    kept = float((values != 0).double().mean())
    assert abs(kept - (1 - p)) <= 5 * (p * (1 - p) / n) ** 0.5, f"keep rate {kept:.4f} over {n} is not {1 - p}"


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_pruning_keeps_the_checkpoint_latest_named_before_whatever_keep_is(tree, tmp_path):
    """docs/design.md: pruning always keeps the checkpoint `latest` names and the one it named
    before; keep=1 deleted the one before."""
    run = nrun if tree == "numpy" else trun
    for step in (1, 2, 3):
        (tmp_path / f"step-{step:08d}").mkdir()
    run.prune_checkpoints(tmp_path, 1, current="step-00000003", previous="step-00000002")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003"]
    run.prune_checkpoints(tmp_path, 0, current="step-00000003", previous=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003"]


class _Unfingerprinted:
    """A loader whose dataset exposes no windows to fingerprint (a user's own loader): a resume
    on other data is then caught only by `seek`'s position check."""

    def __init__(self, loader) -> None:
        self._loader, self.batch_size, self.drop_last = loader, loader.batch_size, loader.drop_last
        self.dataset = _Items(loader.dataset)

    def __iter__(self):
        return iter(self._loader)

    def __len__(self) -> int:
        return len(self._loader)


class _Items:
    """len() and [i] of a dataset, nothing else."""

    def __init__(self, dataset) -> None:
        self._dataset = dataset

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, i):
        return self._dataset[i]


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_resume_refuses_other_data_by_its_fingerprint(tree, tmp_path):
    """Other text with the same number of batches, or another shuffle seed, passes the position
    check; the data fingerprint saved with the checkpoint refuses both, before the model changes.
    The same data resume, and an unfingerprinted checkpoint (older runs) is accepted."""
    data, _, cls, _, _ = TREE_PARTS[tree]
    assert _trainer(tree, _model(tree), dict(steps=3, progress=False), out_dir=tmp_path).fit().ok
    other_ids = (IDS + 1) % 101
    for what, loader in (
            ("other text", data.DataLoader(data.SlidingWindowDataset(
                other_ids if tree == "numpy" else torch.tensor(other_ids), 8, 8), 4, shuffle=True, drop_last=True,
                seed=3)),
            ("another seed", data.DataLoader(_loader(tree).dataset, 4, shuffle=True, drop_last=True, seed=4))):
        assert len(loader) == len(_loader(tree)), what
        fresh = _model(tree, seed=9)
        before = _weights(tree, fresh)
        with pytest.raises(ValueError, match="the training data differ from the checkpoint's"):
            cls.resume(tmp_path, fresh, loader, _loader(tree))
        assert all(np.array_equal(v, before[k]) for k, v in _weights(tree, fresh).items()), what
    assert cls.resume(tmp_path, _model(tree), _loader(tree), _loader(tree)).step == 3
    state_file = tmp_path / (tmp_path / "latest").read_text().strip() / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["data"]["fingerprint"]  # as written before fingerprints
    state_file.write_text(json.dumps(state))
    reseeded = data.DataLoader(_loader(tree).dataset, 4, shuffle=True, drop_last=True, seed=4)
    assert cls.resume(tmp_path, _model(tree), reseeded, _loader(tree)).step == 3


class _NoBatches:
    """A loader whose epochs are empty (e.g. torch's DataLoader with drop_last and too few windows)."""
    dataset, batch_size, drop_last = [0], 2, True

    def __iter__(self):
        return iter([])

    def __len__(self) -> int:
        return 0


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_resume_refuses_other_validation_data_by_its_fingerprint(tree, tmp_path):
    """Only the training loader was fingerprinted: a resume with other validation text went on
    and evaluated another set than the run it continued (the CLI checks run.json; this is the
    library's own check)."""
    cls = NumpyTrainer if tree == "numpy" else TorchTrainer
    assert _trainer(tree, _model(tree), dict(steps=2, checkpoint_every=2, progress=False), out_dir=tmp_path).fit().ok
    other = _loader(tree, shuffle=False, batch_size=2)  # other batches: another fingerprint
    with pytest.raises(ValueError, match="the validation data differ from the checkpoint's"):
        cls.resume(tmp_path, _model(tree), _loader(tree), other)
    resumed = cls.resume(tmp_path, _model(tree), _loader(tree), _loader(tree))
    assert resumed.step == 2


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_batch_stream_checks_its_loader_and_its_position(tree):
    _, run, *_ = TREE_PARTS[tree]
    for epoch, index, error, match in ((0, -1, ValueError, "index must be >= 0, got -1"),
                                       (-1, 0, ValueError, "epoch must be >= 0, got -1"),
                                       (0, 10, ValueError, "batch index 10 is past the end of an epoch of 9"),
                                       (0, 2.0, TypeError, "index must be an int")):
        with pytest.raises(error, match=match):  # -1 used to wrap to the epoch's last batch
            run.BatchStream(_loader(tree)).seek(epoch, index)
    # The end of an epoch is a position: the next batch opens the following epoch, as when run through.
    through = run.BatchStream(_loader(tree))
    expected = [through.next() for _ in range(10)][-1]
    at_end = run.BatchStream(_loader(tree))
    at_end.seek(0, 9)
    got = at_end.next()
    assert (at_end.epoch, at_end.index) == (1, 1) == (through.epoch, through.index)
    assert all(np.array_equal(to_numpy(a), to_numpy(b)) for a, b in zip(got, expected)), "seek(0, 9) then next"
    used = _loader(tree)
    list(used)  # its next shuffle is epoch 1's: replaying from it would resume on other batches
    with pytest.raises(ValueError, match="already iterated 1 time"):
        run.BatchStream(used)
    with pytest.raises(ValueError, match="epoch 0 of the DataLoader has no batches"):
        run.BatchStream(_NoBatches()).next()
    with pytest.raises(ValueError, match="no batch to evaluate"):
        run.fixed_batches(_NoBatches(), 5)


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_log_lines_are_strict_json_without_validation_data(tree, tmp_path):
    """No validation loader: the validation loss is NaN in the history, and null in log.jsonl
    (NaN is not JSON: a strict reader refused every evaluation line)."""
    cls, settings_cls = (NumpyTrainer, NumpySettings) if tree == "numpy" else (TorchTrainer, TorchSettings)
    trainer = cls(_model(tree), _loader(tree), None, settings_cls(steps=2, eval_every=1, eval_batches=1,
                                                                    progress=False), out_dir=tmp_path)
    assert trainer.fit().ok

    def refuse(constant):
        raise ValueError(f"{tree}: log.jsonl holds {constant}, which is not JSON")

    log = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "val_loss" in r]
    assert evals and all(r["val_loss"] is None and isinstance(r["train_loss"], float) for r in evals), evals


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_trainer_state_is_strict_json_without_validation_data_and_resumes_with_nan(tree, tmp_path):
    """The history's NaN validation loss went into trainer_state.json as a bare NaN, which no
    strict JSON reader accepts. It is null there and NaN again after a resume; a NaN handed to
    save_trainer_state directly is refused before anything is written."""
    cls, settings_cls = (NumpyTrainer, NumpySettings) if tree == "numpy" else (TorchTrainer, TorchSettings)
    settings = settings_cls(steps=2, eval_every=1, eval_batches=1, checkpoint_every=2, progress=False)
    assert cls(_model(tree), _loader(tree), None, settings, out_dir=tmp_path).fit().ok
    ckpt = tmp_path / (tmp_path / "latest").read_text().strip()

    def refuse(constant):
        raise ValueError(f"{tree}: trainer_state.json holds {constant}, which is not JSON")

    state = json.loads((ckpt / "trainer_state.json").read_text(), parse_constant=refuse)
    assert [e[3] for e in state["history"]["evals"]] == [None, None], state["history"]["evals"]
    resumed = cls.resume(tmp_path, _model(tree), _loader(tree), None)
    val = [e[3] for e in resumed.history["evals"]]
    assert len(val) == 2 and all(isinstance(v, float) and np.isnan(v) for v in val), f"resumed history: {val}"
    ck = __import__(f"{'numpy_ref' if tree == 'numpy' else 'torch_impl'}.checkpoint", fromlist=["x"])
    with pytest.raises(ck.CheckpointError, match="trainer state: Out of range float values are not JSON compliant"):
        ck.save_trainer_state(tmp_path / "bad", {"loss": float("nan")}, {})
    assert not (tmp_path / "bad").exists(), "a refused trainer state left a directory behind"


def test_data_fingerprints_agree_across_trees_and_see_each_setting():
    """The same windows, batch size, drop_last, shuffle and seed: one fingerprint in both trees;
    changing any one of them changes it."""
    base = nrun.data_fingerprint(_loader("numpy"))
    assert base == trun.data_fingerprint(_loader("torch")), "the trees fingerprint the same data differently"
    ds = _loader("numpy").dataset
    changed = {"batch size": ndata.DataLoader(ds, 3, shuffle=True, drop_last=True, seed=3),
               "shuffle": ndata.DataLoader(ds, 4, shuffle=False, drop_last=True, seed=3),
               "drop_last": ndata.DataLoader(ds, 4, shuffle=True, drop_last=False, seed=3),
               "seed": ndata.DataLoader(ds, 4, shuffle=True, drop_last=True, seed=4),
               "one id": ndata.DataLoader(ndata.SlidingWindowDataset(np.r_[IDS[:5], (IDS[5] + 1) % 101, IDS[6:]], 8, 8),
                                          4, shuffle=True, drop_last=True, seed=3)}
    same = [what for what, loader in changed.items() if nrun.data_fingerprint(loader) == base]
    assert not same, f"the fingerprint does not see a change of {same}"


# ---- resuming into the right model, gradients, the run folder's `latest` ----------------------


def _model_of(tree: str, dtype: str, seed: int = 9, **config):
    """A tiny model with `config` overrides, in float32 or float64 in either tree."""
    if tree == "numpy":
        return NumpyGPT(np_config("tiny", context_length=8, **config), seed=seed, dtype=np.dtype(dtype))
    return TorchGPT(torch_config("tiny", context_length=8, **config), seed=seed, dtype=getattr(torch, dtype))


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_resume_refuses_another_config_or_dtype_naming_each_difference(tree, tmp_path):
    """Another drop_rate, n_heads (same emb_dim) or ln_eps changes no weight's shape, and a float64
    run resumed into a float32 model loses its exact weights: each used to resume silently (or,
    float32 into float64, fail on a missing `param.*` key). Each is now a ValueError naming the
    field with both values, before the caller's model changes; `restore` refuses the dtype too."""
    cls = NumpyTrainer if tree == "numpy" else TorchTrainer
    settings = dict(steps=1, progress=False, sample_tokens=0)
    for dtype, other in (("float32", "float64"), ("float64", "float32")):
        run = tmp_path / dtype
        assert _trainer(tree, _model_of(tree, dtype, seed=0), settings, out_dir=run).fit().ok
        cases = [(dict(drop_rate=0.5), "drop_rate: saved 0.0, given 0.5"),
                 (dict(n_heads=8), "n_heads: saved 4, given 8"),
                 (dict(ln_eps=0.5), "ln_eps: saved 1e-05, given 0.5"),
                 (dict(n_heads=8, ln_eps=0.5), "n_heads: saved 4, given 8; ln_eps: saved 1e-05, given 0.5")]
        for config, words in cases:
            given = _model_of(tree, dtype, **config)
            before = _weights(tree, given)
            with pytest.raises(ValueError, match=f"another model .*{words}") as err:
                cls.resume(run, given, _loader(tree), _loader(tree))
            assert "dtype:" not in str(err.value), f"{tree}: same dtype reported as differing: {err.value}"
            changed = [k for k, v in _weights(tree, given).items() if not np.array_equal(v, before[k])]
            assert not changed, f"{tree} {config}: a refused resume changed the model: {changed[:3]}"
        given = _model_of(tree, other)
        before = _weights(tree, given)
        with pytest.raises(ValueError, match=f"dtype: saved {dtype}, given {other}"):
            cls.resume(run, given, _loader(tree), _loader(tree))
        changed = [k for k, v in _weights(tree, given).items() if not np.array_equal(v, before[k])]
        assert not changed, f"{tree}: a {dtype} run refused into a {other} model changed it: {changed[:3]}"
        # The trainer's own restore, given the state without the config, checks the dtype.
        _, _, state, tensors, params = (nrun if tree == "numpy" else trun).load_run(run, backend=tree)
        plain = _trainer(tree, _model_of(tree, other), settings)
        with pytest.raises(ValueError, match=f"dtype: saved {dtype}, given {other}"):
            plain.restore(state, tensors, params)
        assert plain.step == 0, f"{tree}: the refused state moved the trainer to step {plain.step}"
        assert cls.resume(run, _model_of(tree, dtype), _loader(tree), _loader(tree)).step == 1


def test_each_torch_step_starts_from_no_gradients_as_numpys_does():
    """numpy_ref sums each step's gradients from zeros. torch's backward adds to .grad: gradients
    left on the model (a user's sanity-check backward, or the first micro-batch of a step stopped
    by a non-finite loss) used to be folded into the next step."""
    settings = dict(steps=1, optimizer="sgd", max_lr=0.1, min_lr=0.1, grad_clip=None, progress=False,
                    sample_tokens=0)
    n_model = _model("numpy", seed=1)
    stale = _model("torch", dtype=torch.float64)
    load_numpy_params_into_torch(stale, n_model.params)
    _, loss = stale(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))
    loss.backward()  # gradients a trainer did not make
    assert _trainer("numpy", n_model, settings).fit().ok
    assert _trainer("torch", stale, settings).fit().ok
    assert_dicts_close("one SGD step from a torch model holding stale .grad vs numpy's", _weights("torch", stale),
                       n_model.params, gradient_tol("float64"))

    # A step stopped by a NaN loss on its second micro-batch leaves the first one's gradients.
    settings.update(steps=2, grad_accum=2)
    stopped = _trainer("torch", _model("torch", seed=4), settings)
    real, calls = stopped.model.forward, []

    def nan_on_second_call(*args, **kwargs):
        calls.append(1)
        logits, loss = real(*args, **kwargs)
        return logits, loss * float("nan") if len(calls) == 2 else loss

    stopped.model.forward = nan_on_second_call
    result = stopped.fit()
    assert not result.ok and "non-finite loss nan at step 1" in result.message, result.message
    del stopped.model.forward  # the model's own forward again; the stream is 2 batches in
    clean = _trainer("torch", _model("torch", seed=4), settings)
    clean.stream.next(), clean.stream.next()
    assert stopped.fit().ok and clean.fit().ok
    a, b = _weights("torch", clean.model), _weights("torch", stopped.model)
    differ = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not differ, f"the stopped step's gradients leaked into the next fit(): {differ[:3]} differ"


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_latest_is_fsynced_renamed_and_its_directory_fsynced_before_anything_is_pruned(tree, tmp_path,
                                                                                       monkeypatch):
    """Checkpoints at steps 1, 2, 3 (keep 2): the third save prunes step 1. Recorded in order:
    every fsync (by inode), rename and rmtree. latest.tmp must be fsynced before its rename, and
    the run directory fsynced after the rename and before the pruning: otherwise a power cut can
    leave `latest` empty, or naming the deleted checkpoint."""
    events = []
    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, shutil.rmtree

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", Path(src).name, Path(dst).name))
        real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        events.append(("rmtree", Path(path).name))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert _trainer(tree, _model(tree), dict(steps=3, checkpoint_every=1, progress=False, sample_tokens=0),
                    out_dir=tmp_path).fit().ok
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003"]
    switch = max(i for i, e in enumerate(events) if e == ("rename", "latest.tmp", "latest"))
    prune = events.index(("rmtree", "step-00000001"))
    before = events[max(i for i in range(switch) if events[i][0] == "rename") + 1: switch]
    assert ("fsync", (tmp_path / "latest").stat().st_ino) in before, \
        f"{tree}: latest.tmp was not fsynced before its rename; events before it: {before}"
    assert switch < prune, f"{tree}: step-00000001 pruned (event {prune}) before 'latest' switched (event {switch})"
    assert ("fsync", tmp_path.stat().st_ino) in events[switch + 1: prune], \
        f"{tree}: the run directory was not fsynced between the rename and the pruning: {events[switch:prune + 1]}"


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_pruning_orders_checkpoints_by_step_number_and_keeps_the_previous_one(tree, tmp_path):
    """As text, `step-00000010-10` sorts before `-2` and step 100000000 (nine digits) before
    99999999; and a directory a killed save left at a later step sorted after the previous good
    checkpoint, which was deleted in its place."""
    run = TREE_PARTS[tree][1]
    trainer = _trainer(tree, _model(tree), dict(steps=1, progress=False))
    args = (trainer.model.config, trainer.model.params if tree == "numpy" else trainer.model.state_dict(),
            *trainer.state())

    def kept(out):  # the step folders left, in (step, k) order
        return sorted((p.name for p in out.glob("step-*")), key=lambda n: [int(x) for x in n.split("-")[1:]])

    orphan = tmp_path / "orphan"
    run.save_run(orphan, 20, *args, backend=tree)
    (orphan / "step-00000040").mkdir()  # a save killed midway: `latest` still names step 20
    run.save_run(orphan, 30, *args, backend=tree)
    assert kept(orphan) == ["step-00000020", "step-00000030"], \
        f"{tree}: an unfinished step-40 directory displaced the previous checkpoint step 20: {kept(orphan)}"

    siblings = tmp_path / "siblings"
    for name in ("step-00000010-2", "step-00000010-10"):
        (siblings / name).mkdir(parents=True)
    run.save_run(siblings, 11, *args, backend=tree)
    assert kept(siblings) == ["step-00000010-10", "step-00000011"], f"{tree}: kept {kept(siblings)}"

    big = tmp_path / "big"
    for step in (99_999_998, 99_999_999, 100_000_000, 100_000_001):
        run.save_run(big, step, *args, backend=tree, keep=3)
    assert kept(big) == ["step-99999999", "step-100000000", "step-100000001"], f"{tree}: kept {kept(big)}"
    assert (big / "latest").read_text().strip() == "step-100000001"


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_gradient_accumulation_over_unequal_micro_batches_is_one_step_on_their_union(tree):
    """Each micro-batch's mean loss counted 1 / grad_accum whatever its size: with drop_last=False,
    micro-batches of 4 windows and 1 differed from one batch of 5 by up to 0.022 in the weights
    after one SGD step. Each now counts by its share of the step's targets."""
    ids = IDS[:41]  # 5 windows of 8
    settings = dict(steps=1, optimizer="sgd", max_lr=0.1, min_lr=0.1, grad_clip=None, progress=False, sample_tokens=0)
    results, losses = [], []
    for B, accum in ((5, 1), (4, 2)):
        model = _model(tree, seed=3, dtype=torch.float64)
        if tree == "numpy":
            loader = ndata.DataLoader(ndata.SlidingWindowDataset(ids, 8, 8), B, shuffle=False, drop_last=False)
            trainer = NumpyTrainer(model, loader, None, NumpySettings(**settings, grad_accum=accum))
        else:
            loader = tdata.DataLoader(tdata.SlidingWindowDataset(torch.tensor(ids), 8, 8), B, shuffle=False,
                                      drop_last=False)
            trainer = TorchTrainer(model, loader, None, TorchSettings(**settings, grad_accum=accum))
        assert [len(b[0]) for b in loader] == ([5] if B == 5 else [4, 1]), "the micro-batches this test needs"
        assert trainer.fit().ok
        results.append(_weights(tree, model))
        losses.append(trainer.history["steps"][0][2])
    assert_dicts_close(f"{tree}: micro-batches of 4 and 1 vs one batch of 5", results[1], results[0],
                       gradient_tol("float64"))
    assert abs(losses[1] - losses[0]) <= 1e-12 * abs(losses[0]), f"{tree}: step loss {losses[1]} vs {losses[0]}"


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy's inf - inf on the way: the point
@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_a_run_that_steps_the_weights_to_inf_ends_not_ok_without_a_checkpoint_folder(tree):
    """The final weights were checked only when saving: with no out_dir, a learning rate that
    steps float32 weights past their range returned ok=True, 'finished'."""
    model = _model_of(tree, "float32")
    result = _trainer(tree, model, dict(steps=1, max_lr=1e38, min_lr=0.0, weight_decay=0.1, progress=False,
                                        sample_tokens=0)).fit()
    assert not result.ok and "weights not finite" in result.message, (tree, result.ok, result.message)


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_adamw_eps_zero_is_refused_by_name(tree):
    """eps = 0 gave 0/0 = NaN in every weight whose gradient had been 0 so far (wte rows of unseen
    tokens), and a one-step run returned ok=True with 2304 NaN in wte."""
    settings_cls = NumpySettings if tree == "numpy" else TorchSettings
    with pytest.raises(ValueError, match="eps must be > 0"):
        settings_cls(eps=0.0)
    settings_cls(eps=0.0, optimizer="sgd")  # SGD has no eps
    if tree == "numpy":
        from numpy_ref.optim import AdamW

        with pytest.raises(ValueError, match="eps must be > 0"):
            AdamW({"w": np.ones((2, 2))}, eps=0.0)
    else:
        from torch_impl.optim import build_optimizer

        with pytest.raises(ValueError, match="eps must be > 0"):
            build_optimizer(torch.nn.Linear(2, 2), "adamw", eps=0.0)
