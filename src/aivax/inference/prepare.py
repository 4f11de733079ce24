"""Everything before a model request: resolve, admit, compose, hooks and moderation, reserve.
A call that fails here has sent nothing upstream and holds no money."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aivax.catalog import service as catalog
from aivax.catalog.service import ResolvedModel
from aivax.errors import AppError, BadRequest
from aivax.inference import admission, truncation
from aivax.inference.caller import Caller
from aivax.inference.errors import client_error
from aivax.inference.extensions import (
    CallModerator,
    CallView,
    ComposedGateway,
    OutputPlan,
    RoutingPolicy,
    ToolDefinition,
    ToolProvider,
)
from aivax.inference.kernel import Kernel
from aivax.inference.schemas import ChatCompletionRequest
from aivax.inference.steps import Steps
from aivax.inference.tokens import count_input_tokens
from aivax.inference.truncation import Truncation
from aivax.keys.service import Principal
from aivax.models import Plan
from aivax.plans.schemas import PlanLimits
from aivax.providers.base import Provider, UpstreamError, UpstreamRequest
from aivax.wallet import ledger
from aivax.wallet import service as wallet
from aivax.wallet.meter import NOTHING, Reservation

logger = logging.getLogger("aivax.inference")


@dataclass(frozen=True, slots=True)
class Attempt:
    """One model the call may be served by: the primary, then each fallback in order."""

    model: ResolvedModel
    provider: Provider
    upstream: UpstreamRequest


@dataclass
class PreparedCall:
    """One model request, admitted and reserved; `execute` runs it and `settle` ends it."""

    kernel: Kernel
    caller: Caller
    request: ChatCompletionRequest
    model: ResolvedModel
    provider: Provider
    upstream: UpstreamRequest
    admission: admission.Admission
    reservation: Reservation
    steps: Steps
    limits: PlanLimits
    gateway: ComposedGateway | None = None
    requested_model: str = ""
    fallbacks: list[Attempt] = field(default_factory=list)
    truncation: Truncation | None = None
    moderator: CallModerator | None = None
    flags: list[str] = field(default_factory=list)
    output: OutputPlan | None = None
    retrieval: dict[str, Any] | None = None
    tools: dict[str, ToolProvider] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    finished: bool = False
    cost_micros: int | None = None
    estimated: bool = False
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def routing(self) -> RoutingPolicy | None:
        return self.gateway.routing if self.gateway is not None else None

    @property
    def gateway_id(self) -> Any:
        return self.gateway.id if self.gateway is not None else None

    @property
    def request_id(self) -> str:
        return self.steps.request_id

    def view(self) -> CallView:
        return CallView(self.caller, self.request, self.model, self.steps, self.gateway)


@dataclass
class Draft:
    """A call between resolve and reserve."""

    caller: Caller
    request: ChatCompletionRequest
    steps: Steps
    limits: PlanLimits
    model: ResolvedModel
    gateway: ComposedGateway | None
    requested_model: str = ""
    body: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    retrieval: dict[str, Any] | None = None
    output: OutputPlan | None = None
    tools: dict[str, ToolProvider] = field(default_factory=dict)

    def view(self) -> CallView:
        return CallView(self.caller, self.request, self.model, self.steps, self.gateway)


async def prepare(
    kernel: Kernel,
    caller: Caller,
    request: ChatCompletionRequest,
    *,
    steps: Steps | None = None,
    first: bool = True,
) -> PreparedCall:
    """`steps`: the request this model request is a step of (a re-ask); by default the
    caller's. `first`: the call's first model request (hooks see each call once)."""
    admission.check_parameters(request)
    draft = await _resolve(kernel, caller, request, steps or caller.steps())
    await _compose(kernel, draft)
    return await _admit_and_reserve(kernel, draft, first=first)


async def _hooks_and_moderation(
    kernel: Kernel, draft: Draft, *, first: bool
) -> tuple[CallModerator | None, list[str]]:
    ext = kernel.extensions
    if first and ext.hooks:
        view = draft.view()
        for hook in ext.hooks:
            await hook.request(view)
    return await _moderate_input(kernel, draft)


async def _resolve(
    kernel: Kernel, caller: Caller, request: ChatCompletionRequest, steps: Steps
) -> Draft:
    """The model a request names: through its gateway when it names one."""
    resolver = kernel.extensions.gateways
    requested_model = request.model
    gateway = None
    if resolver is not None and not caller.is_internal:
        gateway = await resolver.resolve(caller, request)
    if gateway is not None:
        request = gateway.request
    principal = caller.principal
    limits, model = await plan_and_model(kernel, principal, request.model)
    if model.kind == "embedding":
        raise BadRequest(
            f"{model.id!r} is an embedding model; call POST /v1/embeddings with it.",
            param="model",
            code="not_a_chat_model",
        )
    admission.check_plan(
        principal,
        principal.plan_id,
        limits,
        model,
        via_gateway=gateway is not None or caller.is_internal,
    )
    return Draft(caller, request, steps, limits, model, gateway, requested_model)


async def _compose(kernel: Kernel, draft: Draft) -> None:
    """Augmenters, the upstream body, dropped hints, the output plan, server-side tools."""
    ext = kernel.extensions
    if ext.augmenters and not draft.caller.is_internal:
        for augmenter in ext.augmenters:
            added = await augmenter.augment(draft.view())
            if added is not None:
                draft.request, draft.retrieval = added.request, added.report
    draft.body = draft.request.upstream_body()
    draft.ignored = _drop_unsupported_hints(draft.model, draft.body)
    if ext.output:
        view = draft.view()
        for processor in ext.output:
            draft.output = processor.prepare(view, draft.body) or draft.output
    if ext.tools:
        await _offer_tools(draft, ext.tools)


async def _offer_tools(draft: Draft, providers: list[ToolProvider]) -> None:
    """Server-side tools go to the model beside the caller's own; a name the caller already
    uses stays the caller's."""
    view = draft.view()
    taken = {tool["function"]["name"] for tool in draft.body.get("tools") or []}
    offered: list[ToolDefinition] = []
    for provider in providers:
        for tool in await provider.list_tools(view):
            if tool.name not in taken and tool.name not in draft.tools:
                draft.tools[tool.name] = provider
                offered.append(tool)
    if offered:
        draft.body["tools"] = [*(draft.body.get("tools") or []), *(t.openai() for t in offered)]


