"""Holds in use are renewed, so the reaper takes only a dead server's; and a cost that arrives
after its hold was taken anyway never takes a balance below zero (the shortfall is recorded for
the operator)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import httpx
from asgi_lifespan import LifespanManager
from sqlalchemy import select

from aivax.app import create_app
from aivax.config import Settings
from aivax.models import LedgerEntry, WalletHold
from aivax.services import AppServices
from aivax.wallet import closing
from aivax.wallet import service as wallet
from aivax.wallet.leases import LeaseBook
from aivax.wallet.live import LiveHolds
from aivax.wallet.settlement import Settlement
from tests.fixtures.factories import make_account
from tests.fixtures.wallet import balance_and_ledger_sum

MAX_AGE = timedelta(seconds=0.4)


async def _reap(services: AppServices, max_age: timedelta = MAX_AGE) -> int:
    async with services.database.sessions() as session:
        expired = await wallet.reap_stale_holds(session, max_age=max_age)
        await session.commit()
    return expired


async def _statuses(services: AppServices, account_id: uuid.UUID) -> list[str]:
    async with services.database.sessions() as session:
        rows = await session.scalars(
            select(WalletHold.status)
            .where(WalletHold.account_id == account_id)
            .order_by(WalletHold.created_at)
        )
        return list(rows)


async def _usage_details(services: AppServices, account_id: uuid.UUID) -> list[dict[str, object]]:
    async with services.database.sessions() as session:
        rows = await session.scalars(
            select(LedgerEntry.details)
            .where(LedgerEntry.account_id == account_id, LedgerEntry.kind == "usage")
            .order_by(LedgerEntry.id)
        )
        return list(rows)


def _book(services: AppServices, live: LiveHolds | None) -> LeaseBook:
    return LeaseBook(
        services.database,
        services.meter.settler,
        calls=4,
        idle_seconds=600,
        max_seconds=600,
        live=live,
    )


async def test_a_lease_in_use_is_renewed_past_the_maximum_age_and_the_reaper_leaves_it(
    services: AppServices,
) -> None:
    live = LiveHolds(services.database, max_age_seconds=MAX_AGE.total_seconds())
    renewed, forgotten = _book(services, live), _book(services, None)
    running = await make_account(services, balance_micros=10_000)
    dead = await make_account(services, balance_micros=10_000)
    long_call = await renewed.reserve(running.id, 1_000, 0)
    orphan = await forgotten.reserve(dead.id, 1_000, 0)  # a process that stopped renewing
    live.start()
    try:
        await asyncio.sleep(3 * MAX_AGE.total_seconds())
        assert await _reap(services) >= 1
    finally:
        await live.stop()
    assert await _statuses(services, running.id) == ["open"]
    assert await _statuses(services, dead.id) == ["expired"]
    renewed.finish(long_call, 700, None)
    await renewed.flush(running.id)
    assert await _statuses(services, running.id) == ["settled"]
    assert await balance_and_ledger_sum(services, running.id) == (9_300, 9_300)
    forgotten.finish(orphan, 0, None)
    await services.meter.drain()


async def test_a_call_own_hold_is_renewed_until_its_settlement_is_handed_over(
    services: AppServices,
) -> None:
    account = await make_account(services, balance_micros=10_000)
    hold_id = await services.meter.holds.hold(
        account_id=account.id, amount_micros=500, ref="req_long"
    )
    assert hold_id in services.meter.live
    await services.meter.live.renew()
    async with services.database.sessions() as session:
        renewed_at = await session.scalar(
            select(WalletHold.renewed_at).where(WalletHold.id == hold_id)
        )
    assert renewed_at is not None
    services.meter.settler.submit(Settlement(hold_id=hold_id, cost_micros=120, log=None))
    assert hold_id not in services.meter.live
    await services.meter.drain()
    assert await balance_and_ledger_sum(services, account.id) == (9_880, 9_880)


async def test_a_late_lease_charge_never_takes_the_balance_below_zero(
    services: AppServices, admin_headers: dict[str, str], client: httpx.AsyncClient
) -> None:
    """The reaper took a lease whose call was still running (its server stopped renewing, say
    for a long database outage); the balance was then spent; the call's cost arrives last."""
    leases = _book(services, None)
    account = await make_account(services, balance_micros=1_000)
    running = await leases.reserve(account.id, 1_000, 0)
    assert await _reap(services, timedelta(0)) >= 1
    spender = await services.meter.holds.hold(account_id=account.id, amount_micros=900, ref="req_2")
    services.meter.settler.submit(Settlement(hold_id=spender, cost_micros=900, log=None))
    await services.meter.drain()
    leases.finish(running, 400, None)  # only 100 is left
    await services.meter.drain()
    assert await balance_and_ledger_sum(services, account.id) == (0, 0)
    late = (await _usage_details(services, account.id))[-1]
    assert late == {"late": True, "shortfall_micros": 300}
    listed = await client.get("/admin/wallet/shortfalls", headers=admin_headers)
    assert listed.status_code == 200, listed.text
    mine = [e for e in listed.json()["data"] if e["account_id"] == str(account.id)]
    assert [(e["amount_micros"], e["details"]["shortfall_micros"]) for e in mine] == [(-100, 300)]


