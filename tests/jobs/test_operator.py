"""The operator's view of jobs: `/admin/jobs` (list with filters and cursor, show, retry,
cancel), `aivax jobs …`, `aivax serve --no-jobs`, and the account's `GET /v1/jobs/{id}`."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest
from click.testing import Result
from sqlalchemy import update
from typer.testing import CliRunner

from aivax import cli
from aivax.config import Settings
from aivax.jobs import enqueue
from aivax.models import Job
from aivax.services import AppServices
from tests.fixtures.assertions import assert_error
from tests.fixtures.factories import AccountWithKeys
from tests.jobs.support import unique_kind

runner = CliRunner()


async def _jobs(
    services: AppServices, account: AccountWithKeys, kind: str, count: int, **options: Any
) -> list[uuid.UUID]:
    """Jobs of a kind no runner has a handler for: they stay as the test leaves them."""
    ids = []
    async with services.database.sessions() as session:
        for index in range(count):
            job = await enqueue(session, kind, {"n": index}, account_id=account.id, **options)
            ids.append(job.id)
            await session.commit()
    return ids


async def _set(services: AppServices, job_id: uuid.UUID, **values: Any) -> None:
    async with services.database.sessions() as session:
        await session.execute(update(Job).where(Job.id == job_id).values(**values))
        await session.commit()


async def test_admin_lists_jobs_newest_first_with_filters_and_a_cursor(
    client: httpx.AsyncClient,
    services: AppServices,
    account: AccountWithKeys,
    admin_headers: dict[str, str],
) -> None:
    kind = unique_kind("listed")
    ids = await _jobs(services, account, kind, 3, queue="mail")
    await _set(services, ids[0], status="dead", error="ValueError: no")
    first = await client.get(f"/admin/jobs?kind={kind}&limit=2", headers=admin_headers)
    assert first.status_code == 200, first.text
    page = first.json()
    assert [job["id"] for job in page["data"]] == [str(ids[2]), str(ids[1])]
    assert page["has_more"] is True
    rest = await client.get(
        f"/admin/jobs?kind={kind}&limit=2&after={page['last_id']}", headers=admin_headers
    )
    assert [job["id"] for job in rest.json()["data"]] == [str(ids[0])]
    assert rest.json()["has_more"] is False
    dead = await client.get(f"/admin/jobs?kind={kind}&status=dead", headers=admin_headers)
    assert [(job["id"], job["error"]) for job in dead.json()["data"]] == [
        (str(ids[0]), "ValueError: no")
    ]
    other_queue = await client.get(f"/admin/jobs?kind={kind}&queue=default", headers=admin_headers)
    assert other_queue.json()["data"] == []
    shown = await client.get(f"/admin/jobs/{ids[1]}", headers=admin_headers)
    assert shown.json()["queue"] == "mail"
    assert shown.json()["payload"] == {"n": 1}
    assert_error(await client.get("/admin/jobs?status=exploded", headers=admin_headers), 400)
    assert_error(await client.get("/admin/jobs"), 401)
    assert_error(await client.get(f"/admin/jobs/{ids[1]}", headers=account.headers), 401)


async def test_admin_cancels_and_retries_jobs(
    client: httpx.AsyncClient,
    services: AppServices,
    account: AccountWithKeys,
    admin_headers: dict[str, str],
) -> None:
    kind = unique_kind("operated")
    queued, running, dead = await _jobs(services, account, kind, 3)
    await _set(services, running, status="running", attempts=1)
    await _set(services, dead, status="dead", attempts=3, error="RuntimeError: gone")

    cancelled = await client.post(f"/admin/jobs/{queued}/cancel", headers=admin_headers)
    assert cancelled.json()["status"] == "cancelled"
    marked = await client.post(f"/admin/jobs/{running}/cancel", headers=admin_headers)
    assert (marked.json()["status"], marked.json()["cancel_requested"]) == ("running", True)
    assert_error(
        await client.post(f"/admin/jobs/{queued}/cancel", headers=admin_headers),
        409,
        "job_finished",
    )

    retried = await client.post(f"/admin/jobs/{dead}/retry", headers=admin_headers)
    body = retried.json()
    assert (body["status"], body["attempts"], body["error"]) == ("queued", 0, "RuntimeError: gone")
    again = await client.post(f"/admin/jobs/{queued}/retry", headers=admin_headers)
    assert again.json()["status"] == "queued"
    assert_error(
        await client.post(f"/admin/jobs/{running}/retry", headers=admin_headers),
        409,
        "job_not_retryable",
    )
    missing = uuid.uuid4()
    for path in (f"/admin/jobs/{missing}", f"/admin/jobs/{missing}/retry"):
        method = client.get if path.endswith(str(missing)) else client.post
        assert_error(await method(path, headers=admin_headers), 404, "job_not_found")


async def test_retrying_a_job_whose_unique_key_is_taken_again_is_a_conflict(
    client: httpx.AsyncClient,
    services: AppServices,
    account: AccountWithKeys,
    admin_headers: dict[str, str],
) -> None:
    kind, key = unique_kind("keyed"), f"key:{uuid.uuid4()}"
    (old,) = await _jobs(services, account, kind, 1, unique_key=key)
    await _set(services, old, status="dead")
    (new,) = await _jobs(services, account, kind, 1, unique_key=key)
    assert new != old
    assert_error(
        await client.post(f"/admin/jobs/{old}/retry", headers=admin_headers), 409, "job_duplicate"
    )


async def test_an_account_sees_its_dead_job_as_failed_and_not_another_accounts_job(
    client: httpx.AsyncClient,
    services: AppServices,
    account: AccountWithKeys,
    other_account: AccountWithKeys,
) -> None:
    (job_id,) = await _jobs(services, account, unique_kind("mine"), 1)
    await _set(services, job_id, status="dead", error="ValueError: broken")
    seen = await client.get(f"/v1/jobs/{job_id}", headers=account.headers)
    assert (seen.json()["status"], seen.json()["error"]) == ("failed", "ValueError: broken")
    assert_error(
        await client.get(f"/v1/jobs/{job_id}", headers=other_account.headers),
        404,
        "job_not_found",
    )


@pytest.fixture
def cli_env(settings: Settings) -> dict[str, str]:
    return {
        "AIVAX_DATABASE_URL": settings.database_url,
        "AIVAX_SECRET_KEY": settings.secret_key.get_secret_value() if settings.secret_key else "",
        "AIVAX_DATA_DIR": str(settings.data_dir),
    }


async def _invoke(env: dict[str, str], *args: str) -> Result:
    return await asyncio.to_thread(runner.invoke, cli.app, list(args), env=env)


async def test_the_jobs_commands_list_show_cancel_and_retry(
    cli_env: dict[str, str], services: AppServices, account: AccountWithKeys
) -> None:
    kind = unique_kind("cli")
    (job_id,) = await _jobs(services, account, kind, 1)
    listed = await _invoke(cli_env, "jobs", "list", "--kind", kind)
    assert listed.exit_code == 0, listed.output
    assert str(job_id) in listed.stdout
    assert "queued" in listed.stdout
    shown = await _invoke(cli_env, "jobs", "show", str(job_id))
    assert json.loads(shown.stdout)["kind"] == kind
    cancelled = await _invoke(cli_env, "jobs", "cancel", str(job_id))
    assert json.loads(cancelled.stdout)["status"] == "cancelled"
    retried = await _invoke(cli_env, "jobs", "retry", str(job_id))
    assert json.loads(retried.stdout)["status"] == "queued"
    refused = await _invoke(cli_env, "jobs", "retry", str(job_id))
    assert refused.exit_code == 1
    assert "only dead, failed or cancelled jobs" in refused.output
    assert (await _invoke(cli_env, "jobs", "show", "nope")).exit_code == 1


@pytest.mark.parametrize(("flag", "enabled"), [("--no-jobs", False), ("--jobs", True)])
def test_serve_no_jobs_runs_the_api_without_job_workers(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, flag: str, enabled: bool
) -> None:
    import uvicorn

    from aivax import app as app_module

    built: list[Settings] = []
    monkeypatch.setattr(app_module, "create_app", lambda settings: built.append(settings))
    monkeypatch.setattr(uvicorn, "run", lambda *_, **__: None)
    monkeypatch.delenv("AIVAX_JOBS_ENABLED", raising=False)
    env = {**cli_env, "AIVAX_JOBS_ENABLED": str(not enabled).lower()}
    result = runner.invoke(cli.app, ["serve", "--no-migrate", flag], env=env)
    assert result.exit_code == 0, result.output
    assert [settings.jobs_enabled for settings in built] == [enabled]
