"""Stage 01: problem tables, and N graded samples per problem as one samples table."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pandas as pd

from ..core.parallel import map_shards, n_workers, shard_bounds
from ..model.generation import Decoding, sample
from ..task.base import Task
from ..task.registry import training_task

SAMPLE_COLUMNS = [
    "problem_id", "k", "sample_idx", "prompt", "text", "n_tokens", "n_think_tokens",
    "correct", "status", "finish_reason", "gold",
]


@dataclass(frozen=True)
class SampleRun:
    """Where samples are drawn: the backend, the fixed shards of the problems, the processes that run them."""

    backend: str = "transformers"  # "transformers" or "vllm" (generation.sample)
    shards: int = 1  # fixed pieces of the problems: they, not `workers`, decide every byte (core/parallel.py)
    workers: int = 1  # processes running the shards (0: every core)
    progress: bool = True

    @classmethod
    def of(cls, profile, progress: bool = True) -> SampleRun:
        """A profile's backend (sampling.backend), shards and workers."""
        return cls(profile.sampling.backend, profile.shards, profile.workers, progress)


def sampling_decoding(profile, seed: int) -> Decoding:
    """Stage 01's decoding: sampling.n samples per problem at sampling.temperature / top_p, its limit and batch."""
    S = profile.sampling
    return Decoding(n=S.n, temperature=S.temperature, top_p=S.top_p, max_new_tokens=S.max_new_tokens, seed=seed,
                    batch_size=S.batch_size)


def sample_and_grade(model, tokenizer, problems: pd.DataFrame, task: Task, spec: Decoding,
                     run: SampleRun = SampleRun()) -> pd.DataFrame:
    """Sample spec.n completions for every problem and grade them by the task; one row per response (samples table).

    The problems are cut into `run.shards` contiguous pieces, each sampled (its own batches, rows seeded by their
    global index) and graded on its own, by up to `run.workers` one-thread processes (core/parallel.py): the table is
    the same whatever `workers` is. The vLLM backend takes every problem in one call (the engine batches them).
    """
    for col in ("problem_id", "k", "prompt", "gold"):
        if col not in problems.columns:
            raise ValueError(f"problems table lacks the column {col!r}")
    if len(problems) == 0:
        raise ValueError("the problems table is empty")
    problems = problems.reset_index(drop=True)
    args = dict(model=model, tokenizer=tokenizer, problems=problems, task=task, spec=spec, backend=run.backend)
    if run.backend != "transformers":
        return _sample_shard(args, (0, len(problems), run.progress))
    bounds = [b for b in shard_bounds(len(problems), min(run.shards, len(problems))) if b[1] > b[0]]
    # one bar over the shards when they run in processes (a child's bar would interleave); the batches' bar otherwise
    many = len(bounds) > 1 and n_workers(run.workers) > 1
    parts = map_shards(_sample_shard, [(lo, hi, run.progress and not many) for lo, hi in bounds], workers=run.workers,
                       shared=args, progress=run.progress and many, desc="sampling shards")
    return pd.concat(parts, ignore_index=True)


def _sample_shard(args: dict, part: tuple[int, int, bool]) -> pd.DataFrame:
    """The graded samples table of problems[lo:hi] (a module-level function: map_shards sends it by name)."""
    lo, hi, progress = part
    problems = args["problems"].iloc[lo:hi]
    spec, tokenizer = args["spec"], args["tokenizer"]
    n = spec.n
    res = sample(args["model"], tokenizer, list(problems["prompt"]), replace(spec, first_index=lo),
                 backend=args["backend"], progress=progress)
    rows = []
    for (_, p), texts, ntok, nthink, reasons in zip(problems.iterrows(), res.texts, res.n_tokens, res.n_think_tokens,
                                                    res.finish_reasons):
        for j in range(n):
            rows.append(dict(problem_id=p["problem_id"], k=int(p["k"]), sample_idx=j, prompt=p["prompt"], text=texts[j],
                             n_tokens=int(ntok[j]), n_think_tokens=int(nthink[j]), finish_reason=reasons[j],
                             gold=str(p["gold"])))
    df = pd.DataFrame(rows, columns=[c for c in SAMPLE_COLUMNS if c not in ("correct", "status")])
    df["status"] = args["task"].grade(list(df["text"]), list(df["gold"]))
    # an unfinished response (cut at max_new_tokens) never counts as correct
    unfinished = df["finish_reason"] != "stop"
    df.loc[unfinished & (df["status"] == "correct"), "status"] = "no_answer"
    df["correct"] = df["status"] == "correct"
    return df[SAMPLE_COLUMNS]


def _check_samples(samples: pd.DataFrame, columns: tuple[str, ...]) -> None:
    """ValueError naming what is wrong when a samples table lacks columns or rows (pandas would say KeyError or NaN)."""
    missing = [c for c in columns if c not in samples.columns]
    if missing:
        raise ValueError(f"samples table lacks the column(s) {missing}")
    if len(samples) == 0:
        raise ValueError("the samples table is empty")


