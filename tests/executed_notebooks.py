"""The executed `ci` notebooks that tests/test_quiet.py and tests/test_truth.py read, made once per test session.

TSQ_EXECUTED_NOTEBOOKS=DIR reads the executed notebooks of a run already made (run_all.sh writes them to
<runs>/<profile>/notebooks/). Otherwise run_all.sh runs the ci profile into TSQ_RUNS_DIR (default runs/): the same
run folder nbval's notebooks use afterwards in run_tests.sh, so there they find every stage done and only redraw.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def executed_ci_notebooks() -> dict[str, nbformat.NotebookNode]:
    """{notebook file name: executed notebook} of the ci profile."""
    given = os.environ.get("TSQ_EXECUTED_NOTEBOOKS")
    if given:
        folder = Path(given)
    else:
        runs = Path(os.environ.get("TSQ_RUNS_DIR") or ROOT / "runs").absolute()
        env = {**os.environ, "TSQ_SKIP_SETUP": "1", "TSQ_PYTHON": sys.executable, "TSQ_RUNS_DIR": str(runs)}
        proc = subprocess.run([str(ROOT / "run_all.sh"), "--profile", "ci"], cwd=ROOT, env=env, capture_output=True,
                              text=True)
        assert proc.returncode == 0, f"run_all.sh --profile ci failed:\n{proc.stderr[-3000:]}"
        folder = runs / "ci" / "notebooks"
    found = {p.name: nbformat.read(p, as_version=4) for p in sorted(folder.glob("[0-9][0-9]_*.ipynb"))}
    assert found, f"no executed notebooks in {folder}"
    return found
