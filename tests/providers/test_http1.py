"""`Http1Upstream`, the operator upstreams' HTTP/1.1 client, against raw servers on loopback that
answer byte for byte what each case needs: keep-alive and its limits, the three ways a body is
delimited, gzip, interim responses, broken and hostile upstreams, timeouts, back-pressure, the
connection limit and TLS. Every case runs on both event loops the client meets: asyncio's (the
tests, the CLI) and uvloop (the server)."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from aivax.providers.http1 import Http1Upstream

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


class Server:
    """A loopback server running `handler` for each connection; counts connections and keeps
    each request head it read."""

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.connections = 0
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.written = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()

    def url(self, path: str = "/v1/chat/completions", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bool:
        """Read one request (head and Content-Length body); False at the end of the stream."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        self.heads.append(head)
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        self.bodies.append(await reader.readexactly(length))
        return True


def ok(body: bytes, *extra: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        + b"".join(line + b"\r\n" for line in extra)
        + b"content-length: %d\r\n\r\n" % len(body)
        + body
    )


def answer_each(response: bytes) -> Handler:
    """A handler that answers every request on its connection with `response`."""

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
    ) -> None:
        while await server.read_request(reader):
            writer.write(response)
            await writer.drain()

    return handler


def answer_once(response: bytes, *, then_wait: float = 0) -> Handler:
    """A handler that answers one request with `response`, waits, then closes."""

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
    ) -> None:
        await server.read_request(reader)
        writer.write(response)
        await writer.drain()
        await asyncio.sleep(then_wait)

    return handler


async def post(
    client: Http1Upstream, url: str, *, timeout: float = 5, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with client.post(url, headers=headers or {}, body=b'{"x":1}', timeout=timeout) as r:
        return r.status, dict(r.headers), await r.read()


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    """Run a test's coroutine on a fresh loop of the given kind."""
    if request.param == "uvloop":
        return uvloop.run
    return asyncio.run


def test_a_connection_is_kept_alive_and_reused(run: Any) -> None:
    async def case() -> None:
        async with Server(answer_each(ok(b'{"a":1}'))) as server:
            client = Http1Upstream(connect_timeout=5)
            for _ in range(3):
                assert await post(
                    client, server.url("/v1/x?y=1"), headers={"authorization": "K"}
                ) == (
                    200,
                    {"content-type": "application/json", "content-length": "7"},
                    b'{"a":1}',
                )
            await client.aclose()
        assert server.connections == 1
        head = server.heads[0].decode()
        assert head.startswith("POST /v1/x?y=1 HTTP/1.1\r\n")
        assert f"host: 127.0.0.1:{server.port}\r\n" in head
        assert "authorization: K\r\n" in head
        assert "content-length: 7\r\n" in head
        assert server.bodies == [b'{"x":1}'] * 3

    run(case())


def test_connection_close_and_a_connection_the_upstream_dropped_while_idle(run: Any) -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
    ) -> None:
        await server.read_request(reader)
        if server.connections == 1:
            writer.write(ok(b"1", b"connection: close"))
        else:
            writer.write(ok(b"2"))  # kept alive... then dropped while idle
        await writer.drain()

    async def case() -> None:
        async with Server(handler) as server:
            client = Http1Upstream(connect_timeout=5)
            assert (await post(client, server.url()))[2] == b"1"
            assert (await post(client, server.url()))[2] == b"2"
            await asyncio.sleep(0.1)  # the drop reaches the client
            assert (await post(client, server.url()))[2] == b"2"
            await client.aclose()
        assert server.connections == 3  # never an error for a connection found closed

    run(case())


def test_chunked_gzip_and_read_to_close_bodies(run: Any) -> None:
    document = b'{"choices":[]}' * 50
    packed = gzip.compress(document)

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
    ) -> None:
        while await server.read_request(reader):
            if len(server.heads) % 2 == 1:  # chunked and compressed, kept alive
                writer.write(
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n"
                    b"content-encoding: gzip\r\n\r\n"
                )
                for start in range(0, len(packed), 100):
                    piece = packed[start : start + 100]
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
                await writer.drain()
            else:  # no length at all: the body ends when the connection closes
                writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + document)
                await writer.drain()
                return

    async def case() -> None:
        async with Server(handler) as server:
            client = Http1Upstream(connect_timeout=5)
            status, headers, body = await post(client, server.url())
            assert (status, body, headers["content-encoding"]) == (200, document, "gzip")
            assert "accept-encoding: gzip" in server.heads[0].decode()
            assert await post(client, server.url()) == (200, {"connection": "close"}, document)
            assert server.connections == 1
            assert (await post(client, server.url()))[2] == document  # a new connection
            await client.aclose()
        assert server.connections == 2

    run(case())


def test_a_body_not_read_to_its_end_is_never_reused(run: Any) -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
    ) -> None:
        while await server.read_request(reader):
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
            await writer.drain()

    async def case() -> None:
        async with Server(handler) as server:
            client = Http1Upstream(connect_timeout=5)
            for _ in range(2):
                async with client.post(server.url(), headers={}, body=b"{}", timeout=5) as r:
                    async for chunk in r.chunks():
                        assert chunk == b"first"
                        break  # the caller stops reading
            await client.aclose()
        assert server.connections == 2

    run(case())


