"""The ablation cache: keys, entries, adoption of the pipeline's own artifacts, and twins.

Every intermediate artifact lives in runs/<profile>/ablations/cache/<key>/, written atomically (a temp folder
renamed into place, so an entry that exists is complete), where key hashes exactly what determines it. Entries are
content-addressed and cannot lie: their files are copies (reflinks where the file system has them), never hard
links to a stage's files; meta.json records the sha256 of each file and every reuse verifies them (and the tables'
columns, pipeline.SCHEMAS): an entry that fails is said and recomputed. `python -m tsq_utils.ablations.cache
list|verify|prune` lists, verifies and prunes entries (by age, by code, to a size; cache_entries.py). What each
key covers is in cache_keys.py.

Adoption. Before computing an entry, a row checks the pipeline's own stage (02 selection, 03 refinement,
04 training, 05 evaluation): when that stage's manifest is complete, the modules it ran are unchanged, its
recorded inputs have the same hashes, its files still have the hashes it recorded, and the key its recorded
settings give equals the row's key, its files are copied into the cache instead of recomputed. Evaluation is
adopted only when the ablation evaluation has notebook 05's size. The file names are the stage table's
(core/pipeline.py), so entries hold the same files as the stages.

Twins. Rows with different selection settings can still give the very same pairs (at N = 8 samples, Q-DYN with
any α ≤ 0.5 takes one positive per problem, exactly as Shortest). Before training, a row looks up
cache/twins/<hash of the pairs' texts and its training settings>; when another key already trained on that
content with those settings, its model (and its results, evaluated the same way) are copied instead of
recomputed: the same computation, run once.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no reflinks, entries are plain copies
    fcntl = None  # type: ignore[assignment]

from ..core import fingerprint, pipeline
from ..core.artifacts import atomic_dir, atomic_write_json, dir_hash, file_hash, load_table, read_json, save_table
from ..core.config import RefinementConfig, SelectionConfig, TrainingConfig
from ..core.stage import MANIFEST, notebook_for
from ..method import refinement
from .cache_entries import CACHE_META, TWINS, entries, entry_files, hash_once, main, prune, verify, verify_entry
from .cache_keys import (cache_key, canon, data_sha, package_hash, payloads, refinement_params, refinement_payloads,
                         row_keys, selection_params, train_seed, training_params)
from .context import SAMPLES, AblationContext

__all__ = [
    "CACHE_META", "TWINS", "entries", "entry_files", "main", "prune", "verify", "verify_entry",
    "cache_key", "data_sha", "package_hash", "payloads", "refinement_params", "refinement_payloads", "row_keys",
    "selection_params", "train_seed", "training_params",
    "PAIRS", "REFINED", "MODEL", "SELECTION_FILES", "PROBLEM_STATS", "STEP_LOG", "TRAINING_LOG", "RESULTS",
    "adopt_pairs", "adopt_scored", "adopt_refined", "adopt_model", "adopt_results", "ensure", "twin_index",
    "adopt_twin_model", "adopt_twin_results", "entry_meta",
]


def _declared(stage: str, name: str) -> str:
    """An output of a pipeline stage, checked against the stage table (a renamed output fails here, at import)."""
    outputs = pipeline.spec(stage).outputs + pipeline.spec(stage).optional_outputs
    if name not in outputs:
        raise RuntimeError(f"stage {stage} does not write {name!r} (core/pipeline.py lists {list(outputs)})")
    return name


def _input_name(stage: str, upstream: tuple[str, str]) -> str:
    """The name under which a stage's manifest records an upstream artifact (its key in the stage table)."""
    return next(name for name, up in pipeline.spec(stage).inputs.items() if up == upstream)


# The artifacts the rows compute and adopt, as the stage table names them: each cache entry holds the same files
# as the stage it stands in for (the files the next stage reads are the table's inputs of that stage).
PAIRS = pipeline.spec("refinement").inputs["pairs"]  # (selection, pairs.parquet)
REFINED = pipeline.spec("training").inputs["pairs"]  # (refinement, refined_pairs.parquet)
MODEL = pipeline.spec("evaluation").inputs["trained_model"]  # (training, model)
SELECTION_FILES = pipeline.spec("selection").outputs  # pairs and per-problem stats
PROBLEM_STATS = _declared("selection", "problem_stats.parquet")
STEP_LOG = _declared("refinement", "step_log.parquet")
TRAINING_LOG = _declared("training", "training_log.parquet")
RESULTS = _declared("evaluation", "results.parquet")


