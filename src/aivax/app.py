"""create_app(settings): routers, middleware, handlers, and a lifespan that builds the services."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.telemetry import TelemetryConfig
from sqlalchemy.exc import IntegrityError
from starlette.types import Receive, Scope, Send

from aivax import __version__, handlers
from aivax.accounts.endpoints import router as account_router
from aivax.admin.endpoints import router as admin_router
from aivax.auth.middleware import AccountKeyMiddleware, BodySizeLimitMiddleware
from aivax.bodyguard import JsonBodyGuard
from aivax.catalog.endpoints import admin_router as admin_models_router
from aivax.catalog.endpoints import router as credentials_router
from aivax.catalog.service import seed_from_file
from aivax.config import Settings, load_settings
from aivax.gateways.compose import GatewayComposer
from aivax.gateways.endpoints import router as gateways_router
from aivax.gateways.listing import GatewayListing
from aivax.gateways.moderation import GatewayModeration
from aivax.health import router as health_router
from aivax.inference.endpoints import router as inference_router
from aivax.inference.route import ChatLane, ChatRoute, takes
from aivax.jobs.endpoints import router as admin_jobs_router
from aivax.keys.endpoints import router as keys_router
from aivax.metrics import endpoints as metrics_endpoints
from aivax.migrate import head_revision
from aivax.openapi import ERROR_RESPONSES
from aivax.rag import indexer, mcp_server
from aivax.rag.augment import RetrievalAugmenter
from aivax.rag.embeddings_api import router as embeddings_router
from aivax.rag.endpoints import jobs_router
from aivax.rag.endpoints import router as collections_router
from aivax.services import AppServices
from aivax.structured.pipeline import StructuredOutput
from aivax.wallet import service as wallet_service
from aivax.wallet.endpoints import router as wallet_router

logger = logging.getLogger("aivax")


async def reap_holds_forever(services: AppServices) -> None:
    """Release holds left open by crashed requests. Safe on every replica at once: each hold
    is closed by one conditional UPDATE, so two reapers never release it twice."""
    max_age = timedelta(seconds=services.settings.hold_max_age_seconds)
    while True:
        await asyncio.sleep(services.settings.reaper_interval_seconds)
        try:
            async with services.database.sessions() as session:
                expired = await wallet_service.reap_stale_holds(session, max_age=max_age)
                await session.commit()
            if expired:
                logger.warning("released %d stale wallet holds", expired)
        except Exception:
            logger.exception("hold reaper failed; retrying next interval")


async def seed_models(services: AppServices) -> None:
    """Create the models and credentials of AIVAX_MODELS_FILE that do not exist yet."""
    path = services.settings.models_file
    if path is None:
        return
    try:
        async with services.database.sessions() as session:
            created = await seed_from_file(session, path, services.secret_box)
            await session.commit()
    except IntegrityError:
        logger.info("another replica seeded the models file first")
        return
    for item in created:
        logger.info("seeded %s from %s", item, path)


def telemetry_config() -> TelemetryConfig | None:
    """FastAPI reports requests to OpenTelemetry once a tracer, meter or logger provider is
    configured, and asks on every request whether one is (about 2% of a chat call's CPU).
    When none is configured by the time the app is built (`opentelemetry-instrument`
    configures them first) and FastAPI is not asked to configure them itself
    (`FASTAPI_OTEL_AUTO_CONFIGURE=true`), the question is settled once: no telemetry."""
    if os.getenv("FASTAPI_OTEL_AUTO_CONFIGURE", "").lower() == "true":
        return None
    try:
        from fastapi.telemetry._api import _unconfigured
        from opentelemetry import metrics, trace
        from opentelemetry._logs import get_logger_provider
    except ImportError:  # pragma: no cover - FastAPI's layout changed: keep its default
        return None
    providers = [trace.get_tracer_provider(), metrics.get_meter_provider(), get_logger_provider()]
    if all(_unconfigured(provider) for provider in providers):
        return {"tracing": False, "metrics": False, "logs": False}
    return None


# Browsers may call with public keys: CORS is answered for any origin, and the real check — the
# key's and the gateway's allowed origins — is made server-side on each request.
CORS: dict[str, Any] = {
    "allow_origins": ["*"],
    "allow_methods": ["GET", "POST", "OPTIONS"],
    "allow_headers": ["authorization", "content-type", "x-api-key", "x-request-id"],
    "expose_headers": [
        "x-request-id",
        "x-aivax-cost-micros",
        "x-aivax-cost-usd",
        "x-ratelimit-remaining-requests",
        "retry-after",
    ],
    "max_age": 600,
}


class AivaxApp(FastAPI):
    """FastAPI, with `POST /v1/chat/completions` taken before the middleware stack by
    `chat_lane` when there is one (see `inference.route.ChatLane`)."""

    chat_lane: ChatLane | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lane = self.chat_lane
        if lane is not None and takes(scope):
            scope["app"] = self  # as Starlette does
            await lane(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def register_extensions(services: AppServices) -> None:
    """The call kernel's plug-ins: gateways (resolver, moderation, their `/v1/models`
    entries), RAG retrieval (an augmenter), structured output (an output processor). Once per
    container."""
    extensions = services.kernel.extensions
    if extensions.gateways is not None:
        return
    extensions.gateways = GatewayComposer(services)
    extensions.moderation.append(GatewayModeration(services))
    extensions.listings.append(GatewayListing())
    extensions.augmenters.append(RetrievalAugmenter(services))
    extensions.output.append(StructuredOutput())


def register_job_handlers(services: AppServices) -> None:
    """Every domain's job handlers, in `aivax serve` and `aivax worker` alike."""
    indexer.register(services)


