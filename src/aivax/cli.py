"""`aivax` command line: run the server and operate accounts, keys, wallets and plans.

Commands talk to the database directly (no running server needed) through the same services
the API uses. Errors print one line and exit non-zero.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from aivax.accounts import service as account_service
from aivax.accounts.schemas import AdminAccountUpdate
from aivax.auth import operator_tokens
from aivax.catalog.service import ModelsFileError
from aivax.config import Settings, SettingsError, load_settings
from aivax.errors import AppError
from aivax.jobs import service as job_service
from aivax.jobs.schemas import JobRead as AdminJobRead
from aivax.keys import service as key_service
from aivax.keys.schemas import KeyCreate, KeyKind, KeyRead
from aivax.kit.money import micros_to_usd, usd_to_micros
from aivax.migrate import current_revision, head_revision, upgrade_to_head
from aivax.models import EntryKind
from aivax.plans import service as plan_service
from aivax.plans.schemas import PlanRead, PlanUpdate
from aivax.services import AppServices
from aivax.wallet import service as wallet_service
from aivax.wallet.schemas import LedgerEntryRead

T = TypeVar("T")
logger = logging.getLogger("aivax")

app = typer.Typer(
    help="AIVAX: OpenAI-compatible AI orchestration platform.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold secrets
)
accounts_app = typer.Typer(
    help="Create, list, show, suspend accounts; change their plan.", no_args_is_help=True
)
keys_app = typer.Typer(help="Create, list and revoke an account's API keys.", no_args_is_help=True)
wallet_app = typer.Typer(help="Top up, inspect and check wallets.", no_args_is_help=True)
plans_app = typer.Typer(help="List plans and edit their limits.", no_args_is_help=True)
admin_app = typer.Typer(help="Operator admin tokens.", no_args_is_help=True)
jobs_app = typer.Typer(
    help="List, inspect, retry and cancel background jobs.", no_args_is_help=True
)
app.add_typer(accounts_app, name="accounts")
app.add_typer(keys_app, name="keys")
app.add_typer(wallet_app, name="wallet")
app.add_typer(plans_app, name="plans")
app.add_typer(admin_app, name="admin-token")
app.add_typer(jobs_app, name="jobs")


class CliError(Exception):
    """A failure reported as one line on stderr."""


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


def settings_or_exit(**overrides: Any) -> Settings:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None


def run(action: Callable[[AppServices, AsyncSession], Awaitable[T]]) -> T:
    """Run one command in one transaction against a migrated database."""
    settings = settings_or_exit()

    async def main() -> T:
        services = AppServices.build(settings)
        try:
            async with services.database.sessions() as session:
                revision = await current_revision(session)
                if revision != head_revision():
                    raise CliError(
                        "the database schema is not up to date; run 'aivax migrate' first"
                    )
                result = await action(services, session)
                await session.commit()
                return result
        finally:
            await services.close()

    try:
        return asyncio.run(main())
    except (AppError, CliError, ValueError) as exc:
        fail(str(exc))
    except SQLAlchemyError as exc:
        fail(f"database error: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    raise AssertionError("unreachable")  # pragma: no cover


def show(value: BaseModel | dict[str, Any] | list[Any]) -> None:
    data = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    typer.echo(json.dumps(data, indent=2, default=str))


def parse_uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        fail(f"{what} {value!r} is not a valid id")
    raise AssertionError("unreachable")  # pragma: no cover


AccountArg = Annotated[str, typer.Argument(help="Account id.")]


# --- server ------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (AIVAX_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (AIVAX_PORT).")] = None,
    migrate: Annotated[bool, typer.Option(help="Apply migrations before starting.")] = True,
    workers: Annotated[
        int | None,
        typer.Option(help="Server processes (AIVAX_WORKERS); more than one needs AIVAX_REDIS_URL."),
    ] = None,
    jobs: Annotated[
        bool | None,
        typer.Option(
            "--jobs/--no-jobs",
            help="Run job workers in the server processes (AIVAX_JOBS_ENABLED); --no-jobs for "
            "an API replica next to `aivax worker` processes.",
        ),
    ] = None,
) -> None:
    """Migrate, bootstrap on first start, and run the HTTP server."""
    import uvicorn

    from aivax.app import create_app
    from aivax.bootstrap import bootstrap

    settings = settings_or_exit(host=host, port=port, workers=workers, jobs_enabled=jobs)
    if jobs is not None:
        # The processes of `--workers N` read their settings from the environment.
        os.environ["AIVAX_JOBS_ENABLED"] = "true" if jobs else "false"
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if migrate:
            upgrade_to_head(settings.database_url)
        services = AppServices.build(settings)
        credentials = asyncio.run(_bootstrap_and_close(services, bootstrap))
    except ModelsFileError as exc:
        fail(str(exc))
    except (SQLAlchemyError, OSError, ValueError) as exc:
        fail(f"cannot start: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    if credentials is not None:
        typer.echo(credentials.banner(f"http://{settings.host}:{settings.port}"))
    sys.stdout.flush()
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        # One access-log line per request at info and debug; above that, uvicorn would still
        # format each line's arguments before dropping it.
        "access_log": settings.log_level in ("debug", "info"),
        "server_header": False,
    }
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **options)
        return
    # uvicorn binds the port here and starts each worker as a new interpreter, which builds
    # its own app (services, wallet writer, leases) from the environment.
    try:
        _share_metrics(settings)
    except OSError as exc:
        fail(f"cannot start: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    uvicorn.run("aivax.app:app_from_environment", factory=True, workers=settings.workers, **options)


def _share_metrics(settings: Settings) -> None:
    """With metrics on, the workers write their metrics to files in one directory, which
    /metrics adds up whichever worker answers. prometheus-client reads the directory from
    PROMETHEUS_MULTIPROC_DIR when a worker imports it, so it is set before they start; the
    files of an earlier run are deleted first (counters start again from zero)."""
    if not settings.metrics:
        return
    directory = (settings.metrics_dir or settings.data_dir / "metrics").resolve()
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


async def _bootstrap_and_close(services: AppServices, bootstrap: Callable[..., Any]) -> Any:
    """Bootstrap once and create the models file's entries, so a bad file stops `serve` with
    one clear line instead of a failed application start."""
    from aivax.app import seed_models

    try:
        await seed_models(services)  # first: a bad file must not swallow the one-time banner
        return await bootstrap(services)
    finally:
        await services.close()


@app.command()
def worker(
    queues: Annotated[
        str | None,
        typer.Option(help="Comma-separated queues to take jobs from (AIVAX_JOBS_QUEUES); all."),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(min=1, max=256, help="Jobs run at the same time (AIVAX_JOBS_CONCURRENCY)."),
    ] = None,
    register: Annotated[
        list[str] | None,
        typer.Option(
            help="MODULE:FUNCTION called with the services to register more job handlers "
            "(repeatable).",
        ),
    ] = None,
) -> None:
    """Run job workers without the HTTP server, until SIGTERM or Ctrl-C; jobs still running
    then are queued again at once."""
    settings = settings_or_exit(jobs_enabled=True, jobs_queues=queues, jobs_concurrency=concurrency)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        extensions = [_load_extension(spec) for spec in register or []]
    except (ImportError, AttributeError, ValueError) as exc:
        fail(f"cannot load a --register hook: {exc}")
    try:
        asyncio.run(_work(settings, extensions))
    except CliError as exc:
        fail(str(exc))
    except (SQLAlchemyError, OSError) as exc:
        fail(f"worker stopped: {type(exc).__name__}: {str(exc).splitlines()[0]}")


def _load_extension(spec: str) -> Callable[[AppServices], None]:
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(f"{spec!r} is not MODULE:FUNCTION")
    function: Callable[[AppServices], None] = getattr(
        importlib.import_module(module_name), function_name
    )
    return function


async def _work(settings: Settings, extensions: list[Callable[[AppServices], None]]) -> None:
    """What `aivax serve` runs in the background (the app's lifespan: wallet meter, reaper,
    job workers), without HTTP."""
    from aivax.app import create_app

    services = AppServices.build(settings)
    try:
        async with services.database.sessions() as session:
            if await current_revision(session) != head_revision():
                raise CliError("the database schema is not up to date; run 'aivax migrate' first")
        for extension in extensions:
            extension(services)
        application = create_app(settings, services=services)
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopped.set)
        async with application.router.lifespan_context(application):
            logger.info(
                "job worker %s: queues %s, concurrency %d",
                services.jobs.worker_id,
                ",".join(settings.jobs_queues) or "all",
                settings.jobs_concurrency,
            )
            await stopped.wait()
    finally:
        await services.close()


@app.command("migrate")
def migrate_command() -> None:
    """Apply database migrations up to the newest schema."""
    settings = settings_or_exit()
    try:
        upgrade_to_head(settings.database_url)
    except (SQLAlchemyError, OSError) as exc:
        fail(f"migration failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    typer.echo(f"database at revision {head_revision()}")


# --- accounts ----------------------------------------------------------------------------


@accounts_app.command("create")
def accounts_create(
    name: Annotated[str, typer.Argument(help="Account name.")],
    plan: Annotated[str, typer.Option(help="Plan id.")] = "free",
) -> None:
    """Create an account."""

    async def action(services: AppServices, session: AsyncSession) -> Any:
        account = await account_service.create(
            session, name=name, plan_id=plan, secret_box=services.secret_box
        )
        return await account_service.read(session, account)

    show(run(action))


@accounts_app.command("list")
def accounts_list(
    limit: Annotated[int, typer.Option(min=1, max=100, help="How many.")] = 50,
) -> None:
    """List accounts, newest first."""

    async def action(_: AppServices, session: AsyncSession) -> Any:
        return await account_service.list_page(session, limit=limit, after=None)

    for account in list(run(action))[:limit]:
        typer.echo(
            f"{account.id}  {account.status:<9}  {account.plan_id:<10}  "
            f"{micros_to_usd(account.balance_micros):>14} USD  {account.name}"
        )


@accounts_app.command("show")
def accounts_show(account_id: AccountArg) -> None:
    """Show one account."""
    target = parse_uuid(account_id, "account")

    async def action(_: AppServices, session: AsyncSession) -> Any:
        return await account_service.read(session, await account_service.get(session, target))

    show(run(action))


def _update_account(account_id: str, data: AdminAccountUpdate) -> None:
    target = parse_uuid(account_id, "account")

    async def action(_: AppServices, session: AsyncSession) -> Any:
        account = await account_service.update_as_operator(session, target, data)
        return await account_service.read(session, account)

    show(run(action))


@accounts_app.command("suspend")
def accounts_suspend(account_id: AccountArg) -> None:
    """Suspend an account: its keys get 403 until it is activated again."""
    _update_account(account_id, AdminAccountUpdate(status="suspended"))


@accounts_app.command("activate")
def accounts_activate(account_id: AccountArg) -> None:
    """Re-activate a suspended account."""
    _update_account(account_id, AdminAccountUpdate(status="active"))


@accounts_app.command("set-plan")
def accounts_set_plan(
    account_id: AccountArg, plan: Annotated[str, typer.Argument(help="Plan id.")]
) -> None:
    """Move an account to another plan."""
    _update_account(account_id, AdminAccountUpdate(plan=plan))


# --- keys --------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    account_id: AccountArg,
    name: Annotated[str, typer.Option(help="Key name.")] = "",
    public: Annotated[bool, typer.Option("--public", help="Create a public key.")] = False,
    origin: Annotated[
        list[str] | None, typer.Option(help="Allowed origin (public keys; repeatable).")
    ] = None,
) -> None:
    """Create an API key; the secret is printed once."""
    target = parse_uuid(account_id, "account")
    try:
        data = KeyCreate(
            name=name,
            kind=KeyKind.PUBLIC if public else KeyKind.PRIVATE,
            allowed_origins=origin or [],
        )
    except ValidationError as exc:
        fail(str(exc.errors()[0]["msg"]))

    async def action(services: AppServices, session: AsyncSession) -> Any:
        await account_service.get(session, target)
        key, token = await key_service.create(
            session,
            account_id=target,
            data=data,
            secret=services.secret,
            max_keys=services.settings.max_keys_per_account,
        )
        return {**KeyRead.model_validate(key).model_dump(mode="json"), "key": token}

    show(run(action))


@keys_app.command("list")
def keys_list(account_id: AccountArg) -> None:
    """List an account's keys."""
    target = parse_uuid(account_id, "account")

    async def action(_: AppServices, session: AsyncSession) -> Any:
        await account_service.get(session, target)
        return await key_service.list_keys(session, target)

    for key in run(action):
        state = "revoked" if key.revoked_at else "active"
        typer.echo(f"{key.id}  {key.kind:<7}  {state:<7}  {key.display_prefix}…  {key.name}")


