"""SSRF guard for user-supplied URLs.

`GuardedTransport` resolves the host of every request it sends (and redirects are never followed
by the clients that use it, so every hop comes through here), refuses any non-public address,
then connects to the vetted IP itself — with the original Host header and TLS server name — so a
DNS answer that changes between the check and the connection (rebinding) cannot reach inside.

An IPv6 address is public only if every IPv4 address a transition mechanism would deliver it to
is public too: on an IPv6-only host behind NAT64, `64:ff9b::a9fe:a9fe` *is* 169.254.169.254.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from urllib.parse import urlsplit

import httpx

IPAddress = IPv4Address | IPv6Address

# RFC 6052 §2.1: the well-known NAT64 prefix is a /96, so the IPv4 address is the last 32 bits.
# The local-use prefix 64:ff9b:1::/48 (RFC 8215) may be cut into any RFC 6052 §2.2 length, which
# moves the IPv4 address; it sits inside the reserved ::/8 and is refused whole with it.
_NAT64_WELL_KNOWN = IPv6Network("64:ff9b::/96")
# RFC 4291 §2.5.5.1 (IPv4-compatible, deprecated) and RFC 2765 (SIIT IPv4-translated); both lie in
# the reserved ::/8 and are refused whole — their IPv4 part only makes the refusal message clearer.
_IPV4_COMPATIBLE = IPv6Network("::/96")
_IPV4_TRANSLATED = IPv6Network("::ffff:0:0:0/96")
# RFC 5214 §6.1: an ISATAP interface identifier is 0000:5efe or 0200:5efe ('u' bit) followed by
# the IPv4 address; an ISATAP router delivers it to that IPv4 address inside its site, in any
# prefix.
_ISATAP_MASK = 0xFDFF_FFFF
_ISATAP_ID = 0x0000_5EFE
# Ranges the IANA special-purpose registries mark as not globally reachable that Python 3.11's
# `is_global` still calls global, and IETF protocol assignments that later Pythons call global in
# part (anycast and AS112 services, never a model upstream): refused whole on every Python.
_IPV4_NOT_GLOBAL = (IPv4Network("192.0.0.0/24"),)  # IETF protocol assignments (RFC 6890)
_IPV6_NOT_GLOBAL = (
    IPv6Network("2001::/23"),  # IETF protocol assignments (RFC 2928), Teredo among them
    IPv6Network("3fff::/20"),  # documentation (RFC 9637)
)


class SSRFBlocked(ValueError):
    """The URL points at an address AIVAX refuses to call."""


def _last_32_bits(address: IPv6Address) -> IPv4Address:
    return IPv4Address(address.packed[-4:])


def _translated_ipv4(address: IPv6Address) -> IPv4Address | None:
    """The IPv4 destination of a prefix that only translates or relays to IPv4."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64_WELL_KNOWN:
        return _last_32_bits(address)
    return address.sixtofour


def _tunnelled_ipv4(address: IPv6Address) -> tuple[IPv4Address, ...]:
    """IPv4 endpoints inside an address that must also be public as an IPv6 address."""
    if address.teredo is not None:  # (server, de-obfuscated client)
        return address.teredo
    if address in _IPV4_COMPATIBLE or address in _IPV4_TRANSLATED:
        return (_last_32_bits(address),)
    if ((int(address) >> 32) & _ISATAP_MASK) == _ISATAP_ID:
        return (_last_32_bits(address),)
    return ()


def _embedded_ipv4(address: IPAddress) -> tuple[IPv4Address, ...]:
    if isinstance(address, IPv4Address):
        return ()
    translated = _translated_ipv4(address)
    return (translated,) if translated is not None else _tunnelled_ipv4(address)


def _is_public_ipv4(address: IPv4Address) -> bool:
    return (
        address.is_global
        and not address.is_multicast
        and not any(address in network for network in _IPV4_NOT_GLOBAL)
    )


def _is_public_ipv6(address: IPv6Address) -> bool:
    # `is_reserved` is everything outside the unicast ranges IANA allocates (::/8 with the
    # IPv4-compatible, IPv4-translated and local-use NAT64 forms, 100::/8, 5f00::/16, ...).
    return (
        address.is_global
        and not (address.is_multicast or address.is_reserved or address.is_site_local)
        and not any(address in network for network in _IPV6_NOT_GLOBAL)
    )


def _is_public(address: IPAddress) -> bool:
    if isinstance(address, IPv4Address):
        return _is_public_ipv4(address)
    translated = _translated_ipv4(address)
    if translated is not None:
        return _is_public_ipv4(translated)
    embedded = _tunnelled_ipv4(address)
    return all(_is_public_ipv4(ipv4) for ipv4 in embedded) and _is_public_ipv6(address)


def _carrying(address: IPAddress) -> str:
    embedded = _embedded_ipv4(address)
    return f" (carrying IPv4 {', '.join(map(str, embedded))})" if embedded else ""


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _normal_host(host: str) -> str:
    return host.strip().strip("[]").lower()


async def vetted_address(host: str, port: int, *, allowlist: frozenset[str]) -> str:
    """The first address of `host`, if every address it resolves to is public (or allowed).

    `host` is a URL's host without brackets, as `urlsplit(url).hostname` gives it.
    """
    if _normal_host(host) in {_normal_host(allowed) for allowed in allowlist}:
        return host
    literal = _ip_literal(host)
    if literal is not None:
        if not _is_public(literal):
            raise SSRFBlocked(f"address {host!r}{_carrying(literal)} is not a public address")
        return str(literal)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SSRFBlocked(f"host {host!r} does not resolve") from exc
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    blocked = [f"{str(a)!r}{_carrying(a)}" for a in addresses if not _is_public(a)]
    if blocked or not addresses:
        raise SSRFBlocked(f"host {host!r} resolves to a non-public address ({', '.join(blocked)})")
    return str(addresses[0])


def url_endpoint(url: str) -> tuple[str, int]:
    """The host (IPv6 without brackets) and port (explicit or the scheme's) a URL connects to."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise SSRFBlocked(f"URL port is not a number from 0 to 65535 ({exc})") from None
    if not parts.hostname:
        raise SSRFBlocked("URL has no host")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def check_url_shape(url: str) -> str:
    """Cheap checks before any resolution: scheme, host, port, no credentials in the URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise SSRFBlocked(f"URL scheme {parts.scheme!r} is not allowed; use https")
    url_endpoint(url)
    if parts.username or parts.password:
        raise SSRFBlocked("URL must not contain credentials")
    return url.rstrip("/")


class GuardedTransport(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport, *, allowlist: frozenset[str]) -> None:
        self.inner = inner
        self.allowlist = allowlist

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            host, port = url_endpoint(str(request.url))
            address = await vetted_address(host, port, allowlist=self.allowlist)
        except SSRFBlocked as exc:
            raise httpx.ConnectError(f"blocked by the SSRF guard: {exc}", request=request) from exc
        if _ip_literal(host) is None and address != host:
            # Pin the vetted address; the name still goes out as Host and TLS server name.
            if request.url.scheme == "https":
                request.extensions = {**request.extensions, "sni_hostname": host}
            request.url = request.url.copy_with(host=address)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()
