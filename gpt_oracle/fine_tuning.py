"""What `gpt-oracle finetune` (chapter 6) and `gpt-oracle instruct` (chapter 7) share: the
JSON-lines reader and its text checks, the train/validation split, the epoch loop that stops on
a non-finite loss, and the output folder that appears whole or not at all."""

from __future__ import annotations

import argparse
import json
import math
import secrets
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from gpt_oracle.json_file import write_json
from gpt_oracle.user_input import UserError, int_in, number_in, path_text, positive_int, user_input

EOT = 50256  # GPT-2's <|endoftext|>: the end of an instruction's row, and the padding of both commands


def add_common_arguments(parser: argparse.ArgumentParser, *, data_help: str, out_help: str, epochs: int,
                         val_ratio: float, seed_help: str) -> None:
    """The options both commands take, with each command's own defaults and help."""
    parser.add_argument("--checkpoint", required=True, metavar="DIR", type=path_text,
                        help="the language model: a checkpoint or a train output directory")
    parser.add_argument("--data", required=True, metavar="FILE", type=path_text, help=data_help)
    parser.add_argument("--out", required=True, metavar="DIR", type=path_text, help=out_help)
    parser.add_argument("--backend", choices=["numpy", "torch"], default="torch")
    parser.add_argument("--epochs", type=positive_int, default=epochs)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--lr", type=number_in(0.0, low_open=True), default=5e-5, help="AdamW's learning rate")
    parser.add_argument("--weight-decay", type=number_in(0.0), default=0.1)
    parser.add_argument("--val-ratio", type=number_in(0.0, 1.0), default=val_ratio,
                        help=f"the share held out to validate, in [0, 1) (default {val_ratio})")
    parser.add_argument("--seed", type=int_in(0, 2**64 - 1, high_text="2**64 - 1"), default=123, help=seed_help)


def json_lines(path: Path) -> Iterator[tuple[str, int, object]]:
    """(where, line number, record) for each non-blank line; `where` names the file and the line
    for error messages. Lines end at "\\n" only: str.splitlines() would also split at U+2028 and
    U+0085, which JSON strings may hold raw."""
    with user_input(f"--data {path}"):
        text = path.read_text(encoding="utf-8")
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"--data {path}: line {number}"
        with user_input(f"{where}: not valid JSON"):
            try:
                record = json.loads(line)
            except RecursionError:  # nested past the parser's depth: bad input, not a bug
                raise UserError(f"{where}: not valid JSON: nested too deeply to read") from None
        yield where, number, record


def check_text(where: str, name: str, value: str) -> None:
    """A UserError for text the tokenizer would not encode as written: the special token, or a
    lone surrogate (JSON allows "\\ud800"; GPT-2's tokenizer would train on U+FFFD instead)."""
    if "<|endoftext|>" in value:
        raise UserError(f"{where}: {name!r} holds the special token '<|endoftext|>'; texts are encoded as text, where "
                        f"special tokens are refused")
    lone = next((c for c in value if "\ud800" <= c <= "\udfff"), None)
    if lone is not None:
        raise UserError(f"{where}: {name!r} holds the lone surrogate {lone!r}, which is not text (UTF-8 cannot "
                        f"encode it)")


def check_out(out: Path) -> None:
    """--out must be new, or an empty directory, named by a path that the finished run's folder can
    be renamed to: not a symbolic link (nor a dangling one), not ".", ".." or the root."""
    if out.is_symlink():
        raise UserError(f"--out {out}: is a symbolic link; give the directory's own path, or a new one")
    if out.name in ("", ".", ".."):
        raise UserError(f"--out {out}: name the output folder itself (the run's folder is renamed to it, which "
                        f"'.', '..' and the root cannot take)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out}: is not empty; choose a new or empty directory")


