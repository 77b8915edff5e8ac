"""The generated parts of the docs match the code: docs/profiles.md, and the module list and stage table of
docs/architecture.md (scripts/render_docs.py renders them); the links between the docs resolve."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def render_docs():
    """scripts/render_docs.py as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("render_docs", REPO / "scripts" / "render_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_docs_are_up_to_date():
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "render_docs.py"), "--check"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_an_edited_generated_block_is_caught_and_restored():
    rd = render_docs()
    text = rd.ARCHITECTURE.read_text(encoding="utf-8")
    assert rd.render_architecture(text) == text
    edited = text.replace("- `core/config.py`: ", "- `core/config.py`: (stale) ", 1)
    assert edited != text and rd.render_architecture(edited) == text
    # the prose outside the blocks is kept as written
    prose = text.replace("## Artifacts", "## Artifacts (edited by hand)", 1)
    assert rd.render_architecture(prose) == prose


def test_a_missing_block_is_an_error_naming_it():
    rd = render_docs()
    text = rd.ARCHITECTURE.read_text(encoding="utf-8").replace("<!-- end generated: stages -->", "")
    with pytest.raises(SystemExit, match="end generated: stages"):
        rd.render_architecture(text)


def test_module_list_names_every_module_and_stage_table_every_stage():
    from tsq_utils.core.pipeline import PIPELINE

    rd = render_docs()
    tree = rd.module_tree()
    for p in (REPO / "tsq_utils").rglob("*.py"):
        rel = p.relative_to(REPO / "tsq_utils").as_posix()
        if "/" in rel and (p.name != "__init__.py" or p.read_text(encoding="utf-8").strip()):
            assert f"`{rel}`" in tree, rel
    table = rd.pipeline.stage_table()
    assert all(f"| `{s.notebook[:-6]}` | {name} |" in table for name, s in PIPELINE.items())
    assert "| selection: `pairs.parquet`, the base model |" in table  # 03 reads 02's pairs and the base model


@pytest.mark.parametrize("doc", ["README.md", "docs/architecture.md", "docs/profiles.md", "docs/method.md"])
def test_relative_links_in_the_docs_resolve(doc):
    path = REPO / doc
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8"))
    missing = [t for t in links if "://" not in t and not (path.parent / t).exists()]
    assert not missing, f"{doc} links to missing files: {missing}"
