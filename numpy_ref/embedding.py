"""Token plus position embedding.

    out[b, t] = wte[ids[b, t]] + wpe[pos_offset + t]          ids (B, T) -> out (B, T, C)

Backward: the forward reads row ids[b, t] of `wte` once per (b, t), so that row's gradient is
the sum of the upstream rows at every position where the id occurs (a scatter-add: an id that
appears k times collects k rows; plain `dwte[ids] += g` would keep only one of them). `wpe` row
pos_offset + t is read once per batch row, so its gradient is the sum over the batch:

    dwte[v]              = sum over (b, t) with ids[b, t] == v of dout[b, t]     (V, C)
    dwpe[pos_offset + t] = sum over b of dout[b, t]                              (Tc, C)

Every other row of either table gets zero. Reference: openai/gpt-2 `model.py` (`wte`, `wpe`);
llm.c `encoder_forward`/`encoder_backward`. `pos_offset` is the number of positions already in
a KV cache.

Bad input (docs/design.md): a non-integer dtype is a TypeError; a shape other than (B, T), an
empty batch or sequence, an id outside [0, V) or a position past the table is a ValueError
naming the value and the limit. NumPy would silently read wte[-1] for id -1: never allowed.
"""

from __future__ import annotations

import numbers

import numpy as np


def check_ids(ids, vocab_size: int, context_length: int, pos_offset: int = 0) -> np.ndarray:
    """The ids as an integer ndarray, or the design.md error naming what is wrong."""
    if isinstance(pos_offset, bool) or not isinstance(pos_offset, numbers.Integral) or pos_offset < 0:
        raise ValueError(f"pos_offset (positions already cached) must be an int >= 0, got {pos_offset!r}")
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"token ids must have an integer dtype, got {ids.dtype}")
    if ids.ndim != 2:
        raise ValueError(f"token ids must be 2-D (B, T), got shape {ids.shape}")
    B, T = ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"token ids must have B >= 1 and T >= 1, got shape {ids.shape}")
    if pos_offset + T > context_length:
        past = f" after {pos_offset} cached positions" if pos_offset else ""
        raise ValueError(f"sequence length T={T}{past} exceeds the context length {context_length}")
    bad = (ids < 0) | (ids >= vocab_size)  # (B, T)
    if bad.any():
        b, t = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"token id {int(ids[b, t])} at position (batch {b}, time {t}) is outside [0, {vocab_size}) "
                         f"(vocab_size={vocab_size})")
    return ids


def embedding_forward(ids, wte: np.ndarray, wpe: np.ndarray, pos_offset: int = 0):
    """(out, cache); ids are checked first (see `check_ids`)."""
    ids = check_ids(ids, wte.shape[0], wpe.shape[0], pos_offset)
    T = ids.shape[1]
    tok = wte[ids]  # (B, T) -> (B, T, C), a gather (a copy)
    tok += wpe[pos_offset:pos_offset + T]  # (B, T, C) + (T, C) -> (B, T, C), in place
    # The cache keeps a copy of the ids: a caller refilling its id buffer before the backward
    # would otherwise move the gradient to other rows of wte, silently.
    return tok, (ids.copy(), wte.shape, wpe.shape, wte.dtype, pos_offset)


def embedding_backward(dout: np.ndarray, cache):
    """(dwte, dwpe), each the shape of its table."""
    ids, wte_shape, wpe_shape, dtype, pos_offset = cache
    B, T, C = dout.shape
    dwte = np.zeros(wte_shape, dtype=dtype)  # (V, C)
    # The scatter-add dwte[v] = sum of dout rows where ids == v, as np.add.at(dwte, ids, rows)
    # would do it, but grouped: np.add.at runs element by element (~1 us each, 0.2 s for GPT-2's
    # 256 x 768 rows), so sort the rows by id and sum each run of equal ids with one reduceat.
    flat = ids.reshape(-1)  # (B, T) -> (N,)
    order = np.argsort(flat, kind="stable")  # rows grouped by id, each group in position order
    sorted_ids = flat[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])  # first row of each id
    dwte[sorted_ids[starts]] = np.add.reduceat(dout.reshape(B * T, C)[order], starts, axis=0)  # (U, C)
    dwpe = np.zeros(wpe_shape, dtype=dtype)  # (Tc, C)
    dwpe[pos_offset:pos_offset + T] = dout.sum(axis=0)  # (B, T, C) -> (T, C)
    return dwte, dwpe
