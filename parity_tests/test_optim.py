"""Optimisers, clipping and the schedule: numpy_ref against torch.optim, and the two trees.

- numpy_ref.optim.AdamW / SGD against torch.optim.AdamW / SGD run directly (the reference), and
  torch_impl.optim's builder against numpy_ref, on random gradients (float64);
- clipping against torch.nn.utils.clip_grad_norm_; the schedule against its closed form and
  torch's CosineAnnealingLR;
- at least 10 AdamW steps with clipping and warmup + cosine on a tiny GPT from the same weights
  on the same batches: the same losses and parameters in both trees (float64; issue 5/7);
- optimiser state moves between the trees and the run continues identically.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from numpy_ref import optim as nopt
from parity_tests.compare import assert_close, assert_dicts_close, load_numpy_params_into_torch, to_numpy
from parity_tests.strategies import random_array, seeds
from parity_tests.tolerances import forward_tol, gradient_tol
from torch_impl import optim as topt

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.py


# An optimiser step is a handful of elementwise float64 operations per step on top of the
# gradient, so after 10-20 steps the trees differ only by reassociation noise: the float64
# gradient tolerance (a longer chain than a forward) covers it with a wide margin.
STEP_TOL = gradient_tol("float64")

SHAPES = {"wte.weight": (7, 4), "wpe.weight": (5, 4), "h.0.ln_1.weight": (4,), "h.0.ln_1.bias": (4,),
          "h.0.attn.c_attn.weight": (4, 12), "h.0.attn.c_attn.bias": (12,), "h.0.mlp.c_fc.weight": (4, 16),
          "lm_head.weight": (7, 4)}


def _params(seed: int) -> dict[str, np.ndarray]:
    return {k: random_array(seed + i, s) for i, (k, s) in enumerate(SHAPES.items())}


def _grads(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: random_array(10_000 + seed + i, s, scale) for i, (k, s) in enumerate(SHAPES.items())}


class _Holder(torch.nn.Module):
    """A module whose named_parameters() are SHAPES' names (dots become nested modules)."""

    def __init__(self, params: dict[str, np.ndarray]) -> None:
        super().__init__()
        for name, value in params.items():
            *path, leaf = name.split(".")
            node = self
            for part in path:
                if not hasattr(node, part):
                    node.add_module(part, torch.nn.Module())
                node = getattr(node, part)
            node.register_parameter(leaf, torch.nn.Parameter(torch.tensor(value)))


def _set_grads(module: torch.nn.Module, grads: dict[str, np.ndarray]) -> None:
    for name, p in module.named_parameters():
        p.grad = torch.tensor(grads[name])


def _torch_params(module) -> dict[str, np.ndarray]:
    return {k: to_numpy(p) for k, p in module.named_parameters()}


# ---- AdamW and SGD against torch.optim ------------------------------------------------------


@given(seed=seeds(), lr=st.floats(1e-4, 1e-1), wd=st.sampled_from([0.0, 0.01, 0.1]),
       beta1=st.sampled_from([0.0, 0.9]), beta2=st.sampled_from([0.95, 0.999]), steps=st.integers(1, 12),
       decay=st.sampled_from(["gpt2", "all"]))
@settings(max_examples=12)
def test_adamw_matches_torch_optim_adamw(seed, lr, wd, beta1, beta2, steps, decay):
    seed %= 2**20
    params = _params(seed)
    reference = _Holder(params)
    rule = nopt.get_decay_rule(decay)
    groups = [{"params": [p for n, p in reference.named_parameters() if rule(n, tuple(p.shape))], "weight_decay": wd},
              {"params": [p for n, p in reference.named_parameters() if not rule(n, tuple(p.shape))],
               "weight_decay": 0.0}]
    ref_opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(beta1, beta2), eps=1e-8,
                                foreach=False)
    ours = nopt.AdamW({k: v.copy() for k, v in params.items()}, lr=lr, betas=(beta1, beta2), eps=1e-8,
                      weight_decay=wd, decay=decay)
    for t in range(steps):
        grads = _grads(seed + 100 * t)
        _set_grads(reference, grads)
        ref_opt.step()
        ours.step(grads)
    assert_dicts_close("numpy AdamW vs torch.optim.AdamW", ours.params, _torch_params(reference), STEP_TOL)


@given(seed=seeds(), lr=st.floats(1e-3, 1e-1), momentum=st.sampled_from([0.0, 0.9]),
       wd=st.sampled_from([0.0, 0.1]), steps=st.integers(1, 8))
