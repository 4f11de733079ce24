"""Workspaces: one directory per key (e.g. account and conversation), kept between runs and
deleted after an idle period.

Layout under the root: `<id>/` belongs to the server (its mtime is the last use, out of the
sandbox's reach) and `<id>/files/` is the directory a run sees as `/workspace`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

logger = logging.getLogger("aivax.sandbox")

KeyPart = str | int | UUID
FILES = "files"


@dataclass(eq=False)
class Workspace:
    id: str
    home: Path
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    @property
    def files(self) -> Path:
        return self.home / FILES


def workspace_id(key: tuple[KeyPart, ...]) -> str:
    """A fixed-length name: nothing in a key can reach outside the root."""
    canonical = json.dumps([str(part) for part in key], ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:40]


class Workspaces:
    """`owner` (uid, gid) owns the files when the server runs as root and sandboxes run as
    another user; None leaves them to the server's own user."""

    def __init__(
        self,
        root: Path,
        *,
        idle_seconds: float,
        owner: tuple[int, int] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self.idle_seconds = idle_seconds
        self.owner = owner
        self.clock = clock
        self._open: dict[str, Workspace] = {}

    async def open(self, *key: KeyPart) -> Workspace:
        """The workspace of `key`, created on first use; marks it used now."""
        if not key:
            raise ValueError("a workspace key needs at least one part")
        ident = workspace_id(key)
        workspace = self._open.setdefault(ident, Workspace(ident, self.root / ident))
        await asyncio.to_thread(self.create, workspace)
        await self.touch(workspace)
        return workspace

    def create(self, workspace: Workspace) -> None:
        # bwrap, started as the sandbox user, looks the workspace up by path: the directories
        # above it must let that user pass (x), never list or read (r).
        passable = 0o711 if self.owner is not None else 0o700
        self.root.mkdir(mode=passable, parents=True, exist_ok=True)
        workspace.home.mkdir(mode=passable, exist_ok=True)
        try:
            workspace.files.mkdir(mode=0o700)
        except FileExistsError:
            return
        if self.owner is not None:
            os.chown(workspace.files, *self.owner)

    async def touch(self, workspace: Workspace) -> None:
        now = self.clock()
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.utime, workspace.home, (now, now))

    async def size(self, workspace: Workspace) -> int:
        """Disk blocks the files use (a sparse file counts what it really occupies)."""
        return await asyncio.to_thread(disk_usage, workspace.files)

    async def delete(self, workspace: Workspace) -> None:
        async with workspace.lock:
            await asyncio.to_thread(remove_tree, workspace.home)
            self._open.pop(workspace.id, None)

    async def sweep(self) -> int:
        """Delete workspaces unused for `idle_seconds`; those running now are kept."""
        deadline = self.clock() - self.idle_seconds
        idle = await asyncio.to_thread(self._idle_ids, deadline)
        deleted = 0
        for ident in idle:
            workspace = self._open.get(ident) or Workspace(ident, self.root / ident)
            if workspace.lock.locked():
                continue
            async with workspace.lock:
                # Used again since it was listed (by this process or another): keep it.
                if await asyncio.to_thread(_last_used, workspace.home) > deadline:
                    continue
                await asyncio.to_thread(remove_tree, workspace.home)
            self._open.pop(ident, None)
            deleted += 1
        if deleted:
            logger.info("deleted %d idle sandbox workspaces", deleted)
        return deleted

    def _idle_ids(self, deadline: float) -> list[str]:
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        return [
            entry.name
            for entry in entries
            if entry.is_dir(follow_symlinks=False)
            and entry.stat(follow_symlinks=False).st_mtime <= deadline
        ]


def _last_used(home: Path) -> float:
    try:
        return home.lstat().st_mtime
    except FileNotFoundError:
        return float("-inf")


def disk_usage(top: Path) -> int:
    """Walks by directory descriptors, never following a link the sandbox made."""
    total = 0
    with contextlib.suppress(FileNotFoundError):
        total += top.lstat().st_blocks * 512
    for _path, dirs, files, dir_fd in os.fwalk(top, onerror=_note_unreadable):
        for name in (*dirs, *files):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_blocks * 512
    return total


def _note_unreadable(error: OSError) -> None:
    logger.warning("sandbox workspace: cannot read %s (%s)", error.filename, error.strerror)


def remove_tree(top: Path) -> None:
    """As root nothing inside can refuse; as the sandbox's own user a run may have removed
    its permissions from a directory, so they are given back and the removal retried."""
    try:
        shutil.rmtree(top)
    except FileNotFoundError:
        return
    except PermissionError:
        _restore_permissions(top)
        shutil.rmtree(top, ignore_errors=True)


def _restore_permissions(top: Path) -> None:
    for _path, dirs, _files, dir_fd in os.fwalk(top):
        for name in dirs:
            with contextlib.suppress(OSError):
                mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    os.chmod(name, 0o700, dir_fd=dir_fd)
