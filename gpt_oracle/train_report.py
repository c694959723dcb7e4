"""The training front end's progress bar and loss plot (for `gpt-oracle train`).

Both trees' trainers take `progress_cls` and `plot` arguments and depend on neither tqdm nor
matplotlib themselves (numpy_ref imports only numpy and the standard library). This module
supplies the optional extras: `TqdmProgress`, a tqdm bar with the loss and tokens/s (a plain
line every few seconds when tqdm is missing), and `save_loss_plot`, the loss curve as a PNG
(skipped when matplotlib is missing).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


class TqdmProgress:
    """`update(step, loss, tokens_per_s)`, `write(text)`, `close()`; tqdm when installed."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train") -> None:
        self.total, self.enabled, self.desc = total, enabled, desc
        self._bar = None
        self._last_print = 0.0
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
            print(f"{self.desc}: step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s",
                  file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def save_loss_plot(path, history: dict) -> bool:
    """history["steps"] rows [step, tokens, loss] and history["evals"] rows [step, tokens,
    train loss, val loss] against tokens seen, to a PNG (a temporary name, then renamed).
    Returns False, writing nothing, without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    if history.get("steps"):
        ax.plot([r[1] for r in history["steps"]], [r[2] for r in history["steps"]], color="0.7", lw=0.8,
                label="training loss (each step)")
    if history.get("evals"):
        tokens = [r[1] for r in history["evals"]]
        ax.plot(tokens, [r[2] for r in history["evals"]], "o-", label="training loss (eval)")
        ax.plot(tokens, [r[3] for r in history["evals"]], "s--", label="validation loss (eval)")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return True
