from __future__ import annotations

from fastapi import APIRouter

from aivax.accounts import service
from aivax.accounts.schemas import AccountRead, AccountUpdate, HookKeyRead
from aivax.auth.dependencies import PrivateKey, Services
from aivax.db import SessionDep

router = APIRouter(prefix="/v1/account", tags=["account"])


@router.get("", response_model=AccountRead)
async def get_account(auth: PrivateKey, session: SessionDep) -> AccountRead:
    return await service.read(session, auth.account)


@router.patch("", response_model=AccountRead)
async def update_account(
    data: AccountUpdate, auth: PrivateKey, session: SessionDep, services: Services
) -> AccountRead:
    account = await service.update_own(session, auth.account, data)
    services.caches.clear_after_commit(session)  # cached principals carry settings
    return await service.read(session, account)


@router.get("/hook-key", response_model=HookKeyRead)
async def get_hook_key(auth: PrivateKey, services: Services) -> HookKeyRead:
    return HookKeyRead(hook_key=service.hook_key(auth.account, services.secret_box))


@router.post("/hook-key/rotate", response_model=HookKeyRead)
async def rotate_hook_key(auth: PrivateKey, session: SessionDep, services: Services) -> HookKeyRead:
    new_key = await service.rotate_hook_key(session, auth.account, services.secret_box)
    return HookKeyRead(hook_key=new_key)
