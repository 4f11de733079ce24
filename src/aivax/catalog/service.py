"""Catalog rules: integrated models, credentials, and resolving a `model` string to a target."""

from __future__ import annotations

import tomllib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from aivax.catalog import repository
from aivax.catalog.local_embedding import LOCAL_MODELS
from aivax.catalog.schemas import (
    CatalogModelCreate,
    CatalogModelRead,
    CatalogModelUpdate,
    CredentialCreate,
    CredentialRead,
    Prices,
)
from aivax.errors import BadRequest, Conflict, NotFound
from aivax.kit.crypto import SecretBox
from aivax.kit.ssrf import SSRFBlocked, check_url_shape, url_endpoint, vetted_address
from aivax.models import CatalogModel, ProviderCredential

DEFAULT_BASE_URLS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
}
BYOK_PREFIX = "byok/"


class ModelNotFound(NotFound):
    code = "model_not_found"


class CredentialNotFound(NotFound):
    code = "credential_not_found"


class InvalidCredential(BadRequest):
    code = "invalid_credential"


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """Everything the pipeline needs about the model a request names."""

    id: str
    provider: str
    upstream_model: str
    kind: str = "chat"
    base_url: str = ""
    api_key: str = field(default="", repr=False)
    byok: bool = False
    input_price_per_m: int | None = 0
    output_price_per_m: int | None = 0
    context_window: int | None = None
    max_output_tokens: int | None = None
    modalities: frozenset[str] = frozenset({"text"})
    supports_tools: bool = True
    supports_json_schema: bool = True
    plans: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def supports_reasoning_effort(self) -> bool:
        """OpenAI-style `reasoning_effort`: Anthropic maps it to a thinking budget; catalog
        OpenAI-compatible models declare it in `options.reasoning_effort`; BYOK passes it on."""
        if self.provider == "anthropic" or self.byok:
            return True
        return self.provider == "openai" and bool(self.options.get("reasoning_effort"))

    @property
    def supports_verbosity(self) -> bool:
        if self.provider != "openai":
            return False
        return self.byok or bool(self.options.get("verbosity"))

    @property
    def priced(self) -> bool:
        return self.input_price_per_m is not None and self.output_price_per_m is not None


# --- integrated models -------------------------------------------------------------------


async def _credential_id(session: AsyncSession, name: str | None) -> uuid.UUID | None:
    if name is None:
        return None
    credential = await repository.get_credential_by_name(session, None, name)
    if credential is None:
        raise CredentialNotFound(
            f"No operator credential {name!r}. Create it with POST /admin/credentials.",
            param="credential",
        )
    return credential.id


def _check_model_shape(
    provider: str, credential: uuid.UUID | None, kind: str, upstream: str, options: dict[str, Any]
) -> None:
    if (kind == "embedding" and provider not in ("local_embedding", "openai")) or (
        provider == "local_embedding" and kind != "embedding"
    ):
        raise BadRequest(
            f"A {provider!r} model cannot be of kind {kind!r}: embedding models use the "
            "'local_embedding' or 'openai' provider, and 'local_embedding' serves only them.",
            param="kind",
        )
    if kind == "embedding":
        dimensions = options.get("dimensions")
        if not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1:
            raise BadRequest(
                "An embedding model needs options.dimensions (a positive integer).",
                param="options.dimensions",
            )
    if provider == "local_embedding":
        if upstream not in LOCAL_MODELS:
            raise BadRequest(
                f"Unknown local embedding model {upstream!r}; available: "
                f"{', '.join(sorted(LOCAL_MODELS))}.",
                param="upstream_model",
            )
        return
    if provider == "local_gguf":
        return
    if credential is None:
        raise BadRequest(
            f"A {provider!r} model needs an operator 'credential'.", param="credential"
        )


async def create_model(session: AsyncSession, data: CatalogModelCreate) -> CatalogModel:
    if await repository.get_model(session, data.id) is not None:
        raise Conflict(f"Model {data.id!r} already exists.", param="id", code="model_exists")
    credential_id = await _credential_id(session, data.credential)
    _check_model_shape(
        data.provider, credential_id, data.kind, data.upstream_model, dict(data.options)
    )
    values = data.model_dump(exclude={"credential"})
    model = CatalogModel(**values, credential_id=credential_id)
    session.add(model)
    await session.flush()
    return model


