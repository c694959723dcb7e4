"""A `gpt-oracle train` output folder: may a new run start there, and is it one run to resume?

A run folder holds run.json (the command's options), log.jsonl, loss.png, `latest` and the
checkpoints step-NNNNNNNN[-k]/ (numpy_ref/train_run.py and torch_impl/train_run.py write them).
A new run never lands in a folder that holds one: the new run.json would replace the old while
the old checkpoints and `latest` stayed, and `--resume` would then continue the old run under
the new run.json. Resuming checks that `latest` names an existing checkpoint and that the
checkpoint's model and settings are the ones run.json describes. Each check raises a UserError
naming the folder; none writes anything.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

from gpt_oracle.user_input import UserError, user_input

RUN_FILES = ("run.json", "log.jsonl", "loss.png", "latest", "loss.tmp.png", "latest.tmp")
CHECKPOINT_DIR = re.compile(r"step-\d{8,}(-\d+)?")  # 8 digits, more from step 10**8 on (train_run.py)


def run_contents(out: Path) -> list[str]:
    """The names in `out` that a previous run left there."""
    if not out.is_dir():
        return []
    names = [name for name in RUN_FILES if (out / name).exists()]
    return names + sorted(p.name for p in out.iterdir() if p.is_dir() and CHECKPOINT_DIR.fullmatch(p.name))


# What a `gpt-oracle finetune` / `instruct` output folder holds beside its run.json and log.jsonl.
FINE_TUNING_OUTPUTS = {"finetune": "classifier", "instruct": "model"}


def fine_tuning_output(path: Path) -> str | None:
    """"finetune" or "instruct" when `path` is that command's output folder (its run.json names the
    command, or, written before it did, its classifier/ or model/ checkpoint is there), else None."""
    path = Path(path)
    try:
        record = json.loads((path / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # none, unreadable, not JSON, nested past the parser's depth
        record = None
    if isinstance(record, dict) and "command" in record:  # the command says, whatever sub-folders there are
        command = record["command"]
        return command if isinstance(command, str) and command in FINE_TUNING_OUTPUTS else None
    return next((c for c, sub in FINE_TUNING_OUTPUTS.items() if (path / sub / "config.json").is_file()), None)


def check_new_out(out: Path, overwrite: bool) -> list[str]:
    """What `remove_run` will delete under --overwrite; a UserError when `out` cannot take a new run."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    other = fine_tuning_output(out) if out.is_dir() else None
    if other:  # not a training run: neither --resume nor --overwrite applies to it
        raise UserError(f"--out {out}: holds a `gpt-oracle {other}` output ({FINE_TUNING_OUTPUTS[other]}/, run.json), "
                        f"not a training run; choose another --out")
    if (out / "trainer_state.json").exists():
        raise UserError(f"--out {out}: is a checkpoint directory (it holds trainer_state.json); choose another --out")
    found = run_contents(out)
    if found and not overwrite:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise UserError(f"--out {out}: already holds a training run ({shown}); pass --resume {out} to continue it, "
                        f"--overwrite to delete it and start again, or choose another --out")
    return found


def remove_run(out: Path, names: list[str]) -> None:
    """Delete what `check_new_out` found (and nothing else in `out`). Everything is checked
    first, so that a refusal (an OSError naming the path) deletes nothing: a symbolic link is
    removed itself, never what it points to (rmtree refuses a link, once the names before it were
    gone), and `out` and every folder to be emptied must let their entries go."""
    if not names:
        return
    folders = [out / name for name in names if not (out / name).is_symlink() and (out / name).is_dir()]
    _check_writable(out)
    for folder in folders:
        for directory, _, _ in os.walk(folder, onerror=_raise):  # links are not followed
            _check_writable(Path(directory))
    for name in names:
        path = out / name
        shutil.rmtree(path) if path in folders else path.unlink()


def _check_writable(directory: Path) -> None:
    """A PermissionError unless the entries of `directory` can be listed and deleted."""
    if not os.access(directory, os.R_OK | os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "cannot delete the files in it (no permission)", str(directory))


def _raise(err: OSError):
    raise err


def checkpoint_dir(path: Path, option: str = "--checkpoint") -> Path:
    """`path` itself when it holds a config.json (a checkpoint folder), its model/ when it is an
    `instruct` output folder, else the checkpoint its `latest` file names (a `train` output
    folder); a UserError naming `option` when none is there (or it is a `finetune` output, which
    holds no language model). Every command that reads a checkpoint takes each."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    other = fine_tuning_output(path)
    if other == "instruct":  # an instruction-tuned language model, in model/
        return path / "model"
    if other == "finetune":
        raise UserError(f"{option} {path}: a `gpt-oracle finetune` output, whose classifier/ is a classifier, not a "
                        f"language model (gpt-oracle classify --classifier {path} labels texts with it)")
    if not (path / "latest").is_file():
        where = "no config.json there (nor a 'latest' file)" if path.is_dir() else "no such directory"
        raise UserError(f"{option} {path}: {where}")
    return latest_checkpoint(path, option)


def latest_checkpoint(out: Path, option: str = "--resume") -> Path:
    """The checkpoint `latest` names, checked to exist; errors name `option` and the folder."""
    pointer = out / "latest"
    if not pointer.is_file():
        raise UserError(f"{option} {out}: no checkpoint to resume from yet (no 'latest' file); the run stopped "
                        f"before its first checkpoint: start it again with --overwrite")
    with user_input(f"{option} {out}"):
        name = pointer.read_text(encoding="utf-8").strip()
    if not name or not (out / name).is_dir():
        raise UserError(f"{option} {out}: 'latest' names the checkpoint {name!r}, which does not exist there")
    return out / name


def check_same_model(out: Path, ckpt: Path, backend: str, config) -> None:
    """A UserError when the checkpoint holds another model than `config` (run.json's): a folder
    that mixes two runs. Read before the weights, whose shapes would not fit."""
    if backend == "numpy":
        from numpy_ref.checkpoint import config_from_hf
    else:
        from torch_impl.checkpoint import config_from_hf

    path = ckpt / "config.json"
    with user_input(f"--resume {out}: {path}"):
        stored = json.loads(path.read_text(encoding="utf-8"))
    with user_input(f"--resume {out}"):  # the loader's message names the file
        saved = config_from_hf(stored, path).to_dict()
    wanted = config.to_dict()
    differ = [f"{k} {saved[k]!r} vs {wanted[k]!r}" for k in wanted if saved.get(k) != wanted[k]]
    if differ:
        raise UserError(f"--resume {out}: {ckpt.name} holds another model than run.json describes "
                        f"({', '.join(differ)}); the folder mixes two runs")


def check_same_settings(out: Path, ckpt: Path, saved, wanted) -> None:
    """A UserError when the checkpoint was trained with other TrainSettings than run.json's
    (the progress bar aside): a folder that mixes two runs."""
    saved, wanted = saved.to_dict(), wanted.to_dict()
    differ = [f"{k} {saved.get(k)!r} vs {wanted[k]!r}" for k in wanted if k != "progress" and saved.get(k) != wanted[k]]
    if differ:
        raise UserError(f"--resume {out}: {ckpt.name} was trained with other settings than run.json's "
                        f"({', '.join(differ)}); the folder mixes two runs")
