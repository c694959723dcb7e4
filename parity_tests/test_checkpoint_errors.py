"""Checkpoints that must not load, in both trees, and writes that must not half-happen.

Each malformed case starts from a good checkpoint, breaks one thing, and requires each tree's
`CheckpointError` (a ValueError) whose message names the file and, where there is one, the key.
The atomic-write tests make a save fail part way and require the previous files unchanged and
no temporary file left behind; the fault-injection tests fail each file-system call of a save in
turn (checkpoint_cases.DiskFaults) and load every state the directory passed through in both
trees: the old checkpoint, the new one, or a refusal naming the save's journal, never a mix
(test_checkpoint_faults.py interrupts each call just after it has taken effect). Then values
past the range of the dtype loaded into, and config.json values of the wrong type; at the end,
trainer states no loader would read (refused at save), NaN or Infinity in a JSON file, and a
dtype to load into that is not a float.
"""

import ast
import inspect
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
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
    # an integer with no float64 was an OverflowError from math.isfinite in both trees
    "an integer past float64": ({}, lambda d: (d / CONFIG).write_text(json.dumps(
        {**json.loads((d / CONFIG).read_text()), "layer_norm_epsilon": 10**400})), CONFIG, "layer_norm_epsilon"),
    # past Python's 4300-digit limit json.loads raises a plain ValueError, not a JSONDecodeError
    "an integer of 5000 digits": ({}, lambda d: (d / CONFIG).write_text(
        (d / CONFIG).read_text().replace('"n_embd": 32', '"n_embd": 1' + "0" * 5000)), CONFIG, None),
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


