"""Token plus position embedding.

    x[b, t] = wte[ids[b, t]] + wpe[pos_offset + t]          (B, T) -> (B, T, C)

Reference: GPT-2 (Radford et al. 2019), `wte`/`wpe` in openai/gpt-2 `model.py`. `pos_offset` is
the number of positions already in a KV cache, so the new chunk gets positions P .. P+T-1.
The backward (a scatter-add of the upstream rows into `wte`, and a sum over the batch into
`wpe`) is autograd's; numpy_ref/embedding.py writes it out.

Shapes: ids (B, T) integer; wte (V, C); wpe (Tc, C); out (B, T, C).
Bad input (docs/design.md): a non-integer dtype is a TypeError; a shape other than (B, T), an
empty batch or sequence, an id outside [0, V) or a position past the table is a ValueError
naming the value and the limit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.compiler.disable  # data-dependent raise: runs eagerly, outside any compiled graph
def check_ids(ids: torch.Tensor, vocab_size: int, context_length: int, pos_offset: int = 0) -> None:
    """Raise the design.md errors for ids that the model cannot embed; return None otherwise.

    The range check is one reduction; it syncs with the device once per forward (where the
    device is not the CPU), which costs microseconds next to a GPT-2 forward.
    """
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"token ids must be a torch.Tensor of integers, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"token ids must have an integer dtype, got {ids.dtype}")
    if ids.ndim != 2:
        raise ValueError(f"token ids must be 2-D (B, T), got shape {tuple(ids.shape)}")
    B, T = ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"token ids must have B >= 1 and T >= 1, got shape {tuple(ids.shape)}")
    if pos_offset + T > context_length:
        past = f" after {pos_offset} cached positions" if pos_offset else ""
        raise ValueError(f"sequence length T={T}{past} exceeds the context length {context_length}")
    bad = (ids < 0) | (ids >= vocab_size)  # (B, T)
    if bool(bad.any()):
        b, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"token id {int(ids[b, t])} at position (batch {b}, time {t}) is outside [0, {vocab_size}) "
                         f"(vocab_size={vocab_size})")


def embedding_forward(ids: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor, pos_offset: int = 0) -> torch.Tensor:
    """wte[ids] + wpe[pos_offset : pos_offset + T]; ids are checked first (see `check_ids`)."""
    check_ids(ids, wte.shape[0], wpe.shape[0], pos_offset)
    T = ids.shape[1]
    # F.embedding, not wte[ids]: the backward of advanced indexing on the CPU (index_put_ with
    # accumulate) adds the rows of repeated ids in a thread-dependent order, so two runs of the
    # same training differ in the last bits; embedding's own backward is reproducible.
    tok = F.embedding(ids, wte)  # (B, T) -> (B, T, C)
    pos = wpe[pos_offset:pos_offset + T]  # (Tc, C) -> (T, C)
    return tok + pos  # (B, T, C) + (T, C) -> (B, T, C)
