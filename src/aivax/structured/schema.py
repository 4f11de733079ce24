"""Schemas are checked when a request arrives: valid JSON Schema 2020-12, within size and depth
limits. A bad schema is a 400 naming the problem, before any money or model is involved."""

from __future__ import annotations

import json
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from aivax.errors import BadRequest

MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32


class InvalidSchema(BadRequest):
    code = "invalid_schema"


def _depth(value: Any, level: int = 0) -> int:
    if isinstance(value, dict):
        return max([_depth(v, level + 1) for v in value.values()], default=level + 1)
    if isinstance(value, list):
        return max([_depth(v, level + 1) for v in value], default=level + 1)
    return level


def check_schema(schema: Any, *, param: str) -> Draft202012Validator:
    """A validator for `schema`, or a 400 saying what is wrong with it."""
    if not isinstance(schema, dict):
        raise InvalidSchema("A JSON schema must be an object.", param=param)
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_BYTES:
        raise InvalidSchema(
            f"The schema is {size} bytes; the limit is {MAX_SCHEMA_BYTES}.", param=param
        )
    depth = _depth(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise InvalidSchema(
            f"The schema nests {depth} levels deep; the limit is {MAX_SCHEMA_DEPTH}.", param=param
        )
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(part) for part in exc.absolute_path) or "(root)"
        raise InvalidSchema(
            f"Invalid JSON Schema at {where}: {exc.message}.", param=param
        ) from None
    return Draft202012Validator(schema)
