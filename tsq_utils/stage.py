"""The one-call notebook set-up and the stage bookkeeping: run folders, upstream artifacts, manifests, resume.

Resume: a stage is done (``Stage.is_done``) when its ``manifest.json`` exists, is marked complete, and
records the same stage name, the same notebook params, the same effective profile (every value, after
the params' dotted overrides), the same input names with the same SHA-256 of their contents, and every
recorded output still exists; ``force=True`` always reruns. Paths, timestamps and package versions are
recorded but not compared, so a moved run folder or an upgraded library does not trigger a rerun, and
any profile change does, even one in a section the stage does not read (the safe side).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from . import config
from .artifacts import atomic_open, atomic_write_json, package_versions, path_hash, read_json, to_json

# Pipeline order: stage name -> its notebook under notebooks/.
STAGES: dict[str, str] = {
    "base_model": "00_base_model.ipynb",
    "sampling": "01_sampling.ipynb",
    "selection": "02_selection.ipynb",
    "refinement": "03_kl_refinement.ipynb",
    "training": "04_dpo_l_training.ipynb",
    "evaluation": "05_evaluation.ipynb",
    "ablations": "06_ablations.ipynb",
    "tldr": "07_tldr.ipynb",
}

MANIFEST = "manifest.json"
SUMMARY = "summary.json"

# Profile values worth seeing in each stage's set-up summary (dotted keys).
_SIZE_KEYS: dict[str, tuple[str, ...]] = {
    "base_model": ("pretrain.retrain", "pretrain.n_tokens", "pretrain.hidden_size", "pretrain.num_layers"),
    "sampling": ("sampling.backend", "sampling.n", "sampling.temperature", "sampling.max_new_tokens"),
    "selection": ("selection.variant", "selection.alpha", "selection.max_pairs"),
    "refinement": ("refinement.enabled", "refinement.n_candidates", "refinement.window", "refinement.epsilon"),
    "training": ("training.epochs", "training.batch_size", "training.lr", "training.beta", "training.lam"),
    "evaluation": ("evaluation.n_samples", "evaluation.max_new_tokens", "evaluation.budget"),
    "ablations": ("evaluation.n_samples", "evaluation.max_new_tokens", "selection.alpha"),
    "tldr": ("tldr.max_steps", "tldr.batch_size", "tldr.update_every", "tldr.eta"),
}


class MissingArtifactError(FileNotFoundError):
    """An upstream artifact is missing; the message names the notebook to run first."""


def _check_stage(name: str) -> None:
    """Raise ValueError unless `name` is a pipeline stage."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")


def notebook_for(stage: str) -> str:
    """The notebook that produces a stage, as a repo-relative path (notebooks/NN_name.ipynb)."""
    _check_stage(stage)
    return f"notebooks/{STAGES[stage]}"


def display_path(path: Path) -> str:
    """A path relative to the repository when it lies inside it, else absolute."""
    path = Path(path).absolute()
    try:
        return path.relative_to(config.REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {dotted key: leaf value}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _get_dotted(obj: Any, dotted: str) -> Any:
    """getattr along a dotted path (profile.selection.alpha)."""
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _jsonable(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists, paths strings), for comparisons."""
    return json.loads(to_json(value, indent=None))


def _diff_keys(old: Mapping, new: Mapping) -> list[str]:
    """Dotted keys whose values differ between two nested mappings (added and removed keys included)."""
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, object()) != b.get(k, object()))


def _check_params(params: Mapping) -> dict[str, Any]:
    """Validate notebook params (string keys, JSON values) and return them as a plain dict."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict, got {type(params).__name__}")
    out = {}
    for key, value in params.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"params: keys must be non-empty strings, got {key!r}")
        try:
            to_json(value, indent=None)
        except (TypeError, ValueError) as e:
            raise ValueError(f"params[{key!r}]: not recordable in a manifest ({e})") from e
        out[key] = value
    return out


def _check_relative(name: str, what: str) -> None:
    """Raise ValueError unless `name` is a relative path that stays inside its folder."""
    p = PurePosixPath(str(name).replace(os.sep, "/"))
    if not str(name) or p.is_absolute() or ".." in p.parts:
        raise ValueError(f"{what} {name!r} must be a relative path inside the stage folder")