async def _moderate_input(kernel: Kernel, draft: Draft) -> tuple[CallModerator | None, list[str]]:
    """Block (nothing goes upstream) or flag the caller's input; the moderator is kept for the
    output."""
    providers = kernel.extensions.moderation
    if not providers or draft.gateway is None:
        return None, []
    view = draft.view()
    for provider in providers:
        moderator = provider.moderator_for(view)
        if moderator is not None:
            tripped = await moderator.check_input(draft.body["messages"])
            return moderator, [f"input:{tripped}"] if tripped else []
    return None, []


@dataclass
class Admitted:
    """What admission worked out for a draft."""

    provider: Provider
    input_tokens: int
    max_tokens: int
    send_max: bool
    media: set[str]
    headers: dict[str, str]
    truncated: Truncation | None


async def _admit_and_reserve(kernel: Kernel, draft: Draft, *, first: bool) -> PreparedCall:
    admitted = await _admit(kernel, draft)
    moderator, flags = await _hooks_and_moderation(kernel, draft, first=first)
    fallbacks = await _fallbacks(kernel, draft, admitted.input_tokens, admitted.media)
    reservation, money_headers = await _reserve(kernel, draft, admitted, fallbacks)
    if money_headers:
        fallbacks = []
    if admitted.send_max or money_headers:
        draft.body["max_tokens"] = admitted.max_tokens
    truncated, ignored = admitted.truncated, draft.ignored
    headers = {
        **admitted.headers,
        **money_headers,
        **({"x-aivax-truncated": truncated.header()} if truncated else {}),
        **({"x-aivax-ignored-parameters": ", ".join(ignored)} if ignored else {}),
    }
    call = _prepared(kernel, draft, admitted, reservation, headers)
    call.fallbacks, call.moderator, call.flags = fallbacks, moderator, flags
    return call


