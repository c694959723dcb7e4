"""The parity sweep behind `gpt-oracle check`.

Each check returns `Row`s: component, dtype, max abs error, max rel error, tolerance, verdict.
A check that cannot run (a module missing, an exception) is a row with verdict `ERROR`, never a
silent skip: the command exits non-zero on anything but `ok`.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import numpy as np

from parity_tests.compare import Comparison, compare
from parity_tests.layer_specs import SPECS, Sizes
from parity_tests.tolerances import Tol, forward_tol, gradient_tol

# The embedded defaults: random weights, nothing downloaded. `tiny` is the preset; `small` is a
# few layers wider, with a tied head and no qkv bias, so both head and bias variants are swept.
DEFAULT_CONFIGS = {
    "tiny": dict(vocab_size=101, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                 qkv_bias=True, tie_embeddings=False, ln_eps=1e-5),
    "small": dict(vocab_size=512, context_length=64, emb_dim=96, n_heads=6, n_layers=3, drop_rate=0.0,
                  qkv_bias=False, tie_embeddings=True, ln_eps=1e-5),
}
DEFAULT_DTYPES = ("float64", "float32", "bfloat16")


@dataclass
class Row:
    component: str
    dtype: str
    max_abs: float
    max_rel: float
    tolerance: str
    verdict: str  # "ok", "MISMATCH" or "ERROR"
    detail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    def to_dict(self) -> dict:
        return asdict(self)


def _tol_text(tol: Tol | None) -> str:
    return "exact" if tol is None else f"atol {tol.atol:.0e} rtol {tol.rtol:.0e}"


def row_from(component: str, dtype: str, comparisons: list[Comparison], tol: Tol, seconds: float = 0.0) -> Row:
    """Fold comparisons into one row: the worst errors, and the first failure's message."""
    bad = [c for c in comparisons if not c.ok]
    return Row(
        component=component,
        dtype=dtype,
        max_abs=max((c.max_abs for c in comparisons), default=0.0),
        max_rel=max((c.max_rel for c in comparisons), default=0.0),
        tolerance=_tol_text(tol),
        verdict="MISMATCH" if bad else "ok",
        detail=bad[0].message() if bad else "",
        seconds=seconds,
    )


def guarded(component: str, dtype: str, fn: Callable[[], list[Row]]) -> list[Row]:
    """Run one check; turn any exception into an ERROR row naming it."""
    start = time.perf_counter()
    try:
        rows = fn()
    except Exception as exc:  # noqa: BLE001 - reported, never swallowed
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        return [Row(component, dtype, float("nan"), float("nan"), "-", "ERROR",
                    f"{type(exc).__name__}: {exc} (at {tb.filename}:{tb.lineno})", time.perf_counter() - start)]
    for r in rows:
        r.seconds = r.seconds or (time.perf_counter() - start) / max(len(rows), 1)
    return rows


# ---- op level (the autograd engine against torch) -------------------------------------------


def op_rows(dtype: str) -> list[Row]:
    from parity_tests.op_checks import run_op_checks

    comparisons = run_op_checks(dtype=dtype)
    by_op: dict[str, list[Comparison]] = {}
    for c in comparisons:
        op, kind = c.name.split(" ")[:2]  # "op:matmul forward (2,3)@(3,4)" / "op:matmul grad[0] ..."
        by_op.setdefault(f"{op} {'forward' if kind == 'forward' else 'backward'}", []).append(c)
    return [row_from(key, dtype, cs, cs[0].tol) for key, cs in by_op.items()]


# ---- layer level ----------------------------------------------------------------------------


def layer_rows(dtype: str, device: str = "cpu", seeds: Iterable[int] = (0, 1, 2)) -> list[Row]:
    from parity_tests.oracle import compare_torch_layer

    rows = []
    sizes = [Sizes(B=1, T=1, nh=1, hs=3, V=5, Tc=4), Sizes(B=2, T=7, nh=3, hs=4, V=13, Tc=9), Sizes(B=3, T=16, nh=4, hs=8, V=50, Tc=16)]
    for name, spec in SPECS.items():
        def one(spec=spec) -> list[Row]:
            fn = spec.torch_forward()
            comparisons = []
            for seed, s in zip(seeds, sizes):
                inputs = spec.make_inputs(np.random.default_rng(seed), s)
                comparisons += compare_torch_layer(spec, fn, inputs, dtype=dtype, device=device, upstream_seed=seed)
            fwd = [c for c in comparisons if c.name.endswith(" out")]
            grd = [c for c in comparisons if not c.name.endswith(" out")]
            return [row_from(f"layer:{spec.name} forward", dtype, fwd, forward_tol(dtype)),
                    row_from(f"layer:{spec.name} backward", dtype, grd, gradient_tol(dtype))]
        rows += guarded(f"layer:{name}", dtype, one)
    return rows


# ---- model level ----------------------------------------------------------------------------


