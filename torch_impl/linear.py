"""Affine map with the weight stored (in, out), as in GPT-2's `Conv1D`.

    y = x @ w + b                                           (..., C_in) -> (..., C_out)

Reference: openai/gpt-2 `model.py` `conv1d`; numpy_ref/linear.py derives the backward
(dx = dy @ w.T, dw = x.T @ dy summed over rows, db = dy summed over rows). Autograd derives it,
except when training on the CPU, where `_KeptGradLinear` writes it out so that dw lands in memory
kept from the last step (kept_buffers.py: fresh memory costs a page fault per 4 kB there).
The bias is fused into the matrix product with `addmm` (one BLAS call writes the output once).
On an AMD CPU with AVX-512 (device.onednn_fp32_products) that training path takes the forward
product and dx from oneDNN rather than MKL, the same float32 products with float32 accumulation
(oneDNN's linear takes its weight (out, in), so w.T for y and w itself for dx):

    y  = linear(x, w.T) + b   = x @ w + b             oneDNN, AVX-512 kernels
    dx = linear(dy, w)        = dy @ w.T              oneDNN
    dw = x.T @ dy                                     MKL, into kept memory as before

Decoding on the CPU multiplies a handful of rows (one per sequence) by each weight: a
matrix-vector product that only streams the weight from memory. MKL runs it on one core (about
12 GB/s on the AMD benchmark machine, one core's bandwidth), so there the product is split along
C_in into SPLIT_K parts, one batched GEMM that torch spreads over the cores, and the parts summed:

    y = sum_k x[:, part k] @ w[part k, :] + b           (N, C_in/K) @ (C_in/K, C_out), K parts

The same sum, grouped differently: equal to the one-GEMM product to float rounding. A weight
under SPLIT_MIN_BYTES stays in the caches from one token to the next and is read faster than the
split's extra calls cost (AMD benchmark machine, one row: 24 us plain vs 38 us split for 256 x 768),
so it takes the plain product.

Under bf16 autocast on a CPU without bf16 instructions (AVX2 only), torch's bf16 GEMM is a
fallback kernel whose speed depends on the operands' layout: on the AMD benchmark machine 10-22
GFLOP/s when exactly one operand is a transposed view (each output a dot product of two rows
contiguous along the summed axis), 1-1.4 GFLOP/s when both are plain row-major, as in x @ w
with w stored (in, out). There `bf16_linear` casts the weight once per use into the layout each
product wants:

    y  = x @ (w.T contiguous).T + b     forward: weight cast to (out, in)
    dx = dy @ (w contiguous).T          backward: weight cast as stored (in, out)
    dw = x.T @ dy,  db = sum_rows dy    weight gradient: already a good layout

Same products in bf16 as plain autocast would compute (inputs rounded to bf16, float32
accumulation); only the memory layout of the operands differs.

Training under bf16 autocast on a CPU with AMX / AVX-512 BF16 (where bf16 is the default plan),
the products are autocast's own, but autocast writes four large tensors per weight per step into
fresh memory: the bf16 copy of the weight (forward), the bf16 dw, its float32 copy that becomes
w.grad, and for a tied head the sum of its two gradients. Fresh memory costs a page fault per 4 kB
(kept_buffers.py); measured on a 2-core Xeon with AMX, GPT-2 small, B*T = 256: 185,000 faults per
step. `_KeptBf16Linear` computes the same products, each operand rounded to bf16 exactly as
autocast rounds it, and writes these tensors into memory kept from the last step:

    wb = bf16(w)                        into kept memory     (C_in, C_out)
    y  = bf16(x) @ wb + bf16(b)         bf16, as autocast    (N, C_out)
    dx = dy @ wb.T                      bf16, then x's dtype (N, C_in)
    dw = float32(bf16(x).T @ dy)        the bf16 product in kept memory, then w.grad's kept memory
    db = float32(sum_rows dy)

so every output and gradient is bit for bit what plain autocast gives (a test holds them equal).
x is cast to bf16 before the Function, as autocast casts it, so that the cast is part of the
graph. With create_graph=True (a second derivative: a gradient penalty, a Hessian-vector
product), a batched backward (is_grads_batched) or compiled autograd, each of these Functions
takes the plain formulas instead, as a graph and without kept memory
(kept_buffers.backward_takes_plain_formulas); kept memory is never part of a graph. A second
derivative through the whole model also needs attention off torch's fused kernels, which have
none: `with torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`.

Decoding under bf16 autocast on such a CPU, plain autocast casts every weight to bf16 again for
every token (its cast cache is for training only): 0.75 GB of memory traffic per token at GPT-2
small, more than the product itself. Inside `bf16_weights_held()` (generate.py holds it for the
whole loop) a no-grad product casts each weight once and reuses that copy until the weight's
version counter says it was written: the same bf16 operands, the same product, the same bits.

Shapes: x (..., C_in); w (C_in, C_out); b (C_out,) or None; out (..., C_out).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from torch_impl.device import cpu_has_fast_bf16, onednn_fp32_products, plain_eager
from torch_impl.kept_buffers import backward_takes_plain_formulas, grad_buffer, graph_backward, kept_buffer

SPLIT_K = 8  # parts of C_in for the CPU decoding product (benchmarks: 8 beats 2 and 4)
SPLIT_MAX_ROWS = 16  # up to this many rows a product is memory-bound and takes the split
SPLIT_MIN_BYTES = 2 << 20  # smaller weights take the plain product (see top)


def streams_weights(rows: int, w: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether x @ w is a CPU matrix-vector-like product with no autograd: the split pays there."""
    return (rows <= SPLIT_MAX_ROWS and w.device.type == "cpu" and x.dtype == w.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and not torch.is_autocast_enabled("cpu") and plain_eager())


