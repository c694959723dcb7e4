"""torch_impl's own dropout, the training path (no explicit masks): at every site, the rate it
drops at and the 1/(1-p) scale of what it keeps, measured on the masks torch draws.

Method. A float64 model runs forward in training mode at drop rate p. Spies wrap the layer
functions that torch_impl/block.py and model.py call (`layernorm_forward`, `attention_forward`,
`mlp_forward`): each calls the real function and keeps its inputs and output. Layer norms read
the residual stream, so the stream is seen on both sides of every dropout, and each site's
mask is recovered exactly, with no assumption on how the dropout is drawn:

    embedding        x_in(0) / (wte[ids] + wpe[:T])       x_in(i): block i's ln_1 input
    attn.out         (x_mid(i) - x_in(i)) / a             a: attention_forward's output,
                                                          x_mid(i): block i's ln_2 input
    mlp.out          (x_out(i) - x_mid(i)) / m            m: mlp_forward's output, x_out(i) the
                                                          next layer norm's input
    attn.weights     drop(att) / att                      below

Attention weights are dropped inside the attention (torch_impl passes the rate to SDPA's
dropout_p), so they are recovered from attention_forward's inputs and output: undo the output
projection, y = (a - b_proj) @ w_proj^-1, then per head y_h = drop(att)_h @ v_h with v_h (T, hs)
of full row rank when T <= hs, so drop(att)_h = y_h @ pinv(v_h); att itself is the causal
softmax of q k^T / sqrt(hs), computed here from the same q, k. This sees the weights whatever
computes them (SDPA's dropout, an explicit mask), and an attention that drops nothing shows as
rate 0 there.

Every recovered entry must be 0 or 1/(1-p), to 1e-6 (float64 recovery is good to ~1e-12): that
checks the scale. The dropped fraction of n independent Bernoulli(p) draws has standard
deviation sqrt(p (1-p) / n); each site and layer is judged on at least 20,000 draws (20
forward passes), and must lie within z = 5 standard deviations of p: a correct dropout fails
one such comparison with probability 6e-7 (two-sided normal tail), the 14 made here together
about 1e-5. At p = 0.1 and n = 23,040 (attention weights, the fewest draws) 5 sd is 0.0099, so
a rate of p/2 or 0 is 25 or 50 sd away. torch's generator is seeded, so the run is also
reproducible.
"""

import inspect
import math

import numpy as np
import pytest
import torch

from parity_tests import models
from parity_tests.compare import to_numpy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# T <= hs, so each head's values v_h (T, hs) have full row rank and the weights can be recovered.
CFG = dict(vocab_size=50, context_length=8, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.1, qkv_bias=True,
           tie_embeddings=False, ln_eps=1e-5)
B, T, PASSES = 8, 8, 20
SEED = 1234  # torch's generator, for a reproducible run (the bound holds for any seed)
Z = 5.0  # standard deviations allowed between a measured drop rate and p (see the top)
SCALE_TOL = 1e-6  # how far a recovered mask entry may be from 0 or 1/(1-p)


class _Spy:
    """Wraps `fn`; every call is kept as (named arguments, output), in float64 numpy."""

    def __init__(self, fn, calls: list):
        self.fn, self.calls, self.signature = fn, calls, inspect.signature(fn)

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        named = {k: to_numpy(v) if isinstance(v, torch.Tensor) else v for k, v in bound.arguments.items()}
        self.calls.append((self.fn.__name__, named, to_numpy(out)))
        return out


def _model(p: float):
    """float64, drop rate p, biases non-zero (so no branch output is exactly 0 where the mask is 1)."""
    params = models.scale_params(models.build_numpy_model(CFG, seed=0).params, 1)
    return models.build_torch_model(dict(CFG, drop_rate=p), params, dtype="float64")


def _recorded_pass(monkeypatch, model, ids: np.ndarray, targets: np.ndarray, training: bool) -> list:
    """One forward pass with spies on the block's and the model's layer functions; their calls in order."""
    import torch_impl.block as block
    import torch_impl.model as model_module

    calls: list = []
    with monkeypatch.context() as m:
        for module, names in ((block, ("layernorm_forward", "attention_forward", "mlp_forward")),
                              (model_module, ("layernorm_forward",))):
            for name in names:
                m.setattr(module, name, _Spy(getattr(module, name), calls))
        model.train(training)
        with torch.no_grad():
            model(torch.from_numpy(ids), torch.from_numpy(targets))
    return calls


