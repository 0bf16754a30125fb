"""The package's architecture: layers that import only the layers below them.

Every module of ``rsa_mlx`` is read (not imported) and its imports of
``rsa_mlx`` modules collected. The test fails on an import loop, on an import
that points up (or sideways, between two rooms on one floor), and on an
import inside a function outside the command line, whose commands import
their heavy layers on use so that ``rsa-mlx --help`` starts fast.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rsa_mlx"

# Floors, from the bottom; rooms on one floor do not import each other.
FLOORS = {
    "util": 0,
    "ops": 1,
    "io": 1,
    "tuner": 2,
    "eval": 3,
    "export": 3,
    "study": 4,
    "demo": 5,
    "recipe": 5,
    "cli": 6,
    "": 7,  # rsa_mlx/*.py: the package and its documented aliases
}
ROOMS_DOC = Path(__file__).resolve().parent.parent / "README.md"

# Imports inside functions that are there for a reason.
INNER_IMPORTS_ALLOWED = {
    # MLX must be imported after the BLAS is preloaded into the process
    "rsa_mlx.util.blas",
    # rsa_mlx.load: `import rsa_mlx` stays light (the CLI's --help imports it)
    "rsa_mlx",
}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = modules()


def room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or f"rsa_mlx.{parts[1]}" not in MODULES:
        return ""
    return parts[1] if (PACKAGE / parts[1]).is_dir() else ""


def entry_point(module: str) -> bool:
    """``__main__`` modules run a command; nothing imports them."""
    return module.endswith(".__main__")


def imports(module: str) -> list[tuple[str, int, bool]]:
    """``(imported rsa_mlx module, line, inside a function)`` of a module."""
    tree = ast.parse(MODULES[module].read_text())
    inner = {
        id(node)
        for fn in ast.walk(tree)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(fn)
    }
    is_package = MODULES[module].name == "__init__.py"
    package = module if is_package else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                names.append(sub if sub in MODULES else base)
        for name in names:
            if name.startswith("rsa_mlx") and name != module:
                while name not in MODULES:  # a name inside a module
                    name = name.rsplit(".", 1)[0]
                found.append((name, node.lineno, id(node) in inner))
    return found


def graph() -> dict[str, set[str]]:
    return {m: {target for target, _, _ in imports(m)} for m in MODULES}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_is_in_a_room_on_a_floor():
    assert {room(m) for m in MODULES} <= set(FLOORS), sorted(
        {room(m) for m in MODULES} - set(FLOORS)
    )


def test_no_import_loops():
    assert cycles(graph()) == []


def test_the_loop_finder_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_point_only_down():
    wrong = []
    for module in MODULES:
        if entry_point(module):
            continue
        here = room(module)
        for target, line, _ in imports(module):
            if target == "rsa_mlx":  # the package itself (its version): every
                continue  # import of a submodule imports it first anyway
            there = room(target)
            if there != here and not FLOORS[there] < FLOORS[here]:
                wrong.append(f"{MODULES[module].name}:{line} {module} -> {target}")
    assert wrong == []


def test_imports_inside_functions_only_where_they_keep_the_cli_fast():
    inner = [
        f"{module}:{line} imports {target}"
        for module in MODULES
        if room(module) != "cli" and module not in INNER_IMPORTS_ALLOWED
        for target, line, inside in imports(module)
        if inside
    ]
    assert inner == []


def test_the_readme_layout_names_every_room():
    text = ROOMS_DOC.read_text()
    for name in FLOORS:
        if name:
            assert f"`rsa_mlx/{name}/`" in text, name


@pytest.mark.parametrize(
    "code",
    [
        "import rsa_mlx.cli",  # what `rsa-mlx --help` imports
        "import rsa_mlx.tuner.config, rsa_mlx.study.grid",  # align's and sweep's flags
    ],
)
def test_the_command_line_starts_without_the_heavy_libraries(code):
    heavy = ("mlx_lm", "transformers", "torch", "matplotlib", "huggingface_hub")
    probe = (
        f"{code}; import sys, json; "
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == []
