"""The data pipeline in both trees: the book's numbers, identical batches, the split, bad settings."""

from __future__ import annotations

import random
from decimal import Decimal

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from numpy_ref import data as np_data
from parity_tests.compare import assert_close, to_numpy
from parity_tests.strategies import seeds
from parity_tests.tolerances import Tol
from torch_impl import data as pt_data

TREES = [np_data, pt_data]
TREE_IDS = ["numpy_ref", "torch_impl"]
EXACT = Tol(0.0, 0.0, "token ids are integers: equal or wrong")


def assert_same_batches(what: str, np_batches, pt_batches) -> None:
    """Batch lists equal element for element (ids are integers: exact), naming the batch and tensor."""
    assert len(np_batches) == len(pt_batches), f"{what}: {len(np_batches)} batches in numpy_ref vs {len(pt_batches)} in torch_impl"
    for b, ((x_np, y_np), (x_pt, y_pt)) in enumerate(zip(np_batches, pt_batches)):
        for name, a, t in (("inputs", x_np, x_pt), ("targets", y_np, y_pt)):
            assert isinstance(t, torch.Tensor) and t.dtype == torch.int64, f"{what}: torch {name} is {type(t)} {getattr(t, 'dtype', None)}"
            assert a.dtype == np.int64, f"{what}: numpy {name} dtype {a.dtype}"
            assert_close(f"{what} batch {b} {name} (torch_impl vs numpy_ref)", t, a, EXACT)


# ---- the book's numbers --------------------------------------------------------------------

@pytest.mark.parametrize("tree", TREES, ids=TREE_IDS)
def test_the_verdict_has_the_books_size(tree):
    # Book section 2.2 ("Total number of character: 20479") and 2.6 (5,145 tokens after BPE).
    text = tree.load_verdict()
    assert len(text) == 20479, f"{len(text)} characters"
    loader = tree.create_dataloader(text, batch_size=1, max_length=1, stride=1, shuffle=False)
    assert len(loader.dataset) == 5144, f"{len(loader.dataset) + 1} tokens, the book has 5,145"


@pytest.mark.parametrize("tree", TREES, ids=TREE_IDS)
def test_first_batches_as_in_the_book(tree):
    # Book section 2.6: create_dataloader_v1(raw_text, batch_size=1, max_length=4, stride=1, shuffle=False).
    loader = tree.create_dataloader(tree.load_verdict(), batch_size=1, max_length=4, stride=1, shuffle=False)
    batches = iter(loader)
    x, y = (to_numpy(a).tolist() for a in next(batches))
    assert (x, y) == ([[40, 367, 2885, 1464]], [[367, 2885, 1464, 1807]]), (x, y)
    x, y = (to_numpy(a).tolist() for a in next(batches))
    assert (x, y) == ([[367, 2885, 1464, 1807]], [[2885, 1464, 1807, 3619]]), (x, y)
    # The same section, batch_size=8, max_length=4, stride=4: the first batch's inputs.
    loader = tree.create_dataloader(tree.load_verdict(), batch_size=8, max_length=4, stride=4, shuffle=False)
    x, y = (to_numpy(a) for a in next(iter(loader)))
    assert x.tolist() == [[40, 367, 2885, 1464], [1807, 3619, 402, 271], [10899, 2138, 257, 7026], [15632, 438, 2016, 257],
                          [922, 5891, 1576, 438], [568, 340, 373, 645], [1049, 5975, 284, 502], [284, 3285, 326, 11]], x.tolist()
    assert np.array_equal(y[:, :-1], x[:, 1:]), "targets are not the inputs shifted by one"


@pytest.mark.parametrize("tree", TREES, ids=TREE_IDS)
def test_train_val_split_as_in_chapter_5(tree):
    # Book section 5.1.3: train_ratio 0.90, context 256, stride 256, batch 2 ->
    # 9 training batches (4,608 tokens) and 1 validation batch (512 tokens).
    train_text, val_text = tree.split_train_val(tree.load_verdict(), 0.9)
    train = tree.create_dataloader(train_text, batch_size=2, max_length=256, stride=256, shuffle=True, drop_last=True, seed=123)
    val = tree.create_dataloader(val_text, batch_size=2, max_length=256, stride=256, shuffle=False, drop_last=False)
    n_train = sum(x.numel() if isinstance(x, torch.Tensor) else x.size for x, _ in train)
    n_val = sum(x.numel() if isinstance(x, torch.Tensor) else x.size for x, _ in val)
    assert (len(train), len(val), n_train, n_val) == (9, 1, 4608, 512), (len(train), len(val), n_train, n_val)


