"""The output head: logits = x @ head.T and, given targets, the mean cross-entropy.

    logits = x @ head.T                                   (N, C) @ (C, V) -> (N, V), N = B*T
    loss   = (1/n) sum_{counted r} (lse(logits[r]) - logits[r, target[r]])       (N, V) -> ()

`head` is stored (V, C) like `wte` (it is `wte` when tied). On CUDA, under autocast, inside
torch.compile and under torch.func transforms this is just `x @ head.T`, then cross_entropy.py's
F.cross_entropy. Training under bf16 autocast on a CPU with bf16 units, the product is
linear.kept_bf16_linear's (autocast's bf16 product, in kept memory) and the loss
`_Bf16LogitsLoss`'s: float32 slices of the bf16 logits, as below, not one widened (N, V) copy.

On the CPU (parameters of any float dtype, no autocast, eager) the vocabulary is cut into slices
of HEAD_CHUNK rows, for two reasons measured on the AMD benchmark machine (benchmarks/, GPT-2 small,
B*T = 256):
- one (N x C) @ (C x V) GEMM with V = 50257 runs at about half the rate of the blocks' GEMMs
  (MKL), while each (N x 512) slice runs at full rate with its output in cache;
- with targets, the loss is taken slice by slice while the slice is in cache (a running max and
  sum of exponentials per row: the online softmax of Milakov & Gimelshein 2018), and the backward
  builds each slice of dlogits = (softmax - onehot) / n just before the two GEMMs that use it.
  The (N, V) log-softmax, its gradient and the gather's zero-filled gradient are never made:
  three fewer 51 MB tensors per step, each one fresh memory the kernel must fault in.

On an AMD CPU with AVX-512 (device.onednn_fp32_products) the float32 slices' logits and dx come
from oneDNN rather than MKL, as the blocks' y and dx do (linear.py): a GPT-2 small step took
0.976x the time there (10 of 10 alternating pairs faster, median 1.203 against 1.233 s). dhead
stays on MKL: oneDNN's product plus the copy into the kept buffer gained nothing (1.005x).

Every logit is the same dot product over C, and every row of dhead the same sum over N rows, as
in the one-GEMM version; dx sums over the slices in turn, and each row's loss is taken as
log(sum) - (target logit - max) and its softmax as exp(logit - max) / sum, the max taken out
before anything is added to it (as F.cross_entropy and numpy_ref do: max + log(sum) rounded the
sum away at logits of 1e6 and more), so results agree with the plain path to float rounding (the
parity tests draw the slice size). An ignored row adds exactly 0 to the loss and its gradient,
even where its logits overflow. numpy_ref/model.py and numpy_ref/cross_entropy.py write the same
math in one piece:

    dlogits = (softmax(logits) - onehot(targets)) * dloss / n      (0 on ignored rows)
    dx      = dlogits @ head                                        (N, V) @ (V, C) -> (N, C)
    dhead   = dlogits.T @ x                                         (V, N) @ (N, C) -> (V, C)

A tied head's gradient is handed to the embedding's backward (embedding.TiedHeadGrad), here and
when training under bf16 autocast on a CPU with bf16 units (linear.kept_bf16_linear).
The logits and the head's gradient are written into memory kept from the last step where nobody
holds it any more (kept_buffers.py): 51 MB and 154 MB of fresh pages per step otherwise. With
create_graph=True (a second derivative), a batched backward or compiled autograd, both Functions
here take the plain formulas of `plain_head_loss` / `plain_logits_loss` instead, as a graph
(kept_buffers.backward_takes_plain_formulas).
Shapes: x (B, T, C); head (V, C); targets (B, T) integer; logits (B, T, V); loss ().
"""

from __future__ import annotations

import torch

from torch_impl.cross_entropy import check_targets, cross_entropy_forward
from torch_impl.device import onednn_fp32_products, plain_eager
from torch_impl.kept_buffers import backward_takes_plain_formulas, grad_buffer, graph_backward, kept_buffer
from torch_impl.linear import (SPLIT_K, SPLIT_MIN_BYTES, bf16_linear, check_autocast_operands, fast_bf16_training,
                               held_bf16, kept_bf16_linear, onednn_linear, slow_bf16_layouts,
                               streams_weights)

HEAD_CHUNK = 512  # vocabulary rows per slice on the CPU (benchmarks: 512-768 fastest at B*T = 256)


