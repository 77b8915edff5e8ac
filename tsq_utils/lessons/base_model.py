"""Notebook 00, the base reasoner: what a run of its checks should have shown."""

from __future__ import annotations

from .widgets import pct


def seen_base_model(checks: dict) -> list[str]:
    """Three lines about the base reasoner from reasoner_checks()."""
    ratio = checks["greedy_over_oracle"]
    return [
        f"Greedy accuracy {pct(checks['greedy_accuracy'])}, at {ratio:.1f}x the oracle's length "
        + ("(plenty of room to compress)." if ratio >= 1.8 else "(little room to compress)."),
        f"At the sampling temperature accuracy drops to {pct(checks['sampled_accuracy'])}: "
        "sampling gives both right and wrong answers, which selection needs.",
        f"The length of a problem's samples varies with a mean CV of {checks['mean_cv']:.2f} "
        + ("(a wide spread: short correct samples exist)." if checks["mean_cv"] >= 0.3 else "(a narrow spread)."),
    ]
