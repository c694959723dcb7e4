"""Large CPU tensors written into memory kept from the previous step: weight gradients, logits.

A training step starts with `optimizer.zero_grad(set_to_none=True)` (torch's default), which
frees every `.grad`; the backward then allocates them all again, 497 MB for GPT-2 small, and the
forward allocates new logits, 51 MB at B*T = 256. On the CPU, glibc gives large freed blocks back
to the kernel, so each of these is fresh memory that the kernel zero-fills page by page on first
write, inside the GEMM that writes it. Measured on the benchmark machine (GPT-2 small, B*T = 256):
about 120,000 page faults and 0.2-0.3 s of a 1.9 s step. (CUDA has torch's caching allocator.)

So these tensors are written into a buffer kept per (parameter, use):

    dw = grad_buffer(w)                 a new tensor over w's kept storage, shaped like w
    torch.mm(x.T, dy, out=dw)           the product writes into memory that is already mapped
    return dw                           autograd makes it w.grad without copying (w.grad was None)

The kept storage is reused only when nothing but this module refers to it any more: after
zero_grad(set_to_none=True) dropped the old `w.grad` and nobody kept it, a view of it, or a numpy
array of it. While anything else holds it (w.grad still set, as in gradient accumulation; a
tensor returned by torch.autograd.grad; last step's logits kept by the caller), the new tensor
gets new memory and nothing anyone can see is overwritten. The values are the same either way;
only where they live differs.

The cost: between steps that memory stays allocated (the next step would allocate it again, so
the peak is unchanged). `release_kept_buffers()` hands it back.
"""

from __future__ import annotations

import threading

import torch
from torch.utils.weak import WeakIdKeyDictionary

from torch_impl.device import plain_eager

_kept = WeakIdKeyDictionary()  # owner tensor (a parameter) -> {use: tensor whose storage is kept}
_lock = threading.Lock()
_storage_refs = getattr(torch._C, "_storage_Use_Count", None)  # private; without it nothing is kept


def keeps_memory(owner: torch.Tensor) -> bool:
    """Whether buffers owned by this tensor are kept: a CPU parameter (leaf), eager."""
    return (_storage_refs is not None and owner.device.type == "cpu" and owner.is_leaf
            and plain_eager())


def _only_ours(buf: torch.Tensor) -> bool:
    """No tensor but `buf` refers to its storage (the count includes the storage object made here)."""
    return _storage_refs(buf.untyped_storage()._cdata) <= 2


def kept_buffer(owner: torch.Tensor, use: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new uninitialised contiguous tensor of `shape` on owner's device; over the storage kept
    for (owner, use) when that storage is free and the right size (see top), else over new memory
    that is kept from then on."""
    shape = tuple(shape)
    if not keeps_memory(owner):
        return torch.empty(shape, dtype=dtype, device=owner.device)
    with _lock:  # the check and the new alias as one step: a second thread must not take it too
        uses = _kept.setdefault(owner, {})
        kept = uses.get(use)
        if kept is None or kept.shape != shape or kept.dtype != dtype or not _only_ours(kept):
            kept = torch.empty(shape, dtype=dtype, device=owner.device)
            uses[use] = kept  # a buffer still in use stays with its user, freed when they drop it
        # A plain tensor over the same storage (not a view: callers may modify it in place).
        return torch.empty(0, dtype=dtype, device=owner.device).set_(kept.untyped_storage(), 0, shape, kept.stride())


def grad_buffer(w: torch.Tensor) -> torch.Tensor:
    """Where to write w's gradient: kept memory when backward runs without create_graph (see top)."""
    if torch.is_grad_enabled():  # create_graph: the gradient is itself part of a graph; leave it to torch
        return torch.empty(w.shape, dtype=w.dtype, device=w.device)
    return kept_buffer(w, "grad", tuple(w.shape), w.dtype)


def release_kept_buffers() -> None:
    """Forget every kept buffer; the memory is freed once no tensor refers to it."""
    with _lock:
        _kept.clear()