@settings(max_examples=8)
def test_sgd_matches_torch_optim_sgd(seed, lr, momentum, wd, steps):
    seed %= 2**20
    params = _params(seed)
    reference = _Holder(params)
    ref_opt = torch.optim.SGD(topt.param_groups(reference, wd, "gpt2"), lr=lr, momentum=momentum)
    ours = nopt.SGD({k: v.copy() for k, v in params.items()}, lr=lr, momentum=momentum, weight_decay=wd)
    for t in range(steps):
        grads = _grads(seed + 100 * t)
        _set_grads(reference, grads)
        ref_opt.step()
        ours.step(grads)
    assert_dicts_close("numpy SGD vs torch.optim.SGD", ours.params, _torch_params(reference), STEP_TOL)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_torch_builder_matches_numpy_and_state_crosses_trees(kind):
    """torch_impl.optim.build_optimizer (fused AdamW where supported) follows numpy_ref for 6
    steps; then numpy's state is loaded into a fresh torch optimiser and 4 more steps agree."""
    params = _params(3)
    holder = _Holder(params)
    extra = {"momentum": 0.9} if kind == "sgd" else {}
    t_opt = topt.build_optimizer(holder, kind, lr=0.01, weight_decay=0.1, **extra)
    n_opt = nopt.build_optimizer({k: v.copy() for k, v in params.items()}, kind, lr=0.01, weight_decay=0.1, **extra)
    for t in range(6):
        grads = _grads(t)
        _set_grads(holder, grads)
        t_opt.step()
        n_opt.step(grads)
    assert_dicts_close(f"{kind}: torch_impl builder vs numpy_ref after 6 steps", _torch_params(holder), n_opt.params,
                       STEP_TOL)
    t_state, t_tensors = topt.optimizer_state(t_opt, holder)
    n_state, n_arrays = n_opt.state_dict()
    assert sorted(t_tensors) == sorted(n_arrays), f"state keys differ: {sorted(t_tensors)} vs {sorted(n_arrays)}"
    assert t_state["decay"] == n_state["decay"], f"decay sets differ: {t_state['decay']} vs {n_state['decay']}"
    assert_dicts_close(f"{kind} state", t_tensors, n_arrays, STEP_TOL)
    # numpy's state into a new torch optimiser over numpy's weights: both continue identically.
    holder2 = _Holder(n_opt.params)
    t_opt2 = topt.build_optimizer(holder2, kind, lr=0.01, weight_decay=0.1, **extra)
    topt.load_optimizer_state(t_opt2, holder2, n_state, {k: torch.tensor(v) for k, v in n_arrays.items()})
    for t in range(6, 10):
        grads = _grads(t)
        _set_grads(holder2, grads)
        t_opt2.step()
        n_opt.step(grads)
    assert_dicts_close(f"{kind}: resumed from numpy's state", _torch_params(holder2), n_opt.params, STEP_TOL)


@pytest.mark.parametrize("fused", [False, None])
def test_torch_builder_takes_every_adamw_setting_as_numpy_does(fused):
    """betas, eps, weight decay and the decay rule away from their defaults, with gradients small
    enough that eps matters: an optimiser that dropped one (a survey's mutation: eps left at 1e-8)
    passed every other test."""
    settings = dict(lr=0.02, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.3, decay="all")
    params = _params(5)
    holder = _Holder(params)
    t_opt = topt.build_optimizer(holder, "adamw", fused=fused, **settings)
    n_opt = nopt.build_optimizer({k: v.copy() for k, v in params.items()}, "adamw", **settings)
    for t in range(5):
        grads = _grads(40 + t, scale=1e-3)  # |g| ~ eps: eps shapes every step
        _set_grads(holder, grads)
        t_opt.step()
        n_opt.step(grads)
    assert_dicts_close("torch_impl AdamW vs numpy_ref, every setting off its default", _torch_params(holder),
                       n_opt.params, STEP_TOL)


def test_decay_sets_follow_gpt2_practice_in_both_trees():
    from numpy_ref.config import get_config
    from numpy_ref.params import param_shapes

    shapes = dict(param_shapes(get_config("tiny")))
    decayed = sorted(k for k, s in shapes.items() if nopt.gpt2_decay(k, s))
    expected = sorted(k for k in shapes if k.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))
                      or k == "lm_head.weight")
    assert decayed == expected, f"numpy decay set {decayed} != expected {expected}"
    torch_decayed = sorted(k for k, s in shapes.items() if topt.gpt2_decay(k, s))
    assert torch_decayed == decayed, f"torch decay set {torch_decayed} != numpy's {decayed}"
    assert all(nopt.all_decay(k, s) for k, s in shapes.items())
    with pytest.raises(ValueError, match="unknown decay set 'bias'"):
        nopt.get_decay_rule("bias")
    with pytest.raises(ValueError, match="unknown decay set 'bias'"):
        topt.get_decay_rule("bias")


# ---- clipping -------------------------------------------------------------------------------


