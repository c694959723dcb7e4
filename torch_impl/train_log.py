"""What a training run shows and leaves behind: a progress bar, a JSON-lines log, a loss plot.

The progress bar is tqdm's when tqdm is installed, else a line every few seconds; it shows the
loss and tokens per second. `log.jsonl` gets one JSON object per evaluation. `loss.png` plots the
per-step training loss and the evaluated train/validation losses against tokens seen; it needs
matplotlib (an optional dependency) and is skipped without it. numpy_ref/train_log.py is the
same file for the NumPy tree (the trees share no code).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


class Progress:
    """A bar over optimiser steps, `update(step, loss, tokens_per_s)`; `write(text)` above it."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train") -> None:
        self.enabled = enabled
        self._bar = None
        self._last_print = 0.0
        self.total = total
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self._bar.update(step - self._bar.n)
            return
        now = time.monotonic()
        if now - self._last_print > 5.0 or step == self.total:
            self._last_print = now
            print(f"step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s", file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def append_log(path: Path, record: dict) -> None:
    """One JSON object per line; the file only ever grows."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_loss_plot(path: Path, history: dict) -> bool:
    """Plot history["steps"] ([step, tokens, loss]) and history["evals"] ([step, tokens, train,
    val]) to a PNG (written to a temporary name, then renamed); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    if history.get("steps"):
        tokens = [row[1] for row in history["steps"]]
        ax.plot(tokens, [row[2] for row in history["steps"]], color="0.75", lw=0.8, label="training loss (step)")
    if history.get("evals"):
        tokens = [row[1] for row in history["evals"]]
        ax.plot(tokens, [row[2] for row in history["evals"]], "o-", label="training loss (eval)")
        ax.plot(tokens, [row[3] for row in history["evals"]], "s--", label="validation loss (eval)")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return True
