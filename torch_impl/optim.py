"""Optimisers, gradient clipping and the learning-rate schedule on torch.optim.

The math is numpy_ref/optim.py's, written there step by step; here it is torch's own kernels:

    AdamW:  p *= 1 - lr*wd (decay set only); m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
            p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    SGD:    g += wd * p (decay set only); buf = momentum buf + g; p -= lr * buf
    clip:   g *= min(1, max_norm / (||all grads||_2 + 1e-6))
    lr:     warmup  max_lr (step + 1) / warmup_steps, then
            cosine  min_lr + (max_lr - min_lr) (1 + cos(pi (step - warmup) / (total - warmup))) / 2,
            min_lr from total_steps on.

`build_optimizer` makes two parameter groups, decay and no decay, with the same rule as
numpy_ref (`gpt2_decay`: the 2-D weights of linear layers decay; biases, layer norms and the
embeddings wte/wpe do not; a tied head is wte). Each group says whether it is the decay set
(`"decays"`), so that an optimiser built with weight_decay 0 still knows which parameters a
loaded weight decay applies to, as numpy_ref's does. AdamW runs fused (one kernel for all
parameters) where torch supports it for the parameters' device and dtype, and `foreach`
otherwise. Reference: Loshchilov & Hutter 2019; torch.optim.AdamW's documented algorithm.

`optimizer_state(opt, model)` / `load_optimizer_state(opt, model, state, tensors)` convert to and
from the checkpoint form shared with numpy_ref: a JSON-ready dict plus tensors keyed
`exp_avg.<name>`, `exp_avg_sq.<name>` (AdamW) or `momentum_buffer.<name>` (SGD). Loading brings
the saved settings (lr, betas, eps, momentum, weight_decay) as torch's own load_state_dict
does: the run continues as it was saved, whatever the optimiser was built with. The decay set
is the optimiser's structure, not a setting: a state that decays other parameters is refused.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

DecayRule = Callable[[str, tuple], bool]


def gpt2_decay(name: str, shape: tuple) -> bool:
    """True for the 2-D weights of linear layers; False for biases, layer norms, wte and wpe."""
    return len(shape) == 2 and name.endswith(".weight") and not name.startswith(("wte.", "wpe."))


def all_decay(name: str, shape: tuple) -> bool:
    """Every parameter decays (plain `AdamW(model.parameters(), weight_decay=...)`)."""
    return True


DECAY_RULES: dict[str, DecayRule] = {"gpt2": gpt2_decay, "all": all_decay}


def get_decay_rule(rule: str | DecayRule) -> DecayRule:
    if callable(rule):
        return rule
    if rule not in DECAY_RULES:
        raise ValueError(f"unknown decay set {rule!r}; known: {sorted(DECAY_RULES)}")
    return DECAY_RULES[rule]


# ---- learning-rate schedule -----------------------------------------------------------------


def lr_at_step(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The learning rate of optimiser step `step` (0-based): linear warmup, then cosine to min_lr."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    step = int(step)  # a NumPy uint8 step would wrap in the arithmetic below (255 + 1 = 0)
    for name, v in (("max_lr", max_lr), ("min_lr", min_lr)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} exceeds total_steps={total_steps}")
    if min_lr > max_lr or min_lr < 0:
        raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # in [0, 1)
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---- gradient clipping ------------------------------------------------------------------------


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Scale all gradients in place by min(1, max_norm / (norm + 1e-6)); return the norm before.

    A non-finite norm is returned and the gradients are left alone (the trainer then stops),
    which is why this reads the norm on the host instead of calling clip_grad_norm_ blindly.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    norm_value = float(norm)
    if math.isfinite(norm_value):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)  # takes parameters, scales .grad
    return norm_value


# ---- optimisers -------------------------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float, decay: str | DecayRule = "gpt2") -> list[dict]:
    """[decay group, no-decay group] of the model's named parameters (a tied head counted once);
    `"decays"` marks the decay set, whatever its weight_decay (0 included)."""
    rule = get_decay_rule(decay)
    decayed, kept = [], []
    for name, p in model.named_parameters():
        (decayed if rule(name, tuple(p.shape)) else kept).append(p)
    return [{"params": decayed, "weight_decay": weight_decay, "decays": True},
            {"params": kept, "weight_decay": 0.0, "decays": False}]


def group_decays(group: Mapping) -> bool:
    """Whether a parameter group is the decay set: its `"decays"` mark (build_optimizer's groups),
    else (groups made by hand) whether its weight_decay is > 0."""
    return bool(group.get("decays", group["weight_decay"] > 0))


def _fused_supported(model: nn.Module) -> bool:
    """torch's fused AdamW kernel exists for CUDA, and for CPU float tensors since torch 2.4."""
    p = next(model.parameters())
    if p.device.type == "cuda":
        return True
    return p.device.type == "cpu" and p.dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def build_optimizer(model: nn.Module, kind: str = "adamw", *, lr: float = 1e-3, betas=(0.9, 0.999),
                    eps: float = 1e-8, weight_decay: float = 0.01, momentum: float = 0.0,
                    decay: str | DecayRule = "gpt2", fused: bool | None = None) -> torch.optim.Optimizer:
    """torch.optim.AdamW (fused where supported, else foreach) or torch.optim.SGD, two groups; the
    arguments checked first (`check_hyperparameters`, as numpy_ref's optimisers check them)."""
    if kind not in ("adamw", "sgd"):
        raise ValueError(f"unknown optimizer {kind!r}; known: 'adamw', 'sgd'")
    check_hyperparameters(kind, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum)
    groups = [g for g in param_groups(model, weight_decay, decay) if g["params"]]
    if kind == "adamw":
        use_fused = _fused_supported(model) if fused is None else fused
        options = {"fused": True} if use_fused else {"foreach": True}
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **options)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, foreach=True)
    raise ValueError(f"unknown optimizer {kind!r}; known: 'adamw', 'sgd'")


