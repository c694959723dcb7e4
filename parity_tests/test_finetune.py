"""Fine-tuning, both trees (the book's chapters 6 and 7): the classifier against finite
differences and across trees, its padding and freezing properties, a fine-tuning run that must
learn, and the instruction prompt and collator, equal across trees and to their definition."""


import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import numpy_ref.classifier as nclf
import numpy_ref.instruction_data as ninst
import torch_impl.classifier as tclf
import torch_impl.instruction_data as tinst
from numpy_ref.gradcheck import gradcheck_vjp
from numpy_ref.model import GPTModel
from numpy_ref.optim import AdamW as NumpyAdamW
from torch_impl.optim import build_optimizer
from parity_tests import models
from parity_tests.compare import assert_close, assert_dicts_close
from parity_tests.strategies import config_dicts, seeds
from parity_tests.tolerances import GRADCHECK, forward_tol, gradient_tol

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models (conftest.py)


@st.composite
def classifier_case(draw):
    cfg = draw(config_dicts(max_layers=2, max_heads=3, max_head_size=6, max_context=10, max_vocab=40))
    cfg["drop_rate"] = 0.0
    K = draw(st.integers(1, 4))
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, cfg["context_length"]))
    lengths = draw(st.none() | st.lists(st.integers(1, T), min_size=B, max_size=B))
    return cfg, K, B, T, lengths, draw(seeds())


def _batch(cfg, K, B, T, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg["vocab_size"], (B, T)), rng.integers(0, K, B)


def _numpy_classifier(cfg, K, seed):
    params = models.scale_params(nclf.GPTClassifier(models.numpy_config(cfg), K, seed=seed % 1000).params, seed)
    return nclf.GPTClassifier(models.numpy_config(cfg), K, params=params)


def _torch_classifier(cfg, K, params, dtype):
    clf = tclf.GPTClassifier(models.torch_config(cfg), K, dtype=dtype)
    clf.load_state_dict({k: torch.from_numpy(v).to(dtype) for k, v in params.items()}, strict=True)
    return clf


# ---- the classifier ----------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_classifier_backward_matches_finite_differences(tie):
    cfg = dict(vocab_size=7, context_length=5, emb_dim=4, n_heads=2, n_layers=2, drop_rate=0.2,
               qkv_bias=True, tie_embeddings=tie)
    clf = _numpy_classifier(cfg, 3, seed=4)
    ids, labels = _batch(cfg, 3, 3, 5, seed=4)
    lengths = np.array([5, 2, 4])
    masks = GPTModel(models.numpy_config(cfg)).dropout_masks(3, 5, np.random.default_rng(6))
    names = list(clf.params)
    _, _, cache = clf.forward(ids, labels, lengths=lengths, dropout_masks=masks)
    grads = clf.backward(cache)
    assert list(grads) == names, f"gradient names {list(grads)} differ from the parameters' {names}"

    def loss(*values):
        return nclf.classifier_forward(dict(zip(names, values)), ids, clf.config, labels, lengths=lengths,
                                       dropout_masks=masks)[1]

    gradcheck_vjp(loss, lambda _G: [grads[n] for n in names], list(clf.params.values()), np.asarray(1.0),
                  atol=GRADCHECK.atol, rtol=GRADCHECK.rtol)


@settings(max_examples=20)
@given(case=classifier_case(), dtype=st.sampled_from(["float64", "float32"]))
def test_classifier_matches_across_trees(case, dtype):
    cfg, K, B, T, lengths, seed = case
    ref = _numpy_classifier(cfg, K, seed)
    ids, labels = _batch(cfg, K, B, T, seed)
    logits, loss, cache = ref.forward(ids, labels, lengths=lengths)
    grads = ref.backward(cache)
    clf = _torch_classifier(cfg, K, ref.params, getattr(torch, dtype))
    assert list(clf.state_dict()) == list(ref.params), "parameter names or order differ between the trees"
    t_logits, t_loss = clf(torch.from_numpy(ids), torch.from_numpy(labels),
                           lengths=None if lengths is None else torch.tensor(lengths))
    t_loss.backward()
    assert_close(f"classifier logits ({cfg}, K={K}, lengths={lengths})", t_logits, logits, forward_tol(dtype))
    assert_close("classifier loss", t_loss.detach(), np.asarray(loss), forward_tol(dtype))
    assert_dicts_close("classifier grads", {n: p.grad for n, p in clf.named_parameters()}, grads,
                       gradient_tol(dtype), order=list(grads))


