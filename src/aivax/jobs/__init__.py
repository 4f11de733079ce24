"""The background-job engine every domain uses: durable rows in the app database, enqueued in
the same transaction as the domain write, claimed with a lease, retried with backoff, delayed
(`run_at`) or recurring (cron schedules), cancellable, deduplicated by unique key.

    job = await jobs.enqueue(session, "kind", {...}, account_id=account.id)
    services.jobs.register("kind", handler, max_attempts=5)
"""

from aivax.jobs.runner import JobCancelled, JobContext, JobFailed, JobLeaseLost, JobRunner
from aivax.jobs.service import enqueue, enqueue_sync, put_schedule, remove_schedule

__all__ = [
    "JobCancelled",
    "JobContext",
    "JobFailed",
    "JobLeaseLost",
    "JobRunner",
    "enqueue",
    "enqueue_sync",
    "put_schedule",
    "remove_schedule",
]
