"""`gpt-oracle info`: the parameter counts and memory of the book's GPT-2 sizes.

Provenance: "Build a Large Language Model (From Scratch)", chapter 4 (section 4.6, "Coding the
GPT model", and exercise 4.2 for medium/large/xl): the total parameter count of `GPTModel`
(separate output head), the count "considering weight tying" (total minus the head) and the
float32 size in MB (total * 4 bytes / 1024**2).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from gpt_oracle.commands import info
from numpy_ref.config import GPTConfig, get_config
from numpy_ref.model import GPTModel
from numpy_ref.params import parameter_report

BOOK = {
    "gpt2-small": (163_009_536, 124_412_160, "621.83"),
    "gpt2-medium": (406_212_608, 354_749_440, "1549.58"),
    "gpt2-large": (838_220_800, 773_891_840, "3197.56"),
    "gpt2-xl": (1_637_792_000, 1_557_380_800, "6247.68"),
}


def _run(capsys, *argv) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    info.add_arguments(parser)
    code = info.run(parser.parse_args(list(argv)))
    return code, capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(BOOK))
def test_book_figures(name, capsys):
    total, tied, mb = BOOK[name]
    r = parameter_report(get_config(name))
    assert (r.total, r.with_tied_head, f"{r.mb_float32:.2f}") == (total, tied, mb), (name, r)
    code, out = _run(capsys, name)
    assert code == 0, out
    for figure in (f"{total:,}", f"{tied:,}", f"{mb} MB"):
        assert figure in out, f"`gpt-oracle info {name}` does not print {figure}:\n{out}"


def test_aliases_and_json(capsys):
    code, out = _run(capsys, "124M", "--json")
    assert code == 0
    rows = json.loads(out)
    assert rows[0]["total"] == 163_009_536 and rows[0]["mb_float32"] == 621.83, rows


def test_counts_agree_with_a_built_model():
    for tie in (False, True):
        for qkv in (False, True):
            cfg = get_config("tiny", tie_embeddings=tie, qkv_bias=qkv)
            model = GPTModel(cfg)
            r = parameter_report(cfg)
            actual = sum(v.size for v in model.params.values())
            assert r.total == actual == model.num_parameters(), (tie, qkv, r.total, actual)
            assert r.embeddings + cfg.n_layers * r.per_block + 2 * cfg.emb_dim + r.head == r.total, r
            assert model.num_parameters(include_embeddings=False) == actual - model.params["wte.weight"].size \
                - model.params["wpe.weight"].size


def test_tied_config_counts_the_head_once(capsys):
    r = parameter_report(GPTConfig(tie_embeddings=True))
    assert r.total == r.with_tied_head == 124_412_160 and r.head == 0, r


def test_unknown_config_fails_with_its_name(capsys):
    parser = argparse.ArgumentParser()
    info.add_arguments(parser)
    code = info.run(parser.parse_args(["gpt2-huge"]))
    captured = capsys.readouterr()
    assert code == 2 and "gpt2-huge" in captured.err, f"exit {code}, stderr {captured.err!r}"
    assert captured.out == "", f"an error printed to stdout: {captured.out!r}"


def test_a_preset_name_is_the_preset_even_beside_a_folder_of_that_name(capsys, tmp_path, monkeypatch):
    """`info tiny` in a folder holding a run called tiny read the run (or failed on it); a
    preset's name is the preset, and the folder is read when written as a path."""
    from numpy_ref.model import GPTModel as NumpyModel

    run = tmp_path / "tiny"
    NumpyModel(get_config("tiny", n_layers=1), seed=0).save_pretrained(run)
    monkeypatch.chdir(tmp_path)
    code, out = _run(capsys, "tiny", "--json")
    assert code == 0 and json.loads(out)[0]["config"]["n_layers"] == get_config("tiny").n_layers, out
    code, out = _run(capsys, "./tiny", "--json")
    assert code == 0 and json.loads(out)[0]["config"]["n_layers"] == 1, out
    code, out = _run(capsys, str(run), "--json")
    assert code == 0 and json.loads(out)[0]["config"]["n_layers"] == 1, out


def test_a_classifier_checkpoint_is_refused_by_name(capsys, tmp_path):
    """info printed a vocabulary head that a classifier does not have; like generate, check and
    diff, it refuses the folder, naming what it is."""
    from numpy_ref.classifier import GPTClassifier

    GPTClassifier(get_config("tiny"), 2, seed=0).save_pretrained(tmp_path / "clf")
    parser = argparse.ArgumentParser()
    info.add_arguments(parser)
    code = info.run(parser.parse_args([str(tmp_path / "clf")]))
    captured = capsys.readouterr()
    assert code == 2 and "classifier's checkpoint (2 classes)" in captured.err and captured.out == "", captured


def test_console_entry_point():
    done = subprocess.run([sys.executable, "-m", "gpt_oracle", "info", "gpt2-small"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "163,009,536" in done.stdout and "124,412,160" in done.stdout and "621.83 MB" in done.stdout, done.stdout


def test_info_never_imports_torch():
    code = ("import sys, argparse; from gpt_oracle.commands import info; p = argparse.ArgumentParser(); "
            "info.add_arguments(p); info.run(p.parse_args(['--all'])); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _refused(capsys, *argv) -> str:
    parser = argparse.ArgumentParser()
    info.add_arguments(parser)
    code = info.run(parser.parse_args(list(argv)))
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured
    return captured.err


def test_a_hugging_face_layout_checkpoint_is_described_and_a_disagreeing_one_refused(capsys, tmp_path):
    """info refused a config.json without the gpt_oracle object, which generate, diff and check
    read, and described a gpt_oracle object whose n_layers the file's n_layer contradicts, which
    they refuse."""
    cfg = get_config("tiny")
    GPTModel(cfg, seed=0).save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    stored = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in stored.items() if k != "gpt_oracle"}))
    code, out = _run(capsys, str(tmp_path / "hf"))
    assert code == 0 and f"L={cfg.n_layers}" in out and f"{parameter_report(cfg).total:,}" in out, out
    path.write_text(json.dumps({**stored, "gpt_oracle": {**stored["gpt_oracle"], "n_layers": 3}}))
    assert "key 'n_layer' = 2 disagrees with gpt_oracle.n_layers = 3" in _refused(capsys, str(tmp_path / "hf"))


def test_all_takes_no_names(capsys):
    """--all NAME printed every preset and ignored NAME, even an unknown one."""
    assert "--all describes every preset; it takes no names (got no-such-config)" in _refused(
        capsys, "--all", "no-such-config")
    code, out = _run(capsys, "--all")
    assert code == 0 and out.count("Total number of parameters") >= 5, out