class Stage:
    """One notebook's stage: its profile, seed, folders, and manifest-based bookkeeping."""

    def __init__(self, name: str, profile: config.Profile, params: dict, force: bool, seed: int, threads: int) -> None:
        """Build the stage record; use setup_stage() rather than calling this directly."""
        self.name = name
        self.profile = profile
        self.params = params
        self.force = force
        self.seed = seed
        self.threads = threads
        self.run_dir = config.run_dir(profile)
        self.dir = self.run_dir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.figures = config.figures_dir(profile)
        self.notebook = notebook_for(name)
        self._started = time.perf_counter()
        # Input hashes computed by is_done, reused by finish so the manifest records what the stage read.
        self._hash_cache: dict[Path, str] = {}

    def __repr__(self) -> str:
        return f"Stage({self.name!r}, profile={self.profile.name!r}, seed={self.seed}, dir={display_path(self.dir)!r})"

    @property
    def manifest_path(self) -> Path:
        """The stage's manifest.json."""
        return self.dir / MANIFEST

    def require(self, upstream_stage: str, filename: str) -> Path:
        """Path of an upstream stage's artifact; MissingArtifactError naming the notebook to run if absent."""
        _check_stage(upstream_stage)
        _check_relative(filename, "artifact")
        path = self.run_dir / upstream_stage / filename
        if not path.exists():
            raise MissingArtifactError(
                f"{display_path(path)} is missing: run {notebook_for(upstream_stage)} first (profile {self.profile.name})"
            )
        return path

    def _input_hashes(self, inputs: Mapping[str, str | os.PathLike]) -> dict[str, dict[str, str]]:
        """{name: {path, sha256}} for the stage's inputs (files or folders)."""
        if not isinstance(inputs, Mapping):
            raise TypeError(f"inputs must be a dict of name -> path, got {type(inputs).__name__}")
        out = {}
        for key, p in inputs.items():
            path = Path(p).absolute()
            if not path.exists():
                raise FileNotFoundError(f"input {key!r}: {display_path(path)} does not exist")
            if path not in self._hash_cache:
                self._hash_cache[path] = path_hash(path)
            out[str(key)] = {"path": display_path(path), "sha256": self._hash_cache[path]}
        return out

    def stale_reason(self, inputs: Mapping[str, str | os.PathLike]) -> str | None:
        """Why the stage must run (a short sentence), or None when its manifest matches (see module doc)."""
        if self.force:
            return "force=True"
        if not self.manifest_path.is_file():
            return "no manifest.json yet"
        try:
            m = read_json(self.manifest_path)
        except (OSError, ValueError) as e:
            return f"manifest.json is unreadable ({e})"
        if not isinstance(m, dict) or m.get("complete") is not True:
            return "the previous run did not complete"
        if m.get("stage") != self.name:
            return f"manifest.json belongs to stage {m.get('stage')!r}"
        changed = _diff_keys(m.get("params") or {}, _jsonable(self.params))
        if changed:
            return f"params changed: {', '.join(changed)}"
        changed = _diff_keys(m.get("profile_config") or {}, _jsonable(self.profile.to_dict()))
        if changed:
            return f"profile values changed: {', '.join(changed)}"
        old = {k: v.get("sha256") for k, v in (m.get("inputs") or {}).items()}
        new = {k: v["sha256"] for k, v in self._input_hashes(inputs).items()}
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if changed:
            return f"inputs changed: {', '.join(changed)}"
        missing = [o for o in m.get("outputs") or [] if not (self.dir / o).exists()]
        if missing:
            return f"outputs missing: {', '.join(missing)}"
        return None

    def is_done(self, inputs: Mapping[str, str | os.PathLike]) -> bool:
        """True when a complete manifest matches these inputs, params and profile (and not force); says why."""
        reason = self.stale_reason(inputs)
        if reason is None:
            when = read_json(self.manifest_path).get("finished_at", "?")
            print(f"[{self.name}] up to date (finished {when}): reusing {display_path(self.dir)}; force=True reruns")
            return True
        print(f"[{self.name}] running: {reason}")
        return False

    def finish(
        self,
        inputs: Mapping[str, str | os.PathLike],
        outputs: list[str],
        summary: dict | None = None,
        extra: dict | None = None,
    ) -> dict:
        """Record the finished stage: summary.json (if given), then manifest.json, both atomically; return the manifest."""
        if isinstance(outputs, (str, os.PathLike)):
            raise TypeError("outputs must be a list of file names, not a single name")
        outputs = [str(o) for o in outputs]
        for o in outputs:
            _check_relative(o, "output")
        missing = [o for o in outputs if not (self.dir / o).exists()]
        if missing:
            raise FileNotFoundError(f"stage {self.name}: outputs not found in {display_path(self.dir)}: {', '.join(missing)}")
        input_hashes = self._input_hashes(inputs)
        if summary is not None:
            if not isinstance(summary, Mapping):
                raise TypeError(f"summary must be a dict, got {type(summary).__name__}")
            atomic_write_json(self.dir / SUMMARY, summary)
        manifest = {
            "stage": self.name,
            "notebook": self.notebook,
            "profile": self.profile.name,
            "profile_file": display_path(Path(self.profile.source_file)) if self.profile.source_file else "",
            "profile_config": self.profile.to_dict(),
            "params": self.params,
            "seed": self.seed,
            "threads": self.threads,
            "inputs": input_hashes,
            "outputs": outputs,
            "summary": SUMMARY if summary is not None else None,
            "versions": package_versions(),
            "wall_time_s": round(time.perf_counter() - self._started, 3),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "complete": True,
            "extra": extra or {},
        }
        # Written last: a manifest marked complete means every output above is in place.
        atomic_write_json(self.manifest_path, manifest)
        print(f"[{self.name}] finished in {manifest['wall_time_s']:.1f} s: {display_path(self.manifest_path)}")
        return manifest

    def manifest(self) -> dict:
        """The stage's manifest.json as a dict."""
        if not self.manifest_path.is_file():
            raise MissingArtifactError(
                f"{display_path(self.manifest_path)} is missing: run {self.notebook} first (profile {self.profile.name})"
            )
        return read_json(self.manifest_path)

    def save_fig(self, fig: Any, name: str, pdf: bool = False) -> Path:
        """Save a matplotlib figure as figures/<profile>/<name>.png (dpi 120), and .pdf if asked; return the PNG path."""
        stem = name[:-4] if name.endswith((".png", ".pdf")) else name
        if not stem or "/" in stem or os.sep in stem or stem.startswith("."):
            raise ValueError(f"figure name {name!r} must be a plain file name")
        png = self.figures / f"{stem}.png"
        with atomic_open(png, "wb") as f:
            fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
        if pdf:
            with atomic_open(self.figures / f"{stem}.pdf", "wb") as f:
                # No creation date, so re-running leaves an unchanged figure byte-identical.
                fig.savefig(f, format="pdf", bbox_inches="tight", metadata={"CreationDate": None})
        return png


