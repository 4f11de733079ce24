"""Settings: one validated object, read from `AIVAX_*` environment variables and `.env`.

Nothing else in the code base reads the environment; everything receives a `Settings`.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError as SourceError

LogLevel = Literal["debug", "info", "warning", "error", "critical"]

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./data/aivax.db"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="AIVAX_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    database_url: str = Field(
        default=DEFAULT_DATABASE_URL,
        description="SQLAlchemy async URL: sqlite+aiosqlite:///… or postgresql+asyncpg://…",
    )
    redis_url: str | None = Field(default=None, description="Redis URL for shared rate limits.")
    redis_outage: Literal["refuse", "local"] = Field(
        default="refuse",
        description="While Redis is unreachable: refuse calls that need a rate-limit decision "
        "(503 rate_limits_unavailable), or count them per process (local) for a while.",
    )
    redis_fallback_seconds: float = Field(
        default=300.0,
        gt=0,
        le=86_400,
        description="With redis_outage=local: the longest an outage is bridged by per-process "
        "counters before calls are refused.",
    )
    redis_timeout_seconds: float = Field(
        default=1.0,
        gt=0,
        le=10,
        description="Connect and socket timeout of each Redis command (one retry follows).",
    )
    secret_key: SecretStr | None = Field(
        default=None,
        description="Server secret (≥ 32 chars); unset: created in data_dir/secret.key.",
    )
    data_dir: Path = Field(default=Path("./data"), description="Where local state is kept.")
    host: str = Field(default="127.0.0.1", description="Address the HTTP server binds to.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port the HTTP server binds to.")
    log_level: LogLevel = Field(default="info", description="Log level.")
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Server processes `aivax serve` runs on one port; more than one needs "
        "AIVAX_REDIS_URL, so that rate limits are counted across them.",
    )
    max_body_bytes: int = Field(
        default=10 * 1024 * 1024, ge=1024, description="Largest accepted request body, in bytes."
    )
    hold_max_age_seconds: int = Field(
        default=1800, ge=60, description="Open wallet holds older than this are released."
    )
    reaper_interval_seconds: int = Field(
        default=60, ge=1, description="How often the server looks for stale holds."
    )
    key_touch_interval_seconds: int = Field(
        default=60, ge=1, description="A key's last-used time is written at most this often."
    )
    bootstrap_demo: bool = Field(
        default=True, description="Create a demo account with keys on first start."
    )
    demo_balance_micros: int = Field(
        default=5_000_000, ge=0, description="Starting balance of the demo account (micro-USD)."
    )
    db_pool_size: int = Field(default=10, ge=1, description="Database connection pool size.")
    wallet_async_commit: bool = Field(
        default=False,
        description="PostgreSQL: the wallet writer process commits without waiting for the "
        "disk (synchronous_commit=off); a database server crash can lose its last moments.",
    )
    wallet_writer: Literal["process", "inline"] = Field(
        default="process",
        description="Where wallet holds and settlements are written: a wallet-writer process "
        "of the server's own (process) or the server process itself (inline).",
    )
    wallet_lease_calls: int = Field(
        default=16,
        ge=0,
        le=10_000,
        description="Each server process reserves an account's balance for about this many "
        "calls at once (a wallet lease) and admits its calls against it in memory; 0: one "
        "database hold per call.",
    )
    wallet_lease_idle_seconds: float = Field(
        default=2.0,
        gt=0,
        le=3600,
        description="A wallet lease with no call for this long gives its balance back.",
    )
    wallet_lease_max_seconds: float = Field(
        default=60.0,
        gt=0,
        description="A wallet lease takes no new call after this long, and closes when its "
        "last call ends (must be well under hold_max_age_seconds).",
    )
    wallet_backlog_max: int = Field(
        default=10_000,
        ge=1,
        description="Settlements (a finished call's charge and request-log row) that may wait "
        "for a database that does not answer, kept in data_dir/wallet-journal; past this, "
        "paid calls get 503 wallet_unavailable.",
    )
    max_keys_per_account: int = Field(default=100, ge=1, description="API keys per account.")
    cache_seconds: float = Field(
        default=5.0,
        ge=0,
        description="How long keys, plans, models and gateways are cached per process.",
    )

    models_file: Path | None = Field(
        default=None, description="TOML file of integrated models and operator credentials."
    )
    ssrf_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts BYOK upstream URLs may use even though they are not public "
        "(comma-separated), e.g. an internal vLLM. Everything else private is refused.",
    )
    upstream_connect_timeout_seconds: float = Field(default=10.0, gt=0)
    upstream_read_timeout_seconds: float = Field(
        default=300.0, gt=0, description="Longest silence accepted from an upstream."
    )
    upstream_retries: int = Field(default=2, ge=0, le=5, description="Retries before 1st byte.")
    upstream_client: Literal["own", "httpx"] = Field(
        default="own",
        description="HTTP client for operator upstreams: own (an HTTP/1 client for chat, httpx "
        "on aiohttp for other calls) or httpx (httpx with its own transport for every call).",
    )
    # The proxy variables under their conventional names too (either case), as curl, httpx and
    # urllib read them; the AIVAX_ form wins when both are set.
    http_proxy: str | None = Field(
        default=None,
        validation_alias=AliasChoices("AIVAX_HTTP_PROXY", "HTTP_PROXY"),
        description="Forward proxy for http:// operator upstreams (also HTTP_PROXY).",
    )
    https_proxy: str | None = Field(
        default=None,
        validation_alias=AliasChoices("AIVAX_HTTPS_PROXY", "HTTPS_PROXY"),
        description="Forward proxy for https:// operator upstreams (also HTTPS_PROXY).",
    )
    no_proxy: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("AIVAX_NO_PROXY", "NO_PROXY"),
        description="Upstream hosts called directly although a proxy is set (also NO_PROXY): "
        "comma-separated names (suffix match), IP addresses or networks, host:port, or *.",
    )
    local_model_threads: int = Field(default=2, ge=1, description="CPU threads per local model.")
    local_model_max_waiting: int = Field(
        default=16, ge=0, description="Requests that may wait for a busy local model (then 503)."
    )
    rag_vector_cache_mb: int = Field(
        default=1024, ge=16, description="SQLite: memory for in-process collection vectors."
    )
    jobs_enabled: bool = Field(
        default=True,
        description="Run job workers in this process (`aivax serve`); `serve --no-jobs` turns "
        "them off for an API replica.",
    )
    jobs_poll_seconds: float = Field(
        default=1.0, gt=0, description="How often an idle worker looks for queued jobs."
    )
    jobs_lease_seconds: float = Field(
        default=120.0,
        ge=1,
        description="A running job whose worker stopped renewing its lease this long is resumed.",
    )
    jobs_concurrency: int = Field(
        default=2, ge=1, le=256, description="Jobs one process runs at the same time."
    )
    jobs_queues: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Queues this process takes jobs from (comma-separated); empty: all.",
    )
    rag_import_max_lines: int = Field(
        default=100_000, ge=1, description="Most lines one JSONL import may have."
    )
    rag_import_max_line_bytes: int = Field(
        default=1_000_000, ge=1_000, description="Longest JSONL import line, in bytes."
    )
    rag_upload_max_bytes: int = Field(
        default=20 * 1024 * 1024, ge=1_000, description="Largest document file upload."
    )
    sandbox_bwrap: str = Field(
        default="bwrap",
        description="bubblewrap executable (a name looked up on PATH, or a path); without it "
        "Bash and code execution are unavailable.",
    )
    sandbox_root: Path | None = Field(
        default=None, description="Where sandbox workspaces live; unset: data_dir/sandbox."
    )
    sandbox_uid: int = Field(
        default=65534,
        ge=1,
        le=2**32 - 2,
        description="When the server runs as root: the unprivileged host user sandboxes run as.",
    )
    sandbox_gid: int = Field(
        default=65534, ge=1, le=2**32 - 2, description="The group of sandbox_uid."
    )
    sandbox_idle_seconds: float = Field(
        default=3600.0, gt=0, description="A workspace unused this long is deleted."
    )
    sandbox_wall_seconds: float = Field(
        default=30.0, gt=0, le=3600, description="A sandboxed command is killed after this."
    )
    sandbox_cpu_seconds: int = Field(
        default=30, ge=1, le=3600, description="CPU seconds per process of a command."
    )
    sandbox_memory_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=16 * 1024 * 1024,
        description="Address space per process of a command (RLIMIT_AS).",
    )
    sandbox_processes: int = Field(
        default=64, ge=2, le=4096, description="Processes and threads a command may have."
    )
    sandbox_file_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="Largest file a command may write."
    )
    sandbox_open_files: int = Field(
        default=256, ge=16, le=65536, description="Open files per process of a command."
    )
    sandbox_workspace_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1024 * 1024, description="Largest workspace."
    )
    sandbox_output_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="Output (stdout + stderr) kept per command."
    )
    sandbox_tmp_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024 * 1024,
        description="Size of each of a command's in-memory /tmp and /dev/shm.",
    )
    metrics: bool = Field(
        default=False,
        description="Serve GET /metrics (Prometheus text format) to the operator admin token; "
        "off: no route, and nothing is recorded.",
    )
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="With metrics on: also serve /metrics without authentication on this port "
        "(bound to metrics_host), for a scraper on a private network.",
    )
    metrics_host: str = Field(default="127.0.0.1", description="Address the metrics port binds to.")
    metrics_dir: Path | None = Field(
        default=None,
        description="`aivax serve --workers N`: where each process writes its metrics for "
        "/metrics to add up (emptied at start); unset: data_dir/metrics.",
    )

    @field_validator("ssrf_allowlist", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [host.strip() for host in value.split(",") if host.strip()]
        return value

    @field_validator("jobs_queues", mode="before")
    @classmethod
    def _split_queues(cls, value: object) -> object:
        if isinstance(value, str):
            return [queue.strip() for queue in value.split(",") if queue.strip()]
        return value

    @field_validator("http_proxy", "https_proxy")
    @classmethod
    def _proxy_url(cls, value: str | None) -> str | None:
        """The messages never repeat the value: a proxy URL may carry a password."""
        value = (value or "").strip()
        if not value:
            return None
        if "://" not in value:  # a bare host:port means an http:// proxy, as curl and httpx read it
            value = f"http://{value}"
        parts = urlsplit(value)
        if parts.scheme.lower() not in ("http", "https"):
            raise ValueError(
                f"proxy scheme {parts.scheme!r} is not supported; use an http:// (or https://) "
                "proxy"
            )
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number from 0 to 65535
        except ValueError:
            raise ValueError("the proxy port must be a number from 0 to 65535") from None
        if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("must be a proxy address like http://proxy.example:3128")
        return value

    @field_validator("no_proxy", mode="before")
    @classmethod
    def _split_no_proxy(cls, value: object) -> object:
        """Entries as urllib matches them: `*.example.com` and `.example.com` both mean
        example.com and its subdomains; `[::1]` means ::1."""
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, list):
            return value
        entries = []
        for raw in value:
            entry = str(raw).strip().lower()
            if entry.startswith("*."):
                entry = entry[1:]
            if entry.startswith("[") and entry.endswith("]"):
                entry = entry[1:-1]
            if entry:
                entries.append(entry)
        return entries

    @field_validator("no_proxy")
    @classmethod
    def _no_proxy_networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            if "/" in entry:
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ValueError(
                        f"{entry!r} is not an IP network like 10.0.0.0/8; list host names "
                        "without a path"
                    ) from None
        return value

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with 'sqlite+aiosqlite://' or 'postgresql+asyncpg://'")
        return value

    @field_validator("secret_key")
    @classmethod
    def _long_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        """Rules between settings; the message names the variables."""
        if self.wallet_lease_max_seconds * 2 > self.hold_max_age_seconds:
            raise ValueError(
                "AIVAX_WALLET_LEASE_MAX_SECONDS must be at most half of "
                "AIVAX_HOLD_MAX_AGE_SECONDS (a lease's calls must end before the reaper may "
                "expire its hold)"
            )
        if self.workers > 1 and self.redis_url is None:
            raise ValueError(
                f"{self.workers} workers need AIVAX_REDIS_URL: without it each worker would "
                "count rate limits on its own, admitting up to that many times a plan's limits"
            )
        return self

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with 'redis://', 'rediss://' or 'unix://'")
        return value or None

    @model_validator(mode="after")
    def _sandbox_consistent(self) -> Settings:
        if self.sandbox_idle_seconds < 2 * self.sandbox_wall_seconds:
            raise ValueError(
                "AIVAX_SANDBOX_IDLE_SECONDS must be at least twice AIVAX_SANDBOX_WALL_SECONDS "
                "(a workspace must never look idle while a command runs in it)"
            )
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


SENSITIVE_SETTINGS = frozenset(
    {"secret_key", "database_url", "redis_url", "http_proxy", "https_proxy"}
)
# Settings also read under a conventional name (without the AIVAX_ prefix).
CONVENTIONAL_NAMES = {
    "http_proxy": "HTTP_PROXY",
    "https_proxy": "HTTPS_PROXY",
    "no_proxy": "NO_PROXY",
}


class SettingsError(Exception):
    """Settings failed validation; the message is one line naming the setting."""


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, turning validation errors into one clear line."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        if not first["loc"]:  # a rule between settings: its input is all of them, never shown
            message = first["msg"].removeprefix("Value error, ")
            raise SettingsError(f"invalid settings: {message}") from None
        # A field read through an alias is reported under the alias (`AIVAX_HTTP_PROXY`).
        field = str(first["loc"][0]).removeprefix("AIVAX_").lower()
        variable = f"AIVAX_{field.upper()}"
        if field in CONVENTIONAL_NAMES:
            variable = f"{variable} or {CONVENTIONAL_NAMES[field]}"
        # Values that may carry credentials are never echoed.
        shown = "" if field in SENSITIVE_SETTINGS else f" (got {first.get('input')!r})"
        raise SettingsError(f"invalid setting {variable}: {first['msg']}{shown}") from None
    except SourceError as exc:
        raise SettingsError(f"invalid settings: {str(exc).splitlines()[0]}") from None
