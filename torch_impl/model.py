"""GPT-2: embeddings, L pre-LN blocks, a final layer norm and the output head.

Dimensions: B batch, T time, C channels (emb_dim), nh heads, hs head size (C // nh),
V vocabulary, L layers, Tc context length, P positions already in a KV cache.

    x = wte[ids] + wpe[P : P + T]                 (B, T) -> (B, T, C); dropout
    for each of the L blocks:
        x = x + drop(attn(ln_1(x)))               (B, T, C) -> (B, T, C)
        x = x + drop(mlp(ln_2(x)))                (B, T, C) -> (B, T, C)
    f = ln_f(x)                                   (B, T, C)   what features_only=True returns
    logits = f @ head.T                           (B, T, C) -> (B, T, V)
    loss = mean cross-entropy(logits, targets)    (B, T, V), (B, T) -> ()

`head` is `wte.weight` itself when `tie_embeddings` (one tensor, one storage, gradients from
both uses add up) and a separate `lm_head.weight` (V, C) otherwise.

Reference: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners";
openai/gpt-2 `model.py`; the book's `GPTModel` (chapter 4). numpy_ref/model.py is the same
model with every backward written out.

API:
    model = GPTModel(config, seed=0, dtype=torch.float32, device=None)
    logits = model(ids)                                  ids (B, T) int -> logits (B, T, V)
    logits, loss = model(ids, targets)                   + mean cross-entropy, scalar
    cache = model.new_kv_cache(B); model(ids, kv_cache=cache)  incremental decoding
    model(ids, dropout_masks={...})                      explicit dropout (see DROPOUT_MASKS)

state_dict(): exactly the parameter table of docs/design.md, in its order, and nothing else
(no buffers): `wte.weight` (V, C), `wpe.weight` (Tc, C), then per block `h.{i}.ln_1.weight`,
`.bias`, `h.{i}.attn.c_attn.weight` (C, 3C) [, `.bias` (3C,)], `h.{i}.attn.c_proj.weight` (C, C),
`.bias`, `h.{i}.ln_2.*`, `h.{i}.mlp.c_fc.weight` (C, 4C), `.bias`, `h.{i}.mlp.c_proj.weight`
(4C, C), `.bias`, then `ln_f.weight`, `ln_f.bias` and, untied only, `lm_head.weight` (V, C).
"""

from __future__ import annotations

import math
import numbers
from typing import Mapping

import torch
from torch import nn

from torch_impl.block import BLOCK_MASK_KEYS, block_forward
from torch_impl.config import GPTConfig
from torch_impl.cross_entropy import check_targets
from torch_impl.decode import decode_step, decodes_fast
from torch_impl.device import stored_tensor
from torch_impl.dropout import check_mask, dropout_forward
from torch_impl.embedding import TiedHeadGrad, check_ids, embedding_forward
from torch_impl.head import head_forward, head_hands_grad_to_embedding, head_loss_forward
from torch_impl.kept_buffers import release_kept_buffers
from torch_impl.kv_cache import KVCache, inference_only
from torch_impl.layernorm import layernorm_forward

INIT_SCHEMES = ("gpt2", "book")  # see GPTModel.__init__; numpy_ref/params.py has the same

# Explicit dropout masks: key -> shape (P = positions already cached, 0 without a cache).
# A mask holds 0 or 1/(1 - drop_rate). When `dropout_masks` is given, exactly these masks are
# applied and torch draws nothing; a missing key means no dropout at that site.
DROPOUT_MASKS = {
    "embedding": "(B, T, C): on wte[ids] + wpe, before the first block",
    "h.{i}.attn.weights": "(B, nh, T, P + T): on block i's attention weights, after the softmax",
    "h.{i}.attn.out": "(B, T, C): on block i's attention branch, before the residual add",
    "h.{i}.mlp.out": "(B, T, C): on block i's MLP branch, before the residual add",
}


def param_group(**params: nn.Parameter | None) -> nn.Module:
    """A node of GPT-2's parameter hierarchy (`ln_1`, `attn.c_attn`, ...); holds tensors only.

    The computation lives in the `*_forward` functions, so the numbers are computed by the same
    code whether it is called on a module's parameters or on bare tensors.
    """
    node = nn.Module()
    for name, p in params.items():
        node.register_parameter(name, p)
    return node


BLOCK_PARAMS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                "mlp.c_proj.weight", "mlp.c_proj.bias")
_BLOCK_PATHS = tuple((name, tuple(name.split("."))) for name in BLOCK_PARAMS)  # "ln_1.weight" -> ("ln_1", "weight")


