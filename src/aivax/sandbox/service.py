"""`Sandbox`: runs untrusted commands in bubblewrap, or refuses — never runs them without it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
from pathlib import Path

from aivax.config import Settings
from aivax.errors import BadRequest
from aivax.sandbox.bwrap import bwrap_argv, data_files
from aivax.sandbox.errors import SandboxNetworkUnsupported, SandboxUnavailable, WorkspaceFull
from aivax.sandbox.process import BwrapProcess, Outcome, Spawn, run_bwrap
from aivax.sandbox.schemas import Availability, Limits, RunResult
from aivax.sandbox.workspaces import Workspace, Workspaces, disk_usage, remove_tree

logger = logging.getLogger("aivax.sandbox")

PROBE_LIMITS = Limits(wall_seconds=10, output_bytes=4096)
WATCH_SECONDS = 1.0  # how often a running command's workspace is measured


class Sandbox:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.default_limits = Limits.from_settings(settings)
        # As root, runs use an unprivileged host user: root would be exempt from RLIMIT_NPROC
        # and could read any file a mistake let into view.
        self.run_as = (settings.sandbox_uid, settings.sandbox_gid) if os.geteuid() == 0 else None
        self.workspaces = Workspaces(
            settings.sandbox_root or settings.data_dir / "sandbox",
            idle_seconds=settings.sandbox_idle_seconds,
            owner=self.run_as,
        )
        self._availability: Availability | None = None
        self._probing = asyncio.Lock()
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Probe once (the answer is logged) and sweep idle workspaces from now on."""
        await self.availability()
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def available(self) -> bool:
        return (await self.availability()).available

    async def availability(self) -> Availability:
        """Whether bwrap is installed and can build a sandbox here: found out once by running
        `true` in one, then cached."""
        async with self._probing:
            if self._availability is None:
                self._availability = await self._probe()
                if self._availability.available:
                    logger.info("sandbox: %s", self._availability.reason)
                else:
                    logger.warning(
                        "sandbox unavailable, Bash and code execution are off: %s",
                        self._availability.reason,
                    )
            return self._availability

    async def _probe(self) -> Availability:
        bwrap = self.bwrap_path()
        if bwrap is None:
            return Availability(
                False,
                f"bubblewrap not found ({self.settings.sandbox_bwrap!r}); install Debian's "
                "'bubblewrap' package or set AIVAX_SANDBOX_BWRAP",
            )
        root = self.workspaces.root
        # In a workspace of the real root: bwrap must reach it as the sandbox user.
        probe = Workspace(f"probe-{secrets.token_hex(8)}", root / f"probe-{secrets.token_hex(8)}")
        try:
            await asyncio.to_thread(self.workspaces.create, probe)
            outcome = await self._execute(bwrap, ["true"], probe.files, PROBE_LIMITS, None)
        except OSError as exc:
            return Availability(False, f"cannot run {bwrap} in {root}: {exc}")
        finally:
            await asyncio.to_thread(remove_tree, probe.home)
        if outcome.status != 0:
            lines = outcome.stderr.decode(errors="replace").strip().splitlines()
            detail = lines[0] if lines else f"exit status {outcome.status}"
            if "Permission denied" in detail and self.run_as is not None:
                return Availability(
                    False,
                    f"{detail}: the sandbox user {self.run_as[0]} cannot reach {root}; let it "
                    "pass (chmod o+x) each directory above, or set AIVAX_SANDBOX_ROOT elsewhere",
                )
            return Availability(
                False,
                f"{bwrap} cannot create a sandbox here: {detail} (unprivileged user "
                "namespaces must be allowed; see docs/operations.md)",
            )
        return Availability(True, f"bubblewrap at {bwrap}, no network, rlimits per run")

    def bwrap_path(self) -> Path | None:
        found = shutil.which(self.settings.sandbox_bwrap)
        return Path(found) if found else None

    async def run(
        self,
        command: str | list[str],
        *,
        workspace: Workspace,
        limits: Limits | None = None,
        stdin: bytes | None = None,
        network: bool = False,
    ) -> RunResult:
        """Run `command` (a string runs with `bash -c`; a list is an argv) in `workspace`.
        One run at a time per workspace in this process."""
        argv = command_argv(command)
        if network:
            raise SandboxNetworkUnsupported(
                "sandboxed commands run without a network; run the command with network "
                "off, or fetch what it needs with a tool that has the SSRF guard",
                param="network",
            )
        availability = await self.availability()
        bwrap = self.bwrap_path()
        if not availability.available or bwrap is None:
            raise SandboxUnavailable(
                f"running commands is unavailable on this server: {availability.reason}"
            )
        limits = limits or self.default_limits
        async with workspace.lock:
            return await self._run_locked(bwrap, argv, workspace, limits, stdin)

    async def _run_locked(
        self,
        bwrap: Path,
        argv: list[str],
        workspace: Workspace,
        limits: Limits,
        stdin: bytes | None,
    ) -> RunResult:
        await asyncio.to_thread(self.workspaces.create, workspace)
        used = await self.workspaces.size(workspace)
        if used > limits.workspace_bytes:
            raise WorkspaceFull(
                f"the workspace holds {used} bytes, more than its {limits.workspace_bytes}; "
                "delete files from it (or reset it) before running more commands"
            )
        await self.workspaces.touch(workspace)
        try:
            outcome = await self._execute(bwrap, argv, workspace.files, limits, stdin)
        finally:
            await self.workspaces.touch(workspace)
        if not outcome.started and outcome.killed_reason is None:
            detail = outcome.stderr.decode(errors="replace").strip()
            raise SandboxUnavailable(f"the sandbox could not be built: {detail[:500]}")
        return RunResult(
            exit_code=outcome.status,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            truncated=outcome.truncated,
            timed_out=outcome.killed_reason == "wall_time",
            killed_reason=outcome.killed_reason,
            wall_seconds=outcome.wall_seconds,
            cpu_seconds=outcome.cpu_seconds,
            workspace_bytes=await self.workspaces.size(workspace),
        )

    async def _execute(
        self, bwrap: Path, argv: list[str], files: Path, limits: Limits, stdin: bytes | None
    ) -> Outcome:
        # Bound by descriptor: bwrap, running as the sandbox user, needs no path to the
        # workspace (the data directory above it stays closed to that user).
        workspace_fd = os.open(files, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        info_read, info_write = os.pipe()
        data = data_files()
        spawn = Spawn(
            argv=bwrap_argv(
                bwrap,
                command=argv,
                limits=limits,
                workspace_fd=workspace_fd,
                info_fd=info_write,
                data=data,
            ),
            pass_fds=(workspace_fd, info_write, *data.fds()),
            info_read_fd=info_read,
            info_write_fd=info_write,
            user=self.run_as[0] if self.run_as else None,
            group=self.run_as[1] if self.run_as else None,
        )
        try:
            return await run_bwrap(
                spawn,
                stdin=stdin,
                wall_seconds=limits.wall_seconds,
                output_bytes=limits.output_bytes,
                watchdog=lambda process: watch_workspace(process, files, limits.workspace_bytes),
            )
        finally:
            os.close(workspace_fd)
            data.close()

    async def _sweep_forever(self) -> None:
        interval = max(1.0, min(self.settings.sandbox_idle_seconds / 4, 300.0))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.workspaces.sweep()
            except OSError:
                logger.exception("sandbox workspace sweep failed; retrying next interval")


async def watch_workspace(process: BwrapProcess, files: Path, limit: int) -> None:
    """Without disk quotas a run can only be stopped after its workspace outgrew the limit:
    measured every second, so a run overshoots by at most what it writes in one."""
    while True:
        await asyncio.sleep(WATCH_SECONDS)
        if await asyncio.to_thread(disk_usage, files) > limit:
            process.stop("workspace")
            return


def command_argv(command: str | list[str]) -> list[str]:
    argv = ["/bin/bash", "-c", command] if isinstance(command, str) else list(command)
    if not argv or not argv[0] or not all(isinstance(arg, str) for arg in argv):
        raise BadRequest("the command is empty; give a shell command or an argv", param="command")
    if any("\x00" in arg for arg in argv):
        raise BadRequest("the command contains a NUL character", param="command")
    return argv
