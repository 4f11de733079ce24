"""What a caller sees when an upstream fails, and which failures a gateway may reroute."""

from __future__ import annotations

import logging

from aivax.catalog.service import ResolvedModel
from aivax.errors import AppError
from aivax.providers.base import UpstreamError

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
