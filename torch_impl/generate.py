"""Text generation with torch: the sampling step and the KV-cached decoding loop.

The algorithm is docs/design.md, "Sampling" (numpy_ref/generate.py writes every step out):
temperature 0 is argmax (lowest id on ties); otherwise z = (logits - max) / temperature, top-k keeps
z >= the k-th largest (k clamped to V), top-p keeps the shortest prefix of the kept ids sorted
by z descending (ties: lower id first) whose cumulative softmax is >= top_p, and the token is
the first kept id, in ascending id order, whose cumulative probability exceeds the coin (if
rounding leaves none, the last kept id with probability > 0).

Sampling runs on the host in float64 on one row at a time: it is a few vector ops over V, and
doing it in float64 is what makes the same coin pick the same token as the NumPy oracle. The
model itself runs on its own device and dtype; only the last position's logits are computed
(`last_only`), and with `use_cache` each new token costs one position of a preallocated KV
cache. When the sequence outgrows the context, the window slides and the cache is rebuilt from
the cropped window, which is exactly what recomputation would see.
"""

from __future__ import annotations

import numbers

import torch

from torch_impl.linear import bf16_weights_held


def _check_options(temperature, top_k, top_p) -> None:
    """A wrong type is a TypeError (a bool too: True is not a temperature of 1), a value out of
    range a ValueError, each naming the option (docs/design.md, "Bad input")."""
    for name, value, kind in (("temperature", temperature, numbers.Real), ("top_k", top_k, numbers.Integral),
                              ("top_p", top_p, numbers.Real)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            expected = "an int" if kind is numbers.Integral else "a number"
            raise TypeError(f"{name} must be {expected} or None, got {value!r} ({type(value).__name__})")
    if temperature is not None and not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def sample_next(logits: torch.Tensor, *, temperature: float | None = 0.0, top_k: int | None = None,
                top_p: float | None = None, coin: float | None = None) -> int:
    """One id from a row of logits (V,)."""
    _check_options(temperature, top_k, top_p)
    if not isinstance(logits, torch.Tensor):  # a list or array: straight to float64 (as_tensor would pick float32)
        logits = torch.as_tensor(logits, dtype=torch.float64)
    logits = logits.detach().to(device="cpu", dtype=torch.float64)
    if logits.ndim != 1 or logits.numel() == 0:
        raise ValueError(f"logits must be one non-empty row (V,), got shape {tuple(logits.shape)}")
    nan = torch.isnan(logits)
    if bool(nan.any()):
        raise ValueError(f"logits contain NaN at id {int(nan.nonzero()[0, 0])}")
    if not bool(torch.isfinite(logits.max())):
        raise ValueError(f"the largest logit is {float(logits.max())}; sampling needs a finite one")
    if not temperature:
        return int(torch.argmax(logits))  # the first maximum: ties go to the lowest id
    if coin is None or not 0.0 <= coin < 1.0:
        raise ValueError(f"sampling (temperature {temperature}) needs a coin in [0, 1), got {coin!r}")
    V = logits.shape[0]
    z = (logits - logits.max()) / temperature  # (V,) <= 0: the max is 0, small temperatures cannot overflow
    keep = torch.ones(V, dtype=torch.bool)  # (V,)
    if top_k is not None:
        kth_largest = torch.topk(z, min(int(top_k), V)).values[-1]  # k clamped to V
        keep &= z >= kth_largest
    if top_p is not None:
        kept = keep.nonzero().squeeze(1)  # (K,) ascending ids
        desc = torch.sort(z[kept], descending=True, stable=True).indices  # stable: lower id first on ties
        order = kept[desc]  # (K,)
        cum = torch.cumsum(torch.softmax(z[order], dim=0), dim=0)  # (K,)
        n = int((cum < top_p).sum()) + 1  # cum is non-decreasing: the prefix up to the first >= top_p
        keep = torch.zeros(V, dtype=torch.bool)
        keep[order[: min(n, len(order))]] = True
    ids = keep.nonzero().squeeze(1)  # (K,) ascending ids
    p = torch.softmax(z[ids], dim=0)  # (K,)
    cum = torch.cumsum(p, dim=0)  # (K,) the CDF in id order
    above = (cum > coin).nonzero()
    return int(ids[above[0, 0]]) if above.numel() else int(ids[(p > 0).nonzero()[-1, 0]])  # rounding: last with p > 0


def _check_ids(ids, vocab_size: int) -> torch.Tensor:
    """The prompt as int64, every id checked against V: the model sees only the last Tc of them,
    but all of them are returned, so an id cropped away must not pass unchecked either."""
    ids = torch.as_tensor(ids)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer tensor, got dtype {ids.dtype}")
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"ids must be a non-empty 2-D tensor (B, T), got shape {tuple(ids.shape)}")
    # torch compares no uint64: read as int64, an id past 2**63 is negative (and out of range).
    wide = ids.view(torch.int64) if ids.dtype == torch.uint64 else ids.to(torch.int64)  # (B, T)
    bad = (wide < 0) | (wide >= vocab_size)  # (B, T)
    if bool(bad.any()):
        b, t = (int(i) for i in bad.nonzero()[0])
        value = int(wide[b, t]) + (2**64 if ids.dtype == torch.uint64 and int(wide[b, t]) < 0 else 0)
        raise ValueError(f"token id {value} at position (batch {b}, time {t}) is outside [0, {vocab_size}) "
                         f"(vocab_size={vocab_size})")
    return wide


