"""Collections filled through the API as a user fills them: create, JSONL import, search."""

from __future__ import annotations

import json
from typing import Any

import httpx

from aivax.services import AppServices
from tests.fixtures.factories import AccountWithKeys


async def create_collection(
    client: httpx.AsyncClient, account: AccountWithKeys, **extra: Any
) -> str:
    response = await client.post(
        "/v1/collections", headers=account.headers, json={"name": "kb", **extra}
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def import_documents(
    client: httpx.AsyncClient,
    services: AppServices,
    account: AccountWithKeys,
    collection: str,
    documents: list[dict[str, Any]],
) -> None:
    body = "\n".join(json.dumps(document) for document in documents)
    response = await client.post(
        f"/v1/collections/{collection}/import", headers=account.headers, content=body
    )
    assert response.status_code == 202, response.text
    assert response.json()["rejected_count"] == 0, response.text
    await services.jobs.wait_idle()


async def search(
    client: httpx.AsyncClient, account: AccountWithKeys, collection: str, **body: Any
) -> list[dict[str, Any]]:
    response = await client.post(
        f"/v1/collections/{collection}/search", headers=account.headers, json=body
    )
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data
