from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from aivax.models import Account


async def get(session: AsyncSession, account_id: uuid.UUID) -> Account | None:
    return await session.get(Account, account_id)


async def add(session: AsyncSession, account: Account) -> Account:
    session.add(account)
    await session.flush()
    return account


async def list_page(
    session: AsyncSession, *, limit: int, after: uuid.UUID | None
) -> Sequence[Account]:
    """Newest first; `after` is the id of the last account of the previous page."""
    query = select(Account).order_by(Account.created_at.desc(), Account.id.desc())
    if after is not None:
        cursor = await session.get(Account, after)
        if cursor is not None:
            query = query.where(
                tuple_(Account.created_at, Account.id) < (cursor.created_at, cursor.id)
            )
    return (await session.scalars(query.limit(limit + 1))).all()
