"""Which operator upstreams are called through a forward proxy.

The rules are the conventional ones (`HTTP_PROXY` for http:// URLs, `HTTPS_PROXY` for https://
URLs, `NO_PROXY` exceptions), read once in `config.py`. A `NO_PROXY` entry is matched as
`urllib.request.proxy_bypass_environment` matches it (a name matches itself and its subdomains,
case-insensitively; `name:port` only that port; `*` everything), plus IP networks
(`10.0.0.0/8`), which curl and requests accept and urllib does not. The decision is made once
per upstream origin, when its client is built, never per call.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from urllib.parse import urlsplit
from urllib.request import proxy_bypass_environment  # type: ignore[attr-defined]  # no stub

import httpx

from aivax.config import Settings

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class ProxyRules:
    http: str | None
    https: str | None
    no_proxy: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> ProxyRules:
        return cls(settings.http_proxy, settings.https_proxy, tuple(settings.no_proxy))

    @property
    def configured(self) -> bool:
        return (self.http is not None or self.https is not None) and "*" not in self.no_proxy

    def proxy_for(self, url: str) -> str | None:
        """The proxy that `url` is called through, or None to connect directly."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        proxy = {"http": self.http, "https": self.https}.get(scheme)
        if proxy is None or not parts.hostname:
            return None
        try:
            port = parts.port or _DEFAULT_PORTS[scheme]
        except ValueError:
            return None  # not a URL anything can connect to; the call fails on its own
        return None if self.bypasses(parts.hostname, port) else proxy

    def bypasses(self, host: str, port: int) -> bool:
        """Whether `NO_PROXY` sends `host` (without brackets) on `port` directly."""
        if not self.no_proxy:
            return False
        if "*" in self.no_proxy:
            return True
        if _in_networks(host, self._networks()):
            return True
        # urllib splits a port off at the last colon: an IPv6 address goes without one.
        target = host if ":" in host else f"{host}:{port}"
        return bool(proxy_bypass_environment(target, {"no": ",".join(self.no_proxy)}))

    def _networks(self) -> list[IPv4Network | IPv6Network]:
        return [ipaddress.ip_network(e, strict=False) for e in self.no_proxy if "/" in e]

    def describe(self) -> str:
        """The rules in one line, without any credential a proxy URL carries."""
        if not self.configured:
            return "none"
        parts = [
            f"{shown_proxy(proxy)} for {scheme}:// upstreams"
            for scheme, proxy in (("https", self.https), ("http", self.http))
            if proxy is not None
        ]
        if self.no_proxy:
            parts.append(f"except NO_PROXY {','.join(self.no_proxy)}")
        return ", ".join(parts)


def shown_proxy(proxy: str) -> str:
    return str(httpx.URL(proxy).copy_with(username=None, password=None))


def _in_networks(host: str, networks: list[IPv4Network | IPv6Network]) -> bool:
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in networks)
