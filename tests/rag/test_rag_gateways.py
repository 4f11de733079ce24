"""Collections in gateways (always, rewrite, tool), asserted at the fake upstream; the
retrieval report; remote embeddings and an upstream reranker; uploads; re-embedding; the
collections MCP server with the official MCP client."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from aivax.services import AppServices
from tests.conftest import FakeUpstream
from tests.fixtures.assertions import assert_error
from tests.fixtures.factories import AccountWithKeys, make_account
from tests.fixtures.servers import ThreadedServer

KITCHEN = (
    "# Recipes\n\n## Sourdough\n\nTo bake sourdough bread, feed the starter, knead the dough "
    "and let it rise overnight before baking at 250 degrees."
)
BILLING = (
    "# Billing\n\nRefunds reach your card within five business days after the support team "
    "approves them."
)


@pytest.fixture
async def owner(services: AppServices, fake_models: list[str]) -> AccountWithKeys:
    return await make_account(services, plan="starter", balance_micros=5_000_000)


async def _kb(client: httpx.AsyncClient, owner: AccountWithKeys, model: str | None = None) -> str:
    body: dict[str, Any] = {"name": "kb"}
    if model:
        body["embedding_model"] = model
    response = await client.post("/v1/collections", headers=owner.headers, json=body)
    assert response.status_code == 201, response.text
    collection = str(response.json()["id"])
    for external_id, text in (("kitchen", KITCHEN), ("billing", BILLING)):
        created = await client.post(
            f"/v1/collections/{collection}/documents?wait=true",
            headers=owner.headers,
            json={"id": external_id, "text": text, "content_type": "markdown"},
        )
        assert created.json()["status"] == "ready", created.text
    return collection


async def _gateway(
    client: httpx.AsyncClient,
    owner: AccountWithKeys,
    slug: str,
    model: str,
    section: dict[str, Any],
) -> None:
    response = await client.post(
        "/v1/gateways",
        headers=owner.headers,
        json={
            "slug": slug,
            "config": {
                "model": model,
                "system_instruction": "You are the shop assistant.",
                "collections": section,
            },
        },
    )
    assert response.status_code == 201, response.text


@contextlib.asynccontextmanager
async def _mcp(url: str, headers: dict[str, str]) -> AsyncIterator[ClientSession]:
    async with (
        httpx.AsyncClient(headers=headers, timeout=60) as http,
        streamable_http_client(url, http_client=http) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


async def _credential(
    client: httpx.AsyncClient,
    owner: AccountWithKeys,
    upstream: FakeUpstream,
    name: str,
    key: str = "sk-fake-upstream",
) -> None:
    """A bring-your-own-key credential of `owner` for the fake OpenAI-compatible upstream."""
    response = await client.post(
        "/v1/credentials",
        headers=owner.headers,
        json={"name": name, "provider": "openai", "base_url": upstream.base_url, "api_key": key},
    )
    assert response.status_code == 201, response.text


def _ask(question: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}], **extra}


async def test_always_puts_the_retrieved_text_in_what_the_model_receives(
    client: httpx.AsyncClient, owner: AccountWithKeys, fake_openai: FakeUpstream
) -> None:
    collection = await _kb(client, owner)
    await _gateway(client, owner, "shop", "test/fake-ok", {"ids": [collection], "top_k": 1})
    response = await client.post(
        "/v1/chat/completions",
        headers=owner.headers,
        json=_ask(
            "When will my refund reach my card?", model="shop", aivax={"include_retrieval": True}
        ),
    )
    assert response.status_code == 200, response.text
    sent = fake_openai.recorder.last()["messages"]
    assert [m["role"] for m in sent] == ["system", "system", "user"]
    assert sent[0]["content"] == "You are the shop assistant."
    assert "five business days" in sent[1]["content"]
    assert "[1] (billing > Billing)" in sent[1]["content"]
    assert "sourdough" not in sent[1]["content"]  # top_k = 1
    report = response.json()["aivax"]["retrieval"]
    assert report["strategy"] == "always"
    assert report["query"] == "When will my refund reach my card?"
    assert [r["heading_path"] for r in report["results"]] == [["Billing"]]
    assert 0 < report["results"][0]["score"] <= 1

    streamed = await client.post(
        "/v1/chat/completions",
        headers=owner.headers,
        json=_ask("sourdough", model="shop", stream=True, aivax={"include_retrieval": True}),
    )
    first = json.loads(streamed.text.split("\n\n")[0].removeprefix("data: "))
    assert first["aivax"]["retrieval"]["results"][0]["heading_path"] == ["Recipes", "Sourdough"]
    plain = await client.post(
        "/v1/chat/completions", headers=owner.headers, json=_ask("refund", model="shop")
    )
    assert "retrieval" not in plain.json()["aivax"]


async def test_min_score_can_leave_the_model_without_context(
    client: httpx.AsyncClient, owner: AccountWithKeys, fake_openai: FakeUpstream
) -> None:
    collection = await _kb(client, owner)
    await _gateway(client, owner, "strict", "test/fake-ok", {"ids": [collection], "min_score": 1.0})
    response = await client.post(
        "/v1/chat/completions",
        headers=owner.headers,
        json=_ask(
            "What is the airspeed of a swallow?", model="strict", aivax={"include_retrieval": True}
        ),
    )
    assert response.status_code == 200
    assert [m["role"] for m in fake_openai.recorder.last()["messages"]] == ["system", "user"]
    assert response.json()["aivax"]["retrieval"]["results"] == []


async def test_rewrite_searches_with_the_models_query(
    client: httpx.AsyncClient, owner: AccountWithKeys, fake_openai: FakeUpstream
) -> None:
    collection = await _kb(client, owner)
    await _gateway(
        client,
        owner,
        "rewriting",
        "test/fake-rewriter",
        {"ids": [collection], "strategy": "rewrite", "top_k": 1},
    )
    response = await client.post(
        "/v1/chat/completions",
        headers=owner.headers,
        json=_ask(
            "and how long does it take?", model="rewriting", aivax={"include_retrieval": True}
        ),
    )
    assert response.status_code == 200, response.text
    report = response.json()["aivax"]["retrieval"]
    assert report["query"] == "sourdough bread baking"
    assert report["results"][0]["heading_path"] == ["Recipes", "Sourdough"]
    answer_call = fake_openai.recorder.last()["messages"]
    assert "rise overnight" in answer_call[1]["content"]


async def test_tool_strategy_is_a_real_tool_exchange(
    client: httpx.AsyncClient, owner: AccountWithKeys, fake_openai: FakeUpstream
) -> None:
    collection = await _kb(client, owner)
    await _gateway(
        client, owner, "agentic", "test/fake-searcher", {"ids": [collection], "strategy": "tool"}
    )
    response = await client.post(
        "/v1/chat/completions",
        headers=owner.headers,
        json=_ask("Where is my money?", model="agentic", aivax={"include_retrieval": True}),
    )
    assert response.status_code == 200, response.text
    decision, answer = fake_openai.recorder.requests[-2:]
    assert decision["tools"][0]["function"]["name"] == "search_collections"
    roles = [m["role"] for m in answer["messages"]]
    assert roles == ["system", "user", "assistant", "tool"]
    assert answer["messages"][2]["tool_calls"][0]["function"]["name"] == "search_collections"
    assert "five business days" in answer["messages"][3]["content"]
    assert response.json()["aivax"]["retrieval"]["query"] == "refund card"
    assert response.json()["choices"][0]["message"]["content"] == "Hello from fake"


async def test_gateway_refuses_another_accounts_collection(
    client: httpx.AsyncClient, services: AppServices, owner: AccountWithKeys
) -> None:
    collection = await _kb(client, owner)
    stranger = await make_account(services, plan="starter", balance_micros=1_000_000)
    response = await client.post(
        "/v1/gateways",
        headers=stranger.headers,
        json={
            "slug": "thief",
            "config": {"model": "test/fake-ok", "collections": {"ids": [collection]}},
        },
    )
    assert_error(response, 404, "collection_not_found")


async def test_remote_embeddings_and_endpoint_reranker(
    client: httpx.AsyncClient, owner: AccountWithKeys, fake_openai: FakeUpstream
) -> None:
    collection = await _kb(client, owner, "test/fake-embed")
    detail = (await client.get(f"/v1/collections/{collection}", headers=owner.headers)).json()
    assert detail["dimensions"] == 64
    await _credential(client, owner, fake_openai, "ranker")
    response = await client.post(
        f"/v1/collections/{collection}/search",
        headers=owner.headers,
        json={
            "query": "refunds reach your card",
            "rerank": {"type": "endpoint", "credential": "ranker", "model": "rerank-fake"},
            "min_score": 0.5,
        },
    )
    assert response.status_code == 200, response.text
    results = response.json()["data"]
    assert [r["document_external_id"] for r in results] == ["billing"]
    assert results[0]["rerank_score"] == results[0]["score"] == 1.0
    assert fake_openai.recorder.last()["model"] == "rerank-fake"
    missing = await client.post(
        f"/v1/collections/{collection}/search",
        headers=owner.headers,
        json={"query": "x", "rerank": {"type": "endpoint", "credential": "nope", "model": "m"}},
    )
    assert assert_error(missing, 404, "credential_not_found")["param"] == "rerank.credential"


async def test_a_chat_model_as_reranking_judge(
    client: httpx.AsyncClient, owner: AccountWithKeys, fake_openai: FakeUpstream
) -> None:
    collection = await _kb(client, owner)
    plain = await client.post(
        f"/v1/collections/{collection}/search",
        headers=owner.headers,
        json={"query": "sourdough bread", "top_k": 2, "mode": "vector"},
    )
    first, second = (r["document_external_id"] for r in plain.json()["data"])
    judged = await client.post(
        f"/v1/collections/{collection}/search",
        headers=owner.headers,
        json={
            "query": "sourdough bread",
            "top_k": 2,
            "mode": "vector",
            "rerank": {"type": "model", "model": "test/fake-judge", "candidates": 2},
        },
    )
    assert judged.status_code == 200, judged.text
    results = judged.json()["data"]
    # The judge gave the second passage 9/10 and the first 1/10: the order flips.
    assert [r["document_external_id"] for r in results] == [second, first]
    assert [r["rerank_score"] for r in results] == [0.9, 0.1]
    prompt = fake_openai.recorder.last()["messages"][1]["content"]
    assert "Query: sourdough bread" in prompt
    assert "[1]" in prompt
    assert "[2]" in prompt


async def test_search_across_collections_and_the_search_rate_limit(
    client: httpx.AsyncClient, services: AppServices, fake_models: list[str]
) -> None:
    from tests.fixtures.factories import make_plan

    plan = await make_plan(services, search_rpm=2)
    account = await make_account(services, plan=plan, balance_micros=1_000_000)
    first = await _kb(client, account)
    second = (
        await client.post("/v1/collections", headers=account.headers, json={"name": "two"})
    ).json()["id"]
    await client.post(
        f"/v1/collections/{second}/documents?wait=true",
        headers=account.headers,
        json={"id": "volcano", "text": "Volcanoes erupt molten rock called lava."},
    )
    both = await client.post(
        "/v1/collections/search",
        headers=account.headers,
        json={"query": "lava from volcanoes", "collection_ids": [first, second], "top_k": 1},
    )
    assert both.status_code == 200, both.text
    assert both.json()["data"][0]["collection_id"] == second
    again = await client.post(
        f"/v1/collections/{first}/search", headers=account.headers, json={"query": "bread"}
    )
    assert again.status_code == 200
    limited = await client.post(
        f"/v1/collections/{first}/search", headers=account.headers, json={"query": "bread"}
    )
    assert_error(limited, 429, "rate_limit_search")


async def test_bring_your_own_embedding_model(
    client: httpx.AsyncClient, owner: AccountWithKeys, fake_openai: FakeUpstream
) -> None:
    await _credential(client, owner, fake_openai, "my-embedder")
    collection = await _kb(client, owner, "byok/my-embedder/fake-embed")
    detail = (await client.get(f"/v1/collections/{collection}", headers=owner.headers)).json()
    assert detail["dimensions"] == 64  # probed once with a real call
    assert ["dimension probe"] in fake_openai.recorder.embedding_inputs
    results = await client.post(
        f"/v1/collections/{collection}/search",
        headers=owner.headers,
        json={"query": "refunds reach your card", "mode": "vector", "top_k": 1},
    )
    assert results.json()["data"][0]["document_external_id"] == "billing"
    direct = await client.post(
        "/v1/embeddings",
        headers=owner.headers,
        json={"model": "byok/my-embedder/fake-embed", "input": "hello"},
    )
    assert direct.status_code == 200, direct.text
    assert direct.json()["aivax"]["cost_micros"] is None  # BYOK: unpriced unless priced
    await _credential(client, owner, fake_openai, "wrong-key", key="sk-wrong")
    refused = await client.post(
        "/v1/collections",
        headers=owner.headers,
        json={"name": "x", "embedding_model": "byok/wrong-key/fake-embed"},
    )
    assert_error(refused, 400, "invalid_embedding_model")


async def test_changing_the_embedding_model_reembeds_with_progress(
    client: httpx.AsyncClient, services: AppServices, owner: AccountWithKeys
) -> None:
    collection = await _kb(client, owner, "test/fake-embed")
    response = await client.patch(
        f"/v1/collections/{collection}",
        headers=owner.headers,
        json={"embedding_model": "aivax/wordllama-l2-256"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["dimensions"] == 256
    job = response.json()["reembedding"]
    assert job["kind"] == "reembed_collection"
    await services.jobs.wait_idle()
    done = (await client.get(f"/v1/jobs/{job['id']}", headers=owner.headers)).json()
    assert done["status"] == "done"
    assert done["progress_done"] == done["progress_total"] == 2
    assert done["result"] == {"ready": 2, "failed": 0, "skipped": 0}
    results = (
        await client.post(
            f"/v1/collections/{collection}/search",
            headers=owner.headers,
            json={"query": "sourdough bread", "mode": "vector", "top_k": 1},
        )
    ).json()["data"]
    assert results[0]["document_external_id"] == "kitchen"


def _pdf(text: str) -> bytes:
    """A one-page PDF with `text`, written by hand (no PDF writer needed)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(f"{number} 0 obj\n".encode() + body + b"\nendobj\n")
    xref = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    for offset in offsets:
        out.write(f"{offset:010d} 00000 n \n".encode())
    out.write(
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    )
    return out.getvalue()


