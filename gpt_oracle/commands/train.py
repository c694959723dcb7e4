"""`gpt-oracle train`: pretrain a GPT with either tree, on the-verdict by default.

    gpt-oracle train --backend numpy|torch [--data FILE] [--config NAME] [--steps N] [--out DIR]
    gpt-oracle train --resume DIR

The default (`--config verdict`, a 2-layer, 64-channel GPT with the GPT-2 tokenizer, context
64, batch 8, 10 epochs of the embedded "The Verdict") finishes in a few minutes on 2 CPU cores.
`--config` also takes any preset (tiny, gpt2-small/124M, ...); the vocabulary is always set to
the GPT-2 tokenizer's 50257 and the context to `--context-length` when given. The book's
chapter-5 run is

    gpt-oracle train --backend torch --config 124M --context-length 256 --batch-size 2 \\
        --epochs 10 --lr 4e-4 --min-lr 4e-4 --weight-decay 0.1 --decay-set all --grad-clip 0 \\
        --init book --eval-every 5 --eval-batches 5 --precision fp32

(`--init book`: the book's model starts from torch.nn's default initialisation; `--precision
fp32`: the book trains in float32, and so did the recorded run; from GPT-2's
normal(0, 0.02) the same run stalls near a training loss of 6. benchmarks/results/ holds a
recorded run.)

Precision (torch backend): `--precision auto`, the default, trains float32 weights with bf16
autocast where bf16 products are the faster ones (CUDA from Ampere on, with TF32 matmuls; CPUs
with AMX or AVX-512 BF16) and in plain float32 elsewhere, as `torch_impl.device.plan_runtime`
decides; the first line on stderr says which was taken and why. The gain is in the products:
GPT-2 small trains in half the time under bf16 on a CPU with AVX-512 BF16, while the default
2-layer, 64-channel model, whose step is mostly not products, takes about as long either way.
`--precision fp32` (or `tf32` on CUDA, `bf16`) forces one; `--dtype float64` trains in float64
throughout. A resumed run keeps the autocast it started with, and on CUDA its TF32 setting. The
numpy backend trains in --dtype only.

The output directory gets `run.json` (these arguments, so `--resume` rebuilds the same data
and model, --data as an absolute path; and a fingerprint of the validation batches, which
`--resume` compares, as the checkpoints fingerprint the training batches), `log.jsonl`,
`loss.png` and the checkpoints (`latest` names the newest; `gpt-oracle generate --checkpoint
DIR` reads it). `--resume DIR` continues an interrupted run exactly (on
CPU, bit for bit); every other option is then taken from DIR/run.json (checked as the command
line's; an option given alongside --resume is an error, but for --no-progress, which changes only what is shown; a run already at its last step is left
as it is, exit 0). A new run refuses an
--out that already holds a run (run.json, log.jsonl, `latest`, step-* checkpoints): pass
--resume to continue it, --overwrite to delete it first, or another --out.

`--nproc W` (torch backend, CPU) trains the same run in W processes on this machine
(torch_impl/distributed.py, gloo): each takes its rows of every batch of --batch-size rows and
the gradients are summed across them, so the run is the one a single process trains (up to the
order of floating-point sums); process 0 writes. It is not part of run.json: `--resume DIR
--nproc W` continues any run with any W.

Exit status: 0 done; 1 a non-finite loss, gradient norm, evaluation loss or weight stopped
training (the last good checkpoint is kept); 2 bad input (an option, the data file, the device,
--out, or a --resume folder that is incomplete, mixes two runs or cannot be written), one line on
stderr, checked before anything is written, or a batch too large for memory (one line; a new run
that wrote no checkpoint leaves nothing in --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

from gpt_oracle import run_folder
from gpt_oracle.json_file import write_json
from gpt_oracle.user_input import EXIT_FAILED, EXIT_OK, UserError, check_device, encode_prompt, int_in, \
    non_negative_int, number_in, one_line, out_of_memory, path_text, positive_int, print_result, \
    reports_user_errors, user_input

# The default model: small enough for minutes on 2 cores, big enough to learn the text a bit.
VERDICT_CONFIG = dict(vocab_size=50257, context_length=64, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.1,
                      qkv_bias=False, tie_embeddings=False, ln_eps=1e-5)
GPT2_VOCAB = 50257
# run.json keys that runs written before the option existed lack, with the value those runs used.
ADDED_LATER = {"init": "gpt2", "precision": None}
LEGACY_ZERO_IS_DEFAULT = ("stride", "threads", "context_length", "steps")
# --precision's choices: torch_impl.device.PRECISIONS less fp64 (that is --dtype float64) and fp16
# (training in fp16 needs loss scaling); written here so that the numpy backend never imports torch.
PRECISIONS = ("auto", "fp32", "tf32", "bf16")
# --threads: more than a few threads per CPU only slows torch down, and far more (100000) crashes it.
MAX_THREADS = 4 * (os.cpu_count() or 1)
_THREADS_BEFORE: list[int] = []  # torch's thread count before --threads set it, for run() to put back
MAX_PROCESSES = 64  # --nproc: processes on this machine (gloo over local TCP)
MAX_SAMPLE_TOKENS = 4096  # a sample shown at every evaluation; as instruct's --max-new-tokens
# The run.json key (not an option) holding the fingerprint of the validation batches: the trainer's
# checkpoints fingerprint the training batches only, so --resume compares this one itself.
VALIDATION_FINGERPRINT = "validation_fingerprint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["numpy", "torch"], default="torch", help="which tree trains (default torch)")
    parser.add_argument("--data", metavar="FILE", type=path_text, help="UTF-8 text file to train on (default: the embedded the-verdict)")
    parser.add_argument("--config", default="verdict", help="'verdict' (default) or a preset name (tiny, 124M, ...)")
    parser.add_argument("--steps", type=positive_int, help="optimiser steps, >= 1 (default: --epochs worth)")
    parser.add_argument("--epochs", type=positive_int, default=10, help="epochs when --steps is not given (default 10)")
    parser.add_argument("--out", metavar="DIR", type=path_text, help="output directory (default runs/train-BACKEND)")
    parser.add_argument("--resume", metavar="DIR", type=path_text,
                        help="continue the run in DIR from its last checkpoint, with the options of DIR/run.json")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run already in --out (run.json, log.jsonl, loss.png, latest, step-* "
                             "checkpoints; nothing else) before starting")
    parser.add_argument("--context-length", type=positive_int, help="sequence length (and the model's context)")
    parser.add_argument("--stride", type=positive_int, help="window stride, >= 1 (default: the context length)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimiser step")
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--lr", type=number_in(0.0), default=1e-3, help="peak learning rate")
    parser.add_argument("--min-lr", type=number_in(0.0), help="final learning rate of the cosine (default lr/10)")
    parser.add_argument("--warmup", type=non_negative_int, default=0, help="linear warmup steps (at most --steps)")
    parser.add_argument("--weight-decay", type=number_in(0.0), default=0.1)
    parser.add_argument("--decay-set", choices=["gpt2", "all"], default="gpt2",
                        help="gpt2: decay linear weights only; all: every parameter (the book's chapter 5)")
    parser.add_argument("--grad-clip", type=number_in(0.0), default=1.0, help="global-norm clipping; 0 = off")
    parser.add_argument("--dropout", type=number_in(0.0, 1.0), help="override the config's drop_rate, in [0, 1)")
    parser.add_argument("--eval-every", type=non_negative_int, default=10, help="steps between evaluations (0 = never)")
    parser.add_argument("--eval-batches", type=positive_int, default=5, help="batches of each set per evaluation")
    parser.add_argument("--checkpoint-every", type=non_negative_int, default=50,
                        help="steps between checkpoints (0 = end only)")
    parser.add_argument("--train-ratio", type=number_in(0.0, 1.0, low_open=True), default=0.9,
                        help="the first part of the text trained on, in (0, 1); the rest validates")
    parser.add_argument("--seed", type=int_in(0, 2**64 - 1, high_text="2**64 - 1"), default=123,
                        help="weights, batch order and dropout, 0 to 2**64 - 1 (default 123)")
    from numpy_ref.params import INIT_SCHEMES  # the same names as torch_impl's (a test checks)

    parser.add_argument("--init", choices=list(INIT_SCHEMES), default="gpt2",
                        help="initial weights: GPT-2's normal(0, 0.02) (default) or the book's torch.nn defaults "
                             "(embeddings normal(0, 1), linear layers uniform(+-1/sqrt(fan_in)))")
    parser.add_argument("--dtype", choices=["float32", "float64"],
                        help="parameter dtype (default: float64 for numpy, float32 for torch)")
    parser.add_argument("--device", default="cpu", help="torch device (the numpy backend runs on the CPU only)")
    parser.add_argument("--precision", choices=list(PRECISIONS),
                        help="torch backend: auto (default: the fastest for the device, as torch_impl.device."
                             "plan_runtime picks it: bf16 autocast on CUDA from Ampere on and on CPUs with AMX or "
                             "AVX-512 BF16, else float32), fp32, tf32 (CUDA) or bf16 (autocast over float32 "
                             "weights); --dtype float64 trains in float64 throughout")
    parser.add_argument("--threads", type=int_in(1, MAX_THREADS),
                        help=f"torch CPU threads, torch backend only, 1 to 4 per CPU ({MAX_THREADS} here; default: "
                             f"torch's choice); with --nproc W, the whole run's: each process takes threads // W")
    parser.add_argument("--prompt", default="Every effort moves you", help="sample prompt at each evaluation")
    parser.add_argument("--sample-tokens", type=int_in(0, MAX_SAMPLE_TOKENS), default=20,
                        help=f"greedy tokens sampled at each evaluation, 0 to {MAX_SAMPLE_TOKENS} (0 = no sample; "
                             f"default 20)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--nproc", type=int_in(1, MAX_PROCESSES), default=1,
                        help=f"torch backend on the CPU: train in this many processes, 1 to {MAX_PROCESSES}, each "
                             f"taking its rows of every batch (torch_impl.distributed; --batch-size is the whole "
                             f"batch, at least --nproc rows); the run is the one a single process trains, so "
                             f"--resume may take another --nproc (default 1)")


def _run_options(args: argparse.Namespace) -> dict:
    """Everything that defines the run, as saved in run.json."""
    opts = {k: v for k, v in vars(args).items()
            if not k.startswith("_") and k not in ("command", "resume", "overwrite", "nproc")}
    opts["dtype"] = args.dtype or ("float64" if args.backend == "numpy" else "float32")
    return opts


def _precision(opts: dict, resuming: bool = False):
    """(autocast dtype or None, the words saying what trains in what and why) for the torch
    backend; --precision checked against --dtype and the device. A new run sets TF32 on CUDA as
    planned; a resumed one leaves it to Trainer.resume, which restores the run's own setting."""
    import torch

    from torch_impl.device import plan_runtime

    precision = opts["precision"] or "auto"
    if opts["dtype"] == "float64":
        if opts["precision"] not in (None, "auto"):
            raise UserError(f"--precision {precision}: --dtype float64 trains in float64 throughout (the parity "
                            f"path); drop one of the two")
        return None, "float64 throughout"
    if precision == "tf32" and not opts["device"].startswith("cuda"):
        raise UserError(f"--precision tf32: TF32 is a matmul mode of NVIDIA GPUs; on --device {opts['device']} "
                        f"use fp32")
    plan = plan_runtime(opts["device"], precision, compile=False)
    if not resuming:
        plan.apply()
    why = "; ".join(r for r in plan.reasons if "compile" not in r)
    autocast = plan.autocast_dtype
    if autocast == torch.float16:  # auto on CUDA before Ampere
        autocast, why = None, "fp16 autocast would need loss scaling, which this trainer does not do"
    words = "float32" + (" with bf16 autocast" if autocast is not None else "")
    words += ", TF32 matmuls" if plan.tf32 else ""
    return autocast, words + (f" [{why}]" if why else "")


