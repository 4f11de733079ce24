from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ProviderKind = Literal["openai", "anthropic", "local_gguf", "local_embedding"]
ModelKind = Literal["chat", "embedding"]
Modality = Literal["text", "image", "audio", "file", "video"]
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class Prices(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    input_price_per_m: int = Field(ge=0, description="Micro-USD per 1M input tokens.")
    output_price_per_m: int = Field(ge=0, description="Micro-USD per 1M output tokens.")


class CatalogModelBase(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    kind: ModelKind = Field(
        default="chat",
        description="'embedding' models serve /v1/embeddings and collections; set "
        "options.dimensions for them.",
    )
    provider: ProviderKind
    upstream_model: str = Field(min_length=1, max_length=200)
    credential: str | None = Field(
        default=None, description="Operator credential name (not needed for local_gguf)."
    )
    input_price_per_m: int = Field(default=0, ge=0, description="Micro-USD per 1M input tokens.")
    output_price_per_m: int = Field(default=0, ge=0, description="Micro-USD per 1M output tokens.")
    context_window: int = Field(ge=1)
    max_output_tokens: int = Field(ge=1)
    modalities: list[Modality] = Field(default_factory=lambda: ["text"])  # type: ignore[arg-type]
    supports_tools: bool = False
    supports_json_schema: bool = False
    plans: list[str] = Field(
        default_factory=list, description="Plans that may use it (empty: any plan that allows it)."
    )
    enabled: bool = True
    options: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Provider options, e.g. {'path': '/models/x.gguf'}."
    )


class CatalogModelCreate(CatalogModelBase):
    id: str = Field(pattern=MODEL_ID_PATTERN)

    @field_validator("id")
    @classmethod
    def _not_byok(cls, value: str) -> str:
        if value.startswith("byok/"):
            raise ValueError("ids starting with 'byok/' are reserved for bring-your-own-key calls")
        return value


class CatalogModelUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    upstream_model: str | None = Field(default=None, min_length=1, max_length=200)
    credential: str | None = None
    input_price_per_m: int | None = Field(default=None, ge=0)
    output_price_per_m: int | None = Field(default=None, ge=0)
    context_window: int | None = Field(default=None, ge=1)
    max_output_tokens: int | None = Field(default=None, ge=1)
    modalities: list[Modality] | None = None
    supports_tools: bool | None = None
    supports_json_schema: bool | None = None
    plans: list[str] | None = None
    enabled: bool | None = None
    options: dict[str, str | int | float | bool] | None = None


class CatalogModelRead(BaseModel):
    object: Literal["catalog_model"] = "catalog_model"
    id: str
    kind: str
    provider: str
    upstream_model: str
    credential: str | None
    input_price_per_m: int
    output_price_per_m: int
    context_window: int
    max_output_tokens: int
    modalities: list[str]
    supports_tools: bool
    supports_json_schema: bool
    plans: list[str]
    enabled: bool
    options: dict[str, str | int | float | bool]
    created_at: datetime
    updated_at: datetime


class CredentialCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(pattern=NAME_PATTERN)
    provider: Literal["openai", "anthropic"]
    base_url: str | None = Field(
        default=None,
        max_length=500,
        description="Defaults to the provider's public API (https://api.openai.com/v1, "
        "https://api.anthropic.com).",
    )
    api_key: str = Field(min_length=1, max_length=1000)
    models: list[str] = Field(default_factory=list, max_length=200)
    prices: dict[str, Prices] = Field(
        default_factory=dict, description="Upstream model → prices, to have BYOK costs computed."
    )


class CredentialRead(BaseModel):
    object: Literal["credential"] = "credential"
    id: uuid.UUID
    name: str
    provider: str
    base_url: str
    key_last4: str = Field(description="Only the last four characters of the key are shown.")
    models: list[str]
    prices: dict[str, Prices]
    created_at: datetime
