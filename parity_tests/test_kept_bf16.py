"""torch_impl's CPU bf16 paths against plain autocast. For CPUs with bf16 units:
linear._KeptBf16Linear (the same products as plain bf16 autocast, its large tensors in memory kept
from the last step), head._Bf16LogitsLoss, attention.fp32_attention_pays (float32 attention for
short sequences, where it is faster) and linear.bf16_weights_held (decoding). For CPUs without
them: linear.bf16_linear (the operands cast into fast layouts).

It is taken only on CPUs with AMX / AVX-512 BF16; here `cpu_has_fast_bf16` is patched to say
yes, so these tests run on any CPU (without the units the same bf16 products are just slower).
"Plain" is the same model with the path switched off: autocast's own casts and kernels.
"""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import pytest
import torch

import torch_impl.attention
import torch_impl.head
from parity_tests.compare import assert_close, assert_dicts_close
from parity_tests.tolerances import BF16_SAME_PRODUCTS, forward_tol
import torch_impl.linear
from torch_impl.config import get_config
from torch_impl.linear import kept_bf16_linear
from torch_impl.model import GPTModel


@contextmanager
def fast_path(on: bool):
    """Take linear._KeptBf16Linear (on) or plain autocast (off), whatever this CPU has. Attention
    takes the same kernels in both (float32 below SDPA_FP32_BELOW_T queries), on every CPU."""
    real = torch_impl.linear.fast_bf16_training
    with mock.patch.object(torch_impl.linear, "cpu_has_fast_bf16", lambda: True), \
            mock.patch.object(torch_impl.attention, "cpu_has_fast_bf16", lambda: True):
        choice = real if on else (lambda w: False)
        with mock.patch.object(torch_impl.linear, "fast_bf16_training", choice), \
                mock.patch.object(torch_impl.head, "fast_bf16_training", choice):
            yield


