"""Queries over open holds: the reaper's stale holds, renewal of holds still in use, and an
account's total held."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Select

from aivax.wallet.holds import OPEN
from aivax.wallet.ledger import HOLDS


def stale_holds_query(*, created_before: Any, limit: int) -> Select[Any]:
    """Open holds whose last sign of life (renewal, else creation) is before `created_before`:
    a live server renews the holds its calls still use (`renew_holds`), so these are the holds
    of a server that died or of a call that never settled."""
    return (
        select(HOLDS.c.id)
        .where(OPEN, func.coalesce(HOLDS.c.renewed_at, HOLDS.c.created_at) < created_before)
        .order_by(HOLDS.c.created_at)
        .limit(limit)
    )


_RENEW = (
    update(HOLDS)
    .where(OPEN, HOLDS.c.id.in_(bindparam("ids", expanding=True)))
    .values(renewed_at=bindparam("now"))
)


def renew_holds(conn: Connection, hold_ids: list[uuid.UUID], now: Any) -> int:
    """Mark open holds as still in use at `now`; how many were open."""
    renewed = 0
    for start in range(0, len(hold_ids), 500):
        ids = hold_ids[start : start + 500]
        renewed += conn.execute(_RENEW, {"ids": ids, "now": now}).rowcount or 0
    return renewed


def stale_hold_ids(conn: Connection, *, created_before: Any, limit: int) -> list[uuid.UUID]:
    query = stale_holds_query(created_before=created_before, limit=limit)
    return list(conn.execute(query).scalars())


def open_total_query(account_id: uuid.UUID) -> Select[Any]:
    return select(func.coalesce(func.sum(HOLDS.c.amount_micros), 0)).where(
        HOLDS.c.account_id == account_id, OPEN
    )


def open_hold_total(conn: Connection, account_id: uuid.UUID) -> int:
    return int(conn.execute(open_total_query(account_id)).scalar() or 0)
