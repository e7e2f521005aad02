"""Deterministic stand-ins for a tokenizer, a language model and an embedding model.

Token counting (the simulator's "tokenizer"): every run of up to six ASCII letters or digits is
one token, and every other non-space character (punctuation, symbols, each non-ASCII
character) is one token on its own; white space is free. So ``"Hello, world!"`` is 4 tokens and
``"tokenization"`` is 2 (``tokeni`` + ``zation``). English text comes out at about 1.2-1.3 tokens
per word, close to real BPE tokenizers.

Chat prompts are counted through a template: each message costs its content plus
`CHAT_TOKENS_PER_MESSAGE` (role header and end-of-turn markers), and the assistant's
generation prompt costs `CHAT_GENERATION_PROMPT_TOKENS`.

Generated text is a sequence of pieces that are each exactly one token under that rule
(short words with a leading space, and ``,`` / ``.``), drawn from a random generator seeded by
a hash of the request, so the same request always gets the same text and
``count_tokens(text) == completion_tokens``. A scripted answer (the simulator's skill) is cut
into one-token pieces the same way by `text_pieces`.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections.abc import Sequence

import numpy as np

TOKEN_RE = re.compile(r"[A-Za-z0-9]{1,6}|[^\sA-Za-z0-9]")
CHAT_TOKENS_PER_MESSAGE = 4
CHAT_GENERATION_PROMPT_TOKENS = 3
DRAWN_LENGTH_RANGE = (16, 256)

# Common words of at most six letters: each is one token.
_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "it",
    "for",
    "as",
    "with",
    "was",
    "on",
    "be",
    "by",
    "at",
    "this",
    "from",
    "are",
    "or",
    "an",
    "not",
    "have",
    "had",
    "but",
    "which",
    "one",
    "all",
    "were",
    "we",
    "they",
    "can",
    "has",
    "more",
    "their",
    "been",
    "will",
    "if",
    "there",
    "so",
    "no",
    "would",
    "other",
    "its",
    "into",
    "only",
    "new",
    "some",
    "could",
    "time",
    "these",
    "two",
    "may",
    "then",
    "do",
    "first",
    "any",
    "my",
    "now",
    "such",
    "like",
    "our",
    "over",
    "man",
    "me",
    "even",
    "most",
    "made",
    "after",
    "also",
    "did",
    "many",
    "before",
    "must",
    "years",
    "where",
    "much",
    "your",
    "way",
    "well",
    "down",
    "should",
    "state",
    "use",
    "each",
    "just",
    "those",
    "people",
    "how",
    "too",
    "little",
    "good",
    "world",
    "very",
    "make",
    "still",
    "own",
    "see",
    "men",
    "work",
    "long",
    "get",
    "here",
    "both",
    "life",
    "being",
    "under",
    "never",
    "day",
    "same",
    "while",
    "last",
    "might",
    "us",
    "great",
    "old",
    "year",
    "off",
    "come",
    "since",
    "go",
    "came",
    "right",
    "used",
    "take",
    "three",
    "small",
    "large",
    "left",
    "number",
    "found",
    "course",
    "part",
    "point",
    "system",
    "value",
    "model",
    "token",
    "answer",
    "query",
    "router",
    "budget",
    "cost",
    "price",
    "cache",
    "batch",
    "queue",
    "server",
    "engine",
    "data",
    "result",
    "simple",
    "fast",
    "quick",
    "light",
    "signal",
    "output",
    "input",
    "stream",
    "memory",
    "node",
    "graph",
    "vector",
    "space",
    "layer",
    "weight",
    "loss",
    "train",
    "test",
    "sample",
]
_CAPITALIZED = [w.capitalize() for w in _WORDS]


def count_tokens(text: str) -> int:
    """Tokens in `text` under the simulator's tokenizer rule (see module docstring)."""
    return len(TOKEN_RE.findall(text))


def stable_hash(*parts: object) -> int:
    """A 64-bit hash of `parts` that is the same in every process (unlike `hash`)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def drawn_length(key: int, low: int = DRAWN_LENGTH_RANGE[0], high: int = DRAWN_LENGTH_RANGE[1]) -> int:
    """A completion length in [low, high] chosen by `key` (used when a request sets no max_tokens)."""
    return low + key % (high - low + 1)


def generate_pieces(key: int, n: int) -> list[str]:
    """`n` one-token text pieces forming sentence-like text, fully determined by `key`."""
    rng = random.Random(key)
    pieces: list[str] = []
    words_in_sentence = 0
    sentence_length = rng.randint(6, 16)
    for i in range(n):
        if words_in_sentence >= sentence_length and pieces[-1] not in {".", ","}:
            pieces.append(".")
            words_in_sentence = 0
            sentence_length = rng.randint(6, 16)
            continue
        if words_in_sentence >= 3 and pieces[-1] != "," and rng.random() < 0.06:
            pieces.append(",")
            continue
        index = rng.randrange(len(_WORDS))
        word = _CAPITALIZED[index] if words_in_sentence == 0 else _WORDS[index]
        pieces.append(word if i == 0 else " " + word)
        words_in_sentence += 1
    return pieces


def text_pieces(text: str) -> list[str]:
    """`text` cut into one-token pieces (each token with the white space before it), joining to `text`.

    ``len(text_pieces(text)) == count_tokens(text)``, except that text without any token (empty or
    only white space) is one piece: generating it still takes one step, as an end-of-sequence would.
    """
    pieces: list[str] = []
    start = 0
    for match in TOKEN_RE.finditer(text):
        pieces.append(text[start : match.end()])
        start = match.end()
    if not pieces:
        return [text]
    pieces[-1] += text[start:]
    return pieces


def truncate_at_stop(pieces: Sequence[str], stops: Sequence[str]) -> tuple[list[str], bool]:
    """Cut generated pieces where the first stop string appears, as vLLM does.

    Returns the per-token text deltas (one per generated token, the last ones possibly empty,
    joining to the text before the stop string) and whether a stop string was hit. The number
    of deltas is the number of tokens generated, stop string included.
    """
    stops = [s for s in stops if s]
    if not stops:
        return list(pieces), False
    text = ""
    for i, piece in enumerate(pieces):
        previous_length = len(text)
        text += piece
        hits = [
            pos for stop in stops if (pos := text.find(stop, max(0, previous_length - len(stop) + 1))) >= 0
        ]
        if hits:
            end = min(hits)
            deltas: list[str] = []
            offset = 0
            for kept in pieces[: i + 1]:
                deltas.append(text[min(offset, end) : min(offset + len(kept), end)])
                offset += len(kept)
            return deltas, True
    return list(pieces), False


def hashed_embedding(text: str, dimensions: int) -> list[float]:
    """A unit vector from signed feature hashing of word unigrams and bigrams.

    Texts that share words get similar vectors, so routing by nearest neighbours over these
    embeddings behaves sensibly (unlike random vectors).
    """
    words = [t.lower() for t in TOKEN_RE.findall(text) if t[0].isalnum()]
    features = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
    vector = np.zeros(dimensions, dtype=np.float64)
    for feature in features or [text]:
        h = stable_hash("f", feature)
        vector[h % dimensions] += 1.0 if (h >> 32) & 1 else -1.0
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        vector[stable_hash("empty", text) % dimensions] = 1.0
        norm = 1.0
    return (vector / norm).tolist()
