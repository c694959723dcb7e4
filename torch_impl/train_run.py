"""The bookkeeping of a training run: settings, the resumable batch stream, run directories.

A run directory (`--out DIR`) holds `log.jsonl`, `loss.png` (when the trainer has a plot
function), one sub-directory per checkpoint, `step-00000010/` (a model checkpoint, `config.json`
+ `model.safetensors`, plus the trainer state, `trainer_state.json` + `optimizer.safetensors`,
both written by torch_impl/checkpoint.py) and `latest`, a one-line file naming the newest complete
checkpoint. A checkpoint directory is written in full before `latest` is switched to it (write
a temporary file, then rename), so a run killed at any moment leaves `latest` pointing at a
complete checkpoint. The switch is made durable before anything is deleted: latest.tmp is
fsynced, renamed onto `latest`, and the run directory fsynced (the rename itself on disk); only
then are older checkpoints pruned, so that after a power cut `latest` never names a deleted
directory. Kept: the checkpoint `latest` names, the one it named before, and the newest others by
step number up to `keep` (2: those two); a directory a killed save left behind goes first. The
checkpoint `latest` names is never rewritten: saving the same step again (a finished run resumed)
writes `step-00000010-1/` and switches to it.
numpy_ref/train_run.py is the same file for the NumPy tree.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import math
import numbers
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from torch_impl.train_log import append_log


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm is NaN or infinite: training stops."""


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 100  # optimiser steps in total (the schedule's total_steps)
    grad_accum: int = 1  # micro-batches per optimiser step
    optimizer: str = "adamw"  # "adamw" or "sgd"
    max_lr: float = 4e-4
    min_lr: float = 4e-5  # the cosine ends here
    warmup_steps: int = 0
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0  # SGD only
    decay: str = "gpt2"  # which parameters decay: "gpt2" (linear weights) or "all"
    grad_clip: float | None = 1.0  # global-norm clipping; None = off
    eval_every: int = 0  # steps between evaluations; 0 = never
    eval_batches: int = 5  # batches of each set per evaluation
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
    sample_prompt: str = "Every effort moves you"
    sample_tokens: int = 20  # greedy tokens generated at each evaluation
    seed: int = 0  # dropout masks
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "grad_accum", "eval_batches", "warmup_steps", "eval_every", "checkpoint_every",
                     "sample_tokens", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"TrainSettings.{name} must be an int, got {value!r} ({type(value).__name__})")
        for name in ("max_lr", "min_lr", "weight_decay", "eps", "momentum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):  # "0.1" or True: a wrong type
                raise TypeError(f"TrainSettings.{name} must be a number, got {value!r} ({type(value).__name__})")
            if not 0 <= value < math.inf:
                raise ValueError(f"TrainSettings.{name} must be a finite number >= 0, got {value!r}")
        if self.eps == 0 and self.optimizer == "adamw":
            raise ValueError("TrainSettings.eps must be > 0: with eps = 0 a weight whose gradient has been 0 so "
                             "far gets 0/0 = NaN from AdamW")
        for name in ("optimizer", "decay", "sample_prompt"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"TrainSettings.{name} must be a str, got {getattr(self, name)!r}")
        if not isinstance(self.progress, bool):
            raise TypeError(f"TrainSettings.progress must be True or False, got {self.progress!r}")
        if self.grad_clip is not None and (isinstance(self.grad_clip, bool)  # True is no clip norm of 1.0
                                           or not isinstance(self.grad_clip, numbers.Real)):
            raise TypeError(f"TrainSettings.grad_clip must be a number or None, got {self.grad_clip!r}")
        if self.min_lr > self.max_lr:
            raise ValueError(f"TrainSettings.min_lr={self.min_lr} exceeds max_lr={self.max_lr} (the cosine "
                             f"goes from max_lr down to min_lr)")
        if not (isinstance(self.betas, (list, tuple)) and len(self.betas) == 2
                and all(isinstance(b, numbers.Real) and not isinstance(b, bool) for b in self.betas)):
            raise TypeError(f"TrainSettings.betas must be two numbers, got {self.betas!r}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"TrainSettings.betas must be two numbers in [0, 1), got {self.betas!r}")
        if not self.momentum < 1:
            raise ValueError(f"TrainSettings.momentum must be < 1, got {self.momentum!r}")
        for name in ("steps", "grad_accum", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainSettings.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainSettings.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**64:  # both trees' generators take a 64-bit seed (torch's refuses more)
            raise ValueError(f"TrainSettings.seed must be in [0, 2**64), got {self.seed}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"TrainSettings.warmup_steps={self.warmup_steps} exceeds steps={self.steps}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, numbers.Real)
                                               and 0 < self.grad_clip < math.inf):
            raise ValueError(f"TrainSettings.grad_clip must be a finite number > 0 or None, got {self.grad_clip!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"TrainSettings.optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.decay not in ("gpt2", "all"):  # refused here, not when the trainer builds its optimiser
            raise ValueError(f"TrainSettings.decay must be 'gpt2' or 'all', got {self.decay!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainSettings key(s) {unknown}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


class BatchStream:
    """Batches of a DataLoader, epoch after epoch, with a position (epoch, index) to resume at.

    The loader must be fresh (never iterated): epoch k is its k-th `iter()`, which is what makes
    `seek` possible: it replays the shuffles of epochs 0 .. k (drawing no other randomness). A
    loader that counts its epochs (`epochs_drawn`, as data.py's does) is refused if it is not.
    """

    def __init__(self, loader) -> None:
        drawn = getattr(loader, "epochs_drawn", 0)
        if drawn:  # its next shuffle is not epoch 0's: a resumed run would see other batches
            raise ValueError(f"BatchStream needs a fresh DataLoader; this one was already iterated {drawn} "
                             f"time(s), so its shuffles would not replay from epoch 0")
        self.loader = loader
        self.fingerprint = data_fingerprint(loader)  # saved with the position; a resume compares it
        self.epoch = 0  # the epoch the next batch comes from
        self.index = 0  # the position of the next batch within it
        self._batches = None
        self._drawn = -1  # the last epoch whose order was drawn from the loader

    def _draw_until(self, epoch: int) -> None:
        while self._drawn < epoch:
            self._batches = list(iter(self.loader))
            self._drawn += 1
            if not self._batches:
                raise ValueError(f"epoch {self._drawn} of the DataLoader has no batches "
                                 f"({len(self.loader.dataset)} windows, batch_size={self.loader.batch_size})")

    def next(self):
        self._draw_until(self.epoch)
        if self.index >= len(self._batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._draw_until(self.epoch)
        batch = self._batches[self.index]
        self.index += 1
        return batch

    def seek(self, epoch: int, index: int) -> None:
        """Position the stream at batch `index` of epoch `epoch`; `index` may equal the batches
        per epoch (the end of that epoch: the next batch opens the following one)."""
        self.epoch, self.index = self.check_position(epoch, index)

    def check_position(self, epoch: int, index: int) -> tuple[int, int]:
        """(epoch, index) as ints if `seek` would take them, else its error; nothing changes."""
        if self._drawn >= 0:
            raise RuntimeError("BatchStream.seek needs a fresh stream (nothing drawn yet)")
        for name, value in (("epoch", epoch), ("index", index)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"BatchStream.seek: {name} must be an int, got {value!r}")
            if value < 0:
                raise ValueError(f"BatchStream.seek: {name} must be >= 0, got {value}")
        per_epoch = len(self.loader)
        if index > per_epoch:  # a position saved with other data, batch size or drop_last
            raise ValueError(f"BatchStream.seek: batch index {index} is past the end of an epoch of "
                             f"{per_epoch} batches")
        return int(epoch), int(index)


def data_fingerprint(loader) -> str | None:
    """sha256 of what a BatchStream draws: the dataset's windows (inputs and targets, as
    little-endian int64) and the loader's batch size, drop_last, shuffle and seed. Equal data
    give equal fingerprints in both trees. None for a loader without such a dataset (nothing to
    compare: the position check of `seek` still applies)."""
    ds = getattr(loader, "dataset", None)
    if getattr(ds, "inputs", None) is None or getattr(ds, "targets", None) is None:
        return None
    digest = hashlib.sha256()
    digest.update(repr((tuple(ds.inputs.shape), getattr(loader, "batch_size", None), getattr(loader, "drop_last", None),
                        getattr(loader, "shuffle", None), getattr(loader, "seed", None))).encode())
    for ids in (ds.inputs, ds.targets):  # (N, T) each
        digest.update(ids.to(torch.int64).contiguous().cpu().numpy().astype("<i8").tobytes())
    return digest.hexdigest()


def check_same_data(saved: str | None, current: str | None, which: str = "training") -> None:
    """ValueError when a checkpoint's data fingerprint and this run's differ (either missing:
    an older checkpoint or a custom loader, nothing to compare). `which`: "training" or
    "validation" (whose batches the evaluations are the mean over)."""
    if saved and current and saved != current:
        raise ValueError(f"the {which} data differ from the checkpoint's (fingerprint {current[:12]} vs saved "
                         f"{saved[:12]}): another text, batch size, drop_last, shuffle or seed; resuming would "
                         f"{'train on other batches' if which == 'training' else 'evaluate on other batches'} "
                         f"than the run it continues")


def check_same_model(saved_config, saved_dtype: str | None, config, dtype: str) -> None:
    """ValueError naming every GPTConfig field, and the dtype, in which the model given to a
    resume differs from the checkpoint's (its config.json; the trainer state's dtype). Shapes
    alone let most of them through: drop_rate, ln_eps or n_heads (at the same emb_dim) change
    what is trained, not a weight's shape, and a float64 run resumed into a float32 model would
    drop the exact weights saved beside its float32 checkpoint. None: nothing saved to compare."""
    differ = []
    if saved_config is not None:
        saved, given = saved_config.to_dict(), config.to_dict()
        differ = [f"{k}: saved {saved.get(k)!r}, given {given[k]!r}" for k in given if saved.get(k) != given[k]]
    if saved_dtype is not None and saved_dtype != dtype:
        differ.append(f"dtype: saved {saved_dtype}, given {dtype}")
    if differ:
        raise ValueError(f"the checkpoint holds another model than the one given to resume it ({'; '.join(differ)}); "
                         f"make the model with the saved config and dtype")


def fixed_batches(loader, n: int) -> list:
    """The loader's first `n` batches, unshuffled (the same every time): windows 0 .. B-1, B .. 2B-1,
    ...; a last short batch is kept unless the loader drops it. Fewer than `n` if the dataset
    holds fewer (as the book's `calc_loss_loader`)."""
    ds, B = loader.dataset, loader.batch_size
    full, rest = divmod(len(ds), B)
    sizes = [B] * full + ([rest] if rest and not getattr(loader, "drop_last", False) else [])
    if not sizes:
        raise ValueError(f"no batch to evaluate: {len(ds)} windows, batch_size={B}, "
                         f"drop_last={getattr(loader, 'drop_last', False)}")
    batches = []
    for i, size in enumerate(sizes[:n]):
        items = [ds[j] for j in range(i * B, i * B + size)]
        batches.append(tuple(_stack([it[k] for it in items]) for k in (0, 1)))  # (B, T) each
    return batches


def _stack(rows):
    import torch

    return torch.stack([torch.as_tensor(r) for r in rows])


# ---- run directories ------------------------------------------------------------------------


def latest_checkpoint(run_dir) -> Path | None:
    """The newest complete checkpoint under `run_dir`, or `run_dir` itself if it is one."""
    run_dir = Path(run_dir)
    pointer = run_dir / "latest"
    if pointer.is_file():
        return run_dir / pointer.read_text(encoding="utf-8").strip()
    if (run_dir / "trainer_state.json").is_file():
        return run_dir
    return None


def save_run(out_dir, step: int, config, params, state: dict, tensors: dict, *, backend: str, keep: int = 2) -> Path:
    from torch_impl.checkpoint import save_checkpoint, save_trainer_state

    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"save_run: keep must be an int >= 1 (the checkpoint 'latest' names), got {keep!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pointer = out_dir / "latest"
    live = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
    base = name = f"step-{step:08d}"
    k = 0
    while name == live:  # never rewrite the checkpoint 'latest' names (a finished run resumed saves its step
        k += 1           # again): write a sibling, then switch, so a kill midway leaves 'latest' whole
        name = f"{base}-{k}"
    ckpt = out_dir / name
    if ckpt.exists():  # a directory nothing points to, e.g. from a save killed midway
        shutil.rmtree(ckpt)
    save_checkpoint(ckpt, config, params)
    save_trainer_state(ckpt, {**state, "backend": backend}, tensors)
    switch_latest(out_dir, name)
    prune_checkpoints(out_dir, keep, current=name, previous=live)  # only once the switch is on disk
    return ckpt


def switch_latest(out_dir: Path, name: str) -> None:
    """Point `latest` at checkpoint `name`, durably: latest.tmp written and fsynced, renamed onto
    `latest` (the switch is one atomic rename), then the directory fsynced, which puts the rename
    itself on disk. Without the first fsync a power cut can leave `latest` empty; without the
    second, naming a checkpoint that the pruning after it has deleted."""
    tmp = out_dir / "latest.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / "latest")
    fsync_directory(out_dir)


def fsync_directory(directory: Path) -> None:
    """fsync a directory (POSIX: makes the renames in it durable). Nothing to do where a
    directory cannot be opened (Windows) or its file system cannot sync one (EINVAL)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


CHECKPOINT_NAME = re.compile(r"step-(\d+)(?:-(\d+))?")


def checkpoint_order(name: str) -> tuple[int, int] | None:
    """(step, k) of a checkpoint directory `step-NNNNNNNN` (k = 0) or `step-NNNNNNNN-k`, as numbers
    (as text, `-10` sorts before `-2`, and step 100000000, nine digits, before 99999999); None for
    a name that is not a checkpoint's."""
    match = CHECKPOINT_NAME.fullmatch(name)
    return None if match is None else (int(match[1]), int(match[2] or 0))


def prune_checkpoints(out_dir: Path, keep: int, *, current: str, previous: str | None) -> None:
    """Delete the checkpoint directories of `out_dir` beyond `keep`: `current` (what `latest`
    names) is kept first, then `previous` (what it named before this save: the last good one
    should the new one prove bad), then the others newest step first. So a directory a killed
    save left behind, whatever its step, never displaces the previous checkpoint."""
    found = {p.name: p for p in out_dir.iterdir() if p.is_dir() and checkpoint_order(p.name) is not None}
    others = sorted((n for n in found if n not in (current, previous)), key=checkpoint_order, reverse=True)
    kept = [n for n in (current, previous) if n in found]  # always, whatever `keep` is (docs/design.md)
    ranked = kept + others
    for name in ranked[max(keep, len(kept)):]:
        shutil.rmtree(found[name], ignore_errors=True)


def load_run(run_dir, *, backend: str):
    """(settings, model config, trainer state, trainer tensors, model params) of the newest checkpoint."""
    from torch_impl.checkpoint import load_checkpoint, load_trainer_state

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from (no 'latest' file, no trainer_state.json)")
    state, tensors = load_trainer_state(ckpt)
    if state.get("backend", backend) != backend:
        raise ValueError(f"{ckpt} was written by the {state['backend']} trainer; resume it with --backend "
                         f"{state['backend']}")
    config, params = load_checkpoint(ckpt)
    return TrainSettings.from_dict(state["settings"]), config, state, tensors, params


# ---- evaluation and the end of a run --------------------------------------------------------


@dataclass
class TrainResult:
    ok: bool
    message: str
    step: int
    tokens_seen: int
    seconds: float
    checkpoint: Path | None  # the last good checkpoint
    history: dict


def record_eval(trainer, evaluate, progress) -> dict:
    """Losses on the fixed train/val batches, a greedy sample; logged, plotted, returned."""
    train_loss = evaluate(trainer.model, trainer.eval_sets["train"])  # mean over every target of the batches
    val_loss = evaluate(trainer.model, trainer.eval_sets["val"]) if trainer.eval_sets["val"] else float("nan")
    for name, loss in (("training", train_loss), ("validation", val_loss if trainer.eval_sets["val"] else 0.0)):
        if not math.isfinite(loss):  # the last step's loss and gradient were finite, its weights are not
            raise NonFiniteLoss(f"non-finite {name} evaluation loss {loss} after step {trainer.step}")
    text = trainer.sample()
    trainer.history["evals"].append([trainer.step, trainer.tokens_seen, train_loss, val_loss])
    record = {"step": trainer.step, "tokens_seen": trainer.tokens_seen, "train_loss": train_loss,
              "val_loss": val_loss, "sample": text}
    progress.write(f"step {trainer.step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                   f"tokens seen {trainer.tokens_seen:,}" + (f"\n  sample: {text!r}" if text is not None else ""))
    if trainer.out_dir is not None:
        trainer.out_dir.mkdir(parents=True, exist_ok=True)
        append_log(trainer.out_dir / "log.jsonl", record)
        if trainer.plot is not None:
            trainer.plot(trainer.out_dir / "loss.png", trainer.history)
    return record


def check_finite_weights(params, step: int) -> None:
    """NonFiniteLoss unless every weight is finite in float32, the checkpoints' dtype: a step
    whose loss and gradient were finite can still leave weights past float32's range (a huge
    learning rate), which the save refused with a traceback and a sample turned into NaN logits."""
    for name, p in params.items():
        largest = float(p.detach().abs().max()) if p.numel() else 0.0
        if not largest <= FLOAT32_MAX:  # NaN compares False too
            raise NonFiniteLoss(f"weights not finite in float32 after step {step} ({name}: largest |value| "
                                f"{largest:.3g}); the step diverged (try a smaller learning rate)")


FLOAT32_MAX = 3.4028234663852886e38  # the checkpoints' dtype's largest value


def finish_run(trainer, message: str, *, ok: bool, seconds: float) -> TrainResult:
    ckpt = latest_checkpoint(trainer.out_dir) if trainer.out_dir is not None else None
    if not ok:
        where = f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint was written"
        message = f"{message}; training stopped without saving ({where})"
    elif trainer.out_dir is not None:
        if trainer.plot is not None:
            trainer.plot(trainer.out_dir / "loss.png", trainer.history)
        append_log(trainer.out_dir / "log.jsonl", {"step": trainer.step, "tokens_seen": trainer.tokens_seen,
                                                   "finished": True, "seconds": seconds})
    return TrainResult(ok, message, trainer.step, trainer.tokens_seen, seconds, ckpt, trainer.history)
