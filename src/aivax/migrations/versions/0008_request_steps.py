"""Request log: `step`, the number of a model request within its API request

One API request may make several model requests: structured-output re-asks, a RAG strategy's
query rewriting or retrieval decision, failed attempts before a fallback answered. Their rows
share the request id and are numbered by `step` from 1, in the order they ended. Rows written
before this revision are each the first (and only) step of their request.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A constant default: PostgreSQL (11+) and SQLite add it without rewriting the table.
    op.add_column(
        "request_logs",
        sa.Column("step", sa.Integer(), nullable=False, server_default="1"),
    )


def downgrade() -> None:
    with op.batch_alter_table("request_logs") as batch:
        batch.drop_column("step")
