"""The user-facing oracle API (README, "Checking your own kernel against the oracle")."""

import re

import numpy as np
import pytest
import torch

from parity_tests.layer_specs import SPECS, Sizes, run_oracle
from parity_tests.oracle import check_layer, check_numpy_layer, compare_torch_layer, sizes


def my_layernorm(x, w, b, eps):  # the README's example, verbatim
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_readme_example_passes_and_reports_worst_errors(dtype):
    report = check_layer("layernorm", my_layernorm, dtype=dtype, device="cpu", max_examples=8, derandomize=True)
    worst = report.worst()
    assert set(worst) == {"out", "dx", "dw", "db"}, f"report covers {sorted(worst)}"
    assert report.comparisons and all(c.ok for c in report.comparisons)
    assert max(worst.values()) < (1e-9 if dtype == "float64" else 1e-3), worst


def test_bf16_kernel_is_judged_on_the_values_it_saw():
    def bf16_layernorm(x, w, b, eps):
        return torch.nn.functional.layer_norm(x.float(), x.shape[-1:], w.float(), b.float(), eps).to(x.dtype)

    report = check_layer("layernorm", bf16_layernorm, dtype="bfloat16", max_examples=5, derandomize=True)
    assert all(c.dtype == "bfloat16" for c in report.comparisons)


def test_unknown_layer_name_is_a_clear_error():
    with pytest.raises(KeyError, match="no oracle layer named 'layer_norm'"):
        check_layer("layer_norm", my_layernorm)


def test_numpy_pair_entry_point_accepts_the_oracle_itself():
    from numpy_ref.layernorm import layernorm_backward, layernorm_forward

    report = check_numpy_layer("layernorm", layernorm_forward, layernorm_backward, max_examples=5, derandomize=True)
    assert report.comparisons and all(c.max_abs == 0.0 for c in report.comparisons)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_spec_builds_valid_inputs_and_the_oracle_runs(name):
    spec = SPECS[name]
    inputs = spec.make_inputs(np.random.default_rng(0), Sizes())
    result = run_oracle(spec, inputs)
    assert set(result.grads) == set(spec.differentiable)
    for k in spec.differentiable:
        assert result.grads[k].shape == np.shape(inputs[k]), f"{name}: d{k} shape {result.grads[k].shape}"
    assert np.all(np.isfinite(result.out)), f"{name}: non-finite oracle output"


# ---- a NumPy backward must return one gradient per differentiable input ----------------------


def _numpy_layernorm():
    from numpy_ref.layernorm import layernorm_backward, layernorm_forward

    return layernorm_forward, layernorm_backward


@pytest.mark.parametrize("returns, match", [
    (lambda grads: grads[:2],
     r"layernorm: backward returned 2 gradients; expected 3 \(dx, dw, db\), one for each of x, w, b in that order"),
    (lambda grads: grads + grads[:1], r"layernorm: backward returned 4 gradients; expected 3 \(dx, dw, db\)"),
    (lambda grads: grads[0], r"layernorm: backward returned a numpy.ndarray of shape \(.*\) and dtype float64; "
                             r"expected a tuple of 3 gradients \(dx, dw, db\), one for each of x, w, b"),
    (lambda grads: (grads[0], None, grads[2]), r"layernorm: backward's gradient dw is None; expected a float array"),
], ids=["forgets-db", "one-too-many", "dx-alone", "none-for-dw"])
def test_numpy_backward_with_the_wrong_gradients_fails_naming_what_was_expected(returns, match):
    forward, backward = _numpy_layernorm()
    with pytest.raises(AssertionError, match=match):
        check_numpy_layer("layernorm", forward, lambda dout, cache: returns(backward(dout, cache)),
                          max_examples=5, derandomize=True)


def test_numpy_backward_may_return_a_list():
    forward, backward = _numpy_layernorm()
    report = check_numpy_layer("layernorm", forward, lambda dout, cache: list(backward(dout, cache)),
                               max_examples=5, derandomize=True)
    assert set(report.worst()) == {"out", "dx", "dw", "db"}, f"report covers {sorted(report.worst())}"
    assert all(c.max_abs == 0.0 for c in report.comparisons), [c.message() for c in report.comparisons if c.max_abs]


