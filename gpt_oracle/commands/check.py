"""`gpt-oracle check`: the parity sweep of numpy_ref (float64 oracle) against torch_impl.

With no arguments it runs on embedded defaults (random-weight `tiny` and `small` models, the
packaged corpus; nothing downloaded), prints one table and exits 1 on any mismatch or error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the table as JSON to PATH")
    parser.add_argument("--device", default="cpu", help="torch device for the fast path (cpu, cuda, cuda:1, mps)")
    parser.add_argument("--dtype", action="append", choices=["float64", "float32", "tf32", "bfloat16", "float16"],
                        help="torch dtype(s) to check (repeatable; default: float64, float32, bfloat16)")
    parser.add_argument("--config", action="append", metavar="NAME",
                        help="configuration(s) to check: tiny, small, or a preset such as gpt2-small (repeatable)")
    parser.add_argument("--checkpoint", metavar="DIR", help="also check real weights from a checkpoint directory")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _configs(names: list[str] | None) -> dict[str, dict] | None:
    if not names:
        return None
    from numpy_ref.config import get_config

    from parity_tests.checks import DEFAULT_CONFIGS

    out = {}
    for name in names:
        out[name] = dict(DEFAULT_CONFIGS[name]) if name in DEFAULT_CONFIGS else dict(get_config(name).to_dict())
        out[name]["drop_rate"] = 0.0  # parity is checked without random dropout
    return out


def run(args: argparse.Namespace) -> int:
    from parity_tests.checks import DEFAULT_DTYPES, format_table, run_check

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"--device {args.device}: torch sees no CUDA device", file=sys.stderr)
            return 2
    start = time.perf_counter()
    progress = None if args.quiet else (lambda msg: print(f"... {msg}", file=sys.stderr, flush=True))
    rows = run_check(configs=_configs(args.config), dtypes=tuple(args.dtype or DEFAULT_DTYPES), device=args.device,
                     checkpoint=args.checkpoint, progress=progress)
    print(format_table(rows))
    print(f"({time.perf_counter() - start:.1f} s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": [r.to_dict() for r in rows], "ok": all(r.ok for r in rows)}, f, indent=2, allow_nan=True)
    return 0 if all(r.ok for r in rows) else 1
