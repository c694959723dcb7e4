"""Sampling and generation (docs/design.md, "Sampling"), in both trees.

- `sample_next`: the same id from both trees for the same logits and coin, with temperature,
  top-k (clamped to V) and top-p, ties included; temperature 0 is argmax; the coin walks the
  inverse CDF of the kept ids, so a grid of coins reproduces their probabilities.
- `generate`: greedy and sampled tokens identical across trees (same weights, same coins); the
  KV cache gives the logits of full recomputation at every step; stop token; cropping to the
  context length; bad arguments raise naming the value.
- `sampling_exp` and `sampling_distribution`: the same float64 bits in both trees (weights, CDF,
  probabilities), up to GPT-2's V = 50257, with coins and top_p exactly on boundaries; options,
  coins and listed ids read as the numbers they stand for; KVCache.crop takes ints only.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from numpy_ref import generate as ngen
from numpy_ref import kv_cache as nkv
from numpy_ref.config import get_config as np_config
from numpy_ref.model import GPTModel as NumpyGPT
from parity_tests.compare import assert_close, load_numpy_params_into_torch, to_numpy
from parity_tests.strategies import seeds
from parity_tests.tolerances import forward_tol
from torch_impl import generate as tgen
from torch_impl import kv_cache as tkv
from torch_impl.config import get_config as torch_config
from torch_impl.model import GPTModel as TorchGPT

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.py


V = 101  # the tiny preset's vocabulary


def _models(context_length: int = 16, seed: int = 0):
    n_model = NumpyGPT(np_config("tiny", context_length=context_length), seed=seed)
    t_model = TorchGPT(torch_config("tiny", context_length=context_length), seed=seed + 1, dtype=torch.float64)
    load_numpy_params_into_torch(t_model, n_model.params)
    return n_model, t_model


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


@st.composite
def logit_rows(draw):
    """(V,) float64 logits with ties likely: values drawn from a small pool plus noise."""
    n = draw(st.integers(1, 40))
    seed = draw(seeds())
    rng = np.random.default_rng(seed)
    row = np.round(rng.standard_normal(n) * 3, draw(st.sampled_from([0, 1, 8])))  # rounding makes ties
    return row


# ---- sample_next ----------------------------------------------------------------------------


@given(row=logit_rows(), temperature=st.sampled_from([0.0, None, 0.3, 1.0, 2.5]),
       top_k=st.none() | st.integers(1, 50), top_p=st.none() | st.sampled_from([0.05, 0.5, 0.9, 1.0]),
       coin=st.floats(0.0, 1.0, exclude_max=True))
@settings(max_examples=60)
def test_sample_next_is_the_same_in_both_trees(row, temperature, top_k, top_p, coin):
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, coin=coin)
    n_id = ngen.sample_next(row, **kw)
    t_id = tgen.sample_next(torch.tensor(row), **kw)
    assert n_id == t_id, f"numpy picked {n_id}, torch {t_id} for {kw} and logits {row.tolist()}"
    assert 0 <= n_id < len(row)
    if not temperature:
        assert n_id == int(np.flatnonzero(row == row.max())[0]), f"greedy must be the lowest argmax, got {n_id}"
    if top_k is not None and temperature:
        kth = np.sort(row)[::-1][min(top_k, len(row)) - 1]
        assert row[n_id] >= kth, f"id {n_id} (logit {row[n_id]}) is outside the top {top_k} (>= {kth})"


def test_coin_walks_the_inverse_cdf_of_the_kept_ids():
    """Coins on a fine grid pick each kept id with its softmax probability (both trees)."""
    row = np.array([2.0, -1.0, 0.5, 2.0, 3.0, -4.0, 0.0])
    n = 1000
    coins = (np.arange(n) + 0.5) / n
    for kw, keep in [(dict(temperature=0.7), [0, 1, 2, 3, 4, 5, 6]),
                     (dict(temperature=1.3, top_k=3), [0, 3, 4]),  # 3.0 and the tie at 2.0
                     (dict(temperature=1.0, top_p=0.6), [0, 4])]:  # 4 alone < 0.6; +0 (tie, lower id)
        z = row[keep] / kw["temperature"]
        expected = np.zeros(len(row))
        expected[keep] = _softmax(z)
        for name, fn, conv in (("numpy", ngen.sample_next, np.asarray), ("torch", tgen.sample_next, torch.tensor)):
            picks = np.array([fn(conv(row), coin=float(c), **kw) for c in coins])
            freq = np.bincount(picks, minlength=len(row)) / n
            assert np.all(freq[expected == 0] == 0), f"{name} {kw}: picked ids outside {keep}: {freq}"
            assert np.abs(freq - expected).max() <= 1.0 / n + 1e-12, (
                f"{name} {kw}: frequencies {freq.round(4)} differ from probabilities {expected.round(4)}")


def test_top_k_larger_than_vocab_is_clamped_and_temperature_zero_is_greedy():
    row = np.random.default_rng(0).standard_normal(V)
    for c in (0.0, 0.3, 0.999):
        for fn, conv in ((ngen.sample_next, np.asarray), (tgen.sample_next, torch.tensor)):
            assert fn(conv(row), temperature=0.8, top_k=V + 50, coin=c) == fn(conv(row), temperature=0.8, coin=c)
            assert fn(conv(row), temperature=0.0, top_k=3, top_p=0.2, coin=c) == int(np.argmax(row))
            assert fn(conv(row), temperature=5.0, top_k=1, coin=c) == int(np.argmax(row)), "top_k=1 is greedy"


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=-1.0, coin=0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf"), coin=0.5), r"temperature must be a finite number >= 0 \(0 = greedy\), got inf"),
    (dict(temperature=float("nan"), coin=0.5), r"temperature must be a finite number >= 0 \(0 = greedy\), got nan"),
    (dict(temperature=1.0, top_k=0, coin=0.5), "top_k must be an int >= 1 or None, got 0"),
    (dict(temperature=1.0, top_p=0.0, coin=0.5), r"top_p must be in \(0, 1\] or None, got 0.0"),
    (dict(temperature=1.0, top_p=1.5, coin=0.5), r"top_p must be in \(0, 1\] or None, got 1.5"),
    (dict(temperature=1.0, coin=1.0), r"needs a coin in \[0, 1\), got 1.0"),
    (dict(temperature=1.0), r"needs a coin in \[0, 1\), got None"),
])
def test_sample_next_rejects_bad_arguments(kw, match):
    row = np.zeros(5)
    with pytest.raises(ValueError, match=match):
        ngen.sample_next(row, **kw)
    with pytest.raises(ValueError, match=match):
        tgen.sample_next(torch.tensor(row), **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=True, coin=0.5), r"temperature must be a number or None, got True \(bool\)"),
    (dict(temperature="hot", coin=0.5), "temperature must be a number or None, got 'hot'"),
    (dict(temperature=1.0, top_k=2.0, coin=0.5), r"top_k must be an int or None, got 2.0 \(float\)"),
    (dict(temperature=1.0, top_k=True, coin=0.5), "top_k must be an int or None, got True"),
    (dict(temperature=1.0, top_p=True, coin=0.5), "top_p must be a number or None, got True"),
])
def test_sample_next_refuses_wrong_types_with_a_type_error(kw, match):
    """A wrong type is a TypeError in both trees (True once acted as a temperature of 1), as
    docs/design.md says for every setting; out-of-range values stay ValueErrors (above)."""
    row = np.zeros(5)
    with pytest.raises(TypeError, match=match):
        ngen.sample_next(row, **kw)
    with pytest.raises(TypeError, match=match):
        tgen.sample_next(torch.tensor(row), **kw)


def test_sample_next_rejects_nan_logits_naming_the_id():
    row = np.array([0.0, 1.0, np.nan])
    with pytest.raises(ValueError, match="NaN at id 2"):
        ngen.sample_next(row, temperature=1.0, coin=0.1)
    with pytest.raises(ValueError, match="NaN at id 2"):
        tgen.sample_next(torch.tensor(row), temperature=1.0, coin=0.1)



def test_sample_next_refuses_complex_logits():
    """Both trees dropped the imaginary part (NumPy and torch casts, with only a warning) and sampled
    from the real one; a complex row is a TypeError in each tree's input types."""
    row = np.array([0.0, 1.0 + 2.0j, 0.5])
    for logits, sample in ((row, ngen.sample_next), (row.tolist(), ngen.sample_next), (row, tgen.sample_next),
                           (row.tolist(), tgen.sample_next), (torch.tensor(row), tgen.sample_next)):
        with pytest.raises(TypeError, match="real"):
            sample(logits, temperature=1.0, coin=0.1)


