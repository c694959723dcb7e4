"""`gpt-oracle instruct`: fine-tune a language model to follow instructions (the book's chapter 7).

    gpt-oracle instruct --checkpoint DIR --data FILE.jsonl --out DIR [--backend torch|numpy]
        [--epochs 2] [--batch-size 8] [--lr 5e-5] [--weight-decay 0.1] [--mask-prompt]
        [--val-ratio 0.1] [--seed 123] [--max-new-tokens 64]

FILE.jsonl holds one record per line: {"instruction": "...", "input": "...", "output": "..."}
("input" may be "" or left out). Each record becomes the Alpaca-layout prompt and its response
(instruction_data.format_instruction), encoded with GPT-2's tokenizer (special tokens refused);
a batch gets one end-of-text token per row and is padded with it (instruction_data.
instruction_collate): the loss counts every next-token target up to and including that
end-of-text, and with --mask-prompt the response's and the end-of-text only (the book's exercise
7.2). Rows are cut to the context length, as the book cuts them (a row longer than the context
loses its last targets, the end-of-text first); a record whose prompt alone is longer than the
context would train no response token and is refused, naming its line (a prompt of exactly the
context's length still trains its first response token, the target at the last position). An "output" may be "" (the model
learns to stop at once). Every parameter is trained with AdamW, without dropout; the examples
are shuffled with --seed and --val-ratio of them validate, as in `gpt-oracle finetune`.

After each epoch: the mean loss per counted target on both sets (stderr, and a line of
--out/log.jsonl). At the end the model answers the first validation record (else the first
training record in the shuffled order) greedily, up to --max-new-tokens or its end-of-text, and --out holds `model/` (a
language-model checkpoint: `generate --checkpoint`, GPTModel.from_pretrained in either tree),
`log.jsonl` and `run.json`; like `finetune`, everything is written beside --out first and
renamed into place only when complete.

Exit status: 0 done; 1 a non-finite loss stopped training (nothing saved); 2 bad input (an option,
a line of the data file, the checkpoint, --out), one line on stderr, before anything is written.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from gpt_oracle import run_folder
from gpt_oracle.fine_tuning import (EOT, add_common_arguments, check_out, check_text, finish, json_lines,
                                    output_folder, run_record, split, train_epochs)
from gpt_oracle.user_input import EXIT_FAILED, EXIT_OK, UserError, int_in, print_result, reports_user_errors, \
    user_input

IGNORE = -100  # the targets the loss leaves out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, data_help='JSON lines, one record each: {"instruction": ..., "input": ..., '
                                           '"output": ...}',
                         out_help="output directory, new or empty: model/, log.jsonl, run.json", epochs=2,
                         val_ratio=0.1, seed_help="the split and the batch order (default 123)")
    parser.add_argument("--mask-prompt", action="store_true",
                        help="count the response's targets and its end-of-text only (the book's exercise 7.2)")
    parser.add_argument("--max-new-tokens", type=int_in(0, 4096), default=64,
                        help="tokens of the answer shown at the end, 0 to 4096 (default 64; 0: none)")


def read_records(path: Path) -> list[tuple[str, str, str, int]]:
    """(instruction, input, output, line number) per non-blank line; a UserError naming the file
    and the line otherwise."""
    records = []
    for where, number, record in json_lines(path):
        if not isinstance(record, dict) or not {"instruction", "output"} <= set(record) \
                or not set(record) <= {"instruction", "input", "output"}:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise UserError(f'{where}: expected an object {{"instruction": ..., "input": ..., "output": ...}} '
                            f'("input" optional), got {keys}')
        fields = [record["instruction"], record.get("input", ""), record["output"]]
        for name, value in zip(("instruction", "input", "output"), fields):
            if not isinstance(value, str):
                raise UserError(f"{where}: {name!r} must be a string, got {value!r}"[:200])
            check_text(where, name, value)
        if not fields[0].strip():
            raise UserError(f"{where}: 'instruction' must not be empty or blank")
        records.append((*fields, number))
    if len(records) < 2:
        raise UserError(f"--data {path}: {len(records)} record(s); fine-tuning needs at least 2")
    return records


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    out, data = Path(args.out), Path(args.data)
    check_out(out)
    records = read_records(data)
    ckpt = run_folder.checkpoint_dir(Path(args.checkpoint))
    tree = _Numpy(ckpt) if args.backend == "numpy" else _Torch(ckpt)
    config = tree.model.config
    if config.vocab_size <= EOT:
        raise UserError(f"--checkpoint {ckpt}: its vocabulary has {config.vocab_size} tokens; GPT-2's tokenizer "
                        f"and end-of-text ({EOT}) need {EOT + 1}")
    prompts, sequences = [], []
    for instruction, input_text, output, number in records:
        with user_input(f"--data {data}: line {number}"):
            prompt = tree.encoding.encode(tree.format(instruction, input_text))
            response = tree.encoding.encode(output)
        if len(prompt) > config.context_length:  # the first response target sits at position len(prompt) - 1
            raise UserError(f"--data {data}: line {number}: the prompt takes {len(prompt)} tokens and the context "
                            f"holds {config.context_length}: no response token would be trained (shorten the "
                            f"instruction or input, or use a model with a longer context)")
        prompts.append(prompt)
        sequences.append(prompt + response)  # encoded apart: the prompt's tokens are exactly a prefix
    train, val = split(len(records), args.val_ratio, args.seed)
    Tc = config.context_length

    def batch(rows):
        return tree.collate([sequences[r] for r in rows], pad_id=EOT, ignore_index=IGNORE, max_length=Tc,
                            prompt_lengths=[len(prompts[r]) for r in rows] if args.mask_prompt else None)

    with output_folder(out) as staging:
        tree.start(args.lr, args.weight_decay)
        log = train_epochs(args.epochs, args.seed, args.batch_size, train, val,
                           lambda rows: tree.step(*batch(rows)),
                           lambda rows: {"loss": tree.evaluate([batch(rows[i:i + args.batch_size])
                                                                for i in range(0, len(rows), args.batch_size)])})
        if log is None:
            return EXIT_FAILED
        shown = (val or train)[0]
        answer = tree.answer(prompts[shown], args.max_new_tokens) if args.max_new_tokens else None
        tree.model.save_pretrained(staging / "model")
        finish(staging, out, log, run_record(args, ckpt, out, train_records=len(train), val_records=len(val)))
    last = log[-1]
    lines = [f"fine-tuned {ckpt} on {len(train)} instructions: train loss {last['train_loss']:.4f}"
             + (f", validation loss {last['val_loss']:.4f}" if val else "") + f"; saved in {out / 'model'}"]
    if answer is not None:
        lines.append(f"instruction (line {records[shown][3]}): {records[shown][0]}\nanswer: {answer}")
    print_result("\n".join(lines))
    return EXIT_OK


class _Numpy:
    """The loop's operations on numpy_ref (float64)."""

    def __init__(self, ckpt: Path):
        from numpy_ref.instruction_data import format_instruction, instruction_collate
        from numpy_ref.model import GPTModel
        from numpy_ref.tokenizer import get_encoding

        self.encoding, self.format, self.collate = get_encoding("gpt2"), format_instruction, instruction_collate
        with user_input(f"--checkpoint {ckpt}"):  # a CheckpointError names the file and the key
            self.model = GPTModel.from_pretrained(ckpt)

    def start(self, lr: float, weight_decay: float) -> None:
        from numpy_ref.optim import AdamW

        self.opt = AdamW(self.model.params, lr=lr, weight_decay=weight_decay)

    def step(self, inputs, targets) -> float:
        import numpy as np

        with np.errstate(over="ignore", invalid="ignore"):  # a diverging run is reported by the loop
            _, loss, cache = self.model.forward(inputs, targets, ignore_index=IGNORE)
            if not math.isfinite(float(loss)):
                return float(loss)
            self.opt.step(self.model.backward(cache))
        return float(loss)

    def evaluate(self, batches) -> float:
        """The mean loss per counted target over the batches."""
        import numpy as np

        total, n = 0.0, 0
        with np.errstate(over="ignore", invalid="ignore"):
            for inputs, targets in batches:
                counted = int((targets != IGNORE).sum())
                total += float(self.model.forward(inputs, targets, ignore_index=IGNORE)[1]) * counted
                n += counted
        return total / n

    def answer(self, prompt: list[int], n: int) -> str:
        import numpy as np

        from numpy_ref.generate import generate

        ids = generate(self.model, np.array([prompt]), n, eos_id=EOT)[0, len(prompt):].tolist()
        return self.encoding.decode([t for t in ids if t != EOT])


