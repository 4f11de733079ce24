"""Operator upstreams honour HTTP_PROXY / HTTPS_PROXY / NO_PROXY, and AIVAX_UPSTREAM_CLIENT=httpx
serves every upstream through httpx; account-supplied URLs always connect directly."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from aivax import __version__
from aivax.app import create_app
from aivax.config import Settings
from aivax.providers.proxies import ProxyRules
from aivax.providers.registry import ProviderRegistry
from aivax.services import AppServices
from tests.conftest import FakeUpstream
from tests.fixtures.factories import make_account
from tests.fixtures.forward_proxy import ForwardProxy

CHAT = {"model": "test/fake-ok", "messages": [{"role": "user", "content": "hi"}]}
OWN_AGENT = f"aivax/{__version__}"
UPSTREAM_KEY = {"authorization": "Bearer sk-fake-upstream"}


@pytest.fixture
def proxy() -> Iterator[ForwardProxy]:
    server = ForwardProxy().start()
    yield server
    server.stop()


@asynccontextmanager
async def app_client(
    settings: Settings, **changes: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    """The real app on its own services built from `settings` with `changes`, and the headers
    of a funded account."""
    built = AppServices.build(isolated(settings, wallet_writer="inline", **changes))
    try:
        account = await make_account(built, plan="starter", balance_micros=1_000_000)
        application = create_app(built.settings, services=built)
        async with LifespanManager(application):
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://aivax.test") as http:
                yield http, account.headers
    finally:
        await built.close()


def isolated(settings: Settings, **changes: Any) -> Settings:
    """`settings` with `changes` and no proxy from the environment the tests run in."""
    return settings.model_copy(
        update={"http_proxy": None, "https_proxy": None, "no_proxy": [], **changes}
    )


def chat_requests(upstream: FakeUpstream, since: int) -> list[dict[str, str]]:
    return upstream.recorder.headers[since:]


async def test_chat_and_embeddings_go_through_the_http_proxy(
    settings: Settings, fake_models: list[str], fake_openai: FakeUpstream, proxy: ForwardProxy
) -> None:
    chat_url = f"POST {fake_openai.base_url}/chat/completions"
    async with app_client(settings, http_proxy=proxy.url) as (http, headers):
        answer = await http.post("/v1/chat/completions", headers=headers, json=CHAT)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "Hello from fake"
        assert proxy.targets() == [chat_url]

        async with http.stream(
            "POST", "/v1/chat/completions", headers=headers, json={**CHAT, "stream": True}
        ) as streamed:
            assert streamed.status_code == 200
            text = "".join([line async for line in streamed.aiter_lines()])
        assert '"Hello"' in text
        assert text.endswith("data: [DONE]")
        assert proxy.targets() == [chat_url, chat_url]

        embedded = await http.post(
            "/v1/embeddings", headers=headers, json={"model": "test/fake-embed", "input": "x"}
        )
        assert embedded.status_code == 200, embedded.text
        assert proxy.targets()[2:] == [f"POST {fake_openai.base_url}/embeddings"]


async def test_an_upstream_in_no_proxy_is_called_directly_by_the_own_client(
    settings: Settings,
    fake_models: list[str],
    fake_openai: FakeUpstream,
    fake_anthropic: FakeUpstream,
    proxy: ForwardProxy,
) -> None:
    """Both fakes listen on 127.0.0.1; NO_PROXY names one of them by its port."""
    since = len(fake_openai.recorder.headers)
    no_proxy = ["localhost", f"127.0.0.1:{fake_openai.server.port}"]
    async with app_client(settings, http_proxy=proxy.url, no_proxy=no_proxy) as (http, headers):
        answer = await http.post("/v1/chat/completions", headers=headers, json=CHAT)
        assert answer.status_code == 200, answer.text
        embedded = await http.post(
            "/v1/embeddings", headers=headers, json={"model": "test/fake-embed", "input": "x"}
        )
        assert embedded.status_code == 200, embedded.text
        claude = await http.post(
            "/v1/chat/completions", headers=headers, json={**CHAT, "model": "test/claude-plain"}
        )
        assert claude.status_code == 200, claude.text
    assert proxy.targets() == [f"POST {fake_anthropic.server.url}/v1/messages"]
    assert [h["user-agent"] for h in chat_requests(fake_openai, since)] == [OWN_AGENT]


async def test_upstream_client_httpx_serves_chat_through_httpx(
    settings: Settings, fake_models: list[str], fake_openai: FakeUpstream
) -> None:
    since = len(fake_openai.recorder.headers)
    async with app_client(settings, upstream_client="httpx") as (http, headers):
        answer = await http.post("/v1/chat/completions", headers=headers, json=CHAT)
        assert answer.status_code == 200, answer.text
        async with http.stream(
            "POST", "/v1/chat/completions", headers=headers, json={**CHAT, "stream": True}
        ) as streamed:
            assert streamed.status_code == 200
            assert "data: [DONE]" in "".join([line async for line in streamed.aiter_lines()])
    agents = [h["user-agent"] for h in chat_requests(fake_openai, since)]
    assert agents == [f"python-httpx/{httpx.__version__}"] * 2


async def test_upstream_client_httpx_goes_through_the_proxy_too(
    settings: Settings, fake_models: list[str], fake_openai: FakeUpstream, proxy: ForwardProxy
) -> None:
    async with app_client(settings, upstream_client="httpx", http_proxy=proxy.url) as (
        http,
        headers,
    ):
        answer = await http.post("/v1/chat/completions", headers=headers, json=CHAT)
        assert answer.status_code == 200, answer.text
    assert proxy.targets() == [f"POST {fake_openai.base_url}/chat/completions"]


@pytest.mark.parametrize("upstream_client", ["own", "httpx"])
async def test_an_https_upstream_is_reached_with_connect_through_the_https_proxy(
    settings: Settings, fake_openai: FakeUpstream, proxy: ForwardProxy, upstream_client: str
) -> None:
    """The proxy resolves the name: `upstream.invalid` resolves nowhere, so the CONNECT the
    proxy records (and answers 502) is the only way the call could have gone. HTTPS_PROXY does
    not apply to the http:// fake, which is called directly."""
    registry = ProviderRegistry(
        isolated(settings, https_proxy=proxy.url, upstream_client=upstream_client)
    )
    try:
        http = registry.upstream("https://upstream.invalid/v1", guarded=False)
        with pytest.raises(httpx.ProxyError):
            async with http.post(
                "https://upstream.invalid/v1/chat/completions", headers={}, body=b"{}", timeout=5
            ):
                pass
        client = registry.client("https://upstream.invalid/v1", guarded=False)
        with pytest.raises(httpx.ProxyError):
            await client.post("https://upstream.invalid/v1/embeddings", json={})
        plain = registry.upstream(fake_openai.base_url, guarded=False)
        async with plain.post(
            f"{fake_openai.base_url}/chat/completions",
            headers=UPSTREAM_KEY,
            body=json.dumps(CHAT | {"model": "fake-ok"}).encode(),
            timeout=5,
        ) as response:
            assert response.status == 200
            await response.read()
    finally:
        await registry.close()
    assert proxy.targets() == ["CONNECT upstream.invalid:443"] * 2


