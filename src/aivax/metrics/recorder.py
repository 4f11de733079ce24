"""What is recorded, and how: `Metrics` records nothing (metrics off), `PrometheusMetrics`
records into prometheus-client counters and histograms.

Labels are kept to bounded sets: a catalog model id (a bring-your-own-key model, whose name the
account chooses, is labelled `byok/<provider>`), whether a gateway served the call (never the
gateway's id: one series per gateway of every account would grow without bound), an HTTP status,
a limit kind, a refusal code, a job kind and outcome (both fixed in code).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.metrics import disable_created_metrics

from aivax.config import Settings

# LLM calls take from tens of milliseconds (a cached or tiny answer) to minutes (long outputs).
CALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
# Jobs range from an instant to an hour-long import.
JOB_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


def multiprocess_mode() -> bool:
    """Whether prometheus-client writes this process's values to files for another process to
    add up. The library decides once, when imported, from `PROMETHEUS_MULTIPROC_DIR`, which
    `aivax serve --workers N` sets for its processes."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


class Metrics:
    """Metrics off: every method returns at once (one method call on the hot path)."""

    enabled = False

    def record_call(self, log: Mapping[str, Any]) -> None:
        """One model request ended; `log` is its request-log row (`wallet.meter.log_row`)."""

    def rate_limited(self, limit: str) -> None:
        """The rate limiter refused a hit on a limit of kind `limit`."""

    def wallet_refused(self, reason: str) -> None:
        """The wallet meter refused a reservation; `reason` is the error code."""

    def job_claimed(self, kind: str, waited_seconds: float) -> None:
        """A worker claimed a job that had been due for `waited_seconds`."""

    def job_finished(self, kind: str, outcome: str, run_seconds: float) -> None:
        """A job's attempt ended as `outcome` after running `run_seconds`."""


NO_METRICS = Metrics()


@dataclass(frozen=True, slots=True)
class _CallSeries:
    """The children of one (model, via_gateway, status): looked up once, then reused."""

    calls: Any
    latency: Any
    ttft: Any
    tokens_in: Any
    tokens_out: Any
    cost: Any


class PrometheusMetrics(Metrics):
    enabled = True

    def __init__(self) -> None:
        self.multiprocess = multiprocess_mode()
        self.registry = CollectorRegistry()
        # `_created` samples double every counter's output for a timestamp scrapers rarely use
        # (multiprocess mode never writes them).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        # In multiprocess mode values go to this process's files, and the exposition reads
        # every process's files instead of a registry.
        registry = None if self.multiprocess else self.registry
        call = ["model", "via_gateway", "status"]
        self.calls = Counter(
            "aivax_calls", "Model requests (request-log rows).", call, registry=registry
        )
        self.latency = Histogram(
            "aivax_call_duration_seconds",
            "Duration of a model request, from its admission to its last byte.",
            ["model"],
            buckets=CALL_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "aivax_call_time_to_first_token_seconds",
            "Time from a model request's admission to its first content.",
            ["model"],
            buckets=CALL_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "aivax_call_tokens",
            "Tokens of model requests (input: prompt, output: completion).",
            ["model", "direction"],
            registry=registry,
        )
        self.cost = Counter(
            "aivax_call_cost_micros",
            "Charged cost of model requests, in micro-USD.",
            ["model"],
            registry=registry,
        )
        self.rate_refusals = Counter(
            "aivax_rate_limit_refusals",
            "Hits the rate limiter refused (429), by limit.",
            ["limit"],
            registry=registry,
        )
        self.wallet_refusals = Counter(
            "aivax_wallet_refusals",
            "Reservations the wallet meter refused, by error code.",
            ["reason"],
            registry=registry,
        )
        self.jobs_finished = Counter(
            "aivax_jobs_finished",
            "Job attempts that ended, by outcome (retry: queued again after a failure).",
            ["kind", "outcome"],
            registry=registry,
        )
        self.job_wait = Histogram(
            "aivax_job_queue_wait_seconds",
            "Time from a job being due to a worker claiming it.",
            ["kind"],
            buckets=JOB_BUCKETS,
            registry=registry,
        )
        self.job_run = Histogram(
            "aivax_job_run_seconds",
            "Time a job attempt ran.",
            ["kind"],
            buckets=JOB_BUCKETS,
            registry=registry,
        )
        self._series: dict[tuple[str, bool, int], _CallSeries] = {}

    def record_call(self, log: Mapping[str, Any]) -> None:
        model = f"byok/{log['provider']}" if log["byok"] else log["model"]
        key = (model, log["gateway_id"] is not None, log["status"])
        series = self._series.get(key) or self._add_series(key)
        series.calls.inc()
        series.latency.observe(log["latency_ms"] / 1000)
        if log["ttft_ms"] is not None:
            series.ttft.observe(log["ttft_ms"] / 1000)
        if log["input_tokens"]:
            series.tokens_in.inc(log["input_tokens"])
        if log["output_tokens"]:
            series.tokens_out.inc(log["output_tokens"])
        if log["cost_micros"]:
            series.cost.inc(log["cost_micros"])

    def _add_series(self, key: tuple[str, bool, int]) -> _CallSeries:
        model, via_gateway, status = key
        series = _CallSeries(
            calls=self.calls.labels(model, "true" if via_gateway else "false", str(status)),
            latency=self.latency.labels(model),
            ttft=self.ttft.labels(model),
            tokens_in=self.tokens.labels(model, "input"),
            tokens_out=self.tokens.labels(model, "output"),
            cost=self.cost.labels(model),
        )
        self._series[key] = series
        return series

    def rate_limited(self, limit: str) -> None:
        self.rate_refusals.labels(limit).inc()

    def wallet_refused(self, reason: str) -> None:
        self.wallet_refusals.labels(reason).inc()

    def job_claimed(self, kind: str, waited_seconds: float) -> None:
        self.job_wait.labels(kind).observe(max(waited_seconds, 0.0))

    def job_finished(self, kind: str, outcome: str, run_seconds: float) -> None:
        self.jobs_finished.labels(kind, "retry" if outcome == "queued" else outcome).inc()
        self.job_run.labels(kind).observe(run_seconds)


def build_metrics(settings: Settings) -> Metrics:
    return PrometheusMetrics() if settings.metrics else NO_METRICS
