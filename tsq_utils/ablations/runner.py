"""Running ablation rows: each stage of a row computed through the pipeline's own functions, or taken from the cache.

A row's stages are notebook 02's selection (selection.select_pairs), notebook 03's refinement split in two
(refinement.refine_pairs at ε = ∞ to score every candidate, then refinement.rethreshold at the row's ε),
notebook 04's training (dpo_l.train_and_save) and notebook 05's evaluation (evaluation.evaluate_model), each
stored in the cache (cache.py) under a key of exactly what decides it. Selection, refinement and evaluation
use notebooks 02, 03 and 05's stage seeds for every row; training seed 0 is notebook 04's.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from ..core.artifacts import atomic_write_text, clean_leftovers, load_table, read_json, save_table
from ..core.parallel import map_shards, n_workers
from ..core.pointer import base_ref
from ..method import dpo_l, evaluation, refinement, selection
from ..method.sampling import SampleRun
from ..model import base_model
from ..task.registry import training_task
from .cache import (CACHE_META, MODEL, PAIRS, PROBLEM_STATS, REFINED, RESULTS, STEP_LOG, TRAINING_LOG, adopt_model,
                    adopt_pairs, adopt_refined, adopt_results, adopt_scored, adopt_twin_model, adopt_twin_results,
                    ensure, payloads, row_keys, train_seed, twin_index, verify_entry)
from .context import AblationContext
from .rows import Row, build_rows, select_rows


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the inner progress bars and chatter (datasets maps, TRL's reference pass) while a row runs."""
    was_enabled, hf_bars = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    old_env, old_level = os.environ.get("TQDM_DISABLE"), hf_logging.get_verbosity()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    os.environ["TQDM_DISABLE"] = "1"
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, once per row
            yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
        if hf_bars:
            hf_logging.enable_progress_bar()
        if old_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old_env
        hf_logging.set_verbosity(old_level)


# --------------------------------------------------------------------------- the stages of a row


def _select(ctx: AblationContext, row: Row, tmp: Path) -> None:
    """Stage 02 for a row: pairs and per-problem stats."""
    pairs, stats = selection.select_with(ctx.samples, row.selection, seed=ctx.selection_seed)
    save_table(pairs, tmp / PAIRS[1])
    save_table(stats, tmp / PROBLEM_STATS)


def _describe_pairs(d: Path) -> dict:
    """A pairs entry's headline numbers (selection_summary)."""
    return selection.selection_summary(load_table(d / PAIRS[1]), load_table(d / PROBLEM_STATS))


def _score(ctx: AblationContext, row: Row, pairs_dir: Path, tmp: Path) -> None:
    """Stage 03's expensive half for a row: every step's candidates and their KLs (run at ε = ∞, no grading)."""
    pairs = load_table(pairs_dir / PAIRS[1])
    cfg = dataclasses.replace(row.refinement, epsilon=math.inf, scoring="full")  # 06 re-thresholds: exact KLs
    # grouped by the profile's shards as notebook 03 groups them (so an adopted step log and a computed one agree);
    # one process: 06 runs its rows side by side already
    _, step_log = refinement.refine_pairs(ctx.base_model, ctx.tokenizer, pairs, cfg, seed=ctx.refinement_seed,
                                          progress=False,
                                          options=refinement.RefineOptions(shards=ctx.profile.shards, workers=1))
    save_table(step_log, tmp / STEP_LOG)


def _describe_scored(d: Path) -> dict:
    """A scored entry's size: steps, candidates drawn and candidates scored."""
    log = load_table(d / STEP_LOG)
    kls = [v for ks in log["kl"] for v in ks]
    return {"n_steps": int(len(log)), "n_candidates": len(kls), "n_scored": int(sum(not math.isnan(v) for v in kls))}


def _rethreshold(ctx: AblationContext, row: Row, pairs_dir: Path, scored_dir: Path, tmp: Path) -> None:
    """Stage 03's cheap half for a row: keep the candidates under the row's ε (∞ for the no-KL rewrite), regrade."""
    grade_fn_factory = refinement.grader_factory(ctx.samples, training_task(ctx.profile))
    refined, step_log = refinement.rethreshold(ctx.tokenizer, load_table(pairs_dir / PAIRS[1]),
                                               load_table(scored_dir / STEP_LOG), row.refinement,
                                               grade_fn_factory=grade_fn_factory)
    save_table(refined, tmp / REFINED[1])
    save_table(step_log, tmp / STEP_LOG)