@settings(max_examples=10)
@given(case=classifier_case(), pad=st.integers(1, 9))
def test_padding_after_the_last_real_token_changes_nothing(case, pad):
    """Causal attention: a row read at lengths - 1 gives the logits of the row alone, whatever
    follows it (both trees)."""
    cfg, K, B, T, _, seed = case
    assume(cfg["context_length"] >= 2)
    T = min(T, cfg["context_length"] - 1)  # room for at least one padded token
    pad = min(pad, cfg["context_length"] - T)
    ref = _numpy_classifier(cfg, K, seed)
    clf = _torch_classifier(cfg, K, ref.params, torch.float64)
    ids, _ = _batch(cfg, K, B, T, seed)
    filler = np.random.default_rng(seed + 1).integers(0, cfg["vocab_size"], (B, pad))
    padded = np.concatenate([ids, filler], axis=1)
    lengths = np.full(B, T)
    for name, run in (("numpy_ref", lambda x, n: ref(x, lengths=n)),
                      ("torch_impl", lambda x, n: clf(torch.from_numpy(x), lengths=torch.from_numpy(n)).detach())):
        assert_close(f"{name}: logits with {pad} tokens after the last real one vs the row alone",
                     run(padded, lengths), run(ids, lengths), forward_tol("float64"))


def test_a_tied_head_is_kept_and_an_untied_one_dropped():
    for tie in (False, True):
        cfg = models.numpy_config(dict(vocab_size=11, context_length=6, emb_dim=8, n_heads=2, n_layers=2,
                                       drop_rate=0.0, qkv_bias=False, tie_embeddings=tie))
        names = [n for n, _ in nclf.classifier_param_shapes(cfg, 3)]
        t_names = list(tclf.GPTClassifier(models.torch_config(cfg.to_dict()), 3).state_dict())
        assert names == t_names, f"tie={tie}: numpy_ref names {names} vs torch_impl {t_names}"
        assert "lm_head.weight" not in names and names[-2:] == ["classifier.weight", "classifier.bias"], names
        assert "wte.weight" in names


def test_from_gpt_copies_the_trunk_and_leaves_the_model_alone():
    cfg_d = dict(vocab_size=11, context_length=6, emb_dim=8, n_heads=2, n_layers=2, drop_rate=0.0,
                 qkv_bias=True, tie_embeddings=False)
    np_model = models.build_numpy_model(cfg_d, seed=3)
    np_clf = nclf.GPTClassifier.from_gpt(np_model, 2, seed=5)
    t_model = models.build_torch_model(cfg_d, np_model.params, dtype="float64")
    t_clf = tclf.GPTClassifier.from_gpt(t_model, 2, seed=5)
    for name, value in np_model.params.items():
        if name == "lm_head.weight":
            continue
        assert np.array_equal(np_clf.params[name], value), f"numpy_ref from_gpt changed {name}"
        assert np.array_equal(t_clf.state_dict()[name].numpy(), value), f"torch_impl from_gpt changed {name}"
        assert np_clf.params[name] is not value, f"numpy_ref from_gpt shares {name} with the language model"
    assert t_clf.dtype == torch.float64 and t_clf.num_classes == 2
    assert np.abs(np_clf.params["classifier.weight"]).max() > 0, "the new head is all zeros"
    # Training the classifier leaves the language model as it was (no tensor shared).
    with torch.no_grad():
        for p in t_clf.parameters():
            p.add_(1.0)
    for name, value in np_model.params.items():
        np_clf.params.get(name, np.zeros(1))[...] += 1.0
        assert np.array_equal(t_model.state_dict()[name].numpy(), value), f"torch_impl from_gpt shares {name}"
    assert np.array_equal(models.build_numpy_model(cfg_d, seed=3).params["wte.weight"], np_model.params["wte.weight"]), \
        "numpy_ref from_gpt shares wte with the language model"
    # A compiled model's trunk is copied too (its state_dict keys carry torch.compile's prefix).
    compiled = tclf.GPTClassifier.from_gpt(torch.compile(t_model), 2, seed=5)
    assert torch.equal(compiled.wte.weight, t_model.wte.weight)
    with pytest.raises(TypeError, match="GPTModel"):
        tclf.GPTClassifier.from_gpt(t_clf, 2)


