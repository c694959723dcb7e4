"""Faults injected on purpose, for the tests that show a check catches them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gelu_with_scaled_backward(scale: float):
    """The tanh GELU with its backward multiplied by `scale` (-1: the wrong sign, 0.5: halved),
    its forward right: a fault only a gradient check can see. Returns the function to call."""

    class ScaledBackwardGelu(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return F.gelu(x, approximate="tanh")

        @staticmethod
        def backward(ctx, dout):
            (x,) = ctx.saved_tensors
            with torch.enable_grad():
                xx = x.detach().requires_grad_(True)
                (dx,) = torch.autograd.grad(F.gelu(xx, approximate="tanh"), xx, dout)
            return dx * scale  # the injected fault

    return ScaledBackwardGelu.apply
