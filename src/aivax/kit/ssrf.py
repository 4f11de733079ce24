"""SSRF guard for user-supplied URLs.

`GuardedTransport` resolves the host of every request it sends (and redirects are never followed
by the clients that use it, so every hop comes through here), refuses any non-public address,
then connects to the vetted IP itself — with the original Host header and TLS server name — so a
DNS answer that changes between the check and the connection (rebinding) cannot reach inside.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

import httpx


class SSRFBlocked(ValueError):
    """The URL points at an address AIVAX refuses to call."""


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


async def vetted_address(host: str, port: int, *, allowlist: frozenset[str]) -> str:
    """The first address of `host`, if every address it resolves to is public (or allowed)."""
    if host in allowlist:
        return host
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        literal = None
    if literal is not None:
        if not _is_public(literal):
            raise SSRFBlocked(f"address {host!r} is not a public address")
        return str(literal)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SSRFBlocked(f"host {host!r} does not resolve") from exc
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    blocked = [str(a) for a in addresses if not _is_public(a)]
    if blocked or not addresses:
        raise SSRFBlocked(f"host {host!r} resolves to a non-public address ({', '.join(blocked)})")
    return str(addresses[0])


def check_url_shape(url: str) -> str:
    """Cheap checks before any resolution: scheme, host, no credentials in the URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise SSRFBlocked(f"URL scheme {parts.scheme!r} is not allowed; use https")
    if not parts.hostname:
        raise SSRFBlocked("URL has no host")
    if parts.username or parts.password:
        raise SSRFBlocked("URL must not contain credentials")
    return url.rstrip("/")


class GuardedTransport(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport, *, allowlist: frozenset[str]) -> None:
        self.inner = inner
        self.allowlist = allowlist

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        port = request.url.port or (443 if request.url.scheme == "https" else 80)
        try:
            address = await vetted_address(host, port, allowlist=self.allowlist)
        except SSRFBlocked as exc:
            raise httpx.ConnectError(f"blocked by the SSRF guard: {exc}", request=request) from exc
        if address != host:
            if request.url.scheme == "https":
                request.extensions = {**request.extensions, "sni_hostname": host}
            request.url = request.url.copy_with(host=address)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()