def _summary_lines(st: Stage) -> list[str]:
    """The set-up summary a notebook prints under its setup cell."""
    p = st.profile
    d = p.data
    sizes = ", ".join(f"{k}={_get_dotted(p, k)}" for k in _SIZE_KEYS[st.name])
    versions = ", ".join(f"{k} {v}" for k, v in package_versions().items() if v)
    params = ", ".join(f"{k}={v!r}" for k, v in st.params.items()) or "(profile defaults)"
    if st.manifest_path.is_file():
        try:
            m = read_json(st.manifest_path)
            previous = f"manifest from {m.get('finished_at', '?')}" + ("" if m.get("complete") else " (incomplete)")
        except (OSError, ValueError):
            previous = "unreadable manifest.json"
    else:
        previous = "none"
    lines = [
        f"stage {st.name} ({st.notebook}), profile {p.name} ({display_path(Path(p.source_file))})",
        f"  model    : {p.model.source} {p.model.path} ({p.model.dtype}, device {p.device})",
        f"  seed     : {st.seed} (from run seed {p.seed})   threads: {st.threads}",
        f"  data     : train {d.train} x {d.n_train_problems}, eval {'/'.join(map(str, d.eval))} x {d.n_eval_problems}",
        f"  sizes    : {sizes}",
        f"  params   : {params}",
        f"  folders  : {display_path(st.dir)}, figures in {display_path(st.figures)}",
        f"  previous : {previous}" + ("   force=True: will rerun" if st.force else ""),
        f"  versions : {versions}",
    ]
    return lines


def setup_stage(stage: str, profile: str, params: dict | None = None, force: bool = False) -> Stage:
    """Load the profile (params with dotted names override it), seed, set threads, open the folders, print a summary.

    `params` are the notebook's knobs, recorded in the manifest and compared on resume. A key with a
    dot ("selection.alpha") overrides that profile value unless its value is None (None means "the
    profile's value"); other keys are recorded only. Bad values raise config.ProfileError.
    """
    _check_stage(stage)
    if not isinstance(profile, (str, os.PathLike)) or not str(profile):
        raise TypeError(f"profile must be a profile name or a path to a YAML file, got {profile!r}")
    if not isinstance(force, bool):
        raise TypeError(f"force must be True or False, got {force!r}")
    params = _check_params(params or {})
    overrides = {k: v for k, v in params.items() if "." in k and v is not None}
    try:
        prof = config.load_profile(str(profile), overrides)
    except config.ProfileError as e:
        if not overrides:
            raise
        given = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        raise config.ProfileError(f"{e} [profile values overridden by params: {given}]") from e
    seed = config.stage_seed(prof.seed, stage)
    threads = config.set_threads(prof.threads)
    config.seed_everything(seed)
    st = Stage(stage, prof, params, force, seed, threads)
    print("\n".join(_summary_lines(st)))
    return st
