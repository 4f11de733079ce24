"""Collections and documents: every query is scoped to the account (another account's object
is a 404), storage is counted toward the account's quota, and indexing is queued as a durable
job (aivax.jobs) in the same transaction as the document."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from aivax import jobs
from aivax.catalog import service as catalog
from aivax.catalog.service import ResolvedModel
from aivax.errors import AppError, BadRequest, Forbidden, NotFound
from aivax.inference.admission import (
    StorageQuotaExceeded,
    check_plan,
    rate_headers,
    refuse_rate,
)
from aivax.inference.ratelimit import RateLimiter
from aivax.jobs import service as jobs_service
from aivax.keys.service import Principal
from aivax.kit.clock import utcnow
from aivax.models import Account, Chunk, Collection, Document, Job, Plan
from aivax.plans.schemas import PlanLimits
from aivax.rag import chunking
from aivax.rag.schemas import (
    ChunkRead,
    CollectionCreate,
    CollectionRead,
    CollectionUpdate,
    DocumentCreate,
    DocumentRead,
    DocumentUpdate,
    JobRead,
)
from aivax.services import AppServices

INDEX_JOB = "index_documents"
REEMBED_JOB = "reembed_collection"


class CollectionNotFound(NotFound):
    code = "collection_not_found"


class DocumentNotFound(NotFound):
    code = "document_not_found"


class JobNotFound(NotFound):
    code = "job_not_found"


class CollectionLimitReached(Forbidden):
    code = "collection_limit_reached"
    should_retry = False


class EmbeddingModelInvalid(BadRequest):
    code = "invalid_embedding_model"


# --- plan limits ---------------------------------------------------------------------------


async def plan_limits(session: AsyncSession, plan_id: str) -> PlanLimits:
    plan = await session.get(Plan, plan_id)
    if plan is None:
        raise AppError("The account's plan no longer exists.")
    return PlanLimits.model_validate(plan.limits)


async def cached_plan_limits(
    services: AppServices, session: AsyncSession, plan_id: str
) -> PlanLimits:
    """Plan limits from the hot-path cache (searches read them on every call)."""
    caches = services.caches
    limits = caches.plans.get(plan_id) if caches.enabled else None
    if limits is None:
        limits = await plan_limits(session, plan_id)
        if caches.enabled:
            caches.plans[plan_id] = limits
    return limits


async def hit_rate(limiter: RateLimiter, kind: str, account_id: uuid.UUID, per_minute: int) -> None:
    """Plan limits `search_rpm` / `insert_rpm` (429 with Retry-After)."""
    decision = await limiter.hit_requests(f"{kind}:{account_id}", per_minute)
    if not decision.allowed:
        raise refuse_rate(
            "requests",
            decision,
            rate_headers("requests", decision),
            what=f"collection {kind} requests",
            code=f"rate_limit_{kind}",
        )


async def check_storage(
    session: AsyncSession, account_id: uuid.UUID, limits: PlanLimits, extra: int
) -> None:
    used = await session.scalar(select(Account.storage_bytes_used).where(Account.id == account_id))
    if (used or 0) + extra > limits.storage_quota_bytes:
        raise StorageQuotaExceeded(
            f"Storing {extra} more bytes would exceed the plan's storage quota of "
            f"{limits.storage_quota_bytes} bytes ({used or 0} used); delete documents or "
            "upgrade the plan.",
            code="storage_quota_exceeded",
        )


async def add_storage(session: AsyncSession, account_id: uuid.UUID, delta: int) -> None:
    if delta:
        grown = Account.storage_bytes_used + delta
        await session.execute(
            update(Account)
            .where(Account.id == account_id)
            .values(storage_bytes_used=case((grown < 0, 0), else_=grown))
        )


# --- embedding models ----------------------------------------------------------------------


async def embedding_model(
    services: AppServices,
    session: AsyncSession,
    principal: Principal,
    name: str,
    limits: PlanLimits,
) -> tuple[ResolvedModel, int]:
    """The resolved embedding model and its dimensions (probed once for BYOK models)."""
    model = await catalog.resolve(session, principal.account_id, name, services.secret_box)
    check_plan(principal, principal.plan_id, limits, model)
    if model.kind != "embedding" and not model.byok:
        raise EmbeddingModelInvalid(
            f"{name!r} is not an embedding model (GET /v1/models lists them with "
            "aivax.type = 'embedding').",
            param="embedding_model",
        )
    dimensions = model.options.get("dimensions")
    if isinstance(dimensions, int) and dimensions > 0:
        return model, dimensions
    from aivax.providers.base import UpstreamError
    from aivax.rag import metering

    try:
        probe = await metering.embed(
            services,
            principal.account_id,
            limits,
            model,
            ["dimension probe"],
            request_id=f"probe:{uuid.uuid4()}",
            key_id=principal.key_id,
        )
    except UpstreamError as exc:
        raise EmbeddingModelInvalid(
            f"The embedding model {name!r} did not answer: {exc.message}",
            param="embedding_model",
        ) from exc
    return model, int(probe.vectors.shape[1])


# --- collections ---------------------------------------------------------------------------

MAX_DEFAULT_CHUNK_TOKENS = 256


def default_chunk_size(model: ResolvedModel) -> int:
    """80% of the tokens the embedding model reads (its tokenizer counts a little more than
    cl100k does), at most 256: paraphrase-MiniLM-L3 (128) gets 102, MiniLM-L6 (256) 204."""
    window = model.context_window or 8_191
    return max(32, min(MAX_DEFAULT_CHUNK_TOKENS, int(window * 0.8)))


async def get_collection(
    session: AsyncSession, account_id: uuid.UUID, collection_id: uuid.UUID | str
) -> Collection:
    try:
        key = collection_id if isinstance(collection_id, uuid.UUID) else uuid.UUID(collection_id)
    except ValueError:
        key = None
    collection = await session.get(Collection, key) if key else None
    if collection is None or collection.account_id != account_id:
        raise CollectionNotFound(f"No collection {str(collection_id)!r}.", param="collection_id")
    return collection


async def create_collection(
    services: AppServices, session: AsyncSession, principal: Principal, data: CollectionCreate
) -> Collection:
    limits = await plan_limits(session, principal.plan_id)
    count = await session.scalar(
        select(func.count())
        .select_from(Collection)
        .where(Collection.account_id == principal.account_id)
    )
    if (count or 0) >= limits.max_collections:
        raise CollectionLimitReached(
            f"The plan allows {limits.max_collections} collections; delete one or upgrade.",
        )
    model, dimensions = await embedding_model(
        services, session, principal, data.embedding_model, limits
    )
    size = data.chunk_size or default_chunk_size(model)
    overlap = data.chunk_overlap if data.chunk_overlap is not None else size // 8
    if overlap * 2 > size:
        raise BadRequest(
            f"chunk_overlap must be at most half of chunk_size ({size}).", param="chunk_overlap"
        )
    await services.vectors.ensure_index(dimensions)
    collection = Collection(
        account_id=principal.account_id,
        name=data.name,
        description=data.description,
        embedding_model=data.embedding_model,
        dimensions=dimensions,
        chunk_size=size,
        chunk_overlap=overlap,
        metadata_=data.metadata,
    )
    session.add(collection)
    await session.flush()
    return collection


async def update_collection(
    services: AppServices,
    session: AsyncSession,
    principal: Principal,
    collection: Collection,
    data: CollectionUpdate,
) -> Collection:
    if data.name is not None:
        collection.name = data.name
    if data.description is not None:
        collection.description = data.description
    if data.metadata is not None:
        collection.metadata_ = data.metadata
    if data.embedding_model is not None and data.embedding_model != collection.embedding_model:
        limits = await plan_limits(session, principal.plan_id)
        _, dimensions = await embedding_model(
            services, session, principal, data.embedding_model, limits
        )
        await services.vectors.ensure_index(dimensions)
        collection.embedding_model = data.embedding_model
        collection.dimensions = dimensions
        job = await enqueue(
            session,
            principal.account_id,
            REEMBED_JOB,
            {"collection_id": str(collection.id), "model": data.embedding_model},
        )
        await session.flush()
        collection.reembed_job_id = job.id
    collection.updated_at = utcnow()
    await session.flush()
    return collection


async def delete_collection(session: AsyncSession, collection: Collection) -> None:
    freed = await session.scalar(
        select(func.coalesce(func.sum(Document.bytes), 0)).where(
            Document.collection_id == collection.id
        )
    )
    await session.execute(delete(Chunk).where(Chunk.collection_id == collection.id))
    await session.execute(delete(Document).where(Document.collection_id == collection.id))
    await session.delete(collection)
    await add_storage(session, collection.account_id, -int(freed or 0))
    await session.flush()


async def collection_stats(
    session: AsyncSession, ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, tuple[int, int, int]]:
    """(documents, chunks, bytes) per collection."""
    if not ids:
        return {}
    documents = await session.execute(
        select(Document.collection_id, func.count(), func.coalesce(func.sum(Document.bytes), 0))
        .where(Document.collection_id.in_(ids))
        .group_by(Document.collection_id)
    )
    chunks = await session.execute(
        select(Chunk.collection_id, func.count())
        .where(Chunk.collection_id.in_(ids))
        .group_by(Chunk.collection_id)
    )
    chunk_counts = {row[0]: int(row[1]) for row in chunks}
    stats = {i: (0, chunk_counts.get(i, 0), 0) for i in ids}
    for row in documents:
        stats[row[0]] = (int(row[1]), chunk_counts.get(row[0], 0), int(row[2]))
    return stats


async def collection_read(session: AsyncSession, collection: Collection) -> CollectionRead:
    stats = (await collection_stats(session, [collection.id]))[collection.id]
    job = await session.get(Job, collection.reembed_job_id) if collection.reembed_job_id else None
    return _collection_read(collection, stats, job)


def _collection_read(
    collection: Collection, stats: tuple[int, int, int], job: Job | None
) -> CollectionRead:
    return CollectionRead(
        id=collection.id,
        name=collection.name,
        description=collection.description,
        embedding_model=collection.embedding_model,
        dimensions=collection.dimensions,
        chunk_size=collection.chunk_size,
        chunk_overlap=collection.chunk_overlap,
        metadata=collection.metadata_,
        document_count=stats[0],
        chunk_count=stats[1],
        bytes=stats[2],
        reembedding=job_read(job) if job is not None else None,
        created_at=collection.created_at,
        updated_at=collection.updated_at,
    )


async def list_collections(session: AsyncSession, account_id: uuid.UUID) -> list[CollectionRead]:
    rows = (
        await session.scalars(
            select(Collection)
            .where(Collection.account_id == account_id)
            .order_by(Collection.created_at, Collection.id)
        )
    ).all()
    stats = await collection_stats(session, [c.id for c in rows])
    jobs = {
        job.id: job
        for job in (
            await session.scalars(
                select(Job).where(Job.id.in_([c.reembed_job_id for c in rows if c.reembed_job_id]))
            )
        ).all()
    }
    return [
        _collection_read(c, stats[c.id], jobs.get(c.reembed_job_id) if c.reembed_job_id else None)
        for c in rows
    ]


# --- jobs ----------------------------------------------------------------------------------


async def enqueue(
    session: AsyncSession, account_id: uuid.UUID, kind: str, payload: dict[str, Any], total: int = 0
) -> Job:
    return await jobs.enqueue(session, kind, payload, account_id=account_id, progress_total=total)


def job_read(job: Job) -> JobRead:
    return JobRead(
        id=job.id,
        kind=job.kind,
        status=jobs_service.account_status(job.status),
        progress_done=job.progress_done,
        progress_total=job.progress_total,
        attempts=job.attempts,
        error=job.error,
        result=job.result,
        created_at=job.created_at,
        updated_at=job.updated_at,
        finished_at=job.finished_at,
    )


async def get_job(session: AsyncSession, account_id: uuid.UUID, job_id: str) -> Job:
    try:
        key = uuid.UUID(job_id)
    except ValueError:
        key = None
    job = await session.get(Job, key) if key else None
    if job is None or job.account_id != account_id:
        raise JobNotFound(f"No job {job_id!r}.", param="job_id")
    return job


# --- documents -----------------------------------------------------------------------------


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
        existing = await session.scalar(
            select(Document).where(
                Document.collection_id == collection.id, Document.external_id == item.external_id
            )
        )
    digest = chunking.content_hash(item.content_type + "\0" + item.text)
    size = text_bytes(item.text)
    if existing is not None:
        changed = existing.content_hash != digest
        existing.title = item.title
        existing.metadata_ = item.metadata
        if changed:
            await add_storage(session, collection.account_id, size - existing.bytes)
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
    await add_storage(session, collection.account_id, size)
    return document, True


async def create_document(
    services: AppServices,
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
        document = await session.scalar(
            select(Document).where(
                Document.collection_id == collection.id, Document.external_id == document_id
            )
        )
    if document is None or document.collection_id != collection.id:
        raise DocumentNotFound(
            f"No document {document_id!r} in this collection.", param="document_id"
        )
    return document


async def update_document(
    services: AppServices,
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
        await add_storage(session, collection.account_id, text_bytes(item.text) - document.bytes)
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
    await session.execute(delete(Chunk).where(Chunk.document_id == document.id))
    await session.execute(delete(Document).where(Document.id == document.id))
    await session.execute(
        update(Collection)
        .where(Collection.id == collection.id)
        .values(vectors_version=Collection.vectors_version + 1)
    )
    await add_storage(session, collection.account_id, -document.bytes)
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
    return (
        await session.scalars(
            select(Chunk).where(Chunk.document_id == document.id).order_by(Chunk.position)
        )
    ).all()
