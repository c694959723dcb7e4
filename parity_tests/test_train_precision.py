"""Training under bf16 autocast (torch_impl.train) and `gpt-oracle train --precision`.

- a bf16-autocast run killed after a checkpoint and resumed ends bit for bit where an
  uninterrupted one ends; the checkpoint records the autocast and a resume keeps it;
- autocast is really applied: the losses differ from a float32 run's, within bf16's error;
- evaluation runs under the trainer's autocast;
- the trainer refuses fp16 autocast (no loss scaling here) and autocast over a float64 model;
  a resume asked for another autocast, or a state saved with another one, is refused before
  the model changes;
- the command: `auto` takes what `plan_runtime` picks for the CPU and says so on stderr; the
  numpy backend, --dtype float64 and tf32 off CUDA refuse an explicit --precision; a bf16 run
  resumes in bf16; a run.json written before the option resumes as it trained (no autocast).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from parity_tests.compare import to_numpy
from torch_impl import device as tdevice
from torch_impl import data as tdata
from torch_impl.config import get_config
from torch_impl.model import GPTModel
from torch_impl.train import Trainer
from torch_impl.train_run import TrainSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.py

IDS = torch.tensor(np.random.default_rng(11).integers(0, 101, 300))  # 37 windows of 8: 9 batches of 4
SETTINGS = dict(steps=12, warmup_steps=2, max_lr=1e-2, min_lr=1e-3, grad_clip=0.5, eval_every=4, eval_batches=2,
                checkpoint_every=4, progress=False)


def _loader():
    return tdata.DataLoader(tdata.SlidingWindowDataset(IDS, 8, 8), 4, shuffle=True, drop_last=True, seed=3)


def _model(seed: int = 0, dtype=torch.float32) -> GPTModel:
    return GPTModel(get_config("tiny", context_length=8, drop_rate=0.1), seed=seed, dtype=dtype)


def _trainer(model, autocast=torch.bfloat16, **kwargs) -> Trainer:
    return Trainer(model, _loader(), _loader(), TrainSettings(**SETTINGS), autocast_dtype=autocast, **kwargs)


def _weights(model) -> dict[str, np.ndarray]:
    return {k: to_numpy(v).copy() for k, v in model.state_dict().items()}


class _Kill(Exception):
    pass


def test_a_bf16_run_killed_and_resumed_ends_bit_for_bit_where_an_uninterrupted_one_ends(tmp_path):
    full_model = _model()
    full = _trainer(full_model, out_dir=tmp_path / "full").fit()

    def die_at_6(trainer):
        if trainer.step == 6:
            raise _Kill

    with pytest.raises(_Kill):
        _trainer(_model(), out_dir=tmp_path / "killed", on_step=die_at_6).fit()
    state = json.loads((tmp_path / "killed" / "step-00000004" / "trainer_state.json").read_text())
    assert state["autocast"] == "bfloat16", f"the checkpoint should record bf16 autocast, has {state.get('autocast')!r}"
    resumed = Trainer.resume(tmp_path / "killed", _model(seed=9), _loader(), _loader())  # autocast from the state
    assert resumed.autocast_dtype == torch.bfloat16, f"resume took autocast {resumed.autocast_dtype}, not the saved one"
    assert resumed.step == 4, f"resumed at step {resumed.step}, expected the step-4 checkpoint"
    result = resumed.fit()
    assert full.ok and result.ok, (full.message, result.message)
    assert result.history == full.history, "losses or evaluations differ after resuming a bf16 run"
    a, b = _weights(full_model), _weights(resumed.model)
    for k in a:
        assert np.array_equal(a[k], b[k]), f"{k} differs after resuming a bf16 run (max abs " \
                                           f"{np.abs(a[k] - b[k]).max():.3e}); expected bit-for-bit equality"


def test_bf16_autocast_changes_the_losses_by_bf16_rounding_only():
    """Same weights, same batches: the bf16 run's losses are not the float32 run's (autocast is
    applied) but stay within bf16's error of them; so do its evaluations."""
    histories = {}
    for autocast in (None, torch.bfloat16):
        trainer = _trainer(_model(), autocast=autocast)
        trainer.settings = TrainSettings(**{**SETTINGS, "steps": 4})
        result = trainer.fit()
        assert result.ok, f"autocast {autocast}: {result.message}"
        histories[autocast] = trainer.history
    f32 = np.array([row[2] for row in histories[None]["steps"]])
    b16 = np.array([row[2] for row in histories[torch.bfloat16]["steps"]])
    assert not np.array_equal(f32, b16), f"bf16 autocast left every loss bit-identical to float32: {f32}"
    assert np.allclose(b16, f32, rtol=2e-2, atol=0), f"bf16 losses {b16} are not within 2% of float32's {f32}"

    model = _model()
    batches = [next(iter(_loader()))]
    trainer = _trainer(model)
    plain = float(Trainer.evaluate(_trainer(model, autocast=None), batches))
    under = float(trainer.evaluate(batches))
    assert under != plain, "evaluation under bf16 autocast gave the float32 loss bit for bit: no autocast applied"
    assert abs(under - plain) < 2e-2 * plain, f"bf16 evaluation {under} vs float32 {plain}: beyond bf16's error"