def split(n: int, val_ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """(training rows, validation rows): a permutation drawn from `seed` (stream 0 of --seed), its
    last share validating (at least one row when val_ratio > 0, never all of them)."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val = 0 if val_ratio == 0 else min(n - 1, max(1, int(round(n * val_ratio))))
    return order[: n - n_val], order[n - n_val:]


def train_epochs(epochs: int, seed: int, batch_size: int, train: list[int], val: list[int],
                 step: Callable[[list[int]], float], evaluate: Callable[[list[int]], dict]) -> list[dict] | None:
    """The log, one entry per epoch; None (after the message on stderr) once a loss is not finite.

    step(rows) trains on one batch and returns its loss; evaluate(rows) returns the metrics of a
    set, "loss" among them. Each epoch takes the training rows in a new order, drawn from stream 2
    of --seed (stream 1 is numpy_ref's classifier head), in batches of `batch_size`."""
    import numpy as np

    log = []
    rng = np.random.default_rng([seed, 2])
    for epoch in range(1, epochs + 1):
        order = [train[i] for i in rng.permutation(len(train))]
        for start in range(0, len(order), batch_size):
            loss = step(order[start:start + batch_size])
            if not math.isfinite(loss):
                print(f"error: epoch {epoch}: the loss is {loss}; stopped, nothing saved (try a smaller --lr)",
                      file=sys.stderr)
                return None
        entry = {"epoch": epoch}
        for name, rows in (("train", train), ("val", val)):
            if rows:
                metrics = evaluate(rows)
                if not math.isfinite(metrics["loss"]):  # the last step diverged: the weights are not usable
                    print(f"error: epoch {epoch}: the {name} loss is {metrics['loss']}; stopped, nothing saved "
                          f"(try a smaller --lr)", file=sys.stderr)
                    return None
                entry.update({f"{name}_{k}": v for k, v in metrics.items()})
        log.append(entry)
        print(", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()),
              file=sys.stderr)
    return log


@contextmanager
def output_folder(out: Path) -> Iterator[Path]:
    """A new hidden folder beside --out to write the run into; `finish` renames it to --out. It is
    made on entry, so a --out that cannot exist is bad input before any training, and removed on
    exit unless finished: a run that fails or is interrupted leaves no --out, nor the parent
    folders it made for it."""
    parent = out.absolute().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is not a directory")
    made = [p for p in (parent, *parent.parents) if not p.exists()]  # parents this run makes, deepest first
    staging = None
    try:
        with user_input(f"--out {out}"):
            parent.mkdir(parents=True, exist_ok=True)
            staging = _new_folder(parent, f".{out.name}.", ".finetune")
        if out.is_dir():
            shutil.copymode(out, staging)  # an empty --out is replaced: the run's folder takes its mode
        yield staging
    finally:
        finished = staging is not None and not staging.exists()  # finish() renamed it to --out
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if not finished:  # a failed run leaves nothing, the parents it made included
            for p in made:
                try:
                    p.rmdir()
                except OSError:  # not empty (another process wrote there) or not ours to remove
                    break


def _new_folder(parent: Path, prefix: str, suffix: str) -> Path:
    """A new folder of a name not taken in `parent`, made with the umask's mode (tempfile.mkdtemp
    makes 0700, which the finished --out would keep)."""
    while True:
        folder = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder


def finish(staging: Path, out: Path, log: list[dict], run: dict) -> None:
    """log.jsonl and run.json into the staging folder (the model is there already), then the
    folder renamed to --out (an empty --out, checked at the start, is replaced)."""
    with open(staging / "log.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(entry) + "\n" for entry in log)
    write_json(staging / "run.json", run)
    if out.is_dir():
        out.rmdir()
    staging.rename(out)


def run_record(args, ckpt: Path, out: Path, **extra) -> dict:
    """run.json: the command's name, the options, with the paths absolute and the checkpoint
    actually read."""
    options = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    return {"command": getattr(args, "command", None)} | options | {"checkpoint": str(ckpt.absolute()), "data": str(Path(args.data).absolute()),
                      "out": str(out.absolute())} | extra
