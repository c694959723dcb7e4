"""float32 training products through oneDNN (torch_impl/linear.py, device.onednn_fp32_products).

- the choice: oneDNN on an AMD CPU with AVX-512 only (MKL keeps Intel CPUs and AVX2-only ones);
- forced on (as on such a CPU), the training linear's y, dx, dw and db agree with float64 to
  float32's tolerance, and oneDNN really computes y and dx;
- a whole GPT's logits and gradients, forced on, agree with the same model in float64, the
  output head's sliced logits and dx (torch_impl/head.py) through oneDNN as well;
- torch's FlopCounterMode counts oneDNN's products (it has no formula of its own for them).
"""

from __future__ import annotations

import re

import pytest
import torch

from parity_tests.compare import assert_close, to_numpy
from parity_tests.tolerances import forward_tol, gradient_tol
from parity_tests.models import head_slices
from torch_impl import device as tdevice
from torch_impl import head as thead
from torch_impl import linear as tlinear
from torch_impl.config import get_config
from torch_impl.linear import linear_forward
from torch_impl.model import GPTModel

needs_onednn = pytest.mark.skipif(getattr(torch.ops.mkldnn, "_linear_pointwise", None) is None
                                  or not torch.backends.mkldnn.is_available(),
                                  reason="this torch has no oneDNN linear")


@pytest.fixture
def onednn_on(monkeypatch):
    """oneDNN's products as on an AMD CPU with AVX-512, whatever CPU runs the test; counts its calls."""
    calls = _Calls()
    real = tlinear.onednn_linear

    def counted_in(module):
        def counted(x, w_out_in, b):
            (calls if module is tlinear else calls.head).append(tuple(x.shape))
            return real(x, w_out_in, b)
        return counted

    for module in (tlinear, thead):
        monkeypatch.setattr(module, "onednn_fp32_products", lambda: True)
        monkeypatch.setattr(module, "onednn_linear", counted_in(module))
    return calls


class _Calls(list):
    """The shapes of x in oneDNN products from linear.py; `.head`, those from head.py."""

    def __init__(self):
        super().__init__()
        self.head: list[tuple[int, ...]] = []


