"""Layers import downward only (docs/architecture.md).

An AST walk over `src/aivax/` reads every import (at module level, inside functions, under
`TYPE_CHECKING`: a type-only import is still a dependency) and checks it against the layer of
each side. The unit of the rule is a top-level package (`aivax.wallet`, `aivax.rag`) or
module (`aivax.app`), except that endpoint modules — the HTTP (and MCP) surface of a domain,
which live beside its service — belong to the entry layer, each on its own. So does the HTTP
plumbing of authentication (`auth.dependencies`, the FastAPI dependencies every endpoint
declares, among them the container itself as `Services`; `auth.middleware`, the ASGI middleware
that reads the app's container from the scope): only endpoints and the app use them, and their
job is to hand the container to the HTTP surface, while the rest of `auth` (operator tokens)
stays in the domain layer.

The test fails on
- an import from a lower layer into a higher one that is not in `ALLOWED_UPWARD`;
- a cycle between units (edges in `ALLOWED_UPWARD` aside: they are the known debt);
- a module whose package has no layer in `LAYERS` (a new package must be placed);
- an entry in `ALLOWED_UPWARD` that no longer occurs (remove it: the list only shrinks).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "aivax"

BASE, DATA, DOMAIN, KERNEL, FEATURES, ENTRY = range(6)

LAYERS: dict[str, int] = {
    # no business rules
    "__init__": BASE,  # the package's version
    "kit": BASE,
    "errors": BASE,
    "config": BASE,
    "metrics": BASE,  # recorders every layer is given; its endpoint module is an entry
    # persistence
    "models": DATA,
    "db": DATA,
    "migrations": DATA,
    "migrate": DATA,
    # money, upstreams, the catalog, identity and limits, background and sandboxed work
    "wallet": DOMAIN,
    "providers": DOMAIN,
    "catalog": DOMAIN,
    "accounts": DOMAIN,
    "keys": DOMAIN,
    "plans": DOMAIN,
    "auth": DOMAIN,
    "jobs": DOMAIN,
    "sandbox": DOMAIN,
    # the call kernel
    "inference": KERNEL,
    # features that plug into the kernel
    "gateways": FEATURES,
    "rag": FEATURES,
    "structured": FEATURES,
    "tools": FEATURES,
    "skills": FEATURES,
    "workers": FEATURES,
    "chat_clients": FEATURES,
    "batch": FEATURES,
    "schedules": FEATURES,
    "media": FEATURES,
    # entry points and the composition root
    "admin": ENTRY,
    "app": ENTRY,
    "cli": ENTRY,
    "__main__": ENTRY,
    "services": ENTRY,
    "caches": ENTRY,
    "health": ENTRY,
    "bootstrap": ENTRY,
    "bodyguard": ENTRY,
    "handlers": ENTRY,
    "openapi": ENTRY,
    "web": ENTRY,
}

# Endpoint modules that are not named `endpoints.py`, and the HTTP plumbing they declare.
ENDPOINT_MODULES = {"aivax.inference.route", "aivax.rag.embeddings_api", "aivax.rag.mcp_server"}
HTTP_PLUMBING = {"aivax.auth.dependencies", "aivax.auth.middleware"}

# (importing module, imported unit): why the upward import is still there. Empty: a lower
# layer takes the collaborators it uses (a small Protocol that `services.AppServices` satisfies,
# as in `rag/deps.py`), and the kernel reaches features through registered extensions.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    base = ROOT.parent / relative
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports(path: Path, name: str) -> Iterator[str]:
    """The aivax modules `path` (module `name`) imports, resolved to modules where the name
    after `from … import` is a submodule."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "aivax")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            if source.split(".")[0] != "aivax":
                continue
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                yield candidate if is_module(candidate) else source


def unit_of(module: str) -> str:
    """The unit a module belongs to: an endpoint (or HTTP plumbing) module on its own, else its
    top package."""
    parts = module.split(".")
    if module in ENDPOINT_MODULES | HTTP_PLUMBING or (len(parts) > 2 and parts[-1] == "endpoints"):
        return module
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(unit: str) -> int | None:
    if unit.startswith("aivax."):
        return ENTRY
    return LAYERS.get(unit)


def scan() -> tuple[dict[tuple[str, str], list[str]], list[str], set[tuple[str, str]]]:
    """Upward imports (module, unit) → the modules imported; modules with no layer; and the
    edges between units that are not allowed upward imports."""
    upward: dict[tuple[str, str], list[str]] = defaultdict(list)
    unplaced: list[str] = []
    edges: set[tuple[str, str]] = set()
    for path in sorted(ROOT.rglob("*.py")):
        name = module_name(path)
        source = unit_of(name)
        if layer_of(source) is None:
            unplaced.append(name)
            continue
        for target_module in imports(path, name):
            target = unit_of(target_module)
            if target == source:
                continue
            source_layer, target_layer = layer_of(source), layer_of(target)
            if target_layer is None:
                unplaced.append(target_module)
                continue
            assert source_layer is not None
            key = (name, target)
            if target_layer > source_layer:
                upward[key].append(target_module)
            if key not in ALLOWED_UPWARD:
                edges.add((source, target))
    return upward, unplaced, edges


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected groups of more than one unit (Tarjan)."""
    graph: dict[str, list[str]] = defaultdict(list)
    for source, target in edges:
        graph[source].append(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer() -> None:
    _, unplaced, _ = scan()
    assert not unplaced, f"place these packages in LAYERS: {sorted(set(unplaced))}"


def test_no_import_goes_up_a_layer() -> None:
    upward, _, _ = scan()
    new = {key: sorted(set(found)) for key, found in upward.items() if key not in ALLOWED_UPWARD}
    assert not new, f"imports from a lower layer into a higher one: {new}"


def test_the_allowlist_has_no_stale_entry() -> None:
    upward, _, _ = scan()
    stale = sorted(key for key in ALLOWED_UPWARD if key not in upward)
    assert not stale, f"these upward imports are gone; remove them from ALLOWED_UPWARD: {stale}"


def test_no_import_cycle_between_packages() -> None:
    _, _, edges = scan()
    assert not cycles(edges), f"import cycles between units: {cycles(edges)}"


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    """The walk resolves `from package import submodule` and function-local imports, and the
    cycle finder finds a cycle through three units."""
    module = tmp_path / "probe.py"
    module.write_text(
        "def late():\n    from aivax.wallet import meter\n    from aivax import services\n"
    )
    found = list(imports(module, "aivax.kit.probe"))
    assert found == ["aivax.wallet.meter", "aivax.services"]
    assert unit_of("aivax.rag.endpoints") == "aivax.rag.endpoints"
    assert unit_of("aivax.wallet.meter") == "wallet"
    assert unit_of("aivax.auth.middleware") == "aivax.auth.middleware"
    assert unit_of("aivax.auth.operator_tokens") == "auth"
    assert cycles({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == [["a", "b", "c"]]