def _check_coins(coins, n: int, B: int) -> torch.Tensor:
    coins = torch.as_tensor(coins).to(device="cpu", dtype=torch.float64)
    if tuple(coins.shape) != (n, B):
        raise ValueError(f"coins must have shape (max_new_tokens, B) = {(n, B)}, got {tuple(coins.shape)}")
    bad = ~((coins >= 0.0) & (coins < 1.0))
    if bool(bad.any()):
        s, b = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"coins must lie in [0, 1); coins[{s}, {b}] = {float(coins[s, b])}")
    return coins


@torch.no_grad()
def generate(model, ids, max_new_tokens: int, *, temperature: float | None = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_id: int | None = None, coins=None,
             rng: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
    """ids (B, T) -> (B, T + n) on the model's device, n <= max_new_tokens.

    coins: (max_new_tokens, B) uniform draws in [0, 1) (a tensor or anything torch.as_tensor
        takes); if None and sampling, `torch.rand((max_new_tokens, B), generator=rng, float64)`.
    eos_id: a row that produced it is padded with it; all rows stopped ends early.
    The model runs in eval mode (no dropout) and is put back in its previous mode afterwards.
    """
    V, Tc = model.config.vocab_size, model.config.context_length
    ids = _check_ids(ids, V)
    _check_options(temperature, top_k, top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    B = ids.shape[0]
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, numbers.Integral)):
        raise TypeError(f"eos_id must be an int token id or None, got {eos_id!r} ({type(eos_id).__name__})")
    if eos_id is not None and not 0 <= eos_id < V:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {V})")
    if coins is None and temperature and max_new_tokens > 0:
        if rng is None:
            raise ValueError("sampling with temperature > 0 needs coins or an rng (torch.Generator)")
        coins = torch.rand((max_new_tokens, B), generator=rng, dtype=torch.float64)  # (n, B)
    if coins is not None:
        coins = _check_coins(coins, max_new_tokens, B)

    was_training = model.training
    model.eval()
    try:
        # Under CPU bf16 autocast each weight is cast once for the whole loop, not per token (linear.py).
        with bf16_weights_held():
            out = ids.to(model.device)
            done = torch.zeros(B, dtype=torch.bool)  # (B,) rows that produced eos_id
            cache = None
            for step in range(max_new_tokens):
                if use_cache and cache is not None and out.shape[1] <= Tc:
                    logits = model(out[:, -1:], kv_cache=cache, last_only=True)  # (B, 1) -> (B, 1, V)
                else:
                    window = out[:, -Tc:]  # (B, T') -> (B, min(T', Tc)): crop to the context
                    cache = model.new_kv_cache(B) if use_cache else None
                    logits = model(window, kv_cache=cache, last_only=True)  # (B, T) -> (B, 1, V)
                last = logits[:, -1, :].to(device="cpu", dtype=torch.float64)  # (B, 1, V) -> (B, V)
                new = torch.empty(B, dtype=torch.int64)  # (B,)
                for b in range(B):
                    coin = None if coins is None else float(coins[step, b])
                    new[b] = eos_id if bool(done[b]) else sample_next(last[b], temperature=temperature, top_k=top_k,
                                                                      top_p=top_p, coin=coin)
                out = torch.cat([out, new.to(out.device)[:, None]], dim=1)  # (B, T) -> (B, T + 1)
                if eos_id is not None:
                    done |= new == eos_id
                    if bool(done.all()):
                        break
    finally:
        model.train(was_training)
    return out
