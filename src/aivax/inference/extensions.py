"""The kernel's extension points. Features implement these Protocols and are registered on
`Kernel.extensions` when the app is built (`services.py`), so the kernel never imports them.

- `GatewayResolver`: a model name that names a gateway → the composed request and its policies.
- `Augmenter`: adds context before the call (RAG retrieval; memory recall later).
- `ToolProvider`: server-side tools the model may call; the execute step's loop runs them.
- `Hook`: sees each call as it starts (`request`) and as it ends (`response`).
- `ModerationProvider`: a moderator for the call's input and output.
- `OutputProcessor`: shapes and checks the output (structured output: validate, heal, re-ask).
- `ModelListing`: more models a key may call, for `GET /v1/models` (gateways).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from aivax.catalog.service import ResolvedModel
from aivax.errors import AppError
from aivax.inference.caller import Caller
from aivax.inference.schemas import ChatCompletionRequest
from aivax.inference.steps import Steps
from aivax.keys.service import Principal

if TYPE_CHECKING:
    from aivax.inference.events import CallResult


class RoutingPolicy(Protocol):
    """Retries and fallbacks of a gateway call."""

    @property
    def retries(self) -> int: ...
    @property
    def backoff_ms(self) -> int: ...
    @property
    def timeout_seconds(self) -> float: ...
    @property
    def fallback_on(self) -> Sequence[str]: ...


@dataclass(frozen=True, slots=True)
class ComposedGateway:
    """A gateway call as the kernel runs it. `settings` is the gateway's own configuration,
    for the plug-ins that know its shape (augmenters, moderation, output processors)."""

    id: uuid.UUID
    request: ChatCompletionRequest
    settings: object
    routing: RoutingPolicy | None = None
    fallbacks: Sequence[str] = ()
    context_limit: int | None = None
    truncation: str = "error"


@dataclass(frozen=True, slots=True)
class CallView:
    """What a plug-in sees of a call: who, which model, through which gateway, the request as
    composed so far, and the steps it is numbered in."""

    caller: Caller
    request: ChatCompletionRequest
    model: ResolvedModel
    steps: Steps
    gateway: ComposedGateway | None = None


@dataclass(frozen=True, slots=True)
class Augmentation:
    request: ChatCompletionRequest
    report: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ToolDefinition:
    name: str
    description: str
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolResult:
    content: str
    is_error: bool = False


class GatewayResolver(Protocol):
    async def resolve(
        self, caller: Caller, request: ChatCompletionRequest
    ) -> ComposedGateway | None: ...


class Augmenter(Protocol):
    async def augment(self, call: CallView) -> Augmentation | None: ...


class ToolProvider(Protocol):
    async def list_tools(self, call: CallView) -> list[ToolDefinition]: ...
    async def execute(self, call: CallView, tool_call: ToolCall) -> ToolResult: ...


class Hook(Protocol):
    async def request(self, call: CallView) -> None: ...
    async def response(self, call: CallView, result: CallResult) -> None: ...


class CallModerator(Protocol):
    @property
    def output_step(self) -> int:
        """Characters of new output between checks; 0: the output is not moderated."""
        ...

    async def check_input(self, messages: list[dict[str, Any]]) -> str | None:
        """What tripped in the caller's input (a flag), or None; raises to block."""
        ...

    async def check_output(self, text: str) -> str | None:
        """What tripped in the output so far (a flag), or None; raises to block."""
        ...


class ModerationProvider(Protocol):
    def moderator_for(self, call: CallView) -> CallModerator | None: ...


class CheckedOutput(Protocol):
    @property
    def valid(self) -> bool: ...
    @property
    def document(self) -> Any: ...
    @property
    def steps(self) -> list[str]: ...
    @property
    def repaired(self) -> bool: ...
    @property
    def errors(self) -> list[str]: ...
    @property
    def raw(self) -> str: ...


class OutputPlan(Protocol):
    @property
    def max_attempts(self) -> int: ...

    def check(self, text: str) -> CheckedOutput: ...
    def reask(
        self, messages: list[dict[str, Any]], checked: CheckedOutput
    ) -> list[dict[str, Any]]: ...
    def failure(self, checked: CheckedOutput) -> AppError: ...
    def report(self, checked: CheckedOutput, attempts: int) -> dict[str, Any]: ...


class OutputProcessor(Protocol):
    def prepare(self, call: CallView, body: dict[str, Any]) -> OutputPlan | None:
        """Refuse what cannot be enforced, shape `body` (in place) and return the plan the
        output is checked against, or None."""
        ...


class ModelListing(Protocol):
    async def list_models(
        self, session: AsyncSession, principal: Principal
    ) -> list[dict[str, Any]]:
        """The `GET /v1/models` entries this plug-in adds for `principal` (public keys: only
        what a public key may call)."""
        ...


@dataclass
class Extensions:
    gateways: GatewayResolver | None = None
    augmenters: list[Augmenter] = field(default_factory=list)
    tools: list[ToolProvider] = field(default_factory=list)
    hooks: list[Hook] = field(default_factory=list)
    moderation: list[ModerationProvider] = field(default_factory=list)
    output: list[OutputProcessor] = field(default_factory=list)
    listings: list[ModelListing] = field(default_factory=list)
