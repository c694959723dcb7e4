"""`gpt-oracle` on bad input: exit status 2, one line on stderr naming the value, no traceback,
nothing written or changed; real results keep their own status (1 for a mismatch).

Every case calls `gpt_oracle.cli.main` in-process and compares a snapshot (every file's bytes)
of the folders involved before and after. The one trained run is `tiny` for 2 steps.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from gpt_oracle.cli import main
from parity_tests.cli_checks import snapshot as _snapshot
from parity_tests.cli_checks import user_error as _user_error
from gpt_oracle.json_file import write_json
from gpt_oracle.user_input import EXIT_FAILED, EXIT_USAGE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = ["--config", "tiny", "--batch-size", "2", "--eval-every", "0", "--sample-tokens", "0", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoints step-00000001 and step-00000002 (do not modify)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--steps", "2", "--checkpoint-every", "1", "--out", str(out), *TRAIN]) == 0
    return out


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


# ---- A: user errors are one line and exit 2 -------------------------------------------------


@pytest.mark.parametrize("argv, needles", [
    (["--config", "bogus"], ["bogus", "tiny"]),
    (["--checkpoint", "/nonexistent"], ["/nonexistent", "no such directory"]),
    (["--batch", "-1"], ["--batch", "-1", ">= 1"]),
    (["--batch", "0"], ["--batch", ">= 1"]),
    (["--time", "-3"], ["--time", "-3"]),
    (["--seed", "-1"], ["--seed", ">= 0"]),
    (["--device", "cuda:99"], ["cuda:99"]),
    (["--device", "bogus"], ["bogus", "cpu"]),
    # --config would be ignored (the checkpoint has its own), typos included
    (["--checkpoint", "/nonexistent", "--config", "tinyy"], ["--config tinyy", "--checkpoint /nonexistent",
                                                             "drop --config"]),
    (["--checkpoint", "/nonexistent", "--config", "tiny"], ["--config tiny", "drop --config"]),
    # a batch of 10**8 allocated 191 GiB and ended in a MemoryError traceback with exit status 1
    (["--batch", "100000000"], ["--batch 100000000 --time 8", "GiB", "more than this machine's", "would fit"]),
])
def test_diff_refuses_bad_input(capsys, argv, needles):
    _user_error(capsys, ["diff", *argv], *needles)


def test_diff_reports_torchs_out_of_memory_in_one_line(capsys, monkeypatch):
    """torch's CPU allocator raises a RuntimeError ("can't allocate memory"), CUDA's
    torch.OutOfMemoryError: each was a traceback with exit status 1; another RuntimeError stays one."""
    import parity_tests.diff as diff_module

    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 123 bytes")

    monkeypatch.setattr(diff_module, "diff_models", oom)
    _user_error(capsys, ["diff"], "--batch 2 --time 8: out of memory", "can't allocate memory")
    monkeypatch.setattr(diff_module, "diff_models", lambda *a, **k: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")))
    _user_error(capsys, ["diff"], "out of memory", "Tried to allocate")
    monkeypatch.setattr(diff_module, "diff_models", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["diff"])


def test_diff_sizes_its_batch_against_the_machines_memory():
    """check_fits refuses what diff_bytes puts over the memory given, naming the batch that fits."""
    from gpt_oracle.commands.check import parity_config
    from gpt_oracle.commands.diff import check_fits, diff_bytes
    from gpt_oracle.user_input import UserError

    cfg = parity_config("small")
    memory = diff_bytes(cfg, 64, 8)
    check_fits(cfg, 64, 8, memory)  # exactly at the limit: fits
    check_fits(cfg, 10**9, 8, None)  # no memory figure from the OS: no refusal
    with pytest.raises(UserError, match=r"--batch 65 --time 8: .* GiB at once, more than .*; a batch of 64 would fit"):
        check_fits(cfg, 65, 8, memory)
    with pytest.raises(UserError, match="even a batch of 1 would not: choose a smaller --time or model"):
        check_fits(cfg, 2, 8, diff_bytes(cfg, 1, 8) - 1)
    assert diff_bytes(cfg, 4, 8) > diff_bytes(cfg, 2, 8) > diff_bytes(cfg, 2, 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", [["diff"], ["check"], ["generate", "--checkpoint", ".", "--prompt", "x"],
                                     ["train", "--config", "tiny", "--out", "OUT"]])
def test_cuda_without_cuda_is_one_line(capsys, command, tmp_path):
    argv = [str(tmp_path / "x") if a == "OUT" else a for a in command]
    _user_error(capsys, [*argv, "--device", "cuda"], "--device cuda", "CUDA", untouched=(tmp_path,))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, needles", [
    (["--data", "/nonexistent.txt"], ["/nonexistent.txt", "No such file"]),
    (["--config", "bogus"], ["bogus", "verdict"]),
    (["--device", "cuda:99"], ["cuda:99"]),
    (["--threads", "-1"], ["--threads", "-1"]),
    (["--threads", "0"], ["--threads", "[1, "]),
    (["--warmup", "-5"], ["--warmup", "-5"]),
    (["--warmup", "50", "--steps", "4"], ["--warmup 50", "4"]),
    (["--eval-every", "-1"], ["--eval-every"]),
    (["--eval-batches", "0"], ["--eval-batches"]),
    (["--checkpoint-every", "-1"], ["--checkpoint-every"]),
    (["--sample-tokens", "-1"], ["--sample-tokens"]),
    (["--sample-tokens", "100000000"], ["--sample-tokens", "100000000", "4096"]),  # hung at the first evaluation
    (["--lr", "-1"], ["--lr", "-1"]),
    (["--lr", "nan"], ["--lr", "nan"]),
    (["--min-lr", "0.5", "--lr", "0.1"], ["--min-lr 0.5", "--lr 0.1"]),
    (["--dropout", "1"], ["--dropout", "[0, 1)"]),
    (["--train-ratio", "1"], ["--train-ratio"]),
    # B: these trained one step (or silently meant something else) before
    (["--steps", "-5"], ["--steps", "-5"]),
    (["--steps", "0"], ["--steps", ">= 1"]),
    (["--epochs", "-3"], ["--epochs", "-3"]),
    (["--stride", "0"], ["--stride", ">= 1"]),
    (["--epochs", "1", "--grad-accum", "100000"], ["--epochs 1", "--grad-accum 100000", "0 optimiser steps"]),
    (["--context-length", "8192"], ["the training text", "too few"]),  # longer than the embedded text
    # F: a prompt the tokenizer refuses crashed at the first evaluation, after run.json was written
    (["--eval-every", "1", "--sample-tokens", "2", "--prompt", "<|endoftext|>"], ["--prompt", "'<|endoftext|>'"]),
    (["--eval-every", "1", "--sample-tokens", "2", "--prompt", "a<|endoftext|>b"], ["--prompt", "special token"]),
    # F: 100000 threads crashed torch after run.json was written
    (["--threads", "100000"], ["--threads", "100000", f"[1, {4 * (os.cpu_count() or 1)}]"]),
    # F: these named no option (TrainSettings.seed ...; "the first 0% of ...")
    (["--seed", str(2**64)], ["--seed", str(2**64), "2**64 - 1"]),
    (["--train-ratio", "0.001"], ["--train-ratio 0.001", "the first 20 characters", "too few"]),
    (["--train-ratio", "0.999"], ["--train-ratio 0.999", "the last 21 characters", "too few"]),
    # --nproc: the torch backend on the CPU, every process with a row of each batch
    (["--nproc", "2", "--backend", "numpy"], ["--nproc 2", "torch backend only"]),
    (["--nproc", "3", "--batch-size", "2"], ["--batch-size 2", "--nproc 3"]),
    (["--nproc", "0"], ["--nproc", "0"]),
])
def test_train_refuses_bad_input_and_writes_nothing(capsys, tmp_path, argv, needles):
    out = tmp_path / "new"
    _user_error(capsys, ["train", "--out", str(out), *TRAIN, *argv], *needles, untouched=(tmp_path,))
    assert not out.exists(), "a refused run created its output folder"


def _truncate(path: Path, n: int = 50) -> None:
    path.write_bytes(path.read_bytes()[:n])


@pytest.mark.parametrize("breaks, needles", [
    (lambda d: _truncate(d / "step-00000002" / "model.safetensors"), ["model.safetensors"]),
    (lambda d: _truncate(d / "step-00000002" / "optimizer.safetensors"), ["optimizer.safetensors"]),
    (lambda d: _truncate(d / "step-00000002" / "trainer_state.json"), ["trainer_state.json", "not valid JSON"]),
    (lambda d: _truncate(d / "run.json"), ["run.json", "not valid JSON"]),
    (lambda d: (d / "latest").write_text("step-00000009\n"), ["latest", "step-00000009", "does not exist"]),
    (lambda d: [shutil.rmtree(p) for p in d.glob("step-*")] and (d / "latest").unlink(), ["no checkpoint"]),
    (lambda d: (d / "run.json").unlink(), ["no run.json"]),
])
def test_resume_of_a_half_written_run_is_one_line(capsys, run_copy, breaks, needles):
    breaks(run_copy)
    _user_error(capsys, ["train", "--resume", str(run_copy)], str(run_copy), *needles, untouched=(run_copy,))


@pytest.mark.parametrize("change, needles", [
    (dict(steps=-5), ["run.json", "--steps", "-5"]),
    (dict(batch_size="x"), ["run.json", "--batch-size", "'x'"]),
    (dict(no_progress="yes"), ["run.json", "no_progress", "true or false"]),
    (dict(config="bogus"), ["run.json", "bogus"]),
    (dict(seed=None), ["run.json", "seed"]),
    (dict(colour="red"), ["run.json", "unknown", "colour"]),
])
def test_resume_checks_run_json_as_the_command_line(capsys, run_copy, change, needles):
    opts = json.loads((run_copy / "run.json").read_text())
    opts = {k: v for k, v in {**opts, **change}.items() if not (k in change and v is None)}  # None: remove
    (run_copy / "run.json").write_text(json.dumps(opts))
    _user_error(capsys, ["train", "--resume", str(run_copy)], *needles, untouched=(run_copy,))


def test_resume_refuses_options_it_would_ignore(capsys, run_copy):
    _user_error(capsys, ["train", "--resume", str(run_copy), "--steps", "9", "--overwrite"], "--steps, --overwrite",
                "run.json", untouched=(run_copy,))
    # an option typed with its default value would be ignored just the same
    _user_error(capsys, ["train", "--resume", str(run_copy), "--backend", "torch"], "--backend", "run.json",
                untouched=(run_copy,))


def _interrupted_with_the_bar(run_copy: Path) -> None:
    """run_copy as a run started with the progress bar and cut off after its first step."""
    opts = json.loads((run_copy / "run.json").read_text())
    (run_copy / "run.json").write_text(json.dumps({**opts, "no_progress": False}))
    shutil.rmtree(run_copy / "step-00000002")
    (run_copy / "latest").write_text("step-00000001\n")


def test_resume_takes_no_progress_which_changes_only_what_is_shown(capsys, run_copy, tmp_path):
    """--no-progress with --resume was refused like an option that changes the run."""
    other = tmp_path / "other"
    shutil.copytree(run_copy, other)
    for folder in (run_copy, other):
        _interrupted_with_the_bar(folder)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_copy), "--no-progress"]) == 0
    quiet = capsys.readouterr().err
    assert main(["train", "--resume", str(other)]) == 0
    shown = capsys.readouterr().err
    assert "train (torch)" in shown, f"the run was started with the bar, and its resume shows none: {shown!r}"
    assert "train (torch)" not in quiet, f"--no-progress still drew the bar: {quiet!r}"
    for folder in (run_copy, other):
        assert (folder / "latest").read_text().strip() == "step-00000002", f"{folder} did not finish its run"
    assert json.loads((run_copy / "run.json").read_text())["no_progress"] is False, "run.json was rewritten"


def test_resume_refuses_a_folder_it_cannot_write_before_training(capsys, run_copy, monkeypatch):
    """On a read-only file system a resume trained, then failed at its first log line with a
    traceback (exit 1). Here the file system's refusal is simulated at the one probe the
    command makes (root ignores permissions, and a read-only mount needs privileges)."""
    import errno
    import tempfile

    from gpt_oracle.commands import train as train_cmd

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(train_cmd, "_build", lambda *a, **k: pytest.fail("the run was built before the check"))
    _user_error(capsys, ["train", "--resume", str(run_copy)], str(run_copy), "cannot write in it",
                "Read-only file system", untouched=(run_copy,))


def test_resume_refuses_a_folder_that_mixes_two_runs(capsys, run_copy):
    """run.json rewritten by another run while the old checkpoints stayed: never continue silently."""
    opts = json.loads((run_copy / "run.json").read_text())
    (run_copy / "run.json").write_text(json.dumps({**opts, "steps": 7}))
    _user_error(capsys, ["train", "--resume", str(run_copy)], "steps 2 vs 7", "mixes two runs",
                untouched=(run_copy,))
    (run_copy / "run.json").write_text(json.dumps({**opts, "config": "verdict"}))
    _user_error(capsys, ["train", "--resume", str(run_copy)], "emb_dim 32 vs 64", "mixes two runs",
                untouched=(run_copy,))


def test_check_validates_everything_before_the_sweep(capsys, tmp_path, monkeypatch):
    from parity_tests import checks

    monkeypatch.setattr(checks, "run_check", lambda **kw: pytest.fail("the sweep ran despite bad input"))
    _user_error(capsys, ["check", "--config", "bogus"], "bogus", "small")
    _user_error(capsys, ["check", "--json", str(tmp_path / "no" / "dir" / "x.json")], "--json", "does not exist",
                untouched=(tmp_path,))
    _user_error(capsys, ["check", "--json", str(tmp_path)], "is a directory", untouched=(tmp_path,))
    _user_error(capsys, ["check", "--device", "bogus"], "--device 'bogus'")  # E: was ~30 ERROR rows
    _user_error(capsys, ["check", "--checkpoint", "/bad"], "/bad")  # E: was reported after the sweep


def test_every_command_takes_a_train_folder_as_checkpoint(capsys, trained):
    """`generate --checkpoint RUN` follows RUN/latest; check, diff and info do the same (they
    once said "RUN/config.json: file not found"), and all read the same checkpoint."""
    latest = trained / (trained / "latest").read_text().strip()
    for argv in (["check", "--config", "tiny", "--dtype", "float64", "--quiet", "--checkpoint", str(trained)],
                 ["diff", "--checkpoint", str(trained)], ["info", str(trained)], ["info", str(latest)]):
        status = main(argv)
        captured = capsys.readouterr()
        assert status == 0, f"{argv}: exit {status}, stderr {captured.err!r}"
    assert main(["info", "--json", str(trained)]) == 0
    from_run = [{k: v for k, v in d.items() if k != "name"} for d in json.loads(capsys.readouterr().out)]
    assert main(["info", "--json", str(latest)]) == 0
    from_latest = [{k: v for k, v in d.items() if k != "name"} for d in json.loads(capsys.readouterr().out)]
    assert from_run == from_latest, f"info of the run folder {from_run} differs from its latest checkpoint's {from_latest}"


def test_tf32_off_cuda_is_refused_by_name(capsys):
    """TF32 is a CUDA matmul mode: on the CPU `check` / `diff --dtype tf32` would be float32
    judged by TF32's looser tolerance, so they refuse it (on CUDA models.run_torch runs it)."""
    for command in ("check", "diff"):
        _user_error(capsys, [command, "--dtype", "tf32"], "--dtype tf32", "--device cpu", "float32")


