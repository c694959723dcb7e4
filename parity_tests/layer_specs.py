"""One table of the layers both trees implement, so tests, `gpt-oracle check` and the user oracle
API all drive them the same way.

A `LayerSpec` knows how to make valid inputs for a layer from a seed and a few sizes, which of
them are differentiable (in the order the NumPy backward returns their gradients), and where
the two implementations live (`numpy_ref/<file>.py::<name>_forward/_backward` and
`torch_impl/<file>.py::<name>_forward`). Nothing here computes anything itself.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from parity_tests.tolerances import Tol, large_mean_row_tol


@dataclass(frozen=True)
class Sizes:
    """The dimensions a layer input is built from (dimension vocabulary of docs/design.md)."""

    B: int = 2
    T: int = 5
    nh: int = 2
    hs: int = 4
    V: int = 11
    Tc: int = 8

    def __post_init__(self):
        # A zero size makes every tensor empty, and an empty comparison cannot fail: a wrong layer
        # passed at T = 0 or B = 0.
        for name in ("B", "T", "nh", "hs", "V", "Tc"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Sizes.{name} must be an int >= 1, got {value!r}")

    @property
    def C(self) -> int:
        return self.nh * self.hs


@dataclass(frozen=True)
class LayerSpec:
    name: str  # the file and function stem in both trees
    # (rng, sizes, dtype the check runs in; "float64" by default) -> every argument, in call order
    make_inputs: Callable[..., dict]
    differentiable: tuple[str, ...]  # arguments that get a gradient, in the NumPy backward's order
    scalar_output: bool = False  # True when the output is a scalar loss (upstream gradient 1)
    # Rows of the output (and of every tensor shaped like it) to compare separately, each at its
    # own scale: inputs -> {group label: boolean mask over the leading axes}; "" is the main group.
    row_groups: Callable[[dict], dict[str, np.ndarray]] | None = None
    # A row group's own tolerance: (group label, the dtype's Tol, dtype name) -> the Tol it is judged by.
    group_tol: Callable[[str, Tol, str], Tol] | None = None
    elementwise: bool = False  # no sums: judged by tolerances.ELEMENTWISE where the dtype has one
    notes: str = ""
    # A layer that is a use of another (attention with earlier positions): its oracle pair and
    # torch function, in place of the numpy_ref / torch_impl functions of its name.
    pair: Callable[[], tuple[Callable, Callable]] | None = None
    torch_fn: Callable[[], Callable] | None = None

    def numpy_pair(self):
        if self.pair is not None:
            return self.pair()
        module = importlib.import_module(f"numpy_ref.{self.name}")
        return getattr(module, f"{self.name}_forward"), getattr(module, f"{self.name}_backward")

    def torch_forward(self):
        if self.torch_fn is not None:
            return self.torch_fn()
        module = importlib.import_module(f"torch_impl.{self.name}")
        return getattr(module, f"{self.name}_forward")


def _normal(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    return rng.standard_normal(shape) * scale


def weight_scale(C: int) -> float:
    """The standard deviation of drawn weights: 0.3 up to C = 32 (every size drawn by default),
    then 0.3 * sqrt(32 / C), so that pre-activations stay O(1) at any width, as in a trained model.
    At C = 768 a fixed 0.3 gives attention scores in the hundreds: the softmax saturates, values
    grow with C, and a correct float32 kernel fails a tolerance whose absolute floor is 1e-5."""
    return 0.3 * min(1.0, (32 / C) ** 0.5)


def _linear_inputs(rng, s: Sizes, dtype: str = "float64") -> dict:
    C_out = s.C + 3  # rectangular on purpose: a transposed weight cannot pass
    return dict(x=_normal(rng, (s.B, s.T, s.C)), w=_normal(rng, (s.C, C_out), weight_scale(s.C)),
                b=_normal(rng, (C_out,), 0.1))


_LAYERNORM_SMALL_SPREADS = (0.1, 0.0, 1.0)  # row variances / eps (var ~ eps/10, 0, ~eps), the last rows
# GPT-2's 1e-5 half the time: a kernel must use the eps it is given. None below 1e-5: the rows
# with var ~ eps/10 would then sit among fp16's subnormals (below 6e-8 at 1e-6).
_LAYERNORM_EPS = (1e-5, 1e-5, 1e-4, 1e-3)
LAYERNORM_LARGE_MEAN = 100.0  # the offset of one row, in units of its spread (1)
LARGE_MEAN_ROWS = "rows with |mean| > 30 std"  # its row group


def _layernorm_inputs(rng, s: Sizes, dtype: str = "float64") -> dict:
    # Degenerate widths are left out: with C = 1 the variance is exactly 0 and the output is
    # eps-dominated (1/sqrt(eps) = 316 amplifies the input's rounding past any fixed tolerance);
    # with C = 2 the output is +-1 whatever x is, so dx is identically ~0 and what remains is
    # pure cancellation noise. No model has such a width; use C >= 3.
    C = max(s.C, 3)
    x = _normal(rng, (s.B, s.T, C), 2.0) + 0.5  # var ~ 4: eps changes these rows by ~eps/8 relative
    # A few values drawn close together by chance (C = 3 is common) make a row whose spread is
    # small next to its mean: a correct bf16 kernel then loses most of x - mean to the inputs'
    # rounding (2^-9 |mean| / std of the output; up to 100% of dx seen at C = 3), which no fixed
    # tolerance separates from a bug. The ordinary rows are spread out to std >= max(1, |mean|),
    # so their rounding stays that of the inputs; small spreads get rows of their own, below.
    mean = x.mean(axis=-1, keepdims=True)  # (B, T, 1)
    std = x.std(axis=-1, keepdims=True)
    x = mean + (x - mean) * np.maximum(1.0, np.maximum(1.0, np.abs(mean)) / np.maximum(std, 1e-12))
    # Rows where eps matters: var ~ eps/10 and ~eps, and a constant row (var = 0) that only eps
    # keeps finite. Their spread is what eps competes with; they are centred near 0 because a
    # mean offset m costs a correct kernel ~u * |m| / sqrt(var + eps) of the output (150 u at
    # m = 0.5, the float32 tolerance itself), and that would measure the offset, not eps.
    # At most half the rows (none when B = T = 1): the ordinary rows stay the bulk of the test.
    rows = x.reshape(-1, C)  # (B, T, C) -> (B*T, C), a view
    eps = float(_LAYERNORM_EPS[rng.integers(len(_LAYERNORM_EPS))]) if len(rows) >= 2 else 1e-5
    # From 4 rows on, the first has a mean 100x its spread, as rows through GPT-2's outlier
    # channels have: var = E[x^2] - E[x]^2 in float32 then loses ~u * 100^2 of the variance (a
    # 0.3-0.6% error), where a two-pass or Welford kernel stays within ~3 u * 100 (measured).
    if len(rows) >= 4 and dtype in ("float64", "float32", "tf32"):  # bf16 / fp16: see _layernorm_group_tol
        z = rng.standard_normal(C)
        z = (z - z.mean()) / max(z.std(), 1e-3)  # spread 1 exactly: 3 draws can sit close together
        rows[0] = LAYERNORM_LARGE_MEAN * rng.choice([-1.0, 1.0]) + z
    for i, ratio in enumerate(_LAYERNORM_SMALL_SPREADS[: len(rows) // 2]):
        if ratio == 0.0:
            rows[-1 - i] = (eps ** 0.5) * rng.standard_normal()  # one value repeated: var = 0 exactly
        else:
            rows[-1 - i] = _normal(rng, (C,), (ratio * eps) ** 0.5)
    return dict(x=x, w=1.0 + _normal(rng, (C,), 0.2), b=_normal(rng, (C,), 0.2), eps=eps)


def _layernorm_row_groups(inputs: dict) -> dict[str, np.ndarray]:
    """Masks over the (B, T) rows: the ordinary ones, and those whose variance is within 100x of
    eps. The second group's dx is ~1/sqrt(var + eps) ~ 300x the first's (and its rounding with
    it), so each is judged at its own scale: judged together, a bf16 rtol taken of the tensor's
    largest value would be ~30, and the ordinary rows' dx (~1) could be anything."""
    x = inputs["x"]
    var = x.var(axis=-1)  # (B, T, C) -> (B, T)
    small = var < 100 * inputs["eps"]
    offset = ~small & (np.abs(x.mean(axis=-1)) > 30 * np.sqrt(var))  # a mean of 100 spreads
    return {"": ~small & ~offset, "rows with var < 100 eps": small, LARGE_MEAN_ROWS: offset}


