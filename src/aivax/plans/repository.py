from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from aivax.models import Plan


async def get(session: AsyncSession, plan_id: str) -> Plan | None:
    return await session.get(Plan, plan_id)


async def list_all(session: AsyncSession) -> Sequence[Plan]:
    return (await session.scalars(select(Plan).order_by(Plan.id))).all()


async def add(session: AsyncSession, plan: Plan) -> Plan:
    session.add(plan)
    await session.flush()
    return plan
