"""Instruction fine-tuning data (the book's chapter 7): the prompt format and the batch collator.

A record (instruction, optional input text, response) becomes one text in the Alpaca layout
(Taori et al. 2023, Stanford Alpaca; the format the book uses): a one-line preamble, then
"### Instruction:", "### Input:" (only when there is an input) and "### Response:" sections.

`instruction_collate` makes one (B, T) batch from tokenised texts of different lengths. Row b,
n_b tokens, gets one end-of-text token (pad_id) so the model learns where to stop, and is padded
with pad_id to T + 1 = max_b (n_b + 1); inputs are the first T columns, targets the last T (the
next token at each position). A target becomes ignore_index past the end-of-text (j >= n_b) and,
with prompt_lengths p, where it is a prompt token (j < p_b - 1): the loss then counts the
response only (the book's exercise 7.2). Both are cut to max_length columns when given.

numpy_ref/instruction_data.py writes each step out; this is the same on tensors.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")


def format_instruction(instruction: str, input_text: str = "", response: str | None = None) -> str:
    """The prompt text; with `response`, the whole training text (prompt, then the response)."""
    for name, value in (("instruction", instruction), ("input_text", input_text)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    sections = [PREAMBLE, f"### Instruction:\n{instruction}"]
    if input_text:
        sections.append(f"### Input:\n{input_text}")
    sections.append("### Response:\n" + ("" if response is None else _checked_response(response)))
    return "\n\n".join(sections)


def _checked_response(response) -> str:
    if not isinstance(response, str):
        raise TypeError(f"response must be a str or None, got {type(response).__name__}")
    return response


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _as_ids(b: int, s) -> torch.Tensor:
    t = s if isinstance(s, torch.Tensor) else torch.as_tensor(s)
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"sequence {b} must be a non-empty 1-D list of token ids, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"sequence {b} must hold integer token ids, got dtype {t.dtype}")
    return t.to(torch.int64)


def instruction_collate(sequences: Sequence, *, pad_id: int = 50256, ignore_index: int = -100,
                        max_length: int | None = None, prompt_lengths: Sequence[int] | None = None,
                        device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both (B, T) int64 tensors on `device`. See the module docstring."""
    pad_id = _check_int("pad_id", pad_id, 0)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if max_length is not None:
        max_length = _check_int("max_length", max_length, 1)
    rows = [_as_ids(b, s) for b, s in enumerate(sequences)]
    if not rows:
        raise ValueError("instruction_collate needs at least one sequence")
    lengths = torch.tensor([len(s) for s in rows])  # (B,)
    if prompt_lengths is not None:
        prompt_lengths = list(prompt_lengths)
        if len(prompt_lengths) != len(rows):
            raise ValueError(f"prompt_lengths has {len(prompt_lengths)} entries for {len(rows)} sequences")
        for b, (p, n) in enumerate(zip(prompt_lengths, lengths.tolist())):
            if isinstance(p, bool) or not isinstance(p, numbers.Integral) or not 0 <= p <= n:
                raise ValueError(f"prompt_lengths[{b}] = {p!r} is outside 0 .. {n} (the sequence's length)")
    padded = torch.full((len(rows), int(lengths.max()) + 1), pad_id, dtype=torch.int64)  # (B, T + 1)
    for b, s in enumerate(rows):
        padded[b, :len(s)] = s  # the end-of-text after it is already pad_id
    inputs, targets = padded[:, :-1].clone(), padded[:, 1:].clone()  # (B, T), (B, T)
    j = torch.arange(targets.shape[1])  # (T,)
    ignored = j[None, :] >= lengths[:, None]  # (B, T): padding after the end-of-text
    if prompt_lengths is not None:
        ignored |= j[None, :] < torch.tensor(prompt_lengths)[:, None] - 1  # targets that are prompt tokens
    targets[ignored] = ignore_index
    if max_length is not None:
        inputs, targets = inputs[:, :max_length], targets[:, :max_length]
    return inputs.contiguous().to(device), targets.contiguous().to(device)
