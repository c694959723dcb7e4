"""A save interrupted just after a file-system call has taken effect, in both trees.

Python runs a signal handler, and so raises KeyboardInterrupt, between two bytecodes: right
after `os.replace` has renamed a file and before the line that follows it runs. DiskFaults
(checkpoint_cases.py) makes a call raise instead of running; here the call runs, then the
exception arrives. For every rename and unlink of a save, in turn, the save must raise and
leave the directory byte for byte as it was (the previous checkpoint, no hidden old copy, no
journal), or, once it has committed, the new checkpoint. Three starting points: a checkpoint of
two files, a sharded one (no model.safetensors: the new one replaces nothing, and must not be
left to shadow the old index), and no directory at all. Then: a directory a save creates is
fsynced into its parent, so a save that returned cannot vanish in a power cut.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import numpy_ref.checkpoint as nck
import numpy_ref.safetensors_io as nio
import torch_impl.checkpoint as tck
from parity_tests import checkpoint_cases as cc

from parity_tests.checkpoint_cases import NEW_CFG, NEW_PARAMS, NEW_STATE, OLD_CFG, OLD_PARAMS, OLD_STATE  # noqa: E402

_save = cc.save_version


def _shard(d: Path) -> None:
    """model.safetensors moved into one shard listed by model.safetensors.index.json, as
    transformers' save_pretrained writes a checkpoint past its max_shard_size."""
    tensors, metadata = nio.read_safetensors(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    nio.write_safetensors(d / "model-00001-of-00001.safetensors", tensors, metadata)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": dict.fromkeys(tensors, "model-00001-of-00001.safetensors")}))


def _loads_as(kind: str, d: Path) -> str:
    """'old' or 'new' as both trees load `d` (they must agree); anything else fails the test."""
    seen = {}
    for tree, module in (("numpy_ref", nck), ("torch_impl", tck)):
        if kind == "model":
            config, params = module.load_checkpoint(d) if tree == "numpy_ref" else \
                module.load_checkpoint(d, dtype=torch.float64)
            head, arrays = config.to_dict(), {k: np.asarray(v) for k, v in params.items()}
            versions = {"old": (OLD_CFG, OLD_PARAMS), "new": (NEW_CFG, NEW_PARAMS)}
        else:
            state, tensors = module.load_trainer_state(d)
            head, arrays = state, {k: np.asarray(v) for k, v in tensors.items()}
            versions = {"old": OLD_STATE, "new": NEW_STATE}
        by_head = [name for name, (h, _) in versions.items() if h == head]
        by_arrays = [name for name, (_, a) in versions.items()
                     if set(a) == set(arrays) and all(np.array_equal(a[k], arrays[k]) for k in a)]
        assert by_head and by_head == by_arrays, \
            f"{tree} loads {d} as a mix: the config or state of {by_head}, the arrays of {by_arrays}"
        seen[tree] = by_head[0]
    assert seen["numpy_ref"] == seen["torch_impl"], f"the trees disagree on {d}: {seen}"
    return seen["numpy_ref"]


class InterruptAfter:
    """Wraps os.replace and os.unlink (Path.unlink calls it too): call number `at` does its work,
    then raises KeyboardInterrupt, as a Ctrl-C handled just after the system call returns."""

    def __init__(self, at: int):
        self.at, self.calls = at, []
        self.interrupted: str | None = None  # the call the interrupt came after

    def install(self, monkeypatch) -> None:
        for name in ("replace", "unlink"):
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))

    def _wrap(self, name, real):
        def call(*args, **kwargs):
            result = real(*args, **kwargs)
            self.calls.append(f"{name} " + " -> ".join(Path(a).name for a in args))
            if len(self.calls) == self.at:
                self.interrupted = self.calls[-1]
                raise KeyboardInterrupt(f"after call {self.at}: {self.interrupted}")
            return result
        return call


@pytest.mark.parametrize("tree", ["numpy_ref", "torch_impl"])
@pytest.mark.parametrize("kind,start", [("model", "two files"), ("model", "sharded"), ("model", "no directory"),
                                        ("trainer", "two files")])