async def test_proxy_credentials_are_sent_to_the_proxy_and_never_logged(
    settings: Settings,
    fake_models: list[str],
    fake_openai: FakeUpstream,
    proxy: ForwardProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with_credentials = proxy.url.replace("http://", "http://operator:s3cret@")
    caplog.set_level(logging.INFO, logger="aivax")
    async with app_client(settings, http_proxy=with_credentials) as (http, headers):
        answer = await http.post("/v1/chat/completions", headers=headers, json=CHAT)
        assert answer.status_code == 200, answer.text
    # Basic base64("operator:s3cret")
    assert proxy.forwarded[0].headers["proxy-authorization"] == "Basic b3BlcmF0b3I6czNjcmV0"
    assert "proxy-authorization" not in fake_openai.recorder.headers[-1]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("upstream HTTP")]
    assert lines == [
        "upstream HTTP: own HTTP/1 client for chat, httpx on aiohttp for other calls; "
        f"proxy: {proxy.url} for http:// upstreams (upstreams it applies to are called with "
        "httpx through it; account-supplied URLs connect directly)"
    ]
    assert "s3cret" not in caplog.text


async def test_account_supplied_urls_never_go_through_the_proxy(
    settings: Settings, fake_openai: FakeUpstream, proxy: ForwardProxy
) -> None:
    """The SSRF guard vets the address it connects to; through a proxy, the proxy would pick
    it. The same origin as an operator upstream goes through the proxy. (127.0.0.1 is on the
    test settings' SSRF allowlist.)"""
    registry = ProviderRegistry(isolated(settings, http_proxy=proxy.url))
    chat_url = f"{fake_openai.base_url}/chat/completions"
    body = json.dumps(CHAT | {"model": "fake-ok"}).encode()
    try:
        for guarded in (True, False):
            http = registry.upstream(fake_openai.base_url, guarded=guarded)
            async with http.post(chat_url, headers=UPSTREAM_KEY, body=body, timeout=5) as answer:
                assert answer.status == 200
                await answer.read()
        client = registry.client(fake_openai.base_url, guarded=True)
        embedded = await client.post(
            f"{fake_openai.base_url}/embeddings",
            headers=UPSTREAM_KEY,
            json={"model": "fake-embed", "input": "x"},
        )
        assert embedded.status_code == 200
    finally:
        await registry.close()
    assert proxy.targets() == [f"POST {chat_url}"]  # the operator call only


