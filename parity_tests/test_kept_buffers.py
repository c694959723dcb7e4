"""torch_impl/kept_buffers.py: CPU gradients and logits reuse last step's memory, and only when
nobody can see it.

Every test runs the real training path of a tiny float64 model on the CPU (the head in slices of
7 rows, so the logits and the tied head's gradient take the kept path too) and checks two things:
that the memory is reused when it is free, and that no tensor anyone still holds changes.
"""

from __future__ import annotations

import copy

import pytest
import torch

from parity_tests.compare import assert_close
from parity_tests.models import head_slices
from parity_tests.tolerances import gradient_tol
from torch_impl import kept_buffers
from torch_impl.config import get_config
from torch_impl.model import GPTModel

EXACT = gradient_tol("float64")


def _model(tie: bool) -> GPTModel:
    return GPTModel(get_config("tiny", tie_embeddings=tie), seed=3, dtype=torch.float64).train()


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and targets (4, 8): 32 rows, more than linear.SPLIT_MAX_ROWS, so even a forward without
    gradients takes the sliced head (fewer rows are decoding's split product, which keeps nothing)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 101, (4, 8), generator=gen), torch.randint(0, 101, (4, 8), generator=gen)


def _backward(model: GPTModel, seed: int) -> None:
    ids, targets = _batch(seed)
    with head_slices(7):
        _, loss = model(ids, targets)
    loss.backward()


def _grads_alone(model: GPTModel, seed: int) -> dict[str, torch.Tensor]:
    """The gradients of one backward on a fresh copy of the model (its own buffers)."""
    twin = copy.deepcopy(model)
    twin.zero_grad(set_to_none=True)
    _backward(twin, seed)
    return {n: p.grad.clone() for n, p in twin.named_parameters()}


def _matrices(model: GPTModel) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.ndim == 2 and n != "wpe.weight"}


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_free_gradient_memory_is_reused_and_the_values_are_right(tie):
    model = _model(tie)
    _backward(model, 0)
    first = {n: p.grad.data_ptr() for n, p in _matrices(model).items()}
    model.zero_grad(set_to_none=True)
    _backward(model, 1)
    expected = _grads_alone(_model(tie), 1)
    for name, p in _matrices(model).items():
        assert p.grad.data_ptr() == first[name], f"{name}: the second step's gradient got new memory"
    for name, p in model.named_parameters():
        assert_close(f"{name} gradient, second step", p.grad, expected[name], EXACT)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gradients_someone_holds_are_never_overwritten(tie):
    model = _model(tie)
    _backward(model, 0)
    held = {n: p.grad for n, p in _matrices(model).items()}  # references, as a logger might keep
    rows = {n: g[0] for n, g in held.items()}  # views of them
    values = {n: g.clone() for n, g in held.items()}
    model.zero_grad(set_to_none=True)
    _backward(model, 1)
    expected = _grads_alone(_model(tie), 1)
    for name, p in _matrices(model).items():
        assert_close(f"{name} gradient held from step 1", held[name], values[name], EXACT)
        assert_close(f"{name} row view held from step 1", rows[name], values[name][0], EXACT)
        assert p.grad.data_ptr() != held[name].data_ptr(), f"{name}: step 2 wrote into memory still held"
        assert_close(f"{name} gradient, step 2", p.grad, expected[name], EXACT)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_accumulated_gradients_are_the_sum_of_both_steps(tie):
    model = _model(tie)
    g0, g1 = _grads_alone(model, 0), _grads_alone(model, 1)
    _backward(model, 0)
    _backward(model, 1)  # no zero_grad between: autograd adds into .grad
    for name, p in model.named_parameters():
        assert_close(f"{name} accumulated gradient", p.grad, g0[name] + g1[name], EXACT)


def test_gradients_returned_by_autograd_grad_survive_the_next_backward():
    model = _model(True)
    params = list(_matrices(model).values())
    ids, targets = _batch(0)
    with head_slices(7):
        _, loss = model(ids, targets)
    got = torch.autograd.grad(loss, params)
    values = [g.clone() for g in got]
    _backward(model, 1)
    for (name, _), g, v in zip(_matrices(model).items(), got, values):
        assert_close(f"{name} from autograd.grad, after another backward", g, v, EXACT)


def test_logits_kept_by_the_caller_survive_and_dropped_logits_are_reused():
    model = _model(True).eval()
    _backward(model, 9)  # a training step keeps the logits buffer (inference alone keeps none)
    model.zero_grad(set_to_none=True)
    with torch.no_grad(), head_slices(7):
        first = model(_batch(0)[0])  # in the head's kept buffer
        value = first.clone()
        second = model(_batch(1)[0])  # the kept buffer is held: transient memory
        assert_close("logits held across another forward", first, value, EXACT)
        assert second.data_ptr() != first.data_ptr(), "the second forward wrote into logits still held"
        where = first.data_ptr()
        del first, second
        third = model(_batch(2)[0])
    assert third.data_ptr() == where, "logits nobody holds were not reused"
    kept = kept_buffers._kept[model.wte.weight]["logits"]
    assert third.data_ptr() == kept.data_ptr(), "the logits do not lie in the head's kept buffer"


