"""Gateway templates within a budget: runaway templates are refused on save when sample values
show it, otherwise fail only their own call with a 400; renders never hold up the event loop."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import httpx
import pytest

from aivax.gateways import templates
from aivax.gateways.template_sandbox import (
    BudgetedEnvironment,
    TemplateLimits,
    TemplateTooExpensive,
    render_within,
)
from aivax.services import AppServices
from tests.fixtures.assertions import assert_error
from tests.fixtures.factories import AccountWithKeys, make_account

NESTED_LOOPS = (
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}"
)
# Expensive only with the caller's values: accepted on save (samples read as 0).
CALLER_LOOPS = (
    "{% for i in range(variables.n|int) %}{% for j in range(variables.n|int) %}x"
    "{% endfor %}{% endfor %}"
)


@pytest.fixture
async def account(services: AppServices, fake_models: list[str]) -> AccountWithKeys:
    return await make_account(services, plan="starter", balance_micros=1_000_000)


async def _create(
    client: httpx.AsyncClient, account: AccountWithKeys, instruction: str
) -> httpx.Response:
    return await client.post(
        "/v1/gateways",
        headers=account.headers,
        json={
            "slug": f"tpl-{uuid.uuid4().hex[:8]}",
            "config": {"model": "test/fake-ok", "system_instruction": instruction},
        },
    )


async def _call(
    client: httpx.AsyncClient,
    account: AccountWithKeys,
    slug: str,
    variables: dict[str, Any],
    *,
    stream: bool = False,
) -> httpx.Response:
    return await client.post(
        "/v1/chat/completions",
        headers=account.headers,
        json={
            "model": slug,
            "stream": stream,
            "messages": [{"role": "user", "content": "hi"}],
            "aivax": {"variables": variables},
        },
    )


@pytest.mark.parametrize(
    "instruction",
    [
        NESTED_LOOPS,
        "{{ 1/0 }}",
        "{{ 10**5000 }}",
        "{{ 'a' * 10**9 }}",
        "{{ 'abc'|center(10**9) }}",
        "{{ '%999999999d' % 1 }}",
        "{{ ('a' * 100000)|replace('', 'xxxxxxxxxx') }}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}",
        "{{ '{:>999999999}'.format(1) }}",
        "{{ " + "(" * 5_000 + "1" + ")" * 5_000 + " }}",
    ],
)
async def test_a_template_that_fails_or_runs_away_is_refused_on_save(
    client: httpx.AsyncClient, account: AccountWithKeys, instruction: str
) -> None:
    started = time.perf_counter()
    response = await _create(client, account, "{{ today }} " + instruction)
    elapsed_ms = (time.perf_counter() - started) * 1000
    error = assert_error(response, 400, "invalid_template")
    assert error["param"] == "config.system_instruction", f"{error} ({elapsed_ms:.0f} ms)"


async def test_refused_on_update_too(client: httpx.AsyncClient, account: AccountWithKeys) -> None:
    created = await _create(client, account, "Hello")
    assert created.status_code == 201, created.text
    response = await client.patch(
        f"/v1/gateways/{created.json()['slug']}",
        headers=account.headers,
        json={"config": {"prompt_templates": [{"role": "user", "content": NESTED_LOOPS}]}},
    )
    error = assert_error(response, 400, "invalid_template")
    assert error["param"] == "config.prompt_templates.0.content"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_template_too_expensive_for_the_callers_values_fails_only_its_call(
    client: httpx.AsyncClient, account: AccountWithKeys, stream: bool
) -> None:
    created = await _create(client, account, CALLER_LOOPS)
    assert created.status_code == 201, created.text
    slug = created.json()["slug"]
    started = time.perf_counter()
    response = await _call(client, account, slug, {"n": 100_000}, stream=stream)
    elapsed_ms = (time.perf_counter() - started) * 1000
    error = assert_error(response, 400, "template_too_expensive")
    assert error["param"] == "config.system_instruction", f"stopped after {elapsed_ms:.0f} ms"
    assert (await _call(client, account, slug, {"n": 3})).status_code == 200
    wallet = (await client.get("/v1/wallet", headers=account.headers)).json()
    assert wallet["held_micros"] == 0


async def test_a_template_error_that_depends_on_the_callers_values_is_a_400(
    client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    created = await _create(client, account, "{{ 10 / (variables.d|int) }}")
    assert created.status_code == 201, created.text
    slug = created.json()["slug"]
    response = await _call(client, account, slug, {"d": 0})
    assert "ZeroDivisionError" in str(assert_error(response, 400, "template_render_failed"))
    assert (await _call(client, account, slug, {"d": 5})).status_code == 200


async def test_healthz_answers_while_a_template_renders(
    client: httpx.AsyncClient, account: AccountWithKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The render holds until /healthz has answered: rendered on the event loop, it would
    wait in vain (and the render would finish first)."""
    created = await _create(client, account, CALLER_LOOPS)
    assert created.status_code == 201, created.text
    rendering, healthz_answered = threading.Event(), threading.Event()
    order: list[str] = []
    original = templates._render_now

    def held_render(*args: Any, **kwargs: Any) -> str:
        rendering.set()
        healthz_answered.wait(timeout=5)
        try:
            return original(*args, **kwargs)
        finally:
            order.append("render finished")

    monkeypatch.setattr(templates, "_render_now", held_render)
    call = asyncio.create_task(_call(client, account, created.json()["slug"], {"n": 100_000}))
    await asyncio.get_running_loop().run_in_executor(None, rendering.wait, 5)
    health = await client.get("/healthz")
    order.append("healthz answered")
    healthz_answered.set()
    assert health.status_code == 200
    assert_error(await call, 400, "template_too_expensive")
    assert order == ["healthz answered", "render finished"]


