"""Gateway templates: Jinja2 in an immutable sandbox with a budget (see `template_sandbox`).
Caller-supplied values are data passed to the template, never template source, and undefined
variables are errors that name themselves.

Variables: `now` (ISO 8601 in the gateway's timezone), `today`, `timezone`, `user` (the request's
`user`), `metadata` (the request's `metadata`), `variables` (the request's `aivax.variables`).

A render runs in a small thread pool, so the event loop never waits for it; a template that is
plain text, or only prints values and tests them, renders inline (no thread hop). Over its
budget, a render stops itself and fails its own call with a 400.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from jinja2 import Template, TemplateError, meta, nodes
from jinja2.exceptions import SecurityError

from aivax.errors import BadRequest
from aivax.gateways.template_sandbox import (
    DEFAULT_LIMITS,
    BudgetedEnvironment,
    TemplateLimits,
    TemplateTooExpensive,
    render_within,
)

__all__ = ["DEFAULT_LIMITS", "TemplateLimits", "check_template", "render", "template_context"]

_ENV = BudgetedEnvironment()
CALLER_VALUES = frozenset({"user", "metadata", "variables"})
# Nodes that only read and print values: a template made of them renders inline.
_INLINE_NODES = (
    nodes.Template, nodes.Output, nodes.TemplateData, nodes.Name, nodes.Getattr,
    nodes.Getitem, nodes.Const, nodes.If, nodes.CondExpr, nodes.Compare, nodes.Operand,
    nodes.And, nodes.Or, nodes.Not, nodes.Test,
)  # fmt: skip


class TemplateProblem(BadRequest):
    code = "invalid_template"


@dataclass(frozen=True, slots=True)
class Compiled:
    template: Template
    static: str | None  # the text, when the template has no code at all
    inline: bool  # cheap enough to render on the event loop
    reads_caller_values: bool


class _CompiledCache:
    """Compiled templates by source, shared by the event loop and the render threads."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[str, Compiled] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, source: str) -> Compiled | None:
        with self.lock:
            found = self.entries.get(source)
            if found is not None:
                self.entries.move_to_end(source)
            return found

    def put(self, source: str, compiled: Compiled) -> None:
        with self.lock:
            self.entries[source] = compiled
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)


_COMPILED = _CompiledCache(4_096)


@cache
def _render_pool() -> ThreadPoolExecutor:
    """A pool of its own: slow templates queue here, never in the loop's default executor
    (which also resolves host names)."""
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="aivax-template")


def compile_template(source: str, *, param: str) -> Compiled:
    """Compile (cached); a template that does not compile is a 400 `invalid_template`."""
    found = _COMPILED.get(source)
    if found is not None:
        return found
    try:
        tree = _ENV.parse(source)
        template = _ENV.from_string(tree)
    except TemplateError as exc:
        raise TemplateProblem(
            f"The template in {param!r} does not compile: {exc}.", param=param
        ) from None
    except (RecursionError, MemoryError, OverflowError, ValueError, TemplateTooExpensive) as exc:
        # e.g. parentheses nested thousands deep, or a literal too long to be a number.
        raise TemplateProblem(
            f"The template in {param!r} does not compile ({type(exc).__name__}: {exc}); "
            "simplify it.",
            param=param,
        ) from None
    compiled = Compiled(
        template=template,
        static=_static_text(tree),
        inline=all(isinstance(node, _INLINE_NODES) for node in tree.find_all(nodes.Node)),
        reads_caller_values=bool(meta.find_undeclared_variables(tree) & CALLER_VALUES),
    )
    _COMPILED.put(source, compiled)
    return compiled


def _static_text(tree: nodes.Template) -> str | None:
    parts: list[str] = []
    for node in tree.body:
        if not isinstance(node, nodes.Output):
            return None
        for child in node.nodes:
            if not isinstance(child, nodes.TemplateData):
                return None
            parts.append(child.data)
    return "".join(parts)


