"""Classification fine-tuning (the book's chapter 6): GPT-2's trunk, and a K-way head on one token.

Dimensions: B batch, T time, C channels, K classes.

    f = trunk(ids)                              (B, T) -> (B, T, C)  embeddings, blocks, ln_f
    r = f[b, lengths[b] - 1]                    (B, T, C) -> (B, C)  each row's last real token
    logits = r @ w + b                          (B, C) @ (C, K) -> (B, K)
    loss = mean cross-entropy(logits, labels)   (B, K), (B,) -> ()

The vocabulary head is replaced by `classifier.weight` (C, K) and `classifier.bias` (K,), stored
(in, out) like every linear weight here. The untied `lm_head.weight` is dropped; a tied head is
wte, which the trunk keeps. The row is read at its last real token: attention is causal, so that
position has seen the whole text, and padding after it changes nothing (the book pads at the end
and reads position T - 1, which is what `lengths=None` does).

Backward: only the gathered positions get a gradient,

    dw = r^T @ dlogits      (C, B) @ (B, K) -> (C, K)
    db = sum_b dlogits      (B, K) -> (K,)
    dr = dlogits @ w^T      (B, K) @ (K, C) -> (B, C)
    df = 0 except df[b, lengths[b] - 1] = dr[b]        then the trunk's backward

Fine-tuning only the end of the network, as the book does (the last block, ln_f and the head),
is `trainable_parameter_names(config, n_last_blocks=1)`: hand the optimizer those parameters.

Reference: the book's chapter 6 (`model.out_head = torch.nn.Linear(768, 2)`, logits of the last
token); Hugging Face `GPT2ForSequenceClassification` (last non-padding token). torch_impl/
classifier.py is the same model on autograd.
"""

from __future__ import annotations

import numbers
from typing import Mapping

import numpy as np

from numpy_ref.cross_entropy import check_targets, cross_entropy_backward, cross_entropy_forward
from numpy_ref.model import check_seed, gpt_features_backward, gpt_features_forward
from numpy_ref.params import block_param_shapes, param_shapes

HEAD_NAMES = ("classifier.weight", "classifier.bias")


def check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    return int(num_classes)


def classifier_param_shapes(config, num_classes: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every (name, shape): the trunk's (the model's table without `lm_head.weight`), then the head."""
    K = check_num_classes(num_classes)
    trunk = [(n, s) for n, s in param_shapes(config) if n != "lm_head.weight"]
    return trunk + [("classifier.weight", (config.emb_dim, K)), ("classifier.bias", (K,))]


def trunk_params(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A language model's parameters without its vocabulary head (a tied head is wte: kept)."""
    return {n: v for n, v in params.items() if n != "lm_head.weight"}


def init_classifier_head(config, num_classes: int, rng: np.random.Generator, dtype=np.float64) -> dict[str, np.ndarray]:
    """A new head, GPT-2's initialisation for a linear layer: weight normal(0, 0.02), bias 0."""
    K = check_num_classes(num_classes)
    return {"classifier.weight": rng.normal(0.0, 0.02, (config.emb_dim, K)).astype(dtype),
            "classifier.bias": np.zeros(K, dtype=dtype)}


def trainable_parameter_names(config, n_last_blocks: int = 1) -> list[str]:
    """The names fine-tuned when the rest is frozen: the last `n_last_blocks` blocks, ln_f, the
    head (the book's choice is 1; 0 trains the head and ln_f only; n_layers trains every block
    but not the embeddings)."""
    if isinstance(n_last_blocks, bool) or not isinstance(n_last_blocks, numbers.Integral) \
            or not 0 <= n_last_blocks <= config.n_layers:
        raise ValueError(f"n_last_blocks must be an integer in 0 .. n_layers={config.n_layers}, got {n_last_blocks!r}")
    names = [f"h.{i}.{name}" for i in range(config.n_layers - n_last_blocks, config.n_layers)
             for name, _ in block_param_shapes(config)]
    return names + ["ln_f.weight", "ln_f.bias", *HEAD_NAMES]


def check_lengths(lengths, B: int, T: int) -> np.ndarray:
    """lengths (B,) integers in 1 .. T (the real tokens of each row), or the error naming the
    first bad one; None means every row is T long."""
    if lengths is None:
        return np.full(B, T, dtype=np.int64)
    lengths = np.asarray(lengths)
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"lengths must be integers, got dtype {lengths.dtype}")
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape ({B},), one per row, got {lengths.shape}")
    bad = np.flatnonzero((lengths < 1) | (lengths > T))
    if bad.size:
        raise ValueError(f"lengths[{bad[0]}] = {int(lengths[bad[0]])} is outside 1 .. T = {T}")
    return lengths.astype(np.int64)


