from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from aivax.errors import BadRequest, Conflict, NotFound
from aivax.models import Plan
from aivax.plans import repository
from aivax.plans.schemas import PlanCreate, PlanLimits, PlanUpdate


class PlanNotFound(NotFound):
    code = "plan_not_found"


class InvalidPlanLimits(BadRequest):
    code = "invalid_plan_limits"


def limits_of(plan: Plan) -> PlanLimits:
    return PlanLimits.model_validate(plan.limits)


async def get(session: AsyncSession, plan_id: str) -> Plan:
    plan = await repository.get(session, plan_id)
    if plan is None:
        raise PlanNotFound(f"No plan {plan_id!r}. List plans with GET /admin/plans.", param="plan")
    return plan


async def list_plans(session: AsyncSession) -> Sequence[Plan]:
    return await repository.list_all(session)


async def create(session: AsyncSession, data: PlanCreate) -> Plan:
    if await repository.get(session, data.id) is not None:
        raise Conflict(f"Plan {data.id!r} already exists.", param="id", code="plan_exists")
    plan = Plan(
        id=data.id,
        name=data.name,
        description=data.description,
        limits=data.limits.model_dump(mode="json"),
    )
    return await repository.add(session, plan)


def merge_limits(current: dict[str, Any], changes: dict[str, Any]) -> PlanLimits:
    """Apply a partial change; any unknown or invalid limit is refused, naming it."""
    try:
        return PlanLimits.model_validate({**current, **changes})
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(part) for part in first["loc"])
        raise InvalidPlanLimits(
            f"Invalid plan limit {name!r}: {first['msg']}.", param=f"limits.{name}"
        ) from None


async def update(session: AsyncSession, plan_id: str, data: PlanUpdate) -> Plan:
    plan = await get(session, plan_id)
    if data.name is not None:
        plan.name = data.name
    if data.description is not None:
        plan.description = data.description
    if data.limits:
        plan.limits = merge_limits(plan.limits, data.limits).model_dump(mode="json")
    await session.flush()
    return plan
