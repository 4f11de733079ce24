"""The SSRF guard: every address form that reaches a non-public host is refused, public pass."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from aivax.catalog import service as catalog
from aivax.catalog.schemas import CredentialCreate
from aivax.kit.ssrf import (
    GuardedTransport,
    SSRFBlocked,
    check_url_shape,
    url_endpoint,
    vetted_address,
)
from aivax.services import AppServices
from tests.fixtures.assertions import assert_error
from tests.fixtures.factories import AccountWithKeys, make_account

NOTHING_ALLOWED: frozenset[str] = frozenset()

REFUSED = [
    # IPv4 ranges, including the ones Python 3.11's `is_global` still calls global
    ("0.0.0.0", "unspecified"),  # noqa: S104
    ("10.1.2.3", "private"),
    ("127.0.0.2", "loopback"),
    ("169.254.169.254", "cloud metadata (link-local)"),
    ("100.64.0.1", "shared address space"),
    ("192.0.0.8", "IETF protocol assignments"),
    ("192.0.2.1", "documentation"),
    ("198.18.0.1", "benchmarking"),
    ("224.0.0.1", "IPv4 multicast"),
    ("239.255.255.250", "IPv4 multicast (SSDP)"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
    # IPv6 ranges
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local with a zone"),
    ("fd00::1", "unique local"),
    ("fec0::1", "site-local (deprecated)"),
    ("ff02::1", "multicast, link scope"),
    ("ff0e::1", "multicast, global scope"),
    ("2001:db8::1", "documentation"),
    ("3fff::1", "documentation (RFC 9637)"),
    ("100::1", "discard-only"),
    ("5f00::1", "SRv6 SIDs (reserved)"),
    ("4000::1", "unallocated"),
    ("2001:3::1", "IETF protocol assignments (AMT)"),
    ("2001:20::1", "IETF protocol assignments (ORCHIDv2)"),
    # IPv6 forms that carry an IPv4 address
    ("::ffff:169.254.169.254", "IPv4-mapped metadata"),
    ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
    ("::ffff:100.64.0.1", "IPv4-mapped shared address space"),
    ("::7f00:1", "IPv4-compatible loopback"),
    ("::a9fe:a9fe", "IPv4-compatible metadata"),
    ("::8.8.8.8", "IPv4-compatible (deprecated even when public)"),
    ("::ffff:0:a9fe:a9fe", "IPv4-translated metadata"),
    ("64:ff9b::a9fe:a9fe", "NAT64 well-known prefix, metadata"),
    ("64:ff9b::169.254.169.254", "NAT64 well-known prefix, dotted metadata"),
    ("64:ff9b::7f00:1", "NAT64 well-known prefix, loopback"),
    ("64:ff9b::a00:1", "NAT64 well-known prefix, 10.0.0.1"),
    ("64:ff9b:1::a9fe:a9fe", "NAT64 local-use prefix, /96 layout"),
    ("64:ff9b:1:a9fe:a9:fe00::", "NAT64 local-use prefix, /48 layout"),
    ("64:ff9b:1::808:808", "NAT64 local-use prefix, even a public IPv4"),
    ("2002:a9fe:a9fe::1", "6to4 of the metadata address"),
    ("2002:7f00:1::", "6to4 of loopback"),
    ("2002:c0a8:101::1", "6to4 of 192.168.1.1"),
    ("2001:0:a9fe:a9fe::1", "Teredo with the metadata address as server"),
    ("2001:0:808:808:0:ffff:5601:5601", "Teredo with the metadata address as client"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo with public endpoints"),
    ("fe80::5efe:a9fe:a9fe", "ISATAP, link-local prefix"),
    ("2606:4700::5efe:a9fe:a9fe", "ISATAP in a global prefix, metadata"),
    ("2606:4700::200:5efe:a00:1", "ISATAP in a global prefix, 'u' bit set, 10.0.0.1"),
]

PUBLIC = [
    ("8.8.8.8", "8.8.8.8"),
    ("1.1.1.1", "1.1.1.1"),
    ("2606:4700::1111", "2606:4700::1111"),
    ("[2606:4700::1111]", "2606:4700::1111"),
    ("2a00:1450:4001:80e::200e", "2a00:1450:4001:80e::200e"),
    ("::ffff:8.8.8.8", "::ffff:808:808"),
    ("64:ff9b::808:808", "64:ff9b::808:808"),
    ("64:ff9b::1.1.1.1", "64:ff9b::101:101"),
    ("2002:808:808::1", "2002:808:808::1"),
    ("2606:4700::5efe:808:808", "2606:4700::5efe:808:808"),
]


@pytest.mark.parametrize(("literal", "form"), REFUSED, ids=[form for _, form in REFUSED])
async def test_non_public_address_forms_are_refused(literal: str, form: str) -> None:
    with pytest.raises(SSRFBlocked, match="is not a public address"):
        await vetted_address(literal, 443, allowlist=NOTHING_ALLOWED)


@pytest.mark.parametrize(("literal", "vetted"), PUBLIC)
async def test_public_address_forms_pass(literal: str, vetted: str) -> None:
    assert await vetted_address(literal, 443, allowlist=NOTHING_ALLOWED) == vetted


@pytest.mark.parametrize(
    "literal",
    ["64:ff9b::a9fe:a9fe", "::a9fe:a9fe", "2002:a9fe:a9fe::1", "2606:4700::5efe:a9fe:a9fe"],
)
async def test_refusal_names_the_embedded_ipv4(literal: str) -> None:
    with pytest.raises(SSRFBlocked, match=r"carrying IPv4 169\.254\.169\.254"):
        await vetted_address(literal, 443, allowlist=NOTHING_ALLOWED)


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "017700000001", "localhost"])
async def test_names_and_numeric_forms_are_judged_by_what_they_resolve_to(host: str) -> None:
    with pytest.raises(SSRFBlocked, match="resolves to a non-public address"):
        await vetted_address(host, 80, allowlist=NOTHING_ALLOWED)


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        ("http://[::1]/v1", ("::1", 80)),
        ("https://[fd00::1]", ("fd00::1", 443)),
        ("https://[FD00::1]:8443/v1", ("fd00::1", 8443)),
        ("http://[64:ff9b::a9fe:a9fe]/v1", ("64:ff9b::a9fe:a9fe", 80)),
        ("https://Example.COM/v1", ("example.com", 443)),
        ("http://10.0.0.8:8000", ("10.0.0.8", 8000)),
    ],
)
def test_url_host_is_read_whole_with_or_without_a_port(url: str, endpoint: tuple[str, int]) -> None:
    assert url_endpoint(url) == endpoint


@pytest.mark.parametrize("url", ["http://example.com:99999/v1", "http://example.com:port/v1"])
def test_url_with_an_impossible_port_is_refused(url: str) -> None:
    with pytest.raises(SSRFBlocked, match="port"):
        check_url_shape(url)


async def test_allowlisted_ipv6_host_is_matched_without_brackets() -> None:
    assert await vetted_address("::1", 80, allowlist=frozenset({"[::1]"})) == "::1"
    assert await vetted_address("fd00::1", 80, allowlist=frozenset({"FD00::1"})) == "fd00::1"


@pytest.mark.parametrize(
    "url",
    [
        "http://[64:ff9b::a9fe:a9fe]:1/",
        "http://[::7f00:1]:1/",
        "http://[2002:a9fe:a9fe::1]/",
        "https://[2606:4700::5efe:a9fe:a9fe]/",
    ],
)
async def test_guarded_transport_refuses_transition_forms(url: str) -> None:
    transport = GuardedTransport(httpx.AsyncHTTPTransport(), allowlist=NOTHING_ALLOWED)
    async with httpx.AsyncClient(transport=transport) as http:
        with pytest.raises(httpx.ConnectError, match="SSRF"):
            await http.get(url)


async def _answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
    await writer.drain()
    writer.close()


async def test_guarded_transport_reaches_an_allowlisted_bracketed_ipv6_host() -> None:
    try:
        server = await asyncio.start_server(_answer_ok, "::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback on this host")
    port = server.sockets[0].getsockname()[1]
    url = f"http://[::1]:{port}/v1/models"
    async with server:
        allowed = GuardedTransport(httpx.AsyncHTTPTransport(), allowlist=frozenset({"[::1]"}))
        async with httpx.AsyncClient(transport=allowed) as http:
            assert (await http.get(url)).text == "ok"
        refused = GuardedTransport(httpx.AsyncHTTPTransport(), allowlist=NOTHING_ALLOWED)
        async with httpx.AsyncClient(transport=refused) as http:
            with pytest.raises(httpx.ConnectError, match="SSRF"):
                await http.get(url)


async def _create(
    client: httpx.AsyncClient, account: AccountWithKeys, base_url: str
) -> httpx.Response:
    return await client.post(
        "/v1/credentials",
        headers=account.headers,
        json={"name": "mine", "provider": "openai", "base_url": base_url, "api_key": "sk-x"},
    )


@pytest.mark.parametrize(
    ("base_url", "address"),
    [
        ("https://[::ffff:169.254.169.254]/v1", "::ffff:169.254.169.254"),
        ("http://[64:ff9b::a9fe:a9fe]/v1", "64:ff9b::a9fe:a9fe"),
        ("http://[::7f00:1]/v1", "::7f00:1"),
        ("https://[fd00::1]", "fd00::1"),
        ("http://[::1]/v1", "::1"),
    ],
)
async def test_byok_credential_to_an_embedded_private_address_is_refused(
    client: httpx.AsyncClient, account: AccountWithKeys, base_url: str, address: str
) -> None:
    private_ipv4 = assert_error(await _create(client, account, "http://10.0.0.8/v1"), 400)
    error = assert_error(await _create(client, account, base_url), 400, "invalid_credential")
    assert error["param"] == "base_url"
    assert error["type"] == private_ipv4["type"]
    message = str(error["message"])
    assert message.startswith(f"base_url refused: address {address!r}"), message
    assert message.endswith("is not a public address."), message
    listed = await client.get("/v1/credentials", headers=account.headers)
    assert listed.json()["data"] == []


async def test_byok_credential_to_a_public_bracketed_ipv6_without_port_is_accepted(
    client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    response = await _create(client, account, "https://[2606:4700::1111]/v1")
    assert response.status_code == 201, response.text
    assert response.json()["base_url"] == "https://[2606:4700::1111]/v1"


async def test_allowlisted_bracketed_ipv6_without_port_is_accepted(
    services: AppServices,
) -> None:
    owner = await make_account(services)
    async with services.database.sessions() as session:
        credential = await catalog.create_credential(
            session,
            account_id=owner.id,
            data=CredentialCreate(
                name="internal", provider="openai", base_url="http://[::1]/v1", api_key="k"
            ),
            secret_box=services.secret_box,
            ssrf_allowlist=frozenset({"::1"}),
        )
    assert credential.base_url == "http://[::1]/v1"
