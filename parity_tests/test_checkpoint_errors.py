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


INDEX = "model.safetensors.index.json"
SHARD_1, SHARD_2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def _shard(change_index=lambda weight_map: None, change_second=lambda tensors: None):
    """Split model.safetensors in two shards and an index as save_pretrained does, then break one."""
    def breaker(d: Path) -> None:
        tensors = official_load_np(str(d / WEIGHTS))
        (d / WEIGHTS).unlink()
        keys = sorted(tensors)
        first, second = {k: tensors[k] for k in keys[::2]}, {k: tensors[k] for k in keys[1::2]}
        weight_map = {**dict.fromkeys(first, SHARD_1), **dict.fromkeys(second, SHARD_2)}
        change_index(weight_map)
        change_second(second)
        official_save_np(first, str(d / SHARD_1), metadata={"format": "pt"})
        official_save_np(second, str(d / SHARD_2), metadata={"format": "pt"})
        (d / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return breaker


def _without_gpt_oracle(**fields):
    """config.json as transformers writes it: the GPT-2 fields, changed by `fields`, no gpt_oracle."""
    def breaker(d: Path) -> None:
        config = json.loads((d / CONFIG).read_text())
        config.pop("gpt_oracle")
        (d / CONFIG).write_text(json.dumps({**config, **fields}))
    return breaker


def _raw_weights(header: bytes):
    """model.safetensors replaced by a header of raw JSON text and no data."""
    header += b" " * (-len(header) % 8)
    return lambda d: (d / WEIGHTS).write_bytes(len(header).to_bytes(8, "little") + header)


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
    "three dropout rates": ({}, _without_gpt_oracle(embd_pdrop=0.25), CONFIG, "embd_pdrop"),
    "a dropout rate disagrees with gpt_oracle": ({}, lambda d: (d / CONFIG).write_text(json.dumps(
        {**json.loads((d / CONFIG).read_text()), "attn_pdrop": 0.25})), CONFIG, "attn_pdrop"),
    "header nested too deeply": ({}, _raw_weights(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), WEIGHTS, None),
    "index lists a missing shard": ({}, lambda d: (_shard()(d), (d / SHARD_2).unlink()), SHARD_2, None),
    "index points outside the directory": (
        {}, _shard(change_index=lambda m: m.update({"lm_head.weight": "../" + SHARD_2})), INDEX, "lm_head.weight"),
    "index without a weight_map": ({}, lambda d: (_shard()(d), (d / INDEX).write_text("{}")), INDEX, "weight_map"),
    "shard holds a key the index puts elsewhere": (
        {}, _shard(change_second=lambda t: t.update({"transformer.wte.weight": np.zeros((100, 32), np.float32)})),
        SHARD_2, "transformer.wte.weight"),
    "shard lacks a key the index lists": ({}, _shard(change_second=lambda t: t.pop("transformer.wpe.weight")),
                                          SHARD_2, "transformer.wpe.weight"),
    "NaN in a shard": ({}, _shard(change_second=_set("transformer.wpe.weight", _nan_at_3)), SHARD_2,
                       "transformer.wpe.weight"),
    "a key missing from every shard": (
        {}, _shard(change_index=lambda m: m.pop("transformer.wpe.weight"),
                   change_second=lambda t: t.pop("transformer.wpe.weight")), INDEX, "transformer.wpe.weight"),
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


def _raw_file(header, data: bytes) -> bytes:
    """A safetensors file of `header` (JSON-ready, or the JSON text itself as bytes) and `data`."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
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
    "empty, but too many elements for NumPy": (
        {"a": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}}, 0, "'a'"),
    "a dimension past int64": ({"a": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}}, 0, "'a'"),
    "more dimensions than NumPy allows": ({"a": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}}, 4,
                                          "'a'"),
    "an integer too long to parse": (
        b'{"a": {"dtype": "U8", "shape": [1' + b"0" * 5000 + b'], "data_offsets": [0, 1]}}', 1, "not valid JSON"),
    # Python's json takes a lone UTF-16 surrogate escape; the safetensors package refuses the file
    # (test_a_lone_surrogate_escape_is_refused_by_both_readers).
    "a lone surrogate escape in a key": (
        b'{"a\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', 1, "surrogate"),
    "a lone surrogate escape in metadata": (
        b'{"__metadata__": {"format": "pt\\udc00"}}', 0, "surrogate"),
}


def test_a_lone_surrogate_escape_is_refused_by_both_readers():
    """The package torch_impl reads with refuses a header string holding a lone surrogate escape
    ("\\ud800" is JSON syntax but no character); numpy_ref's reader must too, and a surrogate pair
    (one character, U+1F600) stays a readable key in both."""
    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as tmp:
        lone, pair = Path(tmp) / "lone.safetensors", Path(tmp) / "pair.safetensors"
        lone.write_bytes(_raw_file(b'{"a\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"\0"))
        pair.write_bytes(_raw_file(b'{"a\\ud83d\\ude00": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}',
                                   b"\0"))
        with pytest.raises(Exception, match="hex escape|surrogate"):
            with safe_open(str(lone), framework="pt") as f:
                list(f.keys())
        with pytest.raises(nio.CheckpointError, match="surrogate"):
            nio.read_safetensors(lone)
        with safe_open(str(pair), framework="pt") as f:
            assert list(f.keys()) == ["a\U0001F600"], f"safetensors read the pair as {list(f.keys())}"
        tensors, _ = nio.read_safetensors(pair)
        assert list(tensors) == ["a\U0001F600"], f"numpy_ref read the pair as {list(tensors)}"


@pytest.mark.parametrize("case", list(READER_CASES))
def test_numpy_safetensors_reader_names_the_problem(case):
    header, n_data, named = READER_CASES[case]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(_raw_file(header, b"\0" * n_data))
        with pytest.raises(nio.CheckpointError) as info:
            nio.read_safetensors(path)
    assert str(path) in str(info.value) and named in str(info.value), f"{case}: {info.value}"


def test_numpy_reader_reads_many_keys_and_finds_a_duplicate_among_them():
    """A header of 50,000 keys (the 100 MB cap allows over a million) is read whole, and one
    duplicate among them is named. (The check counts keys once, in linear time; a search per key
    made this take half a minute. The time itself is not asserted here: ground rule 4.)"""
    header = {f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(50_000)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "many.safetensors"
        path.write_bytes(_raw_file(header, b""))
        tensors, _ = nio.read_safetensors(path)
        assert len(tensors) == 50_000, f"read {len(tensors)} of 50000 tensors"
        text = json.dumps(header)[:-1] + ', "t49999": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}'
        raw = text.encode("utf-8")
        path.write_bytes(len(raw).to_bytes(8, "little") + raw)
        with pytest.raises(nio.CheckpointError, match="t49999"):
            nio.read_safetensors(path)


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
def test_each_rename_is_made_durable_by_a_directory_fsync(tree, monkeypatch):
    """fsyncing the file makes its bytes durable; only an fsync of its directory makes the rename
    durable, so after a power cut a checkpoint cannot revert to the old file (or to none)."""
    import os
    import stat

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append(f"rename {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    cfg = cc.tiny()
    with tempfile.TemporaryDirectory() as tmp:
        if tree == "numpy_ref":
            nck.save_checkpoint(tmp, cc.numpy_config(cfg), cc.random_params(cfg, 0))
        else:
            params = {k: torch.from_numpy(v) for k, v in cc.random_params(cfg, 0).items()}
            tck.save_checkpoint(tmp, cc.torch_config(cfg), params)
    renames = [i for i, e in enumerate(events) if e.startswith("rename")]
    assert len(renames) == 2, f"{tree}: expected two renames (weights, config): {events}"
    for i in renames:
        assert events[i - 1] == "fsync file" and events[i + 1 : i + 2] == ["fsync directory"], \
            f"{tree}: {events[i]} is not between an fsync of the file and one of its directory: {events}"


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


@pytest.mark.parametrize("tree", ["numpy_ref", "torch_impl"])
@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_trainer_state_save_refuses_what_its_load_refuses(tree, bad):
    """A non-finite moment (an overflowed exp_avg_sq) would be written, then refused at resume:
    it is refused at save instead, so the state on disk stays the last one that loads."""
    module = nck if tree == "numpy_ref" else tck
    as_tree = (lambda a: a) if tree == "numpy_ref" else torch.from_numpy
    good, broken = np.zeros(3), np.array([1.0, bad, 2.0])
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        module.save_trainer_state(d, {"step": 1}, {"exp_avg_sq.wte.weight": as_tree(good)})
        before = _snapshot(d)
        with pytest.raises(module.CheckpointError, match="key 'exp_avg_sq.wte.weight' has non-finite values"):
            module.save_trainer_state(d, {"step": 2}, {"exp_avg_sq.wte.weight": as_tree(broken)})
        assert _snapshot(d) == before, f"{tree}: a refused trainer state still changed the files"
        state, _ = module.load_trainer_state(d)
        assert state == {"step": 1}, f"{tree}: the previous trainer state no longer loads: {state}"


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