def check_hyperparameters(kind: str, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum=0.0) -> None:
    """The optimiser's arguments (docs/design.md, "Bad input"): each a real number (a TypeError
    naming it otherwise: "0.1" or True), finite and >= 0 (a ValueError: a NaN or inf would make
    every weight NaN or inf at the first step); momentum below 1; AdamW's betas two numbers in
    [0, 1); AdamW's eps above 0 (a weight whose gradient has been 0 at every step so far has
    m = v = 0, and eps = 0 gives it 0/0 = NaN). Checked for the kind's own arguments only."""
    def number(name: str, value, below: float = math.inf) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{kind}: {name} must be a number, got {value!r} ({type(value).__name__})")
        if not (0 <= value < below and math.isfinite(value)):
            raise ValueError(f"{kind}: {name} must be a finite number in [0, {below}), got {value!r}")

    number("lr", lr)
    number("weight_decay", weight_decay)
    if kind == "adamw":
        number("eps", eps)
        if eps == 0:
            raise ValueError(f"{kind}: eps must be > 0: with eps = 0 a weight whose gradient has been 0 so far "
                             f"gets 0/0 = NaN")
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2):
            raise TypeError(f"adamw: betas must be two numbers, got {betas!r}")
        for b in betas:
            number("betas", b, below=1.0)
    elif kind == "sgd":
        number("momentum", momentum, below=1.0)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate; a finite number >= 0 (a NaN would turn every weight into NaN)."""
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"lr must be a number, got {lr!r} ({type(lr).__name__})")
    if not 0 <= lr < math.inf:
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    for group in opt.param_groups:
        group["lr"] = lr


# ---- checkpoint form ----------------------------------------------------------------------


_TENSOR_KEYS = {"adamw": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}


def _kind(opt: torch.optim.Optimizer) -> str:
    if isinstance(opt, torch.optim.AdamW):
        return "adamw"
    if isinstance(opt, torch.optim.SGD):
        return "sgd"
    raise TypeError(f"unsupported optimizer {type(opt).__name__}")


def optimizer_state(opt: torch.optim.Optimizer, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-ready state, tensors keyed `<slot>.<parameter name>`), as numpy_ref's state_dict()."""
    kind = _kind(opt)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, step = {}, 0
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for slot in _TENSOR_KEYS[kind]:
                if st.get(slot) is not None:
                    tensors[f"{slot}.{names[id(p)]}"] = st[slot].detach().clone()
            if "step" in st:
                step = int(st["step"])
    group = opt.param_groups[0]
    state = {"kind": kind, "step": step, "lr": group["lr"],
             "weight_decay": max(g["weight_decay"] for g in opt.param_groups),
             "decay": sorted(names[id(p)] for g in opt.param_groups if group_decays(g) for p in g["params"])}
    if kind == "adamw":
        state.update(betas=list(group["betas"]), eps=group["eps"])
    else:
        state.update(momentum=group["momentum"])
    return state, tensors


