"""The base-model pointer (runs/<profile>/base_model/base_model.json): which model later stages load and hash.

Notebook 00 writes it; every later stage reads it. It lives in core because resume (core/stage.py) hashes the base
model through it, and core never imports the model layer (model/base_model.py loads what the pointer names).
"""

from __future__ import annotations

import json
from pathlib import Path

from .artifacts import atomic_write_json
from .config import REPO_ROOT

POINTER = "base_model.json"
# The kinds of model a pointer records, and the weights file resume hashes for each: a "toy" reasoner is always a
# local folder whose model.safetensors is hashed; a "hub" model is a hub id (the id is its own record) or a local
# folder (a stand-in or a pre-downloaded copy), hashed whole since it can change under the same path.
POINTER_KINDS: dict[str, str | None] = {"toy": "model.safetensors", "hub": None}


class CorruptStateError(ValueError):
    """A file of the run folder exists but cannot be used; the message names it and the fix."""


def _relative_ref(ref: str, run_dir: Path) -> tuple[str, str | None]:
    """(reference, base) for the pointer: a local folder inside the run folder or the repo is stored relative to it.

    So a run folder that is moved or copied keeps pointing at its own model (base "run") or the shipped one
    (base "repo"); a hub id, or a folder elsewhere, is stored as it is (base None).
    """
    path = Path(ref)
    if not path.is_absolute():
        return str(ref), None
    for base, root in (("run", run_dir), ("repo", REPO_ROOT)):
        try:
            return path.absolute().relative_to(Path(root).absolute()).as_posix(), base
        except ValueError:
            continue
    return str(ref), None


def write_pointer(stage_dir: Path, ref: str, kind: str, extra: dict | None = None) -> Path:
    """Record which model later stages load as the base (atomic); a folder in the run or repo is stored relative."""
    if kind not in POINTER_KINDS:
        raise ValueError(f"unknown model kind {kind!r}: use {' or '.join(map(repr, POINTER_KINDS))}")
    path = stage_dir / POINTER
    rel, base = _relative_ref(str(ref), Path(stage_dir).parent)
    record = {"model": rel, "kind": kind, **({"relative_to": base} if base else {}), **(extra or {})}
    atomic_write_json(path, record)
    return path


def read_pointer(run_dir: Path, profile_name: str) -> dict:
    """The base-model record written by notebook 00, its model resolved; a clear error when it is missing or corrupt."""
    path = run_dir / "base_model" / POINTER
    rerun = f"rerun notebooks/00_base_model.ipynb (profile {profile_name}) to rewrite it"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: run notebooks/00_base_model.ipynb first (profile {profile_name})"
        )
    try:
        ptr = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptStateError(f"{path} is not valid JSON ({e}): {rerun}") from None
    if not (isinstance(ptr, dict) and isinstance(ptr.get("model"), str) and ptr.get("kind") in POINTER_KINDS
            and ptr.get("relative_to", "run") in ("run", "repo")):
        raise CorruptStateError(f"{path} is not a base-model record (it needs a model and a kind, toy or hub): {rerun}")
    base = ptr.pop("relative_to", None)
    if base is not None:
        ptr["model"] = str((Path(run_dir) if base == "run" else REPO_ROOT) / ptr["model"])
    if POINTER_KINDS[ptr["kind"]] and not Path(ptr["model"]).is_dir():
        raise FileNotFoundError(f"the base model {ptr['model']} that {path} records is missing: {rerun} "
                                "(with -p force True if it says up to date)")
    return ptr


def base_ref(run_dir: Path, profile) -> tuple[str, str]:
    """(model reference, kind) of the base model that notebook 00 recorded for this profile."""
    ptr = read_pointer(run_dir, profile.name)
    return ptr["model"], ptr["kind"]


def base_inputs(run_dir: Path, profile) -> dict:
    """What later stages hash for resume: the pointer and the weights of a local model (a hub id is its own record)."""
    ptr = read_pointer(run_dir, profile.name)
    inputs = {"base_model": run_dir / "base_model" / POINTER}
    weights = POINTER_KINDS[ptr["kind"]]
    if weights:
        inputs["base_weights"] = Path(ptr["model"]) / weights
    elif Path(ptr["model"]).is_dir():
        # a local stand-in or a pre-downloaded copy can change under the same path
        inputs["base_weights"] = Path(ptr["model"])
    return inputs
