"""Job handlers the worker-process tests load with `aivax worker --register
tests.jobs.handlers:register`: each run appends `job-id pid attempt` to the file its payload
names, so a test sees which process ran which job, and how often."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from aivax.jobs import JobContext
from aivax.services import AppServices

RECORD = "test.record"
SLOW_FIRST = "test.slow_first"


def _log(context: JobContext) -> None:
    with Path(context.payload["log"]).open("a") as log:
        log.write(f"{context.id} {os.getpid()} {context.attempts}\n")


async def record(context: JobContext) -> dict[str, Any]:
    _log(context)
    await asyncio.sleep(float(context.payload.get("sleep", 0)))
    return {"pid": os.getpid()}


async def slow_first(context: JobContext) -> dict[str, Any]:
    """The first attempt hangs (its worker is killed meanwhile); later ones finish at once."""
    _log(context)
    if context.attempts == 1:
        await asyncio.sleep(600)
    return {"pid": os.getpid()}


def register(services: AppServices) -> None:
    services.jobs.register(RECORD, record)
    services.jobs.register(SLOW_FIRST, slow_first)