def assert_bitwise(where: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype, f"{where}: dtype {got.dtype}, plain autocast gives {want.dtype}"
    assert got.shape == want.shape, f"{where}: shape {tuple(got.shape)}, plain autocast gives {tuple(want.shape)}"
    if not torch.equal(got, want):
        diff = (got.double() - want.double()).abs()
        raise AssertionError(f"{where}: differs from plain autocast in {int((diff > 0).sum())} of {diff.numel()} "
                             f"entries, max |difference| {diff.max().item():.3g}")


def _product_and_grads(product, x, w, b, w_is_out_in: bool, upstream) -> dict[str, torch.Tensor]:
    """y and the gradients of sum(y * upstream) for one product under CPU bf16 autocast: product(x,
    w, b), or (None) plain autocast's x @ W + b with W = w, or w.T for a head stored (V, C)."""
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if product is None:
            W = w.T if w_is_out_in else w
            y = x @ W if b is None else torch.addmm(b, x, W)
        else:
            y = product(x, w, b)
    (y.float() * upstream).sum().backward()
    out = {"y": y, "dx": x.grad, "dw": w.grad} | ({"db": b.grad} if b is not None else {})
    return {k: t.clone() for k, t in out.items()}  # kept memory may be written again by a later call


def _linear_case(seed: int, w_is_out_in: bool, bias: bool):
    """x (24, 40), w (40, 56) or stored (56, 40), b (56,) or None, and a generator for upstreams."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 40, generator=g, requires_grad=True)
    w = (torch.randn(56, 40, generator=g) if w_is_out_in else torch.randn(40, 56, generator=g)).requires_grad_()
    b = torch.randn(56, generator=g, requires_grad=True) if bias else None
    return x, w, b, g


LINEAR_CASES = pytest.mark.parametrize("w_is_out_in,bias", [(False, True), (False, False), (True, False)],
                                       ids=["linear", "linear without bias", "head stored (V, C)"])


@LINEAR_CASES
def test_kept_bf16_linear_gives_autocast_bits(w_is_out_in, bias):
    """Output, dx, dw and db bit for bit equal to the same product under plain autocast, on the
    first step (kept memory allocated) and the second (kept memory reused)."""
    x, w, b, g = _linear_case(3, w_is_out_in, bias)
    for step in range(2):
        upstream = torch.randn(24, 56, generator=g)
        got = _product_and_grads(lambda x, w, b: kept_bf16_linear(x, w, b, w_is_out_in), x, w, b, w_is_out_in,
                                 upstream)
        want = _product_and_grads(None, x, w, b, w_is_out_in, upstream)
        for key in want:
            assert_bitwise(f"step {step} {key}", got[key], want[key])


@LINEAR_CASES
def test_bf16_linear_layouts_give_autocast_numbers(w_is_out_in, bias):
    """linear.bf16_linear (CPU bf16 autocast without bf16 instructions: operands cast into fast
    layouts) against the same product under plain autocast: output and every gradient. Both round
    the inputs to bf16 and accumulate in float32, so they agree to one bf16 rounding step."""
    from torch_impl.linear import bf16_linear

    x, w, b, g = _linear_case(5, w_is_out_in, bias)
    upstream = torch.randn(24, 56, generator=g)
    results = {"bf16_linear": _product_and_grads(lambda x, w, b: bf16_linear(x, w, b, w_is_out_in=w_is_out_in),
                                                 x, w, b, w_is_out_in, upstream),
               "autocast": _product_and_grads(None, x, w, b, w_is_out_in, upstream)}
    for name, r in results.items():
        assert r["y"].dtype == torch.bfloat16, f"{name}: output dtype {r['y'].dtype}, autocast gives bf16"
        assert r["dx"].dtype == x.dtype and r["dw"].dtype == w.dtype, f"{name}: gradients in the parameters' dtypes"
        r["y"] = r["y"].float()
    assert_dicts_close("bf16_linear vs autocast", results["bf16_linear"], results["autocast"], BF16_SAME_PRODUCTS)


@LINEAR_CASES
@pytest.mark.parametrize("path", ["bf16_linear", "kept_bf16_linear"])
def test_a_weight_changed_in_place_before_the_backward_is_taken_as_autocast_takes_it(path, w_is_out_in, bias):
    """Autocast saves its bf16 cast of the weight, so an in-place change to the weight between a
    forward and its backward (an optimiser step) is allowed and the backward uses the forward's
    values. bf16_linear (CPUs without bf16 units) saved the float32 weight: autocast's in-place
    error, where plain autocast ran."""
    from torch_impl.linear import bf16_linear

    product = {"bf16_linear": lambda x, w, b: bf16_linear(x, w, b, w_is_out_in=w_is_out_in),
               "kept_bf16_linear": lambda x, w, b: kept_bf16_linear(x, w, b, w_is_out_in)}[path]
    results = {}
    for name in (path, "autocast"):
        x, w, b, g = _linear_case(6, w_is_out_in, bias)
        upstream = torch.randn(24, 56, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if name == "autocast":
                W = w.T if w_is_out_in else w
                y = x @ W if b is None else torch.addmm(b, x, W)
            else:
                y = product(x, w, b)
        with torch.no_grad():
            w.mul_(0.5)  # between the forward and its backward
        (y.float() * upstream).sum().backward()
        results[name] = {"y": y.float(), "dx": x.grad, "dw": w.grad} | ({"db": b.grad} if bias else {})
    assert_dicts_close(f"{path} vs autocast, the weight halved in place before the backward", results[path],
                       results["autocast"], BF16_SAME_PRODUCTS)


def _loss(model, ids, targets, fused: bool):
    """The model's own loss (on the kept path: head._Bf16LogitsLoss), or F.cross_entropy of its
    logits (autocast's float32 loss) in both modes, to compare the products alone."""
    if fused:
        return model(ids, targets)
    logits = model(ids)
    return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _train_steps(cfg, on: bool, steps: int = 2, two_forwards: bool = False, accumulate: bool = False,
                 fused: bool = False):
    """Losses and float32 gradients of `steps` autocast training steps (no optimizer: the same
    weights each step, so the second step runs on kept memory with nothing else changed)."""
    model = GPTModel(cfg, seed=1)
    model.train()
    g = torch.Generator().manual_seed(9)
    out = []
    kept = torch_impl.linear._KeptBf16Linear
    with fast_path(on), mock.patch.object(kept, "apply", wraps=kept.apply) as calls:
        for _ in range(steps):
            if not accumulate:
                model.zero_grad(set_to_none=True)
            ids = torch.randint(0, cfg.vocab_size, (2, 6), generator=g)
            targets = torch.randint(0, cfg.vocab_size, (2, 6), generator=g)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits, loss = _loss(model, ids, targets, fused)
                if two_forwards:  # a second graph while the first still holds the kept bf16 weights
                    _, loss2 = _loss(model, ids.flip(1), targets, fused)
                    loss = loss + loss2
            loss.backward()
            out.append({"logits": logits.detach(), "loss": loss.detach()}
                       | {f"d{k}": p.grad.clone() for k, p in model.named_parameters()})
    products = steps * (2 if two_forwards else 1) * (4 * cfg.n_layers + 1)  # 4 per block and the head
    assert calls.call_count == (products if on else 0), \
        f"{'kept' if on else 'plain'} path: {calls.call_count} products through _KeptBf16Linear"
    return out


@pytest.mark.parametrize("case", ["untied", "tied", "two forwards, one backward", "accumulated gradients"])
def test_model_training_on_the_kept_bf16_path_matches_plain_autocast(case):
    """Logits, loss (F.cross_entropy of the logits in both) and every gradient of a tiny GPT
    trained under bf16 autocast, through _KeptBf16Linear and through plain autocast: bit for
    bit, with two exceptions. A tied wte's
    two gradients are summed in another order (the head's first, then each embedding row): equal
    to float32 rounding. Two forwards in one autocast region use one cached bf16 copy of each
    weight, so plain autocast sums the two bf16 weight gradients in bf16 before casting them,
    where the kept path casts each and sums in float32: equal to one bf16 rounding."""
    tied = case != "untied"
    cfg = get_config("tiny", tie_embeddings=tied, drop_rate=0.0)
    kw = {"two_forwards": case.startswith("two"), "accumulate": case.startswith("accumulated")}
    got, want = _train_steps(cfg, True, **kw), _train_steps(cfg, False, **kw)
    for step, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys(), f"step {step}: gradients of {sorted(g)} vs {sorted(w)}"
        for key in w:
            if kw["two_forwards"] and key.startswith("d"):
                assert_close(f"{case}, step {step}, {key}", g[key], w[key], BF16_SAME_PRODUCTS)
            elif tied and key == "dwte.weight":
                torch.testing.assert_close(g[key], w[key], rtol=1e-6, atol=1e-7,
                                           msg=lambda m, s=step: f"step {s} tied dwte.weight: {m}")
            else:
                assert_bitwise(f"{case}, step {step}, {key}", g[key], w[key])


def test_the_kept_bf16_path_is_taken_only_where_it_should_be():
    """Training under CPU bf16 autocast with bf16 units: yes. Without grad, fp16 autocast, no
    autocast, a float64 weight, or a CPU without bf16 units: no (those keep their own paths)."""
    from torch_impl.linear import fast_bf16_training

    w = torch.zeros(4, 4, requires_grad=True)
    with mock.patch.object(torch_impl.linear, "cpu_has_fast_bf16", lambda: True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fast_bf16_training(w), "bf16 autocast training with bf16 units did not take the kept path"
            with torch.no_grad():
                assert not fast_bf16_training(w), "took the training path without grad"
            assert not fast_bf16_training(w.detach().double().requires_grad_()), "took it for a float64 weight"
        with torch.autocast("cpu", dtype=torch.float16):
            assert not fast_bf16_training(w), "took the bf16 path under fp16 autocast"
        assert not fast_bf16_training(w), "took it without autocast"
    with mock.patch.object(torch_impl.linear, "cpu_has_fast_bf16", lambda: False), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fast_bf16_training(w), "took it on a CPU without bf16 units"


@pytest.mark.parametrize("case", ["training, short", "training, long", "no grad"])
def test_cpu_bf16_training_takes_float32_attention_for_short_sequences(case):
    """attention.fp32_attention_pays: under CPU bf16 autocast with bf16 units, a training step
    with fewer than SDPA_FP32_BELOW_T queries runs torch's SDPA on float32 q, k, v (its bf16
    kernel is the slower one there); a longer one, or one without grad, runs it in bf16. Either
    way the output is softmax(q k^T / sqrt(hs) + causal) v of the bf16 q, k, v: checked against
    float64 to float32 (short) or bf16 (long, no grad) rounding."""
    import torch.nn.functional as F

    import torch_impl.attention as attention

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 6, 8, generator=g).bfloat16().requires_grad_(case != "no grad") for _ in range(3))
    threshold = 4 if case == "training, long" else attention.SDPA_FP32_BELOW_T
    sdpa = mock.patch.object(F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention)
    with mock.patch.object(attention, "cpu_has_fast_bf16", lambda: True), \
            mock.patch.object(attention, "SDPA_FP32_BELOW_T", threshold), sdpa as call, \
            torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(case != "no grad"):
        y = attention.sdpa_attention(q, k, v)
    want_dtype = torch.float32 if case == "training, short" else torch.bfloat16
    seen = [a.dtype for a in call.call_args.args[:3]]
    assert seen == [want_dtype] * 3, f"{case}: SDPA ran on {seen}, expected {want_dtype}"
    assert y.dtype == want_dtype, f"{case}: output {y.dtype}, expected {want_dtype}"
    ref = attention.explicit_attention(q.double(), k.double(), v.double())
    tol = 1e-5 if want_dtype == torch.float32 else 2.0**-6
    err = (y.double() - ref).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), f"{case}: max |y - float64| {err:.3g} over {tol:.3g}"
    if case != "no grad":
        y.float().sum().backward()
        assert q.grad is not None and q.grad.dtype == torch.bfloat16, f"{case}: dq {q.grad}, expected bf16 like q"