def test_a_held_storage_object_is_never_overwritten():
    model = _model(False)
    _backward(model, 0)
    p = model.h[0].mlp.c_fc.weight
    storage = p.grad.untyped_storage()  # kept by the caller; the tensor itself is dropped below
    value = p.grad.clone()
    model.zero_grad(set_to_none=True)
    _backward(model, 1)
    seen = torch.empty(0, dtype=p.dtype).set_(storage, 0, p.shape)
    assert_close("gradient storage object held from step 1", seen, value, EXACT)


def test_memory_shared_with_another_process_is_never_reused():
    model = _model(False)
    _backward(model, 0)
    p = model.h[0].mlp.c_fc.weight
    p.grad.share_memory_()  # what torch.multiprocessing does to a tensor put on a queue
    shared_at = p.grad.data_ptr()
    model.zero_grad(set_to_none=True)
    _backward(model, 1)
    assert p.grad.data_ptr() != shared_at and not p.grad.is_shared(), "step 2 wrote into shared memory"
    model.zero_grad(set_to_none=True)
    _backward(model, 2)  # the new buffer is kept from then on
    assert_close("c_fc gradient after the shared buffer was let go", p.grad, _grads_alone(_model(False), 2)[
        "h.0.mlp.c_fc.weight"], EXACT)


def test_gradient_accumulation_keeps_one_set_of_buffers():
    model = _model(True)
    params = list(model.parameters())
    _backward(model, 0)
    one_step = kept_buffers.kept_bytes(params)
    assert one_step >= sum(p.numel() * p.element_size() for p in _matrices(model).values()), (
        f"training on the CPU kept only {one_step} bytes")
    _backward(model, 1)
    _backward(model, 2)  # .grad is held throughout: these go to transient memory
    assert kept_buffers.kept_bytes(params) == one_step, (
        f"accumulating kept {kept_buffers.kept_bytes(params)} bytes, one step {one_step}")
    for name, p in _matrices(model).items():  # the one set kept is .grad itself, not a second copy
        assert kept_buffers._kept[p]["grad"].data_ptr() == p.grad.data_ptr(), f"{name}: a second buffer was kept"


def test_wte_may_change_in_place_between_forward_and_backward_untied():
    model = _model(False)
    ids, targets = _batch(0)
    with head_slices(7):
        _, loss = model(ids, targets)
    with torch.no_grad():
        model.wte.weight.mul_(1.0)  # bumps the version: a saved wte would refuse the backward
    loss.backward()
    assert_close("wte gradient", model.wte.weight.grad, _grads_alone(_model(False), 0)["wte.weight"], EXACT)


@pytest.mark.parametrize("how", ["release_kept_buffers", "model.double()"])
def test_release_and_moving_the_model_let_the_buffers_go(how):
    model = _model(False)
    _backward(model, 0)
    assert kept_buffers.kept_bytes(model.parameters()) > 0, "training on the CPU kept no buffer"
    if how == "release_kept_buffers":
        kept_buffers.release_kept_buffers(model.parameters())
    else:
        model.double()
    assert kept_buffers.kept_bytes(model.parameters()) == 0, f"{how} left buffers behind"
    model.zero_grad(set_to_none=True)
    _backward(model, 1)
    assert_close("c_attn gradient after release", model.h[0].attn.c_attn.weight.grad,
                 _grads_alone(_model(False), 1)["h.0.attn.c_attn.weight"], EXACT)



def test_inference_alone_keeps_no_logits():
    """A forward without gradients on a fresh model (evaluation, generation without a cache,
    classification) held its N x V logits buffer for as long as the model lived; now it keeps
    nothing, and still reuses free logits that training kept."""
    model = _model(True).eval()
    with torch.no_grad(), head_slices(7):
        logits = model(_batch(0)[0])
    del logits
    assert kept_buffers.kept_bytes([model.wte.weight]) == 0, (
        f"inference kept {kept_buffers.kept_bytes([model.wte.weight])} bytes of logits")
    model.train()
    _backward(model, 1)  # training keeps its logits
    kept = kept_buffers._kept[model.wte.weight]["logits"]
    model.zero_grad(set_to_none=True)
    with torch.no_grad(), head_slices(7):
        again = model(_batch(2)[0])
    assert again.data_ptr() == kept.data_ptr(), "evaluation did not reuse the logits training kept"
