from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from aivax.models import Account, ApiKey


async def add(session: AsyncSession, key: ApiKey) -> ApiKey:
    session.add(key)
    await session.flush()
    return key


async def get_for_account(
    session: AsyncSession, account_id: uuid.UUID, key_id: uuid.UUID
) -> ApiKey | None:
    query = select(ApiKey).where(ApiKey.id == key_id, ApiKey.account_id == account_id)
    return (await session.scalars(query)).first()


async def list_for_account(session: AsyncSession, account_id: uuid.UUID) -> Sequence[ApiKey]:
    query = (
        select(ApiKey)
        .where(ApiKey.account_id == account_id)
        .order_by(ApiKey.created_at.desc(), ApiKey.id)
    )
    return (await session.scalars(query)).all()


async def count_active(session: AsyncSession, account_id: uuid.UUID, *, kind: str | None) -> int:
    query = select(func.count()).where(ApiKey.account_id == account_id, ApiKey.revoked_at.is_(None))
    if kind is not None:
        query = query.where(ApiKey.kind == kind)
    return int(await session.scalar(query) or 0)


async def find_by_hash(session: AsyncSession, key_hash: str) -> tuple[ApiKey, Account] | None:
    query = (
        select(ApiKey, Account)
        .join(Account, Account.id == ApiKey.account_id)
        .where(ApiKey.key_hash == key_hash)
    )
    row = (await session.execute(query)).first()
    return (row[0], row[1]) if row is not None else None


async def touch_last_used(
    session: AsyncSession, key_id: uuid.UUID, *, now: datetime, stale_before: datetime
) -> bool:
    """Conditional write: across all replicas a key is touched at most once per interval."""
    result = await session.execute(
        update(ApiKey)
        .where(
            ApiKey.id == key_id,
            or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < stale_before),
        )
        .values(last_used_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]