@given(seed=seeds(), scale=st.sampled_from([0.0, 1e-3, 1.0, 30.0]), max_norm=st.sampled_from([0.1, 1.0, 5.0]))
@settings(max_examples=12)
def test_clip_grad_norm_matches_torch_in_both_trees(seed, scale, max_norm):
    grads = _grads(seed % 2**20, scale)
    reference = _Holder(_params(0))
    _set_grads(reference, grads)
    ref_norm = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm))
    ref_grads = {k: to_numpy(p.grad) for k, p in reference.named_parameters()}

    ours = {k: v.copy() for k, v in grads.items()}
    norm = nopt.clip_grad_norm(ours, max_norm)
    assert_close("numpy global norm", np.array(norm), np.array(ref_norm), forward_tol("float64"))
    assert_dicts_close("numpy clipped grads", ours, ref_grads, forward_tol("float64"))

    holder = _Holder(_params(0))
    _set_grads(holder, grads)
    t_norm = topt.clip_grad_norm(holder.parameters(), max_norm)
    assert_close("torch global norm", np.array(t_norm), np.array(ref_norm), forward_tol("float64"))
    assert_dicts_close("torch clipped grads", {k: to_numpy(p.grad) for k, p in holder.named_parameters()}, ref_grads,
                       forward_tol("float64"))
    if ref_norm <= max_norm:  # below the limit nothing changes (up to the 1e-6 guard)
        assert_dicts_close("unclipped grads", ours, grads, forward_tol("float64"))


def test_clip_leaves_non_finite_gradients_alone_and_reports_the_norm():
    grads = _grads(0)
    grads["wte.weight"][0, 0] = np.nan
    before = {k: v.copy() for k, v in grads.items()}
    assert math.isnan(nopt.clip_grad_norm(grads, 1.0)), "numpy norm of a NaN gradient should be NaN"
    assert np.array_equal(grads["h.0.mlp.c_fc.weight"], before["h.0.mlp.c_fc.weight"]), "numpy scaled NaN grads"
    holder = _Holder(_params(0))
    _set_grads(holder, before)
    assert math.isnan(topt.clip_grad_norm(holder.parameters(), 1.0)), "torch norm of a NaN gradient should be NaN"
    after = {k: to_numpy(p.grad) for k, p in holder.named_parameters()}
    assert np.array_equal(after["h.0.mlp.c_fc.weight"], before["h.0.mlp.c_fc.weight"]), "torch scaled NaN grads"
    with pytest.raises(ValueError, match="max_norm must be > 0, got 0"):
        nopt.clip_grad_norm(grads, 0)
    with pytest.raises(ValueError, match="max_norm must be > 0, got -1"):
        topt.clip_grad_norm(holder.parameters(), -1)


# ---- the schedule ---------------------------------------------------------------------------


@given(warmup=st.integers(0, 10), extra=st.integers(1, 40), max_lr=st.floats(1e-5, 1.0),
       frac=st.sampled_from([0.0, 0.1, 1.0]))
@settings(max_examples=12)
def test_lr_schedule_warmup_then_cosine_in_both_trees(warmup, extra, max_lr, frac):
    total, min_lr = warmup + extra, max_lr * frac
    kw = dict(max_lr=max_lr, min_lr=min_lr, warmup_steps=warmup, total_steps=total)
    lrs = np.array([nopt.lr_at_step(s, **kw) for s in range(total + 3)])
    t_lrs = np.array([topt.lr_at_step(s, **kw) for s in range(total + 3)])
    assert_close("torch lr_at_step vs numpy", t_lrs, lrs, forward_tol("float64"))
    # Warmup: max_lr * (s + 1) / warmup, reaching max_lr at its last step.
    expected_warm = max_lr * np.arange(1, warmup + 1) / max(warmup, 1)
    assert_close("warmup lrs", lrs[:warmup], expected_warm, forward_tol("float64"))
    # Cosine: torch's CosineAnnealingLR over total - warmup steps is the reference.
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=max_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=extra, eta_min=min_lr)
    ref = []
    for _ in range(extra):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert_close("cosine part vs CosineAnnealingLR", lrs[warmup:total], np.array(ref), Tol_sched)
    assert np.all(np.diff(lrs[warmup:total]) <= 1e-15), f"cosine part not non-increasing: {lrs[warmup:total]}"
    assert np.all(lrs[total:] == min_lr), f"after total_steps the lr should be min_lr={min_lr}: {lrs[total:]}"


# CosineAnnealingLR updates the lr recursively (each step from the last), so it accumulates a
# few ulps per step relative to the closed form.
Tol_sched = forward_tol("float32")


