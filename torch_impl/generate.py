"""Text generation with torch: the sampling step and the KV-cached decoding loop.

The algorithm is docs/design.md, "Sampling" (numpy_ref/generate.py writes every step out):
temperature 0 is argmax (lowest id on ties); otherwise, in float64,

    z = (logits - max) / temperature
    w = exp(z)                      by `sampling_exp`, the same bits as numpy_ref's (below)
    top_k: w = 0 where z < the k-th largest z (k clamped to V)
    top_p: ids with w > 0 by z descending (ties: lower id first), s = running sum of their w;
           keep the shortest prefix with s >= top_p * s[-1], w = 0 for the rest
    cdf = running sum of w in id order; the token is the first id with cdf > coin * cdf[-1]

Sampling runs on the host in float64 on one row at a time, and every step is an IEEE-rounded
elementwise op, a comparison or a sequential running sum (`torch.cumsum` on the CPU adds in
order, as `np.cumsum` does): so the same coin picks the same token as the NumPy oracle, even
when it lands exactly on a boundary. `torch.softmax` and `torch.exp` do not qualify: their sums
run in another order than NumPy's, and `torch.exp` differs from `np.exp` in the last bit for
about one argument in twenty. The model itself runs on its own device and dtype; only the last
position's logits are computed (`last_only`), and with `use_cache` each new token costs one
position of a preallocated KV cache. When the sequence outgrows the context, the window slides
and the cache is rebuilt from the cropped window, which is exactly what recomputation would see.
"""

from __future__ import annotations

import math
import numbers

import torch

from torch_impl.linear import bf16_weights_held

# exp(z) = 2**k * exp(r), k = rint(z / ln 2), |r| <= ln(2) / 2 (Cody and Waite's reduction, as fdlibm's exp).
LN2_HI = float.fromhex("0x1.62e42feep-1")  # ln 2 to 32 bits: k * LN2_HI is exact for |k| < 2**21
LN2_LO = float.fromhex("0x1.a39ef35793c76p-33")  # ln 2 - LN2_HI
INV_LN2 = float.fromhex("0x1.71547652b82fep0")  # 1 / ln 2
EXP_TAYLOR = [1.0 / math.factorial(n) for n in range(14)]  # 1/n!, n = 0 .. 13
EXP_MIN_Z = -746.0  # exp(-746) < 2**-1075, half the smallest float64: it rounds to 0


def sampling_exp(z: torch.Tensor) -> torch.Tensor:
    """exp(z) for float64 z <= 0 (-inf included), within 1 ulp of the correctly rounded exp, bit for
    bit numpy_ref's `sampling_exp`: IEEE-rounded +, * and rint only, in this order:

        z = max(z, -746);  k = rint(z * INV_LN2);  r = (z - k * LN2_HI) - k * LN2_LO
        p = 1/13!, then p = p * r + 1/n! for n = 12 .. 0 (two roundings each, no fused multiply-add)
        exp(z) = p * 2**k                  (2**k exact, 0 below 2**-1074: one rounding)
    """
    z = torch.clamp(z, min=EXP_MIN_Z)  # (V,)
    k = torch.round(z * INV_LN2)  # (V,) integer-valued float64, round half to even
    r = (z - k * LN2_HI) - k * LN2_LO  # (V,) |r| <= 0.347
    p = torch.full_like(r, EXP_TAYLOR[13])  # (V,)
    for c in reversed(EXP_TAYLOR[:13]):
        p.mul_(r).add_(c)  # in place, but two ops: add_ rounds p * r, it does not fuse
    return p * torch.exp2(k)  # exp2 of an integer-valued k is the exact power of two (checked in parity_tests)


