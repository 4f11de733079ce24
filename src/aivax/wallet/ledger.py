"""The wallet's ledger: the cached balance, append-only entries, credits and the wallet's errors.

The wallet's SQL and rules are written once as synchronous Core functions on a `Connection`,
in this module and its siblings (`holds`: taking holds; `closing`: settling, releasing and
charging them; `grants`: growing a lease's hold; `open_holds`: the reaper's and renewal's
queries). They run two ways: inside an `AsyncSession` through `run_sync` (the async API in
`service.py`, used by endpoints, the CLI and tests), or as one whole transaction per thread hop
on the inference hot path (`Database.run_write`). Every balance change is one conditional
`UPDATE … RETURNING`: atomic on SQLite (the statement takes the write lock) and on PostgreSQL
(the row lock re-checks the WHERE clause after waiting), so concurrent holds never overdraw.
"""

from __future__ import annotations

import uuid
from typing import Any, cast

from sqlalchemy import BigInteger, Table, bindparam, func, insert, select, update
from sqlalchemy.engine import Connection

from aivax.db import FastStatement, insert_ignoring_conflicts
from aivax.errors import BadRequest, Conflict, NotFound, PaymentRequired
from aivax.kit.clock import utcnow
from aivax.kit.money import micros_to_usd
from aivax.models import Account, EntryKind, LedgerEntry, WalletHold

MAX_MOVEMENT_MICROS = 10**12  # one million USD in a single movement
ACCOUNTS = cast(Table, Account.__table__)
ENTRIES = cast(Table, LedgerEntry.__table__)
HOLDS = cast(Table, WalletHold.__table__)


class InvalidAmount(BadRequest):
    code = "invalid_amount"


class InsufficientBalance(PaymentRequired):
    code = "insufficient_balance"


class HoldNotFound(NotFound):
    code = "hold_not_found"


class HoldAlreadyReleased(Conflict):
    code = "hold_already_released"


class IdempotencyMismatch(Conflict):
    code = "idempotency_key_reused"


class WalletAccountNotFound(NotFound):
    code = "account_not_found"


class HoldNotOpen(Conflict):
    code = "hold_not_open"


# The hot-path statements are built once with bind parameters, as `FastStatement`s: on the
# SQLite writer they run on the driver connection (see `db.FastStatement`); elsewhere SQLAlchemy
# memoises their cache keys, so executing them skips statement construction.
BALANCE = ACCOUNTS.c.balance_micros
_ADJUST = FastStatement(
    update(ACCOUNTS)
    .where(ACCOUNTS.c.id == bindparam("account_id"))
    .values(balance_micros=BALANCE + bindparam("delta", type_=BigInteger))
    .returning(BALANCE)
)
_ADJUST_WITH_FLOOR = FastStatement(
    update(ACCOUNTS)
    .where(
        ACCOUNTS.c.id == bindparam("account_id"),
        BALANCE + bindparam("delta", type_=BigInteger) >= bindparam("floor", type_=BigInteger),
        bindparam("minimum", type_=BigInteger) <= BALANCE,
    )
    .values(balance_micros=BALANCE + bindparam("delta", type_=BigInteger))
    .returning(BALANCE)
)
# Entries whose keys are made of fresh hold ids: they cannot conflict, so no ON CONFLICT clause.
INSERT_NEW_ENTRY = FastStatement(insert(ENTRIES))
_INSERT_ENTRY: dict[str, Any] = {}


def change_balance(
    conn: Connection, account_id: uuid.UUID, delta: int, *, floor: int | None, minimum: int = 0
) -> int | None:
    """Add `delta`; with `floor`, only if the result stays ≥ floor and the balance before is
    ≥ `minimum`. The new balance, or None when the account is missing or a condition fails."""
    if floor is None:
        params: dict[str, Any] = {"account_id": account_id, "delta": delta}
        row = _ADJUST.one(conn, params)
    else:
        params = {"account_id": account_id, "delta": delta, "floor": floor, "minimum": minimum}
        row = _ADJUST_WITH_FLOOR.one(conn, params)
    return int(row[0]) if row is not None else None


def cached_balance(conn: Connection, account_id: uuid.UUID) -> int | None:
    query = select(ACCOUNTS.c.balance_micros).where(ACCOUNTS.c.id == account_id)
    return conn.execute(query).scalar_one_or_none()


