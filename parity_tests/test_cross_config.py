"""What is written twice on purpose must agree: config fields, presets, parameter tables."""

import dataclasses
from fractions import Fraction

import numpy as np
import pytest

import numpy_ref.config as npc
import torch_impl.config as tc


def test_config_fields_identical_in_name_order_and_default():
    a = [(f.name, f.default) for f in dataclasses.fields(npc.GPTConfig)]
    b = [(f.name, f.default) for f in dataclasses.fields(tc.GPTConfig)]
    assert a == b, f"numpy_ref fields {a} != torch_impl fields {b}"
    assert [n for n, _ in a] == ["vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate",
                                 "qkv_bias", "tie_embeddings", "ln_eps"], "fields differ from docs/design.md"


def test_presets_identical():
    assert sorted(npc.PRESETS) == sorted(tc.PRESETS), f"{sorted(npc.PRESETS)} vs {sorted(tc.PRESETS)}"
    for name in npc.PRESETS:
        assert npc.get_config(name).to_dict() == tc.get_config(name).to_dict(), f"preset {name} differs"


def test_book_gpt_config_124m():
    # GPT_CONFIG_124M, chapter 4 of "Build a Large Language Model (From Scratch)".
    c = npc.get_config("gpt2-small").to_dict()
    assert c == dict(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12, drop_rate=0.1,
                     qkv_bias=False, tie_embeddings=False, ln_eps=1e-5), c


@pytest.mark.parametrize("bad", [dict(emb_dim=30, n_heads=4), dict(vocab_size=0), dict(drop_rate=1.0),
                                 dict(n_layers=-1), dict(context_length=0)])
def test_both_trees_reject_the_same_bad_configs(bad):
    base = npc.get_config("tiny").to_dict()
    base.update(bad)
    for mod in (npc, tc):
        with pytest.raises(ValueError):
            mod.GPTConfig(**base)



@pytest.mark.parametrize("bad,error", [(dict(drop_rate="0.1"), TypeError), (dict(ln_eps=None), TypeError),
                                       (dict(drop_rate=True), TypeError), (dict(qkv_bias="no"), TypeError),
                                       (dict(tie_embeddings=1), TypeError), (dict(ln_eps=float("inf")), ValueError),
                                       (dict(drop_rate=float("nan")), ValueError),
                                       # 0 would make a constant row's layer norm 0 / 0 = NaN
                                       (dict(ln_eps=0.0), ValueError), (dict(ln_eps=-1e-5), ValueError)])
def test_both_trees_name_the_field_of_a_value_of_the_wrong_type(bad, error):
    """A string, None or bool where a number goes, anything but True/False for a flag ("no" and
    "false" are truthy strings): the error names the field, in both trees."""
    (name, value), = bad.items()
    for mod in (npc, tc):
        with pytest.raises(error, match=f"GPTConfig.{name}"):
            mod.GPTConfig(**dict(npc.get_config("tiny").to_dict(), **bad))


@pytest.mark.parametrize("bad", [dict(drop_rate=10**400), dict(ln_eps=10**400), dict(ln_eps=-10**400),
                                 dict(ln_eps=Fraction(10**400, 3))], ids=lambda d: next(iter(d)))
def test_a_number_past_float64_is_a_value_error_naming_the_field_in_both_trees(bad):
    """float(10**400) raises OverflowError, which no caller expects (a config.json holding the
    integer 10**400 gave `gpt-oracle info` a traceback): a ValueError naming the field and the
    limit, the same message in both trees."""
    (name, _), = bad.items()
    messages = []
    for mod in (npc, tc):
        with pytest.raises(ValueError, match=f"GPTConfig.{name} is past float64's range") as err:
            mod.GPTConfig(**dict(npc.get_config("tiny").to_dict(), **bad))
        messages.append(str(err.value))
    assert messages[0] == messages[1], f"numpy_ref says {messages[0]!r}, torch_impl {messages[1]!r}"
    assert "2**1024" in messages[0] and "about " in messages[0], messages[0]  # the limit, and the value roughly


def test_numpy_scalars_become_python_floats_in_both_trees():
    """np.float32(0.1) is a number: accepted and stored as the Python float it equals, so the
    config stays JSON-serialisable (a checkpoint's config.json)."""
    import json

    for mod in (npc, tc):
        c = mod.get_config("tiny", drop_rate=np.float32(0.1), ln_eps=np.float64(1e-5))
        assert type(c.drop_rate) is float and c.drop_rate == float(np.float32(0.1)), repr(c.drop_rate)
        assert type(c.ln_eps) is float, repr(c.ln_eps)
        json.dumps(c.to_dict())

def test_unknown_key_is_rejected_by_name_in_both():
    d = dict(npc.get_config("tiny").to_dict(), n_embd=32)
    for mod in (npc, tc):
        with pytest.raises((ValueError, TypeError), match="n_embd"):
            mod.GPTConfig.from_dict(d)



