"""Where a stage's files are: the stage names and their notebooks, the manifest's and summary's file names, and
paths as messages show them (relative to the repository)."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from . import config, pipeline

# Pipeline order: stage name -> its notebook under notebooks/ (pipeline.py's table: what each reads and writes).
STAGES: dict[str, str] = {name: row.notebook for name, row in pipeline.PIPELINE.items()}

MANIFEST = "manifest.json"
SUMMARY = "summary.json"


def check_stage(name: str) -> None:
    """Raise ValueError unless `name` is a pipeline stage."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")


def notebook_for(stage: str) -> str:
    """The notebook that produces a stage, as a repo-relative path (notebooks/NN_name.ipynb)."""
    check_stage(stage)
    return f"notebooks/{STAGES[stage]}"


def notebook_path(stage: str) -> Path:
    """The notebook file of a stage: under TSQ_NOTEBOOKS_DIR when set (as run_all.sh), else the repo's notebooks/."""
    check_stage(stage)
    folder = os.environ.get("TSQ_NOTEBOOKS_DIR") or config.REPO_ROOT / "notebooks"
    return Path(folder) / STAGES[stage]


def display_path(path: Path) -> str:
    """A path relative to the repository when it lies inside it, else absolute."""
    path = Path(path).absolute()
    try:
        return path.relative_to(config.REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


def check_relative(name: str, what: str) -> None:
    """Raise ValueError unless `name` is a relative path that stays inside its folder."""
    p = PurePosixPath(str(name).replace(os.sep, "/"))
    if not str(name) or p.is_absolute() or ".." in p.parts:
        raise ValueError(f"{what} {name!r} must be a relative path inside the stage folder")
