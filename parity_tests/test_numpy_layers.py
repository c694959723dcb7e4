"""numpy_ref's layers on their own: every hand-derived backward against float64 central
differences (a random upstream gradient, never `.sum()`), and the properties each layer must have.

Inputs come from the shared layer table (parity_tests/layer_specs.py) on hypothesis-drawn sizes,
plus the variants the table does not cover (no bias, dropout masks, ignore_index, a position
offset, the whole block).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from numpy_ref import functional as nf
from numpy_ref.attention import attention_backward, attention_forward
from numpy_ref.block import block_backward, block_forward
from numpy_ref.config import GPTConfig
from numpy_ref.cross_entropy import cross_entropy_backward, cross_entropy_forward
from numpy_ref.embedding import embedding_backward, embedding_forward
from numpy_ref.gelu import gelu_backward, gelu_forward
from numpy_ref.gradcheck import gradcheck_vjp
from numpy_ref.layernorm import layernorm_forward
from numpy_ref.linear import linear_backward, linear_forward
from numpy_ref.params import block_param_shapes
from numpy_ref.tensor import Tensor
from parity_tests.compare import assert_close
from parity_tests.layer_specs import SPECS, Sizes
from parity_tests.oracle import sizes
from parity_tests.strategies import random_array, seeds
from parity_tests.tolerances import GRADCHECK, Tol, forward_tol

FD = dict(atol=GRADCHECK.atol, rtol=GRADCHECK.rtol)
EXACT = Tol(0.0, 0.0, "the same arithmetic on the same values must give the same bits")
small_sizes = sizes(max_batch=2, max_time=5, max_heads=3, max_head_size=4)


def _check_pair(forward, backward, args: dict, differentiable: tuple[str, ...], seed: int, scalar: bool = False):
    """Finite differences of `forward` over the differentiable args against `backward`."""
    names = list(differentiable)
    static = {k: v for k, v in args.items() if k not in names}

    def f(*arrays):
        return np.asarray(forward(**static, **dict(zip(names, arrays)))[0])

    out, cache = forward(**args)
    G = np.asarray(1.3) if scalar else np.random.default_rng(seed).standard_normal(np.shape(out))
    grads = backward(G, cache)
    grads = grads if isinstance(grads, tuple) else (grads,)
    assert len(grads) == len(names), f"{forward.__name__}: {len(grads)} gradients for {names}"
    gradcheck_vjp(f, lambda _G: grads, [args[n] for n in names], G, **FD)


# ---- finite differences, every layer in the shared table ---------------------------------------


@pytest.mark.parametrize("name", sorted(SPECS))
@settings(max_examples=6)
@given(s=small_sizes, seed=seeds())
def test_layer_backward_matches_finite_differences(name, s, seed):
    spec = SPECS[name]
    forward, backward = spec.numpy_pair()
    args = spec.make_inputs(np.random.default_rng(seed), s)
    if name == "embedding":  # ids are not differentiable; the backward returns (dwte, dwpe)
        _check_pair(forward, backward, args, ("wte", "wpe"), seed)
        return
    _check_pair(forward, backward, args, spec.differentiable, seed, scalar=spec.scalar_output)


@settings(max_examples=6)
@given(s=small_sizes, seed=seeds(), with_mask=st.booleans())
def test_attention_without_bias_and_with_dropout_mask(s, seed, with_mask):
    rng = np.random.default_rng(seed)
    args = SPECS["attention"].make_inputs(rng, s)
    args["attn_dropout_mask"] = (rng.random((s.B, s.nh, s.T, s.T)) >= 0.3) / 0.7 if with_mask else None

    def forward(x, w_attn, w_proj, b_proj, n_heads, attn_dropout_mask):
        return attention_forward(x, w_attn, None, w_proj, b_proj, n_heads, attn_dropout_mask)

    def backward(dout, cache):
        dx, dwa, dba, dwp, dbp = attention_backward(dout, cache)
        assert dba is None, "attention without b_attn must return db_attn None"
        return dx, dwa, dwp, dbp

    del args["b_attn"]
    _check_pair(forward, backward, args, ("x", "w_attn", "w_proj", "b_proj"), seed)


@settings(max_examples=6)
@given(s=small_sizes, seed=seeds())
def test_linear_without_bias(s, seed):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((s.B, s.T, s.C)), rng.standard_normal((s.C, s.C + 2))

    def backward(dout, cache):
        dx, dw, db = linear_backward(dout, cache)
        assert db is None, "linear without a bias must return db None"
        return dx, dw

    _check_pair(lambda x, w: linear_forward(x, w, None), backward, dict(x=x, w=w), ("x", "w"), seed)


@settings(max_examples=6)
@given(s=small_sizes, seed=seeds(), offset=st.integers(0, 3))
def test_embedding_with_position_offset(s, seed, offset):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, s.V, (s.B, s.T))
    wte, wpe = rng.standard_normal((s.V, s.C)), rng.standard_normal((s.T + offset, s.C))
    out, _ = embedding_forward(ids, wte, wpe, pos_offset=offset)
    assert_close("embedding with offset", out, wte[ids] + wpe[offset:offset + s.T], EXACT)
    _check_pair(lambda wte, wpe: embedding_forward(ids, wte, wpe, offset), embedding_backward,
                dict(wte=wte, wpe=wpe), ("wte", "wpe"), seed)


@settings(max_examples=6)
@given(s=small_sizes, seed=seeds())
def test_cross_entropy_with_ignore_index(s, seed):
    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.standard_normal((s.B, s.T, s.V))
    targets = rng.integers(0, s.V, (s.B, s.T))
    ignored = rng.random((s.B, s.T)) < 0.4
    ignored.flat[0] = False  # at least one target counts
    targets[ignored] = -100
    loss, cache = cross_entropy_forward(logits, targets, ignore_index=-100)
    # The mean over counted targets only, written the slow way.
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    counted = np.argwhere(~ignored)
    expected = -np.mean([logp[b, t, targets[b, t]] for b, t in counted])
    assert_close("cross-entropy with ignore_index", loss, expected, forward_tol("float64"))
    dlogits = cross_entropy_backward(1.0, cache)
    assert_close("dlogits on ignored rows", dlogits[ignored], np.zeros_like(dlogits[ignored]), EXACT)
    _check_pair(lambda logits: cross_entropy_forward(logits, targets, -100), cross_entropy_backward,
                dict(logits=logits), ("logits",), seed, scalar=True)


@settings(max_examples=4)
@given(s=small_sizes, seed=seeds(), qkv_bias=st.booleans(), dropout=st.booleans())
def test_block_backward_matches_finite_differences(s, seed, qkv_bias, dropout):
    config = GPTConfig(vocab_size=5, context_length=s.T, emb_dim=s.C, n_heads=s.nh, n_layers=1, drop_rate=0.0,
                       qkv_bias=qkv_bias)
    rng = np.random.default_rng(seed)
    names = [n for n, _ in block_param_shapes(config)]
    p = {n: 0.5 * rng.standard_normal(shape) + (1.0 if n.endswith("ln_1.weight") else 0.0)
         for n, shape in block_param_shapes(config)}
    masks = {}
    if dropout:
        masks = {"attn.weights": (rng.random((s.B, s.nh, s.T, s.T)) >= 0.5) * 2.0,
                 "attn.out": (rng.random((s.B, s.T, s.C)) >= 0.5) * 2.0,
                 "mlp.out": (rng.random((s.B, s.T, s.C)) >= 0.5) * 2.0}
    x = rng.standard_normal((s.B, s.T, s.C))

    def forward(x, *values):
        return block_forward(x, dict(zip(names, values)), config, masks)

    def backward(dout, cache):
        dx, g = block_backward(dout, cache)
        assert sorted(g) == sorted(names), f"block gradients {sorted(g)} != parameters {sorted(names)}"
        return (dx, *(g[n] for n in names))

    G = rng.standard_normal((s.B, s.T, s.C))
    _, cache = forward(x, *p.values())
    grads = backward(G, cache)
    gradcheck_vjp(lambda *a: forward(*a)[0], lambda _G: grads, [x, *p.values()], G, **FD)


# ---- properties ------------------------------------------------------------------------------


@given(s=sizes(), seed=seeds())
def test_attention_rows_sum_to_one_and_are_causal(s, seed):
    args = SPECS["attention"].make_inputs(np.random.default_rng(seed), s)
    _, cache = attention_forward(**args)
    att = cache["att"]
    assert att.shape == (s.B, s.nh, s.T, s.T), f"attention weights shape {att.shape}"
    assert_close("attention row sums", att.sum(-1), np.ones((s.B, s.nh, s.T)), forward_tol("float64"))
    future = np.triu(np.ones((s.T, s.T), dtype=bool), k=1)
    assert_close("attention weight on future keys", att[..., future], np.zeros_like(att[..., future]), EXACT)


@given(s=sizes(), seed=seeds(), data=st.data())
def test_attention_output_at_t_ignores_later_inputs(s, seed, data):
    args = SPECS["attention"].make_inputs(np.random.default_rng(seed), s)
    t = data.draw(st.integers(0, s.T - 1), label="t")
    out, _ = attention_forward(**args)
    changed = dict(args, x=args["x"].copy())
    changed["x"][:, t + 1:] += 5.0
    out2, _ = attention_forward(**changed)
    assert_close(f"attention out[:, :{t + 1}] after changing x past {t}", out2[:, :t + 1], out[:, :t + 1], EXACT)


@given(s=sizes(), seed=seeds(), shift=st.floats(-50, 50))
def test_layernorm_is_invariant_to_shifting_each_row(s, seed, shift):
    args = SPECS["layernorm"].make_inputs(np.random.default_rng(seed), s)
    out, _ = layernorm_forward(**args)
    row_shift = shift * np.random.default_rng(seed + 1).random((s.B, s.T, 1))  # a different shift per row
    shifted, _ = layernorm_forward(**dict(args, x=args["x"] + row_shift))
    assert_close("layernorm(x + c) vs layernorm(x)", shifted, out, Tol(1e-9, 1e-8, "rounding of x + c at |c| <= 50"))


@given(s=sizes(), seed=seeds())
def test_layernorm_uses_the_biased_variance_and_eps_inside_the_root(s, seed):
    args = SPECS["layernorm"].make_inputs(np.random.default_rng(seed), s)
    x, w, b, eps = args["x"], args["w"], args["b"], 0.25  # a large eps so its place shows
    out, _ = layernorm_forward(x, w, b, eps)
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, ddof=0, keepdims=True) + eps) * w + b
    assert_close("layernorm vs (x - mean) / sqrt(var_biased + eps)", out, expected, forward_tol("float64"))


@given(s=sizes(), seed=seeds())
def test_all_ones_dropout_mask_is_bitwise_the_same_as_none(s, seed):
    args = SPECS["attention"].make_inputs(np.random.default_rng(seed), s)
    out, cache = attention_forward(**args)
    out1, cache1 = attention_forward(**args, attn_dropout_mask=np.ones((s.B, s.nh, s.T, s.T)))
    assert_close("attention with an all-ones mask", out1, out, EXACT)
    G = np.random.default_rng(seed).standard_normal(out.shape)
    for name, a, b in zip(["dx", "dw_attn", "db_attn", "dw_proj", "db_proj"], attention_backward(G, cache1),
                          attention_backward(G, cache)):
        assert_close(f"attention {name} with an all-ones mask", a, b, EXACT)


# GPT-2's tanh GELU and its derivative, 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3),
# computed with mpmath at 800 digits (mp.tanh, exact decimal 0.044715) and rounded to 17 digits.
# The negative tail is where `1 + tanh(u)` cancels in floating point: the old form gave
# exactly 0 from about x = -7.2 on (float64), and kept half its digits at x = -6.
GELU_REFERENCE = [  # (x, gelu(x), gelu'(x))
    (-20.0, -3.3754509563109673e-261, -2.9424328724945029e-259),
    (-12.0, -1.6359854493534811e-61, -5.2904033525225585e-60),
    (-9.0, -1.3364595947348725e-28, -2.5157352850674252e-27),
    (-6.0, -8.4396467007622971e-11, -7.7099739309536955e-10),
    (-4.0, -7.024594819237269e-5, -0.00033512319712267076),
    (-3.0, -0.0036373920817730188, -0.011584166630969726),
    (-1.0, -0.1588080093917233, -0.082964083845782555),
    (0.5, 0.34571400982514392, 0.86736990353464231),
    (1.0, 0.8411919906082767, 1.0829640838457826),
    (3.0, 2.996362607918227, 1.0115841666309697),
]


def test_gelu_matches_high_precision_values_in_both_tails():
    """Relative error within a few ulp times the function's own condition number: a relative
    error eps in u moves e^(2u) by 2|u| eps, which no float64 evaluation can avoid."""
    x = np.array([r[0] for r in GELU_REFERENCE])
    out, cache = gelu_forward(x)
    dx = gelu_backward(np.ones_like(x), cache)
    xe = Tensor(x.copy(), requires_grad=True)  # the engine's gelu, composed from primitives
    ye = nf.gelu(xe)
    ye.backward(np.ones_like(x))
    u = np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)
    rtol = 8 * (1 + 2 * np.abs(u)) * np.finfo(np.float64).eps
    for name, got, column in [("gelu", out, 1), ("gelu'", dx, 2), ("engine gelu", ye.data, 1),
                              ("engine gelu'", xe.grad, 2)]:
        want = np.array([r[column] for r in GELU_REFERENCE])
        rel = np.abs(got - want) / np.abs(want)
        worst = int(np.argmax(rel / rtol))
        assert np.all(rel <= rtol), (f"{name}({x[worst]}) = {got[worst]!r}, expected {want[worst]!r}: relative error "
                                     f"{rel[worst]:.3g} > {rtol[worst]:.3g}")


# Inputs where the tanh saturates (t = +-1 exactly, so 1 - t^2 = 0) while x (1 + 3 a x^2) or x^2
# overflows, and the gradient torch 2.13.0's tanh-GELU backward gives there (dout = 1): 1 for
# x > 0, 0 for x < 0, NaN only where x^2 itself overflows (its du/dx is inf, and inf * 0).
GELU_SATURATED = {
    "float32": ([-1e20, -3e13, -1.5e13, -1e6, 1e6, 1.5e13, 3e13, 1e19, 1e20],
                [np.nan, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, np.nan]),
    "float64": ([-1e160, -3e103, -1.5e103, -1e6, 1e6, 1.5e103, 3e103, 1e150, 1e160],
                [np.nan, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, np.nan]),
}


@pytest.mark.parametrize("dtype", sorted(GELU_SATURATED))
def test_gelu_backward_where_the_tanh_saturates(dtype):
    """Multiplying the huge du/dx in before the exact 0 of (1 - t^2) gave inf * 0 = NaN from
    |x| ~ 1.5e13 in float32 (1e103 in float64); dx must be dout for large positive x and 0 for
    large negative x, as in torch."""
    x, expected = (np.array(v, dtype=dtype) for v in GELU_SATURATED[dtype])
    dout = np.linspace(0.5, 2.0, x.size).astype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # x^2 = inf and inf * 0 at the ends, as in torch
        out, cache = gelu_forward(x)
        dx = gelu_backward(dout, cache)
    assert_close(f"gelu_forward where the tanh saturates ({dtype})", out, np.where(x > 0, x, 0.0), EXACT)
    assert_close(f"gelu_backward where the tanh saturates ({dtype}), dout = {dout}", dx, expected * dout, EXACT)


@given(s=sizes(), seed=seeds())
def test_embedding_scatter_accumulates_repeated_ids(s, seed):
    rng = np.random.default_rng(seed)
    ids = np.full((s.B, s.T), rng.integers(0, s.V))  # one id everywhere: its row collects every position
    wte, wpe = rng.standard_normal((s.V, s.C)), rng.standard_normal((s.Tc, s.C))
    _, cache = embedding_forward(ids, wte, wpe)
    G = rng.standard_normal((s.B, s.T, s.C))
    dwte, dwpe = embedding_backward(G, cache)
    expected = np.zeros_like(wte)
    expected[ids[0, 0]] = G.sum(axis=(0, 1))
    assert_close("dwte with one repeated id", dwte, expected, forward_tol("float64"))
    expected_pe = np.zeros_like(wpe)
    expected_pe[:s.T] = G.sum(axis=0)
    assert_close("dwpe", dwpe, expected_pe, forward_tol("float64"))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_float32_stays_float32(name):
    spec = SPECS[name]
    args = spec.make_inputs(np.random.default_rng(0), Sizes())
    args = {k: (v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v)
            for k, v in args.items()}
    forward, backward = spec.numpy_pair()
    out, cache = forward(**args)
    assert np.asarray(out).dtype == np.float32, f"{name}_forward returned {np.asarray(out).dtype} for float32 inputs"
    G = np.float32(1.0) if spec.scalar_output else random_array(1, np.shape(out), dtype=np.float32)
    grads = backward(G, cache)
    for i, g in enumerate(grads if isinstance(grads, tuple) else (grads,)):
        assert g is None or g.dtype == np.float32, f"{name}_backward gradient {i} is {g.dtype}, not float32"


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ids, error, match", [
    (np.array([[0.0, 1.0]]), TypeError, "float64"),
    (np.array([0, 1]), ValueError, r"\(2,\)"),
    (np.array([[0, -1]]), ValueError, r"-1 at position \(batch 0, time 1\).*\[0, 5\)"),
    (np.array([[0, 5]]), ValueError, r"token id 5 .*\[0, 5\)"),
    (np.zeros((1, 4), dtype=np.int64), ValueError, "T=4 exceeds the context length 3"),
    (np.zeros((1, 0), dtype=np.int64), ValueError, r"\(1, 0\)"),
    (np.zeros((0, 2), dtype=np.int64), ValueError, r"\(0, 2\)"),
])
def test_embedding_rejects_bad_ids_naming_the_value(ids, error, match):
    with pytest.raises(error, match=match):
        embedding_forward(ids, np.zeros((5, 2)), np.zeros((3, 2)))


def test_cross_entropy_bad_targets():
    logits = np.zeros((1, 2, 3))
    with pytest.raises(ValueError, match=r"target 3 at position \(0, 1\).*\[0, 3\)"):
        cross_entropy_forward(logits, np.array([[0, 3]]))
    with pytest.raises(ValueError, match=r"target -2"):
        cross_entropy_forward(logits, np.array([[-2, 0]]), ignore_index=-100)
    with pytest.raises(ValueError, match="ignore_index=-100"):
        cross_entropy_forward(logits, np.array([[-100, -100]]), ignore_index=-100)
    with pytest.raises(TypeError, match="float64"):
        cross_entropy_forward(logits, np.array([[0.0, 1.0]]))


def test_attention_rejects_a_mask_of_the_wrong_shape():
    args = SPECS["attention"].make_inputs(np.random.default_rng(0), Sizes())
    with pytest.raises(ValueError, match="mask has shape"):
        attention_forward(**args, attn_dropout_mask=np.ones((1, 1, 1, 1)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_embedding_backward_equals_element_by_element_scatter_add(dtype):
    """The grouped (sort + reduceat) scatter-add is np.add.at's sum, with ids repeated many times.

    Only the summation order may differ, so each element must agree to within a few roundings of
    the sum of the magnitudes it adds up."""
    from numpy_ref.embedding import embedding_backward, embedding_forward

    rng = np.random.default_rng(5)
    V, Tc, C, B, T = 11, 16, 8, 3, 16
    wte, wpe = rng.standard_normal((V, C)).astype(dtype), rng.standard_normal((Tc, C)).astype(dtype)
    ids = rng.integers(0, 4, size=(B, T))  # only ids 0..3: every one repeats ~12 times; 4..10 never occur
    _, cache = embedding_forward(ids, wte, wpe)
    dout = rng.standard_normal((B, T, C)).astype(dtype)
    dwte, _ = embedding_backward(dout, cache)
    expect, magnitude = np.zeros((V, C), dtype=np.float64), np.zeros((V, C), dtype=np.float64)
    np.add.at(expect, ids.reshape(-1), dout.reshape(-1, C).astype(np.float64))
    np.add.at(magnitude, ids.reshape(-1), np.abs(dout.reshape(-1, C)).astype(np.float64))
    assert dwte.dtype == dtype, f"dwte dtype {dwte.dtype}, expected {dtype}"
    assert np.all(dwte[4:] == 0), "rows of ids that never occur must stay exactly zero"
    allowed = 4 * np.finfo(dtype).eps * magnitude
    bad = np.argwhere(np.abs(dwte - expect) > allowed)
    assert bad.size == 0, (f"dwte differs from the scatter-add at (row, col) {bad[0].tolist()}: "
                           f"{dwte[tuple(bad[0])]!r} vs {expect[tuple(bad[0])]!r} (allowed {allowed[tuple(bad[0])]:.2e})")


@pytest.mark.parametrize("call, error, match", [
    # A (1,) bias or gain broadcasts silently in NumPy, and its gradient would come back (C,).
    (lambda: linear_forward(np.ones((2, 3, 4)), np.ones((4, 5)), np.ones(1)), ValueError,
     r"linear: bias has shape \(1,\); the weight \(4, 5\) needs \(5,\)"),
    (lambda: layernorm_forward(np.ones((2, 3, 4)), np.ones(1), np.zeros(4)), ValueError,
     r"layernorm: w \(1,\) and b \(4,\) must both be \(4,\)"),
    (lambda: attention_forward(np.ones((3, 6)), np.ones((6, 18)), None, np.ones((6, 6)), np.ones(6), 2), ValueError,
     r"x must be \(B, T, C\), got shape \(3, 6\)"),
    (lambda: attention_forward(np.ones((1, 3, 6)), np.ones((6, 18)), None, np.ones((6, 6)), np.ones(6), 0),
     ValueError, "n_heads must be >= 1, got 0"),
    (lambda: attention_forward(np.ones((1, 3, 6)), np.ones((6, 18)), None, np.ones((6, 6)), np.ones(6), 2.0),
     TypeError, "n_heads must be an int, got 2.0"),
    (lambda: attention_forward(np.ones((1, 3, 6)), np.ones((6, 12)), None, np.ones((6, 6)), np.ones(6), 2),
     ValueError, r"w_attn \(6, 12\) and w_proj \(6, 6\) must be \(6, 18\) and \(6, 6\)"),
    (lambda: embedding_forward(np.zeros((1, 2), dtype=np.int64), np.zeros((5, 2)), np.zeros((3, 2)), pos_offset=-1),
     ValueError, "pos_offset .* must be an int >= 0, got -1"),
    (lambda: cross_entropy_forward(np.zeros((0, 3, 5)), np.zeros((0, 3), dtype=np.int64)), ValueError,
     r"no targets \(shape \(0, 3\)\)"),
], ids=["linear-bias", "layernorm-w", "attention-x", "attention-nh0", "attention-nh-float", "attention-w_attn",
        "embedding-offset", "cross_entropy-empty"])
def test_layers_reject_wrong_shapes_naming_them(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("V", [1, 2])
@pytest.mark.parametrize("ignored", ["none", "all but one"])
def test_cross_entropy_backward_at_tiny_vocabularies_and_one_counted_target(V, ignored):
    rng = np.random.default_rng(V)
    logits = 2.0 * rng.standard_normal((2, 3, V))
    targets = rng.integers(0, V, (2, 3))
    if ignored == "all but one":
        targets[:] = -100
        targets[1, 2] = V - 1
    _check_pair(lambda logits: cross_entropy_forward(logits, targets, -100), cross_entropy_backward,
                dict(logits=logits), ("logits",), seed=V, scalar=True)


@pytest.mark.parametrize("T", [1, 3])
def test_attention_backward_with_an_all_zero_dropout_mask(T):
    """Every attention weight dropped: out is b_proj alone, so every gradient but db_proj must be
    exactly what finite differences see (zero), at T = 1 too."""
    rng = np.random.default_rng(T)
    args = SPECS["attention"].make_inputs(rng, Sizes(B=2, T=T, nh=2, hs=3))
    args["attn_dropout_mask"] = np.zeros((2, 2, T, T))
    _check_pair(attention_forward, attention_backward, args, SPECS["attention"].differentiable, seed=T)


@pytest.mark.parametrize("dtype, scale", [(np.float64, 1e160), (np.float64, 1e300), (np.float32, 1e20),
                                          (np.float32, 1e35)])
def test_layer_norm_of_rows_whose_squares_overflow_is_the_scale_free_answer(dtype, scale):
    """(x - mu)^2 overflowed: var was inf, xhat 0 and the output the bias, silently (and dx 0),
    where layer norm's answer does not depend on the row's scale. A constant row of the dtype's
    largest values gave NaN; its xhat is 0."""
    from numpy_ref.layernorm import layernorm_backward, layernorm_forward

    row = np.array([[1.0, -2.0, 3.0, 0.5]])
    w, b = np.array([1.5, 0.5, -1.0, 2.0]), np.array([0.1, 0.2, 0.3, 0.4])
    want, cache = layernorm_forward(row, w, b, eps=0.0)  # the scale-free answer (eps is negligible at scale)
    want_dx = layernorm_backward(np.ones_like(row), cache)[0] / scale  # dx scales as 1 / scale
    big = (row * scale).astype(dtype)
    got, cache = layernorm_forward(big, w.astype(dtype), b.astype(dtype), eps=1e-5)
    got_dx = layernorm_backward(np.ones_like(big), cache)[0]
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(got, want, rtol=rtol, err_msg=f"layer norm of a row at {scale:g} ({dtype.__name__})")
    np.testing.assert_allclose(got_dx, want_dx, rtol=rtol * 10, err_msg=f"its dx at {scale:g}")
    top = np.full((1, 4), np.finfo(dtype).max, dtype=dtype)
    constant, _ = layernorm_forward(top, w.astype(dtype), b.astype(dtype), eps=1e-5)
    np.testing.assert_array_equal(constant, b.astype(dtype)[None], err_msg="a constant row gives the bias")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("gap", [5.0, 20.0, 46.0])
def test_cross_entropy_of_a_confident_row_keeps_its_digits(dtype, gap):
    """The target leads the other logits by `gap`: the loss is log(1 + r), r = sum e^(z_j - z_y),
    and the target's gradient -r / (1 + r). `log(sum)` rounded 1 + r to 1 (the loss was 0 from
    r < eps: at gap 46 in float64, gap 20 in float32) and `p_y - 1` cancelled the same way. The
    expected values come from Python's float64 math.log1p on r summed in float64."""
    import math

    z = np.array([[0.0, -gap, -gap - 4.0, -gap - 1.5]], dtype=dtype)
    r = sum(math.exp(float(v)) for v in z[0, 1:])
    loss, cache = cross_entropy_forward(z, np.array([0]))
    dz = cross_entropy_backward(1.0, cache)
    rtol = 8 * float(np.finfo(dtype).eps)
    want = {"loss": math.log1p(r), "dz target": -r / (1 + r)}
    got = {"loss": float(loss), "dz target": float(dz[0, 0])}
    for name in want:
        assert abs(got[name] - want[name]) <= rtol * abs(want[name]), (
            f"cross-entropy {name} at gap {gap} ({np.dtype(dtype).name}): {got[name]!r}, expected {want[name]!r}")
    others = [math.exp(float(v)) / (1 + r) for v in z[0, 1:]]
    np.testing.assert_allclose(dz[0, 1:], others, rtol=rtol, err_msg="cross-entropy dz of the other classes")
    assert abs(float(dz.sum())) <= rtol * r, f"cross-entropy dz row sums to {float(dz.sum())!r}, not 0 (r = {r!r})"


