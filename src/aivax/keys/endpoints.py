from __future__ import annotations

import uuid

from fastapi import APIRouter

from aivax.auth.dependencies import PrivateKey, Services
from aivax.db import SessionDep
from aivax.keys import service
from aivax.keys.schemas import KeyCreate, KeyCreated, KeyRead
from aivax.kit.pagination import ListPage, whole

router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.get("", response_model=ListPage[KeyRead])
async def list_keys(auth: PrivateKey, session: SessionDep) -> ListPage[KeyRead]:
    keys = await service.list_keys(session, auth.account.id)
    data = [KeyRead.model_validate(key) for key in keys]
    return whole(data, [str(key.id) for key in data])


@router.post("", response_model=KeyCreated, status_code=201)
async def create_key(
    data: KeyCreate, auth: PrivateKey, session: SessionDep, services: Services
) -> KeyCreated:
    key, token = await service.create(
        session,
        account_id=auth.account.id,
        data=data,
        secret=services.secret,
        max_keys=services.settings.max_keys_per_account,
    )
    return KeyCreated.model_validate({**KeyRead.model_validate(key).model_dump(), "key": token})


@router.get("/{key_id}", response_model=KeyRead)
async def get_key(key_id: uuid.UUID, auth: PrivateKey, session: SessionDep) -> KeyRead:
    return KeyRead.model_validate(await service.get(session, auth.account.id, key_id))


@router.delete("/{key_id}", response_model=KeyRead)
async def revoke_key(
    key_id: uuid.UUID, auth: PrivateKey, session: SessionDep, services: Services
) -> KeyRead:
    key = await service.revoke(session, auth.account.id, key_id, keep_last_private=True)
    services.caches.clear_after_commit(session)
    return KeyRead.model_validate(key)
