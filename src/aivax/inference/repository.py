from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, String, cast, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from aivax.models import RequestLog


class utc_day(FunctionElement[str]):
    """The UTC calendar day of a timestamp as 'YYYY-MM-DD' text, on both databases: a CAST to
    DATE is a number on SQLite and follows the session's time zone on PostgreSQL."""

    type = String()
    inherit_cache = True


@compiles(utc_day)
def _utc_day_sqlite(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    # SQLite stores these timestamps as UTC text: date() reads its first ten characters.
    return f"date({compiler.process(element.clauses, **kw)})"


@compiles(utc_day, "postgresql")
def _utc_day_postgresql(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    column = compiler.process(element.clauses, **kw)
    return f"to_char(({column}) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"


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
        "day": utc_day(RequestLog.created_at),
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