@pytest.mark.parametrize("row,temperature,expected", [
    ([1.0, 2.0, 0.5], 1e-310, 1),  # 2 / 1e-310 overflows: the limit is greedy
    ([9.0, 8.0, 0.0], 1e-308, 0),
    ([1e308, -1e308, 0.0], 0.5, 0),  # 1e308 / 0.5 overflows; the other two have probability 0
])
def test_a_tiny_temperature_or_huge_logits_give_the_limit_not_a_nan_pick(row, temperature, expected):
    """(logits - max) / temperature cannot overflow: the pick is the argmax for every coin, in both
    trees (dividing first gave inf, a NaN softmax and the last id whatever the coin)."""
    for c in (0.0, 0.3, 0.9, 0.999):
        assert ngen.sample_next(np.array(row), temperature=temperature, coin=c) == expected, f"numpy, coin {c}"
        t = tgen.sample_next(torch.tensor(row, dtype=torch.float64), temperature=temperature, coin=c)
        assert t == expected, f"torch picked {t} for coin {c}, expected {expected}"


def test_rounding_never_picks_a_token_of_probability_zero():
    """Ten equal logits and one -inf: a coin just under 1 may pass every rounded CDF value; the
    fallback is the last id with probability > 0 (id 9), never the -inf id 10."""
    row = [0.0] * 10 + [float("-inf")]
    coin = float(np.nextafter(1.0, 0.0))
    assert ngen.sample_next(np.array(row), temperature=1.0, coin=coin) == 9
    assert tgen.sample_next(torch.tensor(row, dtype=torch.float64), temperature=1.0, coin=coin) == 9


def test_torch_sample_next_reads_a_list_in_float64():
    """A Python list goes straight to float64 (torch.as_tensor alone would round it to float32 and
    tie these two logits): the same pick as numpy_ref and as a float64 tensor."""
    row = [0.1, 0.1 + 1e-9]
    kw = dict(temperature=0.0)
    assert tgen.sample_next(row, **kw) == ngen.sample_next(np.array(row), **kw) == 1

# ---- generate ---------------------------------------------------------------------------------


@given(seed=seeds(), B=st.integers(1, 3), T=st.integers(1, 10), n=st.integers(0, 14),
       mode=st.sampled_from(["greedy", "temperature", "top_k", "top_p", "all"]))
@settings(max_examples=10)
def test_generate_gives_the_same_tokens_in_both_trees(seed, B, T, n, mode):
    """Context 12, so prompts plus new tokens often outgrow it and the window slides."""
    n_model, t_model = _models(context_length=12, seed=seed % 1000)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T))
    coins = rng.random((n, B))
    kw = {"greedy": dict(temperature=0.0), "temperature": dict(temperature=1.2),
          "top_k": dict(temperature=0.9, top_k=5), "top_p": dict(temperature=1.0, top_p=0.7),
          "all": dict(temperature=0.8, top_k=20, top_p=0.9)}[mode]
    n_out = ngen.generate(n_model, ids, n, coins=coins, **kw)
    t_out = tgen.generate(t_model, torch.tensor(ids), n, coins=torch.tensor(coins), **kw)
    assert n_out.shape == (B, T + n), f"numpy output shape {n_out.shape}, expected {(B, T + n)}"
    assert np.array_equal(n_out[:, :T], ids), "the prompt must be returned unchanged (uncropped)"
    diff = np.argwhere(n_out != to_numpy(t_out))
    assert diff.size == 0, f"{mode}: first differing token at (row, position) {tuple(diff[0])}: " \
                           f"numpy {n_out[tuple(diff[0])]} vs torch {int(t_out[tuple(diff[0])])}"
    n_nocache = ngen.generate(n_model, ids, n, coins=coins, use_cache=False, **kw)
    t_nocache = tgen.generate(t_model, torch.tensor(ids), n, coins=torch.tensor(coins), use_cache=False, **kw)
    assert np.array_equal(n_nocache, n_out), "numpy: KV-cached tokens differ from recomputation"
    assert np.array_equal(to_numpy(t_nocache), n_out), "torch: KV-cached tokens differ from recomputation"