def test_trainable_names_agree_and_freeze_trunk_freezes_the_rest():
    for qkv_bias in (False, True):
        cfg_d = dict(vocab_size=11, context_length=6, emb_dim=8, n_heads=2, n_layers=3, drop_rate=0.0,
                     qkv_bias=qkv_bias, tie_embeddings=True)
        for n in range(4):
            a = nclf.trainable_parameter_names(models.numpy_config(cfg_d), n)
            b = tclf.trainable_parameter_names(models.torch_config(cfg_d), n)
            assert a == b, f"n_last_blocks={n}: numpy_ref {a} vs torch_impl {b}"
        clf = tclf.GPTClassifier(models.torch_config(cfg_d), 2)
        kept = set(clf.freeze_trunk(1))
        assert {n for n, p in clf.named_parameters() if p.requires_grad} == kept
        every = [n for n, _ in nclf.classifier_param_shapes(models.numpy_config(cfg_d), 2)]
        assert kept == {n for n in every if n.startswith(("h.2.", "ln_f.", "classifier."))}, sorted(kept)
    for tree in (nclf, tclf):
        cfg = (models.numpy_config if tree is nclf else models.torch_config)(cfg_d)
        for bad in (-1, 4, 1.0, True):
            with pytest.raises(ValueError, match="n_last_blocks"):
                tree.trainable_parameter_names(cfg, bad)


def test_bad_classifier_input_is_refused_alike_before_any_compute():
    cfg_d = dict(vocab_size=11, context_length=6, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.0,
                 qkv_bias=False, tie_embeddings=True)
    ref = _numpy_classifier(cfg_d, 3, seed=1)
    clf = _torch_classifier(cfg_d, 3, ref.params, torch.float64)
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    cases = [  # (labels, lengths, error, message)
        (np.array([0, 3]), None, ValueError, "3"),  # a label outside [0, K)
        (np.array([0, -1]), None, ValueError, "-1"),
        (np.array([0.0, 1.0]), None, TypeError, "int|dtype"),
        (np.array([0]), None, ValueError, "shape"),
        (None, np.array([3, 4]), ValueError, r"lengths\[1\] = 4 is outside 1 .. T = 3"),
        (None, np.array([0, 3]), ValueError, r"lengths\[0\] = 0 is outside 1 .. T = 3"),
        (None, np.array([3]), ValueError, "shape"),
        (None, np.array([3.0, 3.0]), TypeError, "integers"),
    ]
    for labels, lengths, error, message in cases:
        with pytest.raises(error, match=message):
            ref.forward(ids, labels, lengths=lengths)
        with pytest.raises(error, match=message):
            clf(torch.from_numpy(ids), None if labels is None else torch.from_numpy(labels),
                lengths=None if lengths is None else torch.from_numpy(lengths))
    for tree in (nclf, tclf):
        for bad in (0, -2, 2.0, True):
            with pytest.raises(ValueError, match="num_classes"):
                tree.check_num_classes(bad)
        for bad in (-1, 2**64, 1.0, True):
            with pytest.raises(ValueError, match="seed"):
                tree.GPTClassifier((models.numpy_config if tree is nclf else models.torch_config)(cfg_d), 2, seed=bad)
    with pytest.raises(ValueError, match="outside"):  # ids go through the language model's checks
        ref(np.array([[11]]))
    with pytest.raises(ValueError, match="outside"):
        clf(torch.tensor([[11]]))


def test_inputs_are_checked_before_the_trunk_runs(monkeypatch):
    """Bad lengths or labels raise before any compute: the trunk is never entered."""
    cfg_d = dict(vocab_size=11, context_length=6, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.0,
                 qkv_bias=False, tie_embeddings=True)
    ref = _numpy_classifier(cfg_d, 3, seed=1)
    clf = _torch_classifier(cfg_d, 3, ref.params, torch.float64)

    def ran(*args, **kwargs):
        raise AssertionError("the trunk ran before every input was checked")

    monkeypatch.setattr(nclf, "embedding_forward", ran, raising=False)
    import numpy_ref.model as nmodel

    monkeypatch.setattr(nmodel, "embedding_forward", ran)
    monkeypatch.setattr(tclf.GPTModel, "forward", ran)
    ids = np.array([[1, 2, 3]])
    for labels, lengths in ((np.array([3]), None), (None, np.array([4])), (np.array([0.0]), None)):
        with pytest.raises((ValueError, TypeError)):
            ref.forward(ids, labels, lengths=lengths)
        with pytest.raises((ValueError, TypeError)):
            clf(torch.from_numpy(ids), None if labels is None else torch.from_numpy(labels),
                lengths=None if lengths is None else torch.from_numpy(lengths))


