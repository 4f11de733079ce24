"""GET /metrics: calls, tokens, cost, latency and time to first token counted once per model
request; rate-limit and wallet refusals; job outcomes, latencies and queue counts; the admin
token on the API port, no authentication on the metrics port, and no route when metrics are
off."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from aivax.app import create_app
from aivax.config import Settings
from aivax.jobs import JobContext, JobFailed, enqueue
from aivax.kit.clock import utcnow
from aivax.metrics import NO_METRICS
from aivax.services import AppServices
from tests.fixtures.factories import AccountWithKeys, make_account, make_plan
from tests.jobs.support import make_runner, unique_kind
from tests.metrics.support import Samples, delta, parse, value
from tests.test_serve_e2e import _free_port

CHAT = {"model": "test/fake-ok", "messages": [{"role": "user", "content": "hi"}]}
OK = {"model": "test/fake-ok", "via_gateway": "false", "status": "200"}


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return _free_port()


@pytest.fixture(scope="module")
async def metrics_services(
    settings: Settings, metrics_port: int, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[AppServices]:
    own = settings.model_copy(
        update={
            "metrics": True,
            "metrics_port": metrics_port,
            "jobs_enabled": False,  # jobs here run on the tests' own runners
            "data_dir": tmp_path_factory.mktemp("metrics-data"),
        }
    )
    built = AppServices.build(own)
    yield built
    await built.close()


@pytest.fixture(scope="module")
async def metrics_app(metrics_services: AppServices) -> AsyncIterator[FastAPI]:
    application = create_app(metrics_services.settings, services=metrics_services)
    async with LifespanManager(application):
        application.state.metrics_exposition.cache_seconds = 0  # job counts read every scrape
        yield application


@pytest.fixture
async def metrics_client(metrics_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=metrics_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://aivax.test") as http:
        yield http


@pytest.fixture
async def payer(metrics_services: AppServices, fake_models: list[str]) -> AccountWithKeys:
    """An account whose plan allows the fake models, with money."""
    plan = await make_plan(metrics_services)
    return await make_account(metrics_services, plan=plan, balance_micros=1_000_000)


async def scrape(client: httpx.AsyncClient, headers: dict[str, str]) -> Samples:
    response = await client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


async def eventually(
    client: httpx.AsyncClient, headers: dict[str, str], done: Callable[[Samples], bool]
) -> Samples:
    """The first scrape for which `done` holds (a call's settlement may follow its last byte)."""
    for _ in range(50):
        samples = await scrape(client, headers)
        if done(samples):
            return samples
        await asyncio.sleep(0.1)
    return samples


async def test_a_json_and_a_streamed_call_are_counted(
    metrics_client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    payer: AccountWithKeys,
) -> None:
    before = await scrape(metrics_client, admin_headers)
    plain = await metrics_client.post("/v1/chat/completions", headers=payer.headers, json=CHAT)
    assert plain.status_code == 200, plain.text
    streamed = await metrics_client.post(
        "/v1/chat/completions", headers=payer.headers, json={**CHAT, "stream": True}
    )
    assert streamed.status_code == 200
    assert "[DONE]" in streamed.text
    after = await eventually(
        metrics_client,
        admin_headers,
        lambda samples: delta(before, samples, "aivax_calls_total", **OK) >= 2,
    )
    assert delta(before, after, "aivax_calls_total", **OK) == 2
    model = {"model": "test/fake-ok"}
    assert delta(before, after, "aivax_call_duration_seconds_count", **model) == 2
    assert delta(before, after, "aivax_call_duration_seconds_sum", **model) > 0
    assert delta(before, after, "aivax_call_time_to_first_token_seconds_count", **model) >= 1
    usage = plain.json()["usage"]
    tokens_in = delta(before, after, "aivax_call_tokens_total", direction="input", **model)
    tokens_out = delta(before, after, "aivax_call_tokens_total", direction="output", **model)
    assert tokens_in == 2 * usage["prompt_tokens"]
    assert tokens_out == 2 * usage["completion_tokens"]
    # 1 micro-USD per input token and 2 per output token (the fake models' prices).
    assert delta(before, after, "aivax_call_cost_micros_total", **model) == (
        tokens_in + 2 * tokens_out
    )


async def test_metrics_need_the_operator_admin_token(
    metrics_client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    missing = await metrics_client.get("/metrics")
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_admin_token"
    customer = await metrics_client.get("/metrics", headers=account.headers)
    assert customer.status_code == 401
    assert customer.json()["error"]["code"] == "invalid_admin_token"


async def test_metrics_off_means_no_route(
    client: httpx.AsyncClient, admin_headers: dict[str, str], services: AppServices
) -> None:
    assert services.metrics is NO_METRICS
    response = await client.get("/metrics", headers=admin_headers)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_the_metrics_port_serves_without_authentication(
    metrics_app: FastAPI, metrics_port: int
) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{metrics_port}") as http:
        response = await http.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert "# TYPE aivax_calls_total counter" in response.text
        assert "# TYPE aivax_jobs gauge" in response.text
        assert (await http.get("/admin/accounts")).status_code == 404
        assert (await http.post("/metrics")).status_code == 405


async def test_a_rate_limit_refusal_is_counted(
    metrics_client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    metrics_services: AppServices,
    fake_models: list[str],
) -> None:
    plan = await make_plan(metrics_services, integrated_rpm=1)
    limited = await make_account(metrics_services, plan=plan, balance_micros=100_000)
    before = await scrape(metrics_client, admin_headers)
    statuses = [
        (
            await metrics_client.post("/v1/chat/completions", headers=limited.headers, json=CHAT)
        ).status_code
        for _ in range(2)
    ]
    assert statuses == [200, 429]
    after = await scrape(metrics_client, admin_headers)
    assert delta(before, after, "aivax_rate_limit_refusals_total", limit="rpm") == 1


async def test_a_wallet_refusal_is_counted(
    metrics_client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    metrics_services: AppServices,
    fake_models: list[str],
) -> None:
    broke = await make_account(metrics_services, plan=await make_plan(metrics_services))
    before = await scrape(metrics_client, admin_headers)
    refused = await metrics_client.post("/v1/chat/completions", headers=broke.headers, json=CHAT)
    assert refused.status_code == 402, refused.text
    after = await scrape(metrics_client, admin_headers)
    assert delta(before, after, "aivax_wallet_refusals_total", reason="insufficient_balance") == 1


async def test_job_outcomes_latencies_and_queue_are_counted(
    metrics_client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    metrics_services: AppServices,
    account: AccountWithKeys,
) -> None:
    kind, later = unique_kind("metrics"), unique_kind("metrics-later")
    runner = make_runner(metrics_services.database, metrics=metrics_services.metrics)

    async def handler(context: JobContext) -> None:
        if context.payload.get("fail"):
            raise JobFailed("refused")

    runner.register(kind, handler)
    due = utcnow() - timedelta(seconds=2)  # each waits at least 2 s in the queue
    async with metrics_services.database.sessions() as session:
        for payload in ({}, {"fail": True}):
            await enqueue(session, kind, payload, account_id=account.id, run_at=due)
        await enqueue(session, later, {}, account_id=account.id, run_at=utcnow() + timedelta(1))
        await session.commit()
    before = await scrape(metrics_client, admin_headers)
    assert await runner.work_once()
    assert await runner.work_once()
    after = await scrape(metrics_client, admin_headers)
    assert delta(before, after, "aivax_jobs_finished_total", kind=kind, outcome="done") == 1
    assert delta(before, after, "aivax_jobs_finished_total", kind=kind, outcome="failed") == 1
    assert delta(before, after, "aivax_job_run_seconds_count", kind=kind) == 2
    assert delta(before, after, "aivax_job_queue_wait_seconds_count", kind=kind) == 2
    assert delta(before, after, "aivax_job_queue_wait_seconds_sum", kind=kind) >= 4
    assert value(after, "aivax_jobs", kind=later, state="queued") == 1
    assert value(after, "aivax_jobs", kind=kind, state="queued") == 0
