"""The safetensors header checks numpy_ref/safetensors_io.py makes and the `safetensors` package
does not.

numpy_ref reads and writes the format itself (an 8-byte little-endian header length, a JSON
header mapping each tensor name to its dtype, shape and [begin, end) byte offsets, then the
raw bytes). torch_impl reads through the package, which checks the size, the JSON, the dtypes
and that the offsets tile the buffer exactly, but reads some headers numpy_ref refuses; this
module refuses those first, so that the two trees accept the same files (checked in
parity_tests/test_checkpoint_errors.py, READER_CASES).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch

from torch_impl.checkpoint_files import CheckpointError

MAX_HEADER_BYTES = 100_000_000  # the package's own cap on the header
# The safetensors dtypes numpy_ref/safetensors_io.py reads. The package knows more (F8_E4M3, C64, ...):
# a file holding one is refused here as there, and the trainer-state writer never writes one.
DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
          "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32,
          "F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64}


def check_header(path: Path, size: int) -> None:
    """Refuse, as numpy_ref/safetensors_io.py does, the headers the package reads without a word:
    a key listed twice (the package keeps the last entry, so F16 bytes could be read as BF16), an
    entry with fields beyond dtype, shape and data_offsets, a dtype outside DTYPES, and a shape
    NumPy cannot hold (more than 64 dimensions; its non-zero dimensions times the item size at
    2**63 bytes or more, even when a zero makes it empty). A header too broken to parse here is
    left to the package, whose error names what is wrong."""
    if size < 8:
        return
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            return
        raw = f.read(n)

    def no_duplicates(pairs):
        obj = dict(pairs)
        if len(obj) < len(pairs):  # counted once: a header may hold a million keys
            dup = sorted(k for k, count in Counter(k for k, _ in pairs).items() if count > 1)
            raise CheckpointError(f"{path}: header key(s) {dup} appear more than once")
        return obj

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except CheckpointError:
        raise
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deeply: the package says which
        return
    if not isinstance(header, dict):
        return
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{path}: tensor {name!r}: header entry must have exactly dtype, shape and "
                                  f"data_offsets, got {e!r}")
        dtype, shape = e["dtype"], e["shape"]
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r}: unknown dtype {dtype!r}; known: {sorted(DTYPES)}")
        if isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape):
            nbytes_without_zeros = math.prod(d for d in shape if d) * DTYPES[dtype].itemsize
            if len(shape) > 64 or max(shape, default=0) >= 2**63 or nbytes_without_zeros >= 2**63:
                raise CheckpointError(f"{path}: tensor {name!r}: shape {shape} cannot be a NumPy array (at most 64 "
                                      f"dimensions, and the non-zero ones times the item size under 2**63 bytes)")
