"""The wallet's SQL and rules, written once as synchronous Core functions on a `Connection`.

They run two ways: inside an `AsyncSession` through `run_sync` (the async API in `service.py`,
used by endpoints, the CLI and tests), or as one whole transaction per thread hop on the
inference hot path (`Database.run_write`). Every balance change is one conditional
`UPDATE … RETURNING`: atomic on SQLite (the statement takes the write lock) and on PostgreSQL
(the row lock re-checks the WHERE clause after waiting), so concurrent holds never overdraw.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    Table,
    Uuid,
    bindparam,
    case,
    func,
    insert,
    literal,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Select

from aivax.db import FastStatement, insert_ignoring_conflicts
from aivax.errors import BadRequest, Conflict, NotFound, PaymentRequired
from aivax.kit.clock import utcnow
from aivax.kit.ids import uuid7
from aivax.kit.money import micros_to_usd
from aivax.models import Account, EntryKind, HoldStatus, LedgerEntry, WalletHold
from aivax.models.wallet import OPEN_HOLD_STATUS

logger = logging.getLogger("aivax.wallet")

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


# The hot-path statements are built once with bind parameters, as `FastStatement`s: on the
# SQLite writer they run on the driver connection (see `db.FastStatement`); elsewhere SQLAlchemy
# memoises their cache keys, so executing them skips statement construction.
_BALANCE = ACCOUNTS.c.balance_micros
_ADJUST = FastStatement(
    update(ACCOUNTS)
    .where(ACCOUNTS.c.id == bindparam("account_id"))
    .values(balance_micros=_BALANCE + bindparam("delta", type_=BigInteger))
    .returning(_BALANCE)
)
_ADJUST_WITH_FLOOR = FastStatement(
    update(ACCOUNTS)
    .where(
        ACCOUNTS.c.id == bindparam("account_id"),
        _BALANCE + bindparam("delta", type_=BigInteger) >= bindparam("floor", type_=BigInteger),
        bindparam("minimum", type_=BigInteger) <= _BALANCE,
    )
    .values(balance_micros=_BALANCE + bindparam("delta", type_=BigInteger))
    .returning(_BALANCE)
)
_INSERT_HOLD = FastStatement(insert(HOLDS))
_INSERT_NEW_ENTRY = FastStatement(insert(ENTRIES))
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
_INSERT_ENTRY: dict[str, Any] = {}
# Open holds, in the words of their partial index (`ix_wallet_holds_open`): a literal, since
# SQLite uses a partial index only when the query's condition matches it, and a bound
# parameter cannot be known to.
_OPEN = HOLDS.c.status == literal_column(OPEN_HOLD_STATUS)


def _hold_in_one_statement() -> Any:
    """PostgreSQL: a whole hold — the conditional debit, the hold row and its ledger entry — as
    one statement (data-modifying CTEs run together, atomically), so a hold costs one round
    trip instead of three. Nothing is inserted when the debit matches no row."""
    amount = bindparam("amount", type_=BigInteger)
    hold_id = bindparam("hold_id", type_=HOLDS.c.id.type)
    now = bindparam("now", type_=HOLDS.c.created_at.type)
    ref = bindparam("ref", type_=HOLDS.c.ref.type)
    debited = (
        update(ACCOUNTS)
        .where(
            ACCOUNTS.c.id == bindparam("account_id"),
            _BALANCE - amount >= 0,
            bindparam("minimum", type_=BigInteger) <= _BALANCE,
        )
        .values(balance_micros=_BALANCE - amount, updated_at=now)  # no onupdate inside a CTE
        .returning(ACCOUNTS.c.id, _BALANCE)
        .cte("debited")
    )
    hold_row = insert(HOLDS).from_select(
        ["id", "account_id", "amount_micros", "ref", "status", "created_at"],
        select(hold_id, debited.c.id, amount, ref, literal(HoldStatus.OPEN.value), now),
    )
    entry_row = insert(ENTRIES).from_select(
        [
            "account_id",
            "kind",
            "amount_micros",
            "balance_after_micros",
            "idempotency_key",
            "hold_id",
            "description",
            "details",
            "created_at",
        ],
        select(
            debited.c.id,
            literal(EntryKind.HOLD.value),
            -amount,
            debited.c.balance_micros,
            bindparam("key", type_=ENTRIES.c.idempotency_key.type),
            hold_id,
            literal(""),
            bindparam("details", type_=ENTRIES.c.details.type),
            now,
        ),
    )
    return select(debited.c.balance_micros).add_cte(
        hold_row.cte("hold_row"), entry_row.cte("entry_row")
    )


HOLD_ONE_STATEMENT = FastStatement(_hold_in_one_statement())


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


@dataclass(frozen=True, slots=True)
class HoldRequest:
    account_id: uuid.UUID
    amount_micros: int
    ref: str
    minimum_balance: int = 0


def hold(
    conn: Connection,
    *,
    account_id: uuid.UUID,
    amount_micros: int,
    ref: str,
    minimum_balance: int = 0,
) -> uuid.UUID:
    """Reserve `amount_micros` if the balance covers it and is ≥ `minimum_balance`."""
    (result,) = hold_many(conn, [HoldRequest(account_id, amount_micros, ref, minimum_balance)])
    if isinstance(result, Exception):
        raise result
    return result


def check_hold_amount(amount_micros: int) -> None:
    if not 0 < amount_micros <= MAX_MOVEMENT_MICROS:
        raise ValueError(f"hold amount must be in 1..{MAX_MOVEMENT_MICROS}, got {amount_micros}")


def hold_many(
    conn: Connection, requests: list[HoldRequest]
) -> list[uuid.UUID | InsufficientBalance | WalletAccountNotFound]:
    """Each request's hold, or the refusal it got, in one transaction (group commit): one
    conditional UPDATE per hold, then every hold row and hold entry in two multi-row inserts
    (on PostgreSQL, where each statement is a round trip, one `HOLD_ONE_STATEMENT` per hold
    instead). Accounts are updated in id order, so concurrent batches on PostgreSQL lock rows
    in one order and cannot deadlock."""
    for request in requests:
        check_hold_amount(request.amount_micros)
    results: dict[int, uuid.UUID | InsufficientBalance | WalletAccountNotFound] = {}
    holds: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    order = sorted(range(len(requests)), key=lambda i: requests[i].account_id)
    one_statement = conn.dialect.name == "postgresql"
    for index in order:
        request = requests[index]
        if one_statement:
            results[index] = _hold_on_postgresql(conn, request)
            continue
        balance = change_balance(
            conn,
            request.account_id,
            -request.amount_micros,
            floor=0,
            minimum=request.minimum_balance,
        )
        if balance is None:
            results[index] = refusal(conn, request.account_id, request.amount_micros)
            continue
        hold_id = uuid7()  # time-ordered: appended to the holds' index
        ref = request.ref[:200]
        holds.append(
            {
                "id": hold_id,
                "account_id": request.account_id,
                "amount_micros": request.amount_micros,
                "ref": ref,
                "status": HoldStatus.OPEN.value,
                "created_at": utcnow(),
            }
        )
        entries.append(
            entry_values(
                request.account_id,
                EntryKind.HOLD,
                -request.amount_micros,
                balance,
                f"hold:{hold_id}",
                details={"ref": ref},
                hold_id=hold_id,
            )
        )
        results[index] = hold_id
    if holds:
        _INSERT_HOLD.many(conn, holds)
        _INSERT_NEW_ENTRY.many(conn, entries)  # keys made of fresh hold ids: no conflicts
    return [results[index] for index in range(len(requests))]


def one_statement_hold(request: HoldRequest) -> tuple[uuid.UUID, dict[str, Any]]:
    """The new hold's id and the parameters of `HOLD_ONE_STATEMENT` that take it."""
    check_hold_amount(request.amount_micros)
    hold_id = uuid7()
    ref = request.ref[:200]
    return hold_id, {
        "account_id": request.account_id,
        "amount": request.amount_micros,
        "minimum": request.minimum_balance,
        "hold_id": hold_id,
        "ref": ref,
        "now": utcnow(),
        "key": f"hold:{hold_id}",
        "details": {"ref": ref},
    }


