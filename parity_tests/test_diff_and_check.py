"""`gpt-oracle diff` and `gpt-oracle check`: they pass on the real trees, fail on injected
faults, and name the place."""

import dataclasses
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


@pytest.mark.parametrize("config", ["tiny", "small"])
def test_the_diff_command_catches_and_places_gelus_erf_form_in_float32(monkeypatch, capsys, config):
    """diff drew its weights at GPT-2's initial spread, where the blocks add little to the
    residual stream: torch_impl with GELU's erf form passed in float32 on tiny, and on small the
    report named h.1.ln_1 rather than h.0.mlp. It draws them as check_model does (WEIGHT_SPREAD)."""
    import torch.nn.functional as F

    import torch_impl.mlp as tmlp

    monkeypatch.setattr(tmlp, "gelu_forward", lambda x: F.gelu(x))  # the erf form, not GPT-2's tanh
    assert main(["diff", "--config", config, "--dtype", "float32"]) == 1
    out = capsys.readouterr().out
    assert "first layer over its forward tolerance (float32): h.0.mlp" in out, out


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


# ---- low precision: whole-model gradients judged per tensor, as `check` judges them ----------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_diff_in_low_precision_is_clean_on_the_real_trees(dtype):
    params, ids, targets = _case()
    report = diff_models(CFG, params, ids, targets, dtype=dtype)
    assert report.ok, report.format()
    worst = max(c.max_rel for c in report.parameters + [g for _, g in report.activations if g is not None])
    assert 0 < worst < report.grad_tol.rel / 4, f"{dtype}: worst |err|/s {worst:.3e}, bound {report.grad_tol.rel:.3e}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_diff_in_low_precision_fails_on_weights_without_a_gradient(monkeypatch, dtype):
    # The elementwise bf16 rule (atol 5e-2) passed this: the tiny model's gradients are 1e-5..1e-2.
    import torch_impl.attention as tatt

    real = tatt.attention_forward

    def no_weight_gradients(x, w_attn, b_attn, w_proj, b_proj, n_heads, *args, **kwargs):
        return real(x, w_attn.detach(), None if b_attn is None else b_attn.detach(), w_proj.detach(), b_proj.detach(),
                    n_heads, *args, **kwargs)

    monkeypatch.setattr(tatt, "attention_forward", no_weight_gradients)
    params, ids, targets = _case()
    report = diff_models(CFG, params, ids, targets, dtype=dtype)
    text = report.format()
    assert report.first_parameter_divergence() == "h.0.attn.c_attn.weight", text
    failed = sorted(p.name for p in report.parameters if not p.ok)
    assert failed == sorted(f"h.{i}.attn.{k}" for i in range(2) for k in ("c_attn.weight", "c_attn.bias",
                                                                          "c_proj.weight", "c_proj.bias")), failed
    assert report.first_forward_divergence() is None and report.first_gradient_divergence() is None, text
    assert "parameter gradient: h.0.attn.c_attn.weight shape=(32, 96)" in text and "actual=0.0" in text, text


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_diff_in_low_precision_fails_on_a_halved_gelu_backward(monkeypatch, dtype):
    import torch_impl.mlp as tmlp
    from parity_tests.faults import gelu_with_scaled_backward

    monkeypatch.setattr(tmlp, "gelu_forward", gelu_with_scaled_backward(0.5))
    params, ids, targets = _case()
    report = diff_models(CFG, params, ids, targets, dtype=dtype)
    text = report.format()
    assert report.first_forward_divergence() is None, text  # the forward is right
    # Walking back from the loss, the first gradient the halved GELU touches is its MLP's input's.
    assert report.first_gradient_divergence() == "h.1.ln_2", text
    assert "activation gradient: h.1.ln_2 shape=(2, 6, 32)" in text, text
    assert "h.1.mlp.c_fc.weight" in [p.name for p in report.parameters if not p.ok], text


def test_diff_scales_are_the_ones_check_uses():
    from parity_tests.diff import position_grad_scales

    params, ids, targets = _case()
    _, from_diff = position_grad_scales(CFG, params, ids, targets)
    from_check = checks.position_grad_scales(models.build_numpy_model(CFG, params=params), ids, targets)
    assert from_diff.keys() == from_check.keys(), sorted(set(from_diff) ^ set(from_check))
    for k in from_check:
        assert from_diff[k] == pytest.approx(from_check[k], rel=1e-12), f"{k}: diff's s {from_diff[k]} vs check's {from_check[k]}"


