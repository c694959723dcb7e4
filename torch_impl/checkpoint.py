"""Checkpoints in the Hugging Face GPT-2 layout, and trainer state, with the `safetensors` package.

A model checkpoint is a directory (docs/design.md, "Checkpoints"):

    config.json         GPT2Config's fields plus "gpt_oracle": our GPTConfig.to_dict()
    model.safetensors   "transformer.<name>" per parameter, "lm_head.weight" when untied; float32

Hugging Face GPT-2 stores its linear weights (in, out) (the `Conv1D` module) and its `lm_head`
as (V, C), exactly our layout, so no weight is transposed on the way in or out. Its `c_attn`
always has a bias: without `qkv_bias` we write zeros (the same function) and require zeros back.

Loading accepts what `transformers` writes (with or without the `transformer.` prefix, the
`attn.bias` / `attn.masked_bias` mask buffers of older files in any dtype, no `lm_head.weight`
when tied, the shards of a `model.safetensors.index.json`, no `gpt_oracle` object) and rejects,
with a CheckpointError naming the file and the key, malformed files, an index that disagrees
with its shards, missing or extra tensors, wrong shapes, float64 tensors, non-finite values and
configurations this model would not reproduce (three different dropout rates included), a
config.json value of the wrong type (`"false"` for a boolean) and values past the range of the
dtype asked for (1e5 as float16).

Trainer state: `trainer_state.json` and `optimizer.safetensors` (any dtype, float64 included).
A save replaces its two files as one change (`_save_together`): both are written to temporary
files and fsynced, a journal (`checkpoint.saving.json`, `trainer_state.saving.json`) recording
their sizes and sha256 is made durable, the old files are renamed aside and the new ones into
place, and the journal is removed. A load refuses while a journal names a file that is not yet
the new one; a failed save puts the old files back. Other files in the directory are untouched.
`torch.load` is never used: nothing is ever unpickled. numpy_ref/checkpoint.py is the same
contract written from scratch without torch; parity_tests/test_checkpoint.py swaps files
between the two.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from torch_impl.config import GPTConfig

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
MODEL_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}  # never F64


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (or saved); the message names the file and the key."""


def checkpoint_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names -> shapes, in docs/design.md's order."""
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
    if not config.tie_embeddings:
        shapes[HEAD] = (V, C)
    return shapes


def _file_key(name: str) -> str:
    return name if name == HEAD else PREFIX + name


# ---- atomic files and all-or-nothing saves ---------------------------------------------------


