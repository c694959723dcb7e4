"""`gpt-oracle check`: the parity sweep of numpy_ref (float64 oracle) against torch_impl.

With no arguments it runs on embedded defaults (random-weight `tiny` and `small` models, the
packaged corpus; nothing downloaded), prints one table and exits 1 on any mismatch or error
row, 2 on bad input (checked before the sweep starts: configurations, device, checkpoint, the
--json path). `--json PATH` writes the table as strict JSON (a non-finite error is null), to a
temporary file renamed into place, so an existing file is replaced whole or not at all; there a
max rel err is null where it is non-finite or where no oracle entry exceeds atol (the table's
"n/a": no relative error means anything there). A --dtype or --config given twice (or a preset
and its alias) is checked once, in the order first given.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gpt_oracle import run_folder
from gpt_oracle.user_input import EXIT_FAILED, EXIT_OK, UserError, check_device, check_dtype_on_device, \
    check_output_file, path_text, print_result, reports_user_errors, user_input


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", type=path_text,
                        help="also write the table as strict JSON to PATH (non-finite errors as null)")
    parser.add_argument("--device", default="cpu", help="torch device for the fast path (cpu, cuda, cuda:1, mps)")
    parser.add_argument("--dtype", action="append", choices=["float64", "float32", "tf32", "bfloat16", "float16"],
                        help="torch dtype(s) to check (repeatable; default: float64, float32, bfloat16; tf32 on CUDA only)")
    parser.add_argument("--config", action="append", metavar="NAME",
                        help="configuration(s) to check: tiny, small, or a preset such as gpt2-small (repeatable)")
    parser.add_argument("--checkpoint", metavar="DIR", type=path_text, help="also check real weights from a checkpoint directory (or a train output folder: its latest)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def parity_config(name: str) -> dict:
    """The configuration dict `check` and `diff` mean by NAME: one of the embedded defaults
    (tiny, small) or a numpy_ref preset or alias; a UserError naming the known ones otherwise."""
    from numpy_ref.config import ALIASES, PRESETS, get_config

    from parity_tests.checks import DEFAULT_CONFIGS

    if name in DEFAULT_CONFIGS:
        return dict(DEFAULT_CONFIGS[name])
    if ALIASES.get(name, name) not in PRESETS:
        known = sorted(set(DEFAULT_CONFIGS) | set(PRESETS)) + sorted(ALIASES)
        raise UserError(f"--config {name!r}: unknown configuration; expected one of {', '.join(known)}")
    return dict(get_config(name).to_dict())


def _configs(names: list[str] | None) -> dict[str, dict] | None:
    """NAME -> configuration, in the order given; a name repeated, or a preset named again by its
    alias (124M and gpt2-small), is checked once, under the name first given."""
    from numpy_ref.config import ALIASES

    if not names:
        return None
    out, seen = {}, set()
    for name in names:
        config = parity_config(name)
        if ALIASES.get(name, name) in seen:
            continue
        seen.add(ALIASES.get(name, name))
        out[name] = config
        out[name]["drop_rate"] = 0.0  # parity is checked without random dropout
    return out


def _check_checkpoint(directory: str) -> None:
    """Load the checkpoint once before the sweep, so a bad one is one line, not rows at the end."""
    import numpy as np

    from numpy_ref.checkpoint import load_checkpoint

    with user_input("--checkpoint"):  # the loader names the path
        load_checkpoint(directory, dtype=np.float32)


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    from gpt_oracle.json_file import write_json
    from parity_tests.checks import DEFAULT_DTYPES, format_table, run_check

    configs = _configs(args.config)
    dtypes = tuple(dict.fromkeys(args.dtype or DEFAULT_DTYPES))  # each once, in the order given
    check_device(args.device)
    for dtype in dtypes:
        check_dtype_on_device(dtype, args.device)
    if args.checkpoint is not None:  # a checkpoint folder, or a train output folder (its `latest`)
        args.checkpoint = str(run_folder.checkpoint_dir(Path(args.checkpoint)))
        _check_checkpoint(args.checkpoint)
    if args.json is not None:
        check_output_file("--json", args.json)
    start = time.perf_counter()
    progress = None if args.quiet else (lambda msg: print(f"... {msg}", file=sys.stderr, flush=True))
    rows = run_check(configs=configs, dtypes=dtypes, device=args.device, checkpoint=args.checkpoint, progress=progress)
    ok = all(r.ok for r in rows)
    if args.json is not None:  # before the table: a reader of stdout that leaves early (`| head`) loses no file
        write_json(args.json, {"rows": [r.to_dict() for r in rows], "ok": ok})
    print_result(f"{format_table(rows)}\n({time.perf_counter() - start:.1f} s)")
    return EXIT_OK if ok else EXIT_FAILED
