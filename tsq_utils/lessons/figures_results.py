"""Figures of notebooks 05 (evaluation) and 07 (TLDR): budget curves, difficulty, paper vs ours, TLDR weights."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..method.evaluation import acc_curve, auc
from ..method.tldr import benefits, update_weights
from .figures_common import TOKENS_NOTE, _same_groups
from .palette import style


def budget_curve_figure(results: pd.DataFrame, budget: int, benchmark: str, forced: pd.DataFrame | None = None):
    """Fig. 3: Acc(b) against the token budget b, one curve per model (and the budget-forced reading if given)."""
    fig, ax = plt.subplots(figsize=(8.6, 4.2))
    grid = np.linspace(0, budget, 200)
    sub = results[results["benchmark"] == benchmark]
    for name, g in sub.groupby("model", sort=False):
        a = auc(g["correct"], g["n_tokens"], budget)
        st = style(name)
        ax.plot(grid, acc_curve(g["correct"], g["n_tokens"], grid), color=st.color, ls=st.ls, lw=1.6,
                label=f"{st.label or name} (AUC {a:.3f})")
    if forced is not None and len(forced):
        for name, g in forced[forced["benchmark"] == benchmark].groupby("model", sort=False):
            st = style(name)
            ax.plot(g["budget"], g["acc"], ls=":", marker=st.marker, color=st.color, ms=4,
                    label=f"{st.label or name}, budget-forced")
    ax.set(xlabel="token budget b", ylabel="Acc(b)", ylim=(0, 1.02), xlim=(0, budget),
           title=f"Accuracy within a token budget ({benchmark})")
    ax.text(0.99, 0.02, "solid: correct and ≤ b tokens (no forcing)\n" + TOKENS_NOTE, transform=ax.transAxes,
            ha="right", va="bottom", fontsize=7, color="dimgray")
    # beside the axes: inside, the legend covered the rising part of the curves
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def by_difficulty_figure(table: pd.DataFrame):
    """Accuracy and mean tokens by difficulty k, one line per model; identical lines (twins) drawn once."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(table.index.get_level_values("model").unique())
    keys = [tuple(np.round(table.loc[n][["acc", "len_a"]].to_numpy(dtype=float).ravel(), 9)) for n in names]
    for idx, label in _same_groups(names, keys):
        name = names[idx[0]]
        t = table.loc[name]
        st = style(name)
        lab = label if len(idx) > 1 else (st.label if st.label and name in ("base", "tokensqueeze", "tldr",
                                                                              "static_mix", "oracle") else name)
        axes[0].plot(t.index, t["acc"], **st.kw(), label=lab, ms=4)
        axes[1].plot(t.index, t["len_a"], **st.kw(), label=lab, ms=4)
    axes[0].set(xlabel="difficulty (number of terms)", ylabel="accuracy", ylim=(0, 1.02),
                title="Accuracy by difficulty")
    axes[1].set(xlabel="difficulty (number of terms)", ylabel="mean tokens (all responses)",
                title="Length by difficulty")
    axes[0].legend(fontsize=7)
    fig.suptitle(TOKENS_NOTE, fontsize=8, y=0.01)
    fig.tight_layout()
    return fig


