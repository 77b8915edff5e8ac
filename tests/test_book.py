"""The book: the notebooks render to a static site whose internal links, anchors and figures all resolve, that loads
nothing from the network, and whose formulas and figures a real browser shows offline."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from tsq_utils.lessons import book, book_widgets
from tsq_utils.core.config import REPO_ROOT, runs_root

NOTEBOOKS = REPO_ROOT / "notebooks"
# a 1x1 PNG stands in for an executed notebook's figure
PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")).decode()


WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
# what tqdm and a slider leave in an executed notebook: an HBox of (HTML, FloatProgress, HTML), and a FloatSlider
WIDGET_MODELS = {
    "bar": {"model_name": "HBoxModel", "state": {"children": ["IPY_MODEL_pre", "IPY_MODEL_prog", "IPY_MODEL_post"]}},
    "pre": {"model_name": "HTMLModel", "state": {"value": "sampling shards: 100%"}},
    "prog": {"model_name": "FloatProgressModel", "state": {"value": 4.0, "max": 4.0}},
    "post": {"model_name": "HTMLModel", "state": {"value": " 4/4 [00:03&lt;00:00]"}},
    "alpha": {"model_name": "FloatSliderModel", "state": {"value": 0.2, "min": 0.0, "max": 1.0, "step": 0.05,
                                                          "description": "α", "readout_format": ".2f"}},
    "odd": {"model_name": "ColorPickerModel", "state": {"value": "red"}},
}


def _widget_cell():
    """A code cell whose outputs are three widget views (a progress bar, a slider, a kind the book does not draw)."""
    cell = nbformat.v4.new_code_cell("show()")
    cell.outputs = [nbformat.v4.new_output("display_data", data={
        book_widgets.WIDGET_VIEW: {"model_id": mid, "version_major": 2, "version_minor": 0},
        "text/plain": f"<{mid} as text>"}) for mid in ("bar", "alpha", "odd")]
    return cell


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The committed notebooks, one given a figure output as if executed, built into a book."""
    src = tmp_path_factory.mktemp("nbs")
    for p in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")):
        shutil.copy(p, src / p.name)
    nb = nbformat.read(src / "01_sampling.ipynb", as_version=4)
    cell = next((c for c in nb.cells if c.cell_type == "code" and "sampling_figure" in c.source), None)
    if cell is None:  # the lesson moved its figure: give the last code cell one
        cell = [c for c in nb.cells if c.cell_type == "code"][-1]
    cell.outputs = [nbformat.v4.new_output("display_data", data={"image/png": PNG, "text/plain": "<Figure>"})]
    nbformat.write(nb, src / "01_sampling.ipynb")
    nb = nbformat.read(src / "02_selection.ipynb", as_version=4)
    nb.cells[-1:-1] = [_widget_cell(), nbformat.v4.new_markdown_cell(
        "Links: [`selection.select_pairs`](../tsq_utils/method/selection.py), "
        "[`refinement.refine_pairs`](../tsq_utils/method/refinement.py), [the KV cache](../docs/glossary.md#kv-cache),"
        " [a line](../tsq_utils/method/selection.py#L3).")]
    nb.metadata["widgets"] = {WIDGET_STATE: {"state": WIDGET_MODELS, "version_major": 2, "version_minor": 0}}
    nbformat.write(nb, src / "02_selection.ipynb")
    out = tmp_path_factory.mktemp("book")
    book.build(src, out)
    return out


def test_every_lesson_the_method_and_the_linked_sources_are_pages(built):
    names = sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    assert {p.stem for p in built.glob("*.html")} == set(names) | {"index", "method", "glossary", "profiles"}
    pages = {p.stem for p in (built / "src").glob("*.html")}
    assert {f"method.{m}" for m in ("selection", "refinement", "dpo_l", "tldr", "evaluation")} <= pages


def test_internal_links_and_figures_resolve(built):
    assert book.check_links(built) == []
    page = (built / "01_sampling.html").read_text()
    assert 'href="02_selection.html"' in page and 'href="00_base_model.html"' in page  # prev / next
    assert 'href="method.html"' in page and 'href="src/method.sampling.html#L' in page
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


# the anchors the lessons link to (issue 25): one heading per term in docs/glossary.md
GLOSSARY_ANCHORS = (
    "kv-cache", "teacher-forcing", "nats", "clustered-se", "q-dyn", "q-fix", "shortest", "acr", "len-t", "len-a", "auc",
    "dpo", "dpo-l", "sft", "eta", "beta", "alpha", "epsilon", "kl-divergence", "refinement-window-l", "n", "m", "k",
    "positives", "p", "tldr", "oracle", "lucky-trace", "profile", "stage", "shard")


