"""The refinement run: every response planned, its steps' candidates drawn per group of responses and scored, the
accepted steps reassembled; refine_pairs over a pairs table (in processes, resumable, sharded) and rethreshold."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from ...core.config import RefinementConfig, stage_seed
from ...core.parallel import map_shards, n_workers
from ...task.base import Task
from . import shards, sources
from .plan import RefineResult, StepPlan, assemble, plan_response
from .scoring import REDUCTIONS, SCORING_MODES, _model_device, _phase, _ResponseForward, _score_job, accept
from .step_log import STEP_LOG_COLUMNS, fully_scored, refined_tables

# Rows per generate call when the candidates of many steps are drawn together (a RefinementConfig with a
# sample_batch_size field overrides it). On one CPU thread the toy reasoner's generation is compute-bound, not
# overhead-bound: 64 rows was as fast as or faster than 16, 128 and 256 (more rows mean more padding and more
# decoding steps run to the largest token limit); a GPU wants far larger batches.
SAMPLE_BATCH_SIZE = 64
PAIRS_REQUIRED = ("problem_id", "prompt", "chosen", "chosen_tokens", "chosen_sample_idx")
GradeFn = Callable[[str], bool]
GradeFnFactory = Callable[[pd.Series], "GradeFn | None"]


@dataclasses.dataclass(frozen=True)
class RefineOptions:
    """How a refinement run is carried out, beyond the profile's RefinementConfig: batching, grouping, processes,
    resumable shards and a vLLM engine."""

    sample_batch_size: int | None = None  # rows per generate call; None: the config's field of that name if it has
    # one, else SAMPLE_BATCH_SIZE
    cap_to_original: bool = True  # stop sampling near the original step's length; score only shorter candidates
    shards: int = 1  # the responses form at least this many groups (the profile's `shards`)
    workers: int = 1  # one-thread processes sharing the groups (core/parallel.py); the tables do not depend on it
    shard_dir: str | Path | None = None  # each finished group is written here, and a rerun reads it back
    shard: tuple[int, int] = (0, 1)  # (i, n): compute only the groups g with g % n == i (one process per GPU)
    llm: Any = None  # a vLLM engine of the same model (candidates "vllm")


class Response(NamedTuple):
    """One response to refine: its prompt and text, its name in the step log and what says it still grades."""

    prompt: str
    text: str
    response_id: str = ""
    grade_fn: GradeFn | None = None


@dataclasses.dataclass(frozen=True)
class _Run:
    """What every group of one run shares: the model, its tokenizer, the settings, the seed and the options."""

    model: Any
    tokenizer: Any
    cfg: RefinementConfig
    seed: int
    options: RefineOptions  # sample_batch_size resolved
    progress: bool = False


def _resolved(options: RefineOptions | None, cfg: RefinementConfig) -> RefineOptions:
    """The options with sample_batch_size filled in (a config that carries the knob wins over the module default)."""
    options = RefineOptions() if options is None else options
    if options.sample_batch_size is None:
        options = dataclasses.replace(options, sample_batch_size=getattr(cfg, "sample_batch_size", SAMPLE_BATCH_SIZE))
    return options


def _validate(cfg: RefinementConfig, options: RefineOptions) -> None:
    """A ValueError naming the first setting refinement cannot run with."""
    for name, value, lo in (("n_candidates", cfg.n_candidates, 1), ("window", cfg.window, 1),
                            ("max_step_tokens", cfg.max_step_tokens, 1), ("batch_size", cfg.batch_size, 1),
                            ("sample_batch_size", options.sample_batch_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    epsilon, temperature = cfg.epsilon, cfg.temperature
    if not (isinstance(epsilon, (int, float)) and epsilon >= 0 and not math.isnan(epsilon)):
        raise ValueError(f"epsilon must be a number >= 0, got {epsilon!r}")
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if cfg.kl_reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {cfg.kl_reduction!r}")
    if cfg.scoring not in SCORING_MODES:
        raise ValueError(f"scoring must be one of {SCORING_MODES}, got {cfg.scoring!r}")
    if cfg.candidates not in sources.CANDIDATE_SOURCES:
        raise ValueError(f"candidates must be one of {sources.CANDIDATE_SOURCES}, got {cfg.candidates!r}")
    if cfg.candidates == "vllm" and options.llm is None:
        raise ValueError("candidates='vllm' needs a vLLM engine (RefineOptions(llm=...)) of the same model")


def _refine_many(run: _Run, items: Sequence[Response]) -> list[RefineResult | None]:
    """Refine responses: plan all, then per group of responses draw every step's candidates in one sampler call (or
    per response from its own cache), score them and reassemble.

    With a shard folder each finished group is written there and a group already there is read back instead of
    redone; only groups g with g % shard[1] == shard[0] are computed (the others stay None unless on disk)."""
    cfg, options = run.cfg, run.options
    _validate(cfg, options)
    plans = [plan_response(run.tokenizer, it.prompt, it.text, cfg, it.response_id, options.cap_to_original)
             for it in items]
    grade_fns = [it.grade_fn for it in items]
    index, n_shards = options.shard
    if not (isinstance(n_shards, int) and isinstance(index, int) and 0 <= index < n_shards):
        raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {options.shard!r}")
    settings = shards.run_settings(cfg, run.seed, options, run.model)
    results: list[RefineResult | None] = [None] * len(plans)
    bar = tqdm(total=len(plans), desc="refining responses", disable=not run.progress)
    first = 0
    for g, group in enumerate(shards._sampling_groups(plans, options.shards)):
        at, first = first, first + len(group)
        path = fingerprint = None
        if options.shard_dir is not None:
            path, fingerprint = Path(options.shard_dir) / f"group-{g:05d}.json", shards._group_fingerprint(settings,
                                                                                                          group)
            reused = shards.reuse_group(path, fingerprint)  # another run's group is redone and replaced
            if reused is not None:
                results[at:first] = reused
                bar.update(len(group))
                continue
        if g % n_shards != index:
            continue
        done = _refine_group(run, group, grade_fns[at:first], g, bar)
        if path is not None:
            shards._save_group(path, fingerprint, done)
        results[at:first] = done
    bar.close()
    return results


def _refine_group(run: _Run, group: list[StepPlan], grade_fns: list[GradeFn | None], g: int,
                  bar: tqdm) -> list[RefineResult]:
    """One group of responses: its candidates drawn (one sampler call, or one vLLM call), scored and reassembled."""
    cfg = run.cfg
    if cfg.candidates == "sampler":
        with _phase("sample"):
            seed = stage_seed(run.seed, f"refine-candidates-{g}")
            sources._draw_candidates(run.model, run.tokenizer, group, cfg, seed, run.options.sample_batch_size,
                                     run.progress)
    elif cfg.candidates == "vllm":
        sources._vllm_candidates(run.options.llm, run.tokenizer, group, cfg, run.seed)
    done: list[RefineResult] = []
    for plan, grade_fn in zip(group, grade_fns):
        done.append(assemble(run.tokenizer, plan, _choose(run, plan), grade_fn))
        bar.update(1)
    return done


def _choose(run: _Run, plan: StepPlan) -> dict[int, str]:
    """Step index -> the accepted candidate, for the steps of one response that keep one."""
    model, cfg, cap = run.model, run.cfg, run.options.cap_to_original
    chosen = {}
    if plan.jobs and (cfg.scoring != "reference" or cfg.candidates == "branch"):
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                fwd = _ResponseForward(model, plan.all_ids(), _model_device(model))
                if cfg.candidates == "branch":
                    sources._branch_candidates(model, run.tokenizer, plan, fwd, cfg, run.seed)
                for i in plan.jobs:
                    cand = _score_job(model, run.tokenizer, plan, i, cfg, cap, fwd)
                    if cand is not None:
                        chosen[i] = cand
        finally:
            model.train(was_training)
    else:
        for i in plan.jobs:
            cand = _score_job(model, run.tokenizer, plan, i, cfg, cap)
            if cand is not None:
                chosen[i] = cand
    return chosen


def refine_response(model, tokenizer, response: Response, cfg: RefinementConfig | None = None, seed: int = 0,
                    options: RefineOptions | None = None) -> RefineResult:
    """Refine each thinking step of one response under the windowed KL; revert if it no longer grades correct."""
    cfg = RefinementConfig() if cfg is None else cfg
    return _refine_many(_Run(model, tokenizer, cfg, seed, _resolved(options, cfg)), [response])[0]


# --------------------------------------------------------------------------- pairs tables


def _targets(pairs: pd.DataFrame, cfg: RefinementConfig) -> tuple[list, list, list[pd.Series]]:
    """The distinct (prompt, chosen) keys of a pairs table, those refine_pairs refines, and their first rows."""
    if not isinstance(pairs, pd.DataFrame):
        raise ValueError(f"pairs must be a pandas DataFrame, got {type(pairs).__name__}")
    missing = [c for c in PAIRS_REQUIRED if c not in pairs.columns]
    if missing:
        raise ValueError(f"pairs table lacks column(s) {missing} (needs {list(PAIRS_REQUIRED)})")
    # A response is refined in the context of its own prompt, so the cache key is (prompt, chosen).
    keys = list(dict.fromkeys(zip(pairs["prompt"], pairs["chosen"])))
    if not cfg.enabled:
        keys_to_refine = []
    else:
        keys_to_refine = keys[:cfg.max_responses] if cfg.max_responses > 0 else keys
    first_row: dict[tuple[str, str], int] = {}
    for pos, key in enumerate(zip(pairs["prompt"], pairs["chosen"])):
        first_row.setdefault(key, pos)
    return keys, keys_to_refine, [pairs.iloc[first_row[key]] for key in keys_to_refine]


def _response_id(row: pd.Series) -> str:
    """The step log's name of a pair row's chosen response."""
    return f"{row['problem_id']}/{row['chosen_sample_idx']}"


def refine_pairs(model, tokenizer, pairs: pd.DataFrame, cfg: RefinementConfig, seed: int,
                 grade_fn_factory: GradeFnFactory | None = None, progress: bool = True,
                 options: RefineOptions | None = None) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Refine each distinct chosen response once; return the refined pairs table and the per-step log.

    Resumable and shardable: with options.shard_dir, each group of responses (one sampler call,
    shards.MAX_STEPS_PER_CALL steps at most) is written to shard_dir as it finishes, and a rerun reads finished groups
    back instead of redoing them (same results as an uninterrupted run: a group's candidates depend on its seed and its
    responses only). With options.shard=(i, n), this process computes only groups g with g % n == i (one process per
    GPU) and returns None while other groups are missing; a final call with the default shard, after all processes
    are done, assembles.

    cfg.scoring: "full" (every candidate shorter than its step gets its exact KL: what rethreshold needs), "fast"
    (the same accept decisions; length groups shortest first and early rejection leave NaNs and flagged lower
    bounds) or "reference" (the original recomputed with every batch of candidates, as before); cfg.candidates:
    "sampler" (one sampler call per group of responses), "branch" (decoded from each response's own cache) or
    "vllm" (options.llm: a vLLM engine of the same model; prefix caching shares each response's step prefixes);
    cfg.steps: "segments" (each segment tokenized alone, as before) or "spans" (token spans of the whole response's
    tokenization: the ids the model produces; step and candidate token counts then include the boundary token).

    options.shards / options.workers (the profile's): the responses form at least `shards` groups, which up to
    `workers` one-thread processes share (core/parallel.py); a group's result depends on its responses and seed only,
    so the tables are the same whatever `workers` is. Processes are for the transformers candidate sources (not
    vLLM's engine).
    """
    keys, keys_to_refine, rows = _targets(pairs, cfg)
    options = _resolved(options, cfg)
    items = [Response(key[0], key[1], _response_id(row),
                      grade_fn_factory(row) if grade_fn_factory is not None else None)
             for key, row in zip(keys_to_refine, rows)]
    run = _Run(model, tokenizer, cfg, seed, options, progress)
    n_proc = (1 if (cfg.candidates == "vllm" or options.shard != (0, 1))
              else min(n_workers(options.workers), max(1, options.shards)))
    if n_proc <= 1:
        refined = _refine_many(run, items)
    else:
        # process i computes groups g with g % n_proc == i; each group's result is the same in any process
        parts = map_shards(_refine_part, [(i, n_proc) for i in range(n_proc)], workers=options.workers,
                           shared=(dataclasses.replace(run, progress=False), items), progress=progress,
                           desc="refinement processes")
        refined = [next((part[j] for part in parts if part[j] is not None), None) for j in range(len(items))]
    if any(r is None for r in refined):
        return None
    return refined_tables(tokenizer, pairs, keys, keys_to_refine, rows, refined)


