"""Job handlers that turn documents into embedded chunks.

Updating a document re-embeds only what changed: chunks whose content hash is unchanged keep
their stored vector (and row); only new or edited chunks go to the embedding model. A
collection whose embedding model changed is re-embedded document by document, with progress.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import delete, insert, select, update
from sqlalchemy import text as sql_text
from sqlalchemy.engine import Connection

from aivax.catalog import service as catalog
from aivax.errors import AppError
from aivax.jobs import JobContext
from aivax.kit.clock import utcnow
from aivax.models import Account, Chunk, Collection, Document
from aivax.providers.base import UpstreamError
from aivax.rag import chunking, metering
from aivax.rag.deps import IndexServices
from aivax.rag.service import INDEX_JOB, REEMBED_JOB, plan_limits

logger = logging.getLogger("aivax.rag")

EMBED_BATCH = 64
GROUP_DOCUMENTS = 32  # documents chunked, embedded and written together
_INSERT_CHUNK = insert(Chunk.__table__)  # type: ignore[arg-type]


class DocumentChanged(Exception):
    """The document changed or vanished while it was being indexed; a newer job indexes it.
    Always raised before the document's first write."""


@dataclass
class Plan:
    """One document's indexing work: its chunks, which keep a stored vector, which need one."""

    document_id: uuid.UUID
    account_id: uuid.UUID
    model_name: str
    snapshot: tuple[str, str, int]  # content hash, embedding model, dimensions
    drafts: list[chunking.ChunkDraft]
    reusable: dict[str, tuple[int, Any]]
    fresh: list[chunking.ChunkDraft]
    vectors: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


async def _load(
    services: IndexServices, document_ids: list[uuid.UUID], *, force: bool
) -> tuple[list[Plan], int]:
    """Plans for the documents that still exist (marked `indexing`), and how many vanished."""
    async with services.database.sessions() as session:
        rows = (
            await session.execute(
                select(Document, Collection)
                .join(Collection, Collection.id == Document.collection_id)
                .where(Document.id.in_(document_ids))
            )
        ).all()
        found = [row[0].id for row in rows]
        if found:
            await session.execute(
                update(Document)
                .where(Document.id.in_(found))
                .values(status="indexing", updated_at=utcnow())
            )
        existing: dict[uuid.UUID, list[Any]] = {}
        if found and not force:
            for row in await session.execute(
                select(
                    Chunk.document_id, Chunk.id, Chunk.content_hash, Chunk.dimensions,
                    Chunk.embedding,
                ).where(Chunk.document_id.in_(found))
            ):  # fmt: skip
                existing.setdefault(row[0], []).append(row[1:])
        work = [
            (
                document.id,
                document.account_id,
                (document.content_hash, collection.embedding_model, collection.dimensions),
                document.text,
                document.content_type,
                collection.chunk_size,
                collection.chunk_overlap,
            )
            for document, collection in rows
        ]
        await session.commit()
    plans: list[Plan] = []
    for document_id, account_id, snapshot, text, content_type, size, overlap in work:
        try:
            drafts = chunking.chunk_document(text, content_type, chunk_size=size, overlap=overlap)
        except Exception:  # one unreadable document fails alone
            logger.exception("chunking document %s failed", document_id)
            failed = Plan(document_id, account_id, snapshot[1], snapshot, [], {}, [])
            failed.error = "indexing failed while chunking"
            plans.append(failed)
            continue
        reusable: dict[str, tuple[int, Any]] = {}
        for chunk_id, digest, dimensions, vector in existing.get(document_id, []):
            if dimensions == snapshot[2]:
                reusable.setdefault(digest, (chunk_id, vector))
        fresh = list({d.content_hash: d for d in drafts if d.content_hash not in reusable}.values())
        plans.append(Plan(document_id, account_id, snapshot[1], snapshot, drafts, reusable, fresh))
    return plans, len(document_ids) - len(plans)


