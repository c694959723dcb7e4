"""Dropout, with the mask passed in or drawn by torch.

    out = x * mask,   mask[i] in {0, 1/(1-p)}   (expectation 1, so evaluation needs no rescale)

Reference: Srivastava et al. 2014, "Dropout". docs/design.md: a mask is a float tensor of the
shape of what it drops holding 0 or 1/(1-p); `None` means no mask. Two sources of randomness:

- an explicit mask (the parity tests feed numpy_ref and torch_impl the same one): multiply;
- no mask, training, p > 0: torch's own dropout (random, from torch's generator);
- otherwise (evaluation, or p == 0): the identity.

Shapes: x (...); mask the same shape as x; out the same shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_mask(name: str, mask: torch.Tensor, shape: tuple) -> None:
    """A ValueError unless `mask` is a tensor of `shape` (None, as in numpy_ref, has shape ())."""
    got = () if mask is None else tuple(mask.shape) if isinstance(mask, torch.Tensor) else None
    if got is None:
        raise TypeError(f"dropout mask {name!r} must be a tensor, got {type(mask).__name__}")
    if got != tuple(shape):
        raise ValueError(f"dropout mask {name!r} has shape {got}; expected {tuple(shape)}")


def dropout_forward(x: torch.Tensor, p: float, training: bool, mask: torch.Tensor | None = None) -> torch.Tensor:
    """x * mask when a mask is given; torch's dropout(p) when training; x otherwise."""
    if mask is not None:
        return x * mask.to(x.dtype)
    if training and p > 0.0:
        return F.dropout(x, p, training=True)
    return x
