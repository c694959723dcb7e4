"""GPT-2's tokenizer for the fast path: a tiktoken `Encoding` built offline from the packaged ranks.

`tiktoken.get_encoding("gpt2")` downloads its tables on first use; this module never does. It
reads `gpt_oracle/data/gpt2.tiktoken` (one `base64(token bytes) rank` per line), checks its
sha256 (this file's own copy of the hash, see `gpt_oracle/data/README.md`), parses it with
`tiktoken.load.load_tiktoken_bpe` and adds `<|endoftext|>` = 50256. tiktoken's file cache is
bypassed (`TIKTOKEN_CACHE_DIR` is irrelevant): a cache entry can neither replace the packaged
file nor be written by this module. The from-scratch twin is `numpy_ref/tokenizer.py`; a parity
test holds the two to the same ids.

The encoding is tiktoken's class with two of its failures reported as the oracle reports bad
input (`Encoding` below); every id it returns is tiktoken's.
"""

from __future__ import annotations

import contextlib
import operator
import functools
import hashlib
import importlib.resources
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import AbstractSet, Collection, Iterator, Literal

import tiktoken
import tiktoken.load
import torch

GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
ENDOFTEXT = "<|endoftext|>"
# GPT-2's pre-tokenisation pattern (tiktoken's `r50k_pat_str`, written out so no registry is needed).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_CACHE_ENV_LOCK = threading.Lock()  # TIKTOKEN_CACHE_DIR is switched off around one load at a time


def read_verified(path: str | Path, expected_sha256: str | None) -> bytes:
    """The bytes of `path`, after checking their sha256 (skipped when `expected_sha256` is None)."""
    data = Path(path).read_bytes()
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise ValueError(
                f"sha256 mismatch for {path}: expected {expected_sha256}, got {actual}; "
                "the file is corrupted or is not the one this code was written for"
            )
    return data


def load_tiktoken_bpe(path: str | Path, expected_sha256: str | None = None) -> dict[bytes, int]:
    """A `.tiktoken` ranks file -> {token bytes: rank}, parsed by tiktoken's own loader.

    The bytes are hash-checked here, then handed to `tiktoken.load.load_tiktoken_bpe` as a
    private temporary copy with tiktoken's cache switched off for the call, so that neither a
    stale cache entry nor an unwritable cache directory can change what is loaded. The switch is
    TIKTOKEN_CACHE_DIR, process-wide: another thread calling tiktoken's own loaders during those
    milliseconds runs uncached (it reads its file again; nothing it reads changes).
    """
    data = read_verified(path, expected_sha256)
    with tempfile.TemporaryDirectory(prefix="gpt_oracle_ranks_") as tmp:
        copy = Path(tmp) / "ranks.tiktoken"
        copy.write_bytes(data)
        with _CACHE_ENV_LOCK:
            saved = os.environ.get("TIKTOKEN_CACHE_DIR")
            os.environ["TIKTOKEN_CACHE_DIR"] = ""  # tiktoken: an empty cache dir disables caching
            try:
                return tiktoken.load.load_tiktoken_bpe(str(copy))
            finally:
                if saved is None:
                    del os.environ["TIKTOKEN_CACHE_DIR"]
                else:
                    os.environ["TIKTOKEN_CACHE_DIR"] = saved


def gpt2_ranks_path():
    """The packaged GPT-2 ranks file (a Traversable)."""
    return importlib.resources.files("gpt_oracle.data") / "gpt2.tiktoken"


def load_ranks(path: str | Path | None = None, expected_sha256: str | None = GPT2_TIKTOKEN_SHA256) -> dict[bytes, int]:
    """GPT-2's ranks: the packaged file by default, hash-checked."""
    if path is None:
        with importlib.resources.as_file(gpt2_ranks_path()) as packaged:
            return load_tiktoken_bpe(packaged, expected_sha256)
    return load_tiktoken_bpe(path, expected_sha256)


