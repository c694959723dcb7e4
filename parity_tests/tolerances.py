"""Every tolerance the harness uses, in one place.

A comparison passes where, element by element, `|actual - expected| <= atol + rtol * |expected|`
(numpy.allclose's rule, with the oracle as `expected`). For bf16 and fp16 the relative part is
taken against the tensor's largest magnitude instead (`per_tensor=True`): a reduction in low
precision loses digits relative to the terms it sums, not to the (possibly cancelled) result,
so an element near zero in a tensor of ones is judged at the tensor's scale.
Forward values and gradients have their own entries because a gradient is a longer chain of
rounding than the value it came from.

Whole-model gradients under bf16 or fp16 autocast, or TF32 matmuls, are judged per tensor as a whole instead
(`GRADIENT_NORM`, `NormTol`): an elementwise rule loose enough for the worst element of every
tensor also passes a tensor that is all zeros or half its size, when its values are small.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float
    why: str
    per_tensor: bool = False  # rtol times max|expected| over the tensor, not per element
    # The absolute part is at least floor * max|expected| over the tensor (layer checks only,
    # `layer_forward_tol`): an element near zero in a wide layer is a cancellation of terms as
    # large as the tensor's largest values, and carries their rounding (float32 at C = 768:
    # 3072-term sums, errors of ~1e-6 of the largest).
    floor: float = 0.0


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
    # Single layers only, as bfloat16's below: whole-model TF32 gradients use GRADIENT_NORM.
    "tf32": Tol(2e-2, 2e-2, "TF32 in both forward and backward matmuls"),
    # Single layers in pure bf16 / fp16 on O(1) inputs and upstream gradients (layer-level checks).
    # Too loose for a whole model's gradients, which are O(1e-5..1e-1): those use GRADIENT_NORM.
    "bfloat16": Tol(5e-2, 1e-1, "bf16 activations in forward and backward; upstream grads are O(1)", per_tensor=True),
    "float16": Tol(5e-3, 2e-2, "fp16 activations in forward and backward", per_tensor=True),
}


@dataclass(frozen=True)
class NormTol:
    """Per tensor: ||actual - expected||_2 <= rel * s, where s is the size of the terms the
    tensor is a mean of (parity_tests/checks.py `position_grad_scales`), not of the mean itself."""

    rel: float
    why: str


# Whole-model gradients under autocast, per parameter tensor (checks.py `compare_grad_norms`).
# The gradient of the mean loss over N positions is the mean of N per-position gradients g_n.
# Autocast rounds both operands and the result of every GEMM to bf16, a relative error of at
# most u = 2^-8 each, so each g_n carries an error of a few u times ||g_n||, and those errors,
# made by different roundings, add like a random walk: ||error|| ~ k * u * s with
#     s = sqrt(sum_n ||g_n||^2) / N.
# s equals ||g|| when the per-position gradients point in unrelated directions (the usual case)
# and stays at the size of the terms when they cancel: two identical rows with targets 0 and 1
# of V = 2 have a mean gradient that is a residue bf16 rounds to exactly 0, which a bound
# relative to ||g|| would call a 100% error on correct code.
# k: a per-position gradient passes 10-20 bf16 roundings (two operands and a result per GEMM,
# forward and backward), each at most u: a few u in quadrature, 10-20 u if all were at their
# worst in the same direction, more where layer norm over few channels amplifies them. Measured
# on the CPU autocast path: median 1.1 u, 99.9th percentile 4.3 u, worst 14.6 u over 5000
# hypothesis-drawn models (test_cross_model's autocast_case: C >= 8, 1-2 layers; 100k tensors; the
# tail is in layer-norm parameters at C = 8 with aligned per-position terms), at most 1.7 u on
# `gpt-oracle check`'s tiny and small. k = 32 (2^-3) is 2x over that worst case, so the random
# `dev` profile does not flake, and still 4x below a halved gradient (error 0.5 ||g||) and 8x
# below a missing one (error ||g||) where s ~ ||g||.
# fp16 autocast is the same argument with u = 2^-11 (10 stored mantissa bits). Measured the same
# way (CPU autocast, 5000 drawn models with C >= 8, 109k tensors): median 1.2 u, 99.9th
# percentile 5.1 u, worst 10.8 u (layer-norm weights at C = 8, where per-position gradients of
# ~1e-5 are fp16 subnormals); at most 2.5 u on `gpt-oracle check`'s tiny and small. 32 u is 3x
# over that worst case. The elementwise GRADIENT["float16"] rule (atol 5e-3) passed the
# tiny model's gradients, O(1e-4), whatever their values: it stays for single layers only.
# Without loss scaling, a model whose per-position gradients fall below fp16's smallest
# subnormal (6e-8) fails this bound, as it should: the gradient is then lost, not rounded.
# `gpt-oracle diff` (parity_tests/diff.py) judges its gradients by the same bound, those of the
# activations too (the gradient of the mean loss with respect to an activation is a mean over
# positions in the same way). Its torch pass holds everything in bf16 / fp16, weights, activations
# and gradients, not autocast's float32 weights. Measured there: on check's tiny and small (seeds
# 0-2, B x T of 1 x 1, 2 x 8, 3 x 12) at most 3.4 u in bf16 and 3.9 u in fp16, median 1.8 u; on
# gpt2-small (random weights, B=2, T=8) at most 4 u in both; over 300 drawn models (C 8 to 32, 1-2
# layers) per dtype, bf16 median 1.5 u and worst 6.4 u, fp16 median 1.6 u and worst 28 u: a
# layer-norm weight at C = 10 whose gradient, stored in fp16, sits among the subnormals.
# TF32 (CUDA matmuls whose operands keep 10 mantissa bits, u = 2^-11, results and everything else
# float32) has fewer roundings per position than fp16 autocast, so fp16's 32 u bounds it as well.
# Not measured: no GPU has been lent to these sessions. Its elementwise GRADIENT rule (atol 2e-2)
# passed 25 of a small model's 49 gradient tensors set to zero; it stays for single layers only.
GRADIENT_NORM = {
    "bfloat16": NormTol(32 * 2.0**-8, "bf16 unit roundoff u=2^-8; 32 u of the per-position gradient scale s"),
    "float16": NormTol(32 * 2.0**-11, "fp16 unit roundoff u=2^-11; 32 u of the per-position gradient scale s"),
    "tf32": NormTol(32 * 2.0**-11, "TF32 operand roundoff u=2^-11; 32 u of the per-position gradient scale s"),
}

# The same bf16 products computed by two kernels (operands in different memory layouts): inputs
# rounded to bf16 identically, float32 accumulation in another order, output rounded to bf16.
# Results sit at most one bf16 rounding step apart: 2^-7 of the value at worst.
BF16_SAME_PRODUCTS = Tol(1e-6, 2.0**-7, "same bf16 products, other kernel: at most one bf16 rounding step")

# Finite differences against the float64 NumPy code itself (central differences, step 1e-6):
# truncation error ~h^2 and cancellation error ~eps/h, both near 1e-10 relative.
GRADCHECK = Tol(1e-6, 1e-5, "central differences, h=1e-6, float64")


# Single-layer checks at any width (oracle.check_layer, `sizes=` up to GPT-2 small and beyond):
# a float32 layer of width C sums up to 4C terms of O(1) inputs, and its near-zero outputs carry
# ~1e-6 of the tensor's largest value (measured: a correct MLP at C = 768 off by 1.6e-5 where the
# output is 3e-3; attention's dw_attn at C = 2048 by 3.8e-4). Only for layer inputs, which are
# O(1) by construction: on real activations with outliers (GPT-2's reach thousands in a few
# channels) a floor of the tensor max would loosen every other element, so model checks have none.
LAYER_FLOOR = {"float32": 1e-5}


# Layer norm's row whose mean is 100 spreads (layer_specs.py, float32 and float64 checks only):
# a correct kernel's x - mean carries the rounding of the mean, ~3 u m / std of the output
# (measured 2e-5 in float32 at m = 100), which an absolute 1e-5 does not allow for; an atol 10x
# the dtype's (~1700 u in float32) still leaves a one-pass variance's 3e-3 error 30x over it.
LARGE_MEAN_ATOL_FACTOR = 10


def large_mean_row_tol(tol: Tol) -> Tol:
    """`tol` for layer norm's large-mean row: LARGE_MEAN_ATOL_FACTOR times its atol."""
    return replace(tol, atol=LARGE_MEAN_ATOL_FACTOR * tol.atol,
                   why=tol.why + "; x - mean carries the rounding of a mean of 100 spreads")


