"""The book: the executed notebooks of one profile as a static HTML site, with the method page and the package
sources they link to, and a check that every internal link and figure resolves.

    python -m tsq_utils.lessons.book                       # toy: runs/toy/notebooks -> runs/toy/book/index.html
    python -m tsq_utils.lessons.book --profile ci --out /tmp/book

Built with nbconvert (Jupyter's own converter, no extra dependency and no download at build time); figures are
embedded in the pages, so the book is one self-contained folder.
"""

from __future__ import annotations

import argparse
import html
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

from ..core.config import REPO_ROOT, runs_root

NOTEBOOK_RE = re.compile(r"^\d\d_[A-Za-z0-9_]+\.ipynb$")
# Links as the notebooks and docs/method.md write them, relative to notebooks/ or docs/
_NB_LINK = re.compile(r"^(?:\.\./notebooks/)?(\d\d_[A-Za-z0-9_]+)\.ipynb(#.*)?$")
_METHOD_LINK = re.compile(r"^(?:\.\./docs/|\./)?method\.md(#.*)?$")
_SRC_LINK = re.compile(r"^\.\./tsq_utils/([A-Za-z0-9_/]+)\.py(#.*)?$")


def _exporter():
    from nbconvert import HTMLExporter

    exp = HTMLExporter(template_name="lab")
    exp.exclude_input_prompt = True
    exp.exclude_output_prompt = True
    return exp


def _rewrite_links(page: str, sources: set[str]) -> str:
    """Point the notebooks' links (NN_x.ipynb, ../docs/method.md, ../tsq_utils/x.py) at the book's own pages."""
    def fix(m: re.Match) -> str:
        attr, url = m.group(1), html.unescape(m.group(2))
        if (nb := _NB_LINK.match(url)):
            new = f"{nb.group(1)}.html{nb.group(2) or ''}"
        elif (md := _METHOD_LINK.match(url)):
            new = f"method.html{md.group(1) or ''}"
        elif (src := _SRC_LINK.match(url)):
            sources.add(src.group(1))
            new = f"src/{_page_name(src.group(1))}.html"
        else:
            return m.group(0)
        return f'{attr}="{html.escape(new)}"'

    return re.sub(r'(href)="([^"]*)"', fix, page)


def _nav(pages: list[tuple[str, str]], i: int | None) -> str:
    """A bar on top of every page: the contents, the previous and the next lesson."""
    parts = ['<a href="index.html">Contents</a>', '<a href="method.html">The method</a>']
    if i is not None:
        if i > 0:
            parts.append(f'<a href="{pages[i - 1][0]}.html">← {html.escape(pages[i - 1][1])}</a>')
        if i + 1 < len(pages):
            parts.append(f'<a href="{pages[i + 1][0]}.html">{html.escape(pages[i + 1][1])} →</a>')
    return ('<nav style="position:sticky;top:0;z-index:10;background:#f6f6f6;border-bottom:1px solid #ddd;'
            'padding:6px 16px;font-family:sans-serif;font-size:14px">' + " · ".join(parts) + "</nav>")


def _with_nav(page: str, nav: str) -> str:
    return re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + nav, page, count=1)


def _title(nb) -> str:
    for c in nb.cells:
        if c.cell_type == "markdown":
            for line in c.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return "untitled"


def _page_name(module: str) -> str:
    """The flat page name of a package module ('core/config' -> 'core.config'), so every source page sits in src/."""
    return module.replace("/", ".")


def _source_page(module: str) -> str:
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer

    path = REPO_ROOT / "tsq_utils" / f"{module}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: a notebook links to a package module that does not exist")
    body = highlight(path.read_text(), PythonLexer(), HtmlFormatter(linenos="table", full=True,
                                                                        title=f"tsq_utils/{module}.py"))
    nav = ('<nav style="font-family:sans-serif;font-size:14px;padding:6px 0"><a href="../index.html">Contents</a> · '
           f"tsq_utils/{module}.py</nav>")
    return _with_nav(body, nav)


