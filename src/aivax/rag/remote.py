"""OpenAI-compatible `/v1/embeddings` and Cohere/Jina-style `/v1/rerank` upstreams.

Wire formats: OpenAI `POST /embeddings` → `{"data": [{"index", "embedding"}], "usage":
{"prompt_tokens"}}`; Cohere v2 / Jina `POST /rerank` with `{"model", "query", "documents",
"top_n"}` → `{"results": [{"index", "relevance_score"}]}`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

from aivax.inference.tokens import count_text
from aivax.providers.base import (
    CONNECT_ERRORS,
    RETRYABLE_STATUSES,
    TRANSPORT_ERRORS,
    UpstreamError,
    transport_failure,
)
from aivax.providers.openai_compat import error_message, retry_delay
from aivax.rag.embedders import Matrix, normalise

REMOTE_BATCH = 96


RETRIES = 2


async def _post(
    http: httpx.AsyncClient, url: str, api_key: str, body: dict[str, Any], provider: str
) -> dict[str, Any]:
    """POST with retries (backoff, Retry-After) on connection errors, 429 and 5xx: these calls
    are idempotent, and a reused keep-alive connection the server just closed is routine."""
    for attempt in range(RETRIES + 1):
        last = attempt == RETRIES
        try:
            response = await http.post(
                url, json=body, headers={"Authorization": f"Bearer {api_key}"}
            )
            if response.status_code >= 400:
                if not last and response.status_code in RETRYABLE_STATUSES:
                    await asyncio.sleep(retry_delay(attempt, response.headers))
                    continue
                raw = response.text[:4000]
                raise UpstreamError(
                    error_message(response.status_code, raw),
                    status=response.status_code,
                    provider=provider,
                    body=raw,
                    headers=dict(response.headers),
                )
            parsed = response.json()
            break
        except CONNECT_ERRORS as exc:
            if not last:
                await asyncio.sleep(retry_delay(attempt, None))
                continue
            raise transport_failure(exc, provider) from exc
        except TRANSPORT_ERRORS as exc:
            raise transport_failure(exc, provider) from exc
    if not isinstance(parsed, dict):
        raise UpstreamError(
            "the upstream answered with a non-object", status=502, provider=provider
        )
    return parsed


class RemoteEmbedder:
    """Any OpenAI-compatible embeddings endpoint (OpenAI, Together, Mistral, vLLM, Ollama…)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        base_url: str,
        api_key: str,
        model: str,
        dimensions: int | None,
        max_input_tokens: int = 8191,
    ) -> None:
        self.http = http
        self.url = base_url.rstrip("/") + "/embeddings"
        self.api_key = api_key
        self.model = model
        self.dimensions = dimensions or 0
        self.max_input_tokens = max_input_tokens

    async def embed(self, texts: Sequence[str]) -> tuple[Matrix, int]:
        rows: list[Any] = []
        tokens = 0
        for start in range(0, len(texts), REMOTE_BATCH):
            batch = list(texts[start : start + REMOTE_BATCH])
            parsed = await _post(
                self.http,
                self.url,
                self.api_key,
                {"model": self.model, "input": batch, "encoding_format": "float"},
                "openai",
            )
            data = parsed.get("data")
            if not isinstance(data, list) or len(data) != len(batch):
                raise UpstreamError(
                    f"the upstream returned {len(data) if isinstance(data, list) else 'no'} "
                    f"embeddings for {len(batch)} inputs",
                    status=502,
                    provider="openai",
                )
            try:
                ordered = sorted(data, key=lambda item: int(item["index"]))
                rows.extend(np.asarray(item["embedding"], dtype=np.float32) for item in ordered)
            except (KeyError, TypeError, ValueError) as exc:
                raise UpstreamError(
                    f"the upstream's embeddings are malformed: {exc}", status=502, provider="openai"
                ) from exc
            usage = parsed.get("usage") or {}
            counted = usage.get("prompt_tokens") or usage.get("total_tokens")
            tokens += int(counted) if isinstance(counted, int) else sum(map(count_text, batch))
        if not rows:
            return np.zeros((0, self.dimensions), np.float32), 0
        widths = {row.shape[0] for row in rows}
        if len(widths) != 1 or (self.dimensions and widths != {self.dimensions}):
            raise UpstreamError(
                f"the upstream's embeddings have {sorted(widths)} dimensions, expected "
                f"{self.dimensions}",
                status=502,
                provider="openai",
            )
        return normalise(np.stack(rows)), tokens


class RemoteReranker:
    """A Cohere/Jina-style rerank endpoint: scores in [0, 1] per document."""

    def __init__(self, http: httpx.AsyncClient, *, url: str, api_key: str, model: str) -> None:
        self.http = http
        self.url = url
        self.api_key = api_key
        self.model = model

    async def rerank(self, query: str, documents: Sequence[str]) -> list[float]:
        parsed = await _post(
            self.http,
            self.url,
            self.api_key,
            {
                "model": self.model,
                "query": query,
                "documents": list(documents),
                "top_n": len(documents),
            },
            "rerank",
        )
        scores = [0.0] * len(documents)
        try:
            for item in parsed["results"]:
                scores[int(item["index"])] = float(item["relevance_score"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise UpstreamError(
                f"the reranker's answer is malformed: {json.dumps(parsed)[:200]}",
                status=502,
                provider="rerank",
            ) from exc
        return [min(max(score, 0.0), 1.0) for score in scores]
