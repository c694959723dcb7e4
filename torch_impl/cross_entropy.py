"""Mean cross-entropy of the next-token logits against the targets.

    loss = -(1 / N) sum_{(b,t) counted} log softmax(logits[b, t])[targets[b, t]]

where a position is counted unless its target equals `ignore_index` and N is the number of
counted positions. log softmax is computed as z - max(z) - log sum exp(z - max(z)); the max is
subtracted only for numerical stability. If every target is ignored the mean is 0/0: that is a
ValueError, never NaN (docs/design.md, "Loss").

Reference: numpy_ref/cross_entropy.py (the backward, softmax - onehot, divided by N, written
out); here `F.cross_entropy` fuses log-softmax and the gather, and autograd does the backward.
Under autocast it computes in float32.

Shapes: logits (B, T, V); targets (B, T) integer; out () scalar.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from torch_impl.device import as_int64_index, check_range_vmapped, vmapped_values


@torch.compiler.disable  # data-dependent raise: runs eagerly, outside any compiled graph
def check_targets(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    """Targets must be integers of shape logits.shape[:-1], each in [0, V) or equal to ignore_index;
    returned as int64 (any integer dtype converts exactly; uint64 is refused)."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor of integers, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must have an integer dtype, got {targets.dtype}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match logits shape {tuple(logits.shape)} "
                         f"without its last (vocabulary) axis")
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral)):
        raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}")
    if ignore_index is not None and not -(2**63) <= ignore_index < 2**63:  # torch compares no wider int
        raise ValueError(f"ignore_index must be an int64, got {ignore_index}")
    targets = as_int64_index(targets, "targets")  # compared with V in int64, and the loss takes int64
    V = logits.shape[-1]
    plain = vmapped_values(targets)
    if plain is not None:
        # Batched by torch.func.vmap: the range is checked on the plain values under the batch; a
        # sample whose targets were all ignored would be 0/0, per sample, so ignore_index is refused.
        if ignore_index is not None:
            raise ValueError(f"ignore_index={ignore_index} is not supported with targets batched by torch.func.vmap: "
                             f"a sample with every target ignored would get a NaN loss")
        check_range_vmapped(plain, V, "target")
        return targets
    counted = torch.ones_like(targets, dtype=torch.bool) if ignore_index is None else targets != ignore_index
    bad = counted & ((targets < 0) | (targets >= V))  # (B, T)
    # One reduction, one host sync: both error conditions come back together.
    n_bad, n_counted = (int(n) for n in torch.stack([bad.sum(), counted.sum()]).tolist())
    if n_bad:
        position = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"target {int(targets[position])} at position {position} is outside [0, {V}) "
                         f"(vocab_size={V}, ignore_index={ignore_index})")
    if n_counted == 0:
        raise ValueError(f"every target equals ignore_index={ignore_index}: the mean loss over 0 targets is undefined")
    return targets


def cross_entropy_forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int | None = None, *,
                          targets_checked: bool = False) -> torch.Tensor:
    """Mean over counted positions of -log softmax(logits)[target]. `targets_checked`: the caller
    has run check_targets (one host sync) and passes its int64 result."""
    if not targets_checked:
        targets = check_targets(logits, targets, ignore_index)  # (B, T) int64
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (B, T, V) -> (B*T, V)
    flat_targets = targets.reshape(-1)  # (B, T) -> (B*T,)
    if ignore_index is None:
        # check_targets has made every target a real class, so F's default ignore value never matches.
        return F.cross_entropy(flat_logits, flat_targets)  # (B*T, V), (B*T,) -> ()
    return F.cross_entropy(flat_logits, flat_targets, ignore_index=int(ignore_index))  # (B*T, V), (B*T,) -> ()
