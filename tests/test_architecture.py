"""The house rules, checked on the source: every import points to a lower floor (or stays in its room), no
module imports itself back through others, no file passes 400 lines, a function-local import says why it
waits, and no file points outside the repository.

Floors, from the ground up (a room may import only from floors below it, or from itself):

    kernels                      Triton ops, each with its torch reference
    losses, metrics              pure math on tensors and strings
    models                       the family table, loading, LoRA, kernel patching, levers, build, the tiny zoo
    data, rewards                rows -> batches; completions -> rewards
    rollout, export              generation for RL; adapter/checkpoint -> merged folder -> GGUF
    distributed                  strategies, gathering, rank-0 work
    modules                      the LightningModules
    callbacks                    thin: call export / metrics / distributed
    demo                         the bundled demo (data, report, llama.cpp read-back)
    cli, (package root)          the entry point and the public API
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLOORS = [["kernels"], ["losses", "metrics"], ["models"], ["data", "rewards"], ["rollout", "export"],
          ["distributed"], ["modules"], ["callbacks"], ["demo"], ["cli", "__init__", "__main__"]]
FLOOR = {room: i for i, rooms in enumerate(FLOORS) for room in rooms}
MAX_LINES = 400


def _sources() -> dict[str, Path]:
    """``vlm_lightning.<dotted>`` -> file, with ``kernels/`` under the name it installs as."""
    mods = {}
    for path in sorted((REPO / "vlm_lightning").rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        mods[".".join(rel.parts).removesuffix(".__init__")] = path
    for path in sorted((REPO / "kernels").rglob("*.py")):
        rel = path.relative_to(REPO / "kernels").with_suffix("")
        mods[".".join(("vlm_lightning", "kernels", *rel.parts)).removesuffix(".__init__")] = path
    return mods


SOURCES = _sources()


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported vlm_lightning module, line, at module level) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top_level = {id(n) for n in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` / try-except blocks at module level are still module level
        if isinstance(node, (ast.If, ast.Try)):
            top_level |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in SOURCES and "." in name:
                name = name.rpartition(".")[0]
            if name in SOURCES and name.startswith("vlm_lightning"):
                out.append((name, node.lineno, id(node) in top_level))
    return out


def test_every_room_has_a_floor():
    rooms = {_room(m) for m in SOURCES}
    assert rooms <= set(FLOOR), f"rooms without a floor in this test: {sorted(rooms - set(FLOOR))}"


def test_imports_point_down():
    upward = []
    for module, path in SOURCES.items():
        here = _room(module)
        for target, line, _ in _imports(module, path):
            there = _room(target)
            if there != here and FLOOR[there] >= FLOOR[here]:
                upward.append(f"{path.relative_to(REPO)}:{line} ({here}) imports {target} ({there})")
    assert not upward, "imports that do not point to a lower floor:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = defaultdict(set)
    for module, path in SOURCES.items():
        for target, _, _ in _imports(module, path):
            if target != module and not module.startswith(target + "."):  # a package's own __init__ is fine
                graph[module].add(target)
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in list(SOURCES):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("path", list(SOURCES.values()), ids=lambda p: str(p.relative_to(REPO)))
def test_file_size(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(REPO)} has {n} lines (at most {MAX_LINES}): split it by concern"


def test_function_local_imports_say_why():
    silent = []
    for path in SOURCES.values():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        nested = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                nested |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if id(node) in nested:
                here, above = lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else ""
                if "#" not in here and not above.strip().startswith("#"):
                    silent.append(f"{path.relative_to(REPO)}:{node.lineno}: {here.strip()}")
    assert not silent, ("function-local imports without a one-line reason (move them to the top, or say why "
                        "they wait: optional dependency, heavy import, cycle):\n" + "\n".join(silent))


OUTSIDE = ("shared/notes", "../shared", "/work/", "device machine", "device tool", "fresh-clone", "farm-studio")


def test_nothing_points_outside_the_repository():
    hits = []
    for path in [*REPO.glob("vlm_lightning/**/*.py"), *REPO.glob("kernels/*.py"), *REPO.glob("tests/**/*.py"),
                 *REPO.glob("benchmarks/**/*"), *REPO.glob("recipes/**/*.yaml"), *REPO.glob("docs/*.md"),
                 REPO / "README.md", REPO / "Makefile", REPO / "pyproject.toml"]:
        if not path.is_file() or path == Path(__file__).resolve():
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            hits += [f"{path.relative_to(REPO)}:{i}: {word!r}" for word in OUTSIDE if word in line]
    assert not hits, "references to places outside the repository:\n" + "\n".join(hits)


def test_every_package_is_installed():
    """pyproject's explicit package list (needed for the kernels/ -> vlm_lightning.kernels mapping) names every
    package folder, so a wheel install holds all of them."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "vlm_lightning").rglob("__init__.py")}
    assert found | {"vlm_lightning.kernels"} == listed
