"""`gpt-oracle instruct`: instruction fine-tuning (chapter 7) with either tree; the saved model is
a language-model checkpoint the other tree and `generate` read; bad input is one line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from gpt_oracle.cli import main
from parity_tests.cli_checks import user_error
from gpt_oracle.commands import instruct

COLOURS = ["red", "blue", "green", "yellow"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    """A small language model with GPT-2's vocabulary and room for the Alpaca prompt (~40 tokens)."""
    from numpy_ref.config import GPTConfig
    from numpy_ref.model import GPTModel

    path = tmp_path_factory.mktemp("instruct") / "lm"
    config = GPTConfig(vocab_size=50257, context_length=64, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0,
                       qkv_bias=True, tie_embeddings=True)
    GPTModel(config, seed=0).save_pretrained(path)
    return path


def _write_data(path: Path, n: int = 24) -> Path:
    rnd = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            colour = rnd.choice(COLOURS)
            record = {"instruction": f"Repeat the colour {colour}.", "output": f"{colour} {colour}"}
            if i % 2:
                record["input"] = ""
            f.write(json.dumps(record) + "\n")
    return path


@pytest.mark.parametrize("backend,other", [("torch", "numpy"), ("numpy", "torch")])
def test_instruction_tuning_lowers_the_loss_and_saves_a_model_both_trees_read(lm, tmp_path, capsys, backend, other):
    data = _write_data(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    status = main(["instruct", "--checkpoint", str(lm), "--data", str(data), "--out", str(out), "--backend", backend,
                   "--epochs", "3", "--lr", "3e-3", "--max-new-tokens", "4", "--seed", "1"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl", "model", "run.json"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2, 3] and log[-1]["train_loss"] < log[0]["train_loss"] - 0.2, log
    assert "answer:" in captured.out and "instruction (line" in captured.out, captured.out
    if other == "numpy":
        from numpy_ref.model import GPTModel
    else:
        from torch_impl.model import GPTModel
    model = GPTModel.from_pretrained(out / "model")
    assert model.config.context_length == 64
    assert main(["generate", "--checkpoint", str(out / "model"), "--prompt", "Repeat", "--max-new-tokens", "2",
                 "--backend", other]) == 0
    assert json.loads((out / "run.json").read_text())["command"] == "instruct"
    # The output folder itself is a checkpoint folder to every reader (its model/), as the README says:
    capsys.readouterr()
    answers = []
    for folder in (out / "model", out):
        assert main(["generate", "--checkpoint", str(folder), "--instruction", "Repeat the colour red.",
                     "--max-new-tokens", "3", "--backend", other]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0].endswith("\n"), answers
    user_error(capsys, ["train", "--out", str(out), "--config", "tiny", "--steps", "1", "--overwrite"],
               "`gpt-oracle instruct` output", "not a training run", untouched=(out,))


def test_mask_prompt_counts_the_response_only(lm, tmp_path, capsys):
    """With --mask-prompt the loss averages over the response and its end-of-text: a different
    (higher, on an untrained model the prompt's boilerplate is as hard) first-epoch loss."""
    data = _write_data(tmp_path / "data.jsonl", n=6)
    losses = {}
    for flag in ([], ["--mask-prompt"]):
        out = tmp_path / f"out{len(flag)}"
        assert main(["instruct", "--checkpoint", str(lm), "--data", str(data), "--out", str(out), "--epochs", "1",
                     "--max-new-tokens", "0", *flag]) == 0
        losses[bool(flag)] = json.loads((out / "log.jsonl").read_text().splitlines()[0])["train_loss"]
        assert json.loads((out / "run.json").read_text())["mask_prompt"] is bool(flag)
    assert losses[True] != losses[False], losses
    capsys.readouterr()


def _refused(capsys, argv: list[str], *needles: str, out: Path) -> None:
    """One line, exit 2, and nothing in --out."""
    user_error(capsys, ["instruct", *argv, "--out", str(out)], *needles)
    assert not out.exists(), f"{argv} wrote --out"


@pytest.mark.parametrize("content, needles", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c"', ["line 2", "not valid JSON"]),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', ["line 2", "expected an object"]),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d", "extra": 1}\n', ["line 2", "extra"]),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "input": 3, "output": "d"}\n', ["line 2", "'input'"]),
    ('{"instruction": "a", "output": "b"}\n{"instruction": " ", "output": "d"}\n', ["line 2", "empty or blank"]),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c\\ud800", "output": "d"}\n', ["line 2", "lone surrogate"]),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "<|endoftext|>"}\n', ["line 2", "special"]),
    ('{"instruction": "a", "output": "b"}\n', ["1 record(s)"]),
])
def test_a_bad_data_file_is_one_line_naming_the_line(lm, tmp_path, capsys, content, needles):
    data = tmp_path / "data.jsonl"
    data.write_text(content, encoding="utf-8")
    _refused(capsys, ["--checkpoint", str(lm), "--data", str(data)], str(data), *needles, out=tmp_path / "out")


