"""Notebook 07, TLDR: the summary lines of its weight trajectory and comparison."""

from __future__ import annotations

import pandas as pd


def seen_tldr(traj: pd.DataFrame, comparison: pd.DataFrame) -> list[str]:
    """Three lines about TLDR's run: how far its weights moved, and where it lands against the static mix."""
    tl = traj[traj["run"] == "tldr"].sort_values("step")
    w = tl["w_short"].to_numpy(dtype=float)
    lo, hi = (float(w.min()), float(w.max())) if len(w) else (0.5, 0.5)
    moved = max(abs(lo - 0.5), abs(hi - 0.5))
    span = f"{lo:.3f}" if abs(hi - lo) < 5e-4 else f"values in [{lo:.3f}, {hi:.3f}]"
    out = [f"TLDR's short-pool weight went from 0.5 to {span} over {int(tl['updated'].sum())} updates "
           + ("(it barely moved from 1/2: the dynamic and static mixtures drew about the same batches)." if moved < 0.05
              else "(it moved away from the static 1/2).")]
    if {"tldr", "static_mix"} <= set(comparison.index):
        t, s = comparison.loc["tldr"], comparison.loc["static_mix"]
        out.append(f"TLDR vs static mix: accuracy {100 * t['acc']:.1f} vs {100 * s['acc']:.1f}, Len-T "
                   f"{t['len_t']:.1f} vs {s['len_t']:.1f}: "
                   + ("about the same place." if abs(t["len_t"] - s["len_t"]) < 0.05 * s["len_t"]
                      and abs(t["acc"] - s["acc"]) < 0.02 else "a difference."))
    if {"tokensqueeze", "tldr"} <= set(comparison.index):
        t, q = comparison.loc["tldr"], comparison.loc["tokensqueeze"]
        out.append(f"TLDR vs TokenSqueeze: A.C.R. {t['acr']:.3f} vs {q['acr']:.3f}, accuracy {100 * t['acc']:.1f} vs "
                   f"{100 * q['acc']:.1f}; TLDR had the oracle's concise traces for its short pool, which "
                   "TokenSqueeze never sees.")
    while len(out) < 3:
        out.append("The comparison table has no TLDR rows yet.")
    return out[:3]
