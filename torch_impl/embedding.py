"""Token plus position embedding.

    x[b, t] = wte[ids[b, t]] + wpe[pos_offset + t]          (B, T) -> (B, T, C)

Reference: GPT-2 (Radford et al. 2019), `wte`/`wpe` in openai/gpt-2 `model.py`. `pos_offset` is
the number of positions already in a KV cache, so the new chunk gets positions P .. P+T-1.
The backward (a scatter-add of the upstream rows into `wte`, and a sum over the batch into
`wpe`) is autograd's; numpy_ref/embedding.py writes it out.

Shapes: ids (B, T) integer; wte (V, C); wpe (Tc, C); out (B, T, C).
Bad input (docs/design.md): a non-integer dtype is a TypeError; a shape other than (B, T), an
empty batch or sequence, an id outside [0, V) or a position past the table is a ValueError
naming the value and the limit.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from torch_impl.device import as_int64_index, check_range_vmapped, plain_eager, vmapped_values
from torch_impl.kept_buffers import backward_takes_plain_formulas, grad_buffer, graph_backward


@torch.compiler.disable  # data-dependent raise: runs eagerly, outside any compiled graph
def check_ids(ids: torch.Tensor, vocab_size: int, context_length: int, pos_offset: int = 0) -> torch.Tensor:
    """Raise the design.md errors for ids that the model cannot embed; return them as int64
    (any integer dtype is accepted and converted exactly; uint64 is refused).

    The range check is one reduction; it syncs with the device once per forward (where the
    device is not the CPU), which costs microseconds next to a GPT-2 forward.
    """
    if isinstance(pos_offset, bool) or not isinstance(pos_offset, numbers.Integral) or pos_offset < 0:
        raise ValueError(f"pos_offset (positions already cached) must be an int >= 0, got {pos_offset!r}")
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"token ids must be a torch.Tensor of integers, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"token ids must have an integer dtype, got {ids.dtype}")
    if ids.ndim != 2:
        raise ValueError(f"token ids must be 2-D (B, T), got shape {tuple(ids.shape)}")
    B, T = ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"token ids must have B >= 1 and T >= 1, got shape {tuple(ids.shape)}")
    if pos_offset + T > context_length:
        past = f" after {pos_offset} cached positions" if pos_offset else ""
        raise ValueError(f"sequence length T={T}{past} exceeds the context length {context_length}")
    ids = as_int64_index(ids, "token ids")  # compared with V in int64: in int16, V = 50257 would wrap
    plain = vmapped_values(ids)
    if plain is not None:  # batched by torch.func.vmap: its values cannot be branched on, the plain ones can
        check_range_vmapped(plain, vocab_size, "token id")
        return ids
    bad = (ids < 0) | (ids >= vocab_size)  # (B, T)
    if bool(bad.any()):
        b, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"token id {int(ids[b, t])} at position (batch {b}, time {t}) is outside [0, {vocab_size}) "
                         f"(vocab_size={vocab_size})")
    return ids


class TiedHeadGrad:
    """Carries a tied head's (V, C) gradient to the embedding's backward (see embedding_forward).

    With a tied head, wte has two uses and autograd sums their gradients: the head's, dense
    (V, C), and the embedding's, B*T rows scattered into a second zero-filled (V, C) tensor.
    On the CPU that sum costs two passes over 154 MB (GPT-2 small) of freshly allocated memory
    per step. Instead, the head's backward leaves its gradient here and returns none for wte;
    the embedding's backward (which autograd runs after it: the embedding's upstream gradient
    is computed from the head's) adds its B*T rows into it in place and returns the total.
    If the head left nothing here, the embedding's backward starts from zeros: still correct.

    Only a gradient left by the same backward pass is taken: a pass that ran the head but not the
    embedding (torch.autograd.grad with respect to a hidden state, retain_graph=True) must not
    have its head gradient added to wte by a later pass that runs the embedding but not the head.
    `give` and `take` tell passes apart by autograd's graph-task id (private, present across the
    2.x releases; without it every pass counts as the same one).
    """

    __slots__ = ("dhead", "task")

    def __init__(self) -> None:
        self.dhead: torch.Tensor | None = None
        self.task = None

    def give(self, dhead: torch.Tensor) -> None:
        """The head's backward leaves its (V, C) gradient for this pass's embedding backward."""
        self.dhead, self.task = dhead, _graph_task()

    def take(self) -> torch.Tensor | None:
        """The head's gradient if this pass left one (then it is gone from here), else None."""
        dhead, task = self.dhead, self.task
        self.dhead = self.task = None
        return dhead if dhead is not None and task == _graph_task() else None


