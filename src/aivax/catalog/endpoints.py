from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Response

from aivax.auth.dependencies import Operator, PrivateKey, Services
from aivax.catalog import service
from aivax.catalog.schemas import (
    CatalogModelCreate,
    CatalogModelRead,
    CatalogModelUpdate,
    CredentialCreate,
    CredentialRead,
)
from aivax.db import SessionDep

admin_router = APIRouter(prefix="/admin", tags=["admin: models"])
router = APIRouter(prefix="/v1/credentials", tags=["credentials"])


@admin_router.get("/models")
async def list_models(_: Operator, session: SessionDep) -> dict[str, Any]:
    models = await service.list_models(session, enabled_only=False)
    return {"object": "list", "data": await service.read_models(session, models)}


@admin_router.post("/models", response_model=CatalogModelRead, status_code=201)
async def create_model(
    data: CatalogModelCreate, _: Operator, session: SessionDep, services: Services
) -> CatalogModelRead:
    model = await service.create_model(session, data)
    services.caches.clear_after_commit(session)
    return (await service.read_models(session, [model]))[0]


@admin_router.get("/models/{model_id:path}", response_model=CatalogModelRead)
async def get_model(model_id: str, _: Operator, session: SessionDep) -> CatalogModelRead:
    model = await service.get_model(session, model_id)
    return (await service.read_models(session, [model]))[0]


@admin_router.patch("/models/{model_id:path}", response_model=CatalogModelRead)
async def update_model(
    model_id: str, data: CatalogModelUpdate, _: Operator, session: SessionDep, services: Services
) -> CatalogModelRead:
    model = await service.update_model(session, model_id, data)
    services.caches.clear_after_commit(session)
    return (await service.read_models(session, [model]))[0]


@admin_router.delete("/models/{model_id:path}", status_code=204)
async def delete_model(
    model_id: str, _: Operator, session: SessionDep, services: Services
) -> Response:
    await service.delete_model(session, model_id)
    services.caches.clear_after_commit(session)
    return Response(status_code=204)


@admin_router.get("/credentials")
async def list_operator_credentials(_: Operator, session: SessionDep) -> dict[str, Any]:
    rows = await service.list_credentials(session, None)
    return {"object": "list", "data": [service.read_credential(c) for c in rows]}


@admin_router.post("/credentials", response_model=CredentialRead, status_code=201)
async def create_operator_credential(
    data: CredentialCreate, _: Operator, session: SessionDep, services: Services
) -> CredentialRead:
    credential = await service.create_credential(
        session,
        account_id=None,
        data=data,
        secret_box=services.secret_box,
        ssrf_allowlist=frozenset(),
    )
    services.caches.clear_after_commit(session)
    return service.read_credential(credential)


@admin_router.delete("/credentials/{credential_id}", status_code=204)
async def delete_operator_credential(
    credential_id: uuid.UUID, _: Operator, session: SessionDep, services: Services
) -> Response:
    await service.delete_credential(session, None, credential_id)
    services.caches.clear_after_commit(session)
    return Response(status_code=204)


@router.get("")
async def list_credentials(auth: PrivateKey, session: SessionDep) -> dict[str, Any]:
    rows = await service.list_credentials(session, auth.account.id)
    return {"object": "list", "data": [service.read_credential(c) for c in rows]}


@router.post("", response_model=CredentialRead, status_code=201)
async def create_credential(
    data: CredentialCreate, auth: PrivateKey, session: SessionDep, services: Services
) -> CredentialRead:
    credential = await service.create_credential(
        session,
        account_id=auth.account.id,
        data=data,
        secret_box=services.secret_box,
        ssrf_allowlist=frozenset(services.settings.ssrf_allowlist),
    )
    services.caches.clear_after_commit(session)
    return service.read_credential(credential)


@router.delete("/{credential_id}", status_code=204)
async def delete_credential(
    credential_id: uuid.UUID, auth: PrivateKey, session: SessionDep, services: Services
) -> Response:
    await service.delete_credential(session, auth.account.id, credential_id)
    services.caches.clear_after_commit(session)
    return Response(status_code=204)