def test_run_torch_takes_tf32_without_autocast():
    """models.run_torch("tf32") turns TF32 on and autocast off (once: getattr(torch, "tf32")
    failed, so every tf32 model row of `check` on CUDA was an ERROR); on the CPU it is float32."""
    from numpy_ref.config import get_config
    from parity_tests import models

    cfg = get_config("tiny").to_dict()
    params = models.build_numpy_model(cfg, seed=0).params
    ids, targets = models.random_batch(cfg, 2, 8, 0)
    got = {d: models.run_torch(models.build_torch_model(cfg, params, dtype=d), ids, targets, dtype=d)
           for d in ("tf32", "float32")}
    assert got["tf32"].loss == got["float32"].loss, f"CPU tf32 loss {got['tf32'].loss} != float32 {got['float32'].loss}"
    assert not torch.backends.cuda.matmul.allow_tf32, "run_torch left TF32 switched on"


def test_generate_refuses_bad_input(capsys, trained, run_copy):
    common = ["generate", "--prompt", "Every effort", "--checkpoint"]
    _user_error(capsys, [*common, str(trained), "--device", "bogus"], "bogus")
    _user_error(capsys, [*common, str(trained), "--device", "cuda:99"], "cuda:99")
    _user_error(capsys, [*common, str(trained), "--backend", "numpy", "--device", "cuda"], "numpy", "CPU")
    _user_error(capsys, [*common, str(trained), "--seed", "-1"], "--seed", "-1")  # E: named no option
    _user_error(capsys, [*common, str(trained), "--top-p", "1.5", "--temperature", "1"], "--top-p 1.5")
    _user_error(capsys, [*common, str(trained), "--temperature", "-1"], "--temperature")
    _user_error(capsys, [*common, str(trained.parent / "nope")], "nope", "no such directory")
    (run_copy / "latest").write_text("step-00000009\n")
    _user_error(capsys, [*common, str(run_copy)], "'latest' names", "step-00000009")  # E: said "no config.json"
    _user_error(capsys, [*common[:2], "", "--checkpoint", str(trained)], "--prompt", "at least one token")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_generate_reports_an_id_past_the_tokenizer_as_one_line(capsys, tmp_path, backend):
    """A checkpoint with a padded vocabulary (50304, as some GPT-2 ports use) that samples an id
    the GPT-2 tokenizer lacks: one line naming the id and both sizes, not a traceback."""
    from torch_impl.config import GPTConfig
    from torch_impl.model import GPTModel

    cfg = GPTConfig(vocab_size=50304, context_length=8, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.0)
    model = GPTModel(cfg, seed=0)
    with torch.no_grad():  # logits = ln_f(x) @ head.T with ln_f(x) = 1: id 50300 wins every greedy step
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[50300] = 1.0
    model.save_pretrained(tmp_path / "padded")
    _user_error(capsys, ["generate", "--prompt", "Every effort", "--checkpoint", str(tmp_path / "padded"),
                         "--backend", backend, "--max-new-tokens", "2"],
                "50300", "vocab_size is 50304", "50257", untouched=(tmp_path,))


