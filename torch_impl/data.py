"""The data pipeline of chapter 2 as torch tensors: text -> ids -> sliding windows -> batches.

The same windows, split and batch order as `numpy_ref/data.py` (docs/design.md, "Data"):

    starts = 0, stride, 2 stride, ...  while start + max_length < n_ids
    inputs[i]  = ids[start_i     : start_i + max_length]        # (T,)
    targets[i] = ids[start_i + 1 : start_i + max_length + 1]    # (T,)

One epoch visits the windows in the order `list(range(n_windows))` shuffled in place by
`random.Random.shuffle` (not `torch.randperm`: the order must be reproducible by the NumPy
tree from the same seed). `SlidingWindowDataset` is a `torch.utils.data.Dataset`, so torch's
own DataLoader accepts it too (with torch's shuffling, which the NumPy tree cannot reproduce).

Reference: S. Raschka, "Build a Large Language Model (From Scratch)", `GPTDatasetV1` and
`create_dataloader_v1` (section 2.6), the split of section 5.1.3.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import numbers
import random
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from torch_impl.tokenizer import ENDOFTEXT, get_encoding


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


class SlidingWindowDataset(Dataset):
    """All (inputs, targets) windows of a 1-D id sequence, as int64 tensors of shape (N, T)."""

    def __init__(self, ids, max_length: int, stride: int):
        max_length = _positive_int("max_length", max_length)
        stride = _positive_int("stride", stride)
        _check_ids_container(ids)
        if getattr(getattr(ids, "dtype", None), "byteorder", "=") not in "=|":  # a big-endian NumPy array
            ids = ids.astype(ids.dtype.newbyteorder("="))  # torch takes the native order only; NumPy reads any
        try:
            ids = torch.as_tensor(ids)
        except (ValueError, TypeError, RuntimeError):
            _check_listed_ids(ids)  # an int past int64 ("Overflow when unpacking long long"): name it
            raise
        if ids.ndim != 1:
            raise ValueError(f"ids must be a 1-D sequence, got shape {tuple(ids.shape)}")
        if ids.numel() and (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool):
            raise TypeError(f"ids must be integers, got dtype {ids.dtype}")
        if ids.dtype == torch.uint64:  # torch compares no uint64: the same bits read as int64 are < 0 past 2**63
            as_int64 = ids.view(torch.int64)
            wrapped = (as_int64 < 0).nonzero().flatten()
            if len(wrapped):
                first = int(wrapped[0])
                raise ValueError(f"id {int(as_int64[first]) + 2**64} at position {first} does not fit in int64 "
                                 f"(max {torch.iinfo(torch.int64).max}); ids are read as int64")
        if len(ids) < max_length + 1:
            raise ValueError(f"{len(ids)} tokens are too few for max_length={max_length}: "
                             f"one window needs max_length + 1 = {max_length + 1}")
        ids = ids.long()
        # unfold starts a window of T+1 ids at 0, stride, ... while it fits: exactly the starts
        # with start + max_length < n_ids, each window holding its inputs and its last target.
        # A stride past the end gives the one window at 0 whatever its size (and fits unfold's int64).
        windows = ids.unfold(0, max_length + 1, min(stride, len(ids)))  # (n_ids,) -> (N, T+1)
        # copies: with stride == max_length (or one window) contiguous() would keep views of the caller's ids
        self.inputs = windows[:, :-1].clone(memory_format=torch.contiguous_format)  # (N, T+1) -> (N, T)
        self.targets = windows[:, 1:].clone(memory_format=torch.contiguous_format)  # (N, T+1) -> (N, T), shifted by one
        self.max_length = max_length
        self.stride = stride

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
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
                 drop_last: bool = False, rng: random.Random | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (inputs, targets) batches, each (B, T) int64."""
    batch_size = _positive_int("batch_size", batch_size)
    _check_drop_last(len(dataset), batch_size, drop_last)
    order = torch.tensor(batch_order(len(dataset), shuffle, rng), dtype=torch.long)  # (N,)
    batches = []
    for first in range(0, len(order), batch_size):
        index = order[first : min(first + batch_size, len(order))]  # (N,) -> (B,)
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