def test_an_input_with_two_faults_raises_the_same_exception_in_both_trees():
    """The checks run in one order in both trees (KV cache, dropout masks, ids, then targets,
    lengths or labels), so the first fault found is the same one."""
    cfg_d = dict(vocab_size=11, context_length=6, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.0,
                 qkv_bias=False, tie_embeddings=True)
    np_model = models.build_numpy_model(cfg_d, seed=1)
    t_model = models.build_torch_model(cfg_d, np_model.params, dtype="float64")
    other = dict(cfg_d, n_heads=4)
    bad_mask = {"embedding": np.ones((1, 2, 8))}
    cases = [  # (ids, targets, masks, cache from another model)
        (np.array([[1.0, 2.0, 3.0]]), None, bad_mask, False),
        (np.array([[1.0, 2.0, 3.0]]), None, None, True),
        (np.array([[1, 2, 3]]), np.array([[1.0, 2.0, 3.0]]), bad_mask, False),
        (np.array([[1, 2, 11]]), np.array([[1, 2, 99]]), None, False),
    ]
    for ids, targets, masks, foreign in cases:
        caught = []
        for tree, model, cache_of, as_tensor in (
                ("numpy_ref", np_model, lambda: models.build_numpy_model(other).new_kv_cache(1), lambda a: a),
                ("torch_impl", t_model, lambda: models.build_torch_model(other, models.build_numpy_model(other).params,
                                                                           dtype="float64").new_kv_cache(1),
                 torch.from_numpy)):
            kw = {"kv_cache": cache_of()} if foreign else {}
            if masks is not None:
                kw["dropout_masks"] = {k: as_tensor(v) for k, v in masks.items()}
            try:
                if tree == "numpy_ref":
                    model.forward(ids, targets, **kw) if not foreign else model(ids, **kw)
                else:
                    with torch.no_grad():
                        model(as_tensor(ids), None if targets is None else as_tensor(targets), **kw)
            except (TypeError, ValueError) as err:
                caught.append((tree, type(err).__name__, str(err)))
            else:
                caught.append((tree, "no error", ""))
        assert caught[0][1] == caught[1][1] != "no error", f"ids {ids.tolist()}, targets, masks, cache: {caught}"
    ids = np.array([[1.0, 2.0]])  # the classifier: masks, then ids, then lengths and labels
    bad_mask = {"embedding": np.ones((1, 5, 8))}
    ref = _numpy_classifier(cfg_d, 2, seed=1)
    clf = _torch_classifier(cfg_d, 2, ref.params, torch.float64)
    for labels, lengths in ((np.array([5]), np.array([9])), (np.array([5]), None)):
        errors = []
        for call in (lambda: ref.forward(ids, labels, lengths=lengths, dropout_masks=bad_mask),
                     lambda: clf(torch.from_numpy(ids), torch.from_numpy(labels),
                                 lengths=None if lengths is None else torch.from_numpy(lengths),
                                 dropout_masks={k: torch.from_numpy(v) for k, v in bad_mask.items()})):
            with pytest.raises((TypeError, ValueError)) as info:
                call()
            errors.append((type(info.value).__name__, str(info.value)))
        assert errors[0][0] == errors[1][0] and "mask" in errors[0][1] and "mask" in errors[1][1], errors


def test_accuracy_alike():
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 0.0], [1.0, 3.0]])
    labels = np.array([1, 1, 0, 0])
    assert nclf.classification_accuracy(logits, labels) == 0.5  # rows 0 and 2 (a tie reads as class 0)
    assert tclf.classification_accuracy(torch.from_numpy(logits), torch.from_numpy(labels)) == 0.5
    assert tclf.classification_accuracy(torch.from_numpy(logits), [1, 1, 0, 0]) == 0.5  # a list, as numpy_ref takes
    for bad_logits, bad_labels, error in ((logits, np.array([1, 1, 0, 2]), ValueError),  # label 2 with K = 2
                                          (logits, np.array([1.0, 1.0, 0.0, 0.0]), TypeError),
                                          (logits[:0], labels[:0], ValueError),  # no rows: not NaN
                                          (logits, labels[:3], ValueError)):
        with pytest.raises(error):
            nclf.classification_accuracy(bad_logits, bad_labels)
        with pytest.raises(error):
            tclf.classification_accuracy(torch.from_numpy(bad_logits), torch.from_numpy(bad_labels))