_graph_task = getattr(torch._C, "_current_graph_task_id", lambda: None)


def _plain_embedding(ids: torch.Tensor, wte: torch.Tensor, slot=None) -> torch.Tensor:
    """wte[ids] by plain torch ops: what _EmbeddingKeptGrad computes. (B, T) -> (B, T, C)."""
    return F.embedding(ids, wte)


class _EmbeddingKeptGrad(torch.autograd.Function):
    """tok = wte[ids]; backward: dwte = (a tied head's dhead, or zeros) + scatter-add of dtok rows.

    The zeros are written into memory kept from the last step (kept_buffers.py), not fresh memory.
    """

    @staticmethod
    def forward(ctx, ids: torch.Tensor, wte: torch.Tensor, slot: TiedHeadGrad | None) -> torch.Tensor:
        ctx.save_for_backward(ids)
        # The parameter itself, not a saved copy of its values: the backward only needs to know
        # whose buffer to use, so wte may still be changed in place before it runs.
        ctx.wte, ctx.slot = wte, slot
        return F.embedding(ids, wte)  # (B, T) -> (B, T, C)

    @staticmethod
    def backward(ctx, dtok: torch.Tensor):
        (ids,) = ctx.saved_tensors
        if backward_takes_plain_formulas(dtok):  # F.embedding's own backward, as a graph (kept_buffers.py)
            return graph_backward(ctx, _plain_embedding, (ids, ctx.wte, ctx.slot), (dtok,))
        dwte = ctx.slot.take() if ctx.slot is not None else None
        if dwte is None:
            dwte = grad_buffer(ctx.wte).zero_()  # (V, C)
        # index_add_ on the CPU adds the rows one after another, in the order of ids: reproducible.
        dwte.index_add_(0, ids.reshape(-1), dtok.reshape(-1, dtok.shape[-1]))  # (B*T, C) rows into (V, C)
        return None, dwte, None


def embedding_forward(ids: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor, pos_offset: int = 0,
                      tied_grad: TiedHeadGrad | None = None, *, ids_checked: bool = False) -> torch.Tensor:
    """wte[ids] + wpe[pos_offset : pos_offset + T]; ids are checked first (see `check_ids`) unless
    `ids_checked` says the caller has done so (they are then check_ids' int64 result).

    tied_grad: for a tied head whose backward leaves its gradient there (head.py),
    so that wte's two gradients are summed in place (see TiedHeadGrad). Training on the CPU, the
    embedding's gradient goes into kept memory even without it (kept_buffers.py).
    """
    if not ids_checked:
        ids = check_ids(ids, wte.shape[0], wpe.shape[0], pos_offset)  # (B, T) int64
    T = ids.shape[1]
    training_wte = torch.is_grad_enabled() and wte.requires_grad
    if training_wte and (tied_grad is not None or (wte.device.type == "cpu" and plain_eager())):
        tok = _EmbeddingKeptGrad.apply(ids, wte, tied_grad)  # (B, T) -> (B, T, C)
    else:
        # F.embedding, not wte[ids]: the backward of advanced indexing on the CPU (index_put_
        # with accumulate) adds the rows of repeated ids in a thread-dependent order, so two runs
        # of the same training differ in the last bits; embedding's own backward is reproducible.
        tok = F.embedding(ids, wte)  # (B, T) -> (B, T, C)
    pos = wpe[pos_offset:pos_offset + T]  # (Tc, C) -> (T, C)
    return tok + pos  # (B, T, C) + (T, C) -> (B, T, C)
