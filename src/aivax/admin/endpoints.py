"""Operator API: accounts, plans, top-ups and keys of any account. Admin token required."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Header, Response

from aivax.accounts import service as account_service
from aivax.accounts.schemas import AccountCreate, AccountRead, AdminAccountUpdate
from aivax.auth.dependencies import Operator, Services
from aivax.db import SessionDep
from aivax.keys import service as key_service
from aivax.keys.schemas import KeyCreate, KeyCreated, KeyRead
from aivax.kit.crypto import random_secret
from aivax.kit.pagination import IdCursor, ListPage, PageLimit, page_of, whole
from aivax.models import EntryKind
from aivax.plans import service as plan_service
from aivax.plans.schemas import PlanCreate, PlanRead, PlanUpdate
from aivax.wallet import service as wallet_service
from aivax.wallet.endpoints import ledger_page
from aivax.wallet.schemas import CreditCreate, CreditResult, LedgerEntryRead, WalletRead

router = APIRouter(prefix="/admin", tags=["admin"])

IdempotencyHeader = Annotated[str | None, Header(alias="Idempotency-Key", max_length=150)]


@router.post("/accounts", response_model=AccountRead, status_code=201)
async def create_account(
    data: AccountCreate, _: Operator, session: SessionDep, services: Services
) -> AccountRead:
    account = await account_service.create(
        session, name=data.name, plan_id=data.plan, secret_box=services.secret_box
    )
    return await account_service.read(session, account)


@router.get("/accounts", response_model=ListPage[AccountRead])
async def list_accounts(
    _: Operator, session: SessionDep, limit: PageLimit = 20, after: uuid.UUID | None = None
) -> ListPage[AccountRead]:
    accounts = await account_service.list_page(session, limit=limit, after=after)
    data = await account_service.read_many(session, accounts)
    return page_of(data, [str(account.id) for account in data], limit=limit)


@router.get("/accounts/{account_id}", response_model=AccountRead)
async def get_account(account_id: uuid.UUID, _: Operator, session: SessionDep) -> AccountRead:
    return await account_service.read(session, await account_service.get(session, account_id))


@router.patch("/accounts/{account_id}", response_model=AccountRead)
async def update_account(
    account_id: uuid.UUID,
    data: AdminAccountUpdate,
    _: Operator,
    session: SessionDep,
    services: Services,
) -> AccountRead:
    account = await account_service.update_as_operator(session, account_id, data)
    services.caches.clear_after_commit(session)
    return await account_service.read(session, account)


async def _credit(
    session: SessionDep,
    account_id: uuid.UUID,
    data: CreditCreate,
    idempotency_key: str | None,
    kind: EntryKind,
    response: Response,
) -> CreditResult:
    await account_service.get(session, account_id)
    posted = await wallet_service.post_credit(
        session,
        account_id=account_id,
        kind=kind,
        amount_micros=data.micros,
        idempotency_key=data.idempotency_key or idempotency_key or f"auto:{random_secret(12)}",
        description=data.description,
    )
    response.status_code = 201 if posted.created else 200
    return CreditResult(
        replayed=not posted.created, entry=LedgerEntryRead.model_validate(posted.entry)
    )


@router.post("/accounts/{account_id}/topups", response_model=CreditResult, status_code=201)
async def top_up(
    account_id: uuid.UUID,
    data: CreditCreate,
    _: Operator,
    session: SessionDep,
    response: Response,
    idempotency_key: IdempotencyHeader = None,
) -> CreditResult:
    return await _credit(session, account_id, data, idempotency_key, EntryKind.TOPUP, response)


@router.post("/accounts/{account_id}/adjustments", response_model=CreditResult, status_code=201)
async def adjust(
    account_id: uuid.UUID,
    data: CreditCreate,
    _: Operator,
    session: SessionDep,
    services: Services,
    response: Response,
    idempotency_key: IdempotencyHeader = None,
) -> CreditResult:
    if data.micros < 0:  # may take what this server's idle wallet lease holds: give it back first
        await services.meter.flush(account_id)
    return await _credit(session, account_id, data, idempotency_key, EntryKind.ADJUSTMENT, response)


@router.get("/accounts/{account_id}/wallet", response_model=WalletRead)
async def get_wallet(
    account_id: uuid.UUID, _: Operator, session: SessionDep, services: Services
) -> WalletRead:
    await services.meter.flush(account_id)  # as in GET /v1/wallet
    summary = await wallet_service.summary(session, account_id)
    return WalletRead(
        account_id=summary.account_id,
        balance_micros=summary.balance_micros,
        held_micros=summary.held_micros,
    )


@router.get("/accounts/{account_id}/ledger", response_model=ListPage[LedgerEntryRead])
async def list_ledger(
    account_id: uuid.UUID,
    _: Operator,
    session: SessionDep,
    services: Services,
    limit: PageLimit = 20,
    after: IdCursor = None,
    kind: EntryKind | None = None,
) -> ListPage[LedgerEntryRead]:
    await account_service.get(session, account_id)
    await services.meter.flush(account_id)
    entries = await wallet_service.list_entries(
        session, account_id, limit=limit, after=after, kind=kind
    )
    return ledger_page(list(entries), limit)


@router.get("/accounts/{account_id}/keys", response_model=ListPage[KeyRead])
async def list_keys(account_id: uuid.UUID, _: Operator, session: SessionDep) -> ListPage[KeyRead]:
    await account_service.get(session, account_id)
    data = [KeyRead.model_validate(key) for key in await key_service.list_keys(session, account_id)]
    return whole(data, [str(key.id) for key in data])


@router.post("/accounts/{account_id}/keys", response_model=KeyCreated, status_code=201)
async def create_key(
    account_id: uuid.UUID, data: KeyCreate, _: Operator, session: SessionDep, services: Services
) -> KeyCreated:
    await account_service.get(session, account_id)
    key, token = await key_service.create(
        session,
        account_id=account_id,
        data=data,
        secret=services.secret,
        max_keys=services.settings.max_keys_per_account,
    )
    return KeyCreated.model_validate({**KeyRead.model_validate(key).model_dump(), "key": token})


@router.delete("/accounts/{account_id}/keys/{key_id}", response_model=KeyRead)
async def revoke_key(
    account_id: uuid.UUID,
    key_id: uuid.UUID,
    _: Operator,
    session: SessionDep,
    services: Services,
) -> KeyRead:
    key = await key_service.revoke(session, account_id, key_id, keep_last_private=False)
    services.caches.clear_after_commit(session)
    return KeyRead.model_validate(key)


@router.get("/plans", response_model=ListPage[PlanRead])
async def list_plans(_: Operator, session: SessionDep) -> ListPage[PlanRead]:
    data = [PlanRead.model_validate(plan) for plan in await plan_service.list_plans(session)]
    return whole(data, [plan.id for plan in data])


@router.post("/plans", response_model=PlanRead, status_code=201)
async def create_plan(data: PlanCreate, _: Operator, session: SessionDep) -> PlanRead:
    return PlanRead.model_validate(await plan_service.create(session, data))


@router.get("/plans/{plan_id}", response_model=PlanRead)
async def get_plan(plan_id: str, _: Operator, session: SessionDep) -> PlanRead:
    return PlanRead.model_validate(await plan_service.get(session, plan_id))


@router.patch("/plans/{plan_id}", response_model=PlanRead)
async def update_plan(
    plan_id: str, data: PlanUpdate, _: Operator, session: SessionDep, services: Services
) -> PlanRead:
    plan = await plan_service.update(session, plan_id, data)
    services.caches.clear_after_commit(session)
    return PlanRead.model_validate(plan)


@router.get("/wallet/shortfalls", response_model=ListPage[LedgerEntryRead])
async def list_shortfalls(
    _: Operator, session: SessionDep, limit: PageLimit = 20, after: IdCursor = None
) -> ListPage[LedgerEntryRead]:
    """Late charges an account's balance could not pay in full (the call outlived its hold and
    the balance was spent meanwhile): `details.shortfall_micros` is what went uncollected."""
    entries = await wallet_service.list_shortfalls(session, limit=limit, after=after)
    return ledger_page(list(entries), limit)


@router.post("/wallet/reap")
async def reap_holds(_: Operator, session: SessionDep, services: Services) -> dict[str, int]:
    max_age = timedelta(seconds=services.settings.hold_max_age_seconds)
    return {"expired": await wallet_service.reap_stale_holds(session, max_age=max_age)}
