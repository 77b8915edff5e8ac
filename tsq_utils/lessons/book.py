"""The book: the executed notebooks of one profile as a static HTML site, with the method page, the glossary and
the package sources they link to, and a check that every internal link, anchor and figure resolves.

    python -m tsq_utils.lessons.book                       # toy: runs/toy/notebooks -> runs/toy/book/index.html
    python -m tsq_utils.lessons.book --profile ci --out /tmp/book

Built with nbconvert (Jupyter's own converter; no download at build time). The book is one self-contained folder
that works with the network off: figures are embedded in the pages, MathJax 3 is copied in from the
django-static-mathjax package (formulas are typeset in the browser, as SVG, from that one file), widgets are drawn
as static HTML from the state the run saved (no widget JavaScript), and no page loads a script from the network.
A link to a package function (link text `module.function`) lands on that function's line of the source page.
"""

from __future__ import annotations

import argparse
import ast
import functools
import html
import importlib.util
import re
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import nbformat
from jinja2 import DictLoader
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer

from ..core.config import REPO_ROOT, runs_root
from ..core.pipeline import PIPELINE
from .book_widgets import static_widgets

NOTEBOOK_RE = re.compile(r"^\d\d_[A-Za-z0-9_]+\.ipynb$")
# the docs/ pages the book renders: (name, title); the lessons link to them as ../docs/<name>.md
DOC_PAGES = (("method", "The method, in our words"), ("glossary", "Glossary"), ("profiles", "Profile keys"))
PAPERS = (("TokenSqueeze", "2511.13223"), ("TLDR", "2506.02678"))
# Links as the notebooks and docs/*.md write them, relative to notebooks/ or docs/
_NB_LINK = re.compile(r"^(?:\.\./notebooks/)?(\d\d_[A-Za-z0-9_]+)\.ipynb(#.*)?$")
_DOC_LINK = re.compile(r"^(?:\.\./docs/|\./)?(" + "|".join(n for n, _ in DOC_PAGES) + r")\.md(#.*)?$")
_SRC_LINK = re.compile(r"^\.\./tsq_utils/([A-Za-z0-9_/]+)\.py(#.*)?$")
_LINE_ANCHOR = re.compile(r"^#L\d+$")
MATHJAX_DIR = "mathjax"
MATHJAX_FILE = "tex-svg-full.js"  # MathJax 3 in one file: TeX in (every extension), SVG out (glyphs as data, no font)
# nbconvert's lab template without the scripts it would load from a CDN: require.js (only the widget embedder
# needs it), the widget embedder (widgets are static HTML here), mermaid, and MathJax 2 (MathJax 3 from the book's
# own folder instead, with the delimiters nbconvert's configuration sets)
_TEMPLATE = r"""{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block html_head_js_mathjax -%}
<script>
window.MathJax = {
  tex: {inlineMath: [["$", "$"], ["\\(", "\\)"]], displayMath: [["$$", "$$"], ["\\[", "\\]"]],
        processEscapes: true, processEnvironments: true, tags: "ams"},
  svg: {fontCache: "global"},
  options: {enableMenu: false}
};
</script>
<script src="{{ resources.mathjax_url }}" defer></script>
{%- endblock html_head_js_mathjax -%}
"""


def _exporter(mathjax_url: str):
    # nbconvert is the dev extra's and slow to import (jinja2, mistune, bleach): loaded only when a book is built
    from nbconvert import HTMLExporter

    exp = HTMLExporter(template_name="lab", extra_loaders=[DictLoader({"book.html.j2": _TEMPLATE})],
                       template_file="book.html.j2")
    exp.exclude_input_prompt = True
    exp.exclude_output_prompt = True
    exp.mathjax_url = mathjax_url
    return exp


def mathjax_source() -> Path:
    """MathJax 3's es5 folder, as the django-static-mathjax package ships it."""
    spec = importlib.util.find_spec("mathjax")
    es5 = Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax" / "es5" if spec else None
    if es5 is None or not (es5 / MATHJAX_FILE).is_file():
        raise FileNotFoundError("django-static-mathjax is not installed (pip install -e .[dev]): the book needs its "
                                "MathJax files to typeset formulas offline")
    return es5


