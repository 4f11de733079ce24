"""Composable steps of one chat call: `prepare` (resolve, admit, hold), `open_stream` (the
provider call), `finish` (usage → cost → settle the hold → request log). Every entry point —
the API today, gateways, channels and batches later — goes through these."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aivax.catalog import service as catalog
from aivax.catalog.service import ResolvedModel
from aivax.errors import AppError, BadRequest
from aivax.gateways import compose as gateway_compose
from aivax.gateways.moderation import ContentBlocked, Moderator, caller_text
from aivax.gateways.schemas import Routing
from aivax.inference import admission, truncation
from aivax.inference.accumulate import Accumulator, is_content
from aivax.inference.schemas import ChatCompletionRequest
from aivax.inference.steps import Steps
from aivax.inference.tokens import count_input_tokens, estimate_output_tokens
from aivax.inference.truncation import Truncation
from aivax.keys.service import Principal
from aivax.models import Plan
from aivax.plans.schemas import PlanLimits
from aivax.providers.base import Provider, StreamEvent, UpstreamError, UpstreamRequest
from aivax.rag import augment
from aivax.services import AppServices
from aivax.structured import grammar_support
from aivax.structured import pipeline as structured
from aivax.wallet import ledger
from aivax.wallet import service as wallet
from aivax.wallet.meter import NOTHING, Reservation, log_row

logger = logging.getLogger("aivax.inference")


class UpstreamFailed(AppError):
    status = 502
    type = "api_error"
    code = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str,
        headers: dict[str, str] | None = None,
        type_: str | None = None,
    ) -> None:
        super().__init__(message, code=code, headers=headers)
        self.status = status  # type: ignore[misc]
        if type_:
            self.type = type_  # type: ignore[misc]


def client_error(error: UpstreamError, model: ResolvedModel) -> UpstreamFailed:
    """What the caller sees for an upstream failure (never the operator's credential problems
    as if they were the caller's)."""
    upstream = error.status
    if error.code == "content_policy_violation":
        return UpstreamFailed(
            error.message,
            status=400,
            code="content_policy_violation",
            type_="invalid_request_error",
        )
    retry = {"retry-after": error.headers["retry-after"]} if "retry-after" in error.headers else {}
    if upstream in (400, 413, 422):
        return UpstreamFailed(
            f"The upstream rejected the request: {error.message}",
            status=400,
            code="upstream_invalid_request",
            type_="invalid_request_error",
        )
    if upstream in (401, 403) and model.byok:
        return UpstreamFailed(
            f"The upstream refused your credential: {error.message}",
            status=400,
            code="byok_credential_rejected",
            type_="invalid_request_error",
        )
    if upstream == 404 and model.byok:
        return UpstreamFailed(
            f"The upstream does not know this model: {error.message}",
            status=404,
            code="model_not_found",
            type_="not_found_error",
        )
    if upstream == 429:
        return UpstreamFailed(
            "The upstream is rate limiting; retry shortly.",
            status=429,
            code="upstream_rate_limited",
            headers=retry,
            type_="rate_limit_error",
        )
    if upstream == 503 and error.code == "model_overloaded":
        return UpstreamFailed(
            error.message,
            status=503,
            code="model_overloaded",
            headers=retry or {"retry-after": "2"},
        )
    if error.code == "model_unavailable":
        logger.error("model %s unavailable: %s", model.id, error.message)
        return UpstreamFailed(
            f"Model {model.id!r} is unavailable on this server; the operator has been told "
            "(see the server log).",
            status=503,
            code="model_unavailable",
        )
    if upstream in (408, 504):
        return UpstreamFailed(
            "The upstream did not answer in time.", status=504, code="upstream_timeout"
        )
    return UpstreamFailed(
        f"The upstream failed: {error.message}",
        status=502,
        code=error.code if error.code != "upstream_error" else "upstream_error",
    )


@dataclass(frozen=True, slots=True)
class Attempt:
    """One model the call may be served by: the primary, then each fallback in order."""

    model: ResolvedModel
    provider: Provider
    upstream: UpstreamRequest


@dataclass
class PreparedCall:
    services: AppServices
    principal: Principal
    request_id: str
    request: ChatCompletionRequest
    model: ResolvedModel
    provider: Provider
    upstream: UpstreamRequest
    admission: admission.Admission
    reservation: Reservation
    steps: Steps
    gateway_id: uuid.UUID | None = None
    requested_model: str = ""
    fallbacks: list[Attempt] = field(default_factory=list)
    routing: Routing | None = None
    truncation: Truncation | None = None
    moderator: Moderator | None = None
    flags: list[str] = field(default_factory=list)
    structured: structured.StructuredPlan | None = None
    retrieval: dict[str, Any] | None = None
    started: float = field(default_factory=time.perf_counter)
    finished: bool = False
    cost_micros: int | None = None
    estimated: bool = False
    input_tokens: int = 0
    output_tokens: int = 0


async def prepare(
    services: AppServices,
    principal: Principal,
    request: ChatCompletionRequest,
    request_id: str,
    *,
    origin: str | None = None,
    internal: bool = False,
    steps: Steps | None = None,
) -> PreparedCall:
    """`internal`: a call AIVAX makes itself for a gateway (query rewriting, retrieval
    decisions): `request.model` is a model, never a gateway, and public keys may make it.
    `steps`: the API request this call is one model request of (re-asks, retrieval calls);
    by default it is the first."""
    admission.check_parameters(request)
    steps = steps or Steps(request_id)
    requested_model = request.model
    gateway = (
        None
        if internal
        else await gateway_compose.lookup(services, principal, request.model, origin)
    )
    if gateway is not None:
        request = await gateway_compose.compose(gateway, request, principal)
    limits, model = await plan_and_model(services, principal, request.model)
    if model.kind == "embedding":
        raise BadRequest(
            f"{model.id!r} is an embedding model; call POST /v1/embeddings with it.",
            param="model",
            code="not_a_chat_model",
        )
    admission.check_plan(
        principal, principal.plan_id, limits, model, via_gateway=gateway is not None or internal
    )
    retrieved = None
    if gateway is not None:
        request, retrieved = await augment.augment(
            services,
            principal,
            gateway_compose.effective_config(gateway.config, principal).collections,
            request,
            steps,
            supports_tools=model.supports_tools or model.byok,
        )
    body = request.upstream_body()
    ignored = _drop_unsupported_hints(model, body)
    plan = structured.plan_for(
        request,
        heal_response_format=principal.json_healing_for_response_format,
        gateway_settings=gateway.config.json_schema if gateway is not None else None,
    )
    if model.provider == "local_gguf":  # grammar-constrained: refuse what it cannot enforce
        for param, schema in structured.requested_schemas(request):
            grammar_support.check(schema, param=param)
    if plan is not None:
        structured.apply(plan, model, body)
    try:
        truncated, counted = await _fit_context(services, model, body, gateway)
        input_tokens = counted or await count_input_tokens(services.registry, model, body)
        provider = services.registry.provider(model, retries=0 if gateway else None)
    except UpstreamError as exc:  # e.g. a local model that is missing or will not load
        raise client_error(exc, model) from exc
    headers = await admission.check_rate_limits(
        services.limiter, principal, limits, model, input_tokens
    )
    admission.check_context(limits, model, input_tokens)
    media = admission.media_in(body)
    admission.check_capabilities(request, model, media)
    max_tokens, send_max = admission.plan_output(request, model, input_tokens)
    admission.check_storage(principal, limits)
    moderator, flags = await _moderate_input(services, principal, gateway, body)
    routing = gateway.config.routing if gateway is not None else None
    fallbacks = await _fallbacks(
        services, principal, limits, request, gateway, input_tokens, media, body, routing
    )
    # Hold the costliest model of the chain; when the balance cannot cover the primary's worst
    # case, max_tokens is clamped for it and the fallbacks are dropped.
    worst = max(
        [admission.cost_micros(model, input_tokens, max_tokens) or 0]
        + [
            admission.cost_micros(f.model, input_tokens, f.upstream.max_tokens) or 0
            for f in fallbacks
        ]
    )
    reservation, max_tokens, money_headers = await _hold(
        services,
        principal,
        limits,
        model,
        input_tokens,
        max_tokens,
        media,
        request_id,
        worst=worst,
    )
    if money_headers:
        fallbacks = []
    if send_max or money_headers:
        body["max_tokens"] = max_tokens
    admitted = admission.Admission(
        input_tokens=input_tokens,
        max_tokens=max_tokens,
        hold_micros=reservation.amount,
        headers={
            **headers,
            **money_headers,
            **({"x-aivax-truncated": truncated.header()} if truncated else {}),
            **({"x-aivax-ignored-parameters": ", ".join(ignored)} if ignored else {}),
        },
    )
    return PreparedCall(
        services=services,
        principal=principal,
        request_id=request_id,
        request=request,
        model=model,
        provider=provider,
        upstream=UpstreamRequest(
            upstream_model=model.upstream_model,
            body=body,
            max_tokens=max_tokens,
            timeout_seconds=routing.timeout_seconds
            if routing
            else services.settings.upstream_read_timeout_seconds,
            stream=request.stream,
        ),
        admission=admitted,
        reservation=reservation,
        steps=steps,
        input_tokens=input_tokens,
        gateway_id=gateway.id if gateway is not None else None,
        requested_model=requested_model,
        fallbacks=fallbacks,
        routing=routing,
        truncation=truncated,
        moderator=moderator,
        flags=flags,
        structured=plan,
        retrieval=retrieved,
    )


class InputBlocked(AppError):
    status = 400
    code = "content_policy_violation"


async def _moderate_input(
    services: AppServices,
    principal: Principal,
    gateway: gateway_compose.GatewayTarget | None,
    body: dict[str, Any],
) -> tuple[Moderator | None, list[str]]:
    """Block (nothing goes upstream) or flag the caller's input; the moderator is kept for the
    output."""
    settings = gateway.config.moderation if gateway is not None else None
    if settings is None:
        return None, []
    moderator = Moderator(settings, services, principal.account_id)
    if not settings.input:
        return moderator, []
    tripped = await moderator.check_input(caller_text(body["messages"]))
    if tripped is None:
        return moderator, []
    if settings.action == "block":
        raise InputBlocked(
            "The input was blocked by this gateway's content policy.", param="messages"
        )
    return moderator, [f"input:{tripped}"]


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
    services: AppServices,
    model: ResolvedModel,
    body: dict[str, Any],
    gateway: gateway_compose.GatewayTarget | None,
) -> tuple[Truncation | None, int | None]:
    """Apply the gateway's context limit to `body["messages"]` (in place); also returns the
    input-token count it had to make anyway, so admission does not count twice."""
    settings = gateway.config.context if gateway is not None else None
    if settings is None or settings.limit_tokens is None:
        return None, None

    async def count(messages: list[dict[str, Any]]) -> int:
        return await count_input_tokens(services.registry, model, {**body, "messages": messages})

    body["messages"], report, tokens = await truncation.fit(
        body["messages"], limit=settings.limit_tokens, mode=settings.truncation, count=count
    )
    return report, tokens


