"""Gateway rules: validation, versions, lookup for a call."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from aivax.catalog import service as catalog
from aivax.catalog.service import ModelNotFound
from aivax.errors import BadRequest, Conflict, NotFound
from aivax.gateways import moderation, templates
from aivax.gateways.schemas import GatewayConfig, GatewayCreate, GatewayUpdate
from aivax.kit.clock import utcnow
from aivax.kit.crypto import SecretBox
from aivax.models import Gateway, GatewayVersion


class GatewayNotFound(NotFound):
    code = "gateway_not_found"


class InvalidGateway(BadRequest):
    code = "invalid_gateway"


class ModerationCredentialNotFound(BadRequest):
    code = "credential_not_found"


class SlugTaken(Conflict):
    code = "slug_taken"


def parse_config(raw: dict[str, Any], *, prefix: str = "config") -> GatewayConfig:
    try:
        return GatewayConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join([prefix, *(str(part) for part in first["loc"])])
        raise InvalidGateway(
            f"Invalid gateway setting {where!r}: {first['msg']}.", param=where
        ) from None


async def validate(
    session: AsyncSession, account_id: uuid.UUID, config: GatewayConfig, secret_box: SecretBox
) -> None:
    """What the schema alone cannot check: models exist, templates compile, limits fit."""
    models = [("config.model", config.model)] + [
        (f"config.fallbacks.{i}", name) for i, name in enumerate(config.fallbacks)
    ]
    windows: list[int] = []
    for param, name in models:
        try:
            resolved = await catalog.resolve(session, account_id, name, secret_box)
        except ModelNotFound:
            raise InvalidGateway(
                f"Unknown model {name!r}; list models with GET /v1/models.", param=param
            ) from None
        if resolved.context_window is not None:
            windows.append(resolved.context_window)
    limit = config.context.limit_tokens
    if limit is not None and windows and limit > min(windows):
        raise InvalidGateway(
            f"context.limit_tokens {limit} is above the smallest context window of the gateway's "
            f"models ({min(windows)}).",
            param="config.context.limit_tokens",
        )
    if config.collections is not None:
        from aivax.models import Collection

        for index, collection_id in enumerate(config.collections.ids):
            owned = await session.get(Collection, collection_id)
            if owned is None or owned.account_id != account_id:
                raise NotFound(
                    f"No collection {str(collection_id)!r} on this account.",
                    param=f"config.collections.ids.{index}",
                    code="collection_not_found",
                )
    templates.zone(config.timezone)
    await _check_templates(config)
    await _check_moderation(session, account_id, config)


async def _check_templates(config: GatewayConfig) -> None:
    sources = [("config.system_instruction", config.system_instruction)] + [
        (f"config.prompt_templates.{index}.content", template.content)
        for index, template in enumerate(config.prompt_templates)
    ]
    for param, source in sources:
        if source:
            await templates.check_template(source, param=param, timezone=config.timezone)


async def _check_moderation(
    session: AsyncSession, account_id: uuid.UUID, config: GatewayConfig
) -> None:
    """The `openai` provider needs a credential this account may use: its own or the
    operator's. Another account's credential is reported exactly like one that does not exist."""
    settings = config.moderation
    if settings is None or settings.provider != "openai":
        return
    param = "config.moderation.credential"
    name = settings.credential
    if not name:
        raise InvalidGateway(
            "Moderation provider 'openai' needs `credential`: the name of one of your "
            "credentials (POST /v1/credentials) or of one the operator provides.",
            param=param,
        )
    credential = await moderation.find_credential(session, account_id, name)
    if credential is None:
        raise ModerationCredentialNotFound(
            f"No credential {name!r} on this account; create it with POST /v1/credentials, "
            "or name one listed by GET /v1/credentials.",
            param=param,
        )
    if credential.provider != "openai":
        raise InvalidGateway(
            f"Credential {name!r} is for {credential.provider!r}; moderation needs an "
            "OpenAI-compatible credential (one that serves /moderations).",
            param=param,
        )


async def _record_version(session: AsyncSession, gateway: Gateway) -> None:
    session.add(
        GatewayVersion(
            gateway_id=gateway.id,
            version=gateway.version,
            config=gateway.config,
            created_at=utcnow(),
        )
    )
    await session.flush()


async def _flush_or_slug_taken(session: AsyncSession, slug: str) -> None:
    try:
        await session.flush()
    except IntegrityError:
        raise SlugTaken(
            f"The slug {slug!r} is already used by another gateway of this account.", param="slug"
        ) from None


async def create(
    session: AsyncSession, account_id: uuid.UUID, data: GatewayCreate, secret_box: SecretBox
) -> Gateway:
    await validate(session, account_id, data.config, secret_box)
    if await _by_slug(session, account_id, data.slug) is not None:
        raise SlugTaken(
            f"The slug {data.slug!r} is already used by another gateway of this account.",
            param="slug",
        )
    gateway = Gateway(
        account_id=account_id,
        slug=data.slug,
        name=data.name,
        description=data.description,
        config=data.config.model_dump(mode="json", by_alias=True),
        version=1,
    )
    session.add(gateway)
    await _flush_or_slug_taken(session, data.slug)
    await _record_version(session, gateway)
    return gateway


async def _by_slug(session: AsyncSession, account_id: uuid.UUID, slug: str) -> Gateway | None:
    query = select(Gateway).where(Gateway.account_id == account_id, Gateway.slug == slug)
    return (await session.scalars(query)).first()


async def find(session: AsyncSession, account_id: uuid.UUID, ref: str) -> Gateway | None:
    """A gateway of this account by UUID or slug (never another account's)."""
    try:
        gateway_id = uuid.UUID(ref)
    except ValueError:
        return await _by_slug(session, account_id, ref)
    query = select(Gateway).where(Gateway.account_id == account_id, Gateway.id == gateway_id)
    return (await session.scalars(query)).first()


async def get(session: AsyncSession, account_id: uuid.UUID, ref: str) -> Gateway:
    gateway = await find(session, account_id, ref)
    if gateway is None:
        raise GatewayNotFound(f"No gateway {ref!r}.", param="gateway_id")
    return gateway


async def list_gateways(session: AsyncSession, account_id: uuid.UUID) -> Sequence[Gateway]:
    query = select(Gateway).where(Gateway.account_id == account_id).order_by(Gateway.created_at)
    return (await session.scalars(query)).all()


async def update(
    session: AsyncSession,
    account_id: uuid.UUID,
    ref: str,
    data: GatewayUpdate,
    secret_box: SecretBox,
) -> Gateway:
    gateway = await get(session, account_id, ref)
    if data.config is not None:
        config = parse_config({**gateway.config, **data.config})  # given sections replace
        await validate(session, account_id, config, secret_box)
        gateway.config = config.model_dump(mode="json", by_alias=True)
        gateway.version += 1
        await _record_version(session, gateway)
    for name in ("slug", "name", "description"):
        value = getattr(data, name)
        if value is not None:
            setattr(gateway, name, value)
    await _flush_or_slug_taken(session, gateway.slug)
    return gateway


async def delete(session: AsyncSession, account_id: uuid.UUID, ref: str) -> None:
    await session.delete(await get(session, account_id, ref))
    await session.flush()


async def versions(
    session: AsyncSession, account_id: uuid.UUID, ref: str
) -> Sequence[GatewayVersion]:
    gateway = await get(session, account_id, ref)
    query = (
        select(GatewayVersion)
        .where(GatewayVersion.gateway_id == gateway.id)
        .order_by(GatewayVersion.version.desc())
    )
    return (await session.scalars(query)).all()


async def restore(
    session: AsyncSession, account_id: uuid.UUID, ref: str, version: int, secret_box: SecretBox
) -> Gateway:
    """Make version `version`'s configuration current again, as a new version."""
    gateway = await get(session, account_id, ref)
    query = select(GatewayVersion).where(
        GatewayVersion.gateway_id == gateway.id, GatewayVersion.version == version
    )
    old = (await session.scalars(query)).first()
    if old is None:
        raise NotFound(
            f"Gateway {ref!r} has no version {version}.",
            param="version",
            code="gateway_version_not_found",
        )
    config = parse_config(old.config)
    await validate(session, account_id, config, secret_box)  # its models may be gone since
    gateway.config = config.model_dump(mode="json", by_alias=True)
    gateway.version += 1
    await _record_version(session, gateway)
    return gateway
