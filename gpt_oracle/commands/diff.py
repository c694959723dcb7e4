"""`gpt-oracle diff`: both trees on one input, layer by layer; names the first layer that diverges.

Exit status 0 when every layer is within its tolerance, 1 when one is not, 2 on bad input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt_oracle import run_folder
from gpt_oracle.user_input import EXIT_FAILED, EXIT_OK, check_device, check_dtype_on_device, non_negative_int, \
    positive_int, reports_user_errors, user_input


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="tiny, small, or a preset name (default: tiny)")
    parser.add_argument("--checkpoint", metavar="DIR", help="use the weights (and config) of a checkpoint (or a train output folder: its latest)")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32", "tf32", "bfloat16", "float16"],
                        help="torch dtype to compare against the float64 oracle (default: float64; tf32 on CUDA only)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps (default: cpu)")
    parser.add_argument("--batch", type=positive_int, default=2, help="batch size, >= 1 (default: 2)")
    parser.add_argument("--time", type=positive_int, default=8,
                        help="sequence length, >= 1 (cropped to the context length; default: 8)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="weights and input, >= 0 (default: 0)")


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    import numpy as np

    from gpt_oracle.commands.check import parity_config
    from parity_tests import models
    from parity_tests.diff import diff_models

    check_device(args.device)
    check_dtype_on_device(args.dtype, args.device)
    if args.checkpoint:
        from numpy_ref.checkpoint import load_checkpoint

        ckpt = run_folder.checkpoint_dir(Path(args.checkpoint))  # a checkpoint, or a train folder's latest
        with user_input("--checkpoint"):  # the loader names the path
            config, params = load_checkpoint(ckpt, dtype=np.float64)
        cfg = dict(config.to_dict())
    else:
        cfg = parity_config(args.config)
        model = models.build_numpy_model(cfg, seed=args.seed)
        params = models.scale_params(model.params, args.seed + 1)
    T = min(args.time, cfg["context_length"])
    ids, targets = models.random_batch(cfg, args.batch, T, args.seed)
    report = diff_models(cfg, params, ids, targets, dtype=args.dtype, device=args.device)
    print(report.format())
    return EXIT_OK if report.ok else EXIT_FAILED
