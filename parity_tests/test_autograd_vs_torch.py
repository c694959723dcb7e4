"""numpy_ref's autograd engine against torch autograd, on hypothesis-drawn inputs.

Both engines run in the same dtype on the same values and take the same random upstream
gradient. float64 is held to the float64 tolerances (same algorithm, only summation order
differs); float32 to the float32 ones, which also proves the engine computes in float32
rather than drifting to float64. Elementwise ops also see hypothesis-drawn values (zeros,
ties and repeats included), where both engines must follow the same conventions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given

import numpy_ref.functional as nf
import numpy_ref.tensor as nt
from numpy_ref.gelu import gelu_backward, gelu_forward
from parity_tests import autograd_strategies as ags
from parity_tests.compare import Comparison, assert_close
from parity_tests.op_checks import BINARY, UNARY, compare_op, run_op_checks, to_domain
from parity_tests.strategies import broadcastable_pair, floats_array, random_array, seeds, shapes
from parity_tests.tolerances import Tol

DTYPES = ["float64", "float32"]


def assert_all_ok(comparisons: list[Comparison]) -> None:
    """Fail on the first comparison outside its tolerance, with its full message."""
    assert comparisons, "nothing was compared"
    for c in comparisons:
        assert c.ok, c.message()


def values(seed: int, shape, domain: str = "real") -> np.ndarray:
    return to_domain(random_array(seed, shape), domain)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fixed_op_checks_pass(dtype):
    """The table `gpt-oracle check` prints: every op, every gradient, within tolerance."""
    results = run_op_checks(dtype)
    ops = {c.name.split(" ")[0] for c in results}
    expected_ops = {f"op:{name}" for name in list(UNARY) + list(BINARY)} | {
        "op:sum", "op:mean", "op:max", "op:reshape", "op:permute", "op:transpose", "op:getitem", "op:take_along_axis",
        "op:concatenate", "op:split", "op:where", "op:masked_fill", "op:binary_cross_entropy", "op:cross_entropy",
        "op:dropout"}
    assert ops == expected_ops, f"ops missing from the check: {sorted(expected_ops - ops)}; unexpected: {sorted(ops - expected_ops)}"
    assert_all_ok(results)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", sorted(UNARY))
@given(x=shapes(min_dims=1, max_dims=3, max_side=5).flatmap(floats_array), seed=seeds())
def test_unary_ops_match_torch(op, dtype, x, seed):
    d = UNARY[op]
    assert_all_ok(compare_op(f"op:{op}", d.numpy_fn, d.torch_fn, [to_domain(x, d.domains[0])], dtype, seed))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", sorted(set(BINARY) - {"matmul"}))
@given(pair=broadcastable_pair(max_dims=3, max_side=4), data_seed=seeds(), seed=seeds())
def test_binary_ops_match_torch_with_broadcasting(op, dtype, pair, data_seed, seed):
    d = BINARY[op]
    rng = np.random.default_rng(data_seed)
    # Values on a coarse grid, so that ties (maximum) and repeated values are common.
    a, b = (to_domain(np.round(rng.standard_normal(s) * 2) / 2, dom) for s, dom in zip(pair, d.domains))
    assert_all_ok(compare_op(f"op:{op}", d.numpy_fn, d.torch_fn, [a, b], dtype, seed))


@pytest.mark.parametrize("dtype", DTYPES)
@given(pair=ags.matmul_shapes(), seed=seeds())
def test_matmul_matches_torch(dtype, pair, seed):
    a, b = values(seed, pair[0]), values(seed + 1, pair[1])
    assert_all_ok(compare_op("op:matmul", nt.matmul, torch.matmul, [a, b], dtype, seed))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["sum", "mean", "max"])
@given(args=ags.reduction_args(), seed=seeds())
def test_reductions_match_torch(op, dtype, args, seed):
    shape, axis, keepdims = args
    dims = tuple(range(len(shape))) if axis is None else axis
    torch_fn = {"sum": torch.sum, "mean": torch.mean, "max": torch.amax}[op]
    x = np.round(values(seed, shape) * 2) / 2  # ties among maxima are likely: shared evenly in both
    assert_all_ok(compare_op(f"op:{op}", lambda t: getattr(t, op)(axis, keepdims),
                             lambda t: torch_fn(t, dim=dims, keepdim=keepdims), [x], dtype, seed))


@pytest.mark.parametrize("dtype", DTYPES)
@given(args=ags.permutation_args(), seed=seeds())
def test_shape_ops_match_torch(dtype, args, seed):
    shape, axes = args
    x = values(seed, shape)
    assert_all_ok(compare_op("op:permute", lambda t: t.permute(axes), lambda t: t.permute(axes), [x], dtype, seed))
    assert_all_ok(compare_op("op:reshape", lambda t: t.reshape(shape[::-1]), lambda t: t.reshape(shape[::-1]), [x], dtype, seed))
    assert_all_ok(compare_op("op:transpose", lambda t: t.transpose(0, -1), lambda t: t.transpose(0, -1), [x], dtype, seed))


@pytest.mark.parametrize("dtype", DTYPES)
@given(args=ags.row_index_args(), take=ags.take_along_args(), seed=seeds())
def test_indexing_matches_torch(dtype, args, take, seed):
    shape, rows = args
    assert_all_ok(compare_op("op:getitem", lambda t: t[rows], lambda t: t[torch.from_numpy(rows)],
                             [values(seed, shape)], dtype, seed))
    shape, indices, axis = take
    assert_all_ok(compare_op("op:take_along_axis", lambda t: nt.take_along_axis(t, indices, axis),
                             lambda t: torch.take_along_dim(t, torch.from_numpy(indices), dim=axis),
                             [values(seed, shape)], dtype, seed))


@pytest.mark.parametrize("dtype", DTYPES)
@given(args=ags.concat_args(), where=ags.where_args(), seed=seeds())
def test_concatenate_split_where_match_torch(dtype, args, where, seed):
    shapes_, axis = args
    xs = [values(seed + i, s) for i, s in enumerate(shapes_)]
    assert_all_ok(compare_op("op:concatenate", lambda *ts: nt.concatenate(ts, axis=axis),
                             lambda *ts: torch.cat(ts, dim=axis), xs, dtype, seed))
    bounds = [int(b) for b in np.cumsum([s[axis] for s in shapes_])[:-1]]
    assert_all_ok(compare_op("op:split", lambda t: nt.concatenate(nt.split(t, bounds, axis=axis)[::-1], axis=axis),
                             lambda t: torch.cat(torch.tensor_split(t, bounds, dim=axis)[::-1], dim=axis),
                             [np.concatenate(xs, axis=axis)], dtype, seed))
    condition, a_shape, b_shape = where
    c = torch.from_numpy(condition)
    assert_all_ok(compare_op("op:where", lambda a, b: nt.where(condition, a, b), lambda a, b: torch.where(c, a, b),
                             [values(seed, a_shape), values(seed + 1, b_shape)], dtype, seed))
    assert_all_ok(compare_op("op:masked_fill", lambda a: nt.masked_fill(a, condition, float("-inf")),
                             lambda a: a.masked_fill(c, float("-inf")), [values(seed, condition.shape)], dtype, seed))


@pytest.mark.parametrize("dtype", DTYPES)
@given(args=ags.cross_entropy_args(), seed=seeds())
def test_cross_entropy_matches_torch(dtype, args, seed):
    shape, targets = args
    t = torch.from_numpy(targets).reshape(-1)
    assert_all_ok(compare_op(
        "op:cross_entropy", lambda x: nf.cross_entropy(x, targets, ignore_index=ags.IGNORE),
        lambda x: F.cross_entropy(x.reshape(-1, shape[-1]), t, ignore_index=ags.IGNORE), [values(seed, shape) * 3], dtype, seed))


@pytest.mark.parametrize("dtype", DTYPES)
@given(shape=shapes(min_dims=1, max_dims=3, max_side=4), seed=seeds())
def test_bce_and_dropout_match_torch(dtype, shape, seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(shape) < 0.5).astype(dtype)
    assert_all_ok(compare_op("op:binary_cross_entropy", lambda p: nf.binary_cross_entropy(p, y),
                             lambda p: F.binary_cross_entropy(p, torch.from_numpy(y)), [values(seed, shape, "unit")], dtype, seed))
    mask = nf.dropout_mask(shape, 0.3, rng, dtype=dtype)
    assert_all_ok(compare_op("op:dropout", lambda x: nf.dropout(x, 0.3, mask=mask),
                             lambda x: x * torch.from_numpy(mask), [values(seed, shape)], dtype, seed))


@pytest.mark.parametrize("dtype", DTYPES)
@given(shape=shapes(min_dims=1, max_dims=3, max_side=4), seed=seeds())
def test_operators_and_indexing_forms_match_torch(dtype, shape, seed):
    """Reflected operators, `.T`, boolean-mask / None / Ellipsis / integer indices, 0-d inputs."""
    x = to_domain(values(seed, shape), "positive")
    mask = np.random.default_rng(seed).random(shape) < 0.5
    m = torch.from_numpy(mask)
    left = values(seed + 1, (2, x.size)).astype(dtype)
    t_left = torch.from_numpy(left)
    assert_all_ok(compare_op("op:reflected", lambda t: (2.0 - t) * (3.0 / t) + 1.5 ** t + (left @ t.reshape(-1, 1)).sum(),
                             lambda t: (2.0 - t) * (3.0 / t) + 1.5 ** t + (t_left @ t.reshape(-1, 1)).sum(), [x], dtype, seed))
    reverse = tuple(range(len(shape) - 1, -1, -1))
    assert_all_ok(compare_op("op:T", lambda t: t.T, lambda t: t.permute(reverse), [x], dtype, seed))
    assert_all_ok(compare_op("op:getitem forms", lambda t: t[mask].sum() + t[None, ..., -1] * t[0].sum(),
                             lambda t: t[m].sum() + t[None, ..., -1] * t[0].sum(), [x], dtype, seed))
    for op in sorted(op for op in UNARY if op not in ("softmax", "log_softmax")):
        d = UNARY[op]
        assert_all_ok(compare_op(f"op:{op} 0-d", d.numpy_fn, d.torch_fn, [to_domain(values(seed, ()), d.domains[0])],
                                 dtype, seed))


@pytest.mark.parametrize("dtype", DTYPES)
def test_pow_at_zero_matches_torch(dtype):
    """Base 0 with exponents 0, 1, 2 and -1 (inf, matched as inf): no NaN where torch has 0."""
    a = np.array([0.0, 0.0, 0.0, 0.0, 2.0, 0.5])
    p = np.array([0.0, 1.0, 2.0, -1.0, 0.0, -2.0])
    with np.errstate(divide="ignore"):  # 0 ** -1 = inf in the forward, as in torch
        assert_all_ok(compare_op("op:pow_tensor at 0", nt.pow, torch.pow, [a, p], dtype, 0))
    assert_all_ok(compare_op("op:pow at 0", lambda t: t ** 0, lambda t: t ** 0, [a], dtype, 0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_with_nan_matches_torch(dtype):
    """A NaN in a reduced slice: NaN gradient over that slice in both, the other slices exact."""
    x = np.array([[1.0, np.nan, 3.0], [4.0, 4.0, 2.0]])
    assert_all_ok(compare_op("op:max with nan", lambda t: t.max(1), lambda t: torch.amax(t, dim=1), [x], dtype, 0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_and_maximum_with_nan_match_torch(dtype):
    """A NaN input: relu and maximum pass the upstream gradient through it (to both sides for
    maximum), as torch does, not a silent 0; ties and ordinary elements as before."""
    a = np.array([np.nan, 1.0, -2.0, 0.0, 3.0])
    b = np.array([0.5, np.nan, -2.0, 1.0, 3.0])
    assert_all_ok(compare_op("op:relu with nan", nt.relu, torch.relu, [a], dtype, 0))
    assert_all_ok(compare_op("op:maximum with nan", nt.maximum, torch.maximum, [a, b], dtype, 0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_family_matches_torch_at_1e4(dtype):
    x = np.array([[1e4, 1e4 - 1.0, -1e4, 0.0], [-1e4, -1e4, -1e4 + 2.0, -1e4]])
    for op in ["softmax", "log_softmax", "sigmoid", "gelu"]:
        d = UNARY[op]
        assert_all_ok(compare_op(f"op:{op} at 1e4", d.numpy_fn, d.torch_fn, [x], dtype, 0))


@pytest.mark.parametrize("dtype", DTYPES)
@given(shape=shapes(min_dims=1, max_dims=3, max_side=4), axis_seed=seeds(), seed=seeds())
def test_softmax_along_any_axis_matches_torch(dtype, shape, axis_seed, seed):
    axis = int(np.random.default_rng(axis_seed).integers(-len(shape), len(shape)))
    x = values(seed, shape) * 5
    assert_all_ok(compare_op("op:softmax", lambda t: nf.softmax(t, axis=axis), lambda t: torch.softmax(t, dim=axis),
                             [x], dtype, seed))
    assert_all_ok(compare_op("op:log_softmax", lambda t: nf.log_softmax(t, axis=axis),
                             lambda t: torch.log_softmax(t, dim=axis), [x], dtype, seed))


# ---- extreme magnitudes: where the order of the arithmetic decides the result -----------------

# Where exp(-x) overflows torch's 1 / (1 + exp(-x)) flushes to 0; above it, torch is accurate.
SIGMOID_TORCH_FLUSH = {"float32": -88.72, "float64": -709.78}
# The ulp limits for sigmoid: both sides are within ~3 ulp of the exact value (measured: forward
# 4 ulp apart at most, gradient 6), so a form that cancels (millions of ulp) cannot pass.
SIGMOID_FORWARD_ULPS = 6
SIGMOID_GRADIENT_ULPS = 8


def ulp_distance(actual: np.ndarray, expected: np.ndarray, dtype: str) -> np.ndarray:
    """|actual - expected| in units of the dtype's spacing at the larger of the two magnitudes."""
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    spacing = np.spacing(np.maximum(np.abs(a), np.abs(e)).astype(dtype)).astype(np.float64)
    return np.abs(a - e) / spacing


