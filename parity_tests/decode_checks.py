"""`gpt-oracle check`'s decoding rows (checks.py runs them for every configuration): KV-cache
decoding against the oracle's full forward, and generation from the same draws in both trees.
Rows, tolerances and the model builders are checks.py's."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import numpy as np

from parity_tests.compare import compare
from parity_tests.tolerances import forward_tol

if TYPE_CHECKING:
    from parity_tests.checks import Row


def kv_cache_rows(config_name: str, config_d: dict, device: str = "cpu", seed: int = 0) -> list[Row]:
    """Decoding through each tree's KV cache, token by token and in chunks of several tokens
    after a past, equals the oracle's full forward."""
    import torch

    from parity_tests import models
    from parity_tests.checks import guarded, perturbed_numpy_model, row_from

    def run() -> list[Row]:
        np_model = perturbed_numpy_model(config_d, seed)
        t_model = models.build_torch_model(config_d, np_model.params, dtype="float64", device=device)
        T = min(config_d["context_length"], 10)
        ids, _ = models.random_batch(config_d, 2, T, seed)
        full = np.asarray(np_model(ids))
        tol = forward_tol("float64")
        label = f"kv-cache[{config_name}]"
        rows = []
        # One token at a time (decoding), then a prompt of 3 (T > 1, no past), one token, and
        # the rest in one chunk (T > 1 after a past: the causal mask offset by the past); the
        # chunks only where the rest has 2 tokens or more (a context of 6 or more).
        # Token by token again with the products split as at GPT-2's sizes (models.split_products:
        # every weight here is under the 2 MB where the split starts, so decoding never took it).
        ways = [("token by token", list(range(T + 1)))] + ([("in chunks 3, 1, rest", [0, 3, 4, T])] if T >= 6 else [])
        from torch_impl.linear import SPLIT_K

        splits = device.split(":")[0] == "cpu" and config_d["emb_dim"] % SPLIT_K == 0  # a CPU path, parts of C_in
        ways += [("token by token, products split as at GPT-2 size", list(range(T + 1)))] if splits else []
        for how, cuts in ways:
            np_cache, t_cache = np_model.new_kv_cache(2), t_model.new_kv_cache(2)
            np_steps, t_steps = [], []
            split = models.split_products() if "split" in how else contextlib.nullcontext()
            with torch.no_grad(), split:
                for a, b in zip(cuts, cuts[1:]):
                    np_steps.append(np.asarray(np_model(ids[:, a:b], kv_cache=np_cache)))
                    t_steps.append(models.to_numpy(t_model(torch.from_numpy(ids[:, a:b]).to(device), kv_cache=t_cache)))
            if "split" not in how:  # numpy_ref has one product: its row would repeat the first
                rows.append(row_from(f"{label} numpy cached {how} vs full", "float64",
                                     [compare(f"{label} numpy {how}", np.concatenate(np_steps, 1), full, tol)], tol))
            rows.append(row_from(f"{label} torch cached {how} vs oracle full", "float64",
                                 [compare(f"{label} torch {how}", np.concatenate(t_steps, 1), full, tol)], tol))
        return rows

    return guarded(f"kv-cache[{config_name}]", "float64", run)


PAST_CONTEXT_MAX = 256  # generation past the context runs at most this context (generation_rows)