# ---- the two trees agree -------------------------------------------------------------------

@settings(max_examples=20)
@given(n_ids=st.integers(2, 60), max_length=st.integers(1, 12), stride=st.integers(1, 14), batch_size=st.integers(1, 7),
       shuffle=st.booleans(), drop_last=st.booleans(), seed=seeds(), data=st.data())
def test_identical_batches_across_trees_and_windows_are_right(n_ids, max_length, stride, batch_size, shuffle, drop_last, seed, data):
    max_length = min(max_length, n_ids - 1)
    ids = data.draw(st.lists(st.integers(0, 50256), min_size=n_ids, max_size=n_ids), label="ids")
    ds_np = np_data.SlidingWindowDataset(ids, max_length, stride)
    ds_pt = pt_data.SlidingWindowDataset(ids, max_length, stride)
    starts = list(range(0, n_ids - max_length, stride))
    assert len(ds_np) == len(ds_pt) == len(starts), f"{len(ds_np)}, {len(ds_pt)} windows, expected {len(starts)}"
    for i, s in enumerate(starts):  # the definition, window by window
        x, y = ds_np[i]
        assert x.tolist() == ids[s : s + max_length] and y.tolist() == ids[s + 1 : s + max_length + 1], f"window {i} at {s}"
    if drop_last and len(starts) < batch_size:
        for tree in TREES:
            with pytest.raises(ValueError, match=f"batch_size={batch_size}"):
                tree.DataLoader(ds_np if tree is np_data else ds_pt, batch_size, drop_last=True)
        return
    loader_np = np_data.DataLoader(ds_np, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)
    loader_pt = pt_data.DataLoader(ds_pt, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)
    epochs = []
    for epoch in range(2):
        batches_np, batches_pt = list(loader_np), list(loader_pt)
        assert_same_batches(f"epoch {epoch}", batches_np, batches_pt)
        assert len(batches_np) == len(loader_np), f"len(loader) {len(loader_np)} but {len(batches_np)} batches"
        seen = [tuple(row) for x, _ in batches_np for row in x.tolist()]
        expected_rows = sorted(tuple(ids[s : s + max_length]) for s in starts)
        if drop_last:
            assert len(seen) == len(starts) - len(starts) % batch_size, f"{len(seen)} windows seen with drop_last"
        else:
            assert sorted(seen) == expected_rows, "an epoch must visit every window exactly once"
        epochs.append(seen)
    # The order is the documented one: random.Random(seed).shuffle(list(range(n))), twice.
    rng = random.Random(seed)
    for epoch, seen in enumerate(epochs):
        order = list(range(len(starts)))
        if shuffle:
            rng.shuffle(order)
        expected = [tuple(ids[starts[i] : starts[i] + max_length]) for i in order][: len(seen)]
        assert seen == expected, f"epoch {epoch}: window order is not random.Random({seed}).shuffle"


@given(text=st.text(max_size=200), ratio=st.floats(0.01, 0.99))
def test_split_by_ratio_in_both_trees(text, ratio):
    train_np, val_np = np_data.split_train_val(text, ratio)
    assert (train_np, val_np) == pt_data.split_train_val(text, ratio), "the trees split differently"
    assert train_np + val_np == text and len(train_np) == int(ratio * len(text)), (len(train_np), ratio, len(text))


# ---- bad settings --------------------------------------------------------------------------

