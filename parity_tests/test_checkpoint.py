"""Checkpoints: round trips in each tree, the file format against the official safetensors
package, files swapped between the trees, and interchange with Hugging Face `transformers`.

Malformed files and atomic writes are in test_checkpoint_errors.py.
"""

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.numpy import load_file as official_load_np
from safetensors.numpy import save as official_save_np
from safetensors.torch import save_file as official_save_torch

import numpy_ref.checkpoint as nck
import numpy_ref.model as nm
import torch_impl.checkpoint as tck
import torch_impl.model as tm
from numpy_ref.safetensors_io import read_safetensors, write_safetensors
from parity_tests import checkpoint_cases as cc
from parity_tests.checks import HUB_GPT2_KEYS
from parity_tests.compare import assert_close, assert_dicts_close
from parity_tests.strategies import config_dicts, seeds
from parity_tests.tolerances import Tol, forward_tol

# A file round trip copies bits and computes nothing, so it must be exact.
EXACT = Tol(0.0, 0.0, "a file round trip copies bits; nothing is computed")

_DTYPES = [np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.uint16,
           np.uint32, np.uint64, np.bool_]


@st.composite
def tensor_dicts(draw):
    names = draw(st.lists(st.text("abcxyz._0123", min_size=1, max_size=6), max_size=6, unique=True))
    out = {}
    for name in names:
        dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
        out[name] = draw(hnp.arrays(dtype, shape))
    return out


def _same_arrays(prefix, actual, expected):
    assert set(actual) == set(expected), f"{prefix}: keys {sorted(actual)} != {sorted(expected)}"
    for k in expected:
        a, e = np.asarray(actual[k]), np.asarray(expected[k])
        assert a.dtype == e.dtype and a.shape == e.shape, f"{prefix}[{k}]: {a.dtype}{a.shape} vs {e.dtype}{e.shape}"
        assert a.tobytes() == e.tobytes(), f"{prefix}[{k}]: the bytes differ (NaNs compared bitwise)"


# ---- the safetensors format ------------------------------------------------------------------


@given(tensors=tensor_dicts(), with_metadata=st.booleans())
def test_numpy_safetensors_writer_is_byte_identical_to_the_official_package(tensors, with_metadata):
    # One metadata entry: the official writer orders several in a hash map's (random) order.
    metadata = {"format": "pt"} if with_metadata else None
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.safetensors"
        write_safetensors(path, tensors, metadata)
        ours = path.read_bytes()
        assert ours == official_save_np(tensors, metadata=metadata), "our bytes differ from safetensors.numpy.save"
        _same_arrays("official reader on our file", official_load_np(str(path)), tensors)
        path.write_bytes(official_save_np(tensors, metadata=metadata))
        got, got_meta = read_safetensors(path)
        _same_arrays("our reader on the official file", got, tensors)
        assert got_meta == metadata, f"metadata {got_meta} != {metadata}"


def test_metadata_with_several_entries_reads_back_in_both_directions():
    from safetensors import safe_open

    metadata = {"format": "pt", "note": "ü \" {}", "z": ""}
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    with tempfile.TemporaryDirectory() as d:
        write_safetensors(Path(d) / "ours.safetensors", tensors, metadata)
        with safe_open(str(Path(d) / "ours.safetensors"), framework="np") as f:
            assert f.metadata() == metadata, f"official reader saw metadata {f.metadata()}"
        (Path(d) / "theirs.safetensors").write_bytes(official_save_np(tensors, metadata=metadata))
        got, got_meta = read_safetensors(Path(d) / "theirs.safetensors")
        assert got_meta == metadata, f"our reader saw metadata {got_meta}"
        _same_arrays("our reader, several metadata entries", got, tensors)


def test_zero_dim_tensors_keep_their_shape():
    from safetensors.torch import load_file as official_load_torch

    tensors = {"scalar": np.array(2.5), "count": np.array(7, dtype=np.int64)}
    with tempfile.TemporaryDirectory() as d:
        write_safetensors(Path(d) / "z.safetensors", tensors)
        official = official_load_torch(str(Path(d) / "z.safetensors"))
        _same_arrays("safetensors.torch on our 0-d file", {k: v.numpy() for k, v in official.items()}, tensors)
        official_save_torch({k: torch.from_numpy(v) for k, v in tensors.items()}, str(Path(d) / "o.safetensors"))
        assert (Path(d) / "o.safetensors").read_bytes() == (Path(d) / "z.safetensors").read_bytes(), \
            "0-d tensors: our bytes differ from safetensors.torch.save_file"
        got, _ = read_safetensors(Path(d) / "o.safetensors")
        _same_arrays("our reader on the official 0-d file", got, tensors)