async def _admit(kernel: Kernel, draft: Draft) -> Admitted:
    """Context fit and token count, rate limits, context cap, capabilities, output budget,
    storage — in the order their refusals are reported."""
    principal, model, limits, body = draft.caller.principal, draft.model, draft.limits, draft.body
    try:
        truncated, counted = await _fit_context(kernel, model, body, draft.gateway)
        input_tokens = counted or await count_input_tokens(kernel.registry, model, body)
        provider = kernel.registry.provider(model, retries=0 if draft.gateway else None)
    except UpstreamError as exc:  # e.g. a local model that is missing or will not load
        raise client_error(exc, model) from exc
    headers = await admission.check_rate_limits(
        kernel.limiter, principal, limits, model, input_tokens
    )
    admission.check_context(limits, model, input_tokens)
    media = admission.media_in(body)
    admission.check_capabilities(draft.request, model, media)
    max_tokens, send_max = admission.plan_output(draft.request, model, input_tokens)
    admission.check_storage(principal, limits)
    return Admitted(provider, input_tokens, max_tokens, send_max, media, headers, truncated)


async def _reserve(
    kernel: Kernel, draft: Draft, admitted: Admitted, fallbacks: list[Attempt]
) -> tuple[Reservation, dict[str, str]]:
    """Hold the costliest model of the chain; when the balance cannot cover the primary's
    worst case, max_tokens is clamped for it (`admitted.max_tokens`) and the fallbacks are
    dropped (money headers say so)."""
    tokens = admitted.input_tokens
    worst = max(
        [admission.cost_micros(draft.model, tokens, admitted.max_tokens) or 0]
        + [admission.cost_micros(f.model, tokens, f.upstream.max_tokens) or 0 for f in fallbacks]
    )
    reservation, admitted.max_tokens, money_headers = await _hold(
        kernel, draft, tokens, admitted.max_tokens, admitted.media, worst=worst
    )
    return reservation, money_headers


def _prepared(
    kernel: Kernel,
    draft: Draft,
    admitted: Admitted,
    reservation: Reservation,
    headers: dict[str, str],
) -> PreparedCall:
    model, routing = draft.model, draft.gateway.routing if draft.gateway is not None else None
    timeout = routing.timeout_seconds if routing else kernel.settings.upstream_read_timeout_seconds
    upstream = UpstreamRequest(
        upstream_model=model.upstream_model,
        body=draft.body,
        max_tokens=admitted.max_tokens,
        timeout_seconds=timeout,
        stream=draft.request.stream,
    )
    return PreparedCall(
        kernel=kernel,
        caller=draft.caller,
        request=draft.request,
        model=model,
        provider=admitted.provider,
        upstream=upstream,
        admission=admission.Admission(
            input_tokens=admitted.input_tokens,
            max_tokens=admitted.max_tokens,
            hold_micros=reservation.amount,
            headers=headers,
        ),
        reservation=reservation,
        steps=draft.steps,
        limits=draft.limits,
        input_tokens=admitted.input_tokens,
        gateway=draft.gateway,
        requested_model=draft.requested_model,
        truncation=admitted.truncated,
        output=draft.output,
        retrieval=draft.retrieval,
        tools=draft.tools,
    )


async def continue_call(call: PreparedCall, messages: list[dict[str, Any]]) -> PreparedCall:
    """The next step of a call's tool loop: the same model, gateway and plans, with
    `messages` (the model's tool calls and their results) appended; admitted and reserved
    again, as every model request is."""
    body = {**call.upstream.body, "messages": [*call.upstream.body["messages"], *messages]}
    draft = Draft(
        call.caller,
        call.request,
        call.steps,
        call.limits,
        call.model,
        call.gateway,
        call.requested_model,
        body=body,
        retrieval=call.retrieval,
        output=call.output,
        tools=call.tools,
    )
    return await _admit_and_reserve(call.kernel, draft, first=False)


def _drop_unsupported_hints(model: ResolvedModel, body: dict[str, Any]) -> list[str]:
    """`reasoning_effort` and `verbosity` are hints: a model that cannot use one still serves
    the call, and the response names what it ignored (`x-aivax-ignored-parameters`)."""
    ignored = []
    if "reasoning_effort" in body and not model.supports_reasoning_effort:
        ignored.append("reasoning_effort")
    if "verbosity" in body and not model.supports_verbosity:
        ignored.append("verbosity")
    for name in ignored:
        body.pop(name)
    return ignored


