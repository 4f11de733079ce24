"""The collaborators the kernel runs with, built once by the app (`services.py`): the kernel
takes these, not the whole container, so it depends on nothing above it."""

from __future__ import annotations

import uuid
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Protocol

from aivax.catalog.service import ResolvedModel
from aivax.config import Settings
from aivax.db import Database
from aivax.inference.extensions import Extensions
from aivax.inference.ratelimit import RateLimiter
from aivax.kit.crypto import SecretBox
from aivax.plans.schemas import PlanLimits
from aivax.providers.registry import ProviderRegistry
from aivax.wallet.meter import Meter


class ModelCaches(Protocol):
    """The hot-path caches the kernel reads (plan limits and resolved models)."""

    @property
    def enabled(self) -> bool: ...
    @property
    def plans(self) -> MutableMapping[str, PlanLimits]: ...
    @property
    def models(self) -> MutableMapping[tuple[uuid.UUID, str], ResolvedModel]: ...


@dataclass
class Kernel:
    settings: Settings
    database: Database
    secret_box: SecretBox
    registry: ProviderRegistry
    limiter: RateLimiter
    caches: ModelCaches
    meter: Meter
    extensions: Extensions = field(default_factory=Extensions)
