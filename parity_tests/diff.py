"""Layer-by-layer differences between the trees, behind `gpt-oracle diff`.

Both trees run the GPT-2 forward one layer function at a time (`<layer>_forward` in each tree),
each feeding its own previous output forward, so an error shows where it enters and how it
grows. The NumPy side then runs the hand-derived backward functions in reverse; the torch side
gets the same gradients from autograd (`retain_grad` on every activation). Reported per
activation: the forward difference and the difference of the loss gradient with respect to it,
and per parameter the gradient difference; the first activation over its tolerance is named,
with what differed, where and by how much.

Gradients in float64 and float32 are judged element by element (`gradient_tol`). In bfloat16,
float16 and tf32 they are judged per tensor as a whole, by the rule `gpt-oracle check` uses
for whole-model gradients (tolerances.GRADIENT_NORM): ||actual - expected|| <= k u s, with s the
size of the per-position gradients whose mean the tensor is (`position_grad_scales`). The
elementwise bf16 rule, atol 5e-2, is meant for single layers on O(1) values; a model's gradients
are O(1e-5..1e-2), and under it a parameter with no gradient at all passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from parity_tests.checks import NormComparison, compare_grad_norm
from parity_tests.compare import Comparison, compare, format_rel
from parity_tests.tolerances import NormTol, Tol, forward_tol, gradient_norm_tol, gradient_tol

GradComparison = Comparison | NormComparison


@dataclass
class DiffReport:
    dtype: str
    grad_tol: Tol | NormTol  # elementwise, or per tensor (NormTol: bf16 / fp16) for every gradient
    activations: list[tuple[Comparison, GradComparison | None]] = field(default_factory=list)  # (forward, gradient)
    parameters: list[GradComparison] = field(default_factory=list)

    def first_failures(self) -> dict[str, Comparison | GradComparison]:
        """The first comparison over its tolerance of each kind, where there is one: "forward" in
        model order, "activation gradient" walking back from the loss, "parameter gradient" in
        model order."""
        found = {
            "forward": next((f for f, _ in self.activations if not f.ok), None),
            "activation gradient": next((g for _, g in reversed(self.activations) if g is not None and not g.ok), None),
            "parameter gradient": next((p for p in self.parameters if not p.ok), None),
        }
        return {kind: c for kind, c in found.items() if c is not None}

    def first_forward_divergence(self) -> str | None:
        return getattr(self.first_failures().get("forward"), "name", None)

    def first_gradient_divergence(self) -> str | None:
        """In backward order: the activation nearest the loss whose gradient is off."""
        return getattr(self.first_failures().get("activation gradient"), "name", None)

    def first_parameter_divergence(self) -> str | None:
        return getattr(self.first_failures().get("parameter gradient"), "name", None)

    @property
    def ok(self) -> bool:
        return not self.first_failures()

    def format(self) -> str:
        per_tensor = isinstance(self.grad_tol, NormTol)
        grel = "grad |err|/s" if per_tensor else "grad max rel"
        prel = "|err|/s" if per_tensor else "max rel"
        lines = [f"{'activation':<22} {'fwd max abs':>12} {'fwd max rel':>12} {'grad max abs':>13} {grel:>13}  verdict"]
        for f, g in self.activations:
            verdict = "ok" if f.ok and (g is None or g.ok) else ("FORWARD" if not f.ok else "GRADIENT")
            ga = f"{g.max_abs:13.3e}" if g is not None else f"{'-':>13}"
            gr = f"{format_rel(g.max_rel):>13}" if g is not None else f"{'-':>13}"
            lines.append(f"{f.name:<22} {f.max_abs:12.3e} {format_rel(f.max_rel):>12} {ga} {gr}  {verdict}")
        lines.append("")
        lines.append(f"{'parameter gradient':<32} {'max abs':>12} {prel:>12}  verdict")
        for p in self.parameters:
            lines.append(f"{p.name:<32} {p.max_abs:12.3e} {format_rel(p.max_rel):>12}  {'ok' if p.ok else 'MISMATCH'}")
        lines.append("")
        lines.append(f"forward: {_elementwise_rule(forward_tol(self.dtype))}; max rel is n/a where every "
                     f"|expected| <= atol")
        if per_tensor:
            lines.append(f"gradients: per tensor, ||actual - expected|| <= {self.grad_tol.rel:.3g} s, s the size of "
                         f"the per-position gradients the tensor is the mean of ({self.grad_tol.why}); "
                         f"|err|/s is the ratio")
        else:
            lines.append(f"gradients: {_elementwise_rule(self.grad_tol)}")
        fwd, grad = self.first_forward_divergence(), self.first_gradient_divergence()
        par = self.first_parameter_divergence()
        if fwd:
            lines.append(f"first layer over its forward tolerance ({self.dtype}): {fwd}")
        if grad:
            lines.append(f"first activation gradient over tolerance, walking back from the loss: {grad}")
        if par:
            lines.append(f"first parameter gradient over tolerance (model order): {par}")
        for kind, c in self.first_failures().items():  # what differed, where, by how much
            lines.append(f"  {kind}: {c.describe()}")
        if self.ok:
            lines.append(f"every activation, activation gradient and parameter gradient within the {self.dtype} "
                         f"tolerances")
        return "\n".join(lines)


def _elementwise_rule(tol: Tol) -> str:
    scale = "the tensor max |expected|" if tol.per_tensor else "|expected|"
    return f"|actual - expected| <= atol {tol.atol:.0e} + rtol {tol.rtol:.0e} x {scale} per element ({tol.why})"


def _numpy_pass(config: dict, params: dict, ids: np.ndarray, targets: np.ndarray, ignore_index: int | None = None):
    """Forward then backward with the NumPy layer pairs; activations and their gradients. The loss
    is the mean over the targets that are not `ignore_index`."""
    from numpy_ref.attention import attention_backward, attention_forward
    from numpy_ref.cross_entropy import cross_entropy_backward, cross_entropy_forward
    from numpy_ref.embedding import embedding_backward, embedding_forward
    from numpy_ref.layernorm import layernorm_backward, layernorm_forward
    from numpy_ref.linear import linear_backward, linear_forward
    from numpy_ref.mlp import mlp_backward, mlp_forward

    p, eps, nh = params, config["ln_eps"], config["n_heads"]
    acts, caches, grads_p = {}, {}, {}
    x, caches["embedding"] = embedding_forward(ids, p["wte.weight"], p["wpe.weight"])
    acts["embedding"] = x
    for i in range(config["n_layers"]):
        h = f"h.{i}"
        a, caches[f"{h}.ln_1"] = layernorm_forward(x, p[f"{h}.ln_1.weight"], p[f"{h}.ln_1.bias"], eps)
        acts[f"{h}.ln_1"] = a
        a, caches[f"{h}.attn"] = attention_forward(a, p[f"{h}.attn.c_attn.weight"], p.get(f"{h}.attn.c_attn.bias"),
                                                   p[f"{h}.attn.c_proj.weight"], p[f"{h}.attn.c_proj.bias"], nh)
        acts[f"{h}.attn"] = a
        x = x + a
        acts[f"{h}.residual_1"] = x
        m, caches[f"{h}.ln_2"] = layernorm_forward(x, p[f"{h}.ln_2.weight"], p[f"{h}.ln_2.bias"], eps)
        acts[f"{h}.ln_2"] = m
        m, caches[f"{h}.mlp"] = mlp_forward(m, p[f"{h}.mlp.c_fc.weight"], p[f"{h}.mlp.c_fc.bias"],
                                            p[f"{h}.mlp.c_proj.weight"], p[f"{h}.mlp.c_proj.bias"])
        acts[f"{h}.mlp"] = m
        x = x + m
        acts[f"{h}.residual_2"] = x
    f, caches["ln_f"] = layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"], eps)
    acts["ln_f"] = f
    head_name = "wte.weight" if config["tie_embeddings"] else "lm_head.weight"
    logits, caches["logits"] = linear_forward(f, p[head_name].T, None)  # (B, T, C) -> (B, T, V)
    acts["logits"] = logits
    loss, caches["loss"] = cross_entropy_forward(logits, targets, ignore_index)
    acts["loss"] = np.asarray(loss)

    dacts = {"loss": np.asarray(1.0)}
    dlogits = cross_entropy_backward(1.0, caches["loss"])
    dacts["logits"] = dlogits
    df, dheadT, _ = linear_backward(dlogits, caches["logits"])
    grads_p[head_name] = dheadT.T
    dacts["ln_f"] = df
    dx, grads_p["ln_f.weight"], grads_p["ln_f.bias"] = layernorm_backward(df, caches["ln_f"])
    for i in reversed(range(config["n_layers"])):
        h = f"h.{i}"
        dacts[f"{h}.residual_2"] = dx
        dacts[f"{h}.mlp"] = dx
        dm, grads_p[f"{h}.mlp.c_fc.weight"], grads_p[f"{h}.mlp.c_fc.bias"], grads_p[f"{h}.mlp.c_proj.weight"], \
            grads_p[f"{h}.mlp.c_proj.bias"] = mlp_backward(dx, caches[f"{h}.mlp"])
        dacts[f"{h}.ln_2"] = dm
        dres, grads_p[f"{h}.ln_2.weight"], grads_p[f"{h}.ln_2.bias"] = layernorm_backward(dm, caches[f"{h}.ln_2"])
        dx = dx + dres
        dacts[f"{h}.residual_1"] = dx
        dacts[f"{h}.attn"] = dx
        da, grads_p[f"{h}.attn.c_attn.weight"], dbq, grads_p[f"{h}.attn.c_proj.weight"], \
            grads_p[f"{h}.attn.c_proj.bias"] = attention_backward(dx, caches[f"{h}.attn"])
        if config["qkv_bias"]:
            grads_p[f"{h}.attn.c_attn.bias"] = dbq
        dacts[f"{h}.ln_1"] = da
        dres, grads_p[f"{h}.ln_1.weight"], grads_p[f"{h}.ln_1.bias"] = layernorm_backward(da, caches[f"{h}.ln_1"])
        dx = dx + dres
    dacts["embedding"] = dx
    dwte, grads_p["wpe.weight"] = embedding_backward(dx, caches["embedding"])
    grads_p["wte.weight"] = grads_p.get("wte.weight", 0.0) + dwte
    return acts, dacts, grads_p


def _torch_pass(config: dict, params: dict, ids: np.ndarray, targets: np.ndarray, dtype: str, device: str):
    import torch

    from torch_impl.attention import attention_forward
    from torch_impl.cross_entropy import cross_entropy_forward
    from torch_impl.embedding import embedding_forward
    from torch_impl.layernorm import layernorm_forward
    from torch_impl.mlp import mlp_forward

    tdtype = {"float64": torch.float64, "float32": torch.float32, "tf32": torch.float32,
              "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    p = {k: torch.tensor(v, dtype=tdtype, device=device, requires_grad=True) for k, v in params.items()}
    eps, nh = config["ln_eps"], config["n_heads"]
    acts = {}

    def keep(name, t):
        t.retain_grad()
        acts[name] = t
        return t

    ids_t, targets_t = torch.from_numpy(ids).to(device), torch.from_numpy(targets).to(device)
    from torch_impl.device import tf32_matmuls

    with tf32_matmuls(dtype == "tf32"):  # as models.run_torch: float32 tensors, TF32 products
        x = keep("embedding", embedding_forward(ids_t, p["wte.weight"], p["wpe.weight"]))
        for i in range(config["n_layers"]):
            h = f"h.{i}"
            a = keep(f"{h}.ln_1", layernorm_forward(x, p[f"{h}.ln_1.weight"], p[f"{h}.ln_1.bias"], eps))
            a = keep(f"{h}.attn", attention_forward(a, p[f"{h}.attn.c_attn.weight"], p.get(f"{h}.attn.c_attn.bias"),
                                                    p[f"{h}.attn.c_proj.weight"], p[f"{h}.attn.c_proj.bias"], nh))
            x = keep(f"{h}.residual_1", x + a)
            m = keep(f"{h}.ln_2", layernorm_forward(x, p[f"{h}.ln_2.weight"], p[f"{h}.ln_2.bias"], eps))
            m = keep(f"{h}.mlp", mlp_forward(m, p[f"{h}.mlp.c_fc.weight"], p[f"{h}.mlp.c_fc.bias"],
                                             p[f"{h}.mlp.c_proj.weight"], p[f"{h}.mlp.c_proj.bias"]))
            x = keep(f"{h}.residual_2", x + m)
        f = keep("ln_f", layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"], eps))
        head = p["wte.weight"] if config["tie_embeddings"] else p["lm_head.weight"]
        logits = keep("logits", f @ head.T)  # (B, T, C) -> (B, T, V)
        loss = keep("loss", cross_entropy_forward(logits, targets_t))
        loss.backward()
    # Torch tensors, so that comparisons report the dtype computed in (bfloat16, not the float32
    # a NumPy copy would be). A parameter autograd gave no gradient has a zero one.
    t_acts = {k: v.detach() for k, v in acts.items()}
    t_dacts = {k: v.grad for k, v in acts.items() if v.grad is not None}
    t_grads = {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in p.items()}
    return t_acts, t_dacts, t_grads


def position_grad_scales(config: dict, params: dict, ids: np.ndarray, targets: np.ndarray
                         ) -> tuple[dict[str, float], dict[str, float]]:
    """(per activation, per parameter) s = sqrt(sum_n ||g_n||^2) / N, g_n the gradient of the loss
    at position n alone: checks.position_grad_scales's definition (tolerances.GRADIENT_NORM says
    why low-precision gradient errors scale with s), from this module's own oracle pass, which
    also gives the activations' gradients. N passes, each counting one position."""
    ignored = -1  # not a class: marks the positions whose loss is left out of a pass
    acts_sq: dict[str, float] = {}
    params_sq: dict[str, float] = {}
    N = targets.size
    for n in range(N):
        one = np.full_like(targets, ignored)
        one.flat[n] = targets.flat[n]
        _, dacts, grads = _numpy_pass(config, params, ids, one, ignore_index=ignored)
        for sums, gradients in ((acts_sq, dacts), (params_sq, grads)):
            for k, g in gradients.items():
                sums[k] = sums.get(k, 0.0) + float(np.sum(np.square(g)))
    return ({k: float(np.sqrt(v)) / N for k, v in acts_sq.items()},
            {k: float(np.sqrt(v)) / N for k, v in params_sq.items()})