def copy_mathjax(out: Path) -> str:
    """Copy MathJax (one file, and its licence) into out/mathjax; returns the script URL the pages use."""
    target = Path(out) / MATHJAX_DIR
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mathjax_source() / MATHJAX_FILE, target / MATHJAX_FILE)
    licence = mathjax_source().parent / "LICENSE"
    if licence.is_file():
        shutil.copyfile(licence, target / "LICENSE")
    return f"{MATHJAX_DIR}/{MATHJAX_FILE}"


def github_slug(text: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _heading_anchors(page: str) -> str:
    """Give every heading GitHub's anchor as well as nbconvert's, so that links written for GitHub
    (glossary.md#kv-cache) land on the heading in the book too."""
    seen: dict[str, int] = {}

    def fix(m: re.Match) -> str:
        opening, level, old_id, inner = m.group(1), m.group(2), m.group(3), m.group(4)
        text = html.unescape(re.sub(r"<[^>]+>", "", re.sub(r'<a class="anchor-link".*?</a>', "", inner, flags=re.S)))
        slug = github_slug(text)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        slug = f"{slug}-{n}" if n else slug
        extra = f'<a id="{html.escape(slug)}"></a>' if slug and slug != old_id else ""
        return f"{opening}>{extra}{inner}</h{level}>"

    return re.sub(r'(<h([1-6]) id="([^"]*)"[^>]*)>(.*?)</h\2>', fix, page, flags=re.S)


def module_file(module: str) -> Path | None:
    """The file of a package module ('method/selection'), or of a package ('method/refinement': its __init__.py)."""
    base = REPO_ROOT / "tsq_utils" / module
    for path in (base.with_name(base.name + ".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@functools.lru_cache(maxsize=None)
def _definitions(module: str) -> tuple[dict[str, int], dict[str, str]]:
    """A module's ({name: line} of its functions and classes, methods as Class.method; {name: the sibling module it
    imports the name from} for its relative imports, so that a package's re-exports lead to the definition)."""
    path = module_file(module)
    tree = ast.parse(path.read_text()) if path else ast.Module(body=[], type_ignores=[])
    package = module if path and path.name == "__init__.py" else module.rpartition("/")[0]
    lines: dict[str, int] = {}
    imports: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            lines[node.name] = node.lineno
            if isinstance(node, ast.ClassDef):
                lines.update({f"{node.name}.{sub.name}": sub.lineno for sub in node.body
                              if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef))})
        elif isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            imports.update({a.asname or a.name: f"{package}/{node.module.replace('.', '/')}" for a in node.names})
    return lines, imports


def locate(module: str, name: str) -> tuple[str, int] | None:
    """(module, line) where `name` (a function, class or Class.method) is defined, following the module's relative
    re-exports; None when it does not define or import it."""
    for _ in range(5):
        lines, imports = _definitions(module)
        if name in lines:
            return module, lines[name]
        head = name.split(".")[0]
        if head not in imports:
            return None
        module = imports[head]
    return None


def source_target(module: str, fragment: str, link_text: str) -> tuple[str, str]:
    """(module, fragment) a link to a package module goes to in the book: the module that defines the function the
    link names (by its fragment, `#select_pairs`, or its link text, `selection.select_pairs`) and #L<its line>; a
    fragment #L<n> is kept; a link naming no function goes to the module itself."""
    module = module.removesuffix("/__init__")
    if _LINE_ANCHOR.match(fragment):
        return module, fragment
    wanted = fragment[1:] if fragment else re.sub(r"<[^>]+>|\(\)", "", html.unescape(link_text)).strip()
    parts = wanted.split(".")
    for k in range(len(parts)):  # the longest tail that the module knows: a.b.Class.method -> Class.method
        if (found := locate(module, ".".join(parts[k:]))):
            return found[0], f"#L{found[1]}"
    return module, fragment


def _rewrite_links(page: str, sources: set[str]) -> str:
    """Point the notebooks' links (NN_x.ipynb, ../docs/x.md, ../tsq_utils/x.py) at the book's own pages."""
    def fix(m: re.Match) -> str:
        url, rest, text = html.unescape(m.group(1)), m.group(2), m.group(3)
        if (nb := _NB_LINK.match(url)):
            new = f"{nb.group(1)}.html{nb.group(2) or ''}"
        elif (doc := _DOC_LINK.match(url)):
            new = f"{doc.group(1)}.html{doc.group(2) or ''}"
        elif (src := _SRC_LINK.match(url)):
            module, fragment = source_target(src.group(1), src.group(2) or "", text)
            sources.add(module)
            new = f"src/{_page_name(module)}.html{fragment}"
        else:
            return m.group(0)
        return f'<a href="{html.escape(new)}"{rest}>{text}</a>'

    return re.sub(r'<a href="([^"]*)"([^>]*)>(.*?)</a>', fix, page, flags=re.S)


_NAV_STYLE = ("position:sticky;top:0;z-index:10;background:#f6f6f6;border-bottom:1px solid #ddd;padding:6px 16px;"
              "font-family:sans-serif;font-size:14px")


def _nav(pages: list[tuple[str, str]], i: int | None) -> str:
    """A bar on top of every page: the contents, the method, the glossary, the previous and the next lesson."""
    parts = ['<a href="index.html">Contents</a>', '<a href="method.html">The method</a>',
             '<a href="glossary.html">Glossary</a>']
    if i is not None:
        if i > 0:
            parts.append(f'<a href="{pages[i - 1][0]}.html">← {html.escape(pages[i - 1][1])}</a>')
        if i + 1 < len(pages):
            parts.append(f'<a href="{pages[i + 1][0]}.html">{html.escape(pages[i + 1][1])} →</a>')
    # an anchor's target scrolls to below the sticky bar, not under it
    return (f'<style>[id]{{scroll-margin-top:44px}}</style><nav style="{_NAV_STYLE}">' + " · ".join(parts)
            + "</nav>")


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


def display_path(path: Path) -> str:
    """A folder as the book shows it: relative to the repository, else its last two parts (never a machine path)."""
    path = Path(path).resolve()
    try:
        return path.relative_to(REPO_ROOT.resolve()).as_posix()
    except ValueError:
        return "…/" + "/".join(path.parts[-2:])


_SOURCE_STYLE = ("<style>span[id^='L']:target{background:#fff3b0} td.linenos a{color:inherit;text-decoration:none}"
                 "</style></head>")


def _source_page(module: str) -> str:
    """A package module as a highlighted page whose line n has the anchor #Ln (GitHub's form)."""
    path = module_file(module)
    if path is None:
        raise FileNotFoundError(f"tsq_utils/{module}.py: a notebook links to a package module that does not exist")
    body = highlight(path.read_text(), PythonLexer(), HtmlFormatter(linenos="table", linespans="L", full=True,
                                                                    title=path.relative_to(REPO_ROOT).as_posix()))
    body = re.sub(r'<span id="L-(\d+)">', r'<span id="L\1">', body)
    body = re.sub(r'<span class="normal">(\d+)</span>', r'<a class="normal" href="#L\1">\1</a>', body)
    body = body.replace("</head>", _SOURCE_STYLE, 1)
    nav = ('<nav style="font-family:sans-serif;font-size:14px;padding:6px 0"><a href="../index.html">Contents</a> · '
           f"{path.relative_to(REPO_ROOT).as_posix()}</nav>")
    return _with_nav(body, nav)


def _has_error(nb) -> bool:
    """True when an executed notebook stopped on an error (an error output, or papermill's failed cell)."""
    return any(o.get("output_type") == "error" for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               ) or any(c.get("metadata", {}).get("papermill", {}).get("exception") for c in nb.cells)


def notebook_status(notebooks: Path) -> dict[str, tuple[str, Path | None]]:
    """{notebook file name: (status, file to render)} for the pipeline's notebooks and any other NN_*.ipynb there:
    "executed", "not executed" (no outputs), "failed" (its last run failed: run_all.sh's NN_x.failed.ipynb is newer
    than the last good NN_x.ipynb, or the notebook holds an error; the page shows the newest copy) or "missing"."""
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


class _Book:
    """One build: the output folder, the exporter, the lessons' (page, title) list and the sources linked so far."""

    def __init__(self, notebooks: Path, out: Path, status: dict[str, tuple[str, Path | None]]) -> None:
        self.notebooks, self.out, self.status = notebooks, out, status
        self.exporter = _exporter(copy_mathjax(out))
        self.names = sorted(status)
        self.nbs = [nbformat.read(status[n][1], as_version=4) if status[n][1] else None for n in self.names]
        self.pages = [(n[:-6], _title(nb) if nb is not None else n[:-6]) for n, nb in zip(self.names, self.nbs)]
        self.sources: set[str] = set()

    def render(self, nb, title: str) -> str:
        """A notebook as a book page body: widgets drawn static, headings with GitHub's anchors, links rewritten."""
        body, _ = self.exporter.from_notebook_node(static_widgets(nb), resources={"metadata": {"name": title}})
        return _rewrite_links(_heading_anchors(body), self.sources)

    def write(self, name: str, page: str) -> None:
        (self.out / name).write_text(page)

    def lesson(self, i: int) -> None:
        """The page of lesson i: the executed notebook, a failure banner, or a "not run" page."""
        name, nb, (stem, title) = self.names[i], self.nbs[i], self.pages[i]
        st, path = self.status[name]
        where = html.escape(display_path(self.notebooks))
        if nb is None:
            body = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{stem}</title></head>"
                    "<body style='font-family:sans-serif;max-width:820px;margin:2em auto'>"
                    f"<h1>{stem}</h1><p><b>Not run:</b> {name} is missing from <code>{where}</code>. Run it with "
                    f"<code>./run_all.sh --only {stem[:2]}</code> (after the notebooks before it), then rebuild the "
                    "book.</p></body></html>")
            self.write(f"{stem}.html", _with_nav(body, _nav(self.pages, i)))
            return
        body = self.render(nb, title)
        if st == "failed":
            what = ("its last run failed; this page shows the last good run" if path.name == name
                    else "its run failed; this page shows the failed run")
            banner = (f"<div style='background:#fde2e1;border:1px solid #d9534f;padding:8px 16px;"
                      f"font-family:sans-serif'><b>{html.escape(name)}: failed.</b> {what} (see "
                      f"{html.escape(f'{stem}.failed.ipynb')} and its .log in {where}).</div>")
            body = _with_nav(body, banner)
        self.write(f"{stem}.html", _with_nav(body, _nav(self.pages, i)))

    def doc(self, name: str, title: str) -> None:
        """docs/<name>.md as a one-cell notebook, so that it renders (math included) like the lessons."""
        text = (REPO_ROOT / "docs" / f"{name}.md").read_text()
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(text)])
        self.write(f"{name}.html", _with_nav(self.render(nb, title), _nav(self.pages, None)))

    def index(self) -> str:
        """The contents page; returns the summary of failed and missing notebooks ('' when all ran)."""
        status = self.status
        executed = sum(st == "executed" for st, _ in status.values())
        failed = [n[:2] for n, (st, _) in status.items() if st == "failed"]
        missing = [n[:2] for n, (st, _) in status.items() if st == "missing"]
        note = {"failed": " <b>(failed)</b>", "missing": " <b>(missing: not run)</b>",
                "not executed": " (not executed)"}
        items = "".join(f'<li><a href="{s}.html">{html.escape(t)}</a>{note.get(status[n][0], "")}</li>'
                        for n, (s, t) in zip(self.names, self.pages))
        problems = "".join([f"; failed: {', '.join(failed)}" if failed else "",
                            f"; missing: {', '.join(missing)} (./run_all.sh --only {','.join(missing)})"
                            if missing else ""])
        papers = " and ".join(f'{name} (<a href="https://arxiv.org/abs/{ref}">arXiv {ref}</a>)' for name, ref in PAPERS)
        self.write("index.html", (
            "<!DOCTYPE html><html><head><meta charset='utf-8'><title>tokensqueeze-companion</title></head>"
            f"<body style='font-family:sans-serif;max-width:820px;margin:2em auto'>{_nav(self.pages, None)}"
            f"<h1>tokensqueeze-companion: the lessons</h1><p>A notebook-first companion to {papers}. Each lesson is "
            "an executed notebook: the idea, the paper's equation and a few lines of code that re-implement it, the "
            "run at scale, its figures beside the paper's numbers, what you should have seen, and exercises.</p>"
            f"<p>Built from <code>{html.escape(display_path(self.notebooks))}</code> ({executed} of {len(self.nbs)} "
            f"notebooks executed{html.escape(problems)}).</p><ol start='0'>{items}</ol>"
            "<p><a href='method.html'>The method, in our words</a> (formulas, our choices, the papers' numbers) · "
            "<a href='glossary.html'>Glossary</a> (every term and letter the lessons use) · "
            "<a href='profiles.html'>Profile keys</a></p></body></html>"))
        return f"{executed} of {len(self.nbs)} notebooks executed{problems}" if failed or missing else ""