def _describe_refined(d: Path) -> dict:
    """A refined entry's headline numbers (refinement_summary: acceptance, tokens per step, ...)."""
    return refinement.refinement_summary(load_table(d / STEP_LOG), load_table(d / REFINED[1]))


def _train(ctx: AblationContext, row: Row, data_file: Path, tmp: Path) -> None:
    """Stage 04 for a row, as notebook 04 trains (dpo_l.train_and_save) on a fresh base model: the trained model
    and its per-step log."""
    pairs = load_table(data_file)
    if pairs.empty:
        raise ValueError(f"row {row.name}: its selection gave no preference pairs, so there is nothing to train on")
    model, tok = base_model.load_base(ctx.run_dir, ctx.profile)
    run = dpo_l.TrainRun(seed=train_seed(ctx.profile, row.seed), device=ctx.device, max_steps=ctx.max_steps or None,
                         progress=False,
                         # the reference model's log-probs of a batch, shared by the rows that train on the same
                         # pairs with the same seed (the objectives, signs and η's): keyed by the base weights
                         # and the batch's token ids, so an entry never goes stale
                         ref_cache=str(ctx.run_dir / "ablations" / "reference_cache"))
    log = dpo_l.train_and_save(model, tok, pairs, row.training, tmp, run, model_subdir=MODEL[1])
    save_table(log.reset_index(), tmp / TRAINING_LOG)


def _describe_model(d: Path) -> dict:
    """A model entry's optimizer steps and last logged loss terms."""
    log = load_table(d / TRAINING_LOG)
    if log.empty:
        return {"steps": 0}
    last = log.iloc[-1]
    return {"steps": int(log["step"].max()),
            **{c: float(last[c]) for c in ("loss", "dpo_l_loss", "sft_loss") if c in log}}


def _eval_model(ctx: AblationContext, model_dir: Path | None) -> Any:
    """What generation.sample draws from for a trained model's cache entry (None: the base model), per
    sampling.backend."""
    if model_dir is None and ctx.profile.sampling.backend != "vllm":
        return ctx.base_model  # already loaded for refinement
    ref, kind = base_ref(ctx.run_dir, ctx.profile)  # a trained model is of its base model's kind, as in notebook 05
    return base_model.load_sampler(ref if model_dir is None else str(model_dir / MODEL[1]), kind, ctx.profile)[0]


def _results(ctx: AblationContext, key: str, model_dir: Path | None, tmp: Path) -> None:
    """Evaluate a trained model (or the base model) and save its results."""
    model = _eval_model(ctx, model_dir)
    try:
        # notebook 05's evaluation, the model named by its cache key
        spec = evaluation.eval_decoding(ctx.profile, ctx.eval_seed, n=ctx.eval_n)
        run = SampleRun(ctx.profile.sampling.backend, ctx.profile.shards, workers=1, progress=False)
        res = evaluation.evaluate_model(key, model, ctx.tokenizer, ctx.problems, spec, run)
        save_table(res, tmp / RESULTS)
    finally:
        if model is not ctx._base_model:
            base_model.release_sampler(model)  # a vLLM engine's workers; a no-op for a transformers model


def _describe_results(d: Path) -> dict:
    """A results entry's size and accuracy."""
    res = load_table(d / RESULTS)
    return {"responses": int(len(res)), "accuracy": float(res["correct"].mean())}


# --------------------------------------------------------------------------- rows


STAGES = ("pairs", "scored", "refined", "model", "results")  # a row's stages, in the order they depend on each other


def _data(ctx: AblationContext, row: Row, keys: dict) -> tuple[str, Path]:
    """The key and file of what a row trains on: its refined pairs, or its selected pairs without refinement."""
    if row.refine != "off":
        return keys["refined"], ctx.cache_dir / keys["refined"] / REFINED[1]
    return keys["pairs"], ctx.cache_dir / keys["pairs"] / PAIRS[1]


