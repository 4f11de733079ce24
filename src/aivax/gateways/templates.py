"""Gateway templates: Jinja2 in an immutable sandbox. Caller-supplied values are data passed to
the template, never template source, and undefined variables are errors that name themselves.

Variables: `now` (ISO 8601 in the gateway's timezone), `today`, `timezone`, `user` (the request's
`user`), `metadata` (the request's `metadata`), `variables` (the request's `aivax.variables`).
"""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from jinja2 import StrictUndefined, Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from aivax.errors import BadRequest

_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


class TemplateProblem(BadRequest):
    code = "invalid_template"


@lru_cache(maxsize=4_096)
def compile_template(source: str) -> Template:
    return _ENV.from_string(source)


def check_template(source: str, *, param: str) -> None:
    """Refuse a template that does not compile (at configuration time)."""
    try:
        compile_template(source)
    except TemplateError as exc:
        raise TemplateProblem(
            f"The template in {param!r} does not compile: {exc}.", param=param
        ) from None


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


def render(source: str, context: dict[str, Any], *, param: str) -> str:
    try:
        return compile_template(source).render(context)
    except TemplateError as exc:
        raise TemplateProblem(
            f"The gateway template {param!r} could not be rendered: {exc}. Pass the variables it "
            "uses in `aivax.variables`.",
            param=param,
            code="template_render_failed",
        ) from None
