"""Request and response bodies of the collections API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

DEFAULT_EMBEDDING_MODEL = "aivax/paraphrase-minilm-l3"
MAX_DOCUMENT_CHARS = 2_000_000
MAX_METADATA_BYTES = 8_192
FILTER_OPERATORS = frozenset({"$eq", "$ne", "$in", "$nin", "$gt", "$gte", "$lt", "$lte"})

Scalar = str | int | float | bool


def _check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    import json

    if len(json.dumps(value)) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is larger than {MAX_METADATA_BYTES} bytes")
    return value


class CollectionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

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
    model_config = ConfigDict(extra="forbid")

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
    model_config = ConfigDict(extra="forbid")

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
    model_config = ConfigDict(extra="forbid")

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
    model_config = ConfigDict(extra="forbid")

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
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=4000)
    top_k: int = Field(default=5, ge=1, le=100)
    min_score: float = Field(default=0.0, ge=0.0, le=1.0)
    mode: Literal["hybrid", "vector", "keyword"] = "hybrid"
    filter: dict[str, Any] | None = Field(
        default=None,
        description="Metadata filter: {'key': value} or {'key': {'$in': [...]}} "
        "($eq $ne $in $nin $gt $gte $lt $lte); all conditions must hold.",
    )
    rerank: RerankSpec | None = None

    @field_validator("filter")
    @classmethod
    def _valid_filter(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        for key, condition in value.items():
            if not key or len(key) > 100 or not key.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"filter key {key!r} must be letters, digits, '_' or '-'")
            if isinstance(condition, dict):
                for operator, operand in condition.items():
                    if operator not in FILTER_OPERATORS:
                        raise ValueError(f"unknown filter operator {operator!r}")
                    listed = operator in ("$in", "$nin")
                    if listed != isinstance(operand, list):
                        raise ValueError(f"{operator} takes {'a list' if listed else 'a value'}")
            elif not isinstance(condition, Scalar):
                raise ValueError(f"filter value for {key!r} must be a string, number or boolean")
        return value


class MultiSearchRequest(SearchRequest):
    collection_ids: list[uuid.UUID] = Field(min_length=1, max_length=20)


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


class SearchResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[SearchResult]
    mode: str
    usage: dict[str, int]