def test_lr_schedule_rejects_bad_arguments():
    for fn in (nopt.lr_at_step, topt.lr_at_step):
        with pytest.raises(ValueError, match="warmup_steps=11 exceeds total_steps=10"):
            fn(0, max_lr=1.0, min_lr=0.0, warmup_steps=11, total_steps=10)
        with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
            fn(-1, max_lr=1.0, min_lr=0.0, warmup_steps=1, total_steps=10)
        with pytest.raises(ValueError, match="min_lr=2.0, max_lr=1.0"):
            fn(0, max_lr=1.0, min_lr=2.0, warmup_steps=1, total_steps=10)
        for bad in (float("nan"), float("inf")):  # NaN passed every comparison; inf gave inf or NaN
            with pytest.raises(ValueError, match="max_lr must be a finite number"):
                fn(3, max_lr=bad, min_lr=0.0, warmup_steps=1, total_steps=10)
            with pytest.raises(ValueError, match="min_lr must be a finite number"):
                fn(3, max_lr=1.0, min_lr=bad, warmup_steps=1, total_steps=10)
        with pytest.raises(ValueError, match="step must be an int >= 0, got True"):  # numpy_ref took it as 1
            fn(True, max_lr=1.0, min_lr=0.0, warmup_steps=1, total_steps=10)
        assert fn(np.int64(3), max_lr=1.0, min_lr=0.0, warmup_steps=1, total_steps=10) == \
            fn(3, max_lr=1.0, min_lr=0.0, warmup_steps=1, total_steps=10), "a NumPy integer step (torch refused it)"
        # a small NumPy integer wrapped in the warmup arithmetic: uint8 255 + 1 = 0, a learning rate of 0
        assert fn(np.uint8(255), max_lr=1.0, min_lr=0.0, warmup_steps=300, total_steps=400) == \
            fn(255, max_lr=1.0, min_lr=0.0, warmup_steps=300, total_steps=400) == 256 / 300


# ---- the two trees on a model ---------------------------------------------------------------


def test_adamw_with_clipping_and_schedule_on_gpt_agrees_across_trees():
    """12 AdamW steps (weight decay, clipping at 0.5, 3 warmup steps then cosine) on the tiny
    GPT from the same weights and batches: the same loss at every step and the same weights."""
    from numpy_ref.config import get_config as np_config
    from numpy_ref.model import GPTModel as NumpyGPT
    from torch_impl.config import get_config as torch_config
    from torch_impl.model import GPTModel as TorchGPT

    cfg = dict(context_length=8)
    n_model = NumpyGPT(np_config("tiny", **cfg), seed=1)
    t_model = TorchGPT(torch_config("tiny", **cfg), seed=2, dtype=torch.float64)
    load_numpy_params_into_torch(t_model, n_model.params)
    rng = np.random.default_rng(0)
    n_opt = nopt.AdamW(n_model.params, lr=3e-3, weight_decay=0.1)
    t_opt = topt.build_optimizer(t_model, "adamw", lr=3e-3, weight_decay=0.1)
    sched = dict(max_lr=3e-2, min_lr=3e-3, warmup_steps=3, total_steps=12)
    for step in range(12):
        ids = rng.integers(0, 101, (3, 8))
        targets = rng.integers(0, 101, (3, 8))
        _, n_loss, cache = n_model.forward(ids, targets)
        grads = n_model.backward(cache)
        n_norm = nopt.clip_grad_norm(grads, 0.5)
        n_opt.step(grads, lr=nopt.lr_at_step(step, **sched))

        _, t_loss = t_model(torch.tensor(ids), torch.tensor(targets))
        t_loss.backward()
        t_norm = topt.clip_grad_norm(t_model.parameters(), 0.5)
        topt.set_lr(t_opt, topt.lr_at_step(step, **sched))
        t_opt.step()
        t_opt.zero_grad()
        assert_close(f"loss at step {step}", t_loss, n_loss, forward_tol("float64"))
        assert_close(f"gradient norm at step {step}", np.array(t_norm), np.array(n_norm), gradient_tol("float64"))
        assert n_norm > 0.5, f"step {step}: norm {n_norm} never reached the clip, so clipping went untested"
    assert_dicts_close("weights after 12 AdamW steps", {k: to_numpy(v) for k, v in t_model.state_dict().items()},
                       n_model.params, STEP_TOL)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n", [1, 7, nopt._BLOCK, 2 * nopt._BLOCK + 13])