def build(notebooks: Path, out: Path) -> Path:
    """Render every NN_*.ipynb of `notebooks` (executed ones), the docs pages and the linked package sources into
    `out`; returns the index page. Raises on a broken internal link, anchor or figure. The index says which notebooks
    failed or are missing (a missing one gets a page saying so, so the lessons' links to it still resolve)."""
    notebooks, out = Path(notebooks), Path(out)
    status = notebook_status(notebooks) if notebooks.is_dir() else {}
    if not any(st != "missing" for st, _ in status.values()):
        raise FileNotFoundError(f"{display_path(notebooks)}: no NN_*.ipynb notebooks to build a book from (run "
                                "./run_all.sh first)")
    (out / "src").mkdir(parents=True, exist_ok=True)
    book = _Book(notebooks, out, status)
    for i in range(len(book.names)):
        book.lesson(i)
    for name, title in DOC_PAGES:
        book.doc(name, title)
    problems = book.index()
    for module in sorted(book.sources):
        book.write(f"src/{_page_name(module)}.html", _source_page(module))
    broken = check_links(out)
    if broken:
        raise ValueError(f"the book in {display_path(out)} has {len(broken)} broken internal link(s), anchor(s) or "
                         f"figure(s): {broken[:10]}")
    if (online := external_scripts(out)):
        raise ValueError(f"the book in {display_path(out)} would load {len(online)} script(s) from the network, so "
                         f"it would not work offline: {online[:5]}")
    if problems:
        print(f"book: {problems}")
    return out / "index.html"


