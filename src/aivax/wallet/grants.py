"""Lease grants: money moved from the spendable balance into a lease's open hold
(`wallet.leases`)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import BigInteger, bindparam, update
from sqlalchemy.engine import Connection

from aivax.db import FastStatement
from aivax.kit.ids import uuid7
from aivax.models import EntryKind
from aivax.wallet.holds import OPEN, HoldRequest, hold_many
from aivax.wallet.ledger import (
    HOLDS,
    INSERT_NEW_ENTRY,
    MAX_MOVEMENT_MICROS,
    HoldNotOpen,
    InsufficientBalance,
    WalletAccountNotFound,
    cached_balance,
    change_balance,
    entry_values,
    refusal,
)


@dataclass(frozen=True, slots=True)
class Grant:
    """Money moved from an account's spendable balance into an open hold (`wallet.leases`)."""

    hold_id: uuid.UUID
    amount: int  # added to the hold by this grant (0: only the minimum was checked)


_GROW_HOLD = FastStatement(
    update(HOLDS)
    .where(HOLDS.c.id == bindparam("hold_id"), OPEN)
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
    INSERT_NEW_ENTRY.many(conn, [entry])
    return Grant(hold_id, amount)
