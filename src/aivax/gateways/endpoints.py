from __future__ import annotations

from fastapi import APIRouter, Response

from aivax.auth.dependencies import PrivateKey, Services
from aivax.db import SessionDep
from aivax.gateways import service
from aivax.gateways.schemas import (
    GatewayConfig,
    GatewayCreate,
    GatewayRead,
    GatewayUpdate,
    GatewayVersionRead,
)
from aivax.kit.pagination import ListPage, whole
from aivax.models import Gateway

router = APIRouter(prefix="/v1/gateways", tags=["gateways"])


def to_read(gateway: Gateway) -> GatewayRead:
    return GatewayRead(
        id=gateway.id,
        slug=gateway.slug,
        name=gateway.name,
        description=gateway.description,
        version=gateway.version,
        config=GatewayConfig.model_validate(gateway.config),
        created_at=gateway.created_at,
        updated_at=gateway.updated_at,
    )


@router.post("", response_model=GatewayRead, status_code=201)
async def create_gateway(
    data: GatewayCreate, auth: PrivateKey, session: SessionDep, services: Services
) -> GatewayRead:
    gateway = await service.create(session, auth.account.id, data, services.secret_box)
    services.caches.clear_after_commit(session)
    return to_read(gateway)


@router.get("", response_model=ListPage[GatewayRead])
async def list_gateways(auth: PrivateKey, session: SessionDep) -> ListPage[GatewayRead]:
    data = [to_read(g) for g in await service.list_gateways(session, auth.account.id)]
    return whole(data, [str(gateway.id) for gateway in data])


@router.get("/{ref}", response_model=GatewayRead)
async def get_gateway(ref: str, auth: PrivateKey, session: SessionDep) -> GatewayRead:
    return to_read(await service.get(session, auth.account.id, ref))


@router.patch("/{ref}", response_model=GatewayRead)
async def update_gateway(
    ref: str, data: GatewayUpdate, auth: PrivateKey, session: SessionDep, services: Services
) -> GatewayRead:
    gateway = await service.update(session, auth.account.id, ref, data, services.secret_box)
    services.caches.clear_after_commit(session)
    return to_read(gateway)


@router.delete("/{ref}", status_code=204)
async def delete_gateway(
    ref: str, auth: PrivateKey, session: SessionDep, services: Services
) -> Response:
    await service.delete(session, auth.account.id, ref)
    services.caches.clear_after_commit(session)
    return Response(status_code=204)


@router.get("/{ref}/versions", response_model=ListPage[GatewayVersionRead])
async def list_versions(
    ref: str, auth: PrivateKey, session: SessionDep
) -> ListPage[GatewayVersionRead]:
    rows = await service.versions(session, auth.account.id, ref)
    data = [
        GatewayVersionRead(
            version=v.version,
            config=GatewayConfig.model_validate(v.config),
            created_at=v.created_at,
        )
        for v in rows
    ]
    return whole(data, [str(version.version) for version in data])


@router.post("/{ref}/versions/{version}/restore", response_model=GatewayRead)
async def restore_version(
    ref: str, version: int, auth: PrivateKey, session: SessionDep, services: Services
) -> GatewayRead:
    gateway = await service.restore(session, auth.account.id, ref, version, services.secret_box)
    services.caches.clear_after_commit(session)
    return to_read(gateway)
