"""The `gpt-oracle` console script.

Each subcommand lives in `gpt_oracle/commands/<name>.py` with two functions:
`add_arguments(parser)` and `run(args) -> int` (the exit status). Modules import the trees
inside `run`, so `gpt-oracle --help` is fast and works without torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "check": "parity sweep of numpy_ref (float64 oracle) against torch_impl; exits non-zero on a mismatch",
    "diff": "run both trees on one input and show layer-by-layer differences",
    "info": "parameter count and memory of a configuration",
    "train": "pretrain a model with either tree",
    "generate": "generate text from a checkpoint with either tree",
    "bench": "measure the machine, then time both trees against it",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt-oracle",
        description="GPT-2 in NumPy (the oracle) and PyTorch (the fast path), held against each other.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"gpt_oracle.commands.{name}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args._run(args))


if __name__ == "__main__":
    sys.exit(main())
