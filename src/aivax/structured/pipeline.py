"""Structured output in the chat pipeline.

- `response_schema` (AIVAX field, or a gateway's `json_schema` section): the model is asked for
  JSON natively where it can be (OpenAI-compatible models that support json_schema, and local
  GGUF models, whose json_schema is grammar-constrained decoding), by instruction otherwise; the
  answer is healed and validated, and re-asked up to `max_attempts` times (each attempt a full,
  billed and logged call); final failure is 422 `json_validation_failed`.
- `response_format` json_schema/json_object: passed to the provider; healed only when the
  account's `json_healing_for_response_format` setting is on.
- `json_only`: the response body is the document itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator

from aivax.catalog.service import ResolvedModel
from aivax.errors import AppError, BadRequest
from aivax.gateways.schemas import GatewayConfig, JsonSchemaSettings
from aivax.inference.extensions import CallView, CheckedOutput
from aivax.inference.schemas import ChatCompletionRequest
from aivax.kit.jsonlimits import JsonTooDeep
from aivax.structured import grammar_support
from aivax.structured.healing import TOO_DEEP, HealResult, heal, load_document
from aivax.structured.schema import check_schema

DEFAULT_ATTEMPTS = 2
INSTRUCTION = (
    "Reply with only a JSON document that matches this JSON Schema, with no prose and no code "
    "fences:\n"
)
RAW_LIMIT = 2_000


class JsonValidationFailed(AppError):
    status = 422
    code = "json_validation_failed"


@dataclass(frozen=True)
class StructuredPlan:
    """The kernel's output plan for a call that wants JSON."""

    schema: dict[str, Any]
    validator: Draft202012Validator
    source: str  # "response_schema" | "response_format"
    heal: bool
    max_attempts: int

    def check(self, text: str) -> HealResult:
        return check(self, text)

    def reask(self, messages: list[dict[str, Any]], checked: CheckedOutput) -> list[dict[str, Any]]:
        return reask(messages, checked.raw, checked.errors)

    def failure(self, checked: CheckedOutput) -> JsonValidationFailed:
        return failure(checked)

    def report(self, checked: CheckedOutput, attempts: int) -> dict[str, Any]:
        return healing_report(checked, attempts)


class StructuredOutput:
    """The kernel's output processor: plans, shapes and checks structured output."""

    def prepare(self, call: CallView, body: dict[str, Any]) -> StructuredPlan | None:
        request, model = call.request, call.model
        config = call.gateway.settings if call.gateway is not None else None
        plan = plan_for(
            request,
            heal_response_format=call.caller.principal.json_healing_for_response_format,
            gateway_settings=config.json_schema if isinstance(config, GatewayConfig) else None,
        )
        if model.provider == "local_gguf":  # grammar-constrained: refuse what it cannot enforce
            for param, schema in requested_schemas(request):
                grammar_support.check(schema, param=param)
        if plan is not None:
            apply(plan, model, body)
        return plan


def plan_for(
    request: ChatCompletionRequest,
    *,
    heal_response_format: bool,
    gateway_settings: JsonSchemaSettings | None,
) -> StructuredPlan | None:
    response_format = request.response_format
    wants_format = response_format is not None and response_format.type != "text"
    if request.json_only and request.tools:
        raise BadRequest(
            "json_only returns one JSON document; it cannot be combined with tools.",
            param="json_only",
        )
    if request.response_schema is not None:
        if wants_format:
            raise BadRequest(
                "Give either response_schema or response_format, not both.", param="response_schema"
            )
        validator = check_schema(request.response_schema, param="response_schema")
        attempts = gateway_settings.max_attempts if gateway_settings else DEFAULT_ATTEMPTS
        healing = gateway_settings.healing if gateway_settings else True
        return StructuredPlan(
            request.response_schema, validator, "response_schema", healing, attempts
        )
    schema: dict[str, Any] | None = None
    if response_format is not None and response_format.type == "json_schema":
        if response_format.json_schema is None or response_format.json_schema.schema_ is None:
            raise BadRequest(
                "response_format json_schema needs json_schema.schema.",
                param="response_format.json_schema",
            )
        schema = response_format.json_schema.schema_
        validator = check_schema(schema, param="response_format.json_schema.schema")
    elif response_format is not None and response_format.type == "json_object":
        schema = {"type": "object"}
        validator = Draft202012Validator(schema)
    if request.json_only and schema is None:
        raise BadRequest(
            "json_only needs response_schema or a JSON response_format.", param="json_only"
        )
    if schema is None or not (heal_response_format or request.json_only):
        return None
    return StructuredPlan(
        schema,
        validator,
        "response_format",
        heal_response_format,
        DEFAULT_ATTEMPTS if heal_response_format else 0,
    )


def requested_schemas(request: ChatCompletionRequest) -> list[tuple[str, dict[str, Any]]]:
    """The schemas a request asks the model to follow, with the parameter each came in."""
    found: list[tuple[str, dict[str, Any]]] = []
    if request.response_schema is not None:
        found.append(("response_schema", request.response_schema))
    response_format = request.response_format
    if (
        response_format is not None
        and response_format.json_schema is not None
        and response_format.json_schema.schema_ is not None
    ):
        found.append(("response_format.json_schema.schema", response_format.json_schema.schema_))
    return found


def apply(plan: StructuredPlan, model: ResolvedModel, body: dict[str, Any]) -> None:
    """Ask the model for JSON: natively when it can, by instruction otherwise."""
    if plan.source != "response_schema":
        return
    native = model.provider == "local_gguf" or (
        model.provider == "openai" and model.supports_json_schema
    )
    if native:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "response", "schema": plan.schema},
        }
    else:
        instruction = {"role": "system", "content": INSTRUCTION + json.dumps(plan.schema)}
        body["messages"] = [instruction, *body["messages"]]


def check(plan: StructuredPlan, text: str) -> HealResult:
    if plan.heal:
        return heal(text, plan.validator)
    try:
        document = load_document(text)
    except JsonTooDeep:
        return HealResult(None, False, [], [TOO_DEEP], raw=text)
    except json.JSONDecodeError:
        return HealResult(None, False, [], ["the output is not JSON"], raw=text)
    errors = sorted(error.message for error in plan.validator.iter_errors(document))
    return HealResult(document, not errors, [], errors, raw=text)


def reask(messages: list[dict[str, Any]], raw: str, errors: list[str]) -> list[dict[str, Any]]:
    """The conversation for a re-ask: the bad answer and what was wrong with it."""
    return [
        *messages,
        {"role": "assistant", "content": raw[:RAW_LIMIT] or "(empty)"},
        {
            "role": "user",
            "content": "That answer is not valid JSON for the required schema: "
            + "; ".join(errors[:10])
            + ". Reply with only the corrected JSON document.",
        },
    ]


def failure(result: CheckedOutput) -> JsonValidationFailed:
    return JsonValidationFailed(
        "The model did not produce JSON matching the schema: "
        + "; ".join(result.errors[:10])
        + f". Last output: {result.raw[:RAW_LIMIT]!r}",
        param="response_schema",
    )


def healing_report(result: CheckedOutput, attempts: int) -> dict[str, Any]:
    return {
        "repaired": result.repaired,
        "steps": result.steps,
        "attempts": attempts,
        "valid": result.valid,
    }
