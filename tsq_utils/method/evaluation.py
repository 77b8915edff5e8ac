"""Evaluation metrics (TokenSqueeze §5, TLDR): accuracy, Len-T, Len-A, budget curves, AUC, A.C.R.

Lengths are completion tokens (thinking + answer, no prompt), the n_tokens column of the results.
Accuracies are fractions in [0, 1] everywhere (tables and JSON); notebooks multiply by 100 to print.

Conventions for degenerate input: an empty set of responses is a ValueError (no metric is defined);
len_t of a set with no correct response is NaN (there is no correct length to average); std_error of
a single response (or of a single problem, when clustered) is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..model.generation import Decoding, count_tokens, sample
from ..task.base import Task
from ..task.format import THINK_CLOSE, thinking_part
from ..task.registry import eval_tasks, get_task
from .sampling import SampleRun, sample_and_grade

RESULT_COLUMNS = ("model", "benchmark", "problem_id", "correct", "n_tokens")
METRIC_COLUMNS = ("acc", "acc_se", "len_t", "len_a", "auc", "n")

ArrayLike = Sequence | np.ndarray | pd.Series


def _as_correct(correct: ArrayLike) -> np.ndarray:
    """A non-empty boolean array, or ValueError."""
    arr = np.asarray(correct)
    if arr.ndim != 1:
        raise ValueError(f"correct must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("no responses: metrics of an empty set are undefined")
    if arr.dtype != bool:
        if not np.isin(arr, [0, 1]).all():
            raise ValueError("correct must hold booleans (or 0/1)")
        arr = arr.astype(bool)
    return arr


def _as_lengths(n_tokens: ArrayLike, size: int | None = None) -> np.ndarray:
    """A non-empty float array of non-negative finite lengths (of the given size), or ValueError."""
    arr = np.asarray(n_tokens, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"n_tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("no responses: metrics of an empty set are undefined")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError("n_tokens must hold finite non-negative numbers")
    if size is not None and arr.size != size:
        raise ValueError(f"correct and n_tokens differ in length ({size} vs {arr.size})")
    return arr


def _check_budget(budget: float) -> float:
    if not (isinstance(budget, (int, float, np.integer, np.floating)) and math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a positive finite number, got {budget!r}")
    return float(budget)


def accuracy(correct: ArrayLike) -> float:
    """Share of correct responses."""
    return float(_as_correct(correct).mean())


def len_t(correct: ArrayLike, n_tokens: ArrayLike) -> float:
    """Len-T: mean tokens of the correct responses (NaN when none is correct)."""
    ok = _as_correct(correct)
    lengths = _as_lengths(n_tokens, ok.size)
    return float(lengths[ok].mean()) if ok.any() else math.nan


def len_a(n_tokens: ArrayLike) -> float:
    """Len-A: mean tokens of all responses."""
    return float(_as_lengths(n_tokens).mean())


def acc_curve(correct: ArrayLike, n_tokens: ArrayLike, budgets: ArrayLike) -> np.ndarray:
    """Acc(b) for each budget b: share of responses that are correct and at most b tokens long."""
    ok = _as_correct(correct)
    lengths = _as_lengths(n_tokens, ok.size)
    b = np.asarray(budgets, dtype=float)
    if np.isnan(b).any():
        raise ValueError("budgets must not hold NaN")
    sorted_correct = np.sort(lengths[ok])
    # side="right": a response of exactly b tokens fits in budget b
    return np.searchsorted(sorted_correct, b, side="right") / ok.size


def auc(correct: ArrayLike, n_tokens: ArrayLike, budget: float) -> float:
    """(1/B) * integral of Acc(b) over [0, B]: the mean of correct * max(0, 1 - len/B)."""
    ok = _as_correct(correct)
    lengths = _as_lengths(n_tokens, ok.size)
    b = _check_budget(budget)
    # Acc(b) is a step function: a correct response of length l contributes 1 on [l, B], i.e. (B - l)/B.
    return float(np.mean(ok * np.clip(1.0 - lengths / b, 0.0, None)))


def std_error(correct: ArrayLike, groups: ArrayLike | None = None) -> float:
    """Standard error of the accuracy; with groups (problem ids) the problem-clustered one."""
    return mean_se(_as_correct(correct).astype(float), groups)


def mean_se(values: ArrayLike, groups: ArrayLike | None = None) -> float:
    """Standard error of a mean of per-response values; with groups (problem ids) the problem-clustered one."""
    y = np.asarray(values, dtype=float)
    if y.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {y.shape}")
    n = y.size
    if groups is None:
        return float(y.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    g = np.asarray(groups)
    if g.shape != y.shape:
        raise ValueError(f"groups and values differ in length ({g.size} vs {n})")
    # Cluster-robust (sandwich) SE of a mean: sqrt(G/(G-1) * sum_g (sum_i in g (y_i - mean))^2) / n.
    # With one response per problem it is the i.i.d. SE; with m per problem it is the SE of the
    # G problem means. Samples of one problem are correlated, so the i.i.d. SE is too small.
    resid = pd.Series(y - y.mean()).groupby(g).sum().to_numpy()
    n_groups = resid.size
    if n_groups < 2:
        return math.nan
    return float(math.sqrt(n_groups / (n_groups - 1) * np.sum(resid**2)) / n)


def metrics_table(results: pd.DataFrame, budget: float) -> pd.DataFrame:
    """Acc, its problem-clustered SE, Len-T, Len-A, AUC at the budget and n per (model, benchmark)."""
    if not isinstance(results, pd.DataFrame):
        raise ValueError(f"results must be a pandas DataFrame, got {type(results).__name__}")
    missing = [c for c in RESULT_COLUMNS if c not in results.columns]
    if missing:
        raise ValueError(f"results table lacks column(s) {missing} (needs {list(RESULT_COLUMNS)})")
    if results.empty:
        raise ValueError("results table is empty: no metrics to compute")
    _check_budget(budget)
    rows = {}
    for (model, bench), g in results.groupby(["model", "benchmark"], sort=True):
        ok, lengths = g["correct"].to_numpy(), g["n_tokens"].to_numpy()
        rows[(model, bench)] = {
            "acc": accuracy(ok),
            "acc_se": std_error(ok, g["problem_id"].to_numpy()),
            "len_t": len_t(ok, lengths),
            "len_a": len_a(lengths),
            "auc": auc(ok, lengths, budget),
            "n": len(g),
        }
    table = pd.DataFrame.from_dict(rows, orient="index")[list(METRIC_COLUMNS)]
    table.index = pd.MultiIndex.from_tuples(table.index, names=["model", "benchmark"])
    return table


def acr(lengths_by_benchmark: Mapping[str, float], orig_lengths_by_benchmark: Mapping[str, float]) -> float:
    """TLDR's average compression ratio: mean over benchmarks of max(0, 1 - L / L_orig)."""
    if not lengths_by_benchmark:
        raise ValueError("no benchmarks: A.C.R. of nothing is undefined")
    if set(lengths_by_benchmark) != set(orig_lengths_by_benchmark):
        only_new = sorted(set(lengths_by_benchmark) - set(orig_lengths_by_benchmark))
        only_orig = sorted(set(orig_lengths_by_benchmark) - set(lengths_by_benchmark))
        raise ValueError(f"benchmarks differ: only in lengths {only_new}, only in original lengths {only_orig}")
    ratios = []
    for name, length in lengths_by_benchmark.items():
        orig = orig_lengths_by_benchmark[name]
        if not (math.isfinite(length) and length >= 0):
            raise ValueError(f"length of {name!r} must be finite and non-negative, got {length!r}")
        if not (math.isfinite(orig) and orig > 0):
            raise ValueError(f"original length of {name!r} must be finite and positive, got {orig!r}")
        ratios.append(max(0.0, 1.0 - length / orig))
    return float(np.mean(ratios))


