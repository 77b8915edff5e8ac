"""Figures of notebook 06 (ablations): the sweeps (Fig. 4, ε, η) and Tables 2–4 in the accuracy–length plane.

Tables come from tsq_utils.ablations.aggregate: one line per row, mean over training seeds with *_sd columns.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .figures_common import TOKENS_NOTE, _same_groups
from .palette import style


def _sweep_positions(x: pd.Series, logx: bool) -> tuple[np.ndarray, list[float], list[str]]:
    """Plot positions for sweep values, an infinite value (ε = ∞) placed one step right of the largest finite one."""
    xv = x.to_numpy(dtype=float)
    finite = xv[np.isfinite(xv)]
    if logx:
        finite = finite[finite > 0]
        top = finite.max() if finite.size else 1.0
        inf_at = top * 4
    else:
        top = finite.max() if finite.size else 0.0
        inf_at = top + (np.ptp(finite) if finite.size > 1 else 1.0) * 0.25
    pos = np.where(np.isinf(xv), inf_at, xv)
    ticks = sorted(set(pos.tolist()))
    labels = ["∞" if t == inf_at and np.isinf(xv).any() else f"{t:g}" for t in ticks]
    return pos, ticks, labels


def _twin_runs(t: pd.DataFrame) -> list[list[int]]:
    """Runs of consecutive sweep points with identical results (the same pairs, hence one trained model)."""
    cols = [c for c in ("acc", "len_t", "auc", "n_pairs", "chosen_tokens") if c in t]
    keys = [tuple(np.round(r, 9)) for r in t[cols].to_numpy(dtype=float)]
    runs, cur = [], [0] if len(keys) else []
    for i in range(1, len(keys)):
        if keys[i] == keys[i - 1]:
            cur.append(i)
        else:
            runs.append(cur)
            cur = [i]
    if cur:
        runs.append(cur)
    return [r for r in runs if len(r) > 1]


def _column(t: pd.DataFrame, col: str, scale: float) -> np.ndarray:
    """A table column as floats times scale, NaN where the table lacks it."""
    return t[col].to_numpy(dtype=float) * scale if col in t else np.full(len(t), np.nan)


def _sweep_points(ax, pos: np.ndarray, t: pd.DataFrame, col: str, scale: float, st) -> np.ndarray:
    """The swept values' points of one panel: SD bars where a point has several seeds, the evaluation s.e. (thin
    grey) where it has one; each point's seed count beside it (right of the bar) when the counts differ."""
    y, sd, se = (_column(t, c, scale) for c in (col, f"{col}_sd", f"{col}_se"))
    seeds = t["n_seeds"].to_numpy(dtype=int) if "n_seeds" in t else np.ones(len(t), dtype=int)
    ax.plot(pos, y, color=st.color, lw=1, alpha=0.6)
    multi = (seeds > 1) & np.isfinite(sd)
    if multi.any():
        ax.errorbar(pos[multi], y[multi], yerr=sd[multi], fmt=st.marker, color=st.color, capsize=3, ms=6,
                    label="mean ± SD over seeds")
    one = ~multi
    if one.any():
        ax.errorbar(pos[one], y[one], yerr=np.where(np.isfinite(se[one]), se[one], 0), fmt=st.marker,
                    color=st.color, mfc="white", ecolor="0.6", elinewidth=0.8, capsize=2, ms=6,
                    label="one seed (bar: eval. s.e.)")
    if len(set(seeds.tolist())) > 1:  # equal counts are said once, in the footnote
        for xi, yi, n in zip(pos, y, seeds):
            if yi == yi:
                ax.annotate(f"n={n}", (xi, yi), xytext=(6, 3), textcoords="offset points", ha="left", va="bottom",
                            fontsize=6.5, color="dimgray")
    return y


def _mark_twins(ax, pos: np.ndarray, y: np.ndarray, twins: list[list[int]], logx: bool) -> None:
    """Bracket each run of consecutive identical points (one trained model) and label it "same model"."""
    for run in twins:
        xs, yv = pos[run], y[run[0]]
        if yv == yv:
            ax.annotate("", xy=(xs.min(), yv), xytext=(xs.max(), yv),
                        arrowprops=dict(arrowstyle="|-|", color="0.35", lw=0.8, shrinkA=0, shrinkB=0,
                                        mutation_scale=3))
            ax.annotate("same model", ((xs.min() * xs.max()) ** 0.5 if logx and xs.min() > 0 else xs.mean(), yv),
                        xytext=(0, 6), textcoords="offset points", ha="center", fontsize=7, color="0.3")


def _reference_lines(ax, t: pd.DataFrame, col: str, scale: float, base: pd.Series | None) -> None:
    """The step length before refinement (tokens-per-step panel) and the base model's value, as horizontal lines."""
    if col == "tokens_per_step_after" and "tokens_per_step_before" in t and t["tokens_per_step_before"].notna().any():
        ax.axhline(float(t["tokens_per_step_before"].mean()), color=style("before").color, ls="--", lw=1,
                   label="before refinement")
    if base is not None and col in base and base[col] == base[col]:
        ax.axhline(float(base[col]) * scale, color=style("base").color, ls=":", lw=1, label="base model")


