"""Affine map with the weight stored (in, out), as in GPT-2's `Conv1D`.

    y = x @ w + b                                           (..., C_in) -> (..., C_out)

Reference: openai/gpt-2 `model.py` `conv1d`; numpy_ref/linear.py derives the backward
(dx = dy @ w.T, dw = x.T @ dy summed over rows, db = dy summed over rows); here autograd does it.
The bias is fused into the matrix product with `addmm` (one BLAS call writes the output once).

Decoding on the CPU multiplies a handful of rows (one per sequence) by each weight: a
matrix-vector product that only streams the weight from memory. MKL runs it on one core (about
12 GB/s on the benchmark machine, one core's bandwidth), so there the product is split along
C_in into SPLIT_K parts, one batched GEMM that torch spreads over the cores, and the parts summed:

    y = sum_k x[:, part k] @ w[part k, :] + b           (N, C_in/K) @ (C_in/K, C_out), K parts

The same sum, grouped differently: equal to the one-GEMM product to float rounding.

Shapes: x (..., C_in); w (C_in, C_out); b (C_out,) or None; out (..., C_out).
"""

from __future__ import annotations

import torch

SPLIT_K = 8  # parts of C_in for the CPU decoding product (benchmarks: 8 beats 2 and 4)
SPLIT_MAX_ROWS = 16  # up to this many rows a product is memory-bound and takes the split


def streams_weights(rows: int, w: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether x @ w is a CPU matrix-vector-like product with no autograd: the split pays there."""
    return (rows <= SPLIT_MAX_ROWS and w.device.type == "cpu" and x.dtype == w.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def linear_forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w + b, with the bias added inside the GEMM when there is one."""
    rows = x.reshape(-1, x.shape[-1])  # (..., C_in) -> (N, C_in)
    C_in, C_out = w.shape
    if C_in % SPLIT_K == 0 and streams_weights(rows.shape[0], w, x):
        part = C_in // SPLIT_K
        xs = rows.view(-1, SPLIT_K, part).transpose(0, 1)  # (N, C_in) -> (K, N, C_in/K)
        out = torch.bmm(xs, w.view(SPLIT_K, part, C_out)).sum(dim=0)  # (K, N, C_out) -> (N, C_out)
        if b is not None:
            out += b
    elif b is None:
        out = rows @ w  # (N, C_in) @ (C_in, C_out) -> (N, C_out)
    else:
        out = torch.addmm(b, rows, w)  # (N, C_in) @ (C_in, C_out) + (C_out,) -> (N, C_out)
    return out.view(*x.shape[:-1], C_out)  # (N, C_out) -> (..., C_out)
