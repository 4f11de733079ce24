"""Every way out that a command might try: each run must fail to get out."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import tracemalloc
import uuid
from collections.abc import Iterator

import pytest

from tests.sandbox.conftest import DATABASE_BYTES, SECRET, SandboxHost, stray_processes


async def test_cannot_read_the_server_secret_by_absolute_path(host: SandboxHost) -> None:
    workspace = await host.sandbox.workspaces.open("account", "conversation")
    result = await host.sandbox.run(
        f"cat {host.secret_file}; ls -a {host.data_dir}; cat /workspace/../secret.key",
        workspace=workspace,
    )
    assert host.secret_file.read_text() == SECRET  # readable on the host, for anyone
    assert SECRET.encode() not in result.stdout + result.stderr
    assert b"No such file or directory" in result.stderr
    assert result.exit_code != 0


async def test_cannot_read_the_database_file(host: SandboxHost) -> None:
    workspace = await host.sandbox.workspaces.open("account", "conversation")
    result = await host.sandbox.run(
        f"cat {host.database_file}; find / -name 'aivax.db' 2>/dev/null", workspace=workspace
    )
    assert b"database-row-marker" not in result.stdout
    assert b"aivax.db" not in result.stdout
    assert host.database_file.read_bytes() == DATABASE_BYTES


async def test_cannot_read_the_server_environment(
    host: SandboxHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = f"aivax-env-marker-{uuid.uuid4().hex}"
    monkeypatch.setenv("AIVAX_SANDBOX_TEST_MARKER", marker)
    workspace = await host.sandbox.workspaces.open("account", "conversation")
    result = await host.sandbox.run(
        f"cat /proc/1/environ /proc/self/environ /proc/{os.getpid()}/environ; env; "
        "cat /proc/*/environ",
        workspace=workspace,
    )
    assert marker.encode() not in result.stdout + result.stderr
    assert b"PATH=/usr/local/bin:/usr/bin:/bin" in result.stdout  # the run's own, small one


async def test_cannot_see_the_host_users_or_password_hashes(host: SandboxHost) -> None:
    workspace = await host.sandbox.workspaces.open("account", "conversation")
    result = await host.sandbox.run(
        "cat /etc/shadow; cat /etc/passwd; ls /etc /root /home", workspace=workspace
    )
    assert b"root:" not in result.stdout
    assert result.stdout.startswith(b"sandbox:x:1000:1000:")
    assert b"/etc/shadow: No such file or directory" in result.stderr


async def test_cannot_write_outside_the_workspace(host: SandboxHost) -> None:
    marker = f"escape-{uuid.uuid4().hex}"
    targets = [
        f"{host.data_dir}/{marker}",
        f"/tmp/{marker}",  # noqa: S108 - the sandbox's /tmp is its own tmpfs
        f"/usr/{marker}",
        f"/etc/{marker}",
        f"/{marker}",
        f"/dev/{marker}",
    ]
    workspace = await host.sandbox.workspaces.open("account", "conversation")
    result = await host.sandbox.run(
        "; ".join(f"echo x > {target}" for target in targets) + f"; echo x > /workspace/{marker}",
        workspace=workspace,
    )
    for target in targets:
        assert not os.path.exists(target), target
    assert (workspace.files / marker).read_text() == "x\n"
    assert b"Read-only file system" in result.stderr


@pytest.fixture
def api_port() -> Iterator[socket.socket]:
    """A listener on the host's loopback, standing for the API's own port."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    yield listener
    listener.close()


CONNECT = """
import socket, sys
for port in sys.argv[1:]:
    try:
        socket.create_connection(("127.0.0.1", int(port)), timeout=3)
        print(port, "connected")
    except OSError as exc:
        print(port, type(exc).__name__)
for address in ("10.0.0.1", "1.1.1.1"):
    try:
        socket.create_connection((address, 80), timeout=3)
        print(address, "connected")
    except OSError as exc:
        print(address, type(exc).__name__)
"""


async def test_cannot_connect_to_host_ports(host: SandboxHost, api_port: socket.socket) -> None:
    port = api_port.getsockname()[1]
    workspace = await host.sandbox.workspaces.open("account", "conversation")
    result = await host.sandbox.run(
        ["python3", "-c", CONNECT, str(port), "5432", "6379"], workspace=workspace
    )
    lines = result.stdout.decode().splitlines()
    assert lines == [
        f"{port} ConnectionRefusedError",
        "5432 ConnectionRefusedError",
        "6379 ConnectionRefusedError",
        "10.0.0.1 OSError",  # no route: the namespace has loopback only
        "1.1.1.1 OSError",
    ], result.stderr
    with pytest.raises(BlockingIOError):
        api_port.accept()


