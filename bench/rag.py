"""RAG quality and speed: `make bench-rag` (add `--postgres URL` for PostgreSQL too: the run
uses a throw-away database on that server).

Quality. The evaluation set is generated offline and reproducibly from the docstrings of this
Python's standard library (the modules in MODULES): each public function or class whose
docstring has a one-line summary and a body of 25+ words becomes one document (its name and
body, *without* the summary line); its summary line, with the function's own name removed, is
the query, and that document is its one relevant answer. The summary and body describe the
same thing in different words, so the set rewards both exact terms and meaning. For keyword,
vector and hybrid search with each packaged embedding model it prints nDCG@10 and recall@10.

Speed. Indexing throughput (chunks/s, the real job: chunking, embedding, writing) with each
model; then search latency p50/p99 through the same code the API runs (query embedding,
vector + keyword search, fusion, hydration, billing) at 10k and 100k chunks. The large
collections are filled with the corpus' real chunk texts (repeated) and random unit vectors,
since embedding 100k chunks would only measure the embedding model again.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import math
import os
import random
import re
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import insert, select, update

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from aivax.accounts import service as account_service
from aivax.config import Settings
from aivax.keys import service as key_service
from aivax.keys.schemas import KeyCreate
from aivax.keys.service import Principal
from aivax.migrate import upgrade_to_head
from aivax.models import Chunk, Collection, Document, EntryKind, Job, Plan
from aivax.rag import documents, indexer, repository, retrieval, service
from aivax.rag.embedders import local_embedder
from aivax.rag.schemas import DEFAULT_EMBEDDING_MODEL, CollectionCreate, SearchRequest
from aivax.services import AppServices
from aivax.wallet import service as wallet_service

MODULES = [
    "os", "os.path", "shutil", "pathlib", "json", "re", "string", "textwrap", "datetime",
    "calendar", "collections", "heapq", "bisect", "itertools", "functools", "operator",
    "random", "statistics", "math", "decimal", "fractions", "hashlib", "hmac", "secrets",
    "base64", "binascii", "zlib", "gzip", "bz2", "lzma", "zipfile", "tarfile", "csv",
    "configparser", "logging", "argparse", "getpass", "time", "threading", "queue",
    "subprocess", "socket", "ssl", "select", "selectors", "asyncio", "email", "mailbox",
    "mimetypes", "urllib.parse", "urllib.request", "http.client", "http.cookies", "html",
    "xml.dom.minidom", "xml.etree.ElementTree", "sqlite3", "pickle", "copy", "pprint",
    "inspect", "dis", "ast", "tokenize", "traceback", "warnings", "contextlib", "abc",
    "typing", "enum", "dataclasses", "uuid", "ipaddress", "difflib", "unicodedata",
    "locale", "gettext", "struct", "codecs", "io", "tempfile", "glob", "fnmatch", "filecmp",
    "stat", "platform", "sysconfig", "importlib", "pkgutil", "zipimport", "unittest",
    "doctest", "timeit", "cProfile", "pstats", "tracemalloc", "gc", "weakref", "array",
    "shelve", "dbm", "sched", "signal", "mmap", "webbrowser", "wsgiref.util", "smtplib",
    "imaplib", "ftplib", "poplib", "cmd", "shlex", "colorsys", "wave", "turtle",
]  # fmt: skip
LOCAL_MODELS = ["aivax/paraphrase-minilm-l3", "aivax/minilm-l6-int8", "aivax/wordllama-l2-256"]
K = 10


@dataclass
class Case:
    doc_id: str
    document: str
    query: str


def build_corpus(limit: int) -> list[Case]:
    import importlib

    cases: dict[str, Case] = {}
    seen: set[int] = set()  # an object re-exported by several modules counts once
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: S112 - e.g. turtle without Tk: skip the module
            continue
        for name, value in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isfunction(value) or inspect.isclass(value)):
                continue
            doc = inspect.getdoc(value) or ""
            summary, _, body = doc.partition("\n")
            body = " ".join(body.split())
            summary = summary.strip()
            if len(body.split()) < 25 or len(summary.split()) < 4 or id(value) in seen:
                continue
            if not summary[0].isalpha():
                continue
            seen.add(id(value))
            key = f"{module_name}.{name}"
            query = re.sub(rf"\b{re.escape(name)}\b", "", summary, flags=re.IGNORECASE)
            query = " ".join(query.replace("()", "").split())
            if len(query.split()) < 3 or key in cases:
                continue
            cases[key] = Case(key, f"{module_name}.{name}\n\n{body}", query)
    ordered = sorted(cases.values(), key=lambda c: c.doc_id)
    random.Random(7).shuffle(ordered)
    return ordered[:limit]


def build_topics_corpus(limit: int) -> list[Case]:
    """The second corpus: long natural-language queries. Each paragraph of 50+ words of this
    Python's language and library reference topics (`pydoc_data.topics`, prose, not code) is a
    document; its longest sentence of 12-45 words, removed from it, is the query."""
    import pydoc_data.topics

    cases: list[Case] = []
    for name, body in sorted(pydoc_data.topics.topics.items()):
        for index, paragraph in enumerate(re.split(r"\n\s*\n", body)):
            words = paragraph.split()
            if len(words) < 50 or paragraph.lstrip().startswith((">>>", "   ")):
                continue
            sentences = re.split(r"(?<=[.!?])\s+", " ".join(words))
            usable = [s for s in sentences if 12 <= len(s.split()) <= 45]
            if not usable or len(sentences) < 3:
                continue
            query = max(usable, key=lambda sentence: len(sentence.split()))
            rest = " ".join(sentence for sentence in sentences if sentence != query)
            cases.append(Case(f"{name}#{index}", f"{name}\n\n{rest}", query))
    random.Random(7).shuffle(cases)
    return cases[:limit]


def plain_bm25(cases: list[Case]) -> dict[str, float]:
    """The reference: one OR query of the query's words over an FTS5 table of the whole
    documents (no chunks), ranked by FTS5's bm25 with the same tokenizer."""
    import sqlite3

    from aivax.rag.search import query_words

    db = sqlite3.connect(":memory:")
    db.execute(
        "CREATE VIRTUAL TABLE docs USING fts5(key UNINDEXED, body, tokenize='porter unicode61')"
    )
    db.executemany("INSERT INTO docs VALUES (?, ?)", [(c.doc_id, c.document) for c in cases])
    ndcgs, recalls = [], []
    for case in cases:
        words = query_words(case.query)
        expression = " OR ".join('"' + w.replace('"', "") + '"' for w in words)
        rows = db.execute(
            "SELECT key FROM docs WHERE docs MATCH ? ORDER BY bm25(docs) LIMIT ?", (expression, K)
        ).fetchall()
        ndcg, recall = ndcg_recall([row[0] for row in rows], case.doc_id)
        ndcgs.append(ndcg)
        recalls.append(recall)
    return {
        "ndcg@10": round(statistics.fmean(ndcgs), 4),
        "recall@10": round(statistics.fmean(recalls), 4),
    }


