"""numpy_ref, torch_impl and Hugging Face GPT-2 behind one small interface, on the same weights.

A `Runner` holds one model and exposes the three things the benchmarks time:
`forward()` (logits for the batch, no gradient), `train_step()` (forward, backward, AdamW) and
`decode(n, use_cache)` (greedy decoding of one prompt). Every runner starts from the same float64
parameter dict (drawn once from numpy_ref's initialisation), so they compute the same function.

Backends (name: what it is):
- numpy-float64, numpy-float32: numpy_ref's fused path (hand-written backward) in that dtype;
- torch-fp32: torch_impl eager, float32 (SDPA attention, fused AdamW where torch supports it);
- torch-bf16: the same under bf16 autocast (float32 master weights);
- torch-compile: torch.compile of the float32 model;
- hf-fp32: transformers' GPT2LMHeadModel with our weights copied in (its Conv1D stores weights
  (in, out) like ours, so no transposes), dropout off, its default attention implementation
  (named in the row's note). It does the same work as ours: the loss is the cross-entropy of its
  logits against our targets (not its `labels=`, which shift them again), its AdamW decays the
  same parameters (torch_impl.optim.gpt2_decay), a c_attn bias our model lacks is frozen at 0, no
  KV cache is built outside decoding, and greedy decoding has no end-of-text token to stop at or
  avoid (it emits n tokens, as ours does, whatever they are).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

LR, WEIGHT_DECAY, BETAS, EPS = 3e-4, 0.1, (0.9, 0.95), 1e-8


@dataclass
class Runner:
    backend: str
    kind: str  # numpy | torch | hf
    peak_name: str
    forward: Callable[[], Any]
    train_step: Callable[[], Any]
    decode: Callable[[int, bool], Any] | None
    sync: Callable[[], None]
    note: str = ""
    # Bytes of gradients the runner holds between training steps (torch's .grad, freed by
    # zero_grad inside the timed call and made again by its backward, so its in-call peak leaves
    # them out); numpy_ref makes its gradients inside the call and keeps none (0).
    grad_bytes: int = 0


def numpy_params(config_d: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """The shared float64 weights: numpy_ref's own initialisation."""
    from numpy_ref.config import GPTConfig
    from numpy_ref.model import GPTModel

    return GPTModel(GPTConfig(**config_d), seed=seed, dtype=np.float64).params


# ---- numpy_ref ------------------------------------------------------------------------------

def numpy_optimizer(params: dict):
    """numpy_ref.optim's AdamW over the model's parameter dict."""
    from numpy_ref import optim

    return optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)


def numpy_runner(config_d: dict, params: dict, ids: np.ndarray, targets: np.ndarray, dtype: str) -> Runner:
    from numpy_ref.config import GPTConfig
    from numpy_ref.model import GPTModel

    model = GPTModel(GPTConfig(**config_d), seed=0, dtype=getattr(np, dtype))
    for k, v in params.items():
        model.params[k][...] = v
    opt = numpy_optimizer(model.params)

    def forward():
        return model(ids)

    def train_step():
        _, loss, cache = model.forward(ids, targets)
        grads = model.backward(cache)
        opt.step(grads)
        return loss

    def decode(n: int, use_cache: bool):
        from numpy_ref.generate import generate

        return generate(model, ids[:1, :1], n, temperature=0.0, use_cache=use_cache)

    return Runner(f"numpy-{dtype}", "numpy", f"numpy_{dtype}", forward, train_step, decode, lambda: None)


# ---- torch_impl -----------------------------------------------------------------------------

def matmul_precision(device: str, tf32: bool) -> Callable[[], None]:
    """A function that sets torch's TF32 switches for float32 matmuls on CUDA (a no-op elsewhere).
    Every timed torch call runs it first: the switches are global, so whatever runner or layer
    was built or timed before must not leave its setting to the next (a float32 row of Hugging
    Face or of the layer tables would otherwise run in TF32 and be divided by the float32 peak)."""
    if not device.startswith("cuda"):
        return lambda: None

    def apply() -> None:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32

    return apply


