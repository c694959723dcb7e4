"""torch_impl's own CPU autograd Functions under the backward modes torch offers beyond a plain
backward: second derivatives (create_graph=True), a batched backward (autograd.grad with
is_grads_batched=True, autograd.functional.jacobian(vectorize=True)) and compiled autograd.

The CPU training paths run their own Functions (kept_buffers.py: the kept-gradient linear, the
sliced head, the embedding that takes a tied head's gradient, the bf16 products and loss); their
backward writes into kept memory and is not differentiable, has out= products vmap cannot batch,
and hands a tied head's gradient over in Python. In these modes they take the plain formulas as
a graph instead (kept_buffers.backward_takes_plain_formulas, graph_backward). They were once
once_differentiable (the second backward raised), and the batched backward and compiled
autograd with a tied sliced head raised too.

Second derivatives are checked two ways: torch's gradgradcheck against finite differences in
float64, per Function (each test asserts the Function was taken, so it cannot pass on another
path); and a gradient penalty through the whole model against the same model on plain torch ops
(`plain_ops`), in float32 and under bf16 autocast. torch's fused CPU attention kernels have no
second derivative of their own, so the model tests run attention on SDPA's math backend, as a
user would. The batched backward and compiled autograd are checked against the plain backward.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from unittest import mock

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import torch_impl.embedding
import torch_impl.head
import torch_impl.kept_buffers
import torch_impl.linear
from parity_tests.compare import assert_close, assert_dicts_close
from parity_tests.models import head_slices
from parity_tests.tolerances import gradient_tol
from torch_impl.config import get_config
from torch_impl.embedding import embedding_forward
from torch_impl.head import head_forward, head_loss_forward
from torch_impl.linear import linear_forward
from torch_impl.model import GPTModel


@contextmanager
def taken(function: type[torch.autograd.Function]):
    """Count the calls of `function` (an autograd.Function of torch_impl) and assert there was one."""
    with mock.patch.object(function, "apply", wraps=function.apply) as calls:
        yield
    assert calls.call_count > 0, f"{function.__name__} was not taken: the test checked another path"


@contextmanager
def plain_ops():
    """torch_impl on plain torch ops: its own CPU Functions off (they run only where plain_eager()
    says so), as under torch.compile or torch.func."""
    with ExitStack() as stack:
        for module in (torch_impl.linear, torch_impl.head, torch_impl.embedding, torch_impl.kept_buffers):
            stack.enter_context(mock.patch.object(module, "plain_eager", lambda: False))
        yield


def _leaf(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)


def _gradgradcheck(name: str, fn, inputs) -> None:
    assert torch.autograd.gradgradcheck(fn, inputs, raise_exception=False), \
        f"{name}: second derivatives differ from finite differences (torch.autograd.gradgradcheck)"


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
def test_kept_gradient_linear_is_twice_differentiable(bias):
    g = torch.Generator().manual_seed(0)
    x, w = _leaf(g, 5, 6), _leaf(g, 6, 4)
    b = _leaf(g, 4) if bias else None
    with taken(torch_impl.linear._KeptGradLinear):
        _gradgradcheck("linear_forward", lambda x, w, *b: linear_forward(x, w, b[0] if b else None),
                       (x, w) + ((b,) if bias else ()))


@pytest.mark.parametrize("ignored", [False, True], ids=["every target", "some ignored"])
def test_sliced_head_and_loss_are_twice_differentiable(ignored):
    g = torch.Generator().manual_seed(1)
    x, head = _leaf(g, 1, 3, 3), _leaf(g, 10, 3)  # V = 10 in slices of 4: uneven slices
    targets = torch.randint(0, 10, (1, 3), generator=g)
    if ignored:
        targets[0, 1] = -100
    ignore_index = -100 if ignored else None
    with head_slices(4), taken(torch_impl.head._SlicedHead):
        _gradgradcheck("head_loss_forward", lambda x, head: head_loss_forward(x, head, targets, ignore_index),
                       (x, head))
        _gradgradcheck("head_forward", lambda x, head: head_forward(x, head), (x, head))


def test_embedding_with_kept_gradient_is_twice_differentiable():
    g = torch.Generator().manual_seed(2)
    wte, wpe = _leaf(g, 11, 4), _leaf(g, 6, 4)
    ids = torch.tensor([[1, 3, 3, 0], [10, 1, 2, 3]])  # a repeated id: its rows add up
    with taken(torch_impl.embedding._EmbeddingKeptGrad):
        # squared, so the second derivative is not zero and depends on wte
        _gradgradcheck("embedding_forward", lambda wte, wpe: embedding_forward(ids, wte, wpe) ** 2, (wte, wpe))


def _penalty_grads(model: GPTModel, ids: torch.Tensor, autocast: bool) -> dict[str, torch.Tensor]:
    """The first-order gradients (taken with create_graph=True) and the gradients of the penalty
    sum_p |dloss/dp|^2 with respect to every parameter."""
    params = dict(model.named_parameters())
    with sdpa_kernel(SDPBackend.MATH), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _, loss = model(ids[:, :-1], ids[:, 1:])
    first = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    penalty = sum((d.float() ** 2).sum() for d in first)
    second = torch.autograd.grad(penalty, list(params.values()))
    return ({f"d loss/d {n}": d.detach() for n, d in zip(params, first)}
            | {f"d penalty/d {n}": d for n, d in zip(params, second)})


@pytest.mark.parametrize("tied", [True, False], ids=["tied head", "separate head"])
def test_gradient_penalty_through_the_model_in_float32_matches_plain_torch(tied):
    model = GPTModel(get_config("tiny", tie_embeddings=tied), seed=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    used = (torch_impl.linear._KeptGradLinear, torch_impl.head._SlicedHead, torch_impl.embedding._EmbeddingKeptGrad)
    with head_slices(7), ExitStack() as stack:
        for function in used:
            stack.enter_context(taken(function))
        ours = _penalty_grads(model, ids, autocast=False)
    with head_slices(7), plain_ops():
        plain = _penalty_grads(model, ids, autocast=False)
    assert_dicts_close("gradient penalty, ours vs plain torch", ours, plain, gradient_tol("float32"))


@pytest.mark.parametrize("units", [True, False], ids=["bf16 units", "no bf16 units"])
def test_gradient_penalty_under_bf16_autocast_matches_plain_autocast(units):
    model = GPTModel(get_config("tiny", tie_embeddings=True), seed=4)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    used = (torch_impl.linear._KeptBf16Linear, torch_impl.head._Bf16LogitsLoss) if units \
        else (torch_impl.linear._Bf16Linear,)
    with mock.patch.object(torch_impl.linear, "cpu_has_fast_bf16", lambda: units):
        with ExitStack() as stack:
            for function in used:
                stack.enter_context(taken(function))
            ours = _penalty_grads(model, ids, autocast=True)
        with plain_ops():
            plain = _penalty_grads(model, ids, autocast=True)
    assert_dicts_close("gradient penalty under bf16 autocast, ours vs plain autocast", ours, plain, gradient_tol("bfloat16"))


def test_first_derivatives_with_and_without_create_graph_agree():
    """create_graph=True takes the plain formulas; without it, kept memory: the same gradients."""
    model = GPTModel(get_config("tiny"), seed=5)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    params = dict(model.named_parameters())
    results = {}
    for create_graph in (False, True):
        with head_slices(7), sdpa_kernel(SDPBackend.MATH):
            _, loss = model(ids[:, :-1], ids[:, 1:])
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        results[create_graph] = {n: d.detach().clone() for n, d in zip(params, grads)}
    for n in params:
        assert_close(f"d loss/d {n}, create_graph=True vs False", results[True][n], results[False][n],
                     gradient_tol("float32"))


@pytest.mark.parametrize("tied", [True, False], ids=["tied head", "separate head"])
def test_a_batched_backward_equals_one_backward_per_row(tied):
    """autograd.grad(is_grads_batched=True) and jacobian(vectorize=True) run the backward under
    (legacy) vmap, where the kept path's out= products have no batching rule: they raised. Each
    batched row must be the gradient a plain backward gives for that row's upstream gradient."""
    model = GPTModel(get_config("tiny", tie_embeddings=tied), seed=6).double()
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(6))
    params = [p for _, p in model.named_parameters()]
    with head_slices(7), ExitStack() as stack:
        for function in (torch_impl.linear._KeptGradLinear, torch_impl.head._SlicedHead,
                         torch_impl.embedding._EmbeddingKeptGrad):
            stack.enter_context(taken(function))
        logits = model(ids)
        upstream = torch.randn(3, *logits.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        batched = torch.autograd.grad(logits, params, upstream, is_grads_batched=True, retain_graph=True)
        rows = [torch.autograd.grad(logits, params, u, retain_graph=True) for u in upstream]
    names = [n for n, _ in model.named_parameters()]
    for i in range(len(upstream)):
        assert_dicts_close(f"batched backward row {i}", {n: b[i] for n, b in zip(names, batched)},
                           dict(zip(names, rows[i])), gradient_tol("float64"))


def test_compiled_autograd_gives_the_eager_gradients():
    """An eager forward whose backward runs under compiled autograd (a backward() inside a
    torch.compile'd function with torch._dynamo.config.compiled_autograd on): a tied sliced head
    handed its gradient to the embedding in Python, and compiled autograd then added a None."""
    import torch._dynamo

    model = GPTModel(get_config("tiny", tie_embeddings=True), seed=8)  # (untied took no Python hand-over)
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(8))
    params = dict(model.named_parameters())

    def grads_of(run_backward):
        model.zero_grad(set_to_none=True)
        with head_slices(7):
            _, loss = model(ids, ids)
            run_backward(loss)
        return {n: p.grad.clone() for n, p in params.items()}

    eager = grads_of(lambda loss: loss.backward())
    torch._dynamo.reset()
    try:
        with mock.patch.object(torch._dynamo.config, "compiled_autograd", True):
            compiled = grads_of(torch.compile(lambda loss: loss.backward(), backend="eager"))
    finally:
        torch._dynamo.reset()
    assert_dicts_close("compiled autograd vs eager backward", compiled, eager, gradient_tol("float32"))