def _config_dir(tmp_path: Path, ours) -> str:
    d = tmp_path / "ckpt"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"gpt_oracle": ours}))
    return str(d)


def test_info_reports_bad_configs_on_stderr(capsys, tmp_path):
    from numpy_ref.config import get_config

    full = get_config("tiny").to_dict()
    _user_error(capsys, ["info", _config_dir(tmp_path / "a", {**full, "n_layers": 2.5})], "n_layers", "2.5")
    _user_error(capsys, ["info", _config_dir(tmp_path / "b", [])], "'gpt_oracle'", "list")  # B: was gpt2-small
    _user_error(capsys, ["info", _config_dir(tmp_path / "c", {"n_layers": 2})], "lacks", "emb_dim")
    _user_error(capsys, ["info", "gpt2-huge"], "gpt2-huge", "gpt2-small")  # E: on stderr, not stdout
    assert main(["info", _config_dir(tmp_path / "d", full)]) == 0 and "L=2" in capsys.readouterr().out


def test_help_documents_the_exit_statuses(capsys):
    for command in ("check", "diff", "info", "train", "generate", "bench"):
        with pytest.raises(SystemExit) as stop:
            main([command, "--help"])
        assert stop.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "exit status: 0 success" in text and "2 bad input" in text, (command, text)
    assert main(["diff", "--no-such-option"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--no-such-option" in err, err


# ---- C: a new run never lands in a folder that holds one ------------------------------------


def test_resuming_a_finished_run_writes_nothing(capsys, run_copy):
    """--resume on a run at its last step: exit 0, a line saying so, and no new checkpoint (fit()
    would save step N again as step-N-1 and move `latest` to it, ~1.9 GB a time at 124M)."""
    before = _snapshot(run_copy)
    assert main(["train", "--resume", str(run_copy)]) == 0
    out = capsys.readouterr().out
    assert "already finished: step 2 of 2" in out and "step-00000002" in out, out
    assert _snapshot(run_copy) == before, "resuming a finished run changed its folder"


def test_train_threads_is_refused_for_the_numpy_backend(capsys, tmp_path):
    _user_error(capsys, ["train", "--backend", "numpy", "--threads", "2", "--steps", "1", "--out", str(tmp_path / "r"),
                         *TRAIN], "--threads 2", "numpy", untouched=(tmp_path,))


def test_train_refuses_an_out_folder_that_holds_a_run(capsys, run_copy):
    line = _user_error(capsys, ["train", "--steps", "1", "--out", str(run_copy), *TRAIN], "already holds",
                       "--resume", "--overwrite", untouched=(run_copy,))
    assert "run.json" in line and "step-00000001" in line, line
    # --overwrite with a bad option deletes nothing: the options are checked first.
    _user_error(capsys, ["train", "--steps", "1", "--warmup", "9", "--overwrite", "--out", str(run_copy), *TRAIN],
                "--warmup 9", untouched=(run_copy,))


def test_overwrite_replaces_the_old_run_and_keeps_other_files(capsys, run_copy):
    (run_copy / "notes.txt").write_text("mine")
    assert main(["train", "--steps", "1", "--overwrite", "--out", str(run_copy), *TRAIN]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in run_copy.glob("step-*")) == ["step-00000001"]
    assert (run_copy / "latest").read_text().strip() == "step-00000001"
    assert json.loads((run_copy / "run.json").read_text())["steps"] == 1
    assert [json.loads(line)["step"] for line in (run_copy / "log.jsonl").read_text().splitlines()] == [1]
    assert (run_copy / "notes.txt").read_text() == "mine"


def test_run_contents_lists_checkpoints_past_step_99999999_as_the_trainer_names_them(tmp_path):
    """The trainer names step 10**8 and later with nine or more digits (train_run.CHECKPOINT_NAME);
    --overwrite once listed (and so deleted) only eight-digit ones, leaving those behind."""
    from gpt_oracle.run_folder import run_contents
    from torch_impl.train_run import checkpoint_order

    names = ["step-00000010", "step-00000010-1", "step-100000000", "step-1000000000-2"]
    for name in names + ["step-x", "notes"]:
        (tmp_path / name).mkdir()
    assert all(checkpoint_order(n) is not None for n in names), "the trainer does not take these names"
    listed = run_contents(tmp_path)
    assert sorted(listed) == sorted(names), f"run_contents listed {listed}, the trainer's checkpoints are {names}"


# ---- D: check --json is strict JSON, replaced whole or not at all ---------------------------


def _fake_rows(ok: bool):
    from parity_tests.checks import Row

    return [Row("demo ok", "float64", 0.0, 0.0, "exact", "ok"),
            Row("demo error", "float64", float("nan"), float("inf"), "-", "ok" if ok else "ERROR", "boom")]


@pytest.mark.parametrize("ok", [True, False])
def test_check_json_is_strict_and_keeps_the_status(capsys, tmp_path, monkeypatch, ok):
    from parity_tests import checks

    monkeypatch.setattr(checks, "run_check", lambda **kw: _fake_rows(ok))
    path = tmp_path / "check.json"
    path.write_text("old")
    assert main(["check", "--quiet", "--json", str(path)]) == (0 if ok else EXIT_FAILED)
    capsys.readouterr()
    text = path.read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["ok"] is ok and data["rows"][1]["max_abs"] is None and data["rows"][1]["max_rel"] is None, data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["check.json"], "a temporary file was left"


def test_an_interrupted_json_write_keeps_the_old_file(tmp_path, monkeypatch):
    import os

    path = tmp_path / "check.json"
    path.write_text('{"old": true}\n')

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"new": [1.0, float("nan")]})
    assert path.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["check.json"], "a temporary file was left"
    monkeypatch.undo()
    write_json(path, {"new": [1.0, float("nan"), float("-inf")]})
    assert json.loads(path.read_text()) == {"new": [1.0, None, None]}


