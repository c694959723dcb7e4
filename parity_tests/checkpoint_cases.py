"""Shared helpers for the checkpoint tests (test_checkpoint.py, test_checkpoint_errors.py).

Tiny configurations in both trees' config classes, random parameters in which every tensor
(biases and layer-norm gains included) holds distinct values, so a swapped or dropped key
changes the logits, Hugging Face settings that keep `transformers` offline, and `DiskFaults`,
which fails a save's file-system calls one at a time and photographs the directory after each.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np

from parity_tests.strategies import random_array

# Never touch the network: transformers and huggingface_hub read these at import and call time.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
os.environ.update(OFFLINE_ENV)

TINY = dict(vocab_size=100, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
            qkv_bias=True, tie_embeddings=False, ln_eps=1e-5)


def tiny(**overrides) -> dict:
    return {**TINY, **overrides}


def numpy_config(d: Mapping):
    from numpy_ref.config import GPTConfig

    return GPTConfig(**dict(d))


def torch_config(d: Mapping):
    from torch_impl.config import GPTConfig

    return GPTConfig(**dict(d))


def random_params(config_d: Mapping, seed: int) -> dict[str, np.ndarray]:
    """name -> float64 array for every parameter of docs/design.md's table, all non-trivial.

    Values are rounded through float32 so that a float32 file holds them exactly."""
    from numpy_ref.params import param_shapes

    shapes = param_shapes(numpy_config(config_d))
    return {name: random_array(seed + i, shape, scale=0.3).astype(np.float32).astype(np.float64)
            for i, (name, shape) in enumerate(shapes)}


def hf_config(config_d: Mapping):
    """transformers.GPT2Config for the same model (tanh GELU, no dropout, no special tokens)."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=config_d["vocab_size"], n_positions=config_d["context_length"],
                      n_embd=config_d["emb_dim"], n_layer=config_d["n_layers"], n_head=config_d["n_heads"],
                      layer_norm_epsilon=config_d["ln_eps"], tie_word_embeddings=config_d["tie_embeddings"],
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    """A transformers GPT-2's logits in float64 (the model is converted to float64 first)."""
    import torch

    model = model.double().eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def sample_ids(config_d: Mapping, seed: int, B: int = 2, T: int | None = None) -> np.ndarray:
    """(B, T) ids with both ends of the vocabulary present; T defaults to the context length."""
    T = T or config_d["context_length"]
    ids = np.random.default_rng(seed).integers(0, config_d["vocab_size"], size=(B, T))
    ids[0, 0], ids[-1, -1] = 0, config_d["vocab_size"] - 1
    return ids.astype(np.int64)


# ---- fault injection for the all-or-nothing saves ---------------------------------------------


class DiskFaults:
    """Wraps the file-system calls a save makes (temporary files, mode, fsync, rename, unlink,
    mkdir, rmdir), counts them, makes call number `fail_at` raise OSError (only that one, or every
    one from it on), and photographs `directory` after every call that changes what is in it.

    `install(monkeypatch)` patches the `os` and `tempfile` modules themselves, so both trees'
    checkpoint code, and anything it calls, go through the wrappers while the test runs.
    """

    CALLS = {"os": ("chmod", "fsync", "replace", "unlink", "mkdir", "rmdir"), "tempfile": ("mkstemp",)}
    CHANGES = ("replace", "unlink", "mkdir", "rmdir", "mkstemp")  # calls after which the directory may differ

    def __init__(self, directory, fail_at: int | None = None, persistent: bool = False):
        self.directory, self.fail_at, self.persistent = directory, fail_at, persistent
        self.calls: list[str] = []  # every call made, in order: "replace model.safetensors", ...
        self.failed: list[str] = []  # the calls made to fail
        self.photos: list[tuple[str, dict[str, bytes] | None]] = []  # (after which call, the directory)

    def install(self, monkeypatch) -> None:
        for module in (os, tempfile):
            for name in self.CALLS[module.__name__]:
                monkeypatch.setattr(module, name, self._wrap(name, getattr(module, name)))

    def _wrap(self, name, real):
        def call(*args, **kwargs):
            what = f"{name} {_describe(name, args, kwargs)}"
            self.calls.append(what)
            n = len(self.calls)
            if self.fail_at is not None and (n == self.fail_at or (self.persistent and n > self.fail_at)):
                self.failed.append(what)
                raise OSError(f"injected failure at call {n}: {what}")
            result = real(*args, **kwargs)
            if name in self.CHANGES:
                self.photos.append((what, photograph(self.directory)))
            return result
        return call


def _describe(name: str, args, kwargs) -> str:
    """A call's file names ("model.safetensors -> .model.safetensors.x.old"), or what an fsync syncs."""
    if name == "fsync":
        return "directory" if stat.S_ISDIR(os.fstat(args[0]).st_mode) else "file"
    if name == "mkstemp":
        return f"{kwargs.get('prefix', '')}*{kwargs.get('suffix', '')}"
    return " -> ".join(Path(a).name for a in args if isinstance(a, str) or hasattr(a, "__fspath__"))


def photograph(directory) -> dict[str, bytes] | None:
    """name -> bytes of every file in `directory` (None if there is no such directory)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def restore(photo: dict[str, bytes], directory) -> None:
    """Write a photograph's files into the (new, empty) `directory`."""
    Path(directory).mkdir(parents=True)
    for name, data in photo.items():
        (Path(directory) / name).write_bytes(data)


# ---- two versions of a checkpoint, for the all-or-nothing tests -------------------------------
# (test_checkpoint_errors.py fails each file-system call of a save; test_checkpoint_faults.py
# interrupts each one just after it has taken effect.) The two models differ in config.json's
# ln_eps too: old weights with the new config.json (or the reverse) would load without complaint,
# which is the mix those tests must never see.

SMALL = dict(vocab_size=11, context_length=4, emb_dim=8, n_heads=2, n_layers=1)  # many saves: keep them small
OLD_CFG, NEW_CFG = tiny(**SMALL), tiny(**SMALL, ln_eps=0.1)
OLD_PARAMS, NEW_PARAMS = random_params(OLD_CFG, 1), random_params(NEW_CFG, 2)
OLD_STATE, NEW_STATE = ({"step": 1}, {"exp_avg.x": np.zeros(3), "exp_avg_sq.x": np.zeros((2, 2))}), \
                       ({"step": 2}, {"exp_avg.x": np.ones(3), "exp_avg_sq.x": np.full((2, 2), 0.5)})


def save_version(tree: str, kind: str, d, which: str) -> None:
    """Save the old or the new model checkpoint (kind "model") or trainer state (any other kind)
    into `d` with `tree` ("numpy_ref" or "torch_impl")."""
    if tree == "numpy_ref":
        import numpy_ref.checkpoint as module

        as_tree = lambda a: a  # noqa: E731
    else:
        import torch

        import torch_impl.checkpoint as module

        as_tree = torch.from_numpy
    if kind == "model":
        cfg, params = (OLD_CFG, OLD_PARAMS) if which == "old" else (NEW_CFG, NEW_PARAMS)
        config = numpy_config(cfg) if tree == "numpy_ref" else torch_config(cfg)
        module.save_checkpoint(d, config, {k: as_tree(v) for k, v in params.items()})
    else:
        state, tensors = OLD_STATE if which == "old" else NEW_STATE
        module.save_trainer_state(d, state, {k: as_tree(v) for k, v in tensors.items()})