@pytest.mark.parametrize("tree", TREES, ids=TREE_IDS)
def test_bad_settings_raise_naming_the_value(tree):
    ids = list(range(10))
    with pytest.raises(ValueError, match="max_length must be >= 1, got 0"):
        tree.SlidingWindowDataset(ids, 0, 1)
    with pytest.raises(ValueError, match="stride must be >= 1, got -2"):
        tree.SlidingWindowDataset(ids, 4, -2)
    with pytest.raises(TypeError, match="max_length must be an int, got float"):
        tree.SlidingWindowDataset(ids, 4.0, 1)
    with pytest.raises(ValueError, match=r"10 tokens are too few for max_length=10.*11"):
        tree.SlidingWindowDataset(ids, 10, 1)
    exact = tree.SlidingWindowDataset(ids, 9, 1)  # exactly max_length + 1 ids: one window
    assert len(exact) == 1 and to_numpy(exact[0][1]).tolist() == ids[1:], f"{len(exact)} windows"
    with pytest.raises(ValueError, match="shape"):
        tree.SlidingWindowDataset([[1, 2], [3, 4]], 1, 1)
    with pytest.raises(TypeError, match="float"):
        tree.SlidingWindowDataset([0.5] * 10, 2, 1)
    with pytest.raises(ValueError, match="too few"):
        tree.create_dataloader("Hi", max_length=4, stride=1)
    dataset = tree.SlidingWindowDataset(ids, 4, 1)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        tree.DataLoader(dataset, 0)
    with pytest.raises(ValueError, match="batch_size=7.*6 windows"):
        tree.DataLoader(dataset, 7, drop_last=True)
    with pytest.raises(ValueError, match="rng"):
        tree.make_batches(dataset, 2, shuffle=True, rng=None)
    for ratio in (0.0, 1.0, 1.5, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"train_ratio must be in \\(0, 1\\), got {ratio}"):
            tree.split_train_val("some text", ratio)
    for ratio in ("0.5", None):  # the comparison's own TypeError would not name train_ratio
        with pytest.raises(TypeError, match="train_ratio must be a number"):
            tree.split_train_val("some text", ratio)


@pytest.mark.parametrize("tree", TREES, ids=TREE_IDS)
def test_make_batches_refuses_drop_last_with_too_few_windows(tree):
    # design.md: drop_last with fewer windows than batch_size is a ValueError; make_batches used
    # to return an empty epoch (no batches, no error) where DataLoader raised.
    dataset = tree.SlidingWindowDataset(list(range(10)), 4, 1)  # 6 windows
    with pytest.raises(ValueError, match="batch_size=7.*6 windows"):
        tree.make_batches(dataset, 7, drop_last=True)
    assert [len(x) for x, _ in tree.make_batches(dataset, 7)] == [6]
    assert [len(x) for x, _ in tree.make_batches(dataset, 6, drop_last=True)] == [6]


@pytest.mark.parametrize("tree", TREES, ids=TREE_IDS)
def test_seed_must_be_an_int(tree):
    # random.Random(None) seeds from the operating system: two loaders made alike shuffled differently.
    dataset = tree.SlidingWindowDataset(list(range(41)), 4, 4)
    for seed in (None, "3", 1.5, True):
        with pytest.raises(TypeError, match="seed must be an int"):
            tree.DataLoader(dataset, 2, shuffle=True, seed=seed)
    with pytest.raises(TypeError, match="seed must be an int"):
        tree.create_dataloader("Hello world " * 20, max_length=4, stride=4, seed=None)
    orders = [[to_numpy(x).tolist() for x, _ in tree.DataLoader(dataset, 2, shuffle=True, seed=s)]
              for s in (np.int64(3), 3)]
    assert orders[0] == orders[1], "a NumPy integer seed must shuffle as the same int does"


@pytest.mark.parametrize("tree", TREES, ids=TREE_IDS)
def test_uint64_ids_past_int64_are_refused_not_wrapped(tree):
    ids = np.array([5, 2**63 + 7, 6], dtype=np.uint64)
    with pytest.raises(ValueError, match=f"id {2**63 + 7} at position 1 does not fit in int64"):
        tree.SlidingWindowDataset(ids if tree is np_data else torch.from_numpy(ids), 1, 1)
    small = np.array([5, 2**63 - 1, 6], dtype=np.uint64)  # the largest int64 is still an id
    dataset = tree.SlidingWindowDataset(small if tree is np_data else torch.from_numpy(small), 1, 1)
    assert to_numpy(dataset.inputs).ravel().tolist() == [5, 2**63 - 1]


@pytest.mark.parametrize("ids, position", [([1, 2**63, 3], 1), ((5, 6, 2**64), 2), ([-(2**63) - 1, 1, 2], 0),
                                          ([np.uint64(2**63), 1, 2], 0)], ids=["2**63", "tuple 2**64", "below", "np"])