def _json_value(x: object) -> object:
    """A plain-Python JSON value (NaN -> None, numpy scalars unwrapped)."""
    if isinstance(x, (np.integer, int)) and not isinstance(x, bool):
        return int(x)
    x = float(x)
    return None if math.isnan(x) else x


def json_safe(values: Mapping[str, float]) -> dict:
    """A flat mapping of numbers as plain JSON values, NaN as None (e.g. headline() when a model has no correct one)."""
    return {str(k): _json_value(v) for k, v in values.items()}


def metrics_json(table: pd.DataFrame) -> dict:
    """A metrics table as nested {model: {benchmark: {acc, acc_se, len_t, len_a, auc, n}}}, NaN as None."""
    missing = [c for c in METRIC_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"metrics table lacks column(s) {missing}")
    if list(table.index.names) != ["model", "benchmark"]:
        raise ValueError(f"metrics table must be indexed by (model, benchmark), got {list(table.index.names)}")
    out: dict = {}
    for (model, bench), row in table.iterrows():
        entry = {c: _json_value(row[c]) for c in METRIC_COLUMNS}
        entry["n"] = int(row["n"])  # iterrows upcasts the row to float
        out.setdefault(str(model), {})[str(bench)] = entry
    return out


# --------------------------------------------------------------------------- running the models


