"""JSON Healing and schema checks: each corruption class, and the rule that healing never
returns a schema-valid document that differs from what the model meant."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from aivax.structured.healing import heal
from aivax.structured.schema import InvalidSchema, check_schema

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "score", "active", "tags"],
    "additionalProperties": False,
}
TARGET = {
    "name": "Ada Lovelace",
    "age": 36,
    "score": 9.5,
    "active": True,
    "tags": ["math", "poetry"],
}
VALIDATOR = check_schema(SCHEMA, param="response_schema")
CANONICAL = json.dumps(TARGET)


@pytest.mark.parametrize(
    ("text", "steps"),
    [
        (CANONICAL, []),
        (f"```json\n{CANONICAL}\n```", ["code_fence"]),
        (f"Sure! Here is the JSON:\n{CANONICAL}\nHope it helps!", ["surrounding_prose"]),
        (CANONICAL[:-1] + ",}", ["syntax"]),  # trailing comma
        (CANONICAL.replace('"', "'"), ["syntax"]),  # single quotes
        (CANONICAL.replace('"score"', '// a comment\n"score"'), ["syntax"]),
        (CANONICAL.replace("36", '"36"').replace("9.5", '"9.5"'), ["scalar_types"]),
        (CANONICAL.replace("true", '"true"'), ["scalar_types"]),
        (CANONICAL.replace("36", '"36.0"'), ["scalar_types"]),  # integral, as a string
    ],
)
def test_each_repairable_corruption_heals_to_the_target(text: str, steps: list[str]) -> None:
    result = heal(text, VALIDATOR)
    assert result.valid, result.errors
    assert result.document == TARGET
    assert result.steps == steps


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"name": "Ada Lov', "cut off"),
        ('{"name": "Ada Lovelace", "age": 3', "cut off"),
        (CANONICAL[:-1], "cut off"),  # even one missing brace: what came after is unknown
        (CANONICAL[:-20], "cut off"),
        ("I cannot help with that.", "not JSON"),
        (json.dumps({**TARGET, "age": "thirty-six"}), "age"),
        (json.dumps({k: v for k, v in TARGET.items() if k != "tags"}), "'tags' is a required"),
        (json.dumps({**TARGET, "extra": 1}), "Additional properties"),
    ],
)
def test_what_cannot_be_fixed_safely_is_reported_not_guessed(text: str, problem: str) -> None:
    result = heal(text, VALIDATOR)
    assert not result.valid
    assert any(problem in error for error in result.errors), result.errors


def test_truncation_at_any_point_never_yields_a_wrong_valid_document() -> None:
    rng = random.Random(20261125)  # seeded: the same cases every run
    wrong = healed = 0
    for _ in range(400):
        target = {
            "name": rng.choice(["Ada", "Grace Hopper", "Alan", "Katherine Johnson"]),
            "age": rng.randint(1, 120),
            "score": round(rng.uniform(0, 100), 2),
            "active": rng.choice([True, False]),
            "tags": rng.sample(["a", "bb", "ccc", "dddd", "e e"], rng.randint(0, 4)),
        }
        text = json.dumps(target)
        cut = text[: rng.randint(1, len(text))]
        result = heal(cut, VALIDATOR)
        if result.valid:
            healed += 1
            wrong += result.document != target
    assert wrong == 0
    assert healed > 0  # the full document (or one cut only at the brace) still heals


@pytest.mark.parametrize(
    ("schema", "fragment"),
    [
        ([], "must be an object"),
        ({"type": "objekt"}, "Invalid JSON Schema"),
        ({"properties": {"a": {"minimum": "zero"}}}, "properties/a/minimum"),
        ({"type": "object", "description": "x" * 70_000}, "bytes"),
    ],
)
def test_bad_schemas_are_refused_naming_the_problem(schema: Any, fragment: str) -> None:
    with pytest.raises(InvalidSchema) as error:
        check_schema(schema, param="response_schema")
    assert fragment in error.value.message
    assert error.value.param == "response_schema"


def test_deep_schemas_are_refused() -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    with pytest.raises(InvalidSchema, match="nests"):
        check_schema(deep, param="response_schema")


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "#/uniqueItems"),
        ({"type": "object", "patternProperties": {"^x": {}}}, "#/patternProperties"),
        ({"not": {"type": "string"}}, "#/not"),
        ({"type": "object", "if": {}, "then": {}}, "#/if"),
        (
            {"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}},
            "#/properties/a/$ref",
        ),
        (
            {"type": "object", "properties": {"mail": {"type": "string", "format": "email"}}},
            "#/properties/mail/format",
        ),
        ({"type": "number", "minimum": 0}, "#/minimum"),
        ({"type": "string", "pattern": "[a-z]+"}, "#/pattern"),
        ({"type": "object", "properties": {}, "anyOf": [{}]}, "#:"),
        ({"type": "array", "prefixItems": [{"type": "string"}]}, "#/prefixItems"),
    ],
)
def test_keywords_the_local_grammar_would_skip_are_named(schema: Any, where: str) -> None:
    from aivax.structured.grammar_support import problems

    found = problems(schema)
    assert any(problem.startswith(where) for problem in found), found


def test_schemas_the_local_grammar_supports_pass() -> None:
    from aivax.structured.grammar_support import problems

    supported = {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "age", "tags"],
        "properties": {
            "name": {
                "type": "string",
                "pattern": "^[A-Z].*$",
                "maxLength": 40,
                "description": "not: a keyword here, just text",
            },
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
            "kind": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "ref": {"$ref": "#/$defs/thing"},
        },
        "$defs": {"thing": {"type": "string", "format": "date"}},
    }
    assert problems(supported) == []