def _config_dict(opts: dict) -> dict:
    from numpy_ref.config import ALIASES, PRESETS, get_config

    if opts["config"] == "verdict":
        cfg = dict(VERDICT_CONFIG)
    elif ALIASES.get(opts["config"], opts["config"]) in PRESETS:
        cfg = get_config(opts["config"]).to_dict()
    else:
        known = ", ".join(["verdict", *sorted(PRESETS), *sorted(ALIASES)])
        raise UserError(f"--config {opts['config']!r}: unknown configuration; expected one of {known}")
    cfg["vocab_size"] = GPT2_VOCAB  # the GPT-2 tokenizer's ids must all be valid
    if opts.get("context_length") is not None:
        cfg["context_length"] = opts["context_length"]
    if opts.get("dropout") is not None:
        cfg["drop_rate"] = opts["dropout"]
    return cfg


def _settings_dict(opts: dict, steps: int) -> dict:
    return dict(steps=steps, grad_accum=opts["grad_accum"], optimizer=opts["optimizer"], max_lr=opts["lr"],
                min_lr=opts["min_lr"] if opts["min_lr"] is not None else opts["lr"] / 10,
                warmup_steps=opts["warmup"], weight_decay=opts["weight_decay"], decay=opts["decay_set"],
                grad_clip=opts["grad_clip"] or None, eval_every=opts["eval_every"], eval_batches=opts["eval_batches"],
                checkpoint_every=opts["checkpoint_every"], sample_prompt=opts["prompt"],
                sample_tokens=opts["sample_tokens"], seed=opts["seed"], progress=not opts["no_progress"])