def test_numpy_forward_without_its_cache_fails_naming_what_came_back():
    forward, backward = _numpy_layernorm()
    with pytest.raises(AssertionError, match=r"layernorm: forward returned a numpy.ndarray of shape .*; "
                                             r"expected a tuple \(out, cache\)"):
        check_numpy_layer("layernorm", lambda **kw: forward(**kw)[0], backward, max_examples=5, derandomize=True)


# ---- what a torch function returns is checked before any gradient is taken --------------------


@pytest.mark.parametrize("mistake, match", [
    (lambda out: out.transpose(-1, -2), r"returned shape \(\d+, \d+, \d+\); the oracle's output has shape"),
    (lambda out: out.reshape(-1), r"returned shape \(\d+,\); the oracle's output has shape \(\d+, \d+, \d+\)"),
    (lambda out: (out, None), r"returned a tuple of 2 items; expected the output tensor alone, of shape"),
    (lambda out: out.detach().numpy(), r"returned a numpy.ndarray of shape .*; expected a torch.Tensor of shape "
                                       r"\(\d+, \d+, \d+\) and dtype torch.float32"),
    (lambda out: out.detach(), r"returned a tensor that does not require grad, so the gradients for x, w, b "
                               r"cannot be checked"),
], ids=["transposed", "flattened", "tuple", "numpy", "detached"])
def test_a_wrong_kind_of_output_is_named_with_the_layer(mistake, match):
    with pytest.raises(AssertionError, match=r"layernorm: the function under test " + match):
        check_layer("layernorm", lambda **kw: mistake(my_layernorm(**kw)), dtype="float32", max_examples=5,
                    derandomize=True)


def test_a_float32_check_refuses_a_float64_result():
    # Upcast inside and return float64: the float32 arithmetic would never be tested.
    def upcast(x, w, b, eps):
        return my_layernorm(x.double(), w.double(), b.double(), eps)

    with pytest.raises(AssertionError, match=r"layernorm: the function under test returned dtype torch.float64; "
                                             r"the inputs were torch.float32 and the output must be too"):
        check_layer("layernorm", upcast, dtype="float32", max_examples=5, derandomize=True)


@pytest.mark.parametrize("dtype, name", [
    ("fp32", "float32"), ("FP32", "float32"), (torch.float32, "float32"), ("bf16", "bfloat16"),
    (torch.bfloat16, "bfloat16"), ("fp64", "float64"), (torch.float64, "float64"),
])
def test_dtype_aliases_and_torch_dtypes_are_accepted(dtype, name):
    def in_float32(x, w, b, eps):  # statistics in float32 whatever the input, result in the input's dtype
        return torch.nn.functional.layer_norm(x.float(), x.shape[-1:], w.float(), b.float(), eps).to(x.dtype)

    fn = my_layernorm if name == "float64" else in_float32
    report = check_layer("layernorm", fn, dtype=dtype, max_examples=3, derandomize=True)
    assert report.dtype == name, f"dtype={dtype!r} was read as {report.dtype!r}"
    dtypes = {c.dtype for c in report.comparisons}
    assert report.comparisons and dtypes == {name}, f"compared in {dtypes}, asked for {name}"


@pytest.mark.parametrize("dtype", ["float8", torch.int32, None])
def test_an_unknown_dtype_lists_the_valid_names(dtype):
    with pytest.raises(ValueError, match=rf"dtype={re.escape(repr(dtype))} is not one the oracle checks; use one of: "
                                         r"float64 \(float64/fp64/double\), float32 \(float32/fp32/float\), .*bf16"):
        check_layer("layernorm", my_layernorm, dtype=dtype)


# ---- layer norm's eps must matter somewhere ----------------------------------------------------


