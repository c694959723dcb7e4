"""PNG plots of a run (matplotlib, Agg backend, small files).

- throughput.png: training-step tokens/s per backend and config (log scale);
- sweep.png: forward and train-step time against T (log-log), with the FLOP formula's shape;
- error_vs_speed.png: each setting's max gradient deviation from the oracle beside its speed;
- layers.png: per-layer forward and backward time for the largest config.
"""

from __future__ import annotations

import os

from benchmarks.record import Result
from benchmarks.report import write_file_atomic


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput(results: list[Result], path: str) -> bool:
    rows = [r for r in results if r.section == "train_step" and r.status == "ok" and r.tokens_per_s]
    if not rows:
        return False
    plt = _plt()
    configs = list(dict.fromkeys(r.config for r in rows))
    backends = list(dict.fromkeys(r.backend for r in rows))
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=80)
    width = 0.8 / len(backends)
    for j, b in enumerate(backends):
        xs, ys = [], []
        for i, c in enumerate(configs):
            r = next((r for r in rows if r.config == c and r.backend == b), None)
            if r:
                xs.append(i + j * width)
                ys.append(r.tokens_per_s)
        ax.bar(xs, ys, width, label=b)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))], configs)
    ax.set_yscale("log")
    ax.set_ylabel("training tokens/s")
    ax.set_title("Training step (forward + backward + AdamW)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def sweep(results: list[Result], path: str) -> bool:
    rows = [r for r in results if r.section == "sweep" and r.status == "ok" and r.timing]
    if not rows:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), dpi=80)
    for ax, op in zip(axes, ("forward", "train step")):
        for b in dict.fromkeys(r.backend for r in rows):
            pts = sorted((r.T, r.seconds, r.flop_per_s) for r in rows if r.backend == b and r.what == op)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=b)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (B=1)")
        ax.set_ylabel("ms")
        ax.set_title(f"{op} vs sequence length ({rows[0].config})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def error_vs_speed(results: list[Result], accuracy: list[dict], path: str) -> bool:
    setting_to_backend = {"numpy float32 (fused)": "numpy-float32", "torch fp32 (SDPA default kernel)": "torch-fp32",
                          "torch bf16 autocast": "torch-bf16", "torch.compile fp32": "torch-compile"}
    pts = []
    for a in accuracy:
        backend = setting_to_backend.get(a.get("setting"))
        if not backend or a.get("grads") is None:
            continue
        r = next((r for r in results if r.section == "train_step" and r.backend == backend and r.config == a["config"]
                  and r.status == "ok"), None)
        if r and r.tokens_per_s:
            pts.append((r.tokens_per_s, a["grads"], f"{backend} ({a['config']})"))
    if not pts:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=80)
    for x, y, label in pts:
        ax.scatter([x], [max(y, 1e-18)], label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens/s")
    ax.set_ylabel("max |grad - float64 oracle|")
    ax.set_title("Error budget beside speed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def layers(results: list[Result], path: str) -> bool:
    rows = [r for r in results if r.section == "layer" and r.status == "ok" and r.timing]
    if not rows:
        return False
    config = rows[-1].config
    rows = [r for r in rows if r.config == config]
    plt = _plt()
    names = list(dict.fromkeys(r.what for r in rows))
    backends = list(dict.fromkeys(r.backend for r in rows))
    fig, ax = plt.subplots(figsize=(8, 3.8), dpi=80)
    height = 0.8 / len(backends)
    for j, b in enumerate(backends):
        ys, xs = [], []
        for i, n in enumerate(names):
            r = next((r for r in rows if r.what == n and r.backend == b), None)
            if r:
                ys.append(i + j * height)
                xs.append(r.seconds * 1e3)
        ax.barh(ys, xs, height, label=b)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(names))], names, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("ms (median)")
    ax.set_title(f"Layers at {config} sizes (B={rows[0].B}, T={rows[0].T})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_all(results: list[Result], accuracy: list[dict], out_dir: str, errors: list[str] | None = None) -> list[str]:
    """Write every plot that has data, each through a temporary file as the other outputs (an
    interrupted run leaves the previous PNG whole); returns the file names written. A plot that
    fails is printed and, given `errors`, appended there (results.json records it)."""
    written = []
    for name, fn in (("throughput.png", lambda p: throughput(results, p)), ("sweep.png", lambda p: sweep(results, p)),
                     ("error_vs_speed.png", lambda p: error_vs_speed(results, accuracy, p)),
                     ("layers.png", lambda p: layers(results, p))):
        try:
            if write_file_atomic(os.path.join(out_dir, name), fn):
                written.append(name)
        except Exception as exc:  # noqa: BLE001 - a plot failing must not lose the numbers
            message = f"plot {name} failed: {type(exc).__name__}: {exc}"
            print(message)
            if errors is not None:
                errors.append(message)
    return written
