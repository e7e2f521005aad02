"""The simulator's skill: scripted answers to known chat prompts, with usage and timing as usual."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from router_service.simulator import SimulatorProfile, SimulatorServer
from router_service.simulator.cli import build_parser, main, profile_from_args, profile_to_argv
from router_service.simulator.skill import SkillFileError, load_skill
from router_service.simulator.textgen import count_tokens, text_pieces

ANSWER = "The answer is (B), because 2+2=4."


def write_skill(path: Path, entries: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


@pytest.fixture
def skilled(tmp_path: Path, start_simulator: Callable[..., SimulatorServer]) -> SimulatorServer:
    skill = write_skill(
        tmp_path / "skill.jsonl",
        [{"prompt": "What is 2+2?", "answer": ANSWER}, {"prompt": "Say nothing.", "answer": ""}],
    )
    return start_simulator("skilled", skill=str(skill), speedup=200.0)


def client(sim: SimulatorServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.base_url, api_key="unused", max_retries=0, timeout=30)


@given(st.text(max_size=60))
def test_text_pieces_join_to_the_text_one_token_each(text: str) -> None:
    pieces = text_pieces(text)
    assert "".join(pieces) == text
    assert len(pieces) == max(1, count_tokens(text))
    assert all(count_tokens(p) == 1 for p in pieces) or count_tokens(text) == 0


def test_a_known_prompt_gets_its_answer_with_true_usage(skilled: SimulatorServer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    r = client(skilled).chat.completions.create(model="skilled", messages=messages)
    assert r.choices[0].message.content == ANSWER
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens == count_tokens(ANSWER)
    # The prompt is counted as for any other request.
    other = client(skilled).chat.completions.create(
        model="skilled", messages=[messages[0], {"role": "user", "content": "What is 2+3?"}]
    )
    assert other.usage is not None and other.usage.prompt_tokens == r.usage.prompt_tokens
    assert other.choices[0].message.content != ANSWER  # an unknown prompt: generated text


def test_only_the_last_user_message_counts(skilled: SimulatorServer) -> None:
    earlier = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And now?"},
    ]
    r = client(skilled).chat.completions.create(model="skilled", messages=earlier)
    assert r.choices[0].message.content != ANSWER
    later = [*earlier, {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}]
    r = client(skilled).chat.completions.create(model="skilled", messages=later)
    assert r.choices[0].message.content == ANSWER


def test_streamed_answer_arrives_token_by_token(skilled: SimulatorServer) -> None:
    stream = client(skilled).chat.completions.create(
        model="skilled",
        messages=[{"role": "user", "content": "What is 2+2?"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    deltas, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                deltas.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert "".join(deltas) == ANSWER and deltas == text_pieces(ANSWER)
    assert usage is not None and usage.completion_tokens == len(deltas) and finish == "stop"


def test_max_tokens_and_stop_cut_the_answer(skilled: SimulatorServer) -> None:
    ask = [{"role": "user", "content": "What is 2+2?"}]
    r = client(skilled).chat.completions.create(model="skilled", messages=ask, max_tokens=3)
    assert r.choices[0].message.content == "".join(text_pieces(ANSWER)[:3])
    assert r.choices[0].finish_reason == "length" and r.usage is not None and r.usage.completion_tokens == 3
    r = client(skilled).chat.completions.create(model="skilled", messages=ask, stop=["(B)"])
    assert r.choices[0].message.content == "The answer is " and r.choices[0].finish_reason == "stop"
    empty = client(skilled).chat.completions.create(
        model="skilled", messages=[{"role": "user", "content": "Say nothing."}]
    )
    assert empty.choices[0].message.content == ""
    assert empty.usage is not None and empty.usage.completion_tokens == 1


def test_max_tokens_past_the_context_is_refused_for_a_scripted_prompt_too(skilled: SimulatorServer) -> None:
    """vLLM checks prompt + max_tokens against the context before generating anything, whatever
    the answer would be."""
    too_many = skilled.profile.max_model_len
    with pytest.raises(openai.BadRequestError, match="maximum context length") as caught:
        client(skilled).chat.completions.create(
            model="skilled", messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=too_many
        )
    assert caught.value.body is not None and caught.value.body.get("param") == "max_tokens"


def test_bad_skill_files_name_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a", "answer": "b"}\n\n{"prompt": "c",\n')
    with pytest.raises(SkillFileError, match=r"bad\.jsonl:3: not valid JSON"):
        load_skill(bad_json)
    missing = write_skill(tmp_path / "missing.jsonl", [{"prompt": "a"}])  # type: ignore[list-item]
    with pytest.raises(SkillFileError, match=r"missing\.jsonl:1: answer: Field required"):
        load_skill(missing)
    clash = write_skill(
        tmp_path / "clash.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "a", "answer": "2"}]
    )
    with pytest.raises(SkillFileError, match=r"clash\.jsonl:2: .*different answer \(line 1\)"):
        load_skill(clash)
    with pytest.raises(SkillFileError, match="cannot read"):
        load_skill(tmp_path / "nope.jsonl")
    # The command refuses to start, naming the problem.
    assert main(["--model", "m", "--port", "0", "--skill", str(clash)]) == 2
    assert "clash.jsonl:2" in capsys.readouterr().err


def test_skill_flag_round_trips_through_argv(tmp_path: Path) -> None:
    profile = SimulatorProfile(model="m", skill=str(tmp_path / "s.jsonl"))
    assert profile_from_args(build_parser().parse_args(profile_to_argv(profile))) == profile