def paper_vs_ours_figure(ours: dict, paper: pd.DataFrame, ours_label: str = "ours (toy)"):
    """Paper vs ours: Len-T change (%), accuracy change (points) and AUC before/after, on separate axes.

    ours: evaluation.headline(...) of our run; paper: rows of evaluation.PAPER_7B (model, benchmark, acc, len_t, auc).
    """
    rows = [(ours_label, ours["len_t_change_pct"], ours["acc_change_points"], ours.get("acc_se_points"),
             ours["auc_base"], ours["auc_trained"])]
    for bench, g in paper.groupby("benchmark", sort=False):
        b = g[~g["model"].str.startswith("TokenSqueeze")].iloc[0]
        t = g[g["model"].str.startswith("TokenSqueeze")].iloc[0]
        rows.append((f"paper 7B, {bench}", 100 * (t["len_t"] / b["len_t"] - 1), 100 * (t["acc"] - b["acc"]), None,
                     b["auc"], t["auc"]))
    labels = [r[0] for r in rows]
    y = np.arange(len(rows))[::-1]
    colors = [style("tokensqueeze").color] + [style("paper").color] * (len(rows) - 1)
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.5 * len(rows) + 2.2), sharey=True)
    axes[0].barh(y, [r[1] for r in rows], color=colors)
    axes[0].set(xlabel="Len-T change (%)", title="Shorter (left is shorter)")
    axes[1].barh(y, [r[2] for r in rows], color=colors,
                 xerr=[r[3] if r[3] is not None else np.nan for r in rows], capsize=3)
    axes[1].axvline(0, color="k", lw=0.8)
    axes[1].set(xlabel="accuracy change (points; bar: ± s.e.)", title="Accuracy kept?")
    for yi, r, c in zip(y, rows, colors):
        axes[2].plot([r[4], r[5]], [yi, yi], color=c, lw=1.5)
        axes[2].plot(r[4], yi, "o", color=style("base").color, ms=6)
        axes[2].plot(r[5], yi, "s", color=style("tokensqueeze").color, ms=6)
    axes[2].plot([], [], "o", color=style("base").color, label="base")
    axes[2].plot([], [], "s", color=style("tokensqueeze").color, label="TokenSqueeze")
    axes[2].legend(fontsize=8, loc="lower right")
    axes[2].set(xlabel="AUC (accuracy within the budget)", title="AUC: base → trained")
    for ax, col in ((axes[0], 1), (axes[1], 2)):
        for yi, r in zip(y, rows):
            err = (r[3] or 0.0) if col == 2 else 0.0  # past the end of the error bar
            at = r[col] + (err if r[col] >= 0 else -err)
            ax.text(at, yi, f" {r[col]:+.1f} ", va="center", ha="left" if r[col] >= 0 else "right", fontsize=8)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(labels)
    axes[0].margins(x=0.25)
    axes[1].margins(x=0.35)
    fig.suptitle("Paper vs ours (toy: AUC at B = the generation limit; paper: B = 32,768)", fontsize=10)
    fig.tight_layout()
    return fig


# =========================================================================== stage 07: TLDR (notebook 07_tldr)


