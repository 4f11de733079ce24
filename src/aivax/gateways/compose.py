"""Calling a gateway: find it for the caller, then compose the request the model will see.

Order: the system instruction (rendered), the prompt templates (rendered), then the caller's
messages. Gateway sampling values are defaults; a caller may change only those the gateway lists
as overridable (others are refused by name, never silently ignored). Public keys reach a gateway
only by UUID, only when it is public and the Origin is allowed, and every server-side tool
surface is stripped from what they get.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from aivax.errors import BadRequest, Forbidden
from aivax.gateways import service, templates
from aivax.gateways.deps import LookupServices
from aivax.gateways.schemas import GatewayConfig, Tools
from aivax.inference.caller import Caller
from aivax.inference.extensions import ComposedGateway
from aivax.inference.schemas import (
    AssistantMessage,
    ChatCompletionRequest,
    SystemMessage,
    UserMessage,
)
from aivax.keys.schemas import KeyKind
from aivax.keys.service import Principal

SAMPLING = (
    "temperature",
    "top_p",
    "max_tokens",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "seed",
)


class SystemMessageRefused(BadRequest):
    code = "system_message_not_allowed"


class NotOverridable(BadRequest):
    code = "parameter_not_overridable"


class RetrievalReportRefused(Forbidden):
    code = "include_retrieval_not_allowed"
    should_retry = False


class PublicGatewayRefused(Forbidden):
    code = "gateway_not_public"
    should_retry = False


@dataclass(frozen=True, slots=True)
class GatewayTarget:
    id: uuid.UUID
    slug: str
    config: GatewayConfig


async def lookup(
    services: LookupServices, principal: Principal, ref: str, origin: str | None
) -> GatewayTarget | None:
    """The gateway `ref` names for this caller, or None when `ref` is not a gateway."""
    if "/" in ref:
        return None  # model ids (`vendor/model`, `byok/…`) are never slugs
    public = principal.key_kind is KeyKind.PUBLIC
    if public and not _is_uuid(ref):
        if await _find(services, principal.account_id, ref) is not None:
            raise PublicGatewayRefused(
                "Public keys must call a gateway by its UUID, not its slug.", param="model"
            )
        return None
    target = await _find(services, principal.account_id, ref)
    if target is None or not public:
        return target
    access = target.config.public
    if not access.enabled:
        raise PublicGatewayRefused(
            "This gateway is not public; call it with a private key.", param="model"
        )
    if access.allowed_origins and origin not in access.allowed_origins:
        raise PublicGatewayRefused(
            f"Origin {origin!r} is not allowed for this gateway.", code="origin_not_allowed"
        )
    return target


def _is_uuid(ref: str) -> bool:
    try:
        uuid.UUID(ref)
    except ValueError:
        return False
    return True


async def _find(services: LookupServices, account_id: uuid.UUID, ref: str) -> GatewayTarget | None:
    caches = services.caches
    key = (account_id, f"gateway:{ref}")
    cached = caches.gateways.get(key) if caches.enabled else None
    if cached is not None:
        return None if cached is _NO_GATEWAY else cached
    async with services.database.sessions() as session:
        gateway = await service.find(session, account_id, ref)
    target = (
        GatewayTarget(gateway.id, gateway.slug, GatewayConfig.model_validate(gateway.config))
        if gateway is not None
        else None
    )
    if caches.enabled:  # remember misses too: most calls name a model, not a gateway
        caches.gateways[key] = target or _NO_GATEWAY
    return target


_NO_GATEWAY = GatewayTarget(uuid.UUID(int=0), "", GatewayConfig(model="-"))


def effective_config(config: GatewayConfig, principal: Principal) -> GatewayConfig:
    """Public keys never get server-side tool surfaces, whatever the gateway configures, and
    collection search only when the gateway opts in (`public.retrieval`)."""
    if principal.key_kind is not KeyKind.PUBLIC:
        return config
    collections = config.collections if config.public.retrieval else None
    return config.model_copy(update={"tools": Tools(), "skills": [], "collections": collections})


async def compose(
    target: GatewayTarget, request: ChatCompletionRequest, principal: Principal
) -> ChatCompletionRequest:
    config = effective_config(target.config, principal)
    if principal.key_kind is KeyKind.PUBLIC and request.aivax and request.aivax.include_retrieval:
        raise RetrievalReportRefused(
            "Public keys never receive retrieved passages; drop 'aivax.include_retrieval'.",
            param="aivax.include_retrieval",
        )
    if config.caller_system_messages == "refuse" and any(
        message.role in ("system", "developer") for message in request.messages
    ):
        raise SystemMessageRefused(
            "This gateway does not accept system or developer messages from callers.",
            param="messages",
        )
    sampling = _sampling(config, request)  # the caller's parameters first: cheapest to refuse
    context = templates.template_context(
        timezone=config.timezone,
        user=request.user,
        metadata=request.metadata,
        variables=request.aivax.variables if request.aivax else None,
    )
    prefix: list[Any] = []
    if config.system_instruction:
        prefix.append(
            SystemMessage(
                role="system",
                content=await templates.render(
                    config.system_instruction, context, param="config.system_instruction"
                ),
            )
        )
    for index, template in enumerate(config.prompt_templates):
        content = await templates.render(
            template.content, context, param=f"config.prompt_templates.{index}.content"
        )
        prefix.append(_message(template.role, content))
    return request.model_copy(
        update={
            "model": config.model,
            "messages": [*prefix, *request.messages],
            **sampling,
            "reasoning_effort": request.reasoning_effort or config.reasoning_effort,
            "verbosity": request.verbosity or config.verbosity,
            "response_schema": request.response_schema
            or (config.json_schema.schema_ if config.json_schema else None),
        }
    )


def _message(role: str, content: str) -> Any:
    if role == "system":
        return SystemMessage(role="system", content=content)
    if role == "assistant":
        return AssistantMessage(role="assistant", content=content)
    return UserMessage(role="user", content=content)


def _sampling(config: GatewayConfig, request: ChatCompletionRequest) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in SAMPLING:
        asked = request.requested_max_tokens if name == "max_tokens" else getattr(request, name)
        if asked is not None:
            if name not in config.overridable:
                raise NotOverridable(f"This gateway does not let callers set {name!r}.", param=name)
            continue
        default = getattr(config.sampling, name)
        if default is not None:
            values[name] = default
    return values


class GatewayComposer:
    """The kernel's gateway resolver: a model name that names one of the caller's gateways →
    the request composed for its model, with the gateway's policies."""

    def __init__(self, services: LookupServices) -> None:
        self.services = services

    async def resolve(
        self, caller: Caller, request: ChatCompletionRequest
    ) -> ComposedGateway | None:
        principal = caller.principal
        target = await lookup(self.services, principal, request.model, caller.origin)
        if target is None:
            return None
        composed = await compose(target, request, principal)
        config = effective_config(target.config, principal)
        context = config.context
        return ComposedGateway(
            id=target.id,
            request=composed,
            settings=config,
            routing=config.routing,
            fallbacks=config.fallbacks,
            context_limit=context.limit_tokens if context is not None else None,
            truncation=context.truncation if context is not None else "error",
        )
