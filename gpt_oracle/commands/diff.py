"""`gpt-oracle diff`: both trees on one input, layer by layer; names the first layer that diverges.

Exit status 0 when every layer is within its tolerance, 1 when one is not, 2 on bad input.
The configuration is --config's (default tiny, random weights) or, with --checkpoint, the
checkpoint's own; the two together are refused, since --config would be ignored.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt_oracle import run_folder
from gpt_oracle.user_input import EXIT_FAILED, EXIT_OK, UserError, check_device, check_dtype_on_device, \
    non_negative_int, one_line, out_of_memory, path_text, positive_int, print_result, reports_user_errors, \
    user_input

DEFAULT_CONFIG = "tiny"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help=f"tiny, small, or a preset name, with random weights (default: {DEFAULT_CONFIG}; "
                                         f"not with --checkpoint, which has its own)")
    parser.add_argument("--checkpoint", metavar="DIR", type=path_text,
                        help="use the weights and config of a checkpoint (or a train output folder: its latest)")
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

    if args.checkpoint is not None and args.config is not None:
        raise UserError(f"--config {args.config} with --checkpoint {args.checkpoint}: the checkpoint's config.json "
                        f"gives the configuration; drop --config (or --checkpoint, for random weights)")
    check_device(args.device)
    check_dtype_on_device(args.dtype, args.device)
    if args.checkpoint is not None:
        from numpy_ref.checkpoint import load_checkpoint

        ckpt = run_folder.checkpoint_dir(Path(args.checkpoint))  # a checkpoint, or a train folder's latest
        with user_input("--checkpoint"):  # the loader names the path
            config, params = load_checkpoint(ckpt, dtype=np.float64)
        cfg = dict(config.to_dict())
    else:
        from parity_tests.model_oracle import WEIGHT_SPREAD

        cfg = parity_config(args.config or DEFAULT_CONFIG)
        model = models.build_numpy_model(cfg, seed=args.seed)
        # Weight matrices WEIGHT_SPREAD times wider, as check_model draws them: at GPT-2's initial
        # spread the blocks add little to the residual stream, and GELU's erf form passed in float32
        # and bf16 (and, on `small`, a later layer was named); biases and layer norms off 0 and 1.
        params = {k: v * WEIGHT_SPREAD if v.ndim == 2 else v
                  for k, v in models.scale_params(model.params, args.seed + 1).items()}
    T = min(args.time, cfg["context_length"])
    check_fits(cfg, args.batch, T, physical_memory())
    ids, targets = models.random_batch(cfg, args.batch, T, args.seed)
    try:
        report = diff_models(cfg, params, ids, targets, dtype=args.dtype, device=args.device)
    except (MemoryError, RuntimeError) as err:  # past the estimate below: still one line, nothing written
        # NumPy raises MemoryError; torch's allocators a RuntimeError ("can't allocate memory" on the
        # CPU; torch.OutOfMemoryError, a RuntimeError, on CUDA, whose memory check_fits does not see).
        if not out_of_memory(err):
            raise
        raise UserError(f"--batch {args.batch} --time {T}: out of memory ({one_line(err)}); choose a smaller "
                        f"--batch, --time or model") from err
    print_result(report.format())
    return EXIT_OK if report.ok else EXIT_FAILED


def diff_bytes(cfg: dict, B: int, T: int) -> int:
    """A rough upper estimate of what one diff holds at once, in bytes: the parameters and their
    gradients in float64 in both trees (4 copies of N), every layer's saved activations (about 20
    (B, T, C) tensors and 3 (B, nh, T, T) ones per block) and the (B, T, V) logits, their softmax
    and gradient, in each tree."""
    V, Tc, C, L, nh = (cfg[k] for k in ("vocab_size", "context_length", "emb_dim", "n_layers", "n_heads"))
    n = V * C * (1 if cfg.get("tie_embeddings", True) else 2) + Tc * C + L * (12 * C * C + 13 * C) + 2 * C
    per_tree = L * B * T * (20 * C + 3 * nh * T) + 3 * B * T * V
    return 8 * (4 * n + 2 * per_tree)


def physical_memory() -> int | None:
    """This machine's memory in bytes (None where the OS does not say)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits(cfg: dict, B: int, T: int, memory: int | None) -> None:
    """A UserError naming --batch and --time when `diff_bytes` exceeds the machine's memory (a
    batch of 10**8 tried to allocate 191 GiB and ended in a MemoryError traceback)."""
    if memory is None or diff_bytes(cfg, B, T) <= memory:
        return
    fits = [b for b in (2**k for k in range(40, -1, -1)) if b < B and diff_bytes(cfg, b, T) <= memory]
    advice = (f"a batch of {fits[0]} would fit" if fits else
              "even a batch of 1 would not: choose a smaller --time or model")
    raise UserError(f"--batch {B} --time {T}: the two trees would hold about {diff_bytes(cfg, B, T) / 2**30:.1f} GiB "
                    f"at once, more than this machine's {memory / 2**30:.1f} GiB; {advice}")
