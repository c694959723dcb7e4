"""GELU, the tanh approximation GPT-2 uses.

    out = 0.5 x (1 + tanh(u)),    u = c (x + a x^3),   c = sqrt(2/pi), a = 0.044715

computed as the equal form `out = x s`, with s = sigmoid(2u) = 1 / (1 + e^(-2u)), because
1 + tanh(u) = 2 sigmoid(2u). The two are the same function; they differ in rounding. For
x <= -4 the tanh is within 1e-4 of -1 and `1 + tanh(u)` cancels: at x = -6 half of the digits
are gone, and from about x = -7.2 (float64; -5.5 in float32) the result is exactly 0, where the
true value is -2e-16 there and -1.3e-28 at x = -9. `x s` keeps every digit down to where s
underflows.

Backward (1 - tanh^2 = 4 s (1 - s), du/dx = c (1 + 3 a x^2)):

    d out/dx = s + 2 x s (1 - s) du/dx
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
    """(out, cache): the cache keeps x, s = sigmoid(2u) and e = e^(-2u), so the backward needs
    no second exp.

    Written with in-place updates of one scratch array (this runs on (B, T, 4C) activations,
    the largest elementwise work in the model): the math is the line in the module docstring.
    e overflows to inf for u below about -44 (float32) or -354 (float64); s is then 0, the true
    value's underflow, not an error.
    """
    e = x * x  # x^2
    e *= GELU_A
    e += 1.0
    e *= x  # x + a x^3
    e *= -2.0 * GELU_C  # -2u
    with np.errstate(over="ignore"):
        np.exp(e, out=e)  # e^(-2u), in [0, inf]
    s = e + 1.0
    np.divide(1.0, s, out=s)  # sigmoid(2u) = 1 / (1 + e^(-2u)), in [0, 1], no cancellation
    out = x * s  # 0.5 x (1 + tanh(u)) = x sigmoid(2u)
    return out, (x, s, e)


def gelu_backward(dout: np.ndarray, cache):
    """dx (a single array: GELU has one input).

    1 - s is taken as e s = e^(-2u) / (1 + e^(-2u)), which keeps its digits over the whole range
    (1 - s itself cancels where s is near 1), so s (1 - s) is accurate in both tails. Where e
    overflowed to inf, s is exactly 0 and so is s (1 - s): e is capped at the largest finite
    float first, so that the product is 0 s, not inf 0. The factors are multiplied in torch's
    order (`GeluKernel`'s tanh backward): first `2 x s (1 - s)`, then `du/dx`. For large |x| one
    of s, 1 - s is exactly 0 and the product is 0 before the huge `du/dx` joins it, so dx = dout
    for large positive x and 0 for large negative x. Where `x^2` itself overflows (|x| beyond
    ~1.8e19 in float32, ~1.3e154 in float64, and at +-inf) `du/dx` is inf and dx is NaN
    (`0 * inf`), exactly as in torch.
    """
    x, s, e = cache
    # d out/dx = s + 2 x s (1 - s) du/dx, built in two scratch arrays
    d = np.minimum(e, np.finfo(e.dtype).max)  # e^(-2u), inf capped: s is 0 there
    d *= s  # 1 - s = e s
    d *= s  # s (1 - s), 0 once either factor underflows
    d *= x
    d *= 2.0  # 2 x s (1 - s)
    du = x * x
    du *= 3.0 * GELU_A
    du += 1.0
    du *= GELU_C  # du/dx = c (1 + 3 a x^2)
    d *= du  # 2 x s (1 - s) du/dx
    d += s
    d *= dout
    return d
