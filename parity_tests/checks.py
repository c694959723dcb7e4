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

from parity_tests.compare import Comparison, compare, format_rel, to_numpy
from parity_tests.layer_specs import SPECS, Sizes
from parity_tests.tolerances import (NormTol, Tol, forward_tol, gradient_norm_tol, gradient_tol, layer_forward_tol,
                                     layer_gradient_tol, own_logits_loss_tol)

# The embedded defaults: random weights, nothing downloaded. `tiny` is the preset; `small` is a
# few layers wider, with a tied head and no qkv bias, so both head and bias variants are swept,
# and a vocabulary past torch_impl's head slice (HEAD_CHUNK = 512 rows), so that its CPU paths
# (the sliced head and loss, with a partial last slice, and the tied head's gradient) are checked
# too: at 512 they never ran, and a sliced head dropping its last slice passed `check`. Its
# layer-norm eps is not GPT-2's 1e-5, so that a path (a loader, a layer) that drops the setting
# for the default fails.
DEFAULT_CONFIGS = {
    "tiny": dict(vocab_size=101, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                 qkv_bias=True, tie_embeddings=False, ln_eps=1e-5),
    "small": dict(vocab_size=600, context_length=64, emb_dim=96, n_heads=6, n_layers=3, drop_rate=0.0,
                  qkv_bias=False, tie_embeddings=True, ln_eps=1e-3),
}
DEFAULT_DTYPES = ("float64", "float32", "bfloat16")


@dataclass
class Row:
    component: str
    dtype: str
    max_abs: float
    max_rel: float | None  # None: no oracle entry above atol in any comparison, printed "n/a"
    tolerance: str
    verdict: str  # "ok", "MISMATCH" or "ERROR"
    detail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    def to_dict(self) -> dict:
        return asdict(self)


def _tol_text(tol: Tol | NormTol | None) -> str:
    if isinstance(tol, NormTol):
        return f"|err| <= {tol.rel:.3g} s"  # s: per-position gradient scale (compare_grad_norms)
    if tol is None:
        return "exact"
    floor = f" (or {tol.floor:.0e} of the tensor max)" if tol.floor else ""
    return f"atol {tol.atol:.0e}{floor} rtol {tol.rtol:.0e}{' of the tensor max' if tol.per_tensor else ''}"


