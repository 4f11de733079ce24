"""Keyword ranking weighs a chunk's document: a document that answers the whole query across
its chunks ranks above one whose single chunk repeats one of the query's words."""

from __future__ import annotations

import httpx
import pytest

from aivax.rag import keyword
from aivax.rag.keyword import Statistics
from aivax.services import AppServices
from tests.fixtures.factories import make_account
from tests.rag.helpers import create_collection, import_documents, search

FILLER = [
    "Visitors walk the coastal path in spring and count the seabirds on the cliffs.",
    "The village bakery opens early and sells bread to the fishing crews.",
    "A ferry crosses the bay twice a day when the weather allows it.",
    "The museum keeps old maps, ship models and letters from the lighthouse keepers.",
]


def _documents() -> list[dict[str, object]]:
    # "answer": its first part names the glacier, its second the orchard (chunk_size 32 with
    # no overlap puts each part in a chunk of its own).
    answer = (
        "The glacier above the valley melts a little more each summer, feeding the river.\n\n"
        "Below it an orchard of old apple trees grows on the terraces the farmers built."
    )
    # "repeats": one chunk that says glacier twice and nothing of an orchard.
    repeats = "The glacier moved; the glacier cracked and the valley heard it at night."
    documents: list[dict[str, object]] = [
        {"id": "answer", "text": answer},
        {"id": "repeats", "text": repeats},
    ]
    # Filler documents as long as "answer", so its length is ordinary.
    documents += [
        {"id": f"filler-{i}", "text": " ".join(FILLER[i % 4 :] + FILLER[: i % 4])}
        for i in range(12)
    ]
    return documents


async def test_document_holding_every_query_word_ranks_first(
    client: httpx.AsyncClient, services: AppServices
) -> None:
    owner = await make_account(services, plan="starter", balance_micros=1_000_000)
    collection = await create_collection(client, owner, chunk_size=32, chunk_overlap=0)
    await import_documents(client, services, owner, collection, _documents())

    results = await search(
        client, owner, collection, query="glacier orchard", mode="keyword", top_k=5
    )

    assert [r["document_external_id"] for r in results[:3]] == ["answer", "answer", "repeats"]
    assert results[0]["keyword_score"] > results[2]["keyword_score"]


def test_common_words_stop_finding_chunks_only_in_large_collections() -> None:
    small = Statistics(1_000, 50.0, {"return": 900, "glacier": 3}, 500, {})
    large = Statistics(100_000, 50.0, {"return": 30_000, "glacier": 40, "list": 6_000}, 500, {})

    assert small.selective(["return", "glacier"]) == ["return", "glacier"]
    assert large.selective(["return", "glacier", "list"]) == ["glacier"]
    # Every word common: they all still find chunks.
    assert large.selective(["return", "list"]) == ["return", "list"]


async def test_chunks_holding_only_common_words_are_not_ranked_in_large_collections(
    client: httpx.AsyncClient, services: AppServices, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = await make_account(services, plan="starter", balance_micros=1_000_000)
    collection = await create_collection(client, owner, chunk_size=32, chunk_overlap=0)
    await import_documents(client, services, owner, collection, _documents())
    query = {"query": "ferry glacier", "mode": "keyword", "top_k": 20}
    everything = await search(client, owner, collection, **query)
    assert any("glacier" not in r["text"] for r in everything)

    # As if the collection were large: "ferry" (in most chunks) no longer finds chunks alone.
    monkeypatch.setattr(keyword, "COMMON_MIN", 0)
    monkeypatch.setattr(keyword, "COMMON_SHARE", 0.25)
    found = await search(client, owner, collection, **query)

    assert found
    assert all("glacier" in r["text"] for r in found)
    ranked = [r["chunk_id"] for r in everything if "glacier" in r["text"]]
    assert [r["chunk_id"] for r in found] == ranked