def test_per_sample_gradients_with_lengths_under_vmap():
    """torch.func: per-sample gradients of the classifier's loss, with lengths batched by vmap,
    equal each row's own gradient; a batched length out of range is the same ValueError."""
    from torch.func import functional_call, grad, vmap

    cfg_d = dict(vocab_size=11, context_length=6, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.0,
                 qkv_bias=False, tie_embeddings=True)
    ref = _numpy_classifier(cfg_d, 3, seed=1)
    clf = _torch_classifier(cfg_d, 3, ref.params, torch.float64)
    params = {k: v.detach() for k, v in clf.named_parameters()}
    ids, labels, lengths = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), torch.tensor([0, 2]), torch.tensor([2, 4])

    def loss(p, x, y, n):
        return functional_call(clf, p, (x[None], y[None]), {"lengths": n[None]})[1]

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, ids, labels, lengths)
    for b in range(2):
        _, _, cache = ref.forward(ids[b:b + 1].numpy(), labels[b:b + 1].numpy(), lengths=lengths[b:b + 1].numpy())
        assert_dicts_close(f"row {b}'s gradient under vmap", {k: v[b] for k, v in per_sample.items()},
                           ref.backward(cache), gradient_tol("float64"))
    with pytest.raises(ValueError, match="outside 1 .. T = 4"):
        vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, ids, labels, torch.tensor([2, 5]))


