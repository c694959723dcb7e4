"""`gpt-oracle generate`: continue a prompt with a checkpoint, in either tree.

    gpt-oracle generate --checkpoint DIR --prompt TEXT [--backend numpy|torch]
        [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]

DIR is a checkpoint directory (config.json + model.safetensors, ours or Hugging Face's) or a
`gpt-oracle train` output directory (its newest checkpoint is used). Temperature 0 (the
default) is greedy. The uniform draws that pick sampled tokens come from
`numpy.random.default_rng(seed)` for both backends, so the same seed gives the same text from
either tree (up to float32 rounding in the torch logits). Generation stops at `<|endoftext|>`
unless `--no-stop`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint or training output directory")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--backend", choices=["numpy", "torch"], default="torch")
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, help="keep the k most likely tokens (clamped to the vocabulary)")
    parser.add_argument("--top-p", type=float, help="keep the smallest set with probability >= p")
    parser.add_argument("--seed", type=int, default=0, help="seed of the uniform draws")
    parser.add_argument("--no-stop", action="store_true", help="do not stop at <|endoftext|>")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole context every step")
    parser.add_argument("--dtype", choices=["float32", "float64"], help="default: float64 numpy, float32 torch")
    parser.add_argument("--device", default="cpu", help="torch device")


def _checkpoint_dir(path: Path) -> Path:
    pointer = path / "latest"
    if not (path / "config.json").is_file() and pointer.is_file():
        return path / pointer.read_text(encoding="utf-8").strip()
    return path


def run(args: argparse.Namespace) -> int:
    import numpy as np

    ckpt = _checkpoint_dir(Path(args.checkpoint))
    if not (ckpt / "config.json").is_file():
        print(f"--checkpoint {args.checkpoint}: no config.json there (nor a 'latest' checkpoint)", file=sys.stderr)
        return 2
    if args.max_new_tokens < 0:
        print(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}", file=sys.stderr)
        return 2
    try:
        return _generate(args, ckpt)
    except ValueError as err:  # a bad option or prompt (the message names the value)
        print(f"error: {err}", file=sys.stderr)
        return 2


def _generate(args: argparse.Namespace, ckpt: Path) -> int:
    import numpy as np

    coins = np.random.default_rng(args.seed).random((args.max_new_tokens, 1))  # (n, B=1)
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.backend == "numpy":
        from numpy_ref.generate import generate
        from numpy_ref.model import GPTModel
        from numpy_ref.tokenizer import get_encoding

        model = GPTModel.from_pretrained(ckpt, dtype=np.dtype(args.dtype or "float64"))
        encoding = get_encoding("gpt2")
        ids = np.array([encoding.encode(args.prompt)], dtype=np.int64)  # (1, T)
        eos = None if args.no_stop or encoding.eot_token >= model.config.vocab_size else encoding.eot_token
        out = generate(model, ids, args.max_new_tokens, coins=coins, eos_id=eos, use_cache=not args.no_cache,
                       **options)[0].tolist()
    else:
        import torch

        from torch_impl.generate import generate
        from torch_impl.model import GPTModel
        from torch_impl.tokenizer import get_encoding

        model = GPTModel.from_pretrained(ckpt, dtype=getattr(torch, args.dtype or "float32"), device=args.device)
        encoding = get_encoding("gpt2")
        ids = torch.tensor([encoding.encode(args.prompt)], dtype=torch.int64)  # (1, T)
        eos = None if args.no_stop or encoding.eot_token >= model.config.vocab_size else encoding.eot_token
        out = generate(model, ids, args.max_new_tokens, coins=torch.from_numpy(coins), eos_id=eos,
                       use_cache=not args.no_cache, **options)[0].tolist()
    if eos is not None and out[-1] == eos:
        out = out[: out.index(eos, ids.shape[1])]  # drop the stop token (and anything padded after it)
    print(encoding.decode(out))
    return 0
