"""Every embedding call — `/v1/embeddings`, indexing a document, embedding a search query — is
billed like chat, through the same wallet meter: reserve the input cost before the call
(from the account's wallet lease when leases are on), settle what the model reports after,
one request-log row per call. `/v1/embeddings` also passes the chat rate limits (requests and
input tokens per minute per account and model; BYOK: requests per minute)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from aivax.catalog.service import ResolvedModel
from aivax.errors import BadRequest
from aivax.inference import admission
from aivax.inference.steps import Steps
from aivax.inference.tokens import count_text
from aivax.keys.service import Principal
from aivax.plans.schemas import PlanLimits
from aivax.providers.base import UpstreamError
from aivax.rag.deps import EmbeddingServices
from aivax.rag.embedders import Embedder, EmbedderUnavailable, Matrix, local_embedder
from aivax.rag.remote import RemoteEmbedder
from aivax.wallet.meter import log_row


class NotAnEmbeddingModel(BadRequest):
    code = "not_an_embedding_model"


@dataclass(frozen=True, slots=True)
class Embedded:
    vectors: Matrix
    tokens: int
    cost_micros: int | None
    headers: dict[str, str]


def embedder_for(services: EmbeddingServices, model: ResolvedModel) -> Embedder:
    if model.kind != "embedding" and not model.byok:
        raise NotAnEmbeddingModel(
            f"{model.id!r} is a chat model; pick an embedding model (GET /v1/models lists "
            "them with aivax.type = 'embedding').",
            param="model",
        )
    if model.provider == "local_embedding":
        try:
            return local_embedder(model.upstream_model)
        except EmbedderUnavailable as exc:
            raise UpstreamError(
                f"the local embedding model {model.id!r} is not installed: {exc}",
                status=503,
                provider="local_embedding",
                code="model_unavailable",
            ) from exc
    if model.provider != "openai":
        raise NotAnEmbeddingModel(
            f"Provider {model.provider!r} has no embeddings endpoint; use an OpenAI-compatible "
            "credential.",
            param="model",
        )
    dimensions = model.options.get("dimensions")
    return RemoteEmbedder(
        services.registry.client(model.base_url, guarded=model.byok),
        base_url=model.base_url,
        api_key=model.api_key,
        model=model.upstream_model,
        dimensions=int(dimensions) if isinstance(dimensions, int) else None,
        max_input_tokens=model.context_window or 8191,
    )


async def embed(
    services: EmbeddingServices,
    account_id: uuid.UUID,
    limits: PlanLimits,
    model: ResolvedModel,
    texts: Sequence[str],
    *,
    request_id: str,
    key_id: uuid.UUID | None = None,
    rate_limit_for: Principal | None = None,
    steps: Steps | None = None,
) -> Embedded:
    """Embed `texts` for the account, billed (and rate-limited when `rate_limit_for` is given);
    raises AppError/UpstreamError on refusal. `steps`: the request this embedding is a step of
    (a search's query embedding); its request-log row is that request's next step."""
    embedder = embedder_for(services, model)
    estimate = sum(min(count_text(text), embedder.max_input_tokens) for text in texts)
    headers: dict[str, str] = {}
    if rate_limit_for is not None:
        headers = await admission.check_rate_limits(
            services.limiter, rate_limit_for, limits, model, estimate
        )
    # Reserve the estimate with a margin (tokenizers differ); settle what the model counted.
    worst = admission.cost_micros(model, estimate * 2 + 16, 0) or 0
    meter = services.meter
    started = time.perf_counter()
    embedding: asyncio.Task[tuple[Matrix, int]] | None = None
    if model.provider == "local_embedding":
        # A packaged model costs nothing to run: embed while the reservation is taken (it is
        # thrown away if that is refused). Upstream models are only called once it is in.
        embedding = asyncio.create_task(embedder.embed(texts))
    try:
        reservation = await meter.reserve(
            account_id, worst, limits.min_balance_micros, ref=request_id
        )
    except BaseException:
        if embedding is not None:
            embedding.cancel()
        raise
    status, error_code, tokens = 200, None, 0
    vectors: Matrix | None = None
    try:
        vectors, tokens = await (embedding if embedding is not None else embedder.embed(texts))
    except UpstreamError as exc:
        status, error_code = exc.status, exc.code
        raise
    except BaseException:
        status, error_code = 499, "cancelled"
        raise
    finally:
        cost = (admission.cost_micros(model, tokens, 0) or 0) if tokens else 0
        charge = reservation.charge_for(cost)
        meter.settle(
            reservation,
            charge,
            log_row(
                request_id=request_id,
                step=steps.next() if steps is not None else 1,
                account_id=account_id,
                key_id=key_id,
                model=model,
                status=status,
                error_code=error_code,
                input_tokens=tokens,
                cost=charge if model.priced else None,
                started=started,
            ),
        )
    assert vectors is not None  # noqa: S101 - set when embed() returned
    return Embedded(vectors, tokens, charge if model.priced else None, headers)
