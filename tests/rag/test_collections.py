"""RAG collections on the real database with the real local embedding model: documents,
chunking, indexing jobs, hybrid search, min_score, deletes, isolation, limits, JSONL import."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from aivax.services import AppServices
from tests.fixtures.assertions import assert_error
from tests.fixtures.factories import AccountWithKeys, make_account

DOCS = [
    (
        "install",
        "# Installing\n\nRun `pip install aivax` on Python 3.11 or newer.\n\n"
        "## On Windows\n\nUse the py launcher to create a virtual environment first.",
        {"lang": "en", "year": 2024},
    ),
    (
        "billing",
        "# Billing\n\nThe prepaid wallet is charged per token. Refunds reach your card within "
        "five business days after the support team approves them.",
        {"lang": "en", "year": 2025},
    ),
    (
        "kitchen",
        "# Recipes\n\nTo bake sourdough bread, feed the starter, knead the dough and let it "
        "rise overnight before baking at 250 degrees.",
        {"lang": "fr", "year": 2023},
    ),
]


@pytest.fixture
async def owner(services: AppServices) -> AccountWithKeys:
    return await make_account(services, plan="starter", balance_micros=1_000_000)


async def _collection(client: httpx.AsyncClient, account: AccountWithKeys, **extra: Any) -> str:
    response = await client.post(
        "/v1/collections", headers=account.headers, json={"name": "kb", **extra}
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def _add(
    client: httpx.AsyncClient,
    account: AccountWithKeys,
    collection: str,
    external_id: str,
    text: str,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    response = await client.post(
        f"/v1/collections/{collection}/documents?wait=true",
        headers=account.headers,
        json={
            "id": external_id,
            "text": text,
            "content_type": "markdown",
            "metadata": metadata or {},
        },
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    assert body["status"] == "ready", body
    return body


@pytest.fixture
async def filled(client: httpx.AsyncClient, owner: AccountWithKeys) -> str:
    collection = await _collection(client, owner)
    for external_id, text, metadata in DOCS:
        await _add(client, owner, collection, external_id, text, metadata)
    return collection


async def _search(
    client: httpx.AsyncClient, account: AccountWithKeys, collection: str, **body: Any
) -> list[dict[str, Any]]:
    response = await client.post(
        f"/v1/collections/{collection}/search", headers=account.headers, json=body
    )
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


async def test_documents_are_chunked_with_heading_paths(
    client: httpx.AsyncClient, owner: AccountWithKeys, filled: str
) -> None:
    response = await client.get(
        f"/v1/collections/{filled}/documents/install", headers=owner.headers
    )
    assert response.status_code == 200, response.text
    document = response.json()
    assert document["status"] == "ready"
    assert document["chunks_total"] == len(document["chunks"]) == 2
    assert [c["heading_path"] for c in document["chunks"]] == [
        ["Installing"],
        ["Installing", "On Windows"],
    ]
    collection = (await client.get(f"/v1/collections/{filled}", headers=owner.headers)).json()
    assert collection["document_count"] == 3
    assert collection["chunk_count"] == 4
    assert collection["embedding_model"] == "aivax/minilm-l6-int8"
    assert collection["dimensions"] == 384


@pytest.mark.parametrize("mode", ["hybrid", "vector", "keyword"])
async def test_each_mode_finds_the_relevant_document(
    client: httpx.AsyncClient, owner: AccountWithKeys, filled: str, mode: str
) -> None:
    results = await _search(
        client, owner, filled, query="how long do refunds take to reach my card", mode=mode
    )
    assert results, mode
    top = results[0]
    assert top["document_external_id"] == "billing"
    assert top["heading_path"] == ["Billing"]
    assert 0 <= top["score"] <= 1
    if mode == "hybrid":
        assert top["vector_score"] is not None
        assert top["keyword_score"] is not None
        # First in both lists: the mean of its component scores.
        assert top["score"] == pytest.approx(
            (top["vector_score"] + top["keyword_score"]) / 2, abs=1e-5
        )
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)


async def test_min_score_is_never_undercut(
    client: httpx.AsyncClient, owner: AccountWithKeys, filled: str
) -> None:
    everything = await _search(client, owner, filled, query="bread dough", mode="vector", top_k=10)
    assert len(everything) == 4
    threshold = (everything[0]["score"] + everything[1]["score"]) / 2
    kept = await _search(
        client, owner, filled, query="bread dough", mode="vector", top_k=10, min_score=threshold
    )
    assert [r["chunk_id"] for r in kept] == [everything[0]["chunk_id"]]
    assert all(r["score"] >= threshold for r in kept)
    nothing = await _search(
        client, owner, filled, query="bread dough", min_score=1.0, mode="vector"
    )
    assert nothing == []


async def test_metadata_filter(
    client: httpx.AsyncClient, owner: AccountWithKeys, filled: str
) -> None:
    results = await _search(
        client, owner, filled, query="bread dough", filter={"lang": "en"}, top_k=10
    )
    assert results
    assert {r["metadata"]["lang"] for r in results} == {"en"}
    recent = await _search(
        client, owner, filled, query="wallet", filter={"year": {"$gte": 2025}}, top_k=10
    )
    assert {r["document_external_id"] for r in recent} == {"billing"}
    listed = await _search(
        client,
        owner,
        filled,
        query="install",
        filter={"lang": {"$in": ["fr"]}},
        mode="keyword",
    )
    assert listed == []


async def test_deleting_a_document_removes_it_from_search_at_once(
    client: httpx.AsyncClient, owner: AccountWithKeys, filled: str
) -> None:
    before = await _search(client, owner, filled, query="sourdough bread", top_k=1)
    assert before[0]["document_external_id"] == "kitchen"
    response = await client.delete(
        f"/v1/collections/{filled}/documents/kitchen", headers=owner.headers
    )
    assert response.status_code == 204
    for mode in ("hybrid", "vector", "keyword"):
        after = await _search(client, owner, filled, query="sourdough bread", mode=mode, top_k=10)
        assert "kitchen" not in {r["document_external_id"] for r in after}
    missing = await client.get(f"/v1/collections/{filled}/documents/kitchen", headers=owner.headers)
    assert_error(missing, 404, "document_not_found")
    account = (await client.get("/v1/account", headers=owner.headers)).json()
    kept = sum(len(text.encode()) for name, text, _ in DOCS if name != "kitchen")
    assert account["storage_bytes_used"] == kept  # the deleted document's bytes are freed


async def test_update_reembeds_only_changed_chunks(
    client: httpx.AsyncClient, owner: AccountWithKeys, filled: str
) -> None:
    before = (
        await client.get(f"/v1/collections/{filled}/documents/install", headers=owner.headers)
    ).json()
    text = DOCS[0][1].replace("py launcher", "Windows Store Python")
    response = await client.patch(
        f"/v1/collections/{filled}/documents/install?wait=true",
        headers=owner.headers,
        json={"text": text, "content_type": "markdown"},
    )
    assert response.status_code == 200, response.text
    after = (
        await client.get(f"/v1/collections/{filled}/documents/install", headers=owner.headers)
    ).json()
    assert after["status"] == "ready"
    assert after["chunks"][0]["id"] == before["chunks"][0]["id"]  # unchanged: kept
    assert after["chunks"][1]["id"] != before["chunks"][1]["id"]  # edited: re-embedded
    results = await _search(client, owner, filled, query="Windows Store", mode="keyword")
    assert results[0]["document_external_id"] == "install"


async def test_other_accounts_and_public_keys_are_kept_out(
    client: httpx.AsyncClient, services: AppServices, owner: AccountWithKeys, filled: str
) -> None:
    stranger = await make_account(services, plan="starter", balance_micros=1_000_000)
    for method, path, body in [
        ("GET", f"/v1/collections/{filled}", None),
        ("PATCH", f"/v1/collections/{filled}", {"name": "x"}),
        ("DELETE", f"/v1/collections/{filled}", None),
        ("GET", f"/v1/collections/{filled}/documents", None),
        ("GET", f"/v1/collections/{filled}/documents/install", None),
        ("DELETE", f"/v1/collections/{filled}/documents/install", None),
        ("POST", f"/v1/collections/{filled}/documents", {"text": "hi"}),
        ("POST", f"/v1/collections/{filled}/search", {"query": "wallet"}),
        ("GET", f"/v1/collections/{filled}/export", None),
    ]:
        response = await client.request(method, path, headers=stranger.headers, json=body)
        assert_error(response, 404, "collection_not_found")
    multi = await client.post(
        "/v1/collections/search",
        headers=stranger.headers,
        json={"query": "wallet", "collection_ids": [filled]},
    )
    assert_error(multi, 404, "collection_not_found")
    public = {"Authorization": f"Bearer {owner.public_key}"}
    for method, path in [("GET", "/v1/collections"), ("POST", f"/v1/collections/{filled}/search")]:
        response = await client.request(method, path, headers=public, json={"query": "x"})
        assert_error(response, 403, "private_key_required")
    listed = (await client.get("/v1/collections", headers=stranger.headers)).json()
    assert listed["data"] == []


async def test_bad_input_is_refused_clearly(
    client: httpx.AsyncClient, owner: AccountWithKeys
) -> None:
    response = await client.post(
        "/v1/collections",
        headers=owner.headers,
        json={"name": "x", "embedding_model": "aivax/smollm2-135m"},
    )
    assert_error(response, 400, "invalid_embedding_model")
    response = await client.post(
        "/v1/collections", headers=owner.headers, json={"name": "x", "embedding_model": "nope"}
    )
    assert_error(response, 404, "model_not_found")
    response = await client.post(
        "/v1/collections",
        headers=owner.headers,
        json={"name": "x", "chunk_size": 64, "chunk_overlap": 40},
    )
    assert assert_error(response, 400)["param"] == "chunk_overlap"
    collection = await _collection(client, owner)
    for body in [
        {"text": ""},
        {"text": "x", "content_type": "pdf"},
        {"text": "x", "metadata": {"k": "v" * 9000}},
        {"text": "x", "extra": 1},
    ]:
        response = await client.post(
            f"/v1/collections/{collection}/documents", headers=owner.headers, json=body
        )
        assert_error(response, 400)
    for body in [
        {"query": ""},
        {"query": "x", "min_score": 1.5},
        {"query": "x", "mode": "semantic"},
        {"query": "x", "filter": {"a": {"$regex": "x"}}},
        {"query": "x", "filter": {"a": [1, 2]}},
        {"query": "x", "top_k": 0},
    ]:
        response = await client.post(
            f"/v1/collections/{collection}/search", headers=owner.headers, json=body
        )
        assert_error(response, 400)
    missing = await client.get(f"/v1/collections/{uuid.uuid4()}", headers=owner.headers)
    assert_error(missing, 404, "collection_not_found")
    garbage = await client.get("/v1/collections/not-a-uuid", headers=owner.headers)
    assert_error(garbage, 404, "collection_not_found")


async def test_plan_limits_collection_count_and_storage(
    client: httpx.AsyncClient, services: AppServices, admin_headers: dict[str, str]
) -> None:
    plan = f"tiny-{uuid.uuid4().hex[:6]}"
    response = await client.post(
        "/admin/plans",
        headers=admin_headers,
        json={
            "id": plan,
            "name": "Tiny",
            "limits": {"max_collections": 1, "storage_quota_bytes": 200, "insert_rpm": 3},
        },
    )
    assert response.status_code == 201, response.text
    account = await make_account(services, plan=plan, balance_micros=1_000_000)
    collection = await _collection(client, account)
    second = await client.post("/v1/collections", headers=account.headers, json={"name": "two"})
    assert_error(second, 403, "collection_limit_reached")
    too_big = await client.post(
        f"/v1/collections/{collection}/documents", headers=account.headers, json={"text": "x" * 201}
    )
    assert_error(too_big, 403, "storage_quota_exceeded")
    fits = await client.post(
        f"/v1/collections/{collection}/documents", headers=account.headers, json={"text": "x" * 150}
    )
    assert fits.status_code == 201
    again = await client.post(
        f"/v1/collections/{collection}/documents", headers=account.headers, json={"text": "y" * 60}
    )
    assert_error(again, 403, "storage_quota_exceeded")
    limited = await client.post(
        f"/v1/collections/{collection}/documents", headers=account.headers, json={"text": "z"}
    )
    assert_error(limited, 429, "rate_limit_insert")
    assert limited.headers["retry-after"]


def _jsonl(lines: list[Any]) -> bytes:
    return b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines
    )


async def test_jsonl_import_reports_bad_lines_and_is_idempotent(
    client: httpx.AsyncClient, services: AppServices, owner: AccountWithKeys
) -> None:
    collection = await _collection(client, owner)
    body = _jsonl(
        [
            {"id": "a", "text": "Alpha centauri is the closest star system.", "metadata": {"n": 1}},
            b"{not json",
            {"id": "b", "text": "Beta decay emits an electron."},
            {"id": "c"},
            [1, 2],
            {"id": "d", "text": "Delta wing aircraft", "metadata": "nope"},
            {"text": "An anonymous line about gamma rays."},
        ]
    )
    response = await client.post(
        f"/v1/collections/{collection}/import", headers=owner.headers, content=body
    )
    assert response.status_code == 202, response.text
    report = response.json()
    assert report["accepted"] == 3
    assert report["rejected_count"] == 4
    assert [r["line"] for r in report["rejected"]] == [2, 4, 5, 6]
    assert "not JSON" in report["rejected"][0]["reason"]
    assert "text" in report["rejected"][1]["reason"]
    job = report["job"]
    await services.jobs.wait_idle()
    status = (await client.get(f"/v1/jobs/{job['id']}", headers=owner.headers)).json()
    assert status["status"] == "done"
    assert status["progress_done"] == status["progress_total"] == 3
    results = await _search(client, owner, collection, query="closest star", top_k=1)
    assert results[0]["document_external_id"] == "a"

    again = await client.post(
        f"/v1/collections/{collection}/import", headers=owner.headers, content=body
    )
    assert again.status_code == 202
    assert again.json()["accepted"] == 3
    assert again.json()["unchanged"] == 2  # a and b; the anonymous line is new each time
    exported = await client.get(f"/v1/collections/{collection}/export", headers=owner.headers)
    assert exported.status_code == 200
    rows = [json.loads(line) for line in exported.text.splitlines()]
    assert {r["id"] for r in rows if r["id"] in ("a", "b")} == {"a", "b"}
    assert next(r for r in rows if r["id"] == "a")["metadata"] == {"n": 1}


async def test_import_over_the_plan_size_writes_nothing(
    client: httpx.AsyncClient, services: AppServices, admin_headers: dict[str, str]
) -> None:
    plan = f"small-{uuid.uuid4().hex[:6]}"
    response = await client.post(
        "/admin/plans",
        headers=admin_headers,
        json={"id": plan, "name": "Small", "limits": {"jsonl_import_max_bytes": 1000}},
    )
    assert response.status_code == 201, response.text
    account = await make_account(services, plan=plan, balance_micros=1_000_000)
    collection = await _collection(client, account)
    body = _jsonl([{"id": str(i), "text": f"document number {i} " * 5} for i in range(30)])
    assert len(body) > 1000

    async def chunked() -> Any:  # no Content-Length: the limit is enforced while streaming
        for start in range(0, len(body), 100):
            yield body[start : start + 100]

    for content in (body, chunked()):
        response = await client.post(
            f"/v1/collections/{collection}/import", headers=account.headers, content=content
        )
        assert_error(response, 413, "import_too_large")
    listed = await client.get(f"/v1/collections/{collection}/documents", headers=account.headers)
    assert listed.json()["data"] == []


async def test_import_line_and_line_count_limits(
    client: httpx.AsyncClient,
    services: AppServices,
    owner: AccountWithKeys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    collection = await _collection(client, owner)
    monkeypatch.setattr(services.settings, "rag_import_max_line_bytes", 1_000)
    body = _jsonl([{"id": "long", "text": "x" * 2_000}, {"id": "short", "text": "fine"}])
    response = await client.post(
        f"/v1/collections/{collection}/import", headers=owner.headers, content=body
    )
    assert response.status_code == 202, response.text
    report = response.json()
    assert report["accepted"] == 1
    assert report["rejected"] == [{"line": 1, "reason": "line is longer than 1000 bytes"}]
    monkeypatch.setattr(services.settings, "rag_import_max_lines", 2)
    three = _jsonl([{"id": f"n{i}", "text": "t"} for i in range(3)])
    refused = await client.post(
        f"/v1/collections/{collection}/import", headers=owner.headers, content=three
    )
    assert_error(refused, 413, "import_too_large")
    listed = await client.get(f"/v1/collections/{collection}/documents", headers=owner.headers)
    assert [d["external_id"] for d in listed.json()["data"]] == ["short"]  # n0-n2: nothing


async def test_jobs_uploads_and_mcp_headers_refuse_bad_input(
    client: httpx.AsyncClient, services: AppServices, owner: AccountWithKeys
) -> None:
    collection = await _collection(client, owner)
    imported = await client.post(
        f"/v1/collections/{collection}/import",
        headers=owner.headers,
        content=_jsonl([{"id": "a", "text": "alpha"}]),
    )
    job_id = imported.json()["job"]["id"]
    stranger = await make_account(services, plan="starter")
    for headers, ref in [
        (owner.headers, "not-a-uuid"),
        (owner.headers, str(uuid.uuid4())),
        (stranger.headers, job_id),
    ]:
        assert_error(await client.get(f"/v1/jobs/{ref}", headers=headers), 404, "job_not_found")

    upload = f"/v1/collections/{collection}/documents/upload"
    for metadata in ("{not json", "[1, 2]"):
        response = await client.post(
            upload,
            headers=owner.headers,
            files={"file": ("a.txt", b"hello", "text/plain")},
            data={"metadata": metadata},
        )
        assert assert_error(response, 400)["param"] == "metadata"

    mcp = {**owner.headers, "x-aivax-collections": collection}
    for name, value in [
        ("x-aivax-top-k", "0"),
        ("x-aivax-top-k", "many"),
        ("x-aivax-min-score", "2"),
        ("x-aivax-mode", "semantic"),
        ("x-aivax-rerank", "bogus"),
        ("x-aivax-tool-name", "has spaces"),
    ]:
        response = await client.post("/v1/mcp/collections", headers={**mcp, name: value}, json={})
        assert assert_error(response, 400)["param"] == name
