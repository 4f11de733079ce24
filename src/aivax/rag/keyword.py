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
    Select,
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
    values,
)
from sqlalchemy.ext.asyncio import AsyncSession

from aivax.models import Chunk, Document

# Chunks are ranked with their document's weight: score = (1 - DOCUMENT_WEIGHT) x the chunk's
# BM25 + DOCUMENT_WEIGHT x its document's BM25 (the document's term counts summed over its
# chunks, its length theirs). Ranking chunks alone scored 0.600 nDCG@10 on the bench's docstring
# set and 0.569 on its long queries against 0.609 / 0.572 for plain BM25 over whole documents;
# with the document's weight, k1 1.5 and b 0.9, 0.610-0.614 / 0.579-0.580 at every default chunk
# size (the grid searched is in docs/performance.md).
BM25_K1 = 1.5
BM25_B = 0.9
DOCUMENT_WEIGHT = 0.7
# keyword_score = r / (r + KEYWORD_HALF): a BM25 rank of 10 scores 0.5. With 1, ordinary BM25
# values (5-15) all scored above 0.8 and outweighed cosine similarities in hybrid fusion;
# 10 made hybrid beat both methods on the bench set with every local model on SQLite.
KEYWORD_HALF = 10.0
MAX_QUERY_WORDS = 64
# A term held by more chunks than this (a share of the collection, and at least COMMON_MIN)
# does not find chunks to rank on its own (Statistics.selective); collections of up to
# COMMON_MIN chunks rank every chunk that holds any term.
COMMON_SHARE = 0.05
COMMON_MIN = 2_000
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


def _idf(total: int, frequency: int) -> float:
    return math.log(1 + (total - frequency + 0.5) / (frequency + 0.5))


@dataclass(frozen=True)
class Statistics:
    """BM25's corpus statistics, for one collection at one version: over its chunks, and over
    its documents (a document's length is the sum of its chunks')."""

    chunks: int
    average_length: float
    frequencies: dict[str, int]
    documents: int
    document_frequencies: dict[str, int]

    def idf(self, term: str) -> float:
        return _idf(self.chunks, self.frequencies.get(term, 0))

    def document_idf(self, term: str) -> float:
        return _idf(self.documents, self.document_frequencies.get(term, 0))

    def selective(self, terms: list[str]) -> list[str]:
        """The terms that find the chunks to rank: all of them, except in a large collection
        the words that many chunks hold (when some other term is rarer). A chunk holding only
        such words would rank low anyway; reading every chunk that holds them made one search
        cost hundreds of milliseconds at 100k chunks."""
        common = max(COMMON_SHARE * self.chunks, COMMON_MIN)
        rare = [term for term in terms if self.frequencies.get(term, 0) <= common]
        return rare or terms

    @property
    def average_document_length(self) -> float:
        return max(self.average_length * self.chunks / max(self.documents, 1), 1.0)


# (database, collection, version, term or a "\0" name) -> counts; the version in the key makes
# an entry exact, the TTL only bounds memory held for collections nobody searches any more.
_statistics: TTLCache[tuple[str, uuid.UUID, int, str], tuple[float, ...]] = TTLCache(200_000, 600)
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
        chunks, documents = await self._cached("\0chunks", self._count)
        (average,) = await self._cached("\0length", self._average_length)
        frequencies = {term: await self._cached(term, self._frequency, term) for term in terms}
        return Statistics(
            int(chunks),
            max(average, 1.0),
            {term: int(pair[0]) for term, pair in frequencies.items()},
            int(documents),
            {term: int(pair[1]) for term, pair in frequencies.items()},
        )

    async def _cached(
        self, name: str, compute: Callable[..., Awaitable[tuple[float, ...]]], *args: str
    ) -> tuple[float, ...]:
        key = (str(self.session.get_bind().engine.url), self.collection_id, self.version, name)
        value = _statistics.get(key)
        if value is None:
            value = await compute(*args)
            _statistics[key] = value
        return value

    async def _count(self) -> tuple[float, float]:
        row = (
            await self.session.execute(
                select(func.count(), func.count(func.distinct(Chunk.document_id))).where(
                    Chunk.collection_id == self.collection_id
                )
            )
        ).one()
        return float(row[0] or 0), float(row[1] or 0)

    async def _average_length(self) -> tuple[float]:
        raise NotImplementedError

    async def _frequency(self, term: str) -> tuple[float, float]:
        """(chunks, documents) of the collection that hold `term`."""
        raise NotImplementedError

    async def _occurrences(
        self, terms: list[str], selective: list[str], conditions: list[ColumnElement[bool]]
    ) -> Select[Any]:
        """One row per (chunk, term) found: id, document, term, f (its frequency in the chunk)
        and length (the chunk's); when `selective` is not every term, only for chunks that
        hold one of the `selective` terms."""
        raise NotImplementedError

    async def ranked(
        self,
        terms: list[str],
        statistics: Statistics,
        limit: int,
        conditions: list[ColumnElement[bool]],
    ) -> Hits:
        statement = _ranking(
            (await self._occurrences(terms, statistics.selective(terms), conditions)).cte("tf"),
            terms,
            statistics,
        )
        rows = (await self.session.execute(statement.limit(limit))).all()
        return [(int(row[0]), saturate(float(row[1]))) for row in rows]


