from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncSession

from aivax.accounts import repository
from aivax.accounts.schemas import (
    AccountPlan,
    AccountRead,
    AccountSettings,
    AccountUpdate,
    AdminAccountUpdate,
)
from aivax.errors import NotFound
from aivax.kit.crypto import SecretBox, random_secret
from aivax.models import Account, AccountStatus, Plan
from aivax.plans import service as plan_service


class AccountNotFound(NotFound):
    code = "account_not_found"


async def create(
    session: AsyncSession, *, name: str, plan_id: str, secret_box: SecretBox
) -> Account:
    await plan_service.get(session, plan_id)
    account = Account(
        name=name,
        plan_id=plan_id,
        status=AccountStatus.ACTIVE.value,
        hook_key_encrypted=secret_box.encrypt(random_secret()),
        settings=AccountSettings().model_dump(),
    )
    return await repository.add(session, account)


async def get(session: AsyncSession, account_id: uuid.UUID) -> Account:
    account = await repository.get(session, account_id)
    if account is None:
        raise AccountNotFound(f"No account {str(account_id)!r}.", param="account_id")
    return account


async def list_page(
    session: AsyncSession, *, limit: int, after: uuid.UUID | None
) -> Sequence[Account]:
    return await repository.list_page(session, limit=limit, after=after)


async def read(session: AsyncSession, account: Account) -> AccountRead:
    plan = await plan_service.get(session, account.plan_id)
    return to_read(account, plan)


async def read_many(session: AsyncSession, accounts: Sequence[Account]) -> list[AccountRead]:
    plans = {plan.id: plan for plan in await plan_service.list_plans(session)}
    return [to_read(account, plans[account.plan_id]) for account in accounts]


def to_read(account: Account, plan: Plan) -> AccountRead:
    return AccountRead(
        id=account.id,
        name=account.name,
        status=account.status,
        plan=AccountPlan(id=plan.id, name=plan.name, limits=plan_service.limits_of(plan)),
        settings=AccountSettings.model_validate(account.settings),
        storage_bytes_used=account.storage_bytes_used,
        balance_micros=account.balance_micros,
        created_at=account.created_at,
        updated_at=account.updated_at,
    )


async def update_own(session: AsyncSession, account: Account, data: AccountUpdate) -> Account:
    if data.name is not None:
        account.name = data.name
    if data.settings is not None:
        account.settings = data.settings.model_dump()
    await session.flush()
    return account


async def update_as_operator(
    session: AsyncSession, account_id: uuid.UUID, data: AdminAccountUpdate
) -> Account:
    account = await get(session, account_id)
    if data.plan is not None:
        await plan_service.get(session, data.plan)
        account.plan_id = data.plan
    if data.status is not None:
        account.status = data.status
    if data.name is not None:
        account.name = data.name
    await session.flush()
    return account


def hook_key(account: Account, secret_box: SecretBox) -> str:
    return secret_box.decrypt(account.hook_key_encrypted)


async def rotate_hook_key(session: AsyncSession, account: Account, secret_box: SecretBox) -> str:
    new_key = random_secret()
    account.hook_key_encrypted = secret_box.encrypt(new_key)
    await session.flush()
    return new_key
