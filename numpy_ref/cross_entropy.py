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
    """(loss, cache): loss a 0-d array; the cache keeps the probabilities p (N, V).

    Written so that a confident row keeps its digits. With m the row's max, reached at k, and
    r = sum over j != k of e^(z_j - m) (so sum_j e^(z_j - m) = 1 + r exactly),

        -log p_y = log1p(r) + (m - z_y)       two terms >= 0: nothing cancels
        p_y - 1  = -r / (1 + r)               when y = k (else p_y <= 1/2, and p_y - 1 is safe)

    `log(1 + r)` would round 1 + r to 1 once r < eps, and `p_y - 1` would cancel: a row with
    p_y = 1 - 1e-20 gave the loss 0 and the target's gradient 0 (float64; from r < 6e-8 in
    float32), where the true values are 1e-20 and -1e-20.
    """
    targets, counted, n = check_targets(logits.shape, targets, ignore_index)
    V = logits.shape[-1]
    z = logits.reshape(-1, V)  # (..., V) -> (N, V)
    y = targets.reshape(-1).copy()  # (...) -> (N,); a copy: a caller reusing its buffer must not move the gradient
    rows = np.flatnonzero(counted.reshape(-1))  # the counted rows, (n,)
    every = np.arange(z.shape[0])  # (N,)
    k = z.argmax(axis=1)  # (N,): where each row's max is
    m = z[every, k][:, None]  # (N, 1); subtracted only so exp cannot overflow
    p = z - m  # (N, V), a new array that becomes the probabilities in place
    z_y = p[rows, y[rows]]  # (n,): z_y - m <= 0, read before the exp overwrites it
    np.exp(p, out=p)
    top = p[every, k]  # (N,): e^0 = 1, or NaN where the max is +-inf (inf - inf) or NaN
    p[every, k] = 0.0  # left out of the sum...
    r = p.sum(axis=1, keepdims=True)  # (N, V) -> (N, 1): the other terms, r >= 0
    r += (top - 1.0)[:, None]  # + exactly 0, or NaN: a row with an infinite logit is NaN, as in torch
    p[every, k] = top  # ...and put back
    s = 1.0 + r  # (N, 1)
    p /= s  # softmax, (N, V)
    loss = (np.log1p(r[rows, 0]) - z_y).sum() / n  # (n,) -> (): -(1/n) sum log p_y, no log(0), no cancellation
    at_max = k[rows] == y[rows]  # (n,): the target is the row's max
    p_y_minus_1 = np.where(at_max, -r[rows, 0] / s[rows, 0], p[rows, y[rows]] - 1.0)  # (n,)
    ignored = np.flatnonzero(~counted.reshape(-1))  # (N - n,)
    return np.asarray(loss, dtype=logits.dtype), (p, y, rows, p_y_minus_1, ignored, n, logits.shape)


def cross_entropy_backward(dloss, cache):
    """dlogits, the shape of the logits (a single array: the targets get no gradient)."""
    p, y, rows, p_y_minus_1, ignored, n, shape = cache
    scale = np.asarray(dloss, dtype=p.dtype) / n  # dL/dloss spread over the n counted rows
    dz = p * scale  # (N, V)
    dz[rows, y[rows]] = p_y_minus_1 * scale  # p - onehot(y) on the counted rows
    dz[ignored] = 0.0  # ignored rows contribute nothing
    return dz.reshape(shape)  # (N, V) -> (..., V)
