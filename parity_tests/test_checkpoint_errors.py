"""Checkpoints that must not load, in both trees, and writes that must not half-happen.

Each malformed case starts from a good checkpoint, breaks one thing, and requires each tree's
`CheckpointError` (a ValueError) whose message names the file and, where there is one, the key.
The atomic-write tests make a save fail part way and require the previous files unchanged and
no temporary file left behind.
"""

import ast
import inspect
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as official_load_np
from safetensors.numpy import save_file as official_save_np

import numpy_ref.checkpoint as nck
import numpy_ref.safetensors_io as nio
import torch_impl.checkpoint as tck
from parity_tests import checkpoint_cases as cc

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def _rewrite(d: Path, change) -> None:
    """Load model.safetensors with the official package, apply `change(dict)`, save it back."""
    tensors = official_load_np(str(d / WEIGHTS))
    change(tensors)
    official_save_np(tensors, str(d / WEIGHTS), metadata={"format": "pt"})


def _patch_bytes(d: Path, change) -> None:
    (d / WEIGHTS).write_bytes(change((d / WEIGHTS).read_bytes()))


def _header_len(b: bytes) -> int:
    return int.from_bytes(b[:8], "little")


def _set(key, fn):
    def change(t):
        t[key] = fn(t[key])
    return change


def _inf_at_3(a):
    a = a.copy()
    a.flat[3] = np.inf
    return a


def _nan_at_3(a):
    a = a.copy()
    a.flat[3] = np.nan
    return a


def _del(key):
    return lambda t: t.pop(key)


# case name -> (config overrides, how to break the directory, file named in the error, key named)
CASES = {
    "empty": ({}, lambda d: (d / WEIGHTS).write_bytes(b""), WEIGHTS, None),
    "shorter than the length field": ({}, lambda d: _patch_bytes(d, lambda b: b[:5]), WEIGHTS, None),
    "truncated data": ({}, lambda d: _patch_bytes(d, lambda b: b[: len(b) - 100]), WEIGHTS, "transformer."),
    "truncated header": ({}, lambda d: _patch_bytes(d, lambda b: b[:40]), WEIGHTS, None),
    "oversized header length": ({}, lambda d: _patch_bytes(d, lambda b: (2**40).to_bytes(8, "little") + b[8:]),
                                WEIGHTS, None),
    "header length past the end": ({}, lambda d: _patch_bytes(d, lambda b: len(b).to_bytes(8, "little") + b[8:]),
                                   WEIGHTS, None),
    "bad header JSON": ({}, lambda d: _patch_bytes(d, lambda b: b[:8] + b"[" + b[9:]), WEIGHTS, None),
    "missing key": ({}, lambda d: _rewrite(d, _del("transformer.h.1.mlp.c_fc.bias")), WEIGHTS,
                    "transformer.h.1.mlp.c_fc.bias"),
    "tied, wte missing, lm_head present": (
        {"tie_embeddings": True}, lambda d: _rewrite(d, lambda t: t.update(
            {"lm_head.weight": t.pop("transformer.wte.weight")})), WEIGHTS, "transformer.wte.weight"),
    "missing lm_head": ({}, lambda d: _rewrite(d, _del("lm_head.weight")), WEIGHTS, "lm_head.weight"),
    "extra key": ({}, lambda d: _rewrite(d, lambda t: t.update({"transformer.h.0.attn.extra": np.zeros(3, np.float32)})),
                  WEIGHTS, "transformer.h.0.attn.extra"),
    "wrong shape": ({}, lambda d: _rewrite(d, _set("transformer.ln_f.bias", lambda a: np.zeros(33, np.float32))),
                    WEIGHTS, "transformer.ln_f.bias"),
    "transposed weight": ({}, lambda d: _rewrite(d, _set("transformer.h.0.attn.c_attn.weight",
                                                         lambda a: np.ascontiguousarray(a.T))),
                          WEIGHTS, "transformer.h.0.attn.c_attn.weight"),
    "float64 tensor": ({}, lambda d: _rewrite(d, _set("transformer.wpe.weight", lambda a: a.astype(np.float64))),
                       WEIGHTS, "transformer.wpe.weight"),
    "NaN value": ({}, lambda d: _rewrite(d, _set("transformer.h.0.ln_2.weight", _nan_at_3)), WEIGHTS,
                  "transformer.h.0.ln_2.weight"),
    "inf value": ({}, lambda d: _rewrite(d, _set("lm_head.weight", _inf_at_3)), WEIGHTS,
                  "lm_head.weight"),
    "non-zero c_attn bias without qkv_bias": (
        {"qkv_bias": False}, lambda d: _rewrite(d, _set("transformer.h.1.attn.c_attn.bias", lambda a: a + 1)),
        WEIGHTS, "transformer.h.1.attn.c_attn.bias"),
    "no weights file": ({}, lambda d: (d / WEIGHTS).unlink(), WEIGHTS, None),
    "bad config JSON": ({}, lambda d: (d / CONFIG).write_text("{\"n_embd\": 32,"), CONFIG, None),
    "unknown gpt_oracle field": ({}, lambda d: (d / CONFIG).write_text(json.dumps(
        {**json.loads((d / CONFIG).read_text()), "gpt_oracle": {**cc.TINY, "bogus": 1}})), CONFIG, "bogus"),
    "a flag as a string": ({}, lambda d: (d / CONFIG).write_text(json.dumps(
        {**json.loads((d / CONFIG).read_text()), "gpt_oracle": {**cc.TINY, "qkv_bias": "false"}})), CONFIG,
        "gpt_oracle"),
    "config fields disagree": ({}, lambda d: (d / CONFIG).write_text(json.dumps(
        {**json.loads((d / CONFIG).read_text()), "n_embd": 64})), CONFIG, "n_embd"),
    "unsupported activation": ({}, lambda d: (d / CONFIG).write_text(json.dumps(
        {**json.loads((d / CONFIG).read_text()), "activation_function": "relu"})), CONFIG, "activation_function"),
}