def test_diff_runs_tf32_with_tf32_matmuls_and_restores_the_flags(monkeypatch):
    """As models.run_torch: TF32 on for the torch pass of dtype tf32 (and off for float32), the
    flags as they were afterwards. The flags are only read on CUDA, so the CPU pass shows them."""
    import torch

    import torch_impl.attention as tatt
    from parity_tests.diff import _torch_pass

    seen = []
    real = tatt.attention_forward

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return real(*args, **kwargs)

    monkeypatch.setattr(tatt, "attention_forward", spy)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    params, ids, targets = _case()
    _torch_pass(CFG, params, ids, targets, "tf32", "cpu")
    assert seen and set(seen) == {(True, True)}, f"(matmul, cudnn) allow_tf32 during the tf32 pass: {set(seen)}"
    seen.clear()
    _torch_pass(CFG, params, ids, targets, "float32", "cpu")
    assert set(seen) == {(False, False)}, f"(matmul, cudnn) allow_tf32 during the float32 pass: {set(seen)}"
    after = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    assert after == before, f"the flags were {before} before the passes and {after} after"
    with pytest.raises(ValueError, match=r"dtype='tf32' on device='cpu': TF32 is a CUDA matmul mode"):
        diff_models(CFG, params, ids, targets, dtype="tf32", device="cpu")


# ---- the check table ------------------------------------------------------------------------


def test_check_table_names_per_tensor_tolerances_and_says_mismatch_once():
    from parity_tests.compare import compare
    from parity_tests.tolerances import forward_tol

    tol = forward_tol("bfloat16")
    expected = np.linspace(-1.0, 1.0, 8)
    row = checks.row_from("layer:demo forward", "bfloat16", [compare("demo out", -expected, expected, tol)], tol)
    assert row.tolerance == "atol 1e-02 rtol 5e-02 of the tensor max", row.tolerance
    text = checks.format_table([row])
    assert "MISMATCH: MISMATCH" not in text, text
    assert "- layer:demo forward (bfloat16): MISMATCH: demo out shape=(8,)" in text, text
    assert checks.row_from("x", "float32", [], forward_tol("float32")).tolerance == "atol 1e-05 rtol 1e-04"


def test_check_table_says_n_a_where_no_relative_error_exists():
    from parity_tests.compare import compare
    from parity_tests.tolerances import gradient_tol

    tol = gradient_tol("float32")  # atol 1e-4: every entry below it
    expected = np.full(4, 3e-5)
    row = checks.row_from("model[demo] grads", "float32", [compare("g", np.zeros(4), expected, tol)], tol)
    assert row.max_rel is None, f"max rel {row.max_rel} for a tensor that is all wrong but below atol"
    line = checks.format_table([row]).splitlines()[2]
    assert "n/a" in line and "0.00e+00" not in line, f"the max rel column of an all-wrong tensor: {line}"


def test_check_runs_each_dtype_and_config_once(monkeypatch, capsys):
    seen = {}

    def fake_run_check(**kw):
        seen.update(kw)
        return [checks.Row("demo", "float64", 0.0, 0.0, "exact", "ok")]

    monkeypatch.setattr(checks, "run_check", fake_run_check)
    argv = ["check", "--quiet", "--dtype", "float32", "--dtype", "float64", "--dtype", "float32",
            "--config", "tiny", "--config", "gpt2-small", "--config", "tiny", "--config", "124M"]
    assert main(argv) == 0, capsys.readouterr()
    assert seen["dtypes"] == ("float32", "float64"), f"dtypes run: {seen['dtypes']}"
    assert list(seen["configs"]) == ["tiny", "gpt2-small"], f"configs run: {list(seen['configs'])}"


def test_a_model_row_refuses_a_run_in_another_precision_or_with_a_gradient_missing():
    """models.run_torch checks that the run computed in the precision it is judged by (a bf16 row
    whose autocast did nothing would be float32 under bf16's looser tolerance, and pass) and
    names a parameter left without a gradient (it once put zeros in its place)."""
    from contextlib import nullcontext
    from unittest import mock

    import torch

    from parity_tests.checkpoint_cases import tiny

    cfg = tiny()
    np_model = models.build_numpy_model(cfg, seed=0)
    ids, targets = models.random_batch(cfg, 2, 5, 0)
    t_model = models.build_torch_model(cfg, np_model.params, dtype="bfloat16")
    with mock.patch.object(torch, "autocast", lambda *a, **k: nullcontext()), \
            pytest.raises(AssertionError, match=r"logits are torch.float32 in a bfloat16 run"):
        models.run_torch(t_model, ids, targets, dtype="bfloat16")
    t_model = models.build_torch_model(cfg, np_model.params, dtype="float64")
    t_model.ln_f.weight.requires_grad_(False)
    with pytest.raises(AssertionError, match=r"no gradient for \['ln_f.weight'\]"):
        models.run_torch(t_model, ids, targets, dtype="float64")