def test_resume_reads_the_zeros_earlier_versions_wrote_for_a_default(capsys, run_copy):
    """Earlier versions of `train` wrote 0 for "the default" in stride, threads, context_length and
    steps; resuming such a run reads them as the defaults they meant (the run's own checkpointed
    settings still have to match, so a 0 that meant something else is still refused)."""
    opts = json.loads((run_copy / "run.json").read_text())
    (run_copy / "run.json").write_text(json.dumps(dict(opts, stride=0, threads=0)))
    code = main(["train", "--resume", str(run_copy)])
    err = capsys.readouterr().err
    assert code == 0, f"resume of a run.json with legacy zeros exited {code}: {err}"


def test_json_output_into_a_fifo_is_written_into_not_replaced(tmp_path):
    """A target that is not a regular file (a FIFO, /dev/stdout) gets the text; a rename over it
    would replace it with a regular file and the reader would see nothing."""
    import os
    import threading

    from gpt_oracle.json_file import write_json

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)  # never blocks the exit
    reader.start()
    write_json(fifo, {"a": float("nan"), "b": 1})
    reader.join(timeout=10)
    assert got and json.loads(got[0]) == {"a": None, "b": 1}, f"the reader got {got!r}"
    assert fifo.is_fifo(), "the FIFO was replaced by a regular file"


