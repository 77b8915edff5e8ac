"""The ablation cache: keys, entries, adoption of the pipeline's own artifacts, and twins.

Every intermediate artifact lives in runs/<profile>/ablations/cache/<key>/, written atomically (a temp folder
renamed into place, so an entry that exists is complete), where key hashes exactly what determines it. Entries are
content-addressed and cannot lie: their files are copies (reflinks where the file system has them), never hard
links to a stage's files; meta.json records the sha256 of each file and every reuse verifies them (and the tables'
columns, pipeline.SCHEMAS): an entry that fails is said and recomputed. `python -m tsq_utils.ablations.cache
list|verify|prune` lists, verifies and prunes entries (by age, by code, to a size). The keys:

    pairs    samples table (bytes), the selection parameters the variant reads, the selection seed
    scored   pairs key, base model, every refinement parameter except ε, its seed: each step's candidates and
             their windowed KLs (the expensive half of refinement, run once at ε = ∞ without grading)
    refined  scored key, ε (∞ for the no-KL rewrite), the grader: the candidates kept under ε, reassembled and
             regraded (refinement.rethreshold, exact: candidates are drawn and scored before ε is looked at)
    model    pairs or refined key, base model, the training parameters the objective reads, training seed,
             max_steps, device
    results  model key (or the base model), the evaluation problems (content), n, temperature, top_p,
             max_new_tokens, seed, sampling batch size and backend, device

Parameters a stage does not read (α for Shortest, λ when η = 0, the evaluation budget, which only enters the
metrics) do not change keys; which selection knobs a variant reads is declared once, in its entry of
selection.REGISTRY (variant_params). Every key also covers the code: cache_key hashes the payload together with
the fingerprint of the code the rows run (package_hash: the normalized code of the ablations package and every
module it imports), so after an edit to that code nothing computed by the old code is reused.

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
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core import fingerprint, pipeline
from ..core.artifacts import (SchemaError, atomic_dir, atomic_write_json, check_table, dir_hash, file_hash,
                              load_table, read_json, save_table)
from ..core.config import Profile, RefinementConfig, SelectionConfig, TrainingConfig, stage_seed
from ..core.stage import MANIFEST, notebook_for
from ..method import refinement, selection
from .context import SAMPLES, AblationContext
from .rows import Row


def package_hash() -> str:
    """The code every key covers: the normalized code of the modules the rows run through (the tsq_utils.ablations
    package and what it imports, transitively: selection, refinement, training, evaluation, the model and the task),
    taken once per session. A comment, a docstring, or an edit to a module the rows never run (a lesson's figure,
    TLDR) re-keys nothing."""
    return fingerprint.code_of("tsq_utils.ablations")


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
CACHE_META = "meta.json"  # each entry's record: payload, source, seconds, headline numbers
TWINS = "twins"  # cache/twins/<key>: the model entry trained on this content with these settings


# --------------------------------------------------------------------------- keys


def _canon(value: Any) -> Any:
    """A JSON-stable form: numbers as floats (so 0 and 0.0 agree), infinities as strings, tuples as lists."""
    if isinstance(value, dict):
        return {str(k): _canon(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canon(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float, np.integer, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "nan"
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else v
    raise TypeError(f"cannot put a {type(value).__name__} into a cache key: {value!r}")


def cache_key(payload: dict) -> str:
    """The cache key of a payload: the first 20 hex digits of the SHA-256 of its canonical JSON and of the code
    fingerprint (package_hash: after an edit to the code the rows run no entry computed by the old code is reused)."""
    text = json.dumps(_canon({"code": package_hash(), "payload": payload}), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def selection_params(sel: SelectionConfig) -> dict:
    """The selection parameters that the variant reads, as its registry entry declares them (selection.REGISTRY;
    q_dyn with α = 0 is Shortest: q = 0 gives k = 1)."""
    return selection.variant_params(sel)


def refinement_params(ref: RefinementConfig) -> dict:
    """Every refinement parameter (refinement on), with the sampler's default batch size when the config has none."""
    d = dataclasses.asdict(ref)
    d.pop("enabled")
    if "sample_batch_size" not in d:
        # refine_pairs falls back to the module default: the rows per generate call decide the candidates
        d["sample_batch_size"] = getattr(refinement, "SAMPLE_BATCH_SIZE", None)
    return d


