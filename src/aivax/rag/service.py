"""Collections, plan limits and storage: every query is scoped to the account (another account's
object is a 404), storage is counted toward the account's quota, and indexing is queued as a
durable job (aivax.jobs) in the same transaction as the document (documents: `rag.documents`;
the SQL: `rag.repository`)."""

from __future__ import annotations

import uuid
from typing import Any

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
from aivax.models import Collection, Job, Plan
from aivax.plans.schemas import PlanLimits
from aivax.rag import repository
from aivax.rag.deps import CollectionServices
from aivax.rag.schemas import CollectionCreate, CollectionRead, CollectionUpdate, JobRead

INDEX_JOB = "index_documents"
REEMBED_JOB = "reembed_collection"


class CollectionNotFound(NotFound):
    code = "collection_not_found"


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
    services: CollectionServices, session: AsyncSession, plan_id: str
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
    used = await repository.storage_used(session, account_id)
    if (used or 0) + extra > limits.storage_quota_bytes:
        raise StorageQuotaExceeded(
            f"Storing {extra} more bytes would exceed the plan's storage quota of "
            f"{limits.storage_quota_bytes} bytes ({used or 0} used); delete documents or "
            "upgrade the plan.",
            code="storage_quota_exceeded",
        )


# --- embedding models ----------------------------------------------------------------------


async def embedding_model(
    services: CollectionServices,
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
    services: CollectionServices,
    session: AsyncSession,
    principal: Principal,
    data: CollectionCreate,
) -> Collection:
    limits = await plan_limits(session, principal.plan_id)
    if await repository.count_collections(session, principal.account_id) >= limits.max_collections:
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
    services: CollectionServices,
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
    freed = await repository.delete_collection_contents(session, collection.id)
    await session.delete(collection)
    await repository.add_storage(session, collection.account_id, -freed)
    await session.flush()


async def collection_read(session: AsyncSession, collection: Collection) -> CollectionRead:
    stats = (await repository.collection_stats(session, [collection.id]))[collection.id]
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
    rows = await repository.collections_of(session, account_id)
    stats = await repository.collection_stats(session, [c.id for c in rows])
    jobs = await repository.jobs_by_id(
        session, [c.reembed_job_id for c in rows if c.reembed_job_id]
    )
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