def test_listed_ids_past_int64_are_named_with_their_position_in_both_trees(ids, position):
    """A list holding 2**63 became a float64 array in numpy_ref ("ids must be integers, got dtype
    float64") and an overflow naming nothing in torch_impl: both now name the id and its position."""
    messages = []
    for tree in TREES:
        with pytest.raises(ValueError, match=f"id {int(ids[position])} at position {position} does not fit in int64"
                           ) as err:
            tree.SlidingWindowDataset(ids, 1, 1)
        messages.append(str(err.value))
    assert messages[0] == messages[1], f"numpy_ref says {messages[0]!r}, torch_impl {messages[1]!r}"
    for tree in TREES:  # the largest and smallest int64 are still ids
        dataset = tree.SlidingWindowDataset([2**63 - 1, -(2**63), 3], 1, 1)
        assert to_numpy(dataset.inputs).ravel().tolist() == [2**63 - 1, -(2**63)], f"{tree.__name__}"
        with pytest.raises(TypeError, match="ids must be integers, got str 'a' at position 1"):
            tree.SlidingWindowDataset([1, "a", 2], 1, 1)


@pytest.mark.parametrize("tree", TREES, ids=TREE_IDS)
def test_stride_and_batch_size_past_any_length(tree):
    # Any stride >= n_ids - max_length gives the one window at 0; any batch_size >= the windows one
    # batch. Beyond int64 they used to fail inside arange / unfold / split without naming the setting.
    ids = list(range(10))
    for stride in (7, 10, 2**40, 2**70):
        dataset = tree.SlidingWindowDataset(ids, 3, stride)
        assert len(dataset) == 1 and to_numpy(dataset[0][0]).tolist() == [0, 1, 2], f"stride {stride}"
        assert dataset.stride == stride
    dataset = tree.SlidingWindowDataset(ids, 3, 1)  # 7 windows
    for batch_size in (7, 2**40, 2**70):
        assert [len(x) for x, _ in tree.make_batches(dataset, batch_size)] == [7], f"batch_size {batch_size}"
        assert len(tree.DataLoader(dataset, batch_size)) == 1
    with pytest.raises(ValueError, match=f"batch_size={2**70}.*7 windows"):
        tree.DataLoader(dataset, 2**70, drop_last=True)


@pytest.mark.parametrize("tree", TREES, ids=TREE_IDS)
def test_loader_counts_the_epochs_it_has_drawn(tree):
    # BatchStream (train_run.py) refuses a loader whose shuffles no longer start at epoch 0.
    loader = tree.DataLoader(tree.SlidingWindowDataset(list(range(41)), 4, 4), 2, shuffle=True, seed=1)
    assert loader.epochs_drawn == 0 and len(loader) == 5  # len() draws nothing
    list(loader), list(loader)
    assert loader.epochs_drawn == 2