# ---- headers both safetensors readers refuse ---------------------------------------------------
# numpy_ref checks each itself (safetensors_io.py). torch_impl leaves most to the safetensors
# package, whose message may not name the tensor (PACKAGE_WORDED); a key twice, an entry with more
# fields, a dtype numpy_ref cannot read and a shape past NumPy's limits the package lets through,
# so torch_impl/checkpoint.py's _check_header refuses them, in numpy_ref's words.


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
    # the package kept the last of the two: here F16 bytes read again as BF16
    "a key twice": (b'{"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}, '
                    b'"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}', 4, "'a'"),
    "a float8 dtype": ({"a": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, 4, "'a'"),
    "a complex dtype": ({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, 8, "'a'"),
    "empty, but a dimension of 2**62 float32s": (
        {"a": {"dtype": "F32", "shape": [2**62, 0], "data_offsets": [0, 0]}}, 0, "'a'"),
    # JSON's -0 is an integer to Python and a float to the package: numpy_ref read it as 0
    "negative zero as a dimension": (b'{"a": {"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}}', 0, "'a'"),
}
PACKAGE_WORDED = {"size mismatch", "overlap", "gap", "bytes not covered", "negative dimension", "metadata not strings",
                  "header not an object", "an integer too long to parse", "a lone surrogate escape in a key",
                  "a lone surrogate escape in metadata", "negative zero as a dimension"}


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


@pytest.mark.parametrize("tree", ["numpy_ref", "torch_impl"])
@pytest.mark.parametrize("case", list(READER_CASES))
def test_both_safetensors_readers_refuse_the_same_headers_naming_the_problem(case, tree, tmp_path):
    """The header as a trainer state's optimizer.safetensors, loaded by each tree: refused by
    both (they used to disagree on a key twice, extra fields, F8/C64, shapes past NumPy's limits,
    -0), naming the file, and the tensor or the problem wherever the check is the tree's own."""
    header, n_data, named = READER_CASES[case]
    module = nck if tree == "numpy_ref" else tck
    path = tmp_path / "optimizer.safetensors"
    path.write_bytes(_raw_file(header, b"\0" * n_data))
    (tmp_path / "trainer_state.json").write_text('{"step": 1}')
    with pytest.raises(module.CheckpointError) as info:
        module.load_trainer_state(tmp_path)
    message = str(info.value)
    assert str(path) in message, f"{tree}, {case}: the error does not name the file: {message}"
    if tree == "numpy_ref" or case not in PACKAGE_WORDED:
        assert named in message, f"{tree}, {case}: {named!r} not in {message}"


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


def _fail_at_rename(monkeypatch):
    """Every rename fails. `os.replace` is patched on the `os` module itself, as DiskFaults does:
    both trees' checkpoint_files.py look it up there at each call."""
    def fail(*_):
        raise OSError("rename failed (simulated)")
    monkeypatch.setattr(os, "replace", fail)


@pytest.mark.parametrize("tree,failure", [("numpy_ref", "mid-write"), ("numpy_ref", "rename"),
                                          ("torch_impl", "mid-write"), ("torch_impl", "rename")])
def test_a_failed_save_leaves_the_previous_checkpoint_intact(tree, failure, monkeypatch):
    cfg = cc.tiny()
    old, new = cc.random_params(cfg, 1), cc.random_params(cfg, 2)
    if tree == "numpy_ref":
        save = lambda d, p: nck.save_checkpoint(d, cc.numpy_config(cfg), p)  # noqa: E731
        breaker = _fail_mid_numpy_write if failure == "mid-write" else _fail_at_rename
    else:
        save = lambda d, p: tck.save_checkpoint(d, cc.torch_config(cfg), {k: torch.from_numpy(v) for k, v in p.items()})  # noqa: E731
        breaker = _fail_mid_torch_write if failure == "mid-write" else _fail_at_rename
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



# ---- a save is all or nothing: fault injection at every step ---------------------------------

# Two saves into one directory (checkpoint_cases.save_version): old and new differ in config.json's ln_eps too.
from parity_tests.checkpoint_cases import NEW_CFG, NEW_PARAMS, NEW_STATE, OLD_CFG, OLD_PARAMS, OLD_STATE  # noqa: E402
JOURNALS = {"model": "checkpoint.saving.json", "trainer": "trainer_state.saving.json"}

_save = cc.save_version


def _what_loads(kind: str, d: Path) -> str:
    """'old', 'new' or 'refused: <message>', as both trees' loaders see `d` (they must agree)."""
    seen = {}
    for tree, module in (("numpy_ref", nck), ("torch_impl", tck)):
        try:
            if kind == "model":
                config, params = module.load_checkpoint(d) if tree == "numpy_ref" else \
                    module.load_checkpoint(d, dtype=torch.float64)
                got = (config.to_dict(), {k: np.asarray(v) for k, v in params.items()})
                versions = {"old": (OLD_CFG, OLD_PARAMS), "new": (NEW_CFG, NEW_PARAMS)}
            else:
                state, tensors = module.load_trainer_state(d)
                got = (state, {k: np.asarray(v) for k, v in tensors.items()})
                versions = {"old": OLD_STATE, "new": NEW_STATE}
            head = next((name for name, (h, _) in versions.items() if got[0] == h), f"unknown {got[0]}")
            arrays = next((name for name, (_, a) in versions.items() if set(got[1]) == set(a)
                           and all(np.array_equal(got[1][k], a[k]) for k in a)), "unknown")
            seen[tree] = head if head == arrays else f"a mix: the {head} config or state with the {arrays} arrays"
        except module.CheckpointError as e:
            seen[tree] = f"refused: {e}"
    assert seen["numpy_ref"].split(":")[0] == seen["torch_impl"].split(":")[0], f"the trees disagree: {seen}"
    return seen["numpy_ref"]


def _visible_state(kind: str, photo: dict[str, bytes]) -> tuple:
    """What a loader reads of a photographed directory: the files not hidden (temporary files and
    old copies are), the journal without the random names of the old copies."""
    state = []
    for name, data in sorted(photo.items()):
        if name == JOURNALS[kind]:
            try:
                files = json.loads(data)["files"]
                data = json.dumps({n: {**e, "previous": e["previous"] is not None} for n, e in files.items()})
            except (ValueError, KeyError, TypeError):
                pass
        if not name.startswith("."):
            state.append((name, hash(data)))
    return tuple(state)


def _check_every_photo(kind: str, photos, tmp: Path, seen: dict, may_be_old: bool = True) -> None:
    """Each state the directory passed through loads as the old files, the new ones, or is refused
    (with an error naming the save's journal when there is one); no directory counts as refused.
    `seen` holds the states already judged (by what a loader reads of them)."""
    for after, photo in photos:
        key = None if photo is None else _visible_state(kind, photo)
        if key in seen:
            continue
        if photo is None:
            seen[key] = "refused: no directory"
            continue
        scratch = tmp / f"photo{len(seen)}"
        cc.restore(photo, scratch)
        seen[key] = outcome = _what_loads(kind, scratch)
        allowed = ("old", "new") if may_be_old else ("new",)
        assert outcome in allowed or outcome.startswith("refused"), \
            f"{kind}: after '{after}' the directory {sorted(photo)} loads as {outcome}"
        if outcome.startswith("refused") and JOURNALS[kind] in photo:
            assert JOURNALS[kind] in outcome and "stopped part way" in outcome, \
                f"{kind}: after '{after}' the refusal does not name the journal: {outcome}"


# Every call failing from k on exercises the put-back failing; the trainer state's save goes
# through the same code as the model's, so that mode runs for the model only.
@pytest.mark.parametrize("tree,kind,persistent", [
    pytest.param(tree, kind, persistent, id=f"{tree}-{kind}-{'every call from k on' if persistent else 'call k'} fails")
    for tree in ("numpy_ref", "torch_impl") for kind, persistent in (("model", False), ("trainer", False),
                                                                     ("model", True))])
def test_a_save_failing_at_any_step_leaves_the_old_files_or_a_refusal_never_a_mix(tree, kind, persistent,
                                                                                   tmp_path, monkeypatch):
    """Call k of the save's file-system calls raises, for k = 1, 2, ... until a save makes fewer
    calls. Once only: the save raises and the directory is byte for byte what it was (unless the
    failure is harmless and ignored: an fsync of the directory, the mkdir of one that exists, the
    removal of an old copy after the commit; then the new files are there). Every call from k on
    failing (the put-back fails too): the directory loads as old, as new, or is refused. And after
    every call that changed the directory (what a power cut would leave), the same holds."""
    clean = tmp_path / "clean"
    _save(tree, kind, clean, "new")
    new_files = cc.photograph(clean)
    seen: dict[tuple, str] = {}
    k = 0
    while True:
        k += 1
        d = tmp_path / f"k{k}"
        _save(tree, kind, d, "old")
        before = cc.photograph(d)
        faults = cc.DiskFaults(d, fail_at=k, persistent=persistent)
        with monkeypatch.context() as m:
            faults.install(m)
            try:
                _save(tree, kind, d, "new")
                raised = None
            except OSError as e:
                raised = e
        if len(faults.calls) < k:  # the save made fewer than k calls: every step has been failed once
            break
        _check_every_photo(kind, faults.photos, tmp_path / f"k{k}-photos", seen)
        after = cc.photograph(d)
        _check_every_photo(kind, [("the save's end", after)], tmp_path / f"k{k}-final", seen)
        outcome = seen[_visible_state(kind, after)]
        where = f"{tree} {kind}, call {k} ({faults.failed[0]}) failing{' and all after it' if persistent else ''}"
        if persistent:
            assert outcome in ("old", "new") or outcome.startswith("refused"), f"{where}: loads as {outcome}"
        elif raised is not None:
            changed = sorted(n for n in set(before) | set(after) if before.get(n) != after.get(n))
            assert not changed, f"{where}: the save raised ({raised}) but changed {changed}"
        else:
            harmless = ("fsync directory", "mkdir ", "unlink .")  # see the docstring
            assert faults.failed[0].startswith(harmless), f"{where}: the failure was ignored and the save succeeded"
            visible = {n: b for n, b in after.items() if not n.startswith(".")}
            assert visible == new_files and outcome == "new", \
                f"{where}: the save reported success but the directory holds {sorted(after)}, loading as {outcome}"
    assert k > 12, f"{tree} {kind}: only {k - 1} file-system calls were seen; the wrappers are not in the path"
    outcomes = {v.split(":")[0] for v in seen.values()}
    assert outcomes == {"old", "new", "refused"}, f"{tree} {kind}: the states seen loaded only as {outcomes}"


def _check_final(kind: str, d: Path, scratch: Path) -> str:
    cc.restore(cc.photograph(d), scratch)
    return _what_loads(kind, scratch)


@pytest.mark.parametrize("tree", ["numpy_ref", "torch_impl"])
def test_a_failed_save_into_a_new_directory_leaves_no_directory(tree, tmp_path, monkeypatch):
    """Fresh, the directory is created by the save: failing at any step removes it again (and
    the parent it created), and no state along the way loads as anything but the new checkpoint."""
    seen: dict[tuple, str] = {}
    k = 0
    while True:
        k += 1
        d = tmp_path / f"k{k}" / "run" / "ckpt"
        faults = cc.DiskFaults(d, fail_at=k)
        with monkeypatch.context() as m:
            faults.install(m)
            try:
                _save(tree, "model", d, "new")
                raised = None
            except OSError as e:
                raised = e
        if len(faults.calls) < k:
            break
        _check_every_photo("model", faults.photos, tmp_path / f"k{k}-photos", seen, may_be_old=False)
        if raised is not None:
            left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob(f"k{k}/**/*"))
            assert not left, f"{tree}: call {k} ({faults.failed[0]}) failed; the save left {left}"


