"""Documents of a collection: created, replaced by external id, updated and deleted in the
request's transaction, with storage counted toward the account's quota and indexing queued as
a job in the same transaction."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from aivax.db import Database
from aivax.errors import BadRequest, NotFound
from aivax.inference.ratelimit import RateLimiter
from aivax.keys.service import Principal
from aivax.kit.clock import utcnow
from aivax.models import Chunk, Collection, Document, Job
from aivax.rag import chunking, repository
from aivax.rag.schemas import ChunkRead, DocumentCreate, DocumentRead, DocumentUpdate
from aivax.rag.service import INDEX_JOB, check_storage, enqueue, hit_rate, plan_limits


class DocumentNotFound(NotFound):
    code = "document_not_found"


class DocumentServices(Protocol):
    """What documents need of the app's services (`AppServices` has it)."""

    @property
    def limiter(self) -> RateLimiter: ...

    @property
    def database(self) -> Database: ...


def text_bytes(text: str) -> int:
    return len(text.encode())


@dataclass
class DocumentInput:
    text: str
    content_type: str
    title: str
    external_id: str | None
    metadata: dict[str, Any]


def input_of(data: DocumentCreate) -> DocumentInput:
    title, text = chunking.extract(data.content_type, data.text)
    content_type = "markdown" if data.content_type == "html" else data.content_type
    if not text.strip():
        raise BadRequest("The document has no text.", param="text")
    return DocumentInput(text, content_type, data.title or title, data.id, data.metadata)


async def upsert_document(
    session: AsyncSession, collection: Collection, item: DocumentInput
) -> tuple[Document, bool]:
    """Create the document, or replace the one with the same external id. Returns (document,
    needs indexing). Does not check the storage quota (callers do, once per request)."""
    existing = None
    if item.external_id is not None:
        existing = await repository.document_by_external_id(
            session, collection.id, item.external_id
        )
    digest = chunking.content_hash(item.content_type + "\0" + item.text)
    size = text_bytes(item.text)
    if existing is not None:
        changed = existing.content_hash != digest
        existing.title = item.title
        existing.metadata_ = item.metadata
        if changed:
            await repository.add_storage(session, collection.account_id, size - existing.bytes)
            existing.text, existing.content_type = item.text, item.content_type
            existing.content_hash, existing.bytes = digest, size
            existing.status, existing.error = "queued", None
            existing.chunks_done = 0
        existing.updated_at = utcnow()
        return existing, changed
    document = Document(
        collection_id=collection.id,
        account_id=collection.account_id,
        external_id=item.external_id,
        title=item.title,
        content_type=item.content_type,
        text=item.text,
        content_hash=digest,
        metadata_=item.metadata,
        status="queued",
        bytes=size,
    )
    session.add(document)
    await repository.add_storage(session, collection.account_id, size)
    return document, True


async def create_document(
    services: DocumentServices,
    session: AsyncSession,
    principal: Principal,
    collection: Collection,
    item: DocumentInput,
) -> tuple[Document, Job | None]:
    limits = await plan_limits(session, principal.plan_id)
    await hit_rate(services.limiter, "insert", principal.account_id, limits.insert_rpm)
    await check_storage(session, principal.account_id, limits, text_bytes(item.text))
    # No SAVEPOINT here: on SQLite a transaction that reads before it writes fails at once
    # ("database is locked") when another writer committed in between.
    try:
        document, needs_index = await upsert_document(session, collection, item)
        await session.flush()
    except IntegrityError:  # a concurrent create with the same external id won
        raise BadRequest(
            f"Document {item.external_id!r} is being created by another request; retry.",
            param="id",
            code="document_conflict",
        ) from None
    job = None
    if needs_index:
        job = await enqueue(
            session, principal.account_id, INDEX_JOB, {"document_ids": [str(document.id)]}, 1
        )
        await session.flush()
    return document, job


async def get_document(session: AsyncSession, collection: Collection, document_id: str) -> Document:
    try:
        key = uuid.UUID(document_id)
    except ValueError:
        key = None
    document = await session.get(Document, key) if key else None
    if document is None and key is None:
        document = await repository.document_by_external_id(session, collection.id, document_id)
    if document is None or document.collection_id != collection.id:
        raise DocumentNotFound(
            f"No document {document_id!r} in this collection.", param="document_id"
        )
    return document


