"""Search: keyword, vector and hybrid, with exact `min_score`.

Scores are in [0, 1]:
- vector_score: cosine similarity of the query and chunk embeddings, clamped at 0.
- keyword_score: r / (r + 10), r the BM25 rank (SQLite FTS5's `bm25`; on PostgreSQL, BM25
  rebuilt from `ts_rank_cd`, see _pg_keyword); 0.5 at r = 10. Comparable within one database.
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

import math
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from cachetools import TTLCache
from sqlalchemy import (
    ColumnElement,
    String,
    Text,
    and_,
    case,
    cast,
    column,
    false,
    func,
    literal,
    literal_column,
    not_,
    or_,
    select,
    table,
    true,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from aivax.models import Chunk, Document
from aivax.rag.schemas import SearchResult, scalar_kind

RRF_K = 60
CANDIDATES_MIN = 20
# keyword_score = r / (r + KEYWORD_HALF): a BM25 rank of 10 scores 0.5. With 1, ordinary BM25
# values (5-15) all scored above 0.8 and outweighed cosine similarities in hybrid fusion;
# 10 made hybrid beat both methods on the bench set with every local model on SQLite.
KEYWORD_HALF = 10.0
WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class Candidate:
    chunk_id: int
    vector_score: float | None = None
    keyword_score: float | None = None
    vector_rank: int | None = None
    keyword_rank: int | None = None
    rerank_score: float | None = None
    score: float = 0.0


def candidate_count(top_k: int) -> int:
    return max(CANDIDATES_MIN, top_k * 4)


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


# English function words: matching them says nothing about relevance (PostgreSQL's 'english'
# configuration drops the same kind of words).
STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "do",
        "does",
        "did",
        "for",
        "from",
        "had",
        "has",
        "have",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "me",
        "my",
        "no",
        "not",
        "of",
        "on",
        "or",
        "our",
        "so",
        "than",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
    ]
)


def query_words(query: str) -> list[str]:
    words = [w for w in WORD.findall(query.lower()) if w not in STOPWORDS]
    return words[:64]


def fts_query(words: list[str], operator: str = "OR") -> str:
    """`words` joined by `operator`, each quoted: FTS5 syntax characters in them are inert."""
    return f" {operator} ".join('"' + word.replace('"', "") + '"' for word in words)


async def keyword(
    session: AsyncSession,
    collection_id: uuid.UUID,
    query: str,
    limit: int,
    conditions: list[ColumnElement[bool]],
) -> list[tuple[int, float]]:
    """(chunk id, keyword score), best first."""
    dialect = session.get_bind().dialect.name
    words = await selective_words(session, query_words(query))
    if not words:
        return []
    filtered = bool(conditions)
    if dialect == "postgresql":
        return await _pg_keyword(session, collection_id, words, limit, conditions)

    async def ranked(chosen: list[str], every: bool) -> list[tuple[int, float]]:
        expression = fts_query(chosen, "AND" if every else "OR")
        if not filtered:
            fast = await _global_then_filter(session, collection_id, expression, limit)
            if fast is not None:
                return fast
        fts = table("chunks_fts", column("rowid"))
        rank = (-func.bm25(literal_column("chunks_fts"))).label("rank")
        statement = (
            select(Chunk.id, rank)
            .join(fts, fts.c.rowid == Chunk.id)
            .where(
                Chunk.collection_id == collection_id,
                literal_column("chunks_fts").op("MATCH")(literal(expression, String())),
            )
            .order_by(rank.desc())
            .limit(limit)
        )
        return await _scores(session, statement, conditions)

    return await _every_word_first(session, words, limit, ranked)


Ranked = Callable[[list[str], bool], Awaitable[list[tuple[int, float]]]]


async def _every_word_first(
    session: AsyncSession, words: list[str], limit: int, ranked: Ranked
) -> list[tuple[int, float]]:
    """Chunks holding every word first; when they are fewer than `limit`, chunks holding any
    of the rarest words within the match budget fill up the rest. `ranked(words, every)`."""
    found = await ranked(words, True)
    if len(found) >= limit or len(words) == 1:
        return found
    seen = {chunk_id for chunk_id, _ in found}
    broader = await ranked(await _within_budget(session, words), False)
    more = [hit for hit in broader if hit[0] not in seen]
    return sorted([*found, *more], key=lambda hit: -hit[1])[:limit]


async def _scores(
    session: AsyncSession, statement: Any, conditions: list[ColumnElement[bool]]
) -> list[tuple[int, float]]:
    """Run a (chunk id, rank) query, restricted to documents matching `conditions`."""
    if conditions:
        statement = statement.join(Document, Document.id == Chunk.document_id).where(
            and_(*conditions)
        )
    rows = (await session.execute(statement)).all()
    return [(int(row[0]), _saturate(float(row[1]))) for row in rows]


GLOBAL_CANDIDATES = 4


async def _global_then_filter(
    session: AsyncSession, collection_id: uuid.UUID, expression: str, limit: int
) -> list[tuple[int, float]] | None:
    """SQLite: rank on the FTS index alone (no join: about 3x cheaper), then keep this
    collection's rows. Exact whenever at least `limit` of the global top rows belong to the
    collection (any other row of it ranks below all of them); otherwise None, and the caller
    runs the joined query."""
    match = literal_column("chunks_fts").op("MATCH")(literal(expression, String()))
    score = func.bm25(literal_column("chunks_fts"))
    top = (
        select(literal_column("rowid").label("id"), (-score).label("rank"))
        .select_from(table("chunks_fts"))
        .where(match)
        .order_by(score)
        .limit(limit * GLOBAL_CANDIDATES)
        .subquery()
    )
    rows = (
        await session.execute(
            select(top.c.id, top.c.rank)
            .join(Chunk, Chunk.id == top.c.id)
            .where(Chunk.collection_id == collection_id)
            .order_by(top.c.rank.desc())
        )
    ).all()
    if len(rows) < limit:
        total = await session.scalar(
            select(func.count()).select_from(table("chunks_fts")).where(match)
        )
        if (total or 0) > limit * GLOBAL_CANDIDATES:
            return None  # other collections crowd the global top: rank within this one
    return [(int(row[0]), _saturate(float(row[1]))) for row in rows[:limit]]


# Ranking costs time per matching row, so a word found in a large share of all chunks (low IDF:
# it barely moves BM25) is left out of the query when rarer words remain. Document frequencies
# are estimates, cached per database for a few minutes.
COMMON_SHARE = 0.05
OR_BUDGET = 3_000
_document_frequency: TTLCache[tuple[str, str], int] = TTLCache(100_000, 300)


async def _frequency(session: AsyncSession, word: str) -> int:
    bind = session.get_bind()
    key = (str(bind.engine.url), word)
    cached = _document_frequency.get(key)
    if cached is not None:
        return cached
    if bind.dialect.name == "postgresql":
        tsquery = func.plainto_tsquery(
            literal_column("'english'::regconfig"), cast(literal(word), Text)
        )
        statement = (
            select(func.count())
            .select_from(Chunk)
            .where(literal_column("chunks.tsv").op("@@")(tsquery))
        )
    else:
        statement = (
            select(func.count())
            .select_from(table("chunks_fts"))
            .where(literal_column("chunks_fts").op("MATCH")(literal(fts_query([word]), String())))
        )
    count = int(await session.scalar(statement) or 0)
    _document_frequency[key] = count
    return count


BM25_K1 = 1.2
BM25_B = 0.75


async def _average_length(session: AsyncSession) -> float:
    """PostgreSQL: the mean number of distinct lexemes per chunk (cached with the counts)."""
    key = (str(session.get_bind().engine.url), "\0average")
    cached = _document_frequency.get(key)
    if cached is None:
        value = await session.scalar(
            select(func.avg(func.length(literal_column("chunks.tsv")))).select_from(Chunk)
        )
        cached = max(int(float(value or 1.0) * 1000), 1000)
        _document_frequency[key] = cached
    return cached / 1000


async def _total_chunks(session: AsyncSession) -> int:
    total_key = (str(session.get_bind().engine.url), "\0total")
    total = _document_frequency.get(total_key)
    if total is None:
        total = int(await session.scalar(select(func.count()).select_from(Chunk)) or 0)
        _document_frequency[total_key] = total
    return total


async def selective_words(session: AsyncSession, words: list[str]) -> list[str]:
    """The query words, rarest first, without those found in over COMMON_SHARE of all chunks
    (when rarer ones remain)."""
    if len(words) < 2:
        return words
    total = await _total_chunks(session)
    frequencies = {word: await _frequency(session, word) for word in dict.fromkeys(words)}
    by_rarity = sorted(frequencies, key=lambda word: frequencies[word])
    if total < 1_000:
        return by_rarity
    rare = [w for w in by_rarity if frequencies[w] <= total * COMMON_SHARE]
    return rare if rare else by_rarity


async def _pg_keyword(
    session: AsyncSession,
    collection_id: uuid.UUID,
    words: list[str],
    limit: int,
    conditions: list[ColumnElement[bool]],
) -> list[tuple[int, float]]:
    """PostgreSQL ranks each matching row by reading its tsvector, so the cost grows with the
    matches. Chunks holding every query word are ranked first; only when fewer than `limit` do,
    chunks holding any of the rarest words (up to OR_BUDGET estimated matches) are added.

    `ts_rank_cd` alone knows no inverse document frequency: a common word counts as much as a
    rare one (measured: nDCG@10 0.36 against FTS5 BM25's 0.60 on the bench set). So the rank is
    BM25-shaped: the sum over query words of  idf(word) x ts_rank_cd(chunk, word)  (length-
    normalised), with idf from the cached document frequencies. Every chunk is scored against
    all the query words, so scores stay comparable."""
    tsv: ColumnElement[Any] = literal_column("chunks.tsv")

    def tsquery(operator: str, chosen: list[str]) -> Any:
        return func.to_tsquery(
            literal_column("'english'::regconfig"), cast(literal(operator.join(chosen)), Text)
        )

    total = await _total_chunks(session)
    average = await _average_length(session)
    # BM25 (k1 = 1.2, b = 0.75): a word's frequency in the chunk is ts_rank_cd's raw rank for
    # that word alone (0.1 per occurrence), the chunk's length its number of distinct lexemes.
    norm = literal(BM25_K1) * (
        literal(1 - BM25_B) + literal(BM25_B) * func.length(tsv) / literal(average)
    )
    weights = []
    for word in words:
        frequency = await _frequency(session, word)
        idf = math.log(1 + (total - frequency + 0.5) / (frequency + 0.5))
        tf = func.ts_rank_cd(tsv, tsquery("", [word]), 0) * literal(10.0)
        weights.append(literal(idf) * tf * literal(BM25_K1 + 1) / (tf + norm))
    rank = sum(weights[1:], weights[0]).label("rank")

    async def ranked(chosen: list[str], every: bool) -> list[tuple[int, float]]:
        match = tsquery(" & " if every else " | ", chosen)
        statement = (
            select(Chunk.id, rank)
            .where(Chunk.collection_id == collection_id, tsv.op("@@")(match))
            .order_by(rank.desc())
            .limit(limit)
        )
        return await _scores(session, statement, conditions)

    return await _every_word_first(session, words, limit, ranked)


async def _within_budget(session: AsyncSession, words: list[str]) -> list[str]:
    """The rarest of `words` (they come rarest first) whose estimated matches fit OR_BUDGET."""
    chosen: list[str] = []
    budget = 0
    for word in words:
        frequency = await _frequency(session, word)
        if chosen and budget + frequency > OR_BUDGET:
            break
        chosen.append(word)
        budget += frequency
    return chosen


def _saturate(rank: float) -> float:
    rank = max(rank, 0.0)
    return rank / (rank + KEYWORD_HALF)


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
