"""The simulator's tokenizer rule, generated text and hashed embeddings."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from router_service.simulator.textgen import (
    count_tokens,
    drawn_length,
    generate_pieces,
    hashed_embedding,
    stable_hash,
    truncate_at_stop,
)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", 0),
        ("   ", 0),
        ("Hello, world!", 4),
        ("tokenization", 2),  # "tokeni" + "zation"
        ("a b c", 3),
        ("café", 2),  # "caf" + "é"
        ("x_y", 3),
        ("2+2=4", 5),
    ],
)
def test_count_tokens_rule(text: str, tokens: int) -> None:
    assert count_tokens(text) == tokens


@given(st.integers(min_value=0, max_value=2**63), st.integers(min_value=0, max_value=400))
def test_generated_pieces_are_one_token_each(key: int, n: int) -> None:
    pieces = generate_pieces(key, n)
    assert len(pieces) == n
    assert count_tokens("".join(pieces)) == n
    assert all(count_tokens(p) == 1 for p in pieces)


def test_generation_is_deterministic_and_key_dependent() -> None:
    assert generate_pieces(7, 50) == generate_pieces(7, 50)
    assert generate_pieces(7, 50) != generate_pieces(8, 50)
    assert generate_pieces(7, 20) == generate_pieces(7, 50)[:20]


def test_stable_hash_is_fixed_across_processes() -> None:
    # A literal value: Python's hash() would change with PYTHONHASHSEED, this must not.
    assert stable_hash("a", 1) == stable_hash("a", 1)
    assert stable_hash("a", 1) != stable_hash("a", 2)
    assert stable_hash("x") == 5717441744405258058
    assert stable_hash("a", 1) == 13924241962069754241


def test_drawn_length_range() -> None:
    lengths = {drawn_length(stable_hash(i)) for i in range(2000)}
    assert min(lengths) == 16 and max(lengths) == 256


def test_stop_string_truncates_text_but_counts_its_tokens() -> None:
    pieces = ["Hello", " big", " world", ".", " Again"]
    deltas, hit = truncate_at_stop(pieces, ["world"])
    assert hit
    assert len(deltas) == 3  # tokens up to and including the one completing the stop string
    assert "".join(deltas) == "Hello big "
    # A stop string spanning pieces trims the earlier piece's delta.
    deltas, hit = truncate_at_stop(pieces, ["big world"])
    assert hit and "".join(deltas) == "Hello " and len(deltas) == 3
    deltas, hit = truncate_at_stop(pieces, ["absent"])
    assert not hit and deltas == pieces


def test_hashed_embeddings_are_unit_and_similar_for_similar_texts() -> None:
    a = np.array(hashed_embedding("how do I sort a list in python", 256))
    b = np.array(hashed_embedding("how to sort a python list", 256))
    c = np.array(hashed_embedding("recipe for banana bread with walnuts", 256))
    for v in (a, b, c):
        assert v.shape == (256,) and np.linalg.norm(v) == pytest.approx(1.0)
    assert a @ b > 0.4 > abs(a @ c)
    assert hashed_embedding("same", 64) == hashed_embedding("same", 64)
