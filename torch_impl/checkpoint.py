"""Checkpoints in the Hugging Face GPT-2 layout, and trainer state, with the `safetensors` package.

A model checkpoint is a directory (docs/design.md, "Checkpoints"):

    config.json         GPT2Config's fields plus "gpt_oracle": our GPTConfig.to_dict()
    model.safetensors   "transformer.<name>" per parameter, "lm_head.weight" when untied; float32

A classifier's checkpoint (`num_classes=K` to save, `classifier=True` to load; classifier.py)
is the same without "lm_head.weight", plus "classifier.weight" (C, K) and "classifier.bias" (K,),
unprefixed; its config.json adds "gpt_oracle_num_classes" and "num_labels" (K) and names the
architecture GPT2Model. Each loader refuses the other kind, naming it.

Hugging Face GPT-2 stores its linear weights (in, out) (the `Conv1D` module) and its `lm_head`
as (V, C), exactly our layout, so no weight is transposed on the way in or out. Its `c_attn`
always has a bias: without `qkv_bias` we write zeros (the same function) and require zeros back.

Loading accepts what `transformers` writes (with or without the `transformer.` prefix, the
`attn.bias` / `attn.masked_bias` mask buffers of older files in any dtype numpy_ref reads, no
`lm_head.weight` when tied, the shards of a `model.safetensors.index.json`, no `gpt_oracle`
object) and rejects, with a CheckpointError naming the file and the key, malformed files (what
the package checks, and before that what it lets through and numpy_ref/safetensors_io.py
refuses: a key twice, an entry with more fields, a dtype numpy_ref cannot read, a shape past
NumPy's limits), an index that disagrees
with its shards, missing or extra tensors, wrong shapes, float64 tensors, non-finite values and
configurations this model would not reproduce (three different dropout rates included), a
config.json value of the wrong type (`"false"` for a boolean) and values past the range of the
dtype asked for (1e5 as float16). config.json is read and checked in checkpoint_config.py.

Trainer state: `trainer_state.json` (str keys only) and `optimizer.safetensors` (tensors of the
safetensors dtypes numpy_ref reads too, float64 included).
Each save replaces its two files as one change, and a load refuses a save cut off part way:
the journal protocol is in checkpoint_files.py. Other files in the directory are untouched.
`torch.load` is never used: nothing is ever unpickled. numpy_ref/checkpoint.py is the same
contract written from scratch without torch; parity_tests/test_checkpoint.py swaps files
between the two.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from torch_impl.checkpoint_config import config_from_hf, hf_config_dict
from torch_impl.checkpoint_files import CheckpointError, read_json, refuse_an_interrupted_save, save_together
from torch_impl.config import GPTConfig
from torch_impl.safetensors_io import DTYPES, check_header

# CheckpointError, hf_config_dict and config_from_hf are defined in checkpoint_files.py and
# checkpoint_config.py; they are part of this module's API all the same.
__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "save_trainer_state", "load_trainer_state",
           "checkpoint_shapes", "hf_config_dict", "config_from_hf"]

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
MODEL_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}  # never F64
LOAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what load_checkpoint casts to


def checkpoint_shapes(config: GPTConfig, num_classes: int | None = None) -> dict[str, tuple[int, ...]]:
    """Our parameter names -> shapes, in docs/design.md's order; with `num_classes`, a
    classifier's (classifier.py): no lm_head.weight, then classifier.weight and classifier.bias."""
    V, Tc, C = config.vocab_size, config.context_length, config.emb_dim
    shapes = {"wte.weight": (V, C), "wpe.weight": (Tc, C)}
    for i in range(config.n_layers):
        h = f"h.{i}."
        shapes.update({h + "ln_1.weight": (C,), h + "ln_1.bias": (C,), h + "attn.c_attn.weight": (C, 3 * C)})
        if config.qkv_bias:
            shapes[h + "attn.c_attn.bias"] = (3 * C,)
        shapes.update({h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
                       h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
                       h + "mlp.c_fc.weight": (C, 4 * C), h + "mlp.c_fc.bias": (4 * C,),
                       h + "mlp.c_proj.weight": (4 * C, C), h + "mlp.c_proj.bias": (C,)})
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
    if num_classes is not None:
        from torch_impl.classifier import check_num_classes  # classifier.py imports the model, not this

        K = check_num_classes(num_classes)
        shapes.update({"classifier.weight": (C, K), "classifier.bias": (K,)})
    elif not config.tie_embeddings:
        shapes[HEAD] = (V, C)
    return shapes


