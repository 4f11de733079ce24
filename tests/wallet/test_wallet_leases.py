"""Wallet leases (`wallet.leases`): calls admitted from an account's lease in memory, against
the real database and the real wallet writer."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from aivax.config import Settings
from aivax.models import EntryKind, LedgerEntry, RequestLog, WalletHold
from aivax.services import AppServices
from aivax.wallet import closing, ledger
from aivax.wallet import service as wallet
from aivax.wallet.leases import HORIZON_SECONDS, LeaseBook
from aivax.wallet.settlement import Settlement
from tests.fixtures.factories import make_account, make_plan, principal_of
from tests.fixtures.wallet import balance_and_ledger_sum, hold_behind_a_lock


def book(
    services: AppServices,
    *,
    calls: int = 4,
    idle: float = 600.0,
    max_seconds: float = 600.0,
    horizon: float = HORIZON_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> LeaseBook:
    """A lease book as a server process has one, on the shared database and settler
    (`horizon=0`: grants sized by calls alone, not by demand)."""
    return LeaseBook(
        services.database,
        services.meter.settler,
        calls=calls,
        idle_seconds=idle,
        max_seconds=max_seconds,
        horizon_seconds=horizon,
        clock=clock,
    )


async def holds_of(
    services: AppServices, account_id: uuid.UUID
) -> list[tuple[int, int | None, str]]:
    async with services.database.sessions() as session:
        rows = await session.execute(
            select(WalletHold.amount_micros, WalletHold.actual_micros, WalletHold.status)
            .where(WalletHold.account_id == account_id)
            .order_by(WalletHold.id)
        )
        return [(amount, actual, status) for amount, actual, status in rows]


async def entries_of(services: AppServices, account_id: uuid.UUID) -> list[tuple[str, int]]:
    async with services.database.sessions() as session:
        rows = await session.execute(
            select(LedgerEntry.kind, LedgerEntry.amount_micros)
            .where(LedgerEntry.account_id == account_id, LedgerEntry.kind != EntryKind.TOPUP.value)
            .order_by(LedgerEntry.id)
        )
        return [(kind, amount) for kind, amount in rows]


async def summary(services: AppServices, account_id: uuid.UUID) -> tuple[int, int]:
    async with services.database.sessions() as session:
        read = await wallet.summary(session, account_id)
    return read.balance_micros, read.held_micros


async def test_calls_within_a_lease_write_nothing_until_it_closes(services: AppServices) -> None:
    leases = book(services, calls=4, horizon=0)  # grants sized by calls alone
    account = await make_account(services, balance_micros=100_000)
    first = await leases.reserve(account.id, 100, 0)
    # One grant: this call's worst case and room for `calls` more calls (100 * 4).
    assert await entries_of(services, account.id) == [("hold", -400)]
    assert await summary(services, account.id) == (99_600, 400)
    more = [await leases.reserve(account.id, 100, 0) for _ in range(3)]
    assert await entries_of(services, account.id) == [("hold", -400)]  # no database write
    fifth = await leases.reserve(account.id, 100, 0)  # does not fit: the lease grows
    [(_, first_grant), (_, second_grant)] = await entries_of(services, account.id)
    # Room for twice the calls in flight when that is more than `calls`: 100 * 2 * (4 + 1).
    assert (first_grant, second_grant) == (-400, -1_000)
    for reservation in [first, *more, fifth]:
        leases.finish(reservation, 30, None)
    await services.meter.drain()
    [(granted, recorded, status)] = await holds_of(services, account.id)
    assert (granted, recorded, status) == (1_400, 150, "open")  # costs recorded, not yet charged
    await leases.flush(account.id)
    assert await holds_of(services, account.id) == [(1_400, 150, "settled")]
    assert await entries_of(services, account.id) == [
        ("hold", -400),
        ("hold", -1_000),
        ("release", 1_400),
        ("usage", -150),
    ]
    assert await balance_and_ledger_sum(services, account.id) == (99_850, 99_850)
    assert await summary(services, account.id) == (99_850, 0)


async def test_a_busy_lease_grows_by_what_its_calls_take_in_a_horizon(
    services: AppServices,
) -> None:
    """After its first grant, a lease grows by what its calls reserved per horizon since the
    last grant (the rate measured over at least a tenth of a second), so a busy account's lease
    grows about once per horizon instead of every few calls."""
    now = [0.0]
    leases = book(services, calls=4, horizon=1.0, clock=lambda: now[0])
    account = await make_account(services, balance_micros=1_000_000)

    async def call() -> None:
        leases.finish(await leases.reserve(account.id, 100, 0), 100, None)

    await call()  # the first grant: room for `calls` calls, 100 * 4
    now[0] = 0.5
    for _ in range(4):  # three fit; the fourth grows: 400 taken in 0.5 s, 800 per second
        await call()
    now[0] = 0.52
    for _ in range(8):  # seven fit; the eighth grows: 800 taken in 0.02 s, over 0.1: 8,000
        await call()
    assert await entries_of(services, account.id) == [
        ("hold", -400),
        ("hold", -800),
        ("hold", -8_000),
    ]
    await leases.flush()
    assert await summary(services, account.id) == (1_000_000 - 1_300, 0)


async def test_the_minimum_balance_is_kept_as_with_one_hold_per_call(
    services: AppServices,
) -> None:
    """With one hold per call, holds of 100 against 6,000 and a 5,000 minimum succeed while the
    balance before each is at least 5,000: eleven of them. A lease admits the same eleven,
    checking the database when the lease alone cannot show the minimum."""
    leases = book(services, calls=2)
    account = await make_account(services, balance_micros=6_000)
    taken = [await leases.reserve(account.id, 100, 5_000) for _ in range(11)]
    with pytest.raises(ledger.InsufficientBalance):
        await leases.reserve(account.id, 100, 5_000)
    unbound = await leases.reserve(account.id, 100, 0)  # without the minimum, money remains
    balance, held = await summary(services, account.id)
    assert balance + held == 6_000
    for reservation in [*taken, unbound]:
        leases.finish(reservation, 0, None)
    await leases.flush()
    assert await summary(services, account.id) == (6_000, 0)


async def test_two_processes_never_overdraw_an_account(services: AppServices) -> None:
    """Two lease books (two server processes) serve 40 concurrent calls of at most 100 each
    against 1,000: never more charged than the balance, and the books balance."""
    account = await make_account(services, balance_micros=1_000)
    books = [book(services, calls=4), book(services, calls=4)]

    async def call(number: int) -> bool:
        leases = books[number % 2]
        try:
            reservation = await leases.reserve(account.id, 100, 0)
        except ledger.InsufficientBalance:
            return False
        await asyncio.sleep(0.05)
        leases.finish(reservation, 100, None)  # each call costs its whole worst case
        return True

    served = sum(await asyncio.gather(*(call(n) for n in range(40))))
    assert 1 <= served <= 10
    for leases in books:
        await leases.flush()
    assert await balance_and_ledger_sum(services, account.id) == (
        1_000 - 100 * served,
        1_000 - 100 * served,
    )
    assert all(status == "settled" for _, _, status in await holds_of(services, account.id))


async def test_an_idle_lease_closes_by_itself(services: AppServices) -> None:
    leases = book(services, idle=0.2)
    account = await make_account(services, balance_micros=10_000)
    leases.finish(await leases.reserve(account.id, 100, 0), 7, None)
    for _ in range(100):
        await services.meter.drain()
        if [status for _, _, status in await holds_of(services, account.id)] == ["settled"]:
            break
        await asyncio.sleep(0.05)
    assert await summary(services, account.id) == (10_000 - 7, 0)
    await leases.close()


async def test_a_lease_past_its_age_takes_no_new_call_and_closes_after_its_last(
    services: AppServices,
) -> None:
    leases = book(services, max_seconds=0.2)
    account = await make_account(services, balance_micros=10_000)
    old = await leases.reserve(account.id, 100, 0)
    await asyncio.sleep(0.3)
    new = await leases.reserve(account.id, 100, 0)  # a second lease
    assert old.lease is not new.lease
    leases.finish(old, 10, None)  # the old lease's last call: it closes
    await services.meter.drain()
    assert [status for _, _, status in await holds_of(services, account.id)] == [
        "settled",
        "open",
    ]
    leases.finish(new, 20, None)
    await leases.flush()
    assert await summary(services, account.id) == (10_000 - 30, 0)


async def test_a_caller_that_leaves_while_its_lease_grows_gives_its_reservation_back(
    services: AppServices,
) -> None:
    leases = book(services)
    account, lock, other = await hold_behind_a_lock(services, "a-lock-holder")
    waiting = asyncio.ensure_future(leases.reserve(account.id, 100, 0))
    await asyncio.sleep(0.1)
    waiting.cancel()
    await lock.commit()
    await lock.close()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    for _ in range(100):  # the grant finishes without its caller
        if leases.free(account.id):
            break
        await asyncio.sleep(0.05)
    services.meter.settler.submit(Settlement(hold_id=await other, cost_micros=0, log=None))
    await services.meter.drain()
    # All the lease holds is free: the reservation taken for the caller was given back.
    assert leases.free(account.id) == (await summary(services, account.id))[1] > 0
    await leases.flush(account.id)
    assert [status for _, _, status in await holds_of(services, account.id)] == [
        "released",  # the other hold
        "released",  # the lease, given back whole
    ]
    assert await balance_and_ledger_sum(services, account.id) == (10_000, 10_000)


async def test_a_negative_charge_against_a_lease_is_refused_and_changes_nothing(
    services: AppServices,
) -> None:
    leases = book(services)
    account = await make_account(services, balance_micros=10_000)
    reservation = await leases.reserve(account.id, 100, 0)
    hold_id = reservation.lease.hold_id
    assert hold_id is not None

    def charge(conn: Any) -> None:
        closing.charge_holds(conn, {hold_id: -1})

    with pytest.raises(ValueError, match="cannot be negative"):
        await services.database.write(charge)
    assert await holds_of(services, account.id) == [(400, None, "open")]
    leases.finish(reservation, 0, None)
    await leases.flush()
    assert await balance_and_ledger_sum(services, account.id) == (10_000, 10_000)


async def test_the_reaper_charges_what_a_dead_process_recorded_and_returns_the_rest(
    services: AppServices,
) -> None:
    leases = book(services)
    account = await make_account(services, balance_micros=10_000)
    leases.finish(await leases.reserve(account.id, 100, 0), 40, None)
    await services.meter.drain()  # the cost is recorded; the process then "dies"
    await reap(services, account.id)
    assert await holds_of(services, account.id) == [(400, 40, "expired")]
    assert await balance_and_ledger_sum(services, account.id) == (9_960, 9_960)


async def test_a_cost_that_arrives_after_the_reaper_is_still_charged(
    services: AppServices,
) -> None:
    leases = book(services)
    account = await make_account(services, balance_micros=10_000)
    reservation = await leases.reserve(account.id, 100, 0)
    await reap(services, account.id)
    leases.finish(reservation, 25, None)
    await services.meter.drain()
    assert await balance_and_ledger_sum(services, account.id) == (9_975, 9_975)
    assert (await entries_of(services, account.id))[-1] == ("usage", -25)


async def test_a_lease_closed_under_it_is_replaced(services: AppServices) -> None:
    leases = book(services)
    account = await make_account(services, balance_micros=10_000)
    leases.finish(await leases.reserve(account.id, 100, 0), 0, None)
    hold_id = await reap(services, account.id)
    big = await leases.reserve(account.id, 1_000, 0)  # does not fit: growing finds it closed
    assert big.lease.hold_id != hold_id
    leases.finish(big, 0, None)
    await leases.flush()
    assert [status for _, _, status in await holds_of(services, account.id)] == [
        "expired",
        "released",
    ]
    assert await balance_and_ledger_sum(services, account.id) == (10_000, 10_000)


async def reap(services: AppServices, account_id: uuid.UUID) -> uuid.UUID:
    """Expire the account's one open hold as the reaper does (after its process died); its id."""
    [hold_id] = await open_hold_ids(services, account_id)
    closed = await services.database.write(
        lambda conn: closing.close_recorded(conn, hold_id, expire=True)
    )
    assert closed
    return hold_id