def assert_within_ulps(name: str, x: np.ndarray, actual: np.ndarray, expected: np.ndarray, dtype: str, limit: float) -> None:
    d = ulp_distance(actual, expected, dtype)
    i = int(np.argmax(d))
    assert d[i] <= limit, (f"{name} ({dtype}, {x.size} points): {d[i]:.0f} ulp apart at x = {x[i]!r} "
                           f"(limit {limit}): numpy_ref {actual[i]!r} vs expected {expected[i]!r}; "
                           f"{int((d > limit).sum())} points over the limit")


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_matches_torch_to_a_few_ulp_over_the_whole_range(dtype):
    """The half-tanh form (1 + tanh(x/2)) / 2 cancelled for negative x: 100% off at x = -20 in
    float32 and x = -38 in float64. Forward to a few ulp of torch.sigmoid wherever torch does
    not flush; the gradient is even in x, so it is checked at x against torch's at -|x|, where
    torch's g (1 - y) y does not cancel (at large positive x, y rounds to 1 and torch's is 0)."""
    lo = SIGMOID_TORCH_FLUSH[dtype]
    x = np.linspace(lo, -lo, 20001).astype(dtype)
    G = np.random.default_rng(0).standard_normal(x.shape).astype(dtype)
    t = nt.Tensor(x.copy(), requires_grad=True)
    y = nf.sigmoid(t)
    y.backward(G)
    assert y.dtype == np.dtype(dtype), f"sigmoid computed in {y.dtype} from {dtype} inputs"
    assert_within_ulps("sigmoid forward vs torch.sigmoid", x, y.data, torch.sigmoid(torch.from_numpy(x)).numpy(), dtype,
                       SIGMOID_FORWARD_ULPS)
    mirrored = torch.tensor(-np.abs(x), requires_grad=True)
    torch.sigmoid(mirrored).backward(torch.from_numpy(G))
    assert_within_ulps("sigmoid gradient vs torch's at -|x|", x, t.grad, mirrored.grad.numpy(), dtype, SIGMOID_GRADIENT_ULPS)

    # Below torch's flush point: sigmoid(x) = e^x / (1 + e^x) rounds to e^x, the tiny true value.
    far = np.array([lo - 1.0, lo - 10.0, 2 * lo], dtype=dtype)
    assert_within_ulps("sigmoid below torch's flush point vs e^x", far, nf.sigmoid(nt.Tensor(far)).data, np.exp(far), dtype, 1)
    # Infinities, signed zeros and NaN: the values and gradients torch gives (1, 0, 0.5, NaN).
    special = np.array([np.inf, -np.inf, 0.0, -0.0, np.nan])
    assert_all_ok(compare_op("op:sigmoid at inf, 0, nan", nf.sigmoid, torch.sigmoid, [special], dtype, 0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_cross_entropy_of_a_very_negative_logit_matches_torch(dtype):
    """BCE(sigmoid(x)) with x = -40 (float64) or -20 (float32): the cancelling sigmoid gave
    exactly 0 there, and binary_cross_entropy refused it as outside (0, 1)."""
    x = np.array([-40.0 if dtype == "float64" else -20.0, 2.0])
    y = np.array([0.0, 1.0], dtype=dtype)
    assert_all_ok(compare_op("op:binary_cross_entropy of sigmoid", lambda t: nf.binary_cross_entropy(nf.sigmoid(t), y),
                             lambda t: F.binary_cross_entropy(torch.sigmoid(t), torch.from_numpy(y)), [x], dtype, 0))


# d(a/b)/db = -a/b^2 at magnitudes where b*b over- or underflows but a/b^2 does not.
DIV_EXTREMES = {
    "float32": ([1e-30, 1e-20, 1.0, 1e20], [1e-23, 1e-20, 1e20, 1e20]),
    "float64": ([1e-300, 1e-200, 1.0, 1e200], [1e-160, 1e-160, 1e160, 1e200]),
}


@pytest.mark.parametrize("dtype", DTYPES)
def test_div_gradient_at_extreme_magnitudes_matches_torch(dtype):
    """-g a / (b b) overflowed to -inf, underflowed to -0 or lost digits in a subnormal b*b;
    -g ((a/b)/b), torch's order, keeps every representable value. Relative error only (no atol:
    the gradients span 1e-320 to 1e160)."""
    a, b = (np.array(v, dtype=dtype) for v in DIV_EXTREMES[dtype])
    G = np.array([1.0, -1.0, 2.0, 0.5], dtype=dtype)
    A, B = nt.Tensor(a.copy(), requires_grad=True), nt.Tensor(b.copy(), requires_grad=True)
    (A / B).backward(G)
    ta, tb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    (ta / tb).backward(torch.from_numpy(G))
    tol = Tol(0.0, 4 * float(np.finfo(dtype).eps), "a few ulp: the same three roundings in the same order")
    assert_close(f"d(a/b)/db at extreme magnitudes ({dtype}) vs torch", tb.grad, B.grad, tol)
    assert_close(f"d(a/b)/da at extreme magnitudes ({dtype}) vs torch", ta.grad, A.grad, tol)


# The tanh GELU at |x| large enough that x^3 (then x^2) overflows: 1e6 is ordinary, 1.5e13 and
# 3e13 overflow x (1 + 3 a x^2) in float32, 1e20 overflows x^2 itself (NaN in torch's backward too).
GELU_HUGE = np.array([-1e20, -3e13, -1.5e13, -1e6, 1e6, 1.5e13, 3e13, 1e19, 1e20, np.inf, -np.inf])


@pytest.mark.parametrize("dtype, scale", [("float32", 1.0), ("float64", 1.0), ("float64", 1e140)])
def test_gelu_backward_at_huge_inputs_matches_torch(dtype, scale):
    """The hand-written gelu_backward multiplied du/dx in before the saturated (1 - t^2) = 0:
    inf * 0 = NaN where torch gives dout (x > 0) or 0 (x < 0). Now NaN exactly where torch has
    NaN (x^2 overflows, or x is infinite). The engine's composed gelu is checked too. float64
    is scaled by 1e140 to reach its overflow points (x^3 near 1e102, x^2 near 1.3e154)."""
    x = (GELU_HUGE * scale).astype(dtype)
    G = np.random.default_rng(1).standard_normal(x.shape).astype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # x^2 = inf, inf - inf: as in torch
        out, cache = gelu_forward(x)
        dx = gelu_backward(G, cache)
    xt = torch.tensor(x, requires_grad=True)
    yt = F.gelu(xt, approximate="tanh")
    yt.backward(torch.from_numpy(G))
    tol = Tol(0.0, 4 * float(np.finfo(dtype).eps), "a few ulp: saturated tanh, the same products")
    assert_close(f"gelu_forward at huge |x| x {scale:g} ({dtype}) vs torch", yt, out, tol)
    assert_close(f"gelu_backward at huge |x| x {scale:g} ({dtype}) vs torch", xt.grad, dx, tol)
    with np.errstate(over="ignore", invalid="ignore"):
        assert_all_ok(compare_op(f"op:gelu at huge |x| x {scale:g}", nf.gelu, lambda t: F.gelu(t, approximate="tanh"),
                                 [x], dtype, 1))