@pytest.mark.parametrize("ignore", [False, True], ids=["every target", "some targets ignored"])
def test_fused_bf16_loss_matches_float32_cross_entropy(ignore):
    """head._Bf16LogitsLoss against F.cross_entropy of the same bf16 logits widened to float32 (what
    autocast computes), with a vocabulary of several slices: the loss to float32 rounding, each
    dlogit to float32 rounding and one bf16 rounding step."""
    import torch.nn.functional as F

    from torch_impl.head import HEAD_CHUNK, _Bf16LogitsLoss

    g = torch.Generator().manual_seed(6)
    N, V = 10, 2 * HEAD_CHUNK + 37
    logits = (4 * torch.randn(N, V, generator=g)).bfloat16()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[0], targets[1] = 0, V - 1  # first and last columns: the slice edges
    counted = torch.ones(N, dtype=torch.bool)
    if ignore:
        counted[2:5] = False
    weights = counted.float() / counted.sum()
    owner = torch.zeros(V, 3, requires_grad=True)  # only names whose kept memory dlogits uses
    for step in range(2):  # the second call writes dlogits into the kept memory of the first
        a = logits.clone().requires_grad_()
        loss = _Bf16LogitsLoss.apply(a, torch.where(counted, targets, 0), weights, owner)
        loss.backward()
        b = logits.float().requires_grad_()
        want = F.cross_entropy(b, torch.where(counted, targets, -100), ignore_index=-100)
        want.backward()
        assert loss.dtype == torch.float32, f"loss dtype {loss.dtype}"
        assert abs(loss.item() - want.item()) <= 4e-7 * abs(want.item()), \
            f"step {step}: loss {loss.item()!r} vs F.cross_entropy {want.item()!r}"
        assert a.grad.dtype == torch.bfloat16, f"dlogits dtype {a.grad.dtype}, expected bf16 like the logits"
        ref = b.grad.bfloat16().float()  # autocast's: float32 gradient, rounded to bf16 on its way back
        got = a.grad.float()
        ulp = torch.maximum(ref.abs(), got.abs()) * 2.0**-7 + 1e-12  # one bf16 step of the value
        bad = (got - ref).abs() > ulp
        assert not bad.any(), (f"step {step}: {int(bad.sum())} dlogits differ by more than one bf16 step, first at "
                               f"{tuple(int(i) for i in bad.nonzero()[0])}: {got[bad][0].item()!r} vs {ref[bad][0].item()!r}")
        assert torch.all(got[~counted] == 0), f"step {step}: an ignored row got a gradient"


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_model_training_with_the_fused_bf16_loss_stays_with_plain_autocast(tied):
    """The whole kept path (products and fused loss, model(ids, targets)) against plain autocast:
    logits bit for bit (the same products), the loss to float32 rounding, each gradient within
    2^-6 of its norm (dlogits differ by at most one bf16 step, and that flows back)."""
    cfg = get_config("tiny", tie_embeddings=tied, drop_rate=0.0, vocab_size=3 * 512 + 5)
    got, want = _train_steps(cfg, True, fused=True), _train_steps(cfg, False, fused=True)
    for step, (g, w) in enumerate(zip(got, want)):
        assert_bitwise(f"step {step} logits", g["logits"], w["logits"])
        assert abs(g["loss"].item() - w["loss"].item()) <= 1e-6 * abs(w["loss"].item()), \
            f"step {step}: loss {g['loss'].item()!r} vs plain autocast {w['loss'].item()!r}"
        for key in w:
            if key.startswith("d"):
                err = (g[key] - w[key]).norm().item()
                assert err <= 2.0**-6 * w[key].norm().item() + 1e-9, \
                    f"step {step} {key}: |difference| {err:.3g} vs |gradient| {w[key].norm().item():.3g}"


