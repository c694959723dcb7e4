"""torch_impl on its own: the properties of the fast path that need no oracle.

Bad input, the KV cache (cached logits equal a full recomputation at every step, chunked prefill
included), the bottom-right causal mask when queries are fewer than keys, float64 / bf16 /
compile paths, explicit dropout masks, the parameter table and the tied head. Every numeric
comparison goes through `assert_close` with the tolerance table.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parity_tests.compare import assert_close, assert_dicts_close
from parity_tests.strategies import config_dicts, seeds
from parity_tests.tolerances import forward_tol, gradient_tol
from torch_impl.attention import causal_mask, explicit_attention, sdpa_attention
from torch_impl.config import GPTConfig, get_config
from torch_impl.device import plan_runtime
from torch_impl.model import GPTModel


def tiny(**overrides) -> GPTConfig:
    return get_config("tiny", **overrides)


def model_of(cfg: GPTConfig, seed: int = 0, dtype=torch.float64, device=None) -> GPTModel:
    """A model whose biases and layer-norm parameters are perturbed away from 0 and 1, so a dropped
    bias or a swapped gamma/beta changes the numbers."""
    model = GPTModel(cfg, seed=seed, dtype=dtype, device=device).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p))
    return model


def ids_of(cfg: GPTConfig, B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@st.composite
def small_configs(draw, dropout: bool = False) -> GPTConfig:
    return GPTConfig(**draw(config_dicts(max_layers=2, max_heads=3, max_head_size=6, max_context=12, max_vocab=40,
                                         dropout=dropout)))


# ---- bad input (docs/design.md, "Bad input") ---------------------------------------------------


def test_float_ids_are_a_type_error_naming_the_dtype():
    model = model_of(tiny())
    with pytest.raises(TypeError, match="float32"):
        model(torch.zeros(1, 3, dtype=torch.float32))
    with pytest.raises(TypeError, match="bool"):
        model(torch.zeros(1, 3, dtype=torch.bool))


@pytest.mark.parametrize("rows", [7, None], ids=["sliced head", "whole head"])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8, torch.uint16, torch.uint32])
def test_every_integer_dtype_of_ids_and_targets_gives_the_int64_result(dtype, rows):
    """Ids and targets of any integer dtype but uint64 are read as int64: the same logits, loss and
    gradients as int64, on both head paths (int32 targets once worked only on the sliced one)."""
    from parity_tests.models import head_slices

    model = model_of(tiny())
    ids = ids_of(model.config, 2, 5, 3).clamp(max=100)
    with head_slices(rows or 10**9):
        ref_logits, ref_loss = model(ids, ids)
        ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
        logits, loss = model(ids.to(dtype), ids.to(dtype))
        grads = torch.autograd.grad(loss, list(model.parameters()))
    assert torch.equal(logits, ref_logits) and torch.equal(loss, ref_loss), f"{dtype}: logits or loss differ"
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert torch.equal(g, r), f"{dtype}: gradient of {name} differs from int64's"


def test_ids_out_of_range_for_the_vocabulary_are_named_in_any_dtype():
    """The range check is done in int64: in int16, V = 50257 wraps, and a valid id 5 was reported
    as outside [0, 50257); uint64 is refused by name (its values may not fit in int64)."""
    big = model_of(GPTConfig(**dict(tiny().to_dict(), vocab_size=50257, emb_dim=8, n_heads=2)))
    big(torch.tensor([[5, 50256]], dtype=torch.int32))
    big(torch.tensor([[5, 30000]], dtype=torch.int16))
    with pytest.raises(ValueError, match=r"token id 200 at position \(batch 0, time 1\) is outside \[0, 101\)"):
        model_of(tiny())(torch.tensor([[5, 200]], dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint64"):
        model_of(tiny())(torch.tensor([[5]], dtype=torch.uint64))


def test_ignore_index_must_be_an_int():
    model = model_of(tiny())
    ids = ids_of(model.config, 1, 4, 0)
    for bad in (3.5, True, "3"):
        with pytest.raises(TypeError, match="ignore_index must be an int or None"):
            model(ids, ids, ignore_index=bad)
    # An int past int64 was an OverflowError in torch_impl and a loss in numpy_ref: a ValueError in both.
    from numpy_ref.config import GPTConfig as NumpyConfig
    from numpy_ref.model import GPTModel as NumpyModel

    np_model = NumpyModel(NumpyConfig(**model.config.to_dict()), seed=0)
    for bad in (2**70, -(2**63) - 1, 2**63):
        with pytest.raises(ValueError, match=f"ignore_index must be an int64, got {bad}"):
            model(ids, ids, ignore_index=bad)
        with pytest.raises(ValueError, match=f"ignore_index must be an int64, got {bad}"):
            np_model.forward(ids.numpy(), ids.numpy(), ignore_index=bad)

    assert torch.equal(model(ids, ids, ignore_index=np.int64(int(ids[0, 0])))[1],
                       model(ids, ids, ignore_index=int(ids[0, 0]))[1]), "a numpy integer ignore_index differs"

@pytest.mark.parametrize("shape", [(3,), (1, 2, 3)])
def test_ids_not_2d_are_a_value_error_naming_the_shape(shape):
    with pytest.raises(ValueError, match=re_escape(str(shape))):
        model_of(tiny())(torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("value", [-1, 101, 10_000])
def test_out_of_range_id_names_value_position_and_vocab(value):
    ids = torch.zeros(2, 5, dtype=torch.long)
    ids[1, 3] = value
    with pytest.raises(ValueError, match=rf"token id {value} at position \(batch 1, time 3\).*101"):
        model_of(tiny())(ids)


def test_too_long_and_empty_sequences_are_value_errors():
    model = model_of(tiny())  # context length 16
    with pytest.raises(ValueError, match="T=17.*16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    for shape in [(1, 0), (0, 4)]:
        with pytest.raises(ValueError, match=re_escape(str(shape))):
            model(torch.zeros(shape, dtype=torch.long))


def test_a_bf16_cache_for_a_float64_model_under_autocast_is_refused_by_name():
    """Under autocast the cache may be in the autocast dtype (attention casts what it reads), but
    autocast leaves float64 alone: a float64 model's keys stay float64, and a bf16 cache once got
    past the check to a raw dtype error inside attention."""
    from torch_impl.kv_cache import KVCache

    model = model_of(tiny())  # float64
    cfg = model.config
    cache = KVCache(cfg.n_layers, 2, cfg.n_heads, cfg.context_length, cfg.head_size, dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), \
            pytest.raises(ValueError, match=r"the KV cache is torch.bfloat16 on cpu; this model's keys are torch.float64"):
        model(ids_of(model.config, 2, 3, 0), kv_cache=cache)
    assert cache.length == 0, f"a refused call moved the cache to length {cache.length}"


def test_kv_cache_overflow_and_batch_mismatch_are_value_errors():
    model = model_of(tiny())
    cache = model.new_kv_cache(2)
    with torch.no_grad():
        model(ids_of(model.config, 2, 10, 0), kv_cache=cache)
        with pytest.raises(ValueError, match="T=7 after 10 cached positions exceeds the context length 16"):
            model(ids_of(model.config, 2, 7, 1), kv_cache=cache)
        assert cache.length == 10, f"a rejected chunk must not advance the cache (length {cache.length})"
        with pytest.raises(ValueError, match="batch size 3 differs from the KV cache's 2"):
            model(ids_of(model.config, 3, 1, 1), kv_cache=cache)


@pytest.mark.parametrize("rows", [7, None], ids=["sliced head", "whole head"])
def test_bad_targets_and_all_ignored_targets_are_value_errors(rows):
    from parity_tests.models import head_slices

    with head_slices(rows or 10**9):
        _bad_targets_raise()


def _bad_targets_raise():
    model = model_of(tiny())
    ids = ids_of(model.config, 2, 4, 0)
    bad = ids.clone()
    bad[0, 2] = 101
    with pytest.raises(ValueError, match=r"target 101 at position \(0, 2\).*101"):
        model(ids, bad)
    with pytest.raises(ValueError, match="every target equals ignore_index=-100"):
        model(ids, torch.full_like(ids, -100), ignore_index=-100)
    with pytest.raises(TypeError, match="float"):
        model(ids, ids.double())


def test_bad_targets_raise_before_any_compute_and_leave_the_kv_cache_untouched():
    """model.forward checks ids and targets before the embedding: a bad target costs no forward,
    and the blocks never write its keys and values into the cache (they once did, before the
    loss's check raised; only the length was kept)."""
    import torch_impl.model as model_module

    model = model_of(tiny())
    ids = ids_of(model.config, 2, 4, 0)
    bad = ids.clone()
    bad[1, 3] = -5
    cache = model.new_kv_cache(2)
    cache.k.zero_(), cache.v.zero_()  # the buffers are torch.empty: a NaN left there would differ from itself
    with torch.no_grad():
        model(ids[:, :3], kv_cache=cache)
    before = (cache.k.clone(), cache.v.clone(), cache.length)
    calls = mock.patch.object(model_module, "block_forward", wraps=model_module.block_forward)
    with torch.no_grad(), calls as blocks, pytest.raises(ValueError, match=r"target -5 at position \(1, 3\)"):
        model(ids, bad, kv_cache=cache)
    assert blocks.call_count == 0, f"a bad target raised only after {blocks.call_count} blocks ran"
    assert cache.length == before[2], f"the cache's length moved from {before[2]} to {cache.length}"
    for name, now, then in (("keys", cache.k, before[0]), ("values", cache.v, before[1])):
        changed = int((now != then).sum())
        assert changed == 0, f"a call with bad targets wrote {changed} cached {name}"


@pytest.mark.parametrize("bad", [dict(emb_dim=30, n_heads=4), dict(vocab_size=0), dict(drop_rate=1.0),
                                 dict(drop_rate=-0.1), dict(n_layers=0), dict(context_length=-2)])
def test_config_rejects_bad_values_naming_them(bad):
    (key, value), = [(k, v) for k, v in bad.items() if k != "n_heads"]
    with pytest.raises(ValueError, match=re_escape(f"{key}={value}") + "|" + re_escape(str(value))):
        tiny(**bad)


def test_config_round_trips_and_rejects_unknown_keys():
    for name in ["tiny", "gpt2-small", "124M", "gpt2-xl"]:
        cfg = get_config(name)
        assert GPTConfig.from_dict(cfg.to_dict()) == cfg, f"{name} does not round-trip through to_dict/from_dict"
    assert get_config("355M") == get_config("gpt2-medium"), "alias 355M is not gpt2-medium"
    with pytest.raises(ValueError, match="n_embd"):
        GPTConfig.from_dict(dict(tiny().to_dict(), n_embd=32))
    with pytest.raises(ValueError, match="gpt3"):
        get_config("gpt3")


# ---- the KV cache --------------------------------------------------------------------------------


@st.composite
def cache_case(draw):
    cfg = draw(small_configs())
    T = draw(st.integers(1, cfg.context_length))
    # A partition of T into chunks: the first is the (possibly chunked) prefill, later ones
    # decode one or more tokens at a time.
    cuts = sorted(draw(st.sets(st.integers(1, T - 1), max_size=T - 1))) if T > 1 else []
    chunks = [b - a for a, b in zip([0] + cuts, cuts + [T])]
    return cfg, draw(seeds()), draw(st.integers(1, 3)), chunks


@given(case=cache_case())
def test_kv_cached_logits_equal_full_recomputation_at_every_step(case):
    cfg, seed, B, chunks = case
    model = model_of(cfg, seed % 1000)
    T = sum(chunks)
    ids = ids_of(cfg, B, T, seed)
    with torch.no_grad():
        full = model(ids)  # (B, T, V), no cache
        cache = model.new_kv_cache(B)
        # The buffers start uninitialised: positions not yet written must never be read.
        cache.k.fill_(float("nan"))
        cache.v.fill_(float("nan"))
        start = 0
        for n in chunks:
            got = model(ids[:, start:start + n], kv_cache=cache)
            assert cache.length == start + n, f"cache length {cache.length} after positions 0..{start + n - 1}"
            assert_close(f"cached logits for positions {start}..{start + n - 1} (chunks {chunks})", got,
                         full[:, start:start + n], forward_tol("float64"))
            last = model(ids[:, :start + n], last_only=True)
            assert_close("last_only logits", last, full[:, start + n - 1:start + n], forward_tol("float64"))
            start += n


@pytest.mark.parametrize("frozen", [(), ("wte.weight",), ("wte.weight", "wpe.weight")],
                         ids=["all trainable", "wte frozen", "embeddings frozen"])
def test_backward_through_a_cached_forward_is_the_named_value_error(frozen):
    """A forward with a KV cache is inference (kv_cache.inference_only): a backward through its
    logits or loss raises the ValueError that names the cache, as numpy_ref's gpt_backward does,
    also when the embeddings are frozen (it once gave torch's "does not require grad" there)."""
    model = model_of(tiny())
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    ids = ids_of(model.config, 2, 5, 0)
    logits = model(ids, kv_cache=model.new_kv_cache(2))
    with pytest.raises(ValueError, match="backward through a forward that used a KV cache"):
        logits.sum().backward()
    _, loss = model(ids, ids, kv_cache=model.new_kv_cache(2))
    with pytest.raises(ValueError, match="backward through a forward that used a KV cache"):
        loss.backward()
    assert all(p.grad is None for p in model.parameters()), "a refused backward wrote a gradient"


def test_logits_of_a_cached_forward_with_gradients_on_can_be_masked_in_place():
    """With gradients on, a cached forward's outputs come through kv_cache.inference_only; they
    were views made inside a custom Function, which torch refuses to change in place, so masking
    a logit (as a sampler does) raised a RuntimeError about views."""
    model = model_of(tiny())
    ids = ids_of(model.config, 2, 5, 0)
    logits = model(ids, kv_cache=model.new_kv_cache(2))
    with torch.no_grad():
        want = model(ids)
    logits[..., 0] = float("-inf")
    want[..., 0] = float("-inf")
    assert torch.equal(logits.detach(), want), "masked logits of the cached forward differ from the plain forward's"


def test_kv_cache_reset_and_crop_reuse_the_buffers():
    model = model_of(tiny())
    ids = ids_of(model.config, 1, 8, 3)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(1)
        model(ids, kv_cache=cache)
        cache.crop(5)  # roll back three positions, then recompute them
        assert_close("logits after crop(5)", model(ids[:, 5:], kv_cache=cache), full[:, 5:], forward_tol("float64"))
        cache.reset()
        assert_close("logits after reset", model(ids[:, :3], kv_cache=cache), full[:, :3], forward_tol("float64"))
    assert cache.k.shape == (2, 1, 4, 16, 8), f"cache is (L, B, nh, Tc, hs); got {tuple(cache.k.shape)}"


@given(T=st.integers(1, 6), P=st.integers(0, 6), nh=st.integers(1, 3), hs=st.integers(1, 5), seed=seeds())
def test_sdpa_mask_is_bottom_right_aligned_when_queries_are_fewer_than_keys(T, P, nh, hs, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, nh, n, hs, generator=gen, dtype=torch.float64) for n in (T, P + T, P + T))
    # The definition, written out: query t sees keys 0 .. P + t.
    scores = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(hs)
    allowed = torch.arange(P + T)[None, :] <= (P + torch.arange(T))[:, None]  # (T, P + T)
    expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v
    assert torch.equal(~causal_mask(T, P + T), allowed), f"causal_mask({T}, {P + T}) differs from s > P + t"
    assert_close(f"sdpa_attention T={T} P={P}", sdpa_attention(q, k, v), expected, forward_tol("float64"))
    assert_close(f"explicit_attention T={T} P={P}", explicit_attention(q, k, v), expected, forward_tol("float64"))
    if P > 0 and T > 1:
        # The mask is_causal=True would build (top-left aligned) hides keys this query may see.
        top_left = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert not torch.allclose(top_left, expected), "top-left alignment should differ here; the test lost its teeth"