async def test_uploads_pdf_html_and_refuses_garbage(
    client: httpx.AsyncClient, owner: AccountWithKeys
) -> None:
    response = await client.post("/v1/collections", headers=owner.headers, json={"name": "files"})
    collection = response.json()["id"]
    url = f"/v1/collections/{collection}/documents/upload?wait=true"
    pdf = await client.post(
        url,
        headers=owner.headers,
        files={
            "file": (
                "manual.pdf",
                _pdf("The turbine must be inspected every spring."),
                "application/pdf",
            )
        },
        data={"metadata": json.dumps({"kind": "manual"})},
    )
    assert pdf.status_code == 201, pdf.text
    assert pdf.json()["status"] == "ready"
    assert pdf.json()["metadata"] == {"kind": "manual"}
    html = await client.post(
        url,
        headers=owner.headers,
        files={
            "file": (
                "faq.html",
                b"<html><head><title>FAQ</title><script>evil()</script></head><body>"
                b"<h1>Shipping</h1><p>Parcels leave the warehouse on Mondays.</p></body></html>",
                "text/html",
            )
        },
    )
    assert html.status_code == 201, html.text
    assert html.json()["title"] == "FAQ"
    detail = (
        await client.get(
            f"/v1/collections/{collection}/documents/{html.json()['id']}", headers=owner.headers
        )
    ).json()
    assert detail["chunks"][0]["heading_path"] == ["Shipping"]
    assert "evil" not in detail["chunks"][0]["text"]
    search = await client.post(
        f"/v1/collections/{collection}/search",
        headers=owner.headers,
        json={"query": "when is the turbine inspected", "top_k": 1},
    )
    assert search.json()["data"][0]["heading_path"] == ["Page 1"]
    for files, code in [
        ({"file": ("x.pdf", b"not a pdf at all", "application/pdf")}, "unreadable_file"),
        ({"file": ("x.exe", b"MZ", "application/octet-stream")}, "unsupported_file_type"),
        ({"file": ("x.txt", b"\xff\xfe\x00bad", "text/plain")}, "unreadable_file"),
    ]:
        bad = await client.post(url, headers=owner.headers, files=files)
        assert_error(bad, 400, code)