def _real(name: str, value) -> float | None:
    """value as a float (None stays None): a TypeError if it is no real number (a bool neither:
    True is not a temperature of 1), a ValueError if it has no float64 value (10**400)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not (value.is_complex() or value.dtype == torch.bool):
        value = value.item()  # a 0-d tensor of a real dtype, as torch.rand(()) gives
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or None, got {value!r} ({type(value).__name__})")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a float64 number, got {value!r} (beyond 1.8e308)") from None


def _check_options(temperature, top_k, top_p) -> tuple[float | None, int | None, float | None]:
    """The options as (float, int, float), each None if off; a wrong type is a TypeError, a value
    out of range a ValueError, each naming the option (docs/design.md, "Bad input")."""
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


def _refuse_non_reals(name: str, values) -> None:
    """A TypeError naming `name` unless `values` (a tensor, an array or nested lists) holds real
    numbers: torch would drop an imaginary part with only a warning and take bools as 0 and 1,
    and names neither a string ("too many dimensions 'str'") nor None. numpy_ref refuses the same."""
    if isinstance(values, torch.Tensor):
        if values.is_complex():
            raise TypeError(f"{name} must be real, got complex values ({values.dtype})")
        if values.dtype == torch.bool:
            raise TypeError(f"{name} must be real numbers, got dtype {values.dtype}")
        return
    kind = getattr(getattr(values, "dtype", None), "kind", None)  # a NumPy array or scalar
    if kind is not None:
        if kind == "c":
            raise TypeError(f"{name} must be real, got complex values ({values.dtype})")
        if kind not in "iuf":
            raise TypeError(f"{name} must be real numbers, got dtype {values.dtype}")
        return
    if isinstance(values, (list, tuple)):
        for v in values:
            _refuse_non_reals(name, v)
        return
    if isinstance(values, bool) or not isinstance(values, numbers.Real):
        kind = "complex" if isinstance(values, numbers.Complex) else "real numbers"
        raise TypeError(f"{name} must be {'real' if kind == 'complex' else kind}, got {values!r} "
                        f"({type(values).__name__})")


def _check_logits(logits) -> torch.Tensor:
    """One finite-maximum row (V,) as float64 on the CPU; NaN is refused by id, complex logits by type."""
    _refuse_non_reals("logits", logits)
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
    return logits


def sampling_distribution(logits: torch.Tensor, *, temperature: float, top_k: int | None = None,
                          top_p: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, cdf), both (V,) float64 on the CPU: the unnormalised weight of every id (0 where top-k
    or top-p cut it) and its running sum in id order; id i has probability w[i] / cdf[-1].
    Bit for bit numpy_ref's `sampling_distribution`. temperature must be > 0."""
    temperature, top_k, top_p = _check_options(temperature, top_k, top_p)
    if not temperature:
        raise ValueError(f"a sampling distribution needs a temperature > 0, got {temperature!r} (0 is greedy)")
    return _distribution(_check_logits(logits), temperature, top_k, top_p)


def _distribution(logits, temperature: float, top_k: int | None, top_p: float | None):
    """`sampling_distribution` on checked arguments (float64 logits (V,), temperature > 0)."""
    V = logits.shape[0]
    z = (logits - logits.max()) / temperature  # (V,) <= 0: the max is 0, small temperatures cannot overflow
    if top_k is None:
        w = sampling_exp(z)  # (V,); the max has w = 1, so cdf[-1] >= 1
    else:
        kth_largest = torch.topk(z, min(top_k, V)).values[-1]  # k clamped to V
        keep = z >= kth_largest  # (V,) ties at the k-th value stay
        w = torch.zeros_like(z)  # (V,)
        w[keep] = sampling_exp(z[keep])  # elementwise: the same values as over the whole row, for less work
    if top_p is not None:
        kept = w.nonzero().squeeze(1)  # (K,) ascending ids with w > 0
        order = kept[torch.sort(z[kept], descending=True, stable=True).indices]  # (K,) stable: lower id first on ties
        running = torch.cumsum(w[order], dim=0)  # (K,) sequential float64 sums
        n = int((running < top_p * float(running[-1])).sum()) + 1  # running is non-decreasing: first >= + 1
        w[order[n:]] = 0.0
    cdf = torch.cumsum(w, dim=0)  # (V,) the unnormalised CDF in id order
    return w, cdf


def sample_next(logits: torch.Tensor, *, temperature: float | None = 0.0, top_k: int | None = None,
                top_p: float | None = None, coin: float | None = None) -> int:
    """One id from a row of logits (V,)."""
    temperature, top_k, top_p = _check_options(temperature, top_k, top_p)
    logits = _check_logits(logits)
    if not temperature:
        return int(torch.argmax(logits))  # the first maximum: ties go to the lowest id
    coin = None if coin is None else _real("coin", coin)  # a float first: a Fraction just below 1 may round to 1
    if coin is None or not 0.0 <= coin < 1.0:
        raise ValueError(f"sampling (temperature {temperature}) needs a coin in [0, 1), got {coin!r}")
    w, cdf = _distribution(logits, temperature, top_k, top_p)
    # right=True: the first index whose running sum is > coin * total (always one: the last).
    return int(torch.searchsorted(cdf, coin * float(cdf[-1]), right=True))


def _check_listed_ids(ids, vocab_size: int) -> None:
    """A nested list is checked as Python ints before it becomes a tensor: torch.as_tensor
    refuses 2**63 and 2**70 ("Overflow when unpacking long long") before the range check below
    could name them."""
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
            if not isinstance(value, (numbers.Number, torch.Tensor)) and getattr(value, "dtype", None) is None:
                # a string or None: torch.as_tensor would say "too many dimensions 'str'" or name no position
                raise TypeError(f"token id {value!r} at position (batch {b}, time {t}) is a {type(value).__name__}, "
                                f"not an int")
            if isinstance(value, numbers.Integral) and not 0 <= value < vocab_size:
                raise ValueError(f"token id {int(value)} at position (batch {b}, time {t}) is outside "
                                 f"[0, {vocab_size}) (vocab_size={vocab_size})")


