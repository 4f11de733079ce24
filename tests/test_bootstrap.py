"""First start bootstraps exactly once, even when two processes race."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import func, select

from aivax.bootstrap import bootstrap
from aivax.config import Settings
from aivax.migrate import upgrade_to_head
from aivax.models import Account, OperatorToken
from aivax.services import AppServices, load_or_create_secret
from tests.fixtures.factories import principal_of


@pytest.fixture
async def fresh_services(tmp_path: Path) -> AppServices:
    """A brand-new embedded database (bootstrap is global to a database)."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    await asyncio.to_thread(upgrade_to_head, url)
    settings = Settings(_env_file=None, database_url=url, data_dir=tmp_path)  # type: ignore[call-arg]
    return AppServices.build(settings)


async def test_bootstrap_runs_once_even_when_raced(fresh_services: AppServices) -> None:
    try:
        results = await asyncio.gather(*(bootstrap(fresh_services) for _ in range(4)))
        created = [r for r in results if r is not None]
        assert len(created) == 1
        assert await bootstrap(fresh_services) is None
        async with fresh_services.database.sessions() as session:
            accounts = await session.scalar(select(func.count()).select_from(Account))
            tokens = await session.scalar(select(func.count()).select_from(OperatorToken))
        assert accounts == 1
        assert tokens == 1
    finally:
        await fresh_services.close()


async def test_bootstrap_credentials_work_and_fund_the_demo_account(
    fresh_services: AppServices,
) -> None:
    try:
        credentials = await bootstrap(fresh_services)
        assert credentials is not None
        assert credentials.private_key is not None
        assert credentials.public_key is not None
        principal = await principal_of(fresh_services, credentials.private_key)
        async with fresh_services.database.sessions() as session:
            account = await session.get(Account, principal.account_id)
        assert account is not None
        assert account.plan_id == "free"
        assert account.balance_micros == fresh_services.settings.demo_balance_micros
        banner = credentials.banner("http://127.0.0.1:8000")
        assert credentials.admin_token in banner
        assert credentials.private_key in banner
    finally:
        await fresh_services.close()


def test_secret_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path / "data")  # type: ignore[call-arg]
    first = load_or_create_secret(settings)
    second = load_or_create_secret(settings)
    assert first == second
    assert len(first) >= 32
    assert (tmp_path / "data" / "secret.key").stat().st_mode & 0o777 == 0o600


def test_configured_secret_wins_and_no_file_is_written(tmp_path: Path) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=tmp_path, secret_key="s" * 40
    )
    assert load_or_create_secret(settings) == b"s" * 40
    assert not (tmp_path / "secret.key").exists()