def test_blocked_adamw_equals_the_whole_array_formula_bit_for_bit(dtype, n, threads, monkeypatch):
    """The cache-blocked update is the docstring's formula, element for element, across block edges
    and, with `threads` > 1, split unevenly between threads (every size here counts as large)."""
    monkeypatch.setattr(nopt, "_PARALLEL_MIN", 1)
    monkeypatch.setattr(nopt, "_threads", lambda: threads)
    rng = np.random.default_rng(n)
    p0 = rng.standard_normal((n,)).astype(dtype)
    grads = [rng.standard_normal((n,)).astype(dtype) for _ in range(3)]
    lr, wd, (b1, b2), eps = 1e-3, 0.1, (0.9, 0.95), 1e-8
    opt = nopt.AdamW({"h.0.mlp.c_fc.weight": p0.reshape(n, 1).copy()}, lr=lr, betas=(b1, b2), eps=eps,
                     weight_decay=wd)
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for t, g in enumerate(grads, start=1):
        opt.step({"h.0.mlp.c_fc.weight": g.reshape(n, 1)})
        p *= 1.0 - lr * wd
        m = b1 * m + (1.0 - b1) * g
        v = b2 * v + (1.0 - b2) * g * g
        p -= (lr / (1.0 - b1**t)) * m / (np.sqrt(v) / math.sqrt(1.0 - b2**t) + eps)
        got = opt.params["h.0.mlp.c_fc.weight"].reshape(-1)
        assert got.dtype == dtype, f"step {t}: dtype drifted to {got.dtype}"
        diff = np.flatnonzero(got != p)
        assert diff.size == 0, (f"step {t}: {diff.size} of {n} elements differ from the formula, first at {diff[0]}: "
                                f"{got[diff[0]]!r} vs {p[diff[0]]!r}")
        assert np.array_equal(opt.exp_avg["h.0.mlp.c_fc.weight"].reshape(-1), m), f"step {t}: exp_avg differs"
        assert np.array_equal(opt.exp_avg_sq["h.0.mlp.c_fc.weight"].reshape(-1), v), f"step {t}: exp_avg_sq differs"


def test_adamw_rejects_a_gradient_of_another_dtype():
    opt = nopt.AdamW({"h.0.mlp.c_fc.weight": np.zeros((2, 3), dtype=np.float32)})
    with pytest.raises(TypeError, match=r"h\.0\.mlp\.c_fc\.weight is float64, the parameter float32"):
        opt.step({"h.0.mlp.c_fc.weight": np.zeros((2, 3))})


# ---- loading optimiser state: before the first step, settings, failures ----------------------


def _torch_snapshot(opt) -> dict:
    """Every group setting and every state tensor of a torch optimiser, copied."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    state = {i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
             for i, st in enumerate(opt.state.values())}
    return {"groups": groups, "state": state}


def _same_snapshot(a: dict, b: dict) -> bool:
    if a["groups"] != b["groups"] or a["state"].keys() != b["state"].keys():
        return False
    return all(torch.equal(x, b["state"][i][k]) if isinstance(x, torch.Tensor) else x == b["state"][i][k]
               for i, st in a["state"].items() for k, x in st.items())


@pytest.mark.parametrize("source", ["numpy", "torch"])
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_state_saved_before_the_first_step_loads_in_both_trees(kind, source):
    """A run saved before any step (numpy_ref keeps zero moments, torch none) loads into either
    tree, and the next step equals a fresh optimiser's step."""
    params = _params(5)
    extra = {"momentum": 0.9} if kind == "sgd" else {}
    if source == "numpy":
        state, arrays = nopt.build_optimizer({k: v.copy() for k, v in params.items()}, kind, lr=0.01,
                                             weight_decay=0.1, **extra).state_dict()
    else:
        holder0 = _Holder(params)
        state, arrays = topt.optimizer_state(topt.build_optimizer(holder0, kind, lr=0.01, weight_decay=0.1, **extra),
                                             holder0)
        arrays = {k: to_numpy(v) for k, v in arrays.items()}
    assert state["step"] == 0
    fresh_t, loaded_t = _Holder(params), _Holder(params)
    opts_t = [topt.build_optimizer(h, kind, lr=0.01, weight_decay=0.1, **extra) for h in (fresh_t, loaded_t)]
    topt.load_optimizer_state(opts_t[1], loaded_t, state, {k: torch.tensor(v) for k, v in arrays.items()})
    fresh_n, loaded_n = (nopt.build_optimizer({k: v.copy() for k, v in params.items()}, kind, lr=0.01,
                                              weight_decay=0.1, **extra) for _ in range(2))
    loaded_n.load_state_dict(state, arrays)
    for t in range(2):
        grads = _grads(t)
        for h, o in zip((fresh_t, loaded_t), opts_t):
            _set_grads(h, grads)
            o.step()
        fresh_n.step(grads)
        loaded_n.step(grads)
    for k, v in _torch_params(fresh_t).items():
        assert np.array_equal(v, _torch_params(loaded_t)[k]), f"torch, {kind} from {source}: {k} differs"
        assert np.array_equal(fresh_n.params[k], loaded_n.params[k]), f"numpy, {kind} from {source}: {k} differs"


