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


# ---- failures: each reported as the process that failed of itself, never a hang or a silent exit ----


def _fail_on_rank_1(parallel, kind: str) -> None:
    """Process 1 fails after a first collective; process 0 then waits in the next one."""
    parallel.all_agree(True)
    if parallel.rank == 1:
        if kind == "interrupt":
            raise KeyboardInterrupt
        raise ValueError("boom in process 1")
    parallel.sum(1.0)  # process 0: its peer is gone, so this fails too (a closed connection)


def _fail_save_on_rank_0(parallel) -> None:
    """Process 0's 'save' fails; process 1 learns it and stops (as Trainer.save does)."""
    from torch_impl.distributed import PeerFailed

    if not parallel.all_agree(parallel.rank != 0):
        if parallel.rank == 0:
            raise OSError(28, "No space left on device")
        raise PeerFailed("process 0 failed to write the checkpoint of step 2")


@pytest.mark.parametrize("kind", ["error", "interrupt"])
def test_the_process_that_failed_is_reported_not_the_peer_it_left_waiting(kind):
    """torch's spawn reports whichever process it sees exit first: process 0's 'Connection closed by
    peer' often hid process 1's error; an interrupted process exited 0, and a run that trained
    nothing looked like a success."""
    from torch_impl.distributed import ProcessFailed

    for _ in range(2):  # the order the processes exit in varies
        with pytest.raises(ProcessFailed) as caught:
            spawn(_fail_on_rank_1, 2, kind, timeout_s=60)
        err = caught.value
        want = "KeyboardInterrupt" if kind == "interrupt" else "ValueError"
        assert (err.rank, err.kind) == (1, want), str(err)
        assert kind == "interrupt" or err.message == "boom in process 1", str(err)


def test_a_failed_save_on_process_0_is_reported_as_process_0s_error():
    """Process 1 said 'process 0 failed ... (its error is in its output)', and process 0's error
    was printed nowhere."""
    from torch_impl.distributed import ProcessFailed

    with pytest.raises(ProcessFailed) as caught:
        spawn(_fail_save_on_rank_0, 2, timeout_s=60)
    assert (caught.value.rank, caught.value.kind) == (0, "OSError") and "No space left" in caught.value.message, \
        str(caught.value)


def _sigint_handler(parallel, out_file: str) -> None:
    import signal

    np.savez(f"{out_file}.{parallel.rank}.npz", default=signal.getsignal(signal.SIGINT) is signal.default_int_handler)


def test_a_process_started_with_sigint_ignored_still_dies_with_its_parent(tmp_path):
    """torch's processes die with their parent by a SIGINT, which a process that inherited SIGINT
    ignored (a background job of a script) never hears: killed, the parent left both training on
    and writing checkpoints. Each process restores SIGINT's default handler first."""
    import signal

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        spawn(_sigint_handler, 2, str(tmp_path / "sig"), timeout_s=60)
    finally:
        signal.signal(signal.SIGINT, before)
    for rank in (0, 1):
        with np.load(tmp_path / f"sig.{rank}.npz") as f:
            assert bool(f["default"]), f"process {rank} kept SIGINT ignored"


def _unused_parameter(parallel, out_file: str) -> None:
    model = torch.nn.Linear(2, 2)
    model.unused = torch.nn.Parameter(torch.ones(3))
    model(torch.ones(1, 2)).sum().backward()
    parallel.sum_gradients(model)
    np.savez(f"{out_file}.{parallel.rank}.npz", none=model.unused.grad is None,
             weight=model.weight.grad.numpy())


def test_a_parameter_no_process_used_keeps_no_gradient(tmp_path):
    """sum_gradients made a missing gradient zeros, so AdamW then decayed a parameter one process
    would have left alone."""
    spawn(_unused_parameter, 2, str(tmp_path / "unused"), timeout_s=60)
    with np.load(tmp_path / "unused.0.npz") as f:
        assert bool(f["none"]), "the unused parameter got a gradient"
        assert np.allclose(f["weight"], 2.0), f["weight"]  # the used one: summed over 2 processes


