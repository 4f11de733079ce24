"""Chunking, the int8 scan against the exact scan, keyword query safety, and durable jobs
(a job whose worker died is resumed; a failing document fails alone)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import httpx
import numpy as np
import pytest
from sqlalchemy import select, update

from aivax.kit.clock import utcnow
from aivax.models import Document, Job
from aivax.rag import chunking, search, vectors
from aivax.rag.int8scan import quantize
from aivax.services import AppServices
from tests.fixtures.factories import make_account


def test_markdown_chunks_keep_heading_paths_and_sizes() -> None:
    text = (
        "# Guide\n\nIntro line.\n\n## Setup\n\n"
        + "Install the package first. " * 120
        + "\n\n```\n# not a heading inside code\n\nstill code\n```\n\n"
        + "### Linux\n\nUse apt.\n\n# FAQ\n\nAsk."
    )
    drafts = chunking.chunk_document(text, "markdown", chunk_size=64, overlap=8)
    paths = [d.heading_path for d in drafts]
    assert paths[0] == ("Guide",)
    assert ("Guide", "Setup", "Linux") in paths
    assert paths[-1] == ("FAQ",)
    assert all(d.token_count <= 64 + 8 for d in drafts)
    code = next(d for d in drafts if "```" in d.text)
    assert "# not a heading inside code" in code.text
    assert code.heading_path == ("Guide", "Setup")
    setup = [d for d in drafts if d.heading_path == ("Guide", "Setup") and "Install" in d.text]
    assert len(setup) > 3
    # Overlap: each chunk after the first of a section starts with the previous one's tail.
    tail = " ".join(setup[0].text.split()[-2:])
    assert tail in " ".join(setup[1].text.split()[:8])
    assert [d.position for d in drafts] == list(range(len(drafts)))


def test_plain_text_has_no_headings_and_html_drops_scripts() -> None:
    drafts = chunking.chunk_document("# not a heading\n\nbody", "text", chunk_size=64, overlap=0)
    assert drafts[0].heading_path == ()
    title, text = chunking.html_to_markdown(
        "<title>T</title><style>p{}</style><h2>Part</h2><p>One &amp; two</p>"
        "<script>alert(1)</script><ul><li>item</li></ul>"
    )
    assert title == "T"
    assert text == "## Part\n\nOne & two\n\nitem"
    with pytest.raises(chunking.ExtractionError):
        chunking.extract("pdf", b"%PDF-garbage")


def test_fts_query_neutralises_syntax() -> None:
    words = search.query_words('NEAR(a b) OR "x" * ^col: -minus AND the')
    assert "the" not in words
    expression = search.fts_query(words)
    assert all(part.startswith('"') and part.endswith('"') for part in expression.split(" OR "))


def test_int8_scan_finds_what_the_exact_scan_finds() -> None:
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((50, 64)).astype(np.float32)
    matrix = centres[rng.integers(0, 50, 30_000)] + 0.3 * rng.standard_normal((30_000, 64)).astype(
        np.float32
    )
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    ids = np.arange(1, 30_001, dtype=np.int64)
    exact = vectors._Entry(1, ids, matrix)
    approximate = vectors._Entry(1, ids, matrix, quantize(matrix))
    overlaps = []
    for query in matrix[:20] + 0.1 * rng.standard_normal((20, 64)).astype(np.float32):
        query = (query / np.linalg.norm(query)).astype(np.float32)
        truth = vectors._rank(exact, query, 20, None)
        found = vectors._rank(approximate, query, 20, None)
        overlaps.append(len({i for i, _ in truth} & {i for i, _ in found}) / 20)
        scores = dict(truth)
        for chunk_id, score in found:  # re-scored exactly: same value as the exact scan
            if chunk_id in scores:
                assert score == pytest.approx(scores[chunk_id], abs=1e-5)
    assert np.mean(overlaps) >= 0.98
    allowed = {int(i) for i in ids[:100]}
    filtered = vectors._rank(approximate, matrix[0], 10, allowed)
    assert {i for i, _ in filtered} <= allowed


async def _document_status(services: AppServices, document_id: uuid.UUID) -> str:
    async with services.database.sessions() as session:
        status = await session.scalar(select(Document.status).where(Document.id == document_id))
    return str(status)


async def test_a_job_left_running_by_a_dead_worker_is_resumed(
    client: httpx.AsyncClient, services: AppServices
) -> None:
    owner = await make_account(services, plan="starter", balance_micros=1_000_000)
    collection = (
        await client.post("/v1/collections", headers=owner.headers, json={"name": "durable"})
    ).json()["id"]
    created = await client.post(
        f"/v1/collections/{collection}/documents?wait=true",
        headers=owner.headers,
        json={"text": "Durable jobs survive restarts."},
    )
    document_id = uuid.UUID(created.json()["id"])
    await services.jobs.wait_idle()
    # A worker claimed a job, then died: the row says running, with a lease in the past.
    async with services.database.sessions() as session:
        await session.execute(
            update(Document).where(Document.id == document_id).values(status="indexing")
        )
        job = Job(
            account_id=owner.id,
            kind="index_documents",
            payload={"document_ids": [str(document_id)]},
            status="running",
            attempts=1,
            locked_until=utcnow() - timedelta(seconds=1),
        )
        session.add(job)
        await session.commit()
    await services.jobs.wait_idle()
    for _ in range(100):
        async with services.database.sessions() as session:
            resumed = await session.get(Job, job.id)
        if resumed is not None and resumed.status == "done":
            break
        await asyncio.sleep(0.05)
    assert resumed is not None
    assert resumed.status == "done"
    assert resumed.attempts == 2
    assert await _document_status(services, document_id) == "ready"
