"""`GET /metrics` for the operator admin token, and the metrics port's lifetime (both only
with AIVAX_METRICS=true: otherwise the route does not exist)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request, Response

from aivax.auth.dependencies import Operator
from aivax.errors import NotFound
from aivax.metrics.exposition import CONTENT_TYPE, Exposition
from aivax.metrics.recorder import PrometheusMetrics
from aivax.services import AppServices

logger = logging.getLogger("aivax.metrics")

router = APIRouter(tags=["admin"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format."}},
)
async def get_metrics(request: Request, _: Operator) -> Response:
    """Every metric in the Prometheus text format (see docs/operations.md, Metrics)."""
    exposition: Exposition | None = getattr(request.app.state, "metrics_exposition", None)
    if exposition is None:  # services built with metrics off
        raise NotFound("Metrics are off on this server; set AIVAX_METRICS=true.")
    return Response(await exposition.render(), media_type=CONTENT_TYPE)


@asynccontextmanager
async def running(app: FastAPI, services: AppServices) -> AsyncIterator[None]:
    """While the app runs: the exposition `GET /metrics` renders, and the metrics port."""
    metrics, settings = services.metrics, services.settings
    if not isinstance(metrics, PrometheusMetrics):
        yield
        return
    app.state.metrics_exposition = exposition = Exposition(metrics, services.jobs.active_counts)
    server = None
    if settings.metrics_port is not None:
        try:
            server = await exposition.serve(
                settings.metrics_host, settings.metrics_port, shared=metrics.multiprocess
            )
        except OSError as exc:  # the API still serves; the operator reads why here
            logger.error(
                "metrics port %s:%d could not be bound (%s); set AIVAX_METRICS_PORT to a free port",
                settings.metrics_host,
                settings.metrics_port,
                exc,
            )
    try:
        yield
    finally:
        exposition.close()
        if server is not None:
            server.close()
            await server.wait_closed()
