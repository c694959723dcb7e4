"""`gpt-oracle finetune`: fine-tune a language model into a text classifier (the book's chapter 6).

    gpt-oracle finetune --checkpoint DIR --data FILE.jsonl --out DIR [--backend torch|numpy]
        [--epochs 5] [--batch-size 8] [--lr 5e-5] [--weight-decay 0.1] [--n-last-blocks 1]
        [--val-ratio 0.2] [--seed 123]

FILE.jsonl holds one example per line: {"text": "...", "label": 0}. Labels are the integers
0 .. K-1, each used at least once, K >= 2: the classifier has K classes. Each text is encoded with
GPT-2's tokenizer (special tokens refused) and cut to the model's context length; a batch is
padded at the end, and each row is read at its last real token (classifier.py), so the padding
changes nothing. The examples are shuffled with --seed; --val-ratio of them (rounded, at least one
when the ratio is above 0, and never all) validate.

The classifier starts from the checkpoint's trunk and a new head (GPTClassifier.from_gpt); the
last --n-last-blocks blocks, ln_f and the head are trained with AdamW, the rest is frozen, as in
the book, without dropout. numpy_ref trains in float64, torch_impl in float32 on the CPU. Each
epoch goes over the training examples in a new order drawn from --seed, and ends with the mean
loss and the accuracy on both sets (stderr, and a line of --out/log.jsonl). At the
end --out holds `classifier/` (GPTClassifier.from_pretrained reads it, in either tree),
`log.jsonl` and `run.json` (these options, with absolute paths and the checkpoint actually read);
`gpt-oracle classify --classifier OUT` labels texts with it.
--out must not exist yet, or be empty; everything is written into a hidden folder beside it,
renamed to --out only once complete, so a run that fails or is interrupted leaves no --out.
The same options give the same classifier; the two backends draw different heads from a seed.

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
from gpt_oracle.user_input import EXIT_FAILED, EXIT_OK, UserError, non_negative_int, print_result, \
    reports_user_errors, user_input


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, data_help='JSON lines, one example each: {"text": "...", "label": 0}',
                         out_help="output directory, new or empty: classifier/, log.jsonl, run.json", epochs=5,
                         val_ratio=0.2, seed_help="the head's initial weights, the split and the batch order "
                                                  "(default 123)")
    parser.add_argument("--n-last-blocks", type=non_negative_int, default=1,
                        help="blocks trained, counted from the last (default 1, as the book); ln_f and the head always")


def read_examples(path: Path) -> list[tuple[str, int]]:
    """(text, label) per non-blank line; a UserError naming the file and the line otherwise."""
    return [(text, label) for text, label, _ in _read_lines(path)]


def _read_lines(path: Path) -> list[tuple[str, int, int]]:
    """(text, label, line number) per non-blank line, the labels checked to be 0 .. K-1 with
    every class used and K >= 2; a UserError naming the file and the line otherwise."""
    examples = []
    for where, number, record in json_lines(path):
        if not isinstance(record, dict) or set(record) != {"text", "label"}:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise UserError(f'{where}: expected an object {{"text": ..., "label": ...}}, got {keys}')
        text, label = record["text"], record["label"]
        if not isinstance(text, str) or not text:
            raise UserError(f"{where}: 'text' must be a non-empty string, got {text!r}"[:200])
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise UserError(f"{where}: 'label' must be an integer >= 0, got {label!r}")
        check_text(where, "text", text)
        examples.append((text, label, number))
    if len(examples) < 2:
        raise UserError(f"--data {path}: {len(examples)} example(s); fine-tuning needs at least 2")
    top = max(label for _, label, _ in examples)
    used = {label for _, label, _ in examples}
    if len(used) < 2:
        raise UserError(f"--data {path}: every label is {top}; a classifier needs at least 2 classes")
    if len(used) != top + 1:  # a gap, or a label far past the others (a head that large is a mistake)
        line = next(n for _, label, n in examples if label == top)
        missing = next(k for k in range(top + 1) if k not in used)
        raise UserError(f"--data {path}: line {line}: label {top}, but label {missing} is never used; labels must "
                        f"be 0 .. K-1, each used at least once ({len(used)} distinct labels here)")
    return examples


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    out, data = Path(args.out), Path(args.data)
    check_out(out)
    examples = _read_lines(data)
    ckpt = run_folder.checkpoint_dir(Path(args.checkpoint))
    tree = _Numpy(args, ckpt) if args.backend == "numpy" else _Torch(args, ckpt)
    config = tree.config
    if args.n_last_blocks > config.n_layers:
        raise UserError(f"--n-last-blocks {args.n_last_blocks}: the model has {config.n_layers} blocks")
    ids = []
    for text, _, number in examples:
        with user_input(f"--data {data}: line {number}"):
            row = tree.encoding.encode(text)
        ids.append(row[: config.context_length])  # the first tokens, as the book cuts
    if max(max(row) for row in ids) >= config.vocab_size:
        raise UserError(f"--checkpoint {ckpt}: its vocabulary has {config.vocab_size} tokens; GPT-2's tokenizer "
                        f"needs {tree.encoding.n_vocab}")
    labels = [label for _, label, _ in examples]
    train, val = split(len(examples), args.val_ratio, args.seed)
    K = max(labels) + 1
    pad = EOT if config.vocab_size > EOT else 0  # read at the last real token: the pad id is never seen
    with output_folder(out) as staging:
        tree.start(K, args.n_last_blocks)

        def batches(rows):
            return [_batch(ids, labels, rows[i:i + args.batch_size], pad) for i in range(0, len(rows), args.batch_size)]

        log = train_epochs(args.epochs, args.seed, args.batch_size, train, val,
                           lambda rows: tree.step(*_batch(ids, labels, rows, pad)),
                           lambda rows: tree.evaluate(batches(rows)))
        if log is None:
            return EXIT_FAILED
        tree.clf.save_pretrained(staging / "classifier")
        finish(staging, out, log, run_record(args, ckpt, out, num_classes=K, train_examples=len(train),
                                             val_examples=len(val)))
    last = log[-1]
    val_text = f", validation accuracy {last['val_accuracy']:.4f}" if val else ""
    print_result(f"fine-tuned {ckpt} into a {K}-class classifier: train accuracy {last['train_accuracy']:.4f}"
                 f"{val_text} ({len(train)} + {len(val)} examples, {args.epochs} epochs); saved in {out / 'classifier'} "
                 f"(gpt-oracle classify --classifier {out} labels texts with it)")
    return EXIT_OK


def _batch(ids: list[list[int]], labels: list[int], rows: list[int], pad: int):
    """(ids (B, T) padded at the end, labels (B,), lengths (B,)) as int64 NumPy arrays."""
    import numpy as np

    T = max(len(ids[r]) for r in rows)
    batch = np.full((len(rows), T), pad, dtype=np.int64)
    for b, r in enumerate(rows):
        batch[b, :len(ids[r])] = ids[r]
    return batch, np.array([labels[r] for r in rows], dtype=np.int64), np.array([len(ids[r]) for r in rows])


class _Numpy:
    """The loop's three operations on numpy_ref (float64). A diverging run's overflows are
    reported by the loop's own message, not by NumPy's warnings."""

    def __init__(self, args, ckpt: Path):
        from numpy_ref.model import GPTModel
        from numpy_ref.tokenizer import get_encoding

        self.args, self.encoding = args, get_encoding("gpt2")
        with user_input(f"--checkpoint {ckpt}"):  # a CheckpointError names the file and the key
            self.model = GPTModel.from_pretrained(ckpt)
        self.config = self.model.config

    def start(self, K: int, n_last_blocks: int) -> None:
        from numpy_ref.classifier import GPTClassifier, trainable_parameter_names
        from numpy_ref.optim import AdamW

        self.clf = GPTClassifier.from_gpt(self.model, K, seed=self.args.seed)
        self.names = trainable_parameter_names(self.clf.config, n_last_blocks)
        self.opt = AdamW({n: self.clf.params[n] for n in self.names}, lr=self.args.lr,
                         weight_decay=self.args.weight_decay)

    def step(self, ids, labels, lengths) -> float:
        import numpy as np

        with np.errstate(over="ignore", invalid="ignore"):
            _, loss, cache = self.clf.forward(ids, labels, lengths=lengths)
            if not math.isfinite(float(loss)):
                return float(loss)
            grads = self.clf.backward(cache)
            self.opt.step({n: grads[n] for n in self.names})
        return float(loss)

    def evaluate(self, batches) -> dict:
        """The mean loss and the accuracy over the batches."""
        import numpy as np

        from numpy_ref.classifier import classification_accuracy

        total, right, n = 0.0, 0.0, 0
        with np.errstate(over="ignore", invalid="ignore"):
            for ids, labels, lengths in batches:
                logits, loss, _ = self.clf.forward(ids, labels, lengths=lengths)
                total += float(loss) * len(labels)
                right += classification_accuracy(logits, labels) * len(labels)
                n += len(labels)
        return {"loss": total / n, "accuracy": right / n}


class _Torch:
    """The loop's three operations on torch_impl (float32, on the CPU)."""

    def __init__(self, args, ckpt: Path):
        from torch_impl.model import GPTModel
        from torch_impl.tokenizer import get_encoding

        self.args, self.encoding = args, get_encoding("gpt2")
        with user_input(f"--checkpoint {ckpt}"):  # a CheckpointError names the file and the key
            self.model = GPTModel.from_pretrained(ckpt)
        self.config = self.model.config

    def start(self, K: int, n_last_blocks: int) -> None:
        from torch_impl.classifier import GPTClassifier
        from torch_impl.optim import build_optimizer

        self.clf = GPTClassifier.from_gpt(self.model, K, seed=self.args.seed)
        self.clf.freeze_trunk(n_last_blocks)
        self.clf.eval()  # no dropout, in either backend: numpy_ref draws none without masks
        self.opt = build_optimizer(self.clf, "adamw", lr=self.args.lr, weight_decay=self.args.weight_decay)

    def step(self, ids, labels, lengths) -> float:
        import torch

        self.opt.zero_grad(set_to_none=True)
        _, loss = self.clf(torch.from_numpy(ids), torch.from_numpy(labels), lengths=torch.from_numpy(lengths))
        value = loss.item()
        if not math.isfinite(value):
            return value
        loss.backward()
        self.opt.step()
        return value

    def evaluate(self, batches) -> dict:
        """The mean loss and the accuracy over the batches."""
        import torch

        from torch_impl.classifier import classification_accuracy

        total, right, n = 0.0, 0.0, 0
        with torch.no_grad():
            for ids, labels, lengths in batches:
                labels_t = torch.from_numpy(labels)
                logits, loss = self.clf(torch.from_numpy(ids), labels_t, lengths=torch.from_numpy(lengths))
                total += loss.item() * len(labels)
                right += classification_accuracy(logits, labels_t) * len(labels)
                n += len(labels)
        return {"loss": total / n, "accuracy": right / n}