def _bm25(
    idf: ColumnElement[Any], f: ColumnElement[Any], length: ColumnElement[Any], average: float
) -> ColumnElement[Any]:
    norm = literal(BM25_K1) * (literal(1 - BM25_B) + literal(BM25_B) * length / literal(average))
    return idf * f * literal(BM25_K1 + 1) / (f + norm)


def _ranking(tf: Any, terms: list[str], statistics: Statistics) -> Select[Any]:
    """Chunks by (1 - DOCUMENT_WEIGHT) x their BM25 + DOCUMENT_WEIGHT x their document's.

    A document's length is its found chunks' lengths plus the mean chunk length for each of
    its chunks that holds none of the query's terms (exact for documents found whole, and it
    keeps the query from reading every chunk of every document found)."""
    idf = case({t: statistics.idf(t) for t in terms}, value=tf.c.term, else_=0.0)
    chunk_weight = _bm25(idf, tf.c.f, tf.c.length, statistics.average_length)
    chunks = (
        select(
            tf.c.id,
            tf.c.document,
            func.sum(chunk_weight).label("rank"),
            func.max(tf.c.length).label("length"),
        )
        .group_by(tf.c.id, tf.c.document)
        .cte("chunk_ranks")
    )
    found = (
        select(
            chunks.c.document,
            func.sum(chunks.c.length).label("length"),
            func.count().label("chunks"),
        )
        .group_by(chunks.c.document)
        .cte("found")
    )
    document_tf = (
        select(tf.c.document, tf.c.term, func.sum(tf.c.f).label("f"))
        .group_by(tf.c.document, tf.c.term)
        .cte("document_tf")
    )
    missing = Document.chunks_total - found.c.chunks
    length = found.c.length + case((missing > 0, missing), else_=0) * literal(
        statistics.average_length
    )
    document_idf = case(
        {t: statistics.document_idf(t) for t in terms}, value=document_tf.c.term, else_=0.0
    )
    documents = (
        select(
            document_tf.c.document,
            func.sum(
                _bm25(document_idf, document_tf.c.f, length, statistics.average_document_length)
            ).label("rank"),
        )
        .join(found, found.c.document == document_tf.c.document)
        .join(Document, Document.id == document_tf.c.document)
        .group_by(document_tf.c.document)
        .cte("document_ranks")
    )
    rank = (
        literal(1 - DOCUMENT_WEIGHT) * chunks.c.rank + literal(DOCUMENT_WEIGHT) * documents.c.rank
    ).label("rank")
    return (
        select(chunks.c.id, rank)
        .join(documents, documents.c.document == chunks.c.document)
        .order_by(rank.desc(), chunks.c.id)
    )


def _varint(blob: ColumnElement[Any]) -> ColumnElement[Any]:
    """The integer an FTS5 `docsize` blob starts with (SQLite's big-endian varint, up to three
    bytes: a chunk of up to 2,097,151 tokens), read through hex() since SQLite has no byte
    functions."""

    def byte(index: int) -> ColumnElement[Any]:
        def digit(position: int) -> ColumnElement[Any]:
            return func.instr("0123456789ABCDEF", func.substr(func.hex(blob), position, 1)) - 1

        return digit(2 * index - 1) * 16 + digit(2 * index)

    first, second, third = byte(1), byte(2), byte(3)
    return case(
        (first < 128, first),
        (second < 128, (first - 128) * 128 + second),
        else_=((first - 128) * 128 + second - 128) * 128 + third,
    )


