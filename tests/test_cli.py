"""The `aivax` command line against the test database (run in a worker thread, since each
command drives its own event loop)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from click.testing import Result
from typer.main import get_command
from typer.testing import CliRunner

from aivax.cli import app
from aivax.config import Settings
from tests.fixtures.factories import AccountWithKeys

runner = CliRunner()


@pytest.fixture
def cli_env(settings: Settings) -> dict[str, str]:
    return {
        "AIVAX_DATABASE_URL": settings.database_url,
        "AIVAX_SECRET_KEY": settings.secret_key.get_secret_value() if settings.secret_key else "",
        "AIVAX_DATA_DIR": str(settings.data_dir),
    }


async def invoke(env: dict[str, str], *args: str) -> Result:
    return await asyncio.to_thread(runner.invoke, app, list(args), env=env)


def as_json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


async def test_accounts_create_show_suspend_activate_set_plan(cli_env: dict[str, str]) -> None:
    created = as_json(await invoke(cli_env, "accounts", "create", "CLI Co", "--plan", "starter"))
    account_id = created["id"]
    assert created["plan"]["id"] == "starter"
    assert as_json(await invoke(cli_env, "accounts", "show", account_id))["name"] == "CLI Co"
    assert (
        as_json(await invoke(cli_env, "accounts", "suspend", account_id))["status"] == "suspended"
    )
    assert as_json(await invoke(cli_env, "accounts", "activate", account_id))["status"] == "active"
    moved = as_json(await invoke(cli_env, "accounts", "set-plan", account_id, "pro"))
    assert moved["plan"]["id"] == "pro"
    listed = await invoke(cli_env, "accounts", "list", "--limit", "100")
    assert account_id in listed.stdout


async def test_keys_create_list_revoke(cli_env: dict[str, str], account: AccountWithKeys) -> None:
    created = as_json(
        await invoke(
            cli_env,
            "keys",
            "create",
            str(account.id),
            "--public",
            "--origin",
            "https://x.example",
            "--name",
            "widget",
        )
    )
    assert created["key"].startswith("aivax_pk_")
    assert created["allowed_origins"] == ["https://x.example"]
    listed = await invoke(cli_env, "keys", "list", str(account.id))
    assert created["id"] in listed.stdout
    assert created["key"] not in listed.stdout
    revoked = as_json(await invoke(cli_env, "keys", "revoke", str(account.id), created["id"]))
    assert revoked["revoked_at"] is not None


async def test_wallet_topup_is_idempotent_and_show_and_check(
    cli_env: dict[str, str], account: AccountWithKeys
) -> None:
    args = ("wallet", "topup", str(account.id), "3.25", "--idempotency-key", "cli-1")
    first = as_json(await invoke(cli_env, *args))
    second = as_json(await invoke(cli_env, *args))
    assert first["replayed"] is False
    assert second["replayed"] is True
    shown = as_json(await invoke(cli_env, "wallet", "show", str(account.id)))
    assert shown["balance_usd"] == "4.250000"
    checked = await invoke(cli_env, "wallet", "check")
    assert checked.exit_code == 0, checked.output
    assert "0 mismatches" in checked.stdout
    reaped = await invoke(cli_env, "wallet", "reap")
    assert reaped.exit_code == 0
    assert "stale holds" in reaped.stdout


async def test_plans_list_and_set(cli_env: dict[str, str]) -> None:
    plans = as_json(await invoke(cli_env, "plans", "list"))
    assert {plan["id"] for plan in plans} >= {"free", "starter", "pro", "enterprise"}
    changed = as_json(
        await invoke(
            cli_env,
            "plans",
            "set",
            "enterprise",
            "batch_items_per_day=600000",
            'models_allowed=["*"]',
        )
    )
    assert changed["limits"]["batch_items_per_day"] == 600_000


async def test_admin_token_create_prints_a_working_token(cli_env: dict[str, str]) -> None:
    result = await invoke(cli_env, "admin-token", "create", "--name", "ops")
    assert result.exit_code == 0
    assert result.stdout.strip().startswith("aivax_admin_")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("accounts", "show", "not-an-id"), "not a valid id"),
        (("accounts", "show", str(uuid.UUID(int=1))), "No account"),
        (("accounts", "create", "X", "--plan", "platinum"), "No plan 'platinum'"),
        (("wallet", "topup", str(uuid.UUID(int=1)), "abc"), "not a USD amount"),
        (("plans", "set", "free", "no_such_limit=3"), "no_such_limit"),
        (("plans", "set", "free", "justtext"), "LIMIT=VALUE"),
        (("keys", "create", str(uuid.UUID(int=1)), "--origin", "x"), "origin"),
    ],
)
async def test_errors_are_one_line_with_nonzero_exit(
    cli_env: dict[str, str], args: tuple[str, ...], fragment: str
) -> None:
    result = await invoke(cli_env, *args)
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert fragment in lines[0]


async def test_unmigrated_database_gets_a_clear_error(
    cli_env: dict[str, str], tmp_path: Any
) -> None:
    env = {**cli_env, "AIVAX_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/empty.db"}
    result = await invoke(env, "plans", "list")
    assert result.exit_code == 1
    assert "run 'aivax migrate'" in result.stderr


async def test_invalid_setting_exits_2_with_one_line(cli_env: dict[str, str]) -> None:
    result = await invoke({**cli_env, "AIVAX_PORT": "abc"}, "serve")
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: invalid setting AIVAX_PORT")


def _all_command_paths() -> list[list[str]]:
    root = get_command(app)
    paths: list[list[str]] = [[]]
    for name, command in root.commands.items():  # type: ignore[attr-defined]
        paths.append([name])
        for sub in getattr(command, "commands", {}):
            paths.append([name, sub])
    return paths


@pytest.mark.parametrize("path", _all_command_paths(), ids=lambda p: " ".join(p) or "aivax")
def test_every_command_has_help(path: list[str]) -> None:
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.stdout
