"""Every tolerance the harness uses, in one place.

A comparison passes where, element by element, `|actual - expected| <= atol + rtol * |expected|`
(numpy.allclose's rule, with the oracle as `expected`). For bf16 and fp16 the relative part is
taken against the tensor's largest magnitude instead (`per_tensor=True`): a reduction in low
precision loses digits relative to the terms it sums, not to the (possibly cancelled) result,
so an element near zero in a tensor of ones is judged at the tensor's scale.
Forward values and gradients have their own entries because a gradient is a longer chain of
rounding than the value it came from.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float
    why: str
    per_tensor: bool = False  # rtol times max|expected| over the tensor, not per element


FORWARD = {
    # Same algorithm, same precision, different summation order: only reassociation noise.
    "float64": Tol(1e-10, 1e-9, "float64 vs float64: only summation order differs"),
    # Unit roundoff 6e-8, a few hundred accumulations per dot product at test sizes.
    "float32": Tol(1e-5, 1e-4, "float32 unit roundoff 6e-8 times accumulation depth"),
    # TF32 matmuls keep 10 mantissa bits (unit roundoff ~5e-4).
    "tf32": Tol(5e-3, 5e-3, "TF32 matmul inputs keep 10 mantissa bits"),
    # bf16 keeps 7 mantissa bits (unit roundoff ~4e-3); autocast accumulates in float32.
    "bfloat16": Tol(1e-2, 5e-2, "bf16 keeps 7 mantissa bits (unit roundoff 4e-3)", per_tensor=True),
    "float16": Tol(1e-3, 1e-2, "fp16 keeps 10 mantissa bits", per_tensor=True),
}

GRADIENT = {
    "float64": Tol(1e-9, 1e-7, "backward chains more products; still float64 reassociation only"),
    "float32": Tol(1e-4, 1e-3, "float32 backward: roundoff grows with depth and accumulation"),
    "tf32": Tol(2e-2, 2e-2, "TF32 in both forward and backward matmuls"),
    "bfloat16": Tol(5e-2, 1e-1, "bf16 activations in forward and backward; upstream grads are O(1)", per_tensor=True),
    "float16": Tol(5e-3, 2e-2, "fp16 activations in forward and backward", per_tensor=True),
}

# The same bf16 products computed by two kernels (operands in different memory layouts): inputs
# rounded to bf16 identically, float32 accumulation in another order, output rounded to bf16.
# Results sit at most one bf16 rounding step apart: 2^-7 of the value at worst.
BF16_SAME_PRODUCTS = Tol(1e-6, 2.0**-7, "same bf16 products, other kernel: at most one bf16 rounding step")

# Finite differences against the float64 NumPy code itself (central differences, step 1e-6):
# truncation error ~h^2 and cancellation error ~eps/h, both near 1e-10 relative.
GRADCHECK = Tol(1e-6, 1e-5, "central differences, h=1e-6, float64")


def forward_tol(dtype: str) -> Tol:
    return _lookup(FORWARD, dtype)


def gradient_tol(dtype: str) -> Tol:
    return _lookup(GRADIENT, dtype)


def _lookup(table: dict[str, Tol], dtype: str) -> Tol:
    key = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}.get(dtype, dtype)
    if key not in table:
        raise KeyError(f"no tolerance for dtype {dtype!r}; known: {sorted(table)}")
    return table[key]
