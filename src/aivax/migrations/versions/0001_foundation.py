"""foundation: plans, accounts, keys, wallet, operator tokens

Revision ID: 0001
Revises:
Create Date: 2026-11-25 21:42:37.858232
"""

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


MIB = 1024 * 1024
GIB = 1024 * MIB

# The seeded plans. They are data: the operator edits them with PATCH /admin/plans/{id} or
# `aivax plans set`; this migration only provides the starting values.
SEED_PLANS: list[dict[str, Any]] = [
    {
        "id": "free",
        "name": "Free",
        "description": "Try AIVAX on the bundled local model.",
        "limits": {
            "models_allowed": ["aivax/*"],
            "integrated_rpm": 20,
            "integrated_input_tpm": 20_000,
            "byok_rpm": 30,
            "context_cap_tokens": 4_096,
            "max_collections": 2,
            "search_rpm": 30,
            "insert_rpm": 30,
            "jsonl_import_max_bytes": 5 * MIB,
            "storage_quota_bytes": 50 * MIB,
            "batch_items_per_day": 100,
            "chat_session_messages": 50,
            "chat_messages_per_hour": 100,
            "min_balance_micros": 1_000,
            "multimodal_min_balance_micros": 100_000,
        },
    },
    {
        "id": "starter",
        "name": "Starter",
        "description": "Every model, small production workloads.",
        "limits": {
            "models_allowed": ["*"],
            "integrated_rpm": 60,
            "integrated_input_tpm": 200_000,
            "byok_rpm": 120,
            "context_cap_tokens": None,
            "max_collections": 10,
            "search_rpm": 120,
            "insert_rpm": 120,
            "jsonl_import_max_bytes": 50 * MIB,
            "storage_quota_bytes": 1 * GIB,
            "batch_items_per_day": 2_000,
            "chat_session_messages": 200,
            "chat_messages_per_hour": 1_000,
            "min_balance_micros": 1_000,
            "multimodal_min_balance_micros": 100_000,
        },
    },
    {
        "id": "pro",
        "name": "Pro",
        "description": "Higher limits for production applications.",
        "limits": {
            "models_allowed": ["*"],
            "integrated_rpm": 300,
            "integrated_input_tpm": 1_000_000,
            "byok_rpm": 600,
            "context_cap_tokens": None,
            "max_collections": 50,
            "search_rpm": 600,
            "insert_rpm": 600,
            "jsonl_import_max_bytes": 500 * MIB,
            "storage_quota_bytes": 10 * GIB,
            "batch_items_per_day": 20_000,
            "chat_session_messages": 1_000,
            "chat_messages_per_hour": 5_000,
            "min_balance_micros": 1_000,
            "multimodal_min_balance_micros": 50_000,
        },
    },
    {
        "id": "enterprise",
        "name": "Enterprise",
        "description": "Large workloads; limits set per contract.",
        "limits": {
            "models_allowed": ["*"],
            "integrated_rpm": 3_000,
            "integrated_input_tpm": 10_000_000,
            "byok_rpm": 3_000,
            "context_cap_tokens": None,
            "max_collections": 500,
            "search_rpm": 3_000,
            "insert_rpm": 3_000,
            "jsonl_import_max_bytes": 5 * GIB,
            "storage_quota_bytes": 100 * GIB,
            "batch_items_per_day": 500_000,
            "chat_session_messages": 10_000,
            "chat_messages_per_hour": 50_000,
            "min_balance_micros": 0,
            "multimodal_min_balance_micros": 0,
        },
    },
]


def upgrade() -> None:
    op.create_table(
        "operator_tokens",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("display_prefix", sa.String(length=24), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_operator_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_operator_tokens_token_hash")),
    )
    op.create_table(
        "plans",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("description", sa.String(length=500), nullable=False),
        sa.Column("limits", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_plans")),
    )
    op.create_table(
        "system_state",
        sa.Column("key", sa.String(length=100), nullable=False),
        sa.Column("value", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_system_state")),
    )
    op.create_table(
        "accounts",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("plan_id", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("hook_key_encrypted", sa.String(length=500), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("storage_bytes_used", sa.BigInteger(), nullable=False),
        sa.Column("balance_micros", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('active', 'suspended')", name=op.f("ck_accounts_status")),
        sa.ForeignKeyConstraint(["plan_id"], ["plans.id"], name=op.f("fk_accounts_plan_id_plans")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
    )
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_accounts_plan_id"), ["plan_id"], unique=False)

    op.create_table(
        "api_keys",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("display_prefix", sa.String(length=20), nullable=False),
        sa.Column("allowed_origins", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("kind IN ('private', 'public')", name=op.f("ck_api_keys_kind")),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_api_keys_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_account_id"), ["account_id"], unique=False)

    op.create_table(
        "ledger_entries",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("balance_after_micros", sa.BigInteger(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=False),
        sa.Column("hold_id", sa.Uuid(), nullable=True),
        sa.Column("description", sa.String(length=500), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "kind IN ('topup', 'hold', 'release', 'usage', 'refund', 'adjustment')",
            name=op.f("ck_ledger_entries_kind"),
        ),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_ledger_entries_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_entries")),
        sa.UniqueConstraint("account_id", "idempotency_key", name="uq_ledger_entries_idempotency"),
    )
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.create_index("ix_ledger_entries_account_id_id", ["account_id", "id"], unique=False)

    op.create_table(
        "wallet_holds",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("ref", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("actual_micros", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("amount_micros > 0", name=op.f("ck_wallet_holds_amount_positive")),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_wallet_holds_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_wallet_holds")),
    )
    with op.batch_alter_table("wallet_holds", schema=None) as batch_op:
        batch_op.create_index(
            "ix_wallet_holds_account_id_status", ["account_id", "status"], unique=False
        )
        batch_op.create_index(
            "ix_wallet_holds_status_created_at", ["status", "created_at"], unique=False
        )

    plans = sa.table(
        "plans",
        sa.column("id", sa.String),
        sa.column("name", sa.String),
        sa.column("description", sa.String),
        sa.column("limits", sa.JSON),
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("updated_at", sa.DateTime(timezone=True)),
    )
    now = datetime.now(UTC)
    op.bulk_insert(plans, [{**plan, "created_at": now, "updated_at": now} for plan in SEED_PLANS])


def downgrade() -> None:
    with op.batch_alter_table("wallet_holds", schema=None) as batch_op:
        batch_op.drop_index("ix_wallet_holds_status_created_at")
        batch_op.drop_index("ix_wallet_holds_account_id_status")

    op.drop_table("wallet_holds")
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_index("ix_ledger_entries_account_id_id")

    op.drop_table("ledger_entries")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_account_id"))

    op.drop_table("api_keys")
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_accounts_plan_id"))

    op.drop_table("accounts")
    op.drop_table("system_state")
    op.drop_table("plans")
    op.drop_table("operator_tokens")
