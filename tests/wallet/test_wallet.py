"""Wallet primitives against the real database: holds under concurrency, idempotency,
settle/release semantics, the reaper and the balance invariant."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from aivax.errors import AppError
from aivax.models import EntryKind, HoldStatus, LedgerEntry, WalletHold
from aivax.services import AppServices
from aivax.wallet import service as wallet
from tests.fixtures.factories import make_account
from tests.fixtures.wallet import balance_and_ledger_sum

pytestmark = pytest.mark.asyncio


async def _hold(services: AppServices, account_id: uuid.UUID, amount: int) -> uuid.UUID | None:
    async with services.database.sessions() as session:
        try:
            held = await wallet.hold(session, account_id=account_id, amount_micros=amount, ref="t")
        except wallet.InsufficientBalance:
            await session.rollback()
            return None
        await session.commit()
        return held.id


async def _run(services: AppServices, action: object) -> object:
    async with services.database.sessions() as session:
        result = await action(session)  # type: ignore[operator]
        await session.commit()
        return result


async def test_50_concurrent_holds_against_balance_for_10_admit_exactly_10(
    services: AppServices,
) -> None:
    account = await make_account(services, balance_micros=10_000)
    results = await asyncio.gather(*(_hold(services, account.id, 1_000) for _ in range(50)))
    admitted = [hold_id for hold_id in results if hold_id is not None]
    assert len(admitted) == 10
    balance, ledger_sum = await balance_and_ledger_sum(services, account.id)
    assert balance == 0
    assert ledger_sum == balance
    async with services.database.sessions() as session:
        lowest = await session.scalar(
            select(func.min(LedgerEntry.balance_after_micros)).where(
                LedgerEntry.account_id == account.id
            )
        )
        holds = await session.scalar(
            select(func.count()).where(
                WalletHold.account_id == account.id, WalletHold.status == HoldStatus.OPEN.value
            )
        )
    assert lowest is not None
    assert lowest >= 0
    assert holds == 10


async def test_hold_refused_with_402_and_no_retry_when_balance_is_short(
    services: AppServices,
) -> None:
    account = await make_account(services, balance_micros=500)
    async with services.database.sessions() as session:
        with pytest.raises(wallet.InsufficientBalance) as raised:
            await wallet.hold(session, account_id=account.id, amount_micros=501, ref="r")
    assert raised.value.status == 402
    assert raised.value.response_headers()["x-should-retry"] == "false"
    assert "0.000500 USD available" in raised.value.message
    assert await balance_and_ledger_sum(services, account.id) == (500, 500)


async def test_topup_replay_with_same_key_creates_one_entry(services: AppServices) -> None:
    account = await make_account(services)

    async def top_up(session: object) -> wallet.Posted:
        return await wallet.post_credit(
            session,  # type: ignore[arg-type]
            account_id=account.id,
            kind=EntryKind.TOPUP,
            amount_micros=2_500_000,
            idempotency_key="invoice-42",
        )

    first = await _run(services, top_up)
    second = await _run(services, top_up)
    assert isinstance(first, wallet.Posted)
    assert isinstance(second, wallet.Posted)
    assert first.created
    assert not second.created
    assert second.entry.id == first.entry.id
    assert await balance_and_ledger_sum(services, account.id) == (2_500_000, 2_500_000)


async def test_concurrent_topups_with_one_key_credit_once(services: AppServices) -> None:
    account = await make_account(services)

    async def top_up() -> bool:
        async with services.database.sessions() as session:
            posted = await wallet.post_credit(
                session,
                account_id=account.id,
                kind=EntryKind.TOPUP,
                amount_micros=700,
                idempotency_key="same-key",
            )
            await session.commit()
            return posted.created

    created = await asyncio.gather(*(top_up() for _ in range(12)))
    assert created.count(True) == 1
    assert await balance_and_ledger_sum(services, account.id) == (700, 700)


async def test_reusing_a_key_for_a_different_amount_is_a_conflict(services: AppServices) -> None:
    account = await make_account(services)
    async with services.database.sessions() as session:
        await wallet.post_credit(
            session,
            account_id=account.id,
            kind=EntryKind.TOPUP,
            amount_micros=100,
            idempotency_key="k1",
        )
        with pytest.raises(wallet.IdempotencyMismatch):
            await wallet.post_credit(
                session,
                account_id=account.id,
                kind=EntryKind.TOPUP,
                amount_micros=200,
                idempotency_key="k1",
            )


async def test_settle_charges_actual_returns_rest_and_is_idempotent(
    services: AppServices,
) -> None:
    account = await make_account(services, balance_micros=10_000)
    hold_id = await _hold(services, account.id, 4_000)
    assert hold_id is not None
    assert (await balance_and_ledger_sum(services, account.id))[0] == 6_000
    for _ in range(3):
        settled = await _run(services, lambda s: wallet.settle(s, hold_id, 1_500))
        assert isinstance(settled, WalletHold)
        assert settled.status == HoldStatus.SETTLED.value
        assert settled.actual_micros == 1_500
    assert await balance_and_ledger_sum(services, account.id) == (8_500, 8_500)
    async with services.database.sessions() as session:
        kinds = (
            await session.scalars(
                select(LedgerEntry.kind)
                .where(LedgerEntry.hold_id == hold_id)
                .order_by(LedgerEntry.id)
            )
        ).all()
    assert kinds == ["hold", "release", "usage"]


async def test_settle_never_charges_more_than_the_hold(services: AppServices) -> None:
    account = await make_account(services, balance_micros=10_000)
    hold_id = await _hold(services, account.id, 1_000)
    assert hold_id is not None
    await _run(services, lambda s: wallet.settle(s, hold_id, 5_000))
    assert await balance_and_ledger_sum(services, account.id) == (9_000, 9_000)
    async with services.database.sessions() as session:
        usage = await session.scalar(
            select(LedgerEntry).where(
                LedgerEntry.hold_id == hold_id, LedgerEntry.kind == EntryKind.USAGE.value
            )
        )
    assert usage is not None
    assert usage.details == {"uncollected_micros": 4_000}


async def test_release_is_idempotent_and_settle_after_release_is_refused(
    services: AppServices,
) -> None:
    account = await make_account(services, balance_micros=3_000)
    hold_id = await _hold(services, account.id, 3_000)
    assert hold_id is not None
    for _ in range(3):
        released = await _run(services, lambda s: wallet.release(s, hold_id))
        assert isinstance(released, WalletHold)
        assert released.status == HoldStatus.RELEASED.value
    assert await balance_and_ledger_sum(services, account.id) == (3_000, 3_000)
    async with services.database.sessions() as session:
        with pytest.raises(wallet.HoldAlreadyReleased):
            await wallet.settle(session, hold_id, 10)


async def test_release_after_settle_changes_nothing(services: AppServices) -> None:
    account = await make_account(services, balance_micros=3_000)
    hold_id = await _hold(services, account.id, 2_000)
    assert hold_id is not None
    await _run(services, lambda s: wallet.settle(s, hold_id, 500))
    released = await _run(services, lambda s: wallet.release(s, hold_id))
    assert isinstance(released, WalletHold)
    assert released.status == HoldStatus.SETTLED.value
    assert await balance_and_ledger_sum(services, account.id) == (2_500, 2_500)


async def test_concurrent_settle_and_release_of_one_hold_close_it_once(
    services: AppServices,
) -> None:
    account = await make_account(services, balance_micros=5_000)
    hold_id = await _hold(services, account.id, 5_000)
    assert hold_id is not None

    async def close(settle: bool) -> None:
        async with services.database.sessions() as session:
            try:
                if settle:
                    await wallet.settle(session, hold_id, 1_000)
                else:
                    await wallet.release(session, hold_id)
                await session.commit()
            except wallet.HoldAlreadyReleased:
                await session.rollback()

    await asyncio.gather(*(close(i % 2 == 0) for i in range(10)))
    balance, ledger_sum = await balance_and_ledger_sum(services, account.id)
    assert balance == ledger_sum
    assert balance in (4_000, 5_000)  # settled once (charged 1,000) or released once


async def test_reaper_releases_stale_holds_only(services: AppServices) -> None:
    account = await make_account(services, balance_micros=10_000)
    stale = await _hold(services, account.id, 3_000)
    fresh = await _hold(services, account.id, 2_000)
    assert stale is not None
    assert fresh is not None
    async with services.database.sessions() as session:
        old = (await session.get(WalletHold, stale)).created_at - timedelta(hours=2)  # type: ignore[union-attr]
        await session.execute(
            update(WalletHold).where(WalletHold.id == stale).values(created_at=old)
        )
        await session.commit()
    expired = await _run(services, lambda s: wallet.reap_stale_holds(s, max_age=timedelta(hours=1)))
    assert expired >= 1
    async with services.database.sessions() as session:
        assert (await session.get(WalletHold, stale)).status == HoldStatus.EXPIRED.value  # type: ignore[union-attr]
        assert (await session.get(WalletHold, fresh)).status == HoldStatus.OPEN.value  # type: ignore[union-attr]
    assert await balance_and_ledger_sum(services, account.id) == (8_000, 8_000)
    # The request that owned the stale hold finishes late: its usage is still billed.
    await _run(services, lambda s: wallet.settle(s, stale, 1_200))
    assert await balance_and_ledger_sum(services, account.id) == (6_800, 6_800)


async def test_negative_adjustment_cannot_overdraw(services: AppServices) -> None:
    account = await make_account(services, balance_micros=1_000)
    async with services.database.sessions() as session:
        with pytest.raises(wallet.InsufficientBalance):
            await wallet.post_credit(
                session,
                account_id=account.id,
                kind=EntryKind.ADJUSTMENT,
                amount_micros=-1_001,
                idempotency_key="adj",
            )
        with pytest.raises(wallet.InvalidAmount):
            await wallet.post_credit(
                session,
                account_id=account.id,
                kind=EntryKind.TOPUP,
                amount_micros=-5,
                idempotency_key="neg",
            )


async def test_invariant_holds_after_mixed_concurrent_traffic(services: AppServices) -> None:
    account = await make_account(services, balance_micros=50_000)

    async def request(i: int) -> None:
        hold_id = await _hold(services, account.id, 3_000)
        if hold_id is None:
            return
        if i % 3 == 0:
            await _run(services, lambda s: wallet.release(s, hold_id))
        else:
            await _run(services, lambda s: wallet.settle(s, hold_id, 100 * i))

    async def top_up(i: int) -> None:
        await _run(
            services,
            lambda s: wallet.post_credit(
                s,
                account_id=account.id,
                kind=EntryKind.TOPUP,
                amount_micros=1_000,
                idempotency_key=f"mixed-{i % 4}",
            ),
        )

    await asyncio.gather(*(request(i) for i in range(40)), *(top_up(i) for i in range(12)))
    balance, ledger_sum = await balance_and_ledger_sum(services, account.id)
    assert balance == ledger_sum
    assert balance >= 0
    async with services.database.sessions() as session:
        reports = await wallet.check_all_invariants(session)
    assert all(report.holds for report in reports)


async def test_hold_for_unknown_account_is_not_found(services: AppServices) -> None:
    async with services.database.sessions() as session:
        with pytest.raises(AppError) as raised:
            await wallet.hold(session, account_id=uuid.uuid4(), amount_micros=1, ref="x")
    assert raised.value.status == 404


async def test_usd_strings_are_exact_for_every_amount() -> None:
    """Micro-units as USD strings, checked against `Decimal` arithmetic, and back."""
    from decimal import Decimal

    from aivax.kit.money import micros_to_usd, usd_to_micros

    amounts = [0, 1, -1, 999_999, 1_000_000, -1_000_001, 1_250_000, 10**12, -(10**12)]
    amounts += [7**n for n in range(25)] + [-(3**n) for n in range(30)]
    for micros in amounts:
        expected = str((Decimal(micros) / 1_000_000).quantize(Decimal("0.000001")))
        assert micros_to_usd(micros) == expected, micros
        assert usd_to_micros(micros_to_usd(micros)) == micros
