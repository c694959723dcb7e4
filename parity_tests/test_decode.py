"""torch_impl/decode.py: one token per row through the whole model, the CPU decoding path.

GPTModel.forward hands a one-position step with a KV cache to `decode_step` when `decodes_fast`
allows it. The claim is strong: the logits and every cached key and value are the same bits as
the general forward's (block.py -> attention.py -> linear.py). Every test here counts the calls
that reached `decode_step`, so none of them can pass by never taking the path; the general path
itself is held against the NumPy oracle elsewhere (test_cross_model.py, test_torch_model.py).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import torch_impl.decode
import torch_impl.head
import torch_impl.linear
import torch_impl.model
from parity_tests.strategies import seeds
from torch_impl.config import GPTConfig
from torch_impl.linear import SPLIT_K, SPLIT_MAX_ROWS, SPLIT_MIN_BYTES
from torch_impl.model import GPTModel


@contextmanager
def counting_decode_steps():
    """Counts the calls GPTModel.forward hands to decode_step (which still runs)."""
    calls = []
    real = torch_impl.decode.decode_step

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    with mock.patch.object(torch_impl.model, "decode_step", spy):
        yield calls


@contextmanager
def split_threshold(n_bytes: int):
    """linear.SPLIT_MIN_BYTES (also read by head.py) set to n_bytes: 0 makes every product of the
    tiny test models take the split into SPLIT_K parts that GPT-2-sized weights take."""
    with mock.patch.object(torch_impl.linear, "SPLIT_MIN_BYTES", n_bytes), \
            mock.patch.object(torch_impl.head, "SPLIT_MIN_BYTES", n_bytes):
        yield


@contextmanager
def general_path_only():
    """GPTModel.forward with the decode path switched off: block.py, attention.py, linear.py."""
    with mock.patch.object(torch_impl.model, "decodes_fast", lambda *args: False):
        yield


def perturbed_model(cfg: GPTConfig, seed: int, dtype: torch.dtype) -> GPTModel:
    """Biases and layer norms moved off 0 and 1, so a dropped or swapped one changes the logits."""
    model = GPTModel(cfg, seed=seed, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    return model


def assert_same_bits(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, \
        f"{what}: shape {tuple(got.shape)} {got.dtype} vs {tuple(want.shape)} {want.dtype}"
    if not torch.equal(got, want):
        diff = (got.double() - want.double()).abs()
        worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(f"{what}: not the same bits; {int((diff > 0).sum())} of {diff.numel()} elements "
                             f"differ, max |diff| {float(diff.max()):.3g} at {worst} "
                             f"({float(got[worst])!r} vs {float(want[worst])!r})")


@st.composite
def decode_cases(draw):
    """A config with C divisible by SPLIT_K (the path's own condition), a batch and a prompt."""
    n_heads = draw(st.integers(1, 4))
    head_size = draw(st.sampled_from([2, 4, 8, 12]))
    if (n_heads * head_size) % SPLIT_K:
        head_size = SPLIT_K  # C = nh * 8
    context = draw(st.integers(2, 12))
    cfg = GPTConfig(vocab_size=draw(st.integers(2, 70)), context_length=context, emb_dim=n_heads * head_size,
                    n_heads=n_heads, n_layers=draw(st.integers(1, 3)), drop_rate=0.0,
                    qkv_bias=draw(st.booleans()), tie_embeddings=draw(st.booleans()), ln_eps=1e-5)
    prompt = draw(st.integers(0, context - 1))  # 0: the first step (P = 0) is a decode step too
    return (cfg, draw(st.sampled_from([torch.float64, torch.float32])), draw(st.sampled_from([1, 2, 3, SPLIT_MAX_ROWS])),
            prompt,
            draw(st.sampled_from([0, SPLIT_MIN_BYTES])), draw(seeds()))


@given(case=decode_cases())
def test_decode_step_gives_the_general_forwards_bits(case):
    cfg, dtype, B, prompt, threshold, seed = case
    model = perturbed_model(cfg, seed % 1000, dtype)
    T = cfg.context_length
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), split_threshold(threshold):
        fast, general = model.new_kv_cache(B), model.new_kv_cache(B)
        for cache in (fast, general):
            cache.k.fill_(float("nan"))  # positions not yet written must never be read
            cache.v.fill_(float("nan"))
            if prompt > 1:
                model(ids[:, :prompt], kv_cache=cache)  # prefill (T > 1): the general path
            elif prompt == 1:
                with general_path_only():  # so that a wrong P = 0 step on the decode path cannot hide here
                    model(ids[:, :1], kv_cache=cache)
        for t in range(prompt, T):
            with counting_decode_steps() as calls:
                got = model(ids[:, t:t + 1], kv_cache=fast)
            assert calls == [(B, 1)], f"position {t}: decode_step calls {calls}, expected one of shape ({B}, 1)"
            with general_path_only():
                want = model(ids[:, t:t + 1], kv_cache=general)
            assert_same_bits(f"logits at position {t} ({dtype}, B={B}, split threshold {threshold}, {cfg})", got, want)
            assert fast.length == general.length == t + 1, f"cache lengths {fast.length}, {general.length} after {t}"
            assert_same_bits(f"cached keys after position {t}", fast.k[:, :, :, :t + 1], general.k[:, :, :, :t + 1])
            assert_same_bits(f"cached values after position {t}", fast.v[:, :, :, :t + 1], general.v[:, :, :, :t + 1])
            for name, buf in (("keys", fast.k), ("values", fast.v)):
                assert bool(buf[:, :, :, t + 1:].isnan().all()), f"cached {name} past position {t} were written"