async def _embed(services: IndexServices, plans: list[Plan], label: str) -> None:
    """Embed the fresh chunks of `plans` (one model, one account) in shared batches; a failed
    batch fails the documents it carried."""
    account_id, model_name, dimensions = (
        plans[0].account_id,
        plans[0].model_name,
        plans[0].snapshot[2],
    )
    async with services.database.sessions() as session:
        account = await session.get(Account, account_id)
        try:
            if account is None:
                raise AppError("the account no longer exists")
            limits = await plan_limits(session, account.plan_id)
            model = await catalog.resolve(session, account_id, model_name, services.secret_box)
        except AppError as exc:
            for plan in plans:
                plan.error = exc.message
            return
    work = [(plan, draft) for plan in plans for draft in plan.fresh]
    for start in range(0, len(work), EMBED_BATCH):
        batch = [item for item in work[start : start + EMBED_BATCH] if item[0].error is None]
        if not batch:
            continue
        try:
            embedded = await metering.embed(
                services,
                account_id,
                limits,
                model,
                [draft.text for _, draft in batch],
                request_id=f"index:{label}:{start // EMBED_BATCH}",
            )
            if embedded.vectors.shape[1] != dimensions:
                raise AppError(
                    f"the embedding model returned {embedded.vectors.shape[1]} dimensions, the "
                    f"collection expects {dimensions}"
                )
        except (AppError, UpstreamError) as exc:
            for plan, _ in batch:
                plan.error = f"embedding failed: {exc.message}"
            continue
        for (plan, draft), row in zip(batch, embedded.vectors, strict=True):
            plan.vectors[draft.content_hash] = np.asarray(row, dtype=np.float32)
        # Progress on each document: chunks kept plus chunks embedded so far.
        touched = {id(plan): plan for plan, _ in batch}.values()
        await _set_progress(
            services,
            [
                (p.document_id, len(p.drafts) - len(p.fresh) + len(p.vectors), len(p.drafts))
                for p in touched
            ],
        )


async def prepare_group(
    services: IndexServices, document_ids: list[uuid.UUID], *, force: bool, label: str
) -> Callable[[], Coroutine[Any, Any, dict[str, int]]]:
    """Index a group of documents: chunked, embedded in shared batches (much faster than a
    call per document); returns the coroutine function that writes the group in one
    transaction and counts the statuses, so a job can write one group while it embeds the
    next."""
    plans, vanished = await _load(services, document_ids, force=force)
    outcome = {"ready": 0, "failed": 0, "skipped": vanished}
    groups: dict[tuple[uuid.UUID, str], list[Plan]] = {}
    for plan in plans:
        groups.setdefault((plan.account_id, plan.model_name), []).append(plan)
    for group in groups.values():
        await _embed(services, group, label)
    for plan in plans:
        if plan.error is not None:
            await _fail(services, plan.document_id, plan.error)
            outcome["failed"] += 1
    written = [plan for plan in plans if plan.error is None]

    def write(conn: Connection) -> list[str]:
        # No SAVEPOINT per document: _write_chunks raises DocumentChanged before its first
        # write, and on SQLite a savepoint would open the transaction with a read, which fails
        # at once ("database is locked") when another connection commits before our writes.
        statuses = []
        for plan in written:
            try:
                _write_chunks(
                    conn, plan.document_id, plan.snapshot, plan.drafts, plan.reusable,
                    plan.vectors,
                )  # fmt: skip
                statuses.append("ready")
            except DocumentChanged:
                statuses.append("skipped")
        return statuses

    async def commit() -> dict[str, int]:
        if written:
            for status in await services.database.run_write(write):
                outcome[status] += 1
        return outcome

    return commit