def _steps(opts: dict, batches_per_epoch: int) -> int:
    """--steps, or the optimiser steps in --epochs epochs; checked against --warmup."""
    if opts["steps"] is not None:
        steps = opts["steps"]
    else:
        steps = opts["epochs"] * batches_per_epoch // opts["grad_accum"]
        if steps < 1:
            raise UserError(f"--epochs {opts['epochs']} of {batches_per_epoch} batch(es) with --grad-accum "
                            f"{opts['grad_accum']} make {steps} optimiser steps; pass --steps or more --epochs")
    if opts["warmup"] > steps:
        raise UserError(f"--warmup {opts['warmup']} exceeds the run's {steps} optimiser steps")
    return steps


def _build(opts: dict, resuming: bool = False):
    """(Trainer class, model, train loader, val loader, encoding, settings) for the options (as
    argparse typed and range-checked them). What argparse cannot check (the data file, the
    config name, the device, whether the text fills a batch, the step count) is checked here,
    a UserError naming the option, before the model is made."""
    source = opts["data"] or "the embedded the-verdict"
    text = _read_data(opts["data"]) if opts["data"] else None
    cfg = _config_dict(opts)
    check_device(opts["device"], opts["backend"])
    if opts.get("threads") is not None and opts["backend"] == "numpy":  # it would be silently ignored
        raise UserError(f"--threads {opts['threads']}: sets torch's CPU threads; the numpy backend's BLAS takes its "
                        f"threads from its own environment (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS)")
    if opts["backend"] == "numpy":
        import numpy as np

        from numpy_ref import data
        from numpy_ref.config import GPTConfig
        from numpy_ref.model import GPTModel
        from numpy_ref.tokenizer import get_encoding
        from numpy_ref.train import Trainer
        from numpy_ref.train_run import TrainSettings

        def make_model(config):
            return GPTModel(config, seed=opts["seed"], dtype=np.dtype(opts["dtype"]), init=opts["init"])
    else:
        import torch

        from torch_impl import data
        from torch_impl.config import GPTConfig
        from torch_impl.model import GPTModel
        from torch_impl.tokenizer import get_encoding
        from torch_impl.train import Trainer
        from torch_impl.train_run import TrainSettings

        def make_model(config):
            return GPTModel(config, seed=opts["seed"], dtype=getattr(torch, opts["dtype"]), device=opts["device"],
                            init=opts["init"])

        if opts.get("threads") is not None:
            _THREADS_BEFORE.append(torch.get_num_threads())  # put back when the command returns (run)
            torch.set_num_threads(opts["threads"])
    if opts["backend"] == "numpy" and opts.get("precision") is not None:
        raise UserError(f"--precision {opts['precision']}: chooses the torch backend's precision; the numpy backend "
                        f"trains in --dtype ({opts['dtype']})")
    with user_input(f"--config {opts['config']}"):
        config = GPTConfig(**cfg)
    encoding = get_encoding("gpt2")
    if opts["prompt"] and opts["sample_tokens"] and opts["eval_every"]:  # the trainer samples it at evaluations
        encode_prompt(encoding, opts["prompt"])
    T = config.context_length
    stride = opts["stride"] if opts["stride"] is not None else T
    B = opts["batch_size"]
    train_text, val_text = data.split_train_val(text if text is not None else data.load_verdict(), opts["train_ratio"])
    ratio = f"--train-ratio {opts['train_ratio']}"  # the text's share, named exactly (0.001 is no "0%")
    with user_input(f"the training text (the first {len(train_text):,} characters of {source}, {ratio})"):
        train = data.create_dataloader(train_text, batch_size=B, max_length=T, stride=stride, shuffle=True,
                                       drop_last=True, seed=opts["seed"], encoding=encoding)
    with user_input(f"the validation text (the last {len(val_text):,} characters of {source}, {ratio})"):
        val = data.create_dataloader(val_text, batch_size=B, max_length=T, stride=stride, shuffle=False,
                                     drop_last=False, seed=opts["seed"], encoding=encoding)
    steps = _steps(opts, len(train))
    if opts["min_lr"] is not None and opts["min_lr"] > opts["lr"]:
        raise UserError(f"--min-lr {opts['min_lr']} exceeds --lr {opts['lr']} (the cosine goes from --lr down "
                        f"to --min-lr)")
    with user_input("training settings"):
        settings = TrainSettings(**_settings_dict(opts, steps))
    autocast, words = _precision(opts, resuming) if opts["backend"] == "torch" else (None, opts["dtype"])
    return Trainer, make_model(config), train, val, encoding, settings, autocast, words


