"""Wallet holds: `renewed_at`, written by the server whose calls still use the hold

The reaper expires an open hold whose last sign of life — its renewal, or its creation when it
was never renewed — is older than AIVAX_HOLD_MAX_AGE_SECONDS. A live server renews the holds of
its calls in flight (and of its open wallet leases) well within that age, so only the holds of a
server that died (or of a call that leaked its hold) expire, however long a call runs.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 23:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: adding it rewrites nothing on PostgreSQL or SQLite.
    op.add_column("wallet_holds", sa.Column("renewed_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("wallet_holds") as batch:
        batch.drop_column("renewed_at")
