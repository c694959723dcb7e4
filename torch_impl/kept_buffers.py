"""Large CPU tensors written into memory kept from the previous step: weight gradients, logits.

A training step starts with `optimizer.zero_grad(set_to_none=True)` (torch's default), which
frees every `.grad`; the backward then allocates them all again, 497 MB for GPT-2 small, and the
forward allocates new logits, 51 MB at B*T = 256. On the CPU, glibc gives large freed blocks back
to the kernel, so each of these is fresh memory that the kernel zero-fills page by page on first
write, inside the GEMM that writes it. Measured on the AMD benchmark machine (GPT-2 small, B*T = 256):
about 120,000 page faults and 0.2-0.3 s of a 1.9 s step. (CUDA has torch's caching allocator.)

So these tensors are written into a buffer kept per (parameter, use):

    dw = grad_buffer(w)                 a new tensor over w's kept storage, shaped like w
    torch.mm(x.T, dy, out=dw)           the product writes into memory that is already mapped
    return dw                           autograd makes it w.grad without copying (w.grad was None)

The kept storage is reused only when nothing but this module refers to it: after
zero_grad(set_to_none=True) dropped the old `w.grad` and nobody kept it, a view of it, its
storage object, a numpy array of it, or sent it to another process (shared memory is never
reused). While anything else holds it (w.grad still set, as in gradient accumulation; a tensor
returned by torch.autograd.grad; last step's logits kept by the caller), the new tensor gets
transient memory, exactly as without this module, and nothing anyone can see is overwritten.
A forward without gradients (evaluation, inference) reuses free kept logits of its size but
keeps no new memory of its own.
The values are the same either way; only where they live differs.

Training under bf16 autocast on a CPU with bf16 units (linear.kept_bf16_linear, head.py) keeps
more per step: each weight's bf16 copy, the bf16 logits' gradient, and one bf16 weight-gradient
scratch per weight shape, shared by the weights of that shape (owned by linear._SCRATCH_OWNER).

The cost: between steps the kept memory stays allocated, one set of gradients plus the logits
(and, in that bf16 training, the bf16 copies and scratch: about 370 MB more at GPT-2 small),
which the next step would allocate anyway. `release_kept_buffers()` hands it all back; moving a
GPTModel (`.to(...)`, `.double()`, ...) releases its parameters' buffers (the shared scratch
stays until `release_kept_buffers()`); `kept_bytes()` says how much is held.
"""

from __future__ import annotations

import sys
import threading
from typing import Iterable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from torch_impl.device import plain_eager, under_vmap

_kept = WeakIdKeyDictionary()  # owner tensor (a parameter) -> {use: tensor whose storage is kept}
_lock = threading.Lock()
_storage_refs = getattr(torch._C, "_storage_Use_Count", None)  # private; without it nothing is kept


def keeps_memory(owner: torch.Tensor) -> bool:
    """Whether buffers owned by this tensor are kept: a CPU parameter (leaf), eager."""
    return (_storage_refs is not None and owner.device.type == "cpu" and owner.is_leaf
            and plain_eager())


def _storage_object_refs(storage: torch.UntypedStorage) -> int:
    """Python references to the storage object, read through one call so that _only_ours and
    _free_object_refs count this module's own references the same way."""
    return sys.getrefcount(storage)


def _free_object_refs() -> int:
    """What _only_ours reads for a storage object nobody else holds (its own names and torch's
    reference), measured the same way on a fresh tensor."""
    buf = torch.empty(1)
    storage = buf.untyped_storage()
    return _storage_object_refs(storage)


_FREE_OBJECT_REFS = _free_object_refs()


def _only_ours(buf: torch.Tensor) -> bool:
    """Nothing but `buf` refers to its storage: no other tensor (the C++ count includes the one
    Python storage object), nobody holding that storage object, not shared with another process."""
    storage = buf.untyped_storage()
    return (_storage_refs(storage._cdata) <= 2 and _storage_object_refs(storage) <= _FREE_OBJECT_REFS
            and not storage.is_shared())


def kept_buffer(owner: torch.Tensor, use: str, shape: tuple[int, ...], dtype: torch.dtype, *,
                keep_new: bool = True) -> torch.Tensor:
    """A new uninitialised contiguous tensor of `shape` on owner's device: over the storage kept
    for (owner, use) when it is free and the right size (see top); over new memory, kept from then
    on, when there is none yet; over transient memory while the kept storage is in use.

    keep_new=False (a forward without gradients: evaluation, inference) reuses a free kept
    buffer of the right size but never keeps new memory: inference alone holds nothing after its
    results are dropped."""
    shape = tuple(shape)
    if not keeps_memory(owner):
        return torch.empty(shape, dtype=dtype, device=owner.device)
    with _lock:  # the check and the new alias as one step: a second thread must not take it too
        uses = _kept.setdefault(owner, {})
        kept = uses.get(use)
        if kept is not None and kept.shape == shape and kept.dtype == dtype and not _only_ours(kept):
            if not kept.untyped_storage().is_shared():
                # Still in use (gradient accumulation, a caller's reference): it stays kept and
                # becomes free again when they let go; this one is transient, as in plain torch.
                return torch.empty(shape, dtype=dtype, device=owner.device)
            kept = None  # handed to another process: never ours again
        if kept is None or kept.shape != shape or kept.dtype != dtype:
            if not keep_new:
                return torch.empty(shape, dtype=dtype, device=owner.device)
            kept = torch.empty(shape, dtype=dtype, device=owner.device)
            uses[use] = kept
        # A plain tensor over the same storage (not a view: callers may modify it in place).
        return torch.empty(0, dtype=dtype, device=owner.device).set_(kept.untyped_storage(), 0, shape, kept.stride())