def eval_problems(profile, tokenizer) -> dict[str, pd.DataFrame]:
    """Evaluation problems by benchmark: each evaluation task's "test" split (held-out toy problems, or benchmark files
    with the R1 prompt)."""
    return {name: task.problems(profile, tokenizer, "test") for name, task in eval_tasks(profile).items()}


def eval_decoding(profile, seed: int, n: int | None = None) -> Decoding:
    """Stage 05's decoding: evaluation.n_samples (or n) per problem at the evaluation temperature / top_p and limit,
    in sampling.batch_size slots."""
    E = profile.evaluation
    return Decoding(n=E.n_samples if n is None else n, temperature=E.temperature, top_p=E.top_p,
                    max_new_tokens=E.max_new_tokens, seed=seed, batch_size=profile.sampling.batch_size)


def evaluate_model(name: str, model, tokenizer, problems: dict[str, pd.DataFrame], spec: Decoding,
                   run: SampleRun = SampleRun()) -> pd.DataFrame:
    """Per-response results of one model on every benchmark (spec.n samples per problem), graded by its task.

    problems: by task name (registry.get_task); run: as sampling.sample_and_grade (fixed shards of each benchmark).
    """
    frames = []
    for bench, probs in problems.items():
        df = sample_and_grade(model, tokenizer, probs, get_task(bench), spec, run)
        frames.append(df.assign(model=name, benchmark=bench))
    return pd.concat(frames, ignore_index=True)


def oracle_results(problems: pd.DataFrame, tokenizer, task: Task) -> pd.DataFrame:
    """Results rows of a task's oracle (the toy world's): the shortest correct trace of every problem (all correct)."""
    o = task.oracle_lengths(problems, tokenizer)
    return pd.DataFrame({
        "model": "oracle", "benchmark": task.name, "problem_id": o["problem_id"], "k": o["k"], "sample_idx": 0,
        "text": o["oracle_text"], "n_tokens": o["oracle_tokens"], "correct": True, "status": "correct",
        "finish_reason": "stop",
        "n_think_tokens": [count_tokens(tokenizer, thinking_part(t)) for t in o["oracle_text"]],
    })


