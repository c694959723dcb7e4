"""Check your own whole GPT-2 (forward, loss and every parameter gradient) against the oracle.

`check_layer` (oracle.py) checks one layer. A model is checked the same way, through one function
you write around it:

    from parity_tests.model_oracle import check_model

    def my_gpt(params, ids, targets, config):        # params: our names, (in, out) weights
        model = MyGPT(**config)                        # or one built once, outside
        state = adapt(params)                          # rename / transpose to your layout
        logits = torch.func.functional_call(model, state, (ids,))
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    report = check_model(my_gpt, dtype="float32")

For each hypothesis-drawn configuration (docs/design.md's GPTConfig fields, as a dict), batch and
seed, `fn` gets:
    params   name -> torch tensor, docs/design.md's table (`wte.weight` (V, C), ..., every linear
             weight (in, out); `lm_head.weight` (V, C) when untied), requiring grad: compute from
             them, so autograd reaches them. float64/float32 in those dtypes; for "bfloat16" and
             "float16" the parameters are float32 and `fn` runs under torch.autocast, as mixed-
             precision training does.
    ids, targets  (B, T) int64.
    config   the GPTConfig fields: vocab_size, context_length, emb_dim, n_heads, n_layers,
             drop_rate (always 0), qkv_bias, tie_embeddings, ln_eps.
and returns (logits (B, T, V), mean cross-entropy loss ()). With `ignore_index=I`, a negative
int (the book's chapter 7 pads instruction targets with -100, PyTorch's default), about a third
of the targets are I and the loss is the mean over the others: `F.cross_entropy(...,
ignore_index=I)`'s rule; the last position is always counted. Logits and loss are compared with the
float64 oracle (numpy_ref) run on the same parameter values, then every parameter gradient:
elementwise in float64 / float32, per tensor under autocast and TF32 (tolerances.GRADIENT_NORM).
A failure lists every tensor over tolerance in the model's order, says where the error starts, and
ends with the lines that replay the case. A forward difference is placed by running the failing
case again with block parts switched off (`locate_forward_difference`: an attention or MLP whose
c_proj weight and bias are zeroed adds nothing), one part switched on at a time; with the forward
right, a backward bug leaves the gradients after it in the forward right, so the last wrong one
marks it.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Callable

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from parity_tests import models
from parity_tests.checks import compare_grad_norms, position_grad_scales
from parity_tests.compare import compare, to_numpy
from parity_tests.failure_report import ONE_FAILURE, failure_message, note_on_error, own_name, replay_lines
from parity_tests.oracle import Report, canonical_dtype, check_dtype_on_device
from parity_tests.strategies import config_dicts
from parity_tests.tolerances import forward_tol, gradient_norm_tol, gradient_tol


# Weight matrices at WEIGHT_SPREAD times GPT-2's initial spread. At the initial spread (0.02)
# each block adds little to the residual stream, and a whole-model float32 check passed GELU's
# erf form in place of its tanh form; at 5x torch_impl still passes in float64, float32 and bf16
# (30 drawn cases each) and the erf form fails in float32 (parity_tests/test_model_oracle.py).
WEIGHT_SPREAD = 5.0


def model_case(config: dict, B: int, T: int, seed: int,
               ignore_index: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(float64 parameters, ids, targets) for one case: GPT-2's initialisation with every weight
    matrix WEIGHT_SPREAD times wider and every bias and layer-norm parameter moved off 0 and 1 (so
    a dropped bias or swapped gamma/beta shows). With `ignore_index`, about a third of the targets
    (drawn from the seed; never the last) are set to it."""
    params = models.scale_params(models.build_numpy_model(config, seed=seed % 1000).params, seed)
    params = {k: v * WEIGHT_SPREAD if v.ndim == 2 else v for k, v in params.items()}
    ids, targets = models.random_batch(config, B, T, seed)
    if ignore_index is not None:
        drop = np.random.default_rng([seed, 3]).random(targets.shape) < 1 / 3
        drop.flat[-1] = False
        targets = np.where(drop, ignore_index, targets)
    return params, ids, targets


def compare_model(fn: Callable, config: dict, B: int, T: int, seed: int, *, dtype="float32", device: str = "cpu",
                  ignore_index: int | None = None):
    """One case: `fn` against the oracle; returns every comparison (logits, loss, then each
    parameter gradient in docs/design.md's order)."""
    return _compare(fn, config, B, T, seed, dtype, device, ignore_index=ignore_index)


