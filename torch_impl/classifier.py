"""Classification fine-tuning (the book's chapter 6): GPT-2's trunk, and a K-way head on one token.

Dimensions: B batch, T time, C channels, K classes.

    f = trunk(ids)                              (B, T) -> (B, T, C)  embeddings, blocks, ln_f
    r = f[b, lengths[b] - 1]                    (B, T, C) -> (B, C)  each row's last real token
    logits = r @ w + b                          (B, C) @ (C, K) -> (B, K)
    loss = mean cross-entropy(logits, labels)   (B, K), (B,) -> ()

The vocabulary head is replaced by `classifier.weight` (C, K) and `classifier.bias` (K,), stored
(in, out) like every linear weight here; the untied `lm_head.weight` is dropped, a tied head is
wte, which the trunk keeps. Attention is causal, so the last real token has seen the whole text
and padding after it changes nothing; `lengths=None` reads position T - 1, as the book does.
The trunk is GPTModel's own forward (`features_only=True`): the same kernels, precision and
device choices as the language model.

Reference: the book's chapter 6; Hugging Face `GPT2ForSequenceClassification` (last
non-padding token). numpy_ref/classifier.py is the same model with its backward written out.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from torch_impl.config import GPTConfig
from torch_impl.cross_entropy import check_targets, cross_entropy_forward
from torch_impl.device import as_int64_index, vmapped_values
from torch_impl.embedding import check_ids
from torch_impl.linear import linear_forward
from torch_impl.model import BLOCK_PARAMS, GPTModel, check_seed, param_group

HEAD_NAMES = ("classifier.weight", "classifier.bias")
HEAD_SEED_OFFSET = 1_000_003  # the head's generator: seed + this (mod 2**64), apart from the trunk's draws


def check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    return int(num_classes)


def trainable_parameter_names(config: GPTConfig, n_last_blocks: int = 1) -> list[str]:
    """The names fine-tuned when the rest is frozen: the last `n_last_blocks` blocks, ln_f, the
    head (the book's choice is 1; 0 trains the head and ln_f only)."""
    if isinstance(n_last_blocks, bool) or not isinstance(n_last_blocks, numbers.Integral) \
            or not 0 <= n_last_blocks <= config.n_layers:
        raise ValueError(f"n_last_blocks must be an integer in 0 .. n_layers={config.n_layers}, got {n_last_blocks!r}")
    blocks = range(config.n_layers - n_last_blocks, config.n_layers)
    names = [f"h.{i}.{name}" for i in blocks for name in BLOCK_PARAMS
             if config.qkv_bias or name != "attn.c_attn.bias"]
    return names + ["ln_f.weight", "ln_f.bias", *HEAD_NAMES]


@torch.compiler.disable  # data-dependent raise: runs eagerly, outside any compiled graph
def check_lengths(lengths: torch.Tensor | None, B: int, T: int, device: torch.device) -> torch.Tensor:
    """lengths (B,) integers in 1 .. T (the real tokens of each row) as int64, or the error naming
    the first bad one; None means every row is T long."""
    if lengths is None:
        return torch.full((B,), T, dtype=torch.int64, device=device)
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"lengths must be a torch.Tensor of integers, got {type(lengths).__name__}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be integers, got dtype {lengths.dtype}")
    if tuple(lengths.shape) != (B,):
        raise ValueError(f"lengths must have shape ({B},), one per row, got {tuple(lengths.shape)}")
    lengths = as_int64_index(lengths, "lengths").to(device)  # uint64 refused, as for ids
    plain = vmapped_values(lengths)
    if plain is not None:  # batched by torch.func.vmap: the values are checked under the batch
        if bool(((plain < 1) | (plain > T)).any()):
            raise ValueError(f"lengths under torch.func.vmap hold a value outside 1 .. T = {T}: "
                             f"{plain.flatten().tolist()[:8]}")
        return lengths
    bad = ((lengths < 1) | (lengths > T)).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        raise ValueError(f"lengths[{i}] = {int(lengths[i])} is outside 1 .. T = {T}")
    return lengths


def classification_accuracy(logits: torch.Tensor, labels) -> float:
    """The fraction of rows whose largest logit is at the label (ties: the first index). Labels
    (a tensor, or a list) are checked as the loss checks them (integers in [0, K)); no rows is a
    ValueError, not NaN."""
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must be (B, K) with B >= 1, got shape {tuple(logits.shape)}")
    labels = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)
    labels = check_targets(logits, labels.to(logits.device), None)
    return float((logits.argmax(dim=1) == labels).double().mean())


