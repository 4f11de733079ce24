from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from aivax.models import CatalogModel, ProviderCredential


async def get_model(session: AsyncSession, model_id: str) -> CatalogModel | None:
    return await session.get(CatalogModel, model_id)


async def list_models(session: AsyncSession, *, enabled_only: bool) -> Sequence[CatalogModel]:
    query = select(CatalogModel).order_by(CatalogModel.id)
    if enabled_only:
        query = query.where(CatalogModel.enabled.is_(True))
    return (await session.scalars(query)).all()


def _owned_by(account_id: uuid.UUID | None) -> Any:
    """Credentials of an account, or the operator's (account_id NULL)."""
    if account_id is None:
        return ProviderCredential.account_id.is_(None)
    return ProviderCredential.account_id == account_id


async def get_credential_by_name(
    session: AsyncSession, account_id: uuid.UUID | None, name: str
) -> ProviderCredential | None:
    owner = _owned_by(account_id)
    query = select(ProviderCredential).where(owner, ProviderCredential.name == name)
    return (await session.scalars(query)).first()


async def get_credential(
    session: AsyncSession, account_id: uuid.UUID | None, credential_id: uuid.UUID
) -> ProviderCredential | None:
    owner = _owned_by(account_id)
    query = select(ProviderCredential).where(owner, ProviderCredential.id == credential_id)
    return (await session.scalars(query)).first()


async def list_credentials(
    session: AsyncSession, account_id: uuid.UUID | None
) -> Sequence[ProviderCredential]:
    owner = _owned_by(account_id)
    query = select(ProviderCredential).where(owner).order_by(ProviderCredential.name)
    return (await session.scalars(query)).all()


async def credential_names(session: AsyncSession, ids: set[uuid.UUID]) -> dict[uuid.UUID, str]:
    if not ids:
        return {}
    query = select(ProviderCredential.id, ProviderCredential.name).where(
        ProviderCredential.id.in_(ids)
    )
    return {row[0]: row[1] for row in (await session.execute(query)).all()}
