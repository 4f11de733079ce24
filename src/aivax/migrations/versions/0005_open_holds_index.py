"""Wallet holds: one partial index on the open holds instead of two indexes on status

A hold is written open and closed once. Indexes on `status` took both steps: the new row in
each, then, on closing, a delete and an insert in each. Only open holds are ever looked up by
status (the reaper's stale holds, an account's open total), and at any moment they are the calls
in flight: a partial index of them is small, and a hold enters it once and leaves it once.

On PostgreSQL the indexes are built and dropped CONCURRENTLY, so writes go on meanwhile.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 10:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPEN = sa.text("status = 'open'")


def _online() -> bool:
    """CONCURRENTLY on PostgreSQL (other dialects ignore the option)."""
    return op.get_context().dialect.name == "postgresql"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_wallet_holds_open",
            "wallet_holds",
            ["account_id", "created_at"],
            sqlite_where=OPEN,
            postgresql_where=OPEN,
            postgresql_concurrently=_online(),
        )
        op.drop_index(
            "ix_wallet_holds_account_id_status", "wallet_holds", postgresql_concurrently=_online()
        )
        op.drop_index(
            "ix_wallet_holds_status_created_at", "wallet_holds", postgresql_concurrently=_online()
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_wallet_holds_account_id_status",
            "wallet_holds",
            ["account_id", "status"],
            postgresql_concurrently=_online(),
        )
        op.create_index(
            "ix_wallet_holds_status_created_at",
            "wallet_holds",
            ["status", "created_at"],
            postgresql_concurrently=_online(),
        )
        op.drop_index("ix_wallet_holds_open", "wallet_holds", postgresql_concurrently=_online())
