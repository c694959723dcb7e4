"""`gpt-oracle info CONFIG`: parameter count and memory of a configuration.

For gpt2-small this reproduces the figures of chapter 4 of "Build a Large Language Model (From
Scratch)": 163,009,536 parameters, 124,412,160 counting the output head as tied to the token
embedding (the GPT-2 paper's "124M"), and 621.83 MB in float32 (bytes / 1024**2).
CONFIG is a preset name or alias (tiny, gpt2-small/124M, gpt2-medium/355M, gpt2-large/774M,
gpt2-xl/1558M) or a checkpoint directory (its config.json's `gpt_oracle` object). Uses only
numpy_ref (no torch import).
"""

from __future__ import annotations

import argparse
import json
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="*", default=["gpt2-small"],
                        help="preset name(s) or checkpoint directory(ies) (default: gpt2-small)")
    parser.add_argument("--all", action="store_true", help="every preset")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def load_config(name: str):
    """A preset (or alias) by name, or the GPTConfig stored in a checkpoint directory."""
    from numpy_ref.config import GPTConfig, get_config

    if os.path.isdir(name):
        path = os.path.join(name, "config.json")
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
        if "gpt_oracle" not in stored:
            raise ValueError(f"{path} has no 'gpt_oracle' object holding a GPTConfig")
        return GPTConfig.from_dict(stored["gpt_oracle"])
    return get_config(name)


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


def run(args: argparse.Namespace) -> int:
    from numpy_ref.config import PRESETS

    names = list(PRESETS) if args.all else args.config
    try:
        rows = [describe(n) for n in names]
    except (ValueError, OSError) as exc:
        print(f"gpt-oracle info: {exc}")
        return 2
    print(json.dumps(rows, indent=2) if args.json else "\n".join(format_text(r) for r in rows))
    return 0