@pytest.mark.parametrize("tree", ["numpy_ref", "torch_impl"])
def test_a_save_leaves_the_other_files_in_its_directory_alone(tree, tmp_path, monkeypatch):
    """A directory may hold a tokenizer, a README, the trainer state, a sub-directory: a model
    save (done, or failed at its last rename) changes config.json and model.safetensors only."""
    d = tmp_path / "ckpt"
    _save(tree, "trainer", d, "old")
    (d / "README.md").write_text("notes\n")
    (d / "tokenizer.json").write_text("{}\n")
    (d / "samples").mkdir()
    (d / "samples" / "a.txt").write_text("x\n")
    others = {**cc.photograph(d), "samples/a.txt": b"x\n"}
    _save(tree, "model", d, "old")

    def fail_placing_config(*args):
        raise OSError("simulated: config.json cannot be renamed into place")

    real = os.replace
    with monkeypatch.context() as m:
        m.setattr(os, "replace", lambda src, dst: fail_placing_config() if Path(dst).name == "config.json" and
                  Path(src).name.endswith(".tmp") else real(src, dst))
        with pytest.raises(OSError, match="simulated"):
            _save(tree, "model", d, "new")
    assert _check_final("model", d, tmp_path / "after-failure") == "old", f"{tree}: the failed save changed the model"
    _save(tree, "model", d, "new")
    assert _check_final("model", d, tmp_path / "after-save") == "new", f"{tree}: the save did not take"
    now = {**cc.photograph(d), "samples/a.txt": (d / "samples" / "a.txt").read_bytes()}
    changed = sorted(n for n in others if now.get(n) != others[n])
    assert not changed, f"{tree}: a model save changed or removed {changed}"
    leftovers = sorted(n for n in now if n.startswith(".") or n.endswith(".saving.json"))
    assert not leftovers, f"{tree}: saves left {leftovers} behind"


