"""JSON Healing: turn a model's almost-JSON into the schema-valid document it meant, or say
exactly why not. A wrong "fix" is worse than an error, so only repairs that cannot change a
value are made:

1. Syntax, locally (`json-repair`): code fences, prose around the document, trailing commas,
   single quotes, comments. A document that was cut off (brackets left open, an unterminated
   string, a value at the very end) is *not* repaired: closing it would silently drop whatever
   came after the cut — array items, keys, digits — so the caller re-asks instead.
2. Schema-aware scalar fixes: a number or boolean sent as a string where the schema wants a
   number or boolean, an integral float where it wants an integer. Nothing else is coerced.
3. Validation against the schema; what still fails is reported with its path.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import json_repair
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from aivax.kit.jsonlimits import MAX_JSON_DEPTH, JsonTooDeep, check_depth, depth_exceeds

FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)\n?\s*```", re.DOTALL)
NUMBER = re.compile(r"^\s*-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?\s*$")
MAX_FIX_ROUNDS = 20


@dataclass
class HealResult:
    document: Any
    valid: bool
    steps: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    raw: str = ""

    @property
    def repaired(self) -> bool:
        return bool(self.steps)


def _extract(text: str, steps: list[str]) -> str:
    fenced = FENCE.search(text)
    if fenced:
        steps.append("code_fence")
        text = fenced.group(1)
    stripped = text.strip()
    starts = [i for i in (stripped.find("{"), stripped.find("[")) if i >= 0]
    prose = False
    if starts and min(starts) > 0:
        prose, stripped = True, stripped[min(starts) :]
    end = max(stripped.rfind("}"), stripped.rfind("]"))
    tail = stripped[end + 1 :] if end >= 0 else ""
    if tail.strip() and not any(c in tail for c in '"{}[]:'):
        prose, stripped = True, stripped[: end + 1]
    if prose:
        steps.append("surrounding_prose")
    return stripped


def _cut_off(text: str) -> bool:
    """True when brackets are left open or the text ends inside a string or value."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char in "\"'":
                in_string = False
        elif char in "\"'":
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
    end = text.rstrip()
    return depth > 0 or in_string or (bool(end) and end[-1] not in "}]")


TOO_DEEP = f"the output is nested more than {MAX_JSON_DEPTH} levels deep"


def load_document(text: str) -> Any:
    """The model's JSON with the API's nesting limit (`JsonTooDeep` past it). The standard parser,
    not orjson: a model may write NaN or integers wider than 64 bits, which it accepts."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise JsonTooDeep(TOO_DEEP) from None
    check_depth(value)
    return value


def parse(text: str) -> tuple[Any, list[str], str | None]:
    """(value, steps, problem). `problem` is set when nothing trustworthy could be parsed."""
    steps: list[str] = []
    candidate = _extract(text, steps)
    try:
        return load_document(candidate), steps, None
    except JsonTooDeep:
        return None, steps, TOO_DEEP
    except json.JSONDecodeError:
        pass
    if not candidate.startswith(("{", "[")):
        return None, steps, "the output is not JSON"
    if _cut_off(candidate):
        return None, steps, "the output was cut off before the document ended"
    try:
        repaired, log = json_repair.repair_json(candidate, return_objects=True, logging=True)
    except (RecursionError, ValueError):  # json_repair's parser is recursive
        return None, steps, TOO_DEEP
    if depth_exceeds(repaired):
        return None, steps, TOO_DEEP
    if any("closing quote" in entry.get("text", "") for entry in log):
        return None, steps, "the output has an unterminated string"
    if repaired == "" or not isinstance(repaired, dict | list):
        return None, steps, "the output is not JSON"
    steps.append("syntax")
    return repaired, steps, None


def _scalar_fix(instance: Any, expected: str | list[str]) -> tuple[bool, Any]:
    """A replacement that cannot change meaning, if there is one."""
    types = [expected] if isinstance(expected, str) else list(expected)
    if isinstance(instance, str):
        text = instance.strip()
        if {"number", "integer"} & set(types) and NUMBER.match(text):
            number = json.loads(text)
            if "integer" in types and isinstance(number, float) and number.is_integer():
                return True, int(number)
            if "number" in types or isinstance(number, int):
                return True, number
        if "boolean" in types and text.lower() in ("true", "false"):
            return True, text.lower() == "true"
    if (
        "integer" in types
        and isinstance(instance, float)
        and instance.is_integer()
        and not isinstance(instance, bool)
    ):
        return True, int(instance)
    return False, instance


def _set(document: Any, path: list[Any], value: Any) -> Any:
    if not path:
        return value
    target = document
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return document


def _fix_scalars(document: Any, validator: Draft202012Validator) -> tuple[Any, bool]:
    changed = False
    for _ in range(MAX_FIX_ROUNDS):
        fixed_one = False
        for error in validator.iter_errors(document):
            if error.validator != "type":
                continue
            ok, value = _scalar_fix(error.instance, error.validator_value)
            if ok:
                document = _set(document, list(error.absolute_path), value)
                fixed_one = changed = True
                break  # paths may shift: validate again
        if not fixed_one:
            break
    return document, changed


def _describe(error: ValidationError) -> str:
    where = "/".join(str(part) for part in error.absolute_path) or "(root)"
    return f"{where}: {error.message}"


def heal(text: str, validator: Draft202012Validator) -> HealResult:
    """Parse, repair and validate `text`; never returns valid=True for a document that could
    differ from what the model meant."""
    value, steps, problem = parse(text)
    if problem is not None:
        return HealResult(None, False, steps, [problem], raw=text)
    value, coerced = _fix_scalars(value, validator)
    if coerced:
        steps.append("scalar_types")
    errors = sorted(_describe(e) for e in validator.iter_errors(value))
    return HealResult(value, not errors, steps, errors, raw=text)
