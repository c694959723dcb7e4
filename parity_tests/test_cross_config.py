"""What is written twice on purpose must agree: config fields, presets, parameter tables."""

import dataclasses

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


def test_unknown_key_is_rejected_by_name_in_both():
    d = dict(npc.get_config("tiny").to_dict(), n_embd=32)
    for mod in (npc, tc):
        with pytest.raises((ValueError, TypeError), match="n_embd"):
            mod.GPTConfig.from_dict(d)


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