def eps_outside_the_root(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / (torch.sqrt(var) + eps) * w + b


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_eps_outside_the_square_root_fails(dtype):
    # With var ~ 4 in every row, eps = 1e-5 moved the output by ~1e-6 relative: float32 passed it.
    with pytest.raises(AssertionError, match=r"layernorm .*MISMATCH"):
        check_layer("layernorm", eps_outside_the_root, dtype=dtype, max_examples=10, derandomize=True)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_layernorm_rows_with_var_near_eps_are_judged_on_their_own(dtype):
    spec = SPECS["layernorm"]
    # GPT-2's eps (the draws vary it): at 1e-5 the ordinary rows (var ~ 4) cannot see where eps is.
    inputs = next(i for i in (spec.make_inputs(np.random.default_rng(k), Sizes(B=2, T=4, nh=2, hs=4))
                              for k in range(100)) if i["eps"] == 1e-5)
    var = inputs["x"].var(axis=-1).reshape(-1)
    assert np.sum(var == 0.0) == 1 and np.sum((var > 0) & (var < 10 * inputs["eps"])) == 2, f"row variances {var}"

    small = "layernorm (rows with var < 100 eps)"
    wrong = {r.name: r for r in compare_torch_layer(spec, eps_outside_the_root, inputs, dtype=dtype)}
    assert not wrong[f"{small} out"].ok and wrong[f"{small} out"].max_abs > 0.5, wrong[f"{small} out"].message()
    if dtype != "float64":  # the ordinary rows alone cannot see where eps is
        assert wrong["layernorm out"].ok, wrong["layernorm out"].message()

    # The same rows' dx is ~300x the others' and is judged at its own scale: with one bf16
    # tolerance for the whole tensor (rtol of its largest value), the ordinary rows' dx could be
    # halved unseen.
    rows = torch.from_numpy(inputs["x"].var(axis=-1) >= 100 * inputs["eps"])[..., None]

    class HalvedOrdinaryDx(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, dx):
            return torch.where(rows, dx / 2, dx)

    def layernorm_halved_dx(x, w, b, eps):
        return torch.nn.functional.layer_norm(HalvedOrdinaryDx.apply(x), x.shape[-1:], w, b, eps)

    right = compare_torch_layer(spec, spec.torch_forward(), inputs, dtype=dtype)
    assert all(r.ok for r in right), [r.message() for r in right if not r.ok]
    halved = {r.name: r for r in compare_torch_layer(spec, layernorm_halved_dx, inputs, dtype=dtype)}
    assert not halved["layernorm dx"].ok, halved["layernorm dx"].message()
    assert halved[f"{small} dx"].ok, halved[f"{small} dx"].message()


# ---- shapes are checked before the row-group masks, and tf32 only on CUDA -----------------------


def _squeezed_batch(forward):
    """A NumPy forward that drops a size-1 batch axis (torch's .squeeze(0)): (T, C) out at B = 1."""

    def squeezed(**kw):
        out, cache = forward(**kw)
        return (out[0] if out.shape[0] == 1 else out), cache

    return squeezed


def test_a_numpy_output_of_the_wrong_shape_fails_even_at_batch_one():
    # layernorm has row groups: the masks, built from the oracle's (1, T, C), once broadcast a
    # (T, C) output back to (1, T, C) and passed it.
    spec = SPECS["layernorm"]
    inputs = spec.make_inputs(np.random.default_rng(0), Sizes(B=1, T=5, nh=2, hs=4))
    forward, backward = _numpy_layernorm()
    oracle = run_oracle(spec, inputs, upstream_seed=0)
    out, cache = _squeezed_batch(forward)(**inputs)
    dx, dw, db = backward(oracle.upstream, cache)
    from parity_tests.oracle import _compare_outputs
    from parity_tests.tolerances import forward_tol, gradient_tol

    with pytest.raises(AssertionError, match=r"^layernorm out: the function under test returned shape \(5, 8\); "
                                             r"the oracle's out has shape \(1, 5, 8\)$"):
        _compare_outputs(spec, "layernorm", out, dict(x=dx, w=dw, b=db), oracle, forward_tol("float64"),
                         gradient_tol("float64"))
    with pytest.raises(AssertionError, match=r"layernorm out: the function under test returned shape \(\d+, \d+\); "
                                             r"the oracle's out has shape \(1, \d+, \d+\)"):
        check_numpy_layer("layernorm", _squeezed_batch(forward), backward, max_examples=20, derandomize=True)


def test_a_numpy_gradient_of_the_wrong_shape_fails_naming_it():
    spec = SPECS["layernorm"]
    inputs = spec.make_inputs(np.random.default_rng(0), Sizes(B=1, T=5, nh=2, hs=4))
    forward, backward = _numpy_layernorm()
    oracle = run_oracle(spec, inputs, upstream_seed=0)
    out, cache = forward(**inputs)
    dx, dw, db = backward(oracle.upstream, cache)
    from parity_tests.oracle import _compare_outputs
    from parity_tests.tolerances import forward_tol, gradient_tol

    with pytest.raises(AssertionError, match=r"layernorm dx: the function under test returned shape \(5, 8\); "
                                             r"the oracle's dx has shape \(1, 5, 8\)"):
        _compare_outputs(spec, "layernorm", out, dict(x=dx.reshape(5, 8), w=dw, b=db), oracle,
                         forward_tol("float64"), gradient_tol("float64"))


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_tf32_off_cuda_is_refused(device):
    # On the CPU a "tf32" check ran plain float32 and judged it by TF32's tolerance, 500x looser.
    with pytest.raises(ValueError, match=r"dtype='tf32' on device='cpu': TF32 is a CUDA matmul mode"):
        check_layer("linear", lambda x, w, b: x @ w + b, dtype="tf32", device=device, max_examples=2)
    spec = SPECS["linear"]
    inputs = spec.make_inputs(np.random.default_rng(0), Sizes())
    with pytest.raises(ValueError, match=r"dtype='tf32' on device='cpu'"):
        compare_torch_layer(spec, spec.torch_forward(), inputs, dtype="tf32", device=device)


# ---- sizes, inputs and reports for kernels that tile (review of the user API) -------------------


def _torch_attention(x, w_attn, b_attn, w_proj, b_proj, n_heads):
    """A correct attention as a user would write it: SDPA over (B, nh, T, hs)."""
    B, T, C = x.shape
    q, k, v = (x @ w_attn + b_attn).split(C, dim=-1)  # (B, T, C) each
    q, k, v = (t.view(B, T, n_heads, C // n_heads).transpose(1, 2) for t in (q, k, v))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
    return y.transpose(1, 2).reshape(B, T, C) @ w_proj + b_proj


def test_check_layer_takes_sizes_up_to_gpt2_small_and_passes_correct_kernels():
    """The defaults stop at C = 32 and T = 9. Larger sizes are asked for with `sizes`, and the
    drawn weights shrink with C so a correct float32 kernel still passes there (with a fixed
    scale of 0.3, attention at C = 768 saturated its softmax and failed a correct kernel)."""
    from parity_tests.oracle import sizes

    report = check_layer("attention", _torch_attention, dtype="float32", max_examples=4, derandomize=True,
                         sizes=sizes(max_batch=2, min_time=17, max_time=40, max_heads=3, min_head_size=16,
                                     max_head_size=32))
    assert report.examples == 4 and all(c.ok for c in report.comparisons)
    for name, fn in (("attention", _torch_attention), ("mlp", SPECS["mlp"].torch_forward())):
        report = check_layer(name, fn, dtype="float32", max_examples=2, derandomize=True,
                             sizes=Sizes(B=1, T=64, nh=12, hs=64, V=11, Tc=64))
        assert all(c.ok for c in report.comparisons), [c.message() for c in report.comparisons if not c.ok]
    with pytest.raises(TypeError, match="sizes must be"):
        check_layer("gelu", torch.nn.functional.gelu, sizes=(2, 3))


def test_a_bug_past_the_default_sizes_is_caught_at_the_sizes_asked_for():
    """A layer norm that reduces over the first 32 channels only (a tile-size bug) is right at
    every default size (C <= 32) and wrong beyond: `sizes` reaches it."""

    def first_32_channels(x, w, b, eps):
        head = x[..., :32]
        mean = head.mean(-1, keepdim=True)
        var = ((head - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + eps) * w + b

    check_layer("layernorm", first_32_channels, max_examples=10, derandomize=True)
    with pytest.raises(AssertionError, match="layernorm"):
        check_layer("layernorm", first_32_channels, max_examples=10, derandomize=True,
                    sizes=Sizes(B=2, T=3, nh=4, hs=16))


def test_a_failure_lists_every_tensor_over_tolerance_and_replays():
    """Attention without its 1/sqrt(hs) scale: the report names every tensor over tolerance
    (the first alone pointed at dx, a backward, for a forward bug) and a replay line that
    reproduces the case."""

    def unscaled(x, w_attn, b_attn, w_proj, b_proj, n_heads):
        B, T, C = x.shape
        q, k, v = (x @ w_attn + b_attn).split(C, dim=-1)
        q, k, v = (t.view(B, T, n_heads, C // n_heads).transpose(1, 2) for t in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
        return y.transpose(1, 2).reshape(B, T, C) @ w_proj + b_proj

    with pytest.raises(AssertionError) as info:
        check_layer("attention", unscaled, max_examples=30, derandomize=True)
    message = str(info.value)
    over = re.findall(r"MISMATCH: \[[^\]]*\] attention (\w+)", message)
    assert len(over) >= 2, f"one tensor named where several are wrong: {message}"
    results = run_replay(message, {"unscaled": unscaled})
    assert any(not r.ok for r in results), f"the replay lines pass: {message}"


def run_replay(message: str, definitions: dict) -> list:
    """Run a failure's replay lines in a fresh namespace holding only the user's definitions (as
    pasted into a new session); return their `results`."""
    block = message.split("replay (paste after your own definitions):\n", 1)[1]
    code = "\n".join(line[4:] for line in block.splitlines() if line.startswith("    "))
    namespace = dict(definitions)
    exec(code, namespace)  # noqa: S102 - our own message
    return namespace["results"]


def test_replay_lines_carry_the_tolerances_and_work_for_numpy_pairs_and_lambdas():
    from numpy_ref.gelu import gelu_backward, gelu_forward
    from parity_tests.tolerances import Tol

    def mlp_with_tight_tol(**kw):
        return SPECS["mlp"].torch_forward()(**kw)

    tight = Tol(1e-12, 1e-12, "tighter than float32 can be")
    with pytest.raises(AssertionError) as info:
        check_layer("mlp", mlp_with_tight_tol, tol_forward=tight, max_examples=3, derandomize=True)
    assert any(not r.ok for r in run_replay(str(info.value), {"mlp_with_tight_tol": mlp_with_tight_tol}))
    with pytest.raises(AssertionError) as info:
        check_layer("gelu", lambda x: torch.nn.functional.gelu(x), max_examples=10, derandomize=True)  # erf form
    assert "fn = ...  # your function" in str(info.value)
    assert any(not r.ok for r in run_replay(str(info.value).replace("fn = ...", "fn = torch.nn.functional.gelu  #"),
                                            {"torch": torch}))

    def halved_backward(dout, cache):
        return gelu_backward(dout, cache) / 2

    with pytest.raises(AssertionError) as info:
        check_numpy_layer("gelu", gelu_forward, halved_backward, max_examples=3, derandomize=True)
    message = str(info.value)
    assert "the backward is wrong" in message and "autograd" not in message, message
    results = run_replay(message, {"gelu_forward": gelu_forward, "halved_backward": halved_backward})
    assert any(not r.ok for r in results), message


def test_a_kernel_that_ignores_its_eps_is_caught():
    def gpt2_eps_always(x, w, b, eps):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], w, b, 1e-5)

    with pytest.raises(AssertionError, match="layernorm"):
        check_layer("layernorm", gpt2_eps_always, max_examples=30, derandomize=True)


def test_a_loss_that_counts_ignored_targets_in_its_mean_is_caught():
    def mean_over_every_target(logits, targets, ignore_index):
        V = logits.shape[-1]
        per = torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1),
                                                ignore_index=-100 if ignore_index is None else ignore_index,
                                                reduction="sum")
        return per / targets.numel()

    with pytest.raises(AssertionError, match="cross_entropy"):
        check_layer("cross_entropy", mean_over_every_target, max_examples=30, derandomize=True)
    report = check_layer("cross_entropy", SPECS["cross_entropy"].torch_forward(), max_examples=30, derandomize=True)
    assert report.examples == 30


@pytest.mark.skipif(not hasattr(BaseException, "add_note"), reason="exception notes need Python 3.11")
def test_an_exception_in_the_kernel_says_what_it_was_given_and_the_weight_layout():
    def nn_linear_layout(x, w, b):
        return torch.nn.functional.linear(x, w, b)  # expects (out, in)

    with pytest.raises(RuntimeError) as info:
        check_layer("linear", nn_linear_layout, max_examples=3, derandomize=True)
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "(in, out)" in notes and "w=(" in notes, f"no note on the layout: {notes!r}"


def test_a_one_pass_variance_is_caught_in_float32_on_a_row_with_a_large_mean():
    """var = E[x^2] - E[x]^2 loses ~u m^2 / var: on a row whose mean is 100 spreads (as rows
    through GPT-2's outlier channels are) its float32 output is off by ~0.5%, where a two-pass
    kernel stays within ~3 u m. Before that row was drawn, the one-pass kernel passed."""

    def one_pass(x, w, b, eps):
        mean = x.mean(-1, keepdim=True)
        var = (x * x).mean(-1, keepdim=True) - mean * mean
        return (x - mean) / torch.sqrt(var + eps) * w + b

    with pytest.raises(AssertionError, match=r"rows with \|mean\| > 30 std"):
        check_layer("layernorm", one_pass, dtype="float32", max_examples=30, derandomize=True)
    report = check_layer("layernorm", my_layernorm, dtype="float32", max_examples=30, derandomize=True)
    assert any("rows with |mean| > 30 std" in c.name for c in report.comparisons), "no large-mean row was drawn"


def test_noncontiguous_inputs_catch_a_kernel_that_reads_memory_as_row_major():
    """A kernel that indexes its weight's storage as if it were row-major (as a hand-written
    kernel that ignores strides does) is right on contiguous inputs and wrong on a transposed
    view; every torch_impl layer passes on those views."""

    def row_major_linear(x, w, b):
        raw = torch.as_strided(w, w.shape, (w.shape[1], 1))  # the storage read in row-major order
        return x @ raw + b

    check_layer("linear", row_major_linear, max_examples=10, derandomize=True)
    with pytest.raises(AssertionError, match="linear") as info:
        check_layer("linear", row_major_linear, max_examples=10, derandomize=True, noncontiguous=True)
    assert "noncontiguous=True" in str(info.value), "the replay lines must rebuild the same views"
    for name, spec in SPECS.items():
        report = check_layer(name, spec.torch_forward(), max_examples=5, derandomize=True, noncontiguous=True)
        assert report.examples == 5


def test_a_gelu_with_a_mistyped_constant_is_caught_in_float32():
    """0.0447 for 0.044715: the forward is off by ~9e-6, inside the accumulation-depth tolerance
    of layers with sums; an elementwise layer is judged at a few ulps. Correct GELUs written other
    ways still pass."""
    import math

    c = math.sqrt(2 / math.pi)

    def mistyped(x):
        return 0.5 * x * (1 + torch.tanh(c * (x + 0.0447 * x ** 3)))

    def via_sigmoid(x):
        return x * torch.sigmoid(2 * c * (x + 0.044715 * x * x * x))

    with pytest.raises(AssertionError, match="gelu"):
        check_layer("gelu", mistyped, max_examples=40, derandomize=True)
    for correct in (via_sigmoid, lambda x: torch.nn.functional.gelu(x, approximate="tanh")):
        assert check_layer("gelu", correct, max_examples=40, derandomize=True).examples == 40


def _attention_with_past(top_left: bool):
    """A user's attention over new positions x with earlier positions x_past (a KV cache's keys
    and values), through SDPA; `top_left` is the classic bug: is_causal=True with fewer queries
    than keys aligns the mask to the top-left corner, so new query t sees keys 0 .. t only."""

    def attention_with_past(x, x_past, w_attn, b_attn, w_proj, b_proj, n_heads):
        B, T, C = x.shape
        P = x_past.shape[1]
        q = (x @ w_attn[:, :C] + b_attn[:C]).view(B, T, n_heads, -1).transpose(1, 2)  # (B, nh, T, hs)
        kv = torch.cat([x_past, x], dim=1) @ w_attn[:, C:] + b_attn[C:]  # (B, P + T, 2C)
        k, v = (t.reshape(B, P + T, n_heads, -1).transpose(1, 2) for t in kv.split(C, dim=-1))
        if top_left:
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = torch.arange(P + T)[None, :] <= torch.arange(T)[:, None] + P  # query t sees keys 0 .. P + t
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return y.transpose(1, 2).reshape(B, T, C) @ w_proj + b_proj

    return attention_with_past


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attention_with_earlier_positions_catches_a_top_left_causal_mask(dtype):
    """Cached decoding's mask: queries of the T new positions see all P earlier keys."""
    report = check_layer("attention_with_past", _attention_with_past(top_left=False), dtype=dtype,
                         max_examples=20, derandomize=True)
    assert report.examples == 20 and {"dx", "dx_past", "dw_attn"} <= set(report.worst())
    with pytest.raises(AssertionError, match="attention_with_past"):
        check_layer("attention_with_past", _attention_with_past(top_left=True), dtype=dtype, max_examples=20,
                    derandomize=True)


def test_a_forward_only_decoding_kernel_is_checked_with_grads_false():
    """Cached-decoding kernels are for inference: run under no_grad they have no graph, which
    check_layer refuses unless asked for the forward only; the top-left bug is caught that way too.
    A fixed size whose Tc is below T still draws one earlier position (P = max(1, Tc - T + 1))."""
    def inference(kernel):
        def under_no_grad(**kwargs):
            with torch.no_grad():
                return kernel(**kwargs)
        return under_no_grad

    with pytest.raises(AssertionError, match="does not require grad"):
        check_layer("attention_with_past", inference(_attention_with_past(False)), max_examples=2, derandomize=True)
    report = check_layer("attention_with_past", inference(_attention_with_past(False)), max_examples=10,
                         derandomize=True, grads=False, sizes=Sizes(B=1, T=12, nh=2, hs=4, V=11, Tc=8))
    assert set(report.worst()) == {"out"}
    with pytest.raises(AssertionError, match="grads=False"):
        check_layer("attention_with_past", inference(_attention_with_past(True)), max_examples=10,
                    derandomize=True, grads=False)


def test_a_gelu_whose_tanh_overflows_past_x_10_is_caught():
    """tanh(u) as (e^(2u) - 1) / (e^(2u) + 1) is NaN once e^(2u) overflows (x > ~10); the drawn
    inputs of N(0, 2) rarely go there, so every draw holds +-12 and +-20."""
    import math

    c = math.sqrt(2 / math.pi)

    def exp_tanh_gelu(x):
        e = torch.exp(2 * c * (x + 0.044715 * x ** 3))
        return 0.5 * x * (1 + (e - 1) / (e + 1))

    with pytest.raises(AssertionError, match="gelu"):
        check_layer("gelu", exp_tanh_gelu, max_examples=5, derandomize=True)


@pytest.mark.parametrize("field", ["B", "T", "nh", "hs", "V", "Tc"])
def test_zero_sizes_are_refused_as_no_check_at_all(field):
    """At T = 0 or B = 0 every tensor was empty, and a linear layer computing 2 (x @ w) + 7 b
    passed check_layer with every error 0.0."""
    with pytest.raises(ValueError, match=rf"Sizes.{field} must be an int >= 1, got 0"):
        Sizes(**{field: 0})
    with pytest.raises(ValueError, match=r"min_time and min_head_size must be >= 1"):
        check_layer("linear", lambda **kw: kw["x"] @ kw["w"] + kw["b"], sizes=sizes(min_time=0), max_examples=2)


def test_model_loss_is_reported_in_the_models_dtype():
    """The loss was converted to float64 before the comparison, so a float32 model's loss row
    said dtype=float64."""
    from parity_tests.model_oracle import compare_model
    from parity_tests.test_model_oracle import user_adapter

    config = dict(vocab_size=11, context_length=6, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.0,
                  qkv_bias=True, tie_embeddings=True, ln_eps=1e-5)
    loss = next(r for r in compare_model(user_adapter(), config, 1, 4, 0, dtype="float32") if r.name == "model loss")
    assert loss.dtype == "float32", f"model loss reported as {loss.dtype}"
