"""`gpt-oracle classify`: a saved classifier's labels and probabilities, the same from either
tree and equal to the classifier's own logits, and every bad input refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpt_oracle.cli import main
from parity_tests.cli_checks import user_error

TEXTS = ["the cat sat on the mat", "spam spam", "a quick red dog ran under the table and the house", "tree"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A 3-class classifier saved as a finetune output directory would hold it (out/classifier),
    and a language model, both with GPT-2's vocabulary and a context of 6 (longer texts are cut)."""
    from numpy_ref.classifier import GPTClassifier
    from numpy_ref.config import GPTConfig
    from numpy_ref.model import GPTModel

    root = tmp_path_factory.mktemp("classify")
    config = GPTConfig(vocab_size=50257, context_length=6, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0,
                       qkv_bias=True, tie_embeddings=True)
    model = GPTModel(config, seed=1)
    clf = GPTClassifier.from_gpt(model, num_classes=3, seed=2)
    clf.params["classifier.weight"] *= 40.0  # probabilities well away from uniform
    clf.save_pretrained(root / "out" / "classifier")
    model.save_pretrained(root / "lm")
    return {"out": root / "out", "classifier": root / "out" / "classifier", "lm": root / "lm"}


def _expected(folder: Path, texts: list[str]) -> np.ndarray:
    """The classifier's own softmax, one text at a time (no padding), in float64."""
    from numpy_ref.classifier import GPTClassifier
    from numpy_ref.tokenizer import get_encoding

    clf, encoding = GPTClassifier.from_pretrained(folder), get_encoding("gpt2")
    rows = []
    for text in texts:
        logits = clf(np.array([encoding.encode(text)[: clf.config.context_length]]))[0]  # (K,)
        e = np.exp(logits - logits.max())
        rows.append(e / e.sum())
    return np.array(rows)


def _run(capsys, argv: list[str]) -> tuple[list[dict], str]:
    status = main(["classify", *argv])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return [json.loads(line) for line in captured.out.splitlines()], captured.err


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_labels_and_probabilities_are_the_classifiers_own(folders, capsys, backend):
    """Both trees print, per text, the softmax of the classifier's logits (float64 to 1e-12,
    float32 torch to 1e-5) and its argmax; batching and padding (batch size 3 over texts of
    different lengths, one cut to the context) change nothing."""
    argv = ["--classifier", str(folders["out"]), "--backend", backend, "--batch-size", "3"]
    for text in TEXTS:
        argv += ["--text", text]
    rows, _ = _run(capsys, argv)
    want = _expected(folders["classifier"], TEXTS)
    assert len(rows) == len(TEXTS), rows
    got = np.array([row["probabilities"] for row in rows])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 if backend == "numpy" else 1e-5,
                               err_msg=f"{backend} classify's probabilities vs the classifier's own softmax")
    assert [row["label"] for row in rows] == want.argmax(axis=1).tolist(), (rows, want)
    assert len(set(row["label"] for row in rows)) > 1, "the test classifier should not give one label to all"


def test_labelled_data_gives_the_accuracy_and_a_classifier_folder_is_read_directly(folders, tmp_path, capsys):
    want = _expected(folders["classifier"], TEXTS).argmax(axis=1)
    labels = [int(want[0]), int(want[1]), (int(want[2]) + 1) % 3, int(want[3])]  # three of four right
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in zip(TEXTS, labels)) + "\n\n",
                    encoding="utf-8")
    rows, err = _run(capsys, ["--classifier", str(folders["classifier"]), "--data", str(data), "--backend", "numpy"])
    assert [row["label"] for row in rows] == want.tolist(), rows
    assert err.strip() == "accuracy 0.7500 (3 of 4 labelled examples, 3 classes)", err
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS), encoding="utf-8")
    rows, err = _run(capsys, ["--classifier", str(folders["out"]), "--data", str(unlabelled), "--backend", "numpy"])
    assert [row["label"] for row in rows] == want.tolist() and err == "", (rows, err)


def test_bad_input_is_one_line(folders, tmp_path, capsys):
    out = str(folders["out"])

    def data(*lines: str) -> str:
        path = tmp_path / f"d{len(list(tmp_path.iterdir()))}.jsonl"
        path.write_text("\n".join(lines), encoding="utf-8")
        return str(path)

    user_error(capsys, ["classify", "--classifier", str(tmp_path / "none"), "--text", "a"], "does not exist")
    user_error(capsys, ["classify", "--classifier", str(tmp_path), "--text", "a"], "holds neither config.json")
    user_error(capsys, ["classify", "--classifier", str(folders["lm"]), "--text", "a"], str(folders["lm"]),
               "classifier")
    user_error(capsys, ["classify", "--classifier", out], "--text", "--data")
    user_error(capsys, ["classify", "--classifier", out, "--text", "a", "--data", "x"], "not allowed with")
    user_error(capsys, ["classify", "--classifier", out, "--text", ""], "--text #1", "non-empty")
    user_error(capsys, ["classify", "--classifier", out, "--text", "a", "--text", "x<|endoftext|>"], "--text #2",
               "special token")
    user_error(capsys, ["classify", "--classifier", out, "--text", "\ud800"], "lone surrogate")
    for lines, needles in [
        (['{"text": "a", "label": 3}'], ("line 1", "label 3", "3 classes")),
        (['{"text": "a", "label": 0}', '{"text": "b"}'], ("line 2", "every line or on none")),
        (['{"text": "a"}', '{"text": "b", "label": 1}'], ("line 2", "every line or on none")),
        (['{"text": "a", "label": -1}'], ("line 1", "integer >= 0")),
        (['{"text": "a", "label": true}'], ("line 1", "integer >= 0")),
        (['{"txt": "a"}'], ("line 1", "expected an object")),
        (['{"text": "a", "extra": 1}'], ("line 1", "expected an object")),
        (['["a"]'], ("line 1", "expected an object")),
        (['{"text": 5}'], ("line 1", "non-empty string")),
        (["{"], ("line 1", "not valid JSON")),
        (["", "  "], ("holds no example",)),
    ]:
        user_error(capsys, ["classify", "--classifier", out, "--data", data(*lines)], *needles)
    user_error(capsys, ["classify", "--classifier", out, "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl")
    user_error(capsys, ["classify", "--classifier", out, "--text", "a", "--batch-size", "0"], "--batch-size")
