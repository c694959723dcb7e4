"""The parameter table of GPT-2: names and shapes in order, initialisation, counts and memory.

Names and order follow docs/design.md (Hugging Face GPT-2's names without `transformer.`):
`wte.weight` (V, C), `wpe.weight` (Tc, C), then per block i `h.{i}.ln_1.weight`/`.bias` (C,),
`h.{i}.attn.c_attn.weight` (C, 3C) [+ `.bias` (3C,) with qkv_bias], `h.{i}.attn.c_proj.weight`
(C, C) + `.bias`, `h.{i}.ln_2.*`, `h.{i}.mlp.c_fc.weight` (C, 4C) + `.bias` (4C,),
`h.{i}.mlp.c_proj.weight` (4C, C) + `.bias` (C,), then `ln_f.weight`/`.bias` and, untied only,
`lm_head.weight` (V, C). Every linear weight is stored (in, out).

Initialisation, by scheme (`INIT_SCHEMES`): "gpt2" (normal(0, 0.02) weights and embeddings,
zero biases) or "book" (torch.nn's defaults); layer norms ones and zeros under both; drawn from
an explicit np.random.Generator in table order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def block_param_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """One block's (name, shape) pairs, without the `h.{i}.` prefix."""
    C = config.emb_dim
    table = [("ln_1.weight", (C,)), ("ln_1.bias", (C,)), ("attn.c_attn.weight", (C, 3 * C))]
    if config.qkv_bias:
        table.append(("attn.c_attn.bias", (3 * C,)))
    table += [
        ("attn.c_proj.weight", (C, C)), ("attn.c_proj.bias", (C,)),
        ("ln_2.weight", (C,)), ("ln_2.bias", (C,)),
        ("mlp.c_fc.weight", (C, 4 * C)), ("mlp.c_fc.bias", (4 * C,)),
        ("mlp.c_proj.weight", (4 * C, C)), ("mlp.c_proj.bias", (C,)),
    ]
    return table


def param_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """Every (name, shape) of the model, in checkpoint order."""
    V, Tc, C = config.vocab_size, config.context_length, config.emb_dim
    table = [("wte.weight", (V, C)), ("wpe.weight", (Tc, C))]
    for i in range(config.n_layers):
        table += [(f"h.{i}.{name}", shape) for name, shape in block_param_shapes(config)]
    table += [("ln_f.weight", (C,)), ("ln_f.bias", (C,))]
    if not config.tie_embeddings:
        table.append(("lm_head.weight", (V, C)))
    return table


# Initialisation schemes (torch_impl/model.py has the same names and distributions):
#   "gpt2": GPT-2's: every weight and embedding normal(0, 0.02), biases 0.
#   "book": what the book's chapter-4 model gets from torch.nn's defaults: embeddings normal(0, 1)
#           (nn.Embedding), linear weights and biases uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))
#           (nn.Linear; fan_in is the layer's input width: `in` of an (in, out) weight, C for
#           the (V, C) head). The book's chapter-5 run needs it: from "gpt2"'s small embeddings
#           its training loss stalls near 6 (benchmarks/results/cpu-amd-epyc-avx2-2c/train-book-ch5.md).
# Both: layer-norm gains 1 and biases 0.
INIT_SCHEMES = ("gpt2", "book")


def _is_layernorm(name: str) -> bool:
    return name.split(".")[-2].startswith("ln_")  # ln_1, ln_2, ln_f


def _draw_gpt2(name: str, shape: tuple[int, ...], fan_in: int | None, rng: np.random.Generator) -> np.ndarray:
    if name.endswith(".bias"):
        return np.zeros(shape)
    return 0.02 * rng.standard_normal(shape)


def _draw_book(name: str, shape: tuple[int, ...], fan_in: int | None, rng: np.random.Generator) -> np.ndarray:
    if name in ("wte.weight", "wpe.weight"):
        return rng.standard_normal(shape)
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, shape)


_DRAW = {"gpt2": _draw_gpt2, "book": _draw_book}


def init_params(config, rng: np.random.Generator, dtype=np.float64, scheme: str = "gpt2") -> dict[str, np.ndarray]:
    """A fresh parameter dict (name -> C-contiguous array of `dtype`), drawn from `rng` by `scheme`,
    in table order (a scheme draws nothing for what it sets to a constant)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"init_params needs an np.random.Generator, got {type(rng).__name__}")
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown initialisation scheme {scheme!r}; known: {list(INIT_SCHEMES)}")
    table = dict(param_shapes(config))
    params = {}
    for name, shape in table.items():
        if _is_layernorm(name):
            params[name] = (np.ones if name.endswith(".weight") else np.zeros)(shape, dtype=dtype)
            continue
        # A linear layer's input width: `in` of its (in, out) weight; the (V, C) head reads C.
        weight = table[name.removesuffix(".bias") + ".weight"] if name.endswith(".bias") else shape
        fan_in = weight[1] if name == "lm_head.weight" else weight[0]
        params[name] = _DRAW[scheme](name, shape, fan_in, rng).astype(dtype)
    return params


def count_parameters(config) -> int:
    """Parameter elements of the model as configured (a tied head is `wte` and counts once)."""
    return sum(int(np.prod(shape)) for _, shape in param_shapes(config))


@dataclass(frozen=True)
class ParameterReport:
    """The figures `gpt-oracle info` prints (chapter 4 of the book computes the same three)."""

    total: int  # every parameter of the model as configured
    with_tied_head: int  # the count when the output head is `wte` itself (the GPT-2 paper's count)
    head: int  # parameters of the separate output head (0 when tied)
    embeddings: int  # wte + wpe
    per_block: int
    bytes_float32: int  # total * 4

    @property
    def mb_float32(self) -> float:
        """Memory in float32, MB = bytes / 1024**2 (the book's convention)."""
        return self.bytes_float32 / 1024**2


def parameter_report(config) -> ParameterReport:
    total = count_parameters(config)
    head = 0 if config.tie_embeddings else config.vocab_size * config.emb_dim
    per_block = sum(int(np.prod(s)) for _, s in block_param_shapes(config))
    embeddings = (config.vocab_size + config.context_length) * config.emb_dim
    return ParameterReport(total=total, with_tied_head=total - head, head=head, embeddings=embeddings,
                           per_block=per_block, bytes_float32=4 * total)


def memory_bytes(config, dtype=np.float32) -> int:
    """Bytes to hold the parameters in `dtype`."""
    return count_parameters(config) * np.dtype(dtype).itemsize
