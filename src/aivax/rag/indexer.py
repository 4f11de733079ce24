"""Job handlers that turn documents into embedded chunks.

Updating a document re-embeds only what changed: chunks whose content hash is unchanged keep
their stored vector (and row); only new or edited chunks go to the embedding model. A
collection whose embedding model changed is re-embedded document by document, with progress.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import numpy as np
from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection

from aivax.catalog import service as catalog
from aivax.errors import AppError
from aivax.kit.clock import utcnow
from aivax.models import Account, Chunk, Collection, Document
from aivax.providers.base import UpstreamError
from aivax.rag import chunking, metering
from aivax.rag.jobs import JobContext
from aivax.rag.service import INDEX_JOB, REEMBED_JOB, plan_limits
from aivax.services import AppServices

logger = logging.getLogger("aivax.rag")

EMBED_BATCH = 64
_INSERT_CHUNK = insert(Chunk.__table__)  # type: ignore[arg-type]


class DocumentChanged(Exception):
    """The document changed or vanished while it was being indexed; a newer job indexes it."""


async def index_document(services: AppServices, document_id: uuid.UUID, *, force: bool) -> str:
    """Index one document; returns its final status ("ready", "failed" or "skipped")."""
    async with services.database.sessions() as session:
        document = await session.get(Document, document_id)
        if document is None:
            return "skipped"
        collection = await session.get(Collection, document.collection_id)
        if collection is None:
            return "skipped"
        document.status, document.updated_at = "indexing", utcnow()
        await session.commit()
        existing = (
            await session.execute(
                select(Chunk.id, Chunk.content_hash, Chunk.dimensions, Chunk.embedding).where(
                    Chunk.document_id == document_id
                )
            )
        ).all()
        account = await session.get(Account, document.account_id)
        limits = await plan_limits(session, account.plan_id) if account else None
        model = await catalog.resolve(
            session, document.account_id, collection.embedding_model, services.secret_box
        )
        snapshot = (document.content_hash, collection.embedding_model, collection.dimensions)
        text, content_type = document.text, document.content_type
        size, overlap = collection.chunk_size, collection.chunk_overlap
    drafts = chunking.chunk_document(text, content_type, chunk_size=size, overlap=overlap)
    reusable: dict[str, tuple[int, Any]] = {}
    if not force:
        for chunk_id, digest, dimensions, vector in existing:
            if dimensions == snapshot[2]:
                reusable.setdefault(digest, (chunk_id, vector))
    fresh = [d for d in drafts if d.content_hash not in reusable]
    await _set_progress(services, document_id, len(drafts) - len(fresh), len(drafts))
    vectors: dict[str, Any] = {}
    try:
        if limits is None:
            raise AppError("the account no longer exists")
        for start in range(0, len(fresh), EMBED_BATCH):
            batch = fresh[start : start + EMBED_BATCH]
            embedded = await metering.embed(
                services,
                document.account_id,
                limits,
                model,
                [d.text for d in batch],
                request_id=f"index:{document_id}:{start // EMBED_BATCH}",
            )
            if embedded.vectors.shape[1] != snapshot[2]:
                raise AppError(
                    f"the embedding model returned {embedded.vectors.shape[1]} dimensions, the "
                    f"collection expects {snapshot[2]}"
                )
            for draft, row in zip(batch, embedded.vectors, strict=True):
                vectors[draft.content_hash] = np.asarray(row, dtype=np.float32)
            await _set_progress(
                services, document_id, len(drafts) - len(fresh) + start + len(batch), len(drafts)
            )
    except (AppError, UpstreamError) as exc:
        message = exc.message if hasattr(exc, "message") else str(exc)
        await _fail(services, document_id, f"embedding failed: {message}")
        return "failed"
    try:
        await services.database.run_write(
            lambda conn: _write_chunks(conn, document_id, snapshot, drafts, reusable, vectors)
        )
    except DocumentChanged:
        return "skipped"
    return "ready"


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
    services: AppServices, document_id: uuid.UUID, done: int, total: int
) -> None:
    await services.database.run_write(
        lambda conn: conn.execute(
            update(Document)
            .where(Document.id == document_id)
            .values(chunks_done=done, chunks_total=total)
        )
    )


async def _fail(services: AppServices, document_id: uuid.UUID, message: str) -> None:
    await services.database.run_write(
        lambda conn: conn.execute(
            update(Document)
            .where(Document.id == document_id)
            .values(status="failed", error=message[:2000], updated_at=utcnow())
        )
    )


async def index_safely(services: AppServices, document_id: uuid.UUID, *, force: bool) -> str:
    """One document's failure (a bug, a database error) fails that document, not the job."""
    try:
        return await index_document(services, document_id, force=force)
    except Exception as exc:
        logger.exception("indexing document %s failed", document_id)
        await _fail(services, document_id, f"indexing failed: {type(exc).__name__}")
        return "failed"


def register(services: AppServices) -> None:
    async def index_documents(context: JobContext) -> dict[str, Any]:
        ids = [uuid.UUID(value) for value in context.payload.get("document_ids", [])]
        outcome: dict[str, int] = {"ready": 0, "failed": 0, "skipped": 0}
        await context.progress(0, len(ids))
        for done, document_id in enumerate(ids, start=1):
            outcome[await index_safely(services, document_id, force=False)] += 1
            await context.progress(done)
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
        outcome: dict[str, int] = {"ready": 0, "failed": 0, "skipped": 0}
        await context.progress(0, len(ids))
        for done, document_id in enumerate(ids, start=1):
            outcome[await index_safely(services, document_id, force=True)] += 1
            await context.progress(done)
        return outcome

    services.jobs.register(INDEX_JOB, index_documents)
    services.jobs.register(REEMBED_JOB, reembed_collection)