def test_interim_responses_are_skipped(run: Any) -> None:
    async def case() -> None:
        response = b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b'{"late":true}')
        async with Server(answer_each(response)) as server:
            client = Http1Upstream(connect_timeout=5)
            assert await post(client, server.url()) == (
                200,
                {"content-type": "application/json", "content-length": "13"},
                b'{"late":true}',
            )
            await client.aclose()

    run(case())


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", "malformed HTTP"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort", "before the response ended"),
        (b"", "without answering"),
        (
            b"HTTP/1.1 200 OK\r\n" + b"x-big: " + b"a" * 70_000 + b"\r\n\r\n",
            "headers are too large",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: 9\r\n\r\nnot gzip!",
            "cannot be decoded",
        ),
    ],
    ids=["garbage", "cut-short", "silent-close", "huge-headers", "bad-gzip"],
)
def test_a_broken_upstream_is_a_protocol_error(run: Any, response: bytes, message: str) -> None:
    async def case() -> None:
        async with Server(answer_once(response)) as server:
            client = Http1Upstream(connect_timeout=5)
            with pytest.raises(httpx.RemoteProtocolError, match=message):
                await post(client, server.url())
            await client.aclose()

    run(case())


def test_silence_is_a_read_timeout_and_a_closed_port_a_connect_error(run: Any) -> None:
    half = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234"  # then nothing

    async def case() -> None:
        async with Server(answer_once(half, then_wait=5)) as server:
            client = Http1Upstream(connect_timeout=5)
            with pytest.raises(httpx.ReadTimeout):
                await post(client, server.url(), timeout=0.2)
            port = server.port
        with pytest.raises(httpx.ConnectError, match="cannot connect"):
            await post(client, f"http://127.0.0.1:{port}/v1")
        await client.aclose()

    run(case())


def test_headers_that_would_split_the_request_are_refused(run: Any) -> None:
    async def case() -> None:
        async with Server(answer_each(ok(b"{}"))) as server:
            client = Http1Upstream(connect_timeout=5)
            for bad in ({"authorization": "k\r\nx-injected: 1"}, {"bad name": "v"}):
                with pytest.raises(httpx.LocalProtocolError):
                    await post(client, server.url(), headers=bad)
            with pytest.raises(httpx.UnsupportedProtocol):
                await post(client, f"ftp://127.0.0.1:{server.port}/")
            await client.aclose()
        assert server.heads == []  # nothing went out

    run(case())


@pytest.mark.parametrize(
    ("url", "headers"),
    [
        ("http://127.0.0.1:{port}/v1/chat\r\nx-injected: 1", {}),
        ("http://127.0.0.1:{port}/v1/a path", {}),
        ("http://127.0.0.1:{port}/v1/chat", {"authorization": "Bearer clé-€"}),
        ("http://127.0.0.1:{port}/v1/chat", {"x-api-key": "k\x00"}),
    ],
    ids=["crlf-in-path", "space-in-path", "not-latin-1", "nul-in-value"],
)
def test_a_request_that_cannot_be_written_safely_is_refused(
    run: Any, url: str, headers: dict[str, str]
) -> None:
    async def case() -> None:
        async with Server(answer_each(ok(b"{}"))) as server:
            client = Http1Upstream(connect_timeout=5)
            with pytest.raises((httpx.UnsupportedProtocol, httpx.LocalProtocolError)):
                await post(client, url.format(port=server.port), headers=headers)
            await client.aclose()
        assert server.heads == []  # nothing went out

    run(case())


def test_the_connection_limit_holds_and_a_slow_reader_pauses_the_socket(run: Any) -> None:
    size = 32 * 1024 * 1024

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
    ) -> None:
        while await server.read_request(reader):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
            block = b"x" * 65536
            for _ in range(size // len(block)):
                writer.write(block)
                server.written += len(block)
                await writer.drain()

    async def case() -> None:
        async with Server(handler) as server:
            client = Http1Upstream(connect_timeout=5, max_connections=1)
            received = 0
            async with client.post(server.url(), headers={}, body=b"{}", timeout=5) as r:
                second = asyncio.ensure_future(post(client, server.url()))
                chunks = r.chunks()
                received += len(await anext(chunks))
                await asyncio.sleep(0.3)  # the caller lags; the upstream keeps sending
                # What the upstream could write is bounded by the socket buffers plus the
                # client's high-water mark, far below the body's size.
                assert server.written < size // 2
                assert server.connections == 1  # the second call waits for the only slot
                async for chunk in chunks:
                    received += len(chunk)
            assert received == size
            assert (await second)[0] == 200
            await client.aclose()
        assert server.connections == 1  # the slot's connection was reused by the second call

    run(case())


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_with_a_trusted_certificate_and_refused_without(run: Any, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    serving.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))

    async def case() -> None:
        async with Server(answer_each(ok(b'{"tls":true}')), serving) as server:
            client = Http1Upstream(connect_timeout=5, ssl_context=trusting)
            assert (await post(client, server.url(scheme="https")))[2] == b'{"tls":true}'
            await client.aclose()
            stranger = Http1Upstream(connect_timeout=5)  # the system's trust store
            with pytest.raises(httpx.ConnectError, match="TLS"):
                await post(stranger, server.url(scheme="https"))
            await stranger.aclose()

    run(case())
