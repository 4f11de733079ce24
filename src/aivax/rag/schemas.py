"""Request and response bodies of the collections API."""

from __future__ import annotations

import math
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationInfo,
    field_validator,
    model_validator,
)

from aivax.kit.schemas import LaxUUID

DEFAULT_EMBEDDING_MODEL = "aivax/minilm-l6-int8"
MAX_DOCUMENT_CHARS = 2_000_000
MAX_METADATA_BYTES = 8_192
SCALAR_OPERATORS = frozenset({"$eq", "$ne", "$gt", "$gte", "$lt", "$lte"})
LIST_OPERATORS = frozenset({"$in", "$nin"})
FILTER_OPERATORS = SCALAR_OPERATORS | LIST_OPERATORS
MAX_FILTER_KEYS = 32
MAX_FILTER_LIST = 100
MAX_FILTER_STRING = 1_000
# Numbers are compared as double-precision floats; an integer past 64 bits is refused (a huge
# one has no float at all).
INT64 = range(-(2**63), 2**63)
FILTER_GRAMMAR = (
    'A filter is {"key": value} or {"key": {"$op": operand, ...}}, all conditions holding: '
    "$eq $ne $gt $gte $lt $lte take a string, number or boolean; $in and $nin take a list of up "
    f"to {MAX_FILTER_LIST} of them, all strings, all numbers or all booleans; at most "
    f"{MAX_FILTER_KEYS} keys of letters, digits, '_' or '-'."
)

Scalar = str | int | float | bool


def _check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    import json

    if len(json.dumps(value)) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is larger than {MAX_METADATA_BYTES} bytes")
    return value


class CollectionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=2000)
    embedding_model: str = Field(
        default=DEFAULT_EMBEDDING_MODEL,
        max_length=300,
        description="An embedding model from GET /v1/models, or byok/<credential>/<model>.",
    )
    chunk_size: int | None = Field(
        default=None,
        ge=32,
        le=2048,
        description="Tokens per chunk (default: 80% of what the embedding model reads, at "
        "most 256 — longer chunks would be cut off by the model).",
    )
    chunk_overlap: int | None = Field(
        default=None, ge=0, le=512, description="Tokens of overlap (default: chunk_size / 8)."
    )
    metadata: dict[str, Any] = Field(default_factory=dict)

    _metadata = field_validator("metadata")(_check_metadata)

    @field_validator("chunk_overlap")
    @classmethod
    def _overlap_below_size(cls, value: int | None, info: ValidationInfo) -> int | None:
        size = info.data.get("chunk_size")
        if value is not None and size is not None and value * 2 > size:
            raise ValueError("chunk_overlap must be at most half of chunk_size")
        return value


class CollectionUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    embedding_model: str | None = Field(
        default=None, max_length=300, description="Changing it re-embeds every chunk."
    )
    metadata: dict[str, Any] | None = None

    _metadata = field_validator("metadata")(
        lambda value: _check_metadata(value) if value is not None else None
    )


class JobRead(BaseModel):
    object: Literal["job"] = "job"
    id: uuid.UUID
    kind: str
    status: str
    progress_done: int
    progress_total: int
    attempts: int
    error: str | None
    result: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class CollectionRead(BaseModel):
    object: Literal["collection"] = "collection"
    id: uuid.UUID
    name: str
    description: str
    embedding_model: str
    dimensions: int
    chunk_size: int
    chunk_overlap: int
    metadata: dict[str, Any]
    document_count: int
    chunk_count: int
    bytes: int
    reembedding: JobRead | None
    created_at: datetime
    updated_at: datetime


class DocumentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    text: str = Field(min_length=1, max_length=MAX_DOCUMENT_CHARS)
    content_type: Literal["text", "markdown", "html"] = "text"
    title: str = Field(default="", max_length=500)
    id: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Your own id: creating it again replaces the document (idempotent).",
    )
    metadata: dict[str, Any] = Field(default_factory=dict)

    _metadata = field_validator("metadata")(_check_metadata)


class DocumentUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    text: str | None = Field(default=None, min_length=1, max_length=MAX_DOCUMENT_CHARS)
    content_type: Literal["text", "markdown", "html"] | None = None
    title: str | None = Field(default=None, max_length=500)
    metadata: dict[str, Any] | None = None

    _metadata = field_validator("metadata")(
        lambda value: _check_metadata(value) if value is not None else None
    )


class ChunkRead(BaseModel):
    object: Literal["collection.chunk"] = "collection.chunk"
    id: int
    position: int
    heading_path: list[str]
    text: str
    token_count: int


class DocumentRead(BaseModel):
    object: Literal["collection.document"] = "collection.document"
    id: uuid.UUID
    collection_id: uuid.UUID
    external_id: str | None
    title: str
    content_type: str
    metadata: dict[str, Any]
    status: str
    error: str | None
    chunks_total: int
    chunks_done: int
    bytes: int
    content_hash: str
    created_at: datetime
    updated_at: datetime
    chunks: list[ChunkRead] | None = None
    text: str | None = None


class RerankSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["none", "endpoint", "model"] = "none"
    credential: str | None = Field(
        default=None,
        description="endpoint: the name of your credential whose base URL serves /rerank.",
    )
    model: str | None = Field(
        default=None,
        description="endpoint: the reranker model; model: a chat model that judges relevance.",
    )
    candidates: int = Field(default=20, ge=1, le=100, description="How many results to rerank.")

    @model_validator(mode="after")
    def _complete(self) -> RerankSpec:
        if self.type == "endpoint" and not (self.credential and self.model):
            raise ValueError("an 'endpoint' reranker needs 'credential' and 'model'")
        if self.type == "model" and not self.model:
            raise ValueError("a 'model' reranker needs 'model'")
        return self


class SearchRequest(BaseModel):
    # Strict per field: MCP tool calls build this model from their own typed settings.
    model_config = ConfigDict(extra="forbid")

    query: Annotated[str, Strict()] = Field(min_length=1, max_length=4000)
    top_k: Annotated[int, Strict()] = Field(default=5, ge=1, le=100)
    min_score: Annotated[float, Strict()] = Field(default=0.0, ge=0.0, le=1.0)
    mode: Literal["hybrid", "vector", "keyword"] = "hybrid"
    filter: dict[str, Any] | None = Field(
        default=None,
        description="Metadata filter: {'key': value} or {'key': {'$in': [...]}} "
        "($eq $ne $in $nin $gt $gte $lt $lte); all conditions must hold.",
    )
    rerank: RerankSpec | None = None
    group_by: Literal["chunk", "document"] = Field(
        default="chunk",
        description="'document': one result per document (its best chunk), its other "
        "matching chunks in `matches`, so top_k counts documents.",
    )

    @field_validator("filter")
    @classmethod
    def _valid_filter(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            check_filter(value)
        return value


class MultiSearchRequest(SearchRequest):
    collection_ids: list[LaxUUID] = Field(min_length=1, max_length=20)


class ChunkMatch(BaseModel):
    """Another chunk of a result's document that matched (group_by 'document')."""

    chunk_id: int
    position: int
    heading_path: list[str]
    text: str
    score: float


class SearchResult(BaseModel):
    object: Literal["collection.search_result"] = "collection.search_result"
    chunk_id: int
    collection_id: uuid.UUID
    document_id: uuid.UUID
    document_external_id: str | None
    document_title: str
    position: int
    heading_path: list[str]
    text: str
    metadata: dict[str, Any]
    score: float
    vector_score: float | None
    keyword_score: float | None
    rerank_score: float | None = None
    matches: list[ChunkMatch] | None = Field(
        default=None,
        description="group_by 'document': the document's other matching chunks, best first.",
    )


class SearchResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[SearchResult]
    mode: str
    usage: dict[str, int]


class FilterError(ValueError):
    """A filter outside the grammar; the message names the offending part, then the grammar."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem}. {FILTER_GRAMMAR}")


def check_filter(filter_: dict[str, Any]) -> None:
    """Hold a metadata filter to FILTER_GRAMMAR, so the SQL compiler only ever sees keys,
    known operators and bindable scalars (its depth is 3 by construction)."""
    if len(filter_) > MAX_FILTER_KEYS:
        raise FilterError(f"the filter has {len(filter_)} keys, more than {MAX_FILTER_KEYS}")
    for key, condition in filter_.items():
        _check_key(key)
        if not isinstance(condition, dict):
            _check_scalar(condition, f"filter[{key!r}]")
            continue
        if not condition:
            raise FilterError(f"filter[{key!r}] is an empty object: give at least one operator")
        for operator, operand in condition.items():
            where = f"filter[{key!r}][{operator!r}]"
            if operator in LIST_OPERATORS:
                _check_list(operand, where)
            elif operator in SCALAR_OPERATORS:
                _check_scalar(operand, where)
            else:
                raise FilterError(f"unknown filter operator {operator!r} for {key!r}")


def _check_key(key: str) -> None:
    if not key or len(key) > 100 or not key.replace("_", "").replace("-", "").isalnum():
        raise FilterError(f"filter key {key!r} must be 1-100 letters, digits, '_' or '-'")


def scalar_kind(value: Any) -> str | None:
    """'boolean', 'number' or 'string' for a filter scalar; None for anything else."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "string" if isinstance(value, str) else None


def _check_scalar(value: Any, where: str) -> str:
    kind = scalar_kind(value)
    if kind is None:
        raise FilterError(f"{where} must be a string, number or boolean, not {_json_type(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise FilterError(f"{where} must be a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and value not in INT64:
        raise FilterError(f"{where} is an integer outside the 64-bit range")
    if isinstance(value, str) and not _bindable(value):
        raise FilterError(
            f"{where} must be at most {MAX_FILTER_STRING} characters of valid text (no NUL)"
        )
    return kind


def _check_list(values: Any, where: str) -> None:
    if not isinstance(values, list):
        raise FilterError(f"{where} must be a list, not {_json_type(values)}")
    if len(values) > MAX_FILTER_LIST:
        raise FilterError(f"{where} has {len(values)} values, more than {MAX_FILTER_LIST}")
    kinds = {_check_scalar(item, f"{where}[{index}]") for index, item in enumerate(values)}
    if len(kinds) > 1:
        raise FilterError(f"{where} mixes {' and '.join(sorted(kinds))} values")


def _bindable(text: str) -> bool:
    """Short, without NUL (PostgreSQL text cannot hold it) and encodable as UTF-8 (JSON
    escapes can spell lone surrogates)."""
    if len(text) > MAX_FILTER_STRING or "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", type(None): "null"}
    return names.get(type(value), type(value).__name__)
