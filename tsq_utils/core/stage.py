"""The one-call notebook set-up and the stage bookkeeping: run folders, upstream artifacts, manifests, resume.

What each stage reads and writes is one table, ``pipeline.PIPELINE``: its upstream artifacts (inputs), its
outputs, and the profile sections or dotted keys it depends on.

Resume: a stage is done (``Stage.is_done``) when its ``manifest.json`` exists, is marked complete, records the
same stage name, and

- the same notebook params of its own (a dotted param is a profile value, compared as one),
- the same values of exactly the profile keys the stage reads (``pipeline.profile_reads``), so an edit to a
  section it does not read (the ``tldr:`` section, for 01) reruns nothing,
- the same code: the normalized code (comments, docstrings and formatting do not count) of the tsq_utils
  modules the stage uses (``stage_modules``: what its notebook imports, transitively) and of the notebook's
  code cells (``fingerprint``), so after an edit to a module it uses the stage reruns, and the set-up summary
  says "code changed since the last run: tsq_utils/method/refinement.py". A stage the profile marks
  ``expensive`` keeps its outputs on a code change alone and says "kept: code changed since <commit>; pass
  --rerun-on-code-change" (``rerun_on_code_change=True``, or TSQ_RERUN_ON_CODE_CHANGE=1),
- the same input names with the same SHA-256 of their contents (a knob of stage X reruns X, and X's new
  outputs rerun what reads them: the downstream stages, ``pipeline.downstream``),
- and every recorded output still exists with the SHA-256 the manifest recorded for it;

``force=True`` always reruns. Paths, timestamps, the git commit and dirty flag, and package versions are
recorded but not compared, so a moved run folder, a commit of the same code, or an upgraded library does not
trigger a rerun. The whole effective profile is recorded too (``profile_config``), for reference.

Completion is a checkable fact: when ``is_done`` decides to recompute, it first marks the old manifest
incomplete, so a run that dies while rewriting outputs leaves nothing that passes for complete; the
manifest is written last (``finish``) with the hash of every output. ``require`` hands a later stage an
upstream artifact only when that stage's manifest is complete and the artifact still has the recorded
hash (and, for a table, at least one row). A stage that is reused (``is_done`` True) keeps its manifest
as it is: ``finish`` does not rewrite its ``finished_at`` or ``wall_time_s``.

Tables are checked against their schemas (``pipeline.SCHEMAS``) when a stage finishes and when a later stage
requires them; 00's manifest records the base weights' hash, and weights that no longer match it are refused as
overwritten (not taken as a new base). A killed run's temporary folders are removed when the stage is next set up.

Locking: ``setup_stage`` takes an exclusive lock on ``<stage folder>/.lock`` (released by ``finish`` or
when the process ends); a second process setting up the same stage of the same run folder fails at once
with ``StageBusyError`` naming the holder, instead of the two interleaving their outputs. A read-only run folder is
read without a lock (an up-to-date stage, its figures and summaries); a stage that must rerun there says so.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from . import config, fingerprint, pipeline
from .artifacts import (atomic_open, atomic_write_json, check_table, clean_leftovers, package_versions, path_hash,
                        read_json, table_rows, to_json)
from .pointer import base_inputs
from .stage_errors import EMPTY_HINTS, EmptyArtifactError, MissingArtifactError, StaleArtifactError
from .stage_lock import LOCK, READ_ONLY, StageBusyError, acquire_lock, release_lock
from .stage_paths import (MANIFEST, STAGES, SUMMARY, check_relative, check_stage, display_path, notebook_for,
                          notebook_path)
from .stage_summary import summary_lines

__all__ = [
    "LOCK", "MANIFEST", "STAGES", "SUMMARY", "EmptyArtifactError", "MissingArtifactError", "Stage", "StageBusyError",
    "StaleArtifactError", "display_path", "notebook_for", "notebook_path", "setup_stage", "stage_code",
    "stage_modules",
]

def _jsonable(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists, paths strings), for comparisons."""
    return json.loads(to_json(value, indent=None))


_MISSING = object()


def _diff_keys(old: Mapping, new: Mapping) -> list[str]:
    """Dotted keys whose values differ between two nested mappings (added and removed keys included)."""
    a, b = pipeline.flatten(old), pipeline.flatten(new)
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