@keys_app.command("revoke")
def keys_revoke(
    account_id: AccountArg, key_id: Annotated[str, typer.Argument(help="Key id.")]
) -> None:
    """Revoke a key: it gets 401 from now on."""
    target, key_target = parse_uuid(account_id, "account"), parse_uuid(key_id, "key")

    async def action(_: AppServices, session: AsyncSession) -> Any:
        key = await key_service.revoke(session, target, key_target, keep_last_private=False)
        return KeyRead.model_validate(key)

    show(run(action))


# --- wallet ------------------------------------------------------------------------------


@wallet_app.command("topup")
def wallet_topup(
    account_id: AccountArg,
    amount_usd: Annotated[str, typer.Argument(help="Amount in USD, e.g. 10 or 2.50.")],
    idempotency_key: Annotated[
        str | None, typer.Option(help="Replaying a key tops up only once.")
    ] = None,
    description: Annotated[str, typer.Option(help="Ledger description.")] = "CLI top-up",
) -> None:
    """Add money to an account's wallet."""
    target = parse_uuid(account_id, "account")
    try:
        micros = usd_to_micros(amount_usd)
    except (ArithmeticError, ValueError):
        fail(f"amount {amount_usd!r} is not a USD amount like 10 or 2.50")

    async def action(_: AppServices, session: AsyncSession) -> Any:
        await account_service.get(session, target)
        posted = await wallet_service.post_credit(
            session,
            account_id=target,
            kind=EntryKind.TOPUP,
            amount_micros=micros,
            idempotency_key=idempotency_key or f"cli:{uuid.uuid4()}",
            description=description,
        )
        return {
            "replayed": not posted.created,
            "entry": LedgerEntryRead.model_validate(posted.entry).model_dump(mode="json"),
        }

    show(run(action))


