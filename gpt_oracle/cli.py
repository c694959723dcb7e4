"""The `gpt-oracle` console script.

Each subcommand lives in `gpt_oracle/commands/<name>.py` with two functions:
`add_arguments(parser)` and `run(args) -> int` (the exit status). Modules import the trees
inside `run`, so `gpt-oracle --help` is fast and works without torch.

Exit status (gpt_oracle/user_input.py): 0 success; 1 a real negative result (`check` or `diff`
found a mismatch, `train` stopped on a non-finite loss); 2 bad input, reported as one line on
stderr with nothing written.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gpt_oracle.user_input import EXIT_USAGE

COMMANDS = {
    "check": "parity sweep of numpy_ref (float64 oracle) against torch_impl; exits non-zero on a mismatch",
    "diff": "run both trees on one input and show layer-by-layer differences",
    "info": "parameter count and memory of a configuration",
    "train": "pretrain a model with either tree",
    "generate": "generate text from a checkpoint with either tree",
    "finetune": "fine-tune a checkpoint into a text classifier (chapter 6) with either tree",
    "instruct": "fine-tune a checkpoint to follow instructions (chapter 7) with either tree",
    "classify": "label texts with a fine-tuned classifier (chapter 6) with either tree",
    "bench": "measure the machine, then time both trees against it",
}

# What exit status 1 means, for the commands that have one.
FAILED = {
    "check": "a row is MISMATCH or ERROR",
    "diff": "a layer is over its tolerance",
    "train": "a non-finite loss or gradient norm stopped training (the last good checkpoint is kept)",
    "finetune": "a non-finite loss stopped fine-tuning (nothing is saved)",
    "instruct": "a non-finite loss stopped fine-tuning (nothing is saved)",
}


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (exit status 2, as argparse's own)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _epilog(name: str) -> str:
    failed = f"1 {FAILED[name]}; " if name in FAILED else ""
    return (f"exit status: 0 success; {failed}2 bad input (an option, path, configuration, device or "
            f"checkpoint that cannot be used), reported as one line on stderr, with nothing written")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gpt-oracle",
        description="GPT-2 in NumPy (the oracle) and PyTorch (the fast path), held against each other.",
        epilog="exit status: 0 success; 1 a real negative result (check/diff mismatch, train stopped on a "
               "non-finite loss); 2 bad input, as one line on stderr",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"gpt_oracle.commands.{name}")
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=_epilog(name))
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # a usage error was printed; --help (status 0) exits as argparse does
        if stop.code in (0, None):
            raise
        return int(stop.code)
    if args.command is None:  # a usage error like the others: one line on stderr, exit status 2
        print(f"{parser.prog}: error: a command is required: {', '.join(COMMANDS)} (see {parser.prog} --help)",
              file=sys.stderr)
        return EXIT_USAGE
    args._argv = list(sys.argv[1:] if argv is None else argv)  # what was typed (train --resume checks it)
    return int(args._run(args))


if __name__ == "__main__":
    sys.exit(main())