def test_loading_restores_the_saved_settings_in_both_trees():
    """betas, eps and weight_decay (AdamW) come from the state, as torch's own load_state_dict
    restores its groups' settings: an optimiser built with other values takes the saved ones."""
    params = _params(6)
    n_opt = nopt.AdamW({k: v.copy() for k, v in params.items()}, lr=0.02, betas=(0.8, 0.9), eps=1e-6,
                       weight_decay=0.3)
    n_opt.step(_grads(0))
    state, arrays = n_opt.state_dict()
    other = nopt.AdamW({k: v.copy() for k, v in params.items()}, lr=1.0, betas=(0.5, 0.5), eps=1e-3, weight_decay=0.7)
    other.load_state_dict(state, arrays)
    assert (other.lr, other.betas, other.eps, other.weight_decay) == (0.02, (0.8, 0.9), 1e-6, 0.3), \
        f"numpy kept its own settings: {(other.lr, other.betas, other.eps, other.weight_decay)}"
    holder = _Holder(params)
    t_opt = topt.build_optimizer(holder, "adamw", lr=1.0, betas=(0.5, 0.5), eps=1e-3, weight_decay=0.7)
    topt.load_optimizer_state(t_opt, holder, state, {k: torch.tensor(v) for k, v in arrays.items()})
    decay_group, plain_group = t_opt.param_groups
    got = (decay_group["lr"], decay_group["betas"], decay_group["eps"], decay_group["weight_decay"],
           plain_group["weight_decay"])
    assert got == (0.02, (0.8, 0.9), 1e-6, 0.3, 0.0), f"torch settings after loading: {got}"


def _broken_states(kind: str, state: dict, arrays: dict) -> dict:
    """name -> (state, arrays, error type, message pattern), each broken in one way."""
    first = next(iter(arrays))
    wrong_shape = dict(arrays, **{first: np.zeros((3, 3))})
    missing = {k: v for k, v in arrays.items() if k != sorted(arrays)[-1]}
    cases = {
        "a missing array": (state, missing, KeyError, "lacks"),
        "a wrong shape": (state, wrong_shape, ValueError, r"has shape \(3, 3\)"),
        "an unknown array": (state, dict(arrays, zzz=np.zeros(2)), ValueError, "unknown .*zzz"),
        "a NaN learning rate": (dict(state, lr=float("nan")), arrays, ValueError, "'?lr'? must be a finite number"),
        "another kind": (dict(state, kind="sgd" if kind == "adamw" else "adamw"), arrays, ValueError, "is for"),
        "another decay set": (dict(state, decay=state["decay"][:-1]), arrays, ValueError, "another set"),
    }
    if kind == "sgd":
        cases["buffers without momentum"] = (dict(state, momentum=0.0), arrays, (ValueError, KeyError),
                                             "momentum")
    else:  # each loaded, then the next step wrote NaN into the weights
        v = next(k for k in sorted(arrays) if k.startswith("exp_avg_sq."))
        cases["a negative second moment"] = (state, dict(arrays, **{v: -np.abs(arrays[v]) - 1.0}), ValueError,
                                             f"{v} has negative values")
        cases["eps 0"] = (dict(state, eps=0.0), arrays, ValueError, "'eps': eps must be > 0")
    return cases


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_a_failed_load_changes_nothing_in_either_tree(kind):
    """Each broken state raises naming the problem; the optimiser that refused it has the same
    moments, buffers and settings as before and still steps."""
    params = _params(7)
    extra = {"momentum": 0.9} if kind == "sgd" else {}
    src = nopt.build_optimizer({k: v.copy() for k, v in params.items()}, kind, lr=0.01, weight_decay=0.1, **extra)
    for t in range(2):
        src.step(_grads(t))
    state, arrays = src.state_dict()
    for what, (bad_state, bad_arrays, error, match) in _broken_states(kind, state, arrays).items():
        n_opt = nopt.build_optimizer({k: v.copy() for k, v in params.items()}, kind, lr=0.05, weight_decay=0.2,
                                     **extra)
        n_opt.step(_grads(9))
        before_state, before_arrays = n_opt.state_dict()
        with pytest.raises(error, match=match):
            n_opt.load_state_dict(bad_state, bad_arrays)
        after_state, after_arrays = n_opt.state_dict()
        assert after_state == before_state, f"numpy {kind}, {what}: settings changed by a failed load"
        assert after_arrays.keys() == before_arrays.keys() and all(
            np.array_equal(after_arrays[k], before_arrays[k]) for k in before_arrays), \
            f"numpy {kind}, {what}: moments or buffers changed by a failed load"
        n_opt.step(_grads(10))

        holder = _Holder(params)
        t_opt = topt.build_optimizer(holder, kind, lr=0.05, weight_decay=0.2, **extra)
        _set_grads(holder, _grads(9))
        t_opt.step()
        before = _torch_snapshot(t_opt)
        with pytest.raises(error, match=match):
            topt.load_optimizer_state(t_opt, holder, bad_state, {k: torch.tensor(v) for k, v in bad_arrays.items()})
        assert _same_snapshot(before, _torch_snapshot(t_opt)), f"torch {kind}, {what}: a failed load changed it"
        _set_grads(holder, _grads(10))
        t_opt.step()