# What a stage's fingerprint leaves out: the lessons only present a stage's results (figures, prose, widgets, quiet
# output), and a notebook redraws its figures on every run, done or not; an edit to them must not recompute a stage
# (it made 01 resample for four minutes). What a lesson module imports from the method is still counted where the
# notebook imports it too.
PRESENTATION = (f"{fingerprint.PACKAGE}.lessons",)


def stage_modules(stage: str) -> list[str]:
    """The tsq_utils modules a stage computes with: what its notebook's code cells import, the set-up (core.stage),
    and the stage table's `code`, with everything they import, transitively (fingerprint.module_closure); the
    lessons (PRESENTATION) left out."""
    roots = fingerprint.notebook_modules(notebook_path(stage)) | {__name__} | set(pipeline.spec(stage).code)
    return fingerprint.module_closure(roots, skip=PRESENTATION)


def stage_code(stage: str) -> dict[str, Any]:
    """A stage's code record: {"modules": {file: normalized hash} of stage_modules, "notebook": its code cells'
    normalized hash, "package": the whole package's hash (what the ablation cache's adoption compares)}."""
    return {"package": fingerprint.package_hash(), "notebook": fingerprint.notebook_hash(notebook_path(stage)),
            "modules": fingerprint.modules_hashes(stage_modules(stage))}


