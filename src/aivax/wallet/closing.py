"""Closing holds: settling at the real cost, releasing untouched, charging what was recorded
against a lease, and charging late for work whose hold the reaper already expired."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    Uuid,
    bindparam,
    case,
    func,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection

from aivax.db import FastStatement
from aivax.kit.clock import utcnow
from aivax.kit.ids import uuid7
from aivax.models import EntryKind, HoldStatus
from aivax.wallet.holds import OPEN
from aivax.wallet.ledger import (
    ACCOUNTS,
    BALANCE,
    HOLDS,
    INSERT_NEW_ENTRY,
    HoldAlreadyReleased,
    HoldNotFound,
    change_balance,
    entry_values,
    insert_entry,
)

logger = logging.getLogger("aivax.wallet")

_CHARGED = case(
    (HOLDS.c.amount_micros < bindparam("actual", type_=BigInteger), HOLDS.c.amount_micros),
    else_=bindparam("actual", type_=BigInteger),
)
_CLOSE_HOLD = FastStatement(
    update(HOLDS)
    .where(HOLDS.c.id == bindparam("hold_id"), HOLDS.c.status == bindparam("from_status"))
    .values(status=bindparam("to_status"), actual_micros=_CHARGED, closed_at=bindparam("closed_at"))
    .returning(HOLDS.c.account_id, HOLDS.c.amount_micros, HOLDS.c.actual_micros)
)


def close_hold(
    conn: Connection,
    hold_id: uuid.UUID,
    *,
    from_status: HoldStatus,
    to_status: HoldStatus,
    actual: int,
) -> tuple[uuid.UUID, int, int] | None:
    """Move a hold out of `from_status` exactly once, recording min(actual, amount) as charged.
    (account_id, amount, charged) if it moved."""
    params = {
        "hold_id": hold_id,
        "from_status": from_status.value,
        "to_status": to_status.value,
        "actual": actual,
        "closed_at": utcnow(),
    }
    row = _CLOSE_HOLD.one(conn, params)
    return (row[0], row[1], row[2] or 0) if row is not None else None


def hold_status(conn: Connection, hold_id: uuid.UUID) -> str:
    status = conn.execute(select(HOLDS.c.status).where(HOLDS.c.id == hold_id)).scalar()
    if status is None:
        raise HoldNotFound(f"No hold {str(hold_id)!r}.")
    return str(status)


def settle(conn: Connection, hold_id: uuid.UUID, actual_micros: int) -> int:
    """Charge the real cost (at most the hold) and return the rest; the amount charged.

    Idempotent: settling again charges nothing. A hold is a ceiling: `actual` above it is capped
    and the difference recorded in the usage entry's details. A hold the reaper expired is still
    charged (the work was done) as far as the balance goes (`charge_late`).
    """
    if actual_micros < 0:
        raise ValueError("actual cost cannot be negative")
    moved = close_hold(
        conn,
        hold_id,
        from_status=HoldStatus.OPEN,
        to_status=HoldStatus.SETTLED,
        actual=actual_micros,
    )
    if moved is not None:
        account_id, amount, charge = moved
        _return_and_charge(conn, account_id, hold_id, amount, charge, actual_micros)
        return charge
    late = close_hold(
        conn,
        hold_id,
        from_status=HoldStatus.EXPIRED,
        to_status=HoldStatus.SETTLED,
        actual=actual_micros,
    )
    if late is not None:
        account_id, _, charge = late
        return charge_late(conn, account_id, hold_id, charge, key=f"usage:{hold_id}")
    if hold_status(conn, hold_id) == HoldStatus.RELEASED.value:
        raise HoldAlreadyReleased(f"Hold {str(hold_id)!r} was released; it cannot be settled.")
    return 0


def settle_many(conn: Connection, items: list[tuple[uuid.UUID, int]]) -> None:
    """Settle each `(hold, actual)` — released untouched when `actual` is 0 — in one
    transaction (group commit): one UPDATE per hold (one for them all on PostgreSQL), one
    balance UPDATE per account (in id order), every entry in one multi-row insert. Entries and
    balances come out exactly as `settle` and `release` one at a time would write them. A hold
    that is no longer open (expired by the reaper, or closed already) goes through
    `settle`/`release` afterwards."""
    moved: dict[uuid.UUID, list[tuple[uuid.UUID, int, int, int]]] = {}
    others: list[tuple[uuid.UUID, int]] = []
    if any(actual < 0 for _, actual in items):
        raise ValueError("actual cost cannot be negative")
    for (hold_id, actual), row in zip(items, _close_open_holds(conn, items), strict=True):
        if row is None:
            others.append((hold_id, actual))
            continue
        account_id, amount, charge = row
        moved.setdefault(account_id, []).append((hold_id, amount, charge, actual))
    entries: list[dict[str, Any]] = []
    for account_id in sorted(moved):
        group = moved[account_id]
        delta = sum(returned - charge for _, returned, charge, _ in group)
        balance = change_balance(conn, account_id, delta, floor=None)
        assert balance is not None  # noqa: S101 - the hold's account exists (foreign key)
        running = balance - delta
        for hold_id, returned, charge, requested in group:
            closing, running = _closing_entries(
                account_id, hold_id, returned, charge, requested, before=running
            )
            entries += closing
    if entries:
        # A hold leaves OPEN once, so its release and usage keys are new: no conflicts.
        INSERT_NEW_ENTRY.many(conn, entries)
    for hold_id, actual in others:
        if actual:
            settle(conn, hold_id, actual)
        else:
            release(conn, hold_id)


# PostgreSQL: every open hold of a settlement batch closed by one statement.
_CLOSE_MANY = (
    text(
        "UPDATE wallet_holds AS h SET "
        "status = CASE WHEN v.actual > 0 THEN :settled ELSE :released END, "
        "actual_micros = LEAST(h.amount_micros, v.actual), closed_at = :closed_at "
        "FROM unnest(:ids, :actuals) AS v(id, actual) "
        "WHERE h.id = v.id AND h.status = :open "
        "RETURNING h.id, h.account_id, h.amount_micros, h.actual_micros"
    )
    .bindparams(
        bindparam("ids", type_=ARRAY(Uuid())),
        bindparam("actuals", type_=ARRAY(BigInteger())),
        bindparam("closed_at", type_=HOLDS.c.closed_at.type),
    )
    .columns(HOLDS.c.id, HOLDS.c.account_id, HOLDS.c.amount_micros, HOLDS.c.actual_micros)
)


def _close_open_holds(
    conn: Connection, items: list[tuple[uuid.UUID, int]]
) -> list[tuple[uuid.UUID, int, int] | None]:
    """Close each open hold (settled at min(actual, amount), or released when `actual` is 0):
    per item, (account_id, amount, charged), or None if the hold was not open. On PostgreSQL
    one statement closes them all (one round trip instead of one per hold); a batch naming a
    hold twice goes hold by hold, so the first mention wins as it does one at a time."""
    ids = [hold_id for hold_id, _ in items]
    if conn.dialect.name != "postgresql" or len(set(ids)) != len(ids):
        return [
            close_hold(
                conn,
                hold_id,
                from_status=HoldStatus.OPEN,
                to_status=HoldStatus.SETTLED if actual else HoldStatus.RELEASED,
                actual=actual,
            )
            for hold_id, actual in items
        ]
    rows = conn.execute(
        _CLOSE_MANY,
        {
            "ids": ids,
            "actuals": [actual for _, actual in items],
            "settled": HoldStatus.SETTLED.value,
            "released": HoldStatus.RELEASED.value,
            "open": HoldStatus.OPEN.value,
            "closed_at": utcnow(),
        },
    )
    closed: dict[uuid.UUID, tuple[uuid.UUID, int, int]] = {
        row[0]: (row[1], row[2], row[3] or 0) for row in rows
    }
    return [closed.get(hold_id) for hold_id in ids]


def release(
    conn: Connection, hold_id: uuid.UUID, to_status: HoldStatus = HoldStatus.RELEASED
) -> bool:
    """Return an open hold untouched; True if this call closed it (a no-op on a closed one)."""
    moved = close_hold(conn, hold_id, from_status=HoldStatus.OPEN, to_status=to_status, actual=0)
    if moved is None:
        hold_status(conn, hold_id)  # 404 for an unknown hold
        return False
    account_id, amount, _ = moved
    _return_and_charge(conn, account_id, hold_id, amount, 0, 0)
    return True


def _return_and_charge(
    conn: Connection,
    account_id: uuid.UUID,
    hold_id: uuid.UUID,
    returned: int,
    charge: int,
    requested: int,
) -> None:
    balance = change_balance(conn, account_id, returned - charge, floor=None)
    assert balance is not None  # noqa: S101 - the hold's account exists (foreign key)
    closing, _ = _closing_entries(
        account_id, hold_id, returned, charge, requested, before=balance - returned + charge
    )
    for values in closing:
        insert_entry(conn, values)


def _closing_entries(
    account_id: uuid.UUID,
    hold_id: uuid.UUID,
    returned: int,
    charge: int,
    requested: int,
    *,
    before: int,
) -> tuple[list[dict[str, Any]], int]:
    """The entries that close one hold — the hold given back (`release`), then the real cost
    (`usage`) — from balance `before`; and the balance after them."""
    entries = []
    balance = before
    if returned:
        balance += returned
        entries.append(
            entry_values(
                account_id,
                EntryKind.RELEASE,
                returned,
                balance,
                f"release:{hold_id}",
                hold_id=hold_id,
            )
        )
    if charge:
        balance -= charge
        details = {"uncollected_micros": requested - charge} if requested > charge else {}
        entries.append(
            entry_values(
                account_id,
                EntryKind.USAGE,
                -charge,
                balance,
                f"usage:{hold_id}",
                details=details,
                hold_id=hold_id,
            )
        )
    return entries, balance


def lock_accounts_of(conn: Connection, hold_ids: list[uuid.UUID]) -> None:
    """PostgreSQL: lock the accounts of these holds, in id order, before any of their rows.

    A lease's grant locks its account, then its hold row. A settlement batch that charged one
    lease's hold and then needed the same account (to close the account's previous lease, say)
    would wait for the grant while the grant waited for it: a deadlock, which PostgreSQL breaks
    after a second by failing one of them. With the accounts locked first, every transaction
    takes the account before the hold. (SQLite writes one transaction at a time.)"""
    if conn.dialect.name != "postgresql" or not hold_ids:
        return
    owners = select(HOLDS.c.account_id).where(HOLDS.c.id.in_(hold_ids))
    conn.execute(
        select(ACCOUNTS.c.id)
        .where(ACCOUNTS.c.id.in_(owners))
        .order_by(ACCOUNTS.c.id)
        .with_for_update()
    )


_ADD_CHARGE = FastStatement(
    update(HOLDS)
    .where(HOLDS.c.id == bindparam("hold_id"), OPEN)
    .values(
        actual_micros=func.coalesce(HOLDS.c.actual_micros, 0) + bindparam("cost", type_=BigInteger)
    )
    .returning(HOLDS.c.id)
)


def charge_holds(conn: Connection, charges: dict[uuid.UUID, int]) -> None:
    """Record calls' costs against open holds (leases), to be charged when each closes
    (`close_recorded`); the balance does not move, the money is already held. A cost that
    arrives after its hold was closed (the reaper expired it) is charged at once, as a usage
    entry of its own, as far as the balance goes (`charge_late`): the work was done."""
    for hold_id in sorted(charges):
        cost = charges[hold_id]
        if cost < 0:
            raise ValueError("a charge cannot be negative")
        if not cost or _ADD_CHARGE.one(conn, {"hold_id": hold_id, "cost": cost}) is not None:
            continue
        account_id = conn.execute(
            select(HOLDS.c.account_id).where(HOLDS.c.id == hold_id)
        ).scalar_one_or_none()
        if account_id is None:
            raise HoldNotFound(f"No hold {str(hold_id)!r}.")
        charge_late(conn, account_id, hold_id, cost, key=f"usage:{hold_id}:{uuid7().hex}")


def charge_late(
    conn: Connection, account_id: uuid.UUID, hold_id: uuid.UUID, cost: int, *, key: str
) -> int:
    """Charge `cost` for work done under a hold that was closed before its cost arrived (the
    reaper expired it): no money is held for it any more, so the balance pays what it can and
    never goes below zero. What it cannot pay is recorded on the usage entry as
    `shortfall_micros` (the entry is written even when nothing could be taken), so the operator
    finds it (`GET /admin/wallet/shortfalls`). The amount charged."""
    locked = select(BALANCE).where(ACCOUNTS.c.id == account_id).with_for_update()
    balance = int(conn.execute(locked).scalar_one())
    taken = min(cost, max(balance, 0))
    after = change_balance(conn, account_id, -taken, floor=None) if taken else balance
    assert after is not None  # noqa: S101 - the hold's account exists (foreign key)
    details: dict[str, Any] = {"late": True}
    if taken < cost:
        details["shortfall_micros"] = cost - taken
        logger.warning(
            "a late charge of %d micros on hold %s found %d available; shortfall recorded",
            cost,
            hold_id,
            max(balance, 0),
        )
    insert_entry(
        conn,
        entry_values(
            account_id, EntryKind.USAGE, -taken, after, key, details=details, hold_id=hold_id
        ),
    )
    return taken


_CLOSE_RECORDED = FastStatement(
    update(HOLDS)
    .where(HOLDS.c.id == bindparam("hold_id"), OPEN)
    .values(
        status=case(
            (bindparam("expire", type_=Boolean), literal(HoldStatus.EXPIRED.value)),
            (func.coalesce(HOLDS.c.actual_micros, 0) > 0, literal(HoldStatus.SETTLED.value)),
            else_=literal(HoldStatus.RELEASED.value),
        ),
        actual_micros=func.coalesce(HOLDS.c.actual_micros, 0),
        closed_at=bindparam("closed_at"),
    )
    .returning(HOLDS.c.account_id, HOLDS.c.amount_micros, HOLDS.c.actual_micros)
)


def close_recorded(conn: Connection, hold_id: uuid.UUID, *, expire: bool = False) -> bool:
    """Close an open hold, charging what was recorded against it (`charge_holds`; nothing for
    a call's own hold, which records none while open) and giving back the rest: settled or
    released, or expired (`expire`, the reaper). True if this call closed it."""
    row = _CLOSE_RECORDED.one(conn, {"hold_id": hold_id, "expire": expire, "closed_at": utcnow()})
    if row is None:
        return False
    account_id, amount, charge = row
    _return_and_charge(conn, account_id, hold_id, amount, charge, charge)
    return True