def _layernorm_group_tol(group: str, tol: Tol, dtype: str) -> Tol:
    """The large-mean row (drawn for float64, float32 and tf32 checks only) is judged by
    tolerances.large_mean_row_tol. bf16 and fp16 checks draw no such row: a kernel that takes the
    mean in the input dtype rounds it to the inputs' step there (0.5 at 100 in bf16), and the
    row's share of dw and db, which sum over rows, cannot be judged on its own. A one-pass
    variance is a float32 check."""
    return large_mean_row_tol(tol) if group == LARGE_MEAN_ROWS else tol


GELU_WIDE = (12.0, -12.0, 20.0, -20.0)  # past where an exp-based tanh overflows (e^(2u) at x > ~10)


def _gelu_inputs(rng, s: Sizes, dtype: str = "float64") -> dict:
    x = _normal(rng, (s.B, s.T, s.C), 2.0)
    flat = x.reshape(-1)  # a view: the last values become GELU_WIDE's (as many as fit)
    n = min(len(GELU_WIDE), flat.size - 1)
    if n > 0:
        flat[-n:] = GELU_WIDE[:n]
    return dict(x=x)


def _attention_inputs(rng, s: Sizes, dtype: str = "float64") -> dict:
    C = s.C
    return dict(
        x=_normal(rng, (s.B, s.T, C)),
        w_attn=_normal(rng, (C, 3 * C), weight_scale(C)),
        b_attn=_normal(rng, (3 * C,), 0.1),
        w_proj=_normal(rng, (C, C), weight_scale(C)),
        b_proj=_normal(rng, (C,), 0.1),
        n_heads=s.nh,
    )


