"""Text generation: one sampling step written out, and the decoding loop with a KV cache.

`sample_next(logits, *, temperature, top_k, top_p, coin)` picks one id from a row of logits (V,)
with the algorithm of docs/design.md, "Sampling" (torch_impl/generate.py implements the same):

    temperature 0 (or None): argmax, ties to the lowest id; the coin is not used
    z = (logits - max logits) / temperature   (the softmax of logits / temperature; z <= 0, no overflow)
    w = exp(z)                      by `sampling_exp`, the same bits in every library (below)
    top_k: w = 0 where z < the k-th largest z (k clamped to V; ties at the k-th value stay)
    top_p: order the ids with w > 0 by z descending (ties: lower id first), s = their running
           sum of w; keep the shortest prefix with s >= top_p * s[-1] (at least one id), w = 0
           for the rest
    cdf = running sum of w in ascending id order; return the first id with cdf > coin * cdf[-1]

Token i has probability w_i / cdf[-1]; this is inverse-CDF sampling (llm.c's `sample_mult`) with
the CDF left unnormalised. Every step is float64 and each operation is one IEEE-rounded
elementwise op, a comparison or a sequential running sum (`np.cumsum`), which torch computes
with the same bits, so two backends given the same coin pick the same token, at any boundary.
NumPy's `np.exp` does not qualify: it and `torch.exp` differ in the last bit for about one
argument in twenty (both are within an ulp), which moves a coin that lands on a boundary. Hence
`sampling_exp`, written with +, *, rint and 2**k only. The pick always has w > 0: coin < 1 makes
coin * cdf[-1] < cdf[-1], and the first running sum above it is one that just grew.

`generate(model, ids, max_new_tokens, ...)` appends tokens to ids (B, T) -> (B, T + n). The
context fed to the model is the last `context_length` ids (every prompt id, cropped or not, must
lie in [0, V): a ValueError names the first that does not). With `use_cache` (the default) the
prompt is run once into a KV cache and each new token costs one position; once the sequence
is longer than the context, the window slides, every position embedding changes, and the
cache is rebuilt from the cropped window (exactly what full recomputation computes).

Reference: the book's `generate` (chapter 5, temperature and top-k); Holtzman et al. 2020 for
top-p; llm.c `sample_mult` for the explicit coin; Cody and Waite 1980 (as in fdlibm's `exp`)
for the split of ln 2.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

# exp(z) = 2**k * exp(r), k = rint(z / ln 2), |r| <= ln(2) / 2 (Cody and Waite's reduction).
LN2_HI = float.fromhex("0x1.62e42feep-1")  # ln 2 to 32 bits: k * LN2_HI is exact for |k| < 2**21
LN2_LO = float.fromhex("0x1.a39ef35793c76p-33")  # ln 2 - LN2_HI
INV_LN2 = float.fromhex("0x1.71547652b82fep0")  # 1 / ln 2
EXP_TAYLOR = [1.0 / math.factorial(n) for n in range(14)]  # 1/n!, n = 0 .. 13
EXP_MIN_Z = -746.0  # exp(-746) < 2**-1075, half the smallest float64: it rounds to 0


def sampling_exp(z: np.ndarray) -> np.ndarray:
    """exp(z) for float64 z <= 0 (-inf included), within 1 ulp of the correctly rounded exp, and
    the same bits as torch_impl's: only IEEE-rounded +, * and rint, in this order:

        z = max(z, -746)                                    below, exp(z) rounds to 0 anyway
        k = rint(z * INV_LN2)                               (k in [-1076, 0])
        r = (z - k * LN2_HI) - k * LN2_LO                   |r| <= 0.347; the first product is exact
        p = 1/13!, then 13 times p = p * r + 1/n!, n = 12 .. 0   (Horner; no fused multiply-add)
        exp(z) = p * 2**k                                   2**k exact, 0 below 2**-1074

    The Taylor series cut after r^13 / 13! errs by < 5e-18 on |r| <= 0.347, below half an ulp of p.
    """
    z = np.maximum(z, EXP_MIN_Z)  # (V,)
    k = np.rint(z * INV_LN2)  # (V,) integer-valued float64, round half to even
    r = (z - k * LN2_HI) - k * LN2_LO  # (V,)
    p = np.full_like(r, EXP_TAYLOR[13])  # (V,)
    for c in reversed(EXP_TAYLOR[:13]):
        p *= r  # two ops, two roundings, as torch does them
        p += c
    return p * np.ldexp(1.0, k.astype(np.int64))  # 2**k is exact: the product rounds once


def _real(name: str, value) -> float | None:
    """value as a float (None stays None): a TypeError if it is no real number (a bool neither:
    True is not a temperature of 1), a ValueError if it has no float64 value (10**400)."""
    if value is None:
        return None
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf":
        value = value.item()  # a 0-d array of a real dtype, as rng.random(()) gives
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or None, got {value!r} ({type(value).__name__})")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a float64 number, got {value!r} (beyond 1.8e308)") from None


def _check_options(temperature, top_k, top_p) -> tuple[float | None, int | None, float | None]:
    """The options as (float, int, float), each None if off. A wrong type is a TypeError, a value
    out of range a ValueError, each naming the option (docs/design.md, "Bad input"). Converting
    here means a Fraction or a NumPy scalar computes as the float64 it stands for."""
    temperature, top_p = _real("temperature", temperature), _real("top_p", top_p)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral)):
        raise TypeError(f"top_k must be an int or None, got {top_k!r} ({type(top_k).__name__})")
    if temperature is not None and not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    return temperature, None if top_k is None else int(top_k), top_p


def _real_array(name: str, values) -> np.ndarray:
    """`values` as a float64 array, refused with a TypeError naming `name` unless it holds real
    numbers: np.asarray(..., float64) would parse strings ("0.5"), read None as NaN, take bools
    as 0 and 1 and drop an imaginary part with only a warning (torch_impl refuses all of them)."""
    arr = np.asarray(values)
    if arr.dtype.kind == "c":
        raise TypeError(f"{name} must be real, got complex values ({arr.dtype})")
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be real numbers, got dtype {arr.dtype}")
    return arr.astype(np.float64)


def _check_logits(logits) -> np.ndarray:
    """One finite-maximum row (V,) as float64; NaN is refused by id, complex logits by type."""
    logits = _real_array("logits", logits)
    if logits.ndim != 1 or logits.size == 0:
        raise ValueError(f"logits must be one non-empty row (V,), got shape {logits.shape}")
    if np.isnan(logits).any():
        raise ValueError(f"logits contain NaN at id {int(np.flatnonzero(np.isnan(logits))[0])}")
    if not np.isfinite(np.max(logits)):
        raise ValueError(f"the largest logit is {np.max(logits)}; sampling needs a finite one")
    return logits


def sampling_distribution(logits: np.ndarray, *, temperature: float, top_k: int | None = None,
                          top_p: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(w, cdf), both (V,) float64: the unnormalised weight of every id (0 for ids cut by top-k
    or top-p) and its running sum in id order; id i has probability w[i] / cdf[-1].

    temperature must be > 0 (0 is greedy: no distribution). The steps are the module
    docstring's, and torch_impl's `sampling_distribution` gives the same bits.
    """
    temperature, top_k, top_p = _check_options(temperature, top_k, top_p)
    if not temperature:
        raise ValueError(f"a sampling distribution needs a temperature > 0, got {temperature!r} (0 is greedy)")
    return _distribution(_check_logits(logits), temperature, top_k, top_p)


