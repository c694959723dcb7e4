"""`gpt-oracle info CONFIG`: parameter count and memory of a configuration.

For gpt2-small this reproduces the figures of chapter 4 of "Build a Large Language Model (From
Scratch)": 163,009,536 parameters, 124,412,160 counting the output head as tied to the token
embedding (the GPT-2 paper's "124M"), and 621.83 MB in float32 (bytes / 1024**2).
CONFIG is a preset name or alias (tiny, gpt2-small/124M, gpt2-medium/355M, gpt2-large/774M,
gpt2-xl/1558M; a preset's name means the preset even where a folder of that name exists: write
the folder as ./NAME), a checkpoint directory (its config.json read as the loaders read it: the
`gpt_oracle` object, which must hold every GPTConfig field and agree with the Hugging Face keys
beside it, or those keys alone) or a `train` output folder (the checkpoint its `latest` names).
`--all` takes no names.
Uses only numpy_ref (no torch import).

Exit status 0, or 2 on an unknown name or an unreadable or incomplete config.json (one line on
stderr).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from gpt_oracle import run_folder
from gpt_oracle.user_input import EXIT_OK, UserError, print_result, reports_user_errors, user_input


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="*", default=None,
                        help="preset name(s), checkpoint directory(ies) or train output folder(s) (default: gpt2-small)")
    parser.add_argument("--all", action="store_true", help="every preset (no names with it)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def load_config(name: str):
    """A preset (or alias) by name, or the GPTConfig stored in a checkpoint directory."""
    import dataclasses

    from numpy_ref.config import ALIASES, PRESETS, GPTConfig, get_config

    # A preset's name is the preset even where a folder of that name exists here (`info tiny`
    # beside a run folder called tiny); that folder is read when written as a path (./tiny).
    written_as_path = os.sep in name or (os.altsep is not None and os.altsep in name) or name.startswith(".")
    if not written_as_path and ALIASES.get(name, name) in PRESETS:
        return get_config(name)
    if not os.path.isdir(name):
        raise UserError(f"{name!r} is neither a preset ({', '.join([*PRESETS, *ALIASES])}) nor a directory")
    path = os.path.join(run_folder.checkpoint_dir(Path(name), "info"), "config.json")  # or a train folder's latest
    with user_input(None):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    with user_input(f"{path}: not valid JSON"):
        stored = json.loads(text)
    if not isinstance(stored, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(stored).__name__}")
    if "gpt_oracle_num_classes" in stored:  # its head is not the vocabulary head these counts describe
        raise UserError(f"{path}: a classifier's checkpoint ({stored['gpt_oracle_num_classes']!r} classes), not a "
                        f"language model's; info counts a language model's parameters")
    ours = stored.get("gpt_oracle")
    if "gpt_oracle" in stored and not isinstance(ours, dict):
        raise UserError(f"{path}: 'gpt_oracle' must be a JSON object holding a GPTConfig, got "
                        f"{type(ours).__name__} {json.dumps(ours)[:40]}")
    missing = [f.name for f in dataclasses.fields(GPTConfig) if ours is not None and f.name not in ours]
    if missing:  # a default filled in for a missing field would describe another model
        raise UserError(f"{path}: 'gpt_oracle' lacks the field(s) {missing}")
    # The loaders' own reading: the Hugging Face keys alone (no gpt_oracle object) describe the
    # model too, and where both are there they must agree (a config the loaders refuse is refused).
    from numpy_ref.checkpoint_config import config_from_hf

    with user_input(None):
        return config_from_hf(stored, path)


def describe(name: str) -> dict:
    """Everything `info` prints for one configuration, as plain numbers."""
    from numpy_ref.params import parameter_report

    config = load_config(name)
    r = parameter_report(config)
    return dict(name=name, config=config.to_dict(), total=r.total, with_tied_head=r.with_tied_head, head=r.head,
                embeddings=r.embeddings, per_block=r.per_block, n_layers=config.n_layers,
                bytes_float32=r.bytes_float32, mb_float32=round(r.mb_float32, 2))


def format_text(d: dict) -> str:
    c = d["config"]
    return "\n".join([
        f"{d['name']}: V={c['vocab_size']} Tc={c['context_length']} C={c['emb_dim']} nh={c['n_heads']} "
        f"L={c['n_layers']} drop_rate={c['drop_rate']} qkv_bias={c['qkv_bias']} tie_embeddings={c['tie_embeddings']}",
        f"  Total number of parameters: {d['total']:,}",
        f"  Number of trainable parameters considering weight tying: {d['with_tied_head']:,}",
        f"  Total size of the model: {d['mb_float32']:.2f} MB (float32, {d['bytes_float32']:,} bytes / 1024**2)",
        f"  of which: embeddings (wte + wpe) {d['embeddings']:,}, {d['n_layers']} blocks x {d['per_block']:,}, "
        f"separate output head {d['head']:,}",
    ])


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    from numpy_ref.config import PRESETS

    if args.all and args.config:  # the names would be ignored, an unknown one unreported
        raise UserError(f"--all describes every preset; it takes no names (got {' '.join(args.config)})")
    names = list(PRESETS) if args.all else (args.config or ["gpt2-small"])
    rows = [describe(n) for n in names]
    print_result(json.dumps(rows, indent=2) if args.json else "\n".join(format_text(r) for r in rows))
    return EXIT_OK