def budget_forced_curve(models: Mapping, tokenizer, results: pd.DataFrame, budgets: Sequence[int],
                        answer_tokens: int = 24, batch_size: int = 128, backend: str = "transformers") -> pd.DataFrame:
    """Budget-forced Acc(b): thinking cut at b tokens, '</think>' forced, the answer generated greedily, then graded
    by the benchmark's task.

    A response whose thinking fits in b keeps its own grade. This is the s1 / Dynasor reading of a budget curve, unlike
    acc_curve, which counts a response as solved at b only if its whole completion is correct and no longer than b.
    `models` maps model names to what generation.sample draws from under `backend` (base_model.Samplers loads them
    one by one).
    """
    rows = []
    think_close = f"\n{THINK_CLOSE}\n\n"
    greedy = Decoding(n=1, temperature=0.0, max_new_tokens=answer_tokens, batch_size=batch_size)
    for (mname, bench), grp in results.groupby(["model", "benchmark"], sort=False):
        if mname not in models:
            continue  # e.g. the oracle: nothing to force
        model, task = models[mname], get_task(bench)
        for b in budgets:
            over = grp[grp["n_think_tokens"] > b]
            correct = grp["correct"].to_numpy(copy=True)
            if len(over):
                prompts = []
                for prompt, text in zip(over["prompt"], over["text"]):
                    ids = tokenizer(thinking_part(text), add_special_tokens=False)["input_ids"][:b]
                    prompts.append(prompt + tokenizer.decode(ids) + think_close)
                res = sample(model, tokenizer, prompts, greedy, backend=backend)
                forced = [think_close + r[0] for r in res.texts]
                status = task.grade(forced, list(over["gold"]))
                pos = grp.index.get_indexer(over.index)
                correct[pos] = np.array([s == "correct" for s in status])
            rows.append({"model": mname, "benchmark": bench, "budget": int(b), "acc": float(correct.mean()),
                         "n": int(len(grp))})
    return pd.DataFrame(rows)


def by_difficulty(results: pd.DataFrame) -> pd.DataFrame:
    """Accuracy, Len-T and Len-A per model and difficulty k."""
    def _agg(g: pd.DataFrame) -> pd.Series:
        c = g["correct"].to_numpy(bool)
        return pd.Series({"acc": c.mean(), "len_t": g.loc[c, "n_tokens"].mean() if c.any() else np.nan,
                          "len_a": g["n_tokens"].mean(), "n": len(g)})

    return results.groupby(["model", "k"]).apply(_agg, include_groups=False)


# The paper's Table 1 rows (DeepSeek-R1-Distill-Qwen-7B; accuracies as fractions, AUC at B = 32,768).
PAPER_7B = pd.DataFrame(
    [
        ("base (R1-Distill-7B)", "MATH500", 0.928, 3638, 0.836),
        ("TokenSqueeze", "MATH500", 0.924, 1773, 0.875),
        ("base (R1-Distill-7B)", "AIME24", 0.555, 7543, 0.416),
        ("TokenSqueeze", "AIME24", 0.575, 5157, 0.485),
        ("base (R1-Distill-7B)", "AIME25", 0.392, 6646, 0.312),
        ("TokenSqueeze", "AIME25", 0.398, 4711, 0.341),
    ],
    columns=["model", "benchmark", "acc", "len_t", "auc"],
)


def headline(table: pd.DataFrame, benchmark: str, base: str = "base", trained: str = "tokensqueeze") -> dict:
    """The headline comparison on one benchmark: accuracy change (points), Len-T change (%), AUC change."""
    b, t = table.loc[(base, benchmark)], table.loc[(trained, benchmark)]
    return {
        "acc_base": float(b["acc"]), "acc_trained": float(t["acc"]),
        "acc_change_points": float(100 * (t["acc"] - b["acc"])),
        "acc_se_points": float(100 * np.sqrt(b["acc_se"] ** 2 + t["acc_se"] ** 2)),
        "len_t_base": float(b["len_t"]), "len_t_trained": float(t["len_t"]),
        "len_t_change_pct": float(100 * (t["len_t"] / b["len_t"] - 1)),
        "auc_base": float(b["auc"]), "auc_trained": float(t["auc"]),
    }
