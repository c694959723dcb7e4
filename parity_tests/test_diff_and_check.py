"""`gpt-oracle diff` and `gpt-oracle check`: they pass on the real trees, fail on injected
faults, and name the place."""

import json

import numpy as np
import pytest

from gpt_oracle.cli import main
from parity_tests import checks, models
from parity_tests.diff import diff_models

CFG = dict(checks.DEFAULT_CONFIGS["tiny"])


def _case(cfg=CFG, seed=0):
    params = models.scale_params(models.build_numpy_model(cfg, seed=seed).params, seed + 1)
    ids, targets = models.random_batch(cfg, 2, 6, seed)
    return params, ids, targets


@pytest.mark.parametrize("tie,qkv", [(False, True), (True, False)])
def test_diff_is_clean_on_the_real_trees(tie, qkv):
    cfg = dict(CFG, tie_embeddings=tie, qkv_bias=qkv)
    params, ids, targets = _case(cfg)
    report = diff_models(cfg, params, ids, targets, dtype="float64")
    assert report.ok, report.format()
    names = [f.name for f, _ in report.activations]
    assert names[0] == "embedding" and names[-2:] == ["logits", "loss"] and "h.1.mlp" in names


def test_layer_by_layer_composition_equals_the_model():
    # The diff composes layer functions itself; it must compute what the model computes.
    params, ids, targets = _case()
    report_acts = diff_models(CFG, params, ids, targets)
    ref = models.run_numpy(models.build_numpy_model(CFG, params=params), ids, targets)
    from parity_tests.diff import _numpy_pass

    acts, _, grads = _numpy_pass(CFG, params, ids, targets)
    from parity_tests.compare import assert_close, assert_dicts_close
    from parity_tests.tolerances import forward_tol, gradient_tol

    assert_close("composed logits vs model", acts["logits"], ref.logits, forward_tol("float64"))
    assert_dicts_close("composed grads vs model", grads, ref.grads, gradient_tol("float64"), order=list(params))
    assert report_acts.ok


def test_diff_names_the_first_layer_after_a_fault(monkeypatch):
    import torch_impl.attention as tatt

    real = tatt.attention_forward
    calls = {"n": 0}

    def faulty(x, w_attn, b_attn, w_proj, b_proj, n_heads, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second block's attention gets a transposed output projection
            w_proj = w_proj.T
        return real(x, w_attn, b_attn, w_proj, b_proj, n_heads, *args, **kwargs)

    monkeypatch.setattr(tatt, "attention_forward", faulty)
    params, ids, targets = _case()
    report = diff_models(CFG, params, ids, targets, dtype="float64")
    assert not report.ok
    assert report.first_forward_divergence() == "h.1.attn", report.format()
    assert report.first_parameter_divergence() is not None
    assert "first layer over its forward tolerance (float64): h.1.attn" in report.format()


def test_diff_command_exit_status(capsys):
    assert main(["diff", "--config", "tiny", "--time", "5"]) == 0
    out = capsys.readouterr().out
    assert "h.1.residual_2" in out and "within the float64 tolerances" in out


def test_check_command_passes_and_writes_json(tmp_path, capsys):
    path = tmp_path / "check.json"
    status = main(["check", "--quiet", "--config", "tiny", "--dtype", "float64", "--json", str(path)])
    out = capsys.readouterr().out
    assert status == 0, out
    data = json.loads(path.read_text())
    assert data["ok"] is True and len(data["rows"]) > 10
    components = [r["component"] for r in data["rows"]]
    for needed in ("layer:attention forward", "model[tiny] logits", "tokenizer: BPE vs tiktoken (the-verdict)"):
        assert needed in components, f"{needed} missing from {components}"
    assert "component" in out and "verdict" in out and "all" in out


def test_check_command_fails_and_names_the_component_on_a_fault(monkeypatch, capsys):
    real = models.build_torch_model

    def negated(cfg, params, **kw):
        params = dict(params)
        params["h.0.mlp.c_fc.weight"] = params["h.0.mlp.c_fc.weight"] * -1.0
        return real(cfg, params, **kw)

    monkeypatch.setattr(models, "build_torch_model", negated)
    status = main(["check", "--quiet", "--config", "tiny", "--dtype", "float64"])
    out = capsys.readouterr().out
    assert status == 1
    assert "model[tiny] logits" in out and "MISMATCH" in out


def test_check_reports_errors_instead_of_skipping():
    rows = checks.guarded("demo", "float64", lambda: (_ for _ in ()).throw(ImportError("no module named numpy_ref.x")))
    assert rows[0].verdict == "ERROR" and "numpy_ref.x" in rows[0].detail and not rows[0].ok


def test_cli_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as err:
        main(["--help"])
    assert err.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("check", "diff", "info", "train", "generate", "bench"):
        assert cmd in out
