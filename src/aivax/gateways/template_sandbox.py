"""A Jinja2 sandbox whose renders stay within a budget.

Python cannot stop a thread, so the render stops itself: every way a template can loop or grow
a value goes through a counted step that checks the budget held in a context variable — `for`
loops (any iterable), calls (macros, methods, `range`), filters, the `+ * ** // %` operators and
`~`. A step is refused *before* it builds a value larger than the limit (a string repeated a
billion times, a huge integer, a padded field), and the deadline is checked at every step and
every chunk of output. What remains unbounded is one step on values that are already within the
limit (e.g. sorting the largest allowed list), which is why the limit is also a size.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from jinja2 import StrictUndefined, nodes
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.filters import FILTERS
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import _PassArg, pass_context


@dataclass(frozen=True, slots=True)
class TemplateLimits:
    """What one render may use. `value_chars` bounds every string, list or mapping a template
    builds (counting the items of nested ones), `items` the elements of one value; `work`
    bounds loop iterations plus the sizes of the values built."""

    milliseconds: int = 100
    output_chars: int = 1_000_000
    value_chars: int = 1_000_000
    work: int = 10_000_000
    range_items: int = 100_000
    items: int = 200_000
    int_bits: int = 4_096


DEFAULT_LIMITS = TemplateLimits()


class TemplateTooExpensive(Exception):
    """A render went over its budget (raised from inside the render, which stops it)."""


@dataclass(slots=True)
class Budget:
    limits: TemplateLimits
    deadline: float = 0.0
    work: int = 0
    output: int = 0
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.deadline = self.started + self.limits.milliseconds / 1000

    def charge(self, amount: int) -> None:
        self.work += amount
        if self.work > self.limits.work:
            raise TemplateTooExpensive(f"it takes more than {self.limits.work:,} steps")
        if time.monotonic() > self.deadline:
            raise TemplateTooExpensive(f"it runs longer than {self.limits.milliseconds} ms")

    def allow_size(self, size: int, what: str = "a value") -> None:
        if size > self.limits.value_chars:
            raise TemplateTooExpensive(
                f"it builds {what} of more than {self.limits.value_chars:,} characters or items"
            )

    def built(self, value: Any) -> None:
        """Charge for a value just built, and refuse it when it is too large."""
        if isinstance(value, int) and value.bit_length() > self.limits.int_bits:
            raise TemplateTooExpensive(
                f"it builds a number of more than {self.limits.int_bits} bits"
            )
        size = self.weigh(value)
        self.allow_size(size)
        self.charge(size)

    def weigh(self, value: Any) -> int:
        return weight(value, self.limits.value_chars, self.limits.items)

    def emitted(self, chunk: str) -> None:
        self.output += len(chunk)
        if self.output > self.limits.output_chars:
            raise TemplateTooExpensive(
                f"its output is longer than {self.limits.output_chars:,} characters"
            )
        self.charge(1)


_BUDGET: ContextVar[Budget | None] = ContextVar("template_budget", default=None)


def current_budget() -> Budget:
    budget = _BUDGET.get()
    if budget is None:  # every render sets one; compile-time folding never reaches here
        raise TemplateTooExpensive("it was rendered without a budget")
    return budget


def render_within(template: Any, context: Mapping[str, Any], limits: TemplateLimits) -> str:
    """Render `template` (from `budgeted_environment()`) within `limits`, in this thread."""
    budget = Budget(limits)
    token = _BUDGET.set(budget)
    try:
        chunks: list[str] = []
        for chunk in template.generate(context):
            budget.emitted(chunk)
            chunks.append(chunk)
        return "".join(chunks)
    finally:
        _BUDGET.reset(token)


_SIZED = (str, bytes, list, tuple, dict, set, frozenset, range)


_SCALARS = frozenset({int, float, bool, type(None)})


def _elements(items: Iterable[Any]) -> tuple[int, list[Any]]:
    """The weight of `items`' strings and scalars, and the elements still to weigh; the type
    scan and the string lengths run in C, which matters for lists of many thousand items."""
    items = list(items)
    kinds = set(map(type, items))
    if kinds <= _SCALARS:
        return len(items), []
    if kinds <= {str}:
        return len(items) + sum(map(len, items)), []
    return len(items), items


def weight(value: Any, limit: int, max_items: int = 200_000) -> int:
    """Characters and items in `value`, nested containers included (so a list of a million
    references to one long string weighs what it would print). Stops past `limit`, and past
    `max_items` elements in one container or `max_items` containers (then weighs more than
    `limit`), so weighing costs little whatever the value."""
    total, stack, seen = 0, [value], 0
    while stack and total <= limit:
        item = stack.pop()
        seen += 1
        if isinstance(item, (str, bytes, range)):
            total += len(item)
            continue
        if not isinstance(item, (dict, list, tuple, set, frozenset)):
            total += 1
            continue
        if seen > max_items or len(item) > max_items:
            return limit + 1
        for part in (item.keys(), item.values()) if isinstance(item, dict) else (item,):
            size, nested = _elements(part)
            total += size
            stack.extend(nested)
    return total


# --- operators -----------------------------------------------------------------------------

_PRINTF_FIELD = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_printf(budget: Budget, template: str) -> None:
    """`'%*d' % (10**9, 1)` or `'%999999999d' % 1` would pad before any check could run."""
    for width, precision in _PRINTF_FIELD.findall(template):
        for number in (width, precision):
            if number == "*":
                raise TemplateTooExpensive("it formats with a '*' width; write the width out")
            if number and (len(number) > 9 or int(number) > budget.limits.value_chars):
                budget.allow_size(budget.limits.value_chars + 1, "a formatted field")


def _check_repeat(budget: Budget, sequence: Any, times: Any) -> None:
    if isinstance(times, int) and isinstance(sequence, (str, list, tuple)):
        size = budget.weigh(sequence) * max(times, 0)
        budget.allow_size(size, "a repeated sequence")


def _check_power(budget: Budget, base: Any, exponent: Any) -> None:
    if not (isinstance(base, int) and isinstance(exponent, int)):
        return
    if exponent > 0 and abs(base) > 1 and base.bit_length() * exponent > budget.limits.int_bits:
        raise TemplateTooExpensive(f"it builds a number of more than {budget.limits.int_bits} bits")


def check_binop(budget: Budget, operator: str, left: Any, right: Any) -> None:
    """Refuse an operation whose result would be too large, before computing it."""
    if operator == "*":
        _check_repeat(budget, left, right)
        _check_repeat(budget, right, left)
        both_ints = isinstance(left, int) and isinstance(right, int)
        if both_ints and left.bit_length() + right.bit_length() > budget.limits.int_bits + 1:
            raise TemplateTooExpensive(
                f"it builds a number of more than {budget.limits.int_bits} bits"
            )
    elif operator == "**":
        _check_power(budget, left, right)
    elif operator == "+" and isinstance(left, (str, list, tuple)):
        budget.allow_size(budget.weigh(left) + budget.weigh(right))
    elif operator == "%" and isinstance(left, str):
        _check_printf(budget, left)


# --- filters and methods -------------------------------------------------------------------


def _materialized(budget: Budget, value: Any) -> Any:
    """Iterables (e.g. a `map` generator) as a list, counted item by item."""
    if isinstance(value, (str, list, tuple, dict)):
        return value
    items = []
    for item in value:
        budget.charge(1)
        items.append(item)
    return items


def _check_replace(budget: Budget, text: Any, old: Any, new: Any, count: Any = -1) -> None:
    if not (isinstance(text, str) and isinstance(old, str) and isinstance(new, str)):
        return
    hits = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    budget.allow_size(len(text) + hits * max(len(new) - len(old), 0), "a replaced string")


def _check_width(budget: Budget, width: Any) -> None:
    if isinstance(width, int):
        budget.allow_size(width, "a padded string")


def _check_indent(budget: Budget, text: Any, width: Any = 4, *_: Any, **__: Any) -> None:
    pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    lines = str(text).count("\n") + 1
    budget.allow_size(len(str(text)) + lines * pad, "an indented string")


def _check_wordwrap(budget: Budget, text: Any, *args: Any, **kwargs: Any) -> None:
    wrapstring = kwargs.get("wrapstring", args[2] if len(args) > 2 else None)
    extra = len(wrapstring) if isinstance(wrapstring, str) else 1
    budget.allow_size(len(str(text)) * (1 + extra), "a wrapped string")


def _check_join(budget: Budget, items: Any, separator: Any = "", *_: Any, **__: Any) -> None:
    gaps = max(len(items) - 1, 0) * (len(separator) if isinstance(separator, str) else 1)
    budget.allow_size(budget.weigh(items) + gaps, "a joined string")


def _check_sum(budget: Budget, items: Any, *args: Any, **kwargs: Any) -> None:
    start = kwargs.get("start", args[1] if len(args) > 1 else 0)
    if not isinstance(start, (int, float)):
        raise TemplateTooExpensive("it sums sequences; `sum` adds numbers only")


def _check_group_count(budget: Budget, items: Any, count: Any = 1, *_: Any, **__: Any) -> None:
    if isinstance(count, int):
        budget.allow_size(count, "a batch")


Precheck = Callable[..., None]
# Filters that can build far more than they are given, each with the check that runs first.
_FILTER_CHECKS: dict[str, Precheck] = {
    "center": lambda budget, text, width=80, *_, **__: _check_width(budget, width),
    "format": lambda budget, text, *_, **__: _check_printf(budget, str(text)),
    "replace": _check_replace,
    "indent": _check_indent,
    "wordwrap": _check_wordwrap,
    "join": _check_join,
    "sum": _check_sum,
    "batch": _check_group_count,
    "slice": _check_group_count,
}
# Filters that walk their whole input: given as a counted list.
_MATERIALIZE = frozenset(
    {"join", "list", "sort", "unique", "sum", "min", "max", "reverse", "batch", "slice", "groupby"}
)
# What templates may call on data (strings are the values that grow; none of these grows one
# beyond a size it was given, except `replace`, which is checked).
_SAFE_METHODS: dict[type, frozenset[str]] = {
    str: frozenset(
        {
            "lower",
            "upper",
            "title",
            "capitalize",
            "casefold",
            "swapcase",
            "strip",
            "lstrip",
            "rstrip",
            "split",
            "rsplit",
            "splitlines",
            "startswith",
            "endswith",
            "count",
            "find",
            "rfind",
            "index",
            "rindex",
            "partition",
            "rpartition",
            "removeprefix",
            "removesuffix",
            "replace",
            "isalnum",
            "isalpha",
            "isdigit",
            "isnumeric",
            "isdecimal",
            "isspace",
            "islower",
            "isupper",
            "istitle",
        }
    ),
    dict: frozenset({"keys", "values", "items", "get"}),
    list: frozenset({"index", "count"}),
    tuple: frozenset({"index", "count"}),
    int: frozenset(),
    float: frozenset(),
}


def _budgeted_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    pass_arg = _PassArg.from_obj(func)
    check = _FILTER_CHECKS.get(name)
    materialize = name in _MATERIALIZE

    # pass_context also keeps Jinja from calling the filter at compile time on constants.
    @pass_context
    def budgeted(context: Context, value: Any, *args: Any, **kwargs: Any) -> Any:
        budget = current_budget()
        budget.charge(1)
        if materialize:
            value = _materialized(budget, value)
        if check is not None:
            check(budget, value, *args, **kwargs)
        if pass_arg is _PassArg.context:
            result = func(context, value, *args, **kwargs)
        elif pass_arg is _PassArg.eval_context:
            result = func(context.eval_ctx, value, *args, **kwargs)
        elif pass_arg is _PassArg.environment:
            result = func(context.environment, value, *args, **kwargs)
        else:
            result = func(value, *args, **kwargs)
        budget.built(result)
        return result

    return budgeted


# --- the environment -----------------------------------------------------------------------


class _BudgetedCodeGenerator(CodeGenerator):
    """`~` and `for` go through the environment, where they are counted."""

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.budgeted_concat((")
        for argument in node.nodes:
            self.visit(argument, frame)
            self.write(", ")
        self.write("))")

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        if not getattr(node, "budgeted", False):
            node.iter = nodes.Call(
                nodes.EnvironmentAttribute("budgeted_iter"), [node.iter], [], None, None
            )
            node.budgeted = True  # type: ignore[attr-defined]
        super().visit_For(node, frame)


class BudgetedEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _BudgetedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "//", "%"})

    def __init__(self) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=False, finalize=_finalize)
        self.filters = {name: _budgeted_filter(name, func) for name, func in FILTERS.items()}
        self.globals.pop("lipsum", None)  # generates text of any length
        self.globals["range"] = self.budgeted_range

    def budgeted_range(self, *args: int) -> range:
        numbers = range(*args)
        if len(numbers) > current_budget().limits.range_items:
            raise TemplateTooExpensive(
                f"it asks for a range of {len(numbers):,} numbers "
                f"(at most {current_budget().limits.range_items:,})"
            )
        return numbers

    def budgeted_iter(self, iterable: Iterable[Any]) -> Iterator[Any]:
        budget = current_budget()
        for item in iterable:
            budget.charge(1)
            yield item

    def budgeted_concat(self, parts: tuple[Any, ...]) -> str:
        budget = current_budget()
        budget.allow_size(sum(budget.weigh(part) for part in parts), "a joined string")
        text = "".join(str(part) for part in parts)
        budget.built(text)
        return text

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = current_budget()
        budget.charge(1)
        check_binop(budget, operator, left, right)
        result = super().call_binop(context, operator, left, right)
        budget.built(result)
        return result

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = current_budget()
        budget.charge(1)
        if getattr(__obj, "__name__", None) == "replace":
            _check_replace(budget, getattr(__obj, "__self__", None), *args, **kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        budget.built(result)
        return result

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        for kind, allowed in _SAFE_METHODS.items():
            if isinstance(obj, kind) and callable(value):
                return attr in allowed
        return super().is_safe_attribute(obj, attr, value)

    def wrap_str_format(self, value: Any) -> None:
        """`str.format` pads to any width before a check could run: templates use `~`,
        the `format` filter or `%` instead."""
        return None


def _finalize(value: Any) -> Any:
    """Before `{{ value }}` is turned into text (also at compile time, for constants)."""
    budget = _BUDGET.get()
    limits = budget.limits if budget is not None else DEFAULT_LIMITS
    if weight(value, limits.output_chars, limits.items) > limits.output_chars:
        raise TemplateTooExpensive(
            f"it prints a value longer than {limits.output_chars:,} characters"
        )
    return value