def _distribution(logits, temperature: float, top_k: int | None, top_p: float | None):
    """`sampling_distribution` on checked arguments (float64 logits (V,), temperature > 0)."""
    V = logits.shape[0]
    with np.errstate(over="ignore"):  # a logit far below the max may go to -inf: weight 0, as it should
        z = (logits - np.max(logits)) / temperature  # (V,) <= 0: the max is 0, small temperatures cannot overflow
    if top_k is None:
        w = sampling_exp(z)  # (V,); the max has w = 1, so cdf[-1] >= 1
    else:
        kth_largest = np.sort(z)[V - min(top_k, V)]  # k clamped: top-k over more ids than exist keeps them all
        keep = z >= kth_largest  # (V,) ties at the k-th value stay
        w = np.zeros(V)  # (V,)
        w[keep] = sampling_exp(z[keep])  # elementwise: the same values as over the whole row, for less work
    if top_p is not None:
        kept = np.flatnonzero(w)  # (K,) ascending ids with w > 0
        order = kept[np.argsort(-z[kept], kind="stable")]  # (K,): z descending; stable: lower id first on ties
        running = np.cumsum(w[order])  # (K,) sequential float64 sums
        n = int(np.flatnonzero(running >= top_p * running[-1])[0]) + 1  # top_p <= 1: the last one qualifies
        w[order[n:]] = 0.0
    cdf = np.cumsum(w)  # (V,) the unnormalised CDF in id order
    return w, cdf


