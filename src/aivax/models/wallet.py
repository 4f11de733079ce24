from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Index, String, UniqueConstraint, Uuid, text
from sqlalchemy.orm import Mapped, mapped_column

from aivax.models.base import Base, BigIntId


class EntryKind(enum.StrEnum):
    TOPUP = "topup"
    HOLD = "hold"
    RELEASE = "release"
    USAGE = "usage"
    REFUND = "refund"
    ADJUSTMENT = "adjustment"


class HoldStatus(enum.StrEnum):
    OPEN = "open"
    SETTLED = "settled"
    RELEASED = "released"
    EXPIRED = "expired"


# The open holds' status as an SQL literal: the partial index's condition, and the one queries
# must use to be served by it (a bound parameter in its place would keep SQLite from it).
OPEN_HOLD_STATUS = f"'{HoldStatus.OPEN.value}'"


class LedgerEntry(Base):
    """Append-only: rows are inserted, never updated or deleted."""

    __tablename__ = "ledger_entries"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(20))
    amount_micros: Mapped[int]
    balance_after_micros: Mapped[int]
    idempotency_key: Mapped[str] = mapped_column(String(200))
    hold_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    description: Mapped[str] = mapped_column(String(500), default="")
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime]

    __table_args__ = (
        UniqueConstraint("account_id", "idempotency_key", name="uq_ledger_entries_idempotency"),
        Index("ix_ledger_entries_account_id_id", "account_id", "id"),
        CheckConstraint(
            "kind IN ('topup', 'hold', 'release', 'usage', 'refund', 'adjustment')", name="kind"
        ),
    )


class WalletHold(Base):
    __tablename__ = "wallet_holds"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    amount_micros: Mapped[int]
    ref: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default=HoldStatus.OPEN.value)
    actual_micros: Mapped[int | None]
    created_at: Mapped[datetime]
    # Written while the calls using the hold run (`wallet.live`); the reaper goes by it.
    renewed_at: Mapped[datetime | None]
    closed_at: Mapped[datetime | None]

    __table_args__ = (
        # Only open holds are looked up by status (the reaper, an account's open total), and
        # they are the calls in flight: a hold enters this index once and leaves it once.
        Index(
            "ix_wallet_holds_open",
            "account_id",
            "created_at",
            sqlite_where=text(f"status = {OPEN_HOLD_STATUS}"),
            postgresql_where=text(f"status = {OPEN_HOLD_STATUS}"),
        ),
        CheckConstraint("amount_micros > 0", name="amount_positive"),
    )