def test_decoding_under_bf16_autocast_casts_each_weight_once_with_the_same_bits():
    """Inside linear.bf16_weights_held() (generate holds it), no-grad products under CPU bf16
    autocast reuse one bf16 copy per weight instead of autocast's cast per call: logits bit for
    bit those of plain autocast, one copy per weight however many forwards, none kept after."""
    from contextlib import nullcontext

    from torch_impl.generate import generate
    from torch_impl.linear import _held, bf16_weights_held

    cfg = get_config("tiny", drop_rate=0.0, vocab_size=600)
    model = GPTModel(cfg, seed=2).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    with mock.patch.object(torch_impl.linear, "cpu_has_fast_bf16", lambda: True), torch.no_grad(), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(ids)
        with bf16_weights_held():
            first = model(ids)
            copies = {k: t for k, (_, _, t) in _held.get().items()}
            again = model(ids)
            recast = [k for k, (_, _, t) in _held.get().items() if copies.get(k) is not t]
            assert not recast, f"a second forward cast {len(recast)} weights again"
        assert _held.get() is None, "the held copies outlived the scope"
        n_weights = 4 * cfg.n_layers + 1  # 4 products per block, and the head
        assert len(copies) == n_weights, f"{len(copies)} weights held, expected {n_weights}"
        assert_bitwise("logits, held weights", first, want)
        assert_bitwise("logits, held weights, second forward", again, want)
        seen = []

        @contextmanager
        def recording():  # generate's scope, noting how many weights it held at the end
            with bf16_weights_held():
                yield
                seen.append(len(_held.get()))

        with mock.patch("torch_impl.generate.bf16_weights_held", recording):
            tokens = generate(model, ids, 6, temperature=0.0)
        assert seen == [n_weights], f"generate held {seen} weights, expected [{n_weights}]"
        with mock.patch("torch_impl.generate.bf16_weights_held", nullcontext):
            plain = generate(model, ids, 6, temperature=0.0)
    assert torch.equal(tokens, plain), f"generate with held weights {tokens.tolist()} vs plain autocast {plain.tolist()}"


