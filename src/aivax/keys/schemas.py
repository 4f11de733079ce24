from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from aivax.kit.schemas import Lax

MAX_ALLOWED_ORIGINS = 50


class KeyKind(enum.StrEnum):
    PRIVATE = "private"
    PUBLIC = "public"


KEY_PREFIXES = {KeyKind.PRIVATE: "aivax_sk_", KeyKind.PUBLIC: "aivax_pk_"}
ADMIN_TOKEN_PREFIX = "aivax_admin_"  # noqa: S105 - a prefix, not a secret


def normalize_origin(value: str) -> str:
    """An origin is `scheme://host[:port]` with no path, as browsers send it."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an origin like 'https://app.example.com'")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"{value!r} must be an origin only: no path, query or credentials")
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(default="", max_length=200)
    kind: Annotated[KeyKind, Lax] = KeyKind.PRIVATE
    allowed_origins: list[str] = Field(
        default_factory=list,
        max_length=MAX_ALLOWED_ORIGINS,
        description="Public keys only: browser origins allowed to use the key (empty = any).",
    )

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, values: list[str]) -> list[str]:
        return sorted({normalize_origin(value) for value in values})

    @model_validator(mode="after")
    def _origins_only_for_public(self) -> KeyCreate:
        if self.allowed_origins and self.kind is KeyKind.PRIVATE:
            raise ValueError("allowed_origins is only for public keys (kind: 'public')")
        return self


class KeyRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    object: Literal["api_key"] = "api_key"
    id: uuid.UUID
    account_id: uuid.UUID
    name: str
    kind: KeyKind
    display_prefix: str = Field(description="The key's first characters, to recognise it.")
    allowed_origins: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class KeyCreated(KeyRead):
    key: str = Field(description="The secret key. It is shown only once: store it now.")