def classifier_forward(params: Mapping[str, np.ndarray], ids, config, labels=None, *, lengths=None,
                       dropout_masks: Mapping[str, np.ndarray] | None = None):
    """(logits (B, K), loss or None, cache). See the module docstring."""
    w, b = params["classifier.weight"], params["classifier.bias"]

    def check_lengths_and_labels(ids: np.ndarray) -> None:  # after the masks and ids, before any compute
        B, T = ids.shape
        check_lengths(lengths, B, T)
        if labels is not None:
            check_targets((B, w.shape[1]), labels)

    f, trunk = gpt_features_forward(params, ids, config, dropout_masks=dropout_masks,
                                    check_more=check_lengths_and_labels)  # (B, T) -> (B, T, C)
    B, T, _ = f.shape
    pos = check_lengths(lengths, B, T) - 1  # (B,), the positions read (checked again: cheap)
    r = f[np.arange(B), pos]  # (B, T, C) -> (B, C)
    logits = r @ w + b  # (B, C) @ (C, K) -> (B, K)
    loss, ce = (None, None) if labels is None else cross_entropy_forward(logits, labels)
    cache = dict(trunk=trunk, r=r, pos=pos, T=T, w=w, ce=ce)
    return logits, loss, cache


def classifier_backward(cache, dloss=1.0) -> dict[str, np.ndarray]:
    """Gradients for every parameter of `classifier_param_shapes`, in its order."""
    if cache["ce"] is None:
        raise ValueError("classifier_backward needs the cache of a forward run with labels")
    dlogits = cross_entropy_backward(dloss, cache["ce"])  # () -> (B, K)
    r, pos, w = cache["r"], cache["pos"], cache["w"]
    B, C = r.shape
    grads = {"classifier.weight": r.T @ dlogits,  # (C, B) @ (B, K) -> (C, K)
             "classifier.bias": dlogits.sum(axis=0)}  # (B, K) -> (K,)
    dr = dlogits @ w.T  # (B, K) @ (K, C) -> (B, C)
    df = np.zeros((B, cache["T"], C), dtype=dr.dtype)  # only the read positions get a gradient
    df[np.arange(B), pos] = dr  # (B, C) -> (B, T, C)
    grads.update(gpt_features_backward(df, cache["trunk"]))
    config = cache["trunk"]["config"]
    return {name: grads[name] for name, _ in classifier_param_shapes(config, w.shape[1])}


def classification_accuracy(logits, labels) -> float:
    """The fraction of rows whose largest logit is at the label (ties: the first index). Labels
    are checked as the loss checks them (integers in [0, K)); no rows is a ValueError, not NaN."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must be (B, K) with B >= 1, got shape {logits.shape}")
    labels, _, _ = check_targets(logits.shape, labels)
    return float((logits.argmax(axis=1) == labels).mean())


def _head_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, 1])  # apart from the trunk's default_rng(seed)


class GPTClassifier:
    """GPT-2 with a K-way head (chapter 6): parameters in an ordered dict, forward and backward.

    clf = GPTClassifier.from_gpt(model, num_classes=2, seed=0)   a pretrained trunk, a new head
    logits = clf(ids, lengths=lengths)                           (B, K)
    logits, loss, cache = clf.forward(ids, labels, lengths=...); grads = clf.backward(cache)
    clf.save_pretrained(dir); GPTClassifier.from_pretrained(dir)  checkpoint.py's classifier layout
    """

    def __init__(self, config, num_classes: int, seed: int = 0, dtype=np.float64,
                 params: Mapping[str, np.ndarray] | None = None) -> None:
        from numpy_ref.model import GPTModel, checked_params

        check_num_classes(num_classes)
        if params is None:  # GPTModel checks the dtype
            seed = check_seed(seed)
            trunk = trunk_params(GPTModel(config, seed=seed, dtype=dtype).params)
            params = {**trunk, **init_classifier_head(config, num_classes, _head_rng(seed), dtype)}
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"GPTClassifier dtype must be float32 or float64, got {dtype}")
        self.config, self.num_classes, self.dtype = config, check_num_classes(num_classes), dtype
        self.params = checked_params(classifier_param_shapes(config, num_classes), params, dtype)

    @classmethod
    def from_gpt(cls, model, num_classes: int, seed: int = 0) -> "GPTClassifier":
        """A classifier on a copy of `model`'s trunk with a new head drawn from `seed`."""
        head = init_classifier_head(model.config, num_classes, _head_rng(check_seed(seed)), model.dtype)
        return cls(model.config, num_classes, dtype=model.dtype, params={**trunk_params(model.params), **head})

    def __call__(self, ids, *, lengths=None) -> np.ndarray:
        return classifier_forward(self.params, ids, self.config, lengths=lengths)[0]

    def forward(self, ids, labels=None, *, lengths=None, dropout_masks=None):
        return classifier_forward(self.params, ids, self.config, labels, lengths=lengths, dropout_masks=dropout_masks)

    def backward(self, cache, dloss=1.0) -> dict[str, np.ndarray]:
        return classifier_backward(cache, dloss)

    @classmethod
    def from_pretrained(cls, directory, dtype=np.float64) -> "GPTClassifier":
        """Load a classifier's checkpoint (checkpoint.py: the trunk in the Hugging Face GPT-2
        layout, the head as `classifier.weight`, `classifier.bias`, K in config.json)."""
        from numpy_ref.checkpoint import load_checkpoint

        config, params = load_checkpoint(directory, dtype=dtype, classifier=True)
        return cls(config, params["classifier.bias"].shape[0], dtype=dtype, params=params)

    def save_pretrained(self, directory) -> None:
        """Write this classifier as a checkpoint directory (weights in float32)."""
        from numpy_ref.checkpoint import save_checkpoint

        save_checkpoint(directory, self.config, self.params, num_classes=self.num_classes)
