"""Optimisers, gradient clipping and the learning-rate schedule, every update written out.

AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"; the update of
torch.optim.AdamW), for each parameter p with gradient g at step t = 1, 2, ...:

    p = p * (1 - lr * wd)                          decoupled decay (only for the decay set)
    m = beta1 * m + (1 - beta1) * g                first moment
    v = beta2 * v + (1 - beta2) * g^2              second moment
    m_hat = m / (1 - beta1^t)                      bias corrections: m and v start at 0, so
    v_hat = v / (1 - beta2^t)                      early averages are too small by these factors
    p = p - lr * m_hat / (sqrt(v_hat) + eps)

The decay is "decoupled": it shrinks the weights directly instead of being added to g, so it is
not rescaled by Adam's per-coordinate step size.

SGD (torch.optim.SGD without dampening or Nesterov): g = g + wd * p (coupled decay);
buf = momentum * buf + g (buf = g at the first step); p = p - lr * buf.

Global-norm clipping (torch.nn.utils.clip_grad_norm_): n = sqrt(sum over all grads of g^2);
every g is multiplied by min(1, max_norm / (n + 1e-6)).

Schedule (`lr_at_step`): linear warmup from max_lr / warmup_steps to max_lr over the first
`warmup_steps` steps, then a half cosine from max_lr down to min_lr at `total_steps`.

Decay set (`gpt2_decay`, the default): the 2-D weights of the linear layers (`c_attn`,
`c_proj`, `c_fc` and a separate `lm_head`) decay; biases, layer-norm gains and biases and the
embeddings `wte`/`wpe` do not (minGPT's rule, following GPT-2/GPT-3 practice: decay the
matrices that multiply activations, never shift or scale parameters or lookup tables; with tied
embeddings the head *is* `wte` and so does not decay). `all_decay` decays everything (what the
book's chapter 5 does with `torch.optim.AdamW(model.parameters(), weight_decay=0.1)`).

Optimiser state for checkpoints: `state_dict() -> (state, arrays)` where `state` is JSON-ready
(kind, step, hyper-parameters) and `arrays` maps `exp_avg.<name>` / `exp_avg_sq.<name>` (AdamW)
or `momentum_buffer.<name>` (SGD) to arrays; torch_impl/optim.py uses the same keys. Loading
brings the saved settings (lr, betas, eps, momentum, weight_decay), as torch's load_state_dict
does: the run continues as it was saved, whatever the optimiser was built with. The decay set
is the optimiser's structure, not a setting: a state that decays other parameters is refused.
"""

from __future__ import annotations

import math
import numbers
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping

import numpy as np

DecayRule = Callable[[str, tuple], bool]


def gpt2_decay(name: str, shape: tuple) -> bool:
    """True for the 2-D weights of linear layers; False for biases, layer norms, wte and wpe."""
    return len(shape) == 2 and name.endswith(".weight") and not name.startswith(("wte.", "wpe."))


def all_decay(name: str, shape: tuple) -> bool:
    """Every parameter decays (plain `AdamW(model.parameters(), weight_decay=...)`)."""
    return True


DECAY_RULES: dict[str, DecayRule] = {"gpt2": gpt2_decay, "all": all_decay}


def get_decay_rule(rule: str | DecayRule) -> DecayRule:
    """A decay rule by name ("gpt2", "all") or a callable `(name, shape) -> bool` as is."""
    if callable(rule):
        return rule
    if rule not in DECAY_RULES:
        raise ValueError(f"unknown decay set {rule!r}; known: {sorted(DECAY_RULES)}")
    return DECAY_RULES[rule]


# ---- learning-rate schedule -----------------------------------------------------------------


