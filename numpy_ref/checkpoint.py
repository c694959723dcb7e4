"""Checkpoints in the Hugging Face GPT-2 layout, and trainer state, with NumPy only.

A model checkpoint is a directory (docs/design.md, "Checkpoints"):

    config.json         GPT2Config's fields (model_type gpt2, vocab_size, n_positions, n_embd,
                        n_layer, n_head, layer_norm_epsilon, activation_function gelu_new, ...)
                        plus "gpt_oracle": our GPTConfig.to_dict(), exactly
    model.safetensors   "transformer.<name>" for every parameter of docs/design.md's table,
                        "lm_head.weight" when the head is not tied, all float32

Why no transposes: Hugging Face GPT-2's linear layers are `Conv1D` modules whose weight is
stored (in, out), exactly our layout, and its `lm_head` is an `nn.Linear(C, V)` whose weight is
(V, C), exactly our `lm_head.weight`. So `transformers.GPT2LMHeadModel.from_pretrained(dir)`
loads what `save_checkpoint` writes, and `load_checkpoint` reads what `save_pretrained` writes.
Hugging Face GPT-2 always has a `c_attn` bias; without `qkv_bias` we write zeros (the same
function) and on load require zeros.

What `load_checkpoint` accepts from other writers: keys with or without the `transformer.`
prefix; the `h.{i}.attn.bias` / `h.{i}.attn.masked_bias` buffers of older files (causal mask
constants, not parameters: ignored, whatever their dtype: float, uint8 or bool); no
`lm_head.weight` in a tied file; a sharded checkpoint (no `model.safetensors`, but
`model.safetensors.index.json` and the shards it lists, as `save_pretrained` writes past its
`max_shard_size`); a `config.json` without our `gpt_oracle` object (the GPTConfig is derived
from the Hugging Face fields). What it rejects, each with a CheckpointError naming the file and
the key: malformed safetensors (see numpy_ref/safetensors_io.py), an index that disagrees with
its shards, missing or extra tensors, wrong shapes, float64 tensors, non-finite values, and
Hugging Face options that change the computation or that one GPTConfig cannot hold (three
different dropout rates), config.json values of the wrong type (`"false"` for a boolean, null
for a number), and values beyond the range of the dtype asked for (1e5 as float16 is inf).

Trainer state: `trainer_state.json` (any JSON-ready dict) and `optimizer.safetensors` (any
arrays, float64 included, so that a float64 run resumes bit for bit). Nothing is unpickled.

Each save replaces its two files as one change (`_save_together`, the protocol in its
docstring): a journal (`checkpoint.saving.json` or `trainer_state.saving.json`) recording the
new files' sizes and sha256 exists only while the old files are swapped for the new ones, and a
load refuses while it names a file that is not yet the new one. So a checkpoint on disk loads as
the old one, as the new one, or not at all, never as old weights with a new config.json; a save
that fails puts the old files back. Files the save does not write are never touched.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from numpy_ref.config import GPTConfig
from numpy_ref.params import param_shapes
from numpy_ref.safetensors_io import (CheckpointError, atomic_write, fsync_directory, read_header, read_safetensors,
                                     safetensors_writer, write_temporary)

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "save_trainer_state", "load_trainer_state",
           "hf_config_dict", "config_from_hf"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # a sharded checkpoint: tensor name -> shard file
TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
MODEL_JOURNAL = "checkpoint.saving.json"  # there only while save_checkpoint swaps files (or if it was cut off)
TRAINER_JOURNAL = "trainer_state.saving.json"  # the same for save_trainer_state
PREFIX = "transformer."
HEAD = "lm_head.weight"
MODEL_DTYPES = ("F32", "BF16", "F16")  # what GPT-2 checkpoints hold; F64 is refused on purpose


# ---- config.json ----------------------------------------------------------------------------


def hf_config_dict(config: GPTConfig) -> dict[str, Any]:
    """config.json's content: Hugging Face GPT2Config fields, then our GPTConfig under `gpt_oracle`."""
    d = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_ctx": config.context_length,
        "n_embd": config.emb_dim,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": None,  # None means 4 * n_embd, our MLP width
        "activation_function": "gelu_new",  # GPT-2's tanh approximation of GELU
        "layer_norm_epsilon": config.ln_eps,
        "resid_pdrop": config.drop_rate,
        "embd_pdrop": config.drop_rate,
        "attn_pdrop": config.drop_rate,
        "scale_attn_weights": True,
        "tie_word_embeddings": config.tie_embeddings,
        "dtype": "float32",
        # GPT-2's <|endoftext|> is 50256; a smaller vocabulary has no such token.
        "bos_token_id": 50256 if config.vocab_size > 50256 else None,
        "eos_token_id": 50256 if config.vocab_size > 50256 else None,
    }
    d["gpt_oracle"] = config.to_dict()
    return d


