"""What llama.cpp's JSON-Schema-to-grammar conversion cannot enforce.

Local GGUF models decode under a grammar built from the schema, and the converter *silently
skips* what it does not support (llama.cpp `grammars/README.md`, "known limitations" and
"unsupported features"). A schema that relies on one of these would look enforced but not be,
so it is refused up front, naming the keyword and where it is:

- `patternProperties`, `uniqueItems`, `contains`/`minContains`/`maxContains`, `$anchor`, `not`,
  `if`/`then`/`else`, `dependentSchemas`; `prefixItems` (documented as broken);
- remote `$ref`s (only `#…` references are resolved);
- `format` `uri` and `email`;
- `minimum`/`maximum`/`exclusiveMinimum`/`exclusiveMaximum` on `number` (integers only);
- `pattern`s that do not start with `^` and end with `$`;
- `properties` together with `anyOf`/`oneOf` in the same schema.
"""

from __future__ import annotations

from typing import Any

from aivax.errors import BadRequest

UNSUPPORTED = (
    "patternProperties",
    "uniqueItems",
    "contains",
    "minContains",
    "maxContains",
    "$anchor",
    "not",
    "if",
    "then",
    "else",
    "dependentSchemas",
    "prefixItems",
)
NUMBER_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
# Keywords whose values are data, not subschemas: never walked into.
DATA_KEYWORDS = ("const", "enum", "default", "examples", "description", "title", "$comment")


class UnsupportedSchemaKeyword(BadRequest):
    code = "unsupported_schema_keyword"


def problems(schema: Any, path: str = "#") -> list[str]:
    """Every keyword in `schema` the local grammar would skip, as 'path: reason'."""
    if isinstance(schema, list):
        return [p for i, item in enumerate(schema) for p in problems(item, f"{path}/{i}")]
    if not isinstance(schema, dict):
        return []
    found = [
        f"{path}/{key}: not supported by grammar-constrained decoding"
        for key in UNSUPPORTED
        if key in schema
    ]
    ref = schema.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        found.append(f"{path}/$ref: remote references are not supported")
    if schema.get("format") in ("uri", "email"):
        found.append(f"{path}/format: {schema['format']!r} is not supported")
    if schema.get("type") == "number":
        found += [
            f"{path}/{key}: bounds are only supported on integers"
            for key in NUMBER_BOUNDS
            if key in schema
        ]
    pattern = schema.get("pattern")
    if isinstance(pattern, str) and not (pattern.startswith("^") and pattern.endswith("$")):
        found.append(f"{path}/pattern: must start with '^' and end with '$'")
    if "properties" in schema and ("anyOf" in schema or "oneOf" in schema):
        found.append(f"{path}: 'properties' cannot be combined with anyOf/oneOf")
    for key, value in schema.items():
        if key not in DATA_KEYWORDS:
            found += problems(value, f"{path}/{key}")
    return found


def check(schema: Any, *, param: str) -> None:
    found = problems(schema)
    if found:
        raise UnsupportedSchemaKeyword(
            "The local model cannot enforce this schema: "
            + "; ".join(found[:10])
            + ". Simplify the schema or use a model with native JSON-schema support.",
            param=param,
        )