def generation_rows(config_name: str, config_d: dict, seed: int = 0, device: str = "cpu") -> list[Row]:
    """Greedy and sampled tokens, given the same uniform draws, are identical in both trees (the
    torch model on `device`; its sampling runs on the host, generate.py): from a short prompt; with
    a stop token that one row produces before the other (a row that stopped is padded with it, and
    the run goes on until every row has); and from a prompt 2 short of the context, so that the
    window slides and the cache is rebuilt (past a context of PAST_CONTEXT_MAX, on the same model
    with its context cut to that: each step past the context re-runs a whole window in float64)."""
    import torch

    from numpy_ref.generate import generate as np_generate
    from parity_tests import models
    from parity_tests.checks import Row, guarded, perturbed_numpy_model
    from torch_impl.generate import generate as t_generate

    def run() -> list[Row]:
        np_model = perturbed_numpy_model(config_d, seed)
        t_model = models.build_torch_model(config_d, np_model.params, dtype="float64", device=device)
        ids, _ = models.random_batch(config_d, 2, 3, seed)
        Tc = config_d["context_length"]
        n = min(8, Tc)
        coins = np.random.default_rng(seed).uniform(size=(n, 2))
        runs = [("greedy", ids, dict(temperature=0.0)),
                ("temperature 0.8", ids, dict(temperature=0.8)),
                ("top-k 5", ids, dict(temperature=1.0, top_k=5)),
                ("top-p 0.9", ids, dict(temperature=1.0, top_p=0.9))]
        plain = np.asarray(np_generate(np_model, ids, n, coins=coins, temperature=0.8))  # (2, 3 + n)
        # The stop token: the first of row 0's new tokens that row 1 never makes (row 0 stops, row 1
        # runs on); with none, the row cannot be built, which is an error, not a row left out.
        stop = next((int(t) for t in plain[0, 3:] if t not in plain[1, 3:]), None)
        if stop is not None:
            runs.append(("temperature 0.8, a stop token", ids, dict(temperature=0.8, eos_id=stop)))
        rows = [Row(f"generate[{config_name}] {label}", "float64", *_same_tokens(np_model, t_model, ids, n, coins,
                                                                                kwargs)) for label, ids, kwargs in runs]
        if stop is None:
            rows.append(Row(f"generate[{config_name}] temperature 0.8, a stop token", "float64", float("nan"),
                            float("nan"), "-", "ERROR", f"no stop token for this row: every new token of row 0 "
                            f"({plain[0, 3:].tolist()}) is among row 1's"))
        # Past the context: weight matrices 5x wider (model_oracle.WEIGHT_SPREAD's reason: at GPT-2's
        # initial spread attention is so even that a window one token short gave the same tokens).
        # Then a prompt longer than the context: both trees read its last context's worth of
        # tokens, cropped before the first step and any cache. There the token embedding (and an
        # untied head) 10x, the rest plain: the next token then follows the prompt's last token (a
        # tied model repeats it), where at GPT-2's initial spread, or 5x everywhere, a prompt read
        # from its first tokens gave the same greedy tokens. One pair of models alive at a time
        # (a preset's float64 model is 1 GB in each tree).
        short = dict(config_d, context_length=min(Tc, PAST_CONTEXT_MAX))
        cut = "" if Tc <= PAST_CONTEXT_MAX else f" (context cut to {PAST_CONTEXT_MAX})"
        plain = dict(np_model.params, **{"wpe.weight": np_model.params["wpe.weight"][:short["context_length"]]})
        del np_model, t_model
        sharp = {k: v * 5.0 if v.ndim == 2 else v for k, v in plain.items()}
        np_sharp = models.build_numpy_model(short, seed=seed, params=sharp)
        t_sharp = models.build_torch_model(short, sharp, dtype="float64", device=device)
        del sharp
        long_ids, _ = models.random_batch(short, 2, max(1, short["context_length"] - 2), seed + 1)
        rows.append(Row(f"generate[{config_name}] greedy past the context{cut}", "float64",
                        *_same_tokens(np_sharp, t_sharp, long_ids, n, coins, dict(temperature=0.0))))
        del np_sharp, t_sharp
        echo = {k: v * 10.0 if k in ("wte.weight", "lm_head.weight") else v for k, v in plain.items()}
        np_echo = models.build_numpy_model(short, seed=seed, params=echo)
        t_echo = models.build_torch_model(short, echo, dtype="float64", device=device)
        del echo, plain
        over_ids, _ = models.random_batch(short, 2, short["context_length"] + 3, seed + 2)
        rows.append(Row(f"generate[{config_name}] greedy from a prompt 3 past the context{cut}", "float64",
                        *_same_tokens(np_echo, t_echo, over_ids, 2, coins[:2], dict(temperature=0.0))))
        return rows

    def _same_tokens(np_m, t_m, ids, n, coins, kwargs) -> tuple:
        """(mismatches, mismatches, "exact", verdict, detail) of one generation in both trees."""
        a = np.asarray(np_generate(np_m, ids, n, coins=coins, **kwargs))
        with torch.no_grad():
            b = models.to_numpy(t_generate(t_m, torch.from_numpy(ids).to(device), n, coins=coins, **kwargs))
        mismatches = int(np.sum(a != b)) if a.shape == b.shape else -1
        verdict = "ok" if mismatches == 0 else "MISMATCH"
        detail = "" if verdict == "ok" else f"numpy {a.tolist()} vs torch {b.tolist()}"
        return float(mismatches), float(mismatches), "exact", verdict, detail

    return guarded(f"generate[{config_name}]", "float64", run)
