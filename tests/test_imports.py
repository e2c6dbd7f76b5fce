"""The package's imports point one way: no cycles (counting imports inside functions), and the
passes import only each other and the leaf modules below them. Imports for annotations only sit
under `if TYPE_CHECKING:` and do not count."""
from __future__ import annotations

import ast
from pathlib import Path

import ppcompile

ROOT = Path(ppcompile.__file__).parent
LEAVES = {"ppcompile.ops", "ppcompile.config", "ppcompile.policies", "ppcompile.probes", "ppcompile.baselines",
          "ppcompile.registry", "ppcompile.torch_compat"}  # what the passes may import from outside ppcompile.passes


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The ppcompile modules `path` imports at run time (type-checking-only imports left out)."""
    me, tree = _module(path), ast.parse(path.read_text())
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    known, found = _modules(), set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in found if m in known and m != me}


def _modules() -> set[str]:
    return {_module(p) for p in ROOT.rglob("*.py")}


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in ROOT.rglob("*.py")}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if n == "ppcompile":  # the package itself: its __init__ re-exports, never imported back
                continue
            if state.get(n) == 1:
                return path[path.index(n):] + [n] if n in path else path + [n]
            if n not in state and (found := visit(n, path + [n])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_the_package_has_no_import_cycle():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_a_cycle_is_found():  # the check itself
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_passes_import_only_passes_and_leaf_modules():
    upward = {m: sorted(i - LEAVES) for m, i in _graph().items() if m.startswith("ppcompile.passes")
              for i in [{n for n in i if not n.startswith("ppcompile.passes")}] if i - LEAVES}
    assert upward == {}
