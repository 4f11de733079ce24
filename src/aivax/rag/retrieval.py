"""One search over one or more collections, shared by the API, gateways and the MCP server."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from sqlalchemy.ext.asyncio import AsyncSession

from aivax.catalog import service as catalog
from aivax.catalog.service import BYOK_PREFIX, ModelNotFound
from aivax.errors import BadRequest, NotFound
from aivax.inference.errors import client_error
from aivax.inference.prepare import plan_and_model
from aivax.inference.steps import Steps
from aivax.keys.service import Principal
from aivax.models import Collection
from aivax.plans.schemas import PlanLimits
from aivax.providers.base import UpstreamError
from aivax.rag import internal, metering, search
from aivax.rag.deps import SearchServices
from aivax.rag.remote import RemoteReranker
from aivax.rag.schemas import RerankSpec, SearchRequest, SearchResponse, SearchResult
from aivax.rag.service import cached_plan_limits, get_collection, hit_rate


async def run(
    services: SearchServices,
    session: AsyncSession,
    principal: Principal,
    collections: Sequence[Collection],
    request: SearchRequest,
    *,
    request_id: str,
    steps: Steps | None = None,
    rate_limited: bool = True,
) -> SearchResponse:
    """`steps`: the request this search is part of (a gateway call's retrieval); its query
    embeddings and reranking judge are logged as that request's next steps."""
    steps = steps or Steps(request_id)
    limits = await cached_plan_limits(services, session, principal.plan_id)
    if rate_limited:
        await hit_rate(services.limiter, "search", principal.account_id, limits.search_rpm)
    pool = search.candidate_count(request.group_by)
    conditions = search.metadata_conditions(request.filter)
    vector_hits: list[tuple[int, float]] = []
    keyword_hits: list[tuple[int, float]] = []
    wants_vectors = request.mode in ("hybrid", "vector")
    # The query embedding (a worker thread) runs while the keyword search (the database's
    # thread) does: on two cores, hybrid costs about the slower of the two, not their sum.
    embeddings = (
        {
            model: asyncio.create_task(
                _embed_query(services, principal, limits, model, request.query, steps)
            )
            for model in dict.fromkeys(c.embedding_model for c in collections)
        }
        if wants_vectors
        else {}
    )
    vector_tasks: list[asyncio.Task[list[tuple[int, float]]]] = []
    try:
        allowed = {
            c.id: await search.allowed_chunks(session, c.id, conditions)
            for c in collections
            if conditions and wants_vectors
        }

        async def nearest(collection: Collection) -> list[tuple[int, float]]:
            query, _ = await embeddings[collection.embedding_model]
            return await services.vectors.nearest(
                collection.id,
                collection.vectors_version,
                collection.dimensions,
                query,
                pool,
                allowed.get(collection.id),
            )

        # Vector searches run as tasks (their own connections or threads) while the keyword
        # searches use this session.
        vector_tasks = [asyncio.create_task(nearest(c)) for c in collections if wants_vectors]
        if request.mode in ("hybrid", "keyword"):
            for collection in collections:
                keyword_hits += await search.keyword(
                    session,
                    collection.id,
                    request.query,
                    pool,
                    conditions,
                    version=collection.vectors_version,
                )
        for vector_task in vector_tasks:
            vector_hits += await vector_task
    except BaseException:
        for pending in [*embeddings.values(), *vector_tasks]:
            pending.cancel()  # an error elsewhere: the vector side is not needed
        raise
    # Every task was awaited above (vector modes), so their results are all available here.
    tokens = sum(task.result()[1] for task in embeddings.values())
    vector_hits.sort(key=lambda hit: -hit[1])
    keyword_hits.sort(key=lambda hit: -hit[1])
    candidates = search.fuse(
        vector_hits[:pool] if request.mode != "keyword" else None,
        keyword_hits[:pool] if request.mode != "vector" else None,
        request.mode,
    )
    owned = {c.id: c for c in collections}
    grouped = request.group_by == "document"
    if request.rerank is not None and request.rerank.type != "none":
        top = candidates[: request.rerank.candidates]
        hydrated = await search.hydrate(session, top, owned)
        scores = await _rerank(
            services, session, principal, request.rerank, request.query, hydrated, steps
        )
        for result, score in zip(hydrated, scores, strict=True):
            result.rerank_score = round(score, 6)
            result.score = round(score, 6)
        hydrated.sort(key=lambda r: -r.score)
        results = [r for r in hydrated if r.score >= request.min_score]
    else:
        kept = [c for c in candidates if c.score >= request.min_score]
        if grouped:
            kept = await search.document_groups(session, kept, request.top_k)
        results = await search.hydrate(session, kept[: None if grouped else request.top_k], owned)
    if grouped:
        results = search.group_results(results, request.top_k)
    results = results[: request.top_k]
    return SearchResponse(data=results, mode=request.mode, usage={"embedding_tokens": tokens})


async def _embed_query(
    services: SearchServices,
    principal: Principal,
    limits: PlanLimits,
    model_name: str,
    query: str,
    steps: Steps,
) -> tuple[npt.NDArray[np.float32], int]:
    _, model = await plan_and_model(services.kernel, principal, model_name)
    try:
        embedded = await metering.embed(
            services,
            principal.account_id,
            limits,
            model,
            [query],
            request_id=steps.request_id,
            steps=steps,
            key_id=principal.key_id,
        )
    except UpstreamError as exc:
        raise client_error(exc, model) from exc
    return search.as_query_vector(embedded.vectors), embedded.tokens


async def _rerank(
    services: SearchServices,
    session: AsyncSession,
    principal: Principal,
    spec: RerankSpec,
    query: str,
    results: list[SearchResult],
    steps: Steps,
) -> list[float]:
    if not results:
        return []
    if spec.type == "endpoint":
        # The credential resolves like a bring-your-own-key model: base URL and decrypted key.
        try:
            ranker = await catalog.resolve(
                session,
                principal.account_id,
                f"{BYOK_PREFIX}{spec.credential}/{spec.model}",
                services.secret_box,
            )
        except ModelNotFound as exc:
            raise NotFound(
                f"No credential {spec.credential!r} on this account.",
                param="rerank.credential",
                code="credential_not_found",
            ) from exc
        reranker = RemoteReranker(
            services.registry.client(ranker.base_url, guarded=True),
            url=ranker.base_url.rstrip("/") + "/rerank",
            api_key=ranker.api_key,
            model=ranker.upstream_model,
        )
        try:
            return await reranker.rerank(query, [r.text for r in results])
        except UpstreamError as exc:
            raise BadRequest(
                f"The reranker failed: {exc.message}", param="rerank", code="rerank_failed"
            ) from exc
    return await _judge(services, principal, spec.model or "", query, results, steps)


JUDGE_PROMPT = (
    "Rate how well each passage answers the query, from 0 (irrelevant) to 10 (fully answers "
    'it). Reply with JSON only: {"scores": [one integer per passage, in order]}.'
)


async def _judge(
    services: SearchServices,
    principal: Principal,
    model: str,
    query: str,
    results: list[SearchResult],
    steps: Steps,
) -> list[float]:
    """A chat model as the judge: one billed call that scores every passage 0-10."""
    passages = "\n\n".join(
        f"[{index}] {result.text[:1500]}" for index, result in enumerate(results, start=1)
    )
    try:
        answer = await internal.call(
            services,
            principal,
            model,
            [
                {"role": "system", "content": JUDGE_PROMPT},
                {"role": "user", "content": f"Query: {query}\n\nPassages:\n{passages}"},
            ],
            max_tokens=8 * len(results) + 32,
            steps=steps,
        )
    except UpstreamError as exc:
        raise BadRequest(
            f"The reranking model failed: {exc.message}", param="rerank", code="rerank_failed"
        ) from exc
    return _parse_scores(internal.generated_text(answer), len(results))


def _parse_scores(text: str, count: int) -> list[float]:
    scores: list[float] = []
    try:
        parsed = json.loads(text[text.index("{") : text.rindex("}") + 1])
        scores = [float(value) for value in parsed.get("scores", [])]
    except (ValueError, TypeError, AttributeError):
        scores = [float(value) for value in re.findall(r"\d+(?:\.\d+)?", text)]
    scores = (scores + [0.0] * count)[:count]
    return [min(max(score / 10.0, 0.0), 1.0) for score in scores]


async def owned_collections(
    session: AsyncSession, account_id: uuid.UUID, ids: Sequence[uuid.UUID | str]
) -> list[Collection]:
    return [await get_collection(session, account_id, value) for value in dict.fromkeys(ids)]