def _good_checkpoint(d: Path, overrides: dict) -> None:
    cfg = cc.tiny(**overrides)
    nck.save_checkpoint(d, cc.numpy_config(cfg), cc.random_params(cfg, 0))


@pytest.mark.parametrize("tree", ["numpy_ref", "torch_impl"])
@pytest.mark.parametrize("case", list(CASES))
def test_malformed_checkpoint_raises_one_clear_error(case, tree):
    overrides, breaker, file_name, key = CASES[case]
    module = nck if tree == "numpy_ref" else tck
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _good_checkpoint(d, overrides)
        module.load_checkpoint(d)  # the unbroken checkpoint loads
        breaker(d)
        with pytest.raises(module.CheckpointError) as info:
            module.load_checkpoint(d)
    message = str(info.value)
    assert isinstance(info.value, ValueError), f"{tree}: CheckpointError must be a ValueError"
    assert str(d / file_name) in message, f"{tree}, {case}: the error does not name {d / file_name}: {message}"
    if key is not None:
        assert key in message, f"{tree}, {case}: the error does not name the key {key!r}: {message}"
    if case == "float64 tensor":
        assert "float32" in message, f"{tree}: a float64 tensor's error should say checkpoints are float32: {message}"


# ---- the NumPy safetensors reader's own checks (the package checks these in torch_impl) ------


def _raw_file(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


READER_CASES = {
    "unknown dtype": ({"a": {"dtype": "F12", "shape": [2], "data_offsets": [0, 8]}}, 8, "'a'"),
    "size mismatch": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "'a'"),
    "overlap": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "'b'"),
    "gap": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "'a'"),
    "bytes not covered": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 12, "8 bytes"),
    "offsets past the end": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8, "'a'"),
    "negative dimension": ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, 0, "'a'"),
    "extra entry field": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, 4, "'a'"),
    "metadata not strings": ({"__metadata__": {"format": 1}}, 0, "__metadata__"),
    "header not an object": ([1, 2], 0, "JSON object"),
}


@pytest.mark.parametrize("case", list(READER_CASES))
def test_numpy_safetensors_reader_names_the_problem(case):
    header, n_data, named = READER_CASES[case]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(_raw_file(header, b"\0" * n_data))
        with pytest.raises(nio.CheckpointError) as info:
            nio.read_safetensors(path)
    assert str(path) in str(info.value) and named in str(info.value), f"{case}: {info.value}"


def test_numpy_reader_rejects_duplicate_keys():
    text = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    text += b" " * (-len(text) % 8)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dup.safetensors"
        path.write_bytes(len(text).to_bytes(8, "little") + text + b"\0")
        with pytest.raises(nio.CheckpointError, match="more than once"):
            nio.read_safetensors(path)


# ---- atomic writes ---------------------------------------------------------------------------


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _fail_mid_numpy_write(monkeypatch):
    """The header and the first tensor reach the temp file, then the disk is 'full'."""
    real = nio.encode_safetensors

    class Full:
        def reshape(self, *_):
            raise OSError("No space left on device (simulated)")

    monkeypatch.setattr(nio, "encode_safetensors", lambda *a, **k: (real(*a, **k)[0], real(*a, **k)[1][:1] + [Full()]))