def test_a_batched_backward_without_create_graph_returns_plain_tensors():
    """graph_backward always asked autograd for a graph: a batched backward returned gradients
    that required grad and kept the graph alive, where plain torch returns plain tensors."""
    model = GPTModel(get_config("tiny", tie_embeddings=True), seed=9)
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(9))
    params = [p for _, p in model.named_parameters()]
    with head_slices(7):
        logits = model(ids)
        upstream = torch.randn(2, *logits.shape, generator=torch.Generator().manual_seed(10))
        grads = torch.autograd.grad(logits, params, upstream, is_grads_batched=True)
    carrying = [n for (n, _), g in zip(model.named_parameters(), grads) if g.requires_grad]
    assert not carrying, f"a batched backward without create_graph returned graphs for {carrying[:3]}"


def test_a_second_backward_after_an_in_place_weight_change_uses_the_forward_weights_as_autocast_does():
    """Under bf16 autocast with bf16 units, _KeptBf16Linear's plain backward read the weight as it
    is now; plain autocast's backward uses its forward-time cast (and the kept path its bf16
    copy). An optimiser-like in-place change between the forward and a create_graph backward
    gave another dx, silently."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 8, generator=g, requires_grad=True)
    w = torch.randn(8, 5, generator=g, requires_grad=True)
    upstream = torch.randn(6, 5, generator=g)

    def dx(kept: bool) -> torch.Tensor:
        with mock.patch.object(torch_impl.linear, "cpu_has_fast_bf16", lambda: True), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            y = linear_forward(x, w, None) if kept else x @ w
        before = w.detach().clone()
        with torch.no_grad():
            w.mul_(10)  # after the forward, before the backward
        try:
            return torch.autograd.grad(y, x, upstream, create_graph=True)[0].detach()
        finally:
            with torch.no_grad():
                w.copy_(before)

    with taken(torch_impl.linear._KeptBf16Linear):
        ours = dx(kept=True)
    assert torch.equal(ours, dx(kept=False)), "dx after an in-place change differs from plain autocast's"