def test_bad_checkpoints_and_a_prompt_past_the_context_are_refused(lm, tmp_path, capsys):
    from numpy_ref.config import get_config
    from numpy_ref.model import GPTModel

    data = _write_data(tmp_path / "data.jsonl", n=4)
    GPTModel(get_config("tiny")).save_pretrained(tmp_path / "small_vocab")
    _refused(capsys, ["--checkpoint", str(tmp_path / "small_vocab"), "--data", str(data)], "101 tokens",
             out=tmp_path / "out")
    from numpy_ref.config import GPTConfig

    short = GPTConfig(vocab_size=50257, context_length=16, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.0,
                      qkv_bias=False, tie_embeddings=True)
    GPTModel(short).save_pretrained(tmp_path / "short")
    for flag in ([], ["--mask-prompt"]):  # the prompt alone fills the context: refused with or without the mask
        _refused(capsys, ["--checkpoint", str(tmp_path / "short"), "--data", str(data), *flag],
                 "line 1: the prompt takes", "the context holds 16", out=tmp_path / "new" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "short", "small_vocab"], \
        "a refused run left folders behind"


def test_a_prompt_as_long_as_the_context_still_trains_its_first_response_token(tmp_path, capsys):
    """Inputs of Tc positions predict tokens 1 .. Tc: a prompt of exactly Tc tokens leaves the
    first response token as the target at position Tc - 1. It was refused as training nothing."""
    from numpy_ref.config import GPTConfig
    from numpy_ref.instruction_data import format_instruction
    from numpy_ref.model import GPTModel
    from numpy_ref.tokenizer import get_encoding

    record = {"instruction": "Say red.", "output": "red"}
    n_prompt = len(get_encoding("gpt2").encode(format_instruction(record["instruction"], "")))
    data = tmp_path / "data.jsonl"
    data.write_text((json.dumps(record) + "\n") * 2, encoding="utf-8")
    for Tc in (n_prompt, n_prompt - 1):
        GPTModel(GPTConfig(vocab_size=50257, context_length=Tc, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.0),
                 seed=0).save_pretrained(tmp_path / f"lm{Tc}")
    args = ["instruct", "--checkpoint", str(tmp_path / f"lm{n_prompt}"), "--data", str(data), "--epochs", "1",
            "--mask-prompt", "--max-new-tokens", "0", "--out", str(tmp_path / "out")]
    status = main(args)
    assert status == 0, f"a {n_prompt}-token prompt in a context of {n_prompt}: {capsys.readouterr().err}"
    capsys.readouterr()  # the run's epoch line
    _refused(capsys, ["--checkpoint", str(tmp_path / f"lm{n_prompt - 1}"), "--data", str(data), "--mask-prompt"],
             f"the prompt takes {n_prompt} tokens", f"the context holds {n_prompt - 1}", out=tmp_path / "out2")


def test_an_empty_output_is_an_example_of_stopping(lm, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "Say nothing.", "output": ""}\n{"instruction": "Say a.", "output": "a"}\n',
                    encoding="utf-8")
    assert main(["instruct", "--checkpoint", str(lm), "--data", str(data), "--out", str(tmp_path / "out"),
                 "--epochs", "1", "--max-new-tokens", "0"]) == 0, capsys.readouterr().err


def test_a_non_finite_loss_stops_with_exit_1_and_saves_nothing(lm, tmp_path, capsys, monkeypatch):
    data = _write_data(tmp_path / "data.jsonl", n=4)
    monkeypatch.setattr(instruct._Torch, "step", lambda self, *batch: float("nan"))
    assert main(["instruct", "--checkpoint", str(lm), "--data", str(data), "--out", str(tmp_path / "out")]) == 1
    assert "the loss is nan" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_generate_answers_an_instruction_with_the_response_only(lm, capsys, backend):
    """`generate --instruction --input` prompts with format_instruction's Alpaca text (the response
    empty) and prints only what follows it: the oracle's own greedy tokens after the prompt."""
    import numpy as np

    from numpy_ref.generate import generate
    from numpy_ref.instruction_data import format_instruction
    from numpy_ref.model import GPTModel
    from numpy_ref.tokenizer import get_encoding

    encoding = get_encoding("gpt2")
    prompt = encoding.encode(format_instruction("Repeat the colour red.", "twice"))
    new = generate(GPTModel.from_pretrained(lm), np.array([prompt]), 6)[0, len(prompt):].tolist()
    want = encoding.decode(new[: new.index(instruct.EOT)] if instruct.EOT in new else new)  # up to the stop token
    status = main(["generate", "--checkpoint", str(lm), "--instruction", "Repeat the colour red.", "--input", "twice",
                   "--max-new-tokens", "6", "--backend", backend, "--dtype", "float64"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert captured.out == want + "\n", (captured.out, want)
    assert "### Response" not in captured.out and "Repeat the colour" not in captured.out, captured.out


def test_generate_refuses_a_bad_instruction_in_one_line(lm, capsys):
    base = ["generate", "--checkpoint", str(lm)]
    user_error(capsys, [*base, "--prompt", "x", "--input", "y"], "--input", "--instruction")
    user_error(capsys, [*base, "--instruction", "  "], "--instruction", "some text")
    user_error(capsys, [*base, "--instruction", "a", "--input", "b<|endoftext|>"], "--input", "special token")
    user_error(capsys, [*base, "--instruction", "a<|endoftext|>"], "--instruction", "special token")
    user_error(capsys, [*base, "--instruction", "a", "--prompt", "b"], "not allowed with")
    user_error(capsys, base, "--prompt", "--instruction")
