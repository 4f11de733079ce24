from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, String, UniqueConstraint, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from aivax.models.base import Base, BigIntId, Timestamped


class Gateway(Timestamped, Base):
    """A configured assistant behind one model id (its UUID or its per-account slug)."""

    __tablename__ = "gateways"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    account_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    slug: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200), default="")
    description: Mapped[str] = mapped_column(String(2000), default="")
    # Validated by aivax.gateways.schemas.GatewayConfig.
    config: Mapped[dict[str, Any]]
    version: Mapped[int] = mapped_column(default=1)

    __table_args__ = (UniqueConstraint("account_id", "slug", name="uq_gateways_account_slug"),)


class GatewayVersion(Base):
    """Every configuration a gateway has had, so a bad change can be rolled back."""

    __tablename__ = "gateway_versions"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    gateway_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("gateways.id", ondelete="CASCADE"), index=True
    )
    version: Mapped[int]
    config: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]

    __table_args__ = (
        UniqueConstraint("gateway_id", "version", name="uq_gateway_versions_gateway_version"),
    )