def test_an_interrupt_just_after_any_rename_or_unlink_leaves_the_old_checkpoint_or_the_new(
        tree, kind, start, tmp_path, monkeypatch):
    k, renames_seen = 0, 0
    while True:
        k += 1
        d = tmp_path / f"k{k}" / "ckpt"
        if start != "no directory":
            _save(tree, kind, d, "old")
            if start == "sharded":
                _shard(d)
                assert _loads_as(kind, d) == "old", "the sharded copy of the old checkpoint does not load as old"
        before = cc.photograph(d)
        fault = InterruptAfter(k)
        with monkeypatch.context() as m:
            fault.install(m)
            try:
                _save(tree, kind, d, "new")
                interrupted = False
            except KeyboardInterrupt:
                interrupted = True
        if not interrupted:  # the save made fewer than k calls: each has been interrupted once
            assert len(fault.calls) < k, f"{tree}: the interrupt after call {k} was swallowed: {fault.calls}"
            break
        where = f"{tree} {kind} ({start}), interrupted after call {k} ({fault.interrupted})"
        renames_seen += fault.interrupted.startswith("replace")
        after = cc.photograph(d)
        if after == before:
            continue  # byte for byte the old directory (or still none): no hidden copy, no journal
        assert not fault.interrupted.startswith("replace"), \
            f"{where}: every rename comes before the commit, yet the directory changed: {sorted(before or {})} -> " \
            f"{sorted(after or {})}"
        # Past the commit: the new checkpoint, whose old copies the next save may remove.
        assert _loads_as(kind, d) == "new", f"{where}: the directory changed but does not load as new"
        journals = sorted(n for n in after if n.endswith(".saving.json"))
        assert not journals, f"{where}: a committed save left its journal {journals}"
    # the journal's rename, each old file's aside (none in a new directory; config.json's only in
    # the sharded one) and each new file's into place
    assert renames_seen == {"two files": 5, "sharded": 4, "no directory": 3}[start], \
        f"{tree} {kind} ({start}): only {renames_seen} renames were interrupted; the wrapper is not in the path"


@pytest.mark.parametrize("tree", ["numpy_ref", "torch_impl"])
def test_the_put_back_is_right_whichever_renames_took_effect(tree, tmp_path):
    """The two windows the review found, directly: (a) the old weights renamed aside, then the
    interrupt: they must come back (they used to stay hidden, and the next save deleted them);
    (b) new weights renamed into a sharded checkpoint's empty place, then the interrupt: they
    must go (they used to stay, loading as the new weights with the old config.json)."""
    import importlib

    cf = importlib.import_module(f"{tree}.checkpoint_files")
    for start, window in (("two files", lambda src, dst: dst.endswith(".old")),
                          ("sharded", lambda src, dst: Path(dst).name == "model.safetensors")):
        d = tmp_path / start.replace(" ", "-")
        _save(tree, "model", d, "old")
        if start == "sharded":
            _shard(d)
        before = cc.photograph(d)
        real = os.replace

        def replace(src, dst):
            real(src, dst)
            if window(str(src), str(dst)):
                raise KeyboardInterrupt(f"after {Path(src).name} -> {Path(dst).name}")

        with pytest.MonkeyPatch.context() as m:
            m.setattr(cf.os, "replace", replace)
            with pytest.raises(KeyboardInterrupt):
                _save(tree, "model", d, "new")
        after = cc.photograph(d)
        changed = sorted(n for n in set(before) | set(after) if before.get(n) != after.get(n))
        assert not changed, f"{tree} ({start}): the interrupted save changed {changed}"
        assert _loads_as("model", d) == "old", f"{tree} ({start}): does not load as the old checkpoint"


@pytest.mark.parametrize("tree", ["numpy_ref", "torch_impl"])
def test_a_new_checkpoint_directory_is_made_durable_in_its_parent(tree, tmp_path, monkeypatch):
    """A directory's name is an entry of its parent: until the parent is fsynced, a power cut
    can lose a directory made by a save that returned. Every directory a save creates (here
    three levels) has its parent fsynced before the save commits."""
    import importlib

    cf = importlib.import_module(f"{tree}.checkpoint_files")
    events = []
    real_fsync, real_unlink = cf.fsync_directory, os.unlink
    monkeypatch.setattr(cf, "fsync_directory", lambda directory: (events.append(("fsync", Path(directory))),
                                                                  real_fsync(directory)))
    monkeypatch.setattr(os, "unlink", lambda path, *a, **k: (events.append(("unlink", Path(path).name)),
                                                             real_unlink(path, *a, **k)))
    d = tmp_path / "run" / "step-1" / "ckpt"
    _save(tree, "model", d, "new")
    commit = events.index(("unlink", "checkpoint.saving.json"))
    synced = {p for what, p in events[:commit] if what == "fsync"}
    missing = [str(p) for p in (tmp_path, tmp_path / "run", tmp_path / "run" / "step-1") if p not in synced]
    assert not missing, f"{tree}: directories not fsynced after the save created a directory in them: {missing}"