def _forward_with_cache(tree, model, ids, targets=None, **kw):
    """The model on ids (B, T) with a KV cache, in either tree; targets go through the loss."""
    if tree == "numpy":
        from numpy_ref.model import gpt_forward

        return gpt_forward(model.params, np.asarray(ids), model.config, targets, **kw)[0]
    with torch.no_grad():
        out = model(torch.tensor(ids), None if targets is None else torch.tensor(targets), **kw)
    return to_numpy(out[0] if isinstance(out, tuple) else out)


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_a_call_that_raises_leaves_the_kv_cache_length_unchanged(tree):
    """Bad targets or last_only with targets raise; the cache's length stays where it was, and the
    next good call continues from there with the logits of full recomputation."""
    n_model, t_model = _models(context_length=16, seed=2)
    model = n_model if tree == "numpy" else t_model
    ids = np.random.default_rng(3).integers(0, V, (1, 6))
    cache = model.new_kv_cache(1)
    _forward_with_cache(tree, model, ids[:, :3], kv_cache=cache)
    bad_targets = np.array([[1, 2, V]])
    for targets, kw, match in ((bad_targets, {}, f"{V}"), (ids[:, 3:], dict(last_only=True), "last_only")):
        with pytest.raises(ValueError, match=match):
            _forward_with_cache(tree, model, ids[:, 3:], targets, kv_cache=cache, **kw)
        assert cache.length == 3, f"{tree}: a call that raised ({match}) moved the cache to length {cache.length}"
    got = _forward_with_cache(tree, model, ids[:, 3:], kv_cache=cache)
    full = _forward_with_cache(tree, model, ids)[:, 3:]
    assert_close(f"{tree}: cached logits after refused calls", got, full, forward_tol("float64"))


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_a_kv_cache_made_for_another_model_is_refused_by_name(tree):
    """Another layer count, head count or dtype: a ValueError naming both sides (not an IndexError
    deep inside attention, and in NumPy not a silent float32 rounding of float64 keys)."""
    n_model, t_model = _models(context_length=16, seed=2)
    model, cache_cls = (n_model, nkv.KVCache) if tree == "numpy" else (t_model, tkv.KVCache)
    cfg = model.config
    other = dict(float32=np.float32) if tree == "numpy" else dict(float32=torch.float32)
    cases = [(dict(n_layers=cfg.n_layers - 1), "n_layers=1"),
             (dict(n_heads=2, head_size=cfg.emb_dim // 2), "n_heads=2"),
             (dict(dtype=other["float32"]), "float32")]
    for change, match in cases:
        args = dict(dict(n_layers=cfg.n_layers, batch_size=1, n_heads=cfg.n_heads,
                         context_length=cfg.context_length, head_size=cfg.head_size), **change)
        cache = cache_cls(**args)
        with pytest.raises(ValueError, match=match):
            _forward_with_cache(tree, model, [[1, 2]], kv_cache=cache)
        assert cache.length == 0, f"{tree}: a refused cache was advanced to {cache.length}"

@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_a_backward_through_a_cached_forward_is_refused_by_name(tree):
    """The cache is for inference in both trees: numpy_ref's gpt_backward refuses the cache of a
    cached forward; torch, with gradient recording on, gives the logits of full recomputation over
    several cached calls, and a backward through them raises the same cause before any gradient is
    written (not torch's in-place version error, and no half-accumulated .grad)."""
    n_model, t_model = _models(context_length=16, seed=5)
    ids = np.random.default_rng(6).integers(0, V, (1, 6))
    if tree == "numpy":
        from numpy_ref.model import gpt_backward, gpt_forward

        cache = n_model.new_kv_cache(1)
        gpt_forward(n_model.params, ids[:, :4], n_model.config, kv_cache=cache)
        _, _, fwd = gpt_forward(n_model.params, ids[:, 4:], n_model.config, ids[:, 4:], kv_cache=cache)
        with pytest.raises(ValueError, match="KV cache"):
            gpt_backward(fwd)
        return
    cache = t_model.new_kv_cache(1)
    assert torch.is_grad_enabled()
    t_model(torch.tensor(ids[:, :4]), kv_cache=cache)
    logits, loss = t_model(torch.tensor(ids[:, 4:]), torch.tensor(ids[:, 4:]), kv_cache=cache)
    with torch.no_grad():
        full = to_numpy(t_model(torch.tensor(ids))[:, 4:])
    assert_close("torch: cached logits with gradient recording on", to_numpy(logits.detach()), full,
                 forward_tol("float64"))
    assert cache.length == 6, f"the cache holds {cache.length} positions after 4 + 2"
    for out in (loss, logits.sum()):
        with pytest.raises(ValueError, match="KV cache"):
            out.backward()
    written = [name for name, p in t_model.named_parameters() if p.grad is not None]
    assert written == [], f"a refused backward wrote gradients for {written}"


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_kv_cache_logits_equal_full_recomputation_at_every_step(tree):
    n_model, t_model = _models(context_length=16, seed=4)
    ids = np.random.default_rng(1).integers(0, V, (2, 16))
    if tree == "numpy":
        model, run = n_model, (lambda x, **kw: n_model(x, **kw))
    else:
        model, run = t_model, (lambda x, **kw: to_numpy(t_model(torch.tensor(x), **kw)))
    cache = model.new_kv_cache(2)
    with torch.no_grad():
        prefix = 5
        cached = run(ids[:, :prefix], kv_cache=cache)[:, -1]  # prompt in one chunk
        for t in range(prefix, 16):
            full = run(ids[:, :t])[:, -1]  # (B, t, V) -> (B, V)
            assert_close(f"{tree}: last logits with a KV cache of {t - 1} positions", cached, full,
                         forward_tol("float64"))
            cached = run(ids[:, t:t + 1], kv_cache=cache)[:, -1]  # one new position


def test_stop_token_pads_finished_rows_and_ends_when_all_stopped():
    n_model, t_model = _models(seed=7)
    ids = np.random.default_rng(3).integers(0, V, (3, 4))
    free = ngen.generate(n_model, ids, 10)  # greedy, no stop token
    eos = int(free[0, 4 + 2])  # row 0's third new token
    n_out = ngen.generate(n_model, ids, 10, eos_id=eos)
    t_out = to_numpy(tgen.generate(t_model, torch.tensor(ids), 10, eos_id=eos))
    assert np.array_equal(n_out, t_out), f"stop token: numpy {n_out.tolist()} vs torch {t_out.tolist()}"
    for b in range(3):
        hits = np.flatnonzero(free[b, 4:] == eos)
        stop = hits[0] if hits.size else None
        row = n_out[b, 4:]
        if stop is None:
            assert np.array_equal(row, free[b, 4:4 + len(row)]), f"row {b} never stops but changed"
        else:
            assert np.array_equal(row[:stop + 1], free[b, 4:4 + stop + 1]), f"row {b} before its stop changed"
            assert np.all(row[stop:] == eos), f"row {b} is not padded with eos {eos} after step {stop}: {row}"
    all_stop = max((np.flatnonzero(free[b, 4:] == eos)[0] if np.any(free[b, 4:] == eos) else 10) for b in range(3))
    assert n_out.shape[1] == 4 + min(10, all_stop + 1), f"generation should end when every row stopped: {n_out.shape}"
    single = ngen.generate(n_model, ids[:1], 10, eos_id=eos)
    assert single.shape == (1, 4 + 3) and single[0, -1] == eos, f"one row stops right after eos: {single.tolist()}"


def test_eos_id_must_be_an_int_and_no_new_tokens_needs_no_coins():
    """eos_id 93.5 never matched and True acted as 1: both are a TypeError in both trees. With
    max_new_tokens = 0 nothing is sampled, so sampling without coins or rng is not an error."""
    n_model, t_model = _models()
    ids = np.array([[1, 2]])
    for gen, model, conv in ((ngen.generate, n_model, np.asarray), (tgen.generate, t_model, torch.tensor)):
        for bad in (93.5, True):
            with pytest.raises(TypeError, match="eos_id must be an int token id"):
                gen(model, conv(ids), 3, eos_id=bad)
        out = gen(model, conv(ids), 0, temperature=1.0)
        assert np.array_equal(to_numpy(out), ids), f"{gen.__module__}: 0 new tokens changed the ids: {out}"

@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_long_prompts_are_cropped_to_the_context(tree):
    """A prompt longer than the context gives the tokens of its last Tc ids, and every step
    past the context equals greedy recomputation on the last Tc ids."""
    n_model, t_model = _models(context_length=6, seed=9)
    ids = np.random.default_rng(5).integers(0, V, (2, 15))
    if tree == "numpy":
        gen, model_logits = (lambda x, n: ngen.generate(n_model, x, n)), (lambda x: n_model(x))
    else:
        gen = lambda x, n: to_numpy(tgen.generate(t_model, torch.tensor(x), n))  # noqa: E731
        model_logits = lambda x: to_numpy(t_model(torch.tensor(x)))  # noqa: E731
    out = gen(ids, 8)
    cropped = gen(ids[:, -6:], 8)
    assert np.array_equal(out[:, 15:], cropped[:, 6:]), f"{tree}: cropping changed the tokens"
    seq = ids.copy()
    for step in range(8):
        with torch.no_grad():
            nxt = model_logits(seq[:, -6:])[:, -1].argmax(-1)  # (B, V) -> (B,)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
        assert np.array_equal(out[:, : seq.shape[1]], seq), f"{tree}: step {step} differs from recomputation"


def test_rng_draws_the_coins_and_bad_arguments_raise():
    n_model, t_model = _models(seed=2)
    ids = np.array([[1, 2, 3]])
    a = ngen.generate(n_model, ids, 6, temperature=1.0, rng=np.random.default_rng(11))
    b = ngen.generate(n_model, ids, 6, temperature=1.0, coins=np.random.default_rng(11).random((6, 1)))
    assert np.array_equal(a, b), "numpy: coins from rng should be rng.random((n, B))"
    g = torch.Generator().manual_seed(11)
    c = tgen.generate(t_model, torch.tensor(ids), 6, temperature=1.0, rng=g)
    d = tgen.generate(t_model, torch.tensor(ids), 6, temperature=1.0,
                      coins=torch.rand((6, 1), generator=torch.Generator().manual_seed(11), dtype=torch.float64))
    assert torch.equal(c, d), "torch: coins from rng should be torch.rand((n, B), generator=rng, float64)"
    for gen, model, conv in ((ngen.generate, n_model, np.asarray), (tgen.generate, t_model, torch.tensor)):
        with pytest.raises(ValueError, match=r"coins must have shape \(max_new_tokens, B\) = \(4, 1\)"):
            gen(model, conv(ids), 4, temperature=1.0, coins=conv(np.zeros((4, 2))))
        with pytest.raises(ValueError, match=r"coins must lie in \[0, 1\); coins\[2, 0\] = 1.5"):
            gen(model, conv(ids), 4, temperature=1.0, coins=conv(np.array([[0.1], [0.2], [1.5], [0.3]])))
        with pytest.raises(ValueError, match="needs coins or an rng"):
            gen(model, conv(ids), 4, temperature=1.0)
        with pytest.raises(TypeError, match="integer"):
            gen(model, conv(np.array([[1.0, 2.0]])), 4)
        with pytest.raises(ValueError, match=r"2-D .*\(B, T\), got shape \(3,\)"):
            gen(model, conv(np.array([1, 2, 3])), 4)
        with pytest.raises(ValueError, match=r"eos_id 101 is outside the vocabulary \[0, 101\)"):
            gen(model, conv(ids), 4, eos_id=101)
        with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0, got -1"):
            gen(model, conv(ids), -1)


@pytest.mark.parametrize("values", [[["0.5"]], [[None]], [[True]], [[0.5 + 1j]], np.array([[True]]),
                                    np.array([["0.5"]]), np.array([[0.5 + 0j]]), torch.tensor([[True]]),
                                    torch.tensor([[0.5 + 0j]])],
                         ids=lambda v: f"{type(v).__name__} {v!r:.30}")
def test_coins_and_logits_that_are_no_real_numbers_are_type_errors_in_both_trees(values):
    """numpy_ref parsed the string "0.5" and sampled with it and called None "nan"; torch_impl
    said "too many dimensions 'str'" (a ValueError) or took True as a coin of 1 and False as 0."""
    n_model, t_model = _models(seed=2)
    is_tensor = isinstance(values, torch.Tensor)
    for tree, gen, model, sample in (("numpy", ngen.generate, n_model, ngen.sample_next),
                                     ("torch", tgen.generate, t_model, tgen.sample_next)):
        if is_tensor and tree == "numpy":
            continue  # numpy_ref takes no tensors
        with pytest.raises(TypeError, match="coins must be real"):
            gen(model, [[1, 2]], 1, temperature=1.0, coins=values)
        with pytest.raises(TypeError, match="logits must be real"):
            sample(values[0], temperature=1.0, coin=0.3)


def test_string_ids_in_a_list_are_type_errors_in_both_trees():
    n_model, t_model = _models(seed=2)
    with pytest.raises(TypeError, match="ids must be an integer array, got dtype <U1"):
        ngen.generate(n_model, [["1"]], 1)
    with pytest.raises(TypeError, match=r"token id '1' at position \(batch 0, time 0\) is a str, not an int"):
        tgen.generate(t_model, [["1"]], 1)
    with pytest.raises(TypeError, match=r"token id None at position \(batch 0, time 1\) is a NoneType"):
        tgen.generate(t_model, [[1, None]], 1)


@pytest.mark.parametrize("ids", [None, "abc", b"ab", {1: 2}, object(), np.array([["1"]]),
                                 np.array([[1]], dtype=object)],
                         ids=lambda v: f"{type(v).__name__} {v!r:.30}")
def test_ids_that_are_no_array_are_a_type_error_naming_them_in_both_trees(ids):
    """torch_impl handed these to torch.as_tensor, whose own error named neither ids nor the value:
    a RuntimeError for None ("Could not infer dtype of NoneType"), "new(): invalid data type 'str'"
    for a string. numpy_ref reads each as an array of dtype object or str and refuses it by name;
    torch_impl names the dtype where there is one, else the value and its type."""
    n_model, t_model = _models(seed=2)
    with pytest.raises(TypeError, match=r"ids must be an integer array, got dtype "):
        ngen.generate(n_model, ids, 1)
    got = f"dtype {ids.dtype}" if hasattr(ids, "dtype") else f"{ids!r} ({type(ids).__name__})"
    with pytest.raises(TypeError, match=rf"ids must be an integer tensor, got {re.escape(got)}$"):
        tgen.generate(t_model, ids, 1)


@pytest.mark.parametrize("n", [2**27 + 1, 10**15, 2**63 - 1, 2**63])
def test_coins_drawn_from_an_rng_are_bounded_by_name(n):
    """A huge max_new_tokens drew its coins up front: a MemoryError, "array is too big" or an
    allocator's RuntimeError, each tree its own, none naming the option."""
    n_model, t_model = _models(seed=2)
    for gen, model, rng in ((ngen.generate, n_model, np.random.default_rng(0)),
                            (tgen.generate, t_model, torch.Generator().manual_seed(0))):
        with pytest.raises(ValueError, match=rf"max_new_tokens = {n} for B = 1 rows would draw {n} coins up front"):
            gen(model, [[1, 2]], n, temperature=1.0, rng=rng)


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_generate_checks_every_prompt_id_in_both_trees(tree):
    """Ids before the last Tc never reach the model but come back in the output: both trees
    refuse them by name, with no tokens drawn (max_new_tokens=0 too), a uint64 id past int64
    named as itself, not as the negative it wraps to."""
    n_model, t_model = _models(context_length=4)
    model, gen = (n_model, ngen.generate) if tree == "numpy" else (t_model, tgen.generate)
    as_ids = (lambda a: a) if tree == "numpy" else torch.from_numpy
    prompt = np.array([[-5, 1000, 1, 2, 3, 4]])  # the bad ids lie before the 4-id window
    for use_cache in (True, False):
        with pytest.raises(ValueError, match=rf"token id -5 at position \(batch 0, time 0\) is outside \[0, {V}\)"):
            gen(model, as_ids(prompt), 2, use_cache=use_cache)
    with pytest.raises(ValueError, match="token id 1000 at position"):
        gen(model, as_ids(prompt[:, 1:]), 0)
    with pytest.raises(ValueError, match="token id 18446744073709551615 at position"):
        gen(model, as_ids(np.array([[2**64 - 1, 1]], dtype=np.uint64)), 1)


# ---- one sampling distribution, bit for bit ------------------------------------------------------
# Both trees compute w = exp(z) with `sampling_exp` and the CDF with a sequential running sum
# (docs/design.md, "Sampling"): the same coin must pick the same token even when it lands exactly
# on a CDF boundary, so these compare bits, not values within a tolerance.


def _assert_same_bits(what: str, numpy_value, torch_value) -> None:
    """numpy_ref's array and torch_impl's tensor hold the same float64 bits (NaN never expected)."""
    a, b = np.asarray(numpy_value), to_numpy(torch_value)
    assert a.shape == b.shape, f"{what}: numpy shape {a.shape} vs torch shape {b.shape}"
    assert a.dtype == b.dtype == np.float64, f"{what}: numpy dtype {a.dtype} vs torch dtype {b.dtype}"
    differ = np.flatnonzero(a.view(np.int64) != b.view(np.int64))
    assert differ.size == 0, (
        f"{what}: {differ.size} of {a.size} float64 values differ in their bits; first at index {differ[0]}: "
        f"numpy {a.flat[differ[0]].hex()} vs torch {b.flat[differ[0]].hex()} "
        f"(max abs difference {np.max(np.abs(a - b)):.3e})")


def _both_distributions(row, **kw):
    """(w, cdf) from each tree, compared bit for bit, plus the probabilities w / cdf[-1]."""
    n_w, n_cdf = ngen.sampling_distribution(np.asarray(row, dtype=np.float64), **kw)
    t_w, t_cdf = tgen.sampling_distribution(torch.tensor(row, dtype=torch.float64), **kw)
    _assert_same_bits(f"weights w for {kw}", n_w, t_w)
    _assert_same_bits(f"unnormalised CDF for {kw}", n_cdf, t_cdf)
    _assert_same_bits(f"probabilities w / cdf[-1] for {kw}", n_w / n_cdf[-1], t_w / t_cdf[-1])
    return n_w, n_cdf


def _same_token(row, **kw) -> int:
    n_id = ngen.sample_next(np.asarray(row, dtype=np.float64), **kw)
    t_id = tgen.sample_next(torch.tensor(row, dtype=torch.float64), **kw)
    assert n_id == t_id, f"numpy picked {n_id}, torch {t_id} for {kw} (V={len(row)})"
    return n_id


def test_sampling_exp_has_the_same_bits_in_both_trees_and_is_exp():
    """Every exponent k in [-1076, 0] (so every power of two either tree builds), the range edges,
    -inf, and random arguments: identical bits, within 1 ulp of the correctly rounded exp."""
    import mpmath

    rng = np.random.default_rng(0)
    k = np.arange(-1076, 1)
    z = np.concatenate([k * math.log(2) + rng.uniform(-0.35, 0.35, k.size),  # one per k, near each boundary too
                        (k + 0.5) * math.log(2), -rng.random(200_000) * 746, -rng.random(100_000) * 3,
                        [0.0, -0.0, -5e-324, -1e-300, -1e-16, -745.1332191019411, -745.1332191019412, -745.5,
                         -746.0, -746.5, -708.3964185322641, -708.4, -1e308, -np.inf]])
    n_e = ngen.sampling_exp(z)
    t_e = tgen.sampling_exp(torch.from_numpy(z))
    _assert_same_bits("sampling_exp", n_e, t_e)
    assert n_e[-1] == 0.0 and n_e[np.flatnonzero(z == 0.0)].tolist() == [1.0, 1.0], "exp(-inf) = 0, exp(0) = 1"
    sample = np.concatenate([z[:3000], z[-14:-1]])
    with mpmath.workdps(40):
        exact = np.array([float(mpmath.exp(mpmath.mpf(float(v)))) for v in sample])  # correctly rounded
    got = ngen.sampling_exp(sample)
    ulps = np.abs(got - exact) / np.spacing(np.maximum(exact, 2.2250738585072014e-308))  # subnormals: in 2**-1074
    assert ulps.max() <= 1.0, (f"sampling_exp is {ulps.max()} ulp off exp at z = {sample[np.argmax(ulps)]!r}: "
                               f"{got[np.argmax(ulps)]!r} vs {exact[np.argmax(ulps)]!r}")


@pytest.mark.parametrize("row,kw,want", [
    # ids 0-3 and 4-7 carry exactly half the mass each: coin 0.5 is on the boundary (np.exp/sum
    # gave 4 and torch.softmax/cumsum 3 for the same coin). Rounding decides between 3 and 4.
    ([-3., -3., -1., -1., -1., -1., -3., -3.], dict(temperature=1.0, coin=0.5), {3, 4}),
    # a top-p cut on the boundary of the descending running sum (numpy kept 2, torch 4 ids)
    ([-3., -4., -2., -3., -2., -4., 0., 0.], dict(temperature=1.0, top_p=0.8309526605439513, coin=0.0), {2, 6}),
    ([0., 0., 0., 0.], dict(temperature=1.0, top_p=0.5, coin=0.75), {1}),  # 2 of 4 equal ids reach 0.5 exactly
    ([0., 0., 0., 0.], dict(temperature=1.0, coin=0.5), {2}),  # cdf [1, 2, 3, 4]: 0.5 * 4 = 2 is not > 2
])
def test_boundary_cases_give_the_same_distribution_and_token(row, kw, want):
    got = _same_token(row, **kw)
    assert got in want, f"picked {got} for {kw}, expected one of {sorted(want)}"
    _both_distributions(row, **{k: v for k, v in kw.items() if k != "coin"})


def _boundary_coins(cdf: np.ndarray) -> list[float]:
    """For each CDF step: the coin exactly at cdf[i] / total and its float64 neighbours."""
    at = np.unique(cdf[:-1] / cdf[-1])
    at = at[(at >= 0) & (at < 1)]
    return sorted({float(c) for x in at for c in (np.nextafter(x, 0.0), x, np.nextafter(x, 1.0)) if 0 <= c < 1})


@pytest.mark.parametrize("V", [8, 101, 50257])
def test_coins_and_top_p_exactly_on_a_boundary_pick_the_same_token(V):
    """Logits with many ties (rounded to 1/2), GPT-2's V included; top_p set exactly to each
    boundary of the descending running sum, coins exactly on each CDF step: same bits, same token.
    At V = 50257 torch also runs with two threads (its cumsum must stay sequential)."""
    rng = np.random.default_rng(V)
    row = np.round(rng.standard_normal(V) * 4) / 2
    n_w, n_cdf = _both_distributions(row, temperature=0.9)
    w_desc = np.cumsum(np.sort(n_w)[::-1])
    top_ps = sorted({float(v) for v in w_desc[:40] / w_desc[-1] if 0 < v <= 1})
    for top_p in top_ps[:8] + [1.0]:
        _, cdf = _both_distributions(row, temperature=0.9, top_p=top_p)
        for coin in _boundary_coins(cdf)[:60]:
            _same_token(row, temperature=0.9, top_p=top_p, coin=coin)
    for coin in _boundary_coins(n_cdf)[:: max(1, V // 200)]:
        _same_token(row, temperature=0.9, coin=coin)
    if V == 50257:
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            _both_distributions(row, temperature=0.9, top_k=40_000)
        finally:
            torch.set_num_threads(before)


@given(seed=seeds(), V=st.sampled_from([1, 2, 3, 17, 1000, 50257]) | st.integers(1, 50257),
       scale=st.sampled_from([0.5, 3.0, 30.0, 400.0]), decimals=st.sampled_from([0, 1, 8]),
       temperature=st.sampled_from([1e-3, 0.3, 0.9, 1.0, 2.5, 1e3]), top_k=st.none() | st.integers(1, 60_000),
       top_p=st.none() | st.floats(0.0, 1.0, exclude_min=True), coin=st.floats(0.0, 1.0, exclude_max=True))
@settings(max_examples=40, deadline=None)
def test_sampling_distribution_is_bit_identical_across_trees(seed, V, scale, decimals, temperature, top_k, top_p,
                                                             coin):
    """Random rows up to GPT-2's V with ties likely and -inf logits; every option combination."""
    rng = np.random.default_rng(seed)
    row = np.round(rng.standard_normal(V) * scale, decimals)
    row[rng.random(V) < 0.01] = -np.inf
    row[rng.integers(V)] = 1.0  # one finite maximum
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    w, cdf = _both_distributions(row, **kw)
    token = _same_token(row, coin=coin, **kw)
    assert w[token] > 0, f"picked id {token} of weight 0 for {kw}, coin {coin!r}"


# ---- arguments read as the numbers they stand for --------------------------------------------------


def test_torch_reads_listed_coins_in_float64():
    """A coin list went through torch.as_tensor as float32: 0.99999999 became 1.0 and was refused,
    and a coin just below a CDF step picked the next token. Lists, float64 tensors and numpy_ref
    now agree; a float32 tensor is widened exactly and agrees with numpy_ref given the same float32s."""
    n_model, t_model = _models(seed=3)
    ids = [[1, 2, 3]]
    out = tgen.generate(t_model, ids, 1, temperature=1.0, coins=[[0.99999999]])
    assert out.shape == (1, 4), f"a coin of 0.99999999 in a list was refused or mis-shaped: {out.tolist()}"
    logits = n_model(np.array(ids))[0, -1]  # (V,)
    _, cdf = ngen.sampling_distribution(logits, temperature=1.0)
    steps = cdf[:-1] / cdf[-1]
    coin = next(float(c) for c in steps - 1e-10 if 0 < c < 1 and float(np.float32(c)) > c + 1e-11)
    n_tok = int(ngen.generate(n_model, np.array(ids), 1, temperature=1.0, coins=[[coin]])[0, -1])
    listed = int(tgen.generate(t_model, ids, 1, temperature=1.0, coins=[[coin]])[0, -1])
    as_f64 = torch.tensor([[coin]], dtype=torch.float64)
    tensor = int(tgen.generate(t_model, ids, 1, temperature=1.0, coins=as_f64)[0, -1])
    assert listed == tensor == n_tok, f"coin {coin!r}: torch list {listed}, float64 tensor {tensor}, numpy {n_tok}"
    c32 = torch.rand((5, 2), generator=torch.Generator().manual_seed(0))  # float32, torch.rand's default
    two = np.array([[1, 2, 3], [4, 5, 6]])
    t_out = to_numpy(tgen.generate(t_model, torch.tensor(two), 5, temperature=1.0, coins=c32))
    n_out = ngen.generate(n_model, two, 5, temperature=1.0, coins=c32.numpy())
    assert np.array_equal(t_out, n_out), f"float32 coins: torch {t_out.tolist()} vs numpy {n_out.tolist()}"


@pytest.mark.parametrize("exact,stand_in", [
    (dict(temperature=Fraction(1, 2)), dict(temperature=0.5)),
    (dict(temperature=1.0, top_p=Fraction(1, 2)), dict(temperature=1.0, top_p=0.5)),
    (dict(temperature=np.float32(0.75), top_k=np.int64(3)), dict(temperature=0.75, top_k=3)),
])
def test_options_are_read_as_the_float64_they_stand_for(exact, stand_in):
    """A Fraction or NumPy scalar option computes as its float64 (it crashed inside the sampler)."""
    row = np.random.default_rng(1).standard_normal(V)
    for coin in (0.1, 0.5, 0.9):
        want = _same_token(row, coin=coin, **stand_in)
        assert _same_token(row, coin=coin, **exact) == want, f"{exact} picks differently from {stand_in}, coin {coin}"


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=10**400), r"temperature must be a float64 number, got 1000.*\(beyond 1.8e308\)"),
    (dict(temperature=1.0, top_p=-(10**400)), r"top_p must be a float64 number, got -1000"),
])
def test_options_beyond_float64_are_a_value_error_naming_the_option(kw, match):
    n_model, t_model = _models()
    for name, sample, conv in (("numpy", ngen.sample_next, np.asarray), ("torch", tgen.sample_next, torch.tensor)):
        with pytest.raises(ValueError, match=match):
            sample(conv([1.0, 3.0, 2.0]), coin=0.5, **kw)
    for gen, model in ((ngen.generate, n_model), (tgen.generate, t_model)):
        with pytest.raises(ValueError, match=match):
            gen(model, [[1, 2]], 2, coins=[[0.5], [0.5]], **kw)