async def _fallbacks(
    services: AppServices,
    principal: Principal,
    limits: PlanLimits,
    request: ChatCompletionRequest,
    gateway: gateway_compose.GatewayTarget | None,
    input_tokens: int,
    media: set[str],
    body: dict[str, Any],
    routing: Routing | None,
) -> list[Attempt]:
    """The gateway's fallback models this call may use: those the plan allows and that can
    take this request (others are skipped, and say so in the log)."""
    if gateway is None or routing is None:
        return []
    attempts: list[Attempt] = []
    for name in gateway.config.fallbacks:
        try:
            _, model = await plan_and_model(services, principal, name)
            admission.check_plan(principal, principal.plan_id, limits, model, via_gateway=True)
            admission.check_context(limits, model, input_tokens)
            admission.check_capabilities(request, model, media)
            max_tokens, _ = admission.plan_output(request, model, input_tokens)
            provider = services.registry.provider(model, retries=0)
        except (AppError, UpstreamError) as exc:
            logger.info("fallback %s skipped for this call: %s", name, exc)
            continue
        attempts.append(
            Attempt(
                model,
                provider,
                UpstreamRequest(
                    upstream_model=model.upstream_model,
                    body={**body, "max_tokens": max_tokens},
                    max_tokens=max_tokens,
                    timeout_seconds=routing.timeout_seconds,
                ),
            )
        )
    return attempts


