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
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.artifacts import atomic_write_text, load_table, read_json, save_table
from ..method import evaluation, refinement, selection
from .cache import (CACHE_META, MODEL, PAIRS, PROBLEM_STATS, REFINED, RESULTS, STEP_LOG, TRAINING_LOG, adopt_model,
                    adopt_pairs, adopt_refined, adopt_results, adopt_scored, adopt_twin_model, adopt_twin_results,
                    ensure, payloads, row_keys, train_seed, twin_index)
from .context import AblationContext
from .rows import Row, build_rows, select_rows


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the inner progress bars and chatter (datasets maps, TRL's reference pass) while a row runs."""
    import datasets
    from transformers.utils import logging as hf_logging

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
    _, step_log = refinement.refine_pairs(ctx.base_model, ctx.tokenizer, pairs, cfg, seed=ctx.refinement_seed,
                                          progress=False)
    save_table(step_log, tmp / STEP_LOG)


def _describe_scored(d: Path) -> dict:
    """A scored entry's size: steps, candidates drawn and candidates scored."""
    log = load_table(d / STEP_LOG)
    kls = [v for ks in log["kl"] for v in ks]
    return {"n_steps": int(len(log)), "n_candidates": len(kls), "n_scored": int(sum(not math.isnan(v) for v in kls))}


def _rethreshold(ctx: AblationContext, row: Row, pairs_dir: Path, scored_dir: Path, tmp: Path) -> None:
    """Stage 03's cheap half for a row: keep the candidates under the row's ε (∞ for the no-KL rewrite), regrade."""
    refined, step_log = refinement.rethreshold(ctx.tokenizer, load_table(pairs_dir / PAIRS[1]),
                                               load_table(scored_dir / STEP_LOG), row.refinement,
                                               grade_fn_factory=refinement.grader_factory(ctx.samples, ctx.grader))
    save_table(refined, tmp / REFINED[1])
    save_table(step_log, tmp / STEP_LOG)


def _describe_refined(d: Path) -> dict:
    """A refined entry's headline numbers (refinement_summary: acceptance, tokens per step, ...)."""
    return refinement.refinement_summary(load_table(d / STEP_LOG), load_table(d / REFINED[1]))


def _train(ctx: AblationContext, row: Row, data_file: Path, tmp: Path) -> None:
    """Stage 04 for a row, as notebook 04 trains (dpo_l.train_and_save) on a fresh base model: the trained model
    and its per-step log."""
    from ..method import dpo_l
    from ..model.base_model import load_base

    pairs = load_table(data_file)
    if pairs.empty:
        raise ValueError(f"row {row.name}: its selection gave no preference pairs, so there is nothing to train on")
    model, tok = load_base(ctx.run_dir, ctx.profile)
    log = dpo_l.train_and_save(model, tok, pairs, row.training, tmp, seed=train_seed(ctx.profile, row.seed),
                               device=ctx.device, max_steps=ctx.max_steps or None, model_subdir=MODEL[1],
                               progress=False)
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
    from ..core.pointer import base_ref
    from ..model.base_model import load_sampler

    if model_dir is None and ctx.profile.sampling.backend != "vllm":
        return ctx.base_model  # already loaded for refinement
    ref, kind = base_ref(ctx.run_dir, ctx.profile)  # a trained model is of its base model's kind, as in notebook 05
    return load_sampler(ref if model_dir is None else str(model_dir / MODEL[1]), kind, ctx.profile)[0]


def _results(ctx: AblationContext, key: str, model_dir: Path | None, tmp: Path) -> None:
    """Evaluate a trained model (or the base model) and save its results."""
    from ..model.base_model import release_sampler

    model = _eval_model(ctx, model_dir)
    try:
        E, S = ctx.profile.evaluation, ctx.profile.sampling
        # notebook 05's evaluation, the model named by its cache key
        res = evaluation.evaluate_model(key, model, ctx.tokenizer, ctx.problems, n=ctx.eval_n,
                                        temperature=E.temperature, top_p=E.top_p, max_new_tokens=E.max_new_tokens,
                                        seed=ctx.eval_seed, batch_size=S.batch_size, backend=S.backend,
                                        progress=False)
        save_table(res, tmp / RESULTS)
    finally:
        if model is not ctx._base_model:
            release_sampler(model)  # a vLLM engine's workers; a no-op for a transformers model


def _describe_results(d: Path) -> dict:
    """A results entry's size and accuracy."""
    res = load_table(d / RESULTS)
    return {"responses": int(len(res)), "accuracy": float(res["correct"].mean())}


# --------------------------------------------------------------------------- rows


def run_row(ctx: AblationContext, row: Row, force: bool = False) -> dict:
    """Run (or reuse) each stage of one row; return its keys and where each stage came from."""
    keys, pl = row_keys(ctx, row), payloads(ctx, row)
    sources: dict[str, str] = {}
    with _quiet():
        if row.is_base:
            _, sources["results"] = ensure(ctx, keys["results"], pl["results"],
                                            lambda t: _results(ctx, keys["results"], None, t),
                                            lambda t: adopt_results(ctx, keys["results"], None, t),
                                            _describe_results, force)
            return {"name": row.name, "seed": row.seed, "keys": keys, "sources": sources}
        pairs_dir, sources["pairs"] = ensure(ctx, keys["pairs"], pl["pairs"], lambda t: _select(ctx, row, t),
                                              lambda t: adopt_pairs(ctx, keys["pairs"], t), _describe_pairs, force)
        data_key, data_file = keys["pairs"], pairs_dir / PAIRS[1]
        if row.refine != "off":
            # the refined entry needs the scored one only when it is not there yet (nor adoptable from 03)
            scored: list[Path] = []

            def scored_dir() -> Path:
                if not scored:
                    d, sources["scored"] = ensure(ctx, keys["scored"], pl["scored"],
                                                   lambda t: _score(ctx, row, pairs_dir, t),
                                                   lambda t: adopt_scored(ctx, keys["scored"], keys["pairs"], t),
                                                   _describe_scored, force)
                    scored.append(d)
                return scored[0]

            ref_dir, sources["refined"] = ensure(ctx, keys["refined"], pl["refined"],
                                                  lambda t: _rethreshold(ctx, row, pairs_dir, scored_dir(), t),
                                                  lambda t: adopt_refined(ctx, keys["refined"], keys["pairs"], t),
                                                  _describe_refined, force)
            data_key, data_file = keys["refined"], ref_dir / REFINED[1]
        twin = twin_index(ctx, pl["model"], data_file)
        model_dir, sources["model"] = ensure(ctx, keys["model"], pl["model"], lambda t: _train(ctx, row, data_file, t),
                                              lambda t: (adopt_model(ctx, keys["model"], data_key, data_file, t)
                                                         or adopt_twin_model(ctx, keys["model"], twin, t)),
                                              _describe_model, force)
        if not twin.exists():
            atomic_write_text(twin, keys["model"])
        _, sources["results"] = ensure(ctx, keys["results"], pl["results"],
                                        lambda t: _results(ctx, keys["results"], model_dir, t),
                                        lambda t: (adopt_results(ctx, keys["results"], model_dir, t)
                                                   or adopt_twin_results(ctx, keys["results"], model_dir, t)),
                                        _describe_results, force)
    return {"name": row.name, "seed": row.seed, "keys": keys, "sources": sources}


def run_rows(ctx: AblationContext, rows: Sequence[Row | str] | None = None, force: bool = False,
             progress: bool = True) -> pd.DataFrame:
    """Run rows (Row objects, or names/groups of build_rows' rows; None: all) with a progress bar.

    A failing row does not stop the others: after the last row a RuntimeError lists the failures (the rows that
    finished stay cached). Returns one line per row: its name, seed and the source of each stage.
    """
    from tqdm.auto import tqdm

    every = build_rows(ctx.profile)
    if rows is None:
        todo = every
    else:
        names = [r for r in rows if isinstance(r, str)]
        todo = [r for r in rows if isinstance(r, Row)] + select_rows(every, names) if names else list(rows)
        bad = [r for r in todo if not isinstance(r, Row)]
        if bad:
            raise ValueError(f"rows must be Row objects or row/group names, got {bad[0]!r}")
    out, failed = [], []
    bar = tqdm(todo, desc="ablation rows", disable=not progress)
    for row in bar:
        bar.set_postfix_str(f"{row.name} seed {row.seed}")
        try:
            rec = run_row(ctx, row, force=force)
        except Exception as e:  # noqa: BLE001 -- reported together after the other rows ran
            failed.append(f"{row.name} (seed {row.seed}): {type(e).__name__}: {e}")
            continue
        out.append({"name": row.name, "seed": row.seed, **rec["sources"]})
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(todo)} ablation rows failed:\n  " + "\n  ".join(failed))
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