def head_is_sliced(head: torch.Tensor) -> bool:
    """Whether the head runs in vocabulary slices here: the CPU, V > HEAD_CHUNK, no autocast, eager."""
    return (head.device.type == "cpu" and head.shape[0] > HEAD_CHUNK
            and not torch.is_autocast_enabled("cpu") and plain_eager())


def head_hands_grad_to_embedding(head: torch.Tensor) -> bool:
    """Whether the head's backward leaves a tied head's gradient for the embedding's backward
    (embedding.TiedHeadGrad): the sliced path, and bf16 autocast training on a CPU with bf16 units."""
    return head_is_sliced(head) or fast_bf16_training(head)


def check_head_shapes(x: torch.Tensor, head: torch.Tensor) -> None:
    """A ValueError naming both shapes where x's features are not the head's (the sliced and
    oneDNN products named a slice's shape, or none)."""
    if head.dim() != 2:
        raise ValueError(f"output head: the head has shape {tuple(head.shape)}; it must be (V, C)")
    if x.shape[-1] != head.shape[1]:
        raise ValueError(f"output head: input has {x.shape[-1]} features, the head {tuple(head.shape)} "
                         f"expects {head.shape[1]}")


def head_forward(x: torch.Tensor, head: torch.Tensor, tied_grad=None) -> torch.Tensor:
    """logits = x @ head.T (B, T, C) -> (B, T, V); in slices on the CPU (see top)."""
    check_autocast_operands(x, head, "output head")
    check_head_shapes(x, head)
    rows = x.reshape(-1, x.shape[-1])  # (B, T, C) -> (N, C)
    if streams_weights(rows.shape[0], head, x):  # decoding (never under autocast)
        return head_streamed(rows, head).view(*x.shape[:-1], head.shape[0])  # (N, V) -> (B, T, V)
    if slow_bf16_layouts(head):  # CPU bf16 autocast without bf16 units: see linear.py
        return bf16_linear(rows, head, None, w_is_out_in=True).view(*x.shape[:-1], head.shape[0])
    if fast_bf16_training(head):  # CPU bf16 autocast with bf16 units, training: kept memory (linear.py)
        return kept_bf16_linear(rows, head, None, True, tied_grad).view(*x.shape[:-1], head.shape[0])
    if (hb := held_bf16(head)) is not None:  # decoding under bf16 autocast: the head cast once (linear.py)
        return x.to(torch.bfloat16) @ hb.T  # (B, T, C) @ (C, V) -> (B, T, V), bf16
    if not (head_is_sliced(head) and x.dtype == head.dtype):
        return x @ head.T  # (B, T, C) @ (C, V) -> (B, T, V)
    logits, _ = _SlicedHead.apply(rows, head, None, None, tied_grad, torch.is_grad_enabled())  # (N, V)
    return logits.view(*x.shape[:-1], head.shape[0])  # (N, V) -> (B, T, V)