def slow_bf16_layouts(w: torch.Tensor) -> bool:
    """CPU bf16 autocast on a CPU without bf16 instructions: products of w go through bf16_linear.
    Not for a float64 w: autocast leaves float64 products in float64."""
    return (w.device.type == "cpu" and w.dtype != torch.float64 and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and plain_eager()
            and not cpu_has_fast_bf16())


_held: contextvars.ContextVar[dict | None] = contextvars.ContextVar("torch_impl_held_bf16", default=None)


@contextlib.contextmanager
def bf16_weights_held():
    """Inside: no-grad products under CPU bf16 autocast on a CPU with bf16 units cast each weight
    (an nn.Parameter) to bf16 once and reuse the copy while the weight's version counter stays the
    same (see top); the copies are dropped on exit. A write through `w.data` does not move the
    counter and is not seen until the context is left: change weights in place under no_grad."""
    token = _held.set({})
    try:
        yield
    finally:
        _held.reset(token)


def held_bf16(w: torch.Tensor) -> torch.Tensor | None:
    """w's bf16 copy inside bf16_weights_held(), when the product is a no-grad one under CPU bf16
    autocast on a CPU with bf16 units; None otherwise."""
    # plain_eager() is tested before the context variable is read: torch.compile cannot trace
    # ContextVar.get and would break the graph at every linear layer.
    if (torch.is_grad_enabled() or not plain_eager() or w.device.type != "cpu" or w.dtype != torch.float32
            or not isinstance(w, torch.nn.Parameter) or w.is_inference() or not torch.is_autocast_enabled("cpu")
            or torch.get_autocast_dtype("cpu") != torch.bfloat16 or not cpu_has_fast_bf16()):
        # Not held: a parametrization's output (a new plain tensor at every read), and an inference
        # tensor (made under torch.inference_mode: it has no version counter to watch).
        return None
    held = _held.get()
    if held is None:
        return None
    entry = held.get(id(w))
    if entry is None or entry[0] is not w or entry[1] != w._version:  # new, or changed in place since
        # The weight itself is kept too, so its id stays its own; its version counter says whether
        # anything wrote into it since the copy was made.
        entry = held[id(w)] = (w, w._version, w.to(torch.bfloat16))
    return entry[2]


def check_autocast_operands(x: torch.Tensor, w: torch.Tensor, name: str) -> None:
    """Under autocast, one of x and w is float64 and the other is not: refused with the dtypes named.

    Autocast casts floating tensors to its low dtype, except float64, which it leaves alone; so
    plain autocast would multiply float64 by bf16 and torch raises. The bf16 paths here cast both
    operands themselves and would quietly compute in bf16 instead: checked first, so that every
    path (CPU or CUDA, training or not) refuses what plain autocast refuses. Both float64 is
    allowed and stays float64, as under plain autocast (slow_bf16_layouts leaves it alone)."""
    device = x.device.type
    if (x.dtype == torch.float64) != (w.dtype == torch.float64) and torch.is_autocast_enabled(device):
        raise TypeError(f"{name}: the input is {x.dtype} and the weight {w.dtype} under {device} "
                        f"{torch.get_autocast_dtype(device)} autocast, which leaves float64 uncast: the product "
                        f"would mix dtypes. Give both the same dtype, or run without autocast")


