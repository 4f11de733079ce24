"""The embedding models shipped inside PyPI packages, by the name a catalog model's
`upstream_model` gives them (provider `local_embedding`). The catalog checks names against this
list; `rag.embedders` loads them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LocalModelSpec:
    """One packaged embedding model; a catalog model's `upstream_model` names it."""

    name: str
    dimensions: int
    max_input_tokens: int


LOCAL_MODELS: dict[str, LocalModelSpec] = {
    "minilm-l6-int8": LocalModelSpec("minilm-l6-int8", 384, 256),
    "paraphrase-minilm-l3": LocalModelSpec("paraphrase-minilm-l3", 384, 128),
    "wordllama-l2-256": LocalModelSpec("wordllama-l2-256", 256, 512),
}