async def plan_and_model(
    services: AppServices, principal: Principal, model_name: str
) -> tuple[PlanLimits, ResolvedModel]:
    """Plan limits and the resolved model, from the hot-path caches when fresh."""
    caches = services.caches
    limits = caches.plans.get(principal.plan_id) if caches.enabled else None
    model = caches.models.get((principal.account_id, model_name)) if caches.enabled else None
    if limits is None or model is None:
        async with services.database.sessions() as session:
            if limits is None:
                plan = await session.get(Plan, principal.plan_id)
                if plan is None:
                    raise AppError("The account's plan no longer exists.")
                limits = PlanLimits.model_validate(plan.limits)
            if model is None:
                model = await catalog.resolve(
                    session, principal.account_id, model_name, services.secret_box
                )
        if caches.enabled:
            caches.plans[principal.plan_id] = limits
            caches.models[(principal.account_id, model_name)] = model
    return limits, model


async def _hold(
    services: AppServices,
    principal: Principal,
    limits: PlanLimits,
    model: ResolvedModel,
    input_tokens: int,
    max_tokens: int,
    media: set[str],
    request_id: str,
    *,
    worst: int,
) -> tuple[Reservation, int, dict[str, str]]:
    """Reserve `worst` with the wallet meter; only when that is refused, read the balance to
    clamp `max_tokens` to what it affords on `model` (or refuse with 402)."""
    if not worst:
        return NOTHING, max_tokens, {}
    meter, account_id = services.meter, principal.account_id
    minimum = limits.multimodal_min_balance_micros if media else limits.min_balance_micros
    try:
        reserved = await meter.reserve(account_id, worst, minimum, ref=request_id)
        return reserved, max_tokens, {}
    except ledger.InsufficientBalance:
        pass
    async with services.database.sessions() as session:
        balance = (await wallet.summary(session, account_id)).balance_micros
    balance += meter.unreserved(account_id)
    amount, clamped, headers = admission.clamp_to_balance(
        model, balance, minimum, input_tokens, max_tokens, media
    )
    reserved = await meter.reserve(account_id, amount, minimum, exact=True, ref=request_id)
    return reserved, clamped, headers