@pytest.mark.parametrize("tree", ["numpy", "torch"])
@pytest.mark.parametrize("ids,value,t", [([[5, 2**63]], 2**63, 1), ([[5, 2**70]], 2**70, 1),
                                         ([[-(2**70), 1]], -(2**70), 0), ([[1, 2], [3, 2**64]], 2**64, 1)])
def test_listed_ids_beyond_int64_are_named_with_the_vocabulary_limit(tree, ids, value, t):
    """2**63 in a list made numpy_ref's ids float64 ("must be an integer array") and torch's
    as_tensor overflow ("Overflow when unpacking long long"): neither named the id or V."""
    n_model, t_model = _models()
    model, gen = (n_model, ngen.generate) if tree == "numpy" else (t_model, tgen.generate)
    b = len(ids) - 1
    with pytest.raises(ValueError, match=rf"token id {value} at position \(batch {b}, time {t}\) is outside "
                                         rf"\[0, {V}\) \(vocab_size={V}\)"):
        gen(model, ids, 1)


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_kv_cache_crop_refuses_a_length_that_is_no_int(tree):
    """torch's crop(1.5) set the length to 1.5 (the next forward failed far away) and crop(True)
    acted as crop(1); both trees raise a TypeError naming the value, before anything changes."""
    cache = (nkv.KVCache if tree == "numpy" else tkv.KVCache)(1, 1, 2, 8, 4)
    cache.advance(3)
    for bad in (1.5, True, "1", None):
        with pytest.raises(TypeError, match=rf"crop length must be an int, got {re.escape(repr(bad))}"):
            cache.crop(bad)
        assert cache.length == 3 and type(cache.length) is int, f"{tree}: crop({bad!r}) left length {cache.length!r}"
    cache.crop(np.int64(2))
    assert cache.length == 2 and type(cache.length) is int, f"{tree}: crop(np.int64(2)) gave {cache.length!r}"


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_kv_cache_refuses_a_batch_size_that_is_no_int_by_name(tree):
    """new_kv_cache(True) made a one-row cache in torch_impl and raised "an integer is required" in
    numpy_ref; 1.5 reached np.zeros and torch.empty, whose errors named no argument. Both trees
    refuse them by name, as crop and advance refuse theirs, and take a NumPy integer as its int."""
    n_model, t_model = _models()
    model = n_model if tree == "numpy" else t_model
    for bad in (True, False, 1.5, 2.0, np.float64(2.0), "2", None):
        with pytest.raises(TypeError, match=rf"KV cache batch_size must be an int, got {re.escape(repr(bad))} "
                                            rf"\({type(bad).__name__}\)"):
            model.new_kv_cache(bad)
    for bad in (0, -1, np.int64(0)):
        with pytest.raises(ValueError, match=rf"KV cache batch_size must be >= 1, got {bad}$"):
            model.new_kv_cache(bad)
    cache = model.new_kv_cache(np.int64(2))
    assert cache.batch_size == 2 and type(cache.batch_size) is int, f"{tree}: batch_size {cache.batch_size!r}"
    out = model(np.array([[1, 2, 3], [4, 5, 6]]) if tree == "numpy" else torch.tensor([[1, 2, 3], [4, 5, 6]]),
                kv_cache=cache)
    assert tuple(out.shape) == (2, 3, V) and cache.length == 3, f"{tree}: {tuple(out.shape)}, length {cache.length}"


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_kv_cache_crop_takes_every_length_from_0_to_its_own(tree):
    """crop(length) (every draft token accepted) and crop(0) are valid; one past the length and a
    negative one are not (a mutation refusing either end went unnoticed)."""
    cache = (nkv.KVCache if tree == "numpy" else tkv.KVCache)(1, 1, 2, 8, 4)
    cache.advance(3)
    cache.crop(3)
    assert cache.length == 3, f"{tree}: crop to its own length changed it to {cache.length}"
    for bad in (4, -1):
        with pytest.raises(ValueError, match=f"cannot crop a KV cache of length 3 to {bad}"):
            cache.crop(bad)
        assert cache.length == 3
    cache.crop(0)
    assert cache.length == 0