@wallet_app.command("show")
def wallet_show(account_id: AccountArg) -> None:
    """Show balance, holds and the newest ledger entries."""
    target = parse_uuid(account_id, "account")

    async def action(_: AppServices, session: AsyncSession) -> Any:
        summary = await wallet_service.summary(session, target)
        entries = await wallet_service.list_entries(
            session, target, limit=10, after=None, kind=None
        )
        return {
            "balance_usd": micros_to_usd(summary.balance_micros),
            "held_usd": micros_to_usd(summary.held_micros),
            "recent": [LedgerEntryRead.model_validate(e).model_dump(mode="json") for e in entries],
        }

    show(run(action))


@wallet_app.command("reap")
def wallet_reap() -> None:
    """Release holds older than AIVAX_HOLD_MAX_AGE_SECONDS now."""

    async def action(services: AppServices, session: AsyncSession) -> int:
        max_age = timedelta(seconds=services.settings.hold_max_age_seconds)
        return await wallet_service.reap_stale_holds(session, max_age=max_age)

    typer.echo(f"released {run(action)} stale holds")


@wallet_app.command("check")
def wallet_check() -> None:
    """Check that every cached balance equals the sum of its ledger entries."""

    async def action(_: AppServices, session: AsyncSession) -> Any:
        return await wallet_service.check_all_invariants(session)

    reports = run(action)
    broken = [r for r in reports if not r.holds]
    for report in broken:
        typer.echo(
            f"MISMATCH {report.account_id}: cached {report.cached_balance_micros} "
            f"!= ledger {report.ledger_sum_micros}",
            err=True,
        )
    typer.echo(f"checked {len(reports)} accounts, {len(broken)} mismatches")
    if broken:
        raise typer.Exit(code=1)


