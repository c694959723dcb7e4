"""The feed-forward block of a transformer layer.

    h   = gelu(x @ w_fc + b_fc)                             (B, T, C) -> (B, T, 4C)
    out = h @ w_proj + b_proj                               (B, T, 4C) -> (B, T, C)

Reference: Vaswani et al. 2017 (position-wise feed-forward); openai/gpt-2 `model.py` `mlp`.
Shapes: x (B, T, C); w_fc (C, 4C); b_fc (4C,); w_proj (4C, C); b_proj (C,); out (B, T, C).
"""

from __future__ import annotations

import torch

from torch_impl.gelu import gelu_forward
from torch_impl.linear import linear_forward


def mlp_forward(x: torch.Tensor, w_fc: torch.Tensor, b_fc: torch.Tensor, w_proj: torch.Tensor,
                b_proj: torch.Tensor) -> torch.Tensor:
    """c_proj(gelu(c_fc(x)))."""
    h = linear_forward(x, w_fc, b_fc)  # (B, T, C) -> (B, T, 4C)
    h = gelu_forward(h)
    return linear_forward(h, w_proj, b_proj)  # (B, T, 4C) -> (B, T, C)