def _file_key(name: str) -> str:
    """The file's key for one of our names: the heads keep theirs, the trunk's take the prefix."""
    return name if name == HEAD or name.startswith("classifier.") else PREFIX + name


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


# ---- safetensors reading, with errors that name the file and the key --------------------------


def _open_tensors(path: Path) -> tuple[dict[str, str], Callable[[], dict[str, torch.Tensor]]]:
    """(key -> safetensors dtype name, a loader of all tensors on the CPU) after `safetensors_io.check_header`
    and the package's own validation of the header (size, JSON, dtypes, offsets tiling the
    buffer exactly)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (a safetensors file starts with an 8-byte header length)")
    check_header(path, size)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: {e}{_culprit(path, size)}") from None

    def load() -> dict[str, torch.Tensor]:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k).clone() for k in f.keys()}  # clone: independent of the file's mmap

    return dtypes, load


def _culprit(path: Path, size: int) -> str:
    """A best-effort ' (tensor ...)' naming which header entry the package's error is about."""
    try:
        if size < 8:
            return f" (the file has {size} bytes, fewer than the 8-byte header length)"
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if 8 + n > size:
                return f" (the header claims {n} bytes, the file has {size - 8} after the length field)"
            header = json.loads(f.read(n))
        buffer = size - 8 - n
        for key, e in header.items():
            if key != "__metadata__" and isinstance(e, dict) and max(e.get("data_offsets", [0])) > buffer:
                return f" (tensor {key!r}: data_offsets {e['data_offsets']} run past the {buffer}-byte buffer)"
    except (ValueError, TypeError, AttributeError, RecursionError):  # a header too broken to point into
        pass
    return ""


# ---- model checkpoints ----------------------------------------------------------------------


def save_checkpoint(directory, config: GPTConfig, state_dict: Mapping[str, torch.Tensor], *,
                    num_classes: int | None = None) -> Path:
    """Write `config.json` and `model.safetensors` (float32, on the CPU) into `directory`.

    With `num_classes`, a classifier's (classifier.py): the trunk's tensors as above, no
    `lm_head.weight`, then `classifier.weight` (C, K) and `classifier.bias` (K,) under their own
    names; config.json also holds `gpt_oracle_num_classes` and names the architecture GPT2Model
    (Hugging Face's GPT2Model loads the trunk from it, leaving the head aside)."""
    directory = Path(directory)
    expected = checkpoint_shapes(config, num_classes)
    _check_names_and_shapes("state_dict", {k: tuple(v.shape) for k, v in state_dict.items()}, expected)
    tensors = {}
    for name in expected:
        t = state_dict[name].detach()
        stored = t.to(device="cpu", dtype=torch.float32).contiguous().clone()  # what the file holds
        bad = ~torch.isfinite(stored)
        if bad.any():
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise CheckpointError(f"state_dict: key {name!r} has {int(bad.sum())} values that are not finite in "
                                  f"float32 (first at index {first}: {float(t.cpu()[first])!r}; float32 holds "
                                  f"|x| < 3.4e38); refusing to write a checkpoint that cannot be loaded")
        tensors[_file_key(name)] = stored
    if not config.qkv_bias:
        for i in range(config.n_layers):  # HF GPT-2 always has this bias; zeros are our no-bias
            tensors[f"{PREFIX}h.{i}.attn.c_attn.bias"] = torch.zeros(3 * config.emb_dim, dtype=torch.float32)
    hf = hf_config_dict(config)
    if num_classes is not None:
        # num_labels: what Hugging Face's classification models read; they would still draw their
        # own head (`score`, no bias), and GPT2LMHeadModel would load the trunk (untied: with a
        # random vocabulary head): only GPTClassifier.from_pretrained reads this head.
        hf.update(architectures=["GPT2Model"], num_labels=int(num_classes), **{NUM_CLASSES: int(num_classes)})
    config_text = json.dumps(hf, indent=2) + "\n"  # before any write: a TypeError writes nothing
    save_together(directory, {WEIGHTS_FILE: lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
                              CONFIG_FILE: lambda tmp: Path(tmp).write_text(config_text, encoding="utf-8")},
                  MODEL_JOURNAL)
    return directory