async def get_model(session: AsyncSession, model_id: str) -> CatalogModel:
    model = await repository.get_model(session, model_id)
    if model is None:
        raise ModelNotFound(f"No integrated model {model_id!r}.", param="model")
    return model


async def update_model(
    session: AsyncSession, model_id: str, data: CatalogModelUpdate
) -> CatalogModel:
    model = await get_model(session, model_id)
    # A null keeps a field as it is, as in every other update; only `credential` is cleared
    # by one (an openai-compatible local server needs none).
    changes = {
        name: value
        for name, value in data.model_dump(exclude_unset=True).items()
        if value is not None or name == "credential"
    }
    if "credential" in changes:
        model.credential_id = await _credential_id(session, changes.pop("credential"))
    for name, value in changes.items():
        setattr(model, name, value)
    _check_model_shape(
        model.provider, model.credential_id, model.kind, model.upstream_model, model.options
    )
    await session.flush()
    return model


async def delete_model(session: AsyncSession, model_id: str) -> None:
    await session.delete(await get_model(session, model_id))
    await session.flush()


async def list_models(session: AsyncSession, *, enabled_only: bool) -> Sequence[CatalogModel]:
    return await repository.list_models(session, enabled_only=enabled_only)


async def read_models(
    session: AsyncSession, models: Sequence[CatalogModel]
) -> list[CatalogModelRead]:
    names = await repository.credential_names(
        session, {m.credential_id for m in models if m.credential_id}
    )
    return [
        to_read(model, names.get(model.credential_id) if model.credential_id else None)
        for model in models
    ]


def to_read(model: CatalogModel, credential_name: str | None) -> CatalogModelRead:
    return CatalogModelRead(
        id=model.id,
        kind=model.kind,
        provider=model.provider,
        upstream_model=model.upstream_model,
        credential=credential_name,
        input_price_per_m=model.input_price_per_m,
        output_price_per_m=model.output_price_per_m,
        context_window=model.context_window,
        max_output_tokens=model.max_output_tokens,
        modalities=model.modalities,
        supports_tools=model.supports_tools,
        supports_json_schema=model.supports_json_schema,
        plans=model.plans,
        enabled=model.enabled,
        options=model.options,
        created_at=model.created_at,
        updated_at=model.updated_at,
    )


# --- credentials ---------------------------------------------------------------------------


async def create_credential(
    session: AsyncSession,
    *,
    account_id: uuid.UUID | None,
    data: CredentialCreate,
    secret_box: SecretBox,
    ssrf_allowlist: frozenset[str],
) -> ProviderCredential:
    base_url = data.base_url or DEFAULT_BASE_URLS[data.provider]
    try:
        base_url = check_url_shape(base_url)
        if account_id is not None:  # account-supplied URLs must be public
            host, port = url_endpoint(base_url)
            await vetted_address(host, port, allowlist=ssrf_allowlist)
    except SSRFBlocked as exc:
        raise InvalidCredential(f"base_url refused: {exc}.", param="base_url") from None
    if await repository.get_credential_by_name(session, account_id, data.name) is not None:
        raise Conflict(
            f"A credential named {data.name!r} exists.", param="name", code="credential_exists"
        )
    credential = ProviderCredential(
        account_id=account_id,
        name=data.name,
        provider=data.provider,
        base_url=base_url,
        api_key_encrypted=secret_box.encrypt(data.api_key),
        key_last4=data.api_key[-4:],
        models=data.models,
        prices={name: price.model_dump() for name, price in data.prices.items()},
    )
    session.add(credential)
    try:
        await session.flush()
    except IntegrityError:
        raise Conflict(
            f"A credential named {data.name!r} exists.", param="name", code="credential_exists"
        ) from None
    return credential


def read_credential(credential: ProviderCredential) -> CredentialRead:
    return CredentialRead(
        id=credential.id,
        name=credential.name,
        provider=credential.provider,
        base_url=credential.base_url,
        key_last4=credential.key_last4,
        models=credential.models,
        prices={k: Prices.model_validate(v) for k, v in credential.prices.items()},
        created_at=credential.created_at,
    )


async def list_credentials(
    session: AsyncSession, account_id: uuid.UUID | None
) -> Sequence[ProviderCredential]:
    return await repository.list_credentials(session, account_id)