def torch_optimizer(model, device: str):
    """torch_impl.optim.build_optimizer: AdamW, fused where torch supports it, GPT-2's decay groups."""
    from torch_impl.optim import build_optimizer

    opt = build_optimizer(model, "adamw", lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    fused = bool(opt.defaults.get("fused"))
    return opt, f"torch_impl.optim AdamW ({'fused' if fused else 'foreach'})"


def torch_model(config_d: dict, params: dict, device: str, dtype: str = "float32"):
    import torch

    from torch_impl.config import GPTConfig
    from torch_impl.model import GPTModel

    model = GPTModel(GPTConfig(**config_d), seed=0, dtype=getattr(torch, dtype), device=device)
    state = model.state_dict()
    with torch.no_grad():
        for k, t in state.items():
            t.copy_(torch.from_numpy(np.ascontiguousarray(params[k])).to(t.dtype))
    return model


def _logits_loss(out):
    """torch_impl's forward returns (logits, loss) with targets; tolerate a bare loss too."""
    return out if isinstance(out, tuple) else (None, out)


def torch_runner(config_d: dict, params: dict, ids: np.ndarray, targets: np.ndarray, mode: str,
                 device: str = "cpu") -> Runner:
    """mode: fp32 | bf16 | compile | compile-bf16 | tf32 (CUDA only)."""
    import contextlib

    import torch

    model = torch_model(config_d, params, device)
    model.train()
    opt, opt_name = torch_optimizer(model, device)
    ids_t, targets_t = torch.from_numpy(ids).to(device), torch.from_numpy(targets).to(device)
    dev_type = device.split(":")[0]
    sync = (lambda: torch.cuda.synchronize(device)) if dev_type == "cuda" else (lambda: None)
    bf16 = "bf16" in mode
    autocast = (lambda: torch.autocast(dev_type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    fwd_model = torch.compile(model) if mode.startswith("compile") else model
    # TF32 only where asked for: fp32 and compile measure float32 matmuls.
    precision = matmul_precision(device, tf32=mode in ("tf32", "bf16", "compile-bf16"))

    def forward():
        precision()
        with torch.no_grad(), autocast():
            return fwd_model(ids_t)

    def train_step():
        precision()
        opt.zero_grad(set_to_none=True)
        with autocast():
            _, loss = _logits_loss(fwd_model(ids_t, targets_t))
        loss.backward()
        opt.step()
        return loss

    def decode(n: int, use_cache: bool):
        from torch_impl.generate import generate

        precision()
        model.eval()
        try:
            with torch.no_grad(), autocast():
                return generate(model, ids_t[:1, :1], n, temperature=0.0, use_cache=use_cache)
        finally:
            model.train()

    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return Runner(f"torch-{mode}", "torch", f"{'cuda' if dev_type == 'cuda' else 'torch'}_"
                  f"{'bfloat16' if bf16 else 'tf32' if mode == 'tf32' else 'float32'}",
                  forward, train_step, decode, sync, note=f"optimizer: {opt_name}", grad_bytes=grads)


# ---- Hugging Face -----------------------------------------------------------------------------

def hf_model(config_d: dict, params: dict, device: str = "cpu"):
    """GPT2LMHeadModel on our config and weights (float32, dropout off)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=config_d["vocab_size"], n_positions=config_d["context_length"],
                     n_embd=config_d["emb_dim"], n_layer=config_d["n_layers"], n_head=config_d["n_heads"],
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=config_d["ln_eps"],
                     activation_function="gelu_new", tie_word_embeddings=bool(config_d["tie_embeddings"]),
                     bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = GPT2LMHeadModel(cfg).to(device)
    state = model.state_dict()
    C = config_d["emb_dim"]
    with torch.no_grad():
        for key, t in state.items():
            name = key.removeprefix("transformer.")
            if name in params:
                src = params[name]
            elif name.endswith("attn.c_attn.bias"):
                src = np.zeros(3 * C)  # GPT-2 always has this bias; ours is off when qkv_bias is False
            elif name == "lm_head.weight" and config_d["tie_embeddings"]:
                src = params["wte.weight"]
            elif name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
                continue  # HF's causal-mask buffers in older versions
            else:
                raise KeyError(f"no weight of ours for Hugging Face parameter {key}")
            t.copy_(torch.from_numpy(np.ascontiguousarray(src)).to(t.dtype))
    if not config_d.get("qkv_bias", True):  # ours has no c_attn bias: HF's stays 0, untrained
        for name, p in model.named_parameters():
            if name.endswith("attn.c_attn.bias"):
                p.requires_grad_(False)
    return model


def hf_runner(config_d: dict, params: dict, ids: np.ndarray, targets: np.ndarray, device: str = "cpu") -> Runner:
    import torch

    model = hf_model(config_d, params, device)
    model.train()
    opt, opt_name = torch_optimizer_plain(model, device)
    ids_t, targets_t = torch.from_numpy(ids).to(device), torch.from_numpy(targets).to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    precision = matmul_precision(device, tf32=False)  # float32 matmuls, whatever ran before

    def forward():
        precision()
        with torch.no_grad():
            return model(input_ids=ids_t, use_cache=False).logits

    def train_step():
        precision()
        opt.zero_grad(set_to_none=True)
        # The loss ours takes: our targets are already the next tokens (`labels=` would shift them again)
        logits = model(input_ids=ids_t, use_cache=False).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets_t.flatten())
        loss.backward()
        opt.step()
        return loss

    def decode(n: int, use_cache: bool):
        precision()
        model.eval()
        try:
            with torch.no_grad():
                return model.generate(ids_t[:1, :1], max_new_tokens=n, do_sample=False, use_cache=use_cache)
        finally:
            model.train()

    peak = "cuda_float32" if device.startswith("cuda") else "torch_float32"  # the device's own float32 GEMM rate
    attention = getattr(model.config, "_attn_implementation", None) or "default"
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return Runner("hf-fp32", "hf", peak, forward, train_step, decode, sync,
                  note=f"optimizer: {opt_name}; attention: {attention}", grad_bytes=grads)


def torch_optimizer_plain(model, device: str):
    """The same AdamW settings for HF as for ours: torch.optim.AdamW, fused where supported, weight
    decay on the parameters ours decays (torch_impl.optim.gpt2_decay, by HF's names less
    `transformer.`; a tied lm_head is wte, named once)."""
    import torch

    from torch_impl.optim import gpt2_decay

    named = [(n.removeprefix("transformer."), p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if gpt2_decay(n, tuple(p.shape))], "weight_decay": WEIGHT_DECAY},
              {"params": [p for n, p in named if not gpt2_decay(n, tuple(p.shape))], "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, fused=True), "torch.optim.AdamW(fused=True)"
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, foreach=True), "torch.optim.AdamW(foreach=True)"


def make_runner(backend: str, config_d: dict, params: dict, ids: np.ndarray, targets: np.ndarray,
                device: str = "cpu") -> Runner:
    if backend.startswith("numpy-"):
        return numpy_runner(config_d, params, ids, targets, backend.split("-", 1)[1])
    if backend.startswith("torch-"):
        return torch_runner(config_d, params, ids, targets, backend.split("-", 1)[1], device)
    if backend == "hf-fp32":
        return hf_runner(config_d, params, ids, targets, device)
    raise ValueError(f"unknown backend {backend!r}")