def test_from_dict_needs_every_field_in_both_trees():
    """A partial or non-dict `gpt_oracle` object must not fall back to the defaults (gpt2-small)."""
    full = npc.get_config("tiny").to_dict()
    partial = {k: v for k, v in full.items() if k != "n_layers"}
    for mod in (npc, tc):
        assert mod.GPTConfig.from_dict(full) == mod.get_config("tiny")
        with pytest.raises(ValueError, match=r"missing GPTConfig key\(s\) \['n_layers'\]"):
            mod.GPTConfig.from_dict(partial)
        with pytest.raises(TypeError, match="mapping"):
            mod.GPTConfig.from_dict([])

@pytest.mark.parametrize("tie,qkv", [(False, True), (True, False), (True, True), (False, False)])
def test_parameter_tables_identical(tie, qkv):
    from numpy_ref.model import GPTModel as NpModel
    from torch_impl.model import GPTModel as TModel

    d = dict(npc.get_config("tiny").to_dict(), tie_embeddings=tie, qkv_bias=qkv)
    a = [(k, tuple(v.shape)) for k, v in NpModel(npc.GPTConfig(**d), seed=0).params.items()]
    b = [(k, tuple(v.shape)) for k, v in TModel(tc.GPTConfig(**d), seed=0).state_dict().items()]
    assert a == b, "parameter tables differ:\n" + "\n".join(f"{x} | {y}" for x, y in zip(a, b) if x != y)
    assert ("lm_head.weight" in dict(a)) == (not tie)
    assert any(k.endswith("c_attn.bias") for k, _ in a) == qkv


def _init_stats(params: dict[str, np.ndarray]) -> dict[str, tuple[str, float]]:
    """Per parameter: ("const", value) when every element is equal, else ("spread", std, max |x|)."""
    out = {}
    for k, a in params.items():
        a = np.asarray(a, dtype=np.float64)
        out[k] = ("const", float(a.flat[0])) if np.all(a == a.flat[0]) else ("spread", float(a.std()),
                                                                             float(np.abs(a).max()))
    return out


@pytest.mark.parametrize("qkv", [False, True])
@pytest.mark.parametrize("scheme", ["gpt2", "book"])
def test_init_schemes_draw_the_same_distributions_in_both_trees(scheme, qkv):
    """Same scheme names; per parameter the same constant, or the same distribution: the documented
    std (0.02, 1, or bound/sqrt(3) for uniform(+-bound), bound = 1/sqrt(fan_in)) and |x| <= bound."""
    from numpy_ref.model import GPTModel as NpModel
    from numpy_ref.params import INIT_SCHEMES as NP_SCHEMES
    from torch_impl.model import INIT_SCHEMES as T_SCHEMES
    from torch_impl.model import GPTModel as TModel

    assert NP_SCHEMES == T_SCHEMES, f"init schemes differ: numpy_ref {NP_SCHEMES}, torch_impl {T_SCHEMES}"
    cfg = dict(vocab_size=300, context_length=64, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0,
               qkv_bias=qkv, tie_embeddings=False, ln_eps=1e-5)
    np_params = NpModel(npc.GPTConfig(**cfg), seed=1, init=scheme).params
    a = _init_stats(np_params)
    b = _init_stats({k: v.detach().double().numpy() for k, v in TModel(tc.GPTConfig(**cfg), seed=1, init=scheme)
                     .state_dict().items()})
    assert list(a) == list(b), f"parameter names differ: {list(a)} vs {list(b)}"
    C = cfg["emb_dim"]
    for k in a:
        assert a[k][0] == b[k][0], f"{k}: numpy_ref is {a[k]}, torch_impl {b[k]}"
        if a[k][0] == "const":
            expect = 1.0 if ".ln_" in f".{k}" and k.endswith("weight") else 0.0
            assert a[k][1] == b[k][1] == expect, f"{k}: constants {a[k][1]}, {b[k][1]}, expected {expect}"
            continue
        if scheme == "gpt2":
            std, bound = 0.02, None
        elif k in ("wte.weight", "wpe.weight"):
            std, bound = 1.0, None
        else:
            fan_in = 4 * C if k.endswith(("mlp.c_proj.weight", "mlp.c_proj.bias")) else C
            bound = 1.0 / np.sqrt(fan_in)
            std = bound / np.sqrt(3.0)
        n = np_params[k].size
        tol = 6 * std / np.sqrt(2 * n)  # six standard errors of a sample std
        for tree, s in (("numpy_ref", a[k]), ("torch_impl", b[k])):
            assert abs(s[1] - std) <= tol, (
                f"{tree} {k} ({scheme}): std {s[1]:.5f}, expected {std:.5f} (n={n})")
            if bound is not None:  # uniform(-bound, bound): the largest |x| of n draws lies just under it
                assert 0.9 * bound <= s[2] <= bound, (f"{tree} {k} ({scheme}): max |x| {s[2]:.5f}, expected just "
                                                      f"under the bound {bound:.5f}")
    with pytest.raises(ValueError, match="xavier"):
        NpModel(npc.GPTConfig(**cfg), init="xavier")
    with pytest.raises(ValueError, match="xavier"):
        TModel(tc.GPTConfig(**cfg), init="xavier")
