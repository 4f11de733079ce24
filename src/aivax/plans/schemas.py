from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MIB = 1024 * 1024


class PlanLimits(BaseModel):
    """Every limit a plan sets. Unknown keys are refused so a typo never goes unnoticed."""

    model_config = ConfigDict(extra="forbid", strict=True)

    models_allowed: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Glob patterns of integrated model ids the plan may call ('*' = all).",
    )
    integrated_rpm: int = Field(default=60, ge=0, description="Integrated-model requests/min.")
    integrated_input_tpm: int = Field(
        default=100_000, ge=0, description="Integrated-model input tokens/min."
    )
    byok_rpm: int = Field(default=120, ge=0, description="Bring-your-own-key requests/min.")
    context_cap_tokens: int | None = Field(
        default=None, ge=1, description="Largest prompt in tokens (null = the model's window)."
    )
    max_collections: int = Field(default=10, ge=0, description="RAG collections per account.")
    search_rpm: int = Field(default=120, ge=0, description="Collection searches/min.")
    insert_rpm: int = Field(default=120, ge=0, description="Collection inserts/min.")
    jsonl_import_max_bytes: int = Field(default=50 * MIB, ge=0, description="JSONL import size.")
    storage_quota_bytes: int = Field(default=1024 * MIB, ge=0, description="Storage quota.")
    batch_items_per_day: int = Field(default=2_000, ge=0, description="Batch items/day.")
    chat_session_messages: int = Field(
        default=200, ge=0, description="Messages one chat-client session may send."
    )
    chat_messages_per_hour: int = Field(
        default=1_000, ge=0, description="Messages one chat client may receive per hour."
    )
    min_balance_micros: int = Field(
        default=1_000, ge=0, description="Balance below which requests are refused (402)."
    )
    multimodal_min_balance_micros: int = Field(
        default=100_000,
        ge=0,
        description="Minimum balance when the input has images, audio, files or video.",
    )


class PlanRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    object: str = "plan"
    id: str
    name: str
    description: str
    limits: PlanLimits
    created_at: datetime
    updated_at: datetime


class PlanCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")
    name: str = Field(min_length=1, max_length=100)
    description: str = Field(default="", max_length=500)
    limits: PlanLimits = Field(default_factory=PlanLimits)


class PlanUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str | None = Field(default=None, min_length=1, max_length=100)
    description: str | None = Field(default=None, max_length=500)
    limits: dict[str, Any] | None = Field(
        default=None, description="Limits to change; the others keep their values."
    )