@pytest.mark.parametrize("kind, kwargs, error, match", [
    ("adamw", dict(weight_decay=-1.0), ValueError, "weight_decay must be a finite number"),  # torch took it
    ("sgd", dict(lr=float("nan")), ValueError, "lr must be a finite number"),  # torch took it
    ("sgd", dict(momentum=1.0), ValueError, r"momentum must be a finite number in \[0, 1.0\)"),  # torch took it
    ("adamw", dict(weight_decay="0.1"), TypeError, "weight_decay must be a number, got '0.1'"),
    ("adamw", dict(lr="0.1"), TypeError, "lr must be a number, got '0.1'"),  # no field named before
    ("sgd", dict(lr="0.1"), TypeError, "lr must be a number, got '0.1'"),
    ("adamw", dict(lr=float("inf")), ValueError, "lr must be a finite number"),  # accepted by both
    ("adamw", dict(eps=float("inf")), ValueError, "eps must be a finite number"),
    ("adamw", dict(eps=0.0), ValueError, "eps must be > 0"),  # 0/0 = NaN where a gradient has been 0
    ("adamw", dict(weight_decay=float("inf")), ValueError, "weight_decay must be a finite number"),
    ("adamw", dict(betas=(0.9, 1.0)), ValueError, "betas must be a finite number in"),
    ("adamw", dict(betas=0.9), TypeError, "betas must be two numbers"),
    ("adamw", dict(lr=True), TypeError, "lr must be a number, got True"),
])
def test_bad_optimiser_arguments_are_refused_alike_naming_the_argument(kind, kwargs, error, match):
    """docs/design.md: an optimiser argument of the wrong type is a TypeError and one out of range
    a ValueError, naming it, when the optimiser is made; torch_impl checked none of them."""
    params = _params(8)
    with pytest.raises(error, match=f"{kind}: {match}"):
        nopt.build_optimizer({k: v.copy() for k, v in params.items()}, kind, **kwargs)
    with pytest.raises(error, match=f"{kind}: {match}"):
        topt.build_optimizer(_Holder(params), kind, **kwargs)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("lr", [float("nan"), -1.0, float("inf")])
def test_a_bad_per_step_learning_rate_is_refused_before_any_update(kind, lr):
    params = _params(8)
    n_opt = nopt.build_optimizer({k: v.copy() for k, v in params.items()}, kind, lr=0.01)
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        n_opt.step(_grads(0), lr=lr)
    assert all(np.array_equal(n_opt.params[k], params[k]) for k in params), "numpy: weights changed"
    assert n_opt.step_count == 0, f"numpy: the refused step was counted ({n_opt.step_count})"
    t_opt = topt.build_optimizer(_Holder(params), kind, lr=0.01)
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        topt.set_lr(t_opt, lr)
    assert all(g["lr"] == 0.01 for g in t_opt.param_groups), "torch: a refused lr was set"
    with pytest.raises(TypeError, match="lr must be a number, got 'x'"):  # a wrong type was a ValueError
        n_opt.step(_grads(0), lr="x")
    with pytest.raises(TypeError, match="lr must be a number, got 'x'"):
        topt.set_lr(t_opt, "x")


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_torch_sgd_state_round_trips_in_both_trees(momentum):
    """torch's SGD keeps no step count, so its saved state says step 0 even after steps; with
    momentum the buffers are what says it has stepped. Saved from torch after 3 steps, the state
    loads into torch and into numpy_ref, and the next steps agree with the uninterrupted run."""
    params = _params(11)
    holder = _Holder(params)
    t_opt = topt.build_optimizer(holder, "sgd", lr=0.01, momentum=momentum, weight_decay=0.1)
    for t in range(3):
        _set_grads(holder, _grads(t))
        t_opt.step()
    state, tensors = topt.optimizer_state(t_opt, holder)
    assert state["step"] == 0 and bool(tensors) == (momentum > 0), (state["step"], sorted(tensors))
    weights = _torch_params(holder)
    resumed = _Holder(weights)
    t_opt2 = topt.build_optimizer(resumed, "sgd", lr=0.01, momentum=momentum, weight_decay=0.1)
    topt.load_optimizer_state(t_opt2, resumed, state, tensors)
    n_opt = nopt.build_optimizer({k: v.copy() for k, v in weights.items()}, "sgd", lr=0.01, momentum=momentum,
                                 weight_decay=0.1)
    n_opt.load_state_dict(state, {k: to_numpy(v) for k, v in tensors.items()})
    for t in range(3, 5):
        for h, o in ((holder, t_opt), (resumed, t_opt2)):
            _set_grads(h, _grads(t))
            o.step()
        n_opt.step(_grads(t))
    assert_dicts_close(f"torch SGD resumed (momentum {momentum})", _torch_params(resumed), _torch_params(holder),
                       STEP_TOL)
    assert_dicts_close(f"numpy SGD from torch's state (momentum {momentum})", n_opt.params, _torch_params(holder),
                       STEP_TOL)