def forward_tol(dtype: str) -> Tol:
    return _lookup(FORWARD, dtype)


def gradient_tol(dtype: str) -> Tol:
    return _lookup(GRADIENT, dtype)


# An elementwise layer (GELU) in float32 sums nothing: a correct kernel is within a few ulps,
# whatever formula it uses (measured over 200k inputs of N(0, 2): F.gelu, the formula written out
# and x * sigmoid(2 c (x + 0.044715 x^3)) stay within 0.15 of the forward bound below and 0.26 of
# the gradient one). The gradient's atol is 2e-5: a rational tanh that clamps at |u| = 7.9 (Eigen's
# fast tanh) gives gelu' = 0 where it is 1e-5. The accumulation-depth tolerance let a GELU with
# 0.0447 for 0.044715 pass (forward error 8.9e-6, 8x this bound).
ELEMENTWISE = {
    "float32": (Tol(1e-6, 1e-6, "an elementwise float32 function: a few ulps, no sums"),
                Tol(2e-5, 1e-5, "the derivative of an elementwise float32 function: a few ulps, no sums")),
}
ELEMENTWISE["tf32"] = ELEMENTWISE["float32"]  # TF32 changes matmuls only


def layer_forward_tol(dtype: str, elementwise: bool = False) -> Tol:
    """forward_tol with the floor of wide layers (LAYER_FLOOR) where the dtype has one; for an
    elementwise layer, ELEMENTWISE's where the dtype has one."""
    if elementwise and dtype in ELEMENTWISE:
        return ELEMENTWISE[dtype][0]
    return replace(forward_tol(dtype), floor=_lookup_floor(dtype))


