"""The committed notebooks: numbered, one parameters cell papermill can read line by line, no outputs, ASCII params."""

from __future__ import annotations

import logging
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_one_notebook_per_stage_in_order():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(8)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: a code cell has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_cell_is_parsed_by_papermill(path, caplog):
    """papermill --help-notebook and type inference read each parameter line; a line it cannot parse (e.g. a
    comment holding '=' or non-ASCII text) is only a warning at run time, so it is checked here."""
    import papermill

    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} parameters cells"
    with caplog.at_level(logging.WARNING, logger="papermill"):
        params = papermill.inspect_notebook(str(path))
    assert "profile" in params
    assert not [r.getMessage() for r in caplog.records if "Unable to parse" in r.getMessage()]
    names = [line.split("=", 1)[0].strip() for line in tagged[0].source.splitlines()
             if "=" in line and not line.startswith(("#", " ", "import", "from"))]
    assert set(names) <= set(params), f"{path.name}: parameters papermill did not see: {set(names) - set(params)}"
