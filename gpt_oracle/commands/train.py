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
        --init book --eval-every 5 --eval-batches 5

(`--init book`: the book's model starts from torch.nn's default initialisation; from GPT-2's
normal(0, 0.02) the same run stalls near a training loss of 6. benchmarks/results/ holds a
recorded run.)

The output directory gets `run.json` (these arguments, so `--resume` rebuilds the same data
and model), `log.jsonl`, `loss.png` and the checkpoints (`latest` names the newest; `gpt-oracle
generate --checkpoint DIR` reads it). `--resume DIR` continues an interrupted run exactly (on
CPU, bit for bit); every other option is then taken from DIR/run.json. Exit status 1 when a
non-finite loss stopped training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# The default model: small enough for minutes on 2 cores, big enough to learn the text a bit.
VERDICT_CONFIG = dict(vocab_size=50257, context_length=64, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.1,
                      qkv_bias=False, tie_embeddings=False, ln_eps=1e-5)
GPT2_VOCAB = 50257


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["numpy", "torch"], default="torch", help="which tree trains (default torch)")
    parser.add_argument("--data", metavar="FILE", help="UTF-8 text file to train on (default: the embedded the-verdict)")
    parser.add_argument("--config", default="verdict", help="'verdict' (default) or a preset name (tiny, 124M, ...)")
    parser.add_argument("--steps", type=int, help="optimiser steps (default: --epochs worth)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs when --steps is not given (default 10)")
    parser.add_argument("--out", metavar="DIR", help="output directory (default runs/train-BACKEND)")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    parser.add_argument("--context-length", type=int, help="sequence length (and the model's context)")
    parser.add_argument("--stride", type=int, help="window stride (default: the context length)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--min-lr", type=float, help="final learning rate of the cosine (default lr/10)")
    parser.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--decay-set", choices=["gpt2", "all"], default="gpt2",
                        help="gpt2: decay linear weights only; all: every parameter (the book's chapter 5)")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="global-norm clipping; 0 = off")
    parser.add_argument("--dropout", type=float, help="override the config's drop_rate")
    parser.add_argument("--eval-every", type=int, default=10, help="steps between evaluations (0 = never)")
    parser.add_argument("--eval-batches", type=int, default=5)
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (0 = end only)")
    parser.add_argument("--train-ratio", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=123, help="weights, batch order and dropout")
    from numpy_ref.params import INIT_SCHEMES  # the same names as torch_impl's (a test checks)

    parser.add_argument("--init", choices=list(INIT_SCHEMES), default="gpt2",
                        help="initial weights: GPT-2's normal(0, 0.02) (default) or the book's torch.nn defaults "
                             "(embeddings normal(0, 1), linear layers uniform(+-1/sqrt(fan_in)))")
    parser.add_argument("--dtype", choices=["float32", "float64"],
                        help="parameter dtype (default: float64 for numpy, float32 for torch)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--prompt", default="Every effort moves you", help="sample prompt at each evaluation")
    parser.add_argument("--sample-tokens", type=int, default=20)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_options(args: argparse.Namespace) -> dict:
    """Everything that defines the run, as saved in run.json."""
    opts = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("command", "resume")}
    opts["dtype"] = args.dtype or ("float64" if args.backend == "numpy" else "float32")
    return opts


def _config_dict(opts: dict) -> dict:
    if opts["config"] == "verdict":
        cfg = dict(VERDICT_CONFIG)
    else:
        from numpy_ref.config import get_config

        cfg = get_config(opts["config"]).to_dict()
    cfg["vocab_size"] = GPT2_VOCAB  # the GPT-2 tokenizer's ids must all be valid
    if opts.get("context_length"):
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


