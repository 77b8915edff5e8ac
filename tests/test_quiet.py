"""Quiet lessons: the executed `ci` notebooks show no warnings, machine paths, Python reprs of paths or numpy scalars,
long tables, or more than one progress bar in a cell. The scan itself is tested on made-up outputs first."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest

from executed_notebooks import ROOT, executed_ci_notebooks

# Python's warning classes (FutureWarning, UserWarning, ...), a logger's WARNING, warnings.warn; a lesson's own
# sentence that starts "Warning:" is prose, not a library warning
WARNING = re.compile(r"\b\w+Warning\b|\bWARNING\b|warnings\.warn\(")
REPR = re.compile(r"\b(PosixPath|WindowsPath|np\.(float|int|uint|bool_)\d*)\(")
PROGRESS = re.compile(r"\d+%\|")
MAX_TABLE_ROWS = 30


def machine_prefixes() -> list[str]:
    """Absolute paths a lesson must not print: the repository, the Python environment and the home folder."""
    found = {str(ROOT), sys.prefix, str(Path.home())}
    return sorted(p for p in found if len(p) > 1)


def _texts(output: dict) -> list[str]:
    """The text an output shows: a stream, an error, or its text and HTML data."""
    if output.get("output_type") == "stream":
        return [output.get("text", "")]
    if output.get("output_type") == "error":
        return [f"{output.get('ename')}: {output.get('evalue')}"]
    data = output.get("data", {})
    return [str(data[k]) for k in ("text/plain", "text/html", "text/markdown") if k in data]


def findings(nb: dict, prefixes: list[str]) -> list[str]:
    """'cell N: what' for each noisy output of an executed notebook."""
    out = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        bars = 0
        for o in cell.get("outputs", []):
            texts = _texts(o)
            joined = "\n".join(texts)
            if o.get("output_type") == "stream" and o.get("name") == "stderr" and not PROGRESS.search(joined):
                out.append(f"cell {i}: stderr {joined.strip()[:120]!r}")
            if m := WARNING.search(joined):
                out.append(f"cell {i}: a warning ({m.group(0)}): {joined.strip()[:120]!r}")
            if m := REPR.search(joined):
                out.append(f"cell {i}: a repr {m.group(0)}...")
            for p in prefixes:
                if p in joined:
                    out.append(f"cell {i}: an absolute path ({p}...)")
            html = o.get("data", {}).get("text/html", "")
            if html.count("<tr") > MAX_TABLE_ROWS + 1:
                out.append(f"cell {i}: a table of {html.count('<tr') - 1} rows (at most {MAX_TABLE_ROWS})")
            bars += bool("application/vnd.jupyter.widget-view+json" in o.get("data", {})
                         and PROGRESS.search(o["data"].get("text/plain", "")))
        if bars > 1:
            out.append(f"cell {i}: {bars} progress bars (one per cell)")
    return out


def _nb(*outputs: dict) -> dict:
    return {"cells": [{"cell_type": "code", "outputs": list(outputs)}]}


def _bar(label: str) -> dict:
    return {"output_type": "display_data",
            "data": {"application/vnd.jupyter.widget-view+json": {}, "text/plain": f"{label}:  50%|#  | 1/2"}}


@pytest.mark.parametrize("output, what", [
    ({"output_type": "stream", "name": "stderr", "text": "/x/y.py:3: FutureWarning: old\n  warnings.warn(\n"},
     "a warning"),
    ({"output_type": "execute_result", "data": {"text/plain": "PosixPath('/a/b')"}}, "a repr"),
    ({"output_type": "execute_result", "data": {"text/plain": "np.float64(0.25)"}}, "a repr"),
    ({"output_type": "stream", "name": "stdout", "text": f"model: {ROOT}/runs/ci/model\n"}, "an absolute path"),
    ({"output_type": "display_data", "data": {"text/html": "<table>" + "<tr><td>1</td></tr>" * 40}}, "a table"),
])
def test_the_scan_finds_each_kind_of_noise(output, what):
    found = findings(_nb(output), machine_prefixes())
    assert any(what in f for f in found), found


def test_the_scan_allows_one_progress_bar_per_cell_and_quiet_output():
    quiet = _nb(_bar("sampling"), {"output_type": "stream", "name": "stdout", "text": "12 problems, 0.25 accuracy\n"},
                {"output_type": "display_data", "data": {"text/html": "<table>" + "<tr></tr>" * 10}})
    assert findings(quiet, machine_prefixes()) == []
    assert findings(_nb({"output_type": "stream", "name": "stdout", "text": "Warning: at N = 4, k = 1\n"}), []) == []
    assert "2 progress bars" in findings(_nb(_bar("a"), _bar("b")), [])[0]


# Notebooks another helper is still quieting (the lead empties this once they pass).
PENDING: set[str] = set()


@pytest.mark.parametrize("name", [f"{p.name}" for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))])
def test_executed_ci_notebook_is_quiet(name):
    if name in PENDING:
        pytest.xfail("being quieted by another helper")
    nbs = executed_ci_notebooks()
    assert name in nbs, f"{name} was not executed"
    assert findings(nbformat.from_dict(nbs[name]), machine_prefixes()) == []
