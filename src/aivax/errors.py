"""One error model: `AppError` subclasses carry their HTTP status and render as the OpenAI
error envelope `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from typing import Any, ClassVar


class AppError(Exception):
    status: ClassVar[int] = 400
    type: ClassVar[str] = "invalid_request_error"
    code: ClassVar[str | None] = None
    # Refusals caused by the wallet or a plan limit tell SDKs not to retry.
    should_retry: ClassVar[bool | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.instance_code = code
        self.headers = dict(headers or {})

    def envelope(self) -> dict[str, Any]:
        return error_envelope(
            self.message, type_=self.type, code=self.instance_code or self.code, param=self.param
        )

    def response_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.should_retry is not None:
            headers["x-should-retry"] = "true" if self.should_retry else "false"
        return headers


def error_envelope(
    message: str, *, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class BadRequest(AppError):
    status = 400
    code = "invalid_request"


class Unauthorized(AppError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(AppError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(AppError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class Conflict(AppError):
    status = 409
    type = "conflict_error"
    code = "conflict"


class PayloadTooLarge(AppError):
    status = 413
    code = "request_too_large"


class PaymentRequired(AppError):
    status = 402
    type = "insufficient_quota"
    code = "insufficient_balance"
    should_retry = False


class ServiceUnavailable(AppError):
    status = 503
    type = "server_error"
    code = "service_unavailable"