def _attention_with_past_inputs(rng, s: Sizes, dtype: str = "float64") -> dict:
    args = _attention_inputs(rng, s, dtype)
    P = max(1, s.Tc - s.T + 1)  # P earlier positions, at least one (P = 0 is plain attention): Tc = T + P - 1
    return dict(x=args.pop("x"), x_past=_normal(rng, (s.B, P, s.C)), **args)


# attention_with_past: the new positions' output when their queries also see P earlier ones, as
# in decoding with a KV cache (whose keys and values are the earlier positions'). The oracle is
# numpy_ref's attention over the whole sequence, read at the new positions:
#     out = attention([x_past; x])[:, P:]                  (B, P + T, C) -> (B, T, C)
#     d[x_past; x] = attention_backward(upstream 0 on the first P rows, dout on the rest)
# A kernel that aligns its causal mask to the top-left corner (is_causal=True with fewer queries
# than keys) lets new query t see only keys 0 .. t instead of 0 .. P + t, and fails here.
# The torch function (check's rows) is torch_impl's attention over the whole sequence, sliced:
# its KV-cache path takes no gradients, and check's kv-cache rows compare that path instead.

def attention_with_past_forward(x, x_past, w_attn, b_attn, w_proj, b_proj, n_heads):
    from numpy_ref.attention import attention_forward

    P = x_past.shape[1]
    full, cache = attention_forward(np.concatenate([x_past, x], axis=1), w_attn, b_attn, w_proj, b_proj,
                                    n_heads)  # (B, P + T, C) -> (B, P + T, C)
    return full[:, P:], (cache, P, full.shape)  # (B, T, C)


def attention_with_past_backward(dout, cache):
    from numpy_ref.attention import attention_backward

    inner, P, shape = cache
    dfull = np.zeros(shape, dtype=dout.dtype)  # the earlier positions' outputs are not used
    dfull[:, P:] = dout  # (B, T, C) -> (B, P + T, C)
    dxx, dw_attn, db_attn, dw_proj, db_proj = attention_backward(dfull, inner)
    return dxx[:, P:], dxx[:, :P], dw_attn, db_attn, dw_proj, db_proj


def _torch_attention_with_past():
    import torch

    from torch_impl.attention import attention_forward

    def attention_with_past(x, x_past, w_attn, b_attn, w_proj, b_proj, n_heads):
        full = attention_forward(torch.cat([x_past, x], dim=1), w_attn, b_attn, w_proj, b_proj, n_heads)
        return full[:, x_past.shape[1]:]  # (B, P + T, C) -> (B, T, C)

    return attention_with_past