async def hnsw_recall(
    services: AppServices, principal: Principal, collection: Collection, cases: list[Case]
) -> float:
    """PostgreSQL: the share of the exact vector top 10 (a NumPy scan of every embedding) that
    the HNSW search returns."""
    async with services.database.sessions() as session:
        rows = (
            await session.execute(
                select(Chunk.id, Chunk.embedding).where(Chunk.collection_id == collection.id)
            )
        ).all()
    ids = np.array([row[0] for row in rows])
    matrix = np.stack([np.asarray(row[1], dtype=np.float32) for row in rows])
    embedder = local_embedder(collection.embedding_model.removeprefix("aivax/"))
    shares = []
    for case in cases:
        query = embedder.embed_sync([case.query])[0][0]  # type: ignore[attr-defined]
        exact = set(ids[np.argsort(-(matrix @ query))[:K]].tolist())
        results = await search(
            services, principal, collection, SearchRequest(query=case.query, top_k=K, mode="vector")
        )
        shares.append(len(exact & {r.chunk_id for r in results}) / K)
    return round(statistics.fmean(shares), 4)


def ndcg_recall(ranked: list[str], relevant: str) -> tuple[float, float]:
    for position, doc in enumerate(ranked[:K], start=1):
        if doc == relevant:
            return 1.0 / math.log2(position + 1), 1.0
    return 0.0, 0.0