def _compare(fn: Callable, config: dict, B: int, T: int, seed: int, dtype, device: str, *,
             on: set | None = None, unused: list | None = None, ignore_index: int | None = None) -> list:
    """compare_model's work. `on`: None (the whole model), or the set of (block, part) left
    switched on, every other block part switched off (`switched_off`); then the forward only.
    `unused`: a list that gets the names of the parameters autograd does not reach from the loss
    (the whole model only)."""
    import torch

    dtype = canonical_dtype(dtype)
    check_dtype_on_device(dtype, device)
    params, ids, targets = model_case(config, B, T, seed, ignore_index)
    if on is not None:
        params = switched_off(params, on)
    autocast = dtype in ("bfloat16", "float16")
    stored = {"float64": torch.float64}.get(dtype, torch.float32)
    # The oracle runs on the values fn sees: the parameters as stored (float32 loses digits).
    seen = {k: to_numpy(torch.from_numpy(v).to(stored)).astype(np.float64) for k, v in params.items()}
    np_model = models.build_numpy_model(config, params=seen)
    ref = models.run_numpy(np_model, ids, targets, ignore_index=ignore_index)
    tparams = {k: torch.from_numpy(v).to(device=device, dtype=stored).requires_grad_(True) for k, v in seen.items()}
    ids_t, targets_t = torch.from_numpy(ids).to(device), torch.from_numpy(targets).to(device)
    from torch_impl.device import set_tf32_switches, tf32_switches

    previous_tf32 = tf32_switches()  # through either of torch's APIs (torch_impl/device.py)
    set_tf32_switches(dtype == "tf32", dtype == "tf32")
    amp = torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype)) if autocast else contextlib.nullcontext()
    try:
        with amp:
            try:
                returned = fn(tparams, ids_t, targets_t, dict(config))
            except Exception as err:
                note_on_error(err, "the model", {"ids": ids_t, **tparams})
                if ignore_index is not None and hasattr(err, "add_note"):
                    err.add_note(f"{int((targets == ignore_index).sum())} of the {targets.size} targets are "
                                 f"{ignore_index} (check_model(ignore_index={ignore_index})): the loss must leave "
                                 f"them out, as F.cross_entropy(..., ignore_index={ignore_index}) does")
                raise
        logits, loss = _checked_outputs(returned, ref.logits.shape, dtype, torch)
        grads = torch.autograd.grad(loss, list(tparams.values()), allow_unused=True) if on is None else None
    finally:
        set_tf32_switches(*previous_tf32)
    tf = forward_tol(dtype)
    results = [compare("model logits", logits, ref.logits, tf),
               compare("model loss", loss.detach().reshape(()), np.asarray(ref.loss), tf)]  # reported in its own dtype
    if grads is None:
        return results
    # A parameter the loss does not depend on gets no gradient from autograd: that is a zero one.
    got = {k: (np.zeros_like(seen[k]) if g is None else to_numpy(g)) for k, g in zip(tparams, grads)}
    if unused is not None:
        unused.extend(k for k, g in zip(tparams, grads) if g is None)
    order = list(params)
    norm_tol = gradient_norm_tol(dtype)
    if norm_tol is None:
        tg = gradient_tol(dtype)
        results += [compare(f"model d{k}", got[k], ref.grads[k], tg) for k in order]
    else:
        scales = position_grad_scales(np_model, ids, targets, ignore_index=ignore_index)
        results += compare_grad_norms("model grads", got, ref.grads, scales, norm_tol, order)
    return results


# Each block's two parts, by the projection that ends them: zeroing that projection's weight and
# bias makes the part add exactly 0 to the residual stream, whatever it computes inside (finite).
BLOCK_PARTS = (("attn", "attn.c_proj"), ("mlp", "mlp.c_proj"))
PART_WORDS = {"attn": "attention (ln_1, c_attn, the heads' masked softmax, c_proj)",
              "mlp": "MLP (ln_2, c_fc, GELU, c_proj)"}