def test_numpy_reader_reads_bf16_exactly():
    values = torch.tensor([[1.0, -2.5, 3.140625], [1e-3, 65280.0, -0.0]], dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as d:
        official_save_torch({"x": values}, str(Path(d) / "b.safetensors"))
        got, _ = read_safetensors(Path(d) / "b.safetensors")
    assert got["x"].dtype == np.float32, f"bf16 should come back as float32, got {got['x'].dtype}"
    assert_close("bf16 read", got["x"], values.float().numpy(), EXACT)


# ---- round trips in each tree ----------------------------------------------------------------


@settings(max_examples=8)
@given(cfg=config_dicts(max_layers=2, max_heads=3, max_head_size=4, max_context=8, max_vocab=30, dropout=True),
       seed=seeds())
def test_round_trip_in_each_tree_and_across_trees(cfg, seed):
    params = cc.random_params(cfg, seed % 10_000)
    with tempfile.TemporaryDirectory() as d:
        np_dir, t_dir = Path(d) / "np", Path(d) / "t"
        nck.save_checkpoint(np_dir, cc.numpy_config(cfg), params)
        tck.save_checkpoint(t_dir, cc.torch_config(cfg), {k: torch.from_numpy(v) for k, v in params.items()})
        for name in ("model.safetensors", "config.json"):
            assert (np_dir / name).read_bytes() == (t_dir / name).read_bytes(), f"{name} differs between the trees"
        for src in (np_dir, t_dir):
            config, got = nck.load_checkpoint(src)
            assert config.to_dict() == cfg, f"numpy_ref config from {src.name}: {config.to_dict()} != {cfg}"
            assert_dicts_close(f"numpy_ref params from {src.name}", got, params, EXACT, order=list(params))
            assert list(got) == list(params), f"numpy_ref param order {list(got)}"
            tconfig, state = tck.load_checkpoint(src, dtype=torch.float64)
            assert tconfig.to_dict() == cfg, f"torch_impl config from {src.name}: {tconfig.to_dict()} != {cfg}"
            assert_dicts_close(f"torch_impl state from {src.name}", state, params, EXACT, order=list(params))
            assert all(t.dtype == torch.float64 for t in state.values()), "load_checkpoint ignored dtype"


def test_trainer_state_round_trip_and_interchange():
    rng = np.random.default_rng(0)
    tensors = {"exp_avg.wte.weight": rng.standard_normal((5, 3)), "exp_avg_sq.wte.weight": rng.random((5, 3)),
               "param.ln_f.bias": rng.standard_normal(3).astype(np.float32), "counts": np.arange(4, dtype=np.int64)}
    state = {"step": 7, "rng": np.random.default_rng(1).bit_generator.state, "history": {"loss": [3.5, 2.25]},
             "settings": {"lr": 4e-4, "nested": [1, None, "x"]}}
    with tempfile.TemporaryDirectory() as d:
        nck.save_trainer_state(Path(d) / "np", state, tensors)
        tck.save_trainer_state(Path(d) / "t", state, {k: torch.from_numpy(v) for k, v in tensors.items()})
        for src in ("np", "t"):
            got_state, got = nck.load_trainer_state(Path(d) / src)
            assert got_state == state, f"numpy_ref trainer state from {src}: {got_state}"
            _same_arrays(f"numpy_ref trainer tensors from {src}", got, tensors)
            got_state, got_t = tck.load_trainer_state(Path(d) / src)
            assert got_state == state, f"torch_impl trainer state from {src}: {got_state}"
            _same_arrays(f"torch_impl trainer tensors from {src}", {k: v.numpy() for k, v in got_t.items()}, tensors)


# ---- the same logits from both trees ---------------------------------------------------------


@pytest.mark.parametrize("tie,qkv_bias", [(False, False), (True, True)])
def test_cross_tree_checkpoint_gives_the_same_logits(tie, qkv_bias):
    cfg = cc.tiny(tie_embeddings=tie, qkv_bias=qkv_bias)
    ids = cc.sample_ids(cfg, 1)
    with tempfile.TemporaryDirectory() as d:
        # numpy_ref writes, torch_impl reads: the oracle's logits from the torch model.
        n_model = nm.GPTModel(cc.numpy_config(cfg), params=cc.random_params(cfg, 3))
        n_model.save_pretrained(Path(d) / "np")
        t_loaded = tm.GPTModel.from_pretrained(Path(d) / "np", dtype=torch.float64)
        with torch.no_grad():
            got = t_loaded(torch.from_numpy(ids))
        assert_close("torch_impl logits from a numpy_ref checkpoint", got, n_model(ids), forward_tol("float64"))
        # torch_impl writes (float32 weights), numpy_ref reads: the torch model's own logits, in float64.
        t_model = tm.GPTModel(cc.torch_config(cfg), seed=5, dtype=torch.float32)
        t_model.save_pretrained(Path(d) / "t")
        n_loaded = nm.GPTModel.from_pretrained(Path(d) / "t", dtype=np.float64)
        with torch.no_grad():
            ref = t_model.double()(torch.from_numpy(ids))
        assert_close("numpy_ref logits from a torch_impl checkpoint", n_loaded(ids), ref, forward_tol("float64"))


# ---- Hugging Face transformers ---------------------------------------------------------------


@pytest.mark.parametrize("tie,qkv_bias", [(False, True), (True, False)])
def test_transformers_loads_our_checkpoint_with_the_same_logits(tie, qkv_bias):
    from transformers import GPT2LMHeadModel

    cfg = cc.tiny(tie_embeddings=tie, qkv_bias=qkv_bias)
    params = cc.random_params(cfg, 11)
    ids = cc.sample_ids(cfg, 2)
    with tempfile.TemporaryDirectory() as d:
        nck.save_checkpoint(d, cc.numpy_config(cfg), params)
        hf, info = GPT2LMHeadModel.from_pretrained(d, output_loading_info=True, attn_implementation="eager")
        problems = {k: v for k, v in info.items() if v}
        assert not problems, f"transformers reported loading problems: {problems}"
        assert hf.config.tie_word_embeddings == tie, f"tie_word_embeddings {hf.config.tie_word_embeddings} != {tie}"
        got = cc.hf_logits(hf, ids)
    ref = nm.GPTModel(cc.numpy_config(cfg), params=params)(ids)
    assert_close(f"transformers logits vs numpy_ref (tie={tie}, qkv_bias={qkv_bias})", got, ref,
                 forward_tol("float64"))


def _check_loaded_from_hf(d, cfg, hf_model, what):
    ids = cc.sample_ids(cfg, 4)
    expected = cc.hf_logits(hf_model, ids)
    config, params = nck.load_checkpoint(d)
    want = {**cfg, "qkv_bias": True}
    assert config.to_dict() == want, f"numpy_ref config derived from {what}: {config.to_dict()} != {want}"
    tconfig, state = tck.load_checkpoint(d, dtype=torch.float64)
    assert tconfig.to_dict() == want, f"torch_impl config derived from {what}: {tconfig.to_dict()} != {want}"
    assert_dicts_close(f"torch_impl vs numpy_ref params from {what}", state, params, EXACT, order=list(params))
    got = nm.GPTModel(config, params=params)(ids)
    assert_close(f"numpy_ref logits vs transformers ({what})", got, expected, forward_tol("float64"))


@pytest.mark.parametrize("tie", [True, False])
def test_we_load_what_transformers_saves(tie):
    from transformers import GPT2LMHeadModel

    cfg = cc.tiny(tie_embeddings=tie)
    torch.manual_seed(0)  # transformers initialises from the global generator; this test owns it
    hf = GPT2LMHeadModel(cc.hf_config(cfg))
    with torch.no_grad():
        for p in hf.parameters():  # zero biases and unit gains would hide swapped keys
            p.add_(0.1 * torch.randn_like(p))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        assert ("lm_head.weight" in official_load_np(str(Path(d) / "model.safetensors"))) == (not tie), \
            "transformers' file layout is not what this test assumes"
        _check_loaded_from_hf(d, {**cfg, "drop_rate": 0.0}, hf, f"GPT2LMHeadModel.save_pretrained (tied={tie})")


def test_we_load_a_config_in_the_hubs_gpt2_layout_as_tied():
    """A config.json with the hub GPT-2's keys only (no tie_word_embeddings) and no lm_head in the
    file: both trees read a tied model with transformers' logits. A survey's mutation (a missing key
    read as untied) passed every test, since transformers now writes the key."""
    import json

    from transformers import GPT2LMHeadModel

    cfg = cc.tiny(tie_embeddings=True, ln_eps=1e-3)
    torch.manual_seed(1)
    hf = GPT2LMHeadModel(cc.hf_config(cfg))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        written = json.loads((Path(d) / "config.json").read_text())
        hub = {k: written[k] for k in HUB_GPT2_KEYS if k in written} | {"n_ctx": cfg["context_length"]}
        assert "tie_word_embeddings" not in hub and "lm_head.weight" not in official_load_np(
            str(Path(d) / "model.safetensors")), "the layout is not the hub's"
        (Path(d) / "config.json").write_text(json.dumps(hub))
        _check_loaded_from_hf(d, {**cfg, "drop_rate": 0.0}, hf, "a config.json in the hub's GPT-2 layout")


# The mask buffer's dtype followed transformers' code: float in the original GPT-2 files, then
# uint8, then bool, until it stopped being saved; all three are still in published files.
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.uint8, torch.bool])
def test_we_load_an_old_style_gpt2_file_without_prefix_and_with_mask_buffers(mask_dtype):
    import json

    from transformers import GPT2LMHeadModel

    cfg = cc.tiny(tie_embeddings=True)
    torch.manual_seed(1)
    hf = GPT2LMHeadModel(cc.hf_config(cfg))
    Tc = cfg["context_length"]
    old = {k[len("transformer."):]: v.detach().clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(cfg["n_layers"]):  # the buffers older GPT-2 files carried
        old[f"h.{i}.attn.bias"] = torch.tril(torch.ones(Tc, Tc, dtype=mask_dtype)).view(1, 1, Tc, Tc)
        old[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    hf_fields = {k: v for k, v in cc.hf_config(cfg).to_dict().items() if not k.startswith("_")}
    with tempfile.TemporaryDirectory() as d:
        official_save_torch(old, str(Path(d) / "model.safetensors"), metadata={"format": "pt"})
        (Path(d) / "config.json").write_text(json.dumps(hf_fields))
        _check_loaded_from_hf(d, {**cfg, "drop_rate": 0.0}, hf, f"an old-style file ({mask_dtype} mask buffers)")


@pytest.mark.parametrize("tie,dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_we_load_a_sharded_checkpoint_that_transformers_saves(tie, dtype):
    """Past `max_shard_size`, save_pretrained writes model-0000k-of-0000n.safetensors files and
    model.safetensors.index.json instead of model.safetensors (GPT-2 XL in float32 is 6.4 GB,
    past transformers 4.x's 5 GB default)."""
    from transformers import GPT2LMHeadModel

    cfg = cc.tiny(tie_embeddings=tie)
    torch.manual_seed(3)
    hf = GPT2LMHeadModel(cc.hf_config(cfg))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf = hf.to(dtype)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d, max_shard_size="8KB")
        shards = sorted(p.name for p in Path(d).glob("model-*.safetensors"))
        assert len(shards) > 2 and not (Path(d) / "model.safetensors").exists(), \
            f"transformers did not write a sharded checkpoint: {sorted(p.name for p in Path(d).iterdir())}"
        _check_loaded_from_hf(d, {**cfg, "drop_rate": 0.0}, hf, f"a sharded save_pretrained ({len(shards)} shards)")


def test_we_load_a_bf16_checkpoint_identically_in_both_trees():
    from transformers import GPT2LMHeadModel

    cfg = cc.tiny(tie_embeddings=False)
    torch.manual_seed(2)
    hf = GPT2LMHeadModel(cc.hf_config(cfg)).to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        _, params = nck.load_checkpoint(d)
        _, state = tck.load_checkpoint(d, dtype=torch.float64)
    expected = {k[len("transformer."):] if k.startswith("transformer.") else k: v.double()
                for k, v in hf.state_dict().items()}
    assert_dicts_close("numpy_ref params from a bf16 file", params, expected, EXACT, order=list(params))
    assert_dicts_close("torch_impl state from a bf16 file", state, expected, EXACT, order=list(params))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomically_written_files_get_a_new_files_usual_mode(tmp_path, umask):
    """The atomic writers go through mkstemp, which makes 0600 files; a checkpoint (both trees)
    and a saved BPE table must instead get 0666 less the umask, as run.json and the plots do."""
    from numpy_ref.bpe_train import save_tiktoken_bpe
    from numpy_ref.config import get_config as np_config
    from torch_impl.config import get_config as torch_config

    before = os.umask(umask)
    try:
        nm.GPTModel(np_config("tiny"), seed=0).save_pretrained(tmp_path / "numpy")
        tm.GPTModel(torch_config("tiny"), seed=0).save_pretrained(tmp_path / "torch")
        save_tiktoken_bpe({bytes([i]): i for i in range(256)}, tmp_path / "bytes.tiktoken")
    finally:
        os.umask(before)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) >= 5, f"expected two checkpoints and a BPE file, found {files}"
    wrong = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files
             if p.stat().st_mode & 0o777 != 0o666 & ~umask}
    assert not wrong, f"under umask {oct(umask)} expected mode {oct(0o666 & ~umask)}, got {wrong}"
