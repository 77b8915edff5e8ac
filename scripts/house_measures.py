"""Measure the package's shape: module and function sizes, parameter counts, function-local imports, name compares.

    python scripts/house_measures.py          # print every measure and what exceeds the limits
    python scripts/house_measures.py --check  # exit 1 when a limit is exceeded (tests/test_house.py runs this)

The limits (issue 24): no module over 600 lines, no function over 60 lines or 8 parameters (self/cls not counted),
at most 20 function-local imports in the package, each with its reason in a comment on its line or the line above
(a local import is kept only to defer an optional heavy dependency or to break a real cycle).
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tsq_utils"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 8
MAX_LOCAL_IMPORTS = 20


@dataclass
class Measures:
    """What scripts/house_measures.py counts over the package."""

    lines: int = 0
    modules: int = 0
    module_lines: dict[str, int] = field(default_factory=dict)
    function_lines: dict[str, int] = field(default_factory=dict)
    parameters: dict[str, int] = field(default_factory=dict)
    local_imports: list[tuple[str, bool]] = field(default_factory=list)  # ("path:line", has a reason)


def n_parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """A function's parameters, self/cls not counted (*args and **kwargs count one each)."""
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    n = len(names) + (a.vararg is not None) + (a.kwarg is not None)
    return n - 1 if names and names[0] in ("self", "cls") else n


def has_reason(lines: list[str], lineno: int) -> bool:
    """Whether an import at `lineno` (1-based) carries a comment on its line or the line above."""
    here = lines[lineno - 1]
    above = lines[lineno - 2].strip() if lineno > 1 else ""
    return "#" in here or above.startswith("#")


def measure(package: Path = PACKAGE) -> Measures:
    """Walk every module of the package and count."""
    m = Measures()
    for path in sorted(package.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        rel = str(path.relative_to(package.parent))
        m.lines += len(lines)
        m.modules += 1
        m.module_lines[rel] = len(lines)
        for node in ast.walk(ast.parse(text, rel)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            name = f"{rel}:{node.name}:{node.lineno}"
            m.function_lines[name] = node.end_lineno - node.lineno + 1
            m.parameters[name] = n_parameters(node)
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    m.local_imports.append((f"{rel}:{sub.lineno}", has_reason(lines, sub.lineno)))
    # a nested function's imports are counted by each enclosing function: count each statement once
    m.local_imports = sorted(set(m.local_imports))
    return m


def violations(m: Measures) -> list[str]:
    """Every limit the package exceeds, one line each."""
    out = [f"module over {MAX_MODULE_LINES} lines: {k} ({v})"
           for k, v in m.module_lines.items() if v > MAX_MODULE_LINES]
    out += [f"function over {MAX_FUNCTION_LINES} lines: {k} ({v})"
            for k, v in m.function_lines.items() if v > MAX_FUNCTION_LINES]
    out += [f"function over {MAX_PARAMETERS} parameters: {k} ({v})"
            for k, v in m.parameters.items() if v > MAX_PARAMETERS]
    if len(m.local_imports) > MAX_LOCAL_IMPORTS:
        out.append(f"{len(m.local_imports)} function-local imports (at most {MAX_LOCAL_IMPORTS})")
    out += [f"function-local import without its reason: {where}" for where, ok in m.local_imports if not ok]
    return out


def main() -> int:
    """Print the measures (and with --check, fail on any limit exceeded)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    m = measure()
    fl = sorted(m.function_lines.values())
    print(f"package: {m.lines:,} lines, {m.modules} modules; median function {fl[len(fl) // 2]} lines")
    for k, v in sorted(m.module_lines.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {v:5d}  {k}")
    print(f"function-local imports: {len(m.local_imports)}")
    bad = violations(m)
    print("\n".join(bad) if bad else "every limit kept")
    return 1 if (bad and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