def switched_off(params: dict[str, np.ndarray], on: set) -> dict[str, np.ndarray]:
    """params with every block part not in `on` (a set of (block index, "attn" or "mlp")) switched
    off: its output projection's weight and bias zeroed, so the block passes x through that part
    unchanged (x + 0)."""
    out = dict(params)
    for name, value in params.items():
        if not name.startswith("h."):
            continue
        _, i, rest = name.split(".", 2)
        for part, proj in BLOCK_PARTS:
            if rest.startswith(proj + ".") and (int(i), part) not in on:
                out[name] = np.zeros_like(value)
    return out


def locate_forward_difference(fn: Callable, config: dict, B: int, T: int, seed: int, *, dtype="float32",
                              device: str = "cpu", ignore_index: int | None = None) -> str:
    """Where a forward difference (logits or loss) starts, from the forward alone: the case is run
    again with every block part switched off (`switched_off`: the model is then the embeddings,
    ln_f, the head and the loss over the residual stream), then with one part at a time switched
    on. Returns a sentence naming the first part that differs alone; or, where none does beyond
    the tolerance (a small difference that the parts after it amplify in the whole model), the
    part whose logits differ most, where it stands out; or what is left."""
    class NotFinite(Exception):
        """The logits are not finite; `base` says whether with every block part switched off."""

        def __init__(self, base: bool):
            super().__init__()
            self.base = base

    def logits_share(on: set) -> tuple[bool, float]:
        """(within tolerance, the logits' largest difference as a share of the tolerance there)."""
        results = _compare(fn, config, B, T, seed, dtype, device, on=on, ignore_index=ignore_index)
        c = results[0]
        if not math.isfinite(c.max_abs):  # NaN or inf where the oracle has a number
            raise NotFinite(base=not on)
        return all(r.ok for r in results), c.max_abs / (c.tol.atol + c.tol.rtol * abs(c.expected_at_worst))

    try:
        # Switching a part off works through the parameters the model is given: one it does not
        # use (its own value instead, another block's) leaves a part on, or computes it wrongly,
        # whatever is zeroed, and every placement below would name the wrong place.
        unused: list = []
        _compare(fn, config, B, T, seed, dtype, device, unused=unused, ignore_index=ignore_index)
        if unused:
            shown = ", ".join(unused[:6]) + (f" and {len(unused) - 6} more" if len(unused) > 6 else "")
            return (f"the model does not use {shown} (autograd reaches none of them from the loss): it computes "
                    f"with other values in their place (its own parameters, or another block's), which is where "
                    f"the forward differs; switching block parts off cannot place it further")
        base_ok, base = logits_share(set())
        if not base_ok:
            return ("the forward differs even with every block's attention and MLP switched off (their c_proj "
                    "weights and biases zeroed): the difference is in the embeddings (wte, wpe), ln_f, the head, "
                    "the loss or the residual stream, or in a block part that adds something with its c_proj zeroed")
        parts = [(i, part) for i in range(config["n_layers"]) for part, _ in BLOCK_PARTS]
        alone = {p: logits_share({p}) for p in parts}
    except NotFinite as err:
        if err.base:
            return ("the model's logits are not finite with block parts switched off, all of them too, where the "
                    "oracle's are: the NaN or inf comes from outside the blocks (the embeddings, ln_f, the head, "
                    "the loss), or from a block part whose NaN a zeroed c_proj cannot cancel (0 x NaN is NaN: a "
                    "softmax row with every key masked, say); it cannot be placed this way")
        return ("the model's logits are not finite with block parts switched off, where the oracle's are: a part "
                "gives NaN or inf, which a zeroed c_proj cannot cancel (0 x NaN is NaN), so it cannot be placed "
                "this way; look for NaN inside the blocks (a softmax row with every key masked, say)")
    except Exception as err:  # noqa: BLE001 - a hint must not hide the failure it explains
        return f"(the forward difference could not be placed: the model raised {type(err).__name__}: {err})"
    bad = [p for p in parts if not alone[p][0]]
    if bad:
        (i, part), also = bad[0], ", ".join(f"h.{j}.{q}" for j, q in bad[1:])
        return (f"the forward differs first in h.{i}.{part}, block {i}'s {PART_WORDS[part]}: with only that part "
                f"switched on (every other block part's c_proj zeroed) the model differs, and with none it agrees"
                + (f"; alone, {also} differ(s) too" if also else ""))
    ranked = sorted(parts, key=lambda p: -alone[p][1])
    (i, part), top = ranked[0], alone[ranked[0]][1]
    runner_up = max([base] + [alone[p][1] for p in ranked[1:]])
    shares = f"{top:.2g} of the tolerance alone, against at most {runner_up:.2g} for every other part and none"
    if top >= 0.05 and top >= 10 * runner_up:
        return (f"the forward differs most likely from h.{i}.{part}, block {i}'s {PART_WORDS[part]}: no block part "
                f"differs beyond the tolerance when switched on alone, but its logits differ the most ({shares}), "
                f"a difference that the parts after it amplify in the whole model")
    return ("the forward differs, yet every block's attention and MLP agree with the oracle when switched on "
            "alone (the others' c_proj zeroed), none standing out: the difference is in how the parts combine (the "
            f"residual stream, the order of the blocks, or one block's output feeding another; largest: h.{i}.{part}, "
            f"{shares})")


