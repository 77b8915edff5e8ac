"""Render the generated parts of the docs from the code, so they cannot drift from it.

    python scripts/render_docs.py            # rewrite docs/profiles.md and the generated blocks of docs/architecture.md
    python scripts/render_docs.py --check    # exit 1 naming what is out of date (tests/test_docs.py runs this check)
    python scripts/render_docs.py --counts   # print the package tree with line counts (for release notes)

Generated: docs/profiles.md (every profile key, from tsq_utils/core/profile_schema.py), and in docs/architecture.md the
module tree (each module's docstring's first paragraph) and the stage table (tsq_utils/core/pipeline.py), each
between a pair of `<!-- generated: NAME -->` / `<!-- end generated: NAME -->` lines; the prose around them is
written by hand.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tsq_utils.core import pipeline, profile_doc  # noqa: E402

PACKAGE = REPO / "tsq_utils"
ARCHITECTURE = REPO / "docs" / "architecture.md"
# The layers, bottom to top (tests/test_layers.py checks imports follow this order), and what each holds.
LAYERS = {
    "core": "infrastructure: profiles, the stage table, stages and resume, artifacts, run_all's checks",
    "task": "the task: problems, prompt, grading, oracle, the think/answer format and step splitting",
    "model": "the model: loading the base model, generation (transformers, vLLM), the toy reasoner",
    "method": "the method: sampling, selection, refinement, DPO-L, evaluation, TLDR",
    "ablations": "notebook 06's rows, cache, runner and report, through the method's own functions",
    "lessons": "the teaching helpers: figures, the palette, generated lesson text, the book",
}


def summary(path: Path) -> str:
    """A module's docstring's first paragraph, on one line."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return " ".join(doc.split("\n\n")[0].split()) or "(no docstring)"


def modules(layer: str) -> list[Path]:
    """The .py files of a layer, the package's __init__ first."""
    files = sorted(p for p in (PACKAGE / layer).rglob("*.py") if "__pycache__" not in p.parts)
    return sorted(files, key=lambda p: (p.name != "__init__.py", p.relative_to(PACKAGE).as_posix()))


def module_tree() -> str:
    """The package's modules by layer, one line each (an empty __init__.py is left out)."""
    lines = []
    for layer, what in LAYERS.items():
        lines += [f"**`tsq_utils/{layer}/`** ({what})", ""]
        for p in modules(layer):
            if p.name == "__init__.py" and not p.read_text(encoding="utf-8").strip():
                continue
            lines.append(f"- `{p.relative_to(PACKAGE).as_posix()}`: {summary(p)}")
        lines.append("")
    unknown = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()
                     and p.name not in LAYERS)
    if unknown:
        raise SystemExit(f"render_docs: sub-packages {unknown} are in no layer; add them to LAYERS")
    return "\n".join(lines)


BLOCKS = {"modules": module_tree, "stages": pipeline.stage_table}


def render_architecture(text: str) -> str:
    """The architecture page with every generated block replaced by its current rendering."""
    for name, render in BLOCKS.items():
        start, end = f"<!-- generated: {name} -->", f"<!-- end generated: {name} -->"
        pattern = re.compile(re.escape(start) + r"\n.*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise SystemExit(f"render_docs: {ARCHITECTURE} lacks the lines {start} ... {end}")
        body = render().rstrip("\n")
        text = pattern.sub(lambda _: f"{start}\n{body}\n{end}", text)
    return text


def outdated() -> dict[Path, str]:
    """Each generated file whose content differs from its rendering: path -> the rendered content."""
    out = {}
    want = profile_doc.profile_reference()
    if not profile_doc.PROFILES_DOC.exists() or profile_doc.PROFILES_DOC.read_text(encoding="utf-8") != want:
        out[profile_doc.PROFILES_DOC] = want
    have = ARCHITECTURE.read_text(encoding="utf-8")
    want = render_architecture(have)
    if want != have:
        out[ARCHITECTURE] = want
    return out


def counts() -> str:
    """The package tree with line counts, by layer."""
    lines, total = [], 0
    for layer in LAYERS:
        files = modules(layer)
        n = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in files)
        total += n
        lines.append(f"tsq_utils/{layer}/  ({n} lines)")
        for p in files:
            lines.append(f"    {p.relative_to(PACKAGE / layer).as_posix():<22} "
                         f"{len(p.read_text(encoding='utf-8').splitlines()):>5}")
    return "\n".join(lines + [f"total {total} lines"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check; exit 1 naming the files that are out of date")
    ap.add_argument("--counts", action="store_true", help="print the package tree with line counts and exit")
    args = ap.parse_args(argv)
    if args.counts:
        print(counts())
        return 0
    stale = outdated()
    if args.check:
        for path in stale:
            print(f"{path.relative_to(REPO)} is out of date: run python scripts/render_docs.py", file=sys.stderr)
        return 1 if stale else 0
    for path, text in stale.items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