def _write_chunks(
    conn: Connection,
    document_id: uuid.UUID,
    snapshot: tuple[str, str, int],
    drafts: list[chunking.ChunkDraft],
    reusable: dict[str, tuple[int, Any]],
    vectors: dict[str, Any],
) -> None:
    current = conn.execute(
        select(Document.content_hash, Document.collection_id, Collection.embedding_model)
        .join(Collection, Collection.id == Document.collection_id)
        .where(Document.id == document_id)
    ).first()
    if current is None or (current[0], current[2]) != snapshot[:2]:
        raise DocumentChanged
    collection_id = current[1]
    kept: dict[int, int] = {}
    rows = []
    for draft in drafts:
        reuse = reusable.get(draft.content_hash)
        if reuse is not None and reuse[0] not in kept:
            kept[reuse[0]] = draft.position
            continue
        vector = vectors.get(draft.content_hash)
        if vector is None:  # a repeated chunk: same text as one kept above
            vector = reuse[1] if reuse is not None else None
        if vector is None:
            raise DocumentChanged
        rows.append(
            {
                "collection_id": collection_id,
                "document_id": document_id,
                "position": draft.position,
                "heading_path": list(draft.heading_path),
                "text": draft.text,
                "content_hash": draft.content_hash,
                "token_count": draft.token_count,
                "dimensions": snapshot[2],
                "embedding": vector,
            }
        )
    stale = delete(Chunk).where(Chunk.document_id == document_id)
    if kept:
        stale = stale.where(Chunk.id.not_in(list(kept)))
    conn.execute(stale)
    for chunk_id, position in kept.items():
        conn.execute(update(Chunk).where(Chunk.id == chunk_id).values(position=position))
    if rows:
        conn.execute(_INSERT_CHUNK, rows)
    conn.execute(
        update(Document)
        .where(Document.id == document_id)
        .values(
            status="ready",
            error=None,
            chunks_total=len(drafts),
            chunks_done=len(drafts),
            updated_at=utcnow(),
        )
    )
    conn.execute(
        update(Collection)
        .where(Collection.id == collection_id)
        .values(vectors_version=Collection.vectors_version + 1)
    )


async def _set_progress(
    services: IndexServices, progress: list[tuple[uuid.UUID, int, int]]
) -> None:
    def write(conn: Connection) -> None:
        for document_id, done, total in progress:
            conn.execute(
                update(Document)
                .where(Document.id == document_id)
                .values(chunks_done=done, chunks_total=total)
            )

    await services.database.run_write(write)


async def _fail(services: IndexServices, document_id: uuid.UUID, message: str) -> None:
    await services.database.run_write(
        lambda conn: conn.execute(
            update(Document)
            .where(Document.id == document_id)
            .values(status="failed", error=message[:2000], updated_at=utcnow())
        )
    )


# An import (or a re-embedding) changes the chunk table's statistics at once; PostgreSQL plans
# search from them, and autovacuum may be off or far behind: measured 50-66 ms p50 per search
# after an import until the next ANALYZE, 14 ms after it. Single-document jobs leave it to
# autovacuum.
ANALYZE_MIN_DOCUMENTS = 50


async def analyze(services: IndexServices) -> None:
    """PostgreSQL: refresh the planner's statistics of the tables a search reads."""
    if not services.database.is_postgresql:
        return
    async with services.database.engine.connect() as conn:
        await conn.execute(sql_text("ANALYZE chunks, documents"))
        await conn.commit()


def register(services: IndexServices) -> None:
    async def index_job(context: JobContext) -> dict[str, Any]:
        ids = [uuid.UUID(value) for value in context.payload.get("document_ids", [])]
        outcome = await _in_groups(context, ids, force=False)
        if len(ids) >= ANALYZE_MIN_DOCUMENTS:
            await analyze(services)
        return outcome

    async def reembed_collection(context: JobContext) -> dict[str, Any]:
        collection_id = uuid.UUID(context.payload["collection_id"])
        async with services.database.sessions() as session:
            ids = list(
                (
                    await session.scalars(
                        select(Document.id)
                        .where(Document.collection_id == collection_id)
                        .order_by(Document.created_at)
                    )
                ).all()
            )
        outcome = await _in_groups(context, ids, force=True)
        await analyze(services)
        return outcome

    async def _in_groups(
        context: JobContext, ids: list[uuid.UUID], *, force: bool
    ) -> dict[str, Any]:
        outcome = {"ready": 0, "failed": 0, "skipped": 0}
        await context.progress(0, len(ids))
        writing: asyncio.Task[dict[str, int]] | None = None
        try:
            for start in range(0, len(ids), GROUP_DOCUMENTS):
                group = ids[start : start + GROUP_DOCUMENTS]
                write = await prepare_group(
                    services, group, force=force, label=f"{context.id}:{start}"
                )
                # The previous group is written while this one was embedded (pipelined).
                if writing is not None:
                    for status, count in (await writing).items():
                        outcome[status] += count
                    await context.progress(start)
                writing = asyncio.create_task(write())
            if writing is not None:
                for status, count in (await writing).items():
                    outcome[status] += count
        except BaseException:
            if writing is not None and not writing.done():
                writing.cancel()
            raise
        await context.progress(len(ids))
        return outcome

    services.jobs.register(INDEX_JOB, index_job)
    services.jobs.register(REEMBED_JOB, reembed_collection)