def head_loss_forward(x: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, ignore_index: int | None = None,
                      tied_grad=None, *, targets_checked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, T, V), mean cross-entropy ()); fused and sliced on the CPU (see top).

    Targets are checked as in cross_entropy.py: integers of shape (B, T), each in [0, V) or equal
    to ignore_index, not all ignored; unless `targets_checked` says the caller ran check_targets
    and passes its int64 result (model.py checks them before any compute).
    """
    check_autocast_operands(x, head, "output head")
    check_head_shapes(x, head)
    bf16_fused = fast_bf16_training(head)
    if not (bf16_fused or (head_is_sliced(head) and x.dtype == head.dtype)):
        logits = head_forward(x, head, tied_grad)  # (B, T, C) @ (C, V) -> (B, T, V)
        return logits, cross_entropy_forward(logits, targets, ignore_index, targets_checked=targets_checked)
    V = head.shape[0]
    if not targets_checked:
        targets = check_targets(x.new_empty(*x.shape[:-1], V, device="meta"), targets, ignore_index)  # (B, T) int64
    flat = targets.reshape(-1)  # (B, T) -> (N,)
    counted = torch.ones_like(flat, dtype=torch.bool) if ignore_index is None else flat != ignore_index
    weights = counted.to(head.dtype) / counted.sum()  # (N,): 1/n on counted rows, 0 on ignored ones
    rows_target = torch.where(counted, flat, 0)  # an ignored row's weight is 0; any real class will do
    if bf16_fused:  # bf16 logits from the kept-memory product, then the loss in float32 slices
        logits = head_forward(x, head, tied_grad)  # (B, T, V), bf16
        loss = _Bf16LogitsLoss.apply(logits.view(-1, V), rows_target, weights, head)
        return logits, loss
    logits, loss = _SlicedHead.apply(x.reshape(-1, x.shape[-1]), head, rows_target, weights, tied_grad,
                                     torch.is_grad_enabled())
    return logits.view(*x.shape[:-1], V), loss  # (N, V) -> (B, T, V), ()


def head_streamed(x: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """x @ head.T for a few rows without autograd (decoding): the vocabulary split into SPLIT_K
    blocks, one batched product that torch spreads over the cores (see linear.py: one
    matrix-vector product streams the weight on one core; a head under SPLIT_MIN_BYTES is one
    plain product). Every logit is the same dot product."""
    V, C = head.shape
    if head.numel() * head.element_size() < SPLIT_MIN_BYTES:
        return x @ head.T  # (N, C) @ (C, V) -> (N, V): a small head stays in the caches (linear.py)
    per = V // SPLIT_K
    blocks = head[:per * SPLIT_K].reshape(SPLIT_K, per, C)  # (V, C) -> (K, V/K, C), the tail left out
    out = torch.bmm(x.expand(SPLIT_K, *x.shape), blocks.transpose(1, 2))  # (K, N, C) @ (K, C, V/K) -> (K, N, V/K)
    out = out.transpose(0, 1).reshape(x.shape[0], per * SPLIT_K)  # (N, K * V/K)
    return torch.cat([out, x @ head[per * SPLIT_K:].T], dim=1)  # + the tail rows -> (N, V)


def online_lse_step(run_max: torch.Tensor, run_sum: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One slice z (N, S) of each row's logits into its running max and sum of exp(logit - max):
    the old sum rescaled to the new max, plus this slice's sum_j exp(z_j - new_max). (N,) each."""
    new_max = torch.maximum(run_max, z.amax(dim=1))  # (N,)
    return new_max, run_sum * torch.exp(run_max - new_max) + torch.exp(z - new_max[:, None]).sum(dim=1)


def weighted_row_losses(run_max: torch.Tensor, run_sum: torch.Tensor, picked: torch.Tensor,
                        weights: torch.Tensor) -> torch.Tensor:
    """sum_r weights[r] * (lse[r] - picked[r]), each row's loss written as
    log(run_sum) - (picked - run_max), the max taken out before anything is added to it: lse =
    run_max + log(run_sum) rounds log(run_sum) away against a large max (logits of 1e30 gave a
    loss of 0, of 1e6 one 0.027 off). An ignored row (weight 0) adds 0 even where its logits
    are infinite (NaN * 0 made the whole loss NaN). (N,) each -> ()."""
    per_row = torch.log(run_sum) - (picked - run_max)  # (N,): lse - picked
    return torch.where(weights != 0, per_row * weights, 0.0).sum()


def softmax_scales(row_scale, run_max, run_sum, weights):
    """(row_scale / run_sum, the ignored rows whose logits are not finite or None): the backward's
    softmax * dloss / n is exp(logits - run_max) * row_scale / run_sum, with no lse to round (as
    in weighted_row_losses), and the rows it must zero rather than multiply by 0 (inf - inf is
    NaN, and NaN * 0 made the row's dx and every dhead entry NaN)."""
    poisoned = (weights == 0) & ~torch.isfinite(run_max + torch.log(run_sum))  # (N,)
    scale = torch.where(weights != 0, row_scale / run_sum, 0.0)  # (N,)
    return scale, poisoned if bool(poisoned.any()) else None


def plain_head_loss(x, head, targets, weights, tied_grad=None):
    """(logits (N, V), weighted loss () or None) by plain torch ops: what _SlicedHead computes."""
    logits = x @ head.T  # (N, C) @ (C, V) -> (N, V)
    if targets is None:
        return logits, None
    picked = logits.gather(1, targets[:, None]).squeeze(1)  # (N,)
    return logits, ((torch.logsumexp(logits, dim=1) - picked) * weights).sum()


def plain_logits_loss(logits, targets, weights, owner=None):
    """The weighted loss () of bf16 logits (N, V), widened to float32, by plain torch ops: what
    _Bf16LogitsLoss computes."""
    z = logits.float()  # (N, V)
    return ((torch.logsumexp(z, dim=1) - z.gather(1, targets[:, None]).squeeze(1)) * weights).sum()