# --- plans -------------------------------------------------------------------------------


@plans_app.command("list")
def plans_list() -> None:
    """List plans with their limits."""

    async def action(_: AppServices, session: AsyncSession) -> Any:
        return [
            PlanRead.model_validate(p).model_dump(mode="json")
            for p in await plan_service.list_plans(session)
        ]

    show(run(action))


def _parse_assignment(assignment: str) -> tuple[str, Any]:
    name, sep, raw = assignment.partition("=")
    if not sep or not name:
        raise ValueError(f"expected LIMIT=VALUE, got {assignment!r}")
    try:
        return name, json.loads(raw)
    except json.JSONDecodeError:
        return name, raw


@plans_app.command("set")
def plans_set(
    plan_id: Annotated[str, typer.Argument(help="Plan id, e.g. free.")],
    assignments: Annotated[
        list[str],
        typer.Argument(
            help="LIMIT=VALUE pairs, e.g. integrated_rpm=30 models_allowed='[\"aivax/*\"]'"
        ),
    ],
) -> None:
    """Change limits of a plan (other limits keep their values)."""
    try:
        changes = dict(_parse_assignment(a) for a in assignments)
    except ValueError as exc:
        fail(str(exc))

    async def action(_: AppServices, session: AsyncSession) -> Any:
        plan = await plan_service.update(session, plan_id, PlanUpdate(limits=changes))
        return PlanRead.model_validate(plan)

    show(run(action))


