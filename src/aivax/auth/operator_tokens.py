"""Operator admin tokens (`aivax_admin_…`), stored as HMAC like API keys."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from aivax.errors import Unauthorized
from aivax.keys.schemas import ADMIN_TOKEN_PREFIX
from aivax.kit.clock import utcnow
from aivax.kit.crypto import display_prefix, generate_token, token_hash, token_is_well_formed
from aivax.models import OperatorToken

INVALID_ADMIN_TOKEN = "Incorrect admin token. Create one with 'aivax admin-token create'."  # noqa: S105


async def create(session: AsyncSession, *, name: str, secret: bytes) -> tuple[OperatorToken, str]:
    token = generate_token(ADMIN_TOKEN_PREFIX)
    row = OperatorToken(
        name=name,
        token_hash=token_hash(secret, token),
        display_prefix=display_prefix(token, ADMIN_TOKEN_PREFIX),
        created_at=utcnow(),
    )
    session.add(row)
    await session.flush()
    return row, token


async def authenticate(session: AsyncSession, token: str, *, secret: bytes) -> OperatorToken:
    if not token_is_well_formed(token, ADMIN_TOKEN_PREFIX):
        raise Unauthorized(INVALID_ADMIN_TOKEN, code="invalid_admin_token")
    query = select(OperatorToken).where(OperatorToken.token_hash == token_hash(secret, token))
    row = (await session.scalars(query)).first()
    if row is None or row.revoked_at is not None:
        raise Unauthorized(INVALID_ADMIN_TOKEN, code="invalid_admin_token")
    return row
