"""Affine map with the weight stored (in, out), as in GPT-2's `Conv1D`.

    y = x @ w + b                                           (..., C_in) -> (..., C_out)

Reference: openai/gpt-2 `model.py` `conv1d`; numpy_ref/linear.py derives the backward
(dx = dy @ w.T, dw = x.T @ dy summed over rows, db = dy summed over rows); here autograd does it.
The bias is fused into the matrix product with `addmm` (one BLAS call writes the output once).

`head_forward(x, head)` is the output head, logits = x @ head.T with `head` stored (V, C) like
`wte`. It is a linear layer too, but with V = 50257 output columns and only B*T rows: on the CPU
one GEMM of that shape runs at about half the rate of the block's GEMMs (MKL, measured in
benchmarks), so there it is done in slices of HEAD_CHUNK vocabulary rows, forward and weight
gradient alike, each slice a GEMM whose output stays in cache. Same products, same sums per
element (every logit and every dhead row is one dot product over C or over B*T, never split), so
the numbers match the one-GEMM version up to the BLAS's own blocking.

Shapes: x (..., C_in); w (C_in, C_out); b (C_out,) or None; out (..., C_out).
        head_forward: x (..., C); head (V, C); out (..., V).
"""

from __future__ import annotations

import torch


def linear_forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w + b, with the bias added inside the GEMM when there is one."""
    if b is None:
        return x @ w  # (..., C_in) -> (..., C_out)
    rows = x.reshape(-1, x.shape[-1])  # (..., C_in) -> (N, C_in)
    out = torch.addmm(b, rows, w)  # (N, C_in) @ (C_in, C_out) + (C_out,) -> (N, C_out)
    return out.view(*x.shape[:-1], w.shape[1])  # (N, C_out) -> (..., C_out)


HEAD_CHUNK = 512  # vocabulary rows per GEMM in head_forward on the CPU (benchmarks: 512-768 fastest)


def head_is_sliced(head: torch.Tensor) -> bool:
    """Whether head_forward takes the sliced path for this head here: CPU, no autocast, eager."""
    return (head.device.type == "cpu" and head.shape[0] > HEAD_CHUNK
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def head_forward(x: torch.Tensor, head: torch.Tensor, tied_grad=None) -> torch.Tensor:
    """x @ head.T; on the CPU outside autocast and torch.compile, in vocabulary slices (see top).

    tied_grad: an embedding.TiedHeadGrad when `head` is also the token embedding. On the sliced
    path, the backward leaves dhead there for the embedding's backward to add to in place, and
    returns no gradient for `head` itself (the embedding's backward returns the sum).
    """
    V = head.shape[0]
    if not (head_is_sliced(head) and x.dtype == head.dtype):
        return x @ head.T  # (..., C) @ (C, V) -> (..., V)
    rows = x.reshape(-1, x.shape[-1])  # (..., C) -> (N, C)
    return _SlicedHead.apply(rows, head, tied_grad).view(*x.shape[:-1], V)  # (N, V) -> (..., V)


class _SlicedHead(torch.autograd.Function):
    """logits = x @ head.T, forward and backward in slices of HEAD_CHUNK vocabulary rows.

    forward   logits[:, s] = x @ head[s].T         (N, C) @ (C, S) -> (N, S), each slice s
    backward  dx           = dlogits @ head          (N, V) @ (V, C) -> (N, C): one GEMM, fast as is
              dhead[s]     = dlogits[:, s].T @ x     (S, N) @ (N, C) -> (S, C), each slice s
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, head: torch.Tensor, tied_grad) -> torch.Tensor:
        ctx.save_for_backward(x, head)
        ctx.tied_grad = tied_grad
        V = head.shape[0]
        logits = x.new_empty(x.shape[0], V)  # (N, V)
        for s in range(0, V, HEAD_CHUNK):
            e = min(s + HEAD_CHUNK, V)
            torch.mm(x, head[s:e].T, out=logits[:, s:e])  # (N, C) @ (C, S) -> (N, S)
        return logits

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dlogits: torch.Tensor):
        x, head = ctx.saved_tensors
        dlogits = dlogits.contiguous()  # (N, V)
        dx = dlogits @ head if ctx.needs_input_grad[0] else None  # (N, V) @ (V, C) -> (N, C)
        dhead = None
        if ctx.needs_input_grad[1]:
            V = head.shape[0]
            dhead = torch.empty_like(head)  # (V, C)
            for s in range(0, V, HEAD_CHUNK):
                e = min(s + HEAD_CHUNK, V)
                torch.mm(dlogits[:, s:e].T, x, out=dhead[s:e])  # (S, N) @ (N, C) -> (S, C)
            if ctx.tied_grad is not None:
                ctx.tied_grad.dhead, dhead = dhead, None  # the embedding's backward adds to it
        return dx, dhead, None
