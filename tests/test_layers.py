"""Imports flow one way: core < task < model < method < {ablations, lessons}, and no module imports itself back.

Every module under tsq_utils/ is parsed (ast, not imported), every import statement counted, those inside functions
(lazy imports) and under `if TYPE_CHECKING` included: a lazy import is still a dependency, it only moves the moment it
is paid. A module may import its own layer or a lower one; ablations and lessons, both at the top, do not import each
other. The package root (tsq_utils/__init__.py) counts as core.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tsq_utils"
RANK = {"core": 0, "task": 1, "model": 2, "method": 3, "ablations": 4, "lessons": 4}
ORDER = "core < task < model < method < {ablations, lessons}"


def module_name(path: Path, root: Path) -> str:
    """tsq_utils/method/dpo_l.py -> tsq_utils.method.dpo_l; a package's __init__.py -> the package."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    return {module_name(p, root): p for p in sorted(root.rglob("*.py")) if "__pycache__" not in p.parts}


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """The package modules a module imports, with the line: relative imports resolved, `from pkg import mod` taken
    as the submodule, an imported name that is no module as the module that defines it."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] != PACKAGE.name:
                continue
            while t not in known and "." in t:  # `import tsq_utils.core.config.X` style: the longest module prefix
                t = t.rsplit(".", 1)[0]
            out.append((t, node.lineno))
    return out


def layer(module: str) -> str:
    """The layer a module belongs to: the package's first sub-package (the root counts as core)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "core"


def layer_violations(root: Path) -> list[str]:
    """Each import that goes up the layer order or between ablations and lessons, as 'file:line: a -> b'."""
    mods = modules(root)
    bad = []
    for name, path in mods.items():
        src = layer(name)
        for target, line in imports_of(name, path, set(mods)):
            dst = layer(target)
            if src not in RANK or dst not in RANK:
                bad.append(f"{path.relative_to(root.parent)}:{line}: {name} -> {target}: {src or dst!r} is no layer")
            elif RANK[dst] > RANK[src] or (RANK[dst] == RANK[src] and src != dst):
                bad.append(f"{path.relative_to(root.parent)}:{line}: {name} ({src}) imports {target} ({dst})")
    return bad


def import_cycles(root: Path) -> list[list[str]]:
    """The module-level import cycles (strongly connected components of more than one module, or a self-import)."""
    mods = modules(root)
    # a module naming itself (`from . import x` inside x's own package __init__ resolves to x) is no cycle
    graph = {n: sorted({t for t, _ in imports_of(n, p, set(mods)) if t != n}) for n, p in mods.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_every_module_imports_only_its_own_or_lower_layers():
    bad = layer_violations(PACKAGE)
    assert not bad, f"imports that break the layer order {ORDER}:\n" + "\n".join(bad)


def test_no_import_cycles_between_modules():
    cycles = import_cycles(PACKAGE)
    assert not cycles, "modules that import each other (directly or through others):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_every_package_folder_is_a_layer():
    """A new sub-package must be placed in the order (RANK) before it can be imported from anywhere."""
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(RANK), f"sub-packages {sorted(folders ^ set(RANK))} are not in the layer order {ORDER}"


# ----------------------------------------------------------------------------- the checks can fail


def write_package(tmp_path: Path, files: dict[str, str]) -> Path:
    """A throwaway package named like ours (tsq_utils) in tmp_path; returns its folder."""
    root = tmp_path / PACKAGE.name
    for rel, text in {"__init__.py": "", **{f"{d}/__init__.py": "" for d in RANK}, **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return root


def test_an_upward_import_is_caught_even_inside_a_function(tmp_path):
    root = write_package(tmp_path, {
        "core/stage.py": "def f():\n    from ..model.base_model import load\n    return load\n",
        "model/base_model.py": "from ..core import stage\nfrom ..task.data import x\nload = 1\n",
        "task/data.py": "x = 1\n",
    })
    bad = layer_violations(root)
    assert len(bad) == 1 and "core/stage.py:2: tsq_utils.core.stage (core) imports tsq_utils.model.base_model" in bad[0]


@pytest.mark.parametrize("src,line", [
    ("from tsq_utils.lessons import plotting\n", "tsq_utils.lessons.plotting (lessons)"),
    ("from .. import lessons\n", "tsq_utils.lessons (lessons)"),
    ("import tsq_utils.lessons.plotting as p\n", "tsq_utils.lessons.plotting (lessons)"),
])
def test_ablations_and_lessons_may_not_import_each_other(tmp_path, src, line):
    root = write_package(tmp_path, {"ablations/run.py": src, "lessons/plotting.py": "y = 2\n"})
    bad = layer_violations(root)
    assert len(bad) == 1 and bad[0].endswith(f"imports {line}")


def test_a_cycle_inside_one_layer_is_caught(tmp_path):
    root = write_package(tmp_path, {
        "method/a.py": "from .b import g\n",
        "method/b.py": "def g():\n    from . import c\n",
        "method/c.py": "from .a import *\n",
        "method/d.py": "from . import a\n",
    })
    assert layer_violations(root) == []
    assert import_cycles(root) == [["tsq_utils.method.a", "tsq_utils.method.b", "tsq_utils.method.c"]]
