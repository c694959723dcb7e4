"""The NumPy autograd engine on its own: finite differences, accumulation, dtypes, worked examples.

Gradients are checked against float64 central differences (`numpy_ref.gradcheck`) under a
random upstream gradient, on hypothesis-drawn shapes with broadcasting. Values come from
seeded normal draws, so no input sits on a kink (relu at 0, tied maxima) by accident.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given

import numpy_ref.functional as nf
import numpy_ref.tensor as nt
from numpy_ref.autograd_layers import COMPOSED, FUSED, autograd_loss_and_grads
from numpy_ref.config import GPTConfig
from numpy_ref.cross_entropy import cross_entropy_forward
from numpy_ref.gradcheck import compare_gradients, gradcheck, gradcheck_vjp
from numpy_ref.model import GPTModel
from numpy_ref.tensor import Tensor, no_grad
from parity_tests import autograd_strategies as ags
from parity_tests.compare import assert_close
from parity_tests.op_checks import BINARY, UNARY, op_cases, to_domain
from parity_tests.strategies import broadcastable_pair, random_array, seeds, shapes
from parity_tests.tolerances import GRADCHECK, Tol, forward_tol, gradient_tol

TOL = dict(atol=GRADCHECK.atol, rtol=GRADCHECK.rtol)
EXACT = Tol(0.0, 0.0, "the same arithmetic on the same values")


def values(seed: int, shape, domain: str = "real") -> np.ndarray:
    return to_domain(random_array(seed, shape), domain)


# ---- finite differences, op by op -------------------------------------------------------------


@pytest.mark.parametrize("op", sorted(UNARY))
@given(shape=shapes(min_dims=1, max_dims=3, max_side=4), seed=seeds())
def test_gradcheck_unary(op, shape, seed):
    d = UNARY[op]
    gradcheck(d.numpy_fn, [values(seed, shape, d.domains[0])], upstream_seed=seed, **TOL)


@pytest.mark.parametrize("op", sorted(set(BINARY) - {"matmul"}))
@given(pair=broadcastable_pair(max_dims=3, max_side=4), seed=seeds())
def test_gradcheck_binary_broadcasting(op, pair, seed):
    d = BINARY[op]
    a = values(seed, pair[0], d.domains[0])
    b = values(seed + 1, pair[1], d.domains[1])
    gradcheck(d.numpy_fn, [a, b], upstream_seed=seed, **TOL)


@given(pair=ags.matmul_shapes(), seed=seeds())
def test_gradcheck_matmul(pair, seed):
    gradcheck(nt.matmul, [values(seed, pair[0]), values(seed + 1, pair[1])], upstream_seed=seed, **TOL)


@pytest.mark.parametrize("op", ["sum", "mean", "max"])
@given(args=ags.reduction_args(), seed=seeds())
def test_gradcheck_reductions(op, args, seed):
    shape, axis, keepdims = args
    gradcheck(lambda x: getattr(x, op)(axis, keepdims), [values(seed, shape)], upstream_seed=seed, **TOL)


@given(args=ags.permutation_args(), seed=seeds())
def test_gradcheck_shape_ops(args, seed):
    shape, axes = args
    x = values(seed, shape)
    gradcheck(lambda t: t.permute(axes), [x], upstream_seed=seed, **TOL)
    gradcheck(lambda t: t.reshape(shape[::-1]), [x], upstream_seed=seed, **TOL)
    gradcheck(lambda t: t.transpose(0, -1), [x], upstream_seed=seed, **TOL)


@given(args=ags.row_index_args(), seed=seeds())
def test_gradcheck_getitem(args, seed):
    shape, rows = args
    x = values(seed, shape)
    gradcheck(lambda t: t[rows], [x], upstream_seed=seed, **TOL)
    gradcheck(lambda t: t[::-1][:2], [x], upstream_seed=seed, **TOL)


@given(args=ags.take_along_args(), seed=seeds())
def test_gradcheck_take_along_axis(args, seed):
    shape, indices, axis = args
    gradcheck(lambda t: nt.take_along_axis(t, indices, axis), [values(seed, shape)], upstream_seed=seed, **TOL)


@given(args=ags.concat_args(), seed=seeds())
def test_gradcheck_concatenate_and_split(args, seed):
    shapes_, axis = args
    xs = [values(seed + i, s) for i, s in enumerate(shapes_)]
    gradcheck(lambda *ts: nt.concatenate(ts, axis=axis), xs, upstream_seed=seed, **TOL)
    bounds = list(np.cumsum([s[axis] for s in shapes_])[:-1])
    whole = np.concatenate(xs, axis=axis)
    gradcheck(lambda t: nt.concatenate(nt.split(t, bounds, axis=axis)[::-1], axis=axis), [whole],
              upstream_seed=seed, **TOL)


@given(args=ags.where_args(), seed=seeds())
def test_gradcheck_where_and_masked_fill(args, seed):
    condition, a_shape, b_shape = args
    a, b = values(seed, a_shape), values(seed + 1, b_shape)
    gradcheck(lambda x, y: nt.where(condition, x, y), [a, b], upstream_seed=seed, **TOL)
    out_shape = condition.shape
    gradcheck(lambda x: nt.masked_fill(x, condition, -2.5), [values(seed, out_shape)], upstream_seed=seed, **TOL)


@given(shape=shapes(min_dims=1, max_dims=3, max_side=4), seed=seeds())
def test_gradcheck_binary_cross_entropy_and_dropout(shape, seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(shape) < 0.5).astype(np.float64)
    gradcheck(lambda p: nf.binary_cross_entropy(p, y), [values(seed, shape, "unit")], upstream_seed=seed, **TOL)
    mask = nf.dropout_mask(shape, 0.3, rng)
    gradcheck(lambda x: nf.dropout(x, 0.3, mask=mask), [values(seed, shape)], upstream_seed=seed, **TOL)


@given(args=ags.cross_entropy_args(), seed=seeds())
def test_gradcheck_cross_entropy(args, seed):
    shape, targets = args
    gradcheck(lambda x: nf.cross_entropy(x, targets, ignore_index=ags.IGNORE), [values(seed, shape)],
              upstream_seed=seed, **TOL)


ELEMENTWISE_UNARY = sorted(op for op in UNARY if op not in ("softmax", "log_softmax"))  # no class axis needed


@given(shape=shapes(min_dims=1, max_dims=3, max_side=4), seed=seeds())
def test_gradcheck_operators_indexing_forms_and_0d(shape, seed):
    """The forms no other test reaches: reflected operators, `.T`, boolean-mask, None, Ellipsis
    and integer indices, `split` into equal sections, and 0-d inputs to every elementwise op."""
    x = values(seed, shape, "positive")
    gradcheck(lambda t: (2.0 - t) * (3.0 / t) + 1.5 ** t, [x], upstream_seed=seed, **TOL)
    left = values(seed + 1, (2, x.size))
    gradcheck(lambda t: left @ t.reshape(-1, 1), [x], upstream_seed=seed, **TOL)  # ndarray @ Tensor
    gradcheck(lambda t: t.T, [x], upstream_seed=seed, **TOL)
    mask = np.random.default_rng(seed).random(shape) < 0.5
    gradcheck(lambda t: t[mask], [x], upstream_seed=seed, **TOL)
    gradcheck(lambda t: t[None, ..., -1], [x], upstream_seed=seed, **TOL)
    gradcheck(lambda t: t[0] * t[-1], [x], upstream_seed=seed, **TOL)
    gradcheck(lambda t: nt.concatenate(nt.split(t, shape[0], axis=0)[::-1], axis=0), [x], upstream_seed=seed, **TOL)
    for op in ELEMENTWISE_UNARY:
        d = UNARY[op]
        gradcheck(d.numpy_fn, [values(seed, (), d.domains[0])], upstream_seed=seed, **TOL)


def test_gradcheck_reports_a_wrong_gradient():
    """The checker can fail: a custom op whose backward forgets a factor 2 is caught and named."""
    square = lambda x: (x * x, x)  # noqa: E731
    wrong_backward = lambda dout, x: (dout * x,)  # noqa: E731 - d(x^2)/dx is 2x
    x = values(0, (3, 2))
    with pytest.raises(AssertionError, match=r"input 0 .*worst element .*analytic .* vs numerical"):
        gradcheck(lambda t: nt.custom_op(square, wrong_backward, t), [x])
    with pytest.raises(AssertionError, match=r"input 0"):
        gradcheck_vjp(lambda a: a * a, lambda G: (G * x,), [x])
    errors = gradcheck_vjp(lambda a: a * a, lambda G: (2 * G * x,), [x])
    assert errors[0] < GRADCHECK.atol, f"correct VJP of x^2 off by {errors[0]}"



def _identity(x):
    return x.copy(), None


def _reversed_backward(dout, cache):
    return (dout[::-1].copy(),)  # wrong: the gradient of output i sent to input n-1-i


def _recording_backward(seen):
    def backward(dout, cache):
        seen.append(dout.copy())
        return (dout.copy(),)
    return backward


def test_gradcheck_upstream_gradient_is_random_not_all_ones():
    """The docstring's promise: G is standard normal (from `rng` or `upstream_seed`), never all ones.
    An identity whose backward reverses its gradient is right under G = ones and wrong under any
    G that differs between positions; both entry points must catch it by default."""
    x = values(0, (4,))
    with pytest.raises(AssertionError, match=r"input 0 .*worst element"):
        gradcheck(lambda t: nt.custom_op(_identity, _reversed_backward, t), [x])
    with pytest.raises(AssertionError, match=r"input 0 .*worst element"):
        gradcheck_vjp(lambda a: a, lambda G: (G[::-1],), [x])
    x = values(1, (3, 2))
    for label, kwargs, seed in (("default", lambda: {}, 0), ("upstream_seed=7", lambda: {"upstream_seed": 7}, 7),
                                ("rng=default_rng(11)", lambda: {"rng": np.random.default_rng(11)}, 11)):
        G = np.random.default_rng(seed).standard_normal(x.shape)
        seen = []
        gradcheck(lambda t: nt.custom_op(_identity, _recording_backward(seen), t), [x], **kwargs())
        assert len(seen) == 1, f"gradcheck ({label}): the backward ran {len(seen)} times, expected once"
        assert_close(f"gradcheck ({label}): the upstream gradient it used", seen[0], G, EXACT)
        seen = []
        record = _recording_backward(seen)
        gradcheck_vjp(lambda a: a, lambda G_: record(G_, None), [x], **kwargs())
        assert_close(f"gradcheck_vjp ({label}): the upstream gradient it used", seen[0], G, EXACT)


def test_gradcheck_fails_on_non_finite_gradients():
    """A NaN numerical gradient (sqrt at 0) must not hide a wrong gradient elsewhere, and a NaN or
    infinity on either side is itself a failure that names the element."""
    from numpy_ref.gradcheck import compare_gradients

    with pytest.raises(AssertionError, match=r"worst element \(0,\): analytic 0.0 vs numerical nan"):
        compare_gradients([np.array([0.0, 5.0])], [np.array([np.nan, 1.0])], 1e-6, 1e-5)
    for a, n in (([np.nan], [1.0]), ([1.0], [np.inf]), ([np.inf], [np.inf])):
        with pytest.raises(AssertionError, match=r"input 0"):
            compare_gradients([np.array(a)], [np.array(n)], 1e-6, 1e-5)
    with pytest.raises(AssertionError, match=r"input 0"), np.errstate(invalid="ignore"):  # sqrt(-eps): NaN
        gradcheck_vjp(np.sqrt, lambda G: (G * 123.0,), [np.array([0.0, 4.0, 9.0])])


def test_compare_gradients_refuses_a_missing_gradient():
    """One analytic gradient for two inputs must fail, not check the first and pass."""
    with pytest.raises(AssertionError, match="1 analytic gradients for 2 numerical ones"):
        compare_gradients([np.zeros(2)], [np.zeros(2), np.ones(2)], 1e-6, 1e-5)

# ---- the custom-op hook --------------------------------------------------------------------


def _scaled_shift_forward(x, w, ids, *, scale):
    out = scale * x * w[ids]  # (N, C) * (N, C) -> (N, C)
    return out, (x, w, ids, scale)


def _scaled_shift_backward(dout, cache):
    x, w, ids, scale = cache
    dw = np.zeros_like(w)
    np.add.at(dw, ids, scale * dout * x)
    return scale * dout * w[ids], dw, None


def test_custom_op_inside_a_graph():
    """A hand-derived op with a constant (integer) input composes with primitives on both sides."""
    ids = np.array([2, 0, 2, 1])
    x, w = values(1, (4, 3)), values(2, (3, 3))

    def fn(xt, wt):
        h = nt.custom_op(_scaled_shift_forward, _scaled_shift_backward, nt.tanh(xt), wt, ids, scale=1.5)
        return nf.softmax(h * xt, axis=-1)

    gradcheck(fn, [x, w], upstream_seed=3, **TOL)
    h = nt.custom_op(_scaled_shift_forward, _scaled_shift_backward, Tensor(x), w, ids, scale=1.5)
    assert h._op == "_scaled_shift_forward", f"the custom op is recorded as {h._op!r}"
    assert_close("custom op forward", h.data, 1.5 * x * w[ids], EXACT)


def test_custom_op_wrong_number_of_gradients_is_named():
    op = nt.custom_op(lambda x: (2 * x, None), lambda dout, cache: (2 * dout, None), Tensor(np.ones(3), requires_grad=True))
    with pytest.raises(ValueError, match=r"<lambda>: backward returned 2 gradients for 1 inputs"):
        op.sum().backward()


# ---- graph mechanics -------------------------------------------------------------------------


def test_gradients_accumulate_over_every_use():
    x0 = values(5, (3, 4))
    x = Tensor(x0, requires_grad=True)
    y = x * x + x  # x used three times
    z = (y * nt.exp(x)).sum() + x[0].sum()  # and twice more, through a diamond
    z.backward()
    expected = (2 * x0 + 1) * np.exp(x0) + (x0 * x0 + x0) * np.exp(x0)
    expected[0] += 1
    assert_close("d/dx of x^2 e^x + x e^x + x[0]", x.grad, expected, gradient_tol("float64"))

    first = x.grad.copy()
    z2 = (x * 3.0).sum()
    z2.backward()
    assert_close("grad after a second backward (accumulated)", x.grad, first + 3.0, gradient_tol("float64"))
    x.zero_grad()
    assert x.grad is None, "zero_grad left a gradient behind"
    (x * 3.0).sum().backward()
    assert_close("grad after zero_grad then backward", x.grad, np.full_like(x0, 3.0), EXACT)


def test_backward_twice_adds_the_gradient_again():
    """The graph is kept after a backward (torch's retain_graph=True): a second call adds again."""
    x0 = values(7, (2, 3))
    x = Tensor(x0, requires_grad=True)
    y = (x * x).sum()
    y.backward()
    y.backward()
    assert_close("d/dx of x^2 after two backward calls", x.grad, 4 * x0, EXACT)


def test_deep_graph_does_not_recurse():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = x
    for _ in range(5000):
        y = y + 1.0
        y = y * 1.0
    y.sum().backward()
    assert_close("grad through a 10000-op chain", x.grad, np.ones(2), EXACT)


def test_no_grad_and_detach():
    x = Tensor(values(6, (2, 3)), requires_grad=True)
    with no_grad():
        y = x * 2.0 + 1.0
    assert not y.requires_grad and y.is_leaf, f"under no_grad the output still records a graph: {y!r}"
    assert nt.is_grad_enabled(), "no_grad did not restore recording"
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()

    d = x.detach()
    assert not d.requires_grad and d.data is x.data, "detach must share values and drop the graph"
    (x * d).sum().backward()  # d/dx (x * const) = const: the detached factor gets no gradient
    assert_close("d/dx of x * x.detach()", x.grad, x.data, EXACT)


def test_backward_rejects_bad_upstream_gradients():
    x = Tensor(np.ones((2, 2)), requires_grad=True)
    y = x * 2.0
    with pytest.raises(ValueError, match=r"single-element tensor; this one has shape \(2, 2\)"):
        y.backward()
    with pytest.raises(ValueError, match=r"gradient shape \(2,\) differs"):
        y.backward(np.ones(2))
    with pytest.raises(TypeError, match="gradient dtype float32 differs"):
        y.backward(np.ones((2, 2), dtype=np.float32))


# ---- dtypes and inputs ----------------------------------------------------------------------


@pytest.mark.parametrize("op", sorted(UNARY) + sorted(BINARY))
def test_float32_is_kept(op):
    """Outputs and gradients of a float32 computation stay float32, Python scalars included."""
    d = UNARY.get(op) or BINARY[op]
    shapes_ = [(3, 4)] if op in UNARY else [(3, 4), (4, 2)] if op == "matmul" else [(3, 4), (4,)]
    ts = [Tensor(values(i, s, dom).astype(np.float32), requires_grad=True) for i, (s, dom) in enumerate(zip(shapes_, d.domains))]
    out = d.numpy_fn(*ts) * 2.0 + 1
    assert out.dtype == np.float32, f"{op}: float32 inputs gave a {out.dtype} output"
    out.backward(np.ones(out.shape, dtype=np.float32))
    for i, t in enumerate(ts):
        assert t.grad.dtype == np.float32, f"{op}: gradient of input {i} is {t.grad.dtype}"


def test_mixed_dtypes_are_refused():
    a32 = Tensor(np.ones(3, dtype=np.float32))
    with pytest.raises(TypeError, match=r"mix dtypes \['float32', 'float64'\]"):
        a32 + Tensor(np.ones(3))
    with pytest.raises(TypeError, match="constant array of dtype float64 in a float32 computation"):
        a32 * np.ones(3)
    with pytest.raises(TypeError, match="float32 or float64"):
        Tensor(np.ones(3, dtype=np.float16))
    assert (a32 * np.float64(2.0)).dtype == np.float32, "a scalar constant must take the tensor's dtype"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_inputs_are_never_mutated(dtype):
    """No op writes into its inputs or the upstream gradient (tensors wrap the arrays uncopied)."""
    rng = np.random.default_rng(0)
    for name, numpy_fn, _torch_fn, specs in op_cases(rng):
        arrays = [to_domain(rng.standard_normal(s), dom).astype(dtype) for s, dom in specs]
        before = [a.copy() for a in arrays]
        out = numpy_fn(*[Tensor(a, requires_grad=True) for a in arrays])
        G = rng.standard_normal(out.shape).astype(dtype)
        G_before = G.copy()
        out.backward(G)
        for i, (a, b) in enumerate(zip(arrays, before)):
            assert_close(f"{name}: input {i} after forward and backward", a, b, EXACT)
        assert_close(f"{name}: upstream gradient after backward", G, G_before, EXACT)


# ---- worked examples and edge cases ----------------------------------------------------------


def test_binary_cross_entropy_worked_example():
    """The seed notes' example (issue 2): x=1.1, w=2.2, b=0, target 1 -> dL/dw=-0.0898, dL/db=-0.0817."""
    w = Tensor(2.2, requires_grad=True)
    b = Tensor(0.0, requires_grad=True)
    loss = nf.binary_cross_entropy(nf.sigmoid(1.1 * w + b), np.array(1.0))
    loss.backward()
    assert round(float(w.grad), 4) == -0.0898, f"dL/dw = {float(w.grad)!r}, expected -0.0898"
    assert round(float(b.grad), 4) == -0.0817, f"dL/db = {float(b.grad)!r}, expected -0.0817"


def test_cross_entropy_ignore_index():
    rng = np.random.default_rng(1)
    logits0 = rng.standard_normal((2, 3, 5))
    targets = np.array([[4, -100, 0], [-100, 2, 2]])
    logits = Tensor(logits0, requires_grad=True)
    loss = nf.cross_entropy(logits, targets, ignore_index=-100)
    logp = logits0 - logits0.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    counted = [(0, 0, 4), (0, 2, 0), (1, 1, 2), (1, 2, 2)]
    expected = -np.mean([logp[b, t, c] for b, t, c in counted])
    assert_close("cross_entropy over the 4 counted targets", loss.data, np.array(expected), forward_tol("float64"))
    loss.backward()
    assert_close("gradient at ignored positions", logits.grad[[0, 1], [1, 0]], np.zeros((2, 5)), EXACT)

    with pytest.raises(ValueError, match=r"all 6 targets equal ignore_index=-100; the mean loss is undefined"):
        nf.cross_entropy(logits, np.full((2, 3), -100), ignore_index=-100)
    with pytest.raises(ValueError, match=r"target 5 at position \(1, 0\) is outside \[0, 5\) \(V = 5\)"):
        nf.cross_entropy(logits, np.array([[0, 1, 2], [5, 0, 0]]))
    with pytest.raises(ValueError, match=r"target -100 at position \(0, 1\)"):
        nf.cross_entropy(logits, targets)  # no ignore_index: -100 is just out of range
    with pytest.raises(TypeError, match="targets must be integers"):
        nf.cross_entropy(logits, targets.astype(np.float64))


@pytest.mark.parametrize("bad", [True, False, 3.5, np.float64(1.0), "1", np.array(1)], ids=repr)
def test_cross_entropy_refuses_an_ignore_index_that_is_not_an_int(bad):
    """`True` silently ignored class 1 and 3.5 was accepted by the composed cross-entropy, while
    the fused layer (check_targets) raised TypeError: every path refuses it, with one message."""
    logits = values(0, (1, 3, 4))
    targets = np.array([[1, 2, 1]])
    message = rf"ignore_index must be an int or None, got {re.escape(repr(bad))}"
    with pytest.raises(TypeError, match=message):
        nf.cross_entropy(Tensor(logits), targets, ignore_index=bad)
    with pytest.raises(TypeError, match=message):
        cross_entropy_forward(logits, targets, bad)
    cfg = GPTConfig(vocab_size=4, context_length=4, emb_dim=4, n_heads=2, n_layers=1)
    model = GPTModel(cfg, seed=0)
    for ops in (FUSED, COMPOSED):
        with pytest.raises(TypeError, match=message):
            autograd_loss_and_grads(ops, model.params, targets, targets, cfg, ignore_index=bad)


def test_cross_entropy_takes_numpy_integers_as_ignore_index():
    logits = Tensor(values(0, (1, 3, 4)))
    targets = np.array([[1, 2, 1]])
    for ii in (np.int64(1), np.int32(1), np.uint8(1)):
        assert_close(f"cross_entropy with ignore_index={ii!r} vs 1", nf.cross_entropy(logits, targets, ignore_index=ii).data,
                     nf.cross_entropy(logits, targets, ignore_index=1).data, EXACT)


# The ulp limit for sigmoid against the direct formula 1 / (1 + e^-x) evaluated in float64,
# accurate wherever e^-x does not overflow: each side is within ~3 ulp of the exact value.
SIGMOID_ULPS = 6


@pytest.mark.parametrize("dtype, limit", [("float32", 88.7), ("float64", 709.7)])
def test_sigmoid_is_accurate_over_the_whole_range(dtype, limit):
    """(1 + tanh(x/2)) / 2 cancelled: 0 at x = -20 in float32 and x = -38 in float64, where the
    true value is 2e-9 and 3e-17. The gradient is checked against e^-|x| / (1 + e^-|x|)^2."""
    x = np.linspace(-limit, limit, 4001).astype(dtype)
    G = np.random.default_rng(0).standard_normal(x.shape).astype(dtype)
    t = Tensor(x.copy(), requires_grad=True)
    y = nf.sigmoid(t)
    y.backward(G)
    x64 = x.astype(np.float64)
    e = np.exp(-np.abs(x64))
    for name, actual, expected in (("sigmoid(x)", y.data, 1.0 / (1.0 + np.exp(-x64))),
                                   ("d sigmoid(x)/dx times G", t.grad, G * e / (1.0 + e) ** 2)):
        spacing = np.spacing(np.maximum(np.abs(actual), np.abs(expected)).astype(dtype)).astype(np.float64)
        ulps = np.abs(actual - expected) / spacing
        i = int(np.argmax(ulps))
        assert ulps[i] <= SIGMOID_ULPS, (f"{name} ({dtype}): {ulps[i]:.0f} ulp off at x = {x[i]!r} (limit {SIGMOID_ULPS}): "
                                         f"{actual[i]!r} vs {expected[i]!r}")
    # binary_cross_entropy refused the 0 that sigmoid(-40) cancelled to.
    logits = Tensor(np.array([-40.0, 2.0]), requires_grad=True)
    loss = nf.binary_cross_entropy(nf.sigmoid(logits), np.array([0.0, 1.0]))
    expected = (np.log1p(np.exp(-40.0)) + np.log1p(np.exp(-2.0))) / 2  # -log(1 - s(-40)) and -log s(2)
    assert_close("binary_cross_entropy(sigmoid([-40, 2]), [0, 1])", loss.data, np.array(expected), forward_tol("float64"))


def test_softmax_and_log_softmax_are_stable_at_1e4():
    x0 = np.array([[1e4, 1e4 - 1.0, -1e4, 0.0], [-1e4, -1e4, -1e4 + 2.0, -1e4]])
    x = Tensor(x0, requires_grad=True)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        p = nf.softmax(x)
        logp = nf.log_softmax(x)
        (p * np.arange(4.0)).sum().backward()
    small = x0 - x0.max(-1, keepdims=True)  # the same rows moved near 0, where nothing overflows
    expected_p = np.exp(small) / np.exp(small).sum(-1, keepdims=True)
    assert_close("softmax at 1e4", p.data, expected_p, forward_tol("float64"))
    assert_close("log_softmax at 1e4", logp.data, small - np.log(np.exp(small).sum(-1, keepdims=True)), forward_tol("float64"))
    assert np.all(np.isfinite(x.grad)), f"softmax gradient at 1e4 is not finite: {x.grad}"
    with np.errstate(over="raise"):
        s = nf.sigmoid(Tensor(np.array([-1e4, 0.0, 1e4])))
    assert_close("sigmoid at +-1e4", s.data, np.array([0.0, 0.5, 1.0]), forward_tol("float64"))


def test_repeated_indices_accumulate():
    x = Tensor(np.arange(12.0).reshape(4, 3), requires_grad=True)
    G = np.arange(15.0).reshape(5, 3)
    x[np.array([1, 1, 3, 1, 0])].backward(G)
    expected = np.zeros((4, 3))
    expected[1] = G[0] + G[1] + G[3]
    expected[3] = G[2]
    expected[0] = G[4]
    assert_close("getitem grad with row 1 read three times", x.grad, expected, EXACT)

    y = Tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    idx = np.array([[2, 2, 0, 2], [1, 0, 1, 1]])
    nt.take_along_axis(y, idx, axis=1).backward(np.ones((2, 4)))
    assert_close("take_along_axis grad counts each index's uses", y.grad, np.array([[1.0, 0, 3], [1, 3, 0]]), EXACT)


def test_dropout_mask_and_generator():
    x = Tensor(values(3, (4, 5)))
    a = nf.dropout(x, 0.4, rng=np.random.default_rng(7))
    b = nf.dropout(x, 0.4, rng=np.random.default_rng(7))
    assert_close("dropout twice from the same seed", a.data, b.data, EXACT)
    mask = nf.dropout_mask((4, 5), 0.4, np.random.default_rng(7))
    assert set(np.unique(mask)) <= {0.0, 1 / 0.6}, f"mask holds {np.unique(mask)}"
    assert_close("dropout from the generator equals dropout with its mask", a.data, nf.dropout(x, 0.4, mask=mask).data, EXACT)
    assert nf.dropout(x, 0.0) is x, "p=0 without a mask must be the identity"
    with pytest.raises(ValueError, match=r"p=1.0 must be in \[0, 1\)"):
        nf.dropout(x, 1.0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="needs an explicit mask or an np.random.Generator"):
        nf.dropout(x, 0.1)
    with pytest.raises(ValueError, match=r"mask value 0.5 at \(0, 0\) is neither 0 nor"):
        nf.dropout(x, 0.5, mask=np.full((4, 5), 0.5))


def test_binary_cross_entropy_rejects_probabilities_outside_0_1():
    with pytest.raises(ValueError, match=r"probability 1.0 at \(1,\) is outside \(0, 1\)"):
        nf.binary_cross_entropy(Tensor(np.array([0.5, 1.0])), np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"probability nan at \(0,\) is outside \(0, 1\)"):  # not a NaN loss
        nf.binary_cross_entropy(Tensor(np.array([np.nan, 0.5])), np.array([1.0, 0.0]))


def test_errors_name_the_value():
    x = Tensor(np.ones((2, 3)))
    with pytest.raises(ValueError, match="axis 3 is out of range for an array of 2 dimensions"):
        x.sum(3)
    with pytest.raises(ValueError, match="does not divide into 2 equal parts"):
        nt.split(x, 2, axis=1)
    with pytest.raises(ValueError, match=r"not a permutation of 2 axes"):
        x.permute(0, 0)


def test_axes_are_checked_never_wrapped():
    """An axis outside [-ndim, ndim) is refused by name; `axis % ndim` once made permute(3, 0)
    of a matrix a silent transpose and split(axis=2) a split along axis 0."""
    x = Tensor(np.arange(6.0).reshape(2, 3))
    with pytest.raises(ValueError, match="axis 3 is out of range for an array of 2 dimensions"):
        x.permute(3, 0)
    with pytest.raises(ValueError, match="axis -3 is out of range for an array of 2 dimensions"):
        x.permute(-3, 1)
    with pytest.raises(ValueError, match="axis 5 is out of range for an array of 2 dimensions"):
        x.transpose(0, 5)
    with pytest.raises(ValueError, match="axis -2 is out of range for an array of 1 dimensions"):
        Tensor(np.ones(3)).transpose()
    with pytest.raises(ValueError, match="axis 2 is out of range for an array of 2 dimensions"):
        nt.split(x, 2, axis=2)
    with pytest.raises(ValueError, match="axis 2 is out of range for an array of 2 dimensions"):
        nt.take_along_axis(x, np.zeros((2, 1), dtype=np.int64), axis=2)
    with pytest.raises(ValueError, match=r"axes \(0, -2\) name the same axis twice"):
        x.sum((0, -2))
    with pytest.raises(ValueError, match=r"mean over axis 0 of shape \(0, 3\): no elements"):
        Tensor(np.ones((0, 3))).mean(0)


def test_non_numbers_are_refused_not_converted():
    """NumPy would turn None into NaN, drop an imaginary part and parse "2" as 2.0."""
    x = Tensor(np.ones(3))
    for bad in (None, 1j, np.array([1j, 2.0, 3.0]), "2"):
        with pytest.raises(TypeError, match=r"must be real numbers \(float, integer or bool\), got .* of dtype"):
            x + bad
    with pytest.raises(TypeError, match="must be real numbers"):
        nt.masked_fill(x, np.array([True, False, True]), None)
    with pytest.raises(TypeError, match="must be real numbers"):
        Tensor(None, dtype=np.float64)
    assert_close("x + 2 (an integer constant)", (x + 2).data, np.full(3, 3.0), EXACT)
    assert_close("x * True (a boolean constant)", (x * True).data, np.ones(3), EXACT)


def test_truth_value_follows_numpy():
    """Without `__bool__`, Python used `__len__`: Tensor([0.0]) was true, Tensor(zeros(3)) too."""
    assert not Tensor([0.0]) and Tensor([2.0]) and not Tensor(0.0), "a one-element tensor is true iff nonzero"
    with pytest.raises(ValueError, match="ambiguous"):
        bool(Tensor(np.zeros(3)))


def test_pow_gradient_at_zero_follows_torch():
    """d(a^p)/da = 0 where p = 0 (a^0 = 1 is flat, even at a = 0: not 0 * 0^-1 = NaN), and
    d(a^p)/dp = 0 where a = 0 and p >= 0; torch's pow_backward_self / pow_backward_exponent."""
    a = Tensor(np.array([0.0, 0.0, 0.0, 2.0]), requires_grad=True)
    p = Tensor(np.array([0.0, 1.0, 2.0, 0.0]), requires_grad=True)
    (a ** p).backward(np.array([1.0, 2.0, 3.0, 4.0]))
    assert_close("d(a^p)/da", a.grad, np.array([0.0, 2.0, 0.0, 0.0]), EXACT)
    assert_close("d(a^p)/dp", p.grad, np.array([0.0, 0.0, 0.0, 4.0 * np.log(2.0)]), EXACT)
    x = Tensor(np.array([0.0, -1.5, 3.0]), requires_grad=True)
    (x ** 0).sum().backward()
    assert_close("d(x^0)/dx", x.grad, np.zeros(3), EXACT)


def test_max_gradient_propagates_nan():
    """A NaN makes its slice's max NaN: that slice's gradient is NaN (as torch.amax's), not a
    silent zero; the other slices are untouched, ties shared evenly."""
    x = Tensor(np.array([[1.0, np.nan, 3.0], [4.0, 4.0, 2.0]]), requires_grad=True)
    x.max(axis=1).backward(np.array([2.0, 3.0]))
    assert_close("max gradient with a NaN in row 0", x.grad, np.array([[np.nan] * 3, [1.5, 1.5, 0.0]]), EXACT)


@pytest.mark.parametrize("ops", [FUSED, COMPOSED], ids=lambda ops: ops.name)
def test_autograd_model_refuses_unknown_or_misshaped_dropout_masks(ops):
    """gpt_forward_autograd once ignored a mis-typed mask key (no dropout at all) and broadcast a
    (1, T, C) mask; it now refuses both as numpy_ref/model.py does."""
    cfg = GPTConfig(vocab_size=7, context_length=4, emb_dim=4, n_heads=2, n_layers=1, drop_rate=0.2)
    model = GPTModel(cfg, seed=0)
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    masks = model.dropout_masks(2, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"unknown dropout mask 'h.0.attn.weight'"):
        autograd_loss_and_grads(ops, model.params, ids, ids, cfg, dropout_masks={"h.0.attn.weight": masks["h.0.attn.weights"]})
    with pytest.raises(ValueError, match=r"dropout mask 'embedding' has shape \(1, 3, 4\); expected \(2, 3, 4\)"):
        autograd_loss_and_grads(ops, model.params, ids, ids, cfg, dropout_masks={"embedding": masks["embedding"][:1]})


@given(shape=shapes(min_dims=1, max_dims=3, max_side=4), axis_seed=seeds(), seed=seeds())
def test_gradcheck_softmax_along_any_axis(shape, axis_seed, seed):
    axis = int(np.random.default_rng(axis_seed).integers(-len(shape), len(shape)))
    x = values(seed, shape)
    gradcheck(lambda t: nf.softmax(t, axis=axis), [x], upstream_seed=seed, **TOL)
    gradcheck(lambda t: nf.log_softmax(t, axis=axis), [x], upstream_seed=seed, **TOL)


# ---- from a review of the engine and gradcheck -------------------------------------------------


def _identity_op(backward_scale: float):
    """f(x) = x as one engine op whose backward returns backward_scale * g (1.0 is right)."""
    return lambda x: nt.custom_op(lambda a: (a.copy(), None), lambda g, _cache: (backward_scale * g,), x)


@pytest.mark.parametrize("scale", [1e8, 1e11, -3e13])
def test_gradcheck_steps_relative_to_large_inputs(scale):
    """A fixed step of 1e-6 vanished in x = 1e11's rounding (x + 1e-6 == x): every numerical
    gradient was 0, a backward returning zeros passed and the right one failed; at 1e8 the
    rounded step made the estimate 5% off."""
    x = np.array([1.0, 2.0, 3.0]) * scale
    gradcheck(_identity_op(1.0), [x])
    with pytest.raises(AssertionError, match="analytic 0.0 vs numerical"):
        gradcheck(_identity_op(0.0), [x])


def test_gradcheck_refuses_to_pass_gradients_smaller_than_its_atol():
    """f = 1e-7 x^2: a zero or a negated backward passed under atol = 1e-6."""
    x = np.array([0.3, -1.2, 2.0])
    for sign in (0.0, -1.0):
        def tiny(t, sign=sign):  # 1e-7 x^2, its backward scaled by `sign`
            return nt.custom_op(lambda a: (1e-7 * a * a, a), lambda g, a: (sign * 2e-7 * a * g,), t)
        with pytest.raises(ValueError, match=r"numerical gradient is at most .* within atol=1.0e-06"):
            gradcheck(tiny, [x])
    gradcheck(lambda t: t * t * 1e-7, [x], atol=1e-12)  # right, and checkable with an atol under the gradients


def test_gradcheck_needs_a_real_float_input():
    with pytest.raises(ValueError, match="no float input to differentiate"):
        gradcheck(nf.gelu, [np.arange(5)])
    with pytest.raises(ValueError, match="no float input to differentiate"):
        gradcheck_vjp(lambda a: a * 2, lambda g: (None,), [np.array([True, False])])
    with pytest.raises(TypeError, match="complex128"):
        gradcheck(lambda t: t, [np.array([1.0 + 2.0j])])


def test_index_condition_and_mask_arrays_changed_after_the_forward_leave_the_gradient_alone():
    """The engine kept the caller's index, condition and take_along_axis arrays by reference:
    changed before backward (a reused buffer), the gradient went elsewhere."""
    for build, expected in (
            (lambda x, arr: x[arr], [1.0, 1.0, 0.0, 0.0]),
            (lambda x, arr: nt.take_along_axis(x, arr, 0), [1.0, 1.0, 0.0, 0.0]),
            (lambda x, arr: nt.where(arr, x, 0.0), [1.0, 0.0, 1.0, 0.0])):
        x = Tensor(np.arange(4.0), requires_grad=True)
        arr = np.array([True, False, True, False]) if "where" in build.__code__.co_names else np.array([0, 1])
        y = build(x, arr)
        arr[...] = 3 if arr.dtype != bool else False
        y.sum().backward()
        assert np.array_equal(x.grad, expected), f"gradient {x.grad} after the caller changed its array; expected {expected}"


def test_comparisons_iteration_and_bool_axes_are_refused_as_numpy_refuses_them():
    """x == 0 was False for any x (identity), list(0-d tensor) was [] and axis=True summed axis 1."""
    x = Tensor(np.ones((2, 3)))
    for compare in (lambda: x == 0, lambda: x != x.detach(), lambda: np.zeros(3) == x):
        with pytest.raises(TypeError, match="not supported"):
            compare()
    assert {x} == {x} and len({x, Tensor(np.ones(1))}) == 2, "Tensors hash by identity"
    with pytest.raises(TypeError, match="iteration over a 0-d tensor"):
        list(Tensor(5.0))
    assert [r.shape for r in x] == [(3,), (3,)], "iterating a 2-D tensor gives its rows"
    for reduce in (x.sum, x.mean, x.max):
        with pytest.raises(TypeError, match="axis True must be an integer"):
            reduce(axis=True)


def test_concatenate_names_an_axis_it_cannot_take():
    """axis=None gave "tuple indices must be integers" from inside the engine."""
    a, b = Tensor(np.ones((2, 3))), Tensor(np.ones((2, 2)))
    assert nt.concatenate([a, b], axis=-1).shape == (2, 5)
    with pytest.raises(TypeError, match="axis=None is not supported"):
        nt.concatenate([a, b], axis=None)
    with pytest.raises(TypeError, match="axis True must be an integer"):
        nt.concatenate([a, b], axis=True)


@pytest.mark.parametrize("ops", [FUSED, COMPOSED], ids=["fused", "composed"])
def test_refilling_the_id_and_target_buffers_before_backward_moves_no_gradient(ops):
    """The engine copies its index arrays; the fused embedding and cross-entropy kept the caller's
    ids and targets by reference, so a data loader refilling its buffer before the backward sent
    the gradient to other rows of wte and other classes (the composed ones did not)."""
    cfg = GPTConfig(vocab_size=16, context_length=4, emb_dim=8, n_layers=1, n_heads=2)
    params = GPTModel(cfg, seed=0).params
    ids, targets = np.array([[1, 2, 3]]), np.array([[4, 5, 6]])
    _, _, expected = autograd_loss_and_grads(ops, params, ids.copy(), targets.copy(), cfg)
    from numpy_ref.autograd_layers import gpt_forward_autograd

    leaves = {name: Tensor(value, requires_grad=True) for name, value in params.items()}
    _, loss = gpt_forward_autograd(ops, leaves, ids, cfg, targets)
    ids[...] = 0
    targets[...] = 0
    loss.backward()
    for name, want in expected.items():
        assert np.array_equal(leaves[name].grad, want), f"{ops.name}: {name}'s gradient moved with the refilled buffers"


def test_hand_written_layers_keep_their_own_ids_and_targets():
    """The hand-written layers' backwards (numpy_ref's GPTModel chains them) read the ids and
    targets their forwards saw, not the caller's buffer."""
    from numpy_ref.cross_entropy import cross_entropy_backward
    from numpy_ref.embedding import embedding_backward, embedding_forward

    model = GPTModel(GPTConfig(vocab_size=16, context_length=4, emb_dim=8, n_layers=1, n_heads=2), seed=0)
    ids, targets = np.array([[1, 2, 3]]), np.array([[4, 5, 6]])

    _, cache = embedding_forward(ids, model.params["wte.weight"], model.params["wpe.weight"])
    _, ce_cache = cross_entropy_forward(np.zeros((1, 3, 16)), targets)
    ids[...] = 0
    targets[...] = 0
    dwte, _ = embedding_backward(np.ones((1, 3, 8)), cache)
    assert np.array_equal(np.flatnonzero(dwte.any(axis=1)), [1, 2, 3]), "embedding_backward read the refilled ids"
    dlogits = cross_entropy_backward(1.0, ce_cache)
    assert np.array_equal(dlogits.reshape(3, 16).argmin(axis=1), [4, 5, 6]), "cross_entropy_backward read the refilled targets"


def test_leaf_gradients_are_fresh_writable_arrays():
    """A leaf's .grad is its own array: never the caller's G, nor the read-only broadcast view a
    sum's backward makes (an in-place clip or optimizer step would corrupt G, or fail)."""
    x = Tensor(np.zeros(3), requires_grad=True)
    G = np.ones(3)
    (x + 0.0).backward(G)
    assert x.grad is not G and not np.shares_memory(x.grad, G), "x.grad is the caller's upstream gradient"
    x.grad *= 2.0  # must not write into G
    assert np.array_equal(G, np.ones(3)), f"clipping x.grad changed G to {G}"
    y = Tensor(np.zeros(3), requires_grad=True)
    y.sum().backward()
    assert y.grad.flags.writeable, "y.grad after .sum() is a read-only view"


def test_gradcheck_vjp_refuses_an_upstream_of_the_wrong_shape():
    """A 0-d G broadcast into an all-ones cotangent, which cannot catch a permuted gradient."""
    x = np.arange(3.0)
    with pytest.raises(ValueError, match=r"G has shape \(\); the output has shape \(3,\)"):
        gradcheck_vjp(lambda a: a * 2, lambda G: (2 * G * np.ones(3),), [x], G=np.array(1.0))


def test_binary_cross_entropy_and_dropout_refuse_values_torch_refuses():
    with pytest.raises(ValueError, match=r"target 5.0 at \(0,\) is outside \[0, 1\]"):
        nf.binary_cross_entropy(Tensor(np.array([0.3])), np.array([5.0]))
    with pytest.raises(ValueError, match=r"target nan at \(1,\) is outside \[0, 1\]"):
        nf.binary_cross_entropy(Tensor(np.array([0.3, 0.4])), np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match=r"mask value 1e-09 at \(0,\) is neither 0 nor 1/\(1-p\)"):
        nf.dropout(Tensor(np.ones(2)), 0.5, np.array([1e-9, 2.0]))
    kept = nf.dropout(Tensor(np.ones(2)), 0.1, np.array([0.0, 1 / 0.9], dtype=np.float32))  # float32 rounding of 1/(1-p)
    assert kept.data[0] == 0.0, f"dropped element is {kept.data[0]}"


@pytest.mark.parametrize("array_shape, index_shape", [((1, 5), (3, 2)), ((3, 5), (1, 2))],
                         ids=["array-broadcast", "indices-broadcast"])
def test_gradcheck_take_along_axis_broadcasting_between_array_and_indices(array_shape, index_shape):
    """NumPy broadcasts the non-axis sizes of the array and the indices against each other; the
    backward must sum the gradient back to the array's size-1 axes (the drawn cases never do this)."""
    indices = np.random.default_rng(0).integers(0, array_shape[1], size=index_shape)
    gradcheck(lambda t: nt.take_along_axis(t, indices, 1), [values(1, array_shape)], upstream_seed=1, **TOL)
