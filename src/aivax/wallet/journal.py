"""The settlement journal: every settlement a server process queues is kept in a file of its own
under `AIVAX_DATA_DIR/wallet-journal/` from before it is sent to the database until its
transaction has committed, so that neither a database outage nor the process's death loses a
call's charge or its request-log row (`wallet.settlement` writes and reads it).

One file per server process, named by a random id and locked (`flock`) by that process while it
runs; a file nobody holds is an orphan, left by a process that stopped with settlements not yet
written, and the next process to start on the same data directory adopts it (`adopt`). Lines of
JSON (orjson), one record each:

  ["a", first, [item, ...]]   settlements numbered first, first + 1, …: appended and synced to
                              disk (one sync per group) before any of them is sent
  ["d", upto]                 every settlement up to `upto` is done (written, or refused for
                              good). Not synced: a mark lost in a crash only means those
                              settlements are sent again, and a replay skips what was written.

Settlements are done strictly in order, so one number says what is left. The file is emptied
when nothing is left and it has grown past `TRUNCATE_BYTES`, and rewritten with only what is
left when it passes `COMPACT_BYTES` (the bound on waiting settlements bounds that rewrite).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

from aivax.kit.ids import uuid7
from aivax.wallet.writer import SettleItem, encode, item_from_wire, item_to_wire

logger = logging.getLogger("aivax.wallet.journal")

JOURNAL_DIR = "wallet-journal"
SUFFIX = ".journal"
PARTIAL = ".partial"  # a rewrite in progress; the file it replaces is still whole
TRUNCATE_BYTES = 64 * 1024
COMPACT_BYTES = 4 * 1024 * 1024


def _sync(fd: int) -> None:
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class SettlementJournal:
    """One process's journal file; its methods block on the disk (call them off the event
    loop, except `done`, one small unsynced write)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path: Path | None = None
        self._fd: int | None = None
        self._size = 0
        self._mutex = threading.Lock()

    def append(self, first: int, items: Sequence[SettleItem]) -> None:
        """Keep `items`, numbered from `first`, on disk before they are sent."""
        line = encode(["a", first, [item_to_wire(item) for item in items]]) + b"\n"
        with self._mutex:
            fd = self._open()
            self._write(fd, line)
            _sync(fd)

    def done(self, upto: int, *, left: Sequence[SettleItem] = ()) -> None:
        """Everything up to `upto` is done; `left` are the settlements still waiting (numbered
        from `upto + 1`), kept if the file is rewritten."""
        with self._mutex:
            if self._fd is None:
                return
            self._write(self._fd, encode(["d", upto]) + b"\n")
            if not left and self._size >= TRUNCATE_BYTES:
                os.ftruncate(self._fd, 0)
                self._size = 0
            elif self._size >= COMPACT_BYTES:
                self._rewrite(upto + 1, left)

    def adopt(self, first: int) -> list[SettleItem]:
        """The settlements left in orphaned journals, in the order they were queued, taken
        into this journal (numbered from `first`) before the orphans are deleted."""
        orphans: list[tuple[Path, int]] = []
        items: list[SettleItem] = []
        try:
            for path in self._orphan_paths():
                fd = self._claim(path)
                if fd is not None:
                    orphans.append((path, fd))
                    items += _left_in(path)
            if items:
                self.append(first, items)
            for path, _ in orphans:
                path.unlink(missing_ok=True)
        finally:
            for _, fd in orphans:
                os.close(fd)
        return items

    def close(self, *, keep: bool) -> None:
        """Release the file: deleted when nothing is left in it, else kept for the next start."""
        with self._mutex:
            if self._fd is None:
                return
            if not keep and self.path is not None:
                self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    # --- inside ----------------------------------------------------------------------------

    def _open(self) -> int:
        if self._fd is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"{uuid7().hex}{SUFFIX}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
            _lock(fd)  # a new file: nobody else has it
            self.path, self._fd, self._size = path, fd, 0
        return self._fd

    def _write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        self._size += len(data)

    def _rewrite(self, first: int, left: Sequence[SettleItem]) -> None:
        """Replace the file by one holding only `left`: written and synced beside it, renamed
        over a new name, then the old file deleted (a crash in between leaves both, and
        adopting both sends some settlements twice, which a replay makes harmless)."""
        assert self._fd is not None  # noqa: S101 - open
        assert self.path is not None  # noqa: S101 - open
        path = self.directory / f"{uuid7().hex}{SUFFIX}"
        partial = path.with_name(path.name + PARTIAL)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        _lock(fd)
        old_fd, old_path = self._fd, self.path
        self._fd, self.path, self._size = fd, path, 0
        self._write(fd, encode(["a", first, [item_to_wire(item) for item in left]]) + b"\n")
        _sync(fd)
        partial.rename(path)
        old_path.unlink(missing_ok=True)
        os.close(old_fd)

    def _orphan_paths(self) -> Iterable[Path]:
        if not self.directory.is_dir():
            return []
        paths = sorted(self.directory.iterdir())
        for path in paths:
            if path.name.endswith(SUFFIX + PARTIAL):
                fd = self._claim(path)
                if fd is not None:  # an unfinished rewrite: the file it replaced is whole
                    path.unlink(missing_ok=True)
                    os.close(fd)
        return [path for path in paths if path.suffix == SUFFIX and path != self.path]

    @staticmethod
    def _claim(path: Path) -> int | None:
        """The file opened and locked, unless a live process holds it or it is gone (adopted
        by another process between the listing and the lock)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            if _lock(fd) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
        return None


def _left_in(path: Path) -> list[SettleItem]:
    """The settlements of a journal file not marked done, in order (a line cut short by a
    crash was never synced, so nothing of it was sent: it is skipped)."""
    queued: dict[int, Any] = {}
    upto = 0
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                record = orjson.loads(line)
                if record[0] == "a":
                    for offset, wire in enumerate(record[2]):
                        queued[int(record[1]) + offset] = wire
                elif record[0] == "d":
                    upto = max(upto, int(record[1]))
            except (orjson.JSONDecodeError, IndexError, TypeError, ValueError):
                logger.warning("skipping line %d of %s: not a journal record", number, path)
    left: list[SettleItem] = []
    for seq in sorted(queued):
        if seq <= upto:
            continue
        try:
            left.append(item_from_wire(queued[seq]))
        except (ValueError, TypeError, KeyError):
            logger.error("skipping settlement %d of %s: not a settlement", seq, path)
    return left
