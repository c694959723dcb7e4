"""Checkpoints in the Hugging Face GPT-2 layout, and trainer state, with NumPy only.

A model checkpoint is a directory (docs/design.md, "Checkpoints"):

    config.json         GPT2Config's fields (model_type gpt2, vocab_size, n_positions, n_embd,
                        n_layer, n_head, layer_norm_epsilon, activation_function gelu_new, ...)
                        plus "gpt_oracle": our GPTConfig.to_dict(), exactly
    model.safetensors   "transformer.<name>" for every parameter of docs/design.md's table,
                        "lm_head.weight" when the head is not tied, all float32

A classifier's checkpoint (`num_classes=K` to save, `classifier=True` to load; classifier.py)
is the same without "lm_head.weight", plus "classifier.weight" (C, K) and "classifier.bias" (K,),
unprefixed; its config.json adds "gpt_oracle_num_classes" and "num_labels" (K) and names the
architecture GPT2Model. Each loader refuses the other kind, naming it.

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
config.json is read and checked in checkpoint_config.py.

Trainer state: `trainer_state.json` (any JSON-ready dict whose keys are strings: JSON would turn
the key 100 into "100") and `optimizer.safetensors` (arrays of any dtype safetensors_io.py
writes, float64 included, so that a float64 run resumes bit for bit). Nothing is unpickled.

Each save replaces its two files as one change, never old weights with a new config.json, and
a load refuses a save cut off part way: the journal protocol is in checkpoint_files.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from numpy_ref.checkpoint_config import config_from_hf, hf_config_dict
from numpy_ref.checkpoint_files import CheckpointError, read_json, refuse_an_interrupted_save, save_together
from numpy_ref.config import GPTConfig
from numpy_ref.params import param_shapes
from numpy_ref.safetensors_io import read_header, read_safetensors, safetensors_writer

# CheckpointError, hf_config_dict and config_from_hf are defined in checkpoint_files.py and
# checkpoint_config.py; they are part of this module's API all the same.
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
NUM_CLASSES = "gpt_oracle_num_classes"  # in config.json of a classifier's checkpoint (classifier.py)
MODEL_DTYPES = ("F32", "BF16", "F16")  # what GPT-2 checkpoints hold; F64 is refused on purpose
LOAD_DTYPES = ("float16", "float32", "float64")  # what load_checkpoint casts to: a weight is a float


# ---- model checkpoints ----------------------------------------------------------------------


def save_checkpoint(directory, config: GPTConfig, params: Mapping[str, np.ndarray], *,
                    num_classes: int | None = None) -> Path:
    """Write `config.json` and `model.safetensors` (float32) into `directory`; returns it.

    With `num_classes`, a classifier's (classifier.py): the trunk's tensors as above, no
    `lm_head.weight`, then `classifier.weight` (C, K) and `classifier.bias` (K,) under their own
    names; config.json also holds `gpt_oracle_num_classes` and names the architecture GPT2Model
    (Hugging Face's GPT2Model loads the trunk from it, leaving the head aside)."""
    directory = Path(directory)
    table = param_shapes(config) if num_classes is None else _classifier_table(config, num_classes)
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
        tensors[_file_key(name)] = stored
    if not config.qkv_bias:
        C = config.emb_dim
        for i in range(config.n_layers):  # HF GPT-2 always has this bias; zeros are our no-bias
            tensors[f"{PREFIX}h.{i}.attn.c_attn.bias"] = np.zeros(3 * C, dtype=np.float32)
    hf = hf_config_dict(config)
    if num_classes is not None:
        # num_labels: what Hugging Face's classification models read; they would still draw their
        # own head (`score`, no bias), and GPT2LMHeadModel would load the trunk (untied: with a
        # random vocabulary head): only GPTClassifier.from_pretrained reads this head.
        hf.update(architectures=["GPT2Model"], num_labels=int(num_classes), **{NUM_CLASSES: int(num_classes)})
    config_text = json.dumps(hf, indent=2) + "\n"  # before any write: a TypeError writes nothing
    save_together(directory, {WEIGHTS_FILE: safetensors_writer(tensors, metadata={"format": "pt"}),
                              CONFIG_FILE: lambda f: f.write(config_text.encode("utf-8"))}, MODEL_JOURNAL)
    return directory


def load_checkpoint(directory, dtype=np.float64, *, classifier: bool = False) -> tuple[GPTConfig, dict[str, np.ndarray]]:
    """(config, params) from a checkpoint directory; params in docs/design.md's order, as `dtype`
    (one of LOAD_DTYPES, else a TypeError before anything is read: an integer or bool dtype would
    truncate every weight). A value finite in the file but beyond `dtype`'s range (1e5 as
    float16) is an error, not an inf. `classifier`: a classifier's checkpoint (see
    save_checkpoint), and only one; its K is the length of params["classifier.bias"]."""
    if np.dtype(dtype).name not in LOAD_DTYPES:
        raise TypeError(f"load_checkpoint: dtype {np.dtype(dtype).name} cannot hold the weights; "
                        f"expected one of {list(LOAD_DTYPES)}")
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    refuse_an_interrupted_save(directory, MODEL_JOURNAL)
    hf = read_json(directory / CONFIG_FILE)
    config = config_from_hf(hf, directory / CONFIG_FILE)
    num_classes = _num_classes(hf, directory / CONFIG_FILE, classifier)
    where, raw, file_of = _read_weights(directory)
    tensors, file_keys = _strip_names(raw, file_of)
    expected = dict(param_shapes(config) if num_classes is None else _classifier_table(config, num_classes))
    if num_classes is None and config.tie_embeddings and HEAD in tensors:
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
    """The file's key for one of our names: the heads keep theirs, the trunk's take the prefix."""
    return name if name == HEAD or name.startswith("classifier.") else PREFIX + name


def _classifier_table(config: GPTConfig, num_classes: int) -> list[tuple[str, tuple[int, ...]]]:
    from numpy_ref.classifier import classifier_param_shapes  # classifier.py imports the model, not this

    return classifier_param_shapes(config, num_classes)


def _num_classes(hf: Mapping[str, Any], path: Path, classifier: bool) -> int | None:
    """K from config.json for a classifier's checkpoint, None for a language model's; a
    CheckpointError when it is not the kind asked for."""
    if NUM_CLASSES not in hf:
        if classifier:
            raise CheckpointError(f"{path}: no {NUM_CLASSES!r}: not a classifier's checkpoint as GPTClassifier."
                                  f"save_pretrained writes one (a language model's, or another library's; "
                                  f"GPTClassifier.from_gpt builds a classifier on a language model)")
        return None
    K = hf[NUM_CLASSES]
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise CheckpointError(f"{path}: key {NUM_CLASSES!r} = {K!r}: expected an integer >= 1")
    if not classifier:
        raise CheckpointError(f"{path}: a classifier's checkpoint ({K} classes), not a language model's; "
                              f"load it with GPTClassifier.from_pretrained")
    return K


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
    weight_map = read_json(index).get("weight_map")
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
    Non-finite floats, in the tensors or the state (strict JSON has none), are refused before
    anything is written, as load_trainer_state refuses them; so is a key of the state, at any
    depth, that is not a str (JSON would write 100 as "100", which then collides with a "100")."""
    directory = Path(directory)
    try:  # before anything is written; strict JSON, which has no NaN or Infinity
        text = json.dumps(dict(state), indent=2, allow_nan=False) + "\n"
    except ValueError as e:
        raise CheckpointError(f"trainer state: {e}; store a missing number as None") from None
    _check_str_keys(state, "state")  # (after dumps, which has refused a cycle)
    for name, value in tensors.items():
        value = np.asarray(value)
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise CheckpointError(f"tensors: key {name!r} has non-finite values; refusing to write a trainer "
                                  f"state that cannot be loaded")
    write_tensors = safetensors_writer(dict(tensors), metadata={"format": "gpt_oracle-trainer"})  # may raise: first
    save_together(directory, {OPTIMIZER_FILE: write_tensors,
                              TRAINER_STATE_FILE: lambda f: f.write(text.encode("utf-8"))}, TRAINER_JOURNAL)
    return directory


def _check_str_keys(value: Any, where: str) -> None:
    """CheckpointError naming the first dict key under `value` that is not a str, and its place."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointError(f"trainer state: key {k!r} in {where} is of type {type(k).__name__}, not str; "
                                      f"JSON object keys are strings, so it would not load back as saved")
            _check_str_keys(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_str_keys(v, f"{where}[{i}]")


def load_trainer_state(directory) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(state, tensors) as saved; tensors keep their dtype; non-finite floats, in the tensors or
    as NaN / Infinity in trainer_state.json, are an error."""
    directory = Path(directory)
    refuse_an_interrupted_save(directory, TRAINER_JOURNAL)
    state = read_json(directory / TRAINER_STATE_FILE)
    path = directory / OPTIMIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    tensors, _ = read_safetensors(path)
    for name, value in tensors.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise CheckpointError(f"{path}: key {name!r} has non-finite values")
    return state, tensors