def _ensure_stage(ctx: AblationContext, row: Row, stage: str, force: bool, keys: dict, pl: dict,
                  sources: dict) -> Path:
    """One stage of a row through the cache (its upstream entries must exist): reused, adopted or computed; the
    source goes into `sources` (the scored entry too when the refined one needed it)."""
    def entry(s: str) -> Path:
        return ctx.cache_dir / keys[s]

    if stage == "pairs":
        d, sources["pairs"] = ensure(ctx, keys["pairs"], pl["pairs"], lambda t: _select(ctx, row, t),
                                     lambda t: adopt_pairs(ctx, keys["pairs"], t), _describe_pairs, force)
    elif stage == "scored":
        d, sources["scored"] = ensure(ctx, keys["scored"], pl["scored"],
                                      lambda t: _score(ctx, row, entry("pairs"), t),
                                      lambda t: adopt_scored(ctx, keys["scored"], keys["pairs"], t),
                                      _describe_scored, force)
    elif stage == "refined":
        # the refined entry needs the scored one only when it is not there yet (nor adoptable from 03)
        d, sources["refined"] = ensure(
            ctx, keys["refined"], pl["refined"],
            lambda t: _rethreshold(ctx, row, entry("pairs"),
                                   _ensure_stage(ctx, row, "scored", force, keys, pl, sources), t),
            lambda t: adopt_refined(ctx, keys["refined"], keys["pairs"], t), _describe_refined, force)
    elif stage == "model":
        data_key, data_file = _data(ctx, row, keys)
        twin = twin_index(ctx, pl["model"], data_file)
        d, sources["model"] = ensure(ctx, keys["model"], pl["model"], lambda t: _train(ctx, row, data_file, t),
                                     lambda t: (adopt_model(ctx, keys["model"], data_key, data_file, t)
                                                or adopt_twin_model(ctx, keys["model"], twin, t)),
                                     _describe_model, force)
        if not twin.exists():
            atomic_write_text(twin, keys["model"])
    elif stage == "results":
        model_dir = None if row.is_base else entry("model")
        d, sources["results"] = ensure(ctx, keys["results"], pl["results"],
                                       lambda t: _results(ctx, keys["results"], model_dir, t),
                                       lambda t: (adopt_results(ctx, keys["results"], model_dir, t)
                                                  or (model_dir is not None
                                                      and adopt_twin_results(ctx, keys["results"], model_dir, t))
                                                  or None),
                                       _describe_results, force)
    else:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return d


def _row_stages(row: Row) -> tuple[str, ...]:
    """The stages a row runs (the scored one only on demand, through the refined one)."""
    if row.is_base:
        return ("results",)
    return ("pairs", "refined", "model", "results") if row.refine != "off" else ("pairs", "model", "results")


def run_row(ctx: AblationContext, row: Row, force: bool = False) -> dict:
    """Run (or reuse) each stage of one row; return its keys and where each stage came from."""
    keys, pl = row_keys(ctx, row), payloads(ctx, row)
    sources: dict[str, str] = {}
    with _quiet():
        for stage in _row_stages(row):
            _ensure_stage(ctx, row, stage, force, keys, pl, sources)
    return {"name": row.name, "seed": row.seed, "keys": keys, "sources": sources}


# --------------------------------------------------------------------------- rows side by side


def _stage_task(ctx: AblationContext, task: tuple[Row, str, bool]) -> tuple[str, dict | None, dict[str, str]]:
    """One wave task, run in a worker process: a stage of one row. Returns (row name, {stage: source} or None on
    failure, {stage: key}) or the error as the second item's "error"."""
    row, stage, force = task
    keys, pl = row_keys(ctx, row), payloads(ctx, row)
    sources: dict[str, str] = {}
    try:
        with _quiet():
            _ensure_stage(ctx, row, stage, force, keys, pl, sources)
    except Exception as e:  # noqa: BLE001 -- reported with the row, after the other rows ran
        return row.name, {"error": f"{type(e).__name__}: {e}"}, keys
    return row.name, sources, keys


def _usable(ctx: AblationContext, key: str, force: bool) -> bool:
    """True when a cache entry can be reused as it is (present, verifies, and not to be recomputed under force)."""
    path = ctx.cache_dir / key
    return path.is_dir() and not (force and key not in ctx.forced) and not verify_entry(path)


