"""Admission, in the documented order; each refusal is its own error code.

1 the plan allows the model (403)   2 rate limits (429)   3 context cap / window (400)
4 tools and modalities (400)        5 balance (402) and storage quota (403)
Then the hold: the worst-case cost is reserved before any upstream byte; if the balance cannot
cover the requested `max_tokens`, `max_tokens` is clamped to what it affords instead.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

from aivax.catalog.service import ResolvedModel
from aivax.errors import AppError, BadRequest, Forbidden, PaymentRequired
from aivax.inference.ratelimit import Decision, RateLimiter
from aivax.inference.schemas import ChatCompletionRequest
from aivax.keys.schemas import KeyKind
from aivax.keys.service import Principal
from aivax.kit.money import micros_to_usd
from aivax.plans.schemas import PlanLimits

DEFAULT_BYOK_MAX_TOKENS = 4_096


class ModelNotAllowed(Forbidden):
    code = "model_not_allowed"
    should_retry = False


class RateLimited(AppError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    should_retry = False


class ContextTooLong(BadRequest):
    code = "context_length_exceeded"


class UnsupportedParameter(BadRequest):
    code = "unsupported_parameter"


class UnsupportedContent(BadRequest):
    code = "unsupported_content"


class BelowMinimumBalance(PaymentRequired):
    code = "insufficient_balance"


class StorageQuotaExceeded(Forbidden):
    code = "storage_quota_exceeded"
    should_retry = False


def cost_micros(model: ResolvedModel, input_tokens: int, output_tokens: int) -> int | None:
    if not model.priced:
        return None
    assert model.input_price_per_m is not None  # noqa: S101 - priced
    assert model.output_price_per_m is not None  # noqa: S101 - priced
    total = input_tokens * model.input_price_per_m + output_tokens * model.output_price_per_m
    return math.ceil(total / 1_000_000)


@dataclass
class Admission:
    input_tokens: int
    max_tokens: int
    hold_micros: int
    headers: dict[str, str] = field(default_factory=dict)


def check_parameters(request: ChatCompletionRequest) -> None:
    """Parameters AIVAX accepts only at the values it can honour."""
    if request.n not in (None, 1):
        raise UnsupportedParameter(
            f"'n' = {request.n} is not supported: AIVAX returns one choice; send n=1 or omit it.",
            param="n",
        )
    if request.logprobs:
        raise UnsupportedParameter("'logprobs' is not supported.", param="logprobs")
    if request.store:
        raise UnsupportedParameter(
            "'store' is not supported; AIVAX keeps its own request log.", param="store"
        )


def check_plan(
    principal: Principal,
    plan_id: str,
    limits: PlanLimits,
    model: ResolvedModel,
    *,
    via_gateway: bool = False,
) -> None:
    if principal.key_kind is KeyKind.PUBLIC and not via_gateway:
        raise ModelNotAllowed(
            "Public keys may only call public gateways, never a model directly.", param="model"
        )
    if model.byok:
        return
    allowed = any(fnmatch.fnmatchcase(model.id, pattern) for pattern in limits.models_allowed)
    if not allowed or (model.plans and plan_id not in model.plans):
        raise ModelNotAllowed(
            f"The {plan_id!r} plan does not include model {model.id!r}. Upgrade the plan or "
            "choose a model listed by GET /v1/models.",
            param="model",
        )


def rate_headers(kind: str, decision: Decision) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(decision.limit),
        f"x-ratelimit-remaining-{kind}": str(decision.remaining),
        f"x-ratelimit-reset-{kind}": f"{decision.reset_seconds:.3f}s",
    }


def refuse_rate(
    kind: str,
    decision: Decision,
    headers: dict[str, str],
    *,
    what: str | None = None,
    code: str | None = None,
) -> RateLimited:
    """429 for a refused `decision`; `kind` is "requests" or "tokens" (the header names)."""
    retry_after = max(1, math.ceil(decision.reset_seconds))
    what = what or ("requests" if kind == "requests" else "input tokens")
    return RateLimited(
        f"Rate limit reached: {decision.limit} {what} per minute for this plan. "
        f"Retry in {retry_after}s or upgrade the plan.",
        code=code or f"rate_limit_{kind}",
        headers={**headers, "retry-after": str(retry_after)},
    )


async def check_rate_limits(
    limiter: RateLimiter,
    principal: Principal,
    limits: PlanLimits,
    model: ResolvedModel,
    input_tokens: int,
) -> dict[str, str]:
    if model.byok:
        decision = await limiter.hit_requests(f"byok:{principal.account_id}", limits.byok_rpm)
        headers = rate_headers("requests", decision)
        if not decision.allowed:
            raise refuse_rate("requests", decision, headers)
        return headers
    scope = f"{principal.account_id}:{model.id}"
    decision = await limiter.hit_requests(f"rpm:{scope}", limits.integrated_rpm)
    headers = rate_headers("requests", decision)
    if not decision.allowed:
        raise refuse_rate("requests", decision, headers)
    tokens = await limiter.hit_tokens(f"tpm:{scope}", limits.integrated_input_tpm, input_tokens)
    headers |= rate_headers("tokens", tokens)
    if not tokens.allowed:
        raise refuse_rate("tokens", tokens, headers)
    return headers


def check_context(limits: PlanLimits, model: ResolvedModel, input_tokens: int) -> None:
    cap = limits.context_cap_tokens
    if cap is not None and input_tokens > cap:
        raise ContextTooLong(
            f"The prompt has {input_tokens} tokens; this plan allows at most {cap} per request. "
            "Shorten the conversation or upgrade the plan.",
            param="messages",
        )
    if model.context_window is not None and input_tokens >= model.context_window:
        raise ContextTooLong(
            f"The prompt has {input_tokens} tokens; model {model.id!r} has a context window of "
            f"{model.context_window} tokens.",
            param="messages",
        )


PART_MODALITY = {"image_url": "image", "input_audio": "audio", "file": "file"}


def media_in(body: dict[str, Any]) -> set[str]:
    found: set[str] = set()
    for message in body["messages"]:
        content = message.get("content")
        if isinstance(content, list):
            found |= {PART_MODALITY[p["type"]] for p in content if p["type"] in PART_MODALITY}
    return found


def check_capabilities(
    request: ChatCompletionRequest, model: ResolvedModel, media: set[str]
) -> None:
    missing = sorted(media - model.modalities)
    if missing:
        raise UnsupportedContent(
            f"Model {model.id!r} does not accept {', '.join(missing)} input; it accepts "
            f"{', '.join(sorted(model.modalities))}.",
            param="messages",
        )
    if request.tools and not model.supports_tools:
        raise UnsupportedParameter(f"Model {model.id!r} does not support tools.", param="tools")
    response_format = request.response_format
    if response_format and response_format.type != "text" and not model.supports_json_schema:
        raise UnsupportedParameter(
            f"Model {model.id!r} does not support response_format {response_format.type!r}.",
            param="response_format",
        )
    if model.provider == "anthropic":
        for name in ("seed", "presence_penalty", "frequency_penalty"):
            if getattr(request, name) is not None:
                raise UnsupportedParameter(
                    f"{name!r} is not supported by Anthropic models.", param=name
                )


def plan_output(
    request: ChatCompletionRequest, model: ResolvedModel, input_tokens: int
) -> tuple[int, bool]:
    """The output budget to hold for, and whether the upstream must be told."""
    requested = request.requested_max_tokens
    if model.max_output_tokens is None:  # BYOK: the upstream decides unless asked
        return requested or DEFAULT_BYOK_MAX_TOKENS, requested is not None
    ceiling = model.max_output_tokens
    if model.context_window is not None:
        ceiling = min(ceiling, model.context_window - input_tokens)
    if requested is not None and requested > ceiling:
        raise ContextTooLong(
            f"max_tokens {requested} is more than model {model.id!r} can produce here "
            f"({ceiling} tokens).",
            param="max_tokens",
        )
    return requested or ceiling, True


def check_storage(principal: Principal, limits: PlanLimits) -> None:
    if principal.storage_bytes_used > limits.storage_quota_bytes:
        raise StorageQuotaExceeded(
            "The account's storage quota is used up; delete documents or upgrade the plan."
        )


def clamp_to_balance(
    model: ResolvedModel,
    balance: int,
    minimum: int,
    input_tokens: int,
    max_tokens: int,
    media: set[str],
) -> tuple[int, int, dict[str, str]]:
    """After the worst case was refused: (hold amount, clamped max_tokens, headers), or 402."""
    if balance < max(minimum, 1):
        raise BelowMinimumBalance(
            f"Balance {micros_to_usd(balance)} USD is below the {micros_to_usd(minimum)} USD "
            f"minimum{' for image, audio or file input' if media else ''}. Top up the wallet.",
        )
    input_cost = cost_micros(model, input_tokens, 0) or 0
    per_token = model.output_price_per_m or 0
    affordable = (balance - input_cost) * 1_000_000 // per_token if per_token else max_tokens
    if affordable < 1 or input_cost > balance:
        raise BelowMinimumBalance(
            f"Balance {micros_to_usd(balance)} USD does not cover this prompt "
            f"({micros_to_usd(input_cost)} USD of input). Top up the wallet."
        )
    clamped = int(min(affordable, max_tokens))
    hold = cost_micros(model, input_tokens, clamped) or 0
    return hold, clamped, {"x-aivax-max-tokens-clamped": f"{max_tokens}->{clamped}"}