def _has_error(nb) -> bool:
    """True when an executed notebook stopped on an error (an error output, or papermill's failed cell)."""
    return any(o.get("output_type") == "error" for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               ) or any(c.get("metadata", {}).get("papermill", {}).get("exception") for c in nb.cells)


def notebook_status(notebooks: Path) -> dict[str, tuple[str, Path | None]]:
    """{notebook file name: (status, file to render)} for the pipeline's notebooks and any other NN_*.ipynb there:
    "executed", "not executed" (no outputs), "failed" (its last run failed: run_all.sh's NN_x.failed.ipynb is newer
    than the last good NN_x.ipynb, or the notebook holds an error; the page shows the newest copy) or "missing"."""
    import nbformat

    from ..core.pipeline import PIPELINE

    notebooks = Path(notebooks)
    names = {s.notebook for s in PIPELINE.values()} | {p.name for p in notebooks.glob("*.ipynb")
                                                        if NOTEBOOK_RE.match(p.name)}
    out: dict[str, tuple[str, Path | None]] = {}
    for name in sorted(names):
        good, failed = notebooks / name, notebooks / f"{name[:-6]}.failed.ipynb"
        if failed.is_file() and (not good.is_file() or failed.stat().st_mtime >= good.stat().st_mtime):
            out[name] = ("failed", good if good.is_file() else failed)
        elif good.is_file():
            nb = nbformat.read(good, as_version=4)
            executed = any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
            out[name] = ("failed" if _has_error(nb) else "executed" if executed else "not executed", good)
        else:
            out[name] = ("missing", None)
    return out