def _cut_off(tree: str, tmp: Path, monkeypatch, placed: str) -> Path:
    """A copy of the directory as a power cut leaves it just after the new save renamed its new
    `placed` file into place (old checkpoint there before the save)."""
    d = tmp / f"{tree}-{placed}"
    _save(tree, "model", d, "old")
    faults = cc.DiskFaults(d)
    with monkeypatch.context() as m:
        faults.install(m)
        _save(tree, "model", d, "new")
    placing = [photo for after, photo in faults.photos if after.startswith("replace .") and
               after.endswith(".tmp -> " + placed)]
    assert len(placing) == 1, f"{tree}: expected one rename into {placed} among {faults.calls}"
    cut = tmp / f"cut-{tree}-{placed}"
    cc.restore(placing[0], cut)
    return cut


@pytest.mark.parametrize("tree", ["numpy_ref", "torch_impl"])
def test_both_trees_refuse_a_directory_whose_save_was_cut_off_and_say_why(tree, tmp_path, monkeypatch):
    """Cut off with the new weights in place but the old config.json: the journal is a shared
    format, so each tree refuses what either wrote, naming the journal, the file that is not yet
    the new one and where the old weights are kept (config.json has not been moved aside yet:
    the name the journal reserved for its old copy holds nothing, and is not given as a place to
    look). Cut off after both renames, before the journal is removed: every file is the new one,
    and both trees load the new checkpoint."""
    cut = _cut_off(tree, tmp_path, monkeypatch, WEIGHTS)
    _save(tree, "model", tmp_path / "old", "old")
    files = json.loads((cut / JOURNALS["model"]).read_text())["files"]
    kept, not_yet = files[WEIGHTS]["previous"], files[CONFIG]["previous"]
    assert (cut / kept).read_bytes() == (tmp_path / "old" / WEIGHTS).read_bytes(), \
        f"{tree}: {kept} (where the journal says the old weights are) does not hold them"
    assert not (cut / not_yet).exists(), f"{tree}: config.json was moved aside before the weights were placed"
    for module in (nck, tck):
        with pytest.raises(module.CheckpointError) as info:
            module.load_checkpoint(cut)
        message = str(info.value)
        for needed in (str(cut / JOURNALS["model"]), "stopped part way", f"[{CONFIG!r}]", kept):
            assert needed in message, f"{module.__name__} on {tree}'s cut-off save: {needed!r} not in {message}"
        assert not_yet not in message, f"{module.__name__} names {not_yet}, which does not exist: {message}"
    done = _cut_off(tree, tmp_path, monkeypatch, CONFIG)
    assert (done / JOURNALS["model"]).exists(), f"{tree}: the journal should still be there: {sorted(done.iterdir())}"
    assert _what_loads("model", done) == "new", f"{tree}: every file matches the journal, yet it does not load as new"


@pytest.mark.parametrize("journal", [
    "not json", json.dumps({"files": []}), json.dumps({"files": {"../config.json": {
        "size": 1, "sha256": "0" * 64, "previous": None}}}),
    json.dumps({"files": {CONFIG: {"size": "1", "sha256": "0" * 64, "previous": None}}})])
def test_a_malformed_journal_is_refused_by_name(journal, tmp_path):
    _good_checkpoint(tmp_path, {})
    (tmp_path / "checkpoint.saving.json").write_text(journal)
    for module in (nck, tck):
        with pytest.raises(module.CheckpointError) as info:
            module.load_checkpoint(tmp_path)
        assert str(tmp_path / "checkpoint.saving.json") in str(info.value), \
            f"{module.__name__}: the error does not name the journal: {info.value}"