def refinement_payloads(pairs_key: str, base_hashes: dict, ref: RefinementConfig, seed: int, grader: str,
                        shards: int = 1) -> tuple[dict, dict]:
    """The payloads of the scored entry (candidates and their KLs: every refinement parameter but ε, and the profile's
    shards, which group the responses and so seed their candidates) and of the refined entry (the scored entry, ε and
    the grader that decides reverts)."""
    params = refinement_params(ref)
    epsilon = params.pop("epsilon")
    scored = {"kind": "scored", "pairs": pairs_key, "base": base_hashes, "refinement": params, "seed": seed}
    if shards != 1:  # the default keeps the keys of runs made before shards existed
        scored["shards"] = shards
    return scored, {"kind": "refined", "scored": cache_key(scored), "epsilon": epsilon, "grader": grader}


def data_sha(table: pd.DataFrame) -> str:
    """SHA-256 of what training reads from a pairs table: its prompt, chosen and rejected texts, in order."""
    rows = table[["prompt", "chosen", "rejected"]].astype(str).values.tolist()
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def training_params(tr: TrainingConfig) -> dict:
    """The training parameters the objective reads: none of β, λ, s when η = 0 (SFT); no s when λ = 0."""
    d = dataclasses.asdict(tr)
    if d["eta"] == 0:
        for k in ("beta", "lam", "length_margin_sign"):
            d.pop(k)
    elif d["lam"] == 0:
        d.pop("length_margin_sign")
    return d


def train_seed(profile: Profile, replicate: int) -> int:
    """Training seed of a replicate: notebook 04's stage seed for 0, a derived one for the others."""
    return stage_seed(profile.seed, "training" if replicate == 0 else f"training-{replicate}")


def payloads(ctx: AblationContext, row: Row) -> dict[str, dict]:
    """The key payloads of a row's stages: pairs, scored and refined (rows with refinement), model and results."""
    if row.is_base:
        return {"results": {"kind": "results", "model": {"base": ctx.base_hashes}, "eval": ctx.eval_spec()}}
    out = {"pairs": {"kind": "pairs", "samples": ctx.samples_sha, "selection": selection_params(row.selection),
                     "seed": ctx.selection_seed}}
    data = cache_key(out["pairs"])
    if row.refine != "off":
        out["scored"], out["refined"] = refinement_payloads(data, ctx.base_hashes, row.refinement, ctx.refinement_seed,
                                                            ctx.grader, ctx.profile.shards)
        data = cache_key(out["refined"])
    training = training_params(row.training)
    if ctx.max_steps:
        training.pop("epochs")  # a fixed step count makes the epoch count irrelevant
    out["model"] = {"kind": "model", "data": data, "base": ctx.base_hashes, "training": training,
                    "seed": train_seed(ctx.profile, row.seed), "max_steps": ctx.max_steps, "device": ctx.device}
    out["results"] = {"kind": "results", "model": cache_key(out["model"]), "eval": ctx.eval_spec()}
    return out


def row_keys(ctx: AblationContext, row: Row) -> dict[str, str]:
    """The cache keys of a row's stages (pairs, scored, refined, model, results; only results for the base row)."""
    return {stage: cache_key(p) for stage, p in payloads(ctx, row).items()}


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
    try:
        import fcntl

        with open(src, "rb") as fi, open(dst, "wb") as fo:
            fcntl.ioctl(fo.fileno(), _FICLONE, fi.fileno())
        shutil.copystat(src, dst)
    except (OSError, ImportError):
        shutil.copy2(src, dst)


_link_or_copy = _copy  # the old name: entries are copies now


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
    """path_hash of a stage output, a file or a folder, hashed once per session while unchanged."""
    if path.is_file():
        return _hash_once(path)
    if not path.is_dir():
        return ""
    h = hashlib.sha256()  # as artifacts.dir_hash
    for p in sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix()):
        h.update(f"{p.relative_to(path).as_posix()}\0{_hash_once(p)}\n".encode())
    return h.hexdigest()


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
            "key": key, "payload": _canon(payload), "code": package_hash(), "source": source,
            "seconds": round(seconds, 3),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "info": _canon(info),
            "files": entry_files(tmp),
            **({"note": recomputed} if recomputed else {}),
        })
    if force:
        ctx.forced.add(key)
    return path, source


# --------------------------------------------------------------------------- verification