def linear_forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w + b, with the bias added inside the GEMM when there is one."""
    check_autocast_operands(x, w, "linear")
    C_in, C_out = w.shape
    # Checked here, as numpy_ref's linear does: oneDNN's product ignored a 0-d bias (x @ w came
    # back) and named no shape for the others, and a broadcasting bias got a (C_out,) gradient.
    if x.shape[-1] != C_in:
        raise ValueError(f"linear: input has {x.shape[-1]} features, the weight expects {C_in} "
                         f"(w shape {tuple(w.shape)})")
    if b is not None and tuple(b.shape) != (C_out,):
        raise ValueError(f"linear: bias has shape {tuple(b.shape)}; the weight {tuple(w.shape)} needs ({C_out},)")
    rows = x.reshape(-1, x.shape[-1])  # (..., C_in) -> (N, C_in)
    if C_in % SPLIT_K == 0 and streams_weights(rows.shape[0], w, x):  # decoding: checked first, per token
        out = streamed_linear(rows, w, b)  # (N, C_in) -> (N, C_out)
    elif slow_bf16_layouts(w):
        out = bf16_linear(rows, w, b)  # (N, C_in) -> (N, C_out), bf16
    elif (wb := held_bf16(w)) is not None:  # decoding under bf16 autocast: the weight cast once
        xb = rows.to(torch.bfloat16)
        out = xb @ wb if b is None else torch.addmm(b.to(torch.bfloat16), xb, wb)  # (N, C_out), bf16
    elif fast_bf16_training(w):
        out = kept_bf16_linear(rows, w, b)  # (N, C_in) -> (N, C_out), bf16
    elif keeps_weight_grad(w, x):
        out = _KeptGradLinear.apply(rows, w, b)  # (N, C_in) -> (N, C_out)
    elif b is None:
        out = rows @ w  # (N, C_in) @ (C_in, C_out) -> (N, C_out)
    else:
        out = torch.addmm(b, rows, w)  # (N, C_in) @ (C_in, C_out) + (C_out,) -> (N, C_out)
    return out.view(*x.shape[:-1], C_out)  # (N, C_out) -> (..., C_out)


def streamed_linear(rows: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w + b for a few rows, C_in split into SPLIT_K parts (see top; C_in % SPLIT_K == 0) unless
    w is under SPLIT_MIN_BYTES.
    rows (N, C_in) -> (N, C_out). Also called by decode.py, so both paths give the same bits."""
    C_in, C_out = w.shape
    if w.numel() * w.element_size() < SPLIT_MIN_BYTES:
        return rows @ w if b is None else torch.addmm(b, rows, w)  # (N, C_in) @ (C_in, C_out) -> (N, C_out)
    part = C_in // SPLIT_K
    N = rows.shape[0]
    xs = rows.view(SPLIT_K, 1, part) if N == 1 else rows.view(N, SPLIT_K, part).transpose(0, 1)  # -> (K, N, C_in/K)
    out = torch.bmm(xs, w.reshape(SPLIT_K, part, C_out)).sum(dim=0)  # (K, N, C_out) -> (N, C_out)
    return out if b is None else out.add_(b)


def fast_bf16_training(w: torch.Tensor) -> bool:
    """CPU training of a float32 weight under bf16 autocast on a CPU with bf16 units, eager:
    the products go through _KeptBf16Linear (see top)."""
    return (w.device.type == "cpu" and w.dtype == torch.float32 and torch.is_grad_enabled() and w.requires_grad
            and w.is_leaf and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and plain_eager() and cpu_has_fast_bf16())


def keeps_weight_grad(w: torch.Tensor, x: torch.Tensor) -> bool:
    """CPU training of a weight in x's dtype, eager, no autocast: dw goes to a kept buffer (kept_buffers.py)."""
    return (w.device.type == "cpu" and torch.is_grad_enabled() and w.requires_grad and w.is_leaf
            and x.dtype == w.dtype and not torch.is_autocast_enabled("cpu") and plain_eager())


