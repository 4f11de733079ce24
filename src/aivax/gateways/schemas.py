"""Gateway configuration: one validated section per concern, unknown keys refused everywhere.

Sections that later features execute (collections, tools, skills, JSON schema, worker, chat)
are defined here already, so that a configuration is validated whole and public-key calls can
strip every server-side tool surface.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from aivax.keys.schemas import normalize_origin
from aivax.kit.schemas import LaxUUID

SLUG_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}[a-z0-9]$|^[a-z0-9]$"
SamplingName = Literal[
    "temperature", "top_p", "max_tokens", "presence_penalty", "frequency_penalty", "stop", "seed"
]
MAX_TEMPLATE_CHARS = 50_000


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Sampling(Section):
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stop: list[str] | None = Field(default=None, max_length=4)
    seed: int | None = None


class PromptTemplate(Section):
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1, max_length=MAX_TEMPLATE_CHARS)


class ContextSettings(Section):
    limit_tokens: int | None = Field(default=None, ge=1, description="Prompt budget in tokens.")
    truncation: Literal["error", "drop_oldest", "middle_out"] = "error"


class Routing(Section):
    retries: int = Field(default=1, ge=0, le=5)
    backoff_ms: int = Field(default=250, ge=0, le=30_000)
    timeout_seconds: float = Field(default=120, gt=0, le=600)
    fallback_on: list[Literal["429", "5xx", "timeout", "disconnect"]] = Field(
        default_factory=lambda: ["429", "5xx", "timeout", "disconnect"]  # type: ignore[arg-type]
    )


class Moderation(Section):
    input: bool = True
    output: bool = False
    provider: Literal["rules", "openai"] = "rules"
    keywords: list[str] = Field(default_factory=list, max_length=1_000)
    patterns: list[str] = Field(default_factory=list, max_length=200)
    action: Literal["block", "flag"] = "block"
    credential: str | None = Field(default=None, description="For provider 'openai'.")

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for index, pattern in enumerate(patterns):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"pattern {index} ({pattern!r}) is not a valid regex: {exc}"
                ) from None
        return patterns


class PublicAccess(Section):
    enabled: bool = False
    allowed_origins: list[str] = Field(default_factory=list, max_length=50)
    # Public-key calls search the gateway's collections only when the owner opts in: the
    # passages then reach the model, never the caller (`aivax.include_retrieval` is refused).
    retrieval: bool = False

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, values: list[str]) -> list[str]:
        return sorted({normalize_origin(value) for value in values})


class Collections(Section):
    ids: list[LaxUUID] = Field(default_factory=list, max_length=20)
    strategy: Literal["always", "tool", "rewrite"] = "always"
    top_k: int = Field(default=5, ge=1, le=50)
    min_score: float = Field(default=0.0, ge=0, le=1)
    context_tokens: int = Field(default=2_000, ge=1)


class Tools(Section):
    builtin: list[str] = Field(default_factory=list)
    protocol_functions: list[dict[str, Any]] = Field(default_factory=list)
    mcp_sources: list[dict[str, Any]] = Field(default_factory=list)
    bash: bool = False

    @property
    def any(self) -> bool:
        return bool(self.builtin or self.protocol_functions or self.mcp_sources or self.bash)


class JsonSchemaSettings(Section):
    schema_: dict[str, Any] = Field(alias="schema")
    healing: bool = True
    max_attempts: int = Field(default=2, ge=0, le=5)

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class WorkerSettings(Section):
    worker_id: LaxUUID
    events: list[Literal["request", "response"]] = Field(default_factory=lambda: ["request"])  # type: ignore[arg-type]


class ChatBehaviour(Section):
    welcome_message: str | None = Field(default=None, max_length=4_000)
    history_messages: int = Field(default=20, ge=0, le=500)


class GatewayConfig(Section):
    model: str = Field(min_length=1, max_length=300, description="Integrated or BYOK model id.")
    fallbacks: list[str] = Field(default_factory=list, max_length=5)
    system_instruction: str = Field(default="", max_length=MAX_TEMPLATE_CHARS)
    timezone: str = Field(default="UTC", description="For the `now` template variable.")
    prompt_templates: list[PromptTemplate] = Field(default_factory=list, max_length=50)
    caller_system_messages: Literal["keep", "refuse"] = "keep"
    sampling: Sampling = Field(default_factory=Sampling)
    overridable: list[SamplingName] = Field(
        default_factory=lambda: list(SamplingName.__args__),  # type: ignore[attr-defined]
        description="Sampling parameters a caller may set; others are refused by name.",
    )
    context: ContextSettings = Field(default_factory=ContextSettings)
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    routing: Routing = Field(default_factory=Routing)
    moderation: Moderation | None = None
    public: PublicAccess = Field(default_factory=PublicAccess)
    collections: Collections | None = None
    tools: Tools = Field(default_factory=Tools)
    skills: list[str] = Field(default_factory=list, max_length=50)
    json_schema: JsonSchemaSettings | None = None
    worker: WorkerSettings | None = None
    chat: ChatBehaviour | None = None


Slug = Annotated[str, Field(pattern=SLUG_PATTERN, description="Lower case, digits, dashes.")]


class GatewayCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    slug: Slug
    name: str = Field(default="", max_length=200)
    description: str = Field(default="", max_length=2_000)
    config: GatewayConfig


class GatewayUpdate(BaseModel):
    """Top-level fields replace; `config` sections given replace those sections only."""

    model_config = ConfigDict(extra="forbid", strict=True)

    slug: Slug | None = None
    name: str | None = Field(default=None, max_length=200)
    description: str | None = Field(default=None, max_length=2_000)
    config: dict[str, Any] | None = None


class GatewayRead(BaseModel):
    object: Literal["gateway"] = "gateway"
    id: uuid.UUID
    slug: str
    name: str
    description: str
    version: int
    config: GatewayConfig
    created_at: datetime
    updated_at: datetime


class GatewayVersionRead(BaseModel):
    object: Literal["gateway_version"] = "gateway_version"
    version: int
    config: GatewayConfig
    created_at: datetime
