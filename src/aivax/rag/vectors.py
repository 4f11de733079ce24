"""Nearest chunks by cosine similarity.

PostgreSQL: pgvector. The `embedding` column has no fixed dimension, so each dimension in use
gets a partial HNSW index over `embedding::vector(d)`; queries use the same expression and
`hnsw.iterative_scan`, so a collection filter never starves the result list.

SQLite: an exact scan over an in-process float32 matrix per collection (one BLAS product),
loaded from the database on first use and reloaded when the collection's `vectors_version`
moves. Measured at 100k x 384 dims on this project's 2-core reference machine: ~5 ms, against
~65 ms for sqlite-vec's brute-force `vec0` scan — and many Python builds cannot load SQLite
extensions at all (docs/decisions.md). Memory: 4 bytes x dims per chunk, capped by
AIVAX_RAG_VECTOR_CACHE_MB (least recently used collections are dropped first).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sqlalchemy import LargeBinary, select, text, type_coerce
from sqlalchemy.ext.asyncio import AsyncEngine

from aivax.db import Database
from aivax.models import Chunk
from aivax.rag import int8scan

HNSW_MAX_DIMENSIONS = 2000  # pgvector's limit for an HNSW index on `vector`
THREAD_THRESHOLD_ROWS = 20_000
# Above this many chunks, an int8 scan picks RESCORE_FACTOR x limit candidates (at least
# RESCORE_MIN) and only those are scored exactly in float32 (aivax.rag.int8scan).
QUANTIZED_THRESHOLD_ROWS = 20_000
RESCORE_FACTOR = 10
RESCORE_MIN = 500
# PostgreSQL HNSW: the graph search keeps `ef_search` candidates. The pool searches ask for is
# fixed (aivax.rag.search.CANDIDATES), so this sets how far past it the graph is explored:
# 2 x the rows asked for, at least EF_SEARCH_MIN. With ef = the rows asked for (40 for a top 5),
# 11% of top-10 lists differed from an exact scan.
EF_SEARCH_MIN = 200
EF_SEARCH_MAX = 1000


@dataclass
class _Entry:
    version: int
    ids: npt.NDArray[np.int64]
    matrix: npt.NDArray[np.float32]
    quantized: int8scan.Quantized | None = None

    @property
    def nbytes(self) -> int:
        extra = self.quantized.nbytes if self.quantized is not None else 0
        return int(self.matrix.nbytes + self.ids.nbytes + extra)


class VectorIndex:
    def __init__(self, database: Database, *, cache_bytes: int) -> None:
        self.database = database
        self.cache_bytes = cache_bytes
        self._entries: OrderedDict[uuid.UUID, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._load_locks: dict[uuid.UUID, asyncio.Lock] = {}
        self._indexed_dimensions: set[int] = set()

    @property
    def is_postgres(self) -> bool:
        return self.database.engine.dialect.name == "postgresql"

    async def ensure_index(self, dimensions: int) -> None:
        """PostgreSQL: the partial HNSW index for this dimension (created once)."""
        if not self.is_postgres or dimensions in self._indexed_dimensions:
            return
        if dimensions <= HNSW_MAX_DIMENSIONS:
            await _create_hnsw(self.database.engine, dimensions)
        self._indexed_dimensions.add(dimensions)

    async def nearest(
        self,
        collection_id: uuid.UUID,
        version: int,
        dimensions: int,
        query: npt.NDArray[np.float32],
        limit: int,
        allowed: set[int] | None = None,
    ) -> list[tuple[int, float]]:
        """(chunk id, cosine similarity), best first."""
        if self.is_postgres:
            return await self._nearest_pg(collection_id, dimensions, query, limit, allowed)
        entry = await self._entry(collection_id, version, dimensions)
        if entry.ids.size == 0:
            return []
        if entry.ids.size < THREAD_THRESHOLD_ROWS:
            return _rank(entry, query, limit, allowed)
        # Large scans run in a worker thread (NumPy releases the GIL), so they overlap the
        # keyword search and other requests instead of blocking the event loop.
        return await asyncio.to_thread(_rank, entry, query, limit, allowed)

    async def _entry(self, collection_id: uuid.UUID, version: int, dimensions: int) -> _Entry:
        with self._lock:
            entry = self._entries.get(collection_id)
            if entry is not None and entry.version == version:
                self._entries.move_to_end(collection_id)
                return entry
        lock = self._load_locks.setdefault(collection_id, asyncio.Lock())
        async with lock:
            with self._lock:
                entry = self._entries.get(collection_id)
                if entry is not None and entry.version == version:
                    return entry
            entry = await self._load(collection_id, version, dimensions)
            with self._lock:
                self._entries[collection_id] = entry
                self._entries.move_to_end(collection_id)
                total = sum(e.nbytes for e in self._entries.values())
                while total > self.cache_bytes and len(self._entries) > 1:
                    _, dropped = self._entries.popitem(last=False)
                    total -= dropped.nbytes
            return entry

    async def _load(self, collection_id: uuid.UUID, version: int, dimensions: int) -> _Entry:
        # The stored float32 bytes as they are (type_coerce skips the per-row array decoding).
        raw_vector = type_coerce(Chunk.embedding, LargeBinary)
        async with self.database.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(Chunk.id, raw_vector)
                    .where(Chunk.collection_id == collection_id, Chunk.dimensions == dimensions)
                    .order_by(Chunk.id)
                )
            ).all()
        ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
        raw = np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float32)
        matrix = raw.reshape(len(rows), dimensions)
        quantized = None
        if len(rows) >= QUANTIZED_THRESHOLD_ROWS:
            quantized = await asyncio.to_thread(int8scan.quantize, matrix)
        return _Entry(version, ids, matrix, quantized)

    def forget(self, collection_id: uuid.UUID) -> None:
        with self._lock:
            self._entries.pop(collection_id, None)

    async def _nearest_pg(
        self,
        collection_id: uuid.UUID,
        dimensions: int,
        query: npt.NDArray[np.float32],
        limit: int,
        allowed: set[int] | None,
    ) -> list[tuple[int, float]]:
        literal = "[" + ",".join(f"{value:.7g}" for value in query.tolist()) + "]"
        expression = f"embedding::vector({int(dimensions)})"
        restrict = " AND id = ANY(:allowed)" if allowed is not None else ""
        # Only integers are formatted into the statement; every value is a bound parameter.
        vector_type = f"vector({int(dimensions)})"
        sql = text(
            f"SELECT id, 1 - ({expression} <=> CAST(:q AS {vector_type})) AS sim "  # noqa: S608
            f"FROM chunks WHERE collection_id = :c AND dimensions = :d{restrict} "
            f"ORDER BY {expression} <=> CAST(:q AS {vector_type}) LIMIT :k"
        )
        params: dict[str, object] = {"q": literal, "c": collection_id, "d": dimensions, "k": limit}
        if allowed is not None:
            params["allowed"] = list(allowed)
        async with self.database.engine.begin() as conn:
            # Keep scanning the graph until `limit` rows pass the filters (pgvector ≥ 0.8).
            # (One round trip for both settings; `true`: for this transaction only.)
            await conn.execute(
                text(
                    "SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true), "
                    "set_config('hnsw.ef_search', :ef, true)"
                ),
                {"ef": str(ef_search(limit))},
            )
            rows = (await conn.execute(sql, params)).all()
        ranked = sorted(((int(r[0]), float(r[1])) for r in rows), key=lambda item: -item[1])
        return ranked


def ef_search(limit: int) -> int:
    return max(EF_SEARCH_MIN, min(2 * limit, EF_SEARCH_MAX))


def _rank(
    entry: _Entry, query: npt.NDArray[np.float32], limit: int, allowed: set[int] | None
) -> list[tuple[int, float]]:
    mask = (
        np.isin(entry.ids, np.fromiter(allowed, dtype=np.int64, count=len(allowed)))
        if allowed is not None
        else None
    )
    if entry.quantized is not None:
        rough = int8scan.approximate_scores(entry.quantized, query)
        if mask is not None:
            rough = np.where(mask, rough, -np.inf)
        wanted = min(max(limit * RESCORE_FACTOR, RESCORE_MIN), rough.size)
        rows = np.argpartition(-rough, wanted - 1)[:wanted]
        rows = rows[np.isfinite(rough[rows])]
        exact = entry.matrix[rows] @ query
        count = min(limit, exact.size)
        if count == 0:
            return []
        best = np.argpartition(-exact, count - 1)[:count]
        best = best[np.argsort(-exact[best])]
        return [(int(entry.ids[rows[i]]), float(exact[i])) for i in best]
    scores = entry.matrix @ query
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    count = min(limit, scores.size)
    top = np.argpartition(-scores, count - 1)[:count]
    top = top[np.argsort(-scores[top])]
    return [(int(entry.ids[i]), float(scores[i])) for i in top if np.isfinite(scores[i])]


async def _create_hnsw(engine: AsyncEngine, dimensions: int) -> None:
    name = f"ix_chunks_embedding_hnsw_{int(dimensions)}"
    async with engine.begin() as conn:
        await conn.execute(
            text(
                f"CREATE INDEX IF NOT EXISTS {name} ON chunks USING hnsw "
                f"((embedding::vector({int(dimensions)})) vector_cosine_ops) "
                f"WHERE dimensions = {int(dimensions)}"
            )
        )
