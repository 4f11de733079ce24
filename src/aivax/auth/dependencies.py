"""Endpoint dependencies: what a route needs from the caller, as typed aliases.

AnyKey      any valid key of an active account (public keys: origin checked)
PrivateCaller  a private key (no database read)
PrivateKey  a private key; gives the account row loaded in the request's session
Operator    an operator admin token (`/admin`)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from aivax.auth import operator_tokens
from aivax.auth.middleware import presented_token
from aivax.db import SessionDep
from aivax.errors import AppError, Forbidden, Unauthorized
from aivax.keys.schemas import KeyKind
from aivax.keys.service import Principal
from aivax.models import Account, AccountStatus, OperatorToken
from aivax.services import AppServices

MISSING_KEY_MESSAGE = (
    "You didn't provide an API key. Send it as 'Authorization: Bearer aivax_sk_…' "
    "(or in the 'x-api-key' header)."
)


# Dependencies are `async def` on purpose: FastAPI runs plain `def` dependencies in a worker
# thread, which costs a thread hop per dependency on every request.
async def services_of(request: Request) -> AppServices:
    services: AppServices = request.app.state.services
    return services


Services = Annotated[AppServices, Depends(services_of)]


def admitted_principal(state: dict[str, object], origin: str | None) -> Principal:
    """The caller of this request, as `AccountKeyMiddleware` left it in the scope's state, if
    it may make calls at all (any key of an active account; public keys from their origins)."""
    error = state.get("auth_error")
    if isinstance(error, AppError):
        raise error
    principal = state.get("principal")
    if not isinstance(principal, Principal):
        raise Unauthorized(MISSING_KEY_MESSAGE, code="missing_api_key")
    if principal.account_status != AccountStatus.ACTIVE.value:
        raise Forbidden(
            "This account is suspended. Contact the operator of this AIVAX installation.",
            code="account_suspended",
        )
    if (
        principal.key_kind is KeyKind.PUBLIC
        and principal.allowed_origins
        and origin not in principal.allowed_origins
    ):
        raise Forbidden(
            f"Origin {origin!r} is not allowed for this public key.", code="origin_not_allowed"
        )
    return principal


async def require_any_key(request: Request) -> Principal:
    return admitted_principal(request.scope.setdefault("state", {}), request.headers.get("origin"))


AnyKey = Annotated[Principal, Depends(require_any_key)]


@dataclass(frozen=True, slots=True)
class AccountContext:
    principal: Principal
    account: Account


def private_only(principal: Principal) -> Principal:
    """The rule for every surface but public gateways: a public key selects no model,
    collection, credential or tool, so it is refused before anything is read."""
    if principal.key_kind is not KeyKind.PRIVATE:
        raise Forbidden(
            "This endpoint needs a private key (aivax_sk_…); public keys (aivax_pk_…) may only "
            "call public gateways.",
            code="private_key_required",
        )
    return principal


async def require_private_principal(principal: AnyKey) -> Principal:
    return private_only(principal)


PrivateCaller = Annotated[Principal, Depends(require_private_principal)]


async def require_private_key(principal: AnyKey, session: SessionDep) -> AccountContext:
    private_only(principal)
    account = await session.get(Account, principal.account_id)
    if account is None:  # deleted between the middleware's lookup and now
        raise Unauthorized("Incorrect API key provided.")
    return AccountContext(principal=principal, account=account)


PrivateKey = Annotated[AccountContext, Depends(require_private_key)]


async def require_operator(
    request: Request, session: SessionDep, services: Services
) -> OperatorToken:
    token = presented_token(request.scope["headers"])
    if token is None:
        raise Unauthorized(
            "Operator endpoints need the admin token: 'Authorization: Bearer aivax_admin_…'.",
            code="missing_admin_token",
        )
    return await operator_tokens.authenticate(session, token, secret=services.secret)


Operator = Annotated[OperatorToken, Depends(require_operator)]