def test_check_runs_generation_and_checkpoint_rows_on_the_device_asked_for(monkeypatch):
    """`gpt-oracle check --device cuda` ran the generation and checkpoint rows on the CPU: the
    torch model of each row is now built on the run's device."""
    from torch_impl.model import GPTModel

    seen = []
    real_build, real_load = models.build_torch_model, GPTModel.from_pretrained.__func__

    def build(*args, device="cpu", **kwargs):
        seen.append(("build", str(device)))
        return real_build(*args, device=device, **kwargs)

    def load(cls, directory, dtype=None, device=None):
        seen.append(("load", str(device)))
        return real_load(cls, directory, **({"device": device} if device is not None else {}))

    monkeypatch.setattr(models, "build_torch_model", build)
    monkeypatch.setattr(GPTModel, "from_pretrained", classmethod(load))
    rows = checks.generation_rows("tiny", checks.DEFAULT_CONFIGS["tiny"], device="cpu:0") + \
        checks.checkpoint_rows("tiny", checks.DEFAULT_CONFIGS["tiny"], device="cpu:0")
    assert all(r.verdict == "ok" for r in rows), [(r.component, r.verdict, r.detail) for r in rows]
    assert seen and all(device == "cpu:0" for _, device in seen), f"models were built on {seen}"


# ---- check's rows beyond the plain model: each catches a fault the plain rows pass ------------
# (found by a mutation review: ignored targets counted by the sliced head, a chunked prefill's
# mask, an explicit dropout mask dropped, an accumulated gradient left unscaled, a checkpoint
# written wrong by torch_impl, a loss rounded to bf16, BPE's leftmost-merge rule)


def _ignored_rows_counted(monkeypatch):
    import torch_impl.model as tmodel

    real = tmodel.head_loss_forward

    def counted(x, head, targets, ignore_index=None, *args, **kwargs):  # ignored rows scored as class 0
        if ignore_index is not None:
            targets = targets.masked_fill(targets == ignore_index, 0)
        return real(x, head, targets, None, *args, **kwargs)

    monkeypatch.setattr(tmodel, "head_loss_forward", counted)


def _top_left_mask(monkeypatch):
    import torch

    import torch_impl.attention as attention

    monkeypatch.setattr(attention, "causal_mask",
                        lambda T, Tk, device=None: torch.ones(T, Tk, dtype=torch.bool, device=device).triu(1))


def _masks_ignored(monkeypatch):
    import torch_impl.block as block

    real = block.dropout_forward
    monkeypatch.setattr(block, "dropout_forward", lambda x, p, training, mask=None: real(x, p, training, None))


def _sgd_gradient_doubled(monkeypatch):
    import torch

    real = torch.nn.utils.get_total_norm

    def doubled(tensors, *args, **kwargs):  # what an accumulated loss left unscaled by 1/grad_accum gives
        tensors = list(tensors)
        for g in tensors:
            g.mul_(2.0)
        return real(tensors, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "get_total_norm", doubled)