class Stage:
    """One notebook's stage: its profile, seed, folders, and manifest-based bookkeeping."""

    def __init__(self, name: str, profile: config.Profile, params: dict, force: bool, seed: int, threads: int,
                 rerun_on_code_change: bool = False) -> None:
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
        acquire_lock(self.dir, f"stage {name} ({self.notebook}) of {display_path(self.run_dir)}")
        for gone in clean_leftovers(self.dir):  # a killed run's temporary folders (this stage is ours now)
            print(f"[{name}] removed {display_path(gone)}, left by a run that was killed")
        self._started = time.perf_counter()
        # The code this session runs, compared with the manifest's: the normalized code of the modules the stage
        # uses (stage_modules) and of its notebook's code cells; the whole package's hash is recorded for the
        # ablation cache's adoption, not compared.
        self.code = stage_code(name)
        # rerun an expensive stage (profile.expensive) whose code alone changed (run_all.sh --rerun-on-code-change)
        self.rerun_on_code_change = bool(rerun_on_code_change)
        # "kept: code changed since ..." when settings_reason kept an expensive stage despite a code change
        self.kept_note: str | None = None
        # Input hashes computed by is_done, reused by finish so the manifest records what the stage read.
        self._hash_cache: dict[Path, str] = {}
        # The manifest is_done found up to date in this session (finish then keeps it as it is).
        self._reused: dict | None = None

    def __repr__(self) -> str:
        return f"Stage({self.name!r}, profile={self.profile.name!r}, seed={self.seed}, dir={display_path(self.dir)!r})"

    @property
    def manifest_path(self) -> Path:
        """The stage's manifest.json."""
        return self.dir / MANIFEST

    def require(self, upstream_stage: str, filename: str) -> Path:
        """Path of an upstream stage's artifact; MissingArtifactError naming the notebook to run if absent."""
        check_stage(upstream_stage)
        check_relative(filename, "artifact")
        path = self.run_dir / upstream_stage / filename
        nb = notebook_for(upstream_stage)
        if not path.exists():
            raise MissingArtifactError(f"{display_path(path)} is missing: run {nb} first (profile {self.profile.name})")
        mpath = self.run_dir / upstream_stage / MANIFEST
        rerun = f"rerun {nb} (profile {self.profile.name}; -p force True if it says up to date)"
        try:
            m = read_json(mpath)
        except FileNotFoundError:
            raise StaleArtifactError(f"{display_path(path)} has no record of a finished run ({display_path(mpath)} "
                                     f"is missing): {rerun}") from None
        except (OSError, ValueError) as e:
            raise StaleArtifactError(f"{display_path(mpath)} is unreadable ({e}): {rerun}") from None
        if not isinstance(m, dict) or m.get("complete") is not True or m.get("stage") != upstream_stage:
            raise StaleArtifactError(f"{display_path(path)} comes from a run of {nb} that did not complete "
                                     f"({display_path(mpath)} is not marked complete): {rerun}")
        hashes = m.get("output_hashes")
        top = PurePosixPath(str(filename).replace(os.sep, "/")).parts[0]
        if isinstance(hashes, dict) and top in hashes:
            top_path = (self.run_dir / upstream_stage / top).absolute()
            if top_path not in self._hash_cache:
                self._hash_cache[top_path] = path_hash(top_path)
            if self._hash_cache[top_path] != hashes[top]:
                raise StaleArtifactError(f"{display_path(top_path)} changed after {nb} finished (its sha256 differs "
                                         f"from the one in {display_path(mpath)}): {rerun}")
        if path.is_file() and path.suffix == ".parquet" and table_rows(path) == 0:
            hint = EMPTY_HINTS.get((upstream_stage, str(filename)), f"see the summary of {nb}")
            raise EmptyArtifactError(f"{display_path(path)} has no rows, so stage {self.name} has nothing to work on: "
                                     f"{hint}")
        columns = pipeline.schema(upstream_stage, str(filename))
        if columns and path.is_file():
            check_table(path, columns)  # a table whose hash was patched to match is still refused by its columns
        return path

    @property
    def spec(self) -> pipeline.StageSpec:
        """The stage's row of the stage table (pipeline.PIPELINE)."""
        return pipeline.spec(self.name)

    def inputs(self) -> dict[str, Path]:
        """The stage's inputs as the stage table declares them: upstream artifacts (via require) and the base model."""
        out: dict[str, Path] = {name: self.require(up, art) for name, (up, art) in self.spec.inputs.items()}
        if self.spec.base:
            out.update(base_inputs(self.run_dir, self.profile))
            if self.name != "base_model" and "base_weights" in out:
                self._check_base_weights(out["base_weights"])
        return out

    def _base_weights_record(self) -> dict | None:
        """What notebook 00's complete manifest recorded for the base weights ({path, sha256}), else None."""
        try:
            m = read_json(self.run_dir / "base_model" / MANIFEST)
        except (OSError, ValueError):
            return None
        if not isinstance(m, dict) or m.get("complete") is not True or m.get("stage") != "base_model":
            return None
        rec = (m.get("inputs") or {}).get("base_weights")
        return rec if isinstance(rec, dict) and isinstance(rec.get("sha256"), str) else None

    def _tampered_weights(self, path: Path, recorded: Mapping) -> StaleArtifactError:
        """The error for base weights that changed after notebook 00 recorded them."""
        where = display_path(Path(path))
        restore = (f"git checkout -- {where}" if where.startswith("checkpoints/")
                   else "rerun notebooks/00_base_model.ipynb")
        return StaleArtifactError(
            f"the base model's weights {where} changed after notebooks/00_base_model.ipynb recorded them (sha256 "
            f"{self._hash_cache.get(Path(path).absolute(), '?')[:12]}, recorded {str(recorded.get('sha256'))[:12]} in "
            f"{display_path(self.run_dir / 'base_model' / MANIFEST)}): something wrote over them (a copy of trained "
            f"weights?). Restore them ({restore}), or rerun notebook 00 with -p force True to adopt these weights "
            "as the base")

    def _check_base_weights(self, path: Path) -> None:
        """StaleArtifactError when the base weights no longer hash as notebook 00 recorded them (tampering, not a new
        base: a new base is notebook 00's to record)."""
        rec = self._base_weights_record()
        if rec is None:
            return
        key = Path(path).absolute()
        if key not in self._hash_cache:
            self._hash_cache[key] = path_hash(key)
        if self._hash_cache[key] != rec["sha256"]:
            raise self._tampered_weights(path, rec)

    def profile_reads(self) -> dict[str, Any]:
        """The profile values this stage reads ({dotted key: value}), as compared on resume."""
        return pipeline.profile_reads(self.name, _jsonable(self.profile.to_dict()))

    def _compared_params(self, params: Mapping) -> dict[str, Any]:
        """The params resume compares: the stage's own; a dotted one only if the stage does not read that profile key
        (one it reads is compared as a profile value, so -p 07:eta 4 with the profile's eta 4 changes nothing)."""
        return {k: v for k, v in params.items() if "." not in k or not pipeline.reads_key(self.name, k)}

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

    def stale_reason(self, inputs: Mapping[str, str | os.PathLike] | None = None) -> str | None:
        """Why the stage must run (a short sentence), or None when its manifest matches (see module doc).

        `inputs` default to the stage table's (Stage.inputs()).
        """
        if self.force:
            return "force=True"
        if not self.manifest_path.is_file():
            return "no manifest.json yet"
        try:
            m = read_json(self.manifest_path)
        except (OSError, ValueError) as e:
            return f"manifest.json is unreadable ({e})"
        if not isinstance(m, dict):
            return f"manifest.json holds a {type(m).__name__}, not a manifest"
        if m.get("complete") is not True:
            return "the previous run did not complete"
        if m.get("stage") != self.name:
            return f"manifest.json belongs to stage {m.get('stage')!r}"
        try:
            return self.settings_reason(m) or self._stale_reason(m, self.inputs() if inputs is None else inputs)
        except (AttributeError, TypeError, KeyError) as e:
            # a hand-edited or foreign manifest: rerun (and rewrite it) rather than trust or crash on it
            return f"manifest.json is malformed ({type(e).__name__}: {e})"

    def settings_reason(self, m: dict) -> str | None:
        """Why a complete manifest of this stage is stale before looking at files: its own params, the profile values
        the stage reads, or the code differ (a short sentence), else None."""
        old_params, new_params = self._compared_params(m.get("params") or {}), self._compared_params(self.params)
        changed = _diff_keys(old_params, _jsonable(new_params))
        if changed:
            return f"params changed: {', '.join(changed)}"
        old_reads, code = m.get("profile_reads"), m.get("code")
        if not isinstance(old_reads, dict) or not isinstance(code, dict):
            return "manifest.json records no profile reads or code fingerprint (written by an older version)"
        new_reads = self.profile_reads()
        changed = sorted(k for k in old_reads.keys() | new_reads.keys()
                         if old_reads.get(k, _MISSING) != new_reads.get(k, _MISSING))
        if changed:
            return f"profile values changed: {', '.join(changed)}"
        what = self.code_changes(code)
        if not what:
            return None
        if self.name in self.profile.expensive and not self.rerun_on_code_change:
            commit = code.get("git_commit")
            since = (f"commit {commit[:12]}" + (" + uncommitted changes" if code.get("git_dirty") else "")
                     if isinstance(commit, str) and commit else m.get("finished_at") or "the last run")
            self.kept_note = (f"kept: code changed since {since} ({', '.join(what)}); pass --rerun-on-code-change "
                              f"to rerun it (stage {self.name} is marked expensive on profile {self.profile.name})")
            return None
        return f"code changed since the last run: {', '.join(what)}"

    def code_changes(self, code: Mapping) -> list[str]:
        """What differs between a manifest's code record and this session's: changed, added or removed module files,
        and the notebook's code cells (empty when the code is the same)."""
        old = code.get("modules")
        if not isinstance(old, dict):
            return ["the tsq_utils source (the manifest records no per-module hashes: written by an older version)"]
        new = self.code["modules"]
        what = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if code.get("notebook") != self.code["notebook"]:
            what.append(f"the code cells of {self.notebook}")
        return what

    def _stale_reason(self, m: dict, inputs: Mapping[str, str | os.PathLike]) -> str | None:
        """stale_reason's file comparisons (inputs, outputs) against a complete manifest of this stage."""
        old = {k: v.get("sha256") for k, v in (m.get("inputs") or {}).items()}
        new = {k: v["sha256"] for k, v in self._input_hashes(inputs).items()}
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if self.name == "base_model" and "base_weights" in changed and "base_model" not in changed \
                and old.get("base_weights"):
            # the same settings and the same pointer, yet other weights: written over, not a new base
            raise self._tampered_weights(Path(inputs["base_weights"]), m["inputs"]["base_weights"])
        if changed:
            return f"inputs changed: {', '.join(changed)}"
        outputs = [str(o) for o in m.get("outputs") or []]
        missing = [o for o in outputs if not (self.dir / o).exists()]
        if missing:
            return f"outputs missing: {', '.join(missing)}"
        recorded = m.get("output_hashes")
        if not isinstance(recorded, dict):
            return "manifest.json records no output hashes (written by an older version)"
        changed = [o for o in outputs if recorded.get(o) != path_hash(self.dir / o)]
        if changed:
            return f"outputs changed since the manifest was written: {', '.join(changed)} (sha256 differs)"
        return None

    def _mark_incomplete(self, reason: str) -> None:
        """Mark an existing manifest incomplete before the stage recomputes (a crash then leaves no 'complete')."""
        if not self.manifest_path.exists():
            return
        try:
            m = read_json(self.manifest_path)
        except (OSError, ValueError):
            m = None
        if not isinstance(m, dict):
            m = {"stage": self.name}
        if m.get("complete") is False and m.get("rerun_started_at"):
            return
        m.update(complete=False, rerun_started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 rerun_reason=reason)
        atomic_write_json(self.manifest_path, m)

    def is_done(self, inputs: Mapping[str, str | os.PathLike] | None = None) -> bool:
        """True when a complete manifest matches these inputs (default: the table's), params, profile reads and code
        (and not force); says why."""
        reason = self.stale_reason(inputs)
        if reason is None:
            self._reused = read_json(self.manifest_path)
            when = self._reused.get("finished_at", "?")
            if self.kept_note:
                print(f"[{self.name}] {self.kept_note} (finished {when}): reusing {display_path(self.dir)}")
            else:
                print(f"[{self.name}] up to date (finished {when}): reusing {display_path(self.dir)}; "
                      "force=True reruns")
            return True
        self._reused = None
        if self.dir.absolute() in READ_ONLY:
            raise PermissionError(f"stage {self.name} must rerun ({reason}), but {display_path(self.dir)} is "
                                  "read-only: make the run folder writable (chmod -R u+w), or run into another "
                                  "folder (TSQ_RUNS_DIR)")
        print(f"[{self.name}] running: {reason}")
        self._mark_incomplete(reason)
        return False

    def finish(
        self,
        inputs: Mapping[str, str | os.PathLike] | None = None,
        outputs: list[str] | None = None,
        summary: dict | None = None,
        extra: dict | None = None,
    ) -> dict:
        """Record the finished stage: summary.json (if given), then manifest.json, both atomically; return the manifest.

        `inputs` default to the stage table's (Stage.inputs()); `outputs` to its outputs, with the optional ones
        that exist.
        """
        if inputs is None:
            inputs = self.inputs()
        outputs = self._checked_outputs(outputs)
        input_hashes = self._input_hashes(inputs)
        if summary is not None and not isinstance(summary, Mapping):
            raise TypeError(f"summary must be a dict, got {type(summary).__name__}")
        manifest = self._new_manifest(input_hashes, outputs, summary is not None, extra)
        summary_changed = summary is not None and not self._same_json(self.dir / SUMMARY, summary)
        kept = self._kept_manifest(manifest, summary_changed)
        if kept is not None:
            return kept
        if summary_changed:
            atomic_write_json(self.dir / SUMMARY, summary)
        # Written last: a manifest marked complete means every output above is in place, with these hashes.
        atomic_write_json(self.manifest_path, manifest)
        release_lock(self.dir)
        self._reused = _jsonable(manifest)
        print(f"[{self.name}] finished in {manifest['wall_time_s'] or 0:.1f} s: {display_path(self.manifest_path)}")
        return manifest

    def _checked_outputs(self, outputs: list[str] | None) -> list[str]:
        """The outputs finish records (default: the stage table's, the optional ones that exist), each a relative path
        that exists, and each table with its schema's columns."""
        if outputs is None:
            outputs = [*self.spec.outputs, *(o for o in self.spec.optional_outputs if (self.dir / o).exists())]
        if isinstance(outputs, (str, os.PathLike)):
            raise TypeError("outputs must be a list of file names, not a single name")
        outputs = [str(o) for o in outputs]
        for o in outputs:
            check_relative(o, "output")
        missing = [o for o in outputs if not (self.dir / o).exists()]
        if missing:
            raise FileNotFoundError(f"stage {self.name}: outputs not found in {display_path(self.dir)}: "
                                    f"{', '.join(missing)}")
        for o in outputs:
            columns = pipeline.schema(self.name, o)
            if columns and (self.dir / o).is_file():
                check_table(self.dir / o, columns)  # on write: a table with a wrong column is never marked complete
        return outputs

    def _new_manifest(self, input_hashes: dict, outputs: list[str], has_summary: bool, extra: dict | None) -> dict:
        """The manifest of this run of the stage, marked complete."""
        return {
            "stage": self.name,
            "notebook": self.notebook,
            "profile": self.profile.name,
            "profile_file": display_path(Path(self.profile.source_file)) if self.profile.source_file else "",
            "profile_config": self.profile.to_dict(),
            "profile_reads": self.profile_reads(),
            "params": self.params,
            "seed": self.seed,
            "threads": self.threads,
            "inputs": input_hashes,
            "outputs": outputs,
            "output_hashes": {o: path_hash(self.dir / o) for o in outputs},
            "code": {**self.code, **fingerprint.git_state()},
            "kept": self.kept_note,
            "summary": SUMMARY if has_summary else None,
            "versions": package_versions(),
            "wall_time_s": round(time.perf_counter() - self._started, 3),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "complete": True,
            "extra": extra or {},
        }

    def _kept_manifest(self, manifest: dict, summary_changed: bool) -> dict | None:
        """The manifest already on disk when it records this very run (the lock released), else None: finish then
        keeps when and how long the computation took instead of rewriting it."""
        if self._reused is not None and not self.force:
            # Reused, not recomputed: keep when and how long the computation took.
            # The code record too: the hashes match, and the git commit is the one the outputs were computed at.
            manifest.update(wall_time_s=self._reused.get("wall_time_s"), finished_at=self._reused.get("finished_at"),
                            code=self._reused.get("code", manifest["code"]))
            if not summary_changed and _jsonable(manifest) == self._reused:
                release_lock(self.dir)
                print(f"[{self.name}] up to date: {display_path(self.manifest_path)} kept "
                      f"(finished {manifest['finished_at']})")
                return self._reused
        elif not self.force and not summary_changed:
            # A stage that never asked is_done (06: its rows are cached one by one) and found nothing to redo: the
            # same outputs from the same inputs, settings and code. Keep when they were computed.
            prev = self._previous_complete()
            if prev is not None and all(_jsonable(manifest.get(k)) == prev.get(k) for k in _SAME_RUN_FIELDS) \
                    and _code_part(prev.get("code")) == _code_part(_jsonable(manifest["code"])):
                release_lock(self.dir)
                self._reused = prev
                print(f"[{self.name}] nothing changed: {display_path(self.manifest_path)} kept "
                      f"(finished {prev.get('finished_at')})")
                return prev
        return None

    def _previous_complete(self) -> dict | None:
        """The stage's current manifest when it is complete and this stage's, else None."""
        try:
            m = read_json(self.manifest_path)
        except (OSError, ValueError):
            return None
        return m if isinstance(m, dict) and m.get("complete") is True and m.get("stage") == self.name else None

    @staticmethod
    def _same_json(path: Path, obj: Any) -> bool:
        """True when a JSON file already holds exactly `obj` (as JSON)."""
        try:
            return read_json(path) == _jsonable(obj)
        except (OSError, ValueError):
            return False

    def manifest(self) -> dict:
        """The stage's manifest.json as a dict."""
        if not self.manifest_path.is_file():
            raise MissingArtifactError(
                f"{display_path(self.manifest_path)} is missing: run {self.notebook} first "
                f"(profile {self.profile.name})"
            )
        return read_json(self.manifest_path)

    def save_fig(self, fig: Any, name: str, pdf: bool = False) -> Path:
        """Save a matplotlib figure as figures/<profile>/<name>.png (dpi 120), and .pdf if asked; return the PNG."""
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