def _write_temporary(path: Path, write: Callable[[str], None]) -> Path:
    """`write(tmp_path)` into a new temporary file next to `path`, with a new file's usual mode,
    fsynced; returns its path. On failure the temporary file is removed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _new_file_mode())  # mkstemp makes it 0600; the file gets a new file's usual mode
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` next to `path`, fsync, rename onto `path`, fsync the directory; on failure
    remove the temp file."""
    tmp = _write_temporary(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _new_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 without the process's umask bits
    (0o644 under the usual umask 022). Reading the umask means setting it: set back at once."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _save_together(directory: Path, writers: Mapping[str, Callable[[str], None]], journal_name: str) -> None:
    """Replace the files `writers` names (file name -> `write(tmp_path)`) in `directory` as one change.

    The journal `directory / journal_name` exists only while the files are being swapped:

        1. each new file is written to a temporary file next to its place and fsynced
        2. the journal records each new file's size and sha256 and the name its old file will be
           kept under; it is renamed into place and the directory fsynced before anything moves
        3. each old file is renamed aside, the new one renamed into place; the directory fsynced
        4. the journal is removed (the commit), then the old files

    A loader that finds a journal refuses unless every file it lists is the new one (a save that
    got through 3 but not 4), so whenever it stops, a power cut included (renames reordered
    between two fsyncs too), the directory loads as the old checkpoint, as the new one, or not at
    all with an error naming the journal. An exception before the commit puts back every old file
    and the journal as it was (none, normally): the directory is byte for byte what it was, and
    one it created is removed. Files `writers` does not name are never touched.
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
            temps[name] = _write_temporary(directory / name, write)
        files = {name: {"size": tmp.stat().st_size, "sha256": _sha256(tmp),
                        "previous": tmp.name[:-len(".tmp")] + ".old" if (directory / name).exists() else None}
                 for name, tmp in temps.items()}
        text = json.dumps({"files": files}, indent=2) + "\n"
        journal_changed = True  # (if the write below fails it has not: putting it back is harmless)
        _atomic(journal, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        for name, tmp in temps.items():
            if files[name]["previous"] is not None:
                os.replace(directory / name, directory / files[name]["previous"])
                aside[name] = directory / files[name]["previous"]
            os.replace(tmp, directory / name)
            placed.append(name)
        _fsync_directory(directory)
        os.unlink(journal)  # the commit
    except BaseException:
        _put_back(directory, temps, aside, placed)  # a step that fails raises here, the journal left in place
        if journal_changed and journal_before is None:
            journal.unlink(missing_ok=True)
        elif journal_changed:
            _atomic(journal, lambda tmp: Path(tmp).write_bytes(journal_before))
        _fsync_directory(directory)
        for made in reversed(created):  # innermost first; stops at one that holds something else
            try:
                if made.exists():  # (mkdir may have failed before it)
                    os.rmdir(made)
            except OSError:
                break
        raise
    for old in aside.values():
        try:
            os.unlink(old)
        except OSError:  # the new checkpoint is committed; a hidden old copy left behind costs only space
            pass
    _fsync_directory(directory)


def _put_back(directory: Path, temps: Mapping[str, Path], aside: dict[str, Path], placed: list[str]) -> None:
    """Undo steps 1 and 3 of a save that failed before its commit: old files back, new ones removed."""
    for name in reversed(placed):
        if name in aside:
            os.replace(aside.pop(name), directory / name)
        else:
            os.unlink(directory / name)  # there was no old file
    for name, old in aside.items():  # renamed aside, its new file not yet in place
        os.replace(old, directory / name)
    for name, tmp in temps.items():
        if name not in placed:
            tmp.unlink(missing_ok=True)


def _refuse_an_interrupted_save(directory: Path, journal_name: str) -> None:
    """CheckpointError if a save's journal is in `directory` and a file it lists is not the new
    one: the save stopped part way and the files there are not one checkpoint."""
    journal = directory / journal_name
    if not journal.exists():
        return
    files = _read_json(journal).get("files")
    if not (isinstance(files, dict) and all(_is_journal_entry(name, e) for name, e in files.items())):
        raise CheckpointError(f"{journal}: key 'files' must map file names in {directory} to "
                              f"{{size, sha256, previous}}, got {files!r}")
    unfinished = [name for name, e in files.items() if not _is_as_recorded(directory / name, e)]
    if unfinished:
        kept = [e["previous"] for e in files.values() if e["previous"] is not None]
        raise CheckpointError(f"{journal}: a save into {directory} stopped part way: {unfinished} are not yet the "
                              f"files it was writing, so the files there are not one checkpoint (the previous "
                              f"versions are kept as {kept}); save the checkpoint again")


def _is_journal_entry(name, entry) -> bool:
    """A bare file name (the journal must not point the reader elsewhere) -> size, sha256, previous."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
        return False
    return (isinstance(entry, dict) and set(entry) == {"size", "sha256", "previous"}
            and type(entry["size"]) is int and isinstance(entry["sha256"], str)
            and (entry["previous"] is None or isinstance(entry["previous"], str)))


def _is_as_recorded(path: Path, entry: Mapping[str, Any]) -> bool:
    """Is `path` the file the journal entry records (the size first: hashing is the slow part)?"""
    return path.is_file() and path.stat().st_size == entry["size"] and _sha256(path) == entry["sha256"]


# ---- config.json ----------------------------------------------------------------------------


def hf_config_dict(config: GPTConfig) -> dict[str, Any]:
    """Hugging Face GPT2Config fields for `config`, then our own config under `gpt_oracle`."""
    eot = 50256 if config.vocab_size > 50256 else None  # <|endoftext|>, when the vocabulary has it
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size, "n_positions": config.context_length, "n_ctx": config.context_length,
        "n_embd": config.emb_dim, "n_layer": config.n_layers, "n_head": config.n_heads,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",  # tanh-approximated GELU
        "layer_norm_epsilon": config.ln_eps,
        "resid_pdrop": config.drop_rate, "embd_pdrop": config.drop_rate, "attn_pdrop": config.drop_rate,
        "scale_attn_weights": True, "tie_word_embeddings": config.tie_embeddings, "dtype": "float32",
        "bos_token_id": eot, "eos_token_id": eot,
        "gpt_oracle": config.to_dict(),
    }


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0  # JSON true is a Python int too


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # json reads NaN


