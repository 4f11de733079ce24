from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from aivax.kit.money import micros_to_usd, usd_to_micros
from aivax.models import EntryKind
from aivax.wallet.ledger import MAX_MOVEMENT_MICROS


class WalletRead(BaseModel):
    object: Literal["wallet"] = "wallet"
    account_id: uuid.UUID
    currency: Literal["usd"] = "usd"
    balance_micros: int = Field(description="Spendable balance: the sum of all ledger entries.")
    held_micros: int = Field(description="Reserved by requests in progress (open holds).")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def balance_usd(self) -> str:
        return micros_to_usd(self.balance_micros)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def held_usd(self) -> str:
        return micros_to_usd(self.held_micros)


class LedgerEntryRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    object: Literal["ledger_entry"] = "ledger_entry"
    id: int
    account_id: uuid.UUID
    kind: EntryKind
    amount_micros: int
    balance_after_micros: int | None
    idempotency_key: str
    hold_id: uuid.UUID | None
    description: str
    details: dict[str, Any]
    created_at: datetime

    @computed_field  # type: ignore[prop-decorator]
    @property
    def amount_usd(self) -> str:
        return micros_to_usd(self.amount_micros)


class CreditCreate(BaseModel):
    """A top-up or adjustment. Give the amount in micro-units or as a USD decimal string."""

    model_config = ConfigDict(extra="forbid", strict=True)

    amount_micros: int | None = Field(default=None, description="Amount in micro-USD.")
    amount_usd: str | None = Field(default=None, description="Amount as a decimal, e.g. '10.50'.")
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=150,
        description="Replaying a key returns the first result (also accepted as the "
        "Idempotency-Key header).",
    )
    description: str = Field(default="", max_length=500)

    @model_validator(mode="after")
    def _one_amount(self) -> CreditCreate:
        if (self.amount_micros is None) == (self.amount_usd is None):
            raise ValueError("give exactly one of amount_micros or amount_usd")
        if self.amount_usd is not None:
            try:
                self.amount_micros = usd_to_micros(self.amount_usd)
            except (ArithmeticError, ValueError) as exc:
                raise ValueError(f"amount_usd {self.amount_usd!r} is not a decimal amount") from exc
        assert self.amount_micros is not None  # noqa: S101 - set by one branch above
        if abs(self.amount_micros) > MAX_MOVEMENT_MICROS:
            raise ValueError(f"amount exceeds the single-movement limit of {MAX_MOVEMENT_MICROS}")
        return self

    @property
    def micros(self) -> int:
        assert self.amount_micros is not None  # noqa: S101 - the validator guarantees it
        return self.amount_micros


class CreditResult(BaseModel):
    object: Literal["wallet_credit"] = "wallet_credit"
    replayed: bool = Field(description="True when the idempotency key was seen before.")
    entry: LedgerEntryRead