def load_optimizer_state(opt: torch.optim.Optimizer, model: nn.Module, state: Mapping,
                         tensors: Mapping[str, torch.Tensor]) -> None:
    """Restore `optimizer_state`'s output exactly, so a resumed run continues bit for bit: the
    moments or buffers, the step, and lr, betas, eps (AdamW), momentum (SGD) and weight_decay
    (as torch's own load_state_dict restores its groups' settings). Everything is checked before
    the optimiser changes. State saved before the first step may have no moments (torch keeps
    none) or all-zero ones (numpy_ref keeps zeros): both load as a fresh optimiser."""
    kind = _kind(opt)
    if state.get("kind") != kind:
        raise ValueError(f"optimiser state is for {state.get('kind')!r}, not {kind!r}")
    names = {id(p): n for n, p in model.named_parameters()}
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"optimiser state 'step' must be an int >= 0, got {step!r}")
    settings = _checked_settings(kind, state)
    slots = _TENSOR_KEYS[kind]
    known = {f"{slot}.{n}" for slot in slots for n in names.values()}
    unknown = sorted(k for k in tensors if k not in known)
    if unknown:
        raise ValueError(f"optimiser state has unknown tensor(s) {unknown[:3]}; expected keys "
                         f"'<slot>.<parameter>' with slot in {slots}")
    foreign = sum(id(p) not in names for g in opt.param_groups for p in g["params"])
    if foreign:  # the state is keyed by the model's names: an optimiser over other tensors has none
        raise ValueError(f"the optimiser holds {foreign} parameter(s) that are not this model's; build it over "
                         f"the model whose state is loaded")
    decays = [group_decays(g) for g in opt.param_groups]
    decayed = sorted(names[id(p)] for g, d in zip(opt.param_groups, decays) if d for p in g["params"])
    here_wd = max((g["weight_decay"] for g, d in zip(opt.param_groups, decays) if d), default=0.0)
    check_decay_set(state.get("decay", []), settings["weight_decay"], decayed, here_wd)
    # Then every parameter has its slots. AdamW counts its steps; torch's SGD keeps no step (its
    # state says 0), so there the buffers tell: with momentum, for every parameter or for none.
    if kind == "adamw":
        stepped = step > 0
    else:
        if tensors and not settings["momentum"] > 0:
            raise ValueError(f"optimiser state has momentum buffers but momentum={settings['momentum']}")
        stepped = bool(tensors)
    # torch's own state_dict() form: parameters numbered in group order. load_state_dict then
    # moves and casts each entry as the optimiser wants (e.g. `step` on the device when fused).
    saved = opt.state_dict()
    per_param, index = {}, 0
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            st = {}
            for slot in slots:
                key = f"{slot}.{name}"
                if key not in tensors:
                    if stepped:
                        raise KeyError(f"optimiser state lacks {key}")
                    continue
                t = torch.as_tensor(tensors[key])
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"optimiser state {key} has shape {tuple(t.shape)}, the parameter "
                                     f"{tuple(p.shape)}")
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"optimiser state {key} has non-finite values")
                if slot == "exp_avg_sq" and bool((t < 0).any()):  # a running mean of g^2: sqrt would give NaN
                    raise ValueError(f"optimiser state {key} has negative values (min {t.min().item()!r}); a mean "
                                     f"of squared gradients is >= 0")
                if kind == "adamw" and not stepped and bool((t != 0).any()):
                    raise ValueError(f"optimiser state {key} is non-zero at step 0: the state is inconsistent")
                st[slot] = t.to(device=p.device, dtype=p.dtype).clone()
            if stepped:  # a fresh optimiser (not stepped) keeps no state: zero moments, the same thing
                if kind == "adamw":
                    st["step"] = torch.tensor(float(step), dtype=torch.float32)
                per_param[index] = st
            index += 1
    for group_saved, is_decay_set in zip(saved["param_groups"], decays):
        group_saved["lr"] = settings["lr"]
        if is_decay_set:  # the saved weight decay, 0 included, on the decay set only
            group_saved["weight_decay"] = settings["weight_decay"]
        if kind == "adamw":
            group_saved["betas"], group_saved["eps"] = settings["betas"], settings["eps"]
        else:
            group_saved["momentum"] = settings["momentum"]
    saved["state"] = per_param
    opt.load_state_dict(saved)


def check_decay_set(saved: list, saved_wd: float, here: list, here_wd: float) -> None:
    """With a weight decay saved, the saved decay set must be this optimiser's (the saved
    weight_decay then replaces this one's, 0 included). Without one the saved set does nothing;
    the message names both weight decays, as the set is what decays at that rate."""
    if not saved_wd > 0 or sorted(saved) == sorted(here):
        return
    diff = sorted(set(saved) ^ set(here))
    raise ValueError(f"optimiser state decays another set of parameters (weight_decay {saved_wd} on {len(saved)} "
                     f"saved, this optimiser's weight_decay {here_wd} on {len(here)}; they differ on {diff[:3]}); "
                     f"build the optimiser with the same decay rule")


def _checked_settings(kind: str, state: Mapping) -> dict:
    """lr, weight_decay and betas/eps (AdamW) or momentum (SGD) from a saved state, checked."""
    def number(key):
        v = state.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
            raise ValueError(f"optimiser state {key!r} must be a finite number >= 0, got {v!r}")
        return float(v)

    out = {"lr": number("lr"), "weight_decay": number("weight_decay")}
    if kind == "adamw":
        betas = state.get("betas")
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2
                and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"optimiser state 'betas' must be two numbers in [0, 1), got {betas!r}")
        out.update(betas=tuple(float(b) for b in betas), eps=number("eps"))
        if out["eps"] == 0:
            raise ValueError("optimiser state 'eps': eps must be > 0: with eps = 0 a weight whose gradient "
                             "has been 0 so far gets 0/0 = NaN")
    else:
        out["momentum"] = number("momentum")
        if not out["momentum"] < 1:
            raise ValueError(f"optimiser state 'momentum' must be < 1, got {out['momentum']!r}")
    return out