async def setup(url: str) -> tuple[AppServices, Principal]:
    await asyncio.to_thread(upgrade_to_head, url)
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=url,
        data_dir=Path(tempfile.mkdtemp()),
        secret_key="bench-secret-bench-secret-bench-secret-00",  # type: ignore[arg-type]  # noqa: S106
        jobs_poll_seconds=0.2,
    )
    services = AppServices.build(settings)
    indexer.register(services)
    async with services.database.sessions() as session:
        plan = await session.get(Plan, "free")
        assert plan is not None
        plan.limits = {
            **plan.limits,
            "max_collections": 1000,
            "search_rpm": 10**9,
            "insert_rpm": 10**9,
            "storage_quota_bytes": 10**12,
            "jsonl_import_max_bytes": 10**10,
            "models_allowed": ["*"],
            "integrated_rpm": 10**9,
            "integrated_input_tpm": 10**12,
        }
        account = await account_service.create(
            session, name="bench", plan_id="free", secret_box=services.secret_box
        )
        _, token = await key_service.create(
            session, account_id=account.id, data=KeyCreate(name="bench"),
            secret=services.secret, max_keys=10,
        )  # fmt: skip
        await wallet_service.post_credit(
            session, account_id=account.id, kind=EntryKind.TOPUP,
            amount_micros=10**12, idempotency_key=f"bench-{uuid.uuid4()}",
        )  # fmt: skip
        await session.commit()
        from datetime import timedelta

        principal = await key_service.authenticate(
            session, token, secret=services.secret, touch_interval=timedelta(hours=1)
        )
        await session.commit()
    services.jobs.start()
    return services, principal


async def make_collection(
    services: AppServices, principal: Principal, model: str, cases: list[Case]
) -> tuple[Collection, float, int]:
    """A collection holding `cases`, indexed by the real job; (collection, seconds, chunks).
    The model is loaded first, so the time is steady-state indexing, not the model's load."""
    local_embedder(model.removeprefix("aivax/")).embed_sync(["warm up"])  # type: ignore[attr-defined]
    async with services.database.sessions() as session:
        collection = await service.create_collection(
            services, session, principal, CollectionCreate(name=model, embedding_model=model)
        )
        ids = []
        for case in cases:
            document, _ = await documents.upsert_document(
                session,
                collection,
                documents.DocumentInput(case.document, "text", case.doc_id, case.doc_id, {}),
            )
            await session.flush()
            ids.append(str(document.id))
        job = service.enqueue(
            session, principal.account_id, service.INDEX_JOB, {"document_ids": ids}
        )
        if inspect.isawaitable(job):
            job = await job
        await session.commit()
        job_id = job.id
    started = time.perf_counter()
    services.jobs.wake()
    await services.jobs.wait_idle(timeout=3600)
    while True:  # the runner may look idle before it has claimed the job
        async with services.database.sessions() as session:
            finished = await session.scalar(select(Job.finished_at).where(Job.id == job_id))
        if finished is not None:
            break
        await asyncio.sleep(0.05)
    seconds = time.perf_counter() - started
    async with services.database.sessions() as session:
        stats = await repository.collection_stats(session, [collection.id])
        fresh = await session.get(Collection, collection.id)
        assert fresh is not None
    return fresh, seconds, stats[collection.id][1]


async def search(
    services: AppServices, principal: Principal, collection: Collection, request: SearchRequest
) -> list[Any]:
    async with services.database.sessions() as session:
        current = await session.get(Collection, collection.id)
        assert current is not None
        response = await retrieval.run(
            services, session, principal, [current], request, request_id="bench", rate_limited=False
        )
    return response.data


