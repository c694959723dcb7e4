"""Hypothesis strategies for the autograd-engine tests: op arguments valid by construction.

Shared by `test_autograd.py` (finite differences) and `test_autograd_vs_torch.py` (torch).
Values come from `random_array(seed, shape)` (continuous, so no ties or kinks by accident);
shapes, axes and indices are drawn here, repeats and size-1 axes included.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from parity_tests.strategies import broadcastable_pair, shapes

IGNORE = -100  # the ignore_index the cross-entropy draws use (torch's default value)


@st.composite
def matmul_shapes(draw) -> tuple[tuple, tuple]:
    """Shapes `a @ b` accepts: matrix, batched with broadcast batch axes, and the 1-D cases."""
    n, k, m = (draw(st.integers(1, 4)) for _ in range(3))
    batch_a, batch_b = draw(broadcastable_pair(max_dims=2, max_side=3))
    kind = draw(st.sampled_from(["matrix", "batched", "vector @ batched", "batched @ vector", "vector @ vector"]))
    if kind == "matrix":
        return (n, k), (k, m)
    if kind == "batched":
        return batch_a + (n, k), batch_b + (k, m)
    if kind == "vector @ batched":
        return (k,), batch_b + (k, m)
    if kind == "batched @ vector":
        return batch_a + (n, k), (k,)
    return (k,), (k,)


@st.composite
def reduction_args(draw) -> tuple[tuple, object, bool]:
    """(shape, axis, keepdims) with axis None, one axis (maybe negative) or a set of axes."""
    shape = draw(shapes(min_dims=1, max_dims=3, max_side=4))
    ndim = len(shape)
    axis = draw(st.one_of(
        st.none(),
        st.integers(-ndim, ndim - 1),
        st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True).map(tuple),
    ))
    return shape, axis, draw(st.booleans())


@st.composite
def permutation_args(draw) -> tuple[tuple, tuple]:
    shape = draw(shapes(min_dims=1, max_dims=4, max_side=3))
    return shape, tuple(draw(st.permutations(range(len(shape)))))


@st.composite
def row_index_args(draw) -> tuple[tuple, np.ndarray]:
    """A shape and an integer index array into its first axis, repeats likely."""
    shape = draw(shapes(min_dims=1, max_dims=3, max_side=4))
    rows = draw(st.lists(st.integers(-shape[0], shape[0] - 1), min_size=1, max_size=6))
    return shape, np.array(rows, dtype=np.int64)


@st.composite
def take_along_args(draw) -> tuple[tuple, np.ndarray, int]:
    """(shape, indices, axis) for take_along_axis: indices of the same ndim, any length on `axis`."""
    shape = draw(shapes(min_dims=1, max_dims=3, max_side=4))
    axis = draw(st.integers(0, len(shape) - 1))
    length = draw(st.integers(1, 5))
    idx_shape = tuple(length if d == axis else shape[d] for d in range(len(shape)))
    seed = draw(st.integers(0, 2**16))
    indices = np.random.default_rng(seed).integers(0, shape[axis], size=idx_shape)
    return shape, indices, axis


@st.composite
def concat_args(draw) -> tuple[list[tuple], int]:
    """Shapes that concatenate along `axis` (equal everywhere else)."""
    base = draw(shapes(min_dims=1, max_dims=3, max_side=4))
    axis = draw(st.integers(0, len(base) - 1))
    sizes = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    return [tuple(s if d == axis else base[d] for d in range(len(base))) for s in sizes], axis


@st.composite
def where_args(draw) -> tuple[np.ndarray, tuple, tuple]:
    """(condition, a shape, b shape), the three broadcasting together."""
    a_shape, b_shape = draw(broadcastable_pair(max_dims=3, max_side=4))
    out_shape = np.broadcast_shapes(a_shape, b_shape)
    seed = draw(st.integers(0, 2**16))
    condition = np.asarray(np.random.default_rng(seed).random(out_shape) < 0.5)  # an array even for shape ()
    return condition, a_shape, b_shape


@st.composite
def cross_entropy_args(draw) -> tuple[tuple, np.ndarray]:
    """((B, T, V), targets (B, T)) with some targets set to IGNORE, never all of them."""
    B, T, V = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(2, 6))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, V, size=(B, T))
    ignored = rng.random((B, T)) < draw(st.sampled_from([0.0, 0.3, 0.7]))
    ignored.flat[rng.integers(0, B * T)] = False  # at least one target counts
    targets[ignored] = IGNORE
    return (B, T, V), targets