def layer_gradient_tol(dtype: str, elementwise: bool = False) -> Tol:
    """gradient_tol with the floor of wide layers (LAYER_FLOOR) where the dtype has one; for an
    elementwise layer, ELEMENTWISE's where the dtype has one."""
    if elementwise and dtype in ELEMENTWISE:
        return ELEMENTWISE[dtype][1]
    return replace(gradient_tol(dtype), floor=_lookup_floor(dtype))


def _lookup_floor(dtype: str) -> float:
    key = {"fp32": "float32"}.get(dtype, dtype)
    return LAYER_FLOOR.get(key, 0.0)


def gradient_norm_tol(dtype: str) -> NormTol | None:
    """The whole-tensor bound for model gradients in `dtype` (bf16, fp16, tf32), or None where
    `gradient_tol`'s elementwise rule is the one used (float64, float32)."""
    try:
        return _lookup(GRADIENT_NORM, dtype)
    except KeyError:
        return None


def _lookup(table: dict, dtype: str):
    key = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}.get(dtype, dtype)
    if key not in table:
        raise KeyError(f"no tolerance for dtype {dtype!r}; known: {sorted(table)}")
    return table[key]


# The loss against the cross-entropy, taken in float64, of the logits the same call returned
# (checks.model_rows' "loss vs its own logits" rows). torch_impl takes the loss in float32 at the
# least (autocast's bf16 / fp16 logits are widened first), so only float32 rounding of a
# log-sum-exp and a mean separates the two: measured at most 5.6e-7 on check's models (loss ~6,
# float32, bf16 and fp16, with and without ignored targets or dropout); the bound is 1e-5 of the
# loss (about 170 float32 units of roundoff), over 100x that. It is what catches a loss computed
# or returned in bf16: an error of up to 2^-6 between 4 and 8, which the loss-vs-oracle row's
# bf16 tolerance (5% of the loss) lets through.
OWN_LOGITS_LOSS = {
    "float64": Tol(1e-10, 1e-9, "the same float64 logits: only summation order differs"),
    "float32": Tol(1e-6, 1e-5, "a float32 log-sum-exp and mean of the same logits"),
}


def own_logits_loss_tol(dtype: str) -> Tol:
    """OWN_LOGITS_LOSS for `dtype`: float64's in float64, float32's in every other dtype (the
    loss is float32 there: tf32 runs in float32, and autocast widens its logits for the loss)."""
    return OWN_LOGITS_LOSS["float64" if dtype in ("float64", "fp64") else "float32"]