# ---- an empty path is refused by name, not read as the current folder or as "not given" -------


@pytest.mark.parametrize("argv", [
    ["check", "--checkpoint", ""], ["check", "--json", ""], ["diff", "--checkpoint", ""],
    ["generate", "--prompt", "x", "--checkpoint", ""], ["bench", "--quick", "--out", ""],
    ["train", "--steps", "1", *TRAIN, "--out", ""], ["train", "--steps", "1", *TRAIN, "--resume", ""],
    ["train", "--steps", "1", *TRAIN, "--data", ""],
], ids=lambda argv: f"{argv[0]} {argv[-2]}")
def test_an_empty_path_is_refused_naming_the_option(capsys, tmp_path, monkeypatch, argv):
    """`--checkpoint "$UNSET"`: `if args.checkpoint:` skipped it (check ran without the checkpoint,
    wrote no --json), Path("") is the current folder (generate read it, train --out trained into
    runs/train-torch, --resume "" started a new run), and --data "" trained on the embedded text."""
    from parity_tests import checks

    monkeypatch.setattr(checks, "run_check", lambda **kw: pytest.fail("the sweep ran despite an empty path"))
    monkeypatch.chdir(tmp_path)
    _user_error(capsys, argv, f"argument {argv[-2]}: an empty path", untouched=(tmp_path,))
    assert list(tmp_path.iterdir()) == [], f"{argv} wrote {[p.name for p in tmp_path.iterdir()]}"


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`gpt-oracle info | head -2` ended in a BrokenPipeError traceback. The reader here closes
    the pipe before the command writes (it takes ~0.3 s to start), so every write finds it closed."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "gpt_oracle", "info", "--all"], cwd=Path(__file__).parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    status = proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipeError" not in err, f"stderr: {err}"
    assert err == "" and status == 0, f"exit status {status}, stderr {err!r}"


