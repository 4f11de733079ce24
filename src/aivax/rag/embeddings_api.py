"""`POST /v1/embeddings`: the OpenAI request and response shapes, for the catalog's embedding
models (local and remote) and BYOK credentials; billed and rate-limited like chat."""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from aivax.auth.dependencies import PrivateCaller, Services
from aivax.errors import BadRequest
from aivax.inference import admission
from aivax.inference.errors import client_error
from aivax.inference.prepare import plan_and_model
from aivax.kit.money import micros_to_usd
from aivax.providers.base import UpstreamError
from aivax.rag import metering

router = APIRouter(prefix="/v1", tags=["embeddings"])

MAX_INPUTS = 2048
MAX_INPUT_CHARS = 100_000


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1, max_length=300)
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text or a list of texts (token arrays are not accepted)."
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1, le=8192)] | None = None
    user: str | None = Field(default=None, max_length=256)


def _texts(request: EmbeddingRequest) -> list[str]:
    raw: Any = request.input
    texts = [raw] if isinstance(raw, str) else raw
    if not texts:
        raise BadRequest("'input' must not be empty.", param="input")
    if not all(isinstance(text, str) for text in texts):
        raise BadRequest("Token arrays are not accepted; send the text itself.", param="input")
    if len(texts) > MAX_INPUTS:
        raise BadRequest(f"At most {MAX_INPUTS} inputs per request.", param="input")
    for index, text in enumerate(texts):
        if not text.strip():
            raise BadRequest(f"input[{index}] is empty.", param="input")
        if len(text) > MAX_INPUT_CHARS:
            raise BadRequest(
                f"input[{index}] is longer than {MAX_INPUT_CHARS} characters.", param="input"
            )
    return list(texts)


@router.post("/embeddings")
async def create_embeddings(
    body: EmbeddingRequest, principal: PrivateCaller, services: Services, request: Request
) -> JSONResponse:
    texts = _texts(body)
    limits, model = await plan_and_model(services.kernel, principal, body.model)
    admission.check_plan(principal, principal.plan_id, limits, model)
    native = model.options.get("dimensions")
    if body.dimensions is not None and native is not None and body.dimensions != native:
        raise BadRequest(
            f"{model.id!r} makes {native}-dimensional embeddings; 'dimensions' cannot change that.",
            param="dimensions",
            code="unsupported_parameter",
        )
    try:
        result = await metering.embed(
            services,
            principal.account_id,
            limits,
            model,
            texts,
            request_id=request.state.request_id,
            key_id=principal.key_id,
            rate_limit_for=principal,
        )
    except UpstreamError as exc:
        raise client_error(exc, model) from exc
    data = []
    for index, row in enumerate(result.vectors):
        vector = np.ascontiguousarray(row, dtype=np.float32)
        embedding: Any = (
            base64.b64encode(vector.tobytes()).decode()
            if body.encoding_format == "base64"
            else vector.tolist()
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    cost = result.cost_micros
    payload = {
        "object": "list",
        "data": data,
        "model": model.id,
        "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens},
        "aivax": {
            "cost_micros": cost,
            "cost_usd": micros_to_usd(cost) if cost is not None else None,
        },
    }
    headers = dict(result.headers)
    if cost is not None:
        headers["x-aivax-cost-micros"] = str(cost)
    return JSONResponse(payload, headers=headers)
