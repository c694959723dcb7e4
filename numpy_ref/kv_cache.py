"""The key/value cache for incremental decoding (inference only).

Every layer's keys and values for the positions seen so far are kept, so a new chunk of T
tokens costs attention over P + T keys instead of recomputing all P + T positions:

    k_cache[l][:, :, P : P + T] = k_new        (B, nh, T, hs) written into (B, nh, Tc, hs)
    keys = k_cache[l][:, :, : P + T]           (B, nh, Tc, hs) -> (B, nh, P + T, hs)

The buffers are allocated once, to the full context length, so decoding never reallocates or
concatenates. The model writes every layer, then calls `advance(T)`; the new chunk's positions
are P .. P + T - 1 (the position-embedding offset) and query t of the chunk sees keys 0 .. P + t.
Going past the context length is a ValueError naming both numbers.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np


@dataclass
class LayerKV:
    """One layer's view of the cache: its buffers and the number of positions already in them."""

    k: np.ndarray  # (B, nh, Tc, hs)
    v: np.ndarray  # (B, nh, Tc, hs)
    past: int  # P

    def check_room(self, T: int) -> None:
        """ValueError if T new positions do not fit after the P cached ones."""
        if self.past + T > self.k.shape[2]:
            raise ValueError(f"KV cache overflow: {self.past} cached + {T} new positions exceed the context "
                             f"length {self.k.shape[2]}")

    def append(self, k_new: np.ndarray, v_new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write the chunk's keys/values at P .. P+T-1; return all keys/values 0 .. P+T-1."""
        T = k_new.shape[2]
        end = self.past + T
        self.check_room(T)
        if k_new.shape[0] != self.k.shape[0]:
            raise ValueError(f"batch size {k_new.shape[0]} differs from the KV cache's {self.k.shape[0]}")
        self.k[:, :, self.past:end] = k_new  # (B, nh, T, hs) into (B, nh, Tc, hs)
        self.v[:, :, self.past:end] = v_new
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, nh, Tc, hs) -> (B, nh, P + T, hs)


class KVCache:
    """Preallocated keys and values for all layers, (L, B, nh, Tc, hs) each, and the length P."""

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, context_length: int, head_size: int,
                 dtype=np.float64) -> None:
        # As in `crop`, and as torch_impl: np.zeros would refuse 1.5 and True (Python's 1) with
        # errors that name no argument.
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
            raise TypeError(f"KV cache batch_size must be an int, got {batch_size!r} ({type(batch_size).__name__})")
        if batch_size < 1:
            raise ValueError(f"KV cache batch_size must be >= 1, got {batch_size}")
        shape = (n_layers, int(batch_size), n_heads, context_length, head_size)
        self.k = np.zeros(shape, dtype=dtype)
        self.v = np.zeros(shape, dtype=dtype)
        self.length = 0  # P: positions already cached (the same for every layer)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def context_length(self) -> int:
        return self.k.shape[3]

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self.k[i], self.v[i], self.length)

    def check_room(self, T: int) -> None:
        """ValueError if T more positions do not fit."""
        if self.length + T > self.context_length:
            raise ValueError(f"KV cache holds {self.length} positions; {T} more exceed the context length "
                             f"{self.context_length}")

    def advance(self, T: int) -> None:
        """Record that every layer has written T more positions. T must be an int >= 0 (a TypeError
        for 1.5 or True, a ValueError below 0), checked before anything changes, as in `crop`."""
        if isinstance(T, bool) or not isinstance(T, numbers.Integral):
            raise TypeError(f"a KV cache advance must be an int, got {T!r} ({type(T).__name__})")
        if T < 0:
            raise ValueError(f"a KV cache advances by T >= 0 positions, got T={T}")
        self.check_room(T)
        self.length += int(T)

    def reset(self) -> None:
        """Forget every cached position (the buffers are reused, not cleared)."""
        self.length = 0

    def crop(self, length: int) -> None:
        """Keep only the first `length` positions."""
        if isinstance(length, bool) or not isinstance(length, numbers.Integral):
            raise TypeError(f"a KV cache crop length must be an int, got {length!r} ({type(length).__name__})")
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a KV cache of length {self.length} to {length}")
        self.length = int(length)  # a NumPy integer becomes the Python int `length` always is