class _OneOfTwo:
    """A DataParallel stand-in for one process of two, in this process: the collectives are the
    identity (enough to watch what the trainer hands the model)."""

    rank, world_size, is_main = 0, 2, True

    def rows(self, B):
        return slice(0, B // 2)

    def sum(self, value):
        return value

    def all_agree(self, ok):
        return ok

    def broadcast_parameters(self, model):
        pass

    def sum_gradients(self, model):
        pass


def test_a_process_keeps_only_its_rows_of_the_dropout_masks():
    """The masks of the whole batch were sliced as views, which kept the whole batch's masks alive
    through the forward and backward in every process (W times one process's mask memory)."""
    model = _model(0.1)
    seen = []
    forward = model.forward

    def watch(*args, dropout_masks=None, **kwargs):
        seen.extend((m.shape[0], m.untyped_storage().nbytes(), m.numel() * m.element_size())
                    for m in dropout_masks.values())
        return forward(*args, dropout_masks=dropout_masks, **kwargs)

    model.forward = watch
    Trainer(model, _loader(4), None, TrainSettings(**dict(SETTINGS, steps=1, grad_accum=1)), parallel=_OneOfTwo()).fit()
    assert seen and all(rows == 2 and storage == used for rows, storage, used in seen), seen[:3]


# ---- the command's side of --nproc (the processes replaced by stand-ins in this process) ----

NPROC_RUN = ["--config", "tiny", "--batch-size", "4", "--steps", "2", "--eval-every", "0", "--checkpoint-every", "0",
             "--no-progress", "--nproc", "2"]


@pytest.mark.parametrize("kind, message, status", [
    ("UserError", "--batch-size 4: out of memory at step 1 (can't allocate); train with a smaller batch", 2),
    ("ValueError", "boom in process 1", 1),
])
def test_train_nproc_reports_a_process_failure_in_one_line_and_takes_back_the_new_run(
        monkeypatch, capsys, tmp_path, kind, message, status):
    """A failure was one 2-3 KB line of tracebacks, often the wrong process's, always exit 2 (bad
    input); an out-of-memory error on a process other than 0 became a TypeError. Now: the failing
    process's own error, exit 2 for bad input and out of memory (as in one process), 1 otherwise."""
    import torch_impl.distributed as distributed
    from gpt_oracle.cli import main

    def failing(fn, world_size, *args, **kwargs):
        raise distributed.ProcessFailed(1, kind, message)

    monkeypatch.setattr(distributed, "spawn", failing)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *NPROC_RUN]) == status
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    if kind != "UserError":
        assert "training process 1 failed: ValueError" in err, err
    assert not out.exists(), f"a run that wrote no checkpoint left {sorted(p.name for p in out.iterdir())}"


def test_train_nproc_without_a_result_from_process_0_is_a_failure(monkeypatch, capsys, tmp_path):
    """Processes that were interrupted exit 0 without a result: the parent then crashed on the
    missing result file (a traceback, exit 1) and left run.json behind."""
    import torch_impl.distributed as distributed
    from gpt_oracle.cli import main

    monkeypatch.setattr(distributed, "spawn", lambda fn, world_size, *args, **kwargs: None)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *NPROC_RUN]) == 1
    err = capsys.readouterr().err
    assert "process 0 ended without a result" in err and "Traceback" not in err, err
    assert not out.exists()


def test_train_nproc_divides_threads_among_the_processes(monkeypatch, capsys, tmp_path):
    """--threads was set in every process: --nproc 2 --threads 2 ran 2 x 2 threads on 2 cores (5.5x
    slower), and a run resumed with --nproc kept its one-process count. It is the whole run's."""
    import torch_impl.distributed as distributed
    from gpt_oracle.cli import main

    seen = []

    class Watch(_OneOfTwo):
        def sum_gradients(self, model):
            seen.append(torch.get_num_threads())

    monkeypatch.setattr(distributed, "spawn", lambda fn, world_size, *args, **kwargs: fn(Watch(), *args))
    before = torch.get_num_threads()
    assert main(["train", "--out", str(tmp_path / "run"), *NPROC_RUN, "--threads", "2"]) == 0, capsys.readouterr()
    assert seen and set(seen) == {1}, f"threads per process {set(seen)}, expected 2 // 2 = 1"
    assert torch.get_num_threads() == before


def test_a_loader_whose_last_batch_has_fewer_rows_than_processes_is_refused_before_training():
    """With drop_last=False, a last batch of 1 window over 2 processes stopped the run mid-epoch with
    an uncaught ValueError; it is refused when the trainer is made, naming the batch."""
    loader = tdata.DataLoader(tdata.SlidingWindowDataset(torch.tensor(IDS[:41]), 8, 8), 4, shuffle=False,
                              drop_last=False)  # 5 windows: batches of 4 and 1
    with pytest.raises(ValueError, match=r"a batch of 1 rows \(batch_size=4, 5 windows, drop_last=False\) cannot be "
                                         r"split over 2 processes"):
        Trainer(_model(0.0), loader, None, TrainSettings(**SETTINGS), parallel=_OneOfTwo())