def _build(opts: dict):
    """(tree modules, model, train loader, val loader, encoding, settings) for the options."""
    text = Path(opts["data"]).read_text(encoding="utf-8") if opts["data"] else None
    cfg = _config_dict(opts)
    T = cfg["context_length"]
    stride = opts["stride"] or T
    if opts["backend"] == "numpy":
        import numpy as np

        from numpy_ref import data
        from numpy_ref.config import GPTConfig
        from numpy_ref.model import GPTModel
        from numpy_ref.tokenizer import get_encoding
        from numpy_ref.train import Trainer
        from numpy_ref.train_run import TrainSettings

        model = GPTModel(GPTConfig(**cfg), seed=opts["seed"], dtype=np.dtype(opts["dtype"]),
                         init=opts.get("init", "gpt2"))
    else:
        import torch

        from torch_impl import data
        from torch_impl.config import GPTConfig
        from torch_impl.model import GPTModel
        from torch_impl.tokenizer import get_encoding
        from torch_impl.train import Trainer
        from torch_impl.train_run import TrainSettings

        if opts.get("threads"):
            torch.set_num_threads(opts["threads"])
        model = GPTModel(GPTConfig(**cfg), seed=opts["seed"], dtype=getattr(torch, opts["dtype"]), device=opts["device"],
                         init=opts.get("init", "gpt2"))
    encoding = get_encoding("gpt2")
    train_text, val_text = data.split_train_val(text if text is not None else data.load_verdict(), opts["train_ratio"])
    B = opts["batch_size"]
    train = data.create_dataloader(train_text, batch_size=B, max_length=T, stride=stride, shuffle=True,
                                   drop_last=True, seed=opts["seed"], encoding=encoding)
    val = data.create_dataloader(val_text, batch_size=B, max_length=T, stride=stride, shuffle=False,
                                 drop_last=False, seed=opts["seed"], encoding=encoding)
    steps = opts["steps"] or opts["epochs"] * len(train) // opts["grad_accum"]
    settings = TrainSettings(**_settings_dict(opts, max(1, steps)))
    return Trainer, model, train, val, encoding, settings


def _reporting() -> dict:
    """The optional tqdm bar and matplotlib plot (the trees themselves need neither)."""
    from gpt_oracle.train_report import TqdmProgress, save_loss_plot

    return dict(progress_cls=TqdmProgress, plot=save_loss_plot)


def run(args: argparse.Namespace) -> int:
    if args.resume:
        out = Path(args.resume)
        run_file = out / "run.json"
        if not run_file.is_file():
            print(f"--resume {out}: no run.json there (is it a gpt-oracle train output directory?)", file=sys.stderr)
            return 2
        opts = json.loads(run_file.read_text(encoding="utf-8"))
        Trainer, model, train, val, encoding, _ = _build(opts)
        trainer = Trainer.resume(out, model, train, val, encoding=encoding, **_reporting())
        print(f"resuming {out} at step {trainer.step} of {trainer.settings.steps} ({opts['backend']})", file=sys.stderr)
    else:
        opts = _run_options(args)
        out = Path(args.out or f"runs/train-{args.backend}")
        Trainer, model, train, val, encoding, settings = _build(opts)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "run.json.tmp"
        tmp.write_text(json.dumps(opts, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out / "run.json")
        trainer = Trainer(model, train, val, settings, out_dir=out, encoding=encoding, **_reporting())
        n_params = model.num_parameters()
        print(f"training {n_params:,} parameters ({opts['backend']}, {opts['dtype']}) for {settings.steps} steps "
              f"of {opts['batch_size']}x{model.config.context_length} tokens; output in {out}", file=sys.stderr)
    result = trainer.fit()
    evals = result.history["evals"]
    last = f"; last eval: train loss {evals[-1][2]:.4f}, val loss {evals[-1][3]:.4f}" if evals else ""
    if not result.ok:
        print(f"error: {result.message}", file=sys.stderr)
        return 1
    print(f"done: {result.step} steps, {result.tokens_seen:,} tokens seen, {result.seconds:.1f} s{last}; "
          f"checkpoint {result.checkpoint}")
    return 0
