"""GELU, GPT-2's tanh approximation.

    gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))          (...) -> (...)

Reference: Hendrycks & Gimpel 2016, "Gaussian Error Linear Units"; openai/gpt-2 `model.py`
`gelu`. numpy_ref/gelu.py derives the backward; `F.gelu(approximate="tanh")` is the same formula
as one fused elementwise kernel with its own fused backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gelu_forward(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise."""
    return F.gelu(x, approximate="tanh")