# Hugging Face field -> our field, checked against ours when config.json has both
_HF_TO_OURS = {"vocab_size": "vocab_size", "n_positions": "context_length", "n_ctx": "context_length",
               "n_embd": "emb_dim", "n_layer": "n_layers", "n_head": "n_heads", "layer_norm_epsilon": "ln_eps",
               "tie_word_embeddings": "tie_embeddings", "resid_pdrop": "drop_rate", "embd_pdrop": "drop_rate",
               "attn_pdrop": "drop_rate"}
_DROPOUTS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")  # GPT2Config's three rates; our one drop_rate


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0  # a JSON true is a Python int too


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # json reads NaN


# Each GPT-2 field a config is read from: key -> (is the value usable, what is expected)
_HF_FIELDS = {
    "vocab_size": (_positive_int, "a positive integer"),
    "n_positions": (_positive_int, "a positive integer"),
    "n_ctx": (_positive_int, "a positive integer"),
    "n_embd": (_positive_int, "a positive integer"),
    "n_layer": (_positive_int, "a positive integer"),
    "n_head": (_positive_int, "a positive integer"),
    "layer_norm_epsilon": (lambda v: _finite_number(v) and v > 0, "a finite number > 0"),
    "resid_pdrop": (lambda v: _finite_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "embd_pdrop": (lambda v: _finite_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "attn_pdrop": (lambda v: _finite_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "tie_word_embeddings": (lambda v: isinstance(v, bool), "true or false (a JSON boolean, not a string)"),
}


def config_from_hf(hf: Mapping[str, Any], path) -> GPTConfig:
    """Our GPTConfig from config.json's content (`gpt_oracle` if there, else derived)."""
    for key, (ok, want) in _HF_FIELDS.items():
        if key in hf and not ok(hf[key]):
            raise CheckpointError(f"{path}: key {key!r} = {hf[key]!r}: expected {want}")
    _check_supported(hf, path)
    if "gpt_oracle" in hf:
        try:
            config = GPTConfig.from_dict(hf["gpt_oracle"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: key 'gpt_oracle': {e}") from None
        for hf_key, ours in _HF_TO_OURS.items():
            if hf_key in hf and hf[hf_key] != getattr(config, ours):
                raise CheckpointError(f"{path}: key {hf_key!r} = {hf[hf_key]!r} disagrees with "
                                      f"gpt_oracle.{ours} = {getattr(config, ours)!r}")
        return config
    missing = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head") if k not in hf]
    if "n_positions" not in hf and "n_ctx" not in hf:
        missing.append("n_positions")
    if missing:
        raise CheckpointError(f"{path}: key(s) {missing} missing (needed to build a GPT-2 config)")
    drops = {k: hf.get(k, 0.1) for k in _DROPOUTS}  # 0.1: GPT2Config's default for each
    if any(v != drops["resid_pdrop"] for v in drops.values()):
        raise CheckpointError(f"{path}: keys {drops} differ; this GPT-2 has one drop_rate for the embeddings, "
                              f"the attention weights and the residual branches")
    if hf["n_embd"] % hf["n_head"] != 0:
        raise CheckpointError(f"{path}: key 'n_embd' = {hf['n_embd']} is not divisible by key 'n_head' = "
                              f"{hf['n_head']} (C = nh * hs)")
    try:
        return GPTConfig(
            vocab_size=hf["vocab_size"], context_length=hf.get("n_positions", hf.get("n_ctx")),
            emb_dim=hf["n_embd"], n_heads=hf["n_head"], n_layers=hf["n_layer"],
            drop_rate=float(drops["resid_pdrop"]), qkv_bias=True,  # HF GPT-2 always has a c_attn bias
            tie_embeddings=hf.get("tie_word_embeddings", True),  # GPT2Config's default
            ln_eps=float(hf.get("layer_norm_epsilon", 1e-5)))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _check_supported(hf: Mapping[str, Any], path) -> None:
    """Refuse configurations whose numbers our model would not reproduce."""
    rules = [
        ("model_type", lambda v: v == "gpt2", "'gpt2'"),
        ("activation_function", lambda v: v in ("gelu_new", "gelu_pytorch_tanh"), "the tanh GELU ('gelu_new')"),
        ("n_inner", lambda v: v is None or (_positive_int(v) and v == 4 * hf.get("n_embd", -1)),
         "None or 4 * n_embd"),
        ("scale_attn_weights", lambda v: v is True, "true"),
        ("scale_attn_by_inverse_layer_idx", lambda v: v is False, "false"),
    ]
    for key, ok, want in rules:
        if key in hf and not ok(hf[key]):
            raise CheckpointError(f"{path}: key {key!r} = {hf[key]!r} is not supported; this GPT-2 needs {want}")
    # Older transformers releases made GPT-2's causal mask n_ctx x n_ctx and its wpe n_positions
    # long: unequal, the model that wrote this did not attend over n_positions tokens as ours would.
    if "n_positions" in hf and "n_ctx" in hf and hf["n_positions"] != hf["n_ctx"]:
        raise CheckpointError(f"{path}: key 'n_ctx' = {hf['n_ctx']!r} differs from key 'n_positions' = "
                              f"{hf['n_positions']!r}; this GPT-2 has one context length for both")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, got {type(d).__name__}")
    return d


def _write_json(path: Path, d: Mapping[str, Any]) -> None:
    text = json.dumps(d, indent=2) + "\n"  # serialise first: a TypeError leaves nothing behind
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# ---- saving several files as one change -----------------------------------------------------


def _save_together(directory: Path, writers: Mapping[str, Callable], journal_name: str) -> None:
    """Replace the files `writers` names (file name -> `write(open_file)`) in `directory` as one change.

    The journal `directory / journal_name` exists only while the files are being swapped:

        1. each new file is written to a temporary file next to its place and fsynced
        2. the journal records each new file's size and sha256 and the name its old file will be
           kept under; it is renamed into place and the directory fsynced before anything moves
        3. each old file is renamed aside and the new one renamed into place; directory fsynced
        4. the journal is removed (this is the commit), then the old files

    A loader that finds a journal refuses unless every file it lists is the new one (a save that
    got through 3 but not 4). So wherever the save stops, a power cut included (and renames
    reordered between two fsyncs), the directory loads as the old checkpoint, as the new one, or
    not at all with an error naming the journal. An exception before the commit puts back every
    old file and the journal as it was (normally none): the directory is byte for byte what it
    was, and one the save created is removed again. Files not in `writers` are never touched.
    """
    journal = directory / journal_name
    created = [p for p in (directory, *directory.parents) if not p.exists()][::-1]  # outermost first
    journal_before = journal.read_bytes() if journal.is_file() else None  # an earlier save's, cut off
    temps: dict[str, Path] = {}  # name -> its new file, until renamed into place
    aside: dict[str, Path] = {}  # name -> its old file, renamed aside
    placed: list[str] = []  # names whose new file is in place
    journal_changed = False
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, write in writers.items():
            temps[name] = write_temporary(directory / name, write)
        files = {}
        for name, tmp in temps.items():
            keep_as = tmp.name[:-len(".tmp")] + ".old"  # unique, as mkstemp made the temporary name
            files[name] = {"size": tmp.stat().st_size, "sha256": _sha256(tmp),
                           "previous": keep_as if (directory / name).exists() else None}
        journal_changed = True  # (if the write below fails it has not: putting it back is harmless)
        _write_json(journal, {"files": files})
        for name, tmp in temps.items():
            if files[name]["previous"] is not None:
                os.replace(directory / name, directory / files[name]["previous"])
                aside[name] = directory / files[name]["previous"]
            os.replace(tmp, directory / name)
            placed.append(name)
        fsync_directory(directory)
        os.unlink(journal)  # the commit
    except BaseException:
        _put_back(directory, temps, aside, placed)  # if a step of it fails, it raises: the journal stays
        if journal_changed and journal_before is None:
            journal.unlink(missing_ok=True)
        elif journal_changed:
            atomic_write(journal, lambda f: f.write(journal_before))
        fsync_directory(directory)
        for made in reversed(created):  # innermost first; stops at one holding anything else
            try:
                if made.exists():  # (mkdir may have failed before it)
                    os.rmdir(made)
            except OSError:
                break
        raise
    for old in aside.values():
        try:
            os.unlink(old)
        except OSError:  # committed already; a hidden old copy left behind costs disk space only
            pass
    fsync_directory(directory)


def _put_back(directory: Path, temps: Mapping[str, Path], aside: Mapping[str, Path], placed: list[str]) -> None:
    """Undo steps 1 and 3 of a save that failed before its commit: old files back, new ones removed."""
    for name in reversed(placed):
        if name in aside:
            os.replace(aside[name], directory / name)  # the old file back over the new one
        else:
            os.unlink(directory / name)  # there was no old file
    for name, old in aside.items():
        if name not in placed:  # renamed aside, the new file not yet in place
            os.replace(old, directory / name)
    for name, tmp in temps.items():
        if name not in placed:
            tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _refuse_an_interrupted_save(directory: Path, journal_name: str) -> None:
    """CheckpointError if a save's journal is in `directory` and names a file that is not the new
    one yet: that save stopped part way, and the files there are not one checkpoint."""
    journal = directory / journal_name
    if not journal.exists():
        return
    files = _read_json(journal).get("files")
    if not (isinstance(files, dict) and all(_is_journal_entry(name, e) for name, e in files.items())):
        raise CheckpointError(f"{journal}: key 'files' must map file names in {directory} to "
                              f"{{size, sha256, previous}}, got {files!r}")
    unfinished = [name for name, e in files.items() if not _matches(directory / name, e)]
    if unfinished:
        kept = [e["previous"] for e in files.values() if e["previous"] is not None]
        raise CheckpointError(f"{journal}: a save into {directory} stopped part way: {unfinished} are not yet the "
                              f"files it was writing, so the files there are not one checkpoint (the previous "
                              f"versions are kept as {kept}); save the checkpoint again")


def _is_journal_entry(name, entry) -> bool:
    """A bare file name in the directory (never a path elsewhere) -> {size, sha256, previous}."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
        return False
    return (isinstance(entry, dict) and set(entry) == {"size", "sha256", "previous"}
            and type(entry["size"]) is int and isinstance(entry["sha256"], str)
            and (entry["previous"] is None or isinstance(entry["previous"], str)))


def _matches(path: Path, entry: Mapping[str, Any]) -> bool:
    """Is `path` the file the journal entry records (size first: hashing is the slow part)?"""
    return path.is_file() and path.stat().st_size == entry["size"] and _sha256(path) == entry["sha256"]


# ---- model checkpoints ----------------------------------------------------------------------


def save_checkpoint(directory, config: GPTConfig, params: Mapping[str, np.ndarray]) -> Path:
    """Write `config.json` and `model.safetensors` (float32) into `directory`; returns it."""
    directory = Path(directory)
    table = param_shapes(config)
    _check_names_and_shapes("params", {k: np.shape(v) for k, v in params.items()}, dict(table))
    tensors = {}
    for name, _ in table:
        value = np.asarray(params[name])
        with np.errstate(over="ignore"):  # beyond float32's range: inf, refused just below
            stored = value.astype(np.float32)  # what the file holds
        bad = ~np.isfinite(stored)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise CheckpointError(f"params: key {name!r} has {int(bad.sum())} values that are not finite in float32 "
                                  f"(first at index {first}: {float(value[first])!r}; float32 holds |x| < 3.4e38); "
                                  f"refusing to write a checkpoint that cannot be loaded")
        key = name if name == HEAD else PREFIX + name
        tensors[key] = stored
    if not config.qkv_bias:
        C = config.emb_dim
        for i in range(config.n_layers):  # HF GPT-2 always has this bias; zeros are our no-bias
            tensors[f"{PREFIX}h.{i}.attn.c_attn.bias"] = np.zeros(3 * C, dtype=np.float32)
    config_text = json.dumps(hf_config_dict(config), indent=2) + "\n"  # before any write: a TypeError writes nothing
    _save_together(directory, {WEIGHTS_FILE: safetensors_writer(tensors, metadata={"format": "pt"}),
                               CONFIG_FILE: lambda f: f.write(config_text.encode("utf-8"))}, MODEL_JOURNAL)
    return directory


def load_checkpoint(directory, dtype=np.float64) -> tuple[GPTConfig, dict[str, np.ndarray]]:
    """(config, params) from a checkpoint directory; params in docs/design.md's order, as `dtype`.
    A value finite in the file but beyond `dtype`'s range (1e5 as float16) is an error, not an inf."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    _refuse_an_interrupted_save(directory, MODEL_JOURNAL)
    config = config_from_hf(_read_json(directory / CONFIG_FILE), directory / CONFIG_FILE)
    where, raw, file_of = _read_weights(directory)
    tensors, file_keys = _strip_names(raw, file_of)
    expected = dict(param_shapes(config))
    if config.tie_embeddings and HEAD in tensors:
        if "wte.weight" in tensors and not np.array_equal(tensors[HEAD], tensors["wte.weight"]):
            raise CheckpointError(f"{file_of[HEAD]}: key {HEAD!r} differs from wte.weight but config.json ties them")
        del tensors[HEAD]  # a tied head saved explicitly: the same tensor twice (a missing wte: named below)
    if not config.qkv_bias:
        for i in range(config.n_layers):
            bias = tensors.pop(f"h.{i}.attn.c_attn.bias", None)
            if bias is not None and np.any(bias != 0):
                key = file_keys[f"h.{i}.attn.c_attn.bias"]
                raise CheckpointError(f"{file_of[key]}: key {key!r} is non-zero but the config has qkv_bias=False")
    _check_names_and_shapes(str(where), {k: v.shape for k, v in tensors.items()}, expected,
                            lambda k: file_keys.get(k, _file_key(k)))
    params = {}
    for name in expected:
        value, where_key = tensors[name], f"{file_of[file_keys[name]]}: key {file_keys[name]!r}"
        bad = ~np.isfinite(value)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise CheckpointError(f"{where_key} has {int(bad.sum())} non-finite values (first at index {first}: "
                                  f"{value[first]})")
        with np.errstate(over="ignore"):  # float16 holds |x| <= 65504: a finite 1e5 becomes inf, refused below
            cast = np.ascontiguousarray(value, dtype=dtype)
        bad = ~np.isfinite(cast)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            name_of = np.dtype(dtype).name
            raise CheckpointError(f"{where_key} has {int(bad.sum())} values outside {name_of}'s range "
                                  f"(|x| <= {np.finfo(dtype).max:.6g}), first at index {first}: "
                                  f"{float(value[first])!r}; as {name_of} they would be inf")
        params[name] = cast
    return config, params


def _file_key(name: str) -> str:
    return name if name == HEAD else PREFIX + name


def _weight_files(directory: Path) -> tuple[Path, dict[Path, set[str] | None]]:
    """(the file that lists the weights, {safetensors file: the keys the index puts in it, or None
    for a lone model.safetensors}). As in transformers, model.safetensors wins over an index."""
    path, index = directory / WEIGHTS_FILE, directory / INDEX_FILE
    if path.is_file() or not index.is_file():
        if not path.is_file():
            hint = " (pytorch_model.bin is a pickle and is never loaded; convert it to safetensors)" \
                if (directory / "pytorch_model.bin").exists() else ""
            raise CheckpointError(f"{path}: file not found{hint}")
        return path, {path: None}
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: key 'weight_map' must be an object of tensor name -> shard file name, "
                              f"got {type(weight_map).__name__}")
    shards: dict[Path, set[str]] = {}
    for key, file in weight_map.items():
        # a bare name in this directory: an index must not point the reader at any other file
        if not isinstance(file, str) or file in ("", ".", "..") or Path(file).name != file:
            raise CheckpointError(f"{index}: key {key!r}: shard {file!r} is not a file name in {directory}")
        shards.setdefault(directory / file, set()).add(key)
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{shard}: file not found (a shard listed in {index})")
    return index, shards


def _read_weights(directory: Path) -> tuple[Path, dict[str, np.ndarray], dict[str, Path]]:
    """(the file that lists the weights, the file's key -> array, the file's key -> the file holding it)
    from model.safetensors or the shards of model.safetensors.index.json, each shard holding exactly
    the keys the index gives it. Every header and dtype is checked before any data is read."""
    where, shards = _weight_files(directory)
    for path, listed in shards.items():
        entries, _, _ = read_header(path)
        for key, info in entries.items():
            if info.dtype not in MODEL_DTYPES and not _is_mask_buffer(key):
                why = "GPT-2 checkpoints are float32/bf16/fp16; cast to float32 before saving" \
                    if info.dtype == "F64" else f"expected one of {MODEL_DTYPES}"
                raise CheckpointError(f"{path}: key {key!r} has dtype {info.dtype}: {why}")
        if listed is not None and set(entries) != listed:
            stray, absent = sorted(set(entries) - listed), sorted(listed - set(entries))
            raise CheckpointError(f"{path}: disagrees with {where}: key(s) {stray} are not listed for this shard, "
                                  f"key(s) {absent} are listed but missing")
    raw, file_of = {}, {}
    for path in shards:
        tensors, _ = read_safetensors(path)
        raw.update(tensors)
        file_of.update(dict.fromkeys(tensors, path))
    return where, raw, file_of


def _is_mask_buffer(key: str) -> bool:
    """`h.{i}.attn.bias` / `h.{i}.attn.masked_bias`, with or without the prefix: the causal-mask
    buffers older GPT-2 files carry (float, uint8 or bool constants, not parameters)."""
    parts = (key[len(PREFIX):] if key.startswith(PREFIX) else key).split(".")
    return len(parts) == 4 and parts[0] == "h" and parts[2] == "attn" and parts[3] in ("bias", "masked_bias")


def _strip_names(raw: Mapping[str, np.ndarray],
                 file_of: Mapping[str, Path]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(our name -> array, our name -> the file's key): drop `transformer.` and the mask buffers."""
    out, file_keys = {}, {}
    for key, value in raw.items():
        if _is_mask_buffer(key):
            continue
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if name in out:
            raise CheckpointError(f"{file_of[key]}: key {key!r} appears both with and without the {PREFIX!r} prefix")
        out[name], file_keys[name] = value, key
    return out, file_keys


def _check_names_and_shapes(where: str, shapes: Mapping[str, tuple], expected: Mapping[str, tuple],
                            key: Callable[[str], str] = str) -> None:
    """Same names, same shapes; `key(name)` is how the error names a tensor (the file's key)."""
    missing = [key(k) for k in expected if k not in shapes]
    if missing:
        raise CheckpointError(f"{where}: missing key(s) {missing}")
    extra = [key(k) for k in shapes if k not in expected]
    if extra:
        raise CheckpointError(f"{where}: unexpected key(s) {extra} for this config")
    for k, shape in expected.items():
        if tuple(shapes[k]) != tuple(shape):
            raise CheckpointError(f"{where}: key {key(k)!r} has shape {tuple(shapes[k])}, the config needs {shape}")


# ---- trainer state --------------------------------------------------------------------------


def save_trainer_state(directory, state: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> Path:
    """`optimizer.safetensors` (any dtype, float64 kept exactly), then `trainer_state.json`.
    Non-finite floats are refused before anything is written, as load_trainer_state refuses them."""
    directory = Path(directory)
    text = json.dumps(dict(state), indent=2) + "\n"  # fails before anything is written
    for name, value in tensors.items():
        value = np.asarray(value)
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise CheckpointError(f"tensors: key {name!r} has non-finite values; refusing to write a trainer "
                                  f"state that cannot be loaded")
    write_tensors = safetensors_writer(dict(tensors), metadata={"format": "gpt_oracle-trainer"})  # may raise: first
    _save_together(directory, {OPTIMIZER_FILE: write_tensors,
                               TRAINER_STATE_FILE: lambda f: f.write(text.encode("utf-8"))}, TRAINER_JOURNAL)
    return directory


def load_trainer_state(directory) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(state, tensors) as saved; tensors keep their dtype; non-finite floats are an error."""
    directory = Path(directory)
    _refuse_an_interrupted_save(directory, TRAINER_JOURNAL)
    state = _read_json(directory / TRAINER_STATE_FILE)
    path = directory / OPTIMIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    tensors, _ = read_safetensors(path)
    for name, value in tensors.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise CheckpointError(f"{path}: key {name!r} has non-finite values")
    return state, tensors