def _read_data(path: str) -> str:
    """The text of --data, a UserError naming the path when it cannot be read or is not UTF-8."""
    with user_input(f"--data {path}"):  # an OSError's message names the path once
        raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"--data {path}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start}: "
                        f"{exc.reason})") from None


def _validation_fingerprint(backend: str, loader) -> str | None:
    """The tree's `data_fingerprint` of the validation loader (the same in both trees)."""
    if backend == "numpy":
        from numpy_ref.train_run import data_fingerprint
    else:
        from torch_impl.train_run import data_fingerprint
    return data_fingerprint(loader)


def _reporting() -> dict:
    """The optional tqdm bar and matplotlib plot (the trees themselves need neither)."""
    from gpt_oracle.train_report import TqdmProgress, save_loss_plot

    return dict(progress_cls=TqdmProgress, plot=save_loss_plot)


# ---- starting and resuming ---------------------------------------------------------------


def _start(args: argparse.Namespace, made: list[Path]):
    """The new run's Trainer; `made` gets what this call creates in --out, files first (see _fit)."""
    opts = _run_options(args)
    if opts["data"]:  # --resume may run in another working directory
        opts["data"] = os.path.abspath(opts["data"])
    out = Path(args.out or f"runs/train-{args.backend}")
    old = run_folder.check_new_out(out, args.overwrite)
    Trainer, model, train, val, encoding, settings, autocast, words = _build(opts)
    fingerprint = _validation_fingerprint(opts["backend"], val)
    with user_input(f"--out {out}"):
        run_folder.remove_run(out, old)  # only now that every option was checked: a bad one deletes nothing
        new_folders = [p for p in (out, *out.absolute().parents) if not p.exists()]  # deepest first
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "run.json", {**opts, VALIDATION_FINGERPRINT: fingerprint})
    made += [out / "run.json", out / "log.jsonl", out / "loss.png", *new_folders]
    extra = {"autocast_dtype": autocast} if opts["backend"] == "torch" else {}
    trainer = Trainer(model, train, val, settings, out_dir=out, encoding=encoding, **extra, **_reporting())
    print(f"training {model.num_parameters():,} parameters ({opts['backend']}, {words}) for "
          f"{settings.steps} steps of {opts['batch_size']}x{model.config.context_length} tokens; output in {out}",
          file=sys.stderr)
    return trainer


