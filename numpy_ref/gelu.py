"""GELU, the tanh approximation GPT-2 uses.

    out = 0.5 x (1 + tanh(u)),    u = c (x + a x^3),   c = sqrt(2/pi), a = 0.044715

Backward (product rule, tanh' = 1 - tanh^2):

    d out/dx = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) c (1 + 3 a x^2)
    dx = dout * d out/dx

Reference: Hendrycks & Gimpel 2016, "Gaussian Error Linear Units" (the tanh approximation);
openai/gpt-2 `model.py` `gelu`; llm.c `gelu_forward`/`gelu_backward`. The exact erf form
differs by up to ~1e-3 and is not what GPT-2 computes. Shapes: any; out and dx like x.
"""

from __future__ import annotations

import math

import numpy as np

GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


def gelu_forward(x: np.ndarray):
    """(out, cache): the cache keeps x and tanh(u), so the backward needs no second tanh."""
    t = np.tanh(GELU_C * (x + GELU_A * x * x * x))
    out = 0.5 * x * (1.0 + t)
    return out, (x, t)


def gelu_backward(dout: np.ndarray, cache):
    """dx (a single array: GELU has one input)."""
    x, t = cache
    du_dx = GELU_C * (1.0 + 3.0 * GELU_A * x * x)
    return dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx)