def open_stream(call: PreparedCall, accumulator: Accumulator) -> AsyncIterator[StreamEvent]:
    """The provider's events, each recorded in `accumulator` on the way through.

    Gateway calls follow their routing: each model is retried with backoff on the failures the
    gateway names (429, 5xx, timeout, disconnect), then the next fallback is tried — as long as
    no content has been produced. Every failed attempt is logged; the model that answers becomes
    `call.model` and is the only one billed.
    """

    async def recorded() -> AsyncIterator[StreamEvent]:
        attempts = [Attempt(call.model, call.provider, call.upstream), *call.fallbacks]
        tries = 1 + (call.routing.retries if call.routing else 0)
        last: UpstreamError | None = None
        for attempt in attempts:
            for number in range(tries):
                accumulator.reset()
                produced = False
                watch = OutputWatch(call, accumulator)
                try:
                    async for event in attempt.provider.stream(attempt.upstream):
                        produced = produced or is_content(event)
                        accumulator.add(event)
                        if watch.enabled:
                            await watch.check(final=False)
                        yield event
                    await watch.check(final=True)
                except UpstreamError as exc:
                    if produced or not _reroutable(call.routing, exc):
                        raise
                    last = exc
                    _log_failed_attempt(call, attempt.model, exc)
                    if number + 1 < tries:
                        assert call.routing is not None  # noqa: S101 - tries > 1 needs routing
                        await asyncio.sleep(call.routing.backoff_ms / 1000 * 2**number)
                    continue
                call.model, call.provider, call.upstream = (
                    attempt.model,
                    attempt.provider,
                    attempt.upstream,
                )
                return
        assert last is not None  # noqa: S101 - every attempt failed
        raise last

    return recorded()