def entry_files(path: Path) -> dict[str, str]:
    """{file relative to the entry: sha256} of every file of a cache entry but its meta.json."""
    path = Path(path)
    return {p.relative_to(path).as_posix(): file_hash(p)
            for p in sorted(path.rglob("*")) if p.is_file() and p.relative_to(path).as_posix() != CACHE_META}


# (entry file, inode, size, mtime) -> sha256: an unchanged file is not hashed twice in a session
_VERIFIED: dict[tuple, str] = {}


def _hash_once(p: Path) -> str:
    st = p.stat()
    sig = (str(p), st.st_ino, st.st_size, st.st_mtime_ns)
    if sig not in _VERIFIED:
        _VERIFIED[sig] = file_hash(p)
    return _VERIFIED[sig]


def verify_entry(path: Path) -> list[str]:
    """What is wrong with a cache entry (empty when it verifies): its meta.json must record the sha256 of its files
    and every file must still have it, none missing and none added."""
    path = Path(path)
    try:
        meta = read_json(path / CACHE_META)
    except (OSError, ValueError) as e:
        return [f"{CACHE_META} is missing or unreadable ({type(e).__name__})"]
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not files:
        return [f"{CACHE_META} records no file hashes (written by an older version)"]
    problems = []
    present = {p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file()}
    present.pop(CACHE_META, None)
    for name, sha in sorted(files.items()):
        if name not in present:
            problems.append(f"{name} is missing")
        elif _hash_once(present[name]) != sha:
            problems.append(f"{name} changed (sha256 differs from {CACHE_META})")
    problems += [f"{name} is not part of the entry" for name in sorted(set(present) - set(files))]
    if not problems:  # the files are the ones recorded: their columns must still be what later stages read
        for name, p in sorted(present.items()):
            columns = pipeline.schema(None, Path(name).name) if name.endswith(".parquet") else None
            if columns:
                try:
                    check_table(p, columns)
                except SchemaError as e:
                    problems.append(f"{name}: {str(e).split(': ', 1)[1]}")
    return problems


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


# --------------------------------------------------------------------------- listing, verifying and pruning


def entries(cache_dir: str | os.PathLike) -> list[dict]:
    """The entries of a cache folder, oldest first: key, kind, source, bytes, finished_at, code (the package hash
    they were computed with) and whether it is today's code."""
    cache_dir = Path(cache_dir)
    out = []
    if not cache_dir.is_dir():
        return out
    today = package_hash()
    for d in sorted(cache_dir.iterdir()):
        if not d.is_dir() or d.name.startswith(".") or d.name == TWINS:
            continue
        try:
            meta = read_json(d / CACHE_META)
        except (OSError, ValueError):
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        out.append({"key": d.name, "kind": (meta.get("payload") or {}).get("kind", "?"),
                    "source": meta.get("source", "?"), "bytes": size, "finished_at": meta.get("finished_at", ""),
                    "code": meta.get("code"), "current_code": meta.get("code") == today, "path": d})
    return sorted(out, key=lambda e: (e["finished_at"], e["key"]))


def verify(cache_dir: str | os.PathLike, remove: bool = False) -> dict[str, list[str]]:
    """{key: problems} of the entries that do not verify (verify_entry); with remove=True they are deleted, so the
    next run of notebook 06 recomputes them (a run recomputes an entry that fails verification anyway)."""
    bad = {}
    for e in entries(cache_dir):
        problems = verify_entry(e["path"])
        if problems:
            bad[e["key"]] = problems
            if remove:
                shutil.rmtree(e["path"], ignore_errors=True)
    return bad


def _parse_size(text: str) -> int:
    """'500M', '2G', '10k' or bytes -> bytes."""
    t = str(text).strip().upper().removesuffix("B")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if mult > 1 else t)
    except ValueError:
        raise ValueError(f"size {text!r}: give bytes or a number with K, M, G or T (500M)") from None
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"size {text!r} must be a non-negative number")
    return int(value * mult)