def _wave(ctx: AblationContext, rows: list[Row], stage: str, force: bool, failed: dict) -> list[Row]:
    """The rows whose `stage` entry one worker must compute in this wave: one row per distinct entry (two workers
    never write one entry), none whose entry is usable, none that failed already. Twins: rows whose pairs have the
    same content train (and evaluate) once; the others adopt the twin after the wave."""
    todo, seen = [], set()
    for row in rows:
        if row.name in failed or stage not in (*_row_stages(row), "scored"):
            continue
        if stage == "scored" and row.refine == "off":
            continue
        keys, pl = row_keys(ctx, row), payloads(ctx, row)
        key = keys[stage]
        if stage == "scored":
            # the scored entry is wanted only where the refined one must be computed (not reusable nor adoptable)
            if _usable(ctx, keys["refined"], force) or (not force and _adoptable_refined(ctx, keys)):
                continue
        group = key
        if stage == "model":
            data_file = _data(ctx, row, keys)[1]
            twin = twin_index(ctx, pl["model"], data_file)
            other = twin.read_text().strip() if twin.is_file() else ""
            if not force and other and other != key and _usable(ctx, other, force):
                continue  # adopted from its twin after the wave
            if not force:  # (under force every key trains: twins are adopted only without it)
                group = twin.name
        if stage == "results" and not row.is_base:
            twin_of = ctx.cache_dir / keys["model"] / "twin_of"
            if not force and twin_of.is_file():
                group = ("twin", twin_of.read_text().strip())
        if group in seen or _usable(ctx, key, force):
            seen.add(group)
            continue
        seen.add(group)
        todo.append(row)
    if stage == "results":
        # a twin's results are taken from the model it is a twin of: evaluate that one first
        todo.sort(key=lambda r: (ctx.cache_dir / row_keys(ctx, r).get("model", "") / "twin_of").is_file())
    return todo


def _adoptable_refined(ctx: AblationContext, keys: dict) -> bool:
    """True when notebook 03's refined pairs can stand in for this refined key (then no scoring is needed)."""
    with tempfile.TemporaryDirectory(dir=ctx.cache_dir, prefix=".probe-") as tmp:
        return adopt_refined(ctx, keys["refined"], keys["pairs"], Path(tmp)) is not None


def _rows_to_run(ctx: AblationContext, rows: Sequence[Row | str] | None) -> list[Row]:
    """The Row objects run_rows runs: the given ones, and build_rows' rows of the names and groups given (None: all)."""
    every = build_rows(ctx.profile)
    if rows is None:
        return every
    names = [r for r in rows if isinstance(r, str)]
    todo = [r for r in rows if isinstance(r, Row)] + select_rows(every, names) if names else list(rows)
    bad = [r for r in todo if not isinstance(r, Row)]
    if bad:
        raise ValueError(f"rows must be Row objects or row/group names, got {bad[0]!r}")
    return todo


@dataclass
class _RunLog:
    """What run_rows learns as it goes: the rows that failed, and where the entries the waves made came from."""

    force: bool
    failed: dict[str, str] = field(default_factory=dict)  # row name -> error
    done_sources: dict[str, str] = field(default_factory=dict)  # key -> source, for the entries the waves made
    claimed: set[str] = field(default_factory=set)  # keys whose wave source a row has reported already

    def record(self, ctx: AblationContext, name: str, sources: dict, keys: dict) -> None:
        """Note a wave task's outcome: its error, or the source of each entry it made."""
        if "error" in sources:
            self.failed[name] = sources["error"]
            return
        for s, src in sources.items():
            self.done_sources.setdefault(keys[s], src)  # the pass that made it says how (later ones: cached)
            if self.force:
                ctx.forced.add(keys[s])  # computed under force in this session: not again below

    def source(self, key: str, src: str) -> str:
        """Where a row's entry came from, as one worker would say: the first row to use an entry a wave made gets
        the wave's source (computed, adopted, ...), the others "cached"."""
        if src == "cached" and key in self.done_sources and key not in self.claimed:
            self.claimed.add(key)
            return self.done_sources[key]
        return src


def _run_waves(ctx: AblationContext, todo: list[Row], w: int, progress: bool, log: _RunLog) -> None:
    """Every stage of the rows in waves on `w` worker processes, each distinct entry computed by one of them; after
    each wave, that stage of every row in row order (reused or adopted: cheap, and what the next wave reads)."""
    force = log.force
    for stage in STAGES:
        wave = _wave(ctx, todo, stage, force, log.failed)
        if wave:
            if stage in ("scored", "results") and any(r.is_base or stage == "scored" for r in wave):
                with _quiet():
                    _ = ctx.base_model  # loaded once, before the fork: the workers inherit it
            for name, sources, keys in map_shards(_stage_task, [(r, stage, force) for r in wave], workers=w,
                                                  shared=ctx, progress=progress,
                                                  desc=f"ablations: {stage} ({len(wave)})"):
                log.record(ctx, name, sources, keys)
        if stage == "scored":
            continue  # reached through the refined stage
        for row in todo:
            if row.name not in log.failed and stage in _row_stages(row):
                log.record(ctx, *_stage_task(ctx, (row, stage, force)))


