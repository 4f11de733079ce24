from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from aivax.models.base import Base


class OperatorToken(Base):
    """Admin tokens for `/admin`; stored as HMAC like API keys."""

    __tablename__ = "operator_tokens"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    display_prefix: Mapped[str] = mapped_column(String(24))
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class SystemState(Base):
    """One row per one-time event (e.g. 'bootstrap'); the primary key makes it happen once."""

    __tablename__ = "system_state"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime]