async def test_fork_bomb_stops_at_the_process_limit(host: SandboxHost) -> None:
    marker = f"bomb-{uuid.uuid4().hex}"
    workspace = await host.sandbox.workspaces.open("account", "conversation")
    result = await host.sandbox.run(
        f"# {marker}\n:(){{ :|:& }};:; sleep 1",
        workspace=workspace,
        limits=host.limits(processes=16, wall_seconds=5),
    )
    assert b"fork: retry: Resource temporarily unavailable" in result.stderr
    assert stray_processes(marker) == []
    assert subprocess.run(["true"], check=False).returncode == 0


FORKS = """
import os, time
children = 0
for _ in range(40):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(2)
        os._exit(0)
    children += 1
print(children)
"""


async def test_process_limit_holds_per_run(host: SandboxHost) -> None:
    """RLIMIT_NPROC is counted in each run's own user namespace: a run never passes its limit,
    and two runs at once (as the same host user) each get all of theirs."""
    first = await host.sandbox.workspaces.open("account", "first")
    second = await host.sandbox.workspaces.open("account", "second")
    results = await asyncio.gather(
        *(
            host.sandbox.run(
                ["python3", "-c", FORKS], workspace=workspace, limits=host.limits(processes=12)
            )
            for workspace in (first, second)
        )
    )
    # 12 processes: the run's init (sh), python and 10 children.
    assert [result.stdout for result in results] == [b"10\n", b"10\n"]


async def test_memory_bomb_fails_inside(host: SandboxHost) -> None:
    workspace = await host.sandbox.workspaces.open("account", "conversation")
    result = await host.sandbox.run(
        ["python3", "-c", "blocks = []\nwhile True: blocks.append(bytearray(10**7))"],
        workspace=workspace,
        limits=host.limits(memory_bytes=128 * 1024 * 1024),
    )
    assert result.exit_code == 1
    assert b"MemoryError" in result.stderr


async def test_infinite_loop_is_killed_at_the_wall_time(host: SandboxHost) -> None:
    marker = f"loop-{uuid.uuid4().hex}"
    workspace = await host.sandbox.workspaces.open("account", "conversation")
    result = await host.sandbox.run(
        ["python3", "-c", "while True: pass", marker],
        workspace=workspace,
        limits=host.limits(wall_seconds=1),
    )
    assert result.timed_out
    assert result.killed_reason == "wall_time"
    assert result.exit_code is None
    assert stray_processes(marker) == []


async def test_huge_output_is_truncated_and_the_run_killed(host: SandboxHost) -> None:
    workspace = await host.sandbox.workspaces.open("account", "conversation")
    cap = 64 * 1024
    tracemalloc.start()
    try:
        result = await host.sandbox.run(
            "head -c 100000000 /dev/zero; echo after >&2",
            workspace=workspace,
            limits=host.limits(output_bytes=cap),
        )
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.truncated
    assert result.killed_reason == "output"
    assert len(result.stdout) + len(result.stderr) == cap
    assert b"after" not in result.stderr
    assert peak < 8 * 1024 * 1024


async def test_background_process_does_not_outlive_the_run(host: SandboxHost) -> None:
    marker = f"left-behind-{uuid.uuid4().hex}"
    workspace = await host.sandbox.workspaces.open("account", "conversation")
    result = await host.sandbox.run(
        f"python3 -c 'import time; time.sleep(1000)' {marker} & "
        f"setsid python3 -c 'import time; time.sleep(1000)' {marker} & "
        f"nohup python3 -c 'import time; time.sleep(1000)' {marker} >/dev/null 2>&1 & "
        "sleep 0.5; pgrep -fc '^python3 -c import time'",
        workspace=workspace,
    )
    assert result.stdout == b"3\n"  # all three were running when the command returned
    assert result.exit_code == 0
    assert stray_processes(marker) == []


async def test_a_cancelled_run_leaves_nothing_running(host: SandboxHost) -> None:
    marker = f"cancelled-{uuid.uuid4().hex}"
    workspace = await host.sandbox.workspaces.open("account", "conversation")
    run = asyncio.create_task(
        host.sandbox.run(
            f"python3 -c 'import time; time.sleep(1000)' {marker} & "
            f"python3 -c 'import time; time.sleep(1000)' {marker}",
            workspace=workspace,
        )
    )
    for _ in range(100):
        if stray_processes(marker):
            break
        await asyncio.sleep(0.05)
    assert stray_processes(marker)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    for _ in range(100):
        if not stray_processes(marker):
            break
        await asyncio.sleep(0.05)
    assert stray_processes(marker) == []
