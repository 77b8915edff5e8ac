"""Stage 01: problem tables, and N graded samples per problem as one samples table."""

from __future__ import annotations

import pandas as pd

from .generation import sample
from .toyworld import ToyProblem, prompt_for

SAMPLE_COLUMNS = [
    "problem_id", "k", "sample_idx", "prompt", "text", "n_tokens", "n_think_tokens",
    "correct", "status", "finish_reason", "gold",
]


def toy_problem_table(problems: list[ToyProblem], tokenizer) -> pd.DataFrame:
    """A problems table (problem_id, k, problem, gold, prompt, source) for toy problems."""
    return pd.DataFrame(
        {
            "problem_id": [p.problem_id for p in problems],
            "k": [p.k for p in problems],
            "problem": [p.question for p in problems],
            "gold": [str(p.answer) for p in problems],
            "prompt": [prompt_for(p.question, tokenizer) for p in problems],
            "source": "toy",
        }
    )


def grade(texts: list[str], golds: list[str], kind: str) -> list[str]:
    """Grade completions: 'toy' exact match or 'math' equivalence; returns statuses."""
    from . import grading

    if kind == "toy":
        return [grading.grade_toy(t, g) for t, g in zip(texts, golds)]
    if kind == "math":
        return grading.grade_many(texts, golds, kind="math")
    raise ValueError(f"unknown grading kind {kind!r}: use 'toy' or 'math'")


def sample_and_grade(model, tokenizer, problems: pd.DataFrame, n: int, temperature: float, top_p: float,
                     max_new_tokens: int, seed: int, batch_size: int = 64, grader: str = "toy",
                     backend: str = "transformers", progress: bool = True) -> pd.DataFrame:
    """Sample n completions for every problem and grade them; one row per response (the samples table)."""
    for col in ("problem_id", "k", "prompt", "gold"):
        if col not in problems.columns:
            raise ValueError(f"problems table lacks the column {col!r}")
    if len(problems) == 0:
        raise ValueError("the problems table is empty")
    res = sample(model, tokenizer, list(problems["prompt"]), n=n, temperature=temperature, top_p=top_p,
                 max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, backend=backend, progress=progress)
    rows = []
    for (_, p), texts, ntok, nthink, reasons in zip(problems.iterrows(), res.texts, res.n_tokens, res.n_think_tokens,
                                                    res.finish_reasons):
        for j in range(n):
            rows.append(dict(problem_id=p["problem_id"], k=int(p["k"]), sample_idx=j, prompt=p["prompt"], text=texts[j],
                             n_tokens=int(ntok[j]), n_think_tokens=int(nthink[j]), finish_reason=reasons[j],
                             gold=str(p["gold"])))
    df = pd.DataFrame(rows, columns=[c for c in SAMPLE_COLUMNS if c not in ("correct", "status")])
    df["status"] = grade(list(df["text"]), list(df["gold"]), grader)
    # an unfinished response (cut at max_new_tokens) never counts as correct
    df.loc[df["finish_reason"] == "length", "status"] = df.loc[df["finish_reason"] == "length", "status"].where(
        df.loc[df["finish_reason"] == "length", "status"] != "correct", "no_answer")
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
                                  mean_tokens=("n_tokens", "mean"), unfinished=("finish_reason", lambda s: (s == "length").mean()))
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
        "unfinished": int((samples["finish_reason"] == "length").sum()),
        "mean_within_problem_cv": float(stats["cv_tokens"].mean()),
        "problems_all_correct": int((stats["p"] == 1).sum()),
        "problems_none_correct": int((stats["p"] == 0).sum()),
        "accuracy_by_k": {int(k): float(v) for k, v in by["accuracy"].items()},
        "mean_tokens_by_k": {int(k): float(v) for k, v in by["mean_tokens"].items()},
        "tokens_counted": "completion tokens (thinking + answer), model tokenizer, no prompt or padding",
    }


def training_problems(profile, tokenizer) -> pd.DataFrame:
    """The training problems of a profile: seeded toy problems, or a benchmark (hub or local file) with the R1 prompt.

    A benchmark holding more problems than data.n_train_problems gives a seeded random subset (kept in file
    order), not its first rows: a dataset's order can follow its subjects or difficulty.
    """
    from .config import stage_seed
    from .toyworld import make_problems

    d = profile.data
    seed = stage_seed(profile.seed, "train-problems")
    if d.train == "toy":
        tw = profile.toyworld
        probs = make_problems(d.n_train_problems, seed, tw.k_min, tw.k_max, tw.max_value, split="train")
        return toy_problem_table(probs, tokenizer)
    from .data import load_benchmark, local_path_for, r1_prompt

    df = load_benchmark(d.train, local_path=local_path_for(d.train, d.local_files, d.local_dir))
    if len(df) > d.n_train_problems:
        df = df.sample(n=d.n_train_problems, random_state=seed).sort_index()
    df = df.reset_index(drop=True)
    df["prompt"] = [r1_prompt(p, tokenizer) for p in df["problem"]]
    return df


def grader_for(profile) -> str:
    """'toy' for the toy world, 'math' otherwise."""
    return "toy" if profile.data.train == "toy" else "math"