class _RunJsonParser(argparse.ArgumentParser):
    """This command's parser, reading run.json: an error is raised, not printed and exited on."""

    def error(self, message: str):
        raise UserError(message)


def _read_run_json(out: Path) -> tuple[dict, str | None]:
    """run.json's options, checked as the command line's are (the same types and limits):
    each is given back to this command's parser. Every option must be there. With them, the
    validation data's fingerprint (None in a run.json written before it was kept)."""
    if not out.is_dir():
        raise UserError(f"--resume {out}: no such directory")
    other = run_folder.fine_tuning_output(out)
    if other:
        raise UserError(f"--resume {out}: holds a `gpt-oracle {other}` output, not a training run; {other} does not "
                        f"resume (run it again into a new --out)")
    run_file = out / "run.json"
    if not run_file.is_file():
        raise UserError(f"--resume {out}: no run.json there (is it a gpt-oracle train output directory?)")
    with user_input(f"--resume {out}: run.json is not valid JSON"):
        stored = json.loads(run_file.read_text(encoding="utf-8"))
    if not isinstance(stored, dict):
        raise UserError(f"--resume {out}: run.json must hold a JSON object, got {type(stored).__name__}")
    parser = _RunJsonParser(add_help=False)
    add_arguments(parser)
    defaults = _run_options(parser.parse_args([]))
    fingerprint = stored.pop(VALIDATION_FINGERPRINT, None)
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise UserError(f"--resume {out}: run.json: {VALIDATION_FINGERPRINT} must be a string, got {fingerprint!r}")
    stored = {**ADDED_LATER, **stored}
    # Earlier versions of this command wrote 0 for "the default" in these; 0 is refused now.
    stored.update({k: None for k in LEGACY_ZERO_IS_DEFAULT if stored.get(k) == 0})
    # They also took an empty --data or --out as the default (the embedded text, runs/train-BACKEND).
    stored.update({k: None for k in ("data", "out") if stored.get(k) == ""})
    missing, unknown = sorted(set(defaults) - set(stored)), sorted(set(stored) - set(defaults))
    if missing:  # a default filled in would train another run than the one checkpointed
        raise UserError(f"--resume {out}: run.json lacks the option(s) {missing}")
    if unknown:
        raise UserError(f"--resume {out}: run.json has unknown option(s) {unknown}")
    argv = []
    for key, value in stored.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(defaults[key], bool):  # a store_true flag
            if not isinstance(value, bool):
                raise UserError(f"--resume {out}: run.json: {key} must be true or false, got {value!r}")
            argv += [flag] if value else []
        elif value is not None:
            argv.append(f"{flag}={value}")
    try:
        return _run_options(parser.parse_args(argv)), fingerprint
    except UserError as err:
        raise UserError(f"--resume {out}: run.json: {err}") from err


