"""Schema-driven fuzzing: schemathesis generates requests for every operation of the app's own
`/openapi.json` (valid and invalid ones) and checks that none is answered with a 5xx, and that
each answer's status, media type and body are the ones the schema documents.

The app runs on a real port with a database of its own, so what the fuzzer creates (plans,
models, keys) never reaches another test. The run is deterministic: a fixed number of examples
per operation, derandomized, with no example database.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from aivax.app import create_app
from aivax.config import Settings
from aivax.migrate import upgrade_to_head
from aivax.services import AppServices
from tests.conftest import TEST_SECRET, FakeUpstream
from tests.fixtures.databases import create_database, drop_database
from tests.fixtures.factories import install_fake_models, make_account, make_admin_token
from tests.fixtures.servers import ThreadedServer

# Each operation gets this many generated examples, on top of the schema's own examples and
# the coverage phase's boundary values; enough to reach every validator, small enough that
# the whole run takes a few minutes on two cores.
EXAMPLES_PER_OPERATION = 25

CHAT_MODEL = "test/fake-ok"
EMBEDDING_MODEL = "aivax/paraphrase-minilm-l3"
# Operations whose body names a model: on real objects, that model exists.
MODEL_IN_BODY = {
    "/v1/chat/completions": CHAT_MODEL,
    "/v1/embeddings": EMBEDDING_MODEL,
}

# Statuses seen per operation, to check the run got past authentication and into the handlers.
STATUSES: dict[str, Counter[int]] = {}

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@dataclass(frozen=True)
class FuzzTarget:
    url: str
    account_headers: dict[str, str]
    admin_headers: dict[str, str]
    # Path parameters naming objects that exist: under /admin (another account, a plan and a
    # model of its own, so the operator routes cannot lock the fuzzing account out) and under
    # /v1 (the fuzzing account's collection, document, gateway and a spare key).
    admin_objects: dict[str, str] = field(default_factory=dict)
    account_objects: dict[str, str] = field(default_factory=dict)

    def headers_for(self, path: str) -> dict[str, str]:
        return self.admin_headers if path.startswith("/admin") else self.account_headers

    def objects_for(self, path: str) -> dict[str, str]:
        return self.admin_objects if path.startswith("/admin") else self.account_objects


@pytest.fixture(scope="module")
def fuzz_settings(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    """The session's settings with a database of the fuzz run's own."""
    data_dir: Path = tmp_path_factory.mktemp("fuzz")
    server_url = os.environ.get("AIVAX_TEST_DATABASE_URL")
    if not server_url:
        url = f"sqlite+aiosqlite:///{data_dir / 'aivax.db'}"
        upgrade_to_head(url)
        yield settings.model_copy(update={"database_url": url, "data_dir": data_dir})
        return
    name, url = asyncio.run(create_database(server_url, "aivax_fuzz"))
    try:
        upgrade_to_head(url)
        yield settings.model_copy(update={"database_url": url, "data_dir": data_dir})
    finally:
        asyncio.run(drop_database(server_url, name))


@pytest.fixture(scope="module")
async def fuzz_credentials(
    fuzz_settings: Settings, fake_openai: FakeUpstream, fake_anthropic: FakeUpstream
) -> tuple[str, str]:
    """A private key of a Pro account with a balance, an operator token, and the integrated
    test models backed by the fake upstreams."""
    services = AppServices.build(fuzz_settings)
    try:
        await install_fake_models(services, fake_openai.base_url, fake_anthropic.server.url)
        account = await make_account(services, plan="pro", balance_micros=100_000_000)
        admin_token = await make_admin_token(services)
    finally:
        await services.close()
    return account.private_key, admin_token


@pytest.fixture(scope="module")
def fuzz_target(fuzz_settings: Settings, fuzz_credentials: tuple[str, str]) -> Iterator[FuzzTarget]:
    private_key, admin_token = fuzz_credentials
    server = ThreadedServer(create_app(fuzz_settings)).start()
    try:
        target = FuzzTarget(
            server.url,
            {"Authorization": f"Bearer {private_key}"},
            {"Authorization": f"Bearer {admin_token}"},
        )
        account_objects = make_account_objects(target)
        yield replace(
            target,
            # The operator reaches every account's jobs: the import's job is one of them.
            admin_objects={**make_admin_objects(target), "job_id": account_objects["job_id"]},
            account_objects=account_objects,
        )
    finally:
        server.stop()


def _create(target: FuzzTarget, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = requests.post(
        target.url + path, json=body, headers=target.headers_for(path), timeout=60
    )
    assert response.status_code in (200, 201, 202), response.text
    created: dict[str, Any] = response.json()
    return created


def make_admin_objects(target: FuzzTarget) -> dict[str, str]:
    plan = _create(target, "/admin/plans", {"id": "fuzz-plan", "name": "Fuzz"})
    account = _create(target, "/admin/accounts", {"name": "fuzz target", "plan": plan["id"]})
    model = {
        "id": "fuzz/target",
        "provider": "openai",
        "upstream_model": "fake-ok",
        "credential": "fake-openai",
        "context_window": 1_000,
        "max_output_tokens": 100,
    }
    return {
        "account_id": account["id"],
        "plan_id": plan["id"],
        "model_id": _create(target, "/admin/models", model)["id"],
    }


def make_account_objects(target: FuzzTarget) -> dict[str, str]:
    collection = _create(target, "/v1/collections", {"name": "fuzz"})
    document = _create(
        target,
        f"/v1/collections/{collection['id']}/documents",
        {"text": "AIVAX answers questions about its wallet and its gateways."},
    )
    gateway = _create(target, "/v1/gateways", {"slug": "fuzz", "config": {"model": CHAT_MODEL}})
    spare_key = _create(target, "/v1/keys", {"name": "spare"})
    imported = requests.post(
        f"{target.url}/v1/collections/{collection['id']}/import",
        data=b'{"text": "Gateways compose instructions, tools and collections."}\n',
        headers={**target.account_headers, "Content-Type": "application/x-ndjson"},
        timeout=60,
    )
    assert imported.status_code == 202, imported.text
    return {
        "collection_id": collection["id"],
        "document_id": document["id"],
        "ref": gateway["id"],
        "version": "1",
        "key_id": spare_key["id"],
        "job_id": imported.json()["job"]["id"],
        "model_id": CHAT_MODEL,
    }


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def app_schema() -> dict[str, Any]:
    """The document the app serves at `/openapi.json` (built without starting the app: the
    fuzz cases are made when the tests are collected)."""
    app = create_app(Settings(_env_file=None, secret_key=TEST_SECRET))  # type: ignore[call-arg]
    return app.openapi()


schema = schemathesis.openapi.from_dict(app_schema())


def test_every_operation_documents_the_error_envelope() -> None:
    """The answers a client can get are in the schema, in the one shape the API sends."""
    document = schema.raw_schema
    assert "HTTPValidationError" not in document["components"]["schemas"]
    envelope = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            statuses = operation["responses"]
            if path in ("/healthz", "/readyz"):
                continue
            for status in ("400", "401", "404", "429", "500", "503"):
                content = statuses[status]["content"]["application/json"]
                assert content["schema"] == envelope, (method, path, status)
    assert set(document["paths"]["/readyz"]["get"]["responses"]) == {"200", "503"}


def test_fuzzed_schema_is_the_one_served(fuzz_target: FuzzTarget) -> None:
    served = requests.get(f"{fuzz_target.url}/openapi.json", timeout=10)
    assert served.status_code == 200
    assert served.json() == schema.raw_schema


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def call_and_check(case: schemathesis.Case, target: FuzzTarget, http: requests.Session) -> None:
    response = case.call(
        base_url=target.url, session=http, headers=target.headers_for(case.path), timeout=60
    )
    STATUSES.setdefault(case.operation.label, Counter())[response.status_code] += 1
    case.validate_response(response, checks=CHECKS)


@schema.parametrize()
@FUZZ_SETTINGS
def test_every_operation_answers_as_documented(
    case: schemathesis.Case, fuzz_target: FuzzTarget, http: requests.Session
) -> None:
    """Generated path parameters: mostly unknown ids, so this reaches validation and lookups."""
    call_and_check(case, fuzz_target, http)


# Deleting the objects would leave the operations after it nothing to work on: DELETE is
# fuzzed above, on generated ids only.
@schema.exclude(method="DELETE").parametrize()
@FUZZ_SETTINGS
def test_every_operation_on_real_objects_answers_as_documented(
    case: schemathesis.Case, fuzz_target: FuzzTarget, http: requests.Session
) -> None:
    """The same operations with path parameters (and the model a body names) that exist, so
    generated bodies and queries reach the services behind them."""
    objects = fuzz_target.objects_for(case.path)
    if case.path_parameters:
        case.path_parameters = {name: objects[name] for name in case.path_parameters}
    case.body = with_real_model(case.path, case.body)
    call_and_check(case, fuzz_target, http)


def with_real_model(path: str, body: Any) -> Any:
    """The body with the model it names replaced by one that exists (gateways name theirs in
    `config`)."""
    if not isinstance(body, dict):
        return body
    if path.startswith("/v1/gateways") and isinstance(body.get("config"), dict):
        if "model" in body["config"]:
            return {**body, "config": {**body["config"], "model": CHAT_MODEL}}
        return body
    model = MODEL_IN_BODY.get(path)
    if model is not None and "model" in body:
        return {**body, "model": model}
    return body


def test_fuzzing_got_past_authentication() -> None:
    """Guards the run itself: with a key that stopped working, every operation would pass
    on 401s alone."""
    assert STATUSES, "the fuzz run made no request (run the whole module)"
    stuck = sorted(label for label, counts in STATUSES.items() if set(counts) <= {401, 403})
    assert not stuck, f"only 401/403 answers for: {stuck}"
    accepted = [label for label, counts in STATUSES.items() if any(s < 300 for s in counts)]
    assert len(accepted) * 2 > len(STATUSES), f"few operations ever succeeded: {STATUSES}"
