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
    """(out, cache): the cache keeps x and tanh(u), so the backward needs no second tanh.

    Written with in-place updates of one scratch array (this runs on (B, T, 4C) activations,
    the largest elementwise work in the model): the math is the line in the module docstring.
    """
    t = x * x  # x^2
    t *= GELU_A
    t += 1.0
    t *= x  # x + a x^3
    t *= GELU_C  # u
    np.tanh(t, out=t)  # tanh(u)
    out = t + 1.0
    out *= x
    out *= 0.5  # 0.5 x (1 + tanh(u))
    return out, (x, t)


def gelu_backward(dout: np.ndarray, cache):
    """dx (a single array: GELU has one input).

    The terms are multiplied in torch's order (`GeluKernel`'s tanh backward): first
    `0.5 x (1 - t^2)`, then `du/dx`. For large |x| the tanh saturates, `1 - t^2` is exactly 0
    and the product is 0 before the huge `du/dx` joins it, so dx = dout for large positive x and
    0 for large negative x. Multiplying `du/dx` in first would give `inf * 0 = NaN` once
    `x (1 + 3 a x^2)` overflows (|x| beyond ~1.5e13 in float32). Where `x^2` itself overflows
    (|x| beyond ~1.8e19 in float32, ~1.3e154 in float64, and at +-inf) `du/dx` is inf and dx
    is NaN, exactly as in torch.
    """
    x, t = cache
    # d out/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2), built in two scratch arrays
    d = t * t
    np.subtract(1.0, d, out=d)  # 1 - t^2, exactly 0 once the tanh saturates
    d *= x
    d *= 0.5  # 0.5 x (1 - t^2)
    du = x * x
    du *= 3.0 * GELU_A
    du += 1.0
    du *= GELU_C  # du/dx = c (1 + 3 a x^2)
    d *= du  # 0.5 x (1 - t^2) du/dx
    np.add(t, 1.0, out=du)  # the second scratch array is reused for 0.5 (1 + t)
    du *= 0.5
    d += du
    d *= dout
    return d
