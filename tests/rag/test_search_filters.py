"""Metadata filters of collection search: the grammar is enforced at the request (400 naming
`filter`, saying what is allowed) on both search endpoints, and valid filters select exactly
the documents whose metadata match, whatever other documents hold under the same key (a
number cast of "unknown" used to fail the whole query on PostgreSQL)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from aivax.services import AppServices
from tests.fixtures.assertions import assert_error
from tests.fixtures.factories import AccountWithKeys, make_account

DOCS: list[tuple[str, dict[str, Any]]] = [
    ("old", {"lang": "en", "year": 2023, "score": 0.2, "draft": False}),
    ("new", {"lang": "en", "year": 2025, "score": 0.9, "draft": True}),
    ("french", {"lang": "fr", "year": 2024, "score": 0.5, "draft": False}),
    ("half", {"lang": "en", "year": 2024.5}),
    # The same keys holding other types: never matched by a condition of another type, and
    # never an error (a cast of "unknown" to a number fails on PostgreSQL).
    ("odd", {"lang": 7, "year": "unknown", "score": "high", "draft": "no"}),
    ("nested", {"lang": {"code": "en"}, "year": [2025], "draft": None}),
    ("bare", {}),
]
NAMES = {name for name, _ in DOCS}


@pytest.fixture
async def owner(services: AppServices) -> AccountWithKeys:
    return await make_account(services, plan="starter", balance_micros=1_000_000)


@pytest.fixture
async def collection(client: httpx.AsyncClient, owner: AccountWithKeys) -> str:
    created = await client.post("/v1/collections", headers=owner.headers, json={"name": "kb"})
    assert created.status_code == 201, created.text
    collection_id = str(created.json()["id"])
    for name, metadata in DOCS:
        added = await client.post(
            f"/v1/collections/{collection_id}/documents?wait=true",
            headers=owner.headers,
            json={"id": name, "text": f"Parcel notes {name}.", "metadata": metadata},
        )
        assert added.json()["status"] == "ready", added.text
    return collection_id


async def _search(
    client: httpx.AsyncClient, owner: AccountWithKeys, collection: str, body: dict[str, Any]
) -> list[httpx.Response]:
    """The same search on both endpoints (JSON with ASCII escapes: lone surrogates pass)."""
    headers = {**owner.headers, "content-type": "application/json"}
    one = await client.post(
        f"/v1/collections/{collection}/search", headers=headers, content=json.dumps(body)
    )
    many = await client.post(
        "/v1/collections/search",
        headers=headers,
        content=json.dumps({**body, "collection_ids": [collection]}),
    )
    return [one, many]


BAD_FILTERS: list[tuple[Any, str]] = [
    ({"a": {"$in": [{"$gt": 1}]}}, "filter['a']['$in'][0] must be a string, number or boolean"),
    ({"a": {"$nin": [[1]]}}, "filter['a']['$nin'][0] must be a string, number or boolean"),
    ({"a": {"$in": [None]}}, "not null"),
    ({"a": {"$in": "en"}}, "filter['a']['$in'] must be a list"),
    ({"a": {"$in": ["en", 1]}}, "mixes number and string"),
    ({"a": {"$in": [True, 1]}}, "mixes boolean and number"),
    ({"a": {"$in": list(range(101))}}, "101 values, more than 100"),
    ({"a": {"$gt": {"$lt": 3}}}, "filter['a']['$gt'] must be a string, number or boolean"),
    ({"a": {"$eq": [1]}}, "filter['a']['$eq'] must be a string, number or boolean, not a list"),
    ({"a": {"$lte": None}}, "not null"),
    ({"a": {"$regex": "x"}}, "unknown filter operator '$regex'"),
    ({"a": {"$and": [{"b": 1}]}}, "unknown filter operator '$and'"),
    ({"a": {"b": 1}}, "unknown filter operator 'b'"),
    ({"a": {}}, "empty object"),
    ({"a": None}, "filter['a'] must be a string, number or boolean, not null"),
    ({"a": [1, 2]}, "not a list"),
    ({"bad key!": 1}, "filter key 'bad key!'"),
    ({"": 1}, "filter key ''"),
    ({f"k{i}": i for i in range(33)}, "33 keys, more than 32"),
    ({"a": 2**63}, "outside the 64-bit range"),
    ({"a": {"$in": [-(2**63) - 1]}}, "outside the 64-bit range"),
    ({"a": "x" * 1001}, "at most 1000 characters"),
    ({"a": "nul\x00byte"}, "NUL"),  # refused for every body, the filter's grammar too
    ({"a": "\ud800"}, "valid text"),
    ([{"a": 1}], "'filter'"),
    ("lang = en", "'filter'"),
]


@pytest.mark.parametrize(("filter_", "problem"), BAD_FILTERS)
async def test_a_filter_outside_the_grammar_is_a_400_naming_filter(
    client: httpx.AsyncClient,
    owner: AccountWithKeys,
    collection: str,
    filter_: Any,
    problem: str,
) -> None:
    for response in await _search(client, owner, collection, {"query": "x", "filter": filter_}):
        error = assert_error(response, 400)
        message = str(error["message"])
        assert problem in message, message
        if error["code"] == "nul_character":
            assert error["param"] == "filter.a"
            continue
        assert error["param"] == "filter"
        if isinstance(filter_, dict):  # the grammar itself follows the problem
            assert error["code"] == "invalid_value"
            assert "$in and $nin take a list of up to 100 of them" in message, message


async def test_deep_and_non_finite_filters_are_400(
    client: httpx.AsyncClient, owner: AccountWithKeys, collection: str
) -> None:
    nested: Any = 1
    for _ in range(50):
        nested = {"$eq": nested}
    for response in await _search(client, owner, collection, {"query": "x", "filter": nested}):
        assert assert_error(response, 400)["param"] == "filter"
    for raw in ('{"a": NaN}', '{"a": {"$gt": Infinity}}', '{"a": {"$in": [-Infinity]}}'):
        body = '{"query": "x", "filter": ' + raw + "}"
        response = await client.post(
            f"/v1/collections/{collection}/search",
            headers={**owner.headers, "content-type": "application/json"},
            content=body,
        )
        error = assert_error(response, 400)
        assert error["param"] == "filter"
        assert "finite number" in str(error["message"])


VALID: list[tuple[dict[str, Any], set[str]]] = [
    ({"lang": "en"}, {"old", "new", "half"}),
    ({"lang": {"$eq": "fr"}}, {"french"}),
    ({"lang": {"$ne": "en"}}, NAMES - {"old", "new", "half"}),
    ({"lang": {"$in": ["fr", "de"]}}, {"french"}),
    ({"lang": {"$nin": ["en"]}}, NAMES - {"old", "new", "half"}),
    ({"lang": {"$in": []}}, set()),
    ({"lang": {"$nin": []}}, NAMES),
    ({"lang": 7}, {"odd"}),
    ({"year": {"$gte": 2024}}, {"new", "french", "half"}),
    ({"year": {"$gt": 2024, "$lt": 2025}}, {"half"}),
    ({"year": 2024}, {"french"}),
    ({"year": 2024.5}, {"half"}),
    ({"year": {"$in": [2023, 2024.5]}}, {"old", "half"}),
    ({"year": {"$lte": 2023.0}}, {"old"}),
    ({"year": "unknown"}, {"odd"}),
    ({"score": {"$gt": 0.4}}, {"new", "french"}),
    ({"draft": True}, {"new"}),
    ({"draft": {"$ne": True}}, NAMES - {"new"}),
    ({"draft": {"$in": [False]}}, {"old", "french"}),
    ({"lang": "en", "year": {"$lt": 2025}}, {"old", "half"}),
    ({}, NAMES),
]


@pytest.mark.parametrize(("filter_", "expected"), VALID)
async def test_valid_filters_select_exactly_the_matching_documents(
    client: httpx.AsyncClient,
    owner: AccountWithKeys,
    collection: str,
    filter_: dict[str, Any],
    expected: set[str],
) -> None:
    body = {"query": "parcel notes", "mode": "keyword", "top_k": 100, "filter": filter_}
    for response in await _search(client, owner, collection, body):
        assert response.status_code == 200, response.text
        found = {r["document_external_id"] for r in response.json()["data"]}
        assert found == expected, json.dumps(filter_)
    vector = await client.post(
        f"/v1/collections/{collection}/search",
        headers=owner.headers,
        json={**body, "mode": "vector"},
    )
    assert {r["document_external_id"] for r in vector.json()["data"]} == expected
