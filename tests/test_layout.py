"""The package layout's rules (docs/design.md, "Layout"), read from every module's imports.

Every ``import`` and ``from ... import`` in ``swapd/`` counts, at any depth: a lazy import
inside a function or one under ``TYPE_CHECKING`` ties two modules as much as one at the
top. A part is a subpackage (``swapd.core``) or a top-level module (``swapd.errors``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import attrs

import swapd.core

ROOT = Path(__file__).resolve().parent.parent
SWAPD = ROOT / "swapd"

LAYERS: dict[str, set[str]] = {
    # part: the parts it may import (beyond itself)
    "swapd.errors": set(),
    "swapd.config": {"swapd.errors"},
    "swapd.estimate": {"swapd.errors", "swapd.config"},
    "swapd.net": {"swapd.errors", "swapd.config"},
    "swapd.core": {"swapd.errors", "swapd.config", "swapd.estimate", "swapd.net"},
    "swapd.observe": {"swapd.errors", "swapd.config", "swapd.core"},
    "swapd.http": {"swapd.errors", "swapd.config", "swapd.estimate", "swapd.net", "swapd.core",
                   "swapd.observe", "swapd"},
    "swapd.serve": {"swapd.errors", "swapd.config", "swapd.core", "swapd.http", "swapd.observe",
                    "swapd.net"},
    "swapd.cli": {"swapd.errors", "swapd.config", "swapd.estimate", "swapd.core", "swapd.http",
                  "swapd.serve"},
    "swapd.__main__": {"swapd.cli"},
    "swapd": set(),  # __init__: the version
}
"""Bottom to top. ``swapd.http`` reads ``swapd.__version__``."""

FRONT = ("swapd.http", "swapd.observe")
"""Parts that reach the core only through ``swapd.core``'s face (its ``__all__``)."""


@attrs.frozen
class Import:
    module: str  # the importing module
    target: str  # the module imported (for ``from X import name``: X, or X.name if a module)
    names: tuple[str, ...]  # the names taken (empty for ``import X``)
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(SWAPD.rglob("*.py"))}


def part_of(module: str) -> str:
    pieces = module.split(".")
    if len(pieces) == 1:
        return "swapd"
    return ".".join(pieces[:2])


def imports() -> Iterator[Import]:
    for module, path in MODULES.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "swapd":
                        yield Import(module, alias.name, (), node.lineno)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                if base.split(".")[0] != "swapd":
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    target = sub if sub in MODULES else base
                    yield Import(module, target, () if sub in MODULES else (alias.name,),
                                 node.lineno)


IMPORTS = list(imports())


def graph(key: object) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for imp in IMPORTS:
        source, target = key(imp.module), key(imp.target)  # type: ignore[operator]
        if source != target:
            edges.setdefault(source, set()).add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def where(imp: Import) -> str:
    return f"{MODULES[imp.module].relative_to(ROOT)}:{imp.line} imports {imp.target}"


def test_every_module_is_in_a_known_part() -> None:
    assert {part_of(m) for m in MODULES} <= set(LAYERS)


def test_each_part_imports_only_the_parts_below_it() -> None:
    wrong = [where(imp) for imp in IMPORTS
             if part_of(imp.target) != part_of(imp.module)
             and part_of(imp.target) not in LAYERS[part_of(imp.module)]]
    assert wrong == []


def test_the_core_imports_no_front_end_and_no_tooling() -> None:
    wrong = [where(imp) for imp in IMPORTS if part_of(imp.module) == "swapd.core"
             and part_of(imp.target) in {"swapd.http", "swapd.cli", "swapd.observe", "swapd.serve"}]
    assert wrong == []


def test_no_cycle_between_parts() -> None:
    assert cycles(graph(part_of)) == []


def test_no_cycle_between_modules() -> None:
    assert cycles(graph(lambda module: module)) == []


def test_no_private_name_crosses_a_part() -> None:
    wrong = [f"{where(imp)}: {name}" for imp in IMPORTS for name in imp.names
             if name.startswith("_") and not name.endswith("__")
             and part_of(imp.target) != part_of(imp.module)]
    assert wrong == []


def test_the_front_end_reaches_the_core_only_through_its_face() -> None:
    face = set(swapd.core.__all__)
    wrong = [f"{where(imp)}: {', '.join(imp.names) or '(module)'}" for imp in IMPORTS
             if part_of(imp.module) in FRONT and part_of(imp.target) == "swapd.core"
             and (imp.target != "swapd.core" or not set(imp.names) <= face)]
    assert wrong == []


def test_the_rules_see_imports() -> None:
    """The parser finds the imports it must judge (a broken walk would pass everything)."""
    assert any(imp.module == "swapd.http.app" and imp.target == "swapd.core"
               for imp in IMPORTS)
    assert any(imp.module == "swapd.core.supervisor" and imp.target == "swapd.core.planner"
               for imp in IMPORTS)
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def documented_tree() -> tuple[dict[str, int], dict[str, str]]:
    """docs/design.md's layout picture: each part's floor, and each module's part."""
    text = (ROOT / "docs" / "design.md").read_text()
    block = text[text.index("## Layout"):]
    block = block[block.index("```\n") + 4:]
    block = block[:block.index("```")]
    floors: dict[str, int] = {}
    modules: dict[str, str] = {}
    part = ""
    for line in block.splitlines()[1:]:
        name = line.split()[0]
        if line.startswith("    "):  # a module of the part above
            for word in line.split():
                if word.endswith(".py"):
                    modules[f"{part}.{word.removesuffix('.py')}"] = part
        elif line.startswith("  "):  # a part: a subpackage or a top-level module
            part = "swapd." + name.removesuffix("/").removesuffix(".py")
            floors[part] = int(line.split()[-1])
    return floors, modules


def test_the_picture_in_the_design_doc_is_the_code() -> None:
    """The tree in docs/design.md names every module where it is, and each part's floor
    is the one its imports give it (one above the highest part it imports)."""
    floors, modules = documented_tree()
    edges = graph(part_of)
    drawn: dict[str, int] = {}

    def floor(part: str) -> int:
        if part not in drawn:
            drawn[part] = 1 + max((floor(p) for p in edges.get(part, ()) if p != "swapd"),
                                  default=0)
        return drawn[part]

    assert {part: floor(part) for part in floors} == floors
    code = {m: part_of(m) for m in MODULES if m.count(".") == 2}
    assert modules == code