def sample_next(logits: np.ndarray, *, temperature: float | None = 0.0, top_k: int | None = None,
                top_p: float | None = None, coin: float | None = None) -> int:
    """One id from a row of logits (V,); see the module docstring for the algorithm."""
    temperature, top_k, top_p = _check_options(temperature, top_k, top_p)
    logits = _check_logits(logits)
    if not temperature:
        return int(np.argmax(logits))  # argmax returns the first maximum: ties go to the lowest id
    coin = None if coin is None else _real("coin", coin)  # a float first: a Fraction just below 1 may round to 1
    if coin is None or not 0.0 <= coin < 1.0:
        raise ValueError(f"sampling (temperature {temperature}) needs a coin in [0, 1), got {coin!r}")
    w, cdf = _distribution(logits, temperature, top_k, top_p)
    # side="right": the first index whose running sum is > coin * total (always one: the last).
    return int(np.searchsorted(cdf, coin * cdf[-1], side="right"))


def _check_listed_ids(ids, vocab_size: int) -> None:
    """A nested list is checked as Python ints before it becomes an array: 2**70 has no NumPy
    integer type (object array), and [[5, 2**63]] becomes float64, so the range check below could
    not name either."""
    if not isinstance(ids, (list, tuple)):
        return
    for b, row in enumerate(ids):
        if not isinstance(row, (list, tuple)):
            return  # not (B, T): the shape check names it
        for t, value in enumerate(row):
            # A bool (Python's, NumPy's or a 0-d tensor's) is an int to Python and 0 or 1 once mixed
            # with ints in an array.
            if isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
                raise TypeError(f"token id {value!r} at position (batch {b}, time {t}) is a bool, not an int")
            if isinstance(value, numbers.Integral) and not 0 <= value < vocab_size:
                raise ValueError(f"token id {int(value)} at position (batch {b}, time {t}) is outside "
                                 f"[0, {vocab_size}) (vocab_size={vocab_size})")


def _check_ids(ids, vocab_size: int) -> np.ndarray:
    """The prompt as int64, every id checked against V: the model sees only the last Tc of them,
    but all of them are returned, so an id cropped away must not pass unchecked either."""
    _check_listed_ids(ids, vocab_size)
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
    """coins (n, B) as float64; float32 coins are widened exactly (torch_impl does the same)."""
    coins = _real_array("coins", coins)
    if coins.shape != (n, B):
        raise ValueError(f"coins must have shape (max_new_tokens, B) = {(n, B)}, got {coins.shape}")
    if coins.size and not (np.all(coins >= 0.0) and np.all(coins < 1.0)):
        bad = np.argwhere(~((coins >= 0.0) & (coins < 1.0)))[0]
        raise ValueError(f"coins must lie in [0, 1); coins[{bad[0]}, {bad[1]}] = {coins[tuple(bad)]}")
    return coins


MAX_DRAWN_COINS = 2**27  # coins drawn up front from an rng: (max_new_tokens, B) float64, at most 1 GiB


def generate(model, ids, max_new_tokens: int, *, temperature: float | None = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_id: int | None = None, coins=None,
             rng: np.random.Generator | None = None, use_cache: bool = True) -> np.ndarray:
    """ids (B, T) -> (B, T + n), n <= max_new_tokens (fewer when every row hit `eos_id`).

    coins: (max_new_tokens, B) uniform draws in [0, 1), read as float64 (float32 ones widened
        exactly); coins[s, b] picks row b's token at step s. If None and sampling, they are drawn
        up front as `rng.random((max_new_tokens, B))` (rng: a np.random.Generator).
    eos_id: a row that produced it is padded with it from then on; all rows stopped ends early.
    use_cache: decode with a KV cache (default) or recompute the whole window at every step;
        both give the same logits up to rounding (sums in another order), hence the same tokens
        except where a coin lands within a few ulps of a step of the CDF.
    """
    V, Tc = model.config.vocab_size, model.config.context_length
    ids = _check_ids(ids, V)
    temperature, top_k, top_p = _check_options(temperature, top_k, top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise TypeError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r} ({type(max_new_tokens).__name__})")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a np.random.Generator or None, got {type(rng).__module__}.{type(rng).__name__}")
    B = ids.shape[0]
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, numbers.Integral)):
        raise TypeError(f"eos_id must be an int token id or None, got {eos_id!r} ({type(eos_id).__name__})")
    if eos_id is not None and not 0 <= eos_id < V:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {V})")
    sampling = bool(temperature)
    if coins is None and sampling and max_new_tokens > 0:
        if rng is None:
            raise ValueError("sampling with temperature > 0 needs coins or an rng (np.random.Generator)")
        if max_new_tokens * B > MAX_DRAWN_COINS:
            raise ValueError(f"max_new_tokens = {max_new_tokens} for B = {B} rows would draw {max_new_tokens * B} "
                             f"coins up front, over the {MAX_DRAWN_COINS} (1 GiB of float64) drawn from an rng; "
                             f"pass coins, or generate in parts")
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