def model_rows(config_name: str, config_d: dict, dtype: str, device: str = "cpu", B: int = 2, T: int | None = None,
               seed: int = 0, params: dict | None = None) -> list[Row]:
    from parity_tests import models

    def run() -> list[Row]:
        T_ = T or min(config_d["context_length"], 12)
        np_model = models.build_numpy_model(config_d, seed=seed)
        p = params if params is not None else models.scale_params(np_model.params, seed + 1)
        np_model = models.build_numpy_model(config_d, seed=seed, params=p)
        ids, targets = models.random_batch(config_d, B, T_, seed)
        ref = models.run_numpy(np_model, ids, targets)
        t_model = models.build_torch_model(config_d, np_model.params, dtype=dtype, device=device)
        got = models.run_torch(t_model, ids, targets, dtype=dtype, device=device)
        tf, tg = forward_tol(dtype), gradient_tol(dtype)
        label = f"model[{config_name}]"
        rows = [
            row_from(f"{label} logits", dtype, [compare(f"{label} logits", got.logits, ref.logits, tf)], tf),
            row_from(f"{label} loss", dtype, [compare(f"{label} loss", np.array(got.loss), np.array(ref.loss), tf)], tf),
        ]
        order = list(np_model.params)
        grad_cmp = [compare(f"{label} d{k}", got.grads[k], ref.grads[k], tg) for k in order]
        rows.append(row_from(f"{label} grads ({len(order)} tensors)", dtype, grad_cmp, tg))
        return rows

    return guarded(f"model[{config_name}]", dtype, run)


def kv_cache_rows(config_name: str, config_d: dict, device: str = "cpu", seed: int = 0) -> list[Row]:
    """Decoding token by token through each tree's KV cache equals the oracle's full forward."""
    import torch

    from parity_tests import models

    def run() -> list[Row]:
        np_model = models.build_numpy_model(config_d, seed=seed)
        t_model = models.build_torch_model(config_d, np_model.params, dtype="float64", device=device)
        T = min(config_d["context_length"], 10)
        ids, _ = models.random_batch(config_d, 2, T, seed)
        full = np.asarray(np_model(ids))
        np_cache, t_cache = np_model.new_kv_cache(2), t_model.new_kv_cache(2)
        np_steps, t_steps = [], []
        with torch.no_grad():
            for t in range(T):
                np_steps.append(np.asarray(np_model(ids[:, t:t + 1], kv_cache=np_cache)))
                t_steps.append(models.to_numpy(t_model(torch.from_numpy(ids[:, t:t + 1]).to(device), kv_cache=t_cache)))
        tol = forward_tol("float64")
        label = f"kv-cache[{config_name}]"
        return [
            row_from(f"{label} numpy cached vs full", "float64",
                     [compare(f"{label} numpy", np.concatenate(np_steps, 1), full, tol)], tol),
            row_from(f"{label} torch cached vs oracle full", "float64",
                     [compare(f"{label} torch", np.concatenate(t_steps, 1), full, tol)], tol),
        ]

    return guarded(f"kv-cache[{config_name}]", "float64", run)


def generation_rows(config_name: str, config_d: dict, seed: int = 0) -> list[Row]:
    """Greedy and sampled tokens, given the same uniform draws, are identical in both trees."""
    import torch

    from numpy_ref.generate import generate as np_generate
    from parity_tests import models
    from torch_impl.generate import generate as t_generate

    def run() -> list[Row]:
        np_model = models.build_numpy_model(config_d, seed=seed)
        t_model = models.build_torch_model(config_d, np_model.params, dtype="float64")
        ids, _ = models.random_batch(config_d, 2, 3, seed)
        n = min(8, config_d["context_length"])
        coins = np.random.default_rng(seed).uniform(size=(n, 2))
        rows = []
        for label, kwargs in [("greedy", dict(temperature=0.0)),
                              ("temperature 0.8", dict(temperature=0.8)),
                              ("top-k 5", dict(temperature=1.0, top_k=5)),
                              ("top-p 0.9", dict(temperature=1.0, top_p=0.9))]:
            a = np.asarray(np_generate(np_model, ids, n, coins=coins, **kwargs))
            with torch.no_grad():
                b = models.to_numpy(t_generate(t_model, torch.from_numpy(ids), n, coins=coins, **kwargs))
            mismatches = int(np.sum(a != b)) if a.shape == b.shape else -1
            verdict = "ok" if mismatches == 0 else "MISMATCH"
            detail = "" if verdict == "ok" else f"numpy {a.tolist()} vs torch {b.tolist()}"
            rows.append(Row(f"generate[{config_name}] {label}", "float64", float(mismatches), float(mismatches),
                            "exact", verdict, detail))
        return rows

    return guarded(f"generate[{config_name}]", "float64", run)


