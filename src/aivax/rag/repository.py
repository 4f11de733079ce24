"""The SQL of collections and documents (search has its own, in `keyword` and `vectors`). Every
function takes ids the caller has already scoped to the account."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from aivax.models import Account, Chunk, Collection, Document, Job

# --- storage -------------------------------------------------------------------------------


async def storage_used(session: AsyncSession, account_id: uuid.UUID) -> int | None:
    return await session.scalar(select(Account.storage_bytes_used).where(Account.id == account_id))


async def add_storage(session: AsyncSession, account_id: uuid.UUID, delta: int) -> None:
    if delta:
        grown = Account.storage_bytes_used + delta
        await session.execute(
            update(Account)
            .where(Account.id == account_id)
            .values(storage_bytes_used=case((grown < 0, 0), else_=grown))
        )


# --- collections ---------------------------------------------------------------------------


async def count_collections(session: AsyncSession, account_id: uuid.UUID) -> int:
    count = await session.scalar(
        select(func.count()).select_from(Collection).where(Collection.account_id == account_id)
    )
    return count or 0


async def delete_collection_contents(session: AsyncSession, collection_id: uuid.UUID) -> int:
    """Delete the collection's chunks and documents; the bytes the documents held."""
    freed = await session.scalar(
        select(func.coalesce(func.sum(Document.bytes), 0)).where(
            Document.collection_id == collection_id
        )
    )
    await session.execute(delete(Chunk).where(Chunk.collection_id == collection_id))
    await session.execute(delete(Document).where(Document.collection_id == collection_id))
    return int(freed or 0)


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


async def collections_of(session: AsyncSession, account_id: uuid.UUID) -> Sequence[Collection]:
    return (
        await session.scalars(
            select(Collection)
            .where(Collection.account_id == account_id)
            .order_by(Collection.created_at, Collection.id)
        )
    ).all()


async def jobs_by_id(session: AsyncSession, ids: list[uuid.UUID]) -> dict[uuid.UUID, Job]:
    return {
        job.id: job for job in (await session.scalars(select(Job).where(Job.id.in_(ids)))).all()
    }


# --- documents -----------------------------------------------------------------------------


async def document_by_external_id(
    session: AsyncSession, collection_id: uuid.UUID, external_id: str
) -> Document | None:
    return await session.scalar(
        select(Document).where(
            Document.collection_id == collection_id, Document.external_id == external_id
        )
    )


async def delete_document(
    session: AsyncSession, collection_id: uuid.UUID, document_id: uuid.UUID
) -> None:
    """The document and its chunks, and the collection's vectors version bumped (in-process
    vector caches compare it)."""
    await session.execute(delete(Chunk).where(Chunk.document_id == document_id))
    await session.execute(delete(Document).where(Document.id == document_id))
    await session.execute(
        update(Collection)
        .where(Collection.id == collection_id)
        .values(vectors_version=Collection.vectors_version + 1)
    )


async def document_chunks(session: AsyncSession, document_id: uuid.UUID) -> Sequence[Chunk]:
    return (
        await session.scalars(
            select(Chunk).where(Chunk.document_id == document_id).order_by(Chunk.position)
        )
    ).all()


async def document_status(session: AsyncSession, document_id: uuid.UUID) -> str | None:
    return await session.scalar(select(Document.status).where(Document.id == document_id))


async def documents_page(
    session: AsyncSession,
    collection_id: uuid.UUID,
    *,
    status: str | None,
    after: Document | None,
    limit: int,
) -> Sequence[Document]:
    """Up to `limit + 1` documents in creation order, after `after` (the extra one tells the
    caller there is a next page)."""
    statement = select(Document).where(Document.collection_id == collection_id)
    if status is not None:
        statement = statement.where(Document.status == status)
    if after is not None:
        statement = statement.where(
            (Document.created_at > after.created_at)
            | ((Document.created_at == after.created_at) & (Document.id > after.id))
        )
    return (
        await session.scalars(statement.order_by(Document.created_at, Document.id).limit(limit + 1))
    ).all()