def _checked_outputs(returned, logits_shape: tuple, dtype: str, torch):
    """fn's (logits, loss), or an AssertionError that says what came back instead."""
    if not (isinstance(returned, (tuple, list)) and len(returned) == 2):
        raise AssertionError(f"the model function returned {type(returned).__name__}; expected (logits, loss)")
    logits, loss = returned
    if not (isinstance(logits, torch.Tensor) and tuple(logits.shape) == tuple(logits_shape)):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise AssertionError(f"the model function returned logits {got}; expected a tensor of shape {logits_shape}")
    if not (isinstance(loss, torch.Tensor) and loss.ndim == 0 and loss.requires_grad):
        raise AssertionError("the model function's loss must be a 0-d tensor computed from the parameters (so that "
                             f"autograd reaches them), got {loss!r}"[:300])
    # float64 and float32 checks need logits of that dtype (float64 ones would leave the float32
    # arithmetic untested); under autocast the head may run in its dtype or, upcast, in float32.
    want = {"float64": (torch.float64,), "float32": (torch.float32,), "tf32": (torch.float32,),
            "bfloat16": (torch.bfloat16, torch.float32), "float16": (torch.float16, torch.float32)}[dtype]
    if logits.dtype not in want:
        raise AssertionError(f"the model function's logits are {logits.dtype} in a {dtype} check "
                             f"(expected {' or '.join(str(w) for w in want)})")
    return logits, loss


def _where_it_starts(results: list, place_forward: Callable[[], str], find_unused: Callable[[], list] = list,
                     dtype: str = "float32") -> str:
    """A hint from which tensors failed. A forward difference is placed by `place_forward`
    (locate_forward_difference on the case). With the logits right, a backward bug leaves the
    gradients of everything after it in the forward right, so the last wrong one (in forward
    order) marks it; unless the model uses some parameter not at all (`find_unused` re-runs the
    case: autograd gives it no gradient), which that would misname as a backward bug, or the
    check runs in bf16 or fp16, whose forward tolerance a forward bug can pass."""
    forward_ok = all(r.ok for r in results[:2])
    bad = [r.name for r in results[2:] if not r.ok]
    if results[0].ok and not results[1].ok:
        return ("the logits agree with the oracle's and the loss does not: the difference is in the loss (the "
                "cross-entropy, its mean, or which targets it counts)")
    if not forward_ok:
        return place_forward()
    if bad:
        unused = find_unused()
        if unused:
            shown = ", ".join(unused[:6]) + (f" and {len(unused) - 6} more" if len(unused) > 6 else "")
            return (f"the model does not use {shown} (autograd reaches none of them from the loss), so their "
                    f"gradients are 0 where the oracle's are not; the forward passed its tolerance on this case")
        hint = (f"the forward is right and {len(bad)} gradient(s) are not; the last in forward order is {bad[-1]}: "
                f"the backward goes wrong there or in the layer right after it (the gradients after it are right)")
        if dtype in ("bfloat16", "float16"):
            hint += (f"; but {dtype}'s forward tolerance is loose, and a forward bug can pass it and show first in "
                     f"the gradients: check in float32 to tell")
        return hint
    return ""