def _fail_mid_torch_write(monkeypatch):
    """Half of the file reaches the temp path, then the disk is 'full'."""
    real = tck.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError("No space left on device (simulated)")

    monkeypatch.setattr(tck, "save_file", half_then_fail)


def _fail_at_rename(module):
    def patch(monkeypatch):
        def fail(*_):
            raise OSError("rename failed (simulated)")
        monkeypatch.setattr(module.os, "replace", fail)
    return patch


@pytest.mark.parametrize("tree,failure", [("numpy_ref", "mid-write"), ("numpy_ref", "rename"),
                                          ("torch_impl", "mid-write"), ("torch_impl", "rename")])
def test_a_failed_save_leaves_the_previous_checkpoint_intact(tree, failure, monkeypatch):
    cfg = cc.tiny()
    old, new = cc.random_params(cfg, 1), cc.random_params(cfg, 2)
    if tree == "numpy_ref":
        save = lambda d, p: nck.save_checkpoint(d, cc.numpy_config(cfg), p)  # noqa: E731
        breaker = _fail_mid_numpy_write if failure == "mid-write" else _fail_at_rename(nio)
    else:
        save = lambda d, p: tck.save_checkpoint(d, cc.torch_config(cfg), {k: torch.from_numpy(v) for k, v in p.items()})  # noqa: E731
        breaker = _fail_mid_torch_write if failure == "mid-write" else _fail_at_rename(tck)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        save(d, old)
        before = _snapshot(d)
        breaker(monkeypatch)
        with pytest.raises(OSError, match="simulated"):
            save(d, new)
        monkeypatch.undo()
        after = _snapshot(d)
        assert sorted(after) == sorted(before), f"{tree}: files after a failed save: {sorted(after)}"
        for name in before:
            assert after[name] == before[name], f"{tree}: {name} changed although its save failed"
        _, params = nck.load_checkpoint(d)
        assert all(np.array_equal(params[k], old[k]) for k in old), f"{tree}: the old checkpoint no longer loads"



@pytest.mark.parametrize("tree", ["numpy_ref", "torch_impl"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e39])  # 1e39 is finite in float64, inf in the float32 file
def test_save_refuses_values_the_float32_file_cannot_hold(tree, bad):
    cfg = cc.tiny()
    params = {k: v.astype(np.float64) for k, v in cc.random_params(cfg, 1).items()}
    params["ln_f.bias"][3] = bad
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "ckpt"
        error = (nck if tree == "numpy_ref" else tck).CheckpointError
        with pytest.raises(error, match=r"key 'ln_f.bias' has 1 values that are not finite in float32 "
                                                  r"\(first at index \(3,\)"):
            if tree == "numpy_ref":
                nck.save_checkpoint(d, cc.numpy_config(cfg), params)
            else:
                tck.save_checkpoint(d, cc.torch_config(cfg), {k: torch.from_numpy(v) for k, v in params.items()})
        assert not d.exists(), f"{tree}: a refused save still wrote {sorted(p.name for p in d.iterdir())}"

def test_failed_trainer_state_save_leaves_no_partial_state(monkeypatch):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        nck.save_trainer_state(d, {"step": 1}, {"m": np.zeros(3)})
        before = _snapshot(d)
        with pytest.raises(TypeError):
            nck.save_trainer_state(d, {"step": object()}, {"m": np.ones(3)})  # not JSON: nothing written
        assert _snapshot(d) == before, "a trainer state that cannot be serialised still changed the files"


# ---- nothing unpickles -----------------------------------------------------------------------


@pytest.mark.parametrize("module", [nck, nio, tck])
def test_checkpoint_code_never_unpickles(module):
    tree = ast.parse(inspect.getsource(module))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any(n.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle") for n in names), \
                f"{module.__name__} imports a pickle module: {names}"
        if isinstance(node, ast.Attribute) and node.attr == "load" and isinstance(node.value, ast.Name):
            assert node.value.id not in ("torch", "pickle", "np", "numpy"), \
                f"{module.__name__} calls {node.value.id}.load, which can unpickle"


def test_a_pickle_only_directory_is_refused_not_unpickled():
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _good_checkpoint(d, {})
        (d / WEIGHTS).unlink()
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
        for module in (nck, tck):
            with pytest.raises(module.CheckpointError, match="pickle"):
                module.load_checkpoint(d)
