"""The safetensors file format, read and written from scratch with NumPy (no torch, no package).

A safetensors file is three parts, nothing else:

    bytes 0 .. 8          N, the header length, an unsigned 64-bit little-endian integer
    bytes 8 .. 8 + N      a UTF-8 JSON object, padded with spaces to a multiple of 8 bytes:
                          {"__metadata__": {str: str, ...},           (optional)
                           "<name>": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]},
                           ...}
    bytes 8 + N .. EOF    the data buffer: each tensor's raw little-endian C-order bytes at
                          buffer[begin:end], with end - begin = prod(shape) * itemsize

The offsets are relative to the buffer, not the file. A valid buffer is tiled exactly: sorted by
`begin`, each tensor starts where the previous one ended, the first at 0, the last ends at the
end of the file (no gaps, no overlaps, no trailing bytes). Nothing is executed or unpickled:
reading is a JSON parse and fixed-size copies, so an untrusted file can at worst be rejected.

The writer lays tensors out as the official `safetensors` package does (largest dtype first in
its dtype order, then by name; metadata first in the header), so for the same tensors and
metadata the two produce identical bytes. `parity_tests/test_checkpoint.py` checks that.

Reference: https://github.com/huggingface/safetensors (the format's README and its Rust
`tensor.rs`, which also caps the header at 100 MB).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from numpy_ref.checkpoint_files import CheckpointError, atomic_write

MAX_HEADER_BYTES = 100_000_000  # the official reader's cap; a real GPT-2 header is ~15 kB

# safetensors dtype name -> NumPy dtype (little-endian). BF16 has no NumPy dtype: it is read as
# float32 (exactly: a bf16 value is the top 16 bits of a float32), and cannot be written.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"), "U8": np.dtype("<u1"), "I8": np.dtype("<i1"),
    "I16": np.dtype("<i2"), "U16": np.dtype("<u2"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I32": np.dtype("<i4"), "U32": np.dtype("<u4"), "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"), "I64": np.dtype("<i8"), "U64": np.dtype("<u8"),
}
# The official package orders the buffer by its dtype enum, descending; this is that enum's order.
_LAYOUT_RANK = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]
_NAME_OF = {np.dtype(v).str: k for k, v in DTYPES.items() if k != "BF16"}


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: where a tensor's bytes lie in the data buffer and how to read them."""

    name: str
    dtype: str  # the safetensors name, e.g. "F32"
    shape: tuple[int, ...]
    begin: int
    end: int


# ---- writing --------------------------------------------------------------------------------