class _SlicedHead(torch.autograd.Function):
    """logits = x @ head.T in slices of HEAD_CHUNK vocabulary rows, and the weighted loss if given.

    forward(x (N, C), head (V, C), targets (N,) or None, weights (N,) or None, tied_grad, training)
        -> logits (N, V), loss () (None without targets)
    training: grad mode was on at the call (inside forward it is always off); without it the
    logits reuse free kept memory but keep none of their own (kept_buffers.py).
    """

    @staticmethod
    def forward(ctx, x, head, targets, weights, tied_grad, training):
        N, V = x.shape[0], head.shape[0]
        logits = kept_buffer(head, "logits", (N, V), x.dtype, keep_new=training)  # (N, V), memory kept from the last step
        run_max = x.new_full((N,), float("-inf"))  # running max of each row's logits
        run_sum = x.new_zeros(N)  # running sum of exp(logit - run_max)
        # oneDNN's float32 products where they beat MKL (linear.py; a step 0.976x the time)
        ctx.onednn = x.dtype == head.dtype == torch.float32 and onednn_fp32_products()
        for s in range(0, V, HEAD_CHUNK):
            z = logits[:, s:s + HEAD_CHUNK]  # (N, S): a view, written in place
            if ctx.onednn:
                z.copy_(onednn_linear(x, head[s:s + HEAD_CHUNK], None))  # (N, C) @ (C, S) -> (N, S)
            else:
                torch.mm(x, head[s:s + HEAD_CHUNK].T, out=z)  # (N, C) @ (C, S) -> (N, S)
            if targets is not None:
                run_max, run_sum = online_lse_step(run_max, run_sum, z)
        loss = None
        if targets is not None:
            picked = logits.gather(1, targets[:, None]).squeeze(1)  # (N, V) -> (N,): logits[r, target[r]]
            loss = weighted_row_losses(run_max, run_sum, picked, weights)  # ()
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not an (N, V) of zeros
        # Only the loss's backward reads the logits (its softmax). Without targets they are not
        # saved, so the caller may change them in place (mask a token) and still backpropagate, as
        # through a plain x @ head.T. With targets they are saved instead of an (N, V) log-softmax:
        # changing them before the backward is autograd's in-place error (F.cross_entropy keeps
        # its own copy and allows it).
        ctx.save_for_backward(x, head, logits if targets is not None else None, run_max, run_sum, targets, weights)
        ctx.tied_grad = tied_grad
        return logits, loss

    @staticmethod
    def backward(ctx, dlogits, dloss):
        x, head, logits, run_max, run_sum, targets, weights = ctx.saved_tensors  # logits None without targets
        if backward_takes_plain_formulas(dlogits, dloss):  # create_graph, vmap, compiled autograd: see kept_buffers.py
            return graph_backward(ctx, plain_head_loss, (x, head, targets, weights, ctx.tied_grad),
                                  (dlogits, dloss)) + (None,)  # no gradient for `training`
        N, V = x.shape[0], head.shape[0]
        row_scale = None if dloss is None or targets is None else dloss * weights  # (N,): dloss / n, or 0
        if row_scale is not None:
            softmax_scale, poisoned = softmax_scales(row_scale, run_max, run_sum, weights)  # (N,) each
        dx = x.new_zeros(x.shape) if ctx.needs_input_grad[0] else None  # (N, C)
        dhead = grad_buffer(head) if ctx.needs_input_grad[1] else None  # (V, C), memory kept from the last step
        buf = x.new_empty(N, min(HEAD_CHUNK, V))  # one slice of dlogits, reused
        for s in range(0, V, HEAD_CHUNK):
            e = min(s + HEAD_CHUNK, V)
            g = buf[:, :e - s]  # (N, S)
            if row_scale is not None:
                torch.sub(logits[:, s:e], run_max[:, None], out=g)
                g.exp_().mul_(softmax_scale[:, None])  # softmax(logits)[:, s:e] * dloss / n
                if poisoned is not None:
                    g.masked_fill_(poisoned[:, None], 0.0)  # an ignored row's inf - inf: 0, not NaN
            else:
                g.zero_()
            if dlogits is not None:
                g.add_(dlogits[:, s:e])  # the caller's own use of the logits
            if dx is not None:
                # (N, S) @ (S, C) -> (N, C), summed over slices: oneDNN's product added, or addmm
                # with out=, not addmm_, which torch's FlopCounterMode does not count
                if ctx.onednn:
                    dx.add_(onednn_linear(g, head[s:e].T, None))
                else:
                    torch.addmm(dx, g, head[s:e], out=dx)
            if dhead is not None:
                torch.mm(g.T, x, out=dhead[s:e])  # (S, N) @ (N, C) -> (S, C)
        if row_scale is not None:
            # The -onehot part of (softmax - onehot), for all slices at once: row r adds
            # -dloss/n times head[target[r]] to dx[r], and -dloss/n times x[r] to dhead[target[r]].
            if dx is not None:
                dx.sub_(row_scale[:, None] * head[targets])  # (N, C)
            if dhead is not None:
                dhead.index_add_(0, targets, row_scale[:, None] * x, alpha=-1)  # (N, C) rows into (V, C)
        if dhead is not None and ctx.tied_grad is not None:
            ctx.tied_grad.give(dhead)  # the embedding's backward adds to it and returns it
            dhead = None
        return dx, dhead, None, None, None, None


