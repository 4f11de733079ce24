"""Gateway moderation: `rules` (keywords and regexes, case-insensitive, Unicode-normalised) and
`openai` (the moderation endpoint, through an operator or the account's own credential).

A moderation service that cannot answer (no connection, a timeout, an HTTP error, a body that is
not a moderation result) fails the call with a 502 `moderation_unavailable`: a call that was to
be moderated is never served unmoderated.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from aivax.catalog import repository as catalog_repository
from aivax.errors import AppError
from aivax.gateways.deps import ModerationServices
from aivax.gateways.schemas import GatewayConfig, Moderation
from aivax.inference.extensions import CallModerator, CallView
from aivax.models import ProviderCredential
from aivax.providers.base import UpstreamError

OPENAI_MODERATION_MODEL = "omni-moderation-latest"


def normalize(text: str) -> str:
    """NFKC folds look-alike forms (full-width letters, ligatures); casefold ignores case."""
    return unicodedata.normalize("NFKC", text).casefold()


class ContentBlocked(UpstreamError):
    """Raised like an upstream failure so streams end with an SSE error event."""

    def __init__(self, where: str) -> None:
        super().__init__(
            f"The {where} was blocked by this gateway's content policy.",
            status=400,
            provider="moderation",
            code="content_policy_violation",
        )


class ModerationUnavailable(AppError):
    """The moderation service failed before the call started (HTTP 502, OpenAI envelope)."""

    status = 502
    type = "api_error"
    code = "moderation_unavailable"


def _unavailable(reason: str, *, hint: str = "retry shortly") -> UpstreamError:
    return UpstreamError(
        f"The moderation service could not check this call ({reason}); {hint}.",
        status=502,
        provider="moderation",
        code="moderation_unavailable",
    )


async def find_credential(
    session: AsyncSession, account_id: uuid.UUID, name: str
) -> ProviderCredential | None:
    """The account's own credential `name`, else the operator's; never another account's."""
    return await catalog_repository.get_credential_by_name(
        session, account_id, name
    ) or await catalog_repository.get_credential_by_name(session, None, name)


def _flagged(body: Any) -> str | None:
    """What an OpenAI moderation result flags, or None; a body of another shape raises."""
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise _unavailable("its answer is not a moderation result")
    flagged = [
        name
        for result in results
        if result.get("flagged")
        for name, hit in (result.get("categories") or {}).items()
        if hit
    ]
    if any(result.get("flagged") for result in results):
        return "openai:" + ",".join(sorted(flagged)) if flagged else "openai"
    return None


@dataclass
class Moderator:
    settings: Moderation
    services: ModerationServices
    account_id: uuid.UUID

    def __post_init__(self) -> None:
        self.keywords = [normalize(word) for word in self.settings.keywords if word.strip()]
        self.patterns = [re.compile(p, re.IGNORECASE) for p in self.settings.patterns]

    async def trips(self, text: str) -> str | None:
        """What tripped (e.g. 'keyword'), or None."""
        if not text.strip():
            return None
        if self.settings.provider == "openai":
            return await self._openai(text)
        folded = normalize(text)
        if any(word in folded for word in self.keywords):
            return "keyword"
        if any(pattern.search(folded) for pattern in self.patterns):
            return "pattern"
        return None

    async def check_input(self, text: str) -> str | None:
        """`trips` for the caller's input, before anything is sent or streamed: a service that
        cannot answer is a 502 `moderation_unavailable`."""
        try:
            return await self.trips(text)
        except UpstreamError as exc:
            if exc.code != "moderation_unavailable":
                raise
            raise ModerationUnavailable(exc.message) from exc

    async def _openai(self, text: str) -> str | None:
        base_url, api_key, account_owned = await self._credential()
        # An account's own credential has an account-supplied URL: it goes through the SSRF
        # guard like every BYOK call.
        client = self.services.registry.client(base_url, guarded=account_owned)
        try:
            response = await client.post(
                base_url.rstrip("/") + "/moderations",
                json={"model": OPENAI_MODERATION_MODEL, "input": text},
                headers={"Authorization": f"Bearer {api_key}"},
                timeout=30,
            )
        except httpx.TimeoutException as exc:
            raise _unavailable("it did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise _unavailable(f"it cannot be reached: {type(exc).__name__}") from exc
        if response.status_code >= 400:
            raise _unavailable(f"it answered HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError as exc:  # JSONDecodeError, or a body that is not UTF-8
            raise _unavailable("its answer is not JSON") from exc
        return _flagged(body)

    async def _credential(self) -> tuple[str, str, bool]:
        name = self.settings.credential or ""
        async with self.services.database.sessions() as session:
            credential = await find_credential(session, self.account_id, name)
        if credential is None:  # deleted since the gateway was saved
            raise _unavailable(
                f"the credential {name!r} no longer exists",
                hint="name another in the gateway's `moderation.credential`",
            )
        return (
            credential.base_url,
            self.services.secret_box.decrypt(credential.api_key_encrypted),
            credential.account_id is not None,
        )


def caller_text(messages: list[dict[str, Any]]) -> str:
    """What the caller wrote: user and tool messages (not the gateway's own instructions)."""
    parts: list[str] = []
    for message in messages:
        if message["role"] not in ("user", "tool"):
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [part["text"] for part in content if part.get("type") == "text"]
    return "\n".join(parts)


class InputBlocked(AppError):
    status = 400
    code = "content_policy_violation"


@dataclass
class CallModeration:
    """A gateway's moderation as the kernel asks for it: input before the call, output as it
    grows (every character for rules, every few hundred for the moderation endpoint)."""

    moderator: Moderator

    @property
    def output_step(self) -> int:
        settings = self.moderator.settings
        if not settings.output:
            return 0
        return 400 if settings.provider == "openai" else 1

    async def check_input(self, messages: list[dict[str, Any]]) -> str | None:
        settings = self.moderator.settings
        if not settings.input:
            return None
        tripped = await self.moderator.check_input(caller_text(messages))
        if tripped is not None and settings.action == "block":
            raise InputBlocked(
                "The input was blocked by this gateway's content policy.", param="messages"
            )
        return tripped

    async def check_output(self, text: str) -> str | None:
        tripped = await self.moderator.trips(text)
        if tripped is not None and self.moderator.settings.action == "block":
            raise ContentBlocked("output")
        return tripped


class GatewayModeration:
    """The kernel's moderation provider: a moderator for calls through a gateway that has a
    `moderation` section."""

    def __init__(self, services: ModerationServices) -> None:
        self.services = services

    def moderator_for(self, call: CallView) -> CallModerator | None:
        config = call.gateway.settings if call.gateway is not None else None
        if not isinstance(config, GatewayConfig) or config.moderation is None:
            return None
        account_id = call.caller.principal.account_id
        return CallModeration(Moderator(config.moderation, self.services, account_id))