# --------------------------------------------------------------------------- adopting the pipeline's artifacts


_FICLONE = 0x40049409  # Linux ioctl: share the blocks copy-on-write (btrfs, XFS); a write to either then copies


def _copy(src: Path, dst: Path) -> None:
    """Copy a file or a folder's files: a reflink where the file system has them, else a plain copy. Never a hard
    link: a hard-linked entry is the same file as the stage's, so a `cp` over training/model/model.safetensors would
    rewrite the cached copy too."""
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for p in src.iterdir():
            _copy(p, dst / p.name)
        return
    if fcntl is None:
        shutil.copy2(src, dst)
        return
    try:
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            fcntl.ioctl(fo.fileno(), _FICLONE, fi.fileno())
        shutil.copystat(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _stage_manifest(ctx: AblationContext, stage: str, files: Sequence[str]) -> dict | None:
    """A pipeline stage's manifest when it is complete and its files are no newer than it (else None)."""
    d = ctx.run_dir / stage
    mpath = d / MANIFEST
    try:
        m = read_json(mpath)
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("complete") is not True or m.get("stage") != stage:
        return None
    # computed by other code: the keys it would give under today's code say nothing about it
    code = m.get("code")
    if not isinstance(code, dict):
        return None
    if isinstance(code.get("modules"), dict) and code["modules"]:
        if not fingerprint.files_unchanged(code["modules"]):  # the stage's own modules changed since
            return None
    elif code.get("package") != fingerprint.package_hash() and code.get("package") != package_hash():
        return None
    # a rerun that died after rewriting an output but before its manifest leaves the output newer
    limit = mpath.stat().st_mtime
    if not all((d / f).exists() and (d / f).stat().st_mtime <= limit for f in files):
        return None
    # and a file rewritten since (a cp over training/model/model.safetensors) is not adopted: the hashes must match
    # (a manifest with no output_hashes at all predates them: the mtime rule above is all it allows)
    hashes = m.get("output_hashes")
    if hashes is not None and not (isinstance(hashes, dict) and all(
            hashes.get(Path(f).parts[0]) == _path_hash_once(d / Path(f).parts[0]) for f in files)):
        return None
    return m


def _path_hash_once(path: Path) -> str:
    """path_hash of a stage output, a file or a folder, each file hashed once per session while unchanged."""
    if path.is_file():
        return hash_once(path)
    return dir_hash(path, hash_once) if path.is_dir() else ""


def _section(m: dict, cls: type, name: str) -> Any:
    """A profile section of a manifest as its config dataclass; None when its fields differ from today's (another
    version of the code: a field it lacks could have meant something else then)."""
    raw = (m.get("profile_config") or {}).get(name)
    if not isinstance(raw, dict) or set(raw) != {f.name for f in dataclasses.fields(cls)}:
        return None
    return cls(**raw)


def _same_base(ctx: AblationContext, m: dict) -> bool:
    """True when a manifest's recorded base-model inputs hash as the current ones."""
    rec = {k: (m.get("inputs") or {}).get(k, {}).get("sha256") for k in ctx.base_hashes}
    return rec == ctx.base_hashes


def _adopted(stage: str) -> str:
    """The source an adopted entry records: the notebook of the stage it came from."""
    return f"adopted from {notebook_for(stage)}"


def _recorded_sha(m: dict, stage: str, upstream: tuple[str, str]) -> str | None:
    """The SHA-256 a stage's manifest recorded for one of its upstream artifacts."""
    return (m.get("inputs") or {}).get(_input_name(stage, upstream), {}).get("sha256")


def adopt_pairs(ctx: AblationContext, key: str, tmp: Path) -> str | None:
    """Link notebook 02's pairs when its settings give this key."""
    stage = PAIRS[0]
    m = _stage_manifest(ctx, stage, SELECTION_FILES)
    sel = m and _section(m, SelectionConfig, "selection")
    if not sel or _recorded_sha(m, stage, SAMPLES) != ctx.samples_sha:
        return None
    p = {"kind": "pairs", "samples": ctx.samples_sha, "selection": selection_params(sel), "seed": m.get("seed")}
    if cache_key(p) != key:
        return None
    for f in SELECTION_FILES:
        _copy(ctx.run_dir / stage / f, tmp / f)
    return _adopted(stage)


def _refinement_manifest(ctx: AblationContext, pairs_key: str, files: Sequence[str]
                         ) -> tuple[dict, RefinementConfig] | None:
    """Notebook 03's manifest and settings when it refined these pairs (this pairs key's file) with this base model."""
    stage = REFINED[0]
    m = _stage_manifest(ctx, stage, files)
    ref = m and _section(m, RefinementConfig, "refinement")
    if not ref or not ref.enabled or not _same_base(ctx, m):
        return None
    if _recorded_sha(m, stage, PAIRS) != file_hash(ctx.cache_dir / pairs_key / PAIRS[1]):
        return None
    return m, ref


def adopt_scored(ctx: AblationContext, key: str, pairs_key: str, tmp: Path) -> str | None:
    """Link notebook 03's step log (every candidate with its KL) when its settings, ε aside, give this key."""
    found = _refinement_manifest(ctx, pairs_key, (STEP_LOG,))
    if not found:
        return None
    m, ref = found
    scored, _ = refinement_payloads(pairs_key, ctx.base_hashes, ref, m.get("seed"), ctx.grader, ctx.profile.shards)
    log = ctx.run_dir / REFINED[0] / STEP_LOG
    if cache_key(scored) != key or "cand_texts" not in load_table(log).columns:  # an older log lacks the texts
        return None
    if not refinement.fully_scored(load_table(log)):  # 03 ran with scoring="fast": its KLs cannot be re-thresholded
        return None
    _copy(log, tmp / STEP_LOG)
    return _adopted(REFINED[0])


def adopt_refined(ctx: AblationContext, key: str, pairs_key: str, tmp: Path) -> str | None:
    """Link notebook 03's refined pairs when it refined these pairs with settings that give this key."""
    files = (REFINED[1], STEP_LOG)
    found = _refinement_manifest(ctx, pairs_key, files)
    if not found:
        return None
    m, ref = found
    # 03 grades with the profile's grader, as the rows do
    _, refined = refinement_payloads(pairs_key, ctx.base_hashes, ref, m.get("seed"), ctx.grader,
                                     ctx.profile.shards)
    if cache_key(refined) != key:
        return None
    for f in files:
        _copy(ctx.run_dir / REFINED[0] / f, tmp / f)
    return _adopted(REFINED[0])


def adopt_model(ctx: AblationContext, key: str, data_key: str, data_file: Path, tmp: Path) -> str | None:
    """Link notebook 04's model when it trained on these pairs with settings that give this key."""
    stage, files = MODEL[0], (MODEL[1], TRAINING_LOG)
    m = _stage_manifest(ctx, stage, files)
    tr = m and _section(m, TrainingConfig, "training")
    if not tr or not _same_base(ctx, m) or _recorded_sha(m, stage, REFINED) != file_hash(data_file):
        return None
    device = ctx.device if (m.get("profile_config") or {}).get("device") == ctx.profile.device else None
    p = {"kind": "model", "data": data_key, "base": ctx.base_hashes, "training": training_params(tr),
         "seed": m.get("seed"), "max_steps": 0, "device": device}
    if cache_key(p) != key:
        return None
    for f in files:
        _copy(ctx.run_dir / stage / f, tmp / f)
    return _adopted(stage)


def adopt_results(ctx: AblationContext, key: str, model_dir: Path | None, tmp: Path) -> str | None:
    """Take notebook 05's results of this model (the trained one, or the base) when the evaluation is the same."""
    stage = "evaluation"
    m = _stage_manifest(ctx, stage, (RESULTS,))
    if not m:
        return None
    pc, P = m.get("profile_config") or {}, ctx.profile
    # 05 evaluates every problem of data.n_eval_problems; the ablation set is its first n_eval_problems (0: all)
    whole = P.ablations.n_eval_problems == 0 or P.ablations.n_eval_problems >= P.data.n_eval_problems
    E = pc.get("evaluation") or {}
    same = (whole and m.get("seed") == ctx.eval_seed and E.get("n_samples") == ctx.eval_n
            and pc.get("data") == dataclasses.asdict(P.data) and pc.get("toyworld") == dataclasses.asdict(P.toyworld)
            and pc.get("seed") == P.seed and pc.get("device") == P.device
            and all(E.get(k) == getattr(P.evaluation, k) for k in ("temperature", "top_p", "max_new_tokens"))
            and all((pc.get("sampling") or {}).get(k) == getattr(P.sampling, k) for k in ("batch_size", "backend")))
    if not same:
        return None
    if model_dir is None:
        if not _same_base(ctx, m):
            return None
        name = "base"  # the model names notebook 05 gives its two models
    else:
        if _recorded_sha(m, stage, MODEL) != dir_hash(model_dir / MODEL[1]):
            return None
        name = "tokensqueeze"
    res = load_table(ctx.run_dir / stage / RESULTS)
    res = res[res["model"] == name].reset_index(drop=True)
    if res.empty:
        return None
    save_table(res.assign(model=key), tmp / RESULTS)
    return _adopted(stage)


# --------------------------------------------------------------------------- entries and twins


def ensure(ctx: AblationContext, key: str, payload: dict, build: Callable[[Path], None],
            adopt: Callable[[Path], str | None] | None, describe: Callable[[Path], dict], force: bool
            ) -> tuple[Path, str]:
    """The cache entry of a key: reused when present (unless forced), else adopted or built in a temp folder.

    The entry's meta.json records its payload, where it came from, the seconds it took and describe()'s numbers.
    """
    path = ctx.cache_dir / key
    recomputed = ""
    if path.is_dir() and not (force and key not in ctx.forced):
        problems = verify_entry(path)
        if not problems:
            return path, "cached"
        # a tampered or damaged entry is never used: say so, and compute it again
        recomputed = f"recomputed: the cached entry failed verification ({problems[0]})"
        print(f"[ablations] cache entry {key} does not verify ({'; '.join(problems[:3])}): recomputing it")
        force = True  # neither adopt nor reuse what the damaged entry may have come from
    t0 = time.perf_counter()
    with atomic_dir(path) as tmp:
        source = adopt(tmp) if adopt is not None and not force else None
        if source is None:
            build(tmp)
            source = "computed"
        seconds = time.perf_counter() - t0
        info = describe(tmp)
        atomic_write_json(tmp / CACHE_META, {
            "key": key, "payload": canon(payload), "code": package_hash(), "source": source,
            "seconds": round(seconds, 3),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "info": canon(info),
            "files": entry_files(tmp),
            **({"note": recomputed} if recomputed else {}),
        })
    if force:
        ctx.forced.add(key)
    return path, source



def twin_index(ctx: AblationContext, model_payload: dict, data_file: Path) -> Path:
    """Where the model trained on this data *content* with this row's settings is recorded.

    Rows whose selections or refinements differ in their settings can still give the very same pairs (on the toy
    profile at N = 8, Q-DYN with any α ≤ 0.5 picks one positive per problem, as Shortest does); training is then
    the same computation, so it runs once."""
    content = {**model_payload, "data": {"content": data_sha(load_table(data_file))}}
    return ctx.cache_dir / TWINS / cache_key(content)


def adopt_twin_model(ctx: AblationContext, key: str, twin: Path, tmp: Path) -> str | None:
    """Link the model of another key trained on the same pairs with the same settings."""
    other = twin.read_text().strip() if twin.is_file() else ""
    if not other or other == key or not (ctx.cache_dir / other).is_dir():
        return None
    for f in (MODEL[1], TRAINING_LOG):
        _copy(ctx.cache_dir / other / f, tmp / f)
    (tmp / "twin_of").write_text(other)
    return f"same pairs and settings as {other}"


def adopt_twin_results(ctx: AblationContext, key: str, model_dir: Path, tmp: Path) -> str | None:
    """Take the results of the model this one is a twin of, when evaluated the same way."""
    twin_of = model_dir / "twin_of"
    if not twin_of.is_file():
        return None
    other = cache_key({"kind": "results", "model": twin_of.read_text().strip(), "eval": ctx.eval_spec()})
    if not (ctx.cache_dir / other / RESULTS).is_file():
        return None
    save_table(load_table(ctx.cache_dir / other / RESULTS).assign(model=key), tmp / RESULTS)
    return f"same model as {twin_of.read_text().strip()}"


def entry_meta(ctx: AblationContext, key: str | None) -> dict:
    """A cache entry's meta.json ({} when absent)."""
    if key is None:
        return {}
    p = ctx.cache_dir / key / CACHE_META
    return read_json(p) if p.is_file() else {}


if __name__ == "__main__":
    raise SystemExit(main())
