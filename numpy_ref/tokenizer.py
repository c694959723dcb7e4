"""GPT-2's byte-level byte-pair encoder, from scratch, matching tiktoken id for id.

Encoding a text takes three steps:

1. Special tokens. `<|endoftext|>` (id 50256) is split out first when it is allowed; when it is
   disallowed (the default) its text raises ValueError; `encode_ordinary` treats it as text.
2. Pre-tokenisation. GPT-2's pattern cuts the text into pieces ("words"): contractions
   ('s 't 're 've 'm 'll 'd), letters with one optional leading space, digits likewise, other
   symbols likewise, and whitespace runs (a run before a word gives its last space to the word).
   Merges never cross a piece boundary.
3. Byte-pair merging. Each piece is UTF-8 encoded, split into single bytes, and the adjacent
   pair whose concatenation has the lowest rank in the ranks table is merged, again and again,
   until no adjacent pair concatenates to a token. Ranks double as ids. (This is tiktoken's
   formulation, by rank of the merged bytes; GPT-2's original `encoder.py` ranks the pair, which
   gives the same result on GPT-2's table.)

Decoding joins the tokens' bytes and decodes them as UTF-8 (invalid bytes, e.g. half of an
emoji, become U+FFFD, as in tiktoken).

The ranks table is `gpt_oracle/data/gpt2.tiktoken` (one `base64(token bytes) rank` per line,
the format tiktoken loads); its sha256 is checked on load. The interface is the part of
tiktoken's that a GPT-2 pipeline uses (`get_encoding("gpt2")`, `encode`, `encode_ordinary`,
`encode_batch`, `decode`, `decode_bytes`, `n_vocab`, `eot_token`, ...), with tiktoken's names
and arguments; tiktoken's other methods (`encode_to_numpy`, `decode_with_offsets`,
`encode_with_unstable`, ...) are not here.

Reference: Sennrich et al. 2016 (BPE for words); Radford et al. 2019 (GPT-2, byte level);
openai/tiktoken `src/lib.rs` (`byte_pair_merge`, special-token handling).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import heapq
import importlib.resources
import operator
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from itertools import chain
from pathlib import Path
from typing import Collection, Literal

import regex

GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
ENDOFTEXT = "<|endoftext|>"
# GPT-2's pre-tokenisation pattern, as tiktoken writes it (possessive quantifiers; `\s` is the
# Unicode White_Space property in the `regex` package, as in Rust's regex crate). Python's `$`
# also matches before a final newline, Rust's does not; the possessive `\s++` has always taken
# that newline already, so the two agree (a test runs every code point through both).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
DEFAULT_CACHE_SIZE = 1 << 16  # pieces kept in the piece -> ids cache (~10 MB for ordinary words)
# Longer pieces are merged each time, never cached: the cache is bounded by count, and 65,536
# pieces of 50,000 characters would hold about 18 GB (200 of them held 55 MB).
CACHE_MAX_PIECE_CHARS = 256
# The 4657 letters and numbers Unicode 17.0 added, in 26 runs: the code points that `regex`
# 2026.5.9 (Unicode 17.0 tables) matches as \p{L} or \p{N} and `regex` 2024.11.6 (Unicode 16.0)
# as \p{Cn}, unassigned. tiktoken 0.14 splits text with Unicode 16.0's
# classes: these are neither letters nor numbers to it, and, read as letters, "\ua7ce'd" was
# ["\ua7ce", "'d"] here against its ["\ua7ce'", "d"] (a test runs every code point through both).
UNICODE_17_LETTERS_NUMBERS = (
    (0x088F, 0x088F), (0x0C5C, 0x0C5C), (0x0CDC, 0x0CDC), (0xA7CE, 0xA7CF), (0xA7D2, 0xA7D2), (0xA7D4, 0xA7D4),
    (0xA7F1, 0xA7F1), (0x10940, 0x10959), (0x10EC5, 0x10EC7), (0x11DB0, 0x11DDB), (0x11DE0, 0x11DE9),
    (0x16EA0, 0x16EB8), (0x16EBB, 0x16ED3), (0x16FF2, 0x16FF6), (0x187F8, 0x187FF), (0x18D09, 0x18D1E),
    (0x18D80, 0x18DF2), (0x1E6C0, 0x1E6DE), (0x1E6E0, 0x1E6E2), (0x1E6E4, 0x1E6E5), (0x1E6E7, 0x1E6ED),
    (0x1E6F0, 0x1E6F4), (0x1E6FE, 0x1E6FF), (0x2B73A, 0x2B73F), (0x2CEA2, 0x2CEAD), (0x323B0, 0x33479),
)  # (first, last) code point of each run


class Pretokenizer:
    r"""The pieces `pat_str` cuts a text into, with \p{L} and \p{N} as Unicode 16.0 has them
    (tiktoken's), whichever Unicode version the installed `regex` knows: the pattern with
    UNICODE_17_LETTERS_NUMBERS taken out of both classes (a set difference, `regex`'s V1 syntax)
    for a text holding one of them, and as written otherwise (the same pieces; the set
    difference runs at half the speed)."""

    NEWER = frozenset(chr(cp) for first, last in UNICODE_17_LETTERS_NUMBERS for cp in range(first, last + 1))

    def __init__(self, pat_str: str):
        self.plain = regex.compile(pat_str)
        newer = "".join(f"\\U{first:08x}-\\U{last:08x}" for first, last in UNICODE_17_LETTERS_NUMBERS)
        restricted = pat_str.replace(r"\p{L}", rf"[\p{{L}}--[{newer}]]").replace(r"\p{N}", rf"[\p{{N}}--[{newer}]]")
        self.unicode16 = regex.compile(restricted, flags=regex.VERSION1)

    def findall(self, text: str) -> list[str]:
        # An ASCII text is checked at once, another in one pass over its characters (2-4 ms for 200k)
        newer = not text.isascii() and not self.NEWER.isdisjoint(text)
        return (self.unicode16 if newer else self.plain).findall(text)


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
    """Parse a `.tiktoken` ranks file: one `base64(token) rank` per line -> {token bytes: rank}."""
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(read_verified(path, expected_sha256).splitlines(), start=1):
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{path}:{line_no}: expected 'base64 rank', got {line[:60]!r}")
        token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        if token in ranks:
            raise ValueError(f"{path}:{line_no}: token {token!r} appears twice")
        ranks[token] = rank
    if len(set(ranks.values())) != len(ranks):
        raise ValueError(f"{path}: two tokens share a rank")
    return ranks


def gpt2_ranks_path():
    """The packaged GPT-2 ranks file (a Traversable; `str()` of it is a path for a normal install)."""
    return importlib.resources.files("gpt_oracle.data") / "gpt2.tiktoken"


def load_ranks(path: str | Path | None = None, expected_sha256: str | None = GPT2_TIKTOKEN_SHA256) -> dict[bytes, int]:
    """GPT-2's ranks: the packaged file by default, hash-checked."""
    if path is None:
        with importlib.resources.as_file(gpt2_ranks_path()) as packaged:
            return load_tiktoken_bpe(packaged, expected_sha256)
    return load_tiktoken_bpe(path, expected_sha256)


def byte_pair_merge(piece: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """Split `piece` into tokens by repeatedly merging the adjacent pair of lowest merged rank.

    Equal ranks mean equal bytes at two places; the leftmost merges first (tiktoken's rule).
    The parts are a linked list over byte offsets: a part is `piece[s : end[s]]`, `prev[s]` is
    the start of the part before it. Each adjacent pair whose concatenation is a token waits in
    a heap as `(rank, left start, right end)`, so the heap pops the lowest rank, leftmost first.
    Parts only grow, so an entry is stale exactly when its left part has been absorbed or its
    right neighbour no longer ends at `right end`; stale entries are skipped when popped. This
    costs O(n log n) per piece, where rescanning all pairs after each merge costs O(n^2) (a
    20,000-character run of one letter takes seconds that way).
    """
    n = len(piece)
    end = list(range(1, n + 1))  # (n,) end[s]: where the part starting at s ends; 0 once absorbed
    prev = list(range(-1, n - 1))  # (n,) prev[s]: start of the part before the part at s
    heap = [(ranks[piece[s : s + 2]], s, s + 2) for s in range(n - 1) if piece[s : s + 2] in ranks]
    heapq.heapify(heap)
    while heap:
        _, left, right_end = heapq.heappop(heap)
        right = end[left]  # start of the left part's current right neighbour
        if right <= left or right == n or end[right] != right_end:
            continue  # stale
        end[left], end[right] = right_end, 0  # the two parts become one
        if right_end < n:  # the new part and its right neighbour
            prev[right_end] = left
            _push_pair(heap, piece, ranks, left, end[right_end])
        if left > 0:  # the left neighbour and the new part
            _push_pair(heap, piece, ranks, prev[left], right_end)
    parts, s = [], 0
    while s < n:
        parts.append(piece[s : end[s]])
        s = end[s]
    return parts


def _push_pair(heap: list, piece: bytes, ranks: dict[bytes, int], left: int, right_end: int) -> None:
    rank = ranks.get(piece[left:right_end])
    if rank is not None:
        heapq.heappush(heap, (rank, left, right_end))


class Encoding:
    """A byte-level BPE encoding with tiktoken's interface (the constructor's keywords included)."""

    def __init__(self, name: str, *, pat_str: str, mergeable_ranks: dict[bytes, int],
                 special_tokens: dict[str, int], cache_size: int = DEFAULT_CACHE_SIZE):
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self._cache_size = cache_size
        self.name = name
        self._pat_str = pat_str
        self._pat = Pretokenizer(pat_str)
        self._mergeable_ranks = dict(mergeable_ranks)
        self._special_tokens = dict(special_tokens)
        self._decoder = {rank: token for token, rank in self._mergeable_ranks.items()}
        for text, rank in self._special_tokens.items():
            if rank in self._decoder:
                raise ValueError(f"special token {text!r} has id {rank}, already the id of {self._decoder[rank]!r}")
            self._decoder[rank] = text.encode("utf-8")
        if len(self._decoder) != len(self._mergeable_ranks) + len(self._special_tokens):
            raise ValueError("two tokens share an id")
        self.max_token_value = max(self._decoder)
        # The bounded cache: word -> ids. Text repeats its words (Zipf), so most pieces hit.
        self._encode_piece = functools.lru_cache(maxsize=cache_size)(self._bpe_piece)

    def __reduce__(self):
        """Pickled (and deep-copied) as its constructor's arguments: the cache, a wrapper bound to
        this instance, is rebuilt empty (it could not be pickled, and a deep copy shared it)."""
        return (_rebuild_encoding, (self.name, self._pat_str, self._mergeable_ranks, self._special_tokens,
                                    self._cache_size))

    def __repr__(self) -> str:
        return f"<numpy_ref Encoding {self.name!r}>"

    def _ids_of_pieces(self, pieces: list[str]) -> list[int]:
        """The pieces' ids, in order: through the cache, but a piece longer than
        CACHE_MAX_PIECE_CHARS merged directly (see there)."""
        cached, direct = self._encode_piece, self._bpe_piece
        return list(chain.from_iterable(cached(p) if len(p) <= CACHE_MAX_PIECE_CHARS else direct(p) for p in pieces))

    # ---- properties of the vocabulary -----------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self.max_token_value + 1

    @property
    def eot_token(self) -> int:
        return self._special_tokens[ENDOFTEXT]

    @property
    def special_tokens_set(self) -> set[str]:
        return set(self._special_tokens)

    def cache_info(self):
        """functools' CacheInfo(hits, misses, maxsize, currsize) of the word -> ids cache."""
        return self._encode_piece.cache_info()

    # ---- encoding ---------------------------------------------------------------------------
    def _bpe_piece(self, piece: str) -> tuple[int, ...]:
        """One pre-tokenised piece -> its ids. A piece that is itself a token is looked up whole
        (tiktoken does the same, before merging)."""
        data = piece.encode("utf-8")
        rank = self._mergeable_ranks.get(data)
        if rank is not None:
            return (rank,)
        return tuple(self._mergeable_ranks[part] for part in byte_pair_merge(data, self._mergeable_ranks))

    def encode_ordinary(self, text: str) -> list[int]:
        """Text -> ids, with special-token text encoded as ordinary text."""
        if not isinstance(text, str):  # tiktoken's TypeError (None failed here on .isascii)
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:
            return self._ids_of_pieces(self._pat.findall(text))
        except UnicodeEncodeError:
            # Lone surrogates cannot be UTF-8 encoded; tiktoken replaces them with U+FFFD.
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self._ids_of_pieces(self._pat.findall(text))

    def encode(self, text: str, *, allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
               disallowed_special: Literal["all"] | Collection[str] = "all") -> list[int]:
        """Text -> ids. Special-token text raises ValueError unless allowed (tiktoken's policy):

        - `allowed_special`: "all" or a set of special tokens to encode as their single id;
        - `disallowed_special`: "all" (= every special token not allowed) or a collection of
          special tokens whose text raises; `()` encodes remaining special text as ordinary text.

        A string other than "all" as `allowed_special` is a TypeError (tiktoken's too), as is a list or
        tuple (tiktoken's `special_tokens_set - allowed_special` fails on one): read as a
        set of its characters it would allow nothing, so `allowed_special="<|endoftext|>"` would
        silently encode that text as ordinary text.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if isinstance(allowed_special, str) and allowed_special != "all":
            raise TypeError(
                f"allowed_special must be 'all' or a set of special tokens, got the string {allowed_special!r}; "
                f"write allowed_special={{{allowed_special!r}}} for that one token"
            )
        if isinstance(disallowed_special, str) and disallowed_special != "all":  # a set of its characters
            raise TypeError(f"disallowed_special must be 'all' or a collection of special tokens, got the string "
                            f"{disallowed_special!r}; write disallowed_special={{{disallowed_special!r}}} for that "
                            f"one token")
        if not isinstance(allowed_special, (str, AbstractSet)):  # a list: tiktoken fails on set - list
            raise TypeError(f"allowed_special must be 'all' or a set of special tokens, got a "
                            f"{type(allowed_special).__name__}: {allowed_special!r}")
        if allowed_special == "all":
            allowed_special = self.special_tokens_set
        if disallowed_special == "all":
            disallowed_special = self.special_tokens_set - set(allowed_special)
        if disallowed_special:
            match = _special_regex(frozenset(disallowed_special)).search(text)
            if match:
                raise ValueError(
                    f"text contains the disallowed special token {match.group()!r} at character {match.start()}; "
                    f"pass allowed_special={{{match.group()!r}}} to encode it as its id, or "
                    "disallowed_special=() to encode it as ordinary text"
                )
        allowed = frozenset(allowed_special) & frozenset(self._special_tokens)
        if not allowed:
            return self.encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for match in _special_regex(allowed).finditer(text):
            ids += self.encode_ordinary(text[start : match.start()])  # each segment is pre-tokenised alone
            ids.append(self._special_tokens[match.group()])
            start = match.end()
        ids += self.encode_ordinary(text[start:])
        return ids

    def encode_batch(self, texts: list[str], *, num_threads: int = 8, **kwargs) -> list[list[int]]:
        """`encode` of each text. `num_threads` is tiktoken's keyword, accepted so that code written
        for tiktoken runs here; the oracle encodes one text after another."""
        return [self.encode(t, **kwargs) for t in texts]

    def encode_single_token(self, text_or_bytes: str | bytes) -> int:
        """The id of one whole token (ordinary bytes or special text); KeyError if it is not one."""
        if not isinstance(text_or_bytes, (str, bytes)):
            raise TypeError(f"encode_single_token takes a str or bytes, got {type(text_or_bytes).__name__}")
        data = text_or_bytes.encode("utf-8") if isinstance(text_or_bytes, str) else text_or_bytes
        if data in self._mergeable_ranks:
            return self._mergeable_ranks[data]
        text = data.decode("utf-8", errors="replace")
        if text in self._special_tokens:
            return self._special_tokens[text]
        raise KeyError(f"{text_or_bytes!r} is not a single token of {self.name!r}")

    # ---- decoding ---------------------------------------------------------------------------
    def decode_single_token_bytes(self, token: int) -> bytes:
        # TypeError for 3.0, as tiktoken: a float equal to an id must not decode as it. The lookup
        # is by the index, not the object: a 0-d torch tensor is an index but hashes by identity.
        index = operator.index(token)
        if index not in self._decoder:
            raise ValueError(f"token id {index} is not in the vocabulary (ids 0 .. {self.max_token_value})")
        return self._decoder[index]

    def decode_tokens_bytes(self, tokens: list[int]) -> list[bytes]:
        return [self.decode_single_token_bytes(t) for t in tokens]

    def decode_bytes(self, tokens: list[int]) -> bytes:
        if isinstance(tokens, (AbstractSet, Mapping)):  # no order to decode in (tiktoken: TypeError too)
            raise TypeError(f"tokens must be a sequence of ids, got a {type(tokens).__name__}")
        shape = getattr(tokens, "shape", None)
        if shape is not None and len(shape) != 1:  # an array or tensor: its rows would each pass as one id
            raise TypeError(f"token ids must be a 1-D sequence of ids, got shape {tuple(shape)}")
        dtype = str(getattr(tokens, "dtype", ""))  # NumPy's "bool", "float32"; torch's "torch.bool", ...
        if any(kind in dtype for kind in ("bool", "float", "complex")):  # True would decode as id 1
            raise TypeError(f"token ids must be integers, got a {type(tokens).__name__} of dtype {dtype}")
        tokens = tokens if isinstance(tokens, (list, tuple)) else list(tokens)  # read twice below
        try:
            out = b"".join(self._decoder[t] for t in tokens)
        except (KeyError, TypeError):
            # The slow path only to name the first bad id (decode_single_token_bytes raises).
            return b"".join(self.decode_single_token_bytes(t) for t in tokens)
        if any(type(t) is not int for t in tokens):  # 3.0 hashes like 3: found, but not an id (tiktoken: TypeError)
            for t in tokens:
                operator.index(t)
        return out

    def decode(self, tokens: list[int], errors: str = "replace") -> str:
        """Ids -> text; bytes that are not valid UTF-8 become U+FFFD (errors="replace")."""
        return self.decode_bytes(tokens).decode("utf-8", errors=errors)

    def decode_batch(self, batch: list[list[int]], errors: str = "replace", *, num_threads: int = 8) -> list[str]:
        """`decode` of each list; `num_threads` as in `encode_batch`."""
        return [self.decode(tokens, errors=errors) for tokens in batch]


@functools.lru_cache(maxsize=64)
def _special_regex(tokens: frozenset[str]) -> regex.Pattern:
    # Longer tokens first, so a token that is a prefix of another does not shadow it.
    return regex.compile("|".join(regex.escape(t) for t in sorted(tokens, key=lambda t: (-len(t), t))))


def _rebuild_encoding(name, pat_str, mergeable_ranks, special_tokens, cache_size) -> Encoding:
    return Encoding(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens,
                    cache_size=cache_size)


def get_encoding(name: str = "gpt2") -> Encoding:
    """The named encoding, built once per process from the packaged, hash-checked ranks file
    (get_encoding(), get_encoding("gpt2") and get_encoding(name="gpt2") are one object)."""
    if name not in ("gpt2", "r50k_base"):
        raise ValueError(f"unknown encoding {name!r}; this package ships 'gpt2' (alias 'r50k_base')")
    return _built_encoding(name)


@functools.lru_cache(maxsize=None)
def _built_encoding(name: str) -> Encoding:
    return Encoding(name, pat_str=GPT2_PAT_STR, mergeable_ranks=load_ranks(), special_tokens={ENDOFTEXT: 50256})


get_encoding.cache_clear = _built_encoding.cache_clear  # as when get_encoding was the lru_cache itself
