"""Text generation: one sampling step written out, and the decoding loop with a KV cache.

`sample_next(logits, *, temperature, top_k, top_p, coin)` picks one id from a row of logits (V,)
with the algorithm of docs/design.md, "Sampling" (torch_impl/generate.py implements the same):

    temperature 0 (or None): argmax, ties to the lowest id; the coin is not used
    z = (logits - max logits) / temperature   (the softmax of logits / temperature; z <= 0, no overflow)
    top_k: keep ids with z >= the k-th largest z (k clamped to V; ties at the k-th value stay)
    top_p: order the kept ids by z descending (ties: lower id first), p = softmax over them,
           keep the shortest prefix whose cumulative p is >= top_p (at least one id)
    p = softmax(z) over the kept ids; walk them in ascending id order accumulating p and return
    the first id whose cumulative p is > coin (coin uniform in [0, 1)); if rounding leaves
    none, the last kept id with p > 0. This is inverse-CDF sampling (llm.c's `sample_mult`), so two
    backends given the same coin pick the same token.

`generate(model, ids, max_new_tokens, ...)` appends tokens to ids (B, T) -> (B, T + n). The
context fed to the model is the last `context_length` ids (every prompt id, cropped or not, must
lie in [0, V): a ValueError names the first that does not). With `use_cache` (the default) the
prompt is run once into a KV cache and each new token costs one position; once the sequence
is longer than the context, the window slides, every position embedding changes, and the
cache is rebuilt from the cropped window (exactly what full recomputation computes).

Reference: the book's `generate` (chapter 5, temperature and top-k); Holtzman et al. 2020 for
top-p; llm.c `sample_mult` for the explicit coin.
"""

from __future__ import annotations

import numbers

import numpy as np


def _softmax(z: np.ndarray) -> np.ndarray:
    """exp(z - max z) / sum; the max is subtracted only for numerical stability."""
    e = np.exp(z - np.max(z))
    return e / np.sum(e)


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


def sample_next(logits: np.ndarray, *, temperature: float | None = 0.0, top_k: int | None = None,
                top_p: float | None = None, coin: float | None = None) -> int:
    """One id from a row of logits (V,); see the module docstring for the algorithm."""
    _check_options(temperature, top_k, top_p)
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 1 or logits.size == 0:
        raise ValueError(f"logits must be one non-empty row (V,), got shape {logits.shape}")
    if np.isnan(logits).any():
        raise ValueError(f"logits contain NaN at id {int(np.flatnonzero(np.isnan(logits))[0])}")
    if not np.isfinite(np.max(logits)):
        raise ValueError(f"the largest logit is {np.max(logits)}; sampling needs a finite one")
    if not temperature:
        return int(np.argmax(logits))  # argmax returns the first maximum: ties go to the lowest id
    if coin is None or not 0.0 <= coin < 1.0:
        raise ValueError(f"sampling (temperature {temperature}) needs a coin in [0, 1), got {coin!r}")
    V = logits.shape[0]
    with np.errstate(over="ignore"):  # a logit far below the max may go to -inf: probability 0, as it should
        z = (logits - np.max(logits)) / temperature  # (V,) <= 0: the max is 0, small temperatures cannot overflow
    keep = np.ones(V, dtype=bool)  # (V,)
    if top_k is not None:
        k = min(int(top_k), V)  # clamp: top-k over more ids than exist keeps them all
        kth_largest = np.sort(z)[V - k]
        keep &= z >= kth_largest
    if top_p is not None:
        kept = np.flatnonzero(keep)  # (K,) ascending ids
        order = kept[np.lexsort((kept, -z[kept]))]  # (K,): z descending, then lower id first
        cum = np.cumsum(_softmax(z[order]))  # (K,)
        reached = np.flatnonzero(cum >= top_p)
        n = int(reached[0]) + 1 if reached.size else len(order)  # shortest prefix, >= 1 id
        keep = np.zeros(V, dtype=bool)  # (V,)
        keep[order[:n]] = True
    ids = np.flatnonzero(keep)  # (K,) ascending ids
    p = _softmax(z[ids])  # (K,)
    cum = np.cumsum(p)  # (K,) the CDF in id order
    above = np.flatnonzero(cum > coin)
    return int(ids[above[0]]) if above.size else int(ids[np.flatnonzero(p > 0)[-1]])  # rounding: last with p > 0