class GPTClassifier(GPTModel):
    """GPT-2 with a K-way head (chapter 6). Its state_dict is the trunk's names (no
    `lm_head.weight`) and `classifier.weight` (C, K), `classifier.bias` (K,).

    clf = GPTClassifier.from_gpt(model, num_classes=2, seed=0)   a pretrained trunk, a new head
    logits = clf(ids, lengths=lengths)                           (B, K)
    logits, loss = clf(ids, labels, lengths=lengths)
    clf.freeze_trunk(n_last_blocks=1)                            the book's fine-tuning set
    clf.save_pretrained(dir); GPTClassifier.from_pretrained(dir)  checkpoint.py's classifier layout
    """

    def __init__(self, config: GPTConfig, num_classes: int, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, init: str = "gpt2") -> None:
        K, seed = check_num_classes(num_classes), check_seed(seed)
        super().__init__(config, seed=seed, dtype=dtype, device=device, init=init)
        if not config.tie_embeddings:
            del self.lm_head  # replaced by the classifier
        gen = torch.Generator(device="cpu").manual_seed((seed + HEAD_SEED_OFFSET) % 2**64)
        # GPT-2's initialisation for a linear layer: weight normal(0, 0.02), bias 0; drawn on the CPU.
        w = torch.empty(config.emb_dim, K, dtype=torch.float32).normal_(0.0, 0.02, generator=gen)
        self.classifier = param_group(weight=nn.Parameter(w.to(device=device, dtype=dtype)),  # (C, K)
                                      bias=nn.Parameter(torch.zeros(K, dtype=dtype, device=device)))
        self.num_classes = K

    @classmethod
    def from_gpt(cls, model: GPTModel, num_classes: int, seed: int = 0) -> "GPTClassifier":
        """A classifier on a copy of `model`'s trunk (a GPTModel, or torch.compile of one), with a
        new head drawn from `seed`."""
        model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper prefixes every key
        if not isinstance(model, GPTModel) or isinstance(model, GPTClassifier):
            raise TypeError(f"from_gpt takes a torch_impl GPTModel, got {type(model).__name__}")
        clf = cls(model.config, num_classes, seed=seed, dtype=model.dtype, device=model.device)
        trunk = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
        missing, unexpected = clf.load_state_dict(trunk, strict=False)  # copies: no tensor is shared
        if sorted(missing) != sorted(HEAD_NAMES) or unexpected:
            raise ValueError(f"from_gpt: the model's parameters are not GPT-2's table (missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)})")
        return clf

    def freeze_trunk(self, n_last_blocks: int = 1) -> list[str]:
        """Gradients for `trainable_parameter_names` only; returns those names."""
        names = set(trainable_parameter_names(self.config, n_last_blocks))
        for name, p in self.named_parameters():
            p.requires_grad_(name in names)
        return sorted(names)

    @property
    def head_weight(self) -> torch.Tensor:
        raise NotImplementedError("a GPTClassifier has no vocabulary head (its head is `classifier`)")

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None, *, lengths: torch.Tensor | None = None,
                dropout_masks=None):
        """Logits (B, K); `(logits, loss)` when labels (B,) are given. See the module docstring."""
        w, b = self.classifier.weight, self.classifier.bias
        # Every input before any compute, in the order of GPTModel.forward (masks, ids) and numpy_ref,
        # so that lengths and labels come after them; super().forward checks masks and ids again (cheap).
        if isinstance(ids, torch.Tensor) and ids.ndim == 2:
            self._check_masks(dropout_masks, ids.shape[0], ids.shape[1], past=0)
        ids = check_ids(ids, self.config.vocab_size, self.config.context_length)
        B, T = ids.shape
        pos = check_lengths(lengths, B, T, ids.device) - 1  # (B,)
        if labels is not None:  # a meta (B, K) stands for the logits: only its shape is read
            labels = check_targets(ids.new_empty(B, w.shape[1], device="meta"), labels, None)
        f = super().forward(ids, dropout_masks=dropout_masks, features_only=True)  # (B, T) -> (B, T, C)
        r = f[torch.arange(B, device=f.device), pos]  # (B, T, C) -> (B, C)
        logits = linear_forward(r, w, b)  # (B, C) @ (C, K) -> (B, K)
        if labels is None:
            return logits
        return logits, cross_entropy_forward(logits, labels, targets_checked=True)  # (B, K), (B,) -> ()

    def new_kv_cache(self, batch_size: int, dtype: torch.dtype | None = None):
        raise NotImplementedError("a GPTClassifier reads whole sequences; it has no incremental decoding")

    @classmethod
    def from_pretrained(cls, directory, dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None) -> "GPTClassifier":
        """Load a classifier's checkpoint (checkpoint.py: the trunk in the Hugging Face GPT-2
        layout, the head as `classifier.weight`, `classifier.bias`, K in config.json)."""
        from torch_impl.checkpoint import load_checkpoint

        config, state = load_checkpoint(directory, dtype=dtype, classifier=True)
        clf = cls(config, state["classifier.bias"].shape[0], dtype=dtype, device=device)
        clf.load_state_dict(state, strict=True)
        return clf

    def save_pretrained(self, directory) -> None:
        """Write this classifier as a checkpoint directory (weights in float32)."""
        from torch_impl.checkpoint import save_checkpoint

        save_checkpoint(directory, self.config, self.state_dict(), num_classes=self.num_classes)
