"""`gpt-oracle generate`: continue a prompt with a checkpoint, in either tree.

    gpt-oracle generate --checkpoint DIR (--prompt TEXT | --instruction TEXT [--input TEXT])
        [--backend numpy|torch] [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]

DIR is a checkpoint directory (config.json + model.safetensors, ours or Hugging Face's) or a
`gpt-oracle train` output directory (its newest checkpoint is used). Temperature 0 (the
default) is greedy. The uniform draws that pick sampled tokens come from
`numpy.random.default_rng(seed)` for both backends, so the same seed gives the same text from
either tree (up to float32 rounding in the torch logits). Generation stops at `<|endoftext|>`
unless `--no-stop`. With --prompt the prompt and its continuation are printed; with --instruction
(and --input) the prompt is the Alpaca text `gpt-oracle instruct` trains on
(instruction_data.format_instruction, the response left empty) and only the response is printed.

Exit status 0, or 2 on bad input (an option, the prompt, the device or the checkpoint), reported
as one line on stderr before the model runs.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Iterator

from gpt_oracle import run_folder
from gpt_oracle.user_input import EXIT_OK, UserError, check_device, encode_prompt, int_in, non_negative_int, \
    path_text, print_result, reports_user_errors, user_input

# Sampled tokens take their uniform draws up front (8 bytes each), and a token takes tens of ms at
# GPT-2 small on a CPU: a million is hours of text, and 10**12 would ask for 7 TiB of draws.
MAX_NEW_TOKENS = 1_000_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR", type=path_text, help="checkpoint or training output directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the text to continue (printed with its continuation)")
    source.add_argument("--instruction", help="an instruction, for a model from `gpt-oracle instruct`: the prompt is "
                                              "its Alpaca text, and only the response is printed")
    parser.add_argument("--input", dest="input_text", default="", help="the instruction's input (with --instruction)")
    parser.add_argument("--backend", choices=["numpy", "torch"], default="torch")
    parser.add_argument("--max-new-tokens", type=int_in(0, MAX_NEW_TOKENS), default=50,
                        help=f"0 to {MAX_NEW_TOKENS:,} (default: 50; past the context the oldest tokens are cropped)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, help="keep the k most likely tokens (clamped to the vocabulary)")
    parser.add_argument("--top-p", type=float,
                        help="in (0, 1]: keep the most likely tokens until their probability reaches p (p = 1 "
                             "still drops a token so unlikely, under about 1e-16 of the total, that adding it "
                             "leaves the float64 sum unchanged; leave --top-p out to keep every token)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the uniform draws, >= 0 (default: 0)")
    parser.add_argument("--no-stop", action="store_true", help="do not stop at <|endoftext|>")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole context every step")
    parser.add_argument("--dtype", choices=["float32", "float64"], help="default: float64 numpy, float32 torch")
    parser.add_argument("--device", default="cpu", help="torch device (the numpy backend runs on the CPU only)")


def _check_sampling(args: argparse.Namespace) -> None:
    """The library's own checks of each sampling option (a pick from a one-token row), before
    the model is loaded."""
    from numpy_ref.generate import sample_next

    for option, name in (("--temperature", "temperature"), ("--top-k", "top_k"), ("--top-p", "top_p")):
        value = getattr(args, name)
        with user_input(f"{option} {value}"):
            sample_next([0.0], coin=0.0, **{name: value})


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    if args.input_text and args.instruction is None:
        raise UserError("--input is the input of an --instruction; with --prompt, put it in the prompt")
    if args.instruction is not None and not args.instruction.strip():
        raise UserError(f"--instruction {args.instruction!r}: the instruction must hold some text")
    check_device(args.device, args.backend)
    _check_sampling(args)
    ckpt = run_folder.checkpoint_dir(Path(args.checkpoint))
    return _generate(args, ckpt)


def _generate(args: argparse.Namespace, ckpt: Path) -> int:
    import numpy as np

    # Greedy decoding (temperature 0) reads no draw, so none is made; sampling draws them all up
    # front from this NumPy generator for either backend, so one seed gives one text from both.
    sampling = bool(args.temperature)
    coins = np.random.default_rng(args.seed).random((args.max_new_tokens, 1)) if sampling else None  # (n, B=1)
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.backend == "numpy":
        from numpy_ref.generate import generate
        from numpy_ref.model import GPTModel
        from numpy_ref.tokenizer import get_encoding

        from numpy_ref.instruction_data import format_instruction

        encoding = get_encoding("gpt2")
        prompt = _prompt_ids(args, encoding, format_instruction)
        with user_input("--checkpoint"):  # the loader names the path
            model = GPTModel.from_pretrained(ckpt, dtype=np.dtype(args.dtype or "float64"))
        ids = np.array([_in_vocabulary(prompt, model.config.vocab_size, _source(args))], dtype=np.int64)  # (1, T)
        eos = None if args.no_stop or encoding.eot_token >= model.config.vocab_size else encoding.eot_token
        with _finite_logits(ckpt, model.dtype):
            out = generate(model, ids, args.max_new_tokens, coins=coins, eos_id=eos, use_cache=not args.no_cache,
                           **options)[0].tolist()
    else:
        import torch

        from torch_impl.generate import generate
        from torch_impl.model import GPTModel
        from torch_impl.tokenizer import get_encoding

        from torch_impl.instruction_data import format_instruction

        encoding = get_encoding("gpt2")
        prompt = _prompt_ids(args, encoding, format_instruction)
        with user_input("--checkpoint"):  # the loader names the path
            model = GPTModel.from_pretrained(ckpt, dtype=getattr(torch, args.dtype or "float32"), device=args.device)
        ids = torch.tensor([_in_vocabulary(prompt, model.config.vocab_size, _source(args))], dtype=torch.int64)  # (1, T)
        eos = None if args.no_stop or encoding.eot_token >= model.config.vocab_size else encoding.eot_token
        coins = None if coins is None else torch.from_numpy(coins)
        with _finite_logits(ckpt, model.dtype):
            out = generate(model, ids, args.max_new_tokens, coins=coins, eos_id=eos, use_cache=not args.no_cache,
                           **options)[0].tolist()
    if eos is not None and out[-1] == eos:
        out = out[: out.index(eos, ids.shape[1])]  # drop the stop token (and anything padded after it)
    if args.instruction is not None:
        out = out[len(prompt):]  # the response only (the prompt is never cropped from the returned ids)
    # A checkpoint whose vocabulary is padded past the tokenizer's (say 50304) can sample an id
    # with no text: the decoder's ValueError names it, and it is reported as one line.
    with user_input(f"the generated ids (the checkpoint's vocab_size is {model.config.vocab_size}, the GPT-2 "
                    f"tokenizer's {encoding.n_vocab})"):
        text = encoding.decode(out)
    print_result(text)
    return EXIT_OK


@contextlib.contextmanager
def _finite_logits(ckpt: Path, dtype) -> Iterator[None]:
    """Logits that are not finite (the samplers' ValueError) as one line naming the checkpoint:
    weights finite in the file can still overflow in the forward (a training run that diverged
    saves its last checkpoint before the step that failed, with weights near 1e30). A traceback
    otherwise."""
    try:
        yield
    except ValueError as exc:
        if not str(exc).startswith(("logits contain NaN", "the largest logit is")):
            raise
        raise UserError(f"--checkpoint {ckpt}: the model's logits are not finite ({exc}); its weights overflow in "
                        f"{dtype} (from a training run that diverged?)") from None


def _prompt_ids(args: argparse.Namespace, encoding, format_instruction) -> list[int]:
    """--prompt's ids, or those of --instruction's Alpaca prompt (the backend's own formatter)."""
    if args.instruction is None:
        return encode_prompt(encoding, args.prompt)
    for option, text in (("--instruction", args.instruction), ("--input", args.input_text)):
        if text:
            encode_prompt(encoding, text, option)  # each part checked under its own name (special tokens)
    return encode_prompt(encoding, format_instruction(args.instruction, args.input_text), "--instruction")


def _source(args: argparse.Namespace) -> str:
    return "--prompt" if args.instruction is None else "--instruction"


def _in_vocabulary(ids: list[int], vocab_size: int, option: str = "--prompt") -> list[int]:
    """The prompt's GPT-2 ids, each checked against the checkpoint's vocabulary (a small model,
    such as the `tiny` preset's 101 ids, has no embedding for most of them)."""
    for token in ids:
        if token >= vocab_size:
            raise UserError(f"{option}: token id {token} is outside the checkpoint's vocabulary of {vocab_size} "
                            f"(ids 0 .. {vocab_size - 1}); the GPT-2 tokenizer gives ids up to 50256")
    return ids