def test_the_verdict_is_hash_checked_in_both_trees_against_its_provenance(monkeypatch):
    """Each tree checks the packaged corpus against its own copy of the hash the data README
    lists (only the ranks file was checked: design.md said both were)."""
    import re as _re
    from pathlib import Path

    import numpy_ref.data as ndata
    import torch_impl.data as tdata

    readme = (Path(ndata.__file__).parents[1] / "gpt_oracle" / "data" / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| the-verdict.txt"))
    listed = _re.findall(r"\b[0-9a-f]{64}\b", row)
    assert listed == [ndata.VERDICT_SHA256] == [tdata.VERDICT_SHA256], (listed, ndata.VERDICT_SHA256, tdata.VERDICT_SHA256)
    for tree in (ndata, tdata):
        assert len(tree.load_verdict()) == 20479
        monkeypatch.setattr(tree, "VERDICT_SHA256", "0" * 64)
        with pytest.raises(ValueError, match=f"the packaged the-verdict.txt has sha256 {listed[0]}, expected 0+"):
            tree.load_verdict()


@pytest.mark.parametrize("ids, error, message", [
    ("some text, not ids", TypeError, r"ids must be a 1-D sequence of integer ids .*got a str \(tokenise the text first\)"),
    (None, TypeError, "got a NoneType"),
    ((i for i in range(10)), TypeError, "got a generator"),
    ([1, None, 3, 4], TypeError, "ids must be integers, got NoneType None at position 1"),
    ([__import__("fractions").Fraction(1), 2, 3], TypeError, r"got Fraction Fraction\(1, 1\) at position 0"),
    (np.arange(10).astype("timedelta64[s]"), TypeError, "timedelta64"),
], ids=["str", "None", "generator", "None inside", "Fraction inside", "timedelta64"])
def test_ids_that_are_no_integer_sequence_are_type_errors_in_both_trees(ids, error, message):
    """numpy_ref read a string, None or a generator as a 0-d array ("got shape ()", a ValueError)
    and took timedelta64 as integers; torch_impl raised torch's own TypeError, RuntimeError or
    ValueError for these, naming no argument."""
    for tree in (np_data, pt_data):
        fresh = (i for i in range(10)) if hasattr(ids, "__next__") else ids
        with pytest.raises(error, match=message):
            tree.SlidingWindowDataset(fresh, 2, 1)


def test_a_big_endian_array_gives_the_same_windows_in_both_trees():
    """torch refuses a NumPy array of the other byte order ("not supported"); numpy_ref read it."""
    ids = np.arange(12, dtype=">i4")
    a, b = np_data.SlidingWindowDataset(ids, 3, 2), pt_data.SlidingWindowDataset(ids, 3, 2)
    assert np.array_equal(a.inputs, b.inputs.numpy()) and np.array_equal(a.targets, b.targets.numpy()), \
        f"windows differ: numpy {a.inputs.tolist()} vs torch {b.inputs.tolist()}"


# ---- from a review of the chapter-2 pieces (each failed on the code before its fix) ----

@pytest.mark.parametrize("tree", ["numpy", "torch"])
def test_the_dataset_owns_its_windows(tree):
    """torch's windows were views of the caller's int64 ids when stride == max_length (the CLI's
    default) or there was one window: a later change to the ids changed the batches."""
    import torch

    from numpy_ref import data as nd
    from torch_impl import data as td

    ids = np.arange(10) if tree == "numpy" else torch.arange(10)
    ds = (nd if tree == "numpy" else td).SlidingWindowDataset(ids, 3, 3)
    before = np.asarray(ds.inputs).copy()
    ids[1] = 99
    assert np.array_equal(np.asarray(ds.inputs), before), f"{tree}: the windows followed the caller's ids"


@pytest.mark.parametrize("bad, position", [([1, Decimal(2), 3, 4, 5, 6], 1), ([1, object(), 3, 4, 5, 6], 1),
                                            ([1, [2], 3, 4, 5, 6], 1)])
def test_ids_that_are_not_integers_are_a_type_error_naming_them_in_both_trees(bad, position):
    """A Decimal or an object in a list was a TypeError in numpy_ref and torch's RuntimeError
    'Could not infer dtype' in torch_impl; a nested list a ValueError in one and a TypeError in the other."""
    from numpy_ref import data as nd
    from torch_impl import data as td

    for tree in (nd, td):
        with pytest.raises(TypeError, match=rf"ids must be integers, got {type(bad[position]).__name__} .* at position "
                                            rf"{position}"):
            tree.SlidingWindowDataset(bad, 2, 1)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(drop_last="False"), TypeError, "drop_last must be True or False"),  # a string was true: it dropped
    (dict(shuffle=1), TypeError, "shuffle must be True or False"),
    (dict(seed=-7), ValueError, "seed must be >= 0"),  # random.Random(-7) is random.Random(7)
])
def test_data_loader_flags_and_seed_are_checked_in_both_trees(kwargs, error, match):
    import torch

    from numpy_ref import data as nd
    from torch_impl import data as td

    for tree, ids in ((nd, np.arange(30)), (td, torch.arange(30))):
        ds = tree.SlidingWindowDataset(ids, 4, 4)
        with pytest.raises(error, match=match):
            tree.DataLoader(ds, 2, **kwargs)


def test_build_vocab_refuses_one_string_as_its_special_tokens():
    """special_tokens="<|unk|>" added each character as a token, silently."""
    from numpy_ref.simple_tokenizer import build_vocab

    with pytest.raises(TypeError, match="special_tokens must be a sequence of strings"):
        build_vocab("a b c", special_tokens="<|unk|>")
    assert build_vocab("a b", special_tokens=("<|unk|>",)) == {"a": 0, "b": 1, "<|unk|>": 2}
