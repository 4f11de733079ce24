"""`POST /v1/chat/completions` is served ahead of FastAPI's routing (`inference.route`): it
must refuse bad input exactly like any other route, and leave everything else to FastAPI."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from aivax.config import Settings
from aivax.services import AppServices
from tests.conftest import FakeUpstream
from tests.fixtures.assertions import assert_error
from tests.fixtures.factories import AccountWithKeys, make_account, principal_of

PATH = "/v1/chat/completions"
HELLO = {"model": "test/fake-ok", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b'{"model": "test/fake-ok", "messages": [', "invalid_json"),
        (b"", "invalid_json"),
        (b'{"model": "test/fake-ok", "messages": "\xff\xfe"}', "invalid_json"),
        (b"[1, 2]", "invalid_type"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "missing_required_parameter"),
        (
            b'{"model": "test/fake-ok", "messages": [{"role": "user", "content": "hi"}], '
            b'"frobnicate": 1}',
            "unknown_parameter",
        ),
    ],
)
async def test_bad_bodies_are_400_with_the_envelope(
    client: httpx.AsyncClient,
    account: AccountWithKeys,
    fake_models: list[str],
    content: bytes,
    code: str,
) -> None:
    response = await client.post(
        PATH, headers={**account.headers, "content-type": "application/json"}, content=content
    )
    error = assert_error(response, 400, code)
    assert error["type"] == "invalid_request_error"
    assert response.headers["x-request-id"].startswith("req_")


async def test_missing_and_wrong_keys_are_401_before_the_body_is_read(
    client: httpx.AsyncClient,
) -> None:
    missing = await client.post(PATH, content=b"not even json")
    assert_error(missing, 401, "missing_api_key")
    wrong = await client.post(PATH, headers={"authorization": "Bearer aivax_sk_wrong"}, json=HELLO)
    assert wrong.status_code == 401


async def test_body_over_the_limit_is_413(
    client: httpx.AsyncClient, account: AccountWithKeys, settings: Settings
) -> None:
    big = b'{"model": "x", "messages": [{"role": "user", "content": "'
    big += b"a" * settings.max_body_bytes + b'"}]}'
    announced = await client.post(
        PATH, headers={**account.headers, "content-type": "application/json"}, content=big
    )
    assert_error(announced, 413)

    async def chunks() -> object:
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    streamed = await client.post(
        PATH,
        headers={**account.headers, "content-type": "application/json"},
        content=chunks(),  # type: ignore[arg-type]
    )
    assert_error(streamed, 413)


async def test_other_methods_and_paths_stay_with_the_application(
    client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    wrong_method = await client.get(PATH, headers=account.headers)
    assert_error(wrong_method, 405)
    preflight = await client.options(
        PATH,
        headers={"origin": "https://app.example", "access-control-request-method": "POST"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    schema = (await client.get("/openapi.json")).json()
    assert "post" in schema["paths"][PATH]


async def test_a_served_call_carries_the_common_headers(
    client: httpx.AsyncClient, services: AppServices, fake_models: list[str]
) -> None:
    account = await make_account(services, plan="starter", balance_micros=1_000_000)
    response = await client.post(
        PATH,
        headers={**account.headers, "origin": "https://app.example", "x-request-id": "my-id-1"},
        json={**HELLO, "max_tokens": 5},
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "my-id-1"
    assert response.headers["x-aivax-account-id"] == str(account.id)
    assert response.headers["access-control-allow-origin"] == "*"
    assert response.json()["choices"][0]["message"]["content"] == "Hello from fake"


async def test_upstream_is_streamed_only_for_streamed_calls(
    client: httpx.AsyncClient,
    services: AppServices,
    fake_models: list[str],
    fake_openai: FakeUpstream,
) -> None:
    account = await make_account(services, plan="starter", balance_micros=1_000_000)
    whole = await client.post(PATH, headers=account.headers, json={**HELLO, "user": "whole"})
    assert whole.json()["usage"]["completion_tokens"] == 3
    sent = fake_openai.recorder.last()
    assert (sent["user"], sent.get("stream"), sent.get("stream_options")) == ("whole", None, None)
    streamed = await client.post(
        PATH, headers=account.headers, json={**HELLO, "user": "streamed", "stream": True}
    )
    assert streamed.text.endswith("data: [DONE]\n\n")
    sent = fake_openai.recorder.last()
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}


def test_delta_lines_match_the_whole_chunk_encoding() -> None:
    """The pre-encoded envelope gives exactly the bytes of encoding each chunk whole."""
    from aivax.inference import responses

    request_id = 'req_a"b\\\\"delta":{}'
    model = 'm"delta":{}"finish_reason":null'
    lines = responses.DeltaLines(request_id, model, 123)
    opening = {"role": "assistant", "content": ""}
    for delta in (opening, {"content": 'hé "x"\n'}, {"tool_calls": [{"index": 0}]}, {}):
        assert lines.line(delta) == responses.sse(
            responses.chunk(request_id, model, 123, delta=delta)
        )
    for reason in ("stop", "length", "tool_calls", 'odd "reason"', None):
        whole = responses.chunk(request_id, model, 123, finish_reason=reason)
        assert lines.finish_line(reason) == responses.sse(whole)


def test_fast_json_takes_what_orjson_refuses() -> None:
    from aivax.kit import fastjson

    huge = {"seed": 2**70, "text": "é"}
    assert fastjson.loads(fastjson.dumps(huge)) == huge
    with pytest.raises(json.JSONDecodeError):
        fastjson.loads(b'{"a": ')


async def test_a_cancelled_call_is_logged_as_cancelled_and_its_hold_released(
    services: AppServices, fake_models: list[str]
) -> None:
    """A non-streamed call cut short (server shutdown) is settled and logged as 499, not 200."""
    import asyncio
    import uuid

    from sqlalchemy import select

    from aivax.inference.endpoints import respond
    from aivax.inference.schemas import ChatCompletionRequest
    from aivax.models import HoldStatus, RequestLog, WalletHold
    from aivax.wallet import service as wallet

    account = await make_account(services, plan="starter", balance_micros=1_000_000)
    principal = await principal_of(services, account.private_key)
    request_id = f"req_{uuid.uuid4().hex}"
    body = ChatCompletionRequest.model_validate({**HELLO, "model": "test/fake-slow"})
    call = asyncio.ensure_future(respond(services, principal, body, request_id, None))
    await asyncio.sleep(0.05)  # the upstream is still answering
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await services.meter.flush(account.id)
    async with services.database.sessions() as session:
        log = await session.scalar(select(RequestLog).where(RequestLog.request_id == request_id))
        statuses = list(
            await session.scalars(
                select(WalletHold.status).where(WalletHold.account_id == account.id)
            )
        )
        balance = await wallet.summary(session, account.id)
    assert log is not None
    assert (log.status, log.error_code, log.cost_micros) == (499, "cancelled", 0)
    assert statuses == [HoldStatus.RELEASED.value]  # the account's lease, closed unused
    assert (balance.balance_micros, balance.held_micros) == (1_000_000, 0)


async def test_in_memory_rate_limits_expire_and_old_windows_are_swept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Windows end (reads drop expired keys) and the once-a-second sweep clears old ones."""
    import time

    from aivax.inference.ratelimit import RateLimiter

    limiter = RateLimiter(None)
    first = await limiter.hit_requests("rpm:test", 1)
    refused = await limiter.hit_requests("rpm:test", 1)
    assert (first.allowed, refused.allowed) == (True, False)
    assert 0 < refused.reset_seconds <= 60
    later = time.time() + 180
    monkeypatch.setattr(time, "time", lambda: later)
    assert (await limiter.hit_requests("rpm:test", 1)).allowed
    storage: Any = limiter.storage
    storage.swept_at -= storage.SWEEP_SECONDS  # a sweep is due
    await limiter.hit_requests("rpm:other", 1)
    assert all(expiry > later for expiry in storage.expirations.values())
    await limiter.close()


