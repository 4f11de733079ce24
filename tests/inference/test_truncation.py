"""Context limits and truncation: boundaries, both modes, tool calls never split."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from aivax.inference.truncation import ContextLimitExceeded, fit, split
from aivax.services import AppServices
from tests.conftest import FakeUpstream
from tests.fixtures.factories import make_account

PER_MESSAGE = 10


async def count(messages: list[dict[str, Any]]) -> int:
    return PER_MESSAGE * len(messages)


def m(role: str, name: str, **extra: Any) -> dict[str, Any]:
    return {"role": role, "content": name, **extra}


CONVERSATION = [
    m("system", "sys"),
    m("user", "u1"),
    m(
        "assistant",
        "a1",
        tool_calls=[{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    ),
    m("tool", "t1", tool_call_id="c1"),
    m("tool", "t1b", tool_call_id="c1"),
    m("user", "u2"),
    m("assistant", "a2"),
    m("user", "u3"),
]


def names(messages: list[dict[str, Any]]) -> list[str]:
    return [message["content"] for message in messages]


def test_turns_keep_a_tool_call_with_its_results() -> None:
    system, turns = split(CONVERSATION)
    assert names(system) == ["sys"]
    assert [names(turn) for turn in turns] == [["u1"], ["a1", "t1", "t1b"], ["u2"], ["a2"], ["u3"]]


async def test_exactly_at_the_limit_is_untouched_and_one_over_truncates() -> None:
    at_limit = PER_MESSAGE * len(CONVERSATION)
    kept, report, tokens = await fit(CONVERSATION, limit=at_limit, mode="drop_oldest", count=count)
    assert kept == CONVERSATION
    assert report is None
    assert tokens == at_limit
    kept, report, tokens = await fit(
        CONVERSATION, limit=at_limit - 1, mode="drop_oldest", count=count
    )
    assert tokens == 70
    assert names(kept) == ["sys", "a1", "t1", "t1b", "u2", "a2", "u3"]
    assert report is not None
    assert (report.dropped_messages, report.input_tokens_before, report.input_tokens_after) == (
        1,
        80,
        70,
    )


async def test_drop_oldest_never_splits_a_tool_call_from_its_results() -> None:
    kept, _, _ = await fit(CONVERSATION, limit=50, mode="drop_oldest", count=count)
    assert names(kept) == ["sys", "u2", "a2", "u3"]  # the tool turn went as a whole
    assert all(message["role"] != "tool" for message in kept)


async def test_middle_out_keeps_the_first_and_newest_turns() -> None:
    kept, report, _ = await fit(CONVERSATION, limit=40, mode="middle_out", count=count)
    assert names(kept) == ["sys", "u1", "a2", "u3"]
    assert report is not None
    assert report.mode == "middle_out"


async def test_error_mode_and_an_unfittable_newest_turn_are_400_with_counts() -> None:
    with pytest.raises(ContextLimitExceeded) as error:
        await fit(CONVERSATION, limit=70, mode="error", count=count)
    assert "80 input tokens" in error.value.message
    assert "allows 70" in error.value.message
    with pytest.raises(ContextLimitExceeded):
        await fit(CONVERSATION, limit=15, mode="drop_oldest", count=count)


async def test_gateway_truncates_what_the_model_receives_and_says_so(
    client: httpx.AsyncClient,
    services: AppServices,
    fake_openai: FakeUpstream,
    fake_models: list[str],
) -> None:
    account = await make_account(services, plan="starter", balance_micros=1_000_000)
    slug = f"short-{uuid.uuid4().hex[:6]}"
    created = await client.post(
        "/v1/gateways",
        headers=account.headers,
        json={
            "slug": slug,
            "config": {
                "model": "test/fake-ok",
                "system_instruction": "Be brief.",
                "context": {"limit_tokens": 60, "truncation": "drop_oldest"},
            },
        },
    )
    assert created.status_code == 201, created.text
    turns = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "word " * 8}
        for i in range(7)
    ]
    marker = f"trunc-{uuid.uuid4()}"
    response = await client.post(
        "/v1/chat/completions",
        headers=account.headers,
        json={"model": slug, "messages": turns, "user": marker},
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-aivax-truncated"].startswith("drop_oldest; dropped=")
    report = response.json()["aivax"]["truncation"]
    assert report["input_tokens_after"] <= 60 < report["input_tokens_before"]
    sent = next(r for r in reversed(fake_openai.recorder.requests) if r.get("user") == marker)
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["messages"][-1]["content"].startswith("turn 6")
    assert len(sent["messages"]) == 1 + 7 - report["dropped_messages"]
