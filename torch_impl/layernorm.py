"""Layer normalisation over the channel axis.

    mean = sum_c x[c] / C
    var  = sum_c (x[c] - mean)^2 / C                        (biased variance, as GPT-2)
    out  = (x - mean) / sqrt(var + eps) * w + b             (..., C) -> (..., C)

Reference: Ba, Kiros & Hinton 2016, "Layer Normalization"; openai/gpt-2 `model.py` `norm`.
numpy_ref/layernorm.py derives the backward; here `F.layer_norm` (one fused kernel, forward and
backward, statistics accumulated in float32 even for bf16 inputs) does both.

Shapes: x (..., C); w, b (C,); out (..., C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layernorm_forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * w + b over the last axis."""
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)  # (..., C) -> (..., C)
