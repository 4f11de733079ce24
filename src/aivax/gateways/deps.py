"""What the gateway plug-ins need of the app's services (`services.AppServices` has it): the
collaborators themselves, not the container, so `gateways` depends on nothing above it."""

from __future__ import annotations

import uuid
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Protocol

from aivax.db import Database
from aivax.kit.crypto import SecretBox
from aivax.providers.registry import ProviderRegistry

if TYPE_CHECKING:
    from aivax.gateways.compose import GatewayTarget


class GatewayCaches(Protocol):
    """The hot-path cache of gateway lookups (misses included)."""

    @property
    def enabled(self) -> bool: ...
    @property
    def gateways(self) -> MutableMapping[tuple[uuid.UUID, str], GatewayTarget]: ...


class LookupServices(Protocol):
    """Finding the gateway a model name names (`compose`)."""

    @property
    def database(self) -> Database: ...
    @property
    def caches(self) -> GatewayCaches: ...


class ModerationServices(Protocol):
    """Moderating a call (`moderation`): the account's credential, decrypted, and an HTTP
    client for the moderation endpoint."""

    @property
    def database(self) -> Database: ...
    @property
    def secret_box(self) -> SecretBox: ...
    @property
    def registry(self) -> ProviderRegistry: ...
