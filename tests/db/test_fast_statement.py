"""`FastStatement` on the pysqlite write connection stores exactly what SQLAlchemy's own
execution stores: the same text for timestamps (including a zero fraction, another offset
and a naive value, which is refused) and JSON that reads back equal."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import JSON, Column, Integer, MetaData, Table, create_engine, insert, select
from sqlalchemy.dialects import sqlite

from aivax.db import FastStatement
from aivax.db.fast_statement import _bind_processor
from aivax.models.base import UTCDateTime

METADATA = MetaData()
ROWS = Table(
    "rows",
    METADATA,
    Column("id", Integer, primary_key=True),
    Column("at", UTCDateTime()),
    Column("doc", JSON),
)

MOMENTS = [
    datetime(2026, 11, 26, 7, 48, 15, 123456, tzinfo=UTC),
    datetime(2026, 11, 26, 7, 48, 15, tzinfo=UTC),  # orjson drops a zero fraction
    datetime(1999, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
    datetime(2026, 6, 1, 12, 0, 0, 500, tzinfo=timezone(timedelta(hours=-3))),
    None,
]
DOCUMENTS = [{}, {"ref": "req_1"}, {"ü": "é", "n": [1, 2.5, None]}, {"big": 2**70}, [1, "x"], None]


@pytest.mark.parametrize("value", MOMENTS)
def test_timestamps_are_bound_as_sqlalchemy_binds_them(value: datetime | None) -> None:
    dialect = sqlite.dialect()
    ours = _bind_processor(UTCDateTime(), dialect)
    theirs = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    assert ours is not None
    assert theirs is not None
    assert ours(value) == theirs(value)


def test_a_naive_timestamp_is_refused_as_before() -> None:
    ours = _bind_processor(UTCDateTime(), sqlite.dialect())
    assert ours is not None
    with pytest.raises(ValueError, match="naive"):
        ours(datetime(2026, 1, 1))


@pytest.mark.parametrize("value", DOCUMENTS)
def test_json_is_bound_to_a_document_that_reads_back_equal(value: object) -> None:
    dialect = sqlite.dialect()
    ours = _bind_processor(JSON(), dialect)
    theirs = JSON().dialect_impl(dialect).bind_processor(dialect)
    assert ours is not None
    assert theirs is not None
    assert json.loads(ours(value)) == json.loads(theirs(value))


def test_rows_written_both_ways_read_back_the_same(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/rows.db")
    METADATA.create_all(engine)
    statement = FastStatement(insert(ROWS))
    rows = [
        {"id": n, "at": at, "doc": doc}
        for n, (at, doc) in enumerate(zip(MOMENTS, DOCUMENTS, strict=False))
    ]
    with engine.begin() as conn:
        statement.many(conn, rows)  # on the pysqlite connection, our binders
        conn.execute(insert(ROWS), [{**row, "id": row["id"] + 100} for row in rows])
    raw = sqlite3.connect(f"{tmp_path}/rows.db")
    stored = raw.execute("SELECT id, at, doc FROM rows ORDER BY id").fetchall()
    fast = {n: (at, doc) for n, at, doc in stored if n < 100}
    core = {n - 100: (at, doc) for n, at, doc in stored if n >= 100}
    for n, (at, doc) in fast.items():
        assert at == core[n][0]  # the same text, so ordering and comparisons agree
        assert (doc is None) == (core[n][1] is None)
        if doc is not None:
            assert json.loads(doc) == json.loads(core[n][1])
    with engine.connect() as conn:
        read = conn.execute(select(ROWS).order_by(ROWS.c.id)).all()
    assert [(r.at, r.doc) for r in read if r.id < 100] == [
        (r.at, r.doc) for r in read if r.id >= 100
    ]
    engine.dispose()
