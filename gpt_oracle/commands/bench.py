"""`gpt-oracle bench`: measure the machine, then time both trees (and Hugging Face) against it.

Writes results.json, summary.md, table.txt and PNG plots to --out, prints the table and the
issue targets as ratios measured in this run. `--quick` is the short plan (tiny and small
configs, fewer repeats, no torch.compile). See benchmarks/README.md for the FLOP formula.

Exit status 0, or 2 on bad input (the device, a config name), one line on stderr.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt_oracle.user_input import EXIT_OK, UserError, check_device, path_text, print_result, reports_user_errors, \
    user_input


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="the short plan: tiny and small configs (under 2 minutes on 2 cores)")
    parser.add_argument("--out", metavar="DIR", type=path_text, default="bench-results", help="results directory (default: bench-results)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default: cpu)")
    parser.add_argument("--configs", nargs="+", metavar="NAME",
                        help="configs to run: tiny, small, 124M (alias gpt2-small) or a numpy_ref preset")
    parser.add_argument("--no-tokenizer", action="store_true", help="skip the tokenizer throughput benchmark")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    from benchmarks import report
    from benchmarks.runner import Progress, check_out_dir, resolve_config, run_bench

    check_device(args.device)
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        raise UserError(f"--device {args.device}: bench runs on cpu or cuda[:N]")
    for name in args.configs or []:
        with user_input("--configs"):
            resolve_config(name)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out}: exists and is not a directory")
    with user_input(None):  # a folder that cannot be made or written: one line, before minutes of timing
        check_out_dir(args.out)
    payload = run_bench(quick=args.quick, out_dir=args.out, device=args.device, configs=args.configs,
                        progress=Progress(enabled=not args.quiet), tokenizer=not args.no_tokenizer)
    print_result("\n\n".join([
        payload["_table"],
        report.format_table(report.format_targets(payload["targets"]), report.TARGET_HEADER),
        report.format_table(report.format_accuracy(payload["accuracy"]), report.ACC_HEADER),
        f"wrote {args.out}/results.json, summary.md, table.txt, {', '.join(payload['plots']) or 'no plots'} "
        f"({payload['meta']['seconds']:.0f} s)",
    ]))
    return EXIT_OK