def test_held_weights_follow_in_place_changes_and_skip_parametrized_weights():
    """A weight written in place inside bf16_weights_held() is cast again (its version counter
    moved), so the logits follow it; a parametrized weight, a new non-leaf tensor at each read,
    is not held at all (holding it would add one copy per product per token)."""
    from torch.nn.utils import parametrize

    from torch_impl.linear import _held, bf16_weights_held

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    cfg = get_config("tiny", drop_rate=0.0)
    model = GPTModel(cfg, seed=3).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 4), generator=torch.Generator().manual_seed(2))
    with mock.patch.object(torch_impl.linear, "cpu_has_fast_bf16", lambda: True), torch.no_grad(), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        with bf16_weights_held():
            model(ids)
            model.h[0].mlp.c_fc.weight.mul_(0.5)  # in place, inside the scope
            got = model(ids)
        want = model(ids)  # plain autocast, after the change
        assert_bitwise("logits after an in-place change inside the scope", got, want)
        parametrize.register_parametrization(model.h[1].mlp.c_proj, "weight", Double())
        with bf16_weights_held():
            for _ in range(3):
                got = model(ids)
            held = len(_held.get())
        want = model(ids)
    n_weights = 4 * cfg.n_layers + 1
    assert held == n_weights - 1, f"{held} weights held after 3 forwards, expected {n_weights - 1} (all but the parametrized one)"
    assert_bitwise("logits with a parametrized weight", got, want)