def lr_at_step(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The learning rate of optimiser step `step` (0-based).

    step < warmup_steps:            max_lr * (step + 1) / warmup_steps      (linear warmup)
    warmup_steps <= step < total:   min_lr + (max_lr - min_lr) * (1 + cos(pi * r)) / 2,
                                    r = (step - warmup_steps) / (total_steps - warmup_steps)
    step >= total_steps:            min_lr
    The warmup starts at max_lr / warmup_steps, not 0, so the first step is never wasted.
    """
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
    r = (step - warmup_steps) / (total_steps - warmup_steps)  # in [0, 1)
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * r))


# ---- gradient clipping ------------------------------------------------------------------------


def global_grad_norm(grads: Mapping[str, np.ndarray]) -> float:
    """sqrt(sum over every gradient element of g^2), the norm of all gradients as one vector."""
    norms = np.array([np.sqrt(np.sum(g * g)) for g in grads.values()])  # one norm per tensor
    return float(np.sqrt(np.sum(norms * norms)))


def clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale every gradient in place by min(1, max_norm / (norm + 1e-6)); return the norm before.

    The 1e-6 keeps the division finite for an all-zero gradient (torch's constant). A
    non-finite norm is returned as is and the gradients are left alone: the trainer stops.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    norm = global_grad_norm(grads)
    if not math.isfinite(norm):
        return norm
    scale = min(1.0, max_norm / (norm + 1e-6))
    for name in grads:
        grads[name] *= scale
    return norm


# ---- optimisers -------------------------------------------------------------------------------


def _check_grads(params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
    missing = [k for k in params if k not in grads]
    extra = [k for k in grads if k not in params]
    if missing or extra:
        raise KeyError(f"gradients do not match the parameters: missing {missing}, unexpected {extra}")
    for k, p in params.items():
        if grads[k].shape != p.shape:
            raise ValueError(f"gradient {k} has shape {grads[k].shape}, the parameter {p.shape}")
        if np.asarray(grads[k]).dtype != p.dtype:
            raise TypeError(f"gradient {k} is {np.asarray(grads[k]).dtype}, the parameter {p.dtype}: the update "
                            f"would silently change precision")


def _check_lr(lr) -> float:
    """A learning rate: a finite number >= 0 (a NaN would turn every weight into NaN); a TypeError
    for no number at all."""
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"lr must be a number, got {lr!r} ({type(lr).__name__})")
    if not 0 <= lr < math.inf:
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    return float(lr)

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



def _load_arrays(params: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray], slots: tuple[str, ...],
                 required: bool) -> dict[str, dict[str, np.ndarray]]:
    """{slot: {name: a copy in the parameter's dtype}} from `<slot>.<name>` arrays, every key and
    shape checked before anything is kept (a failed load changes nothing)."""
    known = {f"{slot}.{k}" for slot in slots for k in params}
    unknown = sorted(k for k in arrays if k not in known)
    if unknown:
        raise ValueError(f"optimiser state has unknown array(s) {unknown[:3]}; expected keys "
                         f"'<slot>.<parameter>' with slot in {slots}")
    out: dict[str, dict[str, np.ndarray]] = {slot: {} for slot in slots}
    for slot in slots:
        for k, p in params.items():
            key = f"{slot}.{k}"
            if key not in arrays:
                if required:
                    raise KeyError(f"optimiser state lacks {key}")
                continue
            a = np.asarray(arrays[key])
            if a.shape != p.shape:
                raise ValueError(f"optimiser state {key} has shape {a.shape}, the parameter {p.shape}")
            if not np.isfinite(a).all():
                raise ValueError(f"optimiser state {key} has non-finite values")
            if slot == "exp_avg_sq" and (a < 0).any():  # a running mean of g^2: sqrt would give NaN
                raise ValueError(f"optimiser state {key} has negative values (min {a.min()!r}); a mean of "
                                 f"squared gradients is >= 0")
            out[slot][k] = a.astype(p.dtype, copy=True)
    return out


def _state_number(state: Mapping, key: str, below: float = math.inf) -> float:
    """A saved setting: a finite number in [0, below) (an inf weight decay or eps would make
    every weight inf or NaN at the next step)."""
    v = state.get(key)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < below or not math.isfinite(v):
        raise ValueError(f"optimiser state {key!r} must be a finite number in [0, {below}), got {v!r}")
    return float(v)


def _state_betas(state: Mapping) -> tuple[float, float]:
    betas = state.get("betas")
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2
            and all(isinstance(b, numbers.Real) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"optimiser state 'betas' must be two numbers in [0, 1), got {betas!r}")
    return float(betas[0]), float(betas[1])


def _state_int(state: Mapping, key: str) -> int:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"optimiser state {key!r} must be an int >= 0, got {value!r}")
    return value


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


# Elements per block of the AdamW update: the six arrays a block touches (p, g, m, v and two
# scratch buffers) take 768 KiB in float32, 1.5 MiB in float64: they stay in L2 or L3 cache.
# Smaller blocks cost more in NumPy's per-call overhead than they save.
_BLOCK = 1 << 15
# Parameters at least this large are updated by several threads, each on its own stretch (NumPy
# releases the GIL inside ufuncs, and one core does not saturate the memory bus).
_PARALLEL_MIN = 1 << 20


def _threads() -> int:
    """The cores this process may run on (at most 8)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def _adamw_update(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, *, shrink: float | None,
                  beta1: float, beta2: float, step_size: float, sqrt_bias2: float, eps: float) -> None:
    """One AdamW update of p, m and v in place.

    Per element, exactly the module docstring's update, in this order of operations:
        p = p * shrink                         (decay set only; shrink = 1 - lr * wd)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + ((1 - beta2) * g) * g
        p = p - (step_size * m) / (sqrt(v) / sqrt_bias2 + eps)     step_size = lr / (1 - beta1^t)
    Written as whole-array expressions this allocates five temporaries the size of p (38.6M
    elements for GPT-2's wte) and streams every array through memory about ten times. Here each
    block of _BLOCK elements is updated while it sits in cache, with two scratch buffers, and a
    large parameter is split between threads. The results are the same bit for bit (each element
    sees the same operations in the same order; elements never interact). NumPy's `errstate` is
    per thread: the update computes no inf or NaN from finite inputs, so none is set here.
    """
    if not (p.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous):
        raise ValueError("AdamW updates parameters and state in place: they must be C-contiguous arrays")
    flat = (p.reshape(-1), np.ascontiguousarray(g).reshape(-1), m.reshape(-1), v.reshape(-1))
    coef = (shrink, beta1, beta2, step_size, sqrt_bias2, eps)
    n, workers = p.size, _threads()
    if n < _PARALLEL_MIN or workers == 1:
        _adamw_range(*flat, 0, n, *coef)
        return
    bounds = [n * i // workers for i in range(workers + 1)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="numpy_ref-adamw") as pool:
        futures = [pool.submit(_adamw_range, *flat, lo, hi, *coef) for lo, hi in zip(bounds, bounds[1:])]
    for f in futures:  # the `with` has waited for every worker: no write is still running
        f.result()  # re-raises a worker's exception


def _adamw_range(pf, gf, mf, vf, lo: int, hi: int, shrink, beta1, beta2, step_size, sqrt_bias2, eps) -> None:
    """`_adamw_update` on the flat elements [lo, hi), block by block (views: writes land in p, m, v)."""
    scratch = np.empty((2, min(hi - lo, _BLOCK)), dtype=pf.dtype)
    for i in range(lo, hi, _BLOCK):
        j = min(i + _BLOCK, hi)
        pb, gb, mb, vb = pf[i:j], gf[i:j], mf[i:j], vf[i:j]
        t, u = scratch[0, : j - i], scratch[1, : j - i]
        if shrink is not None:
            pb *= shrink
        mb *= beta1
        np.multiply(gb, 1.0 - beta1, out=t)
        mb += t  # m = beta1 m + (1 - beta1) g
        vb *= beta2
        np.multiply(gb, 1.0 - beta2, out=t)
        t *= gb
        vb += t  # v = beta2 v + (1 - beta2) g^2
        np.sqrt(vb, out=t)
        t /= sqrt_bias2
        t += eps  # sqrt(v_hat) + eps
        np.multiply(mb, step_size, out=u)
        u /= t
        pb -= u  # p = p - lr m_hat / (sqrt(v_hat) + eps)


class AdamW:
    """AdamW over a dict of arrays, updated in place (see the module docstring for the math)."""

    kind = "adamw"

    def __init__(self, params: dict[str, np.ndarray], *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, decay: str | DecayRule = "gpt2") -> None:
        check_hyperparameters("adamw", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        rule = get_decay_rule(decay)
        self.decays = {k: bool(rule(k, p.shape)) for k, p in params.items()}
        self.step_count = 0  # t
        self.exp_avg = {k: np.zeros_like(p) for k, p in params.items()}  # m
        self.exp_avg_sq = {k: np.zeros_like(p) for k, p in params.items()}  # v

    def step(self, grads: Mapping[str, np.ndarray], lr: float | None = None) -> None:
        """One update of every parameter with its gradient; `lr` overrides self.lr from now on."""
        _check_grads(self.params, grads)
        if lr is not None:
            self.lr = _check_lr(lr)
        self.step_count += 1
        t, lr = self.step_count, self.lr
        beta1, beta2 = self.betas
        bias1 = 1.0 - beta1**t  # 1 - beta1^t
        bias2 = 1.0 - beta2**t  # 1 - beta2^t
        for k, p in self.params.items():
            shrink = 1.0 - lr * self.weight_decay if self.decays[k] else None
            _adamw_update(p, grads[k], self.exp_avg[k], self.exp_avg_sq[k], shrink=shrink, beta1=beta1,
                          beta2=beta2, step_size=lr / bias1, sqrt_bias2=math.sqrt(bias2), eps=self.eps)

    def state_dict(self) -> tuple[dict, dict[str, np.ndarray]]:
        state = {"kind": self.kind, "step": self.step_count, "lr": self.lr, "betas": list(self.betas),
                 "eps": self.eps, "weight_decay": self.weight_decay,
                 "decay": sorted(k for k, d in self.decays.items() if d)}
        arrays = {f"exp_avg.{k}": m.copy() for k, m in self.exp_avg.items()}
        arrays.update({f"exp_avg_sq.{k}": v.copy() for k, v in self.exp_avg_sq.items()})
        return state, arrays

    def load_state_dict(self, state: Mapping, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore `state_dict()`'s output (exactly: resuming continues bit for bit): the moments,
        the step, and lr, betas, eps and weight_decay (as torch's load_state_dict restores its
        groups' settings). Everything is checked first: a failed load changes nothing. An
        optimiser that never stepped may come without moments (they are zero)."""
        if state.get("kind") != self.kind:
            raise ValueError(f"optimiser state is for {state.get('kind')!r}, not {self.kind!r}")
        step = _state_int(state, "step")
        moments = _load_arrays(self.params, arrays, ("exp_avg", "exp_avg_sq"), required=step > 0)
        lr = _check_lr(state.get("lr"))
        betas = _state_betas(state)
        eps, weight_decay = _state_number(state, "eps"), _state_number(state, "weight_decay")
        if eps == 0:
            raise ValueError("optimiser state 'eps': eps must be > 0: with eps = 0 a weight whose gradient "
                             "has been 0 so far gets 0/0 = NaN")
        check_decay_set(state.get("decay", []), weight_decay, [k for k, d in self.decays.items() if d],
                        self.weight_decay)
        zeros = {k: np.zeros_like(p) for k, p in self.params.items()}
        self.exp_avg = {k: moments["exp_avg"].get(k, zeros[k]) for k in self.params}
        self.exp_avg_sq = {k: moments["exp_avg_sq"].get(k, zeros[k].copy()) for k in self.params}
        self.step_count, self.lr, self.betas, self.eps, self.weight_decay = step, lr, betas, eps, weight_decay


class SGD:
    """SGD with optional momentum and coupled weight decay (torch.optim.SGD's update)."""

    kind = "sgd"

    def __init__(self, params: dict[str, np.ndarray], *, lr: float = 1e-2, momentum: float = 0.0,
                 weight_decay: float = 0.0, decay: str | DecayRule = "gpt2") -> None:
        check_hyperparameters("sgd", lr=lr, weight_decay=weight_decay, momentum=momentum)
        self.params = params
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        rule = get_decay_rule(decay)
        self.decays = {k: bool(rule(k, p.shape)) for k, p in params.items()}
        self.step_count = 0
        self.momentum_buffer: dict[str, np.ndarray] = {}

    def step(self, grads: Mapping[str, np.ndarray], lr: float | None = None) -> None:
        _check_grads(self.params, grads)
        if lr is not None:
            self.lr = _check_lr(lr)
        self.step_count += 1
        for k, p in self.params.items():
            g = grads[k]
            if self.decays[k] and self.weight_decay:
                g = g + self.weight_decay * p  # coupled: the decay is part of the gradient
            if self.momentum:
                if k not in self.momentum_buffer:
                    self.momentum_buffer[k] = g.copy()  # buf = g at the first step
                else:
                    buf = self.momentum_buffer[k]
                    buf *= self.momentum
                    buf += g  # buf = momentum buf + g
                g = self.momentum_buffer[k]
            p -= self.lr * g

    def state_dict(self) -> tuple[dict, dict[str, np.ndarray]]:
        state = {"kind": self.kind, "step": self.step_count, "lr": self.lr, "momentum": self.momentum,
                 "weight_decay": self.weight_decay, "decay": sorted(k for k, d in self.decays.items() if d)}
        return state, {f"momentum_buffer.{k}": b.copy() for k, b in self.momentum_buffer.items()}

    def load_state_dict(self, state: Mapping, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore `state_dict()`'s output: buffers, step, lr, momentum, weight_decay; all checked
        first (a failed load changes nothing). With momentum, the buffers are there for every
        parameter (each is made at its first step) or for none (never stepped); the step is not
        used to tell (torch's SGD keeps no step, and its state says 0). Without momentum, none."""
        if state.get("kind") != self.kind:
            raise ValueError(f"optimiser state is for {state.get('kind')!r}, not {self.kind!r}")
        step = _state_int(state, "step")
        lr = _check_lr(state.get("lr"))
        momentum, weight_decay = _state_number(state, "momentum", below=1.0), _state_number(state, "weight_decay")
        buffers = _load_arrays(self.params, arrays, ("momentum_buffer",), required=False)["momentum_buffer"]
        if buffers and not momentum:
            raise ValueError(f"optimiser state has momentum buffers but momentum={momentum}")
        missing = [k for k in self.params if k not in buffers]
        if buffers and missing:
            raise KeyError(f"optimiser state lacks momentum_buffer.{missing[0]} (has buffers for other parameters)")
        check_decay_set(state.get("decay", []), weight_decay, [k for k, d in self.decays.items() if d],
                        self.weight_decay)
        self.momentum_buffer = buffers
        self.step_count, self.lr, self.momentum, self.weight_decay = step, lr, momentum, weight_decay


def build_optimizer(params: dict[str, np.ndarray], kind: str = "adamw", **kwargs) -> AdamW | SGD:
    """`AdamW(params, **kwargs)` or `SGD(params, **kwargs)` by name."""
    if kind == "adamw":
        return AdamW(params, **kwargs)
    if kind == "sgd":
        return SGD(params, **kwargs)
    raise ValueError(f"unknown optimizer {kind!r}; known: 'adamw', 'sgd'")