@pytest.mark.parametrize("tree", ["numpy_ref", "torch_impl"])
def test_the_journal_and_every_rename_are_made_durable_in_order(tree, tmp_path, monkeypatch):
    """The order that makes a power cut safe: each new file fsynced before it is renamed; the
    journal renamed into place and its directory fsynced before any checkpoint file moves; the
    directory fsynced after the last rename and before the journal is removed (the commit)."""
    import stat

    events = []
    real_fsync, real_replace, real_unlink = os.fsync, os.replace, os.unlink

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync directory",) if stat.S_ISDIR(st.st_mode) else ("fsync file", st.st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", Path(src).name, Path(dst).name, os.stat(src).st_ino))
        real_replace(src, dst)

    def unlink(path, *args, **kwargs):
        events.append(("unlink", Path(path).name))
        real_unlink(path, *args, **kwargs)

    _save(tree, "model", tmp_path, "old")
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", fsync)
        m.setattr(os, "replace", replace)
        m.setattr(os, "unlink", unlink)
        _save(tree, "model", tmp_path, "new")
    journal = JOURNALS["model"]
    kinds = [e[0] for e in events]
    moves = [i for i, e in enumerate(events) if e[0] == "rename" and {e[1], e[2]} & {WEIGHTS, CONFIG}]
    placed = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == journal]
    commit = [i for i, e in enumerate(events) if e == ("unlink", journal)]
    assert len(moves) == 4 and len(placed) == 1 and len(commit) == 1, \
        f"{tree}: expected the journal placed, two files renamed aside and two into place, then the commit: {events}"
    for i in moves + placed:
        if events[i][1].endswith(".tmp"):
            synced = [e[1] for e in events[:i] if e[0] == "fsync file"]
            assert events[i][3] in synced, f"{tree}: {events[i][1]} renamed onto {events[i][2]} before its fsync"
    assert placed[0] < moves[0] and "fsync directory" in kinds[placed[0]:moves[0]], \
        f"{tree}: checkpoint files moved before the journal was durable: {events}"
    assert moves[-1] < commit[0] and "fsync directory" in kinds[moves[-1]:commit[0]], \
        f"{tree}: the journal was removed before the renames were durable: {events}"
    assert "fsync directory" in kinds[commit[0]:], f"{tree}: the journal's removal was never made durable: {events}"


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


# ---- loading into a narrower dtype --------------------------------------------------------------


@pytest.mark.parametrize("value", [65520.0, -1e5, 3e38])  # 65520 is the smallest to round to inf in float16
@pytest.mark.parametrize("tree", ["numpy_ref", "torch_impl"])
def test_loading_as_float16_refuses_values_past_its_range(tree, value, tmp_path):
    """Finite in the float32 file, inf once cast: refused, naming the file, the key, the value,
    where it is and float16's range, instead of a model whose logits are inf or NaN."""
    cfg = cc.tiny()
    params = cc.random_params(cfg, 0)
    params["h.1.mlp.c_fc.weight"][2, 5] = value
    nck.save_checkpoint(tmp_path, cc.numpy_config(cfg), params)
    module, dtype = (nck, np.float16) if tree == "numpy_ref" else (tck, torch.float16)
    with pytest.raises(module.CheckpointError) as info:
        module.load_checkpoint(tmp_path, dtype=dtype)
    message = str(info.value)
    for needed in (str(tmp_path / WEIGHTS), "'transformer.h.1.mlp.c_fc.weight'", "float16", "65504", "(2, 5)",
                   repr(float(np.float32(value)))):
        assert needed in message, f"{tree}: {needed!r} missing from the error: {message}"


@pytest.mark.parametrize("tree", ["numpy_ref", "torch_impl"])
def test_loading_as_float16_keeps_its_largest_value(tree, tmp_path):
    cfg = cc.tiny()
    params = cc.random_params(cfg, 0)
    params["wte.weight"][0, 0], params["wte.weight"][0, 1] = 65504.0, -65504.0  # float16's largest, exactly
    nck.save_checkpoint(tmp_path, cc.numpy_config(cfg), params)
    if tree == "numpy_ref":
        _, got = nck.load_checkpoint(tmp_path, dtype=np.float16)
    else:
        _, got = tck.load_checkpoint(tmp_path, dtype=torch.float16)
    row = np.asarray(got["wte.weight"][0, :2], dtype=np.float64)
    assert list(row) == [65504.0, -65504.0], f"{tree}: float16's largest values loaded as {row}"


def test_loading_as_bfloat16_refuses_float32s_largest(tmp_path):
    """bfloat16 has float32's exponent but 8 significant bits: float32's largest (3.4028e38)
    rounds past bfloat16's (3.3895e38) to inf."""
    cfg = cc.tiny()
    params = cc.random_params(cfg, 0)
    params["ln_f.bias"][7] = float(np.finfo(np.float32).max)
    nck.save_checkpoint(tmp_path, cc.numpy_config(cfg), params)
    with pytest.raises(tck.CheckpointError, match=r"key 'transformer.ln_f.bias' has 1 values outside torch.bfloat16's "
                                                  r"range \(\|x\| <= 3.38953e\+38\), first at index \(7,\)"):
        tck.load_checkpoint(tmp_path, dtype=torch.bfloat16)


def test_numpy_from_pretrained_as_float16_refuses_values_past_its_range(tmp_path):
    import numpy_ref.model as nm

    cfg = cc.tiny()
    params = cc.random_params(cfg, 0)
    params["wpe.weight"][1, 1] = 1e5
    nck.save_checkpoint(tmp_path, cc.numpy_config(cfg), params)
    with pytest.raises(nck.CheckpointError, match=r"'transformer.wpe.weight' has 1 values outside float16's range"):
        nm.GPTModel.from_pretrained(tmp_path, dtype=np.float16)


