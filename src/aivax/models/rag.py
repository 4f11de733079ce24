"""RAG collections, their documents and chunks (indexed by jobs: aivax.models.job).

Chunk vectors live in `chunks.embedding`: a pgvector `vector` on PostgreSQL (HNSW-indexed per
dimension, see aivax.rag.vectors) and float32 bytes on SQLite. Full-text search uses a generated
`tsvector` column on PostgreSQL and the FTS5 table `chunks_fts` on SQLite; both are created by
migration 0004 with dialect-specific SQL, outside these models.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import ForeignKey, Index, String, Text, UniqueConstraint, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from aivax.models.base import Base, BigIntId, Timestamped
from aivax.models.vector_type import EmbeddingColumn


class Collection(Timestamped, Base):
    __tablename__ = "collections"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    account_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(String(2000), default="")
    embedding_model: Mapped[str] = mapped_column(String(300))
    dimensions: Mapped[int]
    chunk_size: Mapped[int]
    chunk_overlap: Mapped[int]
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    # Bumped on every change to the collection's chunks: in-process vector caches compare it.
    vectors_version: Mapped[int] = mapped_column(default=0)
    # The re-embedding job when the embedding model changed (None when settled).
    reembed_job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)


class Document(Timestamped, Base):
    __tablename__ = "documents"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    collection_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("collections.id", ondelete="CASCADE"), index=True
    )
    account_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    external_id: Mapped[str | None] = mapped_column(String(256))
    title: Mapped[str] = mapped_column(String(500), default="")
    content_type: Mapped[str] = mapped_column(String(40))
    text: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(64))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    # queued → indexing → ready | failed
    status: Mapped[str] = mapped_column(String(20), default="queued")
    error: Mapped[str | None] = mapped_column(String(2000))
    chunks_total: Mapped[int] = mapped_column(default=0)
    chunks_done: Mapped[int] = mapped_column(default=0)
    # What this document counts toward the account's storage quota.
    bytes: Mapped[int] = mapped_column(default=0)

    __table_args__ = (
        UniqueConstraint("collection_id", "external_id", name="uq_documents_collection_external"),
    )


class Chunk(Base):
    __tablename__ = "chunks"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    collection_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("collections.id", ondelete="CASCADE")
    )
    document_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"))
    position: Mapped[int]
    heading_path: Mapped[list[str]] = mapped_column(default=list)
    text: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(64))
    token_count: Mapped[int]
    dimensions: Mapped[int]
    # Deferred: loaded only by the code that needs vectors, never with the chunk text.
    embedding: Mapped[Any] = mapped_column(EmbeddingColumn(), deferred=True)

    __table_args__ = (
        Index("ix_chunks_collection_id", "collection_id"),
        Index("ix_chunks_document_id_position", "document_id", "position"),
    )