def test_state_without_weight_decay_crosses_trees_and_bad_settings_are_refused_in_both():
    """With weight_decay 0 the decay set does nothing (torch saves it empty): numpy loads it. A
    saved eps or weight decay of inf, or betas as strings, is refused by both trees."""
    params = _params(12)
    holder = _Holder(params)
    t_opt = topt.build_optimizer(holder, "adamw", lr=0.01, weight_decay=0.0)
    _set_grads(holder, _grads(0))
    t_opt.step()
    state, tensors = topt.optimizer_state(t_opt, holder)
    arrays = {k: to_numpy(v) for k, v in tensors.items()}
    nopt.AdamW({k: v.copy() for k, v in params.items()}, lr=0.01, weight_decay=0.0).load_state_dict(state, arrays)
    for bad in (dict(eps=float("inf")), dict(weight_decay=float("inf")), dict(betas=["0.9", "0.99"])):
        with pytest.raises(ValueError, match=next(iter(bad))):
            nopt.AdamW({k: v.copy() for k, v in params.items()}).load_state_dict(dict(state, **bad), arrays)
        h = _Holder(params)
        with pytest.raises(ValueError, match=next(iter(bad))):
            topt.load_optimizer_state(topt.build_optimizer(h, "adamw"), h, dict(state, **bad), tensors)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_a_saved_weight_decay_loads_into_an_optimiser_built_without_one_in_both_trees(kind):
    """Loading brings the saved settings, weight_decay as lr, betas, eps and momentum: the run
    continues as saved. An optimiser built with weight_decay 0 used to be refused by torch ("decays
    another set": it knew no decay set without a decay) while numpy took the saved 0.1. Now both
    take it and continue as the uninterrupted run; a decay set that differs is refused by both
    with the same message, naming both weight decays."""
    params = _params(13)
    extra = {"momentum": 0.9} if kind == "sgd" else {}
    src = nopt.build_optimizer({k: v.copy() for k, v in params.items()}, kind, lr=0.01, weight_decay=0.1, **extra)
    for t in range(2):
        src.step(_grads(t))
    state, arrays = src.state_dict()
    tensors = {k: torch.tensor(v) for k, v in arrays.items()}
    n_opt = nopt.build_optimizer({k: v.copy() for k, v in src.params.items()}, kind, lr=0.01, weight_decay=0.0,
                                 **extra)
    n_opt.load_state_dict(state, arrays)
    holder = _Holder(src.params)
    t_opt = topt.build_optimizer(holder, kind, lr=0.01, weight_decay=0.0, **extra)
    topt.load_optimizer_state(t_opt, holder, state, tensors)
    assert n_opt.weight_decay == 0.1, f"numpy: weight_decay {n_opt.weight_decay} after loading a 0.1 state"
    assert [g["weight_decay"] for g in t_opt.param_groups] == [0.1, 0.0], \
        f"torch: groups' weight_decay {[g['weight_decay'] for g in t_opt.param_groups]} after loading a 0.1 state"
    for t in range(2, 4):
        src.step(_grads(t))
        n_opt.step(_grads(t))
        _set_grads(holder, _grads(t))
        t_opt.step()
    assert_dicts_close(f"numpy {kind} resumed into weight_decay 0", n_opt.params, src.params, STEP_TOL)
    assert_dicts_close(f"torch {kind} resumed into weight_decay 0", _torch_params(holder), src.params, STEP_TOL)

    messages = {}
    with pytest.raises(ValueError, match="another set") as err:
        nopt.build_optimizer({k: v.copy() for k, v in params.items()}, kind, weight_decay=0.0, decay="all",
                             **extra).load_state_dict(state, arrays)
    messages["numpy"] = str(err.value)
    h = _Holder(params)
    with pytest.raises(ValueError, match="another set") as err:
        topt.load_optimizer_state(topt.build_optimizer(h, kind, weight_decay=0.0, decay="all", **extra), h, state,
                                  tensors)
    messages["torch"] = str(err.value)
    assert "weight_decay 0.1 on 3 saved, this optimiser's weight_decay 0.0 on 8" in messages["numpy"], messages
    assert messages["numpy"] == messages["torch"], f"the trees refuse the decay set differently: {messages}"