def _causal_softmax(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """softmax(q k^T / sqrt(hs)) with future keys masked, (B, nh, T, hs) -> (B, nh, T, T)."""
    scores = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
    future = np.triu(np.ones((q.shape[2], k.shape[2]), dtype=bool), k=1)
    scores = np.where(future, -np.inf, scores)
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _attention_mask(args: dict, a: np.ndarray) -> np.ndarray:
    """The dropout applied to the attention weights, recovered from attention_forward's inputs
    and output (see the top): drop(att) / att on the causal entries, flattened."""
    x, nh = args["x"], args["n_heads"]
    Bx, Tx, C = x.shape
    hs = C // nh
    assert Tx <= hs, f"recovery needs T <= hs, got T={Tx}, hs={hs}"
    qkv = x @ args["w_attn"] + (args["b_attn"] if args["b_attn"] is not None else 0.0)  # (B, T, 3C)
    q, k, v = qkv.reshape(Bx, Tx, 3, nh, hs).transpose(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
    y = np.linalg.solve(args["w_proj"].T, (a - args["b_proj"]).reshape(-1, C).T).T  # (B*T, C): undo c_proj
    y = y.reshape(Bx, Tx, nh, hs).transpose(0, 2, 1, 3)  # (B, T, C) -> (B, nh, T, hs)
    dropped = y @ np.linalg.pinv(v)  # (B, nh, T, hs) @ (B, nh, hs, T) -> (B, nh, T, T): drop(att)
    att = _causal_softmax(q, k)
    causal = np.tril(np.ones((Tx, Tx), dtype=bool))
    return (dropped / np.where(causal, att, 1.0))[..., causal].ravel()


def _site_masks(calls: list, model, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Every site's recovered mask values (flattened), keyed like DROPOUT_MASKS."""
    params = {k: to_numpy(v) for k, v in model.state_dict().items()}
    stream = [named["x"] for name, named, _ in calls if name == "layernorm_forward"]  # x_in, x_mid per block, final
    attention = [(named, out) for name, named, out in calls if name == "attention_forward"]
    mlp = [out for name, _, out in calls if name == "mlp_forward"]
    L = model.config.n_layers
    assert len(stream) == 2 * L + 1 and len(attention) == L and len(mlp) == L, (
        f"expected {2 * L + 1} layer norms, {L} attentions and {L} MLPs in one forward; saw {len(stream)}, "
        f"{len(attention)}, {len(mlp)}")
    embedded = params["wte.weight"][ids] + params["wpe.weight"][:ids.shape[1]]  # (B, T, C)
    masks = {"embedding": (stream[0] / embedded).ravel()}
    for i in range(L):
        x_in, x_mid, x_out = stream[2 * i], stream[2 * i + 1], stream[2 * i + 2]
        args, a = attention[i]
        masks[f"h.{i}.attn.weights"] = _attention_mask(args, a)
        masks[f"h.{i}.attn.out"] = ((x_mid - x_in) / a).ravel()
        masks[f"h.{i}.mlp.out"] = ((x_out - x_mid) / mlp[i]).ravel()
    return masks


def _masks_over_passes(monkeypatch, p: float, training: bool, passes: int) -> dict[str, np.ndarray]:
    model = _model(p)
    rng = np.random.default_rng(0)
    out: dict[str, list] = {}
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        for _ in range(passes):
            ids = rng.integers(0, CFG["vocab_size"], size=(B, T))
            targets = rng.integers(0, CFG["vocab_size"], size=(B, T))
            calls = _recorded_pass(monkeypatch, model, ids, targets, training)
            for site, values in _site_masks(calls, model, ids).items():
                out.setdefault(site, []).append(values)
    return {site: np.concatenate(v) for site, v in out.items()}


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_every_dropout_site_drops_at_rate_p_and_keeps_at_scale_1_over_1_minus_p(monkeypatch, p):
    masks = _masks_over_passes(monkeypatch, p, training=True, passes=PASSES)
    assert set(masks) == {"embedding"} | {f"h.{i}.{s}" for i in range(CFG["n_layers"])
                                          for s in ("attn.weights", "attn.out", "mlp.out")}
    keep = 1.0 / (1.0 - p)
    problems = []
    for site, m in masks.items():
        n = m.size
        dropped = np.abs(m) <= SCALE_TOL
        off_scale = np.abs(np.where(dropped, 0.0, m - keep))  # kept entries must be 1/(1-p)
        worst = int(np.argmax(off_scale))
        if off_scale[worst] > SCALE_TOL:
            problems.append(f"{site}: a kept value is scaled by {float(m[worst])!r}, not 1/(1-p) = {keep!r} "
                            f"(entry {worst} of {n}; {int(np.sum(off_scale > SCALE_TOL))} such entries)")
        rate, sd = float(dropped.mean()), math.sqrt(p * (1.0 - p) / n)
        if abs(rate - p) > Z * sd:
            problems.append(f"{site}: dropped {int(dropped.sum())} of {n} draws = rate {rate:.4f}, expected p = {p} "
                            f"+- {Z * sd:.4f} ({Z:g} sd; off by {abs(rate - p) / sd:.1f} sd)")
    assert not problems, f"torch's own dropout at p = {p} ({PASSES} passes of B={B}, T={T}):\n" + "\n".join(problems)


def test_evaluation_mode_drops_nothing(monkeypatch):
    masks = _masks_over_passes(monkeypatch, 0.5, training=False, passes=1)
    for site, m in masks.items():
        worst = int(np.argmax(np.abs(m - 1.0)))
        assert abs(m[worst] - 1.0) <= SCALE_TOL, (
            f"{site} in evaluation mode at drop_rate 0.5: recovered mask entry {worst} is {float(m[worst])!r}, "
            f"expected 1")
