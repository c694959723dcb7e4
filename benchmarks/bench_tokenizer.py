"""Encoding throughput: the from-scratch BPE (numpy_ref) against tiktoken, single-threaded.

The text is a few MB of mixed material, built deterministically: the-verdict repeated (English
prose, a small vocabulary: the word cache hits), plus generated text with a large vocabulary
(words built from syllables in Latin, Greek, Cyrillic, CJK, Arabic and Devanagari scripts,
numbers, emoji) and generated code (identifiers, operators, indentation, CRLF line ends), which
keeps the cache missing and exercises the merge loop.

Both encoders run in the same process on the same text: tiktoken's `encode_ordinary` (Rust,
one thread), and ours from a fresh `Encoding` with an empty word cache (so its time includes
every cache miss), each the best of `repeats` runs. The ids are compared too. Target: ours
within 5x of tiktoken's time, with the cache bounded (`cache_maxsize` entries).

`run(quick=False) -> dict` is called by `gpt-oracle bench`; `python -m benchmarks.bench_tokenizer`
prints the dict.
"""

from __future__ import annotations

import random
import time

TARGET_RATIO = 5.0

_SYLLABLES = {
    "latin": ["ka", "ro", "ment", "ing", "tion", "ver", "ful", "pre", "un", "ble", "sta", "qu", "ex", "ly", "or", "ness"],
    "greek": ["κα", "λη", "μέ", "ρα", "στο", "πο", "λύ", "νι", "κή", "θε", "ός", "ἀ"],
    "cyrillic": ["при", "вет", "ско", "ро", "ва", "ния", "ть", "ный", "кон", "стру", "же", "мир"],
    "cjk": ["日", "本", "語", "中", "文", "学", "生", "大", "人", "国", "時", "間", "東", "京"],
    "arabic": ["ال", "كت", "اب", "مد", "رس", "ة", "سل", "ام", "ع", "لي"],
    "devanagari": ["न", "म", "स्", "ते", "भा", "र", "त", "हि", "न्", "दी"],
}
_EMOJI = ["🙂", "👍🏽", "🚀", "🇫🇷", "👨‍👩‍👧", "✨", "❤️"]
_CODE_WORDS = ["self", "return", "def", "class", "import", "for", "in", "if", "else", "None", "True", "lambda", "yield"]
_OPERATORS = [" = ", " == ", " += ", "(", ")", "[", "]", "{", "}", ": ", ", ", ".", " -> ", " * ", " / ", "**", "->"]


def _word(rng: random.Random, script: str) -> str:
    return "".join(rng.choice(_SYLLABLES[script]) for _ in range(rng.randint(1, 4)))


def _prose(rng: random.Random, n_chars: int) -> str:
    out, size = [], 0
    while size < n_chars:
        script = rng.choice(list(_SYLLABLES))
        sentence = " ".join(_word(rng, script) for _ in range(rng.randint(3, 12)))
        extras = [str(rng.randint(0, 10**rng.randint(1, 7))), rng.choice(_EMOJI), rng.choice(["'s", "'ll", "'re", ""])]
        line = sentence.capitalize() + " " + " ".join(extras) + rng.choice([". ", "! ", "? ", "\n", "\n\n", "  "])
        out.append(line)
        size += len(line)
    return "".join(out)


def _code(rng: random.Random, n_chars: int) -> str:
    out, size = [], 0
    while size < n_chars:
        name = "_".join(_word(rng, "latin") for _ in range(rng.randint(1, 3)))
        indent = " " * (4 * rng.randint(0, 3))
        line = indent + rng.choice(_CODE_WORDS) + " " + name
        for _ in range(rng.randint(1, 5)):
            line += rng.choice(_OPERATORS) + rng.choice([name, str(rng.randint(0, 999)), rng.choice(_CODE_WORDS), "x" + str(rng.randint(0, 9))])
        line += rng.choice(["\n", "\r\n", "\n\n", "  # note\n"])
        out.append(line)
        size += len(line)
    return "".join(out)


def mixed_text(n_chars: int, seed: int = 0) -> str:
    """About `n_chars` characters: half the-verdict repeated, a quarter prose, a quarter code."""
    from numpy_ref.data import load_verdict

    rng = random.Random(seed)
    verdict = load_verdict()
    repeats = max(1, n_chars // 2 // len(verdict))
    return verdict * repeats + _prose(rng, n_chars // 4) + _code(rng, n_chars // 4)


def _best_time(fn, text: str, repeats: int) -> tuple[float, list[int]]:
    best, ids = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        ids = fn(text)
        best = min(best, time.perf_counter() - start)
    return best, ids


def run(quick: bool = False) -> dict:
    """Time both encoders on the mixed text; returns times, MB/s, the ratio and the cache size."""
    import numpy_ref.tokenizer as np_tok
    import torch_impl.tokenizer as pt_tok

    n_chars = 400_000 if quick else 3_000_000
    text = mixed_text(n_chars)
    n_bytes = len(text.encode("utf-8"))
    megabytes = n_bytes / 1e6

    tiktoken_enc = pt_tok.get_encoding("gpt2")
    tiktoken_s, tiktoken_ids = _best_time(tiktoken_enc.encode_ordinary, text, repeats=3)

    # A fresh encoder for each timed run: each starts with an empty word cache.
    ranks = np_tok.load_ranks()
    ours_s, ours_ids, ours = float("inf"), None, None
    for _ in range(1 if quick else 2):
        ours = np_tok.Encoding("gpt2", pat_str=np_tok.GPT2_PAT_STR, mergeable_ranks=ranks,
                               special_tokens={np_tok.ENDOFTEXT: 50256})
        seconds, ours_ids = _best_time(ours.encode_ordinary, text, repeats=1)
        ours_s = min(ours_s, seconds)
    cache = ours.cache_info()
    warm_s, _ = _best_time(ours.encode_ordinary, text, repeats=1)  # the same text again: cache warm

    ratio = ours_s / tiktoken_s
    return {
        "name": "tokenizer",
        "quick": quick,
        "text_chars": len(text),
        "text_megabytes": round(megabytes, 3),
        "tokens": len(tiktoken_ids),
        "ids_equal": ours_ids == tiktoken_ids,
        "tiktoken_s": tiktoken_s,
        "ours_s": ours_s,
        "ours_warm_s": warm_s,
        "tiktoken_mb_per_s": megabytes / tiktoken_s,
        "ours_mb_per_s": megabytes / ours_s,
        "ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "within_target": ratio <= TARGET_RATIO,
        "cache_size": cache.currsize,
        "cache_maxsize": cache.maxsize,
        "cache_hits": cache.hits,
        "cache_misses": cache.misses,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
