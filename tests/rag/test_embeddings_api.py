"""POST /v1/embeddings with the official SDK: the packaged local models and a remote
OpenAI-compatible upstream; billing, request log, rate limits and bad input."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator

import httpx
import numpy as np
import openai
import pytest
from sqlalchemy import select

from aivax.models import RequestLog
from aivax.services import AppServices
from aivax.wallet import service as wallet
from tests.conftest import FakeUpstream
from tests.fixtures.assertions import assert_error
from tests.fixtures.factories import AccountWithKeys, make_account, make_plan
from tests.fixtures.servers import ThreadedServer


@pytest.fixture
async def owner(services: AppServices, fake_models: list[str]) -> AccountWithKeys:
    return await make_account(services, plan="starter", balance_micros=1_000_000)


@pytest.fixture
async def sdk_client(
    live_server: ThreadedServer, owner: AccountWithKeys
) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(
        base_url=live_server.url + "/v1", api_key=owner.private_key, max_retries=0
    )
    yield client
    await client.close()


async def _logs(services: AppServices, account_id: uuid.UUID) -> list[RequestLog]:
    """The live server settles in the background: wait for its row."""
    for _ in range(100):
        async with services.database.sessions() as session:
            rows = await session.scalars(
                select(RequestLog)
                .where(RequestLog.account_id == account_id)
                .order_by(RequestLog.id)
            )
            found = list(rows)
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError("no request log row")


@pytest.mark.parametrize(
    ("model", "dimensions"),
    [
        ("aivax/paraphrase-minilm-l3", 384),
        ("aivax/minilm-l6-int8", 384),
        ("aivax/wordllama-l2-256", 256),
    ],
)
async def test_local_models_embed_meaningfully(
    sdk_client: openai.AsyncOpenAI, model: str, dimensions: int
) -> None:
    texts = [
        "How do I reset my password?",
        "Steps to change the password of my account",
        "The volcano erupted and covered the town in ash.",
    ]
    response = await sdk_client.embeddings.create(model=model, input=texts)
    assert response.model == model
    assert [item.index for item in response.data] == [0, 1, 2]
    vectors = np.array([item.embedding for item in response.data])
    assert vectors.shape == (3, dimensions)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] + 0.1  # paraphrases are closer than unrelated
    assert response.usage.prompt_tokens > 0


async def test_remote_model_base64_billing_and_log(
    live_server: ThreadedServer,
    services: AppServices,
    owner: AccountWithKeys,
    fake_openai: FakeUpstream,
) -> None:
    async with httpx.AsyncClient(base_url=live_server.url, timeout=30) as client:
        response = await client.post(
            "/v1/embeddings",
            headers=owner.headers,
            json={
                "model": "test/fake-embed",
                "input": ["alpha beta", "gamma"],
                "encoding_format": "base64",
            },
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert fake_openai.recorder.embedding_inputs[-1] == ["alpha beta", "gamma"]
    first = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype=np.float32)
    assert first.shape == (64,)
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    # 3 tokens at 1 USD per 1M tokens = 3 micro-USD.
    assert body["aivax"]["cost_micros"] == 3
    assert response.headers["x-aivax-cost-micros"] == "3"
    logs = await _logs(services, owner.id)
    assert logs[-1].model == "test/fake-embed"
    assert logs[-1].input_tokens == 3
    assert logs[-1].cost_micros == 3
    assert logs[-1].status == 200
    async with httpx.AsyncClient(base_url=live_server.url, timeout=30) as client:
        # Reading the wallet closes the server's idle lease: the call shows as charged.
        (await client.get("/v1/wallet", headers=owner.headers)).raise_for_status()
    async with services.database.sessions() as session:
        report = await wallet.check_invariant(session, owner.id)
    assert report.holds
    assert report.cached_balance_micros == 1_000_000 - 3


async def test_a_transient_upstream_failure_is_retried(
    live_server: ThreadedServer, owner: AccountWithKeys, fake_openai: FakeUpstream
) -> None:
    async with httpx.AsyncClient(base_url=live_server.url, timeout=30) as client:
        response = await client.post(
            "/v1/embeddings",
            headers=owner.headers,
            json={"model": "test/fake-embed-flaky", "input": ["retry me", str(uuid.uuid4())]},
        )
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 2


async def test_bad_input_and_wrong_models(
    live_server: ThreadedServer, owner: AccountWithKeys
) -> None:
    async with httpx.AsyncClient(base_url=live_server.url, timeout=30) as client:
        cases = [
            ({"model": "aivax/paraphrase-minilm-l3", "input": []}, 400, None),
            ({"model": "aivax/paraphrase-minilm-l3", "input": [""]}, 400, None),
            ({"model": "aivax/paraphrase-minilm-l3", "input": [[1, 2, 3]]}, 400, None),
            ({"model": "aivax/paraphrase-minilm-l3", "input": "x", "dimensions": 10}, 400, None),
            (
                {"model": "aivax/paraphrase-minilm-l3", "input": "x", "encoding_format": "hex"},
                400,
                None,
            ),
            ({"model": "test/fake-ok", "input": "x"}, 400, "not_an_embedding_model"),
            ({"model": "nope/nothing", "input": "x"}, 404, "model_not_found"),
            ({"model": "test/fake-embed-short", "input": ["a", "b"]}, 502, None),
        ]
        for body, status, code in cases:
            response = await client.post("/v1/embeddings", headers=owner.headers, json=body)
            assert_error(response, status, code)
        chat = await client.post(
            "/v1/chat/completions",
            headers=owner.headers,
            json={
                "model": "aivax/paraphrase-minilm-l3",
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
        assert_error(chat, 400, "not_a_chat_model")
        public = await client.post(
            "/v1/embeddings",
            headers={"Authorization": f"Bearer {owner.public_key}"},
            json={"model": "aivax/paraphrase-minilm-l3", "input": "x"},
        )
        assert_error(public, 403, "private_key_required")


async def test_rate_limit_and_balance_like_chat(
    live_server: ThreadedServer, services: AppServices, fake_models: list[str]
) -> None:
    plan = await make_plan(services, integrated_rpm=2, min_balance_micros=0)
    account = await make_account(services, plan=plan, balance_micros=1_000_000)
    broke = await make_account(services, plan="starter", balance_micros=0)
    body = {"model": "test/fake-embed", "input": "hello"}
    async with httpx.AsyncClient(base_url=live_server.url, timeout=30) as client:
        for _ in range(2):
            ok = await client.post("/v1/embeddings", headers=account.headers, json=body)
            assert ok.status_code == 200, ok.text
        limited = await client.post("/v1/embeddings", headers=account.headers, json=body)
        assert_error(limited, 429, "rate_limit_requests")
        assert limited.headers["x-should-retry"] == "false"
        poor = await client.post("/v1/embeddings", headers=broke.headers, json=body)
        assert_error(poor, 402)