async def quality(
    services: AppServices, principal: Principal, cases: list[Case], models: list[str]
) -> dict[str, Any]:
    table: dict[str, Any] = {"plain BM25 (documents)": plain_bm25(cases)}
    print(f"  plain BM25: {json.dumps(table['plain BM25 (documents)'])}", flush=True)
    for model in models:
        collection, seconds, chunks = await make_collection(services, principal, model, cases)
        row: dict[str, Any] = {"chunks": chunks, "chunks_per_s": round(chunks / seconds, 1)}
        for mode in ("keyword", "vector", "hybrid"):
            ndcgs, recalls = [], []
            for case in cases:
                results = await search(
                    services, principal, collection,
                    SearchRequest(query=case.query, top_k=30, mode=mode),  # type: ignore[arg-type]
                )  # fmt: skip
                ranked = list(dict.fromkeys(r.document_external_id for r in results))
                ndcg, recall = ndcg_recall(ranked, case.doc_id)
                ndcgs.append(ndcg)
                recalls.append(recall)
            row[mode] = {
                "ndcg@10": round(statistics.fmean(ndcgs), 4),
                "recall@10": round(statistics.fmean(recalls), 4),
            }
        if services.vectors.is_postgres:
            row["hnsw_recall@10"] = await hnsw_recall(services, principal, collection, cases)
        table[model] = row
        print(f"  {model}: {json.dumps(row)}", flush=True)
    return table


def filler_texts(count: int) -> list[str]:
    """`count` distinct chunk texts: four random sentences each, drawn from every docstring of
    MODULES, so word frequencies are those of real technical prose (not one text repeated)."""
    import importlib

    sentences: list[str] = []
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: S112
            continue
        for value in vars(module).values():
            doc = inspect.getdoc(value) if callable(value) else None
            if doc:
                sentences += [
                    s for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())) if len(s) > 20
                ]
    rng = random.Random(5)
    return [" ".join(rng.sample(sentences, 4)) for _ in range(count)]


