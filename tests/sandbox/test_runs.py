"""What a run gives back, workspaces kept between runs and swept when idle, and a sandbox that
refuses to run anything without bubblewrap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aivax.config import SettingsError, load_settings
from aivax.errors import AppError
from aivax.sandbox import (
    Limits,
    Sandbox,
    SandboxNetworkUnsupported,
    SandboxUnavailable,
    WorkspaceFull,
    Workspaces,
)
from tests.sandbox.conftest import SandboxHost, sandbox_settings


async def test_a_file_written_by_one_run_is_read_by_the_next(host: SandboxHost) -> None:
    workspace = await host.sandbox.workspaces.open("account-1", "conversation-1")
    first = await host.sandbox.run("echo kept > notes.txt; pwd", workspace=workspace)
    assert (first.exit_code, first.stdout) == (0, b"/workspace\n")
    again = await host.sandbox.workspaces.open("account-1", "conversation-1")
    second = await host.sandbox.run(["cat", "/workspace/notes.txt"], workspace=again)
    assert second.stdout == b"kept\n"
    assert second.workspace_bytes > 0
    other = await host.sandbox.workspaces.open("account-1", "conversation-2")
    third = await host.sandbox.run("cat notes.txt", workspace=other)
    assert third.exit_code == 1
    assert b"No such file" in third.stderr


async def test_stdin_reaches_the_command(host: SandboxHost) -> None:
    workspace = await host.sandbox.workspaces.open("account", "stdin")
    data = os.urandom(3 * 1024 * 1024)  # more than a pipe holds: fed as the command reads
    result = await host.sandbox.run("sha256sum | cut -d' ' -f1", workspace=workspace, stdin=data)
    import hashlib

    assert result.stdout.decode().strip() == hashlib.sha256(data).hexdigest()
    unread = await host.sandbox.run("echo ignored input", workspace=workspace, stdin=data)
    assert unread.exit_code == 0


async def test_exit_codes_and_signals(host: SandboxHost) -> None:
    workspace = await host.sandbox.workspaces.open("account", "codes")
    assert (await host.sandbox.run("exit 7", workspace=workspace)).exit_code == 7
    listed = await host.sandbox.run(
        ["python3", "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(5)"],
        workspace=workspace,
    )
    assert (listed.exit_code, listed.stdout, listed.stderr) == (5, b"out\n", b"err\n")
    signalled = await host.sandbox.run("sh -c 'kill -TERM $$'", workspace=workspace)
    assert signalled.exit_code == 128 + 15
    assert signalled.killed_reason is None
    missing = await host.sandbox.run(["no-such-command"], workspace=workspace)
    assert missing.exit_code != 0
    assert b"no-such-command" in missing.stderr


async def test_cpu_seconds_are_reported(host: SandboxHost) -> None:
    workspace = await host.sandbox.workspaces.open("account", "cpu")
    result = await host.sandbox.run(
        ["python3", "-c", "sum(range(20_000_000))"], workspace=workspace
    )
    assert result.exit_code == 0
    assert result.cpu_seconds > 0
    assert result.wall_seconds > 0


async def test_a_full_workspace_refuses_the_next_run(host: SandboxHost) -> None:
    workspace = await host.sandbox.workspaces.open("account", "full")
    limits = host.limits(workspace_bytes=1024 * 1024)
    result = await host.sandbox.run(
        "head -c 2000000 /dev/urandom > blob", workspace=workspace, limits=limits
    )
    assert result.exit_code == 0
    assert result.workspace_bytes > 1024 * 1024
    with pytest.raises(WorkspaceFull) as refused:
        await host.sandbox.run("rm blob", workspace=workspace, limits=limits)
    assert refused.value.envelope()["error"]["code"] == "sandbox_workspace_full"
    await host.sandbox.workspaces.delete(workspace)
    fresh = await host.sandbox.workspaces.open("account", "full")
    assert (await host.sandbox.run("ls", workspace=fresh, limits=limits)).stdout == b""


async def test_a_run_filling_its_workspace_is_stopped(host: SandboxHost) -> None:
    workspace = await host.sandbox.workspaces.open("account", "filling")
    result = await host.sandbox.run(
        "for i in $(seq 100); do head -c 1000000 /dev/zero > part$i; sleep 0.1; done",
        workspace=workspace,
        limits=host.limits(workspace_bytes=2 * 1024 * 1024, wall_seconds=20),
    )
    assert result.killed_reason == "workspace"
    assert result.exit_code is None
    assert result.workspace_bytes > 2 * 1024 * 1024


async def test_file_size_limit(host: SandboxHost) -> None:
    workspace = await host.sandbox.workspaces.open("account", "fsize")
    result = await host.sandbox.run(
        "head -c 3000000 /dev/zero > big",
        workspace=workspace,
        limits=host.limits(file_bytes=1_000_000),
    )
    assert b"File size limit exceeded" in result.stderr
    assert (workspace.files / "big").stat().st_size == 1_000_000


async def test_network_is_refused_rather_than_given(host: SandboxHost) -> None:
    workspace = await host.sandbox.workspaces.open("account", "net")
    with pytest.raises(SandboxNetworkUnsupported):
        await host.sandbox.run("true", workspace=workspace, network=True)


async def test_an_empty_command_is_a_clear_error(host: SandboxHost) -> None:
    workspace = await host.sandbox.workspaces.open("account", "empty")
    for command in ([], [""], "bad\x00command"):
        with pytest.raises(AppError) as refused:
            await host.sandbox.run(command, workspace=workspace)
        assert refused.value.status == 400


async def test_idle_workspaces_are_swept(data_dir: Path) -> None:
    now = [1_000_000.0]
    workspaces = Workspaces(data_dir / "sandbox", idle_seconds=600, clock=lambda: now[0])
    old = await workspaces.open("account", "old")
    (old.files / "data").write_text("x")
    now[0] += 500
    recent = await workspaces.open("account", "recent")
    now[0] += 200  # old: idle 700 s; recent: 200 s
    async with recent.lock:  # a workspace in use is never swept
        now[0] += 1000
        assert await workspaces.sweep() == 1
    assert not old.home.exists()
    assert recent.home.exists()
    assert await workspaces.sweep() == 1
    assert not recent.home.exists()
    assert await workspaces.sweep() == 0


async def test_unavailable_without_bwrap(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = data_dir / "empty"
    empty.mkdir()
    missing = Sandbox(sandbox_settings(data_dir, sandbox_bwrap=str(empty / "bwrap")))
    assert not await missing.available()
    assert "bubblewrap not found" in (await missing.availability()).reason
    workspace = await missing.workspaces.open("account", "conversation")
    with pytest.raises(SandboxUnavailable) as refused:
        await missing.run("touch ran", workspace=workspace)
    assert refused.value.status == 503
    assert refused.value.envelope()["error"]["code"] == "sandbox_unavailable"
    assert not (workspace.files / "ran").exists()

    monkeypatch.setenv("PATH", str(empty))
    not_on_path = Sandbox(sandbox_settings(data_dir))
    assert not await not_on_path.available()


async def test_unavailable_when_bwrap_cannot_build_a_sandbox(data_dir: Path) -> None:
    broken = data_dir / "bwrap"
    broken.write_text(
        "#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n"
    )
    broken.chmod(0o755)
    sandbox = Sandbox(sandbox_settings(data_dir, sandbox_bwrap=str(broken)))
    availability = await sandbox.availability()
    assert not availability.available
    assert "No permissions to create new namespace" in availability.reason


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="'processes'"):
        Limits(processes=0)


def test_settings_keep_workspaces_longer_than_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIVAX_SANDBOX_WALL_SECONDS", "600")
    monkeypatch.setenv("AIVAX_SANDBOX_IDLE_SECONDS", "900")
    with pytest.raises(SettingsError, match="AIVAX_SANDBOX_IDLE_SECONDS"):
        load_settings(_env_file=None)
    monkeypatch.setenv("AIVAX_SANDBOX_PROCESSES", "1")
    with pytest.raises(SettingsError, match="AIVAX_SANDBOX_PROCESSES"):
        load_settings(_env_file=None)


async def test_unavailable_when_the_sandbox_user_cannot_reach_the_root(data_dir: Path) -> None:
    """As root, runs start as an unprivileged user that must be able to pass the directories
    above the workspaces; the probe says which setting to change."""
    if os.geteuid() != 0:
        pytest.skip("only a server running as root switches to the sandbox user")
    closed = data_dir / "closed"
    closed.mkdir(mode=0o700)
    sandbox = Sandbox(sandbox_settings(data_dir, sandbox_root=closed / "sandbox"))
    availability = await sandbox.availability()
    assert not availability.available
    assert "AIVAX_SANDBOX_ROOT" in availability.reason
    assert list((closed / "sandbox").iterdir()) == []  # the probe cleaned up after itself
