"""`gpt-oracle finetune`: a classifier fine-tuned by either tree, saved so that the other tree
reproduces its accuracy, and every bad input refused in one line before anything is written."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from gpt_oracle.cli import main
from parity_tests.cli_checks import user_error
from gpt_oracle import fine_tuning
from gpt_oracle.commands import finetune

WORDS = "the a cat dog sat ran on under mat table house tree blue red quick slow".split()


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    """A small language model with GPT-2's vocabulary (the tokenizer's ids must fit)."""
    from numpy_ref.config import GPTConfig
    from numpy_ref.model import GPTModel

    path = tmp_path_factory.mktemp("finetune") / "lm"
    config = GPTConfig(vocab_size=50257, context_length=24, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0,
                       qkv_bias=True, tie_embeddings=True)
    GPTModel(config, seed=0).save_pretrained(path)
    return path


def _write_data(path: Path, n: int = 80, seed: int = 0) -> Path:
    """Label 1 when the text holds the word 'spam' (learnable from a random trunk)."""
    rnd = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            words = [rnd.choice(WORDS) for _ in range(rnd.randint(3, 10))]
            label = rnd.randint(0, 1)
            if label:
                words[rnd.randrange(len(words))] = "spam"
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return path


def _accuracy_in(tree: str, folder: Path, data: Path, rows: list[int]) -> float:
    """The accuracy of the saved classifier on the given examples, computed by `tree`."""
    examples = finetune.read_examples(data)
    if tree == "numpy":
        from numpy_ref.classifier import GPTClassifier
        from numpy_ref.tokenizer import get_encoding
    else:
        from torch_impl.classifier import GPTClassifier
        from torch_impl.tokenizer import get_encoding
    clf = GPTClassifier.from_pretrained(folder)
    encoding = get_encoding("gpt2")
    right = 0
    for r in rows:
        text, label = examples[r]
        ids = np.array([encoding.encode(text)[: clf.config.context_length]])
        if tree == "numpy":
            logits = clf(ids)
        else:
            import torch

            with torch.no_grad():
                logits = clf(torch.from_numpy(ids)).numpy()
        right += int(logits.argmax(axis=1)[0] == label)
    return right / len(rows)


@pytest.mark.parametrize("backend,other", [("torch", "numpy"), ("numpy", "torch")])
def test_a_fine_tuned_classifier_learns_and_the_other_tree_reproduces_its_accuracy(lm, tmp_path, capsys, backend,
                                                                                      other):
    data = _write_data(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    status = main(["finetune", "--checkpoint", str(lm), "--data", str(data), "--out", str(out), "--backend", backend,
                   "--epochs", "8", "--lr", "3e-3", "--n-last-blocks", "2", "--seed", "5"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == ["classifier", "log.jsonl", "run.json"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == list(range(1, 9))
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 0.1, f"the training loss did not fall: {log}"
    assert log[-1]["train_accuracy"] >= 0.75, f"{backend}: train accuracy {log[-1]['train_accuracy']}"
    run = json.loads((out / "run.json").read_text())
    assert run["num_classes"] == 2 and run["train_examples"] + run["val_examples"] == 80
    train, val = fine_tuning.split(80, 0.2, 5)
    for name, rows in (("train", train), ("val", val)):
        got = _accuracy_in(other, out / "classifier", data, rows)
        assert abs(got - log[-1][f"{name}_accuracy"]) <= 1 / len(rows) + 1e-9, \
            f"{other} reads {backend}'s classifier at {name} accuracy {got}, the run reported {log[-1]}"
    assert f"{log[-1]['val_accuracy']:.4f}" in captured.out


def _refused(capsys, argv: list[str], *needles: str, out: Path) -> None:
    """One line, exit 2, and nothing in --out."""
    user_error(capsys, ["finetune", *argv, "--out", str(out)], *needles)
    assert not out.exists() or not any(out.iterdir()), f"{argv} wrote into --out"


@pytest.mark.parametrize("content, needles", [
    ('{"text": "a b", "label": 0}\n{"text": "c", "label": 1', ["line 2", "not valid JSON"]),
    ('{"text": "a b", "label": 0}\n{"text": "c"}\n', ["line 2", "label"]),
    ('{"text": "a b", "label": 0}\n{"text": "c", "label": -1}\n', ["line 2", "'label' must be an integer >= 0"]),
    ('{"text": "a b", "label": 0}\n{"text": "c", "label": true}\n', ["line 2", "True"]),
    ('{"text": "a b", "label": 0}\n{"text": "c", "label": 1.0}\n', ["line 2", "1.0"]),
    ('{"text": "", "label": 0}\n{"text": "c", "label": 1}\n', ["line 1", "'text' must be a non-empty string"]),
    ('{"text": "a b", "label": 0}\n', ["1 example(s)"]),
    ('{"text": "a <|endoftext|> b", "label": 0}\n{"text": "c", "label": 1}\n', ["line 1", "special token"]),
    ('{"text": "a", "label": 0}\n{"text": "b", "label": 0}\n', ["every label is 0", "at least 2 classes"]),
    ('{"text": "a\\udc00", "label": 0}\n{"text": "b", "label": 1}\n', ["line 1", "lone surrogate"]),
    ('{"text": "a", "label": 0}\n\n{"text": "b", "label": 5}\n', ["line 3", "label 5", "label 1 is never used"]),
    ('{"text": "a", "label": 0}\n{"text": "b", "label": 1000000000}\n', ["line 2", "label 1000000000"]),
])
def test_a_bad_data_file_is_one_line_naming_the_line(lm, tmp_path, capsys, content, needles):
    data = tmp_path / "data.jsonl"
    data.write_text(content, encoding="utf-8")
    _refused(capsys, ["--checkpoint", str(lm), "--data", str(data)], str(data), *needles, out=tmp_path / "out")


def test_bad_checkpoints_and_options_are_refused_before_anything_is_written(lm, tmp_path, capsys):
    from numpy_ref.classifier import GPTClassifier
    from numpy_ref.config import get_config
    from numpy_ref.model import GPTModel

    data = _write_data(tmp_path / "data.jsonl", n=6)
    out = tmp_path / "out"
    _refused(capsys, ["--checkpoint", str(lm), "--data", str(data), "--n-last-blocks", "3"],
             "--n-last-blocks 3", "2 blocks", out=out)
    GPTModel(get_config("tiny")).save_pretrained(tmp_path / "small_vocab")
    _refused(capsys, ["--checkpoint", str(tmp_path / "small_vocab"), "--data", str(data)], "101 tokens", out=out)
    GPTClassifier(get_config("tiny"), 2).save_pretrained(tmp_path / "clf")
    _refused(capsys, ["--checkpoint", str(tmp_path / "clf"), "--data", str(data)], "classifier's checkpoint", out=out)
    _refused(capsys, ["--checkpoint", str(lm), "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl", out=out)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    status = main(["finetune", "--checkpoint", str(lm), "--data", str(data), "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and "is not empty" in err and (out / "keep.txt").read_text() == "mine", err
    for option, value in (("--val-ratio", "1"), ("--lr", "0"), ("--epochs", "0"), ("--seed", "-1")):
        status = main(["finetune", "--checkpoint", str(lm), "--data", str(data), "--out", str(tmp_path / "o2"),
                       option, value])
        assert status == 2 and option in capsys.readouterr().err


@pytest.mark.parametrize("where", ["step", "evaluate"])
def test_a_non_finite_loss_stops_with_exit_1_and_saves_nothing(lm, tmp_path, capsys, monkeypatch, where):
    """A diverged step, or weights that diverged at the last step (only the evaluation sees it)."""
    data = _write_data(tmp_path / "data.jsonl", n=6)
    if where == "step":
        monkeypatch.setattr(finetune._Torch, "step", lambda self, *batch: float("nan"))
    else:
        monkeypatch.setattr(finetune._Torch, "evaluate", lambda self, batches: {"loss": float("nan"), "accuracy": 0.5})
    status = main(["finetune", "--checkpoint", str(lm), "--data", str(data), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 1 and "loss is nan" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"], "a failed run left files beside --out"


def test_an_interrupted_save_leaves_no_out_and_a_bad_out_is_refused_before_training(lm, tmp_path, capsys,
                                                                                     monkeypatch):
    data = _write_data(tmp_path / "data.jsonl", n=6)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fine_tuning, "write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["finetune", "--checkpoint", str(lm), "--data", str(data), "--out", str(tmp_path / "out")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"], "an interrupted save left a partial --out"
    monkeypatch.undo()
    capsys.readouterr()
    trained = []
    monkeypatch.setattr(finetune, "train_epochs", lambda *a: trained.append(1) or [])
    _refused(capsys, ["--checkpoint", str(lm), "--data", str(data)], "--out", "is not a directory", out=data / "sub")
    assert not trained, "training ran before --out was found unusable"


def test_an_out_that_cannot_take_the_finished_folder_is_refused_before_training(lm, tmp_path, capsys, monkeypatch):
    """A symbolic link (to an empty folder or dangling) and "." were accepted, trained, then
    failed at the rename with a traceback and exit 1, the work lost."""
    data = _write_data(tmp_path / "data.jsonl", n=6)
    trained = []
    monkeypatch.setattr(finetune, "train_epochs", lambda *a: trained.append(1) or [])
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for out in (tmp_path / "link", tmp_path / "dangling"):
        user_error(capsys, ["finetune", "--checkpoint", str(lm), "--data", str(data), "--out", str(out)],
                   str(out), "symbolic link")
    monkeypatch.chdir(tmp_path / "empty")
    for out in (".", "..", "/"):
        user_error(capsys, ["finetune", "--checkpoint", str(lm), "--data", str(data), "--out", out],
                   f"--out {out}", "name the output folder itself")
    assert not trained, "training ran before --out was found unusable"
    assert not any((tmp_path / "empty").iterdir()) and not (tmp_path / "nowhere").exists()


def test_a_deeply_nested_json_line_is_one_line(lm, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a", "label": 0}\n' + "[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    _refused(capsys, ["--checkpoint", str(lm), "--data", str(data)], "line 2", "not valid JSON", "nested",
             out=tmp_path / "out")


def test_out_takes_the_umask_and_a_failed_run_leaves_no_parent_folders(lm, tmp_path, capsys, monkeypatch):
    """--out was the renamed tempfile.mkdtemp folder, mode 0700 whatever the umask; a failed run
    removed its folder but left the parents it had made for --out."""
    import os

    data = _write_data(tmp_path / "data.jsonl", n=6)
    old = os.umask(0o022)
    try:
        assert main(["finetune", "--checkpoint", str(lm), "--data", str(data), "--out", str(tmp_path / "ok"),
                     "--epochs", "1"]) == 0, capsys.readouterr().err
    finally:
        os.umask(old)
    mode = (tmp_path / "ok").stat().st_mode & 0o777
    assert mode == 0o755, f"--out has mode {oct(mode)} under umask 022"
    monkeypatch.setattr(finetune._Torch, "step", lambda self, *batch: float("nan"))
    assert main(["finetune", "--checkpoint", str(lm), "--data", str(data), "--out", str(tmp_path / "a" / "b" / "out")]) == 1
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "ok"], "a failed run left folders behind"


def test_json_lines_may_hold_line_separators_inside_strings_and_a_small_set_still_validates(lm, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "a\u2028b", "label": 0}, ensure_ascii=False) + "\n"
                    + json.dumps({"text": "c\x85d", "label": 1}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert finetune.read_examples(data) == [("a\u2028b", 0), ("c\x85d", 1)]
    assert fine_tuning.split(2, 0.2, 0)[1], "a ratio above 0 validates at least one example"
    assert not fine_tuning.split(5, 0.0, 0)[1] and len(fine_tuning.split(5, 0.99, 0)[0]) == 1


def test_other_commands_know_a_finetune_output_folder(lm, tmp_path, capsys):
    """train --out on a finetune output called it "a training run" and advised --resume, which then
    listed 21 missing options, and --overwrite deleted its run.json and log.jsonl beside the
    classifier; generate said "no config.json there". Each now names the finetune output, changes
    nothing, and classify reads it."""
    data = _write_data(tmp_path / "data.jsonl", n=6)
    out = tmp_path / "out"
    assert main(["finetune", "--checkpoint", str(lm), "--data", str(data), "--out", str(out), "--epochs", "1"]) == 0
    assert json.loads((out / "run.json").read_text())["command"] == "finetune"
    capsys.readouterr()
    for argv in (["train", "--out", str(out), "--config", "tiny", "--steps", "1"],
                 ["train", "--out", str(out), "--config", "tiny", "--steps", "1", "--overwrite"]):
        user_error(capsys, argv, str(out), "`gpt-oracle finetune` output", "not a training run", untouched=(out,))
    user_error(capsys, ["train", "--resume", str(out)], "`gpt-oracle finetune` output", "does not resume",
               untouched=(out,))
    user_error(capsys, ["generate", "--checkpoint", str(out), "--prompt", "a"], "`gpt-oracle finetune` output",
               f"gpt-oracle classify --classifier {out}", untouched=(out,))
    assert main(["classify", "--classifier", str(out), "--text", "the cat"]) == 0
    assert '"label"' in capsys.readouterr().out


DEEP = "[" * 100000 + "]" * 100000  # past the JSON parser's recursion limit


@pytest.mark.parametrize("record, want", [('{"command": ["finetune"]}', None), ('{"command": "train"}', None),
                                          ('{"command": null}', None), (DEEP, "instruct"), ("not json", "instruct"),
                                          ('["finetune"]', "instruct")],
                         ids=["list", "train", "null", "deep", "not-json", "array"])
def test_a_folder_with_an_odd_run_json_is_read_without_a_traceback(tmp_path, capsys, record, want):
    """{"command": ["finetune"]} (unhashable) and a run.json nested past the parser's depth ended every
    checkpoint reader in a traceback. A "command" key is taken at its word (not finetune or instruct:
    no fine-tuning output, even with a model/ folder beside it); without a readable one, the
    model/ folder says an instruct output."""
    from gpt_oracle import run_folder

    folder = tmp_path / "odd"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "config.json").write_text("{}")
    (folder / "run.json").write_text(record)
    got = run_folder.fine_tuning_output(folder)
    assert got == want, f"{record[:40]!r}: {got!r}"
    if want is None:
        user_error(capsys, ["generate", "--checkpoint", str(folder), "--prompt", "x"], "no config.json there")
        user_error(capsys, ["info", str(folder)], "no config.json there")