def test_torch_generate_leaves_the_model_in_the_mode_it_found():
    """generate runs the model in eval mode and restores the caller's mode, also when it raises:
    left in training mode, the caller's next forward would draw dropout."""
    _, t_model = _models()
    for training in (False, True):
        t_model.train(training)
        tgen.generate(t_model, [[1, 2]], 2)
        assert t_model.training is training, f"generate left training={t_model.training}, found {training}"
        with pytest.raises(ValueError):
            tgen.generate(t_model, [[1, 2]], 2, temperature=1.0, coins=[[0.5]])  # 1 coin row for 2 tokens
        assert t_model.training is training, f"a raising generate left training={t_model.training}"


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_kv_cache_advance_refuses_a_count_that_is_no_int_or_negative(tree):
    """advance(-3), advance(1.5) and advance(True) were stored as the length (torch's next forward
    then failed far away, in narrow() or indexing); they are a ValueError / TypeError naming T,
    raised before anything changes, as crop's. A negative pos_offset is refused by name in
    torch's check_ids too, as in numpy_ref's."""
    cache = (nkv.KVCache if tree == "numpy" else tkv.KVCache)(1, 1, 2, 8, 4)
    cache.advance(np.int64(2))
    assert cache.length == 2 and type(cache.length) is int, f"{tree}: advance(np.int64(2)) gave {cache.length!r}"
    for bad, error, match in ((-1, ValueError, "T >= 0 positions, got T=-1"), (1.5, TypeError, "got 1.5"),
                              (True, TypeError, "got True"), ("1", TypeError, "got '1'")):
        with pytest.raises(error, match=match):
            cache.advance(bad)
        assert cache.length == 2, f"{tree}: advance({bad!r}) left length {cache.length!r}"
    if tree == "torch":
        from torch_impl.embedding import check_ids

        with pytest.raises(ValueError, match="pos_offset .* must be an int >= 0, got -2"):
            check_ids(torch.tensor([[1]]), 10, 8, pos_offset=-2)


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_a_bool_among_listed_ids_is_a_type_error(tree):
    """[[True, 5]] became the ids [[1, 5]] in both trees (an array of ints and bools is ints); a
    bool is no token id, as an all-bool prompt was already refused."""
    n_model, t_model = _models()
    model, gen = (n_model, ngen.generate) if tree == "numpy" else (t_model, tgen.generate)
    with pytest.raises(TypeError, match=r"token id True at position \(batch 0, time 0\) is a bool"):
        gen(model, [[True, 5]], 1)
    with pytest.raises(TypeError, match=r"token id False at position \(batch 1, time 1\) is a bool"):
        gen(model, [[1, 2], [3, False]], 1)
    for flag in (np.True_, np.array(True), torch.tensor(True)):  # became id 1 as well
        with pytest.raises(TypeError, match=r"at position \(batch 0, time 1\) is a bool"):
            gen(model, [[3, flag]], 1)


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_generate_refuses_a_wrong_type_of_count_or_rng_and_returns_a_copy(tree):
    """max_new_tokens 2.0 or "3" is a TypeError (a wrong type, docs/design.md), -1 a ValueError;
    the other tree's generator is a TypeError naming the expected type (it was an AttributeError
    in numpy_ref and a torch.rand argument error in torch_impl); 0 new tokens returns a new array
    or tensor, never the caller's own."""
    n_model, t_model = _models()
    if tree == "numpy":
        model, gen, ids = n_model, ngen.generate, np.array([[1, 2]])
        wrong_rng, want = torch.Generator(), "np.random.Generator"
    else:
        model, gen, ids = t_model, tgen.generate, torch.tensor([[1, 2]])
        wrong_rng, want = np.random.default_rng(0), "torch.Generator"
    for bad in (2.0, "3", np.float64(2.0)):
        with pytest.raises(TypeError, match=rf"max_new_tokens must be an int >= 0, got {re.escape(repr(bad))}"):
            gen(model, ids, bad)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0, got -1"):
        gen(model, ids, -1)
    with pytest.raises(TypeError, match=rf"rng must be a {re.escape(want)} or None, got "):
        gen(model, ids, 2, temperature=1.0, rng=wrong_rng)
    out = gen(model, ids, 0)
    assert out is not ids, f"{tree}: max_new_tokens=0 returned the caller's own ids object"
    out[0, 0] = 7
    assert int(ids[0, 0]) == 1, f"{tree}: writing into generate's output changed the caller's ids"


