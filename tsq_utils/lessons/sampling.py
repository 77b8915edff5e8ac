"""Notebook 01, sampling: the summary lines and the worked example (a mixed problem) picked by rule."""

from __future__ import annotations

from typing import Any

import pandas as pd

from .widgets import pct


def seen_sampling(stats: pd.DataFrame) -> list[str]:
    """Three lines about the samples of 01 from per_problem_stats()."""
    n = int(stats["n"].max())
    mixed = ((stats["c"] > 0) & (stats["c"] < stats["n"])).mean()
    allc, nonec = (stats["c"] == stats["n"]).mean(), (stats["c"] == 0).mean()
    by_k = stats.groupby("k")["p"].mean()
    trend = "falls" if by_k.iloc[-1] < by_k.iloc[0] else "does not fall"
    return [
        f"{len(stats)} problems x N = {n} samples; mean correctness rate p = {stats['p'].mean():.2f}, and it {trend} "
        f"with difficulty (k = {by_k.index[0]}: {by_k.iloc[0]:.2f}, k = {by_k.index[-1]}: {by_k.iloc[-1]:.2f}).",
        f"{pct(mixed)} of the problems are mixed (0 < p < 1) and can give pairs; {pct(allc)} are all correct and "
        f"{pct(nonec)} all wrong.",
        f"Mean within-problem length CV {stats['cv_tokens'].mean():.2f}: the short end of each problem's correct "
        "samples is what the later stages want.",
    ]


def mixed_example(stats: pd.DataFrame) -> Any:
    """The worked example of 01: a problem with 0 < p < 1 (p nearest 1/2, then the widest length spread, then the
    first id); None when no problem is mixed."""
    mixed = stats[(stats["c"] > 0) & (stats["c"] < stats["n"])]
    if mixed.empty:
        return None
    order = mixed.assign(_d=(mixed["p"] - 0.5).abs(), _cv=-mixed["cv_tokens"].fillna(0))
    return order.sort_values(["_d", "_cv", "problem_id"], kind="stable")["problem_id"].iloc[0]


def mixed_example_note(stats: pd.DataFrame, samples: pd.DataFrame, pid: Any) -> str:
    """One sentence on 01's worked example: its p and the lengths of its correct and wrong samples."""
    if pid is None:
        return (f"No problem of this run has 0 < p < 1 (all {len(stats)} are all correct or all wrong): selection "
                "(02) will find no pairs.")
    s = samples[samples["problem_id"] == pid]
    ok, bad = s.loc[s["correct"], "n_tokens"], s.loc[~s["correct"], "n_tokens"]
    def span(x: pd.Series) -> str:
        return f"{int(x.min())}" if x.min() == x.max() else f"{int(x.min())}-{int(x.max())}"

    longer = int((bad > ok.min()).sum())
    return (f"{pid}: {int(s['correct'].sum())} of {len(s)} samples correct (p = {s['correct'].mean():.3f}); correct "
            f"ones take {span(ok)} tokens, wrong ones {span(bad)}. "
            + (f"Its shortest correct sample ({int(ok.min())} tokens) is what 02 prefers to the {longer} longer wrong "
               f"one{'s' if longer > 1 else ''}." if longer else
               "No wrong sample is longer than its shortest correct one, so 02 finds no pair here."))


def all_correct_by_difficulty(stats: pd.DataFrame) -> str:
    """Where the all-correct problems (p = 1, no pairs) sit: their share per difficulty, and whether it falls."""
    share = stats.assign(all=stats["c"] == stats["n"]).groupby("k")["all"].mean()
    parts = ", ".join(f"k = {k}: {pct(v)}" for k, v in share.items())
    if share.iloc[0] == 0 and share.iloc[-1] == 0:
        verdict = "no problem is all correct."
    elif share.iloc[0] > share.iloc[-1]:
        verdict = "easy problems pile up at p = 1 (no pairs), hard ones spread out below it."
    else:
        verdict = "the all-correct problems are not the easy ones in this run."
    return f"Share of problems with p = 1 by difficulty ({parts}): {verdict}"
