from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from aivax.plans.schemas import PlanLimits


class AccountSettings(BaseModel):
    """Account-wide switches; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    json_healing_for_response_format: bool = Field(
        default=False,
        description="Heal invalid JSON on the provider-compatible response_format path too.",
    )


class AccountPlan(BaseModel):
    id: str
    name: str
    limits: PlanLimits


class AccountRead(BaseModel):
    object: Literal["account"] = "account"
    id: uuid.UUID
    name: str
    status: str
    plan: AccountPlan
    settings: AccountSettings
    storage_bytes_used: int
    balance_micros: int
    created_at: datetime
    updated_at: datetime


class AccountUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str | None = Field(default=None, min_length=1, max_length=200)
    settings: AccountSettings | None = None


class AccountCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=200)
    plan: str = Field(default="free", description="Plan id.")


class AdminAccountUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str | None = Field(default=None, min_length=1, max_length=200)
    plan: str | None = Field(default=None, description="Move the account to this plan.")
    status: Literal["active", "suspended"] | None = None


class HookKeyRead(BaseModel):
    object: Literal["hook_key"] = "hook_key"
    hook_key: str = Field(description="Secret your worker endpoints use to verify AIVAX calls.")