def test_github_slugs():
    assert [book.github_slug(t) for t in ("KV cache", "A.C.R.", "4. DPO-L + SFT", "Len-T", "Refinement window L")] \
        == ["kv-cache", "acr", "4-dpo-l--sft", "len-t", "refinement-window-l"]


def test_the_glossary_has_every_anchor_the_lessons_link_to(built):
    headings = [line.lstrip("#").strip() for line in (REPO_ROOT / "docs" / "glossary.md").read_text().splitlines()
                if re.match(r"^#{2,4} ", line)]
    slugs = [book.github_slug(h) for h in headings]
    assert len(slugs) == len(set(slugs))
    assert set(GLOSSARY_ANCHORS) <= set(slugs)
    page = (built / "glossary.html").read_text()
    assert all(f'id="{a}"' in page for a in GLOSSARY_ANCHORS)  # GitHub's anchors work in the book too
    assert 'href="glossary.html#kv-cache"' in (built / "02_selection.html").read_text()


def test_function_links_land_on_their_line(built):
    page = (built / "02_selection.html").read_text()
    line = next(i for i, text in enumerate((REPO_ROOT / "tsq_utils/method/selection.py").read_text().splitlines(), 1)
                if text.startswith("def select_pairs("))
    assert f'href="src/method.selection.html#L{line}"' in page
    assert 'href="src/method.selection.html#L3"' in page  # a line anchor written by hand is kept
    src = (built / "src" / "method.selection.html").read_text()
    assert f'<span id="L{line}">' in src and f'href="#L{line}"' in src
    # a package's re-export leads to the module that defines the function, at its line
    module, n = book.locate("method/refinement", "refine_pairs")
    assert book.module_file(module).read_text().splitlines()[n - 1].startswith("def refine_pairs(")
    assert f'href="src/{module.replace("/", ".")}.html#L{n}"' in page


def test_a_broken_anchor_is_reported(built, tmp_path):
    shutil.copytree(built, tmp_path / "b")
    index = tmp_path / "b" / "index.html"
    index.write_text(index.read_text().replace("</body>", '<a href="glossary.html#no-such-term">x</a></body>'))
    assert book.check_links(tmp_path / "b") == ["index.html -> glossary.html#no-such-term (no such anchor)"]


def test_the_book_loads_nothing_from_the_network_and_shows_no_machine_path(built):
    assert book.external_scripts(built) == []
    assert (built / "mathjax" / book.MATHJAX_FILE).is_file()
    pages = {p: p.read_text() for p in built.rglob("*.html")}
    for page, text in pages.items():
        assert not re.search(r"<script[^>]*\ssrc=[\"'](?:https?:)?//", text), page
        for path in (str(REPO_ROOT), str(built), str(built.parent)):
            assert path not in text, (page, path)
    assert 'src="mathjax/tex-svg-full.js"' in pages[built / "method.html"]
    index = pages[built / "index.html"]
    assert "https://arxiv.org/abs/2511.13223" in index and "https://arxiv.org/abs/2506.02678" in index
    assert "Built from <code>…/" in index


def test_widgets_are_drawn_from_their_saved_state(built):
    page = (built / "02_selection.html").read_text()
    assert WIDGET_STATE not in page and "embed-amd" not in page  # no widget JavaScript, no state for it
    bar = re.search(r"sampling shards: 100%</span>(<progress[^>]*>)</progress><span> 4/4", page)
    assert bar and 'value="4.0"' in bar.group(1) and 'max="4.0"' in bar.group(1)
    slider = re.search(r"α (<input[^>]*>) <span>0.20</span>", page)
    assert slider and all(a in slider.group(1) for a in ('type="range"', "disabled", 'value="0.2"', 'step="0.05"'))
    assert "&lt;odd as text&gt;" in page  # a kind the book does not draw falls back to its text


def _chromium() -> str | None:
    return next((shutil.which(b) for b in ("chromium-headless-shell", "chromium") if shutil.which(b)), None)


@pytest.mark.skipif(_chromium() is None, reason="no chromium (apt-get install -y chromium-headless-shell)")
def test_a_browser_offline_shows_typeset_formulas_and_figures(built):
    """scripts/book_browser_check.sh: headless Chromium with the network off, the DOM after MathJax ran."""
    run = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "book_browser_check.sh"), str(built),
                          "01_sampling.html", "method.html"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TSQ_PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert re.search(r"01_sampling.html: ok: [1-9]\d* formulas typeset .* 0 raw TeX left, 0 TeX errors, 1 of 1 img",
                     run.stdout), lines
    assert re.search(r"method.html: ok: [1-9]\d* formulas typeset", run.stdout), lines