# What makes two finished runs of a stage the same run (finish keeps the earlier manifest, and its finished_at):
# everything but the timestamps, the wall time, the versions and git's state.
_SAME_RUN_FIELDS = ("profile", "profile_config", "profile_reads", "params", "seed", "threads", "inputs", "outputs",
                    "output_hashes", "summary", "extra")


def _code_part(code: Any) -> Any:
    """A manifest's code record without git's state (not compared: see the module doc)."""
    return {k: v for k, v in code.items() if k not in ("git_commit", "git_dirty")} if isinstance(code, dict) else code


def setup_stage(stage: str, profile: str, params: dict | None = None, force: bool = False,
                rerun_on_code_change: bool | None = None) -> Stage:
    """Load the profile (params with dotted names override it), seed, set threads, open the folders, print a summary.

    `params` are the notebook's knobs, recorded in the manifest and compared on resume. A key with a
    dot ("selection.alpha") overrides that profile value unless its value is None (None means "the
    profile's value"); other keys are recorded only. Bad values raise config.ProfileError.
    """
    check_stage(stage)
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
    if rerun_on_code_change is None:  # run_all.sh --rerun-on-code-change sets it for every notebook
        rerun_on_code_change = os.environ.get("TSQ_RERUN_ON_CODE_CHANGE", "") not in ("", "0")
    if not isinstance(rerun_on_code_change, bool):
        raise TypeError(f"rerun_on_code_change must be True or False, got {rerun_on_code_change!r}")
    st = Stage(stage, prof, params, force, seed, threads, rerun_on_code_change)
    print("\n".join(summary_lines(st)))
    return st