def test_a_pipe_closed_while_a_command_runs_is_one_line_not_a_traceback(capsys):
    """Output a command prints before its result (progress, a FIFO it writes) can meet a closed
    pipe too: exit 141, as a shell reports a process that SIGPIPE ended, and one line saying so."""
    from gpt_oracle.user_input import EXIT_BROKEN_PIPE, reports_user_errors

    def run(args):
        raise BrokenPipeError(32, "Broken pipe")

    run.__module__ = "gpt_oracle.commands.train"
    assert reports_user_errors(run)(None) == EXIT_BROKEN_PIPE == 141
    err = capsys.readouterr().err
    assert err == "gpt-oracle train: stopped: Broken pipe (the reader of its output left)\n", repr(err)


# ---- F: checked before anything is written or deleted; runs that resume anywhere -------------


def test_overwrite_with_a_prompt_the_tokenizer_refuses_keeps_the_old_run(capsys, run_copy):
    """The sample prompt was first encoded at the first evaluation: --overwrite had deleted the old
    run by then, and the new one stopped with a traceback after writing run.json."""
    _user_error(capsys, ["train", "--steps", "1", "--overwrite", "--out", str(run_copy), *TRAIN, "--eval-every", "1",
                         "--sample-tokens", "2", "--prompt", "<|endoftext|>"], "--prompt", "special token",
                untouched=(run_copy,))


def test_train_names_a_data_file_that_is_not_utf8(capsys, tmp_path):
    data = tmp_path / "latin1.txt"
    data.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    _user_error(capsys, ["train", "--steps", "1", "--data", str(data), "--out", str(tmp_path / "r"), *TRAIN],
                f"--data {data}", "not UTF-8", "0xe9", untouched=(tmp_path,))
    assert not (tmp_path / "r").exists(), "a refused run created its output folder"


