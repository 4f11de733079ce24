"""group_by "document": top_k counts documents, each with its other matching chunks."""

from __future__ import annotations

import httpx

from aivax.services import AppServices
from tests.fixtures.factories import make_account
from tests.rag.helpers import create_collection, import_documents, search

SENTENCES = [
    "The tide pools at the harbour hold crabs, anemones and small fish.",
    "Fishing boats leave the harbour before dawn and return with the tide.",
    "The harbour master records every boat that moors at the quay.",
    "Storms close the harbour a few days each winter.",
]


def _documents() -> list[dict[str, object]]:
    """Twelve long documents about the same harbour: each splits into many chunks, so the
    best chunks of a plain search come from only a few of them."""
    documents: list[dict[str, object]] = []
    for index in range(12):
        paragraphs = [
            f"Harbour log {index}, part {part}. " + " ".join(SENTENCES) for part in range(8)
        ]
        documents.append({"id": f"log-{index}", "text": "\n\n".join(paragraphs)})
    return documents


async def test_group_by_document_returns_top_k_documents(
    client: httpx.AsyncClient, services: AppServices
) -> None:
    owner = await make_account(services, plan="starter", balance_micros=1_000_000)
    collection = await create_collection(client, owner, chunk_size=48, chunk_overlap=0)
    await import_documents(client, services, owner, collection, _documents())
    query = "boats in the harbour at dawn"

    chunks = await search(client, owner, collection, query=query, top_k=10)
    assert len({r["document_id"] for r in chunks}) < 10

    documents = await search(client, owner, collection, query=query, top_k=10, group_by="document")
    assert len(documents) == 10
    assert len({r["document_id"] for r in documents}) == 10
    assert documents[0]["chunk_id"] == chunks[0]["chunk_id"]
    for result in documents:
        assert result["matches"], result
        assert all(match["score"] <= result["score"] for match in result["matches"])
        assert result["chunk_id"] not in {match["chunk_id"] for match in result["matches"]}
    assert all(r["matches"] is None for r in chunks)
