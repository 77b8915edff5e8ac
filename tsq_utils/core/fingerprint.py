"""The code a result was computed with: a hash of the tsq_utils source and of a notebook's code cells, and git's state.

Resume and the ablation cache compare the hashes, so an edit to the package (or to a stage's notebook code) is
noticed instead of a stale artifact being reused. The hashes are of the source text, so any edit counts, a comment
included (the safe side); a notebook's outputs, metadata and markdown cells do not. The git commit and whether the
work tree has uncommitted changes are recorded beside them (not compared: the hashes already say whether the code
differs, and a run folder copied to a machine without git still resumes).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]

# package folder -> (stat signature of its .py files, hash): the hash is recomputed only when a file changed.
_PACKAGE_CACHE: dict[Path, tuple[tuple, str]] = {}
# this process's package hash, taken once (package_hash())
_SESSION: dict[str, str] = {}


def _py_files(root: Path) -> list[Path]:
    """The package's .py files (sub-packages included, __pycache__ not), sorted by relative path."""
    files = (p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def package_hash(root: str | os.PathLike | None = None) -> str:
    """SHA-256 of the package source: every .py file's relative path and bytes, in sorted order.

    Without `root`, of this package as this process first saw it: the code a session runs is the code it
    imported, so an edit made while a notebook's kernel runs is noticed by the next session, not halfway
    through this one (where it would, say, re-key half of an ablation run).
    """
    if root is None:
        if "package" not in _SESSION:
            _SESSION["package"] = package_hash(PACKAGE_DIR)
        return _SESSION["package"]
    root = Path(root).resolve()
    files = _py_files(root)
    signature = tuple((p.relative_to(root).as_posix(), st.st_mtime_ns, st.st_size) for p in files for st in [p.stat()])
    cached = _PACKAGE_CACHE.get(root)
    if cached and cached[0] == signature:
        return cached[1]
    h = hashlib.sha256()
    for p in files:
        # a NUL cannot appear in a path: entries cannot run into each other
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    _PACKAGE_CACHE[root] = (signature, h.hexdigest())
    return h.hexdigest()


def notebook_code(path: str | os.PathLike) -> list[str]:
    """The sources of a notebook's code cells, in order (markdown cells, outputs and metadata left out)."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    out = []
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            src = cell.get("source", "")
            out.append("".join(src) if isinstance(src, list) else str(src))
    return out


def notebook_hash(path: str | os.PathLike) -> str | None:
    """SHA-256 of a notebook's code cells (notebook_code); None when the notebook is absent or not a notebook."""
    try:
        cells = notebook_code(path)
    except (OSError, ValueError, AttributeError):
        return None
    return hashlib.sha256(json.dumps(cells, ensure_ascii=False).encode()).hexdigest()


def git_state(repo: str | os.PathLike | None = None) -> dict:
    """{"git_commit": HEAD's hash, "git_dirty": tracked files changed since}; None for each when git cannot say."""
    repo = Path(repo) if repo is not None else PACKAGE_DIR.parent

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    dirty = None if status is None else bool(status.strip())
    return {"git_commit": commit.strip() if commit else None, "git_dirty": dirty}