def test_a_model_made_under_inference_mode_generates_under_bf16_autocast():
    """Parameters made under torch.inference_mode are inference tensors, which have no version
    counter: holding their bf16 copies (generate's bf16_weights_held) raised "Inference tensors do
    not track version counter". They are not held; the tokens are plain autocast's."""
    from torch_impl.generate import generate

    cfg = get_config("tiny", drop_rate=0.0)
    with torch.inference_mode():
        model = GPTModel(cfg, seed=4).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 4), generator=torch.Generator().manual_seed(4))
    with mock.patch.object(torch_impl.linear, "cpu_has_fast_bf16", lambda: True), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, ids, 5)
        with torch.inference_mode():
            want = ids
            for _ in range(5):  # greedy by hand, without the held copies
                want = torch.cat([want, model(want)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, want), f"generate under inference-mode weights gave {out.tolist()}, greedy {want.tolist()}"


@pytest.mark.parametrize("path", ["float32 sliced head", "bf16 kept path"])
def test_a_tied_head_gradient_from_another_backward_pass_is_not_added_to_wte(path):
    """torch.autograd.grad with respect to the final hidden state runs the tied head's backward but
    not the embedding's; a later backward through the embedding alone must not add that pass's
    head gradient to wte.grad (embedding.TiedHeadGrad takes only its own pass's)."""
    import torch_impl.model as model_module

    cfg = get_config("tiny", tie_embeddings=True, drop_rate=0.0, vocab_size=600)  # V > HEAD_CHUNK: sliced in fp32
    ids = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(4))
    targets = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(5))
    bf16 = path.startswith("bf16")

    def wte_grad(first_pass: bool) -> torch.Tensor:
        model = GPTModel(cfg, seed=1)
        hidden = {}
        real = model_module.layernorm_forward

        def capture(x, *args, **kwargs):  # ln_f's input: the final hidden state
            hidden["h"] = x
            return real(x, *args, **kwargs)

        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        with fast_path(bf16), mock.patch.object(model_module, "layernorm_forward", capture), autocast:
            _, loss = model(ids, targets)
        h = hidden["h"]
        if first_pass:
            torch.autograd.grad(loss, [h], retain_graph=True)  # runs the head's backward, not the embedding's
        (h.float() ** 2).sum().backward()  # runs the embedding's backward, not the head's
        return model.wte.weight.grad

    assert_bitwise(f"{path}: wte.grad after a head-only pass", wte_grad(True), wte_grad(False))


MIXED_FLOAT64 = pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float64, torch.float32),
                                                            (torch.float32, torch.float64)],
                                        ids=["float64 input, float32 weight", "float32 input, float64 weight"])


