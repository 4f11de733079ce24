"""What `/v1/models` shows a key: the integrated models its plan allows, the account's BYOK
models and what the registered model listings add (gateways) — nothing a public key cannot
call — plus the request-log schema."""

from __future__ import annotations

import fnmatch
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from sqlalchemy.ext.asyncio import AsyncSession

from aivax.catalog import service as catalog
from aivax.catalog.service import ModelNotFound
from aivax.inference.extensions import ModelListing
from aivax.keys.schemas import KeyKind
from aivax.keys.service import Principal
from aivax.models import CatalogModel, Plan, ProviderCredential
from aivax.plans.schemas import PlanLimits


def _allowed(model: CatalogModel, plan: Plan, limits: PlanLimits) -> bool:
    matches = any(fnmatch.fnmatchcase(model.id, p) for p in limits.models_allowed)
    return matches and (not model.plans or plan.id in model.plans)


def capabilities(model: CatalogModel) -> dict[str, Any]:
    """Pricing and what an integrated model can do (also shown for the model behind a gateway)."""
    extra = {"dimensions": model.options.get("dimensions")} if model.kind == "embedding" else {}
    return {
        "type": model.kind,
        **extra,
        "pricing": {
            "input_micros_per_m": model.input_price_per_m,
            "output_micros_per_m": model.output_price_per_m,
        },
        "context_window": model.context_window,
        "max_output_tokens": model.max_output_tokens,
        "modalities": model.modalities,
        "supports_tools": model.supports_tools,
        "supports_json_schema": model.supports_json_schema,
    }


def _integrated(model: CatalogModel) -> dict[str, Any]:
    return {
        "id": model.id,
        "object": "model",
        "created": int(model.created_at.timestamp()),
        "owned_by": "aivax",
        "aivax": {"kind": "integrated", "provider": model.provider, **capabilities(model)},
    }


def _byok(credential: ProviderCredential, upstream: str) -> dict[str, Any]:
    prices = credential.prices.get(upstream)
    return {
        "id": f"byok/{credential.name}/{upstream}",
        "object": "model",
        "created": int(credential.created_at.timestamp()),
        "owned_by": "byok",
        "aivax": {
            "kind": "byok",
            "provider": credential.provider,
            "pricing": (
                {
                    "input_micros_per_m": prices["input_price_per_m"],
                    "output_micros_per_m": prices["output_price_per_m"],
                }
                if prices
                else None
            ),
        },
    }


async def _listed(
    session: AsyncSession, principal: Principal, listings: Sequence[ModelListing]
) -> list[dict[str, Any]]:
    return [
        entry for listing in listings for entry in await listing.list_models(session, principal)
    ]


async def visible_models(
    session: AsyncSession, principal: Principal, listings: Sequence[ModelListing]
) -> list[dict[str, Any]]:
    if principal.key_kind is KeyKind.PUBLIC:
        # Public keys call public gateways only; each listing applies that rule to its own.
        return await _listed(session, principal, listings)
    plan = await session.get(Plan, principal.plan_id)
    if plan is None:
        return []
    limits = PlanLimits.model_validate(plan.limits)
    rows = await catalog.list_models(session, enabled_only=True)
    data = [_integrated(m) for m in rows if _allowed(m, plan, limits)]
    for credential in await catalog.list_credentials(session, principal.account_id):
        data += [_byok(credential, upstream) for upstream in credential.models]
    return data + await _listed(session, principal, listings)


async def visible_model(
    session: AsyncSession, principal: Principal, model_id: str, listings: Sequence[ModelListing]
) -> dict[str, Any]:
    for entry in await visible_models(session, principal, listings):
        if entry["id"] == model_id:
            return entry
    raise ModelNotFound(
        f"The model {model_id!r} does not exist or you do not have access to it.", param="model"
    )


class RequestLogRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    object: Literal["request_log"] = "request_log"
    id: int
    request_id: str
    step: int = 1  # the model requests of one API request share its id, numbered from 1
    key_id: uuid.UUID | None
    gateway_id: uuid.UUID | None
    model: str
    provider: str
    upstream_model: str
    byok: bool
    stream: bool
    status: int
    error_code: str | None
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cost_micros: int | None
    estimated: bool
    latency_ms: int
    ttft_ms: int | None
    flags: list[str] | None = None
    created_at: datetime
