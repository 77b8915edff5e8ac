"""Notebook 05, evaluation: the summary lines of the headline, with the paper beside it."""

from __future__ import annotations


def seen_evaluation(head: dict, bench: str) -> list[str]:
    """Three lines about the evaluation headline, with the paper beside it."""
    d, se = head["acc_change_points"], head["acc_se_points"]
    verdict = ("within two standard errors: no accuracy lost that this sample can show" if abs(d) <= 2 * se
               else ("a real loss of accuracy" if d < 0 else "a real gain in accuracy"))
    return [
        f"{bench}: Len-T {head['len_t_base']:.1f} -> {head['len_t_trained']:.1f} tokens "
        f"({head['len_t_change_pct']:+.1f}%; the paper on MATH500: -51.3%).",
        f"Accuracy {100 * head['acc_base']:.1f} -> {100 * head['acc_trained']:.1f} ({d:+.1f} ± {se:.1f} points): "
        f"{verdict} (the paper: -0.4 on MATH500).",
        f"AUC {head['auc_base']:.3f} -> {head['auc_trained']:.3f}: "
        + ("the trained model's Acc(b) curve rises earlier." if head["auc_trained"] > head["auc_base"]
           else "no gain in accuracy within a budget."),
    ]
