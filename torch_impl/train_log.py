"""What a training run shows and leaves behind, with the standard library only.

`TextProgress` prints a line with the step, the loss and tokens per second every few seconds
(to stderr); `append_log` adds one JSON object per line to `log.jsonl`. The trainer takes the
progress class and an optional `plot(path, history)` as arguments, so a front end can bring
tqdm and matplotlib (gpt_oracle/train_report.py does) while this tree depends on neither.
numpy_ref/train_log.py is the same file for the NumPy tree (the trees share no code).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path


class TextProgress:
    """Progress over optimiser steps: `update(step, loss, tokens_per_s)`, `write(text)`, `close()`."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train") -> None:
        self.total, self.enabled, self.desc = total, enabled, desc
        self._last_print = 0.0

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        now = time.monotonic()
        if self.enabled and (now - self._last_print > 5.0 or step == self.total):
            self._last_print = now
            print(f"{self.desc}: step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s",
                  file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def append_log(path: Path, record: dict) -> None:
    """One JSON object per line; the file only ever grows. Strict JSON: a non-finite number (the
    validation loss of a run without validation data, a loss that diverged) is written as null,
    since NaN and Infinity are not JSON and strict readers refuse the line."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(finite_or_null(record), allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def finite_or_null(value):
    """`value` with every non-finite float, at any depth, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value
