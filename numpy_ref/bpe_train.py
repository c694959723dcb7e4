"""Training a byte-level BPE vocabulary from a corpus, saved in tiktoken's `.tiktoken` format.

The algorithm (Sennrich et al. 2016, at the byte level as in GPT-2):

1. Cut the corpus into pieces with the pre-tokenisation pattern (GPT-2's by default) and count
   each distinct piece. Merges never cross a piece boundary.
2. Start from the 256 single bytes: byte `i` gets rank (= id) `i`.
3. Repeat until the vocabulary has `vocab_size` tokens: count every adjacent pair of tokens over
   all pieces (weighted by how often each piece occurs), take the most frequent pair, give the
   concatenation the next rank, and merge that pair everywhere, left to right without overlap.
   Counting takes every adjacent position, overlapping ones too: "aaa" counts (a, a) twice,
   though merging it gives [aa, a] (as minbpe and Hugging Face's trainer count).

Tie-break (documented and deterministic, independent of dict order): among pairs with the
highest count, the pair `(left, right)` with the smallest left id wins, then the smallest right
id; i.e. the pair built from the earliest-learned tokens.

Two different pairs can concatenate to the same bytes (`(ab, c)` and `(a, bc)` both give `abc`).
A `.tiktoken` file maps bytes to one rank, so when the winning pair's bytes are already a token
the pair is merged into that existing token and no new rank is used. This is a guard: no corpus
tried has reached it (a review drew thousands), and global left-to-right merges seem to rule
it out, since a merged pair's adjacency never forms again; but nothing here depends on that.

The saved file is what tiktoken loads (`tiktoken.load.load_tiktoken_bpe`); tiktoken and
`numpy_ref.tokenizer.Encoding` built from it encode identically (a parity test checks this).
Encoding with the learned table uses tiktoken's rule (lowest rank of the merged bytes first),
which is not always the merge order seen during training; both trees use that rule, so they agree.
"""

from __future__ import annotations

import base64
import heapq
import operator
from collections import Counter
from pathlib import Path
from typing import Collection

import regex

from numpy_ref.checkpoint_files import atomic_write
from numpy_ref.tokenizer import ENDOFTEXT, GPT2_PAT_STR, Encoding, Pretokenizer


def _pairs(word: list[int]) -> list[tuple[int, int]]:
    return list(zip(word, word[1:]))  # (n,) -> (n-1,) adjacent pairs


