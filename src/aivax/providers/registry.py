"""Builds the provider for a resolved model. Built-in providers register through the same
`register` call an extension would use. One shared `httpx.AsyncClient` per upstream origin,
with explicit timeouts and connection limits; account-supplied (BYOK) URLs go through a client
whose transport is the SSRF guard."""

from __future__ import annotations

from collections.abc import Callable
from http.cookiejar import CookieJar, DefaultCookiePolicy
from urllib.parse import urlsplit

import httpx
from httpx_aiohttp import AiohttpTransport

from aivax.catalog.service import ResolvedModel
from aivax.config import Settings
from aivax.kit.ssrf import GuardedTransport
from aivax.providers.anthropic import AnthropicProvider
from aivax.providers.base import Provider, UpstreamError
from aivax.providers.http import HttpxUpstream, UpstreamHTTP
from aivax.providers.http1 import Http1Upstream
from aivax.providers.local_gguf import LocalModelRuntime, resolve_gguf_path
from aivax.providers.openai_compat import OpenAICompatProvider

# (registry, model, retries before the first byte) -> provider
ProviderFactory = Callable[["ProviderRegistry", ResolvedModel, int], Provider]


def _origin(base_url: str) -> str:
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{parts.netloc}"


def no_cookies() -> CookieJar:
    """A cookie jar that keeps nothing: one client serves every account, so an upstream's
    cookies must never travel with another caller's request."""
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


class UnknownProvider(LookupError):
    pass


class ProviderRegistry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._factories: dict[str, ProviderFactory] = {}
        self._clients: dict[tuple[str, bool], httpx.AsyncClient] = {}
        self._upstreams: dict[str, Http1Upstream] = {}  # operator upstreams, by origin
        self._runtimes: dict[str, LocalModelRuntime] = {}
        self.internal_http = httpx.AsyncClient(timeout=httpx.Timeout(30.0))
        self.register("openai", _openai)
        self.register("anthropic", _anthropic)
        self.register("local_gguf", _local)

    def register(self, kind: str, factory: ProviderFactory) -> None:
        self._factories[kind] = factory

    def provider(self, model: ResolvedModel, *, retries: int | None = None) -> Provider:
        """`retries`: the adapter's own retries before the first byte (default: the setting;
        gateways pass 0 and retry at the routing level instead)."""
        try:
            factory = self._factories[model.provider]
        except KeyError:
            raise UnknownProvider(f"no provider {model.provider!r} is registered") from None
        return factory(self, model, self.settings.upstream_retries if retries is None else retries)

    def client(self, base_url: str, *, guarded: bool) -> httpx.AsyncClient:
        key = (_origin(base_url), guarded)
        client = self._clients.get(key)
        if client is None:
            timeout = httpx.Timeout(
                self.settings.upstream_read_timeout_seconds,
                connect=self.settings.upstream_connect_timeout_seconds,
            )
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=100)
            transport: httpx.AsyncBaseTransport
            if guarded:
                # The SSRF guard connects to the vetted IP with the original TLS server name,
                # which needs httpcore's `sni_hostname`; account-supplied URLs use it.
                transport = GuardedTransport(
                    httpx.AsyncHTTPTransport(limits=limits),
                    allowlist=frozenset(self.settings.ssrf_allowlist),
                )
            else:
                # Operator upstreams called through httpx (embeddings, moderation; chat goes
                # through `Http1Upstream`): aiohttp's I/O under the httpx API costs a fraction
                # of httpcore's CPU per request (measured in bench/gateway.py).
                transport = AiohttpTransport(limits=limits)
            client = httpx.AsyncClient(
                timeout=timeout, transport=transport, follow_redirects=False, cookies=no_cookies()
            )
            self._clients[key] = client
        return client

    def upstream(self, base_url: str, *, guarded: bool) -> UpstreamHTTP:
        """The client a chat adapter calls `base_url` with: `Http1Upstream` for operator
        upstreams, the SSRF-guarded httpx client for account-supplied URLs."""
        if guarded:
            return HttpxUpstream(self.client(base_url, guarded=True))
        origin = _origin(base_url)
        upstream = self._upstreams.get(origin)
        if upstream is None:
            upstream = Http1Upstream(connect_timeout=self.settings.upstream_connect_timeout_seconds)
            self._upstreams[origin] = upstream
        return upstream

    def local_runtime(self, model: ResolvedModel) -> LocalModelRuntime:
        runtime = self._runtimes.get(model.id)
        if runtime is None:
            try:
                path = resolve_gguf_path(model.options)
            except FileNotFoundError as exc:
                raise UpstreamError(
                    f"the local model {model.id!r} is not installed: {exc}",
                    status=503,
                    provider="local_gguf",
                    code="model_unavailable",
                ) from exc
            runtime = LocalModelRuntime(
                path,
                context_window=model.context_window or 4096,
                threads=self.settings.local_model_threads,
                max_waiting=self.settings.local_model_max_waiting,
                http=self.internal_http,
                verbose=self.settings.log_level == "debug",
            )
            self._runtimes[model.id] = runtime
        return runtime

    async def close(self) -> None:
        for upstream in self._upstreams.values():
            await upstream.aclose()
        for client in self._clients.values():
            await client.aclose()
        await self.internal_http.aclose()


def _openai(registry: ProviderRegistry, model: ResolvedModel, retries: int) -> Provider:
    return OpenAICompatProvider(
        registry.upstream(model.base_url, guarded=model.byok),
        base_url=model.base_url,
        api_key=model.api_key,
        retries=retries,
    )


def _anthropic(registry: ProviderRegistry, model: ResolvedModel, retries: int) -> Provider:
    return AnthropicProvider(
        registry.upstream(model.base_url, guarded=model.byok),
        base_url=model.base_url,
        api_key=model.api_key,
    )


def _local(registry: ProviderRegistry, model: ResolvedModel, retries: int) -> Provider:
    return registry.local_runtime(model)