def encode_safetensors(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """(header bytes including the 8-byte length, [little-endian C-order arrays in buffer order])."""
    arrays = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise CheckpointError(f"tensor name {name!r} is not allowed in a safetensors file")
        a = np.asarray(value)
        dtype_name = _NAME_OF.get(a.dtype.newbyteorder("<").str if a.dtype.byteorder != "|" else a.dtype.str)
        if dtype_name is None:
            raise CheckpointError(f"tensor {name!r}: dtype {a.dtype} has no safetensors equivalent; "
                                  f"supported: {sorted(_NAME_OF.values())}")
        # np.asarray(order="C"), not np.ascontiguousarray, which turns a 0-d array into shape (1,).
        arrays[name] = (dtype_name, np.asarray(a, dtype=DTYPES[dtype_name], order="C"))
    order = sorted(arrays, key=lambda n: (-_LAYOUT_RANK.index(arrays[n][0]), n))
    header: dict = {}
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise CheckpointError(f"safetensors metadata must map str to str; bad entries for {bad}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        dtype_name, a = arrays[name]
        header[name] = {"dtype": dtype_name, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # pad so the buffer starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text, [arrays[n][1] for n in order]


def safetensors_writer(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> Callable:
    """`write(file)` that writes `tensors` to an open binary file. The header is encoded here, so a
    bad name, dtype or metadata raises before any file is opened."""
    head, arrays = encode_safetensors(tensors, metadata)

    def write(f):
        f.write(head)
        for a in arrays:
            f.write(memoryview(a.reshape(-1)).cast("B"))

    return write


def write_safetensors(path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (name -> array) to `path` atomically (checkpoint_files.atomic_write);
    `metadata` is an optional str -> str."""
    atomic_write(path, safetensors_writer(tensors, metadata))


# ---- reading --------------------------------------------------------------------------------


def read_header(path) -> tuple[dict[str, TensorInfo], dict[str, str] | None, int]:
    """(name -> TensorInfo in file order, metadata or None, data start) after validating the
    header and offsets against the file's size; reads no tensor data."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise CheckpointError(f"{path}: the file is empty (a safetensors file starts with an 8-byte header length)")
        if size < 8:
            raise CheckpointError(f"{path}: truncated: {size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header length {n} bytes exceeds the limit of {MAX_HEADER_BYTES} bytes")
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated: the header claims {n} bytes but the file has only "
                                  f"{size - 8} after the length")
        raw = f.read(n)
    entries, metadata = _parse_header(path, raw)
    buffer_len = size - 8 - n
    _check_tiling(path, entries, buffer_len)
    return entries, metadata, 8 + n


def _parse_header(path: Path, raw: bytes) -> tuple[dict[str, TensorInfo], dict[str, str] | None]:
    def no_duplicates(pairs):
        obj = dict(pairs)
        if len(obj) < len(pairs):  # counted, not searched: a header may hold a million keys
            dup = sorted(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
            raise CheckpointError(f"{path}: header key(s) {dup} appear more than once")
        return obj

    def integer(text: str):  # "-0" is a float to the package's JSON parser (serde), so not a shape or offset here
        return -0.0 if text == "-0" else int(text)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates, parse_int=integer)
    except CheckpointError:
        raise
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: header is not valid UTF-8 ({e})") from None
    except ValueError as e:  # JSONDecodeError, and an integer too long for int()
        raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: header is not valid JSON (nested too deeply)") from None
    try:  # Python's json takes a lone UTF-16 surrogate escape ("\ud800"); the safetensors package does not
        json.dumps(header, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        bad = e.object[e.start:e.end].encode("unicode_escape").decode("ascii")
        raise CheckpointError(f"{path}: header is not valid JSON (lone surrogate escape {bad}: not a character)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and
                                     all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise CheckpointError(f"{path}: key '__metadata__' must be an object of str -> str, got {metadata!r}")
    entries = {}
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{path}: tensor {name!r}: header entry must have exactly dtype, shape and "
                                  f"data_offsets, got {e!r}")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r}: unknown dtype {dtype!r}; known: {sorted(DTYPES)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(f"{path}: tensor {name!r}: shape must be a list of non-negative ints, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{path}: tensor {name!r}: data_offsets must be [begin, end] with "
                                  f"0 <= begin <= end, got {offsets!r}")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes but "
                                  f"data_offsets {offsets} span {offsets[1] - offsets[0]}")
        try:  # NumPy's own limits (number of dimensions; elements, even when a zero makes it empty), on 0 bytes
            np.empty([0] * len(shape) if nbytes else shape, dtype=DTYPES[dtype])
        except ValueError as e:
            raise CheckpointError(f"{path}: tensor {name!r}: shape {shape} cannot be a NumPy array ({e})") from None
        entries[name] = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
    return entries, metadata


def _check_tiling(path: Path, entries: Mapping[str, TensorInfo], buffer_len: int) -> None:
    """The tensors must cover the data buffer exactly: no gap, no overlap, nothing past the end."""
    expected = 0
    for info in sorted(entries.values(), key=lambda i: (i.begin, i.end)):
        if info.end > buffer_len:
            raise CheckpointError(f"{path}: tensor {info.name!r}: data_offsets [{info.begin}, {info.end}] run past "
                                  f"the {buffer_len}-byte data buffer (file truncated?)")
        if info.begin != expected:
            what = "overlaps the previous tensor" if info.begin < expected else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor {info.name!r}: data_offsets [{info.begin}, {info.end}] {what} "
                                  f"(expected begin {expected})")
        expected = info.end
    if expected != buffer_len:
        raise CheckpointError(f"{path}: {buffer_len - expected} bytes after the last tensor are not covered by "
                              f"any header entry")


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str] | None]:
    """(name -> array in file order, metadata or None). Every array is its own writable copy in
    native byte order; BF16 tensors come back as float32 (exactly)."""
    entries, metadata, start = read_header(path)
    tensors = {}
    with open(path, "rb") as f:
        for name, info in entries.items():
            raw = np.empty(info.shape, dtype=DTYPES[info.dtype])
            f.seek(start + info.begin)
            got = f.readinto(memoryview(raw.reshape(-1)).cast("B")) if raw.nbytes else 0
            if got != raw.nbytes:
                raise CheckpointError(f"{path}: tensor {name!r}: read {got} of {raw.nbytes} bytes (file changed?)")
            tensors[name] = _to_native(raw, info.dtype)
    return tensors, metadata


def _to_native(raw: np.ndarray, dtype_name: str) -> np.ndarray:
    if dtype_name == "BF16":
        # bf16 is the high half of a float32: shift the 16 bits up and reinterpret.
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(raw.dtype.newbyteorder("="), copy=False)
