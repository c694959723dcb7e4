"""Strict JSON files, written whole or not at all.

`write_json(path, obj)` writes strict JSON (RFC 8259 has no NaN or Infinity: a non-finite float
becomes null, which every parser reads) to a temporary file in the same directory, flushes it to
disk and renames it over `path`. A write interrupted at any moment leaves the old file (or no
file) at `path`, never a truncated one. A target that exists and is not a regular file (a FIFO,
`/dev/stdout`) is written into directly: a rename would replace it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def finite_or_none(obj: Any) -> Any:
    """`obj` with every NaN or infinite float (in dicts, lists and tuples) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def write_json(path, obj: Any) -> Path:
    path = Path(path)
    text = json.dumps(finite_or_none(obj), indent=2, allow_nan=False) + "\n"  # an error here writes nothing
    if path.exists() and not path.is_file():  # a FIFO, /dev/stdout: written into, never replaced by a rename
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same directory: the rename is atomic
    f = open(tmp, "x", encoding="utf-8")  # "x": never writes into (or, below, removes) a file it did not create
    try:
        with f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