def test_torch_from_pretrained_as_float16_refuses_values_past_its_range(tmp_path):
    import torch_impl.model as tm

    cfg = cc.tiny()
    params = cc.random_params(cfg, 0)
    params["wpe.weight"][1, 1] = 1e5
    nck.save_checkpoint(tmp_path, cc.numpy_config(cfg), params)
    with pytest.raises(tck.CheckpointError, match=r"'transformer.wpe.weight' has 1 values outside torch.float16"):
        tm.GPTModel.from_pretrained(tmp_path, dtype=torch.float16)


# ---- config.json values of the wrong type ---------------------------------------------------------

_INT_KEYS = ("vocab_size", "n_positions", "n_ctx", "n_embd", "n_layer", "n_head")
_NOT_NUMBERS = st.one_of(st.none(), st.booleans(), st.text(max_size=4), st.lists(st.integers(), max_size=2))


@st.composite
def wrong_hf_fields(draw):
    """(key, a value config.json may hold that is not what that GPT-2 field must be)."""
    key = draw(st.sampled_from([*_INT_KEYS, "layer_norm_epsilon", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                                "tie_word_embeddings"]))
    if key in _INT_KEYS:  # 32.0 is a float: GPTConfig wants ints, and so does transformers
        value = draw(st.one_of(_NOT_NUMBERS, st.floats(), st.integers(max_value=0)))
    elif key == "layer_norm_epsilon":
        value = draw(st.one_of(_NOT_NUMBERS, st.floats(max_value=0.0), st.sampled_from([math.nan, math.inf])))
    elif key.endswith("pdrop"):
        value = draw(st.one_of(_NOT_NUMBERS, st.floats().filter(lambda v: not 0 <= v < 1)))
    else:  # bool("false") is True: the reason this check exists
        value = draw(st.one_of(st.none(), st.integers(), st.floats(), st.sampled_from(["false", "true", "0", ""])))
    return key, value


@given(field=wrong_hf_fields(), with_gpt_oracle=st.booleans())
@example(field=("tie_word_embeddings", "false"), with_gpt_oracle=False)  # was read as True
@example(field=("layer_norm_epsilon", None), with_gpt_oracle=False)  # was "float() argument must be ..."
@example(field=("layer_norm_epsilon", "1e-5"), with_gpt_oracle=False)  # was read as 1e-5
@example(field=("n_embd", 32.0), with_gpt_oracle=True)  # was equal to gpt_oracle's 32
@example(field=("tie_word_embeddings", 0), with_gpt_oracle=True)  # was equal to gpt_oracle's False
def test_a_config_value_of_the_wrong_type_is_refused_naming_key_value_and_expectation(field, with_gpt_oracle):
    key, value = field
    hf = nck.hf_config_dict(cc.numpy_config(cc.tiny()))
    if not with_gpt_oracle:
        hf.pop("gpt_oracle")
    hf[key] = value
    for module in (nck, tck):
        with pytest.raises(module.CheckpointError) as info:
            module.config_from_hf(hf, "dir/config.json")
        message = str(info.value)
        for needed in ("dir/config.json", repr(key), repr(value), "expected"):
            assert needed in message, f"{module.__name__}, {key} = {value!r}: {needed!r} not in {message}"


@given(tie=st.booleans(), eps=st.floats(1e-12, 1.0), drop=st.floats(0.0, 0.99), nh=st.integers(1, 4),
       hs=st.integers(1, 8), n_ctx_only=st.booleans())
def test_config_values_of_the_right_type_are_read_as_given(tie, eps, drop, nh, hs, n_ctx_only):
    """The derived config (no gpt_oracle) takes each field as written: a false tie stays false."""
    hf = {"model_type": "gpt2", "vocab_size": 50, "n_embd": nh * hs, "n_head": nh, "n_layer": 2,
          "tie_word_embeddings": tie, "layer_norm_epsilon": eps, "resid_pdrop": drop, "embd_pdrop": drop,
          "attn_pdrop": drop, **({"n_ctx": 12} if n_ctx_only else {"n_positions": 12, "n_ctx": 12})}
    want = dict(vocab_size=50, context_length=12, emb_dim=nh * hs, n_heads=nh, n_layers=2, drop_rate=drop,
                qkv_bias=True, tie_embeddings=tie, ln_eps=eps)
    for module in (nck, tck):
        got = module.config_from_hf(hf, "config.json").to_dict()
        assert got == want, f"{module.__name__}: config {got} from {hf}, expected {want}"