# --- jobs --------------------------------------------------------------------------------

JobArg = Annotated[str, typer.Argument(help="Job id.")]


def _job_json(job: Any) -> dict[str, Any]:
    return AdminJobRead.model_validate(job).model_dump(mode="json")


@jobs_app.command("list")
def jobs_list(
    status: Annotated[
        str | None, typer.Option(help="queued, running, done, failed, dead or cancelled.")
    ] = None,
    kind: Annotated[str | None, typer.Option(help="Job kind.")] = None,
    queue: Annotated[str | None, typer.Option(help="Queue name.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100, help="How many.")] = 20,
) -> None:
    """List jobs, newest first."""

    async def action(_: AppServices, session: AsyncSession) -> Any:
        return await job_service.list_page(
            session, kind=kind, status=status, queue=queue, limit=limit
        )

    for job in list(run(action))[:limit]:
        error = f"  {job.error.splitlines()[0][:80]}" if job.error else ""
        typer.echo(
            f"{job.id}  {job.status:<9}  {job.queue:<10}  {job.kind:<20}  "
            f"attempts {job.attempts}{error}"
        )


@jobs_app.command("show")
def jobs_show(job_id: JobArg) -> None:
    """Show one job."""
    target = parse_uuid(job_id, "job")

    async def action(_: AppServices, session: AsyncSession) -> Any:
        return _job_json(await job_service.get(session, target))

    show(run(action))


@jobs_app.command("retry")
def jobs_retry(job_id: JobArg) -> None:
    """Queue a dead, failed or cancelled job again, with all its attempts."""
    target = parse_uuid(job_id, "job")

    async def action(_: AppServices, session: AsyncSession) -> Any:
        return _job_json(await job_service.retry(session, target))

    show(run(action))


@jobs_app.command("cancel")
def jobs_cancel(job_id: JobArg) -> None:
    """Cancel a queued job at once, or ask a running one to stop."""
    target = parse_uuid(job_id, "job")

    async def action(_: AppServices, session: AsyncSession) -> Any:
        return _job_json(await job_service.cancel(session, target))

    show(run(action))


# --- operator tokens ---------------------------------------------------------------------


@admin_app.command("create")
def admin_token_create(
    name: Annotated[str, typer.Option(help="Token name.")] = "cli",
) -> None:
    """Create an operator admin token for /admin; it is printed once."""

    async def action(services: AppServices, session: AsyncSession) -> str:
        _, token = await operator_tokens.create(session, name=name, secret=services.secret)
        return token

    typer.echo(run(action))


def main() -> None:
    app()
