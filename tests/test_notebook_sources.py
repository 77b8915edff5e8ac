"""Notebooks as text: each notebooks/NN_name.ipynb has its jupytext percent-format twin NN_name.py (the file you edit
and review), the two hold the same cells, and the .ipynb is committed without outputs.

After editing a .py, `jupytext --sync notebooks/NN_name.py` rewrites the .ipynb; this test fails when that was
forgotten (or when the .ipynb was edited in Jupyter without jupytext's pairing, so the .py fell behind).
"""

import shutil
from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# Cell metadata that Jupyter front ends write on their own (view state, timings): not part of the lesson.
UI_METADATA = {"collapsed", "scrolled", "jupyter", "ExecuteTime", "execution", "editable", "deletable", "trusted"}


def _cells(nb: nbformat.NotebookNode) -> list[tuple[str, str, dict]]:
    """(cell type, source, metadata without front-end view state) per cell."""
    return [(c.cell_type, c.source, {k: v for k, v in c.metadata.items() if k not in UI_METADATA}) for c in nb.cells]


def pair_differences(ipynb: Path) -> list[str]:
    """How a notebook and its .py twin differ (cell count, then the first differing cell); [] when in sync."""
    twin = ipynb.with_suffix(".py")
    if not twin.exists():
        return [f"{ipynb.name} has no jupytext twin {twin.name}"]
    a, b = _cells(nbformat.read(ipynb, as_version=4)), _cells(jupytext.read(twin))
    out = []
    if len(a) != len(b):
        out.append(f"{ipynb.name} has {len(a)} cells, {twin.name} {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        for what, u, v in zip(("type", "source", "metadata"), x, y):
            if u != v:
                out.append(f"cell {i}: the {what} differs between {ipynb.name} and {twin.name}:\n"
                           f"  ipynb: {str(u)[:200]!r}\n  py:    {str(v)[:200]!r}")
                break
        if out:
            break
    return out


def unpaired(folder: Path) -> list[str]:
    """Notebooks without a .py twin and .py files without a notebook, by file name."""
    nbs, pys = {p.stem for p in folder.glob("*.ipynb")}, {p.stem for p in folder.glob("*.py")}
    return sorted([f"{s}.ipynb" for s in nbs - pys] + [f"{s}.py" for s in pys - nbs])


def output_problems(ipynb: Path) -> list[str]:
    """Code cells of a notebook that carry outputs or an execution count."""
    nb = nbformat.read(ipynb, as_version=4)
    return [f"{ipynb.name} cell {i}: outputs or an execution count" for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]


SYNC_HINT = "edit the .py and run `jupytext --sync notebooks/<name>.py` (never the .ipynb by hand)"
IPYNBS = sorted(NOTEBOOKS.glob("*.ipynb"))


def test_every_notebook_has_its_twin_and_every_twin_its_notebook():
    assert len(IPYNBS) >= 8
    assert unpaired(NOTEBOOKS) == []


@pytest.mark.parametrize("ipynb", IPYNBS, ids=lambda p: p.stem)
def test_notebook_and_its_py_hold_the_same_cells(ipynb):
    diffs = pair_differences(ipynb)
    assert not diffs, "\n".join(diffs) + f"\n{SYNC_HINT}"


@pytest.mark.parametrize("ipynb", IPYNBS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(ipynb):
    assert output_problems(ipynb) == [], "clear the outputs: jupytext --sync writes none (nbstripout also does)"


@pytest.mark.parametrize("ipynb", IPYNBS, ids=lambda p: p.stem)
def test_notebook_pairs_itself_with_a_percent_py(ipynb):
    """The pairing lives in the notebook, so Jupyter (with jupytext) and `jupytext --sync` keep both sides."""
    assert nbformat.read(ipynb, as_version=4).metadata["jupytext"]["formats"] == "ipynb,py:percent"


# ----------------------------------------------------------------------------- the checks can fail


@pytest.fixture
def pair(tmp_path) -> Path:
    """A copy of notebook 02 and its twin in a temp folder; returns the copy's .ipynb."""
    src = NOTEBOOKS / "02_selection.ipynb"
    shutil.copy(src, tmp_path / src.name)
    shutil.copy(src.with_suffix(".py"), tmp_path / src.with_suffix(".py").name)
    return tmp_path / src.name


def test_an_edit_to_the_py_alone_is_caught(pair):
    assert pair_differences(pair) == []
    py = pair.with_suffix(".py")
    text = py.read_text(encoding="utf-8")
    assert "import os\n" in text
    py.write_text(text.replace("import os\n", "import os  # edited\n", 1), encoding="utf-8")
    diffs = pair_differences(pair)
    assert len(diffs) == 1 and "the source differs" in diffs[0] and "# edited" in diffs[0]


def test_a_cell_added_to_the_ipynb_alone_is_caught(pair):
    nb = nbformat.read(pair, as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell("A cell the .py lacks."))
    nbformat.write(nb, pair)
    assert any("cells" in d for d in pair_differences(pair))


def test_a_tag_lost_in_the_py_is_caught(pair):
    py = pair.with_suffix(".py")
    text = py.read_text(encoding="utf-8")
    assert '# %% tags=["parameters"]\n' in text
    py.write_text(text.replace('# %% tags=["parameters"]\n', "# %%\n"), encoding="utf-8")
    assert "the metadata differs" in pair_differences(pair)[0]


def test_a_missing_twin_and_an_orphan_py_are_caught(pair):
    orphan = pair.parent / "99_orphan.py"
    orphan.write_text("# %%\nx = 1\n", encoding="utf-8")
    pair.with_suffix(".py").unlink()
    assert unpaired(pair.parent) == ["02_selection.ipynb", "99_orphan.py"]
    assert "has no jupytext twin" in pair_differences(pair)[0]


def test_stored_outputs_are_caught(pair):
    nb = nbformat.read(pair, as_version=4)
    code = next(c for c in nb.cells if c.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("stream", text="hello\n")]
    nbformat.write(nb, pair)
    assert len(output_problems(pair)) == 1
    code.outputs, code.execution_count = [], 3
    nbformat.write(nb, pair)
    assert len(output_problems(pair)) == 1