def _mlp_inputs(rng, s: Sizes, dtype: str = "float64") -> dict:
    C = s.C
    return dict(
        x=_normal(rng, (s.B, s.T, C)),
        w_fc=_normal(rng, (C, 4 * C), weight_scale(C)),
        b_fc=_normal(rng, (4 * C,), 0.1),
        w_proj=_normal(rng, (4 * C, C), weight_scale(C)),
        b_proj=_normal(rng, (C,), 0.1),
    )


def _embedding_inputs(rng, s: Sizes, dtype: str = "float64") -> dict:
    ids = rng.integers(0, s.V, size=(s.B, s.T))
    ids[0, 0] = ids[-1, -1]  # at least one repeated id: its gradient rows must accumulate
    return dict(ids=ids.astype(np.int64), wte=_normal(rng, (s.V, s.C), 0.5), wpe=_normal(rng, (max(s.Tc, s.T), s.C), 0.5))


IGNORE_INDEX = -100  # what padding targets hold (instruction_data.py; torch's default)


def _cross_entropy_inputs(rng, s: Sizes, dtype: str = "float64") -> dict:
    targets = rng.integers(0, s.V, size=(s.B, s.T)).astype(np.int64)
    logits = _normal(rng, (s.B, s.T, s.V), 2.0)
    # Half the draws with B*T >= 2 ignore some targets (never all: the mean would be 0/0), so a
    # loss that divides by every target, ignored ones included, cannot pass.
    ignore_index = None
    if targets.size >= 2 and rng.random() < 0.5:
        ignore_index = IGNORE_INDEX
        ignored = rng.random(targets.shape) < 0.4
        ignored.flat[int(rng.integers(targets.size))] = False
        targets[ignored] = IGNORE_INDEX
    return dict(logits=logits, targets=targets, ignore_index=ignore_index)


SPECS: dict[str, LayerSpec] = {
    spec.name: spec
    for spec in [
        LayerSpec("embedding", _embedding_inputs, ("wte", "wpe")),
        LayerSpec("linear", _linear_inputs, ("x", "w", "b")),
        LayerSpec("layernorm", _layernorm_inputs, ("x", "w", "b"), row_groups=_layernorm_row_groups,
                  group_tol=_layernorm_group_tol),
        LayerSpec("gelu", _gelu_inputs, ("x",), elementwise=True),
        LayerSpec("attention", _attention_inputs, ("x", "w_attn", "b_attn", "w_proj", "b_proj")),
        LayerSpec("attention_with_past", _attention_with_past_inputs,
                  ("x", "x_past", "w_attn", "b_attn", "w_proj", "b_proj"),
                  pair=lambda: (attention_with_past_forward, attention_with_past_backward),
                  torch_fn=_torch_attention_with_past),
        LayerSpec("mlp", _mlp_inputs, ("x", "w_fc", "b_fc", "w_proj", "b_proj")),
        LayerSpec("cross_entropy", _cross_entropy_inputs, ("logits",), scalar_output=True),
    ]
}


def get_spec(name: str) -> LayerSpec:
    if name not in SPECS:
        raise KeyError(f"no oracle layer named {name!r}; known: {sorted(SPECS)}")
    return SPECS[name]


@dataclass
class OracleResult:
    """The float64 oracle's output and the gradients for one upstream gradient."""

    inputs: dict
    out: np.ndarray
    upstream: np.ndarray
    grads: dict = field(default_factory=dict)


def run_oracle(spec: LayerSpec, inputs: dict, upstream_seed: int = 0) -> OracleResult:
    """Run the NumPy float64 pair on copies of `inputs`, with a random upstream gradient.

    The upstream gradient is random (never all ones: an all-ones cotangent cannot see a
    transposed or permuted output).
    """
    forward, backward = spec.numpy_pair()
    args = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v) for k, v in inputs.items()}
    args = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    out, cache = forward(**args)
    out = np.asarray(out)
    if spec.scalar_output:
        upstream = np.asarray(np.random.default_rng(upstream_seed).uniform(0.5, 1.5))
    else:
        upstream = np.random.default_rng(upstream_seed).standard_normal(out.shape)
    grads = backward(upstream, cache)
    if not isinstance(grads, tuple):
        grads = (grads,)
    if len(grads) != len(spec.differentiable):
        raise AssertionError(
            f"numpy_ref.{spec.name}_backward returned {len(grads)} gradients; expected {len(spec.differentiable)} "
            f"for {spec.differentiable}"
        )
    return OracleResult(inputs=args, out=out, upstream=upstream, grads=dict(zip(spec.differentiable, grads)))