def diff_models(config: dict, params: dict, ids: np.ndarray, targets: np.ndarray, dtype: str = "float64",
                device: str = "cpu") -> DiffReport:
    """Run both trees layer by layer on the same weights and batch; compare everything.

    dtype "tf32" runs float32 tensors with TF32 matmuls and is refused (ValueError) off CUDA,
    where it would be plain float32 judged by TF32's looser tolerance."""
    import torch

    if dtype == "tf32" and torch.device(device).type != "cuda":
        raise ValueError(f"dtype='tf32' on device={device!r}: TF32 is a CUDA matmul mode; on {device} the products "
                         f"are plain float32 (use dtype='float32')")
    acts, dacts, grads = _numpy_pass(config, params, ids, targets)
    t_acts, t_dacts, t_grads = _torch_pass(config, params, ids, targets, dtype, device)
    tf = forward_tol(dtype)
    norm_tol = gradient_norm_tol(dtype)
    if norm_tol is None:
        tg = gradient_tol(dtype)

        def judge_act(name, actual, expected):
            return compare(name, actual, expected, tg)

        judge_param = judge_act
    else:  # bf16 / fp16 / tf32: each gradient tensor as a whole, against its per-position scale
        tg = norm_tol
        act_scales, param_scales = position_grad_scales(config, params, ids, targets)

        def judge_act(name, actual, expected):
            return compare_grad_norm(name, actual, expected, act_scales[name], norm_tol)

        def judge_param(name, actual, expected):
            return compare_grad_norm(name, actual, expected, param_scales[name], norm_tol)

    report = DiffReport(dtype=dtype, grad_tol=tg)
    for name, ref in acts.items():
        f = compare(name, t_acts[name], ref, tf)
        g = judge_act(name, t_dacts[name], dacts[name]) if name in t_dacts and name in dacts else None
        report.activations.append((f, g))
    for name in params:
        report.parameters.append(judge_param(name, t_grads[name], grads[name]))
    return report