def test_the_trainer_refuses_fp16_and_a_float64_model():
    with pytest.raises(ValueError, match="float16 needs loss scaling"):
        _trainer(_model(), autocast=torch.float16)
    with pytest.raises(ValueError, match="this model is float64"):
        _trainer(_model(dtype=torch.float64))


def test_a_resume_with_another_autocast_is_refused_before_the_model_changes(tmp_path):
    result = _trainer(_model(), out_dir=tmp_path).fit()
    assert result.ok, result.message
    model = _model(seed=5)
    before = _weights(model)
    with pytest.raises(ValueError, match="trained with autocast bfloat16, not None"):
        Trainer.resume(tmp_path, model, _loader(), _loader(), autocast_dtype=None)
    # A trainer made by hand without autocast, given the bf16 run's state.
    from torch_impl.train_run import load_run

    _, _, state, tensors, params = load_run(tmp_path, backend="torch")
    plain = _trainer(model, autocast=None)
    with pytest.raises(ValueError, match="trained with autocast bfloat16 but this trainer has None"):
        plain.restore(state, tensors, params)
    after = _weights(model)
    for k in before:
        assert np.array_equal(before[k], after[k]), f"{k} changed although the state was refused"
    assert plain.step == 0, f"the refused state moved the trainer to step {plain.step}"


# ---- the command ---------------------------------------------------------------------------

TRAIN = ["--config", "tiny", "--context-length", "16", "--batch-size", "2", "--eval-every", "0",
         "--sample-tokens", "0", "--no-progress"]


def _fake_cpu(monkeypatch, bf16_units: bool) -> None:
    monkeypatch.setattr(tdevice, "cpu_has_fast_bf16", lambda: bf16_units)


def _state(run, step: int) -> dict:
    return json.loads((run / f"step-{step:08d}" / "trainer_state.json").read_text())


@pytest.mark.parametrize("bf16_units, autocast, words", [
    (True, "bfloat16", "float32 with bf16 autocast [CPU with AMX / AVX-512 BF16: bf16 autocast]"),
    (False, None, "float32 [CPU without bf16 units: float32 is the fastest]"),
])
def test_auto_precision_is_what_plan_runtime_picks_and_says_so(tmp_path, capsys, monkeypatch, bf16_units, autocast,
                                                               words):
    from gpt_oracle.cli import main

    _fake_cpu(monkeypatch, bf16_units)
    assert main(["train", "--steps", "1", "--out", str(tmp_path), *TRAIN]) == 0
    err = capsys.readouterr().err
    assert f"(torch, {words})" in err, f"the first stderr line should say {words!r}: {err!r}"
    assert _state(tmp_path, 1)["autocast"] == autocast, f"auto on this CPU should train with autocast {autocast}"
    stored = json.loads((tmp_path / "run.json").read_text())["precision"]
    assert stored is None, f"run.json should keep --precision as given (none: auto, chosen per machine), has {stored!r}"
    assert _state(tmp_path, 1)["tf32"] is False, "a CPU run recorded TF32 matmuls"


