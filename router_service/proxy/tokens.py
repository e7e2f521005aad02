"""An upper bound on a request's prompt tokens, without the model's tokenizer.

Why it is a bound: the tokenizers vLLM serves generative models with are byte-level BPE (GPT-2,
tiktoken's cl100k/o200k, Llama 3, Qwen, DeepSeek, ...) or SentencePiece with byte fallback (Llama
2, Mistral, Gemma): every token stands for at least one byte of the UTF-8 text, so a text of b
bytes is at most b tokens; SentencePiece may put one lone word-start token in front (+1 per
text). WordPiece (BERT-style embedding models) tokens cover at least one character, plus [CLS]
and [SEP] (+2). Special-token strings inside the text only lower the count.

A chat template wraps each message in markers (role header, end of turn, newlines: at most 8
tokens in the Llama 3, ChatML/Qwen, Mistral, Gemma and Phi templates) around the role's name, and
the prompt in a begin-of-text token, the assistant's generation prompt and, for some templates,
a default system prompt (Qwen 2.5: 17 tokens; Llama 3.1: a dated system header, about 25). The
bound adds `MESSAGE_OVERHEAD` per message and `REQUEST_OVERHEAD` per prompt. Tools and other
structured fields are rendered from their JSON: their compact JSON bytes plus `TOOLS_OVERHEAD`.

What it does not bound: image or audio parts (their token cost depends on the model); they are
counted by their JSON bytes only. The price of the bound is over-reservation: English prose is
about 4 bytes per token, so the bound holds about 4 times the real prompt until the request settles
(`benchmarks/faults.py` measures it against the simulator's and a real tokenizer's counts).
"""

from __future__ import annotations

import json
from typing import Any

MESSAGE_OVERHEAD = 8
REQUEST_OVERHEAD = 64
TOOLS_OVERHEAD = 128
EMBEDDING_INPUT_OVERHEAD = 2
_STRUCTURED_CHAT_FIELDS = ("tools", "functions", "tool_choice", "response_format")


def text_bound(text: str) -> int:
    """At most this many tokens for `text` under any byte-level or byte-fallback tokenizer."""
    return len(text.encode("utf-8", "surrogatepass")) + 1


def _json_bytes(value: Any) -> int:
    try:
        return len(
            json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
        )
    except (TypeError, ValueError):
        return 0


def _content_bound(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return text_bound(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                total += text_bound(part["text"])
            else:
                total += _json_bytes(part)
        return total
    return _json_bytes(content)


def chat_prompt_bound(payload: dict[str, Any]) -> int:
    """Tokens the chat prompt is at most, template included."""
    total = REQUEST_OVERHEAD
    messages = payload.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            total += _json_bytes(message)
            continue
        total += MESSAGE_OVERHEAD + _content_bound(message.get("content"))
        for key, value in message.items():
            if key == "content":
                continue
            total += text_bound(value) if isinstance(value, str) else _json_bytes(value)
    structured = [payload[k] for k in _STRUCTURED_CHAT_FIELDS if payload.get(k) is not None]
    if structured:
        total += TOOLS_OVERHEAD + sum(_json_bytes(v) for v in structured)
    return total


def completion_prompts_bound(prompt: Any) -> tuple[int, int]:
    """(tokens the prompts are at most, how many prompts) for /v1/completions' `prompt`."""
    if isinstance(prompt, str):
        return text_bound(prompt) + 1, 1
    if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
        return len(prompt), 1  # token ids: exact
    if isinstance(prompt, list):
        total = 0
        for item in prompt:
            if isinstance(item, str):
                total += text_bound(item) + 1
            elif isinstance(item, list):
                total += len(item)
            else:
                total += _json_bytes(item)
        return total, max(1, len(prompt))
    return _json_bytes(prompt), 1


def embedding_inputs_bound(inputs: Any) -> int:
    """Tokens the embedding inputs are at most."""
    if isinstance(inputs, str):
        return text_bound(inputs) + EMBEDDING_INPUT_OVERHEAD
    if isinstance(inputs, list) and inputs and all(isinstance(x, int) for x in inputs):
        return len(inputs)
    if isinstance(inputs, list):
        total = 0
        for item in inputs:
            if isinstance(item, str):
                total += text_bound(item) + EMBEDDING_INPUT_OVERHEAD
            elif isinstance(item, list):
                total += len(item)
            else:
                total += _json_bytes(item)
        return total
    return _json_bytes(inputs)