class _Refs(HTMLParser):
    """The links, script and figure sources and the anchors (id, name) of one page."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.anchors: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if v and ((tag == "a" and k == "href") or (tag in ("img", "script", "source") and k == "src")
                      or (tag == "link" and k == "href")):
                self.refs.append(v)
            if v and k in ("id", "name"):
                self.anchors.add(v)


def _page_refs(page: Path) -> _Refs:
    parser = _Refs()
    parser.feed(page.read_text())
    return parser


def check_links(out: Path) -> list[str]:
    """Internal links, anchors and figures of the book's pages that do not resolve ('page -> target'). An anchor
    must exist on its page (#L12 on a source page, #kv-cache on the glossary, #x on the same page)."""
    out = Path(out)
    pages = {p.resolve(): _page_refs(p) for p in sorted(out.rglob("*.html")) if MATHJAX_DIR not in p.parts}
    broken = []
    for page, refs in pages.items():
        for ref in refs.refs:
            if re.match(r"^(?:[a-z]+:|//)", ref):  # http(s) links to papers, data: (embedded figures), mailto
                continue
            path, _, fragment = ref.partition("#")
            target = (page.parent / path.split("?", 1)[0]).resolve() if path else page
            if not target.is_file():
                broken.append(f"{page.relative_to(out.resolve())} -> {ref}")
            elif fragment and target in pages and html.unescape(fragment) not in pages[target].anchors:
                broken.append(f"{page.relative_to(out.resolve())} -> {ref} (no such anchor)")
    return broken


def external_scripts(out: Path) -> list[str]:
    """Scripts of the book that would come from the network: 'page: url' for a script src with a scheme or '//'
    and for an http(s) URL inside an inline script."""
    found = []
    for page in sorted(Path(out).rglob("*.html")):
        text = page.read_text()
        for src in re.findall(r"<script[^>]*\ssrc=[\"']([^\"']*)", text):
            if re.match(r"^(?:[a-z]+:|//)", src, re.I):
                found.append(f"{page.relative_to(out)}: {src}")
        for body in re.findall(r"<script[^>]*>(.*?)</script>", text, flags=re.S | re.I):
            found += [f"{page.relative_to(out)}: {u}" for u in re.findall(r"https?://[^\s'\"<>)]+", body)]
    return found


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