def _torch_saves_a_zero_bias(monkeypatch):
    import torch_impl.checkpoint as checkpoint

    real = checkpoint.save_file

    def zeroed(tensors, *args, **kwargs):
        tensors = {k: (v * 0 if k.endswith("h.0.attn.c_attn.bias") else v) for k, v in tensors.items()}
        return real(tensors, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", zeroed)


def _bf16_rounded_loss(monkeypatch):
    import torch

    from torch_impl.model import GPTModel

    real = GPTModel.forward

    def rounded(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if isinstance(out, tuple) and torch.is_autocast_enabled("cpu"):
            return out[0], out[1].to(torch.bfloat16).float()
        return out

    monkeypatch.setattr(GPTModel, "forward", rounded)


def _trainer_masks_unscaled(monkeypatch):
    import torch_impl.train as ttrain

    real = ttrain.dropout_masks

    def unscaled(model, B, T, gen):  # 0 or 1, not 0 or 1/(1-p): activations shrink by (1-p) in training
        masks = real(model, B, T, gen)
        return None if masks is None else {k: (v != 0).to(v.dtype) for k, v in masks.items()}

    monkeypatch.setattr(ttrain, "dropout_masks", unscaled)


def _trainer_keeps_p(monkeypatch):
    import numpy_ref.model as nmodel

    real = nmodel.GPTModel.dropout_masks

    def flipped(self, batch_size, seq_len, rng):  # keeps a share p and drops 1-p
        return {k: (v == 0) / (1.0 - self.config.drop_rate) for k, v in real(self, batch_size, seq_len, rng).items()}

    monkeypatch.setattr(nmodel.GPTModel, "dropout_masks", flipped)


def _loader_drop_last_forced(module_name: str, drop_last: bool):
    def inject(monkeypatch):
        import importlib

        loader = importlib.import_module(module_name).DataLoader
        real = loader.__init__

        def forced(self, dataset, batch_size, **kwargs):  # the caller's drop_last ignored
            real(self, dataset, batch_size, **{**kwargs, "drop_last": drop_last})

        monkeypatch.setattr(loader, "__init__", forced)
    return inject


def _keys_unprefixed_in_both_trees(monkeypatch):
    import numpy_ref.checkpoint as ncheckpoint
    import torch_impl.checkpoint as tcheckpoint

    # Both writers drop "transformer." from the trunk's keys, which both readers accept: every
    # cross-tree logits row passed files named unlike the hub's GPT-2.
    for module in (ncheckpoint, tcheckpoint):
        monkeypatch.setattr(module, "_file_key", lambda name: name)


def _composed_layernorm_eps_outside_the_root(monkeypatch):
    import numpy_ref.autograd_layers as layers
    from numpy_ref.tensor import sqrt

    def eps_outside(x, w, b, eps):  # (x - mu) / (sqrt(var) + eps): the engine's layer norm, wrong
        xc = x - x.mean(axis=-1, keepdims=True)
        return xc / (sqrt((xc * xc).mean(axis=-1, keepdims=True)) + eps) * w + b

    composed = layers.LayerOps("composed", layers.composed_embedding, eps_outside, layers.composed_attention,
                               layers.composed_mlp, layers.composed_cross_entropy)
    monkeypatch.setattr(layers, "COMPOSED", composed)


def _hand_derived_layernorm_backward_drops_a_term(monkeypatch):
    import numpy_ref.block as block
    import numpy_ref.layernorm as layernorm
    import numpy_ref.model as model

    real = layernorm.layernorm_backward

    def short(dout, cache):  # dx without its mean-of-dxhat term: a derivation slip in the oracle
        dx, dw, db = real(dout, cache)
        return dx + dout.mean(axis=-1, keepdims=True) * 0.5, dw, db

    for module in (layernorm, block, model):
        monkeypatch.setattr(module, "layernorm_backward", short)


def _long_prompt_cropped_from_the_front(monkeypatch):
    import torch

    import torch_impl.generate as tgenerate

    real = tgenerate.generate

    def front(model, ids, max_new_tokens, **kwargs):  # a prompt past the context read from its first tokens
        Tc = model.config.context_length
        if ids.shape[1] <= Tc:
            return real(model, ids, max_new_tokens, **kwargs)
        out = real(model, ids[:, :Tc], max_new_tokens, **kwargs)
        return torch.cat([ids, out[:, Tc:]], dim=1)

    monkeypatch.setattr(tgenerate, "generate", front)


def _letters_of_unicode_17(monkeypatch):
    import regex

    import numpy_ref.tokenizer as tokenizer

    # The pattern as the installed regex reads it (Unicode 17.0), not as tiktoken 0.14 (16.0)
    encoding = tokenizer.get_encoding("gpt2")
    monkeypatch.setattr(encoding, "_pat", regex.compile(tokenizer.GPT2_PAT_STR))


def _decode_drops_cut_bytes(monkeypatch):
    import numpy_ref.tokenizer as tokenizer

    # errors="ignore" where tiktoken replaces: a text ending inside a character loses its tail
    encoding = tokenizer.get_encoding("gpt2")
    monkeypatch.setattr(encoding, "decode", lambda tokens, errors="ignore": encoding.decode_bytes(tokens).decode(
        "utf-8", errors=errors))


def _rightmost_merge(monkeypatch):
    import functools

    import numpy_ref.tokenizer as tokenizer

    encoding = tokenizer.get_encoding("gpt2")  # the instance check uses; its own piece cache is left alone
    real = encoding._bpe_piece

    def rightmost(piece):  # a run of one character split as tiktoken's parts in reverse order
        ids = real(piece)
        return ids[::-1] if len(set(piece)) == 1 else ids

    monkeypatch.setattr(encoding, "_encode_piece", functools.lru_cache(maxsize=None)(rightmost))


def _ignored_rows_logits_zeroed(monkeypatch):
    import torch_impl.model as tmodel

    real = tmodel.head_loss_forward

    def zeroed(x, head, targets, ignore_index=None, *args, **kwargs):  # ignored rows' logits wrong, loss right
        if ignore_index is not None:
            x = x * (targets != ignore_index).unsqueeze(-1).to(x.dtype)
        return real(x, head, targets, ignore_index, *args, **kwargs)

    monkeypatch.setattr(tmodel, "head_loss_forward", zeroed)


def _validation_swapped_for_training(monkeypatch):
    import torch_impl.train as ttrain

    real = ttrain.record_eval

    def swapped(trainer, *args, **kwargs):  # the training batches evaluated as the validation set
        saved = trainer.eval_sets["val"]
        trainer.eval_sets["val"] = trainer.eval_sets["train"]
        try:
            return real(trainer, *args, **kwargs)
        finally:
            trainer.eval_sets["val"] = saved

    monkeypatch.setattr(ttrain, "record_eval", swapped)


def _clip_scales_every_gradient_to_the_threshold(monkeypatch):
    import torch

    import torch_impl.train as ttrain

    def always(parameters, max_norm):  # min(1, max_norm / norm) without the min: small gradients grow
        params = [p for p in parameters if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        for q in params:
            q.grad.mul_(max_norm / (norm + 1e-6))
        return norm

    monkeypatch.setattr(ttrain, "clip_grad_norm", always)


def _torch_fills_a_missing_bias_with_ones(monkeypatch):
    import torch

    import torch_impl.checkpoint as checkpoint

    real = checkpoint.save_file

    def ones(tensors, *args, **kwargs):  # the zeros that stand for "no qkv bias" written as ones
        tensors = {k: (torch.ones_like(v) if k.endswith("attn.c_attn.bias") and not v.any() else v)
                   for k, v in tensors.items()}
        return real(tensors, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", ones)


def _evaluation_without_eval_mode(monkeypatch):
    import torch_impl.train as ttrain

    def in_training_mode(model, batches):  # the mean loss, but dropout left on
        total, count = 0.0, 0
        for inputs, targets in batches:
            _, loss = model(inputs, targets)
            total, count = total + float(loss.detach()) * targets.numel(), count + targets.numel()
        return total / count

    monkeypatch.setattr(ttrain, "evaluate", in_training_mode)


def _default_ignore_index(monkeypatch):
    import torch_impl.model as tmodel

    real = tmodel.head_loss_forward

    def default(x, head, targets, ignore_index=None, *args, **kwargs):  # -100 whatever the caller asked
        return real(x, head, targets, None if ignore_index is None else -100, *args, **kwargs)

    monkeypatch.setattr(tmodel, "head_loss_forward", default)


def _adamw_eps_left_at_its_default(monkeypatch):
    import torch_impl.train as ttrain

    real = ttrain.build_optimizer

    def default_eps(model, kind="adamw", **kwargs):
        return real(model, kind, **{**kwargs, "eps": 1e-8})

    monkeypatch.setattr(ttrain, "build_optimizer", default_eps)


def _hub_config_read_with_default_eps(monkeypatch):
    import torch_impl.checkpoint as checkpoint

    real = checkpoint.config_from_hf

    def default_eps(hf, *args, **kwargs):  # layer_norm_epsilon ignored where there is no gpt_oracle block
        return real(hf if "gpt_oracle" in hf else {**hf, "layer_norm_epsilon": 1e-5}, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "config_from_hf", default_eps)


def _hub_config_read_as_untied(monkeypatch):
    import torch_impl.checkpoint as checkpoint

    real = checkpoint.config_from_hf

    def untied(hf, *args, **kwargs):  # a missing tie_word_embeddings read as False
        return real({"tie_word_embeddings": False, **hf}, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "config_from_hf", untied)


def _torch_loader_doubles_a_weight(monkeypatch):
    import torch_impl.checkpoint as checkpoint

    real = checkpoint.load_checkpoint

    def doubled(*args, **kwargs):
        config, state = real(*args, **kwargs)
        return config, {k: (v * 2 if k == "wpe.weight" else v) for k, v in state.items()}

    monkeypatch.setattr(checkpoint, "load_checkpoint", doubled)


def _loader_rows_of_a_saved_checkpoint():
    """`check --checkpoint DIR`'s rows without the model rows: a random small model saved by numpy_ref."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        models.build_numpy_model(checks.DEFAULT_CONFIGS["small"], seed=3).save_pretrained(d)
        return [dataclasses.replace(r, component=r.component.replace(d, "DIR"))
                for r in checks.pretrained_rows(d, dtypes=())]


def _split_products_drop_the_bias(monkeypatch):
    import torch_impl.decode as decode
    import torch_impl.linear as linear

    real = linear.streamed_linear

    def biasless(rows, w, b):  # the bias lost where the product is split (GPT-2-sized weights)
        split = w.numel() * w.element_size() >= linear.SPLIT_MIN_BYTES
        return real(rows, w, None if split else b)

    monkeypatch.setattr(linear, "streamed_linear", biasless)
    monkeypatch.setattr(decode, "streamed_linear", biasless)


def _torch_loader_reads_a_stray_head(monkeypatch):
    import torch

    import torch_impl.checkpoint as checkpoint

    real = checkpoint.load_checkpoint

    def stray(*args, **kwargs):  # a tied model's state with an lm_head.weight numpy_ref does not read
        config, state = real(*args, **kwargs)
        return config, {**state, "lm_head.weight": torch.zeros_like(state["wte.weight"])}

    monkeypatch.setattr(checkpoint, "load_checkpoint", stray)


SMALL = checks.DEFAULT_CONFIGS["small"]
TINY = checks.DEFAULT_CONFIGS["tiny"]
FAULT_ROWS = {
    "ignored rows counted": (_ignored_rows_counted,
                             lambda: checks.model_rows("small", SMALL, "float32", variant="ignored targets"),
                             ["model[small] ignored targets loss", "model[small] ignored targets grads (37 tensors)"]),
    "chunk mask top-left": (_top_left_mask, lambda: checks.kv_cache_rows("tiny", TINY),
                            ["kv-cache[tiny] torch cached in chunks 3, 1, rest vs oracle full"]),
    "dropout masks ignored": (_masks_ignored,
                              lambda: checks.model_rows("tiny", TINY, "float64", variant="dropout masks"),
                              ["model[tiny] dropout masks logits", "model[tiny] dropout masks loss",
                               "model[tiny] dropout masks grads (29 tensors)"]),
    "unscaled accumulated gradient": (_sgd_gradient_doubled, lambda: checks.training_rows("tiny", TINY),
                                      ["train[tiny] SGD loss at each of 6 steps",
                                       "train[tiny] SGD weights after 6 steps (29 tensors)"]),
    "torch writes a zero bias": (_torch_saves_a_zero_bias, lambda: checks.checkpoint_rows("tiny", TINY),
                                 ["checkpoint[tiny] torch->numpy logits", "checkpoint[tiny] torch->torch logits"]),
    "loss rounded to bf16": (_bf16_rounded_loss, lambda: checks.model_rows("small", SMALL, "bfloat16"),
                             ["model[small] loss vs its own logits"]),
    "rightmost BPE merge": (_rightmost_merge, checks.tokenizer_rows, ["tokenizer: BPE vs tiktoken (22 edge strings)"]),
    "trainer's dropout masks unscaled": (_trainer_masks_unscaled, lambda: checks.training_rows("tiny", TINY),
                                         ["train[tiny] dropout masks as each trainer draws them"]),
    "trainer keeps a share p": (_trainer_keeps_p, lambda: checks.training_rows("tiny", TINY),
                                ["train[tiny] dropout masks as each trainer draws them"]),
    "torch loader keeps the short batch": (_loader_drop_last_forced("torch_impl.data", False),
                                           lambda: checks.training_rows("tiny", TINY),
                                           ["train[tiny] AdamW loss at each of 6 steps"]),
    "numpy loader drops the short batch": (_loader_drop_last_forced("numpy_ref.data", True),
                                           lambda: checks.training_rows("tiny", TINY),
                                           ["train[tiny] SGD loss at each of 6 steps"]),
    "keys unprefixed in both trees": (_keys_unprefixed_in_both_trees, lambda: checks.checkpoint_rows("tiny", TINY),
                                      ["checkpoint[tiny] tensors as the hub's GPT-2 names them (29, both writers)"]),
    "composed layer norm's eps outside the root": (
        _composed_layernorm_eps_outside_the_root, lambda: checks.derivation_rows("small", SMALL),
        ["oracle[small] hand-derived vs autograd over primitives: logits"]),
    "oracle's layer-norm backward short a term": (
        _hand_derived_layernorm_backward_drops_a_term, lambda: checks.derivation_rows("small", SMALL),
        ["oracle[small] hand-derived vs autograd over primitives: grads (37 tensors)"]),
    "a long prompt cropped from the front": (_long_prompt_cropped_from_the_front,
                                             lambda: checks.generation_rows("tiny", TINY),
                                             ["generate[tiny] greedy from a prompt 3 past the context"]),
    "a long prompt cropped from the front (tied)": (_long_prompt_cropped_from_the_front,
                                                    lambda: checks.generation_rows("small", SMALL),
                                                    ["generate[small] greedy from a prompt 3 past the context"]),
    "letters of Unicode 17": (_letters_of_unicode_17, checks.tokenizer_rows,
                              ["tokenizer: BPE vs tiktoken (22 edge strings)"]),
    "decode drops cut bytes": (_decode_drops_cut_bytes, checks.tokenizer_rows,
                               ["tokenizer: decode of 79 id prefixes (33 cut mid-character) vs tiktoken"]),
    "ignored rows' logits wrong": (_ignored_rows_logits_zeroed,
                                   lambda: checks.model_rows("small", SMALL, "float32", variant="ignored targets"),
                                   ["model[small] ignored targets logits"]),
    "validation swapped for training": (_validation_swapped_for_training, lambda: checks.training_rows("tiny", TINY),
                                        ["train[tiny] AdamW evaluation losses", "train[tiny] SGD evaluation losses"]),
    "clip scales small gradients up": (_clip_scales_every_gradient_to_the_threshold,
                                       lambda: checks.training_rows("tiny", TINY),
                                       ["train[tiny] AdamW weights after 6 steps (29 tensors)"]),
    # numpy_ref's loader refuses the file (a non-zero bias where the config has none): the
    # checkpoint rows fail as one ERROR naming it. With only the first configuration (tiny, which
    # has a qkv bias) checked, this passed.
    "evaluation with dropout on": (_evaluation_without_eval_mode, lambda: checks.training_rows("tiny", TINY),
                                   ["train[tiny] evaluation of a model with dropout, in training mode"]),
    # The targets hold -7 (checks.IGNORED): a loss that ignores -100 instead refuses them as ids.
    "ignore_index taken as -100": (_default_ignore_index,
                                   lambda: checks.model_rows("small", SMALL, "float32", variant="ignored targets"),
                                   ["model[small] ignored targets"], ("ERROR", "-7")),
    "AdamW eps left at 1e-8": (_adamw_eps_left_at_its_default, lambda: checks.training_rows("tiny", TINY),
                               ["train[tiny] AdamW weights after 6 steps (29 tensors)"]),
    "hub config's layer-norm eps ignored": (_hub_config_read_with_default_eps,
                                            lambda: checks.checkpoint_rows("small", SMALL),
                                            ["checkpoint[small] hub-style config.json ->torch logits"]),
    # torch_impl's loader then refuses the file (no lm_head.weight for an untied model).
    "hub config read as untied": (_hub_config_read_as_untied, lambda: checks.checkpoint_rows("small", SMALL),
                                  ["checkpoint[small]"], ("ERROR", "lm_head.weight")),
    "torch_impl's loader doubles a weight": (_torch_loader_doubles_a_weight, _loader_rows_of_a_saved_checkpoint,
                                           ["checkpoint DIR: torch_impl's loader vs numpy_ref's"]),
    "split decoding products drop the bias": (_split_products_drop_the_bias, lambda: checks.kv_cache_rows("tiny", TINY),
                                              ["kv-cache[tiny] torch cached token by token, products split as at "
                                               "GPT-2 size vs oracle full"]),
    "torch_impl's loader reads a stray head": (_torch_loader_reads_a_stray_head, _loader_rows_of_a_saved_checkpoint,
                                               ["checkpoint DIR loaders"], ("ERROR", "torch_impl reads ['lm_head.weight']")),
    "missing qkv bias written as ones": (_torch_fills_a_missing_bias_with_ones,
                                         lambda: checks.checkpoint_rows("small", SMALL),
                                         ["checkpoint[small]"], ("ERROR", "is non-zero but the config has qkv_bias=False")),
}


@pytest.mark.parametrize("fault", list(FAULT_ROWS))
def test_checks_extra_rows_pass_on_the_real_trees_and_fail_on_the_fault_they_exist_for(fault, monkeypatch):
    """Each fault fails the rows named, as a MISMATCH (an ERROR would also be what an exception in
    the injected code gives); where the trees refuse the fault themselves, as the ERROR expected."""
    inject, rows_of, must_fail, *expected = FAULT_ROWS[fault]
    verdict, says = expected[0] if expected else ("MISMATCH", "")
    clean = rows_of()
    assert all(r.ok for r in clean), [(r.component, r.verdict, r.detail) for r in clean if not r.ok]
    names = [r.component for r in clean]
    if verdict == "MISMATCH":
        assert all(name in names for name in must_fail), f"rows {must_fail} not among {names}"
    inject(monkeypatch)
    faulty = {r.component: r for r in rows_of()}
    missing = [name for name in must_fail if name not in faulty]
    assert not missing, f"under the fault {fault!r} no rows {missing} among {list(faulty)}"
    passed = [name for name in must_fail if faulty[name].verdict != verdict or says not in faulty[name].detail]
    assert not passed, f"under the fault {fault!r} these rows did not report {verdict} {says!r}: " + "; ".join(
        f"{name}: {faulty[name].verdict} {faulty[name].detail}" for name in passed)


def test_training_rows_run_on_tiny_whatever_the_configuration():
    """Six float64 NumPy steps of GPT-2 small took minutes in `check --config gpt2-small`; the
    trainers' bookkeeping does not depend on the model's size, so their rows use `tiny`."""
    rows = checks.run_check(configs={"small": SMALL}, dtypes=())
    trained = [r.component for r in rows if r.component.startswith("train[")]
    assert trained and all(c.startswith("train[tiny] ") for c in trained), trained
    assert all(r.ok for r in rows), [(r.component, r.detail) for r in rows if not r.ok]



def test_the_adamw_training_row_clips_some_steps_and_not_others(monkeypatch):
    """Its premise: a clip that also scaled small gradients up (no min(1, .)) passed a run where
    every step's norm was over the threshold (0.05, against norms of 0.61 to 0.86)."""
    import numpy_ref.train as ntrain

    norms, real = [], ntrain.clip_grad_norm

    def recorded(grads, max_norm):
        norms.append(real(grads, max_norm))
        return norms[-1]

    monkeypatch.setattr(ntrain, "clip_grad_norm", recorded)
    rows = checks.training_rows("tiny", TINY)
    assert all(r.ok for r in rows), [(r.component, r.detail) for r in rows if not r.ok]
    clip = checks.TRAINING_RUNS["AdamW"]["grad_clip"]
    assert len(norms) == checks.TRAINING_STEPS, norms
    assert any(n > clip for n in norms) and any(n < clip for n in norms), f"norms {norms} against the clip {clip}"


@pytest.mark.parametrize("context, chunked", [(1, False), (4, False), (5, False), (6, True)])
def test_kv_cache_rows_take_the_chunks_only_where_a_chunk_follows_a_past(context, chunked):
    """[0, 3, 4, T] cuts gave an empty chunk (an ERROR for all four rows) at a context of 4 or
    less, and a one-token "rest" at 5."""
    rows = checks.kv_cache_rows("c", dict(TINY, context_length=context))
    assert all(r.ok for r in rows), [(r.component, r.verdict, r.detail) for r in rows]
    names = [r.component for r in rows]
    assert len(names) == (5 if chunked else 3) and any("chunks" in n for n in names) == chunked, names


def test_ignored_targets_keep_one_position_counted():
    one = checks.with_ignored_targets(np.array([[5]]), 0)
    assert one.tolist() == [[5]]
    many = checks.with_ignored_targets(np.arange(24).reshape(2, 12), 0)
    assert many.flat[0] == checks.IGNORED and many.flat[-1] != checks.IGNORED
    assert 0 < int((many == checks.IGNORED).sum()) < 24


def test_cache_generation_and_checkpoint_rows_run_for_every_configuration():
    """Only the first configuration had them: a torch_impl checkpoint writer that filled the missing
    qkv bias of `small` wrongly passed `check`."""
    rows = checks.run_check(configs={"tiny": TINY, "small": SMALL}, dtypes=())
    names = [r.component for r in rows]
    for name in ("tiny", "small"):
        for row in (f"kv-cache[{name}] torch cached in chunks 3, 1, rest vs oracle full", f"generate[{name}] top-p 0.9",
                    f"generate[{name}] temperature 0.8, a stop token", f"generate[{name}] greedy past the context",
                    f"checkpoint[{name}] torch->numpy logits"):
            assert row in names, f"{row} missing from {names}"
    assert "checkpoint[small] hub-style config.json ->numpy logits" in names  # small is tied, tiny is not



@pytest.mark.parametrize("seed", [0, 6, 13, 15, 24])
def test_the_stop_token_row_is_there_whatever_the_seed(seed):
    """It took row 0's second new token and was left out where row 1 made that token too (tiny:
    seeds 6, 13, 15 and 24 of 0-24); now any of row 0's new tokens that row 1 never makes."""
    rows = checks.generation_rows("tiny", TINY, seed=seed)
    stop = [r for r in rows if r.component == "generate[tiny] temperature 0.8, a stop token"]
    assert len(stop) == 1 and stop[0].ok, [(r.component, r.verdict, r.detail) for r in rows]


def test_generation_past_the_context_runs_at_a_long_context_with_the_context_cut():
    """At a context over PAST_CONTEXT_MAX (every GPT-2 preset) the row was left out."""
    rows = checks.generation_rows("long", dict(TINY, context_length=checks.PAST_CONTEXT_MAX + 44))
    names = [r.component for r in rows]
    want = f"generate[long] greedy past the context (context cut to {checks.PAST_CONTEXT_MAX})"
    assert want in names and all(r.ok for r in rows), [(r.component, r.verdict, r.detail) for r in rows]