def row_from(component: str, dtype: str, comparisons: list[Comparison] | list[NormComparison], tol: Tol | NormTol,
             seconds: float = 0.0) -> Row:
    """Fold comparisons into one row: the worst errors, and what the first failure found (the
    row's verdict says it failed; the detail says where and by how much)."""
    bad = [c for c in comparisons if not c.ok]
    rels = [c.max_rel for c in comparisons if c.max_rel is not None]
    return Row(
        component=component,
        dtype=dtype,
        max_abs=max((c.max_abs for c in comparisons), default=0.0),
        max_rel=max(rels) if rels else (None if comparisons else 0.0),
        tolerance=_tol_text(tol),
        verdict="MISMATCH" if bad else "ok",
        detail=bad[0].describe() if bad else "",
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


# ---- whole-tensor gradient comparison (bf16 autocast; tolerances.GRADIENT_NORM) --------------


@dataclass
class NormComparison:
    """One gradient tensor judged as a whole: ||actual - expected|| <= tol.rel * scale.

    `max_rel` is the ratio ||actual - expected|| / scale (what the bound limits); `max_abs` and
    the worst element are reported too, to say where the tensor differs most.
    """

    name: str
    shape: tuple
    dtype: str
    err_norm: float
    scale: float
    ref_norm: float
    max_abs: float
    worst_index: tuple
    actual_at_worst: float
    expected_at_worst: float
    tol: NormTol
    ok: bool

    @property
    def max_rel(self) -> float:
        if self.scale > 0:
            return self.err_norm / self.scale
        return 0.0 if self.err_norm == 0 else float("inf")

    def message(self) -> str:
        return f"{'ok' if self.ok else 'MISMATCH'}: {self.describe()}"

    def describe(self) -> str:
        """What was compared and how far apart it is, without the verdict."""
        return (f"{self.name} shape={self.shape} dtype={self.dtype} "
                f"||actual - expected||={self.err_norm:.3e} = {self.max_rel:.3e} s, bound {self.tol.rel:.3e} s "
                f"with s={self.scale:.3e} (||expected||={self.ref_norm:.3e}; {self.tol.why}); "
                f"max_abs={self.max_abs:.3e} worst at index {self.worst_index}: "
                f"actual={self.actual_at_worst!r} expected={self.expected_at_worst!r}")


def position_grad_scales(np_model, ids: np.ndarray, targets: np.ndarray, ignore_index: int | None = None,
                         dropout_masks: dict | None = None) -> dict[str, float]:
    """Per parameter, s = sqrt(sum_n ||g_n||^2) / N: the size of the N per-position gradients
    g_n (the gradient of the loss at position n alone) whose mean is the gradient of the mean
    loss, over the N positions the loss counts (those whose target is not `ignore_index`).
    tolerances.GRADIENT_NORM says why low-precision gradient errors scale with s.
    N oracle forward-backward passes, each counting one position (the others ignored)."""
    ignored = -1  # not a class: marks the positions whose loss is left out of a pass
    squares: dict[str, float] = {}
    counted = [n for n in range(targets.size) if ignore_index is None or targets.flat[n] != ignore_index]
    for n in counted:
        one = np.full_like(targets, ignored)
        one.flat[n] = targets.flat[n]
        _, _, cache = np_model.forward(ids, one, ignore_index=ignored, dropout_masks=dropout_masks)
        for k, g in np_model.backward(cache).items():
            squares[k] = squares.get(k, 0.0) + float(np.sum(np.square(g)))
    return {k: float(np.sqrt(v)) / len(counted) for k, v in squares.items()}


def compare_grad_norm(name: str, actual, expected, scale: float, tol: NormTol) -> NormComparison:
    """One gradient tensor against the oracle's as a whole: ||actual - expected|| <= tol.rel * scale."""
    a_raw, e = to_numpy(actual), to_numpy(expected).astype(np.float64)
    if a_raw.shape != e.shape:
        raise AssertionError(f"{name}: shape {a_raw.shape} differs from the oracle's {e.shape}")
    diff = np.abs(a_raw.astype(np.float64) - e)
    err = float(np.sqrt(np.sum(np.square(diff)))) if np.all(np.isfinite(diff)) else float("inf")
    worst_flat = int(np.argmax(np.nan_to_num(diff, nan=np.inf))) if diff.size else 0
    worst = tuple(int(i) for i in np.unravel_index(worst_flat, diff.shape)) if diff.size else ()
    return NormComparison(
        name=name, shape=tuple(e.shape), dtype=str(getattr(actual, "dtype", a_raw.dtype)).replace("torch.", ""),
        err_norm=err, scale=scale, ref_norm=float(np.linalg.norm(e)),
        max_abs=float(diff.max()) if diff.size else 0.0, worst_index=worst,
        actual_at_worst=float(a_raw.flat[worst_flat]) if diff.size else 0.0,
        expected_at_worst=float(e.flat[worst_flat]) if diff.size else 0.0,
        tol=tol, ok=err <= tol.rel * scale)


def compare_grad_norms(prefix: str, actual: dict, expected: dict, scales: dict[str, float], tol: NormTol,
                       order: Iterable[str]) -> list[NormComparison]:
    """Each gradient tensor in `order` against the oracle's, under `tol` scaled by `scales`."""
    missing = sorted(set(expected) - set(actual))
    if missing:
        raise AssertionError(f"{prefix}: no gradient for {missing}")
    return [compare_grad_norm(f"{prefix}[{k}]", actual[k], expected[k], scales[k], tol) for k in order]


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
                inputs = spec.make_inputs(np.random.default_rng(seed), s, dtype)
                comparisons += compare_torch_layer(spec, fn, inputs, dtype=dtype, device=device, upstream_seed=seed)
            fwd = [c for c in comparisons if c.name.endswith(" out")]
            grd = [c for c in comparisons if not c.name.endswith(" out")]
            return [row_from(f"layer:{spec.name} forward", dtype, fwd, layer_forward_tol(dtype, spec.elementwise)),
                    row_from(f"layer:{spec.name} backward", dtype, grd, layer_gradient_tol(dtype, spec.elementwise))]
        rows += guarded(f"layer:{name}", dtype, one)
    return rows


# ---- model level ----------------------------------------------------------------------------


# The ignore_index of the ignored-targets rows: not -100, F.cross_entropy's default, so that a
# path dropping the argument (or writing -100 for it) fails.
IGNORED = -7
MODEL_VARIANTS = ("plain", "ignored targets", "dropout masks")
DROP_RATE = 0.25  # the rate of the explicit dropout masks in the "dropout masks" rows


def with_ignored_targets(targets: np.ndarray, seed: int) -> np.ndarray:
    """`targets` with about a third of the positions set to IGNORED: the last never, the first
    always unless it is the last (one position: nothing ignored), so a loss of more than one
    position counts some rows and leaves some out."""
    drop = np.random.default_rng(seed + 7).random(targets.shape) < 1 / 3
    drop.flat[0], drop.flat[-1] = True, False
    return np.where(drop, IGNORED, targets)


def oracle_dropout_masks(config_d: dict, B: int, T: int, seed: int) -> dict[str, np.ndarray]:
    """A full set of float64 training masks at DROP_RATE: each entry 0 or 1/(1-p), at every site
    both trees name (docs/design.md "Dropout masks"): embedding (B, T, C), and per block
    h.i.attn.weights (B, nh, T, T), h.i.attn.out and h.i.mlp.out (B, T, C)."""
    rng = np.random.default_rng(seed + 11)
    C, nh, p = config_d["emb_dim"], config_d["n_heads"], DROP_RATE

    def draw(*shape: int) -> np.ndarray:
        return (rng.random(shape) >= p) / (1.0 - p)

    masks = {"embedding": draw(B, T, C)}
    for i in range(config_d["n_layers"]):
        masks |= {f"h.{i}.attn.weights": draw(B, nh, T, T), f"h.{i}.attn.out": draw(B, T, C),
                  f"h.{i}.mlp.out": draw(B, T, C)}
    return masks


def model_rows(config_name: str, config_d: dict, dtype: str, device: str = "cpu", B: int = 2, T: int | None = None,
               seed: int = 0, params: dict | None = None, variant: str = "plain") -> list[Row]:
    """The whole model in `dtype` against the float64 oracle: logits, loss, every gradient, and
    the loss against the cross-entropy of the logits the same call returned. `variant`:
    - "plain": no dropout, every target counted;
    - "ignored targets": about a third of the targets are IGNORED, passed as ignore_index (the
      logits must be the plain ones: the fused CPU head and loss take another path with them);
    - "dropout masks": explicit masks at DROP_RATE at every site (models in training)."""
    from numpy_ref.cross_entropy import cross_entropy_forward
    from parity_tests import models

    if variant not in MODEL_VARIANTS:
        raise ValueError(f"unknown model check variant {variant!r}; expected one of {MODEL_VARIANTS}")

    def run() -> list[Row]:
        T_ = T or min(config_d["context_length"], 12)
        np_model = models.build_numpy_model(config_d, seed=seed)
        p = params if params is not None else models.scale_params(np_model.params, seed + 1)
        np_model = models.build_numpy_model(config_d, seed=seed, params=p)
        ids, targets = models.random_batch(config_d, B, T_, seed)
        extra: dict = {}
        if variant == "ignored targets":
            targets = with_ignored_targets(targets, seed)
            extra["ignore_index"] = IGNORED
        elif variant == "dropout masks":
            extra["dropout_masks"] = oracle_dropout_masks(config_d, B, T_, seed)
        ref = models.run_numpy(np_model, ids, targets, **extra)
        t_model = models.build_torch_model(config_d, np_model.params, dtype=dtype, device=device)
        got = models.run_torch(t_model, ids, targets, dtype=dtype, device=device, **extra)
        tf, tg, ts = forward_tol(dtype), gradient_tol(dtype), own_logits_loss_tol(dtype)
        label = f"model[{config_name}]" + ("" if variant == "plain" else f" {variant}")
        rows = [row_from(f"{label} logits", dtype, [compare(f"{label} logits", got.logits, ref.logits, tf)], tf)]
        # The oracle's cross-entropy of the logits torch_impl returned (float64 values of them).
        own = float(cross_entropy_forward(got.logits, targets, extra.get("ignore_index"))[0])
        rows += [
            row_from(f"{label} loss", dtype, [compare(f"{label} loss", np.array(got.loss), np.array(ref.loss), tf)], tf),
            row_from(f"{label} loss vs its own logits", dtype,
                     [compare(f"{label} loss vs the float64 cross-entropy of the returned logits", np.array(got.loss),
                              np.array(own), ts)], ts),
        ]
        order = list(np_model.params)
        norm_tol = gradient_norm_tol(dtype)
        if norm_tol is None:
            grad_cmp = [compare(f"{label} d{k}", got.grads[k], ref.grads[k], tg) for k in order]
            rows.append(row_from(f"{label} grads ({len(order)} tensors)", dtype, grad_cmp, tg))
        else:  # autocast: each tensor as a whole, against the size of its per-position terms
            scales = position_grad_scales(np_model, ids, targets, **extra)
            grad_cmp = compare_grad_norms(f"{label} grads", got.grads, ref.grads, scales, norm_tol, order)
            rows.append(row_from(f"{label} grads ({len(order)} tensors, |err|/s)", dtype, grad_cmp, norm_tol))
        return rows

    return guarded(f"model[{config_name}]" + ("" if variant == "plain" else f" {variant}"), dtype, run)


def perturbed_numpy_model(config_d: dict, seed: int):
    """The oracle model with every bias and layer-norm parameter moved off GPT-2's 0 / 1
    initialisation (models.scale_params), as model_rows uses: on the plain initialisation a
    path that drops biases or swaps a layer norm's weight and bias computes the same numbers."""
    from parity_tests import models

    np_model = models.build_numpy_model(config_d, seed=seed)
    return models.build_numpy_model(config_d, seed=seed, params=models.scale_params(np_model.params, seed + 1))


# Strings where a wrong BPE differs from tiktoken while ordinary prose agrees: runs of one
# repeated symbol, where the same pair has the same rank at overlapping places and the leftmost
# merge must win ("aaaaaaa" is "aaaa" + "aaa", not "aaa" + "aaaa"); repeated pairs; whitespace
# runs (the `\s+(?!\S)` rule) and CRLF; contractions in both cases; digit runs; bytes of
# multi-byte characters merged across a character's boundary (emoji, joiners, CJK); and the
# special token's text, allowed as a special token.
TOKENIZER_EDGE_STRINGS = (
    "a" * 7, "a" * 12, "!" * 9, "-" * 17, "=" * 10, "." * 11, "0" * 12, "1234567890" * 3, "ab" * 9, "abc" * 7,
    " " * 9 + "x", "\n" * 7 + "x", "\t \t  \r\n\r\n  x", "a\r\n\r\n", "I'M HERE'LL WE'VE'S 'D don't",
    "'" * 5 + "s", "🙂" * 4, "👨\u200d👩\u200d👧 👍🏽 🇫🇷", "e\u0301 Ωμέγα русский 中文 한국어 العربية",
    "\u3000\u3000a", "<|endoftext|>" * 2 + " after",
    "\ua7ce'd \U000323b0'll",  # letters Unicode 17.0 added, which tiktoken 0.14 (16.0) reads as neither
)


def tokenizer_rows() -> list[Row]:
    """The from-scratch BPE against tiktoken: every id equal on the embedded corpus, and on
    TOKENIZER_EDGE_STRINGS (encoded with special tokens allowed), each of which also decodes back
    to itself in both; and the decoded text of their ids cut short (prefix_decode_row)."""

    def run() -> list[Row]:
        from numpy_ref.data import load_verdict
        from numpy_ref.tokenizer import get_encoding as np_get
        from torch_impl.tokenizer import get_encoding as t_get

        ours, theirs = np_get("gpt2"), t_get("gpt2")
        text = load_verdict()
        a = ours.encode(text)
        b = theirs.encode(text)
        n = max(len(a), len(b))
        mismatches = sum(1 for x, y in zip(a, b) if x != y) + abs(len(a) - len(b))
        detail = "" if mismatches == 0 else f"{mismatches} of {n} ids differ"
        rows = [Row("tokenizer: BPE vs tiktoken (the-verdict)", "int", float(mismatches), float(mismatches) / max(n, 1),
                    "exact", "ok" if mismatches == 0 else "MISMATCH", detail)]
        wrong = []
        for edge in TOKENIZER_EDGE_STRINGS:
            a, b = ours.encode(edge, allowed_special="all"), theirs.encode(edge, allowed_special="all")
            if a != b:
                wrong.append(f"{edge!r}: numpy {a} vs tiktoken {b}")
            elif ours.decode(a) != edge or theirs.decode(b) != edge:
                wrong.append(f"{edge!r} decodes to {ours.decode(a)!r} (numpy), {theirs.decode(b)!r} (tiktoken)")
        k = len(TOKENIZER_EDGE_STRINGS)
        rows.append(Row(f"tokenizer: BPE vs tiktoken ({k} edge strings)", "int", float(len(wrong)), len(wrong) / k,
                        "exact", "MISMATCH" if wrong else "ok",
                        f"{len(wrong)} of {k} strings differ; first {wrong[0]}" if wrong else ""))
        rows.append(prefix_decode_row(ours, theirs))
        return rows

    return guarded("tokenizer", "int", run)


def cut_prefixes() -> list[list[int]]:
    """Every proper prefix of the ids of each non-ASCII edge string (tiktoken's ids): most end
    inside a character's UTF-8 bytes (a token can hold part of one), where decode must replace
    what is cut off as tiktoken does (U+FFFD, errors="replace")."""
    from torch_impl.tokenizer import get_encoding

    enc = get_encoding("gpt2")
    out = []
    for edge in TOKENIZER_EDGE_STRINGS:
        if not edge.isascii():
            ids = enc.encode(edge, allowed_special="all")
            out += [ids[:k] for k in range(1, len(ids))]
    return out


def prefix_decode_row(ours, theirs) -> Row:
    """decode and decode_bytes of cut_prefixes(), numpy_ref's tokenizer against tiktoken's."""
    prefixes = cut_prefixes()
    cut = sum(1 for ids in prefixes if not _is_utf8(theirs.decode_bytes(ids)))
    wrong = [f"{ids}: numpy {ours.decode(ids)!r} vs tiktoken {theirs.decode(ids)!r}" for ids in prefixes
             if ours.decode(ids) != theirs.decode(ids) or ours.decode_bytes(ids) != theirs.decode_bytes(ids)]
    n = len(prefixes)
    return Row(f"tokenizer: decode of {n} id prefixes ({cut} cut mid-character) vs tiktoken", "int", float(len(wrong)),
               len(wrong) / max(n, 1), "exact", "MISMATCH" if wrong else "ok",
               f"{len(wrong)} of {n} prefixes differ; first {wrong[0]}" if wrong else "")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


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
            for variant in MODEL_VARIANTS:
                rows += model_rows(name, cfg, dtype, device, variant=variant)
    # Each configuration: the KV cache, sampling and checkpoints have per-configuration paths (a
    # tied head, no qkv bias: a checkpoint writer that filled the missing bias wrongly passed
    # when only the first configuration ran).
    for name, cfg in configs.items():
        say(f"oracle derivations, kv cache, generation and checkpoints {name}")
        rows += derivation_rows(name, cfg)
        rows += kv_cache_rows(name, cfg, device)
        rows += generation_rows(name, cfg, device=device)
        rows += checkpoint_rows(name, cfg, device=device)
    # The trainers' bookkeeping (accumulation, clipping, schedule, evaluation) does not depend on
    # the model's size, and six float64 NumPy steps of GPT-2 small take minutes: always on `tiny`.
    say("training")
    rows += training_rows("tiny", DEFAULT_CONFIGS["tiny"], device=device)
    say("tokenizer")
    rows += tokenizer_rows()
    if checkpoint:
        say(f"checkpoint {checkpoint}")
        rows += pretrained_rows(checkpoint, dtypes, device)
    return rows


def pretrained_rows(directory: str, dtypes: Iterable[str], device: str = "cpu") -> list[Row]:
    """Real weights: each tree's loader reads the same configuration and the same values; then the
    oracle's are run in both trees and logits, loss and grads compared."""
    from numpy_ref.checkpoint import load_checkpoint

    def loaders() -> list[Row]:
        import torch

        from torch_impl.checkpoint import load_checkpoint as t_load

        label = f"checkpoint {directory}: torch_impl's loader vs numpy_ref's"
        config, params = load_checkpoint(directory, dtype=np.float64)
        t_config, state = t_load(directory, dtype=torch.float64)
        if t_config.to_dict() != config.to_dict():
            raise AssertionError(f"{label}: configurations differ: torch_impl {t_config.to_dict()}, "
                                 f"numpy_ref {config.to_dict()}")
        if set(state) != set(params):
            raise AssertionError(f"{label}: torch_impl reads {sorted(set(state) - set(params))} that numpy_ref "
                                 f"does not, and misses {sorted(set(params) - set(state))}")
        exact = Tol(0.0, 0.0, "the same float32 values from the same file")
        return [row_from(label, "float64", [compare(f"{label} {k}", state.get(k), v, exact) for k, v in params.items()],
                         exact)]

    rows = guarded(f"checkpoint {directory} loaders", "float64", loaders)
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
    body = [[r.component, r.dtype, f"{r.max_abs:.2e}", format_rel(r.max_rel, spec=".2e"), r.tolerance, r.verdict]
            for r in rows]
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


# The rows kept in their own modules, named here too (`checks.kv_cache_rows`, ...). Those modules
# import this one inside their functions, so either can be imported first.
from parity_tests.checkpoint_checks import HUB_GPT2_KEYS, checkpoint_rows  # noqa: E402, F401
from parity_tests.decode_checks import PAST_CONTEXT_MAX, generation_rows, kv_cache_rows  # noqa: E402, F401
from parity_tests.derivation_checks import derivation_rows  # noqa: E402, F401
from parity_tests.training_checks import (TRAINING_COMMON, TRAINING_RUNS, TRAINING_STEPS,  # noqa: E402, F401
                                          training_rows)
