"""`GET /v1/models` lists what the kernel's registered model listings add (the gateways are
one), after the integrated and BYOK models, for private and public keys alike; each listing
decides what a public key sees."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from aivax.gateways.listing import GatewayListing
from aivax.keys.schemas import KeyKind
from aivax.keys.service import Principal
from aivax.services import AppServices
from tests.fixtures.factories import AccountWithKeys


class MediaListing:
    """A plug-in's own entries: one model for every key, one for private keys only."""

    async def list_models(
        self, session: AsyncSession, principal: Principal
    ) -> list[dict[str, Any]]:
        entries = [{"id": "media/any-key", "object": "model", "owned_by": "media"}]
        if principal.key_kind is KeyKind.PRIVATE:
            entries.append({"id": "media/private", "object": "model", "owned_by": "media"})
        return entries


@pytest.fixture
def media_listing(services: AppServices) -> Iterator[MediaListing]:
    listing = MediaListing()
    services.kernel.extensions.listings.append(listing)
    yield listing
    services.kernel.extensions.listings.remove(listing)


@pytest.mark.usefixtures("app")
def test_the_app_registers_the_gateway_listing(services: AppServices) -> None:
    listings = services.kernel.extensions.listings
    assert [type(listing) for listing in listings] == [GatewayListing]


@pytest.mark.usefixtures("media_listing")
async def test_a_registered_listing_adds_models_after_the_catalog(
    client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    listed = (await client.get("/v1/models", headers=account.headers)).json()["data"]
    ids = [entry["id"] for entry in listed]
    assert ids[-2:] == ["media/any-key", "media/private"]
    assert any(entry["aivax"]["kind"] == "integrated" for entry in listed[:-2])
    found = await client.get("/v1/models/media/private", headers=account.headers)
    assert found.status_code == 200
    assert found.json()["owned_by"] == "media"


@pytest.mark.usefixtures("media_listing")
async def test_a_public_key_sees_only_what_the_listings_give_it(
    client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    headers = {"Authorization": f"Bearer {account.public_key}"}
    listed = (await client.get("/v1/models", headers=headers)).json()["data"]
    assert [entry["id"] for entry in listed] == ["media/any-key"]
    hidden = await client.get("/v1/models/media/private", headers=headers)
    assert hidden.status_code == 404
    assert hidden.json()["error"]["code"] == "model_not_found"