async def fill(services: AppServices, collection: Collection, texts: list[str], total: int) -> None:
    """Grow `collection` to `total` chunks: real texts, random unit vectors."""
    rng = np.random.default_rng(11)
    async with services.database.sessions() as session:
        current = await repository.collection_stats(session, [collection.id])
    have = current[collection.id][1]
    batch = 2_000
    while have < total:
        count = min(batch, total - have)
        document_id = uuid.uuid4()
        vectors = rng.standard_normal((count, collection.dimensions)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        rows = [
            {
                "collection_id": collection.id,
                "document_id": document_id,
                "position": i,
                "heading_path": [],
                "text": texts[have + i],
                "content_hash": f"{have + i}",
                "token_count": 64,
                "dimensions": collection.dimensions,
                "embedding": vectors[i],
            }
            for i in range(count)
        ]

        def write(
            conn: Any,
            rows: list[dict[str, Any]] = rows,
            document_id: uuid.UUID = document_id,
            count: int = count,
        ) -> None:
            conn.execute(
                insert(Document.__table__),  # type: ignore[arg-type]
                {
                    "id": document_id, "collection_id": collection.id,
                    "account_id": collection.account_id, "external_id": None, "title": "filler",
                    "content_type": "text", "text": "filler", "content_hash": "filler",
                    "metadata": {}, "status": "ready", "error": None, "chunks_total": count,
                    "chunks_done": count, "bytes": 0, "created_at": collection.created_at,
                    "updated_at": collection.created_at,
                },
            )  # fmt: skip
            conn.execute(insert(Chunk.__table__), rows)  # type: ignore[arg-type]
            conn.execute(
                update(Collection)
                .where(Collection.id == collection.id)
                .values(vectors_version=Collection.vectors_version + 1)
            )

        await services.database.run_write(write)
        have += count
    if services.vectors.is_postgres:
        # What an operator does after a bulk load; without it autovacuum runs during the
        # measurement (seen: 45-48 ms for every mode at 10k chunks).
        from sqlalchemy import text

        async with services.database.engine.connect() as conn:
            autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await autocommit.execute(text("VACUUM ANALYZE chunks"))


async def latency(
    services: AppServices, principal: Principal, cases: list[Case], sizes: list[int], model: str
) -> dict[str, Any]:
    collection, _, _ = await make_collection(services, principal, model, cases[:200])
    texts = filler_texts(max(sizes))
    queries = [c.query for c in cases[:200]]
    out: dict[str, Any] = {}
    for size in sizes:
        started = time.perf_counter()
        await fill(services, collection, texts, size)
        print(f"  filled to {size} chunks in {time.perf_counter() - started:.1f} s", flush=True)
        async with services.database.sessions() as session:
            collection = await session.get(Collection, collection.id)  # type: ignore[assignment]
        # Steady state: one keyword pass first caches the document frequencies of the queries'
        # words (a word not seen for 5 minutes costs one count query, reported in the notes).
        for query in queries:
            await search(
                services, principal, collection, SearchRequest(query=query, mode="keyword")
            )
        for mode in ("hybrid", "vector", "keyword"):
            await search(services, principal, collection, SearchRequest(query="warm up", mode=mode))  # type: ignore[arg-type]
            timings = []
            for query in queries:
                begin = time.perf_counter()
                await search(services, principal, collection, SearchRequest(query=query, mode=mode))  # type: ignore[arg-type]
                timings.append((time.perf_counter() - begin) * 1000)
            timings.sort()
            out[f"{size}:{mode}"] = {
                "p50_ms": round(timings[len(timings) // 2], 2),
                "p99_ms": round(timings[int(len(timings) * 0.99) - 1], 2),
            }
            print(f"  {size} chunks, {mode}: {out[f'{size}:{mode}']}", flush=True)
    return out


async def run(url: str, label: str, args: argparse.Namespace) -> dict[str, Any]:
    print(f"\n== {label} ({url.split('://')[0]}) ==", flush=True)
    services, principal = await setup(url)
    cases = build_corpus(args.documents)
    print(f"corpus: {len(cases)} documents/queries from {len(MODULES)} stdlib modules", flush=True)
    result: dict[str, Any] = {"documents": len(cases)}
    try:
        if not args.skip_quality:
            result["quality"] = await quality(services, principal, cases, args.models)
            topics = build_topics_corpus(args.documents)
            print(f"corpus 2: {len(topics)} reference paragraphs / long queries", flush=True)
            result["quality_long_queries"] = await quality(services, principal, topics, args.models)
        if not args.skip_latency:
            result["latency"] = await latency(
                services, principal, cases, args.sizes, args.latency_model
            )
    finally:
        await services.jobs.stop()
        await services.close()
    return result


async def admin_sql(server_url: str, statement: str) -> None:
    import asyncpg
    from sqlalchemy.engine import make_url

    dsn = make_url(server_url).set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def create_database(server_url: str) -> tuple[str, str]:
    """A throw-away database on the server `--postgres` names (dropped after the run), so the
    bench never writes into a database someone else uses: (its name, its URL)."""
    from sqlalchemy.engine import make_url

    name = f"aivax_bench_{uuid.uuid4().hex[:12]}"
    await admin_sql(server_url, f'CREATE DATABASE "{name}"')
    return name, make_url(server_url).set(database=name).render_as_string(hide_password=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=1500)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument(
        "--postgres",
        help="also run on this postgresql+asyncpg:// server (in a throw-away database)",
    )
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--models", nargs="+", default=LOCAL_MODELS)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-sqlite", action="store_true")
    parser.add_argument(
        "--latency-model", default=DEFAULT_EMBEDDING_MODEL, help="the model latency runs use"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    work = Path(tempfile.mkdtemp(prefix="aivax-bench-rag-"))
    results: dict[str, Any] = {}
    if not args.skip_sqlite:
        results["sqlite"] = asyncio.run(run(f"sqlite+aiosqlite:///{work}/rag.db", "SQLite", args))
    if args.postgres:
        name, url = asyncio.run(create_database(args.postgres))
        try:
            results["postgresql"] = asyncio.run(run(url, "PostgreSQL", args))
        finally:
            asyncio.run(admin_sql(args.postgres, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    print("\n" + json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