def test_generate_takes_the_decode_path_and_gives_the_same_tokens():
    from torch_impl.generate import generate

    cfg = GPTConfig(vocab_size=300, context_length=24, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                    qkv_bias=True, tie_embeddings=True, ln_eps=1e-5)
    model = perturbed_model(cfg, 3, torch.float32)
    prompt = torch.tensor([[5, 17, 99], [250, 1, 2]])
    coins = torch.rand((15, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with counting_decode_steps() as calls:
        got = generate(model, prompt, 15, temperature=0.8, top_k=50, coins=coins)
    assert len(calls) == 14, f"decode_step ran {len(calls)} times for 15 new tokens (the first is the prefill's)"
    with general_path_only():
        want = generate(model, prompt, 15, temperature=0.8, top_k=50, coins=coins)
    assert torch.equal(got, want), f"tokens differ:\n{got.tolist()}\nvs the general path's\n{want.tolist()}"


def _tiny(emb_dim: int = 16, n_heads: int = 2, **kw) -> GPTConfig:
    fields = dict(vocab_size=50, context_length=8, emb_dim=emb_dim, n_heads=n_heads, n_layers=1, drop_rate=0.0,
                  qkv_bias=False, tie_embeddings=True, ln_eps=1e-5)
    return GPTConfig(**{**fields, **kw})


def _one_step(model: GPTModel, B: int = 1, T: int = 1, cache_dtype=None, **kw):
    cache = model.new_kv_cache(B, dtype=cache_dtype)
    return model(torch.zeros(B, T, dtype=torch.int64), kv_cache=cache, **kw)


# Each case: (what, build the model, run one call); the path must not be taken.
NOT_TAKEN = {
    "two positions at once": lambda m: _one_step(m, T=2),
    f"more than {SPLIT_MAX_ROWS} rows": lambda m: _one_step(m, B=SPLIT_MAX_ROWS + 1),
    "bf16 autocast, float32 cache": lambda m: _autocast(lambda: _one_step(m)),
    "bf16 autocast, bf16 cache": lambda m: _autocast(lambda: _one_step(m, cache_dtype=torch.bfloat16)),
    "torch.compile tracing": lambda m: _one_step(torch.compile(m, backend="eager")),
    "a cache in another dtype": lambda m: _refused(lambda: _one_step(m, cache_dtype=torch.float64)),
    "explicit dropout masks": lambda m: _one_step(m, dropout_masks={}),
    "no cache": lambda m: m(torch.zeros(1, 1, dtype=torch.int64)),
}


def _refused(fn):
    """The model's own error for a cache in another dtype, raised before either path runs."""
    with pytest.raises(ValueError, match=r"the KV cache is torch.float64 on cpu; this model's keys are torch.float32"):
        fn()


def _autocast(fn):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn()


@pytest.mark.parametrize("what", list(NOT_TAKEN))
def test_decode_path_is_not_taken_where_it_would_differ(what):
    model = GPTModel(_tiny(), seed=0).eval()
    with counting_decode_steps() as calls, torch.no_grad():
        NOT_TAKEN[what](model)
    assert calls == [], f"{what}: decode_step ran ({calls})"


def test_decode_path_needs_c_divisible_by_split_k_and_no_random_dropout():
    with torch.no_grad(), counting_decode_steps() as calls:
        _one_step(GPTModel(_tiny(emb_dim=12, n_heads=2), seed=0).eval())  # C = 12: no split of C_in
        _one_step(GPTModel(_tiny(drop_rate=0.1), seed=0).train())  # torch-drawn dropout
        assert calls == [], f"decode_step ran for C = 12 or with dropout ({calls})"
        _one_step(GPTModel(_tiny(drop_rate=0.1), seed=0).eval())  # evaluation: no dropout
        _one_step(GPTModel(_tiny(drop_rate=0.0), seed=0).train())  # training mode, rate 0
    assert len(calls) == 2, f"decode_step ran {len(calls)} times for the two cases that may take it"


def _error_of(fn) -> tuple[type, str]:
    with pytest.raises(Exception) as info:
        fn()
    return info.type, str(info.value)


def _filled_cache(model: GPTModel, cache=None):
    """A new cache (or `cache`) with 0.5 everywhere: "unchanged" is then a whole-buffer comparison
    (uninitialised memory may hold NaN, which equals nothing)."""
    cache = model.new_kv_cache(1) if cache is None else cache
    cache.k.fill_(0.5)
    cache.v.fill_(0.5)
    return cache


def _same_refusal(model: GPTModel, cache, ids, what: str) -> None:
    """ids refused by the decode path with the general path's exception and message, and the cache
    (every buffer element and its length) left as it was."""
    before = (cache.length, cache.k.clone(), cache.v.clone())
    with counting_decode_steps() as calls:
        fast = _error_of(lambda: model(ids, kv_cache=cache))
    assert len(calls) == 1, f"{what}: the decode path was not taken ({calls})"
    with general_path_only():
        general = _error_of(lambda: model(ids, kv_cache=cache))
    assert fast == general, f"{what}: decode path raised {fast}, the general path {general}"
    assert cache.length == before[0], f"{what}: the cache moved from length {before[0]} to {cache.length}"
    assert torch.equal(cache.k, before[1]) and torch.equal(cache.v, before[2]), f"{what}: the cache was written"


def test_bad_input_on_the_decode_path_raises_the_general_paths_errors_and_leaves_the_cache():
    model = GPTModel(_tiny(), seed=0).eval()
    with torch.no_grad():
        cache = _filled_cache(model)
        model(torch.tensor([[1, 2, 3]]), kv_cache=cache)
        _same_refusal(model, cache, torch.tensor([[50]]), "id = V")
        _same_refusal(model, cache, torch.tensor([[-1]]), "id -1")
        _same_refusal(model, cache, torch.tensor([[1.0]]), "a float id")
        _, message = _error_of(lambda: model(torch.tensor([[50]]), kv_cache=cache))
        assert "token id 50 at position (batch 0, time 0) is outside [0, 50)" in message, message
        for t in range(3, 8):
            model(torch.tensor([[t]]), kv_cache=cache)  # fills the context (8)
        _same_refusal(model, cache, torch.tensor([[1]]), "a token past the context")
        _, message = _error_of(lambda: model(torch.tensor([[1]]), kv_cache=cache))
        assert "after 8 cached positions exceeds the context length 8" in message, message


def test_a_cache_shorter_than_the_context_overflows_with_the_general_paths_error():
    from torch_impl.kv_cache import KVCache

    model = GPTModel(_tiny(), seed=0).eval()
    cfg = model.config
    with torch.no_grad():
        cache = _filled_cache(model, KVCache(cfg.n_layers, 1, cfg.n_heads, 4, cfg.head_size))  # 4 positions, not 8
        model(torch.tensor([[1, 2, 3, 4]]), kv_cache=cache)
        _same_refusal(model, cache, torch.tensor([[1]]), "a fifth position in a 4-position cache")


def test_the_decode_path_checks_ids_against_the_tables_as_the_general_path_does():
    """Embedding tables replaced with other sizes than the config's: the same logits or errors."""
    with torch.no_grad():
        grown = GPTModel(_tiny(), seed=0).eval()
        grown.wte.weight = torch.nn.Parameter(torch.randn(60, 16, generator=torch.Generator().manual_seed(1)))
        cache_a, cache_b = grown.new_kv_cache(1), grown.new_kv_cache(1)
        with counting_decode_steps() as calls:
            got = grown(torch.tensor([[55]]), kv_cache=cache_a)
        with general_path_only():
            want = grown(torch.tensor([[55]]), kv_cache=cache_b)
        assert len(calls) == 1, f"the decode path was not taken ({calls})"
        assert_same_bits("logits with a 60-row wte (config V = 50), id 55", got, want)

        cut = GPTModel(_tiny(), seed=0).eval()
        cut.wte.weight = torch.nn.Parameter(cut.wte.weight[:40].clone())
        cut.wpe.weight = torch.nn.Parameter(cut.wpe.weight[:4].clone())
        cache = _filled_cache(cut)
        _same_refusal(cut, cache, torch.tensor([[45]]), "id 45 with a 40-row wte")
        cut(torch.tensor([[1, 2, 3, 4]]), kv_cache=cache)
        _same_refusal(cut, cache, torch.tensor([[1]]), "position 4 with a 4-row wpe")


def test_a_float64_wpe_in_a_float32_model_fails_on_both_paths_alike():
    model = GPTModel(_tiny(), seed=0).eval()
    model.wpe.weight = torch.nn.Parameter(model.wpe.weight.double())
    with torch.no_grad():
        _same_refusal(model, _filled_cache(model), torch.tensor([[1]]), "float64 wpe, float32 everything else")


def test_parametrized_weights_are_used_on_both_paths():
    """torch.nn.utils.parametrize: the block reads the computed weight (model._block_params), on the
    general path and on the decode path, like a model whose weight holds that value."""
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    cfg = _tiny(n_layers=2)
    plain, param = GPTModel(cfg, seed=0).eval(), GPTModel(cfg, seed=0).eval()
    with torch.no_grad():
        plain.h[1].attn.c_attn.weight.mul_(2)
    parametrize.register_parametrization(param.h[1].attn.c_attn, "weight", Doubled())
    ids = torch.tensor([[3, 9, 4]])
    with torch.no_grad():
        assert_same_bits("logits, parametrized vs doubled weight", param(ids), plain(ids))
        caches = [m.new_kv_cache(1) for m in (param, plain)]
        for m, c in zip((param, plain), caches):
            m(ids, kv_cache=c)
        with counting_decode_steps() as calls:
            got, want = param(ids[:, :1], kv_cache=caches[0]), plain(ids[:, :1], kv_cache=caches[1])
        assert len(calls) == 2, f"the decode path ran {len(calls)} times for two steps"
        assert_same_bits("decoded logits, parametrized vs doubled weight", got, want)


@pytest.mark.parametrize("weights,autocast", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
def test_16_bit_weights_under_the_other_16_bit_autocast_are_refused_by_name(weights, autocast):
    """bf16 weights under fp16 autocast (or fp16 under bf16) failed in the first block's second layer
    norm with torch's "mixed dtype (CPU): expect parameter to have scalar type of Float", cached or
    not: the 16-bit products and residual stream sum to float32. The forward refuses the pair at its
    entry, naming both dtypes, before the cache is written. The same 16-bit dtype, and float32
    weights, under that autocast still run."""
    from torch_impl.generate import generate

    model = GPTModel(_tiny(), seed=0, dtype=weights).eval()
    ids = torch.tensor([[1, 2, 3]])
    cache = model.new_kv_cache(1)
    match = re.escape(f"the model's weights are {weights}, but cpu autocast computes in {autocast}")
    with torch.autocast("cpu", dtype=autocast):
        for grad in (True, False):  # with gradients on, a cached forward reruns itself under no_grad
            with torch.set_grad_enabled(grad):
                for kv in (None, cache):
                    with pytest.raises(TypeError, match=match):
                        model(ids, kv_cache=kv)
        assert cache.length == 0, f"a refused forward left the cache at length {cache.length}"
        for use_cache in (True, False):
            with pytest.raises(TypeError, match=match):
                generate(model, ids, 2, use_cache=use_cache)
        for dtype in (autocast, torch.float32):
            fine = GPTModel(_tiny(), seed=0, dtype=dtype).eval()
            out = generate(fine, ids, 2)
            assert tuple(out.shape) == (1, 5), f"{dtype} weights under {autocast} autocast gave {tuple(out.shape)}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_decode_path_is_not_taken_on_cuda():
    model = GPTModel(_tiny(), seed=0, device="cuda").eval()
    with torch.no_grad(), counting_decode_steps() as calls:
        _one_step(model)
    assert calls == [], f"decode_step ran on CUDA ({calls})"


def test_decode_step_called_with_grad_on_is_refused_by_name():
    """Called directly with grad mode on, its in-place adds built a graph and broke it: the
    backward failed with autograd's in-place error, naming nothing of decoding."""
    model = GPTModel(GPTConfig(vocab_size=64, context_length=8, emb_dim=32, n_layers=1, n_heads=2), seed=0)
    cache = model.new_kv_cache(1)
    with pytest.raises(RuntimeError, match="decode_step runs without gradients"):
        torch_impl.decode.decode_step(model, torch.zeros(1, 1, dtype=torch.long), cache)
    assert cache.length == 0, f"the refused step advanced the cache to {cache.length}"
    with torch.no_grad():
        logits = torch_impl.decode.decode_step(model, torch.zeros(1, 1, dtype=torch.long), cache)
    assert logits.shape == (1, 1, 64) and cache.length == 1, f"{tuple(logits.shape)}, cache at {cache.length}"


def test_generation_ending_exactly_at_the_context_decodes_every_token_after_the_prompt():
    """The last step's input is position Tc - 1: it still fits the cache, so generate decodes it
    from the cache rather than running the whole window again (one full-context forward more)."""
    from torch_impl.generate import generate

    model = GPTModel(GPTConfig(vocab_size=64, context_length=8, emb_dim=32, n_layers=1, n_heads=2), seed=0).eval()
    with counting_decode_steps() as calls:
        out = generate(model, torch.zeros(1, 4, dtype=torch.long), 5)  # the prompt, then inputs at positions 4..7
    assert out.shape == (1, 9), f"generated shape {tuple(out.shape)}"
    assert len(calls) == 4, f"{len(calls)} decode steps for the inputs at positions 4..7, expected 4 (one per new token after the first)"


def test_a_frozen_model_decodes_with_grad_mode_on():
    """Every parameter frozen, grad mode on: the general path runs (decode_step refuses grad mode)
    and the logits are the full forward's."""
    model = GPTModel(GPTConfig(vocab_size=64, context_length=8, emb_dim=32, n_layers=1, n_heads=2), seed=0).eval()
    model.requires_grad_(False)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    cache = model.new_kv_cache(1)
    model(ids[:, :4], kv_cache=cache)
    with counting_decode_steps() as calls:
        last = model(ids[:, 4:], kv_cache=cache)
    assert calls == [], f"decode_step ran with grad mode on: {calls}"
    full = model(ids)
    assert torch.allclose(last[:, 0], full[:, 4], atol=1e-5), "cached logits differ from the full forward's"
