"""Layer-by-layer differences between the trees, behind `gpt-oracle diff`.

Both trees run the GPT-2 forward one layer function at a time (`<layer>_forward` in each tree),
each feeding its own previous output forward, so an error shows where it enters and how it
grows. The NumPy side then runs the hand-derived backward functions in reverse; the torch side
gets the same gradients from autograd (`retain_grad` on every activation). Reported per
activation: the forward difference and the difference of the loss gradient with respect to it,
and per parameter the gradient difference; the first activation over its tolerance is named.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from parity_tests.compare import Comparison, compare, to_numpy
from parity_tests.tolerances import forward_tol, gradient_tol


@dataclass
class DiffReport:
    dtype: str
    activations: list[tuple[Comparison, Comparison | None]] = field(default_factory=list)  # (forward, gradient)
    parameters: list[Comparison] = field(default_factory=list)

    def first_forward_divergence(self) -> str | None:
        return next((f.name for f, _ in self.activations if not f.ok), None)

    def first_gradient_divergence(self) -> str | None:
        """In backward order: the activation nearest the loss whose gradient is off."""
        return next((g.name for _, g in reversed(self.activations) if g is not None and not g.ok), None)

    def first_parameter_divergence(self) -> str | None:
        return next((p.name for p in self.parameters if not p.ok), None)

    @property
    def ok(self) -> bool:
        return not (self.first_forward_divergence() or self.first_gradient_divergence() or self.first_parameter_divergence())

    def format(self) -> str:
        lines = [f"{'activation':<22} {'fwd max abs':>12} {'fwd max rel':>12} {'grad max abs':>13} {'grad max rel':>13}  verdict"]
        for f, g in self.activations:
            verdict = "ok" if f.ok and (g is None or g.ok) else ("FORWARD" if not f.ok else "GRADIENT")
            ga = f"{g.max_abs:13.3e}" if g is not None else f"{'-':>13}"
            gr = f"{g.max_rel:13.3e}" if g is not None else f"{'-':>13}"
            lines.append(f"{f.name:<22} {f.max_abs:12.3e} {f.max_rel:12.3e} {ga} {gr}  {verdict}")
        lines.append("")
        lines.append(f"{'parameter gradient':<32} {'max abs':>12} {'max rel':>12}  verdict")
        for p in self.parameters:
            lines.append(f"{p.name:<32} {p.max_abs:12.3e} {p.max_rel:12.3e}  {'ok' if p.ok else 'MISMATCH'}")
        lines.append("")
        fwd, grad, par = self.first_forward_divergence(), self.first_gradient_divergence(), self.first_parameter_divergence()
        if fwd:
            lines.append(f"first layer over its forward tolerance ({self.dtype}): {fwd}")
        if grad:
            lines.append(f"first activation gradient over tolerance, walking back from the loss: {grad}")
        if par:
            lines.append(f"first parameter gradient over tolerance (model order): {par}")
        if self.ok:
            lines.append(f"every activation, activation gradient and parameter gradient within the {self.dtype} tolerances")
        return "\n".join(lines)


def _numpy_pass(config: dict, params: dict, ids: np.ndarray, targets: np.ndarray):
    """Forward then backward with the NumPy layer pairs; activations and their gradients."""
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
    loss, caches["loss"] = cross_entropy_forward(logits, targets)
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
    logits = keep("logits", f @ head.T)
    loss = keep("loss", cross_entropy_forward(logits, targets_t))
    loss.backward()
    t_acts = {k: to_numpy(v) for k, v in acts.items()}
    t_dacts = {k: to_numpy(v.grad) for k, v in acts.items() if v.grad is not None}
    t_grads = {k: to_numpy(v.grad) if v.grad is not None else np.zeros(v.shape) for k, v in p.items()}
    return t_acts, t_dacts, t_grads


def diff_models(config: dict, params: dict, ids: np.ndarray, targets: np.ndarray, dtype: str = "float64",
                device: str = "cpu") -> DiffReport:
    """Run both trees layer by layer on the same weights and batch; compare everything."""
    acts, dacts, grads = _numpy_pass(config, params, ids, targets)
    t_acts, t_dacts, t_grads = _torch_pass(config, params, ids, targets, dtype, device)
    tf, tg = forward_tol(dtype), gradient_tol(dtype)
    report = DiffReport(dtype=dtype)
    for name, ref in acts.items():
        f = compare(name, t_acts[name], ref, tf)
        g = compare(name, t_dacts[name], dacts[name], tg) if name in t_dacts and name in dacts else None
        report.activations.append((f, g))
    for name in params:
        report.parameters.append(compare(name, t_grads[name], grads[name], tg))
    return report