def app_from_environment() -> FastAPI:
    """The app of one worker of `aivax serve --workers N`: uvicorn imports this in each worker
    process, which reads the same settings from the environment as the parent did."""
    return create_app(load_settings())


def create_app(settings: Settings, *, services: AppServices | None = None) -> FastAPI:
    """Build the ASGI app. Pass `services` to share them (tests); otherwise the lifespan builds
    them from `settings` and disposes of them on shutdown."""

    telemetry = telemetry_config()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = services is None
        app.state.services = services or AppServices.build(settings)
        register_extensions(app.state.services)
        logger.info("%s", app.state.services.registry.describe())
        await seed_models(app.state.services)
        await app.state.services.meter.start()  # before the first request, not during it
        reaper = asyncio.create_task(reap_holds_forever(app.state.services))
        register_job_handlers(app.state.services)
        if app.state.services.settings.jobs_enabled:
            app.state.services.jobs.start()
        await app.state.services.sandbox.start()  # logs whether Bash can run here
        try:
            async with (
                mcp_server.running(app, app.state.services),
                metrics_endpoints.running(app, app.state.services),
            ):
                yield
        finally:
            await app.state.services.sandbox.stop()
            await app.state.services.jobs.stop()
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            await app.state.services.meter.stop()
            if owned:
                await app.state.services.close()

    app = AivaxApp(
        title="AIVAX",
        version=__version__,
        description="OpenAI-compatible AI orchestration: gateways, wallet, keys.",
        lifespan=lifespan,
        telemetry=telemetry,
    )
    app.state.migration_head = head_revision()
    if services is not None:
        app.state.services = services
        register_extensions(services)
    handlers.install(app)
    app.add_middleware(JsonBodyGuard)  # innermost: the chat route applies its rules itself
    app.add_middleware(ChatRoute)  # after the key and body-size middlewares
    app.add_middleware(BodySizeLimitMiddleware)
    app.add_middleware(AccountKeyMiddleware)
    app.add_middleware(handlers.HandledErrors)  # inside CORS: a 500 carries its headers
    app.add_middleware(CORSMiddleware, **CORS)
    if telemetry is not None:  # telemetry settled as off: the chat route can skip the stack
        cors = CORSMiddleware(app.router, **CORS)  # the headers it adds for any origin
        app.chat_lane = ChatLane(ChatRoute(app.router), cors.simple_headers)
    app.include_router(health_router)
    for router in (
        inference_router,
        embeddings_router,
        collections_router,
        jobs_router,
        gateways_router,
        account_router,
        keys_router,
        wallet_router,
        credentials_router,
        admin_router,
        admin_models_router,
        admin_jobs_router,
    ):
        app.include_router(router, responses=ERROR_RESPONSES)
    if settings.metrics:
        app.include_router(metrics_endpoints.router, responses=ERROR_RESPONSES)
    mcp_server.mount_mcp(app)
    return app