def per_problem_stats(samples: pd.DataFrame) -> pd.DataFrame:
    """Per problem: k, samples, correct count, correctness rate p, mean/std/CV of tokens."""
    _check_samples(samples, ("problem_id", "k", "correct", "n_tokens"))
    g = samples.groupby("problem_id")
    out = pd.DataFrame(
        {
            "k": g["k"].first(),
            "n": g.size(),
            "c": g["correct"].sum(),
            "mean_tokens": g["n_tokens"].mean(),
            "std_tokens": g["n_tokens"].std(ddof=0),
        }
    )
    out["p"] = out["c"] / out["n"]
    out["cv_tokens"] = out["std_tokens"] / out["mean_tokens"].where(out["mean_tokens"] > 0)
    return out.reset_index()


def summary_by_k(samples: pd.DataFrame) -> pd.DataFrame:
    """Accuracy, mean tokens and mean within-problem CV of tokens, by difficulty k."""
    _check_samples(samples, ("problem_id", "k", "correct", "n_tokens", "finish_reason"))
    stats = per_problem_stats(samples)
    by = samples.groupby("k").agg(responses=("correct", "size"), accuracy=("correct", "mean"),
                                  mean_tokens=("n_tokens", "mean"),
                                  unfinished=("finish_reason", lambda s: (s != "stop").mean()))
    by["mean_cv_tokens"] = stats.groupby("k")["cv_tokens"].mean()
    return by


def sampling_summary(samples: pd.DataFrame) -> dict:
    """Counts, overall and per-k accuracy and mean tokens, for summary.json."""
    _check_samples(samples, ("problem_id", "k", "correct", "n_tokens", "n_think_tokens", "finish_reason"))
    by = summary_by_k(samples)
    stats = per_problem_stats(samples)
    return {
        "problems": int(samples["problem_id"].nunique()),
        "responses": int(len(samples)),
        "samples_per_problem": int(samples.groupby("problem_id").size().max()),
        "accuracy": float(samples["correct"].mean()),
        "mean_tokens": float(samples["n_tokens"].mean()),
        "mean_think_tokens": float(samples["n_think_tokens"].mean()),
        "unfinished": int((samples["finish_reason"] != "stop").sum()),
        "mean_within_problem_cv": float(stats["cv_tokens"].mean()),
        "problems_all_correct": int((stats["p"] == 1).sum()),
        "problems_none_correct": int((stats["p"] == 0).sum()),
        "accuracy_by_k": {int(k): float(v) for k, v in by["accuracy"].items()},
        "mean_tokens_by_k": {int(k): float(v) for k, v in by["mean_tokens"].items()},
        "tokens_counted": "completion tokens (thinking + answer), model tokenizer, no prompt or padding",
    }


def training_problems(profile, tokenizer) -> pd.DataFrame:
    """The training problems of a profile: its training task's "train" split (task.base.Task.problems)."""
    return training_task(profile).problems(profile, tokenizer, "train")


def reasoner_checks(greedy: pd.DataFrame, sampled: pd.DataFrame, heldout: pd.DataFrame, tokenizer,
                    task: Task) -> dict:
    """The properties that make a base reasoner worth compressing (notebook 00), on held-out problems of a task with
    an oracle (the toy world)."""
    oracle = task.oracle_lengths(heldout, tokenizer)
    g = greedy.merge(oracle, on="problem_id")
    stats = per_problem_stats(sampled)
    by_k = pd.DataFrame({
        "problems": greedy.groupby("k").size(),
        "greedy_acc": greedy.groupby("k")["correct"].mean(),
        "greedy_tokens": greedy.groupby("k")["n_tokens"].mean(),
        "oracle_tokens": oracle.groupby("k")["oracle_tokens"].mean(),
        "sampled_acc": sampled.groupby("k")["correct"].mean(),
        "sampled_tokens": sampled.groupby("k")["n_tokens"].mean(),
        "length_cv": stats.groupby("k")["cv_tokens"].mean(),
    })
    by_k.index.name = "k"
    return {
        "heldout_problems": int(len(greedy)),
        "greedy_accuracy": float(greedy["correct"].mean()),
        "greedy_tokens": float(greedy["n_tokens"].mean()),
        "oracle_tokens": float(g["oracle_tokens"].mean()),
        "greedy_over_oracle": float(g["n_tokens"].mean() / g["oracle_tokens"].mean()),
        "sampled_accuracy": float(sampled["correct"].mean()),
        "sampled_responses": int(len(sampled)),
        "mean_cv": float(stats["cv_tokens"].mean()),
        "by_k": by_k.round(4).reset_index().to_dict(orient="list"),
        "oracle_len_by_k": by_k["oracle_tokens"],
    }