def checkpoint_rows(config_name: str, config_d: dict, seed: int = 0) -> list[Row]:
    """Saved by numpy_ref, loaded by torch_impl (and back): the same logits."""
    import tempfile

    import torch

    from parity_tests import models

    def run() -> list[Row]:
        from numpy_ref.model import GPTModel as NpModel
        from torch_impl.model import GPTModel as TModel

        np_model = models.build_numpy_model(config_d, seed=seed)
        ids, _ = models.random_batch(config_d, 2, min(6, config_d["context_length"]), seed)
        with tempfile.TemporaryDirectory() as d:
            np_model.save_pretrained(d)
            t_model = TModel.from_pretrained(d).double().eval()
            with torch.no_grad():
                got = models.to_numpy(t_model(torch.from_numpy(ids)))
            back = NpModel.from_pretrained(d)
        # Checkpoints hold float32: compare against the oracle run on the float32-rounded weights.
        rounded = {k: v.astype(np.float32).astype(np.float64) for k, v in np_model.params.items()}
        ref = np.asarray(models.build_numpy_model(config_d, seed=seed, params=rounded)(ids))
        tol = forward_tol("float64")
        return [
            row_from(f"checkpoint[{config_name}] numpy->torch logits", "float64", [compare("numpy->torch", got, ref, tol)], tol),
            row_from(f"checkpoint[{config_name}] numpy->numpy logits", "float64", [compare("numpy->numpy", np.asarray(back(ids)), ref, tol)], tol),
        ]

    return guarded(f"checkpoint[{config_name}]", "float64", run)


def tokenizer_rows() -> list[Row]:
    """The from-scratch BPE against tiktoken on the embedded corpus: every id equal."""

    def run() -> list[Row]:
        from numpy_ref.data import load_verdict
        from numpy_ref.tokenizer import get_encoding as np_get
        from torch_impl.tokenizer import get_encoding as t_get

        text = load_verdict()
        a = np_get("gpt2").encode(text)
        b = t_get("gpt2").encode(text)
        n = max(len(a), len(b))
        mismatches = sum(1 for x, y in zip(a, b) if x != y) + abs(len(a) - len(b))
        detail = "" if mismatches == 0 else f"{mismatches} of {n} ids differ"
        return [Row("tokenizer: BPE vs tiktoken (the-verdict)", "int", float(mismatches), float(mismatches) / max(n, 1),
                    "exact", "ok" if mismatches == 0 else "MISMATCH", detail)]

    return guarded("tokenizer", "int", run)


def run_check(configs: dict[str, dict] | None = None, dtypes: Iterable[str] = DEFAULT_DTYPES, device: str = "cpu",
              checkpoint: str | None = None, progress: Callable[[str], None] | None = None) -> list[Row]:
    """The whole sweep. `progress` is called with the name of each step as it starts."""
    configs = configs or DEFAULT_CONFIGS
    say = progress or (lambda _msg: None)
    rows: list[Row] = []
    for dtype in dtypes:
        if dtype in ("float64", "float32"):
            say(f"ops {dtype}")
            rows += guarded("ops", dtype, lambda dtype=dtype: op_rows(dtype))
        say(f"layers {dtype}")
        rows += layer_rows(dtype, device)
        for name, cfg in configs.items():
            say(f"model {name} {dtype}")
            rows += model_rows(name, cfg, dtype, device)
    first_name, first_cfg = next(iter(configs.items()))
    say("kv cache")
    rows += kv_cache_rows(first_name, first_cfg, device)
    say("generation")
    rows += generation_rows(first_name, first_cfg)
    say("checkpoints")
    rows += checkpoint_rows(first_name, first_cfg)
    say("tokenizer")
    rows += tokenizer_rows()
    if checkpoint:
        say(f"checkpoint {checkpoint}")
        rows += pretrained_rows(checkpoint, dtypes, device)
    return rows


def pretrained_rows(directory: str, dtypes: Iterable[str], device: str = "cpu") -> list[Row]:
    """Real weights: load the checkpoint into both trees and compare logits, loss and grads."""
    from numpy_ref.checkpoint import load_checkpoint

    rows = []
    for dtype in dtypes:
        def run(dtype=dtype) -> list[Row]:
            config, params = load_checkpoint(directory, dtype=np.float64)
            cfg = dict(config.to_dict())
            return model_rows(f"checkpoint {directory}", cfg, dtype, device, B=1, T=min(cfg["context_length"], 32),
                              params=params)
        rows += guarded(f"checkpoint {directory}", dtype, run)
    return rows


def format_table(rows: list[Row]) -> str:
    headers = ["component", "dtype", "max abs err", "max rel err", "tolerance", "verdict"]
    body = [[r.component, r.dtype, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}", r.tolerance, r.verdict] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line(headers), line(["-" * w for w in widths])] + [line(b) for b in body]
    failures = [r for r in rows if not r.ok]
    if failures:
        out.append("")
        out.append(f"{len(failures)} of {len(rows)} checks failed:")
        out += [f"- {r.component} ({r.dtype}): {r.verdict}: {r.detail}" for r in failures]
    else:
        out.append("")
        out.append(f"all {len(rows)} checks passed")
    return "\n".join(out)