class _Bf16LogitsLoss(torch.autograd.Function):
    """The weighted cross-entropy of bf16 logits, in float32 slices of HEAD_CHUNK columns (CPU bf16
    training with bf16 units). Autocast would widen the whole (N, V) to float32 and take its
    log-softmax and gradient there: three 51 MB float32 tensors of fresh memory per step at
    GPT-2 small, B*T = 256. Here each slice is widened in the cache, as in _SlicedHead:

        m[r], s[r] = max_j, sum_j exp(float32(logits[r, j]) - m[r])    running, slice by slice
        loss    = sum_r weights[r] * (log s[r] - (logits[r, target[r]] - m[r]))
        dlogits = bf16((exp(logits - m) / s - onehot) * dloss * weights)  into kept memory

    The same math as F.cross_entropy on the widened logits, summed in another order: the loss
    agrees to float32 rounding, each dlogit to that and one bf16 rounding. The bf16 logits are
    saved for the backward (no float32 copy is kept), so changing them in place before the
    backward is autograd's in-place error, as on the sliced path.
    forward(logits (N, V) bf16, targets (N,), weights (N,) float32, owner: the head) -> loss ()
    """

    @staticmethod
    def forward(ctx, logits, targets, weights, owner):
        N, V = logits.shape
        run_max = weights.new_full((N,), float("-inf"))  # running max of each row's logits
        run_sum = weights.new_zeros(N)  # running sum of exp(logit - run_max)
        for s in range(0, V, HEAD_CHUNK):
            z = logits[:, s:s + HEAD_CHUNK].float()  # (N, S), widened in the cache
            run_max, run_sum = online_lse_step(run_max, run_sum, z)
        picked = logits.gather(1, targets[:, None]).squeeze(1).float()  # (N,): logits[r, target[r]]
        ctx.save_for_backward(logits, run_max, run_sum, targets, weights)
        ctx.owner = owner
        return weighted_row_losses(run_max, run_sum, picked, weights)  # ()

    @staticmethod
    def backward(ctx, dloss):
        logits, run_max, run_sum, targets, weights = ctx.saved_tensors
        if backward_takes_plain_formulas(dloss):  # create_graph, vmap, compiled autograd: see kept_buffers.py
            return graph_backward(ctx, plain_logits_loss, (logits, targets, weights, ctx.owner), (dloss,))
        N, V = logits.shape
        row_scale = dloss * weights  # (N,): dloss / n, or 0 on ignored rows
        softmax_scale, poisoned = softmax_scales(row_scale, run_max, run_sum, weights)  # (N,) each
        dlogits = kept_buffer(ctx.owner, "bf16 dlogits", (N, V), torch.bfloat16)  # (N, V)
        rows = torch.arange(N, device=logits.device)
        for s in range(0, V, HEAD_CHUNK):
            e = min(s + HEAD_CHUNK, V)
            g = logits[:, s:e].float().sub_(run_max[:, None]).exp_().mul_(softmax_scale[:, None])  # softmax * dloss / n
            if poisoned is not None:
                g.masked_fill_(poisoned[:, None], 0.0)  # an ignored row's inf - inf: 0, not NaN
            hit = (targets >= s) & (targets < e)  # rows whose target is in this slice: the -onehot part
            g[rows[hit], targets[hit] - s] -= row_scale[hit]  # in float32, before the one rounding to bf16
            dlogits[:, s:e].copy_(g)  # (N, S) -> bf16
        return dlogits, None, None, None
