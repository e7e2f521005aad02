"""The prompt token bound (proxy/tokens.py) is never below a real count: the simulator's tokenizer
and two real BPE vocabularies (OpenAI's cl100k_base and o200k_base, through `bpe-openai`, which
ships them) with a ChatML chat template, on the shipped history's real prompts."""

from __future__ import annotations

import json

import bpe_openai
import pytest

from router_service.proxy.request import parse_request
from router_service.proxy.tokens import completion_prompts_bound, text_bound
from router_service.routing.history import load_builtin_history
from router_service.simulator.protocol import ChatCompletionRequest

PROMPTS = [p for p in load_builtin_history("history").prompts[:300] if p]
HARD = [
    "!?" * 300,  # punctuation: one token per character in the simulator
    "ﾃｽﾄ文字列🙂" * 40,  # multi-byte characters
    "\n\n\t  " * 100,
    "a" * 2000,
]


def chatml_tokens(encoding: bpe_openai.Encoding, messages: list[dict[str, str]]) -> int:
    """Tokens of a ChatML prompt (<|im_start|>role\\ncontent<|im_end|>\\n ... <|im_start|>assistant\\n),
    the special markers one token each."""
    total = 3  # <|im_start|> assistant \n
    for m in messages:
        total += (
            4
            + len(encoding.encode(m["role"], disallowed_special=()))
            + len(encoding.encode(m["content"], disallowed_special=()))
        )
    return total


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_chat_bound_holds_for_real_vocabularies(name: str) -> None:
    encoding = bpe_openai.get_encoding(name)
    ratios = []
    for text in PROMPTS + HARD:
        messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": text}]
        bound = parse_request(json.dumps({"model": "m", "messages": messages}).encode(), "chat").prompt_bound
        real = chatml_tokens(encoding, messages)
        assert bound >= real, text[:80]
        ratios.append(bound / real)
        assert text_bound(text) >= len(encoding.encode(text, disallowed_special=()))
        assert completion_prompts_bound(text)[0] >= len(encoding.encode(text, disallowed_special=())) + 1
    # What the bound costs on real prompts: about 4 bytes a token, plus the template allowance.
    assert min(ratios) >= 1.0 and sorted(ratios)[len(ratios) // 2] < 6


def test_chat_bound_holds_for_the_simulators_tokenizer() -> None:
    for text in PROMPTS + HARD:
        body = {"model": "m", "messages": [{"role": "user", "content": text}], "n": 2}
        bound = parse_request(json.dumps(body).encode(), "chat").prompt_bound
        _, real = ChatCompletionRequest.model_validate(body).prompt_identity_and_tokens()
        assert bound >= real, text[:80]