def prune(cache_dir: str | os.PathLike, older_than_days: float | None = None, stale_code: bool = False,
          max_bytes: int | None = None, dry_run: bool = False) -> list[dict]:
    """Remove entries: finished more than `older_than_days` ago, computed by other code than today's (`stale_code`:
    they can no longer be hit, since every key covers the code), and then the oldest until the cache holds at most
    `max_bytes`. Returns the removed entries (with dry_run, those that would be)."""
    now = datetime.now(timezone.utc)
    keep, gone = [], []
    for e in entries(cache_dir):
        try:
            age_days = (now - datetime.fromisoformat(e["finished_at"])).total_seconds() / 86400
        except (TypeError, ValueError):
            age_days = math.inf
        if (older_than_days is not None and age_days > older_than_days) or (stale_code and not e["current_code"]):
            gone.append(e)
        else:
            keep.append(e)
    if max_bytes is not None:
        total = sum(e["bytes"] for e in keep)
        while keep and total > max_bytes:
            e = keep.pop(0)  # the oldest first
            total -= e["bytes"]
            gone.append(e)
    if not dry_run:
        for e in gone:
            shutil.rmtree(e["path"], ignore_errors=True)
        twins = Path(cache_dir) / TWINS
        if twins.is_dir():  # twin records that name a removed entry
            for t in twins.iterdir():
                if t.is_file() and not (Path(cache_dir) / t.read_text().strip()).is_dir():
                    t.unlink(missing_ok=True)
    return gone


def _human(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


def main(argv: Sequence[str] | None = None) -> int:
    """python -m tsq_utils.ablations.cache list|verify|prune [--profile NAME | --cache DIR] ..."""
    import argparse

    from ..core import config

    ap = argparse.ArgumentParser(prog="python -m tsq_utils.ablations.cache",
                                 description="List, verify or prune notebook 06's ablation cache.")
    ap.add_argument("command", choices=("list", "verify", "prune"))
    ap.add_argument("--profile", default=os.environ.get("TSQ_PROFILE", "toy"),
                    help="whose cache: runs/<profile>/ablations/cache (default: toy)")
    ap.add_argument("--cache", help="a cache folder instead of the profile's")
    ap.add_argument("--remove", action="store_true", help="verify: delete the entries that fail (recomputed by 06)")
    ap.add_argument("--older-than", type=float, metavar="DAYS", help="prune: entries finished more than DAYS ago")
    ap.add_argument("--stale-code", action="store_true",
                    help="prune: entries computed by other code than today's (their keys can no longer be hit)")
    ap.add_argument("--max-size", metavar="SIZE", help="prune: then the oldest until the cache holds at most SIZE "
                                                        "(bytes, or 500M, 2G)")
    ap.add_argument("--dry-run", action="store_true", help="prune: say what would go, remove nothing")
    a = ap.parse_args(argv)
    cache_dir = Path(a.cache) if a.cache else config.runs_root() / a.profile / "ablations" / "cache"
    if not cache_dir.is_dir():
        print(f"no cache at {cache_dir}")
        return 0 if a.command != "verify" else 0
    if a.command == "list":
        es = entries(cache_dir)
        for e in es:
            print(f"{e['key']}  {e['kind']:<8} {_human(e['bytes']):>7}  {e['finished_at'] or '?':<25}  "
                  f"{'today' if e['current_code'] else 'other'} code  {e['source']}")
        print(f"{len(es)} entries, {_human(sum(e['bytes'] for e in es))} in {cache_dir}")
        return 0
    if a.command == "verify":
        bad = verify(cache_dir, remove=a.remove)
        n = len(entries(cache_dir)) + (len(bad) if a.remove else 0)
        for key, problems in bad.items():
            print(f"{key}: {'; '.join(problems)}" + (" (removed)" if a.remove else ""))
        print(f"{n - len(bad)} of {n} entries verify" + (
            "" if not bad else ("; the failed ones were removed: notebook 06 recomputes them" if a.remove else
                                "; notebook 06 recomputes them on its next run (or --remove them now)")))
        return 1 if bad and not a.remove else 0
    if a.older_than is None and not a.stale_code and a.max_size is None:
        ap.error("prune needs --older-than DAYS, --stale-code or --max-size SIZE")
    try:
        max_bytes = None if a.max_size is None else _parse_size(a.max_size)
    except ValueError as e:
        ap.error(str(e))
    gone = prune(cache_dir, a.older_than, a.stale_code, max_bytes, a.dry_run)
    for e in gone:
        print(f"{'would remove' if a.dry_run else 'removed'} {e['key']} ({e['kind']}, {_human(e['bytes'])}, "
              f"{e['finished_at'] or '?'})")
    print(f"{len(gone)} entries {'would be ' if a.dry_run else ''}removed, "
          f"{_human(sum(e['bytes'] for e in gone))} freed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