def _hold_on_postgresql(
    conn: Connection, request: HoldRequest
) -> uuid.UUID | InsufficientBalance | WalletAccountNotFound:
    hold_id, params = one_statement_hold(request)
    if HOLD_ONE_STATEMENT.one(conn, params) is None:
        return refusal(conn, request.account_id, request.amount_micros)
    return hold_id


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
        _INSERT_NEW_ENTRY.many(conn, entries)
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


@dataclass(frozen=True, slots=True)
class Grant:
    """Money moved from an account's spendable balance into an open hold (`wallet.leases`)."""

    hold_id: uuid.UUID
    amount: int  # added to the hold by this grant (0: only the minimum was checked)


class HoldNotOpen(Conflict):
    code = "hold_not_open"


_GROW_HOLD = FastStatement(
    update(HOLDS)
    .where(HOLDS.c.id == bindparam("hold_id"), _OPEN)
    .values(amount_micros=HOLDS.c.amount_micros + bindparam("amount", type_=BigInteger))
    .returning(HOLDS.c.id)
)


def grant(
    conn: Connection,
    *,
    account_id: uuid.UUID,
    hold_id: uuid.UUID | None,
    need: int,
    want: int,
    minimum: int,
    ref: str,
) -> Grant | InsufficientBalance | WalletAccountNotFound:
    """Move at least `need` and, as far as the balance allows, `want` micros of the spendable
    balance into open hold `hold_id` (a new hold when None), only while the balance is at least
    `minimum`. No more than a quarter of the balance is taken (or `need`, if that is more), so
    that other server processes sharing the account still find money to lease. Raises
    `HoldNotOpen` (rolling the transaction back) when `hold_id` was closed meanwhile."""
    balance = cached_balance(conn, account_id)
    if balance is None:
        return WalletAccountNotFound(f"No account {str(account_id)!r}.", param="account_id")
    # `need` is at most one call's worst case, which the caller checked (`check_hold_amount`).
    amount = max(need, min(want, balance // 4, MAX_MOVEMENT_MICROS))
    if amount == 0:
        if hold_id is None or balance < minimum:
            return refusal(conn, account_id, max(need, 1))
        return Grant(hold_id, 0)
    if hold_id is None:  # a new hold, taken as any other
        (held,) = hold_many(conn, [HoldRequest(account_id, amount, ref, minimum)])
        return held if isinstance(held, Exception) else Grant(held, amount)
    after = change_balance(conn, account_id, -amount, floor=0, minimum=minimum)
    if after is None:
        return refusal(conn, account_id, amount)
    if _GROW_HOLD.one(conn, {"hold_id": hold_id, "amount": amount}) is None:
        raise HoldNotOpen(f"Hold {str(hold_id)!r} is no longer open.")
    key = f"hold:{hold_id}:{uuid7().hex}"
    entry = entry_values(
        account_id, EntryKind.HOLD, -amount, after, key, details={"ref": ref[:200]}, hold_id=hold_id
    )
    _INSERT_NEW_ENTRY.many(conn, [entry])
    return Grant(hold_id, amount)


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
    .where(HOLDS.c.id == bindparam("hold_id"), _OPEN)
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
    locked = select(_BALANCE).where(ACCOUNTS.c.id == account_id).with_for_update()
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
    .where(HOLDS.c.id == bindparam("hold_id"), _OPEN)
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


def stale_holds_query(*, created_before: Any, limit: int) -> Select[Any]:
    """Open holds whose last sign of life (renewal, else creation) is before `created_before`:
    a live server renews the holds its calls still use (`renew_holds`), so these are the holds
    of a server that died or of a call that never settled."""
    return (
        select(HOLDS.c.id)
        .where(_OPEN, func.coalesce(HOLDS.c.renewed_at, HOLDS.c.created_at) < created_before)
        .order_by(HOLDS.c.created_at)
        .limit(limit)
    )


_RENEW = (
    update(HOLDS)
    .where(_OPEN, HOLDS.c.id.in_(bindparam("ids", expanding=True)))
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
        HOLDS.c.account_id == account_id, _OPEN
    )


def open_hold_total(conn: Connection, account_id: uuid.UUID) -> int:
    return int(conn.execute(open_total_query(account_id)).scalar() or 0)


def ledger_sum(conn: Connection, account_id: uuid.UUID) -> int:
    query = select(func.coalesce(func.sum(ENTRIES.c.amount_micros), 0)).where(
        ENTRIES.c.account_id == account_id
    )
    return int(conn.execute(query).scalar() or 0)


def all_account_ids(conn: Connection) -> list[uuid.UUID]:
    return list(conn.execute(select(ACCOUNTS.c.id)).scalars())
