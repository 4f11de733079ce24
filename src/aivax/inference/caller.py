"""Who a call is made for. Every entry point names its caller; admission and the public-key
rules read it, and nothing else about the entry point reaches the kernel."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from aivax.inference.steps import Steps
from aivax.keys.schemas import KeyKind
from aivax.keys.service import Principal

CallerKind = Literal["api_key", "chat_session", "batch_item", "schedule", "operator", "internal"]


@dataclass(frozen=True, slots=True)
class Caller:
    """`principal`: the account, its plan and the key the call is made with (a batch item,
    a schedule or a chat session acts with the key or principal that created it).
    `parent`: for an `internal` call (a RAG rewrite or decision, a reranking judge), the
    request it is a step of; its request-log row is the next step of that request.
    `ids`: the entry point's own references (batch and item ids, a conversation), for logs."""

    kind: CallerKind
    principal: Principal
    request_id: str
    origin: str | None = None
    parent: Steps | None = None
    ids: dict[str, str] = field(default_factory=dict)

    @classmethod
    def api_key(cls, principal: Principal, request_id: str, origin: str | None) -> Caller:
        return cls("api_key", principal, request_id, origin)

    @classmethod
    def internal(cls, principal: Principal, request_id: str, parent: Steps | None) -> Caller:
        return cls("internal", principal, request_id, parent=parent)

    @property
    def public(self) -> bool:
        return self.principal.key_kind is KeyKind.PUBLIC

    @property
    def is_internal(self) -> bool:
        """A call AIVAX makes itself: it names a model, never a gateway, and a public key may
        make it (the gateway it serves already passed the public-key rules)."""
        return self.kind == "internal"

    def steps(self) -> Steps:
        """The request this call's model requests are numbered in."""
        return self.parent if self.parent is not None else Steps(self.request_id)
