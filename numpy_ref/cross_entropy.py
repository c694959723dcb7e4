"""Softmax cross-entropy, fused, with `ignore_index`: the loss of a language model.

For logits z (N rows of V classes, any leading shape flattened) and targets y, with n the
number of targets that count (those not equal to `ignore_index`):

    p_i  = softmax(z)_i = e^(z_i - m) / sum_j e^(z_j - m)       m = max_j z_j (stability only)
    loss = -(1/n) sum over counted rows of log p_y = (1/n) sum (log sum_j e^(z_j - m) + m - z_y)

Backward (docs/derivations.md, "Softmax cross-entropy"): d(-log p_y)/dz_i = p_i - [i = y], so

    dz = dloss * (p - onehot(y)) / n        on counted rows; 0 on ignored rows

Fusing the two is what makes this cheap and exact: the softmax Jacobian never appears.
Reference: llm.c `crossentropy_softmax_backward`; PyTorch `F.cross_entropy(ignore_index=...)`.
Shapes: logits (..., V), targets (...) integers, loss a 0-d array of the logits' dtype.

Bad input: non-integer targets are a TypeError; a counted target outside [0, V) is a
ValueError naming it, its position and V; if there are no targets, or every target is ignored,
the mean is undefined and this raises ValueError (never NaN).
"""

from __future__ import annotations

import numbers

import numpy as np


def check_targets(logits_shape: tuple[int, ...], targets, ignore_index: int | None = None):
    """(targets as an integer ndarray, counted (...) bool, n counted), or the error naming what is
    wrong (see the top). Only the logits' shape is read: gpt_forward checks before any compute."""
    targets = np.asarray(targets)
    if targets.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: targets must be integers, got dtype {targets.dtype}")
    if len(logits_shape) < 1 or targets.shape != tuple(logits_shape[:-1]):
        raise ValueError(f"cross_entropy: targets shape {targets.shape} must be the logits shape {tuple(logits_shape)} "
                         f"without its last axis")
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral)):
        raise TypeError(f"cross_entropy: ignore_index must be an int or None, got {ignore_index!r}")
    if ignore_index is not None and not -(2**63) <= ignore_index < 2**63:  # no int64 target can equal it
        raise ValueError(f"cross_entropy: ignore_index must be an int64, got {ignore_index}")
    if targets.size == 0:  # B = 0 or T = 0: nothing to average, whatever ignore_index is
        raise ValueError(f"cross_entropy: no targets (shape {targets.shape}); the mean loss is undefined")
    V = logits_shape[-1]
    counted = np.ones(targets.shape, dtype=bool) if ignore_index is None else targets != ignore_index
    outside = counted & ((targets < 0) | (targets >= V))
    if outside.any():
        pos = tuple(int(i) for i in np.argwhere(outside)[0])
        raise ValueError(f"cross_entropy: target {int(targets[pos])} at position {pos} is outside [0, {V}) (V = {V})")
    n = int(counted.sum())
    if n == 0:
        raise ValueError(f"cross_entropy: all {targets.size} targets equal ignore_index={ignore_index}; "
                         f"the mean loss is undefined")
    return targets, counted, n


def cross_entropy_forward(logits: np.ndarray, targets, ignore_index: int | None = None):
    """(loss, cache): loss a 0-d array; the cache keeps the probabilities p (N, V)."""
    targets, counted, n = check_targets(logits.shape, targets, ignore_index)
    V = logits.shape[-1]
    z = logits.reshape(-1, V)  # (..., V) -> (N, V)
    y = targets.reshape(-1)  # (...) -> (N,)
    rows = np.flatnonzero(counted.reshape(-1))  # the counted rows, (n,)
    m = z.max(axis=1, keepdims=True)  # (N, V) -> (N, 1); subtracted only so exp cannot overflow
    p = z - m  # (N, V), a new array that becomes the probabilities in place
    z_y = p[rows, y[rows]]  # (n,): z_y - m, read before the exp overwrites it
    np.exp(p, out=p)
    s = p.sum(axis=1, keepdims=True)  # (N, V) -> (N, 1)
    p /= s  # softmax, (N, V)
    loss = (np.log(s[rows, 0]) - z_y).sum() / n  # (n,) -> (): -(1/n) sum log p_y, from log-sum-exp: no log(0)
    ignored = np.flatnonzero(~counted.reshape(-1))  # (N - n,)
    return np.asarray(loss, dtype=logits.dtype), (p, y, rows, ignored, n, logits.shape)


def cross_entropy_backward(dloss, cache):
    """dlogits, the shape of the logits (a single array: the targets get no gradient)."""
    p, y, rows, ignored, n, shape = cache
    scale = np.asarray(dloss, dtype=p.dtype) / n  # dL/dloss spread over the n counted rows
    dz = p * scale  # (N, V)
    dz[rows, y[rows]] -= scale  # p - onehot(y) on the counted rows
    dz[ignored] = 0.0  # ignored rows contribute nothing
    return dz.reshape(shape)  # (N, V) -> (..., V)