class _Torch:
    """The loop's operations on torch_impl (float32, on the CPU)."""

    def __init__(self, ckpt: Path):
        from torch_impl.instruction_data import format_instruction, instruction_collate
        from torch_impl.model import GPTModel
        from torch_impl.tokenizer import get_encoding

        self.encoding, self.format = get_encoding("gpt2"), format_instruction
        self._collate = instruction_collate
        with user_input(f"--checkpoint {ckpt}"):  # a CheckpointError names the file and the key
            self.model = GPTModel.from_pretrained(ckpt)
        self.model.eval()  # no dropout, in either backend: numpy_ref draws none without masks

    def collate(self, sequences, **options):
        inputs, targets = self._collate(sequences, **options)
        return inputs.numpy(), targets.numpy()

    def start(self, lr: float, weight_decay: float) -> None:
        from torch_impl.optim import build_optimizer

        self.opt = build_optimizer(self.model, "adamw", lr=lr, weight_decay=weight_decay)

    def step(self, inputs, targets) -> float:
        import torch

        self.opt.zero_grad(set_to_none=True)
        _, loss = self.model(torch.from_numpy(inputs), torch.from_numpy(targets), ignore_index=IGNORE)
        value = loss.item()
        if not math.isfinite(value):
            return value
        loss.backward()
        self.opt.step()
        return value

    def evaluate(self, batches) -> float:
        """The mean loss per counted target over the batches."""
        import torch

        total, n = 0.0, 0
        with torch.no_grad():
            for inputs, targets in batches:
                counted = int((targets != IGNORE).sum())
                _, loss = self.model(torch.from_numpy(inputs), torch.from_numpy(targets), ignore_index=IGNORE)
                total += loss.item() * counted
                n += counted
        return total / n

    def answer(self, prompt: list[int], n: int) -> str:
        import torch

        from torch_impl.generate import generate

        with torch.no_grad():
            ids = generate(self.model, torch.tensor([prompt]), n, eos_id=EOT)[0, len(prompt):].tolist()
        return self.encoding.decode([t for t in ids if t != EOT])