def load_checkpoint(directory, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None, *,
                    classifier: bool = False) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(config, state_dict) from a checkpoint directory, tensors as `dtype` (one of LOAD_DTYPES,
    else a TypeError before anything is read: an integer or bool dtype would truncate every
    weight) on `device`. A value finite in the file but past `dtype`'s range (1e5 as float16) is
    an error, not an inf. `classifier`: a classifier's checkpoint (see save_checkpoint), and
    only one; its K is the length of state_dict["classifier.bias"]."""
    if dtype not in LOAD_DTYPES:
        raise TypeError(f"load_checkpoint: dtype {dtype} cannot hold the weights; expected one of "
                        f"{[str(d) for d in LOAD_DTYPES]}")
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    refuse_an_interrupted_save(directory, MODEL_JOURNAL)
    hf = read_json(directory / CONFIG_FILE)
    config = config_from_hf(hf, directory / CONFIG_FILE)
    num_classes = _num_classes(hf, directory / CONFIG_FILE, classifier)
    where, raw, file_of = _read_weights(directory)
    tensors: dict[str, torch.Tensor] = {}
    file_keys: dict[str, str] = {}  # our name -> the file's key, for error messages
    for key, t in raw.items():
        if _is_mask_buffer(key):
            continue
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if name in tensors:
            raise CheckpointError(f"{file_of[key]}: key {key!r} appears both with and without the {PREFIX!r} prefix")
        tensors[name], file_keys[name] = t, key
    if num_classes is None and config.tie_embeddings and HEAD in tensors:
        if "wte.weight" in tensors and not torch.equal(tensors[HEAD], tensors["wte.weight"]):
            raise CheckpointError(f"{file_of[HEAD]}: key {HEAD!r} differs from wte.weight but config.json ties them")
        del tensors[HEAD]  # a tied head saved explicitly: the same tensor twice (a missing wte: named below)
    if not config.qkv_bias:
        for i in range(config.n_layers):
            bias = tensors.pop(f"h.{i}.attn.c_attn.bias", None)
            if bias is not None and bool((bias != 0).any()):
                key = file_keys[f"h.{i}.attn.c_attn.bias"]
                raise CheckpointError(f"{file_of[key]}: key {key!r} is non-zero but the config has qkv_bias=False")
    expected = checkpoint_shapes(config, num_classes)
    _check_names_and_shapes(str(where), {k: tuple(v.shape) for k, v in tensors.items()}, expected,
                            lambda k: file_keys.get(k) or _file_key(k))
    state = {}
    for name in expected:
        t, where_key = tensors[name], f"{file_of[file_keys[name]]}: key {file_keys[name]!r}"
        bad = ~torch.isfinite(t)
        if bad.any():
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise CheckpointError(f"{where_key} has {int(bad.sum())} non-finite values (first at index {first}: "
                                  f"{t[first].item()})")
        cast = t.to(dtype)  # float16 (|x| <= 65504) turns a finite 1e5 into inf; bfloat16 float32's largest
        bad = ~torch.isfinite(cast)
        if bad.any():
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise CheckpointError(f"{where_key} has {int(bad.sum())} values outside {dtype}'s range "
                                  f"(|x| <= {torch.finfo(dtype).max:.6g}), first at index {first}: "
                                  f"{t[first].item()!r}; as {dtype} they would be inf")
        state[name] = cast.to(device=device)
    return config, state


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


def _read_weights(directory: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, Path]]:
    """(the file that lists the weights, the file's key -> tensor, the file's key -> the file holding it)
    from model.safetensors or the shards of model.safetensors.index.json, each shard holding exactly
    the keys the index gives it. Every header and dtype is checked before any data is read."""
    where, shards = _weight_files(directory)
    loaders = {}
    for path, listed in shards.items():
        dtypes, load = _open_tensors(path)
        loaders[path] = load
        for key, dt in dtypes.items():
            if dt not in MODEL_DTYPES and not _is_mask_buffer(key):
                why = "GPT-2 checkpoints are float32/bf16/fp16; cast to float32 before saving" if dt == "F64" \
                    else f"expected one of {sorted(MODEL_DTYPES)}"
                raise CheckpointError(f"{path}: key {key!r} has dtype {dt}: {why}")
        if listed is not None and set(dtypes) != listed:
            stray, absent = sorted(set(dtypes) - listed), sorted(listed - set(dtypes))
            raise CheckpointError(f"{path}: disagrees with {where}: key(s) {stray} are not listed for this shard, "
                                  f"key(s) {absent} are listed but missing")
    raw, file_of = {}, {}
    for path, load in loaders.items():
        tensors = load()
        raw.update(tensors)
        file_of.update(dict.fromkeys(tensors, path))
    return where, raw, file_of


def _is_mask_buffer(key: str) -> bool:
    """`h.{i}.attn.bias` / `h.{i}.attn.masked_bias`, with or without the prefix: the causal-mask
    buffers older GPT-2 files carry (float, uint8 or bool constants, not parameters)."""
    parts = (key[len(PREFIX):] if key.startswith(PREFIX) else key).split(".")
    return len(parts) == 4 and parts[0] == "h" and parts[2] == "attn" and parts[3] in ("bias", "masked_bias")


def _check_names_and_shapes(where: str, shapes: Mapping[str, tuple], expected: Mapping[str, tuple],
                            key: Callable[[str], str] = str) -> None:
    """Same names and shapes; `key(name)` is how an error names a tensor (the file's own key)."""
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


def save_trainer_state(directory, state: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Path:
    """`optimizer.safetensors` (dtypes kept, float64 included), then `trainer_state.json`.
    Refused before anything is written, as the loaders would refuse them (load_trainer_state, or
    numpy_ref's): non-finite floats, in the tensors or the state (strict JSON has none); a state
    key, at any depth, that is not a str (JSON writes 100 as "100", which collides with a "100");
    a tensor name that is not a str or is `__metadata__`; a dtype outside DTYPES (complex, float8)."""
    directory = Path(directory)
    try:  # before anything is written; strict JSON, which has no NaN or Infinity
        text = json.dumps(dict(state), indent=2, allow_nan=False) + "\n"
    except ValueError as e:
        raise CheckpointError(f"trainer state: {e}; store a missing number as None") from None
    _check_str_keys(state, "state")  # (after dumps, which has refused a cycle)
    for key, v in tensors.items():
        if not isinstance(key, str) or key == "__metadata__":  # the header's own key
            raise CheckpointError(f"tensor name {key!r} is not allowed in a safetensors file")
        if v.dtype not in DTYPES.values():
            raise CheckpointError(f"tensor {key!r}: dtype {v.dtype} is not one of the safetensors dtypes both "
                                  f"trees read; supported: {sorted(DTYPES)}")
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    for key, t in cpu.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"tensors: key {key!r} has non-finite values; refusing to write a trainer "
                                  f"state that cannot be loaded")
    metadata = {"format": "gpt_oracle-trainer"}
    save_together(directory, {OPTIMIZER_FILE: lambda tmp: save_file(cpu, tmp, metadata=metadata),
                              TRAINER_STATE_FILE: lambda tmp: Path(tmp).write_text(text, encoding="utf-8")},
                  TRAINER_JOURNAL)
    return directory


def _check_str_keys(value: Any, where: str) -> None:
    """CheckpointError naming the first dict key under `value` that is not a str, and where it is."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointError(f"trainer state: key {k!r} in {where} is of type {type(k).__name__}, not str; "
                                      f"JSON object keys are strings, so it would not load back as saved")
            _check_str_keys(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_str_keys(v, f"{where}[{i}]")


def load_trainer_state(directory) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(state, tensors on the CPU, dtypes as saved); non-finite floats, in the tensors or as
    NaN / Infinity in trainer_state.json, are an error."""
    directory = Path(directory)
    refuse_an_interrupted_save(directory, TRAINER_JOURNAL)
    state = read_json(directory / TRAINER_STATE_FILE)
    path = directory / OPTIMIZER_FILE
    _, load = _open_tensors(path)
    tensors = load()
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: key {key!r} has non-finite values")
    return state, tensors
