from __future__ import annotations

from fastapi import APIRouter

from aivax.auth.dependencies import PrivateKey, Services
from aivax.db import SessionDep
from aivax.kit.pagination import IdCursor, ListPage, PageLimit, page_of
from aivax.models import EntryKind
from aivax.wallet import service
from aivax.wallet.schemas import LedgerEntryRead, WalletRead

router = APIRouter(prefix="/v1/wallet", tags=["wallet"])


@router.get("", response_model=WalletRead)
async def get_wallet(auth: PrivateKey, session: SessionDep, services: Services) -> WalletRead:
    """The balance. The answering server first closes its idle wallet lease for the account,
    so calls that have ended show as charged, with nothing held for them."""
    await services.meter.flush(auth.account.id)
    summary = await service.summary(session, auth.account.id)
    return WalletRead(
        account_id=summary.account_id,
        balance_micros=summary.balance_micros,
        held_micros=summary.held_micros,
    )


@router.get("/ledger", response_model=ListPage[LedgerEntryRead])
async def list_ledger(
    auth: PrivateKey,
    session: SessionDep,
    services: Services,
    limit: PageLimit = 20,
    after: IdCursor = None,
    kind: EntryKind | None = None,
) -> ListPage[LedgerEntryRead]:
    await services.meter.flush(auth.account.id)
    entries = await service.list_entries(
        session, auth.account.id, limit=limit, after=after, kind=kind
    )
    return ledger_page(list(entries), limit)


def ledger_page(entries: list[object], limit: int) -> ListPage[LedgerEntryRead]:
    data = [LedgerEntryRead.model_validate(entry) for entry in entries]
    return page_of(data, [str(entry.id) for entry in data], limit=limit)
