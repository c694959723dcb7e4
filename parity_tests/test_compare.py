"""The comparison module itself: it must fail where it should and say where."""

import numpy as np
import pytest

from parity_tests.compare import assert_close, assert_dicts_close, compare
from parity_tests.tolerances import FORWARD, GRADIENT, Tol, forward_tol, gradient_tol

TOL = Tol(1e-8, 1e-6, "test")


def test_identical_arrays_pass_with_zero_error():
    a = np.arange(12.0).reshape(3, 4)
    r = compare("a", a, a.copy(), TOL)
    assert r.ok and r.max_abs == 0.0 and r.max_rel == 0.0


def test_failure_names_tensor_shape_dtype_errors_and_worst_index():
    expected = np.zeros((2, 3, 4))
    actual = expected.copy().astype(np.float32)
    actual[1, 2, 3] = 0.5
    actual[0, 0, 0] = 1e-3
    with pytest.raises(AssertionError) as err:
        assert_close("h.1.attn.c_attn.weight", actual, expected, TOL)
    msg = str(err.value)
    for part in ("h.1.attn.c_attn.weight", "(2, 3, 4)", "float32", "max_abs=5.000e-01", "(1, 2, 3)"):
        assert part in msg, f"{part!r} missing from: {msg}"


def test_shape_mismatch_is_an_error_not_a_broadcast():
    with pytest.raises(AssertionError, match=r"shape \(4, 3\) differs from the oracle's \(3, 4\)"):
        compare("w", np.zeros((4, 3)), np.zeros((3, 4)), TOL)


def test_nan_in_actual_fails_even_where_the_oracle_is_finite():
    actual = np.array([1.0, np.nan])
    r = compare("x", actual, np.array([1.0, 2.0]), TOL)
    assert not r.ok and r.worst_index == (1,)


def test_matching_infinities_pass_and_mismatched_ones_fail():
    assert compare("x", np.array([-np.inf, 1.0]), np.array([-np.inf, 1.0]), TOL).ok
    assert not compare("x", np.array([np.inf, 1.0]), np.array([-np.inf, 1.0]), TOL).ok


def test_relative_tolerance_scales_with_the_oracle():
    tol = Tol(0.0, 1e-3, "rel only")
    assert compare("x", np.array([1000.5]), np.array([1000.0]), tol).ok
    assert not compare("x", np.array([1.5]), np.array([1.0]), tol).ok


def test_dict_comparison_names_the_first_divergence_in_model_order():
    expected = {"wte.weight": np.zeros(3), "h.0.ln_1.weight": np.ones(3), "ln_f.weight": np.ones(3)}
    actual = {k: v.copy() for k, v in expected.items()}
    actual["h.0.ln_1.weight"][1] += 1.0
    actual["ln_f.weight"][0] += 1.0
    with pytest.raises(AssertionError, match=r"first divergence: MISMATCH: grads\[h.0.ln_1.weight\]"):
        assert_dicts_close("grads", actual, expected, TOL)


def test_dict_comparison_reports_missing_and_extra_keys():
    with pytest.raises(AssertionError, match=r"missing \['b'\], unexpected \['c'\]"):
        assert_dicts_close("p", {"a": 1.0, "c": 1.0}, {"a": 1.0, "b": 1.0}, TOL)


def test_every_tolerance_has_a_reason_and_gradients_are_not_tighter_than_forwards():
    for table in (FORWARD, GRADIENT):
        for dtype, tol in table.items():
            assert tol.why.strip(), f"{dtype} tolerance has no reason"
    for dtype in FORWARD:
        f, g = forward_tol(dtype), gradient_tol(dtype)
        assert g.atol >= f.atol and g.rtol >= f.rtol, f"{dtype}: gradient tolerance tighter than forward"
    assert forward_tol("bf16") == FORWARD["bfloat16"]
    with pytest.raises(KeyError, match="int8"):
        forward_tol("int8")


def test_relative_error_is_never_zero_for_a_wrong_tensor():
    # Every |expected| below atol: no relative error means anything, and it says so ("n/a"),
    # where it once read max_rel=0 for a tensor that was entirely wrong.
    small = np.full((2, 3), 5e-9)
    r = compare("g", np.zeros((2, 3)), small, TOL)
    assert r.max_rel is None, f"max_rel={r.max_rel} for an all-zero actual against {small.flat[0]}"
    assert "max_rel=n/a (every |expected| <= atol 1.0e-08)" in r.message(), r.message()
    # With entries above atol, the relative error is theirs: all of them wrong is 100% off.
    mixed = np.array([5e-9, 2.0, -4.0])
    r = compare("g", np.zeros(3), mixed, TOL)
    assert r.max_rel == 1.0 and not r.ok, r.message()
    assert "max_rel=1.000e+00" in r.message(), r.message()
