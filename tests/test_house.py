"""The package's shape (issue 24): module and function sizes, parameter counts, function-local imports with reasons.

scripts/house_measures.py measures; this test holds the limits, and checks the measures themselves on known code.
"""

import ast
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("house_measures", REPO / "scripts" / "house_measures.py")
house = importlib.util.module_from_spec(_spec)
sys.modules["house_measures"] = house  # dataclasses look their module up
_spec.loader.exec_module(house)


def _fn(src: str) -> ast.FunctionDef:
    return ast.parse(src).body[0]


def test_parameters_count_as_the_limit_means():
    assert house.n_parameters(_fn("def f(a, b, *, c=1): pass")) == 3
    assert house.n_parameters(_fn("def f(self, a, /, b, *args, **kw): pass")) == 4
    assert house.n_parameters(_fn("def f(cls): pass")) == 0
    assert house.n_parameters(_fn("def f(): pass")) == 0


def test_a_reason_is_a_comment_on_the_line_or_above():
    lines = ["def f():", "    # vLLM is optional: the gpu extra", "    import vllm", "    import os",
             "    import torch  # a real cycle: model imports method"]
    assert house.has_reason(lines, 3) and not house.has_reason(lines, 4) and house.has_reason(lines, 5)


def test_measure_finds_what_is_over(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    (pkg / "m.py").write_text(f"def long(a, b, c, d, e, f, g, h, i):\n    import json\n{body}\n")
    m = house.measure(pkg)
    bad = house.violations(m)
    assert m.modules == 1 and m.lines == 63
    assert any("over 60 lines: pkg/m.py:long:1 (63)" in b for b in bad)
    assert any("over 8 parameters: pkg/m.py:long:1 (9)" in b for b in bad)
    assert any("without its reason: pkg/m.py:2" in b for b in bad)


def test_the_package_keeps_every_limit():
    bad = house.violations(house.measure())
    assert not bad, "the package exceeds the house limits (python scripts/house_measures.py):\n" + "\n".join(bad)


def _name_compares(names: set[str]) -> list[str]:
    """Every `x == "name"` / `x != "name"` / `x in ("name", ...)` in the package, as path:line."""
    out = []
    for path in sorted(house.PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Compare):
                continue
            consts = [c for side in [node.left, *node.comparators] for c in ast.walk(side)
                      if isinstance(c, ast.Constant) and isinstance(c.value, str)]
            if any(c.value in names for c in consts):
                out.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return out


def test_no_task_or_model_name_is_compared_outside_the_registries():
    from tsq_utils.model.base_model import MODEL_SOURCES
    from tsq_utils.task.grading import GRADERS
    from tsq_utils.task.registry import TASKS

    names = set(TASKS) | set(MODEL_SOURCES) | set(GRADERS)
    assert {"toy", "hub", "math", "math500"} <= names
    assert _name_compares(names) == [], "a stage compares a task or model name: ask the Task or the registry instead"


def test_cores_restatement_of_the_registries_agrees_with_them():
    from tsq_utils.core.runner import CODE_BUILT_TASKS, LOCAL_OVERRIDE_SOURCES
    from tsq_utils.model import base_model
    from tsq_utils.task.benchmark import MathTask
    from tsq_utils.task.registry import TASKS

    assert CODE_BUILT_TASKS == {n for n, make in TASKS.items() if not isinstance(make(n), MathTask)}
    assert LOCAL_OVERRIDE_SOURCES == {k for k, s in base_model.MODEL_SOURCES.items()
                                      if s.resolve is base_model._hub_resolve}