async def open_hold_ids(services: AppServices, account_id: uuid.UUID) -> list[uuid.UUID]:
    async with services.database.sessions() as session:
        return list(
            await session.scalars(
                select(WalletHold.id).where(
                    WalletHold.account_id == account_id, WalletHold.status == "open"
                )
            )
        )


async def test_without_leases_each_call_holds_on_its_own(
    settings: Settings, fake_models: list[str]
) -> None:
    from aivax.inference.endpoints import respond
    from aivax.inference.schemas import ChatCompletionRequest

    services = AppServices.build(settings.model_copy(update={"wallet_lease_calls": 0}))
    try:
        account = await make_account(services, plan="starter", balance_micros=1_000_000)
        principal = await principal_of(services, account.private_key)
        body = ChatCompletionRequest.model_validate(
            {"model": "test/fake-ok", "messages": [{"role": "user", "content": "hi"}]}
        )
        response: Any = await respond(services, principal, body, "req_own_hold", None)
        assert response.status_code == 200
        await services.meter.drain()
        async with services.database.sessions() as session:
            hold = (
                await session.scalars(select(WalletHold).where(WalletHold.ref == "req_own_hold"))
            ).one()
            log = (
                await session.scalars(
                    select(RequestLog).where(RequestLog.request_id == "req_own_hold")
                )
            ).one()
        assert (hold.status, hold.actual_micros, log.cost_micros) == ("settled", 17, 17)
        assert await balance_and_ledger_sum(services, account.id) == (999_983, 999_983)
        # A balance short of the worst case: max_tokens clamped, held on its own.
        poor = await make_account(services, plan=await make_plan(services), balance_micros=500)
        clamped: Any = await respond(
            services, await principal_of(services, poor.private_key), body, "req_poor", None
        )
        assert clamped.status_code == 200
        assert "x-aivax-max-tokens-clamped" in clamped.headers
        await services.meter.drain()
        async with services.database.sessions() as session:
            held = (
                await session.scalars(select(WalletHold).where(WalletHold.ref == "req_poor"))
            ).one()
        assert held.amount_micros <= 500
        assert await balance_and_ledger_sum(services, poor.id) == (500 - 17, 500 - 17)
    finally:
        await services.close()


