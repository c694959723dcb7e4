"""GPT-2's tokenizer for the fast path: a tiktoken `Encoding` built offline from the packaged ranks.

`tiktoken.get_encoding("gpt2")` downloads its tables on first use; this module never does. It
reads `gpt_oracle/data/gpt2.tiktoken` (one `base64(token bytes) rank` per line), checks its
sha256 (this file's own copy of the hash, see `gpt_oracle/data/README.md`), parses it with
`tiktoken.load.load_tiktoken_bpe` and adds `<|endoftext|>` = 50256. tiktoken's file cache is
bypassed (`TIKTOKEN_CACHE_DIR` is irrelevant): a cache entry can neither replace the packaged
file nor be written by this module. The from-scratch twin is `numpy_ref/tokenizer.py`; a parity
test holds the two to the same ids.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import os
import tempfile
import threading
from pathlib import Path

import tiktoken
import tiktoken.load

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
    stale cache entry nor an unwritable cache directory can change what is loaded.
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


@functools.lru_cache(maxsize=None)
def get_encoding(name: str = "gpt2") -> tiktoken.Encoding:
    """The named tiktoken encoding, built once per process from the packaged ranks, offline."""
    if name not in ("gpt2", "r50k_base"):
        raise ValueError(f"unknown encoding {name!r}; this package ships 'gpt2' (alias 'r50k_base')")
    return tiktoken.Encoding(name=name, pat_str=GPT2_PAT_STR, mergeable_ranks=load_ranks(),
                             special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257)