def _check_writable_run(out: Path) -> None:
    """A UserError unless the run folder takes new files and its log can be appended to: a run on
    a read-only file system trained its first steps, then failed at the log with a traceback."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"--resume {out}: cannot write in it ({exc.strerror or exc}); a resumed run appends to "
                        f"its log.jsonl and saves its checkpoints there") from None
    log = out / "log.jsonl"
    if log.exists() and not os.access(log, os.W_OK):
        raise UserError(f"--resume {out}: {log} cannot be written (no permission); a resumed run appends to it")


def _resume(args: argparse.Namespace, parallel=None):
    out = Path(args.resume)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    # --no-progress changes what is shown, --nproc how many processes train the same run: either may go with --resume
    shown = ("resume", "no_progress", "nproc")
    given = [k for k, v in vars(parser.parse_args([])).items() if k not in shown and getattr(args, k) != v]
    typed = getattr(args, "_argv", None)  # through the CLI: also an option typed with its default value
    if typed and "train" in typed:
        for action in parser._actions:  # only what was typed comes back
            action.default = argparse.SUPPRESS
        explicit, _ = parser.parse_known_args(typed[typed.index("train") + 1:])
        typed_keys = [k for k in vars(explicit) if k not in shown]
        given = typed_keys + [k for k in given if k not in typed_keys]
    if given:  # ignored, they would look applied
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise UserError(f"--resume {out} takes every option from {out / 'run.json'}; {flags} cannot go with it")
    opts, saved_fingerprint = _read_run_json(out)
    _check_writable_run(out)
    try:
        Trainer, model, train, val, encoding, settings, autocast, words = _build(opts, resuming=True)
    except UserError as err:
        raise UserError(f"--resume {out}: run.json: {err}") from err
    ckpt = run_folder.latest_checkpoint(out)
    run_folder.check_same_model(out, ckpt, opts["backend"], model.config)
    # The validation batches (the same options, model and settings as the checkpoint's) can only
    # differ by the text: checked before Trainer.resume, whose own check would not name the file.
    fingerprint = _validation_fingerprint(opts["backend"], val)
    if saved_fingerprint and fingerprint and fingerprint != saved_fingerprint:
        source = opts["data"] or "the embedded the-verdict"
        raise UserError(f"--resume {out}: the validation text (what follows the first {opts['train_ratio']} of "
                        f"{source}) differs from the run's (fingerprint {fingerprint[:12]}, run.json has "
                        f"{saved_fingerprint[:12]}): {source} changed since the run started, and its evaluations "
                        f"would not compare with the earlier ones")
    try:  # reading the checkpoint writes nothing
        with user_input(f"--resume {out}"):  # the loaders' messages name the file
            # --precision auto takes the autocast the run was started with, whatever this machine would pick
            explicit = {"autocast_dtype": autocast} if opts["backend"] == "torch" and opts["precision"] not in \
                (None, "auto") else {}
            if parallel is not None:
                explicit["parallel"] = parallel
            trainer = Trainer.resume(out, model, train, val, encoding=encoding, **explicit, **_reporting())
    except KeyError as exc:  # a trainer state without a key the trainer reads
        raise UserError(f"--resume {out}: {ckpt / 'trainer_state.json'}: {one_line(exc)}") from exc
    run_folder.check_same_settings(out, ckpt, trainer.settings, settings)
    # The bar as run.json says, or off with --no-progress (check_same_settings leaves it aside).
    trainer.settings = dataclasses.replace(trainer.settings, progress=settings.progress and not args.no_progress)
    return trainer


def _fit(trainer, args: argparse.Namespace, made: list[Path]):
    """trainer.fit(), an allocation failure as a UserError naming the batch (a batch too large for
    memory was a traceback, exit 1, and left run.json behind, so the same --out with a smaller
    batch was then refused as holding a run). A new run that wrote no checkpoint takes back what
    it made in --out (`made`: its files, then the folder if it made it); a resumed one is as it was
    at its last checkpoint."""
    try:
        return trainer.fit()
    except (MemoryError, RuntimeError) as err:
        if not out_of_memory(err):
            raise
        out = Path(args.resume or args.out or f"runs/train-{args.backend}")  # (trainer.out_dir: None but on process 0)
        _take_back(args, out, made)
        where = f"--resume {out}:" if args.resume else f"--batch-size {args.batch_size}:"
        raise UserError(f"{where} out of memory at step {trainer.step + 1} ({one_line(err)}); train with a smaller "
                        f"batch or context length") from None


# ---- several processes (--nproc) -------------------------------------------------------------


def _check_nproc(args: argparse.Namespace, opts: dict) -> None:
    """--nproc > 1 trains with the torch backend on the CPU, each process with at least one row."""
    if opts["backend"] != "torch":
        raise UserError(f"--nproc {args.nproc}: several processes train with the torch backend only (numpy_ref trains "
                        f"in one process)")
    if opts["device"] != "cpu":
        raise UserError(f"--nproc {args.nproc}: several processes train on the CPU only (gloo); on --device "
                        f"{opts['device']} train in one process")
    if opts["batch_size"] < args.nproc:
        raise UserError(f"--batch-size {opts['batch_size']} cannot be split over --nproc {args.nproc} processes "
                        f"(each takes at least one row of every batch)")


def _worker(parallel, args: argparse.Namespace, result_file: str) -> None:
    """One of the --nproc processes: the run's Trainer (process 0 writes), fit, and process 0's
    result in `result_file` for the parent to print."""
    if args.resume:
        trainer = _resume(args, parallel=parallel)
    else:
        from torch_impl.train import Trainer

        out = Path(args.out or f"runs/train-{args.backend}")
        opts, _ = _read_run_json(out)  # written by the parent, which checked every option
        _, model, train, val, encoding, settings, autocast, _ = _build(opts)
        trainer = Trainer(model, train, val, settings, out_dir=out, encoding=encoding, autocast_dtype=autocast,
                          parallel=parallel, **(_reporting() if parallel.is_main else {}))
    import torch

    # --threads (given, or in run.json) is the whole run's: each of the W processes takes its share
    total = _read_run_json(Path(args.resume))[0]["threads"] if args.resume else args.threads
    if total is not None:
        torch.set_num_threads(max(1, total // parallel.world_size))
    result = _fit(trainer, args, [])  # (an out-of-memory error comes back as a UserError, as in one process)
    if parallel.is_main:
        write_json(Path(result_file), {"ok": result.ok, "message": result.message, "step": result.step,
                                       "tokens_seen": result.tokens_seen, "seconds": result.seconds,
                                       "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                                       "evals": result.history["evals"]})


class _Failed(Exception):
    """A training process failed of itself (not bad input): one line on stderr, exit 1."""


def _run_processes(args: argparse.Namespace, made: list[Path]):
    """The run trained by --nproc processes: the parent checks and starts it as one process would
    (run.json written, or the resumed run checked), then the processes train, each with its own
    model; process 0's result comes back as a TrainResult-like object."""
    import types

    from torch_impl.distributed import ProcessFailed, spawn

    _check_nproc(args, _read_run_json(Path(args.resume))[0] if args.resume else _run_options(args))  # before any write
    trainer = _resume(args) if args.resume else _start(args, made)  # every check, as with one process
    if args.resume and trainer.step >= trainer.settings.steps:
        return trainer, None
    print(f"{'resuming at step ' + str(trainer.step) if args.resume else 'training'} in {args.nproc} processes, "
          f"each taking its rows of every batch", file=sys.stderr)
    del trainer  # each process builds its own
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.json")
        out = Path(args.resume or args.out or f"runs/train-{args.backend}")
        try:
            spawn(_worker, args.nproc, args, result_file)
        except ProcessFailed as err:
            _take_back(args, out, made)
            if err.kind == "UserError":  # bad input or out of memory, worded as one process words it
                raise UserError(err.message) from None
            raise _Failed(f"--nproc {args.nproc}: training process {err.rank} failed: {err.kind}: "
                          f"{err.message}") from None
        if not Path(result_file).is_file():
            _take_back(args, out, made)
            raise _Failed(f"--nproc {args.nproc}: process 0 ended without a result (interrupted?)")
        got = json.loads(Path(result_file).read_text(encoding="utf-8"))
    got["history"] = {"evals": got.pop("evals")}
    return None, types.SimpleNamespace(**got)