def _check_ids(ids, vocab_size: int) -> np.ndarray:
    """The prompt as int64, every id checked against V: the model sees only the last Tc of them,
    but all of them are returned, so an id cropped away must not pass unchecked either."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"ids must be an integer array, got dtype {ids.dtype}")
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"ids must be a non-empty 2-D array (B, T), got shape {ids.shape}")
    bad = (ids < 0) | (ids >= vocab_size)  # (B, T); in the ids' own dtype, before a uint64 could wrap
    if bad.any():
        b, t = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"token id {int(ids[b, t])} at position (batch {b}, time {t}) is outside [0, {vocab_size}) "
                         f"(vocab_size={vocab_size})")
    return ids.astype(np.int64)


def _check_coins(coins, n: int, B: int) -> np.ndarray:
    coins = np.asarray(coins, dtype=np.float64)
    if coins.shape != (n, B):
        raise ValueError(f"coins must have shape (max_new_tokens, B) = {(n, B)}, got {coins.shape}")
    if coins.size and not (np.all(coins >= 0.0) and np.all(coins < 1.0)):
        bad = np.argwhere(~((coins >= 0.0) & (coins < 1.0)))[0]
        raise ValueError(f"coins must lie in [0, 1); coins[{bad[0]}, {bad[1]}] = {coins[tuple(bad)]}")
    return coins


def generate(model, ids, max_new_tokens: int, *, temperature: float | None = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_id: int | None = None, coins=None,
             rng: np.random.Generator | None = None, use_cache: bool = True) -> np.ndarray:
    """ids (B, T) -> (B, T + n), n <= max_new_tokens (fewer when every row hit `eos_id`).

    coins: (max_new_tokens, B) uniform draws in [0, 1); coins[s, b] picks row b's token at
        step s. If None and sampling, they are drawn up front as `rng.random((max_new_tokens, B))`.
    eos_id: a row that produced it is padded with it from then on; all rows stopped ends early.
    use_cache: decode with a KV cache (default) or recompute the whole window at every step;
        both give the same tokens.
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
    sampling = bool(temperature)
    if coins is None and sampling and max_new_tokens > 0:
        if rng is None:
            raise ValueError("sampling with temperature > 0 needs coins or an rng (np.random.Generator)")
        coins = rng.random((max_new_tokens, B))  # (n, B)
    if coins is not None:
        coins = _check_coins(coins, max_new_tokens, B)

    out = ids
    done = np.zeros(B, dtype=bool)  # (B,) rows that produced eos_id
    cache = None
    for step in range(max_new_tokens):
        if use_cache and cache is not None and out.shape[1] <= Tc:
            logits = model(out[:, -1:], kv_cache=cache, last_only=True)  # (B, 1) -> (B, 1, V): one new position
        else:
            window = out[:, -Tc:]  # (B, T') -> (B, min(T', Tc)): crop to the context
            cache = model.new_kv_cache(B) if use_cache else None
            logits = model(window, kv_cache=cache, last_only=True)  # (B, T) -> (B, 1, V)
        last = logits[:, -1, :]  # (B, T, V) -> (B, V)
        new = np.empty(B, dtype=np.int64)  # (B,)
        for b in range(B):
            coin = None if coins is None else float(coins[step, b])
            new[b] = eos_id if done[b] else sample_next(last[b], temperature=temperature, top_k=top_k,
                                                        top_p=top_p, coin=coin)
        out = np.concatenate([out, new[:, None]], axis=1)  # (B, T) -> (B, T + 1)
        if eos_id is not None:
            done |= new == eos_id
            if done.all():
                break
    return out
