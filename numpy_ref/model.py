"""GPT-2 in NumPy: the whole forward, and its backward written out line by line.

Dimensions: B batch, T time, C channels (emb_dim), nh heads, hs head size, V vocabulary,
L layers, Tc context length, P positions already in a KV cache (0 without one).

    x = wte[ids] + wpe[P : P + T]                 (B, T) -> (B, T, C)
    x = x * mask["embedding"]                     dropout (optional, explicit)
    for each of the L blocks:
        x = x + drop(attn(ln_1(x)))               (B, T, C) -> (B, T, C)
        x = x + drop(mlp(ln_2(x)))                (B, T, C) -> (B, T, C)
    f = ln_f(x)                                   (B, T, C)
    logits = f @ head^T                           (B, T, C) @ (C, V) -> (B, T, V)
    loss = mean cross-entropy(logits, targets)    (B, T, V), (B, T) -> ()

`head` is `wte.weight` itself when `config.tie_embeddings` (its gradient is then the sum of the
embedding scatter and the head product) and a separate `lm_head.weight` (V, C) otherwise.

`gpt_backward` reads as the forward bottom-up: one line per forward line, same names with a
`d` prefix. Randomness is passed in: dropout happens only where a mask is given.

Dropout masks (a dict; every key optional; each mask holds 0 or 1/(1 - drop_rate)):
    "embedding"           (B, T, C)         on wte[ids] + wpe, before the first block
    "h.{i}.attn.weights"  (B, nh, T, P + T) on block i's attention weights, after the softmax
    "h.{i}.attn.out"      (B, T, C)         on block i's attention branch, before the residual add
    "h.{i}.mlp.out"       (B, T, C)         on block i's MLP branch, before the residual add
`GPTModel.dropout_masks(B, T, rng)` draws a full set from an explicit generator.

The float32 path is the fast NumPy path: every array stays in the parameters' dtype (checked),
every product is a GEMM on contiguous arrays, no Python loop runs over heads or positions.

Reference: Radford et al. 2019; openai/gpt-2 `model.py`; the book's `GPTModel` (chapter 4);
llm.c `gpt2_forward`/`gpt2_backward`. torch_impl/model.py is the same model on autograd.
"""

from __future__ import annotations

import numbers
from typing import Callable, Mapping

import numpy as np

from numpy_ref.block import BLOCK_MASK_KEYS, block_backward, block_forward
from numpy_ref.config import GPTConfig
from numpy_ref.cross_entropy import check_targets, cross_entropy_backward, cross_entropy_forward
from numpy_ref.embedding import check_ids, embedding_backward, embedding_forward
from numpy_ref.kv_cache import KVCache
from numpy_ref.layernorm import layernorm_backward, layernorm_forward
from numpy_ref.params import block_param_shapes, count_parameters, init_params, param_shapes

MASK_KEYS = ("embedding",) + tuple(f"h.{{i}}.{k}" for k in BLOCK_MASK_KEYS)


def head_weight(params: Mapping[str, np.ndarray], config) -> np.ndarray:
    """The output head (V, C): `wte.weight` itself when tied, else `lm_head.weight`."""
    return params["wte.weight"] if config.tie_embeddings else params["lm_head.weight"]