def _refine_part(shared: tuple[_Run, list[Response]], shard: tuple[int, int]) -> list[RefineResult | None]:
    """One process's share of _refine_many's groups (module-level: map_shards sends it by name)."""
    run, items = shared
    return _refine_many(dataclasses.replace(run, options=dataclasses.replace(run.options, shard=shard)), items)


def rethreshold(tokenizer, pairs: pd.DataFrame, step_log: pd.DataFrame, cfg: RefinementConfig,
                grade_fn_factory: GradeFnFactory | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """refine_pairs' result at cfg.epsilon, from the step log of a run on the same pairs at any other epsilon.

    Exact because the candidates are drawn, and every candidate shorter than its step is scored, before epsilon
    is looked at: the run (same model, seed and other settings) differs only in which candidate each step keeps.
    """
    keys, keys_to_refine, rows = _targets(pairs, cfg)
    missing = [c for c in STEP_LOG_COLUMNS if c not in step_log.columns and c != "kl_bound"]  # older logs: exact
    if missing:
        raise ValueError(f"step log lacks column(s) {missing}: it comes from an older refinement run; rerun it")
    if not fully_scored(step_log):
        raise ValueError("the step log holds unscored or lower-bound KLs of candidates shorter than their step (a "
                         "run with scoring='fast'): re-thresholding needs a refine_pairs run with scoring='full'")
    by_id = {rid: g.sort_values("step") for rid, g in step_log.groupby("response_id", sort=False)}
    # window and token cap only decide the jobs' continuation and sampling limits, which the log already holds
    plan_cfg = dataclasses.replace(cfg, window=1, max_step_tokens=1)
    refined = []
    for key, row in zip(keys_to_refine, rows):
        rid = _response_id(row)
        plan = plan_response(tokenizer, key[0], key[1], plan_cfg, rid)
        log = by_id.get(rid)
        n_log = 0 if log is None else len(log)
        if n_log != len(plan.records) or (n_log and (
                log["step"].tolist() != [r.step for r in plan.records]
                or log["orig_tokens"].tolist() != [r.orig_tokens for r in plan.records])):
            raise ValueError(f"response {rid}: the step log does not match its steps (another pairs table, "
                             "tokenizer or refinement run?)")
        chosen: dict[int, str] = {}
        for rec, (_, e) in zip(plan.records, log.iterrows() if n_log else []):
            rec.skipped, rec.n_sampled, rec.n_dropped = e["skipped"], int(e["n_sampled"]), int(e["n_dropped"])
            rec.cand_tokens = [int(x) for x in e["cand_tokens"]]
            rec.cand_texts = [str(x) for x in e["cand_texts"]]
            rec.kl = [float(x) for x in e["kl"]]
            rec.kl_bound = [bool(x) for x in e["kl_bound"]] if "kl_bound" in e else [False] * len(rec.kl)
            if rec.skipped:
                continue
            best = accept(rec, cfg.epsilon)
            if best is not None:
                chosen[rec.step] = rec.cand_texts[best]
        grade_fn = grade_fn_factory(row) if grade_fn_factory is not None else None
        refined.append(assemble(tokenizer, plan, chosen, grade_fn))
    return refined_tables(tokenizer, pairs, keys, keys_to_refine, rows, refined)


def grader_factory(samples: pd.DataFrame, task: Task) -> Callable[[pd.Series], GradeFn]:
    """For refine_pairs: a factory giving, for a pair row, a function that says if a text still grades correct (by
    the task: Task.grade)."""
    golds = samples.groupby("problem_id")["gold"].first().to_dict()

    def factory(row: pd.Series) -> Callable[[str], bool]:
        gold = golds[row["problem_id"]]
        return lambda text: task.grade([text], [gold])[0] == "correct"

    return factory


