"""`gpt-oracle classify`: label texts with a fine-tuned classifier (the book's chapter 6, last step).

    gpt-oracle classify --classifier DIR (--text TEXT [--text TEXT ...] | --data FILE.jsonl)
        [--backend torch|numpy] [--batch-size 8]

DIR is a `gpt-oracle finetune` output directory (its `classifier/` is read) or a classifier
checkpoint (GPTClassifier.save_pretrained's folder). FILE.jsonl holds one object per line,
{"text": "..."} or {"text": "...", "label": 0}: labels on every line or on none. Each text is
encoded with GPT-2's tokenizer (special tokens refused) and cut to the model's first
context-length tokens, as `finetune` cuts it.

stdout gets one JSON line per text, in order: {"label": k, "probabilities": [p_0, ..., p_K-1]},
the label the largest logit's (the lowest on ties), the probabilities the logits' softmax in
float64. With labelled data a last line on stderr gives the accuracy. numpy_ref runs in float64,
torch_impl in float32 on the CPU: their probabilities agree to float32 rounding.

Exit status: 0 done; 2 bad input (an option, a text or line of the data file, the classifier),
one line on stderr, before anything is printed to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gpt_oracle.fine_tuning import check_text, json_lines
from gpt_oracle.user_input import EXIT_OK, UserError, path_text, positive_int, print_result, reports_user_errors, \
    user_input


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classifier", required=True, metavar="DIR", type=path_text,
                        help="a finetune output directory, or the classifier checkpoint in it")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a text to label (repeat for more)")
    source.add_argument("--data", metavar="FILE", type=path_text,
                        help='JSON lines: {"text": "..."}, or with "label" on every line to measure the accuracy')
    parser.add_argument("--backend", choices=["numpy", "torch"], default="torch")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="texts run together (default 8)")


def classifier_dir(path: Path) -> Path:
    """A finetune output directory's classifier/, or `path` itself; a UserError if neither holds a
    config.json."""
    if (path / "classifier" / "config.json").is_file():
        return path / "classifier"
    if (path / "config.json").is_file():
        return path
    what = "does not exist" if not path.exists() else "holds neither config.json nor classifier/config.json"
    raise UserError(f"--classifier {path}: {what}; give a finetune output directory or a classifier checkpoint")


def read_texts(args: argparse.Namespace) -> tuple[list[tuple[str, str]], list[int] | None]:
    """([(where, text)], labels or None): --text's texts, or --data's lines, each checked."""
    if args.text is not None:
        texts = [(f"--text #{i}", text) for i, text in enumerate(args.text, start=1)]
        labels = None
    else:
        texts, labels, unlabelled = [], [], None
        for where, _, record in json_lines(Path(args.data)):
            if not isinstance(record, dict) or "text" not in record or not set(record) <= {"text", "label"}:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise UserError(f'{where}: expected an object {{"text": ...}} or {{"text": ..., "label": ...}}, '
                                f'got {keys}')
            label = record.get("label")
            if "label" in record and (isinstance(label, bool) or not isinstance(label, int) or label < 0):
                raise UserError(f"{where}: 'label' must be an integer >= 0, got {label!r}")
            if unlabelled is None:
                unlabelled = where if "label" not in record else False
            if (unlabelled is False) == ("label" not in record):  # this line differs from the first in having one
                first = "no label" if unlabelled else "a label"
                raise UserError(f"{where}: labels must be on every line or on none; the first line has {first}")
            texts.append((where, record["text"]))
            labels.append(label)
        if not texts:
            raise UserError(f"--data {args.data}: holds no example")
        labels = None if unlabelled else labels
    for where, text in texts:
        if not isinstance(text, str) or not text:
            raise UserError(f"{where}: the text must be a non-empty string, got {text!r}"[:200])
        check_text(where, "text", text)
    return texts, labels


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    import numpy as np

    texts, labels = read_texts(args)
    folder = classifier_dir(Path(args.classifier))
    tree = _Numpy(folder) if args.backend == "numpy" else _Torch(folder)
    K, Tc, V = tree.num_classes, tree.config.context_length, tree.config.vocab_size
    if labels is not None:
        where, label = next(((w, y) for (w, _), y in zip(texts, labels) if y >= K), (None, None))
        if where is not None:
            raise UserError(f"{where}: label {label}, but the classifier has {K} classes (labels 0 .. {K - 1})")
    rows = []
    for where, text in texts:
        with user_input(where):
            ids = tree.encoding.encode(text)[:Tc]  # the first tokens, as finetune cuts
        too_big = next((t for t in ids if t >= V), None)
        if too_big is not None:
            raise UserError(f"{where}: token id {too_big} is outside the classifier's vocabulary of {V} (ids 0 .. "
                            f"{V - 1}); the GPT-2 tokenizer gives ids up to 50256")
        rows.append(ids)
    logits = np.concatenate([tree.logits(*_batch(rows[i:i + args.batch_size]))
                             for i in range(0, len(rows), args.batch_size)])  # (N, K) float64
    shifted = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)  # (N, K)
    predicted = logits.argmax(axis=1)  # (N,) the first maximum: ties go to the lowest label
    print_result("\n".join(json.dumps({"label": int(k), "probabilities": [float(p) for p in row]})
                           for k, row in zip(predicted, probabilities)))
    if labels is not None:
        right = int((predicted == np.asarray(labels)).sum())
        print(f"accuracy {right / len(labels):.4f} ({right} of {len(labels)} labelled examples, {K} classes)",
              file=sys.stderr)
    return EXIT_OK


def _batch(rows: list[list[int]]):
    """(ids (B, T) padded at the end with 0, lengths (B,)) as int64 NumPy arrays: each row is read at
    its last real token, so the padding id is never seen."""
    import numpy as np

    T = max(len(r) for r in rows)
    ids = np.zeros((len(rows), T), dtype=np.int64)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = r
    return ids, np.array([len(r) for r in rows], dtype=np.int64)


class _Numpy:
    def __init__(self, folder: Path):
        from numpy_ref.classifier import GPTClassifier
        from numpy_ref.tokenizer import get_encoding

        self.encoding = get_encoding("gpt2")
        with user_input(f"--classifier {folder}"):  # a CheckpointError names the file and what is wrong
            self.clf = GPTClassifier.from_pretrained(folder)
        self.config, self.num_classes = self.clf.config, self.clf.num_classes

    def logits(self, ids, lengths):
        import numpy as np

        return np.asarray(self.clf(ids, lengths=lengths), dtype=np.float64)  # (B, K)


class _Torch:
    def __init__(self, folder: Path):
        from torch_impl.classifier import GPTClassifier
        from torch_impl.tokenizer import get_encoding

        self.encoding = get_encoding("gpt2")
        with user_input(f"--classifier {folder}"):
            self.clf = GPTClassifier.from_pretrained(folder)
        self.clf.eval()
        self.config, self.num_classes = self.clf.config, self.clf.num_classes

    def logits(self, ids, lengths):
        import torch

        with torch.no_grad():
            logits = self.clf(torch.from_numpy(ids), lengths=torch.from_numpy(lengths))  # (B, K)
        return logits.double().numpy()
