"""Keyword search: BM25 over the database's full-text index, with the statistics of one
collection alone.

Every number BM25 reads (how many chunks the collection holds, their mean length, how many of
them hold each word) is counted inside the searched collection, on both databases: another
account's documents never move a collection's scores or its ranking. The full-text indexes
themselves are shared, so they only find the matching rows; the ranking is computed here:

- SQLite: term frequencies come from FTS5's `instance` vocabulary (one row per occurrence of a
  term, read for the query's terms only), a chunk's length is its `token_count`; the query's
  words become FTS5 terms (porter stems) through a scratch FTS5 table with the same tokenizer,
  so the stems are exactly the index's.
- PostgreSQL: a term's frequency in a chunk is `ts_rank_cd`'s raw rank for that word alone
  (0.1 per occurrence), a chunk's length its number of distinct lexemes.

The statistics are cached per collection and `vectors_version` (which every index write and
delete moves), so they are exact for the collection as it is.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache, TTLCache
from sqlalchemy import (
    ColumnElement,
    String,
    Text,
    and_,
    case,
    cast,
    column,
    func,
    literal,
    literal_column,
    select,
    table,
    text,
)
from sqlalchemy.ext.asyncio import AsyncSession

from aivax.models import Chunk, Document

BM25_K1 = 1.2
BM25_B = 0.75
# keyword_score = r / (r + KEYWORD_HALF): a BM25 rank of 10 scores 0.5. With 1, ordinary BM25
# values (5-15) all scored above 0.8 and outweighed cosine similarities in hybrid fusion;
# 10 made hybrid beat both methods on the bench set with every local model on SQLite.
KEYWORD_HALF = 10.0
MAX_QUERY_WORDS = 64
WORD = re.compile(r"\w+", re.UNICODE)

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

Hits = list[tuple[int, float]]


def query_words(query: str) -> list[str]:
    words = [w for w in WORD.findall(query.lower()) if w not in STOPWORDS]
    return list(dict.fromkeys(words))[:MAX_QUERY_WORDS]


@dataclass(frozen=True)
class Statistics:
    """BM25's corpus statistics, for one collection at one version."""

    chunks: int
    average_length: float
    frequencies: dict[str, int]

    def idf(self, term: str) -> float:
        frequency = self.frequencies.get(term, 0)
        return math.log(1 + (self.chunks - frequency + 0.5) / (frequency + 0.5))


# (database, collection, version, term or a "\0" name) -> count; the version in the key makes an
# entry exact, the TTL only bounds memory held for collections nobody searches any more.
_statistics: TTLCache[tuple[str, uuid.UUID, int, str], float] = TTLCache(200_000, 600)
# word -> its FTS5 terms (a pure function of the tokenizer, so shared by every collection).
_sqlite_terms_of: LRUCache[str, tuple[str, ...]] = LRUCache(50_000)


async def keyword(
    session: AsyncSession,
    collection_id: uuid.UUID,
    query: str,
    limit: int,
    conditions: list[ColumnElement[bool]],
    *,
    version: int = 0,
) -> Hits:
    """(chunk id, keyword score), best first."""
    words = query_words(query)
    if not words:
        return []
    if session.get_bind().dialect.name == "postgresql":
        search: _Search = _PostgresSearch(session, collection_id, version)
    else:
        search = _SqliteSearch(session, collection_id, version)
    terms = await search.terms(words)
    if not terms:
        return []
    statistics = await search.statistics(terms)
    return await search.ranked(terms, statistics, limit, conditions)


class _Search:
    def __init__(self, session: AsyncSession, collection_id: uuid.UUID, version: int) -> None:
        self.session = session
        self.collection_id = collection_id
        self.version = version

    async def terms(self, words: list[str]) -> list[str]:
        return words

    async def statistics(self, terms: list[str]) -> Statistics:
        chunks = await self._cached("\0chunks", self._count_chunks)
        average = await self._cached("\0length", self._average_length)
        frequencies = {term: int(await self._cached(term, self._frequency, term)) for term in terms}
        return Statistics(int(chunks), max(average, 1.0), frequencies)

    async def _cached(
        self, name: str, compute: Callable[..., Awaitable[float]], *args: str
    ) -> float:
        key = (str(self.session.get_bind().engine.url), self.collection_id, self.version, name)
        value = _statistics.get(key)
        if value is None:
            value = float(await compute(*args))
            _statistics[key] = value
        return value

    async def _count_chunks(self) -> float:
        count = await self.session.scalar(
            select(func.count()).select_from(Chunk).where(Chunk.collection_id == self.collection_id)
        )
        return float(count or 0)

    async def _average_length(self) -> float:
        raise NotImplementedError

    async def _frequency(self, term: str) -> float:
        raise NotImplementedError

    async def ranked(
        self,
        terms: list[str],
        statistics: Statistics,
        limit: int,
        conditions: list[ColumnElement[bool]],
    ) -> Hits:
        raise NotImplementedError


def _norm(length: ColumnElement[Any], average: float) -> ColumnElement[Any]:
    return literal(BM25_K1) * (literal(1 - BM25_B) + literal(BM25_B) * length / literal(average))


