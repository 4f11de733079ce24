"""A larger top_k extends the result list and never reorders it, in every mode."""

from __future__ import annotations

import random

import httpx
import pytest

from aivax.services import AppServices
from tests.fixtures.factories import AccountWithKeys, make_account
from tests.rag.helpers import create_collection, import_documents, search

PHRASES = (
    "river forest mountain harbour engine battery circuit voltage sensor signal protein",
    "enzyme membrane neuron climate rainfall drought harvest wheat barley market price",
    "inflation interest ledger invoice contract court appeal verdict patient dose vaccine",
)
VOCABULARY = [word for phrase in PHRASES for word in phrase.split(" ")]
QUERIES = [
    "battery voltage in the circuit",
    "drought and rainfall change the wheat harvest",
    "the patient received a vaccine dose in the trial",
    "inflation moves the market price",
    "enzyme and protein in the membrane",
]


def _documents() -> list[dict[str, object]]:
    rng = random.Random(13)
    return [
        {"id": f"d{index}", "text": " ".join(rng.choices(VOCABULARY, k=rng.randint(8, 30))) + "."}
        for index in range(300)
    ]


@pytest.fixture
async def crowded(client: httpx.AsyncClient, services: AppServices) -> tuple[AccountWithKeys, str]:
    owner = await make_account(services, plan="starter", balance_micros=1_000_000)
    collection = await create_collection(client, owner)
    await import_documents(client, services, owner, collection, _documents())
    return owner, collection


@pytest.mark.parametrize("mode", ["hybrid", "vector", "keyword"])
async def test_top_10_is_a_prefix_of_top_100(
    client: httpx.AsyncClient, crowded: tuple[AccountWithKeys, str], mode: str
) -> None:
    owner, collection = crowded
    for query in QUERIES:
        ten = await search(client, owner, collection, query=query, top_k=10, mode=mode)
        hundred = await search(client, owner, collection, query=query, top_k=100, mode=mode)
        assert len(ten) == 10
        assert [r["chunk_id"] for r in ten] == [r["chunk_id"] for r in hundred[:10]], query
        assert [r["score"] for r in ten] == [r["score"] for r in hundred[:10]], query
