"""Keyword statistics belong to the collection: what other accounts store never moves a
collection's keyword scores or its ranking."""

from __future__ import annotations

import httpx

from aivax.services import AppServices
from tests.fixtures.factories import make_account
from tests.rag.helpers import create_collection, import_documents, search

TOPICS = ["harbour", "glacier", "orchard", "volcano", "lighthouse", "canyon"]


def _own_documents() -> list[dict[str, object]]:
    documents: list[dict[str, object]] = []
    for index in range(24):
        topic = TOPICS[index % len(TOPICS)]
        extra = " A numbat, a quokka and a wombat were seen near it." if index % 8 == 0 else ""
        documents.append(
            {
                "id": f"own-{index}",
                "text": f"Notes on the {topic} number {index}: visitors, weather and paths.{extra}",
            }
        )
    return documents


async def test_another_accounts_import_changes_no_keyword_score(
    client: httpx.AsyncClient, services: AppServices
) -> None:
    owner = await make_account(services, plan="starter", balance_micros=1_000_000)
    stranger = await make_account(services, plan="starter", balance_micros=1_000_000)
    mine = await create_collection(client, owner)
    await import_documents(client, services, owner, mine, _own_documents())
    query = {"mode": "keyword", "top_k": 20}
    # Three words held by the same documents; only "quokka" is in the other account's data.
    # Each is searched once, so no count cached by an earlier search can hide a difference.
    before = await search(client, owner, mine, query="numbat near the glacier paths", **query)
    assert before
    assert "numbat" in before[0]["text"]

    theirs = await create_collection(client, stranger)
    crowd = [
        {"id": f"crowd-{i}", "text": f"Quokka quokka report {i}: the quokka colony grows."}
        for i in range(200)
    ]
    await import_documents(client, services, stranger, theirs, crowd)
    after = await search(client, owner, mine, query="quokka near the glacier paths", **query)
    control = await search(client, owner, mine, query="wombat near the glacier paths", **query)

    assert _scores(after) == _scores(before)
    assert _scores(after) == _scores(control)


def _scores(results: list[dict[str, object]]) -> list[tuple[object, object]]:
    return [(r["chunk_id"], r["keyword_score"]) for r in results]
