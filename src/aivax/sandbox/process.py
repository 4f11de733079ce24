"""One bubblewrap process, driven from the event loop: stdin fed, stdout and stderr read as
they come within a byte budget, a wall-time limit, and the whole process tree killed on demand.

Spawned with `subprocess.Popen` and reaped with `os.wait4` (not asyncio's subprocess) for the
run's CPU time: bwrap's resource usage includes every process of the run it reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aivax.sandbox.schemas import KilledReason

logger = logging.getLogger("aivax.sandbox")

CHUNK = 65536
DRAIN_SECONDS = 2.0  # after the run ends, its pipes close as soon as its namespace is gone


@dataclass
class Spawn:
    argv: list[str]
    pass_fds: tuple[int, ...]
    info_read_fd: int
    info_write_fd: int
    user: int | None = None
    group: int | None = None


@dataclass
class Outcome:
    status: int | None  # the exit code, or None when stopped
    stdout: bytes
    stderr: bytes
    truncated: bool
    killed_reason: KilledReason | None
    wall_seconds: float
    cpu_seconds: float
    started: bool  # bwrap reached the command (it told its child's pid)


@dataclass
class _Output:
    budget: int
    on_full: Callable[[], None]
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    truncated: bool = False

    def add(self, buffer: bytearray, data: bytes) -> None:
        room = self.budget - len(self.stdout) - len(self.stderr)
        buffer += data[: max(room, 0)]
        if len(data) > room and not self.truncated:
            self.truncated = True
            self.on_full()


class BwrapProcess:
    def __init__(self, spawn: Spawn, *, output_bytes: int) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            self.proc = self._popen(spawn)
        except BaseException:
            os.close(spawn.info_read_fd)
            raise
        finally:
            os.close(spawn.info_write_fd)
        self.started_at = time.monotonic()
        self.info_fd = spawn.info_read_fd
        self.info = bytearray()
        self.child_pidfd: int | None = None
        self.pidfd = os.pidfd_open(self.proc.pid)
        self.exited: asyncio.Future[None] = self.loop.create_future()
        self.stop_reason: KilledReason | None = None
        self.stopped = asyncio.Event()
        self.output = _Output(output_bytes, lambda: self.stop("output"))
        self.open_pipes: set[int] = set()
        self.reaped: tuple[int, float] | None = None
        self.loop.add_reader(self.pidfd, self._on_exit)
        self.loop.add_reader(self.info_fd, self._on_info)
        for pipe, buffer in (
            (self.proc.stdout, self.output.stdout),
            (self.proc.stderr, self.output.stderr),
        ):
            assert pipe is not None  # noqa: S101 - Popen with PIPE
            self._read(pipe.fileno(), buffer)

    @staticmethod
    def _popen(spawn: Spawn) -> subprocess.Popen[bytes]:
        return subprocess.Popen(  # noqa: S603 - argv built by bwrap_argv, no shell
            spawn.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=spawn.pass_fds,
            env={},  # bwrap's own environment is the sandbox's /proc/1/environ
            start_new_session=True,
            user=spawn.user,
            group=spawn.group,
            extra_groups=[] if spawn.user is not None else None,
        )

    def _read(self, fd: int, buffer: bytearray) -> None:
        os.set_blocking(fd, False)
        self.open_pipes.add(fd)
        self.loop.add_reader(fd, self._on_readable, fd, buffer)

    def _on_readable(self, fd: int, buffer: bytearray) -> None:
        try:
            data = os.read(fd, CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data or self.output.truncated:
            self._close_pipe(fd)
            return
        self.output.add(buffer, data)

    def _close_pipe(self, fd: int) -> None:
        if fd in self.open_pipes:
            self.loop.remove_reader(fd)
            self.open_pipes.discard(fd)

    def _on_info(self) -> None:
        try:
            data = os.read(self.info_fd, CHUNK)
        except OSError:
            data = b""
        self.info += data
        try:  # bwrap writes its info as one JSON document and keeps the descriptor open
            child = int(json.loads(self.info)["child-pid"])
        except (ValueError, KeyError, TypeError):
            if data:
                return
            child = None
        self.loop.remove_reader(self.info_fd)
        os.close(self.info_fd)
        self.info_fd = -1
        if child is not None and not self.exited.done():
            # bwrap has not reaped its child while it runs itself: the pid is still that child.
            with contextlib.suppress(OSError):
                self.child_pidfd = os.pidfd_open(child)

    def _on_exit(self) -> None:
        self.loop.remove_reader(self.pidfd)
        if not self.exited.done():
            self.exited.set_result(None)

    def stop(self, reason: KilledReason) -> None:
        """Kills the namespace's init first: the kernel then ends every process of the run and
        bwrap reaps them (their CPU time counted); bwrap itself is killed as a fallback."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stopped.set()
        target = self.child_pidfd if self.child_pidfd is not None else self.pidfd
        if not self.exited.done():
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(target, signal.SIGKILL)

    async def feed(self, data: bytes | None) -> None:
        stdin = self.proc.stdin
        assert stdin is not None  # noqa: S101 - Popen with PIPE
        if not data:
            stdin.close()
            return
        fd = stdin.fileno()
        os.set_blocking(fd, False)
        view = memoryview(data)
        try:
            while view and not self.exited.done():
                try:
                    view = view[os.write(fd, view[:CHUNK]) :]
                except BlockingIOError:
                    await _writable(self.loop, fd)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the command did not read all of its input: that is its choice
        finally:
            stdin.close()

    async def wait(self, wall_seconds: float) -> None:
        stopped = asyncio.ensure_future(self.stopped.wait())
        waiters: set[asyncio.Future[Any]] = {self.exited, stopped}
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=wall_seconds, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopped.cancel()
        if not done:
            self.stop("wall_time")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.exited), DRAIN_SECONDS)
        if not self.exited.done():  # the namespace's init would not die: end bwrap itself
            os.killpg(self.proc.pid, signal.SIGKILL)
            await self.exited
        await self._drain()

    async def _drain(self) -> None:
        deadline = self.loop.time() + DRAIN_SECONDS
        while self.open_pipes and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        for fd in list(self.open_pipes):
            self._close_pipe(fd)

    def reap(self) -> tuple[int, float]:
        """Exit status and CPU seconds; called once the process has exited."""
        if self.reaped is None:
            _pid, status, usage = os.wait4(self.proc.pid, 0)
            self.proc.returncode = os.waitstatus_to_exitcode(status)
            self.reaped = (self.proc.returncode, usage.ru_utime + usage.ru_stime)
        return self.reaped

    def close(self) -> None:
        """Kills and reaps in the background when the run was cancelled."""
        if not self.exited.done():
            self.stop(self.stop_reason or "wall_time")
            self.loop.run_in_executor(None, self._reap_quietly)
        else:
            self.reap()
        for fd in list(self.open_pipes):
            self._close_pipe(fd)
        if self.info_fd >= 0:
            self.loop.remove_reader(self.info_fd)
            os.close(self.info_fd)
            self.info_fd = -1
        self.loop.remove_reader(self.pidfd)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        os.close(self.pidfd)
        if self.child_pidfd is not None:
            os.close(self.child_pidfd)
            self.child_pidfd = None

    def _reap_quietly(self) -> None:
        with contextlib.suppress(ChildProcessError):
            self.reap()

    def outcome(self) -> Outcome:
        status, cpu = self.reap()
        return Outcome(
            status=None if self.stop_reason else status,
            stdout=bytes(self.output.stdout),
            stderr=bytes(self.output.stderr),
            truncated=self.output.truncated,
            killed_reason=self.stop_reason,
            wall_seconds=time.monotonic() - self.started_at,
            cpu_seconds=cpu,
            started=b"child-pid" in self.info,
        )


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def on_writable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, on_writable)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


async def run_bwrap(
    spawn: Spawn,
    *,
    stdin: bytes | None,
    wall_seconds: float,
    output_bytes: int,
    watchdog: Callable[[BwrapProcess], Awaitable[None]] | None = None,
) -> Outcome:
    process = BwrapProcess(spawn, output_bytes=output_bytes)
    tasks = [asyncio.ensure_future(process.feed(stdin))]
    if watchdog is not None:
        tasks.append(asyncio.ensure_future(watchdog(process)))
    try:
        await process.wait(wall_seconds)
        return process.outcome()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        process.close()