def _run_in_order(ctx: AblationContext, todo: list[Row], progress: bool, log: _RunLog) -> list[dict]:
    """Each row in order (run_row: what the waves made is reused), one line each: its name, seed and sources."""
    out = []
    bar = tqdm(todo, desc="ablation rows", disable=not progress)
    for row in bar:
        bar.set_postfix_str(f"{row.name} seed {row.seed}")
        if row.name in log.failed:
            continue
        try:
            rec = run_row(ctx, row, force=log.force)
        except Exception as e:  # noqa: BLE001 -- reported together after the other rows ran
            log.failed[row.name] = f"{type(e).__name__}: {e}"
            continue
        keys = rec["keys"]
        sources = {s: log.source(keys[s], src) for s, src in rec["sources"].items()}
        if sources.get("refined") == "computed" and "scored" not in sources:
            sources["scored"] = log.source(keys["scored"], "cached")  # computing the refined entry read the scored one
        out.append({"name": row.name, "seed": row.seed, **{s: sources[s] for s in STAGES if s in sources}})
    return out


def run_rows(ctx: AblationContext, rows: Sequence[Row | str] | None = None, force: bool = False,
             progress: bool = True, workers: int | None = None) -> pd.DataFrame:
    """Run rows (Row objects, or names/groups of build_rows' rows; None: all) with a progress bar.

    Independent work runs side by side on `workers` one-thread processes (default: the profile's `workers`, 0 =
    every core; core/parallel.map_shards), in waves by stage: every row's pairs, then the scored candidates, the
    refined pairs, the trainings and the evaluations, each distinct cache entry computed by one process (rows that
    share an entry, and twins, share its computation). Every entry is computed exactly as one worker computes it,
    so the results and cache entries are the same whatever `workers` is. On a GPU the rows run one at a time.

    A failing row does not stop the others: after the last row a RuntimeError lists the failures (the rows that
    finished stay cached). Returns one line per row: its name, seed and the source of each stage.
    """
    todo = _rows_to_run(ctx, rows)
    ctx.cache_dir.mkdir(parents=True, exist_ok=True)
    for gone in clean_leftovers(ctx.cache_dir):  # entries a killed run was writing
        print(f"[ablations] removed {gone.name}, left in the cache by a run that was killed")
    w = n_workers(ctx.profile.workers if workers is None else workers)
    if ctx.device != "cpu":
        w = 1  # CUDA does not survive a fork; one process drives the GPU
    log = _RunLog(force)
    if w > 1:
        _run_waves(ctx, todo, w, progress, log)
    out = _run_in_order(ctx, todo, progress, log)
    if log.failed:
        lines = [f"{r.name} (seed {r.seed}): {log.failed[r.name]}" for r in todo if r.name in log.failed]
        raise RuntimeError(f"{len(lines)} of {len(todo)} ablation rows failed:\n  " + "\n  ".join(lines))
    return pd.DataFrame(out)


def plan(ctx: AblationContext, rows: Sequence[Row]) -> pd.DataFrame:
    """Distinct work per stage for these rows: how many entries exist already and how many remain to compute.

    Counts keys: rows whose pairs turn out to be identical share one training and evaluation at run time (twins),
    which cannot be known before their pairs exist, so "to_run" can overcount models and results."""
    seen: dict[str, set] = {"pairs": set(), "scored": set(), "refined": set(), "model": set(), "results": set()}
    for r in rows:
        for stage, key in row_keys(ctx, r).items():
            seen[stage].add(key)
    return pd.DataFrame([{"stage": s, "distinct": len(k), "cached": sum((ctx.cache_dir / x).is_dir() for x in k),
                          "to_run": sum(not (ctx.cache_dir / x).is_dir() for x in k)} for s, k in seen.items()]
                        ).set_index("stage")


def costs(ctx: AblationContext) -> pd.DataFrame:
    """Seconds per computed cache entry, by stage (mean, max, count): the per-row cost of this profile."""
    rows = []
    for meta in ctx.cache_dir.glob(f"*/{CACHE_META}"):
        m = read_json(meta)
        if m.get("source") == "computed":
            rows.append({"stage": m["payload"]["kind"], "seconds": m["seconds"]})
    if not rows:
        return pd.DataFrame(columns=["mean_s", "max_s", "n"])
    return pd.DataFrame(rows).groupby("stage")["seconds"].agg(mean_s="mean", max_s="max", n="count").round(2)
