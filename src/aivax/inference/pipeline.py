"""Composable steps of one chat call: `prepare` (resolve, admit, hold), `open_stream` (the
provider call), `finish` (usage → cost → settle the hold → request log). Every entry point —
the API today, gateways, channels and batches later — goes through these."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aivax.catalog import service as catalog
from aivax.catalog.service import ResolvedModel
from aivax.errors import AppError
from aivax.gateways import compose as gateway_compose
from aivax.inference import admission
from aivax.inference.accumulate import Accumulator
from aivax.inference.schemas import ChatCompletionRequest
from aivax.inference.settlement import Settlement
from aivax.inference.tokens import count_input_tokens, estimate_output_tokens
from aivax.keys.service import Principal
from aivax.kit.clock import utcnow
from aivax.models import Plan
from aivax.plans.schemas import PlanLimits
from aivax.providers.base import Provider, StreamEvent, UpstreamError, UpstreamRequest
from aivax.services import AppServices
from aivax.wallet import ledger
from aivax.wallet import service as wallet

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
    hold_id: uuid.UUID | None
    gateway_id: uuid.UUID | None = None
    requested_model: str = ""
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
) -> PreparedCall:
    admission.check_parameters(request)
    requested_model = request.model
    gateway = await gateway_compose.lookup(services, principal, request.model, origin)
    if gateway is not None:
        request = gateway_compose.compose(gateway, request, principal)
    limits, model = await _plan_and_model(services, principal, request.model)
    admission.check_plan(
        principal, principal.plan_id, limits, model, via_gateway=gateway is not None
    )
    body = request.upstream_body()
    try:
        input_tokens = await count_input_tokens(services.registry, model, body)
        provider = services.registry.provider(model)
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
    hold_id, hold_amount, max_tokens, money_headers = await _hold(
        services, principal, limits, model, input_tokens, max_tokens, media, request_id
    )
    if send_max or money_headers:
        body["max_tokens"] = max_tokens
    admitted = admission.Admission(
        input_tokens=input_tokens,
        max_tokens=max_tokens,
        send_max_tokens=send_max,
        hold_micros=hold_amount,
        headers={**headers, **money_headers},
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
            timeout_seconds=services.settings.upstream_read_timeout_seconds,
        ),
        admission=admitted,
        hold_id=hold_id,
        input_tokens=input_tokens,
        gateway_id=gateway.id if gateway is not None else None,
        requested_model=requested_model,
    )


async def _plan_and_model(
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
) -> tuple[uuid.UUID | None, int, int, dict[str, str]]:
    """Reserve the worst case in one conditional UPDATE; only when that is refused, read the
    balance to clamp `max_tokens` to what it affords (or refuse with 402)."""
    worst = admission.cost_micros(model, input_tokens, max_tokens)
    if not worst:
        return None, 0, max_tokens, {}
    minimum = limits.multimodal_min_balance_micros if media else limits.min_balance_micros
    try:
        return (
            await _try_hold(services, principal, worst, minimum, request_id),
            worst,
            max_tokens,
            {},
        )
    except ledger.InsufficientBalance:
        pass
    async with services.database.sessions() as session:
        balance = await wallet.summary(session, principal.account_id)
    amount, clamped, headers = admission.clamp_to_balance(
        model, balance.balance_micros, minimum, input_tokens, max_tokens, media
    )
    return (
        await _try_hold(services, principal, amount, minimum, request_id),
        amount,
        clamped,
        headers,
    )


async def _try_hold(
    services: AppServices, principal: Principal, amount: int, minimum: int, request_id: str
) -> uuid.UUID:
    return await services.database.run_write(
        lambda conn: ledger.hold(
            conn,
            account_id=principal.account_id,
            amount_micros=amount,
            ref=request_id,
            minimum_balance=minimum,
        )
    )


def open_stream(call: PreparedCall, accumulator: Accumulator) -> AsyncIterator[StreamEvent]:
    """The provider's events, each recorded in `accumulator` on the way through."""

    async def recorded() -> AsyncIterator[StreamEvent]:
        async for event in call.provider.stream(call.upstream):
            accumulator.add(event)
            yield event

    return recorded()


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
    charge = min(cost, call.admission.hold_micros) if call.hold_id is not None else 0
    call.input_tokens, call.output_tokens, call.estimated = input_tokens, output_tokens, estimated
    call.cost_micros = charge if call.model.priced else None
    elapsed = time.perf_counter() - call.started
    first = accumulator.first_token_at
    call.services.settler.submit(
        Settlement(
            hold_id=call.hold_id,
            cost_micros=charge,
            log={
                "request_id": call.request_id,
                "account_id": call.principal.account_id,
                "key_id": call.principal.key_id,
                "gateway_id": call.gateway_id,
                "model": call.model.id,
                "provider": call.model.provider,
                "upstream_model": call.model.upstream_model,
                "byok": call.model.byok,
                "stream": call.request.stream,
                "status": status,
                "error_code": error_code,
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "cached_input_tokens": cached,
                "cost_micros": call.cost_micros,
                "estimated": estimated,
                "latency_ms": int(elapsed * 1000),
                "ttft_ms": int((first - call.started) * 1000) if first else None,
                "created_at": utcnow(),
            },
        )
    )


def _usage(call: PreparedCall, accumulator: Accumulator) -> tuple[int, int, int, bool]:
    usage = accumulator.usage
    if usage is not None and (usage.input_tokens or usage.output_tokens):
        return usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, False
    if not accumulator.produced_output and accumulator.usage is None:
        return 0, 0, 0, False  # nothing generated: nothing billed
    # No usage from upstream: count locally and say so.
    return call.input_tokens, estimate_output_tokens(accumulator.generated_text()), 0, True
