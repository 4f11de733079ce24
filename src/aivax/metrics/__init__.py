"""Operational metrics in the Prometheus text format (`GET /metrics`).

The layers below record through one injected `Metrics` object, built with the app's services:
the wallet meter records each request-log row it settles (calls, latency, time to first token,
tokens, cost) and each reservation it refuses, the rate limiter each refusal, and the job runner
each claim and outcome. With metrics off that object is `NO_METRICS`, whose methods return at
once. The exposition (`exposition.Exposition`) adds the job counts read from the database at
scrape time, and, under `aivax serve --workers N`, the other processes' metrics.
"""

from aivax.metrics.recorder import NO_METRICS, Metrics, PrometheusMetrics, build_metrics

__all__ = ["NO_METRICS", "Metrics", "PrometheusMetrics", "build_metrics"]