@pytest.mark.parametrize("with_gpt_oracle", [False, True])
@pytest.mark.parametrize("tree", ["numpy_ref", "torch_impl"])
def test_n_ctx_that_differs_from_the_context_length_is_refused(tree, with_gpt_oracle, tmp_path):
    """Older transformers releases made the causal mask n_ctx long and wpe n_positions long; a
    file with the two unequal is not the model ours would load (it used to load, n_ctx ignored)."""
    _good_checkpoint(tmp_path, {})
    hf = json.loads((tmp_path / CONFIG).read_text())
    if not with_gpt_oracle:
        hf.pop("gpt_oracle")
    module = nck if tree == "numpy_ref" else tck
    (tmp_path / CONFIG).write_text(json.dumps({**hf, "n_ctx": 32}))
    with pytest.raises(module.CheckpointError, match=r"key 'n_ctx' = 32 differs from key 'n_positions' = 16"):
        module.load_checkpoint(tmp_path)
    if with_gpt_oracle:  # no n_positions: n_ctx is still held against gpt_oracle's context length
        hf.pop("n_positions")
        (tmp_path / CONFIG).write_text(json.dumps({**hf, "n_ctx": 32}))
        with pytest.raises(module.CheckpointError, match=r"key 'n_ctx' = 32 disagrees with gpt_oracle"):
            module.load_checkpoint(tmp_path)


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


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_a_failed_save_makes_the_put_back_durable_before_the_journal_goes(tree, tmp_path, monkeypatch):
    """A save that fails after some renames puts the old files back, then removes its journal.
    Without a directory fsync between the two, a power cut could keep the journal's removal and
    lose the put-back renames: a mixed pair with no journal to refuse it."""
    import importlib

    cf = importlib.import_module(f"{'numpy_ref' if tree == 'numpy' else 'torch_impl'}.checkpoint_files")
    (tmp_path / "a.bin").write_text("old a")
    (tmp_path / "b.bin").write_text("old b")
    log, renames = [], [0]
    real_replace, real_fsync = os.replace, cf.fsync_directory

    def replace(src, dst):
        renames[0] += 1
        if renames[0] == 5:  # the journal, a aside, a in place, b aside, then b in place fails
            raise OSError(5, "simulated I/O error")
        log.append(f"rename -> {Path(dst).name}")
        return real_replace(src, dst)

    def fsync(directory):
        log.append("fsync")
        return real_fsync(directory)

    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        log.append(f"unlink {Path(path).name}")
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)  # Path.unlink calls it too
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(cf, "fsync_directory", fsync)
    writer = (lambda text: (lambda f: f.write(text.encode()))) if tree == "numpy" else \
        (lambda text: (lambda tmp: Path(tmp).write_text(text)))
    with pytest.raises(OSError, match="simulated"):
        cf.save_together(tmp_path, {"a.bin": writer("new a"), "b.bin": writer("new b")}, "j.saving.json")
    assert (tmp_path / "a.bin").read_text() == "old a" and (tmp_path / "b.bin").read_text() == "old b"
    assert not (tmp_path / "j.saving.json").exists(), "the journal of a failed save was left"
    last_put_back = max(i for i, e in enumerate(log) if e in ("rename -> a.bin", "rename -> b.bin"))
    journal_gone = log.index("unlink j.saving.json")
    assert "fsync" in log[last_put_back:journal_gone], \
        f"{tree}: no directory fsync between the put-back renames and the journal's removal: {log}"


@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_a_save_removes_the_hidden_copies_that_cut_off_saves_left(tree, tmp_path):
    """A save killed mid-way leaves hidden full-size copies (`.model.safetensors.XXXXXXXX.tmp`,
    `.config.json.XXXXXXXX.old`), or its journal's temporary file; nothing removed them, so
    repeated saves into one directory after crashes piled them up. The next save that commits
    removes those of the files it wrote and of its journal, and nothing else."""
    import importlib

    ck = importlib.import_module(f"{'numpy_ref' if tree == 'numpy' else 'torch_impl'}.checkpoint")
    leftovers = [".model.safetensors.abcd1234.tmp", ".config.json.zz9_yy88.old",
                 ".checkpoint.saving.json.k1ll3d_x.tmp"]  # a journal killed before its rename
    kept = [".other.abcd1234.tmp", "notes.txt", ".model.safetensors.short.tmp", ".config.json.abcd1234.old.bak",
            ".trainer_state.saving.json.abcd1234.tmp"]  # the trainer state's journal: not this save's
    for name in leftovers + kept:
        (tmp_path / name).write_text("x")
    if tree == "numpy":
        from numpy_ref.model import GPTModel as NM

        model = NM(cc.numpy_config(cc.tiny()), seed=0)
        ck.save_checkpoint(tmp_path, model.config, model.params)
    else:
        from torch_impl.model import GPTModel as TM

        model = TM(cc.torch_config(cc.tiny()), seed=0)
        ck.save_checkpoint(tmp_path, model.config, model.state_dict())
    left = sorted(n for n in leftovers if (tmp_path / n).exists())
    assert not left, f"{tree}: a committed save left the cut-off saves' copies {left}"
    gone = sorted(n for n in kept if not (tmp_path / n).exists())
    assert not gone, f"{tree}: a save removed files that are not its leftovers: {gone}"