def check_model(fn: Callable, *, dtype="float32", device: str = "cpu", configs=None, max_batch: int = 3,
                max_time: int = 8, max_examples: int = 10, derandomize: bool = False,
                ignore_index: int | None = None) -> Report:
    """Check `fn` (see the module docstring) over hypothesis-drawn cases. `configs`: None (small
    drawn configurations, tied and untied, with and without qkv bias), one config dict (always
    that model; the batch and values are drawn), or a hypothesis strategy of config dicts.
    `ignore_index`: a negative int (-100, say); about a third of the targets are set to it, and
    the loss must leave them out (module docstring).
    Raises AssertionError on a mismatch (shrunk); returns a Report otherwise."""
    dtype = canonical_dtype(dtype)
    check_dtype_on_device(dtype, device)
    if ignore_index is not None:
        if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"check_model: ignore_index must be an int or None, got {ignore_index!r} "
                            f"({type(ignore_index).__name__})")
        if not -2**63 <= int(ignore_index) < 0:
            raise ValueError(f"check_model: ignore_index must be a negative int64, as padding is (-100 in the "
                             f"book): a class id would also drop the real targets of that class, got {ignore_index!r}")
        ignore_index = int(ignore_index)
    if configs is None:
        configs = config_dicts(max_layers=2, max_heads=3, max_head_size=6, max_context=10, max_vocab=40)
        if dtype in ("bfloat16", "float16", "tf32"):  # GRADIENT_NORM's bound was measured from C = 8 up (tolerances.py)
            configs = configs.filter(lambda c: c["emb_dim"] >= 8)
        else:
            # Not C = 1 or 2, as layer_specs leaves them out: layer norm's output is then its bias,
            # or +-1 per row, whatever came in, and a bug before it shrank there and was placed
            # in the wrong part.
            configs = configs.filter(lambda c: c["emb_dim"] >= 3)
    elif isinstance(configs, dict):
        configs = st.just(dict(configs, drop_rate=0.0))
    elif not isinstance(configs, st.SearchStrategy):
        raise TypeError(f"configs must be None, a config dict or a hypothesis strategy of them, "
                        f"got {type(configs).__name__}")
    report = Report(layer="model", dtype=dtype)

    @st.composite
    def cases(draw):
        config = draw(configs)
        T = draw(st.integers(1, min(max_time, config["context_length"])))
        return config, draw(st.integers(1, max_batch)), T, draw(st.integers(0, 2**31 - 1))

    failed = []  # the last failing case: after shrinking, the one hypothesis reports

    @settings(max_examples=max_examples, deadline=None, derandomize=derandomize, database=None, **ONE_FAILURE)
    @given(case=cases())
    def _property(case) -> None:
        config, B, T, seed = case
        results = compare_model(fn, config, B, T, seed, dtype=dtype, device=device, ignore_index=ignore_index)
        if not all(r.ok for r in results):
            message = _failure(fn, config, B, T, seed, dtype, device, results, "", ignore_index)
            failed[:] = [(config, B, T, seed, results, message)]
            raise AssertionError(message)
        report.comparisons.extend(results)
        report.examples += 1

    try:
        _property()
    except AssertionError as err:
        if failed and err.args == (failed[0][-1],):  # placing re-runs the model: once, on the shrunk case only
            config, B, T, seed, results, _ = failed[0]
            def find_unused() -> list:
                unused: list = []
                _compare(fn, config, B, T, seed, dtype, device, unused=unused, ignore_index=ignore_index)
                return unused

            hint = _where_it_starts(results, lambda: locate_forward_difference(fn, config, B, T, seed, dtype=dtype,
                                                                               device=device,
                                                                               ignore_index=ignore_index),
                                    find_unused, dtype)
            err.args = (_failure(fn, config, B, T, seed, dtype, device, results, hint, ignore_index),)
        raise
    return report


def _failure(fn, config, B, T, seed, dtype, device, results, hint: str, ignore_index: int | None = None) -> str:
    name = own_name(fn, "fn")
    ignoring = "" if ignore_index is None else f", ignore_index={ignore_index!r}"
    replay = replay_lines(["from parity_tests.model_oracle import compare_model"],
                          f"compare_model({name}, {config}, {B}, {T}, {seed}, dtype={dtype!r}, device={device!r}"
                          f"{ignoring})", {name: fn})
    return failure_message(f"the model ({dtype}, {device}) differs from the oracle on config {config}, B={B}, T={T}, "
                           f"seed={seed}{ignoring}", results, hint, replay)
