"""One model request of a prepared call: the provider with the gateway's routing (retries,
fallbacks), output moderation as the text grows, and the settlement — usage → cost → the
meter settles the reservation and writes the request-log row (this request's step)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from aivax.catalog.service import ResolvedModel
from aivax.inference import admission
from aivax.inference.accumulate import Accumulator, is_content
from aivax.inference.errors import failure_kind
from aivax.inference.extensions import RoutingPolicy
from aivax.inference.prepare import Attempt, PreparedCall
from aivax.inference.tokens import estimate_output_tokens
from aivax.providers.base import StreamEvent, UpstreamError
from aivax.wallet.meter import log_row

logger = logging.getLogger("aivax.inference")


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
                        await _backoff(call.routing, number)
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


async def _backoff(routing: RoutingPolicy | None, number: int) -> None:
    assert routing is not None  # noqa: S101 - retries need routing
    await asyncio.sleep(routing.backoff_ms / 1000 * 2**number)


class OutputWatch:
    """Output moderation on the text as it grows: checked every `output_step` characters (one
    for rules, a few hundred for a moderation endpoint), and once at the end."""

    def __init__(self, call: PreparedCall, accumulator: Accumulator) -> None:
        self.call = call
        self.accumulator = accumulator
        self.step = call.moderator.output_step if call.moderator is not None else 0
        self.enabled = self.step > 0
        self.checked = 0

    async def check(self, *, final: bool) -> None:
        if not self.enabled or self.call.moderator is None:
            return
        text = "".join(self.accumulator.text)
        if len(text) == self.checked or (not final and len(text) - self.checked < self.step):
            return
        self.checked = len(text)
        tripped = await self.call.moderator.check_output(text)  # raises to block
        if tripped is None:
            return
        flag = f"output:{tripped}"
        if flag not in self.call.flags:
            self.call.flags.append(flag)
        self.enabled = False  # flagged once is enough


def _reroutable(routing: RoutingPolicy | None, error: UpstreamError) -> bool:
    kind = failure_kind(error)
    return routing is not None and kind is not None and kind in routing.fallback_on


def _log_failed_attempt(call: PreparedCall, model: ResolvedModel, error: UpstreamError) -> None:
    logger.info("attempt on %s failed (%s %s); rerouting", model.id, error.status, error.code)
    log = _log_values(
        call, model=model, status=error.status, error_code=error.code, input_tokens=0, cost=0
    )
    call.kernel.meter.record(log)


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
    principal = call.caller.principal
    return log_row(
        request_id=call.steps.request_id,
        step=call.steps.next(),
        account_id=principal.account_id,
        key_id=principal.key_id,
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
    call.kernel.meter.settle(call.reservation, charge, log)


def _usage(call: PreparedCall, accumulator: Accumulator) -> tuple[int, int, int, bool]:
    usage = accumulator.usage
    if usage is not None and (usage.input_tokens or usage.output_tokens):
        return usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, False
    if not accumulator.produced_output and accumulator.usage is None:
        return 0, 0, 0, False  # nothing generated: nothing billed
    # No usage from upstream: count locally and say so.
    return call.input_tokens, estimate_output_tokens(accumulator.generated_text()), 0, True
