"""The unit of work: whoever opens a session owns its transaction, and what must happen only
once that transaction is durable (clearing caches, waking the job runner) is registered with
`on_commit` and runs right after the commit.

A request's session is `SessionDep`: it commits when the endpoint returns and rolls back when
it raises; services only flush. Jobs, background loops and CLI commands open their own sessions
from `Database.sessions` and commit them the same way.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from aivax.db.database import Database

logger = logging.getLogger("aivax.db")

# `Session.info` key: the actions waiting for this session's transaction to commit, in the order
# they were registered (a dict, so that registering the same action twice runs it once).
_AFTER_COMMIT = "aivax.after_commit"


def on_commit(session: AsyncSession | Session, action: Callable[[], None]) -> None:
    """Run `action` once `session`'s transaction (the one in progress, or else the next one
    to begin) commits; a rollback, or closing the session without a commit, drops it.

    Actions run synchronously inside `commit()`, so a request's actions have run before its
    response is sent (see `SessionDep`). They must not touch the database. An action registered
    twice (equal callables, e.g. the same bound method) runs once per commit. A savepoint does
    not count: its release runs nothing, and actions registered inside a savepoint that rolls
    back still run when the outer transaction commits (they may only make work, like clearing a
    cache, not depend on the savepoint's writes)."""
    sync = session.sync_session if isinstance(session, AsyncSession) else session
    actions: dict[Callable[[], None], None] = sync.info.setdefault(_AFTER_COMMIT, {})
    actions[action] = None
    if not event.contains(sync, "after_commit", _run_actions):
        event.listen(sync, "after_commit", _run_actions)
        event.listen(sync, "after_transaction_end", _drop_actions)


def _outer_transaction_ended(session: Session) -> bool:
    # SQLAlchemy fires `after_commit` for a savepoint's release as well; the outer transaction
    # is still active then.
    outer = session.get_transaction()
    return outer is None or not outer.is_active


def _run_actions(session: Session) -> None:
    if not _outer_transaction_ended(session):
        return
    actions: dict[Callable[[], None], None] = session.info.pop(_AFTER_COMMIT, {})
    for action in actions:
        try:
            action()
        except Exception:  # the commit stands: the next actions still run
            logger.exception("an after-commit action failed: %r", action)


def _drop_actions(session: Session, transaction: SessionTransaction) -> None:
    # The outer transaction ended: after a commit its actions have run; after a rollback (or a
    # close without a commit) they must never run.
    if transaction.parent is None:
        session.info.pop(_AFTER_COMMIT, None)


async def _request_session(request: Request) -> AsyncIterator[AsyncSession]:
    database: Database = request.app.state.services.database
    async with database.sessions() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        await session.commit()


# scope="function": the dependency's exit — the commit and the after-commit actions — runs
# when the endpoint returns, before the response is sent, so a failed commit is reported to
# the client instead of being hidden behind an already-sent 200, and a client that sends its
# next request after this response finds the caches already cleared.
SessionDep = Annotated[AsyncSession, Depends(_request_session, scope="function")]
