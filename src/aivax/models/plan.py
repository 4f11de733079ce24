from __future__ import annotations

from typing import Any

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from aivax.models.base import Base, Timestamped


class Plan(Timestamped, Base):
    """A plan is data; `limits` is validated by `aivax.plans.schemas.PlanLimits`."""

    __tablename__ = "plans"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(String(500), default="")
    limits: Mapped[dict[str, Any]]
