"""A sandbox over a data directory that holds a server secret and a database file, as a
server's does. The directories are passable (o+x) so that bwrap, started as the unprivileged
sandbox user when the tests run as root, reaches the workspaces; the secret and the database are
world-readable on purpose, so only the sandbox's own walls keep a run from them."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from aivax.config import Settings
from aivax.sandbox import Limits, Sandbox

SECRET = "server-secret-" + "s" * 40
DATABASE_BYTES = b"SQLite format 3\x00" + b"database-row-marker" * 10


@dataclass
class SandboxHost:
    data_dir: Path
    secret_file: Path
    database_file: Path
    settings: Settings
    sandbox: Sandbox

    def limits(self, **changes: float) -> Limits:
        return self.sandbox.default_limits.replace(**changes)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="aivax-sandbox-test-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def sandbox_settings(data_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": data_dir,
        "sandbox_wall_seconds": 10,
        "sandbox_processes": 32,
        "sandbox_memory_bytes": 256 * 1024 * 1024,
        "sandbox_output_bytes": 64 * 1024,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg, arg-type]


@pytest.fixture
async def host(data_dir: Path) -> SandboxHost:
    secret_file = data_dir / "secret.key"
    secret_file.write_text(SECRET)
    secret_file.chmod(0o644)
    database_file = data_dir / "aivax.db"
    database_file.write_bytes(DATABASE_BYTES)
    database_file.chmod(0o644)
    settings = sandbox_settings(data_dir)
    sandbox = Sandbox(settings)
    availability = await sandbox.availability()
    if not availability.available:
        pytest.fail(f"the sandbox must work on this machine: {availability.reason}")
    return SandboxHost(data_dir, secret_file, database_file, settings, sandbox)


def stray_processes(marker: str) -> list[str]:
    """Host processes whose command line holds `marker` (this test process excluded)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found