async def _fit_context(
    kernel: Kernel,
    model: ResolvedModel,
    body: dict[str, Any],
    gateway: ComposedGateway | None,
) -> tuple[Truncation | None, int | None]:
    """Apply the gateway's context limit to `body["messages"]` (in place); also returns the
    input-token count it had to make anyway, so admission does not count twice."""
    if gateway is None or gateway.context_limit is None:
        return None, None

    async def count(messages: list[dict[str, Any]]) -> int:
        return await count_input_tokens(kernel.registry, model, {**body, "messages": messages})

    body["messages"], report, tokens = await truncation.fit(
        body["messages"], limit=gateway.context_limit, mode=gateway.truncation, count=count
    )
    return report, tokens


async def _fallbacks(
    kernel: Kernel, draft: Draft, input_tokens: int, media: set[str]
) -> list[Attempt]:
    """The gateway's fallback models this call may use: those the plan allows and that can
    take this request (others are skipped, and say so in the log)."""
    gateway = draft.gateway
    if gateway is None or gateway.routing is None:
        return []
    principal = draft.caller.principal
    attempts: list[Attempt] = []
    for name in gateway.fallbacks:
        try:
            _, model = await plan_and_model(kernel, principal, name)
            admission.check_plan(
                principal, principal.plan_id, draft.limits, model, via_gateway=True
            )
            admission.check_context(draft.limits, model, input_tokens)
            admission.check_capabilities(draft.request, model, media)
            max_tokens, _ = admission.plan_output(draft.request, model, input_tokens)
            provider = kernel.registry.provider(model, retries=0)
        except (AppError, UpstreamError) as exc:
            logger.info("fallback %s skipped for this call: %s", name, exc)
            continue
        upstream = UpstreamRequest(
            upstream_model=model.upstream_model,
            body={**draft.body, "max_tokens": max_tokens},
            max_tokens=max_tokens,
            timeout_seconds=gateway.routing.timeout_seconds,
        )
        attempts.append(Attempt(model, provider, upstream))
    return attempts


async def plan_and_model(
    kernel: Kernel, principal: Principal, model_name: str
) -> tuple[PlanLimits, ResolvedModel]:
    """Plan limits and the resolved model, from the hot-path caches when fresh."""
    caches = kernel.caches
    limits = caches.plans.get(principal.plan_id) if caches.enabled else None
    model = caches.models.get((principal.account_id, model_name)) if caches.enabled else None
    if limits is None or model is None:
        async with kernel.database.sessions() as session:
            if limits is None:
                plan = await session.get(Plan, principal.plan_id)
                if plan is None:
                    raise AppError("The account's plan no longer exists.")
                limits = PlanLimits.model_validate(plan.limits)
            if model is None:
                model = await catalog.resolve(
                    session, principal.account_id, model_name, kernel.secret_box
                )
        if caches.enabled:
            caches.plans[principal.plan_id] = limits
            caches.models[(principal.account_id, model_name)] = model
    return limits, model


async def _hold(
    kernel: Kernel,
    draft: Draft,
    input_tokens: int,
    max_tokens: int,
    media: set[str],
    *,
    worst: int,
) -> tuple[Reservation, int, dict[str, str]]:
    """Reserve `worst` with the wallet meter; only when that is refused, read the balance to
    clamp `max_tokens` to what it affords on the model (or refuse with 402)."""
    if not worst:
        return NOTHING, max_tokens, {}
    meter, account_id = kernel.meter, draft.caller.principal.account_id
    limits, ref = draft.limits, draft.steps.request_id
    minimum = limits.multimodal_min_balance_micros if media else limits.min_balance_micros
    try:
        reserved = await meter.reserve(account_id, worst, minimum, ref=ref)
        return reserved, max_tokens, {}
    except ledger.InsufficientBalance:
        pass
    async with kernel.database.sessions() as session:
        balance = (await wallet.summary(session, account_id)).balance_micros
    balance += meter.unreserved(account_id)
    amount, clamped, headers = admission.clamp_to_balance(
        draft.model, balance, minimum, input_tokens, max_tokens, media
    )
    reserved = await meter.reserve(account_id, amount, minimum, exact=True, ref=ref)
    return reserved, clamped, headers