async def update_document(
    services: DocumentServices,
    session: AsyncSession,
    principal: Principal,
    collection: Collection,
    document: Document,
    data: DocumentUpdate,
) -> tuple[Document, Job | None]:
    item = DocumentInput(
        document.text,
        document.content_type,
        document.title,
        document.external_id,
        document.metadata_,
    )
    if data.text is not None:
        # Without a content_type, the text keeps the document's (HTML is stored as Markdown).
        kind = data.content_type or ("markdown" if document.content_type == "markdown" else "text")
        created = input_of(DocumentCreate(text=data.text, content_type=kind))
        item.text, item.content_type = created.text, created.content_type
        item.title = item.title or created.title
    if data.title is not None:
        item.title = data.title
    if data.metadata is not None:
        item.metadata = data.metadata
    limits = await plan_limits(session, principal.plan_id)
    await hit_rate(services.limiter, "insert", principal.account_id, limits.insert_rpm)
    growth = text_bytes(item.text) - document.bytes
    if growth > 0:
        await check_storage(session, principal.account_id, limits, growth)
    digest = chunking.content_hash(item.content_type + "\0" + item.text)
    job = None
    if digest != document.content_hash:
        await repository.add_storage(
            session, collection.account_id, text_bytes(item.text) - document.bytes
        )
        document.text, document.content_type = item.text, item.content_type
        document.content_hash, document.bytes = digest, text_bytes(item.text)
        document.status, document.error, document.chunks_done = "queued", None, 0
        job = await enqueue(
            session, principal.account_id, INDEX_JOB, {"document_ids": [str(document.id)]}, 1
        )
    document.title, document.metadata_ = item.title, item.metadata
    document.updated_at = utcnow()
    await session.flush()
    return document, job


async def delete_document(
    session: AsyncSession, collection: Collection, document: Document
) -> None:
    """Chunks go with the document in the same transaction: it leaves search at once."""
    await repository.delete_document(session, collection.id, document.id)
    await repository.add_storage(session, collection.account_id, -document.bytes)
    await session.flush()


def document_read(
    document: Document, chunks: Sequence[Chunk] | None = None, *, with_text: bool = False
) -> DocumentRead:
    return DocumentRead(
        id=document.id,
        collection_id=document.collection_id,
        external_id=document.external_id,
        title=document.title,
        content_type=document.content_type,
        metadata=document.metadata_,
        status=document.status,
        error=document.error,
        chunks_total=document.chunks_total,
        chunks_done=document.chunks_done,
        bytes=document.bytes,
        content_hash=document.content_hash,
        created_at=document.created_at,
        updated_at=document.updated_at,
        chunks=[
            ChunkRead(
                id=c.id,
                position=c.position,
                heading_path=list(c.heading_path),
                text=c.text,
                token_count=c.token_count,
            )
            for c in chunks
        ]
        if chunks is not None
        else None,
        text=document.text if with_text else None,
    )


async def document_chunks(session: AsyncSession, document: Document) -> Sequence[Chunk]:
    return await repository.document_chunks(session, document.id)


async def list_documents(
    session: AsyncSession,
    collection: Collection,
    *,
    status: str | None,
    after: str | None,
    limit: int,
) -> Sequence[Document]:
    """A page of the collection's documents (one more than `limit` when another page follows),
    after the document `after` (an id or external id; 404 if not in the collection)."""
    anchor = await get_document(session, collection, after) if after is not None else None
    return await repository.documents_page(
        session, collection.id, status=status, after=anchor, limit=limit
    )


async def wait_until_indexed(
    services: DocumentServices, document_id: uuid.UUID, seconds: float
) -> None:
    """Poll the document's status until it settles (the job runs in the background), for up
    to `seconds`; each poll in a transaction of its own, so it sees the job's commits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        async with services.database.sessions() as session:
            status = await repository.document_status(session, document_id)
        if status in (None, "ready", "failed"):
            return
        await asyncio.sleep(0.05)