def _merge_word(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each occurrence of `pair` in `word`, left to right without overlap, by `new_id`."""
    out: list[int] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe(text: str, vocab_size: int, pat_str: str = GPT2_PAT_STR,
              special_tokens: Collection[str] = ()) -> dict[bytes, int]:
    """Learn `vocab_size` tokens (256 bytes + merges) from `text` -> {token bytes: rank}.

    `special_tokens` (e.g. `<|endoftext|>` between documents) are cut out of the text first: they
    get ids of their own (train_encoding), so no merge learns their characters or spans them.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if isinstance(vocab_size, bool) or not hasattr(type(vocab_size), "__index__"):  # True is not a size; 300.0 is refused
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    vocab_size = operator.index(vocab_size)  # a numpy integer is read as its value
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 (the single bytes), got {vocab_size}")
    # Lone surrogates cannot be UTF-8 encoded: U+FFFD in their place, as the tokenizer's encode does.
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(special_tokens, (str, bytes)) or not isinstance(special_tokens, Collection):
        raise TypeError(f"special_tokens must be a collection of strings, got {special_tokens!r}")
    for i, token in enumerate(special_tokens):
        if not isinstance(token, str):
            raise TypeError(f"special_tokens item {i} is {token!r} ({type(token).__name__}); each must be a str")
    # Longest first, so that a special token containing another is cut whole.
    cut = "|".join(regex.escape(t) for t in sorted(special_tokens, key=len, reverse=True) if t)
    segments = regex.split(cut, text) if cut else [text]  # the text between special tokens
    pieces = Pretokenizer(pat_str)  # as Encoding cuts text: Unicode 16.0's letters and numbers
    piece_counts = Counter(piece.encode("utf-8") for segment in segments for piece in pieces.findall(segment))
    words = [list(piece) for piece in piece_counts]  # each distinct piece as byte ids
    freqs = list(piece_counts.values())

    token_bytes = [bytes([i]) for i in range(256)]
    rank_of = {token: rank for rank, token in enumerate(token_bytes)}

    # pair -> weighted count, and pair -> indices of the words that (may) contain it
    pair_counts: Counter[tuple[int, int]] = Counter()
    pair_words: dict[tuple[int, int], set[int]] = {}
    for w, word in enumerate(words):
        for pair in _pairs(word):
            pair_counts[pair] += freqs[w]
            pair_words.setdefault(pair, set()).add(w)
    # A max-heap of (-count, left id, right id): its top is the most frequent pair, ties to the
    # smallest (left, right). A count that changes is pushed again; an entry whose count is no
    # longer the pair's current count is stale and skipped when it comes to the top.
    heap = [(-count, *pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    while len(token_bytes) < vocab_size:
        best = None
        while heap and best is None:
            negative_count, left, right = heapq.heappop(heap)
            if pair_counts.get((left, right)) == -negative_count:
                best = (left, right)
        if best is None:
            why = "every piece is a single token" if words else "the text has no pieces to learn from"
            raise ValueError(f"the corpus supports only {len(token_bytes)} tokens ({why}), "
                             f"fewer than vocab_size={vocab_size}")
        merged = token_bytes[best[0]] + token_bytes[best[1]]
        if merged in rank_of:
            new_id = rank_of[merged]  # same bytes reached by another pair: reuse that token
        else:
            new_id = len(token_bytes)
            token_bytes.append(merged)
            rank_of[merged] = new_id
        # Only the words holding the pair change: take their old pairs out, put their new ones in.
        changed: set[tuple[int, int]] = set()
        for w in sorted(pair_words.pop(best)):
            old = words[w]
            new = _merge_word(old, best, new_id)
            if len(new) == len(old):
                continue  # a stale index: an earlier merge already consumed the pair here
            for pair in _pairs(old):
                pair_counts[pair] -= freqs[w]
                if pair_counts[pair] == 0:
                    del pair_counts[pair]
            for pair in _pairs(new):
                pair_counts[pair] += freqs[w]
                pair_words.setdefault(pair, set()).add(w)
            changed.update(_pairs(old), _pairs(new))
            words[w] = new
        pair_counts.pop(best, None)
        for pair in sorted(changed):
            if pair in pair_counts:
                heapq.heappush(heap, (-pair_counts[pair], *pair))
    return rank_of


def save_tiktoken_bpe(ranks: dict[bytes, int], path: str | Path) -> None:
    """Write `ranks` as a `.tiktoken` file (`base64(token) rank` per line, by rank), atomically.

    Refused, naming the first offender: a token that is not non-empty bytes (an empty token
    writes a line no loader reads back), and ranks that are not exactly 0 .. n-1, each once."""
    for token, rank in ranks.items():
        if not isinstance(token, bytes) or not token:
            raise ValueError(f"token {token!r} (rank {rank!r}): every token must be non-empty bytes")
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise ValueError(f"token {token!r} has rank {rank!r}; ranks must be ints")
    seen = Counter(ranks.values())
    for expected in range(len(ranks)):
        if seen[expected] != 1:
            what = "is missing" if seen[expected] == 0 else f"is given to {seen[expected]} tokens"
            raise ValueError(f"ranks must be exactly 0 .. {len(ranks) - 1}, each once, to be loaded by tiktoken: "
                             f"rank {expected} {what}")
    lines = [base64.b64encode(token) + b" " + str(rank).encode() for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    atomic_write(path, lambda f: f.write(b"\n".join(lines) + b"\n"))  # a reader never sees half a file


def train_encoding(text: str, vocab_size: int, name: str = "trained", pat_str: str = GPT2_PAT_STR) -> Encoding:
    """A ready Encoding from `train_bpe`, with `<|endoftext|>` as the id after the last rank (and
    cut out of the training text: its characters are not learned as ordinary text).

    `vocab_size` counts the learned tokens only: the encoding has vocab_size + 1 ids (n_vocab),
    `<|endoftext|>` being id vocab_size. A model for it needs GPTConfig.vocab_size >= n_vocab
    (GPT-2's 50257 is 50256 learned tokens plus end-of-text)."""
    ranks = train_bpe(text, vocab_size, pat_str, special_tokens=(ENDOFTEXT,))
    return Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: len(ranks)})
