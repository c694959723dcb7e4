"""Data-parallel training (torch_impl/distributed.py) against one process.

- 2 processes (gloo, CPU) train the model one process trains on the same batches: float64
  weights within gradient_tol after 3 steps with dropout, gradient accumulation, clipping and a
  batch of 5 rows split 2 + 3; the two processes end bit for bit equal;
- process 0 alone writes the checkpoints, and the run resumes from them;
- a non-finite loss on one process stops both at the same step (no process waits on a peer);
- bad input: a batch with fewer rows than processes, a rank outside the group.

Each test spawns fresh Python processes (a few seconds each, torch imported in each).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity_tests.compare import assert_dicts_close
from parity_tests.tolerances import gradient_tol
from torch_impl import data as tdata
from torch_impl.config import get_config
from torch_impl.distributed import DataParallel, spawn
from torch_impl.model import GPTModel
from torch_impl.train import Trainer
from torch_impl.train_run import TrainSettings

IDS = np.random.default_rng(7).integers(0, 101, 300)  # 37 windows of 8
SETTINGS = dict(steps=3, grad_accum=2, warmup_steps=1, max_lr=1e-2, min_lr=1e-3, grad_clip=0.5, progress=False,
                sample_tokens=0)


def _model(drop_rate: float) -> GPTModel:
    return GPTModel(get_config("tiny", context_length=8, drop_rate=drop_rate), seed=3, dtype=torch.float64)


def _loader(batch_size: int):
    return tdata.DataLoader(tdata.SlidingWindowDataset(torch.tensor(IDS), 8, 8), batch_size, shuffle=True,
                            drop_last=True, seed=3)


def _weights(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _train(parallel, out_file: str, settings: dict, batch_size: int, drop_rate: float, out_dir=None,
           nan_on_rank=None) -> None:
    """One process's run (module level: spawn imports it by name); its result and weights go to
    `out_file`.<rank>.npz."""
    model = _model(drop_rate)

    def poison(trainer):  # after step 1, on one process only: its next loss is NaN
        if parallel is not None and parallel.rank == nan_on_rank and trainer.step == 1:
            with torch.no_grad():
                trainer.model.wte.weight.fill_(float("nan"))

    trainer = Trainer(model, _loader(batch_size), None, TrainSettings(**settings), out_dir=out_dir,
                      parallel=parallel, on_step=poison if nan_on_rank is not None else None)
    result = trainer.fit()
    rank = parallel.rank if parallel is not None else 0
    np.savez(f"{out_file}.{rank}.npz", ok=result.ok, message=result.message, step=result.step,
             loss=np.array([h[2] for h in trainer.history["steps"]]), **_weights(model))


def _resume(parallel, out_file: str, run_dir: str, batch_size: int, drop_rate: float) -> None:
    model = _model(drop_rate)
    trainer = Trainer.resume(run_dir, model, _loader(batch_size), None, parallel=parallel)
    result = trainer.fit()
    np.savez(f"{out_file}.{parallel.rank}.npz", ok=result.ok, message=result.message, step=result.step,
             **_weights(model))


def _read(path) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(path) as f:
        meta = {k: f[k].item() if f[k].ndim == 0 else f[k] for k in ("ok", "message", "step")}
        meta["loss"] = f["loss"] if "loss" in f else None
        return meta, {k: f[k] for k in f.files if k not in ("ok", "message", "step", "loss")}


def test_two_processes_train_the_model_one_process_trains(tmp_path):
    """Batch 5 split 2 + 3, 2 micro-batches per step, dropout 0.1 (each process keeps its rows of
    the whole batch's masks), clipping: the run does not depend on the number of processes."""
    _train(None, str(tmp_path / "one"), SETTINGS, 5, 0.1)
    spawn(_train, 2, str(tmp_path / "two"), SETTINGS, 5, 0.1, timeout_s=120)
    one, w_one = _read(tmp_path / "one.0.npz")
    (two0, w0), (two1, w1) = _read(tmp_path / "two.0.npz"), _read(tmp_path / "two.1.npz")
    assert one["ok"] and two0["ok"] and two1["ok"], (one, two0, two1)
    assert two0["step"] == two1["step"] == one["step"] == 3
    for k in w0:
        assert np.array_equal(w0[k], w1[k]), f"the two processes' {k} differ after the same steps"
    assert_dicts_close("2 processes vs 1 after 3 steps", w0, w_one, gradient_tol("float64"))
    assert np.allclose(two0["loss"], one["loss"], rtol=1e-12, atol=0), (two0["loss"], one["loss"])
    start = _weights(_model(0.1))
    assert any(not np.allclose(w_one[k], start[k]) for k in start), "the run did not change the weights"


def test_process_zero_writes_the_checkpoints_and_a_two_process_run_resumes_from_them(tmp_path):
    """4 steps with a checkpoint every 2 by 2 processes; then the run is resumed from its step-2
    checkpoint, again by 2 processes: it ends where the uninterrupted run ended."""
    settings = dict(SETTINGS, steps=4, checkpoint_every=2)
    run = tmp_path / "run"
    spawn(_train, 2, str(tmp_path / "full"), settings, 4, 0.1, str(run), timeout_s=120)
    full, w_full = _read(tmp_path / "full.0.npz")
    assert full["ok"], full
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step-")) == ["step-00000002", "step-00000004"]
    (run / "latest").write_text("step-00000002\n", encoding="utf-8")  # as if killed after the step-2 save
    spawn(_resume, 2, str(tmp_path / "resumed"), str(run), 4, 0.1, timeout_s=120)
    resumed, w_resumed = _read(tmp_path / "resumed.0.npz")
    assert resumed["ok"] and resumed["step"] == 4, resumed
    for k in w_full:
        assert np.array_equal(w_full[k], w_resumed[k]), f"resumed run's {k} differs from the uninterrupted run's"


def test_a_non_finite_loss_on_one_process_stops_every_process_at_that_step(tmp_path):
    """Process 1's weights turn NaN after step 1 (process 0's do not): a process that raised on its
    own loss would leave the other waiting in the gradient all_reduce; both stop at step 2."""
    spawn(_train, 2, str(tmp_path / "nan"), dict(SETTINGS, grad_clip=None), 4, 0.0, None, 1, timeout_s=60)
    for rank in (0, 1):
        meta, _ = _read(tmp_path / f"nan.{rank}.npz")
        assert not meta["ok"] and "non-finite loss nan at step 2" in str(meta["message"]), (rank, meta)
        assert meta["step"] == 1, (rank, meta)


def _rows_of_a_small_batch(parallel, out_file: str) -> None:
    try:
        parallel.rows(1)
    except ValueError as err:
        np.savez(f"{out_file}.{parallel.rank}.npz", message=str(err))


def test_a_batch_with_fewer_rows_than_processes_is_refused_by_name(tmp_path):
    spawn(_rows_of_a_small_batch, 2, str(tmp_path / "rows"), timeout_s=60)
    with np.load(tmp_path / "rows.0.npz") as f:
        assert "a batch of 1 rows cannot be split over 2 processes" in str(f["message"]), str(f["message"])


def test_data_parallel_needs_a_process_group_and_a_place_in_it():
    with pytest.raises(ValueError, match="rank must be an int in"):
        DataParallel(2, 2)
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        DataParallel(0, 0)
    with pytest.raises(RuntimeError, match="initialised process group"):
        DataParallel(0, 1)


def test_train_command_with_two_processes_trains_the_one_process_run_and_resumes(tmp_path, capsys):
    """`gpt-oracle train --nproc 2` (float64, dropout, 3 steps) ends on the weights `--nproc 1`
    ends on, within gradient_tol; the run resumed from its step-2 checkpoint with --nproc 2 ends
    bit for bit where it ended."""
    from gpt_oracle.cli import main
    from torch_impl.checkpoint import load_checkpoint

    common = ["--config", "tiny", "--batch-size", "4", "--grad-accum", "2", "--steps", "3", "--dtype", "float64",
              "--dropout", "0.1", "--eval-every", "0", "--checkpoint-every", "2", "--no-progress", "--threads", "1"]
    assert main(["train", "--out", str(tmp_path / "one"), *common]) == 0
    assert main(["train", "--out", str(tmp_path / "two"), "--nproc", "2", *common]) == 0
    printed = capsys.readouterr()
    assert "done: 3 steps" in printed.out and "in 2 processes" in printed.err, printed
    _, one = load_checkpoint(tmp_path / "one" / "step-00000003", dtype=torch.float64)
    _, two = load_checkpoint(tmp_path / "two" / "step-00000003", dtype=torch.float64)
    assert_dicts_close("train --nproc 2 vs --nproc 1", {k: v.numpy() for k, v in two.items()},
                       {k: v.numpy() for k, v in one.items()}, gradient_tol("float32"))  # the files hold float32
    (tmp_path / "two" / "latest").write_text("step-00000002\n", encoding="utf-8")
    import shutil

    shutil.rmtree(tmp_path / "two" / "step-00000003")
    assert main(["train", "--resume", str(tmp_path / "two"), "--nproc", "2"]) == 0
    _, resumed = load_checkpoint(tmp_path / "two" / "step-00000003", dtype=torch.float64)
    for k in two:
        assert torch.equal(two[k], resumed[k]), f"--resume --nproc 2: {k} differs from the uninterrupted run"