def build(notebooks: Path, out: Path, method: Path | None = None) -> Path:
    """Render every NN_*.ipynb of `notebooks` (executed ones), docs/method.md and the linked package sources into
    `out`; returns the index page. Raises on a broken internal link or figure. The index says which notebooks failed
    or are missing (a missing one gets a page saying so, so the lessons' links to it still resolve)."""
    import nbformat

    notebooks, out = Path(notebooks), Path(out)
    method = Path(method) if method else REPO_ROOT / "docs" / "method.md"
    status = notebook_status(notebooks) if notebooks.is_dir() else {}
    if not any(st != "missing" for st, _ in status.values()):
        raise FileNotFoundError(f"{notebooks}: no NN_*.ipynb notebooks to build a book from (run ./run_all.sh first)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "src").mkdir(exist_ok=True)
    exp = _exporter()
    names = sorted(status)
    nbs = [nbformat.read(status[n][1], as_version=4) if status[n][1] else None for n in names]
    pages = [(n[:-6], _title(nb) if nb is not None else n[:-6]) for n, nb in zip(names, nbs)]
    sources: set[str] = set()
    for i, (name, nb, (stem, title)) in enumerate(zip(names, nbs, pages)):
        st, path = status[name]
        if nb is None:
            body = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{stem}</title></head>"
                    "<body style='font-family:sans-serif;max-width:820px;margin:2em auto'>"
                    f"<h1>{stem}</h1><p><b>Not run:</b> {name} is missing from <code>"
                    f"{html.escape(str(notebooks))}</code>. Run it with <code>./run_all.sh --only {stem[:2]}</code> "
                    "(after the notebooks before it), then rebuild the book.</p></body></html>")
            (out / f"{stem}.html").write_text(_with_nav(body, _nav(pages, i)))
            continue
        body, _ = exp.from_notebook_node(nb, resources={"metadata": {"name": title}})
        if st == "failed":
            what = ("its last run failed; this page shows the last good run" if path.name == name
                    else "its run failed; this page shows the failed run")
            banner = (f"<div style='background:#fde2e1;border:1px solid #d9534f;padding:8px 16px;"
                      f"font-family:sans-serif'><b>{html.escape(name)}: failed.</b> {what} (see "
                      f"{html.escape(f'{stem}.failed.ipynb')} and its .log in {html.escape(str(notebooks))}).</div>")
            body = _with_nav(body, banner)
        (out / f"{stem}.html").write_text(_with_nav(_rewrite_links(body, sources), _nav(pages, i)))
    # the method page: docs/method.md as a one-cell notebook, so that it renders (math included) like the lessons
    mnb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(method.read_text())])
    body, _ = exp.from_notebook_node(mnb, resources={"metadata": {"name": "The method, in our words"}})
    (out / "method.html").write_text(_with_nav(_rewrite_links(body, sources), _nav(pages, None)))
    executed = sum(st == "executed" for st, _ in status.values())
    failed = [n[:2] for n, (st, _) in status.items() if st == "failed"]
    missing = [n[:2] for n, (st, _) in status.items() if st == "missing"]
    note = {"failed": " <b>(failed)</b>", "missing": " <b>(missing: not run)</b>", "not executed": " (not executed)"}
    items = "".join(f'<li><a href="{s}.html">{html.escape(t)}</a>{note.get(status[n][0], "")}</li>'
                    for n, (s, t) in zip(names, pages))
    problems = "".join([f"; failed: {', '.join(failed)}" if failed else "",
                        f"; missing: {', '.join(missing)} (./run_all.sh --only {','.join(missing)})"
                        if missing else ""])
    index = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>tokensqueeze-companion</title></head>"
             f"<body style='font-family:sans-serif;max-width:820px;margin:2em auto'>{_nav(pages, None)}"
             "<h1>tokensqueeze-companion: the lessons</h1>"
             "<p>A notebook-first companion to TokenSqueeze (arXiv 2511.13223) and TLDR (arXiv 2506.02678). "
             "Each lesson is an executed notebook: the idea, the paper's equation and a few lines of code that "
             "re-implement it, the run at scale, its figures beside the paper's numbers, what you should have seen, "
             "and exercises.</p>"
             f"<p>Built from <code>{html.escape(str(notebooks))}</code> "
             f"({executed} of {len(nbs)} notebooks executed{html.escape(problems)}).</p>"
             f"<ol start='0'>{items}</ol><p><a href='method.html'>The method, in our words</a> (formulas, our "
             "choices, the papers' numbers).</p></body></html>")
    (out / "index.html").write_text(index)
    for module in sorted(sources):
        (out / "src" / f"{_page_name(module)}.html").write_text(_source_page(module))
    broken = check_links(out)
    if broken:
        raise ValueError(f"the book in {out} has {len(broken)} broken internal link(s) or figure(s): {broken[:10]}")
    if failed or missing:
        print(f"book: {executed} of {len(nbs)} notebooks executed{problems}")
    return out / "index.html"


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if v and ((tag == "a" and k == "href") or (tag in ("img", "script", "source") and k == "src")
                      or (tag == "link" and k == "href")):
                self.refs.append(v)


def check_links(out: Path) -> list[str]:
    """Internal links and figures of the book's pages that do not resolve to a file ('page -> target')."""
    out = Path(out)
    broken = []
    for page in sorted(out.rglob("*.html")):
        parser = _Refs()
        parser.feed(page.read_text())
        for ref in parser.refs:
            if re.match(r"^(?:[a-z]+:|//|#)", ref):  # http(s), data: (embedded figures), mailto, in-page anchors
                continue
            target = (page.parent / ref.split("#", 1)[0].split("?", 1)[0]).resolve()
            if not target.is_file():
                broken.append(f"{page.relative_to(out)} -> {ref}")
    return broken


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tsq_utils.lessons.book", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="toy", help="whose executed notebooks to use (default: toy)")
    ap.add_argument("--notebooks", type=Path, help="folder of executed notebooks (default: runs/<profile>/notebooks)")
    ap.add_argument("--out", type=Path, help="output folder (default: runs/<profile>/book)")
    args = ap.parse_args(argv)
    notebooks = args.notebooks or runs_root() / args.profile / "notebooks"
    out = args.out or runs_root() / args.profile / "book"
    try:
        index = build(notebooks, out)
    except (FileNotFoundError, ValueError) as e:
        print(f"book: {e}", file=sys.stderr)
        return 1
    print(f"book: {index} (open it in a browser)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