def test_a_lease_must_end_well_before_the_reaper_may_take_it(settings: Settings) -> None:
    with pytest.raises(ValidationError, match="at most half of AIVAX_HOLD_MAX_AGE_SECONDS"):
        Settings(
            _env_file=None,  # type: ignore[call-arg]
            database_url=settings.database_url,
            wallet_lease_max_seconds=1_000,
            hold_max_age_seconds=1_800,
        )


async def test_reading_the_wallet_charges_the_calls_of_an_idle_lease(
    client: Any, services: AppServices, admin_headers: dict[str, str], fake_models: list[str]
) -> None:
    """Through the API: after a call, the wallet and its ledger (the account's own view and
    the operator's) show the call charged and nothing held, the lease closed by the read."""
    account = await make_account(services, plan="starter", balance_micros=1_000_000)
    answer = await client.post(
        "/v1/chat/completions",
        headers=account.headers,
        json={"model": "test/fake-ok", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert answer.status_code == 200
    cost = int(answer.headers["x-aivax-cost-micros"])
    assert cost > 0
    await services.meter.drain()
    assert [status for _, _, status in await holds_of(services, account.id)] == ["open"]
    operator = await client.get(f"/admin/accounts/{account.id}/wallet", headers=admin_headers)
    assert (operator.json()["balance_micros"], operator.json()["held_micros"]) == (
        1_000_000 - cost,
        0,
    )
    own = (await client.get("/v1/wallet", headers=account.headers)).json()
    assert (own["balance_micros"], own["held_micros"]) == (1_000_000 - cost, 0)
    ledger_page = (await client.get("/v1/wallet/ledger", headers=account.headers)).json()
    kinds = [(entry["kind"], entry["details"].get("ref")) for entry in ledger_page["data"]]
    assert kinds[:3] == [("usage", None), ("release", None), ("hold", "lease")]
    assert ledger_page["data"][0]["amount_micros"] == -cost
    # The operator's ledger view closes an idle lease too, before it reads.
    again = await client.post(
        "/v1/chat/completions",
        headers=account.headers,
        json={"model": "test/fake-ok", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert again.status_code == 200
    await services.meter.drain()
    operator_ledger = await client.get(
        f"/admin/accounts/{account.id}/ledger", headers=admin_headers
    )
    newest = operator_ledger.json()["data"][0]
    assert (newest["kind"], newest["amount_micros"]) == ("usage", -cost)
    assert await summary(services, account.id) == (1_000_000 - 2 * cost, 0)


async def test_a_settlement_batch_takes_a_leases_account_before_its_hold(
    services: AppServices,
) -> None:
    """PostgreSQL: a lease grows by locking its account, then its hold. A settlement batch
    charging that lease must wait for the account first, never hold the hold's row while it
    waits (the two would deadlock once the batch also needs the account)."""
    if not services.database.is_postgresql:
        pytest.skip("PostgreSQL only: SQLite writes one transaction at a time")
    from sqlalchemy import update

    from aivax.models import Account
    from aivax.wallet.writer import _settle

    leases = book(services)
    account = await make_account(services, balance_micros=10_000)
    reservation = await leases.reserve(account.id, 100, 0)
    [hold_id] = await open_hold_ids(services, account.id)
    growing = services.database.sessions()  # a grant in progress: the account is locked
    await growing.execute(update(Account).where(Account.id == account.id).values(name=Account.name))
    batch = asyncio.ensure_future(
        services.database.run_write(lambda c: _settle(c, [(hold_id, 30, None, "lease")]))
    )
    try:
        await asyncio.sleep(0.3)
        assert not batch.done()  # waiting for the account
        async with services.database.sessions() as other:  # the hold's row is not locked
            await other.execute(
                select(WalletHold.id).where(WalletHold.id == hold_id).with_for_update(nowait=True)
            )
    finally:
        await growing.rollback()
        await growing.close()
    await batch
    assert await holds_of(services, account.id) == [(400, 30, "open")]
    leases.finish(reservation, 0, None)
    await leases.flush()
    assert await balance_and_ledger_sum(services, account.id) == (9_970, 9_970)


async def test_a_negative_adjustment_may_take_what_an_idle_lease_holds(
    client: Any, services: AppServices, admin_headers: dict[str, str]
) -> None:
    account = await make_account(services, balance_micros=10_000)
    services.meter.leases.finish(await services.meter.leases.reserve(account.id, 100, 0), 0, None)
    assert (await summary(services, account.id))[1] > 0  # held by the server's idle lease
    taken = await client.post(
        f"/admin/accounts/{account.id}/adjustments",
        headers=admin_headers,
        json={"amount_micros": -10_000, "description": "the whole balance"},
    )
    assert taken.status_code == 201, taken.text
    assert await summary(services, account.id) == (0, 0)
    assert await balance_and_ledger_sum(services, account.id) == (0, 0)
