"""The model requests one API request makes, numbered.

A chat completion may call models more than once: a RAG strategy's rewrite or retrieval
decision, failed attempts before a fallback answered, structured-output re-asks. Each is
reserved, settled and logged on its own, and their request-log rows share the API request's id
with a `step` number, in the order they ended, so one request reads as one story in
`GET /v1/requests`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Steps:
    request_id: str
    taken: int = 0

    def next(self) -> int:
        self.taken += 1
        return self.taken
