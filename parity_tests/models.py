"""Running the same model in both trees: build, copy weights, forward, loss and gradients.

Used by the model-level tests, `gpt-oracle check` and `gpt-oracle diff`. The NumPy tree runs in
float64 (the oracle); the torch tree in the dtype under test.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np

from parity_tests.compare import load_numpy_params_into_torch, to_numpy


@dataclass
class RunResult:
    logits: np.ndarray
    loss: float
    grads: dict[str, np.ndarray]


def numpy_config(d: Mapping):
    from numpy_ref.config import GPTConfig

    return GPTConfig(**dict(d))


def torch_config(d: Mapping):
    from torch_impl.config import GPTConfig

    return GPTConfig(**dict(d))


def config_dict(config) -> dict:
    return dict(config.to_dict())


def build_numpy_model(config_d: Mapping, seed: int = 0, params: Mapping[str, np.ndarray] | None = None):
    from numpy_ref.model import GPTModel

    model = GPTModel(numpy_config(config_d), seed=seed, dtype=np.float64)
    if params is not None:
        for k, v in params.items():
            if k not in model.params:
                raise KeyError(f"{k} is not a parameter of this numpy_ref model")
            model.params[k][...] = v
    return model


def build_torch_model(config_d: Mapping, params: Mapping[str, np.ndarray], dtype: str = "float64", device: str = "cpu"):
    import torch

    from torch_impl.model import GPTModel

    tdtype = {"float64": torch.float64, "float32": torch.float32, "tf32": torch.float32,
              "bfloat16": torch.float32, "float16": torch.float32}[dtype]
    model = GPTModel(torch_config(config_d), seed=0, dtype=tdtype, device=device)
    load_numpy_params_into_torch(model, params)
    model.eval()
    return model


def run_numpy(model, ids: np.ndarray, targets: np.ndarray, *, ignore_index: int | None = None,
              dropout_masks: Mapping[str, np.ndarray] | None = None) -> RunResult:
    logits, loss, cache = model.forward(ids, targets, ignore_index=ignore_index, dropout_masks=dropout_masks)
    grads = model.backward(cache)
    return RunResult(np.asarray(logits), float(loss), {k: np.asarray(v) for k, v in grads.items()})


def torch_logits_and_loss(model, ids_t, targets_t, **kwargs):
    """torch_impl's forward returns (logits, loss) when given targets."""
    out = model(ids_t, targets_t, **kwargs)
    logits, loss = out
    return logits, loss


def run_torch(model, ids: np.ndarray, targets: np.ndarray, dtype: str = "float64", device: str = "cpu", *,
              ignore_index: int | None = None, dropout_masks: Mapping[str, np.ndarray] | None = None) -> RunResult:
    """torch_impl's logits, loss and gradients in `dtype`; `dropout_masks` (the oracle's arrays)
    are handed over in the parameters' dtype, on `device`."""
    import torch

    ids_t = torch.from_numpy(ids).to(device)
    targets_t = torch.from_numpy(targets).to(device)
    extra = {} if ignore_index is None else {"ignore_index": ignore_index}
    if dropout_masks is not None:
        like = next(model.parameters())
        extra["dropout_masks"] = {k: torch.from_numpy(np.asarray(m)).to(device=like.device, dtype=like.dtype)
                                  for k, m in dropout_masks.items()}
    model.zero_grad(set_to_none=True)
    autocast = dtype in ("bfloat16", "float16")
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        amp_dtype = getattr(torch, dtype) if autocast else torch.bfloat16  # unused when autocast is off (tf32 too)
        with torch.autocast(device_type=device.split(":")[0], dtype=amp_dtype, enabled=autocast):
            logits, loss = torch_logits_and_loss(model, ids_t, targets_t, **extra)
        loss.backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    # The run must have been in the precision asked for: a bf16 row whose autocast did nothing
    # would be float32 judged by bf16's looser tolerance, and pass.
    want = {"float64": torch.float64, "float32": torch.float32, "tf32": torch.float32,
            "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if logits.dtype != want:
        raise AssertionError(f"torch_impl's logits are {logits.dtype} in a {dtype} run (expected {want}): "
                             f"the run did not compute in the precision it is judged by")
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    if missing:  # never zeros in their place: the message says what is wrong
        raise AssertionError(f"torch_impl gave no gradient for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    grads = {name: to_numpy(p.grad) for name, p in model.named_parameters()}
    return RunResult(to_numpy(logits).astype(np.float64), float(loss.detach().to(torch.float64).cpu()), grads)


@contextlib.contextmanager
def head_slices(rows: int) -> Iterator[None]:
    """Run torch_impl's output head on the CPU in slices of `rows` vocabulary rows.

    The sliced head (torch_impl/head.py, HEAD_CHUNK = 512) only runs where V > HEAD_CHUNK,
    which no test-sized vocabulary reaches; this makes tiny models take it, with uneven slices.
    `rows` >= V gives the one-GEMM path.
    """
    import torch_impl.head as head

    before = head.HEAD_CHUNK
    head.HEAD_CHUNK = rows
    try:
        yield
    finally:
        head.HEAD_CHUNK = before


def step_flops_by_head_slices(model, ids, slice_rows=(7, 10**9)) -> dict[int, int]:
    """FlopCounterMode's count of one training step (forward and backward of the loss on `ids`
    as their own targets) of a torch_impl model, for each head slice size in `slice_rows`
    (10**9: the one-product head)."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = {}
    for rows in slice_rows:
        with head_slices(rows), FlopCounterMode(display=False) as counter:
            _, loss = model(ids, ids)
            loss.backward()
        model.zero_grad(set_to_none=True)
        counts[rows] = counter.get_total_flops()
    return counts


@contextlib.contextmanager
def split_products() -> Iterator[None]:
    """Decode on the CPU as at GPT-2's sizes: every few-row product split into SPLIT_K parts of
    C_in (torch_impl/linear.py), which weights under SPLIT_MIN_BYTES (2 MB: every weight of a
    test-sized model) skip. head.py reads the threshold too."""
    import torch_impl.head as head
    import torch_impl.linear as linear

    before = linear.SPLIT_MIN_BYTES, head.SPLIT_MIN_BYTES
    linear.SPLIT_MIN_BYTES = head.SPLIT_MIN_BYTES = 0
    try:
        yield
    finally:
        linear.SPLIT_MIN_BYTES, head.SPLIT_MIN_BYTES = before


def random_batch(config_d: Mapping, B: int, T: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config_d["vocab_size"], size=(B, T), dtype=np.int64)
    targets = rng.integers(0, config_d["vocab_size"], size=(B, T), dtype=np.int64)
    return ids, targets


def scale_params(params: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Perturb the freshly initialised biases and layer-norm parameters away from 0 and 1, so a
    bug that only shows with non-trivial values (a dropped bias, a swapped gamma/beta) shows."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in params.items():
        if v.ndim == 1:
            base = 1.0 if k.endswith("ln_1.weight") or k.endswith("ln_2.weight") or k == "ln_f.weight" else 0.0
            out[k] = base + 0.1 * rng.standard_normal(v.shape)
        else:
            out[k] = v.astype(np.float64)
    return out