def _check_ids(ids, vocab_size: int) -> torch.Tensor:
    """The prompt as int64, every id checked against V: the model sees only the last Tc of them,
    but all of them are returned, so an id cropped away must not pass unchecked either."""
    _check_listed_ids(ids, vocab_size)
    try:
        ids = torch.as_tensor(ids)
    except (TypeError, RuntimeError):
        # None, a string, a dict or a NumPy array of strings or objects: torch's own error ("Could
        # not infer dtype of NoneType", a RuntimeError) names neither ids nor what they were;
        # numpy_ref reads them as an array of dtype object or str and refuses that by name.
        got = f"dtype {ids.dtype}" if hasattr(ids, "dtype") else f"{ids!r:.50} ({type(ids).__name__})"
        raise TypeError(f"ids must be an integer tensor, got {got}") from None
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
    """coins (n, B) as float64 on the CPU. A list or array goes straight to float64 (torch.as_tensor
    alone makes a list float32, and 0.99999999 would become 1.0); a float32 tensor (torch.rand's
    default) is widened exactly, so numpy_ref given the same float32 values picks the same tokens."""
    _refuse_non_reals("coins", coins)
    if isinstance(coins, torch.Tensor):
        coins = coins.detach().to(device="cpu", dtype=torch.float64)
    else:
        coins = torch.as_tensor(coins, dtype=torch.float64)
    if tuple(coins.shape) != (n, B):
        raise ValueError(f"coins must have shape (max_new_tokens, B) = {(n, B)}, got {tuple(coins.shape)}")
    bad = ~((coins >= 0.0) & (coins < 1.0))
    if bool(bad.any()):
        s, b = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"coins must lie in [0, 1); coins[{s}, {b}] = {float(coins[s, b])}")
    return coins


MAX_DRAWN_COINS = 2**27  # coins drawn up front from an rng: (max_new_tokens, B) float64, at most 1 GiB


@torch.no_grad()
def generate(model, ids, max_new_tokens: int, *, temperature: float | None = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_id: int | None = None, coins=None,
             rng: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
    """ids (B, T) -> (B, T + n) on the model's device, n <= max_new_tokens.

    coins: (max_new_tokens, B) uniform draws in [0, 1), read as float64: a list or array exactly
        as given, a float32 tensor widened exactly. If None and sampling,
        `torch.rand((max_new_tokens, B), generator=rng, dtype=float64)` (rng: a torch.Generator).
    eos_id: a row that produced it is padded with it; all rows stopped ends early.
    The model runs in eval mode (no dropout) and is put back in its previous mode afterwards.
    """
    V, Tc = model.config.vocab_size, model.config.context_length
    ids = _check_ids(ids, V)
    temperature, top_k, top_p = _check_options(temperature, top_k, top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise TypeError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r} ({type(max_new_tokens).__name__})")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if rng is not None and not isinstance(rng, torch.Generator):
        raise TypeError(f"rng must be a torch.Generator or None, got {type(rng).__module__}.{type(rng).__name__}")
    B = ids.shape[0]
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, numbers.Integral)):
        raise TypeError(f"eos_id must be an int token id or None, got {eos_id!r} ({type(eos_id).__name__})")
    if eos_id is not None and not 0 <= eos_id < V:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {V})")
    if coins is None and temperature and max_new_tokens > 0:
        if rng is None:
            raise ValueError("sampling with temperature > 0 needs coins or an rng (torch.Generator)")
        if max_new_tokens * B > MAX_DRAWN_COINS:
            raise ValueError(f"max_new_tokens = {max_new_tokens} for B = {B} rows would draw {max_new_tokens * B} "
                             f"coins up front, over the {MAX_DRAWN_COINS} (1 GiB of float64) drawn from an rng; "
                             f"pass coins, or generate in parts")
        coins = torch.rand((max_new_tokens, B), generator=rng, dtype=torch.float64)  # (n, B)
    if coins is not None:
        coins = _check_coins(coins, max_new_tokens, B)

    was_training = model.training
    model.eval()
    try:
        # Under CPU bf16 autocast each weight is cast once for the whole loop, not per token (linear.py).
        with bf16_weights_held():
            out = ids.to(model.device, copy=True)  # a new tensor even when no token is added, as numpy_ref's
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