# ---- dtypes, autocast, compile -------------------------------------------------------------------


@settings(max_examples=6)
@given(cfg=small_configs(), seed=seeds())
def test_float32_model_agrees_with_float64_model(cfg, seed):
    m64 = model_of(cfg, seed % 1000, dtype=torch.float64)
    m32 = GPTModel(cfg, dtype=torch.float32).eval()
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    ids = ids_of(cfg, 2, cfg.context_length, seed)
    logits64, loss64 = m64(ids, ids)
    logits32, loss32 = m32(ids, ids)
    assert logits64.dtype == torch.float64 and logits32.dtype == torch.float32, (logits64.dtype, logits32.dtype)
    assert_close("float32 logits vs float64", logits32, logits64, forward_tol("float32"))
    loss64.backward()
    loss32.backward()
    assert_dicts_close("float32 grads vs float64", {k: p.grad for k, p in m32.named_parameters()},
                       {k: p.grad for k, p in m64.named_parameters()}, gradient_tol("float32"))


def test_bf16_autocast_runs_and_stays_within_budget():
    cfg = tiny()
    model = model_of(cfg, dtype=torch.float32)
    ids = ids_of(cfg, 2, 9, 0)
    ref_logits, ref_loss = model(ids, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(ids, ids)
    assert logits.dtype == torch.bfloat16, f"autocast logits are {logits.dtype}"
    assert loss.dtype == torch.float32, f"the loss is computed in float32 under autocast, got {loss.dtype}"
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters()), "every float32 parameter gets a finite float32 gradient"
    assert_close("bf16 logits vs float32", logits, ref_logits.detach(), forward_tol("bfloat16"))
    assert_close("bf16 loss vs float32", loss.detach(), ref_loss.detach(), forward_tol("bfloat16"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.new_kv_cache(2, dtype=torch.bfloat16)
        cached = torch.cat([model(ids[:, :4], kv_cache=cache), model(ids[:, 4:], kv_cache=cache)], 1)
    assert_close("bf16 cached logits vs float32", cached, ref_logits.detach(), forward_tol("bfloat16"))


def test_compile_traces_the_model_without_changing_it():
    # aot_eager: dynamo's graph capture and AOT autograd's forward/backward split, without
    # inductor's C++ build (see the next test for that).
    cfg = tiny()
    model = model_of(cfg, dtype=torch.float32)
    ids = ids_of(cfg, 2, 7, 0)
    compiled = torch.compile(model, backend="aot_eager")
    logits, loss = compiled(ids, ids)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    ref_logits, ref_loss = model(ids, ids)
    ref_loss.backward()
    assert_close("compiled logits", logits, ref_logits, forward_tol("float32"))
    assert_dicts_close("compiled grads", grads, {k: p.grad for k, p in model.named_parameters()},
                       gradient_tol("float32"))
    with pytest.raises(ValueError, match="token id 999"):
        compiled(torch.full((1, 2), 999))  # the id check still runs (eagerly) around the compiled graph


@pytest.mark.parametrize("training,autocast,tied", [(False, False, True), (True, False, True),
                                                    (True, True, False), (False, True, False)])
def test_compile_captures_every_block_in_one_graph(training, autocast, tied):
    # Only the input checks (check_ids, check_targets: data-dependent raises, compiler.disable) may
    # break the graph. A break inside the loop over blocks makes dynamo skip the whole forward
    # (eager, then each callee compiled alone), and one inside every linear layer cuts the model
    # into dozens of graphs: both happened (an operator.attrgetter, a ContextVar read).
    import torch._dynamo as dynamo

    cfg = tiny(n_layers=3, drop_rate=0.1, tie_embeddings=tied)
    model = GPTModel(cfg, seed=0).train(training)
    ids = ids_of(cfg, 2, 7, 0)
    allowed = ("check_ids", "check_targets")
    names = ("matmul", "addmm", "mm", "linear", "baddbmm", "bmm")
    # Per block: c_attn, c_proj, c_fc, mlp c_proj; plus the head, in the same graph with or without
    # targets: model.forward checks the targets up front, so the loss's check no longer breaks the
    # graph between the blocks and the head (it once did).
    expected = 4 * cfg.n_layers + 1
    for targets in (None, ids):
        dynamo.reset()
        with torch.set_grad_enabled(training), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            report = dynamo.explain(model)(ids, targets)
        dynamo.reset()
        stray = sorted({" ".join(r.reason.split())[:200] for r in report.break_reasons
                        if not any(a in r.reason for a in allowed)})
        assert not stray, f"graph breaks other than the input checks (targets: {targets is not None}): {stray}"
        products = [sum(1 for n in g.graph.nodes if n.op == "call_function"
                        and getattr(n.target, "__name__", "") in names) for g in report.graphs]
        assert max(products) >= expected, (f"no single graph holds the {expected} products of every block "
                                           f"and the head (targets: {targets is not None}); "
                                           f"products per graph: {products}")


INDUCTOR_SCRIPT = textwrap.dedent("""
    import torch
    from torch_impl.config import get_config
    from torch_impl.model import GPTModel
    model = GPTModel(get_config("tiny", n_layers=1), seed=0).eval()
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = torch.compile(model)(ids)
        print(float((logits - model(ids)).abs().max()))
""")


def test_inductor_compile_on_cpu_if_fast_enough():
    # The real compiler (inductor: generated C++ kernels), forward only, in a subprocess so a slow
    # build can be cut off: on a busy 2-core machine the build alone can take most of a minute.
    try:
        run = subprocess.run([sys.executable, "-c", INDUCTOR_SCRIPT], capture_output=True, text=True, timeout=45)
    except subprocess.TimeoutExpired:
        pytest.skip("torch.compile (inductor) took more than 45 s to build on this CPU")
    assert run.returncode == 0, f"torch.compile failed:\n{run.stderr[-3000:]}"
    max_abs = float(run.stdout.strip().splitlines()[-1])
    assert max_abs <= forward_tol("float32").atol, f"inductor-compiled logits differ from eager by {max_abs}"


# ---- dropout with explicit masks ---------------------------------------------------------------


def _masks(cfg: GPTConfig, B: int, T: int, seed: int, p: float) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return (torch.rand(shape, generator=gen) >= p).double() / (1.0 - p)

    C, nh = cfg.emb_dim, cfg.n_heads
    masks = {"embedding": draw(B, T, C)}
    for i in range(cfg.n_layers):
        masks[f"h.{i}.attn.weights"] = draw(B, nh, T, T)
        masks[f"h.{i}.attn.out"] = draw(B, T, C)
        masks[f"h.{i}.mlp.out"] = draw(B, T, C)
    return masks


def _by_hand(model: GPTModel, ids: torch.Tensor, masks: dict) -> torch.Tensor:
    """The model with dropout, written out from docs/design.md with plain tensor algebra."""
    cfg, sd = model.config, model.state_dict()
    B, T = ids.shape
    C, nh, hs = cfg.emb_dim, cfg.n_heads, cfg.head_size

    def ln(x, name):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + cfg.ln_eps) * sd[f"{name}.weight"] + sd[f"{name}.bias"]

    def lin(x, name):
        b = sd.get(f"{name}.bias")
        return x @ sd[f"{name}.weight"] + (0.0 if b is None else b)

    x = (sd["wte.weight"][ids] + sd["wpe.weight"][:T]) * masks["embedding"]
    for i in range(cfg.n_layers):
        h = f"h.{i}"
        qkv = lin(ln(x, f"{h}.ln_1"), f"{h}.attn.c_attn")
        heads = [qkv[..., part * C:(part + 1) * C].reshape(B, T, nh, hs).transpose(1, 2) for part in range(3)]
        q, k, v = heads
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hs)
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        att = torch.softmax(scores, -1) * masks[f"{h}.attn.weights"]
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + lin(y, f"{h}.attn.c_proj") * masks[f"{h}.attn.out"]
        m = lin(ln(x, f"{h}.ln_2"), f"{h}.mlp.c_fc")
        m = 0.5 * m * (1 + torch.tanh(math.sqrt(2 / math.pi) * (m + 0.044715 * m ** 3)))
        x = x + lin(m, f"{h}.mlp.c_proj") * masks[f"{h}.mlp.out"]
    head = sd["wte.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]
    return ln(x, "ln_f") @ head.T


@settings(max_examples=8)
@given(cfg=small_configs(dropout=True), seed=seeds(), data=st.data())
def test_explicit_dropout_masks_match_the_model_written_by_hand(cfg, seed, data):
    p = cfg.drop_rate if cfg.drop_rate > 0 else 0.5
    model = model_of(cfg, seed % 1000).train()
    T = data.draw(st.integers(1, cfg.context_length), label="T")
    B = data.draw(st.integers(1, 2), label="B")
    ids = ids_of(cfg, B, T, seed)
    masks = _masks(cfg, B, T, seed, p)
    got = model(ids, dropout_masks=masks)
    again = model(ids, dropout_masks=masks)
    assert torch.equal(got, again), "explicit masks must make training-mode dropout deterministic"
    with torch.no_grad():
        expected = _by_hand(model, ids, masks)
    assert_close(f"logits with dropout masks (p={p})", got, expected, forward_tol("float64"))


def test_dropout_without_masks_is_random_in_training_and_off_in_eval():
    cfg = tiny(drop_rate=0.5)
    model = model_of(cfg)
    ids = ids_of(cfg, 2, 8, 0)
    evaluated = model.eval()(ids)
    ones = {k: torch.ones_like(v) for k, v in _masks(cfg, 2, 8, 0, 0.5).items()}
    assert_close("all-ones masks in training == eval", model.train()(ids, dropout_masks=ones), evaluated,
                 forward_tol("float64"))
    a, b = model.train()(ids), model(ids)
    assert not torch.allclose(a, b), "training-mode dropout without masks should draw different masks each call"
    assert not torch.allclose(a, evaluated), "training-mode dropout without masks changed nothing"


def test_dropout_mask_keys_and_shapes_are_checked():
    cfg = tiny(drop_rate=0.1)
    model = model_of(cfg).train()
    ids = ids_of(cfg, 2, 5, 0)
    with pytest.raises(ValueError, match="unknown dropout mask 'h.7.mlp.out'"):
        model(ids, dropout_masks={"h.7.mlp.out": torch.ones(2, 5, 32)})
    with pytest.raises(ValueError, match=r"'h.0.attn.weights' has shape \(2, 4, 5, 4\); expected \(2, 4, 5, 5\)"):
        model(ids, dropout_masks={"h.0.attn.weights": torch.ones(2, 4, 5, 4)})


# ---- parameters ----------------------------------------------------------------------------------


def design_table(cfg: GPTConfig) -> list[tuple[str, tuple]]:
    """docs/design.md's parameter table, in its order, written out independently of the model."""
    V, Tc, C = cfg.vocab_size, cfg.context_length, cfg.emb_dim
    rows = [("wte.weight", (V, C)), ("wpe.weight", (Tc, C))]
    for i in range(cfg.n_layers):
        h = f"h.{i}"
        rows += [(f"{h}.ln_1.weight", (C,)), (f"{h}.ln_1.bias", (C,)), (f"{h}.attn.c_attn.weight", (C, 3 * C))]
        rows += [(f"{h}.attn.c_attn.bias", (3 * C,))] if cfg.qkv_bias else []
        rows += [(f"{h}.attn.c_proj.weight", (C, C)), (f"{h}.attn.c_proj.bias", (C,)),
                 (f"{h}.ln_2.weight", (C,)), (f"{h}.ln_2.bias", (C,)),
                 (f"{h}.mlp.c_fc.weight", (C, 4 * C)), (f"{h}.mlp.c_fc.bias", (4 * C,)),
                 (f"{h}.mlp.c_proj.weight", (4 * C, C)), (f"{h}.mlp.c_proj.bias", (C,))]
    rows += [("ln_f.weight", (C,)), ("ln_f.bias", (C,))]
    rows += [] if cfg.tie_embeddings else [("lm_head.weight", (V, C))]
    return rows


@pytest.mark.parametrize("tie,qkv", [(False, True), (True, False), (True, True), (False, False)])
def test_state_dict_is_exactly_the_design_table_in_order(tie, qkv):
    cfg = get_config("tiny", n_layers=3, tie_embeddings=tie, qkv_bias=qkv)
    model = GPTModel(cfg)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    expected = design_table(cfg)
    assert got == expected, "state_dict differs from docs/design.md:\n" + "\n".join(
        f"{a} | {b}" for a, b in zip(got, expected) if a != b) + f"\n(lengths {len(got)} vs {len(expected)})"
    assert list(model.buffers()) == [], "the model must hold no buffers (no masks in the state_dict)"
    init = model.state_dict()
    assert all(torch.equal(init[k], torch.ones_like(init[k])) for k in init if ".ln_" in k or k.startswith("ln_f")
               if k.endswith("weight")), "layer-norm weights start at one"
    assert 0.015 < float(init["h.0.mlp.c_fc.weight"].std()) < 0.025, "weights are drawn from normal(0, 0.02)"


def test_same_seed_same_weights_different_seed_different_weights():
    a, b, c = GPTModel(tiny(), seed=3), GPTModel(tiny(), seed=3), GPTModel(tiny(), seed=4)
    assert_dicts_close("seed 3 twice", a.state_dict(), b.state_dict(), forward_tol("float64"))
    assert not torch.equal(a.wte.weight, c.wte.weight), "seeds 3 and 4 gave the same wte"


def test_parameter_counts_match_the_book():
    # "Build a Large Language Model (From Scratch)", chapter 4.6: GPT-2 124M has 163,009,536
    # parameters with a separate output head and 124,412,160 with weight tying.
    small = get_config("gpt2-small")
    assert GPTModel(small, device="meta").num_parameters() == 163_009_536
    tied = get_config("gpt2-small", tie_embeddings=True)
    assert GPTModel(tied, device="meta").num_parameters() == 124_412_160


def test_tied_head_shares_storage_and_sums_both_gradients():
    cfg_tied = tiny(tie_embeddings=True)
    tied = model_of(cfg_tied)
    assert "lm_head.weight" not in tied.state_dict()
    assert tied.head_weight is tied.wte.weight, "the tied head must be wte.weight itself, not a copy"
    assert tied.head_weight.data_ptr() == tied.wte.weight.data_ptr()
    # The same model with a separate head holding a copy of wte: the tied gradient of wte is the
    # sum of the untied model's wte and lm_head gradients.
    untied = GPTModel(tiny(tie_embeddings=False), dtype=torch.float64).eval()
    state = dict(tied.state_dict(), **{"lm_head.weight": tied.wte.weight.detach().clone()})
    untied.load_state_dict(state)
    ids = ids_of(cfg_tied, 2, 6, 0)
    _, loss_t = tied(ids, ids)
    _, loss_u = untied(ids, ids)
    loss_t.backward()
    loss_u.backward()
    assert_close("tied wte grad", tied.wte.weight.grad, untied.wte.weight.grad + untied.lm_head.weight.grad,
                 gradient_tol("float64"))
    with torch.no_grad():
        tied.wte.weight[3, 0] += 1.0  # an in-place change to wte is a change to the head
    assert tied.head_weight[3, 0] == tied.wte.weight[3, 0]


@pytest.mark.parametrize("rows", [7, None], ids=["sliced head", "whole head"])
def test_loss_is_the_mean_over_counted_targets(rows):
    from parity_tests.models import head_slices

    cfg = tiny()
    model = model_of(cfg)
    ids = ids_of(cfg, 2, 6, 5)
    targets = ids_of(cfg, 2, 6, 6)
    targets[0, :3] = -1
    with head_slices(rows or 10**9):
        logits, loss = model(ids, targets, ignore_index=-1)
    logp = torch.log_softmax(logits, -1)
    counted = [(b, t) for b in range(2) for t in range(6) if targets[b, t] != -1]
    expected = -sum(logp[b, t, targets[b, t]] for b, t in counted) / len(counted)
    assert_close("loss with ignore_index", loss, expected, forward_tol("float64"))


# ---- the runtime plan ----------------------------------------------------------------------------


def test_runtime_plan_names_what_it_chose():
    plan = plan_runtime("cpu", precision="fp32")  # "auto" picks bf16 on CPUs with bf16 units (next test)
    text = plan.describe()
    assert plan.device.type == "cpu" and not plan.compile and plan.tf32 is False, text
    # torch's CPU flash kernel takes no dropout: training with attention dropout runs the math kernel,
    # which the plan said nothing of (it named flash for every run)
    for word in ("device cpu", "params float32", "eager", "AdamW fused", "attention SDPA", "vocabulary slices",
                 "kept memory", "decode.py", "math kernel when training with dropout > 0"):
        assert word in text, f"{word!r} missing from {text!r}"
    fp64 = plan_runtime("cpu", precision="fp64")
    assert fp64.param_dtype == torch.float64 and "params float64" in fp64.describe()
    bf16 = plan_runtime("cpu", precision="bf16")
    assert bf16.autocast_dtype == torch.bfloat16 and "autocast bfloat16" in bf16.describe()
    with pytest.raises(ValueError, match="fp8"):
        plan_runtime("cpu", precision="fp8")
    model = bf16.prepare(GPTModel(tiny()))
    with bf16.autocast():
        assert model(ids_of(tiny(), 1, 3, 0)).dtype == torch.bfloat16
    opt = plan.make_adamw(model.parameters(), lr=1e-3)
    assert opt.defaults.get("fused") is True, f"AdamW is not fused on the CPU: {opt.defaults}"


@pytest.mark.parametrize("units", [(), ("_is_amx_tile_supported",), ("_is_avx512_bf16_supported",)],
                         ids=["AVX2 only", "AMX", "AVX-512 BF16"])
def test_cpus_with_bf16_units_are_recognised_and_get_bf16_autocast(units):
    """device.cpu_has_fast_bf16 asks torch.cpu's feature tests. It once looked for "AMX" or "BF16" in
    torch.backends.cpu.get_cpu_capability(), which only ever names the vector width ("AVX2",
    "AVX512"), so no CPU had bf16 units: "auto" stayed in float32 and CPU bf16 autocast took the
    layout workaround meant for AVX2-only CPUs (linear.slow_bf16_layouts)."""
    from torch_impl.device import cpu_has_fast_bf16
    from torch_impl.linear import slow_bf16_layouts

    features = {name: (lambda present=name in units: present)
                for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")}
    with mock.patch.multiple(torch.cpu, **features), \
            mock.patch.object(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512"):
        assert cpu_has_fast_bf16() == bool(units), f"{units or 'no bf16 units'}: cpu_has_fast_bf16() is wrong"
        plan = plan_runtime("cpu")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            workaround = slow_bf16_layouts(torch.zeros(2, 2))
    expected = torch.bfloat16 if units else None
    assert plan.autocast_dtype == expected, f"{units}: auto plan autocast {plan.autocast_dtype}, expected {expected}"
    assert workaround == (not units), f"{units}: bf16 layout workaround {'on' if workaround else 'off'}"


# ---- CUDA (skipped without a GPU; see conftest.py) ------------------------------------------------


@pytest.mark.cuda
@settings(max_examples=4)
@given(case=cache_case())
def test_cuda_matches_cpu_with_and_without_cache(case):
    cfg, seed, B, chunks = case
    cpu = model_of(cfg, seed % 1000, dtype=torch.float32)
    gpu = GPTModel(cfg, dtype=torch.float32, device="cuda").eval()
    gpu.load_state_dict(cpu.state_dict())
    ids = ids_of(cfg, B, sum(chunks), seed)
    with torch.no_grad():
        ref = cpu(ids)
        assert_close("cuda logits", gpu(ids.cuda()), ref, forward_tol("tf32"))
        cache, start, parts = gpu.new_kv_cache(B), 0, []
        for n in chunks:
            parts.append(gpu(ids[:, start:start + n].cuda(), kv_cache=cache))
            start += n
        assert_close("cuda cached logits", torch.cat(parts, 1), ref, forward_tol("tf32"))


@pytest.mark.cuda
def test_cuda_bf16_training_step_and_plan():
    plan = plan_runtime("cuda")
    cfg = tiny()
    model = GPTModel(cfg, device="cuda")
    ref_logits, _ = GPTModel(cfg)(ids_of(cfg, 2, 9, 0), ids_of(cfg, 2, 9, 1))
    ids, targets = ids_of(cfg, 2, 9, 0).cuda(), ids_of(cfg, 2, 9, 1).cuda()
    opt = plan.make_adamw(model.parameters(), lr=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, loss = model(ids, targets)
    assert_close("cuda bf16 logits vs cpu float32", logits, ref_logits.detach(), forward_tol("bfloat16"))
    loss.backward()
    opt.step()
    assert "device cuda" in plan.describe() and plan.compile, plan.describe()


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_embedding_gradient_is_reproducible_with_repeated_ids_on_several_threads():
    """The same backward twice gives the same bits (issue 7: a run is deterministic for its seed).
    Indexing `wte[ids]` fails this on the CPU: its scatter-add order depends on the threads."""
    from torch_impl.embedding import embedding_forward

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        wte = torch.randn(5000, 64, generator=g).requires_grad_()
        wpe = torch.randn(64, 64, generator=g)
        ids = torch.randint(0, 50, (8, 64), generator=g)  # every id repeats ~10 times
        upstream = torch.randn(8, 64, 64, generator=g)
        grads = []
        for _ in range(20):
            wte.grad = None
            (embedding_forward(ids, wte, wpe) * upstream).sum().backward()
            grads.append(wte.grad.clone())
    finally:
        torch.set_num_threads(before)
    for i, gr in enumerate(grads[1:], start=1):
        bad = (gr != grads[0]).nonzero()
        assert bad.numel() == 0, f"backward {i} differs from backward 0 at {bad[0].tolist()} ({bad.shape[0]} elements)"


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_torch_func_grad_runs_on_the_cpu_training_path_and_agrees_with_backward(tie):
    """torch.func transforms cannot run torch_impl's own autograd Functions (sliced head, kept
    gradient memory); under one the model must take plain torch ops and give the same gradients."""
    from torch.func import functional_call, grad

    from parity_tests.models import head_slices

    cfg = tiny(tie_embeddings=tie)
    model = model_of(cfg).train()
    ids, targets = ids_of(cfg, 2, 6, 7), ids_of(cfg, 2, 6, 8)
    params = {n: p.detach() for n, p in model.named_parameters()}
    with head_slices(7):
        got = grad(lambda p: functional_call(model, p, (ids, targets))[1])(params)
        _, loss = model(ids, targets)
        loss.backward()
    for name, p in model.named_parameters():
        assert_close(f"{name}: torch.func.grad vs backward", got[name], p.grad, gradient_tol("float64"))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_per_sample_gradients_with_vmap_equal_one_sample_at_a_time(tie):
    """torch.func.vmap(grad(...)) over the batch (per-sample gradients, as in DP-SGD): the id and
    target checks cannot branch on values under vmap, so they check by indexing there
    (device.vmapped_values), and attention takes the explicit path (SDPA has no batching
    rule); the result must equal grad of each sample alone, with no warning."""
    from torch.func import functional_call, grad, vmap

    cfg = tiny(tie_embeddings=tie)
    model = model_of(cfg).train()
    ids, targets = ids_of(cfg, 3, 6, 11), ids_of(cfg, 3, 6, 12)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, x, y):  # one sample: x, y (T,)
        return functional_call(model, p, (x[None], y[None]))[1]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a per-sample fallback for an op without a vmap rule
        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, ids, targets)
    for i in range(3):
        alone = grad(loss)(params, ids[i], targets[i])
        for name in params:
            assert_close(f"sample {i} {name}: vmap(grad) vs grad alone", per_sample[name][i], alone[name],
                         gradient_tol("float64"))
    logits = vmap(lambda x: model(x[None])[0])(ids)  # (3, T, V)
    assert_close("vmap-ed logits vs the batch forward", logits, model(ids), forward_tol("float64"))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside forward AD
@pytest.mark.parametrize("how", ["torch.func.jvp", "forward_ad dual level"])
def test_forward_mode_derivative_of_the_loss_equals_the_gradient_times_the_tangent(how):
    """Forward-mode AD through the whole model on the CPU, a tied head sliced into 7-row parts
    outside forward AD: the directional derivative of the loss equals <gradient, tangent> from the
    ordinary backward. torch's fused attention kernel and torch_impl's own autograd Functions have
    no forward derivative; they once raised NotImplementedError here, so under forward AD
    attention takes its explicit path and the rest plain torch ops."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call, jvp

    from parity_tests.models import head_slices

    cfg = tiny(tie_embeddings=True)
    model = model_of(cfg).train()
    ids, targets = ids_of(cfg, 2, 6, 7), ids_of(cfg, 2, 6, 8)
    gen = torch.Generator().manual_seed(1)
    tangents = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()}
    with head_slices(7):
        _, loss = model(ids, targets)
        loss.backward()
        expected = sum((p.grad * tangents[n]).sum() for n, p in model.named_parameters())
        if how == "torch.func.jvp":
            params = {n: p.detach() for n, p in model.named_parameters()}
            _, got = jvp(lambda p: functional_call(model, p, (ids, targets))[1], (params,), (tangents,))
        else:
            with fwAD.dual_level():
                duals = {n: fwAD.make_dual(p.detach(), tangents[n]) for n, p in model.named_parameters()}
                got = fwAD.unpack_dual(functional_call(model, duals, (ids, targets))[1]).tangent
    assert_close(f"{how}: directional derivative of the loss", got, expected, gradient_tol("float64"))


def test_bad_ids_and_targets_under_vmap_raise_naming_the_value_and_the_limit():
    from torch.func import grad, vmap

    cfg = tiny()
    V = cfg.vocab_size
    model = model_of(cfg)
    good = ids_of(cfg, 2, 4, 0)
    edges = good.clone()
    edges[0, 0], edges[1, 3] = 0, V - 1  # the first and last valid ids pass
    vmap(lambda x: model(x[None]))(edges)
    vmap(lambda x, y: model(x[None], y[None])[1])(good, edges)
    for bad in (V, -1):
        ids = good.clone()
        ids[1, 2] = bad
        with pytest.raises(ValueError, match=rf"token id {bad} is outside \[0, {V}\) \(vocab_size={V}; under "
                                             rf"torch.func.vmap, at index \(1, 0, 2\)"):  # x[None]: (2, 1, 4)
            vmap(lambda x: model(x[None]))(ids)
    for bad in (V, -1, -100):  # -100: F.cross_entropy's default ignore_index, must not be skipped silently
        targets = good.clone()
        targets[0, 3] = bad
        with pytest.raises(ValueError, match=rf"target {bad} is outside \[0, {V}\) \(vocab_size={V}; under "
                                             rf"torch.func.vmap, at index \(0, 0, 3\)"):
            vmap(lambda x, y: model(x[None], y[None])[1])(good, targets)
    with pytest.raises(ValueError, match="ignore_index=0 is not supported with targets batched by torch.func.vmap"):
        vmap(lambda x: model(x[None], x[None], ignore_index=0)[1])(good)
    # grad alone batches nothing: the ordinary checks run, with the position in (B, T).
    params = {n: p.detach() for n, p in model.named_parameters()}
    ids = good.clone()
    ids[1, 2] = V
    with pytest.raises(ValueError, match=rf"token id {V} at position \(batch 1, time 2\) is outside \[0, {V}\)"):
        grad(lambda p: torch.func.functional_call(model, p, (ids, good))[1])(params)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside jacfwd
def test_ignore_index_works_under_transforms_that_do_not_batch_the_targets():
    """jacfwd / hessian use vmap inside, and an ensemble vmaps over parameters: the targets are not
    batched there, so ignore_index works and the ordinary checks run, as under plain grad."""
    from torch.func import functional_call, grad, jacfwd

    cfg = tiny()
    model = model_of(cfg)
    ids = ids_of(cfg, 2, 4, 3)
    targets = ids_of(cfg, 2, 4, 4)
    targets[0, :2] = -100
    bias = model.ln_f.bias.detach()

    def loss(b):
        return functional_call(model, {"ln_f.bias": b}, (ids, targets), {"ignore_index": -100})[1]

    assert_close("jacfwd vs grad of the loss with ignore_index", jacfwd(loss)(bias), grad(loss)(bias),
                 gradient_tol("float64"))
    bad = targets.clone()
    bad[1, 1] = cfg.vocab_size
    with pytest.raises(ValueError, match=rf"target {cfg.vocab_size} at position \(1, 1\) is outside"):
        jacfwd(lambda b: functional_call(model, {"ln_f.bias": b}, (ids, bad), {"ignore_index": -100})[1])(bias)


def _wte_grads_sliced_and_whole(run) -> tuple[torch.Tensor, torch.Tensor]:
    """`run(model, ids)` -> wte's gradient, on a tied float64 model, with the head in slices of
    7 vocabulary rows (V = 101: the sliced path, gradient handed to the embedding) and whole."""
    from parity_tests.models import head_slices

    cfg = tiny(tie_embeddings=True)
    ids = torch.randint(0, 12, (3, 16), generator=torch.Generator().manual_seed(4))  # ids repeat
    got = {}
    for rows in (7, cfg.vocab_size):
        model = model_of(cfg, seed=3)
        with head_slices(rows):
            got[rows] = run(model, ids)
    return got[7], got[cfg.vocab_size]


def test_tied_sliced_head_gradient_matches_the_whole_head_in_every_autograd_use():
    """The sliced CPU head leaves a tied head's gradient for the embedding's backward to add to
    (embedding.TiedHeadGrad). wte's gradient must still be the sum of both uses however autograd
    is driven: .backward(), torch.autograd.grad, and a second .backward() over a retained graph
    (which must accumulate, not replace)."""
    def backward(model, ids):
        model(ids, ids)[1].backward()
        return model.wte.weight.grad

    def autograd_grad(model, ids):
        return torch.autograd.grad(model(ids, ids)[1], model.wte.weight)[0]

    def twice(model, ids):
        loss = model(ids, ids)[1]
        loss.backward(retain_graph=True)
        loss.backward()
        return model.wte.weight.grad

    for name, run in (("backward", backward), ("autograd.grad", autograd_grad), ("backward twice", twice)):
        sliced, whole = _wte_grads_sliced_and_whole(run)
        assert_close(f"tied wte grad, sliced vs whole head, {name}", sliced, whole, gradient_tol("float64"))


def test_tied_sliced_head_gradient_is_reproducible_on_several_threads():
    """The in-place scatter of the embedding's rows into the head's gradient gives the same bits
    every time, with repeated ids and two threads (issue 7: a run is deterministic for its seed)."""
    from parity_tests.models import head_slices

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = tiny(tie_embeddings=True)
        model = model_of(cfg, seed=1)
        ids = torch.randint(0, 5, (4, 16), generator=torch.Generator().manual_seed(0))  # each id ~13 times
        grads = []
        with head_slices(7):
            for _ in range(10):
                model.zero_grad(set_to_none=True)
                model(ids, ids)[1].backward()
                grads.append(model.wte.weight.grad.clone())
    finally:
        torch.set_num_threads(before)
    for i, gr in enumerate(grads[1:], start=1):
        bad = (gr != grads[0]).nonzero()
        assert bad.numel() == 0, f"backward {i} differs from backward 0 at {bad[0].tolist()} ({bad.shape[0]} elements)"


def test_head_is_sliced_on_the_cpu_for_gpt2_sizes_but_not_under_autocast():
    """Where the sliced head runs: the CPU, V > HEAD_CHUNK, outside autocast (bf16 takes the
    plain product, which autocast casts)."""
    from torch_impl.head import HEAD_CHUNK, head_is_sliced

    wte = torch.empty(50257, 8)
    assert head_is_sliced(wte), "GPT-2's vocabulary on the CPU should take the sliced head"
    assert not head_is_sliced(torch.empty(HEAD_CHUNK, 8)), f"V = HEAD_CHUNK = {HEAD_CHUNK} needs no slices"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not head_is_sliced(wte), "under autocast the head must be the plain (cast) product"


@pytest.mark.parametrize("tie", [True, False])
def test_sliced_head_gradients_with_ignored_targets_and_the_logits_used_too(tie):
    """The fused CPU head + loss against the plain path, where the backward has most to get right:
    ignored targets (weight 0), the logits also used by the caller (their gradient adds to the
    loss's), and logits alone without targets. Every parameter gradient, random upstream."""
    from parity_tests.models import head_slices

    cfg = tiny(tie_embeddings=tie)
    ids = ids_of(cfg, 3, 10, 7)
    targets = ids_of(cfg, 3, 10, 8)
    targets[1, 2:7] = -100
    upstream = torch.randn(3, 10, cfg.vocab_size, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def loss_and_logits(model):
        logits, loss = model(ids, targets, ignore_index=-100)
        return loss + 0.1 * (logits * upstream).sum()

    def logits_only(model):
        return (model(ids) * upstream).sum()

    for name, fn in (("loss + logits", loss_and_logits), ("logits only", logits_only)):
        grads = {}
        for rows in (7, cfg.vocab_size):
            model = model_of(cfg, seed=2)
            with head_slices(rows):
                fn(model).backward()
            grads[rows] = {k: p.grad for k, p in model.named_parameters()}
        assert_dicts_close(f"{name}, tied={tie}: sliced vs whole head", grads[7], grads[cfg.vocab_size],
                           gradient_tol("float64"))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_logits_changed_in_place_before_the_backward_as_through_the_plain_head(tie):
    """Logits without targets, then changed in place by the caller (a token masked, as samplers and
    constrained losses do) before a backward through them: plain x @ head.T allows it (its
    backward does not read its output), so the sliced CPU head must too, with the same gradients.
    It once saved the logits it never reads there and raised autograd's in-place error."""
    from parity_tests.models import head_slices

    cfg = tiny(tie_embeddings=tie)
    ids, targets = ids_of(cfg, 3, 10, 7), ids_of(cfg, 3, 10, 8)
    grads = {}
    for rows in (7, cfg.vocab_size):
        model = model_of(cfg, seed=2)
        with head_slices(rows):
            logits = model(ids)
            logits[..., 5] = -30.0  # token 5 masked in place
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        grads[rows] = {k: p.grad for k, p in model.named_parameters()}
    assert_dicts_close(f"tied={tie}: logits masked in place, sliced vs whole head", grads[7], grads[cfg.vocab_size],
                       gradient_tol("float64"))


@settings(max_examples=25)
@given(rows=st.integers(1, 20), c_in=st.sampled_from([8, 16, 24, 30, 96]), c_out=st.integers(1, 40),
       V=st.integers(1, 60), bias=st.booleans(), seed=seeds())
def test_decoding_products_split_over_cores_equal_the_plain_product(rows, c_in, c_out, V, bias, seed):
    """linear_forward and head_forward without autograd on a few rows (decoding) split the product
    into SPLIT_K batched parts (linear.py). Against the plain product in float64, on both sides of
    SPLIT_MAX_ROWS and with C_in not divisible by SPLIT_K (which must take the plain path). The
    weights here are far under SPLIT_MIN_BYTES, so the threshold is lowered to 0 for the split and
    left as it is for the plain product; torch.bmm is counted to show which ran."""
    import torch_impl.head
    import torch_impl.linear
    from torch_impl.head import head_forward
    from torch_impl.linear import SPLIT_K, SPLIT_MAX_ROWS, SPLIT_MIN_BYTES, linear_forward

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 1, c_in, generator=g, dtype=torch.float64)
    w = torch.randn(c_in, c_out, generator=g, dtype=torch.float64)
    b = torch.randn(c_out, generator=g, dtype=torch.float64) if bias else None
    head = torch.randn(V, c_in, generator=g, dtype=torch.float64)
    want_linear = x @ w + (b if bias else 0.0)
    for threshold in (0, SPLIT_MIN_BYTES):
        with torch.no_grad(), mock.patch.object(torch_impl.linear, "SPLIT_MIN_BYTES", threshold), \
                mock.patch.object(torch_impl.head, "SPLIT_MIN_BYTES", threshold), \
                mock.patch("torch.bmm", wraps=torch.bmm) as bmm:
            got_linear, got_head = linear_forward(x, w, b), head_forward(x, head)
        where = f"rows={rows} c_in={c_in} split threshold {threshold} bytes"
        split = threshold == 0 and rows <= SPLIT_MAX_ROWS  # the head splits any C, linear needs C_in % K == 0
        expected_bmm = int(split and c_in % SPLIT_K == 0) + int(split)
        assert bmm.call_count == expected_bmm, f"{where}: {bmm.call_count} batched products, expected {expected_bmm}"
        assert_close(f"linear {where} c_out={c_out}", got_linear, want_linear, forward_tol("float64"))
        assert_close(f"head {where} V={V}", got_head, x @ head.T, forward_tol("float64"))


@pytest.mark.parametrize("precision", ["fp64", "fp32", "bf16", "fp16"])
def test_the_plan_names_the_attention_kernel_torch_runs_on_the_cpu(precision):
    """device.sdpa_kernel_name once said "SDPA math" for fp16 on the CPU, where torch runs its CPU
    flash kernel: the plan's description names what the profiler sees."""
    import torch.nn.functional as F
    from torch.profiler import profile

    from torch_impl.device import sdpa_kernel_name

    plan = plan_runtime("cpu", precision=precision)
    dtype = plan.autocast_dtype or plan.param_dtype
    q = torch.randn(1, 2, 8, 16, dtype=dtype)
    with profile() as prof:
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    ran = {e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")}
    named = sdpa_kernel_name(plan)
    flash = "aten::_scaled_dot_product_flash_attention_for_cpu" in ran
    assert named.startswith("SDPA CPU flash") == flash, f"{precision}: the plan says {named!r}, torch ran {sorted(ran)}"
    # With dropout, in training, torch runs its math kernel: the plan says so (it named flash alone)
    with profile() as prof:
        F.scaled_dot_product_attention(q.requires_grad_(), q, q, is_causal=True, dropout_p=0.1)
    ran = {e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")}
    assert "aten::_scaled_dot_product_attention_math" in ran and "math kernel when training with dropout" in named, \
        f"{precision} with dropout: the plan says {named!r}, torch ran {sorted(ran)}"


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's, from mkldnn.flags
def test_turning_onednn_off_gives_mkl_products():
    """device.onednn_fp32_products took oneDNN on an AMD CPU with AVX-512 whatever
    torch.backends.mkldnn.enabled said; a user who turns oneDNN off now gets MKL."""
    import torch_impl.device as device

    amd = (mock.patch.object(device, "cpu_vendor", lambda: "AuthenticAMD"),
           mock.patch.object(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512"))
    device._onednn_pays_here.cache_clear()  # asked again under the patches (and after them)
    try:
        with amd[0], amd[1]:
            on = device.onednn_fp32_products()
            with torch.backends.mkldnn.flags(enabled=False):
                off = device.onednn_fp32_products()
    finally:
        device._onednn_pays_here.cache_clear()
    assert on == torch.backends.mkldnn.is_available(), f"oneDNN products on an AMD AVX-512 CPU: {on}"
    assert off is False, "oneDNN products with torch.backends.mkldnn.enabled = False"


def test_flop_counter_counts_the_sliced_head_as_the_one_product():
    """torch's FlopCounterMode over a CPU training step counts the same FLOPs whether the head runs
    in slices or as one product: its dx was summed with addmm_, which the counter does not see
    (2 N V C FLOPs missing from every step)."""
    from parity_tests.models import step_flops_by_head_slices

    model = GPTModel(tiny(), seed=0)
    counts = step_flops_by_head_slices(model, ids_of(model.config, 2, 8, 1))
    assert counts[7] == counts[10**9], f"sliced head {counts[7]} FLOPs, one product {counts[10**9]}"


def test_pruned_weights_are_recomputed_every_forward_and_submodule_hooks_are_refused():
    """torch.nn.utils.prune recomputes `weight = weight_orig * weight_mask` in the submodule's
    forward pre-hook, which torch never ran (the forward is functional): after an optimiser step
    the weight stayed stale, and a second backward raised. GPTModel runs the pre-hooks; forward
    and backward hooks on a submodule cannot run and are refused by name."""
    import torch.nn.utils.prune as prune

    model = GPTModel(tiny(), seed=0)
    ids = ids_of(model.config, 2, 6, 0)
    c_fc = model.h[0].mlp.c_fc
    prune.l1_unstructured(c_fc, "weight", amount=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        _, loss = model(ids, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        got = model(ids)  # after the last step: stale, the weight would be the one before it
        prune.remove(c_fc, "weight")  # weight = weight_orig * mask, a plain parameter again
        want = model(ids)
    assert torch.equal(got, want), f"pruned model's logits differ from weight_orig * mask: {(got - want).abs().max()}"
    model.h[1].attn.register_forward_hook(lambda *args: None)
    with pytest.raises(RuntimeError, match=r"h\.1\.attn: forward and backward hooks on a submodule"):
        model(ids)
    fresh = GPTModel(tiny(), seed=0)
    fresh.ln_f.register_forward_pre_hook(lambda module, args: (torch.zeros(1),))
    with pytest.raises(RuntimeError, match=r"ln_f: a forward pre-hook returned new inputs"):
        fresh(ids)


@pytest.mark.parametrize("tied", [True, False], ids=["tied head", "separate head"])
def test_a_parametrized_wte_is_computed_once_per_forward(tied):
    """model.forward read wte.weight four times (the vocabulary size, the tied-gradient choice,
    the embedding, the tied head): a parametrization ran four times per forward, and a stateful
    one (spectral_norm's power iteration) gave the embedding and the head different weights."""
    from torch.nn.utils import parametrize

    calls = []

    class Counted(torch.nn.Module):
        def forward(self, w):
            calls.append(1)
            return w * 1.0

    model = GPTModel(tiny(tie_embeddings=tied), seed=0)
    parametrize.register_parametrization(model.wte, "weight", Counted())
    ids = ids_of(model.config, 2, 5, 0)
    for targets in (None, ids):
        calls.clear()
        model(ids, targets)
        assert len(calls) == 1, f"wte's parametrization ran {len(calls)} times in one forward (targets: {targets is not None})"
    cache = model.new_kv_cache(2)
    with torch.no_grad():
        model(ids, kv_cache=cache)
        calls.clear()
        model(ids[:, :1], kv_cache=cache)  # one token per row: decode.py's decode_step
    assert len(calls) == 1, f"wte's parametrization ran {len(calls)} times in one decoding step"


@pytest.mark.parametrize("level", [1e4, 1e6, 1e30])
def test_the_sliced_loss_and_its_gradient_hold_for_large_logits(level):
    """The sliced CPU loss added log(sum) to the running max before taking the target logit off:
    at logits of 1e30 the loss was 0 (exact 6.938) and the target's gradient 0 (exact -0.999), at
    1e6 the loss 0.027 off. C = 1 and x = 1: the logits are the head's column, exactly."""
    from torch_impl.head import head_loss_forward

    V, target = 1031, 3
    g = torch.Generator().manual_seed(0)
    spread = torch.randint(-8, 8, (V, 1), generator=g).double() if level < 1e30 else torch.zeros(V, 1)
    head32 = (level + spread).float().requires_grad_()  # integers near 1e4, 1e6; all equal at 1e30
    _, loss = head_loss_forward(torch.ones(1, 1, 1), head32, torch.tensor([[target]]))
    loss.backward()
    ref_logits = head32.detach().double().T.requires_grad_()  # (1, V): the same float32 values, in float64
    ref = torch.nn.functional.cross_entropy(ref_logits, torch.tensor([target]))
    ref.backward()
    assert_close(f"sliced loss at logits ~{level:g}", loss.detach().double().numpy(), ref.detach().numpy(),
                 forward_tol("float32"))
    assert_close(f"sliced dhead at logits ~{level:g}", head32.grad.double().T.numpy(), ref_logits.grad.numpy(),
                 gradient_tol("float32"))


def test_an_ignored_row_whose_logits_overflow_leaves_the_sliced_loss_and_gradients_finite():
    """Its weight of 0 multiplied a NaN (inf - inf): the loss, that row's dx and every dhead entry
    were NaN. numpy_ref gives the counted rows' loss and 0 for the ignored row."""
    from torch_impl.head import head_loss_forward

    V = 600
    head = torch.ones(V, 1)
    head[5, 0] = 10.0
    head.requires_grad_()
    x = torch.tensor([[[3e38], [1.0]]], requires_grad=True)  # row 0's class 5: 3e39, +inf in float32
    _, loss = head_loss_forward(x, head, torch.tensor([[-100, 2]]), ignore_index=-100)
    loss.backward()
    counted = torch.nn.functional.cross_entropy(head.detach().double().T, torch.tensor([2]))  # row 1 alone
    assert abs(loss.item() - counted.item()) < 1e-5, f"loss {loss.item()} vs the counted row's {counted.item()}"
    assert torch.isfinite(head.grad).all() and torch.isfinite(x.grad).all(), \
        f"non-finite gradients: dhead {int((~torch.isfinite(head.grad)).sum())} entries, dx {x.grad.flatten()}"
    assert x.grad[0, 0, 0] == 0, f"the ignored row's dx is {x.grad[0, 0, 0]}, not 0"


def test_the_fused_bf16_loss_holds_for_large_logits():
    """The same rounding in _Bf16LogitsLoss: bf16 logits all 1e30 gave a loss of 0 (exact log V)."""
    from torch_impl.head import _Bf16LogitsLoss

    V = 1030
    loss = _Bf16LogitsLoss.apply(torch.full((1, V), 1e30, dtype=torch.bfloat16), torch.tensor([3]), torch.ones(1),
                                 torch.zeros(1))
    assert abs(loss.item() - math.log(V)) < 1e-5, f"loss {loss.item()} vs log(V) = {math.log(V)}"


def test_block_and_attention_refuse_dropout_they_would_ignore():
    """An unknown block mask key (a misspelt 'attn.weight') was silently no mask; a mask with
    attn_dropout_p > 0 silently dropped p; p > 0 under vmap reached SDPA and failed inside torch."""
    from torch_impl.attention import attention_forward
    from torch_impl.block import block_forward

    model = GPTModel(get_config("tiny"), seed=0)
    C, nh = model.config.emb_dim, model.config.n_heads
    block = {name[len("h.0."):]: t for name, t in model.named_parameters() if name.startswith("h.0.")}
    x = torch.randn(1, 3, C)
    with pytest.raises(ValueError, match=r"unknown block dropout mask\(s\) \['attn.weight'\]"):
        block_forward(x, block, nh, model.config.ln_eps, masks={"attn.weight": torch.ones(1, nh, 3, 3)})
    # With the attention mask given, the block's torch-drawn p is not passed on: the mask is the dropout.
    mask = torch.ones(1, nh, 3, 3)
    out = block_forward(x, block, nh, model.config.ln_eps, masks={"attn.weights": mask}, drop_p=0.5, training=True)
    assert out.shape == x.shape, f"block output {tuple(out.shape)}"
    w = (block["attn.c_attn.weight"], block.get("attn.c_attn.bias"), block["attn.c_proj.weight"], block["attn.c_proj.bias"])
    with pytest.raises(ValueError, match="an attn_dropout_mask and attn_dropout_p=0.5 were both given"):
        attention_forward(x, *w, nh, mask, attn_dropout_p=0.5)
    with pytest.raises(ValueError, match="attn_dropout_p=0.5 is drawn inside SDPA, which has no vmap rule"):
        torch.func.vmap(lambda xi: attention_forward(xi[None], *w, nh, attn_dropout_p=0.5))(x)


def _ones_masks(cfg, B: int, T: int, past: int = 0) -> dict[str, torch.Tensor]:
    masks = {"embedding": torch.ones(B, T, cfg.emb_dim)}
    for i in range(cfg.n_layers):
        masks[f"h.{i}.attn.weights"] = torch.ones(B, cfg.n_heads, T, past + T)
        masks[f"h.{i}.attn.out"] = torch.ones(B, T, cfg.emb_dim)
        masks[f"h.{i}.mlp.out"] = torch.ones(B, T, cfg.emb_dim)
    return masks


def test_given_masks_leave_no_site_to_torchs_dropout_in_training():
    """With explicit masks, randomness is entirely explicit: a site whose mask is left out drops
    nothing, in training mode too (two seeds, the same logits; and eval's)."""
    model = GPTModel(get_config("tiny", drop_rate=0.5), seed=0).train()
    ids = torch.tensor([[1, 2, 3, 4]])
    some = {"embedding": torch.ones(1, 4, model.config.emb_dim)}
    torch.manual_seed(1)
    first = model(ids, dropout_masks=some)
    torch.manual_seed(2)
    second = model(ids, dropout_masks=some)
    assert torch.equal(first, second), "torch drew dropout at sites the given masks left out"
    assert_close("logits with all-ones masks vs eval", first, model.eval()(ids), forward_tol("float32"))


def test_masks_after_a_kv_cache_prefill_cover_the_cached_keys():
    """After P cached positions the attention-weight masks are (B, nh, T, P + T); all-ones masks
    give the logits of the full forward's last T rows."""
    model = GPTModel(get_config("tiny"), seed=0).train()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        full = model.eval()(ids)
        model.train()
        cache = model.new_kv_cache(1)
        model(ids[:, :3], kv_cache=cache, dropout_masks=_ones_masks(model.config, 1, 3))
        rest = model(ids[:, 3:], kv_cache=cache, dropout_masks=_ones_masks(model.config, 1, 2, past=3))
    assert_close("logits after a prefill, all-ones masks", rest, full[:, 3:], forward_tol("float32"))