def _accuracy_range(ax, y: np.ndarray, base: pd.Series | None) -> None:
    """A range of at least 20 points, so that a one-seed dip of a point or two does not read as a cliff."""
    finite = y[np.isfinite(y)].tolist() + ([float(base["acc"]) * 100] if base is not None and "acc" in base
                                           and base["acc"] == base["acc"] else [])
    if finite:
        top = min(101.0, max(finite) + 3)
        ax.set_ylim(max(0.0, min(min(finite) - 5, top - 20)), top)


def _seed_note(t: pd.DataFrame) -> str:
    """The footnote's word on training seeds: one count for every point, or n beside each point."""
    seeds = sorted(set(t["n_seeds"].astype(int))) if "n_seeds" in t and len(t) else [1]
    if len(seeds) == 1:
        return f"{seeds[0]} training seed{'s' if seeds[0] != 1 else ''} per point"
    return "n = training seeds per point"


def ablation_sweep_figure(table: pd.DataFrame, xlabel: str, title: str, logx: bool = False,
                          base: pd.Series | None = None, extra: list[tuple[str, str]] | None = None,
                          mark: float | None = None, sweep: str | None = None):
    """A sweep (Fig. 4 and the new ones): optional extra panels, then accuracy and Len-T against the swept value.

    Every point has SD bars over its training seeds, or the evaluation's standard error as a thin grey bar when it
    has one seed; consecutive points with identical results are bracketed "same model". `base` draws reference
    lines; `mark` a vertical line at the profile's value.
    """
    panels = list(extra or []) + [("acc", "accuracy"), ("len_t", "Len-T (tokens of correct responses)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.7))
    t = table.dropna(subset=["x"]).reset_index(drop=True)
    pos, ticks, labels = _sweep_positions(t["x"], logx)
    group = str(t["name"].iloc[0]).split("/")[0] if len(t) and "name" in t else "alpha"
    st = style(sweep or group)
    twins = _twin_runs(t)
    for ax, (col, ylabel) in zip(np.atleast_1d(axes), panels):
        scale = 100 if col in ("acc", "acceptance_rate") else 1
        y = _sweep_points(ax, pos, t, col, scale, st)
        _mark_twins(ax, pos, y, twins, logx)
        _reference_lines(ax, t, col, scale, base)
        if mark is not None:
            ax.axvline(mark, color="tab:red", lw=0.8, alpha=0.6)
        if col == "acc":
            _accuracy_range(ax, y, base)
        if logx:
            ax.set_xscale("log")
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, fontsize=8)
        ax.minorticks_off()
        ax.set(xlabel=xlabel, ylabel=ylabel + (" (%)" if scale == 100 else ""))
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.005, f"{TOKENS_NOTE}; {_seed_note(t)} (red line: the profile's value)", ha="center", fontsize=7,
             color="dimgray")
    fig.tight_layout()
    return fig


def ablation_tradeoff_figure(tables: dict[str, pd.DataFrame], titles: dict[str, str],
                             base: pd.Series | None = None):
    """Tables 2–4 in the accuracy–length plane: one panel per table, one marker per row (SD bars over seeds, or the
    evaluation s.e. for one seed), rows with identical results merged as "same model", the base model starred."""
    fig, axes = plt.subplots(1, len(tables), figsize=(5.2 * len(tables), 4.3), squeeze=False)
    for ax, (group, t) in zip(axes[0], tables.items()):
        t = t.dropna(subset=["acc", "len_t"]).reset_index(drop=True)
        labels = [f"{r['label']} (n={int(r['n_seeds'])})" for _, r in t.iterrows()]
        keys = [tuple(np.round(r, 9)) for r in t[["acc", "len_t", "auc"]].to_numpy(dtype=float)]
        for idx, _ in _same_groups(labels, keys):
            # twins (one trained model) share a point: every member's marker is drawn there, largest first
            for rank, i in enumerate(idx):
                r = t.iloc[i]
                st = style(r["name"])
                several = r["n_seeds"] > 1 and r["acc_sd"] == r["acc_sd"]
                xerr = r["len_t_sd"] if several else (r["len_t_se"] if r.get("len_t_se") == r.get("len_t_se") else None)
                yerr = (r["acc_sd"] if several
                        else (r["acc_se"] if r.get("acc_se") == r.get("acc_se") else np.nan)) * 100
                ax.errorbar(r["len_t"], r["acc"] * 100, xerr=xerr if rank == 0 else None,
                            yerr=(yerr if yerr == yerr else None) if rank == 0 else None, fmt=st.marker, color=st.color,
                            mfc=st.color if several or rank else "white", ecolor=st.color if several else "0.6",
                            capsize=3, ms=11 if rank == 0 and len(idx) > 1 else (5 if rank else 7), label=labels[i],
                            zorder=3 + rank)
            if len(idx) > 1:
                r = t.iloc[idx[0]]
                ax.annotate("same model", (r["len_t"], r["acc"] * 100), xytext=(9, -3), textcoords="offset points",
                            fontsize=7, color="0.3")
        if base is not None and base["acc"] == base["acc"]:
            ax.plot(base["len_t"], base["acc"] * 100, "*", color=style("base").color, ms=12, label="base model")
        ax.set(xlabel="Len-T (tokens of correct responses)", ylabel="accuracy (%)", title=titles.get(group, group))
        ax.legend(fontsize=7, loc="best")
    fig.text(0.5, 0.005, TOKENS_NOTE + "; up and left is better; filled: mean ± SD over n seeds, hollow: one seed "
             "(bars: evaluation s.e.)", ha="center", fontsize=7, color="dimgray")
    fig.tight_layout()
    return fig
