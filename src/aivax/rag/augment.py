"""Retrieval for gateways with a `collections` section, before the model is called.

- always:  search with the latest user turn; the passages go in as one cited system message.
- rewrite: a first (billed) call asks the gateway's model to turn the conversation into one
           standalone search query; then as `always` with that query.
- tool:    a first (billed) call offers the model a `search_collections` tool. If it calls it,
           the search runs and the call and its result are added to the conversation as a real
           tool exchange (assistant tool_call + tool message), then the model answers; if it
           does not, it answers without retrieval. Models without tool support use `always`.
The context never exceeds the section's `context_tokens`; `aivax.retrieval` in the response
lists what was retrieved, with scores, when the caller sets `aivax.include_retrieval`.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from aivax.errors import AppError
from aivax.gateways.schemas import Collections, GatewayConfig
from aivax.inference.extensions import Augmentation, CallView
from aivax.inference.schemas import (
    AssistantMessage,
    ChatCompletionRequest,
    SystemMessage,
    ToolMessage,
)
from aivax.inference.steps import Steps
from aivax.keys.service import Principal
from aivax.kit.jsonlimits import JsonTooDeep, loads_limited
from aivax.models import Collection
from aivax.providers.base import UpstreamError
from aivax.rag import chunking, internal, retrieval
from aivax.rag.deps import AugmentServices
from aivax.rag.schemas import SearchRequest, SearchResult

logger = logging.getLogger("aivax.rag")

TOOL_NAME = "search_collections"
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": "Search the knowledge base for passages that help answer the user.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "What to look for."}},
            "required": ["query"],
        },
    },
}
REWRITE_PROMPT = (
    "Rewrite the user's latest message as one standalone search query, using the conversation "
    "for context (names, what 'it' refers to). Reply with the query only."
)
CONTEXT_HEADER = (
    "Answer using the numbered passages below when they are relevant, and cite them as [n]. "
    "If they do not contain the answer, say so.\n\n"
)


def latest_user_text(request: ChatCompletionRequest) -> str:
    for message in reversed(request.messages):
        if message.role == "user":
            content = message.content
            if isinstance(content, str):
                return content
            return " ".join(getattr(part, "text", "") for part in content if part.type == "text")
    return ""


def _passages(results: list[SearchResult], budget: int) -> tuple[str, list[SearchResult]]:
    used, kept, parts = 0, [], []
    for index, result in enumerate(results, start=1):
        name = result.document_title or result.document_external_id or str(result.document_id)
        source = " > ".join([name, *result.heading_path])
        block = f"[{index}] ({source})\n{result.text}"
        cost = chunking.count_tokens(block)
        if used + cost > budget:
            break
        used += cost
        kept.append(result)
        parts.append(block)
    return "\n\n".join(parts), kept


def _report(strategy: str, query: str | None, results: list[SearchResult]) -> dict[str, Any]:
    return {
        "strategy": strategy,
        "query": query,
        "results": [
            {
                "chunk_id": r.chunk_id,
                "collection_id": str(r.collection_id),
                "document_id": str(r.document_id),
                "document_title": r.document_title,
                "heading_path": r.heading_path,
                "score": r.score,
                "vector_score": r.vector_score,
                "keyword_score": r.keyword_score,
                "text": r.text,
            }
            for r in results
        ],
    }


async def _search(
    services: AugmentServices,
    principal: Principal,
    section: Collections,
    query: str,
    steps: Steps,
) -> list[SearchResult]:
    async with services.database.sessions() as session:
        collections = [
            c
            for c in [await session.get(Collection, i) for i in section.ids]
            if c is not None and c.account_id == principal.account_id
        ]
        if not collections:
            return []
        response = await retrieval.run(
            services,
            session,
            principal,
            collections,
            SearchRequest(query=query[:4000], top_k=section.top_k, min_score=section.min_score),
            request_id=steps.request_id,
            steps=steps,
            rate_limited=False,
        )
    return response.data


def _transcript(request: ChatCompletionRequest, limit: int = 12) -> str:
    lines = []
    for message in request.messages[-limit:]:
        if message.role in ("user", "assistant") and message.content:
            content = message.content
            text = (
                content
                if isinstance(content, str)
                else json.dumps([getattr(p, "text", "") for p in content])
            )
            lines.append(f"{message.role}: {text[:2000]}")
    return "\n".join(lines)


async def augment(
    services: AugmentServices,
    principal: Principal,
    section: Collections | None,
    request: ChatCompletionRequest,
    steps: Steps,
    *,
    supports_tools: bool,
) -> tuple[ChatCompletionRequest, dict[str, Any] | None]:
    """The request with retrieved context added, and the retrieval report. The strategies'
    own model calls are steps of the caller's request (`steps`)."""
    request_id = steps.request_id
    if section is None or not section.ids:
        return request, None
    question = latest_user_text(request)
    if not question.strip():
        return request, _report(section.strategy, None, [])
    strategy = section.strategy
    if strategy == "tool" and not supports_tools:
        strategy = "always"
    try:
        if strategy == "tool":
            return await _tool_turn(services, principal, section, request, steps)
        query = question
        if strategy == "rewrite":
            rewritten = await internal.call(
                services,
                principal,
                request.model,
                [
                    {"role": "system", "content": REWRITE_PROMPT},
                    {"role": "user", "content": _transcript(request)},
                ],
                max_tokens=64,
                steps=steps,
            )
            query = internal.generated_text(rewritten).strip().strip('"') or question
        results = await _search(services, principal, section, query, steps)
    except (AppError, UpstreamError) as exc:
        # Retrieval must never take the assistant down: answer without it, and say so.
        logger.warning("retrieval for %s failed: %s", request_id, exc)
        report = _report(strategy, None, [])
        report["error"] = getattr(exc, "message", str(exc))
        return request, report
    text, kept = _passages(results, section.context_tokens)
    report = _report(strategy, query, kept)
    if not kept:
        return request, report
    context = SystemMessage(role="system", content=CONTEXT_HEADER + text)
    messages = list(request.messages)
    position = next(
        (i for i, m in enumerate(messages) if m.role not in ("system", "developer")), len(messages)
    )
    messages.insert(position, context)
    return request.model_copy(update={"messages": messages}), report


