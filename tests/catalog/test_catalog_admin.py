"""Operator management of integrated models and credentials, and seeding from a models file."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from aivax.catalog import service as catalog
from aivax.models import ProviderCredential
from aivax.services import AppServices
from tests.fixtures.assertions import assert_error
from tests.fixtures.factories import AccountWithKeys


async def test_operator_creates_updates_and_deletes_a_model(
    client: httpx.AsyncClient, admin_headers: dict[str, str], account: AccountWithKeys
) -> None:
    credential = await client.post(
        "/admin/credentials",
        headers=admin_headers,
        json={
            "name": "ops-openai",
            "provider": "openai",
            "base_url": "https://api.example.com/v1",
            "api_key": "sk-operator-secret-1234",
        },
    )
    assert credential.status_code == 201
    assert credential.json()["key_last4"] == "1234"
    assert "sk-operator-secret" not in credential.text
    model = {
        "id": "acme/gpt-x",
        "provider": "openai",
        "upstream_model": "gpt-x",
        "credential": "ops-openai",
        "input_price_per_m": 150_000,
        "output_price_per_m": 600_000,
        "context_window": 128_000,
        "max_output_tokens": 16_000,
        "modalities": ["text", "image"],
        "supports_tools": True,
        "supports_json_schema": True,
        "plans": ["pro"],
    }
    created = await client.post("/admin/models", headers=admin_headers, json=model)
    assert created.status_code == 201, created.text
    assert created.json()["credential"] == "ops-openai"
    assert_error(
        await client.post("/admin/models", headers=admin_headers, json=model), 409, "model_exists"
    )
    # The Free account cannot see it (plan list and models_allowed both exclude it).
    ids = {
        m["id"] for m in (await client.get("/v1/models", headers=account.headers)).json()["data"]
    }
    assert "acme/gpt-x" not in ids
    updated = await client.patch(
        "/admin/models/acme/gpt-x",
        headers=admin_headers,
        json={"output_price_per_m": 500_000, "enabled": False},
    )
    assert updated.json()["output_price_per_m"] == 500_000
    assert updated.json()["enabled"] is False
    in_use = await client.delete(
        f"/admin/credentials/{credential.json()['id']}", headers=admin_headers
    )
    assert_error(in_use, 409, "credential_in_use")
    assert (
        await client.delete("/admin/models/acme/gpt-x", headers=admin_headers)
    ).status_code == 204
    assert_error(await client.get("/admin/models/acme/gpt-x", headers=admin_headers), 404)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"id": "byok/x/y"}, "id"),
        ({"provider": "cohere"}, "provider"),
        ({"credential": "missing"}, "credential"),
        ({"credential": None}, "credential"),
        ({"modalities": ["smell"]}, "modalities.0"),
        ({"context_window": 0}, "context_window"),
        ({"surprise": 1}, "surprise"),
    ],
)
async def test_model_validation_names_the_field(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    change: dict[str, object],
    param: str,
) -> None:
    model = {
        "id": "acme/bad",
        "provider": "openai",
        "upstream_model": "x",
        "credential": "fake-openai",
        "context_window": 10,
        "max_output_tokens": 5,
        **change,
    }
    error = assert_error(
        await client.post("/admin/models", headers=admin_headers, json=model),
        404 if change.get("credential") == "missing" else 400,
    )
    assert error["param"] == param


async def test_models_file_seeds_missing_entries_only(
    services: AppServices, tmp_path: Path
) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        '[[credentials]]\nname = "file-cred"\nprovider = "anthropic"\n'
        'api_key = "sk-ant-file"\n\n'
        '[[models]]\nid = "file/claude"\nprovider = "anthropic"\nupstream_model = "claude-x"\n'
        'credential = "file-cred"\ncontext_window = 200000\nmax_output_tokens = 8192\n'
        "input_price_per_m = 3000000\noutput_price_per_m = 15000000\n"
    )
    async with services.database.sessions() as session:
        created = await catalog.seed_from_file(session, path, services.secret_box)
        again = await catalog.seed_from_file(session, path, services.secret_box)
        await session.commit()
        model = await catalog.get_model(session, "file/claude")
        credential = await session.get(ProviderCredential, model.credential_id)
    assert created == ["credential file-cred", "model file/claude"]
    assert again == []
    assert credential is not None
    assert credential.base_url == "https://api.anthropic.com"
    assert services.secret_box.decrypt(credential.api_key_encrypted) == "sk-ant-file"


async def test_invalid_models_file_names_the_entry(services: AppServices, tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[models]]\nid = "x/y"\nprovider = "openai"\n')
    async with services.database.sessions() as session:
        with pytest.raises(catalog.ModelsFileError, match=r"models\[0\]"):
            await catalog.seed_from_file(session, path, services.secret_box)
    path.write_text("not = [toml")
    async with services.database.sessions() as session:
        with pytest.raises(catalog.ModelsFileError, match="cannot read"):
            await catalog.seed_from_file(session, path, services.secret_box)


async def test_model_update_with_nulls_keeps_those_fields(
    client: httpx.AsyncClient, admin_headers: dict[str, str], fake_models: list[str]
) -> None:
    model = {
        "id": "acme/nulls",
        "provider": "openai",
        "upstream_model": "x",
        "credential": "fake-openai",
        "context_window": 10,
        "max_output_tokens": 5,
        "supports_tools": True,
    }
    created = await client.post("/admin/models", headers=admin_headers, json=model)
    assert created.status_code == 201, created.text
    nulls = {
        "upstream_model": None,
        "input_price_per_m": None,
        "context_window": None,
        "modalities": None,
        "supports_tools": None,
        "supports_json_schema": None,
        "plans": None,
        "enabled": None,
        "options": None,
    }
    updated = await client.patch("/admin/models/acme/nulls", headers=admin_headers, json=nulls)
    assert updated.status_code == 200, updated.text
    kept = {name: created.json()[name] for name in nulls}
    assert {name: updated.json()[name] for name in nulls} == kept
    assert updated.json()["credential"] == "fake-openai"
    assert (
        await client.delete("/admin/models/acme/nulls", headers=admin_headers)
    ).status_code == 204