class _SqliteSearch(_Search):
    """Chunk lengths count FTS5's own tokens (its `docsize` table), like FTS5's bm25(): with
    cl100k token counts instead, nDCG@10 was 0.004-0.012 lower on both bench sets."""

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

    async def _average_length(self) -> tuple[float]:
        value = await self.session.scalar(
            select(func.avg(_varint(_SIZES.c.sz)))
            .select_from(_SIZES)
            .join(Chunk, Chunk.id == _SIZES.c.id)
            .where(Chunk.collection_id == self.collection_id)
        )
        return (float(value or 1.0),)

    async def _frequency(self, term: str) -> tuple[float, float]:
        instances = await self._instances()
        row = (
            await self.session.execute(
                select(
                    func.count(func.distinct(instances.c.doc)),
                    func.count(func.distinct(Chunk.document_id)),
                )
                .select_from(instances)
                .join(Chunk, Chunk.id == instances.c.doc)
                .where(
                    instances.c.term == literal(term, String()),
                    Chunk.collection_id == self.collection_id,
                )
            )
        ).one()
        return float(row[0] or 0), float(row[1] or 0)

    async def _occurrences(
        self, terms: list[str], selective: list[str], conditions: list[ColumnElement[bool]]
    ) -> Select[Any]:
        instances = await self._instances()
        statement = (
            select(
                instances.c.doc.label("id"),
                Chunk.document_id.label("document"),
                instances.c.term.label("term"),
                func.count().label("f"),
                func.max(_varint(_SIZES.c.sz)).label("length"),
            )
            .select_from(instances)
            .join(Chunk, Chunk.id == instances.c.doc)
            .join(_SIZES, _SIZES.c.id == instances.c.doc)
            .where(
                instances.c.term.in_([literal(t, String()) for t in terms]),
                Chunk.collection_id == self.collection_id,
            )
            .group_by(instances.c.doc, instances.c.term, Chunk.document_id)
        )
        if len(selective) < len(terms):
            finders = instances.alias("finders")
            statement = statement.where(
                instances.c.doc.in_(
                    select(finders.c.doc).where(
                        finders.c.term.in_([literal(t, String()) for t in selective])
                    )
                )
            )
        if conditions:
            statement = statement.join(Document, Document.id == Chunk.document_id).where(
                and_(*conditions)
            )
        return statement


# FTS5's per-row token counts (one varint per indexed column; chunks_fts has one).
_SIZES = table("chunks_fts_docsize", column("id"), column("sz"))


class _PostgresSearch(_Search):
    """A term's frequency in a chunk is `ts_rank_cd`'s raw rank for that term alone (0.1 per
    occurrence), a chunk's length its number of distinct lexemes."""

    @staticmethod
    def _tsquery(word: Any) -> Any:
        return func.plainto_tsquery(literal_column("'english'::regconfig"), cast(word, Text))

    async def _average_length(self) -> tuple[float]:
        value = await self.session.scalar(
            select(func.avg(func.length(literal_column("chunks.tsv")))).where(
                Chunk.collection_id == self.collection_id
            )
        )
        return (float(value or 1.0),)

    async def _frequency(self, term: str) -> tuple[float, float]:
        row = (
            await self.session.execute(
                select(func.count(), func.count(func.distinct(Chunk.document_id))).where(
                    Chunk.collection_id == self.collection_id,
                    literal_column("chunks.tsv").op("@@")(self._tsquery(literal(term))),
                )
            )
        ).one()
        return float(row[0] or 0), float(row[1] or 0)

    async def _occurrences(
        self, terms: list[str], selective: list[str], conditions: list[ColumnElement[bool]]
    ) -> Select[Any]:
        tsv: ColumnElement[Any] = literal_column("chunks.tsv")
        words = values(column("term", Text()), name="query_terms").data([(t,) for t in terms])
        # One GIN lookup per term (each row is a chunk holding that term); an OR of every term
        # in the condition as well made each lookup re-check the whole query (3-4 ms a term).
        term_query = self._tsquery(words.c.term)
        statement = (
            select(
                Chunk.id.label("id"),
                Chunk.document_id.label("document"),
                words.c.term.label("term"),
                (func.ts_rank_cd(tsv, term_query, 0) * literal(10.0)).label("f"),
                func.length(tsv).label("length"),
            )
            .select_from(Chunk)
            .join(words, tsv.op("@@")(term_query))
            .where(Chunk.collection_id == self.collection_id)
        )
        if len(selective) < len(terms):
            finders = func.to_tsquery(
                literal_column("'english'::regconfig"),
                cast(literal(" | ".join(f"'{t}'" for t in selective)), Text),
            )
            statement = statement.where(tsv.op("@@")(finders))
        if conditions:
            statement = statement.join(Document, Document.id == Chunk.document_id).where(
                and_(*conditions)
            )
        return statement


def saturate(rank: float) -> float:
    rank = max(rank, 0.0)
    return rank / (rank + KEYWORD_HALF)
