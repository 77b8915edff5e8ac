"""The committed notebooks: numbered, one parameters cell papermill can read line by line, no outputs, ASCII params."""

from __future__ import annotations

import logging
import re
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


ROOT = Path(__file__).resolve().parent.parent
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _markdown(path: Path) -> str:
    if path.suffix == ".md":
        return path.read_text()
    return "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")


@pytest.mark.parametrize("path", NOTEBOOKS + [ROOT / "docs" / "method.md"], ids=lambda p: p.name)
def test_relative_links_resolve(path):
    """Links between lessons, to docs/ and to the package point at files that exist (and never at ../shared)."""
    links = [u for u in MARKDOWN_LINK.findall(_markdown(path)) if not re.match(r"^[a-z]+:", u)]
    assert links, f"{path.name}: no links"
    for url in links:
        assert "shared/" not in url, f"{path.name}: cites {url}, which users do not have"
        target = (path.parent / url.split("#", 1)[0]).resolve()
        assert target.is_file(), f"{path.name}: broken link {url}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_lesson_has_its_parts(path):
    """Navigation, the inline core code with its assert, the generated summary, and 3-5 exercises with answers."""
    nb = nbformat.read(path, as_version=4)
    i = NOTEBOOKS.index(path)
    head = nb.cells[0].source
    if i > 0:
        assert f"({NOTEBOOKS[i - 1].name})" in head and "previous" in head
    if i < len(NOTEBOOKS) - 1:
        assert f"({NOTEBOOKS[i + 1].name})" in head and "next" in head
    assert "../docs/method.md" in head and "../tsq_utils/" in head
    by_tag = {c.metadata.get("tsq_lesson"): c for c in nb.cells if c.metadata.get("tsq_lesson")}
    core = by_tag["core"].source
    assert "assert" in core
    assert re.search(r"\b(lessons|widgets)\.seen\(", by_tag["seen"].source)
    n_ex = len(re.findall(r"^\d+\. \*\(", by_tag["ex"].source, re.M))
    assert 3 <= n_ex <= 5 and len(re.findall(r"\b(lessons|widgets)\.answer\(", by_tag["ans"].source)) == n_ex