def onednn_linear(x: torch.Tensor, w_out_in: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w_out_in.T + b by oneDNN (float32; w_out_in may be a transposed view). (N, C_in) -> (N, C_out)."""
    return torch.ops.mkldnn._linear_pointwise(x, w_out_in, b, "none", [], "")


def _register_onednn_linear_flops() -> None:
    """Tell torch's FlopCounterMode what oneDNN's linear costs (it has no formula for this op, and
    would count these products as 0 FLOPs): 2 x (output elements) x C_in, for either overload."""
    from torch.utils import flop_counter

    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _flops(x_shape, *args, out_shape=None, **kwargs) -> int:
        rows = 1
        for n in out_shape:  # (..., C_out)
            rows *= n
        return 2 * rows * x_shape[-1]


if torch.backends.mkldnn.is_available():
    _register_onednn_linear_flops()


class _KeptGradLinear(torch.autograd.Function):
    """x @ w + b, with the backward of the top docstring; dw goes into memory kept from the last step."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.b = b  # not saved: plain torch's product needs no bias for its backward, nor does this one
        # oneDNN's linear reads a bias as contiguous whatever its strides: a strided one stays on MKL
        ctx.onednn = (x.dtype == w.dtype == torch.float32 and (b is None or b.is_contiguous())
                      and onednn_fp32_products())
        if ctx.onednn:
            return onednn_linear(x, w.T, b)  # (N, C_in) @ (C_in, C_out) (+ b) -> (N, C_out)
        return x @ w if b is None else torch.addmm(b, x, w)  # (N, C_in) @ (C_in, C_out) (+ b) -> (N, C_out)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        if backward_takes_plain_formulas(dy):  # create_graph, vmap, compiled autograd: see kept_buffers.py
            return graph_backward(ctx, plain_linear, (x, w, ctx.b), (dy,))
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # (N, C_out) @ (C_out, C_in) -> (N, C_in)
            dx = onednn_linear(dy.contiguous(), w, None) if ctx.onednn else dy @ w.T
        if ctx.needs_input_grad[1]:
            dw = grad_buffer(w)  # (C_in, C_out), memory kept from the last step where free
            torch.mm(x.T, dy, out=dw)  # (C_in, N) @ (N, C_out) -> (C_in, C_out)
        if ctx.b is not None and ctx.needs_input_grad[2]:
            db = dy.sum(dim=0)  # (N, C_out) -> (C_out,)
        return dx, dw, db


def plain_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w + b by plain torch ops: what _KeptGradLinear computes, for its create_graph backward."""
    return x @ w if b is None else torch.addmm(b, x, w)  # (N, C_in) @ (C_in, C_out) (+ b) -> (N, C_out)


def plain_bf16_linear(xb: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, w_is_out_in: bool,
                      tied_grad=None) -> torch.Tensor:
    """xb @ bf16(W) + bf16(b) by plain torch ops, as autocast computes it: what _Bf16Linear and
    _KeptBf16Linear compute, for their create_graph backward. xb (N, C_in) bf16 -> (N, C_out) bf16."""
    bf16 = torch.bfloat16
    W = (w.T if w_is_out_in else w).to(bf16)  # (C_in, C_out)
    return xb @ W if b is None else torch.addmm(b.to(bf16), xb, W)


def plain_kept_bf16_linear(xb: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, w_is_out_in: bool,
                           tied_grad, wb: torch.Tensor) -> torch.Tensor:
    """plain_bf16_linear with the weight's bf16 copy made at the forward, `wb`, for _KeptBf16Linear's
    plain backward: w may have changed in place since (an optimiser step between the forward and
    a second backward), and autocast's own backward would use its forward-time cast too. `w - w`
    is exactly 0, so W has wb's values and w's gradient."""
    W = wb + (w - w.detach()).to(torch.bfloat16)  # (w's shape) wb's values, joined to w
    return plain_bf16_linear(xb, W, b, w_is_out_in)


def bf16_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, w_is_out_in: bool = False) -> torch.Tensor:
    """x @ W + b in bf16, every product in a fast layout (see top). W is w (in, out), or w.T when
    `w_is_out_in` (the output head, stored (V, C)). x (N, C_in) -> (N, C_out), bf16."""
    return _Bf16Linear.apply(x.to(torch.bfloat16), w, b, w_is_out_in)  # the cast in the graph, as autocast's


class _Bf16Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xb, w, b, w_is_out_in):
        bf16 = torch.bfloat16
        W = w.T if w_is_out_in else w  # (C_in, C_out), a view
        w_out_in = W.T.to(bf16, memory_format=torch.contiguous_format)  # (C_out, C_in), contiguous
        y = xb @ w_out_in.T if b is None else torch.addmm(b.to(bf16), xb, w_out_in.T)  # (N, C_out)
        # The forward's bf16 copy is saved, as autocast saves its cast: w itself may change in place
        # before the backward (an optimiser step between a forward and its backward). w and b are
        # not saved: the backward needs w's dtype, and both only for create_graph's plain formulas.
        ctx.save_for_backward(xb, w_out_in)
        ctx.w, ctx.b, ctx.w_is_out_in = w, b, w_is_out_in
        return y

    @staticmethod
    def backward(ctx, dy):
        xb, w_out_in = ctx.saved_tensors
        w, b = ctx.w, ctx.b
        if backward_takes_plain_formulas(dy):  # create_graph, vmap, compiled autograd: see kept_buffers.py
            wb = w_out_in if ctx.w_is_out_in else w_out_in.T  # w's shape, the forward's bf16 values
            return graph_backward(ctx, plain_kept_bf16_linear, (xb, w, b, ctx.w_is_out_in, None, wb), (dy,))
        dy = dy.to(torch.bfloat16)  # (N, C_out)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            w_in_out = w_out_in.T.contiguous()  # (C_out, C_in) -> (C_in, C_out), bf16, the layout dx wants
            dx = dy @ w_in_out.T  # (N, C_out) @ (C_out, C_in) -> (N, C_in), bf16 (the cast takes it to x's dtype)
        if ctx.needs_input_grad[1]:
            # (C_out, N) @ (N, C_in) for a head stored (V, C); (C_in, N) @ (N, C_out) otherwise
            dw = (dy.T @ xb) if ctx.w_is_out_in else (xb.T @ dy)
            dw = dw.to(w.dtype)
        if b is not None and ctx.needs_input_grad[2]:
            db = dy.sum(dim=0)  # (N, C_out) -> (C_out,)
        return dx, dw, db, None


# Owner of the bf16 weight-gradient scratch: one buffer per weight shape, not per weight (the
# backward runs one product at a time, so all weights of a shape share it; 91 MB, not 250 MB, at
# GPT-2 small). A plain leaf tensor: kept_buffers keys its buffers by a tensor.
_SCRATCH_OWNER = torch.empty(0)


def kept_bf16_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, w_is_out_in: bool = False,
                     tied_grad=None) -> torch.Tensor:
    """x @ W + b as bf16 autocast computes it, large tensors in kept memory (see top). W is w
    (in, out), or w.T when `w_is_out_in` (the output head, stored (V, C)). tied_grad: a tied
    head's TiedHeadGrad (embedding.py), which takes dw for the embedding's backward to add to.
    x (N, C_in) -> (N, C_out), bf16."""
    return _KeptBf16Linear.apply(x.to(torch.bfloat16), w, b, w_is_out_in, tied_grad)  # the cast in the graph


class _KeptBf16Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xb, w, b, w_is_out_in, tied_grad):
        bf16 = torch.bfloat16
        wb = kept_buffer(w, "bf16", tuple(w.shape), bf16).copy_(w)  # w's shape, rounded to bf16
        W = wb.T if w_is_out_in else wb  # (C_in, C_out), a view
        y = xb @ W if b is None else torch.addmm(b.to(bf16), xb, W)  # (N, C_in) @ (C_in, C_out) -> (N, C_out)
        ctx.save_for_backward(xb, wb)
        # w and b themselves, not saved: the backward needs only whose buffers to use and whether
        # there is a bias (and, with create_graph, the tensors to differentiate by).
        ctx.w, ctx.b, ctx.w_is_out_in, ctx.tied_grad = w, b, w_is_out_in, tied_grad
        return y

    @staticmethod
    def backward(ctx, dy):
        xb, wb = ctx.saved_tensors
        w, b = ctx.w, ctx.b
        if backward_takes_plain_formulas(dy):  # create_graph, vmap, compiled autograd: see kept_buffers.py
            return graph_backward(ctx, plain_kept_bf16_linear, (xb, w, b, ctx.w_is_out_in, ctx.tied_grad, wb), (dy,))
        dy = dy.to(torch.bfloat16)  # (N, C_out)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            W = wb.T if ctx.w_is_out_in else wb  # (C_in, C_out)
            dx = dy @ W.T  # (N, C_out) @ (C_out, C_in) -> (N, C_in), bf16 (the cast takes it to x's dtype)
        if ctx.needs_input_grad[1]:
            dwb = kept_buffer(_SCRATCH_OWNER, f"bf16 grad {tuple(w.shape)}", tuple(w.shape), torch.bfloat16)
            # (C_out, N) @ (N, C_in) for a head stored (V, C); (C_in, N) @ (N, C_out) otherwise
            torch.mm(dy.T, xb, out=dwb) if ctx.w_is_out_in else torch.mm(xb.T, dy, out=dwb)
            dw = grad_buffer(w).copy_(dwb)  # float32, w's shape
        if b is not None and ctx.needs_input_grad[2]:
            db = dy.sum(dim=0).to(b.dtype)  # (N, C_out) -> (C_out,)
        if dw is not None and ctx.tied_grad is not None:
            ctx.tied_grad.give(dw)  # the embedding's backward adds to it and returns it
            dw = None
        return dx, dw, db, None, None