class OutputWatch:
    """Output moderation on the text as it grows: checked every few characters (rules) or every
    few hundred (the openai endpoint), and once at the end."""

    def __init__(self, call: PreparedCall, accumulator: Accumulator) -> None:
        self.call = call
        self.accumulator = accumulator
        settings = call.moderator.settings if call.moderator else None
        self.enabled = settings is not None and settings.output
        self.step = 400 if settings is not None and settings.provider == "openai" else 1
        self.checked = 0

    async def check(self, *, final: bool) -> None:
        if not self.enabled or self.call.moderator is None:
            return
        text = "".join(self.accumulator.text)
        if len(text) == self.checked or (not final and len(text) - self.checked < self.step):
            return
        self.checked = len(text)
        tripped = await self.call.moderator.trips(text)
        if tripped is None:
            return
        if self.call.moderator.settings.action == "block":
            raise ContentBlocked("output")
        flag = f"output:{tripped}"
        if flag not in self.call.flags:
            self.call.flags.append(flag)
        self.enabled = False  # flagged once is enough


def failure_kind(error: UpstreamError) -> str | None:
    if error.status == 429:
        return "429"
    if error.code == "upstream_timeout" or error.status in (408, 504):
        return "timeout"
    if error.code == "upstream_disconnected":
        return "disconnect"
    if error.status >= 500:
        return "5xx"
    return None


def _reroutable(routing: Routing | None, error: UpstreamError) -> bool:
    kind = failure_kind(error)
    return routing is not None and kind is not None and kind in routing.fallback_on


def _log_failed_attempt(call: PreparedCall, model: ResolvedModel, error: UpstreamError) -> None:
    logger.info("attempt on %s failed (%s %s); rerouting", model.id, error.status, error.code)
    log = _log_values(
        call, model=model, status=error.status, error_code=error.code, input_tokens=0, cost=0
    )
    call.services.meter.record(log)


def _log_values(
    call: PreparedCall,
    *,
    model: ResolvedModel,
    status: int,
    error_code: str | None,
    **usage: Any,
) -> dict[str, Any]:
    """The request-log row of `call` answered by `model`; `usage` takes `log_row`'s token,
    cost, `estimated` and `first` arguments."""
    return log_row(
        request_id=call.steps.request_id,
        step=call.steps.next(),
        account_id=call.principal.account_id,
        key_id=call.principal.key_id,
        gateway_id=call.gateway_id,
        model=model,
        stream=call.request.stream,
        status=status,
        error_code=error_code,
        started=call.started,
        flags=call.flags,
        **usage,
    )


async def finish(
    call: PreparedCall, accumulator: Accumulator, *, status: int, error_code: str | None
) -> None:
    """Work out usage and cost now (the response reports them), and queue the settlement —
    exactly once, whatever happened, even when cancelled."""
    if call.finished:
        return
    call.finished = True
    input_tokens, output_tokens, cached, estimated = _usage(call, accumulator)
    cost = admission.cost_micros(call.model, input_tokens, output_tokens) or 0
    if not (input_tokens or output_tokens):
        cost = 0
    charge = call.reservation.charge_for(cost)
    call.input_tokens, call.output_tokens, call.estimated = input_tokens, output_tokens, estimated
    call.cost_micros = charge if call.model.priced else None
    log = _log_values(
        call,
        model=call.model,
        status=status,
        error_code=error_code,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached=cached,
        cost=call.cost_micros,
        estimated=estimated,
        first=accumulator.first_token_at,
    )
    call.services.meter.settle(call.reservation, charge, log)


def _usage(call: PreparedCall, accumulator: Accumulator) -> tuple[int, int, int, bool]:
    usage = accumulator.usage
    if usage is not None and (usage.input_tokens or usage.output_tokens):
        return usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, False
    if not accumulator.produced_output and accumulator.usage is None:
        return 0, 0, 0, False  # nothing generated: nothing billed
    # No usage from upstream: count locally and say so.
    return call.input_tokens, estimate_output_tokens(accumulator.generated_text()), 0, True