def _block_params(block: nn.Module) -> dict[str, torch.Tensor | None]:
    """A block's tensors by their GPT-2 names (block.py's `p`; `attn.c_attn.bias` None without
    qkv bias), read as attributes: a parametrized weight (torch.nn.utils.parametrize) gives its
    computed value, as nn.Linear would use it; a pruned one (torch.nn.utils.prune) the value its
    forward pre-hook computed (GPTModel._run_submodule_hooks).
    Plain getattr, not operator.attrgetter: torch.compile cannot trace an attrgetter, and a graph
    break inside the loop over blocks sends the whole forward back to eager."""
    params = {}
    for name, path in _BLOCK_PATHS:
        value = block
        for attr in path:
            value = getattr(value, attr)
        params[name] = value
    return params


def check_seed(seed) -> int:
    """Seeds are integers in 0 .. 2**64 - 1 in both trees, for GPTModel and GPTClassifier (numpy
    refused -1 and took True, torch took -1 and refused 2**64, each with its own message)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in 0 .. 2**64 - 1, got {seed!r}")
    return int(seed)


class GPTModel(nn.Module):
    def __init__(self, config: GPTConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, init: str = "gpt2") -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a torch_impl.config.GPTConfig, got {type(config).__name__}")
        self.config = config
        V, Tc, C, L = config.vocab_size, config.context_length, config.emb_dim, config.n_layers
        # Initialisation (docs/design.md), by `init` (INIT_SCHEMES; numpy_ref/params.py has the
        # same names): "gpt2" draws every weight and embedding from normal(0, 0.02); "book" what
        # the book's model gets from torch.nn's defaults: embeddings normal(0, 1), linear weights
        # and biases uniform(+-1/sqrt(fan_in)). Biases are 0 under "gpt2", layer norms 1 and 0
        # under both. Drawn from a generator seeded here (never the global one).
        if init not in INIT_SCHEMES:
            raise ValueError(f"unknown initialisation scheme {init!r}; known: {list(INIT_SCHEMES)}")
        gen = torch.Generator(device="cpu").manual_seed(check_seed(seed))
        on_meta = torch.device(device or "cpu").type == "meta"  # shapes only, no values (e.g. counting)

        def drawn(shape: tuple[int, ...], draw) -> nn.Parameter:
            if on_meta:
                return nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"))
            # Drawn on the CPU, then moved: the same seed gives the same weights on every device.
            return nn.Parameter(draw(torch.empty(shape, dtype=torch.float32)).to(device=device, dtype=dtype))

        def embedding(*shape: int) -> nn.Parameter:
            std = 0.02 if init == "gpt2" else 1.0
            return drawn(shape, lambda t: t.normal_(0.0, std, generator=gen))

        def linear_param(shape: tuple[int, ...], fan_in: int, is_bias: bool) -> nn.Parameter:
            """A linear layer's weight or bias; `fan_in` is the layer's input width."""
            if init == "gpt2":
                if is_bias:
                    return const(0.0, *shape)
                return drawn(shape, lambda t: t.normal_(0.0, 0.02, generator=gen))
            bound = 1.0 / math.sqrt(fan_in)
            return drawn(shape, lambda t: t.uniform_(-bound, bound, generator=gen))

        def const(value: float, *shape: int) -> nn.Parameter:
            return nn.Parameter(torch.full(shape, value, dtype=dtype, device=device))

        def ln() -> nn.Module:
            return param_group(weight=const(1.0, C), bias=const(0.0, C))

        def linear(c_in: int, c_out: int, bias: bool = True) -> nn.Module:
            return param_group(weight=linear_param((c_in, c_out), c_in, is_bias=False),  # (in, out)
                               bias=linear_param((c_out,), c_in, is_bias=True) if bias else None)

        self.wte = param_group(weight=embedding(V, C))
        self.wpe = param_group(weight=embedding(Tc, C))
        self.h = nn.ModuleList()
        for _ in range(L):
            block = nn.Module()
            block.ln_1 = ln()
            block.attn = nn.Module()
            block.attn.c_attn = linear(C, 3 * C, bias=config.qkv_bias)
            block.attn.c_proj = linear(C, C)
            block.ln_2 = ln()
            block.mlp = nn.Module()
            block.mlp.c_fc = linear(C, 4 * C)
            block.mlp.c_proj = linear(4 * C, C)
            self.h.append(block)
        self.ln_f = ln()
        if not config.tie_embeddings:
            self.lm_head = param_group(weight=linear_param((V, C), C, is_bias=False))  # (V, C), like wte; reads C

    # ---- the forward -----------------------------------------------------------------------

    @property
    def head_weight(self) -> torch.Tensor:
        """The output head (V, C): `wte.weight` itself when tied, else `lm_head.weight`."""
        return self.wte.weight if self.config.tie_embeddings else self.lm_head.weight

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None, *, kv_cache: KVCache | None = None,
                dropout_masks: Mapping[str, torch.Tensor] | None = None, ignore_index: int | None = None,
                last_only: bool = False, features_only: bool = False):
        """Logits (B, T, V) for ids (B, T); `(logits, loss)` when targets (B, T) are given; ln_f's
        output (B, T, C) with features_only.

        kv_cache: positions already cached come first (positions P .. P+T-1); it is advanced
            by T. Inference only: with gradient recording on, the call runs under torch.no_grad()
            and a backward through its outputs raises (kv_cache.inference_only). One position
            per row on the CPU runs decode.py's `decode_step` (the same computation in fewer
            torch calls, the same bits).
        dropout_masks: explicit dropout (keys and shapes in DROPOUT_MASKS). Without it, dropout
            is torch's own, at `config.drop_rate`, in training mode only.
        last_only: return logits (B, 1, V) for the last position only (what decoding needs; the
            head is the largest matmul). Not allowed with targets.
        features_only: return ln_f's output (B, T, C) and skip the vocabulary head (the trunk that
            classifier.py builds on). Not allowed with targets.
        """
        if last_only and targets is not None:
            raise ValueError("last_only=True returns one position's logits; it cannot be used with targets")
        if features_only and targets is not None:
            raise ValueError("features_only=True returns ln_f's output, no logits; it cannot be used with targets")
        recording = kv_cache is not None and torch.is_grad_enabled()
        trainable = next((p for p in self.parameters() if p.requires_grad), None) if recording else None
        if trainable is not None:
            with torch.no_grad():  # the cache is written in place: no graph through it (kv_cache.py)
                out = self.forward(ids, targets, kv_cache=kv_cache, dropout_masks=dropout_masks,
                                   ignore_index=ignore_index, last_only=last_only, features_only=features_only)
            # Joined to a parameter that takes gradients (wte may be frozen), so that a backward
            # reaches inference_only's error rather than "does not require grad".
            return inference_only(out, trainable)
        self._run_submodule_hooks()
        self._check_autocast_dtype()
        cfg = self.config
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            if isinstance(ids, torch.Tensor) and ids.ndim == 2 and ids.shape[0] != kv_cache.batch_size:
                raise ValueError(f"batch size {ids.shape[0]} differs from the KV cache's {kv_cache.batch_size}")
            self._check_cache(kv_cache)
        if isinstance(ids, torch.Tensor) and ids.ndim == 2:
            self._check_masks(dropout_masks, ids.shape[0], ids.shape[1], past)
        # With explicit masks, randomness is entirely explicit: torch draws no dropout.
        random_dropout = self.training and dropout_masks is None and cfg.drop_rate > 0.0
        if (targets is None and dropout_masks is None and not random_dropout and not features_only
                and decodes_fast(self, ids, kv_cache)):
            return decode_step(self, ids, kv_cache)  # one token per row on the CPU, same bits (decode.py)
        # Every input is checked here, before any compute: bad targets raise before the KV cache is
        # written, and under torch.compile the checks (data-dependent raises, run eagerly) break
        # the graph only here, so the blocks, the head and the loss are one graph.
        # Each weight read once per forward: a parametrized one is computed at every read (and a
        # stateful parametrization, spectral_norm's power iteration, would differ between reads).
        wte, wpe = self.wte.weight, self.wpe.weight
        head = None
        if not features_only:  # GPTClassifier has no vocabulary head
            head = wte if cfg.tie_embeddings else self.lm_head.weight
        V, Tc = wte.shape[0], wpe.shape[0]
        ids = check_ids(ids, V, Tc, pos_offset=past)  # (B, T) int64
        if targets is not None:  # a meta (B, T, V) stands for the logits: only its shape is read
            targets = check_targets(ids.new_empty(*ids.shape, V, device="meta"), targets, ignore_index)
        masks = dropout_masks or {}
        # A tied head on the sliced CPU path (or in CPU bf16 training with bf16 units) hands its
        # gradient to the embedding's backward, which adds its rows in place: one (V, C)
        # gradient, not two summed (TiedHeadGrad).
        tied_grad = (TiedHeadGrad() if cfg.tie_embeddings and not features_only and head_hands_grad_to_embedding(wte)
                     else None)
        x = embedding_forward(ids, wte, wpe, pos_offset=past,
                              tied_grad=tied_grad, ids_checked=True)  # (B, T) -> (B, T, C)
        x = dropout_forward(x, cfg.drop_rate, random_dropout, masks.get("embedding"))
        for i, block in enumerate(self.h):
            prefix = f"h.{i}."
            block_masks = {k[len(prefix):]: m for k, m in masks.items() if k.startswith(prefix)} if masks else None
            x = block_forward(x, _block_params(block), cfg.n_heads, cfg.ln_eps,
                              kv_cache=kv_cache.layer(i) if kv_cache is not None else None, masks=block_masks,
                              drop_p=cfg.drop_rate, training=random_dropout)  # (B, T, C) -> (B, T, C)
        if last_only:
            x = x[:, -1:]  # (B, T, C) -> (B, 1, C)
        x = layernorm_forward(x, self.ln_f.weight, self.ln_f.bias, cfg.ln_eps)  # (B, T or 1, C)
        if features_only:
            out = x
        elif targets is None:
            out = head_forward(x, head, tied_grad)  # (B, T, C) @ (C, V) -> (B, T, V)
        else:  # logits (B, T, V) and the mean cross-entropy against targets (B, T) -> (); fused on the CPU
            out = head_loss_forward(x, head, targets, ignore_index, tied_grad, targets_checked=True)
        if kv_cache is not None:  # only now: a call that raised leaves the cache's length as it was
            kv_cache.advance(ids.shape[1])
        return out

    def _run_submodule_hooks(self) -> None:
        """The forward reads the submodules' tensors directly (block.py's functions take tensors),
        so torch itself runs no hook registered on a submodule. Forward pre-hooks run here, with
        no inputs (there are none): torch.nn.utils.prune and the hook-based weight_norm and
        spectral_norm recompute a weight in one, which would otherwise stay what it was when the
        hook was registered. A pre-hook that returns new inputs, a forward hook (it would see an
        output no submodule makes) and a backward hook are refused, naming the submodule."""
        stack = list(self._modules.values())  # a plain walk: 37 us at GPT-2 small, modules() takes 80
        while stack:
            module = stack.pop()
            if module is None:
                continue
            stack.extend(module._modules.values())
            if not (module._forward_pre_hooks or module._forward_hooks or module._backward_hooks
                    or module._backward_pre_hooks):
                continue
            name = next(n for n, m in self.named_modules() if m is module)  # only for the message
            if module._forward_hooks or module._backward_hooks or module._backward_pre_hooks:
                raise RuntimeError(f"{name}: forward and backward hooks on a submodule of GPTModel never run: its "
                                   f"forward is functional (block.py's functions take the tensors). Register the "
                                   f"hook on the GPTModel itself, or use torch.nn.utils.parametrize")
            for key, hook in list(module._forward_pre_hooks.items()):
                out = hook(module, (), {}) if key in module._forward_pre_hooks_with_kwargs else hook(module, ())
                if out is not None:
                    raise RuntimeError(f"{name}: a forward pre-hook returned new inputs, but a submodule of "
                                       f"GPTModel takes none (its forward is functional); only hooks that "
                                       f"update the module, as torch.nn.utils.prune's, can run")

    def _check_autocast_dtype(self) -> None:
        """TypeError for 16-bit weights under autocast to the other 16-bit dtype (bf16 weights under
        fp16 autocast, or fp16 under bf16), naming both. The products would come out in the
        autocast dtype and the residual stream (wte[ids], not autocast) in the weights', so their
        sum is float32, which torch's layer norm refuses next to 16-bit weights with only "mixed
        dtype". Reads wte's stored dtype and the autocast state: no tensor is touched."""
        w = stored_tensor(self.wte, "weight")
        dev = w.device.type
        if w.dtype not in (torch.bfloat16, torch.float16) or dev == "meta":  # meta has no autocast to ask
            return
        if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) != w.dtype:
            ac = torch.get_autocast_dtype(dev)
            raise TypeError(f"the model's weights are {w.dtype}, but {dev} autocast computes in {ac}: the "
                            f"{ac} products and the {w.dtype} residual stream would mix. Autocast to "
                            f"{w.dtype}, run without autocast, or make the weights float32 or {ac}")

    def _check_cache(self, kv_cache: KVCache) -> None:
        """ValueError unless the cache was made for this model: (L, B, nh, Tc, hs) with this L, nh
        and hs, on the weights' device, and outside autocast in the weights' dtype (under autocast
        either the weights' or the autocast dtype: attention casts what it reads; but float64
        weights stay float64 under autocast, and so must their cache)."""
        cfg = self.config
        L, _, nh, _, hs = kv_cache.k.shape
        if (L, nh, hs) != (cfg.n_layers, cfg.n_heads, cfg.head_size):
            raise ValueError(f"the KV cache has n_layers={L}, n_heads={nh}, head_size={hs}; this model needs "
                             f"{cfg.n_layers}, {cfg.n_heads}, {cfg.head_size} (make it with model.new_kv_cache)")
        w = stored_tensor(self.wte, "weight")  # device and dtype, without computing a parametrized wte
        dev = w.device.type
        cast = torch.is_autocast_enabled(dev) and w.dtype != torch.float64  # autocast leaves float64 alone
        allowed = (w.dtype, torch.get_autocast_dtype(dev)) if cast else (w.dtype,)
        if kv_cache.k.device != w.device or kv_cache.k.dtype not in allowed:
            raise ValueError(f"the KV cache is {kv_cache.k.dtype} on {kv_cache.k.device}; this model's keys are "
                             f"{w.dtype} on {w.device} (model.new_kv_cache(B))")

    def _check_masks(self, masks: Mapping[str, torch.Tensor] | None, B: int, T: int, past: int) -> None:
        if masks is None:
            return
        cfg = self.config
        C, nh = cfg.emb_dim, cfg.n_heads
        expected = {"embedding": (B, T, C)}
        for i in range(cfg.n_layers):
            expected[f"h.{i}.attn.weights"] = (B, nh, T, past + T)
            expected[f"h.{i}.attn.out"] = (B, T, C)
            expected[f"h.{i}.mlp.out"] = (B, T, C)
        for key, mask in masks.items():
            if not isinstance(key, str):  # as numpy_ref: a wrong type, not an unknown name
                raise TypeError(f"dropout mask keys are strings, got {key!r} ({type(key).__name__})")
            if key not in expected:
                raise ValueError(f"unknown dropout mask {key!r}; known: 'embedding' and 'h.{{i}}.' + one of "
                                 f"{BLOCK_MASK_KEYS} for i < {cfg.n_layers}")
            check_mask(key, mask, expected[key])

    # ---- helpers -----------------------------------------------------------------------------

    def new_kv_cache(self, batch_size: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for `batch_size` rows, preallocated to the context length, on the
        model's device, in the model's dtype (pass the autocast dtype to decode in bf16)."""
        cfg = self.config
        w = self.wte.weight
        return KVCache(cfg.n_layers, batch_size, cfg.n_heads, cfg.context_length, cfg.head_size,
                       dtype=dtype or w.dtype, device=w.device)

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Distinct parameter elements (a tied head counts once); optionally without wpe/wte."""
        n = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            n -= self.wpe.weight.numel() + self.wte.weight.numel()
        return n

    def _apply(self, fn, recurse=True):
        """nn.Module's funnel for .to() / .cuda() / .double() / ...: the parameters' kept CPU
        buffers (kept_buffers.py) are released first, they no longer fit what is moved."""
        release_kept_buffers(self.parameters())
        return super()._apply(fn, recurse)

    @property
    def device(self) -> torch.device:
        return stored_tensor(self.wte, "weight").device

    @property
    def dtype(self) -> torch.dtype:
        return stored_tensor(self.wte, "weight").dtype

    # ---- checkpoints (torch_impl/checkpoint.py does the file format) --------------------------

    @classmethod
    def from_pretrained(cls, directory, dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None) -> "GPTModel":
        """Load a checkpoint directory (docs/design.md, "Checkpoints")."""
        from torch_impl.checkpoint import load_checkpoint

        config, state = load_checkpoint(directory, dtype=dtype)  # values past dtype's range refused by name
        model = cls(config, seed=0, dtype=dtype, device=device)
        model.load_state_dict(state, strict=True)
        return model

    def save_pretrained(self, directory) -> None:
        """Write this model as a checkpoint directory (weights in float32)."""
        from torch_impl.checkpoint import save_checkpoint

        save_checkpoint(directory, self.config, self.state_dict())
