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
from parity_tests import autograd_strategies as ags
from parity_tests.compare import Comparison
from parity_tests.op_checks import BINARY, UNARY, compare_op, run_op_checks, to_domain
from parity_tests.strategies import broadcastable_pair, floats_array, random_array, seeds, shapes

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
