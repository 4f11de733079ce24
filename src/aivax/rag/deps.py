"""What RAG needs of the app's services (`services.AppServices` has all of it): each module
names the collaborators it uses, not the container, so `rag` depends on nothing above it.
A Protocol that calls into another module's functions extends that module's Protocol."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Protocol

from aivax.config import Settings
from aivax.db import Database
from aivax.inference.kernel import Kernel
from aivax.inference.ratelimit import RateLimiter
from aivax.jobs.runner import JobRunner
from aivax.kit.crypto import SecretBox
from aivax.plans.schemas import PlanLimits
from aivax.providers.registry import ProviderRegistry
from aivax.rag.vectors import VectorIndex
from aivax.wallet.meter import Meter


class PlanCaches(Protocol):
    """The hot-path cache of plan limits."""

    @property
    def enabled(self) -> bool: ...
    @property
    def plans(self) -> MutableMapping[str, PlanLimits]: ...


class EmbeddingServices(Protocol):
    """An embedding call, rate limited, reserved and settled (`metering`)."""

    @property
    def registry(self) -> ProviderRegistry: ...
    @property
    def limiter(self) -> RateLimiter: ...
    @property
    def meter(self) -> Meter: ...


class CollectionServices(EmbeddingServices, Protocol):
    """Collections (`service`): cached plan limits, the embedding model (a BYOK model's
    dimensions probed with one embedding call) and the vector index."""

    @property
    def caches(self) -> PlanCaches: ...
    @property
    def secret_box(self) -> SecretBox: ...
    @property
    def vectors(self) -> VectorIndex: ...


class KernelServices(Protocol):
    """RAG's own model calls, through the kernel (`internal`)."""

    @property
    def kernel(self) -> Kernel: ...


class SearchServices(CollectionServices, KernelServices, Protocol):
    """A search (`retrieval`): the query embedded, the vector index, rerankers and judges."""


class AugmentServices(SearchServices, Protocol):
    """A gateway's retrieval (`augment`): searches in sessions of its own."""

    @property
    def database(self) -> Database: ...


class IndexServices(EmbeddingServices, Protocol):
    """Indexing jobs (`indexer`): documents read and written, chunks embedded."""

    @property
    def database(self) -> Database: ...
    @property
    def secret_box(self) -> SecretBox: ...
    @property
    def jobs(self) -> JobRunner: ...


class ImportServices(Protocol):
    """JSONL import and export (`importer`)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def limiter(self) -> RateLimiter: ...
    @property
    def database(self) -> Database: ...