def _take_back(args: argparse.Namespace, out: Path, made: list[Path]) -> None:
    """A new run that wrote no checkpoint removes what it made in --out (its files, then the folders
    it made, if empty): the same --out is then free for the next try."""
    if not args.resume and not (out / "latest").is_file():  # no checkpoint: nothing of the run to keep
        for path in made:
            if path.is_file():
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    """The command; torch's thread count (--threads, or run.json's) is put back as it was when it
    returns, for a caller that runs it in-process (gpt_oracle.cli.main)."""
    _THREADS_BEFORE.clear()
    try:
        return _run(args)
    finally:
        if _THREADS_BEFORE:  # --threads was applied (torch is imported then): the count before it
            sys.modules["torch"].set_num_threads(_THREADS_BEFORE[0])
            _THREADS_BEFORE.clear()


def _run(args: argparse.Namespace) -> int:
    made: list[Path] = []
    if args.nproc > 1:
        try:
            trainer, result = _run_processes(args, made)
        except _Failed as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_FAILED
        if result is None:
            print_result(f"{args.resume} already finished: step {trainer.step} of {trainer.settings.steps}; nothing "
                         f"to do (its checkpoint: {run_folder.latest_checkpoint(Path(args.resume))})")
            return EXIT_OK
        return _report(result)
    trainer = _resume(args) if args.resume else _start(args, made)
    if args.resume:
        if trainer.step >= trainer.settings.steps:  # fit() would save the same step again as a new checkpoint
            print_result(f"{args.resume} already finished: step {trainer.step} of {trainer.settings.steps}; nothing "
                         f"to do (its checkpoint: {run_folder.latest_checkpoint(Path(args.resume))})")
            return EXIT_OK
        kept = getattr(trainer, "autocast_dtype", None)
        print(f"resuming {args.resume} at step {trainer.step} of {trainer.settings.steps}"
              + (" with bf16 autocast, as it started" if kept is not None else ""), file=sys.stderr)
    return _report(_fit(trainer, args, made))


def _report(result) -> int:
    """The run's last line (stdout) or its error (stderr), and the exit status."""
    evals = result.history["evals"]
    last = f"; last eval: train loss {evals[-1][2]:.4f}, val loss {evals[-1][3]:.4f}" if evals else ""
    if not result.ok:
        print(f"error: {result.message}", file=sys.stderr)
        return EXIT_FAILED
    print_result(f"done: {result.step} steps, {result.tokens_seen:,} tokens seen, {result.seconds:.1f} s{last}; "
                 f"checkpoint {result.checkpoint}")
    return EXIT_OK