def check_seed(seed) -> int:
    """Seeds are integers in 0 .. 2**64 - 1 in both trees, for GPTModel and GPTClassifier (numpy
    refused -1 and took True, torch took -1 and refused 2**64, each with its own message)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in 0 .. 2**64 - 1, got {seed!r}")
    return int(seed)


def gpt_features_forward(params: Mapping[str, np.ndarray], ids, config, *,
                         dropout_masks: Mapping[str, np.ndarray] | None = None, kv_cache: KVCache | None = None,
                         last_only: bool = False, check_more: Callable[[np.ndarray], None] | None = None):
    """(f, cache): the final layer norm's output f (B, T, C), before any head; (B, 1, C) with
    `last_only`. The trunk that the language-model head (`gpt_forward`) and the classifier
    (classifier.py) share; `gpt_features_backward` is its backward. Advances a KV cache.

    Every input is checked before any compute, in torch_impl's order (the KV cache, the dropout
    masks, the ids, then `check_more(ids)`: the caller's own inputs, such as targets), so that an
    input with two faults raises the same exception in both trees."""
    dtype = params["wte.weight"].dtype
    past = 0 if kv_cache is None else kv_cache.length
    ids = np.asarray(ids)
    if kv_cache is not None:
        _check_cache(kv_cache, config, ids, dtype)
    masks = split_masks(dropout_masks, config, ids, past, dtype)
    V, Tc = params["wte.weight"].shape[0], params["wpe.weight"].shape[0]
    check_ids(ids, V, Tc, pos_offset=past)
    if check_more is not None:
        check_more(ids)
    x, emb = embedding_forward(ids, params["wte.weight"], params["wpe.weight"], pos_offset=past)  # (B, T) -> (B, T, C)
    mask_e = masks["embedding"]
    if mask_e is not None:
        x = x * mask_e  # (B, T, C)
    blocks = []
    for i in range(config.n_layers):
        p = {name: params[f"h.{i}.{name}"] for name, _ in block_param_shapes(config)}
        x, c = block_forward(x, p, config, masks[i], kv_cache=kv_cache.layer(i) if kv_cache is not None else None)
        blocks.append(c)  # (B, T, C) -> (B, T, C)
    if last_only:
        x = x[:, -1:]  # (B, T, C) -> (B, 1, C)
    f, ln_f = layernorm_forward(x, params["ln_f.weight"], params["ln_f.bias"], config.ln_eps)  # (B, T or 1, C)
    if kv_cache is not None:  # only now: a call that raised leaves the cache's length as it was
        kv_cache.advance(ids.shape[1])
    cache = dict(config=config, emb=emb, mask_e=mask_e, blocks=blocks, ln_f=ln_f, dtype=dtype, kv=kv_cache is not None,
                 ce=None, last_only=last_only)
    return f, cache


def gpt_features_backward(df: np.ndarray, cache) -> dict[str, np.ndarray]:
    """Gradients of every trunk parameter (wte's from the embedding only; no head), given
    df = dL/df (B, T, C) and the cache of `gpt_features_forward`."""
    if cache["kv"]:
        raise ValueError("the forward used a KV cache (inference); run it without one to train")
    if cache["last_only"]:
        raise ValueError("the forward ran with last_only=True (inference: the blocks' outputs at the other "
                         "positions were dropped); run it without last_only to train")
    config, dtype = cache["config"], cache["dtype"]
    grads = {}
    dx, grads["ln_f.weight"], grads["ln_f.bias"] = layernorm_backward(df, cache["ln_f"])
    for i in reversed(range(config.n_layers)):
        dx, g = block_backward(dx, cache["blocks"][i])  # (B, T, C) -> (B, T, C)
        grads.update({f"h.{i}.{name}": value for name, value in g.items()})
    if cache["mask_e"] is not None:
        dx = dx * cache["mask_e"]
    grads["wte.weight"], grads["wpe.weight"] = embedding_backward(dx, cache["emb"])  # (B, T, C) -> (V, C), (Tc, C)
    for name, g in grads.items():
        assert g.dtype == dtype, f"gradient {name} drifted to {g.dtype} from the parameters' {dtype}"
    return grads


def gpt_forward(params: Mapping[str, np.ndarray], ids, config, targets=None, *,
                dropout_masks: Mapping[str, np.ndarray] | None = None, kv_cache: KVCache | None = None,
                ignore_index: int | None = None, last_only: bool = False):
    """(logits, loss, cache); loss is None without targets. See the module docstring."""
    if last_only and targets is not None:
        raise ValueError("last_only=True returns the last position's logits only; it cannot take targets")
    V = params["wte.weight"].shape[0]

    def check_targets_first(ids: np.ndarray) -> None:  # bad targets raise before the blocks write the KV cache
        check_targets((*ids.shape, V), targets, ignore_index)  # cross_entropy_forward checks again: it costs ~nothing

    f, cache = gpt_features_forward(params, ids, config, dropout_masks=dropout_masks, kv_cache=kv_cache,
                                    last_only=last_only,
                                    check_more=None if targets is None else check_targets_first)  # (B, T) -> (B, T, C)
    B, T, C = f.shape
    head = head_weight(params, config)
    f2 = f.reshape(B * T, C)  # (B, T, C) -> (BT, C)
    logits = (f2 @ head.T).reshape(B, T, -1)  # (BT, C) @ (C, V) -> (BT, V) -> (B, T, V)
    assert logits.dtype == cache["dtype"], f"logits drifted to {logits.dtype} from the parameters' {cache['dtype']}"
    loss, ce = (None, None) if targets is None else cross_entropy_forward(logits, targets, ignore_index)
    cache.update(f2=f2, head=head, ce=ce)
    return logits, loss, cache


def gpt_backward(cache, dloss=1.0) -> dict[str, np.ndarray]:
    """Gradients of the loss for every parameter (the params' names and dtype), from the cache
    of a `gpt_forward` with targets; `dloss` is dL/dloss (1 for the loss itself)."""
    if cache["ce"] is None:
        raise ValueError("gpt_backward needs the cache of a forward run with targets")
    config = cache["config"]
    dlogits = cross_entropy_backward(dloss, cache["ce"])  # () -> (B, T, V)
    B, T, V = dlogits.shape
    dlogits2 = dlogits.reshape(B * T, V)  # (B, T, V) -> (BT, V)
    dhead = dlogits2.T @ cache["f2"]  # (V, BT) @ (BT, C) -> (V, C)
    df = (dlogits2 @ cache["head"]).reshape(B, T, -1)  # (BT, V) @ (V, C) -> (BT, C) -> (B, T, C)
    grads = gpt_features_backward(df, cache)
    if config.tie_embeddings:
        grads["wte.weight"] += dhead  # the head is wte: both uses add up
    else:
        grads["lm_head.weight"] = dhead
    return {name: grads[name] for name, _ in param_shapes(config)}


def _check_cache(kv_cache: KVCache, config, ids: np.ndarray, dtype) -> None:
    """ValueError unless the cache fits: ids' batch size, and (L, B, nh, Tc, hs) with the model's
    L, nh and hs in the parameters' dtype (a float32 cache would round a float64 model's keys)."""
    if ids.ndim == 2 and ids.shape[0] != kv_cache.batch_size:
        raise ValueError(f"batch size {ids.shape[0]} differs from the KV cache's {kv_cache.batch_size}")
    L, _, nh, _, hs = kv_cache.k.shape
    if (L, nh, hs) != (config.n_layers, config.n_heads, config.head_size):
        raise ValueError(f"the KV cache has n_layers={L}, n_heads={nh}, head_size={hs}; this model needs "
                         f"{config.n_layers}, {config.n_heads}, {config.head_size} (make it with model.new_kv_cache)")
    if kv_cache.k.dtype != dtype:
        raise ValueError(f"the KV cache is {kv_cache.k.dtype}; the parameters are {dtype} (model.new_kv_cache)")


def split_masks(masks: Mapping[str, np.ndarray] | None, config, ids: np.ndarray, past: int, dtype):
    """{"embedding": mask or None, i: block i's masks by block-local name}, shape-checked and
    in the parameters' dtype (a float64 mask must not promote a float32 model)."""
    out = {"embedding": None, **{i: {} for i in range(config.n_layers)}}
    if not masks:
        return out
    if ids.ndim != 2:  # no (B, T) to check the masks against: the ids' own check (next) names them, as in torch_impl
        return out
    B, T = ids.shape
    C, nh = config.emb_dim, config.n_heads
    expected_block = {"attn.weights": (B, nh, T, past + T), "attn.out": (B, T, C), "mlp.out": (B, T, C)}
    for key, mask in masks.items():
        if not isinstance(key, str):
            raise TypeError(f"dropout mask keys are strings, got {key!r} ({type(key).__name__}); known: {MASK_KEYS}")
        if key == "embedding":
            shape, target = (B, T, C), None
        else:
            parts = key.split(".", 2) + ["", ""]  # "h.{i}.{local}"; padded so a short key cannot IndexError
            local = parts[2]
            in_range = parts[0] == "h" and parts[1] in {str(i) for i in range(config.n_layers)}  # not "01", "\u0661"
            if not in_range or local not in expected_block:
                raise ValueError(f"unknown dropout mask {key!r}; known: {MASK_KEYS} with i < {config.n_layers}")
            shape, target = expected_block[local], (int(parts[1]), local)
        mask = np.array(mask, dtype=dtype)  # a copy: refilling the caller's array must not move the gradients
        if mask.shape != shape:
            raise ValueError(f"dropout mask {key!r} has shape {mask.shape}; expected {shape}")
        if target is None:
            out["embedding"] = mask
        else:
            out[target[0]][target[1]] = mask
    return out


class GPTModel:
    """The NumPy GPT-2: parameters in an ordered dict, forward and hand-written backward.

    model = GPTModel(config, seed=0, dtype=np.float64)
    logits = model(ids)                                   ids (B, T) int -> (B, T, V), no dropout
    logits, loss, cache = model.forward(ids, targets, dropout_masks=...)
    grads = model.backward(cache)                         name -> gradient, like model.params
    cache = model.new_kv_cache(B); model(ids_chunk, kv_cache=cache)   incremental decoding
    """

    def __init__(self, config: GPTConfig, seed: int = 0, dtype=np.float64,
                 params: Mapping[str, np.ndarray] | None = None, init: str = "gpt2") -> None:
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"GPTModel dtype must be float32 or float64, got {dtype}")
        seed = check_seed(seed)
        self.config = config
        self.dtype = dtype
        if params is None:
            self.params = init_params(config, np.random.default_rng(seed), dtype, scheme=init)
        else:
            self.params = checked_params(param_shapes(config), params, dtype)

    def __call__(self, ids, kv_cache: KVCache | None = None, *, last_only: bool = False) -> np.ndarray:
        """Logits (B, T, V) for inference: no dropout. With a KV cache, the ids are the next
        chunk (positions P .. P+T-1) and the cache is advanced; `last_only` gives (B, 1, V)."""
        logits, _, _ = gpt_forward(self.params, ids, self.config, kv_cache=kv_cache, last_only=last_only)
        return logits

    def forward(self, ids, targets=None, *, dropout_masks: Mapping[str, np.ndarray] | None = None,
                ignore_index: int | None = None):
        """(logits, loss, cache): loss is a 0-d array (None without targets); pass the cache to
        `backward`."""
        return gpt_forward(self.params, ids, self.config, targets, dropout_masks=dropout_masks,
                           ignore_index=ignore_index)

    def backward(self, cache, dloss=1.0) -> dict[str, np.ndarray]:
        return gpt_backward(cache, dloss)

    def loss_and_grads(self, ids, targets, *, dropout_masks=None, ignore_index: int | None = None):
        """(loss as a float, grads)."""
        _, loss, cache = self.forward(ids, targets, dropout_masks=dropout_masks, ignore_index=ignore_index)
        return float(loss), self.backward(cache)

    def dropout_masks(self, batch_size: int, seq_len: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """A full set of training dropout masks at `config.drop_rate`, drawn from `rng`
        ({} when the rate is 0: no dropout anywhere). For a forward without a KV cache (training):
        the attention masks are (B, nh, T, T)."""
        p = self.config.drop_rate
        if p == 0.0:
            return {}
        B, T, C, nh = batch_size, seq_len, self.config.emb_dim, self.config.n_heads

        def draw(shape):
            return ((rng.random(shape) >= p) * (1.0 / (1.0 - p))).astype(self.dtype)

        masks = {"embedding": draw((B, T, C))}
        for i in range(self.config.n_layers):
            masks[f"h.{i}.attn.weights"] = draw((B, nh, T, T))
            masks[f"h.{i}.attn.out"] = draw((B, T, C))
            masks[f"h.{i}.mlp.out"] = draw((B, T, C))
        return masks

    def new_kv_cache(self, batch_size: int) -> KVCache:
        """An empty cache for `batch_size` rows, preallocated to the context length."""
        c = self.config
        return KVCache(c.n_layers, batch_size, c.n_heads, c.context_length, c.head_size, dtype=self.dtype)

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Distinct parameter elements (a tied head counts once); optionally without wte/wpe."""
        n = count_parameters(self.config)
        if not include_embeddings:
            n -= self.params["wte.weight"].size + self.params["wpe.weight"].size
        return n

    @classmethod
    def from_pretrained(cls, directory, dtype=np.float64) -> "GPTModel":
        from numpy_ref.checkpoint import load_checkpoint

        config, params = load_checkpoint(directory, dtype=dtype)
        return cls(config, dtype=dtype, params=params)

    def save_pretrained(self, directory) -> None:
        from numpy_ref.checkpoint import save_checkpoint

        save_checkpoint(directory, self.config, self.params)


def checked_params(table: list[tuple[str, tuple[int, ...]]], params: Mapping[str, np.ndarray],
                   dtype) -> dict[str, np.ndarray]:
    """The table's names in order, each shape-checked and copied to contiguous `dtype`
    (classifier.py passes its own table). A copy: a model built from another's params must not
    share them, since the optimisers update parameters in place."""
    missing = [n for n, _ in table if n not in params]
    extra = sorted(set(params) - {n for n, _ in table})
    if missing or extra:
        raise KeyError(f"parameters do not match the config: missing {missing}, unexpected {extra}")
    out = {}
    for name, shape in table:
        value = np.asarray(params[name])
        if value.shape != shape:
            raise ValueError(f"parameter {name} has shape {value.shape}; the config needs {shape}")
        out[name] = np.array(value, dtype=dtype, order="C")  # always a copy
    return out