@pytest.mark.parametrize("target", [0, 1])
def test_cross_entropy_of_a_row_with_an_infinite_logit_is_nan_as_in_torch(target):
    """The confident-row form set the max's term to 0, then 1, around the sum, which overwrote the
    NaN of inf - inf: the gradient came out finite ([-0, 0, 0]) and, with the target elsewhere,
    the loss inf. Such a row is NaN in loss and gradient, as torch and the old form gave."""
    import torch
    import torch.nn.functional as F

    z = np.array([[np.inf, 0.0, -1.0]])
    loss, cache = cross_entropy_forward(z, np.array([target]))
    dz = cross_entropy_backward(1.0, cache)
    zt = torch.tensor(z, requires_grad=True)
    lt = F.cross_entropy(zt, torch.tensor([target]))
    lt.backward()
    assert np.isnan(float(loss)) and np.isnan(float(lt)), (float(loss), float(lt))
    assert np.isnan(dz).all() == bool(torch.isnan(zt.grad).all()) and np.isnan(dz).any(), (dz, zt.grad)


def test_attention_backward_refuses_a_forward_through_an_empty_kv_cache():
    """Even with P = 0 the saved k and v are views of the cache's buffer: a later decoding call
    overwrites them, and the backward would then be silently wrong."""
    from numpy_ref.kv_cache import LayerKV

    rng = np.random.default_rng(0)
    x, w_attn, w_proj, b_proj = rng.normal(size=(1, 3, 6)), rng.normal(size=(6, 18)), rng.normal(size=(6, 6)), np.zeros(6)
    layer = LayerKV(k=np.zeros((1, 2, 8, 3)), v=np.zeros((1, 2, 8, 3)), past=0)
    out, cache = attention_forward(x, w_attn, None, w_proj, b_proj, 2, kv_cache=layer)
    with pytest.raises(ValueError, match="the forward used a KV cache"):
        attention_backward(np.ones_like(out), cache)


def test_attention_backward_keeps_the_forwards_precision():
    """A float32 activation with float64 weights runs the forward in float64; every gradient of
    the backward stays float64 (dqkv took dout's float32, rounding dw_attn and db_attn)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 3, 6)).astype(np.float32)
    w_attn, b_attn, w_proj, b_proj = rng.normal(size=(6, 18)), rng.normal(size=18), rng.normal(size=(6, 6)), np.zeros(6)
    out, cache = attention_forward(x, w_attn, b_attn, w_proj, b_proj, 2)
    assert out.dtype == np.float64, f"forward output is {out.dtype}"
    grads = attention_backward(np.ones(out.shape, dtype=np.float32), cache)
    names = ["dx", "dw_attn", "db_attn", "dw_proj", "db_proj"]
    narrow = [(n, g.dtype) for n, g in zip(names, grads) if n != "dx" and g.dtype != np.float64]
    assert not narrow, f"parameter gradients rounded below the forward's float64: {narrow}"