# ---- trainer states no loader would read, refused at save; strict JSON at load -------------------

_NOT_SAVED = {  # case -> (state, tensors as NumPy arrays, or a torch-only tensor; what the error names)
    "a tensor named __metadata__ (the header's own key)": (
        {"step": 2}, {"__metadata__": np.zeros(2)}, "'__metadata__'"),
    "a complex tensor": ({"step": 2}, {"z": np.array([1 + 2j])}, "'z'"),
    "100 and '100' as state keys (JSON writes both as '100')": (
        {"step": 2, "schedule": {100: 0.1, "100": 0.2}}, {}, "100 in state['schedule']"),
    "a bool key deep in the state": ({"step": 2, "runs": [{"a": {True: 1}}]}, {}, "True in state['runs'][0]['a']"),
    "a complex64 tensor holding a NaN (torch_impl)": ({"step": 2}, {"z": "complex64"}, "'z'"),
    "a float8 tensor (torch_impl)": ({"step": 2}, {"z": "float8_e4m3fn"}, "'z'"),
}


@pytest.mark.parametrize("tree,case", [(tree, case) for case in _NOT_SAVED for tree in ("numpy_ref", "torch_impl")
                                       if tree == "torch_impl" or "(torch_impl)" not in case])  # no float8 in NumPy
def test_a_trainer_state_no_loader_would_read_is_refused_before_anything_is_written(tree, case, tmp_path):
    """torch_impl used to write each of these, replacing a good state with one that neither tree
    loads (or loads with a key changed, or a NaN unchecked); numpy_ref refused some."""
    state, tensors, named = _NOT_SAVED[case]
    module = nck if tree == "numpy_ref" else tck
    if "(torch_impl)" in case:
        tensors = {"z": torch.tensor([1.0, float("nan")]).to(getattr(torch, tensors["z"]))}
    elif tree == "torch_impl":
        tensors = {k: torch.from_numpy(v) for k, v in tensors.items()}
    module.save_trainer_state(tmp_path, {"step": 1}, {"m": np.zeros(3) if tree == "numpy_ref" else torch.zeros(3)})
    before = _snapshot(tmp_path)
    with pytest.raises(module.CheckpointError) as info:
        module.save_trainer_state(tmp_path, state, tensors)
    assert named in str(info.value), f"{tree}, {case}: {named!r} not in {info.value}"
    if "tensor" in case and "__metadata__" not in case:  # the dtypes allowed are listed
        assert "F32" in str(info.value), f"{tree}, {case}: the error does not list the dtypes allowed: {info.value}"
    assert _snapshot(tmp_path) == before, f"{tree}, {case}: the refused save changed the files"
    assert module.load_trainer_state(tmp_path)[0] == {"step": 1}, f"{tree}: the previous state no longer loads"


@pytest.mark.parametrize("tree", ["numpy_ref", "torch_impl"])
@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("file_name", ["trainer_state.json", CONFIG])
def test_nan_or_infinity_in_a_json_file_is_refused_naming_the_file(tree, constant, file_name, tmp_path):
    """Python's json reads NaN and Infinity, which strict JSON (and every save here) never
    writes: a trainer state holding one loaded, and the next save of it failed."""
    module = nck if tree == "numpy_ref" else tck
    _good_checkpoint(tmp_path, {})
    nck.save_trainer_state(tmp_path, {"step": 1, "best_val_loss": 2.5}, {"m": np.zeros(3)})
    path = tmp_path / file_name
    key = "best_val_loss" if file_name == "trainer_state.json" else "resid_pdrop"
    text = json.dumps({**json.loads(path.read_text()), key: 1234.5}).replace("1234.5", constant)
    path.write_text(text)
    with pytest.raises(module.CheckpointError) as info:
        module.load_trainer_state(tmp_path) if file_name == "trainer_state.json" else module.load_checkpoint(tmp_path)
    for needed in (str(path), constant, "strict JSON"):
        assert needed in str(info.value), f"{tree}, {file_name}: {needed!r} not in {info.value}"


@pytest.mark.parametrize("tree", ["numpy_ref", "torch_impl"])
@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8", "bool"])
def test_loading_as_an_integer_or_bool_dtype_is_refused_naming_it(tree, dtype, tmp_path):
    """Casting the weights to an integer dtype truncated every one of them to 0 (bool: True),
    without an error, in both trees."""
    _good_checkpoint(tmp_path, {})
    module, as_dtype = (nck, np.dtype(dtype)) if tree == "numpy_ref" else (tck, getattr(torch, dtype))
    with pytest.raises(TypeError) as info:
        module.load_checkpoint(tmp_path, dtype=as_dtype)
    for needed in (dtype, "float16", "float32", "float64"):
        assert needed in str(info.value), f"{tree}: {needed!r} not in {info.value}"