async def delete_credential(
    session: AsyncSession, account_id: uuid.UUID | None, credential_id: uuid.UUID
) -> None:
    credential = await repository.get_credential(session, account_id, credential_id)
    if credential is None:
        raise CredentialNotFound(f"No credential {str(credential_id)!r}.", param="credential_id")
    await session.delete(credential)
    try:
        await session.flush()
    except IntegrityError:
        raise Conflict(
            "The credential is used by an integrated model; change the model first.",
            code="credential_in_use",
        ) from None


# --- resolving a request's `model` ---------------------------------------------------------


async def resolve(
    session: AsyncSession, account_id: uuid.UUID, model: str, secret_box: SecretBox
) -> ResolvedModel:
    if model.startswith(BYOK_PREFIX):
        return await _resolve_byok(session, account_id, model, secret_box)
    row = await repository.get_model(session, model)
    if row is None or not row.enabled:
        raise ModelNotFound(
            f"The model {model!r} does not exist or you do not have access to it. "
            "List models with GET /v1/models.",
            param="model",
        )
    base_url, api_key = "", ""
    if row.credential_id is not None:
        credential = await session.get(ProviderCredential, row.credential_id)
        if credential is not None:
            base_url, api_key = (
                credential.base_url,
                secret_box.decrypt(credential.api_key_encrypted),
            )
    return ResolvedModel(
        id=row.id,
        kind=row.kind,
        provider=row.provider,
        upstream_model=row.upstream_model,
        base_url=base_url,
        api_key=api_key,
        input_price_per_m=row.input_price_per_m,
        output_price_per_m=row.output_price_per_m,
        context_window=row.context_window,
        max_output_tokens=row.max_output_tokens,
        modalities=frozenset(row.modalities),
        supports_tools=row.supports_tools,
        supports_json_schema=row.supports_json_schema,
        plans=tuple(row.plans),
        options=dict(row.options),
    )


async def _resolve_byok(
    session: AsyncSession, account_id: uuid.UUID, model: str, secret_box: SecretBox
) -> ResolvedModel:
    _, name, upstream = [*model.split("/", 2), "", ""][:3]
    if not name or not upstream:
        raise ModelNotFound(
            f"Bring-your-own-key models are named 'byok/<credential>/<upstream-model>', "
            f"got {model!r}.",
            param="model",
        )
    credential = await repository.get_credential_by_name(session, account_id, name)
    if credential is None:
        raise ModelNotFound(
            f"No credential {name!r} on this account. Add one with POST /v1/credentials.",
            param="model",
        )
    prices = credential.prices.get(upstream)
    return ResolvedModel(
        id=model,
        provider=credential.provider,
        upstream_model=upstream,
        base_url=credential.base_url,
        api_key=secret_box.decrypt(credential.api_key_encrypted),
        byok=True,
        input_price_per_m=prices["input_price_per_m"] if prices else None,
        output_price_per_m=prices["output_price_per_m"] if prices else None,
        modalities=frozenset({"text", "image", "audio", "file", "video"}),
    )


# --- seeding -------------------------------------------------------------------------------


class ModelsFileError(ValueError):
    """The models file is unreadable or invalid; the message names the entry."""


def _entry_error(path: Path, entry: str, exc: ValidationError) -> str:
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    return f"models file {str(path)!r}: {entry}.{field}: {first['msg']}"


async def seed_from_file(session: AsyncSession, path: Path, secret_box: SecretBox) -> list[str]:
    """Create the credentials and models of a TOML file that do not exist yet (the database,
    where operators edit them, stays the source of truth for the ones that do)."""
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ModelsFileError(f"cannot read models file {str(path)!r}: {exc}") from exc
    created: list[str] = []
    for index, entry in enumerate(document.get("credentials", [])):
        try:
            data = CredentialCreate.model_validate(entry)
        except ValidationError as exc:
            raise ModelsFileError(_entry_error(path, f"credentials[{index}]", exc)) from None
        if await repository.get_credential_by_name(session, None, data.name) is None:
            await create_credential(
                session,
                account_id=None,
                data=data,
                secret_box=secret_box,
                ssrf_allowlist=frozenset(),
            )
            created.append(f"credential {data.name}")
    for index, entry in enumerate(document.get("models", [])):
        try:
            model = CatalogModelCreate.model_validate(entry)
        except ValidationError as exc:
            raise ModelsFileError(_entry_error(path, f"models[{index}]", exc)) from None
        if await repository.get_model(session, model.id) is None:
            await create_model(session, model)
            created.append(f"model {model.id}")
    return created