def _spam_like_task(vocab: int, n: int, T: int, seed: int):
    """A learnable task: label 1 when token 3 occurs in the row's real tokens; rows of random length."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, T + 1, n)
    ids = rng.integers(4, vocab, (n, T))
    labels = rng.integers(0, 2, n)
    for b in np.flatnonzero(labels):
        ids[b, rng.integers(0, lengths[b])] = 3
    return ids, labels, lengths


def test_fine_tuning_runs_agree_across_trees_step_by_step_and_learn():
    """Chapter 6's recipe on both trees from the same weights and batches: AdamW on the last
    block, ln_f and the head only (the rest frozen), float64. The losses agree at every step,
    frozen weights stay bit-for-bit, and the classifier learns the task (and generalises)."""
    cfg_d = dict(vocab_size=16, context_length=8, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0,
                 qkv_bias=True, tie_embeddings=True)
    ref = _numpy_classifier(cfg_d, 2, seed=7)
    clf = _torch_classifier(cfg_d, 2, ref.params, torch.float64)
    before = {k: v.copy() for k, v in ref.params.items()}
    trainable = nclf.trainable_parameter_names(ref.config, 1)
    assert sorted(clf.freeze_trunk(1)) == sorted(trainable)
    np_opt = NumpyAdamW({n: ref.params[n] for n in trainable}, lr=3e-2, weight_decay=0.0)
    t_opt = build_optimizer(clf, "adamw", lr=3e-2, weight_decay=0.0)  # fused where torch has it
    ids, labels, lengths = _spam_like_task(16, 64, 8, seed=1)
    for step in range(80):
        rows = np.arange(step * 16, step * 16 + 16) % 64
        _, loss, cache = ref.forward(ids[rows], labels[rows], lengths=lengths[rows])
        grads = ref.backward(cache)
        np_opt.step({n: grads[n] for n in trainable})
        t_opt.zero_grad()
        _, t_loss = clf(torch.from_numpy(ids[rows]), torch.from_numpy(labels[rows]),
                        lengths=torch.from_numpy(lengths[rows]))
        t_loss.backward()
        t_opt.step()
        # Rounding differences (1e-16) grow with the steps: AdamW divides each update by sqrt(v),
        # so a near-zero gradient's last bits move its weight by a whole step size.
        tol = 1e-9 if step < 40 else 1e-6
        assert abs(t_loss.item() - float(loss)) <= tol, f"step {step}: loss {float(t_loss)!r} vs {float(loss)!r}"
    for name, value in ref.params.items():
        if name not in trainable:
            assert np.array_equal(value, before[name]), f"numpy_ref: frozen {name} changed"
            assert np.array_equal(clf.state_dict()[name].numpy(), before[name]), f"torch_impl: frozen {name} changed"
    with torch.no_grad():
        acc = tclf.classification_accuracy(clf(torch.from_numpy(ids), lengths=torch.from_numpy(lengths)),
                                           torch.from_numpy(labels))
    assert acc >= 0.95, f"the fine-tuned classifier gets {acc:.2f} of its 64 training rows right"
    assert acc == nclf.classification_accuracy(ref(ids, lengths=lengths), labels)
    ids, labels, lengths = _spam_like_task(16, 256, 8, seed=9)  # rows it has not seen
    with torch.no_grad():
        held_out = tclf.classification_accuracy(clf(torch.from_numpy(ids), lengths=torch.from_numpy(lengths)),
                                                torch.from_numpy(labels))
    assert held_out >= 0.8, f"the fine-tuned classifier gets {held_out:.2f} of 256 unseen rows right (chance: 0.5)"


def test_classifier_trains_under_bf16_autocast():
    cfg_d = dict(vocab_size=16, context_length=8, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.1,
                 qkv_bias=True, tie_embeddings=False)
    clf = tclf.GPTClassifier(models.torch_config(cfg_d), 2, seed=1)
    clf.train()
    ids, labels, lengths = _spam_like_task(16, 8, 8, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = clf(torch.from_numpy(ids), torch.from_numpy(labels), lengths=torch.from_numpy(lengths))
    loss.backward()
    assert logits.shape == (8, 2) and loss.dtype == torch.float32 and torch.isfinite(loss)
    missing = [n for n, p in clf.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no finite gradient for {missing}"


@pytest.mark.parametrize("tie,qkv_bias", [(False, True), (True, False)])
def test_classifier_checkpoints_move_between_the_trees(tie, qkv_bias, tmp_path):
    """A classifier saved by either tree loads in the other with the same float32 values and
    logits; a language model's loader refuses it by name, and the classifier's loader refuses a
    language model's checkpoint; Hugging Face's GPT2Model reads the trunk from it."""
    from numpy_ref.checkpoint import CheckpointError as NumpyCheckpointError
    from numpy_ref.model import GPTModel as NumpyGPT
    from torch_impl.checkpoint_files import CheckpointError as TorchCheckpointError
    from torch_impl.model import GPTModel as TorchGPT

    cfg_d = dict(vocab_size=13, context_length=6, emb_dim=8, n_heads=2, n_layers=2, drop_rate=0.0,
                 qkv_bias=qkv_bias, tie_embeddings=tie)
    ref = _numpy_classifier(cfg_d, 3, seed=2)
    ids, lengths = np.array([[1, 2, 3, 4], [5, 6, 7, 8]]), np.array([4, 2])
    ref.save_pretrained(tmp_path / "numpy")
    from_numpy = tclf.GPTClassifier.from_pretrained(tmp_path / "numpy", dtype=torch.float64)
    assert from_numpy.num_classes == 3 and list(from_numpy.state_dict()) == list(ref.params)
    for name, value in ref.params.items():
        assert np.array_equal(from_numpy.state_dict()[name].numpy(), value.astype(np.float32)), \
            f"{name} changed on the way from numpy_ref to torch_impl"
    from_numpy.save_pretrained(tmp_path / "torch")
    back = nclf.GPTClassifier.from_pretrained(tmp_path / "torch")
    for name, value in ref.params.items():
        assert np.array_equal(back.params[name], value.astype(np.float32)), f"{name} changed on the round trip"
    with torch.no_grad():
        got = from_numpy(torch.from_numpy(ids), lengths=torch.from_numpy(lengths))
    assert_close("logits of the loaded classifier", got, back(ids, lengths=lengths), forward_tol("float64"))
    for folder in ("numpy", "torch"):
        with pytest.raises(NumpyCheckpointError, match="classifier's checkpoint .3 classes."):
            NumpyGPT.from_pretrained(tmp_path / folder)
        with pytest.raises(TorchCheckpointError, match="classifier's checkpoint .3 classes."):
            TorchGPT.from_pretrained(tmp_path / folder)
    NumpyGPT(models.numpy_config(cfg_d)).save_pretrained(tmp_path / "lm")
    with pytest.raises(NumpyCheckpointError, match="not a classifier.s checkpoint"):
        nclf.GPTClassifier.from_pretrained(tmp_path / "lm")
    with pytest.raises(TorchCheckpointError, match="not a classifier.s checkpoint"):
        tclf.GPTClassifier.from_pretrained(tmp_path / "lm")
    for bad in (0, True, 2.0, "2"):  # both trees refuse a bad K before writing anything
        from numpy_ref.checkpoint import save_checkpoint as numpy_save
        from torch_impl.checkpoint import save_checkpoint as torch_save

        with pytest.raises(ValueError, match="num_classes"):
            numpy_save(tmp_path / "bad", ref.config, ref.params, num_classes=bad)
        with pytest.raises(ValueError, match="num_classes"):
            torch_save(tmp_path / "bad", from_numpy.config, from_numpy.state_dict(), num_classes=bad)
        assert not (tmp_path / "bad").exists()
    from transformers import GPT2Model

    hf, info = GPT2Model.from_pretrained(tmp_path / "numpy", output_loading_info=True)
    assert hf.config.num_labels == 3
    assert not info["missing_keys"], f"Hugging Face's GPT2Model misses {info['missing_keys']}"
    assert np.array_equal(hf.wte.weight.detach().numpy(), ref.params["wte.weight"].astype(np.float32))


def test_classifier_refuses_language_model_apis():
    clf = tclf.GPTClassifier(models.torch_config(dict(vocab_size=11, context_length=6, emb_dim=8, n_heads=2,
                                                      n_layers=1, drop_rate=0.0, qkv_bias=False,
                                                      tie_embeddings=False)), 2)
    with pytest.raises(NotImplementedError):
        clf.new_kv_cache(1)
    with pytest.raises(NotImplementedError, match="no vocabulary head"):
        clf.head_weight
    with pytest.raises(ValueError, match="features_only"):  # the trunk's output has no logits to score
        tclf.GPTModel.forward(clf, torch.tensor([[1, 2]]), torch.tensor([[2, 3]]), features_only=True)


# ---- instruction data --------------------------------------------------------------------------


@st.composite
def collate_case(draw):
    B = draw(st.integers(1, 4))
    seqs = [draw(st.lists(st.integers(0, 50), min_size=1, max_size=9)) for _ in range(B)]
    prompts = draw(st.none() | st.tuples(*[st.integers(0, len(s)) for s in seqs]).map(list))
    max_length = draw(st.none() | st.integers(1, 12))
    return seqs, prompts, max_length, draw(st.integers(0, 60)), draw(st.sampled_from([-100, -1, -7]))


@given(case=collate_case())
def test_instruction_collate_matches_across_trees_and_its_definition(case):
    seqs, prompts, max_length, pad_id, ignore = case
    kw = dict(pad_id=pad_id, ignore_index=ignore, max_length=max_length, prompt_lengths=prompts)
    inputs, targets = ninst.instruction_collate(seqs, **kw)
    t_inputs, t_targets = tinst.instruction_collate(seqs, **kw)
    assert np.array_equal(t_inputs.numpy(), inputs), f"inputs differ: torch {t_inputs.tolist()} vs {inputs.tolist()}"
    assert np.array_equal(t_targets.numpy(), targets), f"targets differ: torch {t_targets.tolist()} vs {targets.tolist()}"
    T = max(len(s) for s in seqs)
    assert inputs.shape == targets.shape == (len(seqs), T if max_length is None else min(T, max_length))
    for b, s in enumerate(seqs):  # the definition, position by position
        full = list(s) + [pad_id] * (T + 1 - len(s))
        p = 0 if prompts is None else prompts[b]
        for j in range(inputs.shape[1]):
            assert inputs[b, j] == full[j], f"row {b}, position {j}: input {inputs[b, j]} != {full[j]}"
            want = ignore if j >= len(s) or j < p - 1 else full[j + 1]
            assert targets[b, j] == want, f"row {b}, position {j}: target {targets[b, j]} != {want} ({s}, prompt {p})"


def test_instruction_collate_refuses_bad_input_alike():
    cases = [  # (sequences, keyword arguments, error, message)
        ([], {}, ValueError, "at least one"),
        ([[1], []], {}, ValueError, "sequence 1"),
        ([[1.5]], {}, TypeError, "sequence 0"),
        ([[1, 2]], {"prompt_lengths": [3]}, ValueError, r"prompt_lengths\[0\] = 3 is outside 0 .. 2"),
        ([[1, 2]], {"prompt_lengths": [1, 1]}, ValueError, "2 entries for 1"),
        # a value that is no int is named as such (it was "outside 0 .. 2", in range or not)
        ([[1, 2]], {"prompt_lengths": [1.0]}, TypeError, r"prompt_lengths\[0\] must be an int, got 1.0"),
        ([[1, 2]], {"prompt_lengths": [True]}, TypeError, r"prompt_lengths\[0\] must be an int, got True"),
        ([[1]], {"max_length": 0}, ValueError, "max_length"),
        ([[1]], {"pad_id": -1}, ValueError, "pad_id"),
        ([[1]], {"ignore_index": 1.5}, TypeError, "ignore_index"),
        ([[1]], {"ignore_index": 0}, ValueError, "negative"),  # it would drop every target equal to it
        # past int64: an OverflowError in numpy_ref, a RuntimeError or an unnamed ValueError in torch_impl
        ([[1, 2, 3]], {"pad_id": 2**63}, ValueError, r"pad_id must be an integer in \[0, 2\*\*63 - 1\]"),
        ([[1, 2, 3]], {"pad_id": 9, "ignore_index": -(2**70)}, ValueError, r"ignore_index must be in \[-2\*\*63, -1\]"),
        ([["a", "b"]], {}, TypeError, "position 0"),
        (["abc"], {}, TypeError, "text"),
        ([[1, None]], {}, TypeError, "position 1"),
        ([[1, True]], {}, TypeError, "position 1"),
        ([[1, 2**70]], {}, ValueError, "position 1: token id 1180591620717411303424"),
        ([[3, -1]], {}, ValueError, "position 1: token id -1"),
        ([np.array([1, 2**64 - 1], dtype=np.uint64)], {}, ValueError, "18446744073709551615"),
        ([np.array([[1, 2]])], {}, ValueError, "shape"),
        ([np.array([1.5])], {}, TypeError, "dtype"),
    ]
    for seqs, kw, error, message in cases:
        for tree in (ninst, tinst):
            with pytest.raises(error, match=message):
                tree.instruction_collate(seqs, **kw)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64, np.int8])
def test_prompt_lengths_of_any_integer_dtype_mask_as_python_ints(dtype):
    """A 0 of an unsigned dtype minus 1 wrapped to the dtype's maximum: every target of the row
    was masked (numpy_ref, and torch_impl for uint8) or torch_impl raised torch's own errors."""
    seqs = [[1, 2, 3], [4, 5, 6]]
    want = ninst.instruction_collate(seqs, prompt_lengths=[0, 2])[1]
    for tree in (ninst, tinst):
        got = np.asarray(tree.instruction_collate(seqs, prompt_lengths=np.array([0, 2], dtype=dtype))[1])
        assert np.array_equal(got, want), f"{tree.__name__}, prompt_lengths as {np.dtype(dtype)}: {got} != {want}"