# Each GPT-2 field config.json's values are read from: key -> (is the value usable, what is expected).
_HF_FIELDS = {
    "vocab_size": (_positive_int, "a positive integer"),
    "n_positions": (_positive_int, "a positive integer"),
    "n_ctx": (_positive_int, "a positive integer"),
    "n_embd": (_positive_int, "a positive integer"),
    "n_layer": (_positive_int, "a positive integer"),
    "n_head": (_positive_int, "a positive integer"),
    "layer_norm_epsilon": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "resid_pdrop": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "embd_pdrop": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "attn_pdrop": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "tie_word_embeddings": (lambda v: isinstance(v, bool), "true or false (a JSON boolean, not a string)"),
}


def config_from_hf(hf: Mapping[str, Any], path) -> GPTConfig:
    """GPTConfig from config.json: the `gpt_oracle` object when present, else the HF fields."""
    for key, (ok, want) in _HF_FIELDS.items():
        if key in hf and not ok(hf[key]):
            raise CheckpointError(f"{path}: key {key!r} = {hf[key]!r}: expected {want}")
    unsupported = {
        "model_type": (lambda v: v == "gpt2", "'gpt2'"),
        "activation_function": (lambda v: v in ("gelu_new", "gelu_pytorch_tanh"), "the tanh GELU 'gelu_new'"),
        "n_inner": (lambda v: v is None or (_positive_int(v) and v == 4 * hf.get("n_embd", -1)),
                    "null or 4 * n_embd"),
        "scale_attn_weights": (lambda v: v is True, "true"),
        "scale_attn_by_inverse_layer_idx": (lambda v: v is False, "false"),
    }
    for key, (ok, want) in unsupported.items():
        if key in hf and not ok(hf[key]):
            raise CheckpointError(f"{path}: key {key!r} = {hf[key]!r} is not supported (need {want})")
    # Older transformers releases made GPT-2's causal mask n_ctx x n_ctx and its wpe n_positions
    # long: with the two unequal, the writer's model did not attend over n_positions tokens as ours.
    if "n_positions" in hf and "n_ctx" in hf and hf["n_positions"] != hf["n_ctx"]:
        raise CheckpointError(f"{path}: key 'n_ctx' = {hf['n_ctx']!r} differs from key 'n_positions' = "
                              f"{hf['n_positions']!r}; this GPT-2 has one context length for both")
    if "gpt_oracle" in hf:
        try:
            config = GPTConfig.from_dict(hf["gpt_oracle"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: key 'gpt_oracle': {e}") from None
        pairs = {"vocab_size": config.vocab_size, "n_positions": config.context_length, "n_ctx": config.context_length,
                 "n_embd": config.emb_dim, "n_layer": config.n_layers, "n_head": config.n_heads,
                 "layer_norm_epsilon": config.ln_eps, "tie_word_embeddings": config.tie_embeddings,
                 "resid_pdrop": config.drop_rate, "embd_pdrop": config.drop_rate, "attn_pdrop": config.drop_rate}
        for key, ours in pairs.items():
            if key in hf and hf[key] != ours:
                raise CheckpointError(f"{path}: key {key!r} = {hf[key]!r} disagrees with gpt_oracle's {ours!r}")
        return config
    required = ["vocab_size", "n_embd", "n_layer", "n_head"]
    missing = [k for k in required if k not in hf] + ([] if "n_positions" in hf or "n_ctx" in hf else ["n_positions"])
    if missing:
        raise CheckpointError(f"{path}: key(s) {missing} missing (needed to build a GPT-2 config)")
    drops = {k: hf.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}  # GPT2Config's defaults
    if any(v != drops["resid_pdrop"] for v in drops.values()):
        raise CheckpointError(f"{path}: keys {drops} differ; this GPT-2 has one drop_rate for the embeddings, "
                              f"the attention weights and the residual branches")
    if hf["n_embd"] % hf["n_head"]:
        raise CheckpointError(f"{path}: key 'n_embd' = {hf['n_embd']} is not divisible by key 'n_head' = "
                              f"{hf['n_head']} (C = nh * hs)")
    try:
        return GPTConfig(vocab_size=hf["vocab_size"], context_length=hf.get("n_positions", hf.get("n_ctx")),
                         emb_dim=hf["n_embd"], n_heads=hf["n_head"], n_layers=hf["n_layer"],
                         drop_rate=float(drops["resid_pdrop"]),
                         qkv_bias=True,  # Hugging Face GPT-2's c_attn always has a bias
                         tie_embeddings=hf.get("tie_word_embeddings", True),  # GPT2Config's default
                         ln_eps=float(hf.get("layer_norm_epsilon", 1e-5)))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


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


# ---- safetensors reading, with errors that name the file and the key --------------------------


def _open_tensors(path: Path) -> tuple[dict[str, str], Callable[[], dict[str, torch.Tensor]]]:
    """(key -> safetensors dtype name, a loader of all tensors on the CPU) after the package's
    own validation of the header (size, JSON, dtypes, offsets tiling the buffer exactly)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (a safetensors file starts with an 8-byte header length)")
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


def save_checkpoint(directory, config: GPTConfig, state_dict: Mapping[str, torch.Tensor]) -> Path:
    """Write `config.json` and `model.safetensors` (float32, on the CPU) into `directory`."""
    directory = Path(directory)
    expected = checkpoint_shapes(config)
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
    config_text = json.dumps(hf_config_dict(config), indent=2) + "\n"  # before any write: a TypeError writes nothing
    _save_together(directory, {WEIGHTS_FILE: lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
                               CONFIG_FILE: lambda tmp: Path(tmp).write_text(config_text, encoding="utf-8")},
                   MODEL_JOURNAL)
    return directory


def load_checkpoint(directory, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(config, state_dict) from a checkpoint directory, tensors as `dtype` on `device`. A value
    finite in the file but past `dtype`'s range (1e5 as float16) is an error, not an inf."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    _refuse_an_interrupted_save(directory, MODEL_JOURNAL)
    config = config_from_hf(_read_json(directory / CONFIG_FILE), directory / CONFIG_FILE)
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
    if config.tie_embeddings and HEAD in tensors:
        if "wte.weight" in tensors and not torch.equal(tensors[HEAD], tensors["wte.weight"]):
            raise CheckpointError(f"{file_of[HEAD]}: key {HEAD!r} differs from wte.weight but config.json ties them")
        del tensors[HEAD]  # a tied head saved explicitly: the same tensor twice (a missing wte: named below)
    if not config.qkv_bias:
        for i in range(config.n_layers):
            bias = tensors.pop(f"h.{i}.attn.c_attn.bias", None)
            if bias is not None and bool((bias != 0).any()):
                key = file_keys[f"h.{i}.attn.c_attn.bias"]
                raise CheckpointError(f"{file_of[key]}: key {key!r} is non-zero but the config has qkv_bias=False")
    expected = checkpoint_shapes(config)
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
    Non-finite floats are refused before anything is written, as load_trainer_state refuses them."""
    directory = Path(directory)
    text = json.dumps(dict(state), indent=2) + "\n"  # a TypeError here leaves nothing written
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    for key, t in cpu.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"tensors: key {key!r} has non-finite values; refusing to write a trainer "
                                  f"state that cannot be loaded")
    metadata = {"format": "gpt_oracle-trainer"}
    _save_together(directory, {OPTIMIZER_FILE: lambda tmp: save_file(cpu, tmp, metadata=metadata),
                               TRAINER_STATE_FILE: lambda tmp: Path(tmp).write_text(text, encoding="utf-8")},
                   TRAINER_JOURNAL)
    return directory


def load_trainer_state(directory) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(state, tensors on the CPU, dtypes as saved); non-finite floats are an error."""
    directory = Path(directory)
    _refuse_an_interrupted_save(directory, TRAINER_JOURNAL)
    state = _read_json(directory / TRAINER_STATE_FILE)
    path = directory / OPTIMIZER_FILE
    _, load = _open_tensors(path)
    tensors = load()
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: key {key!r} has non-finite values")
    return state, tensors
