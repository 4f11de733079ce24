from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, String, UniqueConstraint, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from aivax.models.base import Base, BigIntId, Timestamped


class ProviderCredential(Timestamped, Base):
    """An upstream credential: the operator's (account_id NULL) for integrated models, or an
    account's own for bring-your-own-key calls. The key is encrypted at rest."""

    __tablename__ = "provider_credentials"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    account_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE")
    )
    name: Mapped[str] = mapped_column(String(100))
    provider: Mapped[str] = mapped_column(String(40))
    base_url: Mapped[str] = mapped_column(String(500))
    api_key_encrypted: Mapped[str] = mapped_column(String(2000))
    key_last4: Mapped[str] = mapped_column(String(4))
    # Optional: upstream model names this credential is meant for (listed in /v1/models) and
    # prices per 1M tokens (micro-USD) when the account wants BYOK costs computed.
    models: Mapped[list[str]] = mapped_column(default=list)
    prices: Mapped[dict[str, Any]] = mapped_column(default=dict)

    __table_args__ = (
        UniqueConstraint("account_id", "name", name="uq_provider_credentials_owner_name"),
    )


class CatalogModel(Timestamped, Base):
    """An integrated model the operator offers, e.g. `aivax/smollm2-135m`."""

    __tablename__ = "catalog_models"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    # "chat" (/v1/chat/completions) or "embedding" (/v1/embeddings, RAG collections).
    kind: Mapped[str] = mapped_column(String(20), default="chat")
    provider: Mapped[str] = mapped_column(String(40))
    upstream_model: Mapped[str] = mapped_column(String(200))
    credential_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("provider_credentials.id", ondelete="RESTRICT")
    )
    input_price_per_m: Mapped[int] = mapped_column(default=0)
    output_price_per_m: Mapped[int] = mapped_column(default=0)
    context_window: Mapped[int]
    max_output_tokens: Mapped[int]
    modalities: Mapped[list[str]] = mapped_column(default=lambda: ["text"])
    supports_tools: Mapped[bool] = mapped_column(default=False)
    supports_json_schema: Mapped[bool] = mapped_column(default=False)
    plans: Mapped[list[str]] = mapped_column(default=list)
    enabled: Mapped[bool] = mapped_column(default=True)
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)


class RequestLog(Base):
    """One row per inference call (each upstream attempt that was billed or failed)."""

    __tablename__ = "request_logs"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(128))
    # The model requests of one API request (re-asks, retrieval calls, failed attempts) share
    # its request id and are numbered from 1 in the order they ended.
    step: Mapped[int] = mapped_column(default=1, server_default="1")
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    key_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    gateway_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    model: Mapped[str] = mapped_column(String(300))
    provider: Mapped[str] = mapped_column(String(40))
    upstream_model: Mapped[str] = mapped_column(String(200))
    byok: Mapped[bool] = mapped_column(default=False)
    stream: Mapped[bool] = mapped_column(default=False)
    status: Mapped[int]
    error_code: Mapped[str | None] = mapped_column(String(100))
    input_tokens: Mapped[int] = mapped_column(default=0)
    output_tokens: Mapped[int] = mapped_column(default=0)
    cached_input_tokens: Mapped[int] = mapped_column(default=0)
    cost_micros: Mapped[int | None]
    estimated: Mapped[bool] = mapped_column(default=False)
    latency_ms: Mapped[int] = mapped_column(default=0)
    ttft_ms: Mapped[int | None]
    # Moderation results that did not block the call, e.g. ["input:keyword"].
    flags: Mapped[list[str] | None] = mapped_column(default=None)
    created_at: Mapped[datetime]

    __table_args__ = (
        Index("ix_request_logs_account_id_id", "account_id", "id"),
        Index("ix_request_logs_account_id_created_at", "account_id", "created_at"),
    )