async def test_mcp_server_with_the_official_client(
    live_server: ThreadedServer, services: AppServices, owner: AccountWithKeys
) -> None:
    async with httpx.AsyncClient(base_url=live_server.url, timeout=60) as client:
        collection = await _kb(client, owner)
        stranger = await make_account(services, plan="starter", balance_micros=1_000_000)
        url = live_server.url + "/v1/mcp/collections"
        headers = {
            **owner.headers,
            "x-aivax-collections": collection,
            "x-aivax-tool-name": "kb_search",
            "x-aivax-top-k": "1",
        }
        async with _mcp(url, headers) as session:
            tools = await session.list_tools()
            assert [tool.name for tool in tools.tools] == ["kb_search"]
            result = await session.call_tool("kb_search", {"query": "sourdough starter"})
            assert not result.isError
            found = result.structuredContent["results"]  # type: ignore[index]
            assert len(found) == 1
            assert found[0]["heading_path"] == ["Recipes", "Sourdough"]

        writer = {**headers, "x-aivax-allow-writes": "true"}
        async with _mcp(url, writer) as session:
            names = {tool.name for tool in (await session.list_tools()).tools}
            assert names == {"kb_search", "insert_document", "delete_document"}
            inserted = await session.call_tool(
                "insert_document", {"text": "Volcanoes erupt lava.", "id": "volcano"}
            )
            assert not inserted.isError, inserted
            deleted = await session.call_tool("delete_document", {"document_id": "kitchen"})
            assert not deleted.isError, deleted
        listed = await client.get(f"/v1/collections/{collection}/documents", headers=owner.headers)
        assert {d["external_id"] for d in listed.json()["data"]} == {"billing", "volcano"}

        public = {
            **headers,
            "Authorization": f"Bearer {owner.public_key}",
            "x-aivax-allow-writes": "true",
        }
        refused = await client.post(url, headers=public, json={})
        assert_error(refused, 403, "private_key_required")
        nokey = await client.post(url, headers={"x-aivax-collections": collection}, json={})
        assert_error(nokey, 401)
        noids = await client.post(url, headers=owner.headers, json={})
        assert_error(noids, 400)
        foreign = {**stranger.headers, "x-aivax-collections": collection}
        async with _mcp(url, foreign) as session:
            outcome = await session.call_tool("search_collections", {"query": "bread"})
            assert outcome.isError
            assert "No collection" in outcome.content[0].text  # type: ignore[union-attr]