@pytest.mark.parametrize("vendor, capability, chosen", [
    ("AuthenticAMD", "AVX512", True),
    ("GenuineIntel", "AVX512", False),
    ("AuthenticAMD", "AVX2", False),
    ("", "AVX512", False),
])
@needs_onednn
def test_onednn_is_chosen_on_amd_cpus_with_avx512_only(monkeypatch, vendor, capability, chosen):
    monkeypatch.setattr(tdevice, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    tdevice._onednn_pays_here.cache_clear()
    try:
        assert tdevice.onednn_fp32_products() is chosen, f"{vendor} {capability}: expected oneDNN {chosen}"
        described = "oneDNN" in tdevice.plan_runtime("cpu", "fp32").describe()
        assert described is chosen, f"{vendor} {capability}: describe() names oneDNN: {described}, chosen: {chosen}"
        fp64 = tdevice.plan_runtime("cpu", "fp64").describe()
        assert "oneDNN" not in fp64, f"a float64 plan never trains through oneDNN, yet: {fp64}"
    finally:
        tdevice._onednn_pays_here.cache_clear()


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_the_training_linear_through_onednn_agrees_with_float64(onednn_on, bias):
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(40, 24, generator=g, dtype=torch.float64)
    w64 = torch.randn(24, 36, generator=g, dtype=torch.float64)
    b64 = torch.randn(36, generator=g, dtype=torch.float64) if bias else None
    dy64 = torch.randn(40, 36, generator=g, dtype=torch.float64)
    results = {}
    for dtype in (torch.float32, torch.float64):
        x = x64.to(dtype).requires_grad_()
        w = torch.nn.Parameter(w64.to(dtype))
        b = torch.nn.Parameter(b64.to(dtype)) if bias else None
        y = linear_forward(x, w, b)
        y.backward(dy64.to(dtype))
        results[dtype] = {"y": y, "dx": x.grad, "dw": w.grad, **({"db": b.grad} if bias else {})}
    assert onednn_on == [(40, 24), (40, 36)], f"oneDNN should compute y and dx of the float32 run, called on {onednn_on}"
    for name, want in results[torch.float64].items():
        tol = forward_tol("float32") if name == "y" else gradient_tol("float32")
        assert_close(f"oneDNN linear {name} (float32 vs float64)", to_numpy(results[torch.float32][name]),
                     to_numpy(want), tol)


@needs_onednn
def test_a_strided_bias_stays_on_mkl(onednn_on):
    """oneDNN's linear reads the bias as contiguous whatever its strides: a bias that is every
    other element of a tensor must not go there."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 8, generator=g, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(8, 6, generator=g))
    b = torch.nn.Parameter(torch.randn(12, generator=g)[::2])
    assert not b.is_contiguous()
    y = linear_forward(x, w, b)
    assert onednn_on == [], f"a strided bias went through oneDNN: {onednn_on}"
    assert_close("strided-bias linear vs addmm", to_numpy(y), to_numpy(torch.addmm(b, x, w)), forward_tol("float32"))


@needs_onednn
@pytest.mark.parametrize("tied", [False, True])
def test_a_gpt_trained_through_onednn_agrees_with_float64(onednn_on, tied):
    """The head in slices of 7 rows (V = 101: 14 slices and one of 3), its logits used beside the
    loss (weights r), so that dx and dhead sum the caller's dlogits and the loss's softmax."""
    cfg = get_config("tiny", drop_rate=0.0, tie_embeddings=tied)
    g = torch.Generator().manual_seed(1)
    ids, targets = (torch.randint(0, cfg.vocab_size, (2, 12), generator=g) for _ in range(2))
    r = torch.randn(2, 12, cfg.vocab_size, generator=g, dtype=torch.float64)
    out = {}
    with head_slices(7):
        for dtype in (torch.float32, torch.float64):
            model = GPTModel(cfg, seed=4, dtype=dtype)
            logits, loss = model(ids, targets)
            (loss + (logits * r.to(dtype)).sum() / r.numel()).backward()
            out[dtype] = logits, {k: p.grad for k, p in model.named_parameters()}
    assert len(onednn_on) == 2 * 4 * cfg.n_layers, f"expected y and dx of 4 linears per block, got {len(onednn_on)}"
    slices = -(-cfg.vocab_size // 7)
    want = [(24, cfg.emb_dim)] * slices + [(24, 7)] * (slices - 1) + [(24, cfg.vocab_size % 7)]
    assert onednn_on.head == want, f"the head's logits and dx through oneDNN: products of x {onednn_on.head}, " \
        f"expected {want}"
    assert_close("logits through oneDNN (float32 vs float64)", to_numpy(out[torch.float32][0]),
                 to_numpy(out[torch.float64][0]), forward_tol("float32"))
    for k, want in out[torch.float64][1].items():
        assert_close(f"d{k} through oneDNN (float32 vs float64)", to_numpy(out[torch.float32][1][k]), to_numpy(want),
                     gradient_tol("float32"))


@needs_onednn
def test_flop_counter_counts_the_sliced_head_through_onednn_as_the_one_product(onednn_on):
    from parity_tests.models import step_flops_by_head_slices

    cfg = get_config("tiny", drop_rate=0.0)
    ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    counts = step_flops_by_head_slices(GPTModel(cfg, seed=0), ids)
    assert (16, 7) in onednn_on.head, f"the head's slices did not go through oneDNN: {onednn_on.head}"
    assert counts[7] == counts[10**9], f"sliced head through oneDNN {counts[7]} FLOPs, one product {counts[10**9]}"


@needs_onednn
def test_flop_counter_counts_onednn_products(onednn_on):
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(10, 6, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(6, 4))
    with FlopCounterMode(display=False) as counter:
        linear_forward(x, w, None).sum().backward()
    assert onednn_on, "the product did not go through oneDNN"
    assert counter.get_total_flops() == 3 * 2 * 10 * 6 * 4, \
        f"FlopCounterMode counted {counter.get_total_flops()} for y, dx and dw of a 10x6 @ 6x4 product"


@needs_onednn
@pytest.mark.parametrize("onednn", [True, False])
def test_a_bias_or_input_of_the_wrong_shape_is_refused_naming_both_shapes(monkeypatch, onednn):
    """oneDNN's product ignored a 0-d bias (x @ w came back, 0.5 short everywhere) and refused the
    others with "could not create a primitive descriptor"; without it, a (1, C_out) bias trained
    to a (C_out,) gradient autograd refused. numpy_ref's linear names both shapes; so does this."""
    from torch_impl.head import head_forward, head_loss_forward

    for module in (tlinear, thead):
        monkeypatch.setattr(module, "onednn_fp32_products", lambda: onednn)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 12, generator=g, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(12, 24, generator=g))
    for b in (torch.tensor(0.5), torch.ones(1), torch.ones(1, 24), torch.ones(10, 24)):
        with pytest.raises(ValueError, match=re.escape(f"linear: bias has shape {tuple(b.shape)}; the weight (12, 24) "
                                                       f"needs (24,)")):
            linear_forward(x, w, torch.nn.Parameter(b))
    with pytest.raises(ValueError, match=r"linear: input has 16 features, the weight expects 12"):
        linear_forward(torch.randn(2, 5, 16), w, None)
    head = torch.nn.Parameter(torch.randn(30, 16, generator=g))
    with head_slices(7):
        with pytest.raises(ValueError, match=r"output head: input has 12 features, the head \(30, 16\) expects 16"):
            head_forward(x, head)
        with pytest.raises(ValueError, match=r"output head: input has 12 features, the head \(30, 16\) expects 16"):
            head_loss_forward(x, head, torch.zeros(2, 5, dtype=torch.long))
