"""Who may import whom (issue #13 item 6; the table is in docs/architecture.md, "Who may import
whom"). Read from the source with ``ast``, nothing is imported: every ``import`` statement of
swarm/ and simulations/ counts, those inside functions too (a lazy import is still a dependency;
the ones allowed for now are in KNOWN_VIOLATIONS, each with its reason)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
TREES = ("swarm", "simulations")

LIBP2P = ("libp2p", "multiaddr")
"""py-libp2p and the multiaddr package it brings."""

LOW = (
    "swarm.engine",
    "swarm.picker",
    "swarm.choker",
    "swarm.wire",
    "swarm.manifest",
    "swarm.discovery",
    "swarm.trust",
    "swarm.ratelimit",
    "swarm.store",
    "swarm.memlink",
    "swarm.cache_admin",
    "swarm.confine",
    "swarm.logfmt",
    "swarm.dynamo.card",
    "simulations",
)
"""The engine, the pure values and decisions, the store, and the simulator that drives them."""

CLIENT = (
    "swarm.client",
    "swarm.control_client",
    "swarm.delivery",
    "swarm.fetchapi",
    "swarm.fetchwire",
    "swarm.selection",
    "swarm.home",
    "swarm.config",
    "swarm.sources",
)
"""``import swarm; swarm.fetch(...)`` and what it uses: it talks to a running node over the control
socket, so it needs neither libp2p (~1 s and ~86 MB to import) nor the node."""

RULES: tuple[tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]], ...] = (
    # (why, importers, except importers, forbidden)
    ("only swarm/net imports libp2p", ("swarm", "simulations"), ("swarm.net",), LIBP2P),
    ("the engine, the pure parts and simulations stay off the network", LOW, (), ("swarm.net", "swarm.node")),
    ("the client path never needs libp2p or the node", CLIENT, (), ("swarm.net", "swarm.node")),
)

KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {
    ("swarm.client", "swarm.node"): "swarm.fetch starts an embedded node for the one fetch when no "
    "node runs (swarm.client._embedded). The import sits inside that function, so only that path "
    "pays for libp2p and the node; a fetch through a running node never loads them "
    "(test_the_client_path_loads_no_libp2p_at_import, tests/test_client.py)",
}
"""(importer, imported) pairs that break a rule today; a test fails once one no longer does."""


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(node: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """The modules one import statement names (``from swarm import wire`` names swarm.wire)."""
    if isinstance(node, ast.Import):
        yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            name = ".".join(base + ([node.module] if node.module else []))
        else:
            name = node.module or ""
        yield name
        yield from (f"{name}.{a.name}" for a in node.names if a.name != "*")


def _type_checking(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (its imports never run)."""
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(test)


@cache
def imports() -> dict[str, list[tuple[str, int, bool]]]:
    """module -> [(imported name, line, at module level)] for every module of TREES."""
    out: dict[str, list[tuple[str, int, bool]]] = {}
    for tree in TREES:
        for path in sorted((ROOT / tree).rglob("*.py")):
            module = _module_name(path)
            syntax = ast.parse(path.read_text(), str(path))
            top = {id(n) for n in syntax.body}
            top |= {
                id(c)
                for n in syntax.body
                if isinstance(n, (ast.If, ast.Try)) and not _type_checking(n)
                for c in ast.walk(n)
            }
            found = out.setdefault(module, [])
            for node in ast.walk(syntax):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    for name in _imported(node, module, path.name == "__init__.py"):
                        found.append((name, node.lineno, id(node) in top))
    return out


def violations() -> dict[tuple[str, str], list[str]]:
    """(importer, imported) -> what it breaks, for every import that breaks a rule."""
    out: dict[tuple[str, str], list[str]] = {}
    for module, found in imports().items():
        for why, importers, exempt, forbidden in RULES:
            if not _matches(module, importers) or _matches(module, exempt):
                continue
            for name, line, _top in found:
                if _matches(name, forbidden):
                    out.setdefault((module, name), []).append(f"line {line}: {why}")
    return out


def test_the_trees_are_scanned():
    found = imports()
    assert "swarm.client" in found and "simulations.sim" in found
    assert any(_matches(n, ("swarm.net",)) for n, _l, _t in found["swarm.origin"])  # a real edge
    assert any(_matches(n, LIBP2P) for m, f in found.items() if m.startswith("swarm.net") for n, *_ in f)


def test_who_may_import_whom():
    new = {
        f"{importer} imports {imported} ({'; '.join(sorted(set(r)))})"
        for (importer, imported), r in violations().items()
        if not any(
            importer == k_importer and _matches(imported, (k_imported,))
            for k_importer, k_imported in KNOWN_VIOLATIONS
        )
    }
    assert not new, "import walls broken (docs/architecture.md, 'Who may import whom'):\n" + "\n".join(
        sorted(new)
    )


def test_known_violations_are_not_stale():
    current = violations()
    stale = [
        f"{importer} -> {imported}"
        for importer, imported in KNOWN_VIOLATIONS
        if not any(i == importer and _matches(n, (imported,)) for i, n in current)
    ]
    assert not stale, "remove from KNOWN_VIOLATIONS (fixed): " + ", ".join(stale)


def test_the_client_path_loads_no_libp2p_at_import():
    """What ``import swarm.client`` runs (module-level imports, followed through swarm's own
    modules) reaches neither libp2p nor swarm.net nor swarm.node."""
    found = imports()
    seen: set[str] = set()
    todo = ["swarm", "swarm.client"]
    while todo:
        module = todo.pop()
        if module in seen or module not in found:
            continue
        seen.add(module)
        for name, _line, top in found[module]:
            if not top:
                continue
            parts = name.split(".")
            todo += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]  # parents run first
    off_limits = (*LIBP2P, "swarm.net", "swarm.node")
    leaks = sorted(f"{m}: {n}" for m in seen for n, _l, top in found[m] if top and _matches(n, off_limits))
    assert "swarm.control_client" in seen and not leaks, leaks