async def test_plain_and_print_only_templates_render_without_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    context = templates.template_context(
        timezone="UTC", user="ann", metadata={"tier": "gold"}, variables={"shop": "Acme"}
    )
    sources = [
        "Plain text.",
        "{{ variables.shop }} for {{ user }}{% if metadata.tier %}!{% endif %}",
    ]
    for source in sources:
        templates.compile_template(source, param="p")

    def no_pool() -> None:
        raise AssertionError("rendered in the pool")

    monkeypatch.setattr(templates, "_render_pool", no_pool)
    assert await templates.render(sources[0], context, param="p") == "Plain text."
    assert await templates.render(sources[1], context, param="p") == "Acme for ann!"


@pytest.mark.parametrize(
    "source",
    [
        NESTED_LOOPS,
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{{ 'a' * 10**9 }}",
        "{{ '%*d' % (10**9, 1) }}",
        "{{ ('a' * 100000).replace('', 'xxxxxxxxxx') }}",
        "{% set ns = namespace(s=[1]) %}{% for i in range(64) %}"
        "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
        "{{ (['x' * 100000] * 1000)|join }}",
        "{{ range(10**9)|list|length }}",
        "{{ 'x'|indent(10**9) }}",
        "{{ 'a b c'|wordwrap(1, wrapstring='y' * 10**6) }}",
        "{{ [[1], [2]]|sum(start=[]) }}",
        "{{ [1]|batch(10**9, 'x')|list }}",
        "{{ 2 ** 100000 }}",
        "{{ variables.text * 1000 }}",
        "{% for c in variables.text %}{% for d in variables.text %}.{% endfor %}{% endfor %}",
    ],
)
def test_every_way_to_loop_or_grow_is_counted(source: str) -> None:
    template = BudgetedEnvironment().from_string(source)
    started = time.perf_counter()
    with pytest.raises(TemplateTooExpensive) as refused:
        render_within(template, {"variables": {"text": "x" * 20_000}}, TemplateLimits())
    elapsed_ms = (time.perf_counter() - started) * 1000
    print(f"{source[:50]!r}: stopped after {elapsed_ms:.1f} ms ({refused.value})")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{% for c in 'abc' %}{{ loop.index }}{{ c }}{% endfor %}", "1a2b3c"),
        ("{{ 'a' ~ 'b' }} {{ [1, 2, 3]|sum }} {{ '%s-%03d' % ('x', 7) }}", "ab 6 x-007"),
        ("{{ range(3)|map('string')|join(',') }} {{ 'Hi'|center(6) }}|", "0,1,2   Hi  |"),
        ("{{ variables.text.upper().replace('X', 'y') }}", "yy"),
        ("{% for k, v in variables|dictsort %}{{ k }}={{ v }};{% endfor %}", "text=xx;"),
    ],
)
def test_ordinary_templates_render_as_before(source: str, expected: str) -> None:
    template = BudgetedEnvironment().from_string(source)
    assert render_within(template, {"variables": {"text": "xx"}}, TemplateLimits()) == expected
