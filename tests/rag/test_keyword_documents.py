"""Keyword ranking weighs a chunk's document: a document that answers the whole query across
its chunks ranks above one whose single chunk repeats one of the query's words."""

from __future__ import annotations

import httpx

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
