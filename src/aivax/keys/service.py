from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from aivax.errors import Conflict, NotFound, Unauthorized
from aivax.keys import repository
from aivax.keys.schemas import KEY_PREFIXES, KeyCreate, KeyKind
from aivax.kit.clock import as_utc, utcnow
from aivax.kit.crypto import display_prefix, generate_token, token_hash, token_is_well_formed
from aivax.models import ApiKey


class KeyNotFound(NotFound):
    code = "api_key_not_found"


class TooManyKeys(Conflict):
    code = "too_many_api_keys"


class LastPrivateKey(Conflict):
    code = "last_private_key"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: resolved from the API key by the account-key middleware."""

    account_id: uuid.UUID
    account_status: str
    plan_id: str
    key_id: uuid.UUID
    key_kind: KeyKind
    allowed_origins: tuple[str, ...]
    storage_bytes_used: int = 0
    json_healing_for_response_format: bool = False


async def create(
    session: AsyncSession,
    *,
    account_id: uuid.UUID,
    data: KeyCreate,
    secret: bytes,
    max_keys: int,
) -> tuple[ApiKey, str]:
    if await repository.count_active(session, account_id, kind=None) >= max_keys:
        raise TooManyKeys(
            f"The account already has {max_keys} active keys; revoke one before creating another."
        )
    prefix = KEY_PREFIXES[data.kind]
    token = generate_token(prefix)
    key = ApiKey(
        account_id=account_id,
        kind=data.kind.value,
        name=data.name,
        key_hash=token_hash(secret, token),
        display_prefix=display_prefix(token, prefix),
        allowed_origins=data.allowed_origins,
        created_at=utcnow(),
    )
    return await repository.add(session, key), token


async def list_keys(session: AsyncSession, account_id: uuid.UUID) -> Sequence[ApiKey]:
    return await repository.list_for_account(session, account_id)


async def get(session: AsyncSession, account_id: uuid.UUID, key_id: uuid.UUID) -> ApiKey:
    key = await repository.get_for_account(session, account_id, key_id)
    if key is None:
        raise KeyNotFound(f"No API key {str(key_id)!r}.", param="key_id")
    return key


async def revoke(
    session: AsyncSession,
    account_id: uuid.UUID,
    key_id: uuid.UUID,
    *,
    keep_last_private: bool,
) -> ApiKey:
    key = await get(session, account_id, key_id)
    if key.revoked_at is not None:
        return key
    if (
        keep_last_private
        and key.kind == KeyKind.PRIVATE
        and await repository.count_active(session, account_id, kind=KeyKind.PRIVATE.value) <= 1
    ):
        raise LastPrivateKey(
            "This is the account's last private key; create another before revoking it."
        )
    key.revoked_at = utcnow()
    await session.flush()
    return key


def kind_of_token(token: str) -> KeyKind | None:
    for kind, prefix in KEY_PREFIXES.items():
        if token_is_well_formed(token, prefix):
            return kind
    return None


INVALID_KEY_MESSAGE = "Incorrect API key provided. Find your keys with GET /v1/keys."


def checked_hash(token: str, secret: bytes) -> str:
    """The stored form of a presented key; a malformed key is refused here, before any I/O."""
    if kind_of_token(token) is None:
        raise Unauthorized(INVALID_KEY_MESSAGE)
    return token_hash(secret, token)


async def authenticate(
    session: AsyncSession, token: str, *, secret: bytes, touch_interval: timedelta
) -> Principal:
    """Resolve a presented key; a malformed one is refused without a database lookup."""
    found = await repository.find_by_hash(session, checked_hash(token, secret))
    if found is None:
        raise Unauthorized(INVALID_KEY_MESSAGE)
    key, account = found
    if key.revoked_at is not None:
        raise Unauthorized("This API key has been revoked.", code="api_key_revoked")
    now = utcnow()
    if key.last_used_at is None or as_utc(key.last_used_at) < now - touch_interval:
        await repository.touch_last_used(
            session, key.id, now=now, stale_before=now - touch_interval
        )
    return Principal(
        account_id=account.id,
        account_status=account.status,
        plan_id=account.plan_id,
        key_id=key.id,
        key_kind=KeyKind(key.kind),
        allowed_origins=tuple(key.allowed_origins),
        storage_bytes_used=account.storage_bytes_used,
        json_healing_for_response_format=bool(
            (account.settings or {}).get("json_healing_for_response_format")
        ),
    )
