"""Affine map with the weight stored (in, out), as in GPT-2's `Conv1D`.

    y = x @ w + b                                           (..., C_in) -> (..., C_out)

Reference: openai/gpt-2 `model.py` `conv1d`; numpy_ref/linear.py derives the backward
(dx = dy @ w.T, dw = x.T @ dy summed over rows, db = dy summed over rows); here autograd does it.
The bias is fused into the matrix product with `addmm` (one BLAS call writes the output once).

Shapes: x (..., C_in); w (C_in, C_out); b (C_out,) or None; out (..., C_out).
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