class _SqliteSearch(_Search):
    async def terms(self, words: list[str]) -> list[str]:
        missing = [word for word in words if word not in _sqlite_terms_of]
        if missing:
            await self._stem(missing)
        return list(dict.fromkeys(term for word in words for term in _sqlite_terms_of[word]))

    async def _stem(self, words: list[str]) -> None:
        """The FTS5 terms of `words`, read back from a connection-local scratch table with the
        index's tokenizer (temp objects: no write to the database file, no migration)."""
        run = self.session.execute
        await run(
            text(
                "CREATE VIRTUAL TABLE IF NOT EXISTS temp.aivax_words "
                "USING fts5(word, tokenize='porter unicode61')"
            )
        )
        await run(
            text(
                "CREATE VIRTUAL TABLE IF NOT EXISTS temp.aivax_word_terms "
                "USING fts5vocab(temp, aivax_words, instance)"
            )
        )
        await run(text("DELETE FROM temp.aivax_words"))
        await run(
            text("INSERT INTO temp.aivax_words(rowid, word) VALUES (:id, :word)"),
            [{"id": index, "word": word} for index, word in enumerate(words)],
        )
        found: dict[int, list[str]] = {}
        for doc, term in (await run(text("SELECT doc, term FROM temp.aivax_word_terms"))).all():
            found.setdefault(int(doc), []).append(str(term))
        await run(text("DELETE FROM temp.aivax_words"))
        for index, word in enumerate(words):
            _sqlite_terms_of[word] = tuple(dict.fromkeys(found.get(index, [])))

    async def _instances(self) -> Any:
        await self.session.execute(
            text(
                "CREATE VIRTUAL TABLE IF NOT EXISTS temp.aivax_chunk_terms "
                "USING fts5vocab(main, chunks_fts, instance)"
            )
        )
        return table("aivax_chunk_terms", column("term"), column("doc"), schema="temp")

    async def _average_length(self) -> float:
        value = await self.session.scalar(
            select(func.avg(Chunk.token_count)).where(Chunk.collection_id == self.collection_id)
        )
        return float(value or 1.0)

    async def _frequency(self, term: str) -> float:
        instances = await self._instances()
        count = await self.session.scalar(
            select(func.count(func.distinct(instances.c.doc)))
            .select_from(instances)
            .join(Chunk, Chunk.id == instances.c.doc)
            .where(
                instances.c.term == literal(term, String()),
                Chunk.collection_id == self.collection_id,
            )
        )
        return float(count or 0)

    async def ranked(
        self,
        terms: list[str],
        statistics: Statistics,
        limit: int,
        conditions: list[ColumnElement[bool]],
    ) -> Hits:
        instances = await self._instances()
        counts = (
            select(
                instances.c.doc.label("id"),
                instances.c.term.label("term"),
                func.count().label("f"),
                func.max(Chunk.token_count).label("length"),
            )
            .select_from(instances)
            .join(Chunk, Chunk.id == instances.c.doc)
            .where(
                instances.c.term.in_([literal(t, String()) for t in terms]),
                Chunk.collection_id == self.collection_id,
            )
            .group_by(instances.c.doc, instances.c.term)
        )
        if conditions:
            counts = counts.join(Document, Document.id == Chunk.document_id).where(
                and_(*conditions)
            )
        tf = counts.subquery()
        idf = case({t: statistics.idf(t) for t in terms}, value=tf.c.term, else_=0.0)
        weight = (
            idf * tf.c.f * (BM25_K1 + 1) / (tf.c.f + _norm(tf.c.length, statistics.average_length))
        )
        rank = func.sum(weight).label("rank")
        statement = (
            select(tf.c.id, rank).group_by(tf.c.id).order_by(rank.desc(), tf.c.id).limit(limit)
        )
        rows = (await self.session.execute(statement)).all()
        return [(int(row[0]), saturate(float(row[1]))) for row in rows]


class _PostgresSearch(_Search):
    @staticmethod
    def _tsquery(word: str) -> Any:
        return func.plainto_tsquery(
            literal_column("'english'::regconfig"), cast(literal(word), Text)
        )

    async def _average_length(self) -> float:
        value = await self.session.scalar(
            select(func.avg(func.length(literal_column("chunks.tsv")))).where(
                Chunk.collection_id == self.collection_id
            )
        )
        return float(value or 1.0)

    async def _frequency(self, term: str) -> float:
        count = await self.session.scalar(
            select(func.count())
            .select_from(Chunk)
            .where(
                Chunk.collection_id == self.collection_id,
                literal_column("chunks.tsv").op("@@")(self._tsquery(term)),
            )
        )
        return float(count or 0)

    async def ranked(
        self,
        terms: list[str],
        statistics: Statistics,
        limit: int,
        conditions: list[ColumnElement[bool]],
    ) -> Hits:
        tsv: ColumnElement[Any] = literal_column("chunks.tsv")
        norm = _norm(func.length(tsv), statistics.average_length)
        weights = []
        for term in terms:
            tf = func.ts_rank_cd(tsv, self._tsquery(term), 0) * literal(10.0)
            weights.append(literal(statistics.idf(term)) * tf * literal(BM25_K1 + 1) / (tf + norm))
        rank = sum(weights[1:], weights[0]).label("rank")
        match = func.to_tsquery(
            literal_column("'english'::regconfig"),
            cast(literal(" | ".join(f"'{t}'" for t in terms)), Text),
        )
        statement = (
            select(Chunk.id, rank)
            .where(Chunk.collection_id == self.collection_id, tsv.op("@@")(match))
            .order_by(rank.desc(), Chunk.id)
            .limit(limit)
        )
        if conditions:
            statement = statement.join(Document, Document.id == Chunk.document_id).where(
                and_(*conditions)
            )
        rows = (await self.session.execute(statement)).all()
        return [(int(row[0]), saturate(float(row[1]))) for row in rows]


def saturate(rank: float) -> float:
    rank = max(rank, 0.0)
    return rank / (rank + KEYWORD_HALF)
