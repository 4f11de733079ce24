"""The account's gateways in `GET /v1/models`: a model listing registered on the kernel
(`inference.extensions.ModelListing`). Private keys see each gateway twice, by UUID and by
slug; public keys see only public gateways, by UUID (the only way they may call one)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from aivax.catalog import service as catalog
from aivax.gateways import service as gateway_service
from aivax.gateways.schemas import GatewayConfig
from aivax.inference.catalog_view import capabilities
from aivax.keys.schemas import KeyKind
from aivax.keys.service import Principal
from aivax.models import CatalogModel, Gateway


def _gateway(gateway: Gateway, model_id: str, behind: CatalogModel | None) -> dict[str, Any]:
    config = GatewayConfig.model_validate(gateway.config)
    return {
        "id": model_id,
        "object": "model",
        "created": int(gateway.created_at.timestamp()),
        "owned_by": "gateway",
        "aivax": {
            "kind": "gateway",
            "gateway_id": str(gateway.id),
            "slug": gateway.slug,
            "name": gateway.name,
            "model": config.model,
            "fallbacks": config.fallbacks,
            "public": config.public.enabled,
            "capabilities": capabilities(behind) if behind else None,  # None for BYOK
        },
    }


class GatewayListing:
    async def list_models(
        self, session: AsyncSession, principal: Principal
    ) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        models = {m.id: m for m in await catalog.list_models(session, enabled_only=True)}
        for gateway in await gateway_service.list_gateways(session, principal.account_id):
            behind = models.get(str(gateway.config.get("model")))
            if principal.key_kind is KeyKind.PUBLIC:
                if GatewayConfig.model_validate(gateway.config).public.enabled:
                    entries.append(_gateway(gateway, str(gateway.id), behind))  # UUID only
            else:
                entries += [
                    _gateway(gateway, str(gateway.id), behind),
                    _gateway(gateway, gateway.slug, behind),
                ]
        return entries