def grad_buffer(w: torch.Tensor) -> torch.Tensor:
    """Where to write w's gradient (see top). Only a backward without create_graph writes here
    (see `graph_backward`): kept memory is never part of a graph."""
    return kept_buffer(w, "grad", tuple(w.shape), w.dtype)


def backward_takes_plain_formulas(*grads) -> bool:
    """Whether a backward of the Functions that write kept memory must take `graph_backward`, given
    the gradients it received: with create_graph=True (grad mode is on inside the backward), under
    vmap (torch.func.vmap, and the legacy batching of autograd.grad(is_grads_batched=True) and
    autograd.functional.jacobian(vectorize=True), whose gradients come batched: out= products have
    no batching rule), and when compiled autograd traces the backward (its graph cannot hold kept
    memory written in place, nor a tied head's gradient handed over in Python)."""
    return (torch.is_grad_enabled() or under_vmap() or _in_compiled_autograd()
            or any(g is not None and _is_legacy_batched(g) for g in grads))


def _in_compiled_autograd() -> bool:
    module = getattr(getattr(torch, "_dynamo", None), "compiled_autograd", None)
    return bool(getattr(module, "in_compiled_autograd_region", False))  # a module flag (private)


_is_legacy_batched = getattr(getattr(torch._C, "_functorch", None), "is_legacy_batchedtensor", lambda t: False)


def graph_backward(ctx, plain, inputs: tuple, grads: tuple) -> tuple:
    """The backward of a Function that writes kept memory, in the modes of
    `backward_takes_plain_formulas`: the gradients of `plain(*inputs)`, the same outputs by plain
    torch ops, by autograd. With create_graph=True (torch.autograd.grad(..., create_graph=True),
    for a gradient penalty or a Hessian-vector product) they are a graph, so that a second
    derivative can go through them; otherwise (a batched backward, compiled autograd) they are
    plain tensors, as a plain backward's are.

    inputs: the forward's arguments, in order (tensors that take gradients must be the ones the
    forward was given, or saved for the backward: connected to the caller's graph); grads: the
    gradients of the forward's outputs, None for an output not used. Returns one gradient per
    input (None where ctx.needs_input_grad says none is needed). Autocast is off inside: plain
    casts what it needs, as the forward did."""
    device = next(t.device.type for t in inputs if isinstance(t, torch.Tensor))
    create_graph = torch.is_grad_enabled()  # a backward runs in grad mode exactly when it was asked for a graph
    wanted = [i for i, needed in enumerate(ctx.needs_input_grad) if needed]
    with torch.enable_grad(), torch.autocast(device, enabled=False):
        # Each input that takes a gradient enters through an alias (a view, one graph node of its
        # own): the gradient with respect to the alias is this Function's alone. With respect to
        # the input itself it would add every other path to it, as when a tied head's x depends
        # on wte through the embedding. The alias is still joined to the input: the graph goes on.
        inputs = tuple(t.view_as(t) if i in wanted else t for i, t in enumerate(inputs))
        outs = plain(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    used = [(out, g) for out, g in zip(outs, grads) if out is not None and g is not None]
    found = torch.autograd.grad([out for out, _ in used], [inputs[i] for i in wanted], [g for _, g in used],
                                create_graph=create_graph, allow_unused=True) if used and wanted else []
    result = [None] * len(inputs)
    for i, g in zip(wanted, found):
        result[i] = g
    return tuple(result)


def kept_bytes(owners: Iterable[torch.Tensor] | None = None) -> int:
    """Bytes held by the kept buffers of `owners` (default: all); some may also be a live `.grad`."""
    with _lock:
        groups = list(_kept.values()) if owners is None else [_kept.get(o, {}) for o in owners]
        return sum(t.untyped_storage().nbytes() for uses in groups for t in uses.values())


def release_kept_buffers(owners: Iterable[torch.Tensor] | None = None) -> None:
    """Forget the kept buffers of `owners` (default: all); the memory is freed once no tensor refers to it."""
    with _lock:
        if owners is None:
            _kept.clear()
            return
        for owner in owners:
            _kept.pop(owner, None)
