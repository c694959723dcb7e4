"""The data pipeline of chapter 2: text -> ids -> sliding windows -> (inputs, targets) batches.

A window of `max_length` ids starts every `stride` ids; its targets are the same window shifted
one id to the right, so `targets[b, t]` is the id that follows `inputs[b, t]`:

    starts = 0, stride, 2 stride, ...  while start + max_length < n_ids
    inputs[i]  = ids[start_i     : start_i + max_length]        # (T,)
    targets[i] = ids[start_i + 1 : start_i + max_length + 1]    # (T,)

`stride == max_length` gives non-overlapping windows; a smaller stride overlaps them.

Batching and shuffling (docs/design.md, "Data"; the torch tree implements the same algorithm):
the order of the windows in one epoch is `list(range(n_windows))`, shuffled in place by
`rng.shuffle` with `rng` a `random.Random` (the standard library's Mersenne Twister), so that
both trees, given the same seed, visit the same windows in the same order. Batches are taken in
that order, `batch_size` windows each; with `drop_last` a final short batch is dropped.

The train/validation split cuts the *text* at character `int(train_ratio * len(text))`, as the
book does (chapter 5), before tokenising each part.

Reference: S. Raschka, "Build a Large Language Model (From Scratch)", `GPTDatasetV1` and
`create_dataloader_v1` (section 2.6), the split of section 5.1.3.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import numbers
import random
from collections.abc import Sequence

import numpy as np

from numpy_ref.tokenizer import ENDOFTEXT, get_encoding


# gpt_oracle/data/README.md: the file's provenance and this hash (each tree keeps its own copy)
VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"


def load_verdict() -> str:
    """"The Verdict" (Edith Wharton, 1908), the book's training text: 20,479 characters,
    hash-checked (a changed file would change every default run and test that trains on it)."""
    raw = (importlib.resources.files("gpt_oracle.data") / "the-verdict.txt").read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != VERDICT_SHA256:
        raise ValueError(f"the packaged the-verdict.txt has sha256 {digest}, expected {VERDICT_SHA256} "
                         f"(gpt_oracle/data/README.md): the file was changed")
    return raw.decode("utf-8")


def _positive_int(name: str, value) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _seed(value) -> int:
    # random.Random(None) would seed from the operating system: an order nothing can reproduce.
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"seed must be an int, got {type(value).__name__} {value!r}")
    if value < 0:  # random.Random(-7) is random.Random(7): two seeds, one order
        raise ValueError(f"seed must be >= 0, got {value}")
    return int(value)


def _flag(name: str, value) -> bool:
    """shuffle / drop_last: True or False ("False", a string, would be true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def _check_drop_last(n_windows: int, batch_size: int, drop_last: bool) -> None:
    if drop_last and n_windows < batch_size:
        raise ValueError(f"drop_last with batch_size={batch_size} leaves no batch: "
                         f"the dataset has only {n_windows} windows")


def split_train_val(text: str, train_ratio: float = 0.9) -> tuple[str, str]:
    """Text -> (first `train_ratio` of the characters, the rest)."""
    if not isinstance(train_ratio, numbers.Real):
        raise TypeError(f"train_ratio must be a number, got {type(train_ratio).__name__} {train_ratio!r}")
    if not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio must be in (0, 1), got {train_ratio}")
    split = int(train_ratio * len(text))
    return text[:split], text[split:]


def _check_ids_container(ids) -> None:
    """A TypeError naming the type unless `ids` is a sequence (list, tuple, range) or an array or
    tensor: a string (text not yet tokenised), None or a generator read as a 0-d array (NumPy:
    "got shape ()") or an error naming no argument (torch). numpy_ref's data.py says the same."""
    sequence = isinstance(ids, Sequence) and not isinstance(ids, (str, bytes))
    if not (sequence or hasattr(ids, "shape") and hasattr(ids, "dtype")):
        raise TypeError(f"ids must be a 1-D sequence of integer ids (a list, tuple, array or tensor), got a "
                        f"{type(ids).__name__}" + (" (tokenise the text first)" if isinstance(ids, str) else ""))


def _check_listed_ids(ids) -> None:
    """Why a list or tuple of ids did not become an int64 array: an int past int64 (2**63) turns
    it into float64 or object (NumPy) or is refused as an overflow naming nothing (torch), a string
    into text. Both trees name the id and its position; called only once the conversion failed,
    so the ids of a whole corpus are not walked in Python."""
    if not isinstance(ids, (list, tuple)):
        return
    for position, value in enumerate(ids):
        if not isinstance(value, numbers.Integral):  # text, a missing id, a Fraction, a Decimal, a nested list
            raise TypeError(f"ids must be integers, got {type(value).__name__} {value!r:.40} at position {position}")
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
            limit = f"max {2**63 - 1}" if value > 0 else f"min {-2**63}"
            raise ValueError(f"id {int(value)} at position {position} does not fit in int64 ({limit}); "
                             f"ids are read as int64")


class SlidingWindowDataset:
    """All (inputs, targets) windows of a 1-D id sequence, as int64 arrays of shape (N, T)."""

    def __init__(self, ids, max_length: int, stride: int):
        max_length = _positive_int("max_length", max_length)
        stride = _positive_int("stride", stride)
        _check_ids_container(ids)
        try:
            listed, ids = ids, np.asarray(ids)
        except ValueError:  # a nested list ("inhomogeneous shape"): name the element, as torch_impl does
            _check_listed_ids(ids)
            raise
        if ids.ndim != 1:
            raise ValueError(f"ids must be a 1-D sequence, got shape {ids.shape}")
        if ids.size and ids.dtype.kind not in "iu":  # issubdtype(integer) also takes timedelta64
            _check_listed_ids(listed)  # an int past int64 made the array float64 or object: name it
            raise TypeError(f"ids must be integers, got dtype {ids.dtype}")
        int64_max = np.iinfo(np.int64).max
        if ids.dtype == np.uint64 and ids.size and ids.max() > int64_max:  # would wrap to a negative id
            first = int(np.argmax(ids > int64_max))
            raise ValueError(f"id {int(ids[first])} at position {first} does not fit in int64 "
                             f"(max {int64_max}); ids are read as int64")
        if len(ids) < max_length + 1:
            raise ValueError(f"{len(ids)} tokens are too few for max_length={max_length}: "
                             f"one window needs max_length + 1 = {max_length + 1}")
        # A stride past the end gives the one window at 0 whatever its size (and keeps arange in int64).
        starts = np.arange(0, len(ids) - max_length, min(stride, len(ids)))  # (N,)
        offsets = np.arange(max_length)  # (T,)
        positions = starts[:, None] + offsets[None, :]  # (N, 1) + (1, T) -> (N, T)
        self.inputs = ids.astype(np.int64)[positions]  # (n_ids,) -> (N, T)
        self.targets = ids.astype(np.int64)[positions + 1]  # (n_ids,) -> (N, T), shifted by one
        self.max_length = max_length
        self.stride = stride

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.inputs[i], self.targets[i]


def batch_order(n: int, shuffle: bool, rng: random.Random | None) -> list[int]:
    """The window indices of one epoch: 0 .. n-1, shuffled by `rng.shuffle` when `shuffle`."""
    order = list(range(n))
    if shuffle:
        if rng is None:
            raise ValueError("shuffle=True needs an explicit rng (a random.Random)")
        rng.shuffle(order)
    return order


def make_batches(dataset: SlidingWindowDataset, batch_size: int, *, shuffle: bool = False,
                 drop_last: bool = False, rng: random.Random | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """One epoch of (inputs, targets) batches, each (B, T) int64."""
    batch_size = _positive_int("batch_size", batch_size)
    _check_drop_last(len(dataset), batch_size, drop_last)
    order = batch_order(len(dataset), shuffle, rng)
    batches = []
    for first in range(0, len(order), batch_size):
        index = np.array(order[first : min(first + batch_size, len(order))])  # (B,)
        if drop_last and len(index) < batch_size:
            break
        batches.append((dataset.inputs[index], dataset.targets[index]))  # (N, T) -> (B, T)
    return batches


class DataLoader:
    """Iterates batches of a dataset, one epoch per `iter()`; epoch k uses the k-th shuffle of
    `random.Random(seed)`, so a run is reproducible and both trees agree."""

    def __init__(self, dataset: SlidingWindowDataset, batch_size: int, *, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0):
        batch_size = _positive_int("batch_size", batch_size)
        shuffle, drop_last = _flag("shuffle", shuffle), _flag("drop_last", drop_last)
        _check_drop_last(len(dataset), batch_size, drop_last)
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = _seed(seed)  # kept: a resumed run checks it drew the same order (train_run.py)
        self.rng = random.Random(self.seed)
        self.epochs_drawn = 0  # iter() calls so far: a resumed stream needs a loader at 0

    def __len__(self) -> int:
        full, rest = divmod(len(self.dataset), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self):
        self.epochs_drawn += 1
        return iter(make_batches(self.dataset, self.batch_size, shuffle=self.shuffle,
                                 drop_last=self.drop_last, rng=self.rng))


def create_dataloader(text: str, batch_size: int = 4, max_length: int = 256, stride: int = 128,
                      shuffle: bool = True, drop_last: bool = True, seed: int = 0, encoding=None) -> DataLoader:
    """Text -> GPT-2 ids (`<|endoftext|>` allowed) -> windows -> a DataLoader (the book's v1)."""
    encoding = encoding if encoding is not None else get_encoding("gpt2")
    ids = encoding.encode(text, allowed_special={ENDOFTEXT})
    dataset = SlidingWindowDataset(ids, max_length, stride)
    return DataLoader(dataset, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)