def entry_values(
    account_id: uuid.UUID,
    kind: EntryKind,
    amount: int,
    balance_after: int | None,
    idempotency_key: str,
    *,
    description: str = "",
    details: dict[str, Any] | None = None,
    hold_id: uuid.UUID | None = None,
) -> dict[str, Any]:
    return {
        "account_id": account_id,
        "kind": kind.value,
        "amount_micros": amount,
        "balance_after_micros": balance_after,
        "idempotency_key": idempotency_key,
        "hold_id": hold_id,
        "description": description,
        "details": details or {},
        "created_at": utcnow(),
    }


def insert_entry(conn: Connection, values: dict[str, Any]) -> int | None:
    """Insert a ledger entry unless its idempotency key exists; the new id or None."""
    dialect = conn.dialect.name
    statement = _INSERT_ENTRY.get(dialect)
    if statement is None:
        statement = insert_ignoring_conflicts(
            dialect, ENTRIES, conflict_on=["account_id", "idempotency_key"]
        ).returning(ENTRIES.c.id)
        _INSERT_ENTRY[dialect] = statement
    return conn.execute(statement, values).scalar_one_or_none()


def entry_by_key(conn: Connection, account_id: uuid.UUID, key: str) -> dict[str, Any] | None:
    query = select(ENTRIES).where(
        ENTRIES.c.account_id == account_id, ENTRIES.c.idempotency_key == key
    )
    row = conn.execute(query).mappings().first()
    return dict(row) if row is not None else None


def refusal(
    conn: Connection, account_id: uuid.UUID, needed: int
) -> InsufficientBalance | WalletAccountNotFound:
    """Why a debit of `needed` was refused: no such account, or not enough balance."""
    balance = cached_balance(conn, account_id)
    if balance is None:
        return WalletAccountNotFound(f"No account {str(account_id)!r}.", param="account_id")
    return InsufficientBalance(
        f"Insufficient balance: {micros_to_usd(balance)} USD available, "
        f"{micros_to_usd(needed)} USD needed. Top up the wallet to continue."
    )


def post_credit(
    conn: Connection,
    *,
    account_id: uuid.UUID,
    kind: EntryKind,
    amount_micros: int,
    idempotency_key: str,
    description: str = "",
    details: dict[str, Any] | None = None,
) -> tuple[int, bool]:
    """Top-up, refund or adjustment: (entry id, created). A replayed key returns the first."""
    if amount_micros == 0 or (kind is not EntryKind.ADJUSTMENT and amount_micros < 0):
        expected = "non-zero" if kind is EntryKind.ADJUSTMENT else "positive"
        raise InvalidAmount(
            f"A {kind.value} amount must be {expected}, got {amount_micros}.", param="amount_micros"
        )
    existing = entry_by_key(conn, account_id, idempotency_key)
    if existing is not None:
        return _same_movement(existing, kind, amount_micros), False
    floor = 0 if amount_micros < 0 else None  # a negative adjustment may not overdraw
    balance = change_balance(conn, account_id, amount_micros, floor=floor)
    if balance is None:
        raise refusal(conn, account_id, -amount_micros)
    entry_id = insert_entry(
        conn,
        entry_values(
            account_id,
            kind,
            amount_micros,
            balance,
            idempotency_key,
            description=description,
            details=details,
        ),
    )
    if entry_id is None:
        # A concurrent request with the same key won the insert: undo our change in this
        # same transaction and answer with the first entry.
        change_balance(conn, account_id, -amount_micros, floor=None)
        winner = entry_by_key(conn, account_id, idempotency_key)
        assert winner is not None  # noqa: S101 - the conflict proves it exists
        return _same_movement(winner, kind, amount_micros), False
    return entry_id, True


def _same_movement(entry: dict[str, Any], kind: EntryKind, amount_micros: int) -> int:
    if entry["kind"] != kind.value or entry["amount_micros"] != amount_micros:
        raise IdempotencyMismatch(
            f"Idempotency key {entry['idempotency_key']!r} was already used for a "
            f"{entry['kind']} of {entry['amount_micros']} micros; use a new key for a "
            "different movement.",
            param="idempotency_key",
        )
    return int(entry["id"])


def ledger_sum(conn: Connection, account_id: uuid.UUID) -> int:
    query = select(func.coalesce(func.sum(ENTRIES.c.amount_micros), 0)).where(
        ENTRIES.c.account_id == account_id
    )
    return int(conn.execute(query).scalar() or 0)


def all_account_ids(conn: Connection) -> list[uuid.UUID]:
    return list(conn.execute(select(ACCOUNTS.c.id)).scalars())