class Encoding(tiktoken.Encoding):
    r"""tiktoken's `Encoding`; the ids are tiktoken's, two failures become numpy_ref's ValueErrors.

    - An id outside the vocabulary: tiktoken raises KeyError, or for a negative id (say an
      `ignore_index` of -100 decoded with the targets) or one >= 2**63 an OverflowError that names
      neither the id nor the range. Here: ValueError naming the id and the range.
    - A run of about a million whitespace characters before a non-space: tiktoken's regex engine
      (fancy-regex, matching GPT-2's `\s+(?!\S)`) runs out of backtracking stack (openai/tiktoken#15).
      `encode` then raises a ValueError that names neither the run nor the limit, and
      `encode_ordinary` a PanicException, which derives from BaseException and so escapes
      `except Exception`. Here: both a ValueError naming the run and the limit. (numpy_ref
      encodes such a text; a test checks its ids against tiktoken's on the text cut in two.)
    The checks run only after tiktoken has failed, so the happy path is tiktoken's own speed.
    `encode_batch` reads the special-token policy as `encode` does; `decode_batch` and
    `decode_tokens_bytes` go through the methods below;
    `encode_with_unstable` (unused here) is tiktoken's as it is.
    """

    def encode_ordinary(self, text: str) -> list[int]:
        with _regex_panic_as_value_error(text):
            return super().encode_ordinary(text)

    def encode(self, text: str, *, allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
               disallowed_special: Literal["all"] | Collection[str] = "all") -> list[int]:
        allowed_special, disallowed_special = _special_policy(allowed_special, disallowed_special)
        with _regex_panic_as_value_error(text):
            return super().encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)

    def encode_batch(self, text: list[str], *, num_threads: int = 8,
                     allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
                     disallowed_special: Literal["all"] | Collection[str] = "all") -> list[list[int]]:
        # The policy is read here: tiktoken's encode_batch turns a string disallowed_special into
        # a set of its characters before `encode` could refuse it.
        allowed_special, disallowed_special = _special_policy(allowed_special, disallowed_special)
        return super().encode_batch(text, num_threads=num_threads, allowed_special=allowed_special,
                                    disallowed_special=disallowed_special)

    def encode_to_numpy(self, text: str, *, allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
                        disallowed_special: Literal["all"] | Collection[str] = "all"):
        allowed_special, disallowed_special = _special_policy(allowed_special, disallowed_special)
        with _regex_panic_as_value_error(text):
            return super().encode_to_numpy(text, allowed_special=allowed_special, disallowed_special=disallowed_special)

    def decode_bytes(self, tokens) -> bytes:
        tokens = _tensor_ids_as_list(tokens)
        try:
            return super().decode_bytes(tokens)
        except (KeyError, OverflowError) as exc:
            self._raise_unknown_id(tokens, exc)

    def decode(self, tokens, errors: str = "replace") -> str:
        return self.decode_bytes(tokens).decode("utf-8", errors=errors)  # tiktoken's decode, checked

    def decode_single_token_bytes(self, token: int) -> bytes:
        try:
            return super().decode_single_token_bytes(token)
        except (KeyError, OverflowError) as exc:
            self._raise_unknown_id([token], exc)

    def _raise_unknown_id(self, tokens, exc: Exception):
        """Raise a ValueError for the first id outside 0 .. max_token_value (the vocabulary is
        contiguous: `get_encoding` checks it with `explicit_n_vocab`); else `exc` itself."""
        for token in tokens:
            index = operator.index(token)  # an object with __index__ only is compared as its int
            if not 0 <= index <= self.max_token_value:  # named as a plain int, as numpy_ref names it
                raise ValueError(f"token id {index} is not in the vocabulary "
                                 f"(ids 0 .. {self.max_token_value})") from None
        raise exc


def _special_policy(allowed_special, disallowed_special):
    """The two arguments as tiktoken takes them, as numpy_ref reads them: any set type as
    allowed_special (tiktoken's Rust side takes a set or frozenset only: dict.keys() was its
    TypeError), and a string other than "all" as disallowed_special a TypeError (tiktoken reads
    it as a set of characters: "<|endoftext|>" would refuse every text holding a "<")."""
    if isinstance(allowed_special, AbstractSet) and not isinstance(allowed_special, (set, frozenset)):
        allowed_special = frozenset(allowed_special)
    if isinstance(disallowed_special, str) and disallowed_special != "all":
        raise TypeError(f"disallowed_special must be 'all' or a collection of special tokens, got the string "
                        f"{disallowed_special!r}; write disallowed_special={{{disallowed_special!r}}} for that one "
                        f"token")
    return allowed_special, disallowed_special


def _tensor_ids_as_list(tokens):
    """A tensor of ids as the list tiktoken takes (it refuses any tensor; numpy_ref's decode reads
    a 1-D integer tensor id by id): 1-D and of an integer dtype, else a TypeError naming the shape
    or dtype, the exception numpy_ref raises for a 0-d, 2-D or float tensor. An iterator or
    generator of ids becomes a list (tiktoken takes sequences only; numpy_ref any ordered
    iterable); a set or mapping, which has no order, is tiktoken's TypeError. Anything else as it is."""
    if not isinstance(tokens, torch.Tensor):
        if isinstance(tokens, Iterator):
            return list(tokens)
        return tokens
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"token ids must be integers, got a tensor of dtype {tokens.dtype}")
    if tokens.dim() != 1:
        raise TypeError(f"token ids must be a 1-D tensor (a sequence of ids), got shape {tuple(tokens.shape)}")
    return tokens.tolist()


@contextlib.contextmanager
def _regex_panic_as_value_error(text: str) -> Iterator[None]:
    """Turn tiktoken's regex failure (a PanicException, a BaseException, from `encode_ordinary`;
    a ValueError from `encode`) into a ValueError naming the longest whitespace run before a
    non-space; any other exception passes through unchanged."""
    try:
        yield
    except BaseException as exc:
        panic = type(exc).__name__ == "PanicException"  # pyo3_runtime is not importable by name
        if not (panic or isinstance(exc, ValueError) and str(exc).startswith("Regex error while tokenizing")):
            raise
        # fancy-regex's \s is Unicode White_Space, which leaves out \x1c-\x1f (Python's \s has them)
        runs = [m.span() for m in re.finditer(r"[^\S\x1c-\x1f]+(?=[\S\x1c-\x1f])", text)]
        start, end = max(runs, key=lambda span: span[1] - span[0], default=(0, 0))
        raise ValueError(
            f"tiktoken cannot split this text ({len(text):,} characters) into pieces: its regex engine gives up "
            f"on a run of {end - start:,} whitespace characters before a non-space (from character {start}); "
            f"runs up to about 1,000,000 characters work (openai/tiktoken#15; tiktoken said: {str(exc).strip()})"
        ) from exc


def get_encoding(name: str = "gpt2") -> Encoding:
    """The named encoding, built once per process from the packaged ranks, offline
    (get_encoding(), get_encoding("gpt2") and get_encoding(name="gpt2") are one object)."""
    if name not in ("gpt2", "r50k_base"):
        raise ValueError(f"unknown encoding {name!r}; this package ships 'gpt2' (alias 'r50k_base')")
    return _built_encoding(name)


@functools.lru_cache(maxsize=None)
def _built_encoding(name: str) -> Encoding:
    return Encoding(name=name, pat_str=GPT2_PAT_STR, mergeable_ranks=load_ranks(),
                    special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257)


get_encoding.cache_clear = _built_encoding.cache_clear  # as when get_encoding was the lru_cache itself
