"""What the app builds once in its lifespan and injects everywhere (no import-time state)."""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from aivax.caches import HotPathCaches
from aivax.config import Settings
from aivax.db import Database
from aivax.inference.kernel import Kernel
from aivax.inference.ratelimit import RateLimiter
from aivax.jobs.runner import JobRunner
from aivax.kit.crypto import SecretBox, random_secret
from aivax.metrics import Metrics, build_metrics
from aivax.providers.registry import ProviderRegistry
from aivax.rag.vectors import VectorIndex
from aivax.sandbox import Sandbox
from aivax.wallet.meter import Meter

logger = logging.getLogger("aivax")

SECRET_FILE = "secret.key"  # noqa: S105 - a file name


@dataclass
class AppServices:
    settings: Settings
    database: Database
    secret: bytes
    secret_box: SecretBox
    registry: ProviderRegistry
    limiter: RateLimiter
    caches: HotPathCaches
    meter: Meter
    vectors: VectorIndex
    jobs: JobRunner
    sandbox: Sandbox
    metrics: Metrics
    kernel: Kernel = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # The call kernel's collaborators; its plug-ins are registered by the app
        # (`app.register_extensions`).
        self.kernel = Kernel(
            settings=self.settings,
            database=self.database,
            secret_box=self.secret_box,
            registry=self.registry,
            limiter=self.limiter,
            caches=self.caches,
            meter=self.meter,
        )

    @classmethod
    def build(cls, settings: Settings) -> AppServices:
        secret = load_or_create_secret(settings)
        database = Database(settings)
        metrics = build_metrics(settings)
        return cls(
            settings=settings,
            database=database,
            secret=secret,
            secret_box=SecretBox(secret),
            registry=ProviderRegistry(settings),
            limiter=RateLimiter(
                settings.redis_url,
                outage=settings.redis_outage,
                fallback_seconds=settings.redis_fallback_seconds,
                timeout_seconds=settings.redis_timeout_seconds,
                metrics=metrics,
            ),
            caches=HotPathCaches(settings.cache_seconds),
            meter=Meter(settings, database, metrics),
            vectors=VectorIndex(database, cache_bytes=settings.rag_vector_cache_mb * 1024 * 1024),
            jobs=JobRunner.from_settings(database, settings, metrics),
            sandbox=Sandbox(settings),
            metrics=metrics,
        )

    async def close(self) -> None:
        await self.sandbox.stop()
        await self.jobs.stop()
        await self.meter.close()
        await self.registry.close()
        await self.limiter.close()
        await self.database.dispose()


def load_or_create_secret(settings: Settings) -> bytes:
    """`AIVAX_SECRET_KEY` if set, else `data_dir/secret.key`, created once with mode 0600."""
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value().encode()
    path = settings.data_dir / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_secret_file(path)
    with os.fdopen(fd, "w") as handle:
        handle.write(random_secret(48))
    logger.info("created server secret at %s (mode 0600)", path)
    return _read_secret_file(path)


def _read_secret_file(path: Path) -> bytes:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning("server secret %s is readable by others (mode %o); chmod 600 it", path, mode)
    secret = path.read_text().strip()
    if len(secret) < 32:
        raise ValueError(f"server secret in {path} is shorter than 32 characters")
    return secret.encode()
