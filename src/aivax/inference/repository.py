from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Date, cast, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from aivax.models import RequestLog


async def list_logs(
    session: AsyncSession, account_id: uuid.UUID, *, limit: int, after: int | None
) -> Sequence[RequestLog]:
    query = select(RequestLog).where(RequestLog.account_id == account_id)
    if after is not None:
        query = query.where(RequestLog.id < after)
    query = query.order_by(RequestLog.id.desc()).limit(limit + 1)
    return (await session.scalars(query)).all()


async def usage_totals(
    session: AsyncSession,
    account_id: uuid.UUID,
    *,
    group_by: str,
    since: datetime,
    until: datetime,
) -> list[dict[str, Any]]:
    group: Any = {
        "day": cast(RequestLog.created_at, Date),
        "model": RequestLog.model,
        "key": RequestLog.key_id,
    }[group_by]
    query = (
        select(
            group.label("group"),
            func.count().label("requests"),
            # PostgreSQL's SUM of BIGINT is NUMERIC; cast back so the API returns integers.
            cast(func.coalesce(func.sum(RequestLog.input_tokens), 0), BigInteger).label(
                "input_tokens"
            ),
            cast(func.coalesce(func.sum(RequestLog.output_tokens), 0), BigInteger).label(
                "output_tokens"
            ),
            cast(func.coalesce(func.sum(RequestLog.cost_micros), 0), BigInteger).label(
                "cost_micros"
            ),
        )
        .where(
            RequestLog.account_id == account_id,
            RequestLog.created_at >= since,
            RequestLog.created_at < until,
        )
        .group_by(group)
        .order_by(group)
    )
    return [dict(row._mapping) for row in (await session.execute(query)).all()]
