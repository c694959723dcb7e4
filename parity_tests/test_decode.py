"""torch_impl/decode.py: one token per row through the whole model, the CPU decoding path.

GPTModel.forward hands a one-position step with a KV cache to `decode_step` when `decodes_fast`
allows it. The claim is strong: the logits and every cached key and value are the same bits as
the general forward's (block.py -> attention.py -> linear.py). Every test here counts the calls
that reached `decode_step`, so none of them can pass by never taking the path; the general path
itself is held against the NumPy oracle elsewhere (test_cross_model.py, test_torch_model.py).
"""

from __future__ import annotations

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
    prompt = draw(st.integers(1, context - 1))
    return (cfg, draw(st.sampled_from([torch.float64, torch.float32])), draw(st.integers(1, 3)), prompt,
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
            model(ids[:, :prompt], kv_cache=cache)  # prefill: the general path on both
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
    "gradient recording on": lambda m: _one_step(m),
    "two positions at once": lambda m: _one_step(m, T=2),
    f"more than {SPLIT_MAX_ROWS} rows": lambda m: _one_step(m, B=SPLIT_MAX_ROWS + 1),
    "bf16 autocast": lambda m: _autocast(lambda: _one_step(m, cache_dtype=torch.bfloat16)),
    "a cache in another dtype": lambda m: _refused(lambda: _one_step(m, cache_dtype=torch.float64)),
    "explicit dropout masks": lambda m: _one_step(m, dropout_masks={}),
    "no cache": lambda m: m(torch.zeros(1, 1, dtype=torch.int64)),
}


def _refused(fn):
    """The general path's own error: attention over float32 queries and float64 cached keys."""
    with pytest.raises(RuntimeError, match="same dtype"):
        fn()


def _autocast(fn):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn()


@pytest.mark.parametrize("what", list(NOT_TAKEN))
def test_decode_path_is_not_taken_where_it_would_differ(what):
    model = GPTModel(_tiny(), seed=0).eval()
    with counting_decode_steps() as calls, torch.set_grad_enabled(what == "gradient recording on"):
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


def test_bad_input_on_the_decode_path_raises_and_leaves_the_cache_as_it_was():
    model = GPTModel(_tiny(), seed=0).eval()
    with torch.no_grad(), counting_decode_steps() as calls:
        cache = model.new_kv_cache(1)
        model(torch.tensor([[1, 2, 3]]), kv_cache=cache)
        keys = cache.k.clone()
        with pytest.raises(ValueError, match=r"token id 50 at position \(batch 0, time 0\) is outside \[0, 50\)"):
            model(torch.tensor([[50]]), kv_cache=cache)
        with pytest.raises(ValueError, match=r"token id -1 .* outside \[0, 50\)"):
            model(torch.tensor([[-1]]), kv_cache=cache)
        with pytest.raises(TypeError, match="integer dtype, got torch.float32"):
            model(torch.tensor([[1.0]]), kv_cache=cache)
        assert cache.length == 3, f"a refused token moved the cache to length {cache.length}"
        assert torch.equal(cache.k, keys), "a refused token wrote into the key cache"
        for t in range(3, 8):
            model(torch.tensor([[t]]), kv_cache=cache)  # fills the context (8)
        keys = cache.k.clone()
        with pytest.raises(ValueError, match="after 8 cached positions exceeds the context length 8"):
            model(torch.tensor([[1]]), kv_cache=cache)
        assert cache.length == 8 and torch.equal(cache.k, keys), "a token past the context changed the cache"
    assert len(calls) == 9, f"decode_step ran {len(calls)} times; 4 refused + 5 accepted + 1 refused expected"
