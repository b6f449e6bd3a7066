"""The package's layering, read from the source: stages only connect shared modules (no stage imports another,
no shared module or tool imports a stage; the CLI finds stages by name), and no module imports itself around a
loop (imports inside functions count: deferring an import hides a cycle, it does not remove it)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its source (`from . import x` names module x)."""
    def name_of(path: Path) -> str:
        parts = path.relative_to(package.parent).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name_of(p): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                parts = here.split(".")
                target = ".".join(parts[:len(parts) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else node.module or ""
                found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names}
        graph[name] = {m for m in found if m in modules and m not in (name, package.name)}
    return graph


def is_stage(name: str) -> bool:
    return ".stages." in name


def stage_imports(graph) -> dict[str, list[str]]:
    """Every module other than the CLI that imports a stage, with the stages it imports."""
    found = {m: sorted(filter(is_stage, deps)) for m, deps in graph.items() if not m.endswith(".__main__")}
    return {m: d for m, d in found.items() if d}


def cycles(graph) -> list[list[str]]:
    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None
    return [c for c in map(cycle_from, sorted(graph)) if c]


def test_no_stage_is_imported_but_by_the_cli():
    assert not stage_imports(import_graph(PACKAGE))


def test_no_import_cycle_in_the_package():
    assert not cycles(import_graph(PACKAGE))


def test_the_checks_see_a_deferred_cycle_and_a_stage_importing_a_stage(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "stages").mkdir(parents=True)
    for path, text in {"__init__.py": "", "stages/__init__.py": "",
                       "paths.py": "from .arms import get\n",
                       "arms.py": "def get():\n    from . import paths\n",
                       "stages/assess.py": "from . import attack\nfrom .. import arms\n",
                       "stages/attack.py": "from ..paths import get\n"}.items():
        (pkg / path).write_text(text)
    graph = import_graph(pkg)
    assert graph["pkg.stages.assess"] == {"pkg.stages.attack", "pkg.arms"}
    assert stage_imports(graph) == {"pkg.stages.assess": ["pkg.stages.attack"]}
    assert ["pkg.arms", "pkg.paths", "pkg.arms"] in cycles(graph)