def _interrupted_run(capsys, tmp_path: Path, monkeypatch, data: str) -> Path:
    """A 2-step run on `data` (as typed, from tmp_path), cut off after its first checkpoint."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--steps", "2", "--checkpoint-every", "1", "--data", data, "--out", "run", *TRAIN]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    shutil.rmtree(run / "step-00000002")
    (run / "latest").write_text("step-00000001\n")
    return run


def test_run_json_keeps_the_data_path_absolute_so_resume_works_from_any_folder(capsys, tmp_path, monkeypatch):
    """run.json kept --data as typed: `--resume` from another working directory read another file
    (or none). A run.json written before keeps its relative path, read as before."""
    from numpy_ref.data import load_verdict

    (tmp_path / "text.txt").write_text(load_verdict(), encoding="utf-8")
    run = _interrupted_run(capsys, tmp_path, monkeypatch, "text.txt")
    saved = json.loads((run / "run.json").read_text())["data"]
    assert saved == str(tmp_path / "text.txt"), f"run.json keeps --data as {saved!r}, not the absolute path"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code = main(["train", "--resume", str(run)])
    err = capsys.readouterr().err
    assert code == 0, f"--resume from another folder exited {code}: {err}"
    assert (run / "latest").read_text().strip() == "step-00000002", "the resumed run did not finish"

    old = _interrupted_run(capsys, tmp_path / "elsewhere", monkeypatch, "../text.txt")
    opts = json.loads((old / "run.json").read_text())
    (old / "run.json").write_text(json.dumps(dict(opts, data="../text.txt")))  # as earlier versions wrote it
    code = main(["train", "--resume", str(old)])
    err = capsys.readouterr().err
    assert code == 0, f"--resume of a run.json with a relative --data exited {code}: {err}"


def test_resume_refuses_a_changed_validation_text(capsys, tmp_path, monkeypatch):
    """Only the training batches were fingerprinted: a --data file whose last tenth (the validation
    text) changed resumed silently, and its evaluations no longer compared with the earlier ones.
    A run.json without the fingerprint (earlier versions) is compared by what it has."""
    from numpy_ref.data import load_verdict

    text = load_verdict()
    data = tmp_path / "text.txt"
    data.write_text(text, encoding="utf-8")
    run = _interrupted_run(capsys, tmp_path, monkeypatch, str(data))
    data.write_text(text[:-300] + text[-300:].swapcase(), encoding="utf-8")  # only the validation part changes
    _user_error(capsys, ["train", "--resume", str(run)], f"--resume {run}", "validation text", str(data),
                "changed", untouched=(tmp_path,))
    opts = json.loads((run / "run.json").read_text())
    del opts["validation_fingerprint"]
    (run / "run.json").write_text(json.dumps(opts))
    # The checkpoint's trainer state carries the fingerprint too (the library's own check)...
    _user_error(capsys, ["train", "--resume", str(run)], f"--resume {run}", "the validation data differ",
                untouched=(tmp_path,))
    # ... and a run from before either (neither holds one) is compared by what it has.
    for state_file in run.glob("step-*/trainer_state.json"):
        state = json.loads(state_file.read_text())
        del state["data"]["val_fingerprint"]
        state_file.write_text(json.dumps(state))
    code = main(["train", "--resume", str(run)])
    err = capsys.readouterr().err
    assert code == 0, f"--resume of a run without validation fingerprints exited {code}: {err}"


def test_overwrite_unlinks_a_linked_checkpoint_and_leaves_its_target(capsys, run_copy, tmp_path):
    """A step-* entry that is a symbolic link to a folder: rmtree refused it after run.json, the log,
    `latest` and the other checkpoints were gone. The link goes, what it points to stays."""
    target = tmp_path / "kept"
    target.mkdir()
    (target / "weights.bin").write_text("mine")
    (run_copy / "step-00000099").symlink_to(target, target_is_directory=True)
    code = main(["train", "--steps", "1", "--overwrite", "--out", str(run_copy), *TRAIN])
    err = capsys.readouterr().err
    assert code == 0, f"--overwrite of a run with a linked checkpoint exited {code}: {err}"
    assert sorted(p.name for p in run_copy.glob("step-*")) == ["step-00000001"], list(run_copy.iterdir())
    assert (target / "weights.bin").read_text() == "mine", "--overwrite deleted what a link pointed to"


def test_overwrite_checks_every_folder_before_deleting_anything(capsys, run_copy, monkeypatch):
    """A checkpoint folder whose files cannot be deleted (checked by permission; the test runs as
    any user, so os.access is made to say no): refused naming it, and nothing of the run deleted."""
    locked = str(run_copy / "step-00000002")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: str(path) != locked and real_access(path, mode, **kw))
    _user_error(capsys, ["train", "--steps", "1", "--overwrite", "--out", str(run_copy), *TRAIN], locked,
                "no permission", untouched=(run_copy,))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_generate_checks_the_prompt_against_the_checkpoints_vocabulary(capsys, tmp_path, backend):
    """A tiny checkpoint (V=101) and a prompt of GPT-2 ids past it: a traceback from the model's id
    check, now one line naming the id and the vocabulary."""
    from torch_impl.config import get_config
    from torch_impl.model import GPTModel

    GPTModel(get_config("tiny"), seed=0).save_pretrained(tmp_path / "tiny")
    _user_error(capsys, ["generate", "--prompt", "Every effort", "--checkpoint", str(tmp_path / "tiny"),
                         "--backend", backend], "--prompt: token id 6109 is outside the checkpoint's vocabulary of 101",
                untouched=(tmp_path,))


def test_generate_caps_max_new_tokens_and_draws_only_to_sample(capsys, trained, monkeypatch):
    """--max-new-tokens 10**12 asked numpy for 7 TiB of uniform draws, greedy decoding included.
    Now a cap, named; greedy decoding draws nothing; sampled tokens are those of the draws
    `numpy.random.default_rng(seed).random((n, 1))` as before."""
    import numpy as np

    common = ["generate", "--prompt", "Every effort", "--checkpoint", str(trained)]
    _user_error(capsys, [*common, "--max-new-tokens", str(10**12)], "--max-new-tokens", str(10**12), "1000000")

    drawn = []
    real_rng = np.random.default_rng

    def counting_rng(seed):
        drawn.append(seed)
        return real_rng(seed)

    monkeypatch.setattr(np.random, "default_rng", counting_rng)
    assert main([*common, "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    assert drawn == [], f"greedy decoding drew uniform numbers (seeds {drawn})"
    monkeypatch.undo()

    from torch_impl.generate import generate
    from torch_impl.model import GPTModel
    from torch_impl.tokenizer import get_encoding

    encoding = get_encoding("gpt2")
    model = GPTModel.from_pretrained(trained / (trained / "latest").read_text().strip())
    coins = torch.from_numpy(np.random.default_rng(7).random((6, 1)))
    ids = torch.tensor([encoding.encode("Every effort")])
    want = encoding.decode(generate(model, ids, 6, temperature=1.0, coins=coins, eos_id=encoding.eot_token)[0].tolist())
    assert main([*common, "--max-new-tokens", "6", "--temperature", "1", "--seed", "7"]) == 0
    got = capsys.readouterr().out.rstrip("\n")
    assert got == want.split("<|endoftext|>")[0], f"seed 7 sampled {got!r}, its draws give {want!r}"


@pytest.mark.parametrize("backend", ["torch"])  # numpy_ref's float32 layer norm maps this overflow to 0, not NaN
def test_generate_from_weights_that_overflow_is_one_line(capsys, tmp_path, backend):
    """A diverged run's last good checkpoint (weights near 1e30, finite in the file) gave NaN
    logits and the sampler's ValueError as a traceback (exit 1; generate documents 0 and 2)."""
    from numpy_ref.config import GPTConfig
    from numpy_ref.model import GPTModel

    model = GPTModel(GPTConfig(vocab_size=50257, context_length=8, emb_dim=8, n_heads=2, n_layers=1), seed=0)
    for k in model.params:
        if k.endswith("weight") and model.params[k].ndim == 2:
            model.params[k] *= 1e30
    model.save_pretrained(tmp_path / "big")
    _user_error(capsys, ["generate", "--checkpoint", str(tmp_path / "big"), "--prompt", "hi", "--max-new-tokens", "2",
                         "--backend", backend, "--dtype", "float32"], "the model's logits are not finite",
                "from a training run that diverged")


