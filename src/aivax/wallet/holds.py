"""Taking holds: one, a batch in one transaction (group commit), or, on PostgreSQL, one whole
hold in a single statement (`HOLD_ONE_STATEMENT`)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, bindparam, insert, literal, literal_column, select, update
from sqlalchemy.engine import Connection

from aivax.db import FastStatement
from aivax.kit.clock import utcnow
from aivax.kit.ids import uuid7
from aivax.models import EntryKind, HoldStatus
from aivax.models.wallet import OPEN_HOLD_STATUS
from aivax.wallet.ledger import (
    ACCOUNTS,
    BALANCE,
    ENTRIES,
    HOLDS,
    INSERT_NEW_ENTRY,
    MAX_MOVEMENT_MICROS,
    InsufficientBalance,
    WalletAccountNotFound,
    change_balance,
    entry_values,
    refusal,
)

# Open holds, in the words of their partial index (`ix_wallet_holds_open`): a literal, since
# SQLite uses a partial index only when the query's condition matches it, and a bound
# parameter cannot be known to.
OPEN = HOLDS.c.status == literal_column(OPEN_HOLD_STATUS)
_INSERT_HOLD = FastStatement(insert(HOLDS))


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
            BALANCE - amount >= 0,
            bindparam("minimum", type_=BigInteger) <= BALANCE,
        )
        .values(balance_micros=BALANCE - amount, updated_at=now)  # no onupdate inside a CTE
        .returning(ACCOUNTS.c.id, BALANCE)
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
        INSERT_NEW_ENTRY.many(conn, entries)  # keys made of fresh hold ids: no conflicts
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
