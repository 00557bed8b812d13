"""The layout is the architecture: imports point one way, and the wheel claims only our names.

Tools (the command lines, ``app/``, ``convert/``, ``benchmarks/``) import the library, never the
reverse; the library core never imports the shapes world (the synthetic data our own models are
trained on) nor a command line; no module imports itself back through others, lazy imports
included (a cycle that only works because an import sits inside a function is still a cycle).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("app", "convert", "benchmarks")
CLIS = {"mm1_mlx.lora", "mm1_mlx.fuse", "mm1_mlx.quantize", "mm1_mlx.train", "mm1_mlx.eval"}
SHAPES = "mm1_mlx.shapes"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for top in ("mm1_mlx", *TOOLS) for p in (ROOT / top).rglob("*.py")}


def imported(name: str, path: Path, known: dict) -> set[str]:
    """The modules of ``known`` that ``path`` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                         for a in node.names)
    return {m for m in found if m in known and m != name}


def import_graph(known: dict | None = None) -> dict[str, set[str]]:
    known = known or modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def core(name: str) -> bool:
    return name.startswith("mm1_mlx") and not name.startswith(SHAPES) and name not in CLIS


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_one():
    """The checks above would pass on an empty graph: they must see a planted cycle and edge."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    known = modules()
    graph = import_graph(known)
    assert "mm1_mlx.models.model" in graph["mm1_mlx.checkpoint"]  # relative imports resolved
    assert "mm1_mlx.shapes.world" in graph["mm1_mlx.shapes.eval"]  # `from . import world`


def test_library_never_imports_a_tool():
    graph = import_graph()
    wrong = {n: sorted(e for e in deps if e.split(".")[0] in TOOLS)
             for n, deps in graph.items() if n.startswith("mm1_mlx")}
    assert {n: d for n, d in wrong.items() if d} == {}


def test_core_never_imports_shapes_world_or_a_command_line():
    graph = import_graph()
    wrong = {n: sorted(e for e in deps if e.startswith(SHAPES) or e in CLIS)
             for n, deps in graph.items() if core(n)}
    assert {n: d for n, d in wrong.items() if d} == {}


def test_library_needs_no_torch_at_import():
    """torch is optional: only reading a user's PyTorch ``.bin`` weights imports it, lazily."""
    for name, path in modules().items():
        if not name.startswith("mm1_mlx"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top for a in n.names] + [n.module or "" for n in top
                                                          if isinstance(n, ast.ImportFrom)]
        assert not any(x.split(".")[0] == "torch" for x in names), name


@pytest.mark.slow
def test_wheel_claims_only_our_names(tmp_path):
    """The built wheel's top-level packages are ours (no `app`, `convert`, `benchmarks`), and it
    holds every module of the library and the installed tools."""
    src = tmp_path / "src"  # setuptools builds in ./build: a copy keeps the checkout clean
    for name in ("mm1_mlx", "app", "convert"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path), str(src)], capture_output=True, text=True)
    if r.returncode and "No module named" in r.stderr:
        pytest.skip(f"cannot build a wheel here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"mm1_mlx", "mm1_mlx_app", "mm1_mlx_convert"}
    installed = {"mm1_mlx": "mm1_mlx", "app": "mm1_mlx_app", "convert": "mm1_mlx_convert"}
    expected = {f"{installed[p.parts[0]]}/{'/'.join(p.parts[1:])}"
                for top in installed for p in (ROOT / top).rglob("*.py")
                for p in [p.relative_to(ROOT)] if "__pycache__" not in p.parts}
    assert expected - set(names) == set()
    assert "mm1_mlx_app/chat.tcss" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "mm1_mlx_app.__main__:main" in scripts and "app.__main__" not in scripts.replace(
        "mm1_mlx_app.__main__", "")
