"""Builds the provider for a resolved model. Built-in providers register through the same
`register` call an extension would use. One shared `httpx.AsyncClient` per upstream origin,
with explicit timeouts and connection limits; account-supplied (BYOK) URLs go through a client
whose transport is the SSRF guard.

Which client calls an operator upstream is decided once per origin, when its client is built:
the own HTTP/1 client for chat unless `upstream_client` is `httpx` or a forward proxy applies to
the origin (then httpx through the proxy). Account-supplied URLs never go through a proxy: the
proxy would resolve the host itself, out of the SSRF guard's reach (docs/decisions.md).
"""

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
from aivax.providers.proxies import ProxyRules

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
        self._upstreams: dict[str, UpstreamHTTP] = {}  # operator upstreams, by origin
        self._runtimes: dict[str, LocalModelRuntime] = {}
        self.proxies = ProxyRules.from_settings(settings)
        # The local runtime's listener on 127.0.0.1: never through a proxy (`trust_env=False`
        # keeps httpx from reading proxy variables of its own).
        self.internal_http = httpx.AsyncClient(timeout=httpx.Timeout(30.0), trust_env=False)
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
                # which needs httpcore's `sni_hostname`; account-supplied URLs use it. Always
                # direct: through a proxy, the proxy would resolve the host and choose the
                # address, so the guard's check would not hold.
                transport = GuardedTransport(
                    httpx.AsyncHTTPTransport(limits=limits),
                    allowlist=frozenset(self.settings.ssrf_allowlist),
                )
            else:
                transport = self._operator_transport(base_url, limits)
            # trust_env=False: proxies come from the settings only, never from httpx's own
            # reading of the environment (the transports still read SSL_CERT_FILE).
            client = httpx.AsyncClient(
                timeout=timeout,
                transport=transport,
                follow_redirects=False,
                cookies=no_cookies(),
                trust_env=False,
            )
            self._clients[key] = client
        return client

    def _operator_transport(self, base_url: str, limits: httpx.Limits) -> httpx.AsyncBaseTransport:
        proxy = self.proxies.proxy_for(base_url)
        if proxy is not None or self.settings.upstream_client == "httpx":
            # Through a proxy, httpcore's transport: aiohttp sends proxy credentials with a
            # plain-http request only from its deprecated `BasicAuth` (a warning per call).
            return httpx.AsyncHTTPTransport(limits=limits, proxy=proxy)
        # Operator upstreams called through httpx (embeddings, moderation; chat goes through
        # `Http1Upstream`): aiohttp's I/O under the httpx API costs a fraction of httpcore's CPU
        # per request (measured in bench/gateway.py). aiohttp's `trust_env` stays off: it reads
        # no proxy variable itself.
        return AiohttpTransport(limits=limits)

    def upstream(self, base_url: str, *, guarded: bool) -> UpstreamHTTP:
        """The client a chat adapter calls `base_url` with: `Http1Upstream` for operator
        upstreams (httpx when `upstream_client` says so or a proxy applies to the origin), the
        SSRF-guarded httpx client for account-supplied URLs."""
        if guarded:
            return HttpxUpstream(self.client(base_url, guarded=True))
        origin = _origin(base_url)
        upstream = self._upstreams.get(origin)
        if upstream is None:
            if self.settings.upstream_client == "httpx" or self.proxies.proxy_for(base_url):
                upstream = HttpxUpstream(self.client(base_url, guarded=False))
            else:
                upstream = Http1Upstream(
                    connect_timeout=self.settings.upstream_connect_timeout_seconds
                )
            self._upstreams[origin] = upstream
        return upstream

    def describe(self) -> str:
        """One line for the start-up log: the upstream client and the proxy rules."""
        if self.settings.upstream_client == "httpx":
            client = "httpx for every operator upstream"
        else:
            client = "own HTTP/1 client for chat, httpx on aiohttp for other calls"
        line = f"upstream HTTP: {client}; proxy: {self.proxies.describe()}"
        if self.proxies.configured:
            line += (
                " (upstreams it applies to are called with httpx through it; "
                "account-supplied URLs connect directly)"
            )
        return line

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
            if isinstance(upstream, Http1Upstream):  # the others wrap a client of `_clients`
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
