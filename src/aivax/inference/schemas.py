"""The OpenAI chat-completions request, validated strictly: an unknown field or content part is
a 400 naming it, a value of the wrong JSON type is a 400 naming it (never coerced), and a
parameter AIVAX cannot honour is refused rather than dropped."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator

from aivax.kit.jsonlimits import JsonObject, JsonTooDeep, loads_limited, too_deep_error
from aivax.kit.schemas import RequestBody


class Strict(RequestBody):
    """Every part of the request: unknown fields refused, JSON types never coerced."""


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImageURL(Strict):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(Strict):
    data: str = Field(min_length=1)
    format: Literal["wav", "mp3"]


class AudioPart(Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FileData(Strict):
    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None


class FilePart(Strict):
    type: Literal["file"]
    file: FileData


UserPart = Annotated[TextPart | ImagePart | AudioPart | FilePart, Field(discriminator="type")]
TextContent = str | list[TextPart]


class SystemMessage(Strict):
    role: Literal["system"]
    content: TextContent
    name: str | None = None


class DeveloperMessage(Strict):
    role: Literal["developer"]
    content: TextContent
    name: str | None = None


class UserMessage(Strict):
    role: Literal["user"]
    content: str | Annotated[list[UserPart], Field(min_length=1)]
    name: str | None = None


class FunctionCall(Strict):
    name: str = Field(min_length=1)
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _json_arguments(cls, value: str) -> str:
        try:
            loads_limited(value or "{}")
        except JsonTooDeep:
            raise too_deep_error() from None
        except ValueError as exc:
            raise ValueError(f"tool call arguments must be a JSON string ({exc})") from None
        return value


class ToolCall(Strict):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(Strict):
    role: Literal["assistant"]
    content: TextContent | None = None
    tool_calls: list[ToolCall] | None = None
    name: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None


class ToolMessage(Strict):
    role: Literal["tool"]
    content: TextContent
    tool_call_id: str = Field(min_length=1)


Message = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage,
    Field(discriminator="role"),
]


class FunctionDefinition(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: JsonObject | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: JsonObject | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class AivaxOptions(Strict):
    """AIVAX extensions (`aivax` field); later features add options here."""

    variables: dict[str, str | int | float | bool | None] | None = Field(
        default=None, max_length=100, description="Values for the gateway's templates."
    )
    include_retrieval: bool = Field(
        default=False,
        description="Add what the gateway's collections retrieved (with scores) to the response.",
    )


class ChatCompletionRequest(Strict):
    model: str = Field(min_length=1, max_length=300)
    messages: Annotated[list[Message], Field(min_length=1, max_length=10_000)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    # Accepted only at the values AIVAX can honour; anything else is refused by name.
    n: int | None = None
    logprobs: bool | None = None
    store: bool | None = None
    aivax: AivaxOptions | None = None
    # AIVAX structured output (see aivax.structured.pipeline).
    response_schema: JsonObject | None = None
    json_only: bool = False

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def upstream_body(self) -> dict[str, Any]:
        """The OpenAI-shaped body for an adapter (model, stream and limits are set by it)."""
        body = self.model_dump(
            exclude_none=True,
            by_alias=True,
            exclude={
                "model",
                "stream",
                "stream_options",
                "max_tokens",
                "max_completion_tokens",
                "n",
                "logprobs",
                "store",
                "aivax",
                "response_schema",
                "json_only",
            },
        )
        return body