async def test_a_client_gone_before_its_body_gets_no_response(
    app: Any, services: AppServices
) -> None:
    """Nothing is admitted, held or sent for a request whose client left mid-body."""
    from aivax.inference.route import ChatRoute

    account = await make_account(services, plan="starter", balance_micros=1_000_000)
    sent: list[dict[str, Any]] = []
    messages = [
        {"type": "http.request", "body": b'{"model": "test/fa', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def not_reached(*_: Any) -> None:
        raise AssertionError("the chat route passed its own path on")

    principal_state = {
        "request_id": "req_gone",
        "principal": await principal_of(services, account.private_key),
    }
    scope = {
        "type": "http",
        "method": "POST",
        "path": PATH,
        "root_path": "",
        "headers": [],
        "app": app,
        "state": principal_state,
    }
    await ChatRoute(not_reached)(scope, receive, send)
    assert sent == []
    assert services.meter.calls_in_flight == 0
    from sqlalchemy import func, select

    from aivax.models import WalletHold

    async with services.database.sessions() as session:
        holds = await session.scalar(
            select(func.count()).where(WalletHold.account_id == account.id)
        )
    assert holds == 0


@pytest.fixture
async def lane_and_stack(app: Any) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    """The same application twice: the chat route taken by the lane (as served), and through
    Starlette's middleware stack (as when telemetry is configured)."""
    from aivax.app import AivaxApp

    assert isinstance(app, AivaxApp)
    assert app.chat_lane is not None  # no telemetry in the tests: the lane is on

    class Stacked:
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await super(AivaxApp, app).__call__(scope, receive, send)

    clients = {
        "lane": httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t"),
        "stack": httpx.AsyncClient(
            transport=httpx.ASGITransport(app=Stacked()), base_url="http://t"
        ),
    }
    yield clients
    for client in clients.values():
        await client.aclose()


VARYING = {"date", "x-request-id", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"}


@pytest.mark.parametrize("origin", [None, "https://app.example"])
async def test_the_lane_answers_with_the_stacks_headers(
    lane_and_stack: dict[str, httpx.AsyncClient],
    services: AppServices,
    fake_models: list[str],
    origin: str | None,
) -> None:
    account = await make_account(services, plan="starter", balance_micros=1_000_000)
    headers = {**account.headers, **({"origin": origin} if origin else {})}
    answers = {}
    for name, client in lane_and_stack.items():
        ok = await client.post(PATH, headers=headers, json={**HELLO, "max_tokens": 5})
        bad = await client.post(PATH, headers=headers, json={"model": "test/fake-ok"})
        unauthenticated = await client.post(PATH, json=HELLO)
        answers[name] = [
            (r.status_code, {k: v for k, v in r.headers.items() if k not in VARYING})
            for r in (ok, bad, unauthenticated)
        ]
    lane, stack = answers["lane"], answers["stack"]
    assert [status for status, _ in lane] == [200, 400, 401]
    for (_, ours), (_, theirs) in zip(lane, stack, strict=True):
        ours.pop("x-ratelimit-remaining-requests", None)  # one more call was counted
        theirs.pop("x-ratelimit-remaining-requests", None)
        ours.pop("x-ratelimit-remaining-tokens", None)
        theirs.pop("x-ratelimit-remaining-tokens", None)
        assert ours == theirs
    if origin:
        assert lane[0][1]["access-control-allow-origin"] == "*"
        assert "x-request-id" in lane[0][1]["access-control-expose-headers"]


async def test_an_unexpected_error_in_the_lane_is_the_500_envelope(
    app: Any,
    services: AppServices,
    fake_models: list[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The envelope with the request id; the exception is logged and stops there, so the
    server keeps the connection."""
    from aivax.inference import route

    async def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(route, "respond", broken)
    account = await make_account(services, plan="starter", balance_micros=1_000_000)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.post(
            PATH, headers={**account.headers, "x-request-id": "req-broken"}, json=HELLO
        )
    error = assert_error(response, 500, "internal_error")
    assert "req-broken" in error["message"]
    assert response.headers["x-request-id"] == "req-broken"
    assert any(record.exc_info and "a bug" in str(record.exc_info[1]) for record in caplog.records)
    raising = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=raising, base_url="http://t") as client:
        response = await client.post(PATH, headers=account.headers, json=HELLO)
    assert_error(response, 500, "internal_error")


def test_no_lane_when_telemetry_may_be_on(
    settings: Settings, services: AppServices, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With telemetry configured, FastAPI's telemetry middleware must see the chat route too,
    so it stays in the stack (served by `ChatRoute`)."""
    from aivax import app as app_module

    monkeypatch.setattr(app_module, "telemetry_config", lambda: None)
    built = app_module.create_app(settings, services=services)
    assert isinstance(built, app_module.AivaxApp)
    assert built.chat_lane is None