def _under_bf16_autocast(fn, units: bool, grad: bool):
    """fn() under CPU bf16 autocast, cpu_has_fast_bf16 patched to `units`, with or without autograd."""
    with mock.patch.object(torch_impl.linear, "cpu_has_fast_bf16", lambda: units), \
            torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
        return fn()


def _three_products(x, w, head, targets):
    """Our three products, each as a thunk: linear_forward, head_forward, head_loss_forward."""
    from torch_impl.head import head_forward, head_loss_forward
    from torch_impl.linear import linear_forward
    return {"linear_forward": lambda: linear_forward(x, w, None),
            "head_forward": lambda: head_forward(x, head),
            "head_loss_forward": lambda: head_loss_forward(x, head, targets)}


@MIXED_FLOAT64
@pytest.mark.parametrize("units", [True, False], ids=["bf16 units", "no bf16 units"])
@pytest.mark.parametrize("grad", [True, False], ids=["training", "no_grad"])
def test_float64_mixed_with_another_dtype_under_autocast_is_refused_as_plain_autocast_refuses(
        x_dtype, w_dtype, units, grad):
    """Autocast leaves float64 alone, so plain autocast multiplies float64 by bf16 and torch raises.
    Our bf16 paths cast both operands themselves: they once quietly gave a bf16 result (the kept
    training path, and every path on a CPU without bf16 units). Every product now refuses it, the
    two dtypes named."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 16, generator=g, dtype=x_dtype, requires_grad=grad)
    w = torch.randn(16, 24, generator=g, dtype=w_dtype, requires_grad=grad)
    head = torch.randn(24, 16, generator=g, dtype=w_dtype, requires_grad=grad)
    targets = torch.randint(0, 24, (2, 3), generator=g)
    with pytest.raises(RuntimeError):  # what plain autocast does with the same operands
        _under_bf16_autocast(lambda: torch.nn.functional.linear(x, w.T), units, grad)
    for name, product in _three_products(x, w, head, targets).items():
        with pytest.raises(TypeError) as err:
            out = _under_bf16_autocast(product, units, grad)
            raise AssertionError(f"{name}: {x_dtype} input, {w_dtype} weight under bf16 autocast gave "
                                 f"{getattr(out, 'dtype', type(out))}, not an error")
        message = str(err.value)
        assert str(x_dtype) in message and str(w_dtype) in message, \
            f"{name}: the error does not name both dtypes ({x_dtype}, {w_dtype}): {message}"


@pytest.mark.parametrize("units", [True, False], ids=["bf16 units", "no bf16 units"])
@pytest.mark.parametrize("grad", [True, False], ids=["training", "no_grad"])
def test_float64_products_stay_float64_under_autocast_as_plain_autocast_leaves_them(units, grad):
    """Both operands float64 under CPU bf16 autocast: plain autocast leaves the product in float64.
    On a CPU without bf16 units linear.bf16_linear (the layout workaround) once took it and gave
    bf16. Each of our products gives float64, with the numbers of the float64 product."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 16, generator=g, dtype=torch.float64, requires_grad=grad)
    w = torch.randn(16, 24, generator=g, dtype=torch.float64, requires_grad=grad)
    head = torch.randn(24, 16, generator=g, dtype=torch.float64, requires_grad=grad)
    targets = torch.randint(0, 24, (2, 3), generator=g)
    plain = _under_bf16_autocast(lambda: x @ w, units, grad)
    assert plain.dtype == torch.float64, f"plain autocast gave {plain.dtype} for a float64 product"
    with torch.no_grad():
        want = {"linear_forward": x @ w, "head_forward": x @ head.T}
    want["head_loss_forward"] = want["head_forward"]
    for name, product in _three_products(x, w, head, targets).items():
        out = _under_bf16_autocast(product, units, grad)
        y = out[0] if isinstance(out, tuple) else out
        assert y.dtype == torch.float64, f"{name}: float64 operands under bf16 autocast gave {y.dtype}"
        assert_close(f"{name} under bf16 autocast vs the float64 product", y.detach(), want[name],
                     forward_tol("float64"))
