"""OpenAI-compatible chat completions over HTTP (OpenAI, Groq, Together, DeepSeek, Mistral,
OpenRouter, vLLM, Ollama, llama.cpp server, …).

A streamed call streams from upstream with `stream_options.include_usage`; a non-streamed call
asks for one JSON completion (cheaper on both ends), whose usage upstreams always report. Both
become the same events, so they share one post-processing path. SSE is parsed with
`httpx-sse`'s decoders (comments, keep-alives and multi-line `data:` fields); a stream that
ends without `[DONE]` is accepted; an upstream that ignores `stream` and answers with one JSON
body is accepted too. Connect errors, 429 and 5xx are retried with backoff — only before the
first byte. `timeout_seconds` bounds each silence: between two chunks of a stream, and the
whole generation of a non-streamed call.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

from aivax.kit import fastjson
from aivax.providers.base import (
    CONNECT_ERRORS,
    RETRYABLE_STATUSES,
    FinishEvent,
    ReasoningDelta,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    UpstreamError,
    UpstreamRequest,
    UsageEvent,
    transport_failure,
)
from aivax.providers.http import (
    ERROR_BODY_LIMIT,
    UpstreamHTTP,
    UpstreamResponse,
    sse_batches,
)

MAX_RETRY_AFTER_SECONDS = 5.0


def events_from_chunk(chunk: dict[str, Any]) -> list[StreamEvent]:
    """Translate one `chat.completion.chunk` (or a whole `chat.completion`) into events."""
    events: list[StreamEvent] = []
    for choice in chunk.get("choices") or ():
        if choice.get("index", 0) != 0:
            continue
        delta = choice.get("delta") or choice.get("message")
        if delta:
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                events.append(ReasoningDelta(reasoning))
            content = delta.get("content")
            if isinstance(content, str) and content:
                events.append(TextDelta(content))
            for position, call in enumerate(delta.get("tool_calls") or ()):
                function = call.get("function") or {}
                events.append(
                    ToolCallDelta(
                        index=call.get("index", position),
                        id=call.get("id"),
                        name=function.get("name"),
                        arguments=function.get("arguments") or "",
                    )
                )
        if choice.get("finish_reason"):
            events.append(FinishEvent(choice["finish_reason"]))
    usage = chunk.get("usage")
    if isinstance(usage, dict) and usage:
        events.append(usage_event(usage))
    return events


def usage_event(usage: dict[str, Any]) -> UsageEvent:
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return UsageEvent(
        input_tokens=int(usage.get("prompt_tokens") or 0),
        output_tokens=int(usage.get("completion_tokens") or 0),
        cached_input_tokens=int(prompt_details.get("cached_tokens") or 0),
        reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
    )


def retry_delay(attempt: int, headers: Mapping[str, str] | None) -> float:
    if headers is not None:
        retry_after = headers.get("retry-after")
        if retry_after and retry_after.replace(".", "", 1).isdigit():
            return min(float(retry_after), MAX_RETRY_AFTER_SECONDS)
    return float(min(0.25 * 2**attempt, MAX_RETRY_AFTER_SECONDS))


def error_message(status: int, body: str) -> str:
    try:
        parsed = json.loads(body)
        error = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    except (json.JSONDecodeError, AttributeError):
        pass
    return f"upstream answered HTTP {status}"


async def status_error(response: UpstreamResponse, provider: str) -> UpstreamError:
    """An HTTP error answer (status ≥ 400) as an UpstreamError: status, message, the start of
    the body and the headers (lower-case names)."""
    raw = (await response.read(ERROR_BODY_LIMIT)).decode("utf-8", "replace")[:4000]
    return UpstreamError(
        error_message(response.status, raw),
        status=response.status,
        provider=provider,
        body=raw,
        headers={k.lower(): v for k, v in response.headers.items()},
    )


class OpenAICompatProvider:
    name = "openai"

    def __init__(
        self, http: UpstreamHTTP, *, base_url: str, api_key: str, retries: int = 2
    ) -> None:
        self.http = http
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.authorization = f"Bearer {api_key}"
        self.retries = retries

    def _body(self, request: UpstreamRequest) -> bytes:
        if not request.stream:
            return fastjson.dumps({**request.body, "model": request.upstream_model})
        return fastjson.dumps(
            {
                **request.body,
                "model": request.upstream_model,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )

    async def stream(self, request: UpstreamRequest) -> AsyncIterator[StreamEvent]:
        body = self._body(request)
        accept = "text/event-stream" if request.stream else "application/json"
        headers = {"authorization": self.authorization, "accept": accept}
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                async with self.http.post(
                    self.url, headers=headers, body=body, timeout=request.timeout_seconds
                ) as response:
                    if response.status >= 400:
                        error = await status_error(response, self.name)
                        if not last and response.status in RETRYABLE_STATUSES:
                            await asyncio.sleep(retry_delay(attempt, response.headers))
                            continue
                        raise error
                    async for event in self._events(response):
                        yield event
                    return
            except CONNECT_ERRORS as exc:
                if not last:
                    await asyncio.sleep(retry_delay(attempt, None))
                    continue
                raise transport_failure(exc, self.name) from exc
            except (httpx.TimeoutException, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                raise transport_failure(exc, self.name) from exc

    async def _events(self, response: UpstreamResponse) -> AsyncIterator[StreamEvent]:
        content_type = response.headers.get("content-type", "")
        if "text/event-stream" not in content_type:
            # An upstream that ignored `stream`: one JSON completion.
            for event in events_from_chunk(self._parse(await response.read())):
                yield event
            return
        done = False
        # Read on to the end of the body after [DONE]: a body left unread cannot go back to
        # the keep-alive pool, and every call would open a new connection.
        async for events in sse_batches(response.chunks()):
            for _, data in events:
                if done:
                    continue
                text = data.strip()
                if text == "[DONE]":
                    done = True
                elif text:
                    for event in events_from_chunk(self._chunk(data)):
                        yield event

    def _chunk(self, data: str) -> dict[str, Any]:
        """One streamed chunk, or the upstream's error event raised."""
        chunk = self._parse(data)
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else str(error)
            raise UpstreamError(
                f"upstream stream error: {message}",
                status=502,
                provider=self.name,
                body=data[:4000],
                code="upstream_stream_error",
            )
        return chunk

    def _parse(self, raw: bytes | str) -> dict[str, Any]:
        try:
            parsed = fastjson.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UpstreamError(
                "the upstream sent invalid JSON",
                status=502,
                provider=self.name,
                body=(raw if isinstance(raw, str) else raw.decode("utf-8", "replace"))[:4000],
                code="upstream_bad_response",
            ) from exc
        if not isinstance(parsed, dict):
            raise UpstreamError(
                "the upstream sent an unexpected JSON value",
                status=502,
                provider=self.name,
                code="upstream_bad_response",
            )
        return parsed
