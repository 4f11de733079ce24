"""Search: keyword, vector and hybrid, with exact `min_score`.

Scores are in [0, 1]:
- vector_score: cosine similarity of the query and chunk embeddings, clamped at 0.
- keyword_score: r / (r + 10), r the BM25 rank computed with the statistics of the searched
  collection alone (aivax.rag.keyword); 0.5 at r = 10. Comparable within one database.
- hybrid score: score-weighted reciprocal rank fusion (k = 60) of the two ranked lists:
  the mean over the two methods of  component score x (k + 1) / (k + rank)  (0 where a method
  did not return the chunk). The rank discount is RRF's; weighting it by the component's own
  score keeps the fused score an absolute measure of relevance, so `min_score` still removes
  irrelevant chunks that merely happen to rank first. 1.0 = a perfect match ranked first by
  both methods.
- with a reranker, the score is the reranker's relevance in [0, 1].
`min_score` applies to `score` and is exact: no result below it is ever returned.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import (
    ColumnElement,
    String,
    and_,
    case,
    false,
    literal,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from aivax.models import Chunk, Document
from aivax.rag.keyword import keyword, query_words
from aivax.rag.schemas import ChunkMatch, SearchResult, scalar_kind

__all__ = ["keyword", "query_words"]

RRF_K = 60
# Every search fuses the same candidates whatever its `top_k` (at most 100, the request's
# limit): a larger top_k extends the list, never reorders it. A pool of 4 x top_k made the top
# 10 differ from the first 10 of the top 100 for most queries.
CANDIDATES = 100
# group_by "document": chunks ranked before grouping, so top_k documents are found even when
# the best documents each hold many matching chunks.
DOCUMENT_CANDIDATES = 400


@dataclass
class Candidate:
    chunk_id: int
    vector_score: float | None = None
    keyword_score: float | None = None
    vector_rank: int | None = None
    keyword_rank: int | None = None
    rerank_score: float | None = None
    score: float = 0.0


def candidate_count(group_by: str = "chunk") -> int:
    return DOCUMENT_CANDIDATES if group_by == "document" else CANDIDATES


async def document_groups(
    session: AsyncSession, candidates: Sequence[Candidate], top_k: int
) -> list[Candidate]:
    """The candidates of the `top_k` documents whose best chunks rank first (every matching
    chunk of each), in ranking order; group_results then folds them per document."""
    if not candidates:
        return []
    rows = await session.execute(
        select(Chunk.id, Chunk.document_id).where(Chunk.id.in_([c.chunk_id for c in candidates]))
    )
    owner = {int(row[0]): row[1] for row in rows}
    chosen: list[uuid.UUID] = []
    for candidate in candidates:
        document = owner.get(candidate.chunk_id)
        if document is not None and document not in chosen:
            chosen.append(document)
            if len(chosen) == top_k:
                break
    wanted = set(chosen)
    return [c for c in candidates if owner.get(c.chunk_id) in wanted]


def group_results(results: Sequence[SearchResult], top_k: int) -> list[SearchResult]:
    """One result per document, its best chunk (results come best first), the others listed
    in `matches`."""
    best: dict[uuid.UUID, SearchResult] = {}
    for result in results:
        head = best.get(result.document_id)
        if head is None:
            if len(best) < top_k:
                best[result.document_id] = result.model_copy(update={"matches": []})
            continue
        assert head.matches is not None  # noqa: S101 - set when the document was first seen
        head.matches.append(
            ChunkMatch(
                chunk_id=result.chunk_id,
                position=result.position,
                heading_path=result.heading_path,
                text=result.text,
                score=result.score,
            )
        )
    return list(best.values())


def metadata_conditions(filter_: dict[str, Any] | None) -> list[ColumnElement[bool]]:
    """SQL conditions on `documents.metadata` for a filter that passed `check_filter`.

    A condition compares only metadata values of its operand's JSON type: `{"year": 2024}`
    matches the number 2024, never the string "2024", and a document holding "unknown"
    under `year` is simply not matched by `{"year": {"$gt": 2000}}` (a plain cast would
    fail the whole query on PostgreSQL). `$ne` and `$nin` match documents whose value
    differs, including those without the key or with a value of another type."""
    if not filter_:
        return []
    conditions: list[ColumnElement[bool]] = []
    for key, condition in filter_.items():
        operations = condition if isinstance(condition, dict) else {"$eq": condition}
        for operator, operand in operations.items():
            conditions.append(_condition(key, operator, operand))
    return conditions


class json_kind(FunctionElement[str]):
    """`json_kind(documents.metadata, key)`: the JSON type of the value under `key` as
    PostgreSQL's `json_typeof` names it ('number', 'string', 'boolean', ...), NULL where the
    key is absent (SQLite's `json_type` names mapped to the same words)."""

    type = String()
    name = "json_kind"
    inherit_cache = True


@compiles(json_kind, "sqlite")
def _sqlite_kind(element: json_kind, compiler: SQLCompiler, **kw: Any) -> str:
    document, key = (compiler.process(clause, **kw) for clause in element.clauses)
    return (
        f"CASE json_type({document}, '$.\"' || {key} || '\"') "
        "WHEN 'integer' THEN 'number' WHEN 'real' THEN 'number' WHEN 'text' THEN 'string' "
        "WHEN 'true' THEN 'boolean' WHEN 'false' THEN 'boolean' ELSE 'other' END"
    )


@compiles(json_kind, "postgresql")
def _pg_kind(element: json_kind, compiler: SQLCompiler, **kw: Any) -> str:
    document, key = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"json_typeof({document} -> CAST({key} AS TEXT))"


def _value(key: str, kind: str) -> ColumnElement[Any]:
    """The metadata value under `key` when it is of `kind`, else NULL. CASE keeps the cast
    from running on values of other types (PostgreSQL evaluates AND operands in any order)."""
    field_ = Document.metadata_[key]
    typed: ColumnElement[Any] = {
        "number": field_.as_float(),
        "string": field_.as_string(),
        # SQLite reads a JSON boolean as 1/0, PostgreSQL as 'true'/'false': compare the
        # type-checked value as the word.
        "boolean": case((field_.as_boolean(), literal("true")), else_=literal("false")),
    }[kind]
    return case((json_kind(Document.metadata_, literal(key, String())) == kind, typed))


def _operand(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return float(value) if isinstance(value, int | float) else value


def _condition(key: str, operator: str, operand: Any) -> ColumnElement[bool]:
    if operator in ("$in", "$nin"):
        values = list(operand)
        if not values:
            return true() if operator == "$nin" else false()
        column = _value(key, scalar_kind(values[0]) or "string")
        clause = column.in_([_operand(value) for value in values])
        return clause if operator == "$in" else or_(not_(clause), column.is_(None))
    column = _value(key, scalar_kind(operand) or "string")
    value = _operand(operand)
    match operator:
        case "$eq":
            return column == value  # type: ignore[no-any-return]
        case "$ne":
            return or_(column != value, column.is_(None))
        case "$gt":
            return column > value  # type: ignore[no-any-return]
        case "$gte":
            return column >= value  # type: ignore[no-any-return]
        case "$lt":
            return column < value  # type: ignore[no-any-return]
        case _:
            return column <= value  # type: ignore[no-any-return]


async def allowed_chunks(
    session: AsyncSession, collection_id: uuid.UUID, conditions: list[ColumnElement[bool]]
) -> set[int]:
    rows = await session.execute(
        select(Chunk.id)
        .join(Document, Document.id == Chunk.document_id)
        .where(Chunk.collection_id == collection_id, and_(*conditions))
    )
    return {int(row[0]) for row in rows}


def fts_query(words: list[str], operator: str = "OR") -> str:
    """`words` joined by `operator`, each quoted: FTS5 syntax characters in them are inert."""
    return f" {operator} ".join('"' + word.replace('"', "") + '"' for word in words)


def fuse(
    vector_hits: Sequence[tuple[int, float]] | None,
    keyword_hits: Sequence[tuple[int, float]] | None,
    mode: str,
) -> list[Candidate]:
    candidates: dict[int, Candidate] = {}
    for rank, (chunk_id, score) in enumerate(vector_hits or [], start=1):
        item = candidates.setdefault(chunk_id, Candidate(chunk_id))
        item.vector_score, item.vector_rank = max(score, 0.0), rank
    for rank, (chunk_id, score) in enumerate(keyword_hits or [], start=1):
        item = candidates.setdefault(chunk_id, Candidate(chunk_id))
        item.keyword_score, item.keyword_rank = score, rank
    for item in candidates.values():
        if mode == "vector":
            item.score = item.vector_score or 0.0
        elif mode == "keyword":
            item.score = item.keyword_score or 0.0
        else:
            fused = sum(
                (score or 0.0) * (RRF_K + 1) / (RRF_K + rank)
                for score, rank in (
                    (item.vector_score, item.vector_rank),
                    (item.keyword_score, item.keyword_rank),
                )
                if rank
            )
            item.score = min(fused / 2.0, 1.0)
    return sorted(candidates.values(), key=lambda c: (-c.score, c.chunk_id))


async def hydrate(
    session: AsyncSession, candidates: Sequence[Candidate], collections: dict[uuid.UUID, Any]
) -> list[SearchResult]:
    """Chunk text, document and metadata for each candidate, in the candidates' order."""
    if not candidates:
        return []
    ids = [c.chunk_id for c in candidates]
    rows = (
        await session.execute(
            select(
                Chunk.id,
                Chunk.collection_id,
                Chunk.document_id,
                Chunk.position,
                Chunk.heading_path,
                Chunk.text,
                Document.external_id,
                Document.title,
                Document.metadata_,
            )
            .join(Document, Document.id == Chunk.document_id)
            .where(Chunk.id.in_(ids))
        )
    ).all()
    by_id = {row.id: row for row in rows}
    results = []
    for candidate in candidates:
        row = by_id.get(candidate.chunk_id)
        if row is None or row.collection_id not in collections:
            continue  # deleted between ranking and now
        results.append(
            SearchResult(
                chunk_id=row.id,
                collection_id=row.collection_id,
                document_id=row.document_id,
                document_external_id=row.external_id,
                document_title=row.title,
                position=row.position,
                heading_path=list(row.heading_path),
                text=row.text,
                metadata=row.metadata_,
                score=round(candidate.score, 6),
                vector_score=_rounded(candidate.vector_score),
                keyword_score=_rounded(candidate.keyword_score),
                rerank_score=_rounded(candidate.rerank_score),
            )
        )
    return results


def _rounded(value: float | None) -> float | None:
    return round(value, 6) if value is not None else None


def as_query_vector(matrix: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return np.ascontiguousarray(matrix[0], dtype=np.float32)
