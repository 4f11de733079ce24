"""Group commit on the wallet's hot path: `HoldQueue` (holds of concurrent requests in one
transaction) and `closing.settle_many` (a settlement batch) must write exactly what one-at-a-time
holds, settles and releases write, and keep every refusal with the request it belongs to."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from typing import Any

import pytest
from sqlalchemy import select, update

from aivax.db import NOT_NOW
from aivax.models import HoldStatus, LedgerEntry, WalletHold
from aivax.services import AppServices
from aivax.wallet import closing, ledger
from aivax.wallet.holds import HoldRequest, hold_many
from tests.fixtures.factories import make_account
from tests.fixtures.wallet import balance_and_ledger_sum, hold_behind_a_lock, hold_statuses_once


async def _entries(services: AppServices, account_id: uuid.UUID) -> list[tuple[Any, ...]]:
    """(kind, amount, balance after, details) of every entry, in order, hold ids left out."""
    async with services.database.sessions() as session:
        rows = await session.execute(
            select(LedgerEntry).where(LedgerEntry.account_id == account_id).order_by(LedgerEntry.id)
        )
        return [
            (e.kind, e.amount_micros, e.balance_after_micros, e.details)
            for e in rows.scalars()
            if e.kind != "topup"
        ]


async def test_hold_queue_admits_exactly_what_the_balance_covers(services: AppServices) -> None:
    account = await make_account(services, balance_micros=10_000)

    async def take() -> uuid.UUID | None:
        try:
            return await services.meter.holds.hold(
                account_id=account.id, amount_micros=1_000, ref="batch"
            )
        except ledger.InsufficientBalance:
            return None

    results = await asyncio.gather(*(take() for _ in range(60)))
    assert len([r for r in results if r is not None]) == 10
    balance, total = await balance_and_ledger_sum(services, account.id)
    assert (balance, total) == (0, 0)
    assert min(entry[2] for entry in await _entries(services, account.id)) == 0


async def test_a_refusal_in_a_batch_reaches_only_its_request(services: AppServices) -> None:
    rich = await make_account(services, balance_micros=50_000)
    poor = await make_account(services, balance_micros=100)
    missing = uuid.uuid4()
    outcomes = await asyncio.gather(
        services.meter.holds.hold(account_id=rich.id, amount_micros=1_000, ref="a"),
        services.meter.holds.hold(account_id=poor.id, amount_micros=1_000, ref="b"),
        services.meter.holds.hold(account_id=missing, amount_micros=1_000, ref="c"),
        # over the cap:
        services.meter.holds.hold(account_id=rich.id, amount_micros=10**13, ref="d"),
        services.meter.holds.hold(account_id=rich.id, amount_micros=2_000, ref="e"),
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], uuid.UUID)
    assert isinstance(outcomes[1], ledger.InsufficientBalance)
    assert isinstance(outcomes[2], ledger.WalletAccountNotFound)
    assert isinstance(outcomes[3], ValueError)
    assert isinstance(outcomes[4], uuid.UUID)
    assert await balance_and_ledger_sum(services, rich.id) == (47_000, 47_000)
    assert await balance_and_ledger_sum(services, poor.id) == (100, 100)


async def test_a_hold_waits_for_a_locked_database(services: AppServices) -> None:
    account, lock, waiting = await hold_behind_a_lock(services, "waits")
    await asyncio.sleep(0.1)
    assert not waiting.done()  # queued behind the lock, not refused
    await lock.commit()
    await lock.close()
    assert isinstance(await waiting, uuid.UUID)
    assert await balance_and_ledger_sum(services, account.id) == (6_000, 6_000)


async def test_a_hold_taken_for_a_caller_that_left_is_given_back(services: AppServices) -> None:
    account, lock, waiting = await hold_behind_a_lock(services, "gone")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await lock.commit()  # the hold is taken now, for nobody
    await lock.close()
    released = [HoldStatus.RELEASED.value]
    assert await hold_statuses_once(services, account.id, released) == released
    assert await balance_and_ledger_sum(services, account.id) == (10_000, 10_000)


async def test_settle_many_writes_what_one_at_a_time_writes(services: AppServices) -> None:
    """The same holds closed both ways — cost below the hold, above it (capped), zero
    (released), an expired hold settled late, a hold settled twice — give the same entries."""
    costs = [300, 5_000, 0, 700, 250]
    written: list[list[tuple[Any, ...]]] = []
    for batched in (False, True):
        account = await make_account(services, balance_micros=100_000)
        holds = [
            await services.meter.holds.hold(account_id=account.id, amount_micros=1_000, ref=f"r{i}")
            for i in range(len(costs))
        ]
        async with services.database.sessions() as session:  # the reaper got to one first
            await session.execute(
                update(WalletHold)
                .where(WalletHold.id == holds[3])
                .values(status=HoldStatus.EXPIRED.value)
            )
            await session.commit()
        await services.database.run_write(
            lambda conn, hold=holds[3], owner=account.id: closing._return_and_charge(
                conn, owner, hold, 1_000, 0, 0
            )
        )
        items = [*zip(holds, costs, strict=True), (holds[0], 300)]  # the first one twice
        if batched:
            await services.database.run_write(
                lambda conn, batch=items: closing.settle_many(conn, batch)
            )
        else:
            for hold_id, cost in items:
                await services.database.run_write(
                    lambda conn, h=hold_id, c=cost: (
                        closing.settle(conn, h, c) if c else closing.release(conn, h)
                    )
                )
        written.append(await _entries(services, account.id))
        balance, total = await balance_and_ledger_sum(services, account.id)
        assert balance == total == 100_000 - 300 - 1_000 - 700 - 250
    # The same movements (a late settlement may come last in a batch) …
    movements = [
        sorted(repr((kind, amount, details)) for kind, amount, _, details in entries)
        for entries in written
    ]
    assert movements[0] == movements[1]
    assert (("usage", -1_000, {"uncollected_micros": 4_000})) in [
        (kind, amount, details) for kind, amount, _, details in written[1]
    ]
    # … and each entry's balance_after is the one before it plus its amount.
    for entries in written:
        for before, after in itertools.pairwise(entries):
            assert after[2] == before[2] + after[1]


def test_uuid7_is_rfc_9562_and_time_ordered() -> None:
    import time

    from aivax.kit.ids import uuid7

    made = []
    for _ in range(50):
        made.append(uuid7())
        time.sleep(0.001)
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in made)
    assert made == sorted(made)
    millis = made[-1].int >> 80
    assert abs(millis - time.time() * 1000) < 5_000
    assert len({uuid7() for _ in range(10_000)}) == 10_000


async def test_a_failed_wallet_transaction_leaves_nothing_behind(services: AppServices) -> None:
    """The wallet's statements run on the driver connection on SQLite: they must still be
    part of the surrounding transaction, rolled back with it."""
    account = await make_account(services, balance_micros=10_000)

    def hold_then_fail(conn: Any) -> None:
        hold_many(conn, [HoldRequest(account.id, 4_000, "doomed")])
        raise RuntimeError("after the hold")

    with pytest.raises(RuntimeError):
        await services.database.run_write(hold_then_fail)
    try:  # PostgreSQL never writes inline: NOT_NOW, nothing run
        outcome: object = services.database.write_now(hold_then_fail)
    except RuntimeError:
        outcome = "rolled back"
    assert outcome in ("rolled back", NOT_NOW)
    assert await balance_and_ledger_sum(services, account.id) == (10_000, 10_000)
    async with services.database.sessions() as session:
        holds = await session.scalars(
            select(WalletHold.id).where(WalletHold.account_id == account.id)
        )
        assert list(holds) == []


async def test_the_inline_connection_never_waits(services: AppServices) -> None:
    """No busy wait, and no WAL checkpoint (a disk sync) on the event loop's thread."""
    pragmas = services.database.write_now(
        lambda conn: (
            conn.exec_driver_sql("PRAGMA busy_timeout").scalar(),
            conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar(),
        )
    )
    assert pragmas in ((0, 0), NOT_NOW)  # NOT_NOW: PostgreSQL never writes inline