@pytest.mark.parametrize("error", [RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                                "28948032000 bytes"), MemoryError("Unable to allocate 27 GiB")],
                         ids=["torch", "numpy"])
def test_a_batch_too_large_for_memory_is_one_line_and_leaves_no_run(capsys, tmp_path, monkeypatch, error):
    """A batch too large gave the allocator's traceback (exit 1) and left run.json, so the same
    --out with a smaller batch was refused as holding a run. (The allocation failure is raised at
    fit: a real one would take the machine's memory first.)"""
    from numpy_ref.train import Trainer as NumpyTrainer
    from torch_impl.train import Trainer as TorchTrainer

    def fails(self):
        raise error

    for cls in (NumpyTrainer, TorchTrainer):
        monkeypatch.setattr(cls, "fit", fails)
    backend = "torch" if isinstance(error, RuntimeError) else "numpy"
    out = tmp_path / "big"
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    for target in (out, tmp_path / "kept"):
        status = main(["train", "--backend", backend, "--steps", "1", "--batch-size", "8", "--no-progress",
                       "--out", str(target)])
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # after the line saying what is trained
        assert status == 2 and "Traceback" not in err, err
        assert last.startswith("gpt-oracle train: error: --batch-size 8: out of memory at step 1") and \
            "smaller batch" in last, last
    assert not out.exists(), f"a run that failed before its first checkpoint left {sorted(out.iterdir())}"
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["notes.txt"], "the user's own file must stay"
