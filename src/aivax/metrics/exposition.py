"""The scrape: the recorded metrics (this process's, or under `aivax serve --workers N` every
process's files added up), plus the queued and running jobs counted in the database, in the
Prometheus text format; and the optional unauthenticated metrics port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from functools import partial

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from aivax.metrics.recorder import PrometheusMetrics

logger = logging.getLogger("aivax.metrics")

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
# Job counts are a database query; scrapes closer together than this reuse the last answer.
JOB_COUNTS_SECONDS = 5.0
# A metrics-port client must send its request head within this long, in at most this many bytes.
HEAD_TIMEOUT_SECONDS = 10.0
HEAD_LIMIT_BYTES = 16 * 1024

JobCounts = Callable[[], Awaitable[Mapping[tuple[str, str], int]]]


class _JobsCollector(Collector):
    """`aivax_jobs{kind, state}` from the last database reading (not from any process's
    memory: the queue is shared by every server and worker)."""

    def __init__(self) -> None:
        self.counts: Mapping[tuple[str, str], int] = {}

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "aivax_jobs", "Jobs queued or running now, by kind.", labels=["kind", "state"]
        )
        for (kind, state), count in sorted(self.counts.items()):
            family.add_metric([kind, state], count)
        yield family


class Exposition:
    def __init__(
        self,
        metrics: PrometheusMetrics,
        job_counts: JobCounts,
        *,
        cache_seconds: float = JOB_COUNTS_SECONDS,
    ) -> None:
        self.job_counts = job_counts
        self.cache_seconds = cache_seconds
        self._jobs = _JobsCollector()
        self._read_at = float("-inf")
        self._reading = asyncio.Lock()
        if metrics.multiprocess:
            # A registry of its own: the recorders are not registered anywhere in this mode,
            # and the collector reads every process's files at each scrape.
            self.registry = CollectorRegistry()
            MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]
        else:
            self.registry = metrics.registry
        self.registry.register(self._jobs)

    def close(self) -> None:
        """Stop adding job counts to the registry (the services may outlive this app)."""
        self.registry.unregister(self._jobs)

    async def render(self) -> bytes:
        await self._read_job_counts()
        return generate_latest(self.registry)

    async def _read_job_counts(self) -> None:
        async with self._reading:
            if time.monotonic() - self._read_at < self.cache_seconds:
                return
            try:
                self._jobs.counts = await self.job_counts()
            except Exception:  # a scrape still answers with everything else
                logger.warning("job counts could not be read for /metrics", exc_info=True)
            self._read_at = time.monotonic()

    async def serve(self, host: str, port: int, *, shared: bool) -> asyncio.Server:
        """Serve `GET /metrics` without authentication on `host:port`. `shared`: every
        process of `aivax serve --workers N` binds the same port (SO_REUSEPORT) and any of
        them answers, with the same totals."""
        return await asyncio.start_server(
            partial(_answer, self),
            host,
            port,
            reuse_port=shared,
            limit=HEAD_LIMIT_BYTES,
        )


async def _answer(
    exposition: Exposition, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """One HTTP/1.1 exchange, then the connection closes (scrapers reconnect each time)."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_SECONDS)
        method, _, rest = head.decode("latin-1").partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if path != "/metrics":
            status, body, kind = (
                "404 Not Found",
                b"Only GET /metrics is served here.\n",
                "text/plain",
            )
        elif method not in ("GET", "HEAD"):
            status, body, kind = "405 Method Not Allowed", b"Use GET.\n", "text/plain"
        else:
            status, body, kind = "200 OK", await exposition.render(), CONTENT_TYPE
        writer.write(
            f"HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n".encode()
        )
        if method != "HEAD":
            writer.write(body)
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
        pass  # the client went away or sent no request: nothing to answer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
