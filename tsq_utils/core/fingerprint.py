"""The code a result was computed with: hashes of the tsq_utils modules a stage uses and of a notebook's code cells,
and git's state.

Resume and the ablation cache compare the hashes, so an edit to the code is noticed instead of a stale artifact
being reused. The hashes are of the *normalized* code (normalized_code: the syntax tree without docstrings), so a
comment, a docstring or a reformatting changes nothing; a notebook's outputs, metadata and markdown cells do not
count either. A stage's code is the modules it uses (module_closure: what its notebook imports, transitively), so
an edit to method/refinement.py reruns 03 and what reads its outputs, not 01. The git commit and whether the work
tree has uncommitted changes are recorded beside them (not compared: the hashes already say whether the code
differs, and a run folder copied to a machine without git still resumes).
"""

from __future__ import annotations

import ast
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
    """SHA-256 of the package's code: every .py file's relative path and normalized code (normalized_code: comments,
    docstrings and formatting do not count), in sorted order.

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
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + bytes.fromhex(_module_info(p, root)[0]))
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
    """SHA-256 of a notebook's code cells (notebook_code), each normalized (normalized_code: comments and formatting
    do not count; a cell that does not parse, such as one with a magic, counts as written); None when the notebook
    is absent or not a notebook."""
    try:
        cells = notebook_code(path)
    except (OSError, ValueError, AttributeError):
        return None
    return hashlib.sha256(json.dumps([normalized_code(c) for c in cells], ensure_ascii=False).encode()).hexdigest()


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


# --------------------------------------------------------------------------- normalized code, per stage

PACKAGE = PACKAGE_DIR.name  # "tsq_utils"

# Packages whose function-level (lazy) imports module_closure does not follow: the lessons' display helpers each
# import the method module of the one lesson that calls them, and that lesson's notebook imports it itself.
LAZY_NOT_FOLLOWED = (f"{PACKAGE}.lessons",)

# file -> (stat signature, normalized hash, tsq_utils modules it imports at import time, all it imports)
_MODULE_CACHE: dict[Path, tuple[tuple, str, frozenset, frozenset]] = {}


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    """Drop the docstring of the module and of every class and function (a body left empty gets a `pass`)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def normalized_code(source: str | bytes) -> str:
    """The code of a Python source as its syntax tree (ast.dump, no line numbers) with docstrings dropped: comments,
    docstrings, blank lines and formatting do not count. Source that does not parse is returned as it is."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return source.decode("utf-8", "replace") if isinstance(source, bytes) else source
    return ast.dump(_strip_docstrings(tree), include_attributes=False)


def code_hash(source: str | bytes) -> str:
    """SHA-256 of normalized_code(source)."""
    return hashlib.sha256(normalized_code(source).encode()).hexdigest()


def module_file(module: str, root: Path | None = None) -> Path | None:
    """The file of a tsq_utils module ("tsq_utils.method.refinement"), or None when there is none."""
    root = PACKAGE_DIR if root is None else Path(root)
    parts = module.split(".")
    if not parts or parts[0] != PACKAGE:
        return None
    base = root.joinpath(*parts[1:])
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [PACKAGE, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level(tree: ast.AST):
    """The nodes of a module that run when it is imported: its body and the bodies of module-level if/try/with
    blocks and class bodies, not function bodies."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        todo.extend(ast.iter_child_nodes(node))


