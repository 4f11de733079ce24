"""The base of every request body: unknown fields refused, and JSON types taken as they are.

Pydantic's default (lax) mode turns `"5"` into 5, `"yes"` into True and `1` into True; an
OpenAI-compatible API answers those with a 400 naming the field (`invalid_type`), and a client
that sends them has a bug it should hear about. Strict mode keeps one coercion JSON needs: an
integer where a number is expected (`"temperature": 1`).

FastAPI validates a parsed body in Python mode, where strict mode would also refuse the strings
JSON carries ids, times and enumerations in: such fields are declared with `Lax` (`LaxUUID`).
"""

from __future__ import annotations

import uuid
from typing import Annotated

from pydantic import BaseModel, ConfigDict
from pydantic import Strict as StrictMode

Lax = StrictMode(False)
LaxUUID = Annotated[uuid.UUID, Lax]


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