async def _tool_turn(
    services: AugmentServices,
    principal: Principal,
    section: Collections,
    request: ChatCompletionRequest,
    steps: Steps,
) -> tuple[ChatCompletionRequest, dict[str, Any] | None]:
    messages = [m.model_dump(exclude_none=True) for m in request.messages]
    decided = await internal.call(
        services,
        principal,
        request.model,
        messages,
        max_tokens=128,
        tools=[SEARCH_TOOL],
        steps=steps,
    )
    call = next((c for c in decided.tool_calls if c.name == TOOL_NAME), None)
    if call is None:
        return request, _report("tool", None, [])
    try:
        arguments = loads_limited(call.arguments or "{}", param="arguments")
        query = str(arguments.get("query") or latest_user_text(request))
    except (ValueError, AttributeError, JsonTooDeep):
        query = latest_user_text(request)
    results = await _search(services, principal, section, query, steps)
    text, kept = _passages(results, section.context_tokens)
    call_id = call.id or f"call_{uuid.uuid4().hex[:12]}"
    exchange = [
        AssistantMessage.model_validate(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": TOOL_NAME, "arguments": json.dumps({"query": query})},
                    }
                ],
            }
        ),
        ToolMessage(
            role="tool",
            tool_call_id=call_id,
            content=(CONTEXT_HEADER + text) if kept else "No passage matched the query.",
        ),
    ]
    return (
        request.model_copy(update={"messages": [*request.messages, *exchange]}),
        _report("tool", query, kept),
    )


class RetrievalAugmenter:
    """The kernel's RAG augmenter: retrieval for calls through a gateway with a `collections`
    section."""

    def __init__(self, services: AugmentServices) -> None:
        self.services = services

    async def augment(self, call: CallView) -> Augmentation | None:
        config = call.gateway.settings if call.gateway is not None else None
        if not isinstance(config, GatewayConfig):
            return None
        model = call.model
        request, report = await augment(
            self.services,
            call.caller.principal,
            config.collections,
            call.request,
            call.steps,
            supports_tools=model.supports_tools or model.byok,
        )
        return Augmentation(request, report)