def tldr_trajectory_figure(records: pd.DataFrame, refs: dict, batches: pd.DataFrame | None = None,
                           chosen: dict | None = None, acc_floor: float = 0.7):
    """Stage 07: the System-1 weight, dev tokens and dev accuracy against the step, per run, with the chosen
    checkpoints.

    records: one row per dev evaluation with columns run, step, dev_tokens, dev_acc, w_short; refs: t_s, a_s, t_l, a_l;
    batches (optional): one row per step with run, step, w_short, n_short, n_long (the rows drawn from each pool);
    chosen: run -> chosen step (or None).
    """
    fig, axes = plt.subplots(1, 3, figsize=(14, 5.0))
    chosen = chosen or {}
    for run, g in records.groupby("run", sort=False):
        st = style(run)
        c = st.color
        g = g.sort_values("step")
        # every run starts from the base model, (T_L, A_L), with the weights its first batch was drawn with
        steps = np.r_[0, g["step"]]
        b = batches[batches["run"] == run].sort_values("step") if batches is not None else pd.DataFrame()
        w0 = float(b["w_short"].iloc[0]) if len(b) else 0.5
        axes[0].step(steps, np.r_[w0, g["w_short"]], where="post", color=c, ls=st.ls, label=f"{run}: weight")
        if len(b):
            share = (b["n_short"] / (b["n_short"] + b["n_long"])).rolling(max(1, len(b) // 20), min_periods=1).mean()
            axes[0].plot(b["step"], share, color=c, lw=0.8, alpha=0.45, label=f"{run}: share drawn (rolling)")
        axes[1].plot(steps, np.r_[refs["t_l"], g["dev_tokens"]], marker=st.marker, ls=st.ls, ms=3, color=c, label=run)
        axes[2].plot(steps, np.r_[refs["a_l"], g["dev_acc"]], marker=st.marker, ls=st.ls, ms=3, color=c, label=run)
        step = chosen.get(run)
        if step is not None and (g["step"] == step).any():
            row = g[g["step"] == step].iloc[0]
            axes[1].plot(step, row["dev_tokens"], "*", ms=14, color=c, mec="k", label=f"{run}: chosen (step {step})")
            axes[2].plot(step, row["dev_acc"], "*", ms=14, color=c, mec="k")
    axes[0].set(xlabel="optimizer step", ylabel="w_short (System-1 share)", ylim=(-0.02, 1.02),
                title="Mixture weight of the short pool")
    for ax, key in ((axes[1], "t"), (axes[2], "a")):
        ax.axhline(refs[f"{key}_l"], color=style("base").color, ls="--", lw=0.9, label=f"long model ({key.upper()}_L)")
        ax.axhline(refs[f"{key}_s"], color=style("short").color, ls=":", lw=0.9, label=f"short model ({key.upper()}_S)")
    axes[2].axhline(acc_floor * refs["a_l"], color="red", ls="-.", lw=0.8, label=f"floor {acc_floor:g}·A_L")
    axes[1].set(xlabel="optimizer step", ylabel="mean dev tokens", title="Dev length")
    axes[2].set(xlabel="optimizer step", ylabel="dev accuracy", ylim=(-0.02, 1.02), title="Dev accuracy")
    for ax in axes:  # below each panel: inside, the legends covered the trajectories
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.suptitle(TOKENS_NOTE, fontsize=8, y=0.01)
    fig.tight_layout()
    return fig


def tldr_update_figure(refs: dict, eta: float, smoothing: float, w0: float = 0.5, eta_grid=None):
    """The TLDR rule at a glance: w_short after one update from w0, over the model's (dev tokens, dev accuracy)
    between the short and long reference points, for the given η and c."""
    t_lo, t_hi = sorted((refs["t_s"], refs["t_l"]))
    a_lo, a_hi = sorted((refs["a_s"], refs["a_l"]))
    # a margin around the two reference points, so neither sits on the frame
    t = np.linspace(max(0.0, t_lo - 0.15 * (t_hi - t_lo)), t_hi + 0.15 * (t_hi - t_lo), 41)
    a = np.linspace(max(0.0, a_lo - 0.15 * (a_hi - a_lo)), min(1.0, a_hi + 0.15 * (a_hi - a_lo)), 41)
    if t[0] == t[-1]:
        t = np.linspace(t[0] - 1, t[0] + 1, 41)
    if a[0] == a[-1]:
        a = np.linspace(max(0.0, a[0] - 0.05), min(1.0, a[0] + 0.05), 41)
    gap = refs.get("min_gap") or None
    grid = np.array([[update_weights((w0, 1 - w0), benefits(ti, ai, refs["t_s"], refs["a_s"], refs["t_l"], refs["a_l"],
                                                            min_gap=gap), eta, smoothing)[0] for ti in t] for ai in a])
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="coolwarm_r", vmin=0, vmax=1,
                   extent=(t[0], t[-1], a[0], a[-1]))
    fig.colorbar(im, ax=ax, label="w_short after one update")
    ax.plot(refs["t_l"], refs["a_l"], **style("base").kw(), ms=9, mec="k", label="long model (T_L, A_L)")
    ax.plot(refs["t_s"], refs["a_s"], **style("short").kw(), ms=9, mec="k", label="short model (T_S, A_S)")
    ax.set(xlabel="dev tokens T_cur", ylabel="dev accuracy A_cur", title=f"One TLDR update from w_short = {w0:g}: "
                                                                          f"η = {eta:g}, c = {smoothing:g}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