def test_a_bf16_run_resumes_in_bf16_on_a_machine_that_would_pick_float32(tmp_path, capsys, monkeypatch):
    """--precision auto on a CPU with bf16 units, resumed where auto means float32: the run goes on
    as it started, and says so."""
    from gpt_oracle.cli import main

    _fake_cpu(monkeypatch, True)
    assert main(["train", "--steps", "3", "--checkpoint-every", "1", "--out", str(tmp_path / "a"), *TRAIN]) == 0
    _fake_cpu(monkeypatch, False)
    shutil.rmtree(tmp_path / "a" / "step-00000003")  # the run "died" after step 2
    (tmp_path / "a" / "latest").write_text("step-00000002\n")
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "a")]) == 0
    assert "with bf16 autocast, as it started" in capsys.readouterr().err
    assert _state(tmp_path / "a", 3)["autocast"] == "bfloat16", "the resumed run dropped bf16 autocast"


def test_a_run_json_from_before_the_option_resumes_without_autocast(tmp_path, capsys, monkeypatch):
    from gpt_oracle.cli import main

    _fake_cpu(monkeypatch, False)
    run = tmp_path / "old"
    assert main(["train", "--steps", "3", "--checkpoint-every", "1", "--out", str(run), *TRAIN]) == 0
    opts = json.loads((run / "run.json").read_text())
    del opts["precision"]
    (run / "run.json").write_text(json.dumps(opts))
    state_file = run / "step-00000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["autocast"]
    state_file.write_text(json.dumps(state))
    shutil.rmtree(run / "step-00000003")
    (run / "latest").write_text("step-00000002\n")
    _fake_cpu(monkeypatch, True)  # auto would now pick bf16
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0, capsys.readouterr().err
    assert _state(run, 3)["autocast"] is None, "an old run resumed with autocast it did not train with"


@pytest.mark.parametrize("argv, needles", [
    (["--backend", "numpy", "--precision", "bf16"], ("--precision bf16", "numpy backend trains in --dtype")),
    (["--backend", "numpy", "--precision", "auto"], ("--precision auto", "numpy backend")),
    (["--dtype", "float64", "--precision", "bf16"], ("--precision bf16", "--dtype float64")),
    (["--precision", "tf32"], ("--precision tf32", "on --device cpu use fp32")),
])
def test_precision_conflicts_are_user_errors(tmp_path, capsys, argv, needles):
    from gpt_oracle.cli import main

    out = tmp_path / "run"
    assert main(["train", "--steps", "1", "--out", str(out), *TRAIN, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert not out.exists(), f"{argv}: a refused run wrote {out}"


def test_the_command_offers_torch_impl_precisions_only():
    from gpt_oracle.commands.train import PRECISIONS

    assert set(PRECISIONS) <= set(tdevice.PRECISIONS), \
        f"--precision offers {sorted(set(PRECISIONS) - set(tdevice.PRECISIONS))}, unknown to plan_runtime"


def test_a_resume_leaves_tf32_to_the_trainer_state_not_to_this_machine(tmp_path, capsys, monkeypatch):
    """TF32 is a process-wide switch that --precision auto sets from the GPU at hand: a new run
    applies the plan, a resumed one must not (Trainer.resume restores the run's own setting)."""
    from gpt_oracle.cli import main

    applied = []
    monkeypatch.setattr(tdevice.RuntimePlan, "apply", lambda plan: applied.append(plan.device.type))
    _fake_cpu(monkeypatch, False)
    run = tmp_path / "r"
    assert main(["train", "--steps", "3", "--checkpoint-every", "1", "--out", str(run), *TRAIN]) == 0
    assert applied == ["cpu"], f"a new run should apply its plan once, applied {applied}"
    shutil.rmtree(run / "step-00000003")
    (run / "latest").write_text("step-00000002\n")
    assert main(["train", "--resume", str(run)]) == 0, capsys.readouterr().err
    assert applied == ["cpu"], f"the resume applied this machine's plan: {applied}"


@pytest.mark.cuda
def test_a_cuda_resume_restores_the_runs_tf32_setting(tmp_path):
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        model = GPTModel(get_config("tiny", context_length=8), seed=0, device="cuda")
        trainer = Trainer(model, _loader(), _loader(), TrainSettings(**{**SETTINGS, "steps": 2}), out_dir=tmp_path)
        result = trainer.fit()
        assert result.ok, result.message
        torch.backends.cuda.matmul.allow_tf32 = True  # what auto would pick on an Ampere GPU
        Trainer.resume(tmp_path, GPTModel(get_config("tiny", context_length=8), seed=1, device="cuda"), _loader(),
                       _loader())
        assert torch.backends.cuda.matmul.allow_tf32 is False, "the resume kept this machine's TF32, not the run's"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