def rules(monkeypatch: pytest.MonkeyPatch, no_proxy: str) -> ProxyRules:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "proxy.corp:3128")
    monkeypatch.setenv("http_proxy", "http://proxy.corp:8080")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    return ProxyRules.from_settings(Settings(_env_file=None))  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("no_proxy", "url", "proxied"),
    [
        ("", "https://api.openai.com/v1", "http://proxy.corp:3128"),
        ("", "http://vllm.lan:8000/v1", "http://proxy.corp:8080"),
        ("openai.com", "https://api.openai.com/v1", None),  # a name covers its subdomains
        ("openai.com", "https://openai.com/v1", None),
        ("openai.com", "https://notopenai.com/v1", "http://proxy.corp:3128"),
        (".openai.com", "https://api.openai.com/v1", None),
        ("*.openai.com", "https://api.openai.com/v1", None),
        ("OpenAI.COM", "https://API.openai.com/v1", None),
        ("*", "https://api.openai.com/v1", None),
        ("internal, *", "https://api.openai.com/v1", None),
        ("vllm.lan:8000", "http://vllm.lan:8000/v1", None),  # a port: only that port
        ("vllm.lan:8000", "http://vllm.lan:9000/v1", "http://proxy.corp:8080"),
        ("api.openai.com:443", "https://api.openai.com/v1", None),  # the scheme's port
        ("10.0.0.7", "http://10.0.0.7:8000/v1", None),
        ("10.0.0.7", "http://10.0.0.70:8000/v1", "http://proxy.corp:8080"),
        ("10.0.0.0/8", "http://10.20.30.40/v1", None),
        ("10.0.0.0/8", "http://11.0.0.1/v1", "http://proxy.corp:8080"),
        ("::1", "http://[::1]:8000/v1", None),
        ("[fd00::5]", "http://[fd00::5]/v1", None),
        ("fd00::/8", "http://[fd00::5]/v1", None),
        ("fd00::/8", "http://10.0.0.1/v1", "http://proxy.corp:8080"),
    ],
)
def test_no_proxy_rules(
    monkeypatch: pytest.MonkeyPatch, no_proxy: str, url: str, proxied: str | None
) -> None:
    assert rules(monkeypatch, no_proxy).proxy_for(url) == proxied


def test_the_aivax_form_of_a_proxy_variable_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIVAX_HTTPS_PROXY", "http://aivax-only:3128")
    assert rules(monkeypatch, "").https == "http://aivax-only:3128"


def test_without_proxy_settings_the_own_client_serves_chat(settings: Settings) -> None:
    """The decision is made once per origin: later calls get the same client object."""
    registry = ProviderRegistry(isolated(settings))
    first = registry.upstream("http://127.0.0.1:9/v1", guarded=False)
    assert type(first).__name__ == "Http1Upstream"
    assert registry.upstream("http://127.0.0.1:9/v1/x", guarded=False) is first
    assert registry.describe() == (
        "upstream HTTP: own HTTP/1 client for chat, httpx on aiohttp for other calls; proxy: none"
    )
