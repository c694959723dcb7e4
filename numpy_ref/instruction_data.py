"""Instruction fine-tuning data (the book's chapter 7): the prompt format and the batch collator.

A record (instruction, optional input text, response) becomes one text in the Alpaca layout
(Taori et al. 2023, Stanford Alpaca; the book's variant, one preamble whether or not there is an
input, where Alpaca words it differently for a record with one):

    Below is an instruction that describes a task. ...      the preamble
    ### Instruction:\n{instruction}
    ### Input:\n{input_text}                                 only when there is one
    ### Response:\n{response}

`instruction_collate` turns tokenised texts of different lengths into one (B, T) batch for the
next-token loss. For a row s of n tokens:

    s' = s + [pad_id]                      one end-of-text token: the model learns where to stop
    padded to T + 1 = max_b (n_b + 1) with pad_id
    inputs  = padded[:, :-1]               (B, T)
    targets = padded[:, 1:]                (B, T)  the next token at each position
    targets[b, j] = ignore_index           for j >= n_b (padding after the end-of-text), and for
                                           j < p_b - 1 when prompt_lengths p are given (the
                                           targets that are prompt tokens: the loss counts the
                                           response only, the book's exercise 7.2)
    then both are cut to max_length columns when given (the context length)

The loss then averages over the counted targets only (cross_entropy.py's ignore_index).
`ignore_index` must be negative: a token id equal to it would silently drop out of the loss (with
pad_id, every end-of-text). Ids are integers in 0 .. 2**63 - 1 (the model checks the vocabulary):
text, floats and bools are a TypeError, a negative or too large id a ValueError naming the
sequence, the position and the value; both trees raise the same.
torch_impl/instruction_data.py is the same, returning tensors.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import numpy as np

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")


def format_instruction(instruction: str, input_text: str = "", response: str | None = None) -> str:
    """The prompt text; with `response`, the whole training text (prompt, then the response)."""
    for name, value in (("instruction", instruction), ("input_text", input_text)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    text = f"{PREAMBLE}\n\n### Instruction:\n{instruction}"
    if input_text:
        text += f"\n\n### Input:\n{input_text}"
    text += "\n\n### Response:\n"
    if response is not None:
        if not isinstance(response, str):
            raise TypeError(f"response must be a str or None, got {type(response).__name__}")
        text += response
    return text


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


INT64_MAX = 2**63 - 1


def _as_ids(b: int, seq) -> np.ndarray:
    """Sequence b as int64 ids: a 1-D integer array, or a list (any iterable) of integers;
    TypeError for text, a float, a bool or anything else that is not an integer (also inside a
    list), ValueError for an empty or many-dimensional array and for an id < 0 or > 2**63 - 1
    (naming the sequence, position and value). The vocabulary is checked by the model."""
    if isinstance(seq, (str, bytes)):
        raise TypeError(f"sequence {b} is text ({type(seq).__name__}); pass its token ids")
    if hasattr(seq, "__array__"):  # an array of any library (a tensor too): by its dtype
        seq = np.asarray(seq)
        if seq.dtype.kind not in "iu":
            raise TypeError(f"sequence {b} must hold integer token ids, got dtype {seq.dtype}")
        values = seq
    else:
        values = list(seq)
        for j, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):  # NumPy's bool is not Integral
                raise TypeError(f"sequence {b}, position {j}: token id {v!r} is not an integer")
        values = np.array(values, dtype=object if values else np.int64)  # Python ints of any size
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"sequence {b} must be a non-empty 1-D list of token ids, got shape {values.shape}")
    bad = np.flatnonzero((values < 0) | (values > INT64_MAX))
    if bad.size:
        j = int(bad[0])
        raise ValueError(f"sequence {b}, position {j}: token id {int(values[j])} is outside 0 .. 2**63 - 1")
    return values.astype(np.int64)


def instruction_collate(sequences: Sequence[Sequence[int]], *, pad_id: int = 50256, ignore_index: int = -100,
                        max_length: int | None = None, prompt_lengths: Sequence[int] | None = None):
    """(inputs, targets), both (B, T) int64 arrays. See the module docstring."""
    pad_id = _check_int("pad_id", pad_id, 0)
    if pad_id > 2**63 - 1:  # the batch is int64
        raise ValueError(f"pad_id must be an integer in [0, 2**63 - 1] (the batch is int64), got {pad_id}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if ignore_index >= 0:  # it would also drop every target equal to it: the end-of-text, a real token
        raise ValueError(f"ignore_index must be negative (no token id may equal it), got {ignore_index}")
    if ignore_index < -(2**63):  # the targets are int64
        raise ValueError(f"ignore_index must be in [-2**63, -1] (the targets are int64), got {ignore_index}")
    if max_length is not None:
        max_length = _check_int("max_length", max_length, 1)
    rows = [_as_ids(b, s) for b, s in enumerate(sequences)]
    if not rows:
        raise ValueError("instruction_collate needs at least one sequence")
    lengths = [s.size for s in rows]
    if prompt_lengths is not None:
        prompt_lengths = list(prompt_lengths)
        if len(prompt_lengths) != len(rows):
            raise ValueError(f"prompt_lengths has {len(prompt_lengths)} entries for {len(rows)} sequences")
        for b, (p, n) in enumerate(zip(prompt_lengths, lengths)):
            if isinstance(p, bool) or not isinstance(p, numbers.Integral):
                raise TypeError(f"prompt_lengths[{b}] must be an int, got {p!r} ({type(p).__name__})")
            if not 0 <= p <= n:
                raise ValueError(f"prompt_lengths[{b}] = {p!r} is outside 0 .. {n} (the sequence's length)")
        # Python ints: p - 1 of an unsigned 0 would wrap to the type's maximum and drop the whole row
        prompt_lengths = [int(p) for p in prompt_lengths]
    T = max(lengths)  # the longest row plus its end-of-text is T + 1 tokens
    padded = np.full((len(rows), T + 1), pad_id, dtype=np.int64)  # (B, T + 1)
    for b, s in enumerate(rows):
        padded[b, :s.size] = s  # the end-of-text after it is already pad_id
    inputs, targets = padded[:, :-1].copy(), padded[:, 1:].copy()  # (B, T + 1) -> (B, T), (B, T)
    j = np.arange(T)  # (T,)
    ignored = j[None, :] >= np.asarray(lengths)[:, None]  # (B, T): padding after the end-of-text
    if prompt_lengths is not None:
        ignored |= j[None, :] < np.asarray(prompt_lengths)[:, None] - 1  # targets that are prompt tokens
    targets[ignored] = ignore_index
    if max_length is not None:
        inputs, targets = inputs[:, :max_length], targets[:, :max_length]
    return inputs, targets
