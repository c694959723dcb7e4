"""`gpt-oracle diff`: both trees on one input, layer by layer; names the first layer that diverges."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="tiny, small, or a preset name (default: tiny)")
    parser.add_argument("--checkpoint", metavar="DIR", help="use the weights (and config) of a checkpoint")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32", "tf32", "bfloat16", "float16"],
                        help="torch dtype to compare against the float64 oracle (default: float64)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--time", type=int, default=8, help="sequence length (cropped to the context length)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from parity_tests import models
    from parity_tests.checks import DEFAULT_CONFIGS
    from parity_tests.diff import diff_models

    if args.checkpoint:
        from numpy_ref.checkpoint import load_checkpoint

        config, params = load_checkpoint(args.checkpoint, dtype=np.float64)
        cfg = dict(config.to_dict())
    else:
        if args.config in DEFAULT_CONFIGS:
            cfg = dict(DEFAULT_CONFIGS[args.config])
        else:
            from numpy_ref.config import get_config

            cfg = dict(get_config(args.config).to_dict())
        model = models.build_numpy_model(cfg, seed=args.seed)
        params = models.scale_params(model.params, args.seed + 1)
    T = min(args.time, cfg["context_length"])
    ids, targets = models.random_batch(cfg, args.batch, T, args.seed)
    report = diff_models(cfg, params, ids, targets, dtype=args.dtype, device=args.device)
    print(report.format())
    return 0 if report.ok else 1
