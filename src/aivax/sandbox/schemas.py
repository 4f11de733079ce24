"""The sandbox's typed inputs and outputs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from aivax.config import Settings

KilledReason = Literal["wall_time", "output", "workspace"]


@dataclass(frozen=True)
class Limits:
    """What one run may use. Memory is the address space of each process (RLIMIT_AS); CPU
    seconds and file bytes are per process too; `processes` bounds the run's whole tree."""

    wall_seconds: float = 30.0
    cpu_seconds: int = 30
    memory_bytes: int = 512 * 1024 * 1024
    processes: int = 64
    file_bytes: int = 64 * 1024 * 1024
    open_files: int = 256
    workspace_bytes: int = 256 * 1024 * 1024
    output_bytes: int = 1024 * 1024
    tmp_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) <= 0:
                raise ValueError(f"sandbox limit {field.name!r} must be positive")

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            wall_seconds=settings.sandbox_wall_seconds,
            cpu_seconds=settings.sandbox_cpu_seconds,
            memory_bytes=settings.sandbox_memory_bytes,
            processes=settings.sandbox_processes,
            file_bytes=settings.sandbox_file_bytes,
            open_files=settings.sandbox_open_files,
            workspace_bytes=settings.sandbox_workspace_bytes,
            output_bytes=settings.sandbox_output_bytes,
            tmp_bytes=settings.sandbox_tmp_bytes,
        )

    def replace(self, **changes: float) -> Limits:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RunResult:
    """`exit_code` is None when the sandbox stopped the run (`killed_reason` says why);
    128 + N when a signal N ended the command. `truncated`: more output was produced than
    `stdout` and `stderr` hold together (`Limits.output_bytes`). `workspace_bytes` is the disk
    the workspace uses after the run, to count against the account's storage."""

    exit_code: int | None
    stdout: bytes
    stderr: bytes
    truncated: bool
    timed_out: bool
    killed_reason: KilledReason | None
    wall_seconds: float
    cpu_seconds: float
    workspace_bytes: int


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str
