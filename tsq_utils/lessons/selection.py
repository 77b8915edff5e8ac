"""Notebook 02, selection (Q-DYN): how many positives a problem keeps at N and α, the summary lines and the worked
examples picked by rule."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd


def seen_selection(stats: pd.DataFrame, summary: dict, alpha: float) -> list[str]:
    """Three lines about selection, honest about the selection count k at this N."""
    used = stats[stats["n_pairs"] > 0]
    n = int(stats["n"].max())
    k_gt1 = int((used["n_pos"] > 1).sum()) if len(used) else 0
    p_deep = (used["c"] / used["n"])[used["n_pos"] > 1]
    first = min_alpha_for_two(n)
    line1 = (f"{summary['n_pairs']} pairs from {summary['n_problems_used']} of {summary['n_problems']} problems; "
             f"chosen responses average {summary['mean_chosen_tokens'] or 0:.0f} tokens, rejected "
             f"{summary['mean_rejected_tokens'] or 0:.0f}.")
    if k_gt1 == 0:
        line2 = (f"At N = {n} and α = {alpha:g}, k = 1 for every problem: Q-DYN picks exactly Shortest's positives "
                 f"here (some k > 1 needs α > {first:.3g} at this N).")
    else:
        line2 = (f"At N = {n} and α = {alpha:g}, {k_gt1} of {len(used)} problems keep more than one positive "
                 f"(k up to {int(used['n_pos'].max())}, at p from {p_deep.min():.2f} to {p_deep.max():.2f}): there "
                 "Q-DYN also prefers correct responses longer than the shortest, which Shortest never does.")
    line3 = (f"Problems skipped: {summary['n_problems_skipped'].get('all_correct', 0)} all correct, "
             f"{summary['n_problems_skipped'].get('no_correct', 0)} with no correct sample, "
             f"{summary['n_problems_skipped'].get('no_longer_negative', 0)} "
             "with no wrong answer longer than a positive.")
    return [line1, line2, line3]


def min_alpha_for_two(n: int) -> float:
    """The smallest α at which some problem with N = n samples gets k ≥ 2 positives: min over c of 1 / ((1 − c/n)·c)."""
    best = math.inf
    for c in range(1, n):
        best = min(best, 1.0 / ((1 - c / n) * c))
    return best


def qdyn_shortest_warning(n: int, alpha: float) -> str | None:
    """A warning when N and α make Q-DYN identical to Shortest (k = 1 for every c), else None."""
    if n < 2 or alpha > min_alpha_for_two(n):
        return None
    top = alpha / min_alpha_for_two(n)  # the largest α(1 − c/N)c over c = 1..N−1 (≤ αN/4)
    return (f"Warning: at N = {n} and α = {alpha:g}, α·(1−p)·c is at most {top:.2f} ≤ 1 (α·N/4 = {alpha * n / 4:.2f}), "
            "so k = 1 for every "
            f"problem and Q-DYN selects exactly Shortest's positives. Some k ≥ 2 needs α > {min_alpha_for_two(n):.3g} "
            f"at this N, or N ≥ {_min_n_for_two(alpha)} at this α.")


def _min_n_for_two(alpha: float) -> int | str:
    """The smallest N at which α gives some problem k ≥ 2 ('no N' for α ≤ 0)."""
    if alpha <= 0:
        return "no N (α = 0 is Shortest)"
    n = 2
    while min_alpha_for_two(n) >= alpha:
        n += 1
    return n


def depth_examples(stats: pd.DataFrame) -> tuple[Any, Any]:
    """02's worked example: a problem with k ≥ 2 (the most positives, then p nearest 1/2) and a k = 1 problem with
    pairs (p nearest the first's, else the lowest p); None where the run has none."""
    used = stats[stats["n_pairs"] > 0]
    if used.empty:
        return None, None
    deep = used[used["n_pos"] >= 2]
    deep_id, target = None, None
    if len(deep):
        d = deep.assign(_k=-deep["n_pos"], _d=(deep["p"] - 0.5).abs()).sort_values(["_k", "_d", "problem_id"],
                                                                                    kind="stable").iloc[0]
        deep_id, target = d["problem_id"], float(d["p"])
    one = used[used["n_pos"] == 1]
    if one.empty:
        return deep_id, None
    key = (one["p"] - target).abs() if target is not None else one["p"]
    return deep_id, one.assign(_d=key).sort_values(["_d", "problem_id"], kind="stable")["problem_id"].iloc[0]


def depth_example_note(stats: pd.DataFrame, alpha: float) -> str:
    """One sentence on whether this run has a problem with k ≥ 2 to show beside a k = 1 one."""
    used = stats[stats["n_pairs"] > 0]
    n = int(stats["n"].max()) if len(stats) else 0
    deep = int((used["n_pos"] >= 2).sum())
    if deep:
        return (f"{deep} of {len(used)} problems with pairs keep k ≥ 2 positives at N = {n}, α = {alpha:g}: "
                "below, the one with the most positives beside a k = 1 problem of similar p.")
    return (f"This run has no problem with k ≥ 2: at N = {n} and α = {alpha:g} every one of the {len(used)} problems "
            "with pairs keeps only its shortest correct response, so Q-DYN acts here exactly as Shortest. The two "
            "problems below (highest and lowest p with pairs) both show k = 1.")
