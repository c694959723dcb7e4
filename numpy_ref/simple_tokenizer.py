"""The book's simple word-level tokenizers (chapter 2): V1 and V2.

Text is split on whitespace and on the punctuation `, . : ; ? _ ! " ( ) '` and `--` (the
punctuation is kept as tokens, whitespace is dropped); the vocabulary is the sorted set of the
resulting tokens of a training text, each mapped to its position. Decoding joins tokens with
spaces and removes the space before `, . ? ! " ( ) '` (not before `: ; _ --`), so spacing is
not always restored exactly (`It's` comes back as `It' s`, `a (b)` as `a( b)`).

- V1 knows only its vocabulary: an unknown word is an error.
- V2 adds two special tokens at the end of the vocabulary, `<|endoftext|>` (between documents)
  and `<|unk|>` (any unknown word).

Reference: S. Raschka, "Build a Large Language Model (From Scratch)", section 2.3-2.4,
`SimpleTokenizerV1` and `SimpleTokenizerV2`.
"""

from __future__ import annotations

import operator
import re

SPLIT_PATTERN = r'([,.:;?_!"()\']|--|\s)'
UNK = "<|unk|>"
ENDOFTEXT = "<|endoftext|>"


def split_text(text: str) -> list[str]:
    """Text -> word and punctuation tokens, whitespace dropped."""
    return [item.strip() for item in re.split(SPLIT_PATTERN, text) if item.strip()]


def build_vocab(text: str, special_tokens: tuple[str, ...] = ()) -> dict[str, int]:
    """The sorted distinct tokens of `text`, then `special_tokens`, each -> its position.
    `special_tokens` is a sequence of strings; one string alone is a TypeError (it would add each
    of its characters as a token)."""
    if isinstance(special_tokens, (str, bytes)) or not all(isinstance(t, str) for t in special_tokens):
        raise TypeError(f"special_tokens must be a sequence of strings, got {special_tokens!r}")
    words = sorted(set(split_text(text)))
    for token in special_tokens:  # once each, so that the ids stay 0 .. len - 1
        if token not in words:
            words.append(token)
    return {word: i for i, word in enumerate(words)}


def join_tokens(tokens: list[str]) -> str:
    """Tokens -> text: joined by spaces, then the space before , . ? ! " ( ) ' removed (the book's
    rule: a space stays before : ; _ and --, and a "(" joins the word before it)."""
    return re.sub(r'\s+([,.?!"()\'])', r"\1", " ".join(tokens))


class SimpleTokenizerV1:
    """Word-level tokenizer over a fixed vocabulary; unknown words raise."""

    def __init__(self, vocab: dict[str, int]):
        self.str_to_int = dict(vocab)
        self.int_to_str = {i: s for s, i in vocab.items()}
        if len(self.int_to_str) != len(self.str_to_int):
            raise ValueError("vocabulary maps two words to the same id")

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in split_text(text):
            if word not in self.str_to_int:
                raise KeyError(f"{word!r} is not in the vocabulary ({len(self.str_to_int)} words); "
                               "SimpleTokenizerV2 maps unknown words to <|unk|>")
            ids.append(self.str_to_int[word])
        return ids

    def decode(self, ids: list[int]) -> str:
        # Looked up by operator.index, as the BPE decoder does: 3.0 hashes like 3 and would
        # otherwise decode as it (TypeError instead); an int-like id (np.int64) decodes as its value.
        ids = list(ids)  # read twice below
        indices = [operator.index(i) for i in ids]
        for i, index in zip(ids, indices):
            if index not in self.int_to_str:
                raise KeyError(f"id {i!r} is not in the vocabulary (ids 0 .. {len(self.int_to_str) - 1})")
        return join_tokens([self.int_to_str[index] for index in indices])


class SimpleTokenizerV2(SimpleTokenizerV1):
    """V1 plus `<|unk|>` for unknown words; the vocabulary must hold `<|unk|>` and `<|endoftext|>`."""

    def __init__(self, vocab: dict[str, int]):
        missing = [t for t in (UNK, ENDOFTEXT) if t not in vocab]
        if missing:
            raise ValueError(f"SimpleTokenizerV2 needs {missing} in its vocabulary; "
                             f"build it with build_vocab(text, special_tokens=({ENDOFTEXT!r}, {UNK!r}))")
        super().__init__(vocab)

    def encode(self, text: str) -> list[int]:
        return [self.str_to_int.get(word, self.str_to_int[UNK]) for word in split_text(text)]