def imported_modules(tree: ast.AST, current: str | None = None, is_package: bool = False,
                     root: Path | None = None, lazy: bool = True) -> set[str]:
    """The tsq_utils modules a syntax tree imports, with the packages whose __init__ an import runs: anywhere in it
    (lazy=True: function bodies included, the safe side) or only what runs at import (lazy=False). `current` is the
    importing module's name (for relative imports)."""
    root = PACKAGE_DIR if root is None else Path(root)
    found: set[str] = set()

    def add(name: str) -> None:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ too
            if module_file(".".join(parts[:i]), root) is not None:
                found.add(".".join(parts[:i]))

    nodes = ast.walk(tree) if lazy else _top_level(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == PACKAGE:
                    add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if current is None:
                    continue
                pkg = current.split(".") if is_package else current.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != PACKAGE:
                continue
            add(base)
            for a in node.names:
                if module_file(f"{base}.{a.name}", root) is not None:
                    add(f"{base}.{a.name}")
        elif lazy and isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and node.value.startswith(PACKAGE + ".") and module_file(node.value, root) is not None:
            add(node.value)  # a module run by name: python -m tsq_utils.method.train_entry, a stand-in model
    return found


def _module_info(path: Path, root: Path) -> tuple[str, frozenset, frozenset]:
    """(normalized hash, tsq_utils modules imported at import time, all imported ones) of a package file, cached on
    its stat signature."""
    st = path.stat()
    sig = (st.st_mtime_ns, st.st_size)
    cached = _MODULE_CACHE.get(path)
    if cached and cached[0] == sig:
        return cached[1], cached[2], cached[3]
    src = path.read_bytes()
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError):
        info = (hashlib.sha256(src).hexdigest(), frozenset(), frozenset())
    else:
        name = _module_name(path, root)
        pkg = path.name == "__init__.py"
        eager = imported_modules(tree, name, pkg, root, lazy=False)
        every = imported_modules(tree, name, pkg, root, lazy=True)
        info = (hashlib.sha256(ast.dump(_strip_docstrings(tree), include_attributes=False).encode()).hexdigest(),
                frozenset(eager), frozenset(every))
    _MODULE_CACHE[path] = (sig, *info)
    return info


def _skipped(module: str, skip) -> bool:
    """True when a module is named in `skip` or lies inside a package named there."""
    return any(module == s or module.startswith(s + ".") for s in skip)


def module_closure(roots, root: str | os.PathLike | None = None, skip=()) -> list[str]:
    """The tsq_utils modules `roots` use: themselves and every module they import, transitively (sorted), function
    bodies included except in LAZY_NOT_FOLLOWED; modules named in `skip` or inside a package named there (and what
    only they import) are left out."""
    root = PACKAGE_DIR if root is None else Path(root).resolve()
    seen: set[str] = set()
    todo = [m for m in roots if not _skipped(m, skip)]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        path = module_file(m, root)
        if path is None:
            continue
        seen.add(m)
        _, eager, every = _module_info(path, root)
        lazy_ok = not any(m == p or m.startswith(p + ".") for p in LAZY_NOT_FOLLOWED)
        todo.extend(i for i in (every if lazy_ok else eager) if i not in seen and not _skipped(i, skip))
    return sorted(seen)


def modules_hashes(modules, root: str | os.PathLike | None = None) -> dict[str, str]:
    """{module file relative to the repository (tsq_utils/method/refinement.py): normalized code hash}."""
    root = PACKAGE_DIR if root is None else Path(root).resolve()
    out = {}
    for m in modules:
        path = module_file(m, root)
        if path is not None:
            out[f"{PACKAGE}/{path.relative_to(root).as_posix()}"] = _module_info(path, root)[0]
    return dict(sorted(out.items()))


def notebook_modules(path: str | os.PathLike) -> set[str]:
    """The tsq_utils modules a notebook's code cells import (cells that do not parse, e.g. magics, are scanned line
    by line); none when the notebook is absent."""
    found: set[str] = set()
    try:
        cells = notebook_code(path)
    except (OSError, ValueError, AttributeError):  # absent or not a notebook (as notebook_hash)
        return found
    for cell in cells:
        try:
            found |= imported_modules(ast.parse(cell))
        except (SyntaxError, ValueError):
            for line in cell.splitlines():
                try:
                    found |= imported_modules(ast.parse(line.strip()))
                except (SyntaxError, ValueError):
                    pass
    return found


# this process's code hash of a set of root modules, taken once (code_of): the code a session runs is the code it
# imported (as package_hash)
_CODE_OF: dict[tuple[str, ...], str] = {}


def code_of(*roots: str) -> str:
    """SHA-256 of the normalized code of the modules `roots` use (module_closure), taken once per process: the key of
    what a computation through those modules ran (the ablation cache keys on the tsq_utils.ablations closure, so an
    edit to a lesson's figure or to TLDR re-keys nothing)."""
    if roots not in _CODE_OF:
        hashes = modules_hashes(module_closure(roots))
        _CODE_OF[roots] = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
    return _CODE_OF[roots]


def files_unchanged(recorded: dict) -> bool:
    """True when every module file of a manifest's code record ({tsq_utils/x/y.py: normalized hash}) still has that
    normalized code (a file gone counts as changed)."""
    root = PACKAGE_DIR
    for rel, sha in recorded.items():
        path = root.parent / rel if rel.startswith(PACKAGE + "/") else None
        if path is None or not path.is_file() or _module_info(path, root)[0] != sha:
            return False
    return True