def test_sample_next_takes_a_zero_dimensional_coin_as_its_number():
    """A 0-d tensor (torch.rand(())) or 0-d array (rng.random(())) coin was refused as not a real
    number after the options were checked with numbers.Real; it is its value, as before."""
    import numpy_ref.generate as ngen
    import torch_impl.generate as tgen

    logits = np.random.default_rng(0).normal(size=50)
    for coin in (0.3, 0.71):
        want = tgen.sample_next(torch.tensor(logits), temperature=1.0, coin=coin)
        got_t = tgen.sample_next(torch.tensor(logits), temperature=1.0, coin=torch.tensor(coin, dtype=torch.float64))
        got_n = ngen.sample_next(logits, temperature=1.0, coin=np.array(coin))
        assert got_t == want and got_n == want, f"coin {coin}: float {want}, 0-d tensor {got_t}, 0-d array {got_n}"
    with pytest.raises(TypeError):
        tgen.sample_next(torch.tensor(logits), temperature=1.0, coin=torch.tensor([0.3]))


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_a_coin_of_exactly_one_is_refused_before_any_step_in_both_trees(temperature):
    """[0, 1) excludes 1.0: refused up front, greedy decoding (which reads no coin) included,
    not late in sample_next after earlier tokens ran, nor silently in a row that already stopped."""
    n_model, t_model = _models(seed=2)
    ids = np.array([[1, 2, 3]])
    coins = np.array([[0.5], [1.0], [0.5]])
    for gen, model, conv in ((ngen.generate, n_model, np.asarray), (tgen.generate, t_model, torch.tensor)):
        with pytest.raises(ValueError, match=r"coins must lie in \[0, 1\); coins\[1, 0\] = 1.0"):
            gen(model, conv(ids), 3, temperature=temperature, coins=conv(coins))
