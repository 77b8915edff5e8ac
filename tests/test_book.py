"""The book: the notebooks render to a static site whose internal links and figures all resolve."""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import nbformat
import pytest

from tsq_utils.lessons import book
from tsq_utils.core.config import REPO_ROOT, runs_root

NOTEBOOKS = REPO_ROOT / "notebooks"
# a 1x1 PNG stands in for an executed notebook's figure
PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")).decode()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The committed notebooks, one given a figure output as if executed, built into a book."""
    src = tmp_path_factory.mktemp("nbs")
    for p in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")):
        shutil.copy(p, src / p.name)
    nb = nbformat.read(src / "01_sampling.ipynb", as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and "sampling_figure" in c.source)
    cell.outputs = [nbformat.v4.new_output("display_data", data={"image/png": PNG, "text/plain": "<Figure>"})]
    nbformat.write(nb, src / "01_sampling.ipynb")
    out = tmp_path_factory.mktemp("book")
    book.build(src, out)
    return out


def test_every_lesson_the_method_and_the_linked_sources_are_pages(built):
    names = sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    assert {p.stem for p in built.glob("*.html")} == set(names) | {"index", "method"}
    pages = {p.stem for p in (built / "src").glob("*.html")}
    assert {f"method.{m}" for m in ("selection", "refinement", "dpo_l", "tldr", "evaluation")} <= pages


def test_internal_links_and_figures_resolve(built):
    assert book.check_links(built) == []
    page = (built / "01_sampling.html").read_text()
    assert 'href="02_selection.html"' in page and 'href="00_base_model.html"' in page  # prev / next
    assert 'href="method.html"' in page and 'href="src/method.sampling.html"' in page
    assert f"data:image/png;base64,{PNG}" in page  # the figure is embedded in the page
    assert not re.search(r'href="[^"]*\.ipynb', page)  # every notebook link points at its page


def test_a_broken_link_is_reported(built, tmp_path):
    shutil.copytree(built, tmp_path / "b")
    (tmp_path / "b" / "method.html").unlink()
    broken = book.check_links(tmp_path / "b")
    assert broken and all(b.endswith("method.html") for b in broken)


def test_no_notebooks_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no NN_"):
        book.build(tmp_path, tmp_path / "out")
    assert book.main(["--notebooks", str(tmp_path), "--out", str(tmp_path / "out")]) == 1


@pytest.mark.skipif(not (runs_root() / "toy" / "notebooks").is_dir(), reason="no executed toy run (./run_all.sh)")
def test_the_toy_book_builds(tmp_path):
    assert book.main(["--profile", "toy", "--out", str(tmp_path / "book")]) == 0
    assert book.check_links(tmp_path / "book") == []


def test_the_book_says_which_notebooks_failed_or_are_missing(tmp_path, capsys):
    """Issue 26: the book said "8 of 8 notebooks executed" over a failed 02, and a partial run failed with
    "21 broken internal links"."""
    import os
    import time

    src = tmp_path / "nbs"
    src.mkdir()
    for name in ("00_base_model", "01_sampling", "02_selection"):
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        code = next(c for c in nb.cells if c.cell_type == "code")
        code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="ran\n")]
        nbformat.write(nb, src / f"{name}.ipynb")
    shutil.copy(src / "02_selection.ipynb", src / "02_selection.failed.ipynb")  # run_all.sh: 02's last run failed
    later = time.time() + 5
    os.utime(src / "02_selection.failed.ipynb", (later, later))
    index = book.build(src, tmp_path / "book")
    text = index.read_text()
    assert "2 of 8 notebooks executed; failed: 02; missing: 03, 04, 05, 06, 07 (./run_all.sh --only 03,04,05,06,07)" \
        in text
    assert "(failed)" in text and "(missing: not run)" in text
    assert book.check_links(tmp_path / "book") == []  # the lessons' links to 03..07 reach their "not run" pages
    assert "Not run:" in (tmp_path / "book" / "05_evaluation.html").read_text()
    assert "02_selection.ipynb: failed." in (tmp_path / "book" / "02_selection.html").read_text()
    assert "failed: 02; missing: 03" in capsys.readouterr().out