def _render_now(source: str, context: dict[str, Any], *, param: str, limits: TemplateLimits) -> str:
    compiled = compile_template(source, param=param)
    if compiled.static is not None:
        return compiled.static
    try:
        return render_within(compiled.template, context, limits)
    except TemplateTooExpensive as exc:
        raise TemplateProblem(
            f"The template {param!r} is too expensive to render: {exc}. Simplify it, or pass "
            "smaller values in `aivax.variables`.",
            param=param,
            code="template_too_expensive",
        ) from None
    except MemoryError:
        raise TemplateProblem(
            f"The template {param!r} is too expensive to render: it needs too much memory.",
            param=param,
            code="template_too_expensive",
        ) from None
    except Exception as exc:  # whatever the template's own code raises is its own failure
        raise TemplateProblem(
            f"The gateway template {param!r} could not be rendered: "
            f"{_describe(exc)}. Pass the variables it uses in `aivax.variables`.",
            param=param,
            code="template_render_failed",
        ) from None


def _describe(exc: Exception) -> str:
    if isinstance(exc, (TemplateError, SecurityError)):
        return str(exc)
    if isinstance(exc, RecursionError):
        return "it calls itself too deeply"
    return f"{type(exc).__name__}: {exc}"


async def render(
    source: str,
    context: dict[str, Any],
    *,
    param: str,
    limits: TemplateLimits = DEFAULT_LIMITS,
) -> str:
    """Render `source` within `limits`: inline when cheap, else in the template pool. Any
    failure is a 400: `template_too_expensive`, `template_render_failed`, `invalid_template`."""
    found = _COMPILED.get(source)
    if found is not None and (found.static is not None or found.inline):
        return _render_now(source, context, param=param, limits=limits)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        _render_pool(), lambda: _render_now(source, context, param=param, limits=limits)
    )


class _SampleValues(dict[str, Any]):
    """Stands in for `metadata` and `variables` at save time: any key reads as a short text."""

    def __missing__(self, key: str) -> str:
        return "sample"


def _sample_context(timezone: str) -> dict[str, Any]:
    context = template_context(timezone=timezone, user="sample-user", metadata=None, variables=None)
    return {**context, "metadata": _SampleValues(), "variables": _SampleValues()}


def _dry_run(source: str, *, param: str, timezone: str, limits: TemplateLimits) -> None:
    """Compile, then render once with sample values. Too expensive is refused whatever the
    values; another failure only when the template reads no caller value (then every call
    would fail the same way)."""
    compiled = compile_template(source, param=param)
    try:
        _render_now(source, _sample_context(timezone), param=param, limits=limits)
    except TemplateProblem as exc:
        if exc.instance_code == "template_too_expensive" or not compiled.reads_caller_values:
            raise TemplateProblem(exc.message, param=param) from None


async def check_template(
    source: str, *, param: str, timezone: str = "UTC", limits: TemplateLimits = DEFAULT_LIMITS
) -> None:
    """Refuse (400 `invalid_template`) a template that does not compile, or that fails or goes
    over its budget on sample values — at configuration time, off the event loop."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(
        _render_pool(),
        lambda: _dry_run(source, param=param, timezone=timezone, limits=limits),
    )


def zone(name: str, *, param: str = "config.timezone") -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise BadRequest(
            f"Unknown timezone {name!r} (use an IANA name like 'Europe/Paris').",
            param=param,
            code="invalid_timezone",
        ) from None


def template_context(
    *,
    timezone: str,
    user: str | None,
    metadata: dict[str, str] | None,
    variables: dict[str, Any] | None,
) -> dict[str, Any]:
    now = datetime.now(zone(timezone))
    return {
        "now": now.isoformat(timespec="seconds"),
        "today": now.date().isoformat(),
        "timezone": timezone,
        "user": user,
        "metadata": metadata or {},
        "variables": variables or {},
    }