async def test_a_late_settlement_of_a_calls_own_hold_charges_only_what_is_left(
    services: AppServices,
) -> None:
    account = await make_account(services, balance_micros=1_000)
    hold_id = await services.meter.holds.hold(
        account_id=account.id, amount_micros=800, ref="req_late"
    )
    assert await services.database.write(
        lambda conn: closing.close_recorded(conn, hold_id, expire=True)
    )
    other = await services.meter.holds.hold(account_id=account.id, amount_micros=1_000, ref="req_b")
    await services.database.write(lambda conn: closing.settle(conn, other, 1_000))
    charged = await services.database.write(lambda conn: closing.settle(conn, hold_id, 600))
    assert charged == 0
    assert await balance_and_ledger_sum(services, account.id) == (0, 0)
    assert (await _usage_details(services, account.id))[-1] == {
        "late": True,
        "shortfall_micros": 600,
    }


async def test_a_stream_longer_than_the_hold_age_keeps_its_lease(
    settings: Settings, fake_models: list[str]
) -> None:
    """Through the API with short settings: the reaper runs every second and takes holds a
    second old; a stream of about three seconds keeps its lease (renewed) while other calls
    come and go, and is charged from it: nothing expires, nothing is charged late."""
    short = settings.model_copy(
        update={
            "hold_max_age_seconds": 1,
            "reaper_interval_seconds": 1,
            "wallet_lease_max_seconds": 0.5,
            "wallet_writer": "inline",
        }
    )
    services = AppServices.build(short)
    app = create_app(short, services=services)
    try:
        async with LifespanManager(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                account = await make_account(services, plan="starter", balance_micros=5_000)
                body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
                stream = asyncio.create_task(
                    client.post(
                        "/v1/chat/completions",
                        headers=account.headers,
                        json={"model": "test/fake-long", "stream": True, **body},
                    )
                )
                await asyncio.sleep(2.2)  # the reaper ran twice on a hold older than 1 s
                assert not stream.done()
                assert "open" in await _statuses(services, account.id)
                assert "expired" not in await _statuses(services, account.id)
                other = await client.post(
                    "/v1/chat/completions",
                    headers=account.headers,
                    json={"model": "test/fake-ok", **body},
                )
                assert other.status_code == 200, other.text
                streamed = await stream
                assert streamed.status_code == 200
                assert "[DONE]" in streamed.text
                await services.meter.flush(account.id)
        statuses = await _statuses(services, account.id)
        assert set(statuses) == {"settled"}, statuses
        balance, total = await balance_and_ledger_sum(services, account.id)
        assert balance == total
        assert 0 < balance < 5_000
        details = await _usage_details(services, account.id)
        assert not any(d.get("late") for d in details), details
    finally:
        await services.close()