@given(instruction=st.text(max_size=30), input_text=st.text(max_size=30), response=st.none() | st.text(max_size=30))
def test_format_instruction_matches_across_trees(instruction, input_text, response):
    text = ninst.format_instruction(instruction, input_text, response)
    assert tinst.format_instruction(instruction, input_text, response) == text
    input_section = f"\n\n### Input:\n{input_text}" if input_text else ""
    want = f"{ninst.PREAMBLE}\n\n### Instruction:\n{instruction}{input_section}\n\n### Response:\n{response or ''}"
    assert text == want, f"{text!r} is not the Alpaca layout {want!r}"


def test_a_collated_batch_loss_is_the_token_weighted_mean_of_its_rows_alone():
    """Padding and masked prompts reach no counted target: the batch's loss is the mean of each
    row's loss computed alone (no padding), weighted by its counted targets. Both trees."""
    cfg_d = dict(vocab_size=40, context_length=12, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.0,
                 qkv_bias=False, tie_embeddings=True)
    model = models.build_numpy_model(cfg_d, seed=2)
    t_model = models.build_torch_model(cfg_d, model.params, dtype="float64")
    seqs, prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], [2, 0, 3]
    inputs, targets = ninst.instruction_collate(seqs, pad_id=39, prompt_lengths=prompts)
    loss = float(model.forward(inputs, targets, ignore_index=-100)[1])
    t_inputs, t_targets = tinst.instruction_collate(seqs, pad_id=39, prompt_lengths=prompts)
    t_loss = t_model(t_inputs, t_targets, ignore_index=-100)[1].item()
    total, count = 0.0, 0
    for s, p in zip(seqs, prompts):
        x, y = ninst.instruction_collate([s], pad_id=39, prompt_lengths=[p])  # one row: no padding
        n = int((y != -100).sum())
        total += n * float(model.forward(x, y, ignore_index=-100)[1])
        count += n
    assert count == int((targets != -100).sum()) == 4 + 2 + 1  # row 2 counts its end-of-text only
    assert abs(loss - total / count) <= 1e-12, f"batch loss {loss!r} vs rows alone {total / count!r}"
    assert abs(t_loss - loss) <= 1e-12, f"torch_impl loss {t_loss!r} vs numpy_ref {loss!r}"
