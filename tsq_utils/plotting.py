"""Figures of the notebooks (matplotlib, headless-safe)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

TOKENS_NOTE = "tokens = completion tokens (thinking + answer)"


def base_model_figure(greedy: pd.DataFrame, sampled: pd.DataFrame, oracle_len_by_k: pd.Series, temperature: float,
                      loss_curve: dict | None = None):
    """Stage 00: accuracy by k (greedy and sampled), tokens by k against the oracle floor, and the pretraining loss."""
    ncols = 3 if loss_curve and loss_curve.get("tokens") else 2
    fig, axes = plt.subplots(1, ncols, figsize=(4.6 * ncols, 3.6))
    g = greedy.groupby("k")["correct"].mean()
    s = sampled.groupby("k")["correct"].mean()
    axes[0].plot(g.index, g.values, "o-", label="greedy")
    axes[0].plot(s.index, s.values, "s-", label=f"T = {temperature:g}")
    axes[0].set(xlabel="difficulty k (terms)", ylabel="accuracy", ylim=(0, 1.02), title="Accuracy by difficulty")
    axes[0].legend()
    gl = greedy.groupby("k")["n_tokens"].mean()
    sl = sampled.groupby("k")["n_tokens"].mean()
    axes[1].plot(gl.index, gl.values, "o-", label="greedy")
    axes[1].plot(sl.index, sl.values, "s-", label=f"T = {temperature:g}")
    axes[1].plot(oracle_len_by_k.index, oracle_len_by_k.values, "k--", label="oracle (shortest correct)")
    axes[1].set(xlabel="difficulty k (terms)", ylabel="mean tokens", title="Response length by difficulty")
    axes[1].legend(fontsize=8)
    if ncols == 3:
        axes[2].plot(np.array(loss_curve["tokens"]) / 1e6, loss_curve["loss"], lw=1)
        axes[2].set(xlabel="training tokens (M)", ylabel="loss", yscale="log", title="Pretraining loss")
    fig.suptitle(TOKENS_NOTE, fontsize=8, y=0.01)
    fig.tight_layout()
    return fig


def sampling_figure(samples: pd.DataFrame, stats: pd.DataFrame, temperature: float):
    """Stage 01: correctness-rate histogram per difficulty, and the length distribution of correct vs wrong samples."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ks = sorted(stats["k"].unique())
    n = int(stats["n"].max())
    bins = np.linspace(-0.5 / n, 1 + 0.5 / n, n + 2)
    cmap = plt.get_cmap("viridis", max(2, len(ks)))
    for i, k in enumerate(ks):
        axes[0].hist(stats.loc[stats["k"] == k, "p"], bins=bins, histtype="step", lw=1.5, color=cmap(i), label=f"k={k}")
    axes[0].set(xlabel="correctness rate p = c / N", ylabel="problems", title=f"Correctness rate per problem (N={n}, T={temperature:g})")
    axes[0].legend(fontsize=7, ncol=2)
    lb = np.linspace(0, samples["n_tokens"].max() + 1, 40)
    axes[1].hist(samples.loc[samples["correct"], "n_tokens"], bins=lb, alpha=0.6, label="correct")
    axes[1].hist(samples.loc[~samples["correct"], "n_tokens"], bins=lb, alpha=0.6, label="wrong / unfinished")
    axes[1].set(xlabel="completion tokens", ylabel="responses", title="Length distribution")
    axes[1].legend()
    fig.suptitle(TOKENS_NOTE, fontsize=8, y=0.01)
    fig.tight_layout()
    return fig


def selection_figure(pairs: pd.DataFrame, stats: pd.DataFrame, samples: pd.DataFrame):
    """Stage 02: chosen vs rejected lengths, and the positive's length (relative to the problem's correct ones) against p."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    if len(pairs):
        hi = max(pairs["chosen_tokens"].max(), pairs["rejected_tokens"].max()) + 1
        bins = np.linspace(0, hi, 40)
        axes[0].hist(pairs["chosen_tokens"], bins=bins, alpha=0.6, label=f"chosen (mean {pairs['chosen_tokens'].mean():.0f})")
        axes[0].hist(pairs["rejected_tokens"], bins=bins, alpha=0.6, label=f"rejected (mean {pairs['rejected_tokens'].mean():.0f})")
        axes[0].legend()
    axes[0].set(xlabel="completion tokens", ylabel="pairs", title="Chosen vs rejected length")
    correct_mean = samples[samples["correct"]].groupby("problem_id")["n_tokens"].mean()
    used = stats[stats["n_pairs"] > 0].copy()
    if len(used):
        used["pos_mean"] = [float(np.mean(t)) if len(t) else np.nan for t in used["pos_tokens"]]
        used["rel"] = used["pos_mean"] / used["problem_id"].map(correct_mean)
        sc = axes[1].scatter(used["p"], used["rel"], c=used["k"], cmap="viridis", s=14, alpha=0.8)
        fig.colorbar(sc, ax=axes[1], label="difficulty k")
    axes[1].axhline(1.0, color="grey", lw=0.8, ls=":")
    axes[1].set(xlabel="correctness rate p", ylabel="positive length / mean correct length",
                title="Positives: shortest on easy problems")
    fig.suptitle(TOKENS_NOTE, fontsize=8, y=0.01)
    fig.tight_layout()
    return fig


def training_figure(log: pd.DataFrame):
    """Stage 04: loss terms, reward margins and accuracies, and the batch's chosen/rejected lengths over steps."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    steps = log.index
    for col, lab in (("loss", "total"), ("dpo_l_loss", "DPO-L"), ("sft_loss", "SFT")):
        if col in log:
            axes[0].plot(steps, log[col], label=lab, lw=1)
    axes[0].set(xlabel="step", ylabel="loss", title="Loss")
    axes[0].legend()
    if "rewards/margins" in log:
        axes[1].plot(steps, log["rewards/margins"], label="reward margin (β·Δ)", lw=1)
    if "rewards/accuracies" in log:
        axes[1].plot(steps, log["rewards/accuracies"], label="reward accuracy", lw=1)
    axes[1].axhline(0, color="grey", lw=0.6)
    axes[1].set(xlabel="step", title="Implicit rewards")
    axes[1].legend(fontsize=8)
    for col, lab in (("length/chosen", "chosen"), ("length/rejected", "rejected")):
        if col in log:
            axes[2].plot(steps, log[col], label=lab, lw=1)
    axes[2].set(xlabel="step", ylabel="tokens (incl. EOS)", title="Mean lengths in the batch")
    axes[2].legend()
    fig.tight_layout()
    return fig


def budget_curve_figure(results: pd.DataFrame, budget: int, benchmark: str, forced: pd.DataFrame | None = None):
    """Fig. 3: Acc(b) against the token budget b, one curve per model (and the budget-forced reading if given)."""
    from .evaluation import acc_curve, auc

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    grid = np.linspace(0, budget, 200)
    sub = results[results["benchmark"] == benchmark]
    for name, g in sub.groupby("model", sort=False):
        a = auc(g["correct"], g["n_tokens"], budget)
        ax.plot(grid, acc_curve(g["correct"], g["n_tokens"], grid), label=f"{name} (AUC {a:.3f})",
                ls="--" if name == "oracle" else "-")
    if forced is not None and len(forced):
        for name, g in forced[forced["benchmark"] == benchmark].groupby("model", sort=False):
            ax.plot(g["budget"], g["acc"], "o:", ms=4, label=f"{name}, budget-forced")
    ax.set(xlabel="token budget b", ylabel="Acc(b)", ylim=(0, 1.02), xlim=(0, budget),
           title=f"Accuracy within a token budget ({benchmark})")
    ax.text(0.99, 0.02, "solid: correct and ≤ b tokens (no forcing)\n" + TOKENS_NOTE, transform=ax.transAxes,
            ha="right", va="bottom", fontsize=7, color="dimgray")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def by_difficulty_figure(table: pd.DataFrame):
    """Accuracy and mean tokens by difficulty k, one line per model."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in table.index.get_level_values("model").unique():
        t = table.loc[name]
        ls = "--" if name == "oracle" else "-"
        axes[0].plot(t.index, t["acc"], "o" + ls, label=name, ms=4)
        axes[1].plot(t.index, t["len_a"], "o" + ls, label=name, ms=4)
    axes[0].set(xlabel="difficulty k", ylabel="accuracy", ylim=(0, 1.02), title="Accuracy by difficulty")
    axes[1].set(xlabel="difficulty k", ylabel="mean tokens (all responses)", title="Length by difficulty")
    axes[0].legend(fontsize=8)
    fig.suptitle(TOKENS_NOTE, fontsize=8, y=0.01)
    fig.tight_layout()
    return fig


def refinement_figure(step_log: pd.DataFrame, summary: dict, epsilon: float):
    """Stage 03: the KL of scored candidates with ε marked, acceptance, and tokens/steps per response before and after."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    kls = np.array([v for row in step_log.get("kl", []) for v in row if v == v]) if len(step_log) else np.array([])
    if kls.size:
        pos = np.clip(kls, 1e-7, None)
        axes[0].hist(np.log10(pos), bins=40, color="tab:blue", alpha=0.8)
        axes[0].axvline(np.log10(epsilon), color="red", ls="--", label=f"ε = {epsilon:g}")
        axes[0].legend()
    axes[0].set(xlabel="log10 KL (per-token mean over the window)", ylabel="candidates",
                title=f"Candidates scored: {kls.size}")
    tb, ta = summary.get("tokens_per_step_before") or 0, summary.get("tokens_per_step_after") or 0
    sb, sa = summary.get("steps_per_response_before") or 0, summary.get("steps_per_response_after") or 0
    axes[1].bar(["before", "after"], [tb, ta], color=["tab:gray", "tab:green"])
    axes[1].set(ylabel="tokens per step", title=f"Tokens per step (acceptance {100 * (summary.get('acceptance_rate') or 0):.0f}%)")
    axes[2].bar(["before", "after"], [sb, sa], color=["tab:gray", "tab:green"])
    axes[2].set(ylabel="steps per response", title="Steps per response (paper: about the same)")
    fig.tight_layout()
    return fig


# =========================================================================== stage 07: TLDR (notebook 07_tldr)


def tldr_trajectory_figure(records: pd.DataFrame, refs: dict, batches: pd.DataFrame | None = None,
                           chosen: dict | None = None, acc_floor: float = 0.7):
    """Stage 07: the System-1 weight, dev tokens and dev accuracy against the step, per run, with the chosen checkpoints.

    records: one row per dev evaluation with columns run, step, dev_tokens, dev_acc, w_short; refs: t_s, a_s, t_l, a_l;
    batches (optional): one row per step with run, step, w_short, n_short, n_long (the rows drawn from each pool);
    chosen: run -> chosen step (or None).
    """
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    chosen = chosen or {}
    colors = {}
    for i, (run, g) in enumerate(records.groupby("run", sort=False)):
        c = colors.setdefault(run, f"C{i}")
        g = g.sort_values("step")
        # every run starts from the base model, (T_L, A_L), with the weights its first batch was drawn with
        steps = np.r_[0, g["step"]]
        b = batches[batches["run"] == run].sort_values("step") if batches is not None else pd.DataFrame()
        w0 = float(b["w_short"].iloc[0]) if len(b) else 0.5
        axes[0].step(steps, np.r_[w0, g["w_short"]], where="post", color=c, label=f"{run}: weight")
        if len(b):
            share = (b["n_short"] / (b["n_short"] + b["n_long"])).rolling(max(1, len(b) // 20), min_periods=1).mean()
            axes[0].plot(b["step"], share, color=c, lw=0.8, alpha=0.45, label=f"{run}: share drawn (rolling)")
        axes[1].plot(steps, np.r_[refs["t_l"], g["dev_tokens"]], "o-", ms=3, color=c, label=run)
        axes[2].plot(steps, np.r_[refs["a_l"], g["dev_acc"]], "o-", ms=3, color=c, label=run)
        step = chosen.get(run)
        if step is not None:
            row = g[g["step"] == step].iloc[0]
            axes[1].plot(step, row["dev_tokens"], "*", ms=14, color=c, mec="k", label=f"{run}: chosen (step {step})")
            axes[2].plot(step, row["dev_acc"], "*", ms=14, color=c, mec="k")
    axes[0].set(xlabel="optimizer step", ylabel="w_short (System-1 share)", ylim=(-0.02, 1.02),
                title="Mixture weight of the short pool")
    axes[0].legend(fontsize=7)
    for ax, key, name in ((axes[1], "t", "tokens"), (axes[2], "a", "accuracy")):
        ax.axhline(refs[f"{key}_l"], color="dimgray", ls="--", lw=0.9, label=f"long model ({key.upper()}_L)")
        ax.axhline(refs[f"{key}_s"], color="dimgray", ls=":", lw=0.9, label=f"short model ({key.upper()}_S)")
    axes[2].axhline(acc_floor * refs["a_l"], color="red", ls="-.", lw=0.8, label=f"floor {acc_floor:g}·A_L")
    axes[1].set(xlabel="optimizer step", ylabel="mean dev tokens", title="Dev length")
    axes[2].set(xlabel="optimizer step", ylabel="dev accuracy", ylim=(-0.02, 1.02), title="Dev accuracy")
    axes[1].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.suptitle(TOKENS_NOTE, fontsize=8, y=0.01)
    fig.tight_layout()
    return fig


# =========================================================================== notebook 06: ablations
# Tables come from tsq_utils.ablations.aggregate: one line per row, mean over training seeds with *_sd columns.


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


def ablation_sweep_figure(table: pd.DataFrame, xlabel: str, title: str, logx: bool = False,
                          base: pd.Series | None = None, extra: list[tuple[str, str]] | None = None,
                          mark: float | None = None):
    """A sweep (Fig. 4 and the new ones): optional extra panels, then accuracy and Len-T against the swept value.

    Error bars are the SD over training seeds where a point has several; `base` (a table line of the base model)
    draws dashed reference lines; `mark` draws a vertical line at the profile's / paper's value.
    """
    panels = list(extra or []) + [("acc", "accuracy"), ("len_t", "Len-T (tokens of correct responses)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.5))
    axes = np.atleast_1d(axes)
    t = table.dropna(subset=["x"])
    pos, ticks, labels = _sweep_positions(t["x"], logx)
    for ax, (col, ylabel) in zip(axes, panels):
        y = t[col].to_numpy(dtype=float) * (100 if col == "acc" else 1)
        sd_col = f"{col}_sd"
        err = t[sd_col].to_numpy(dtype=float) * (100 if col == "acc" else 1) if sd_col in t else None
        ax.errorbar(pos, y, yerr=err, fmt="o-", capsize=3, ms=5)
        if col == "tokens_per_step_after" and "tokens_per_step_before" in t and t["tokens_per_step_before"].notna().any():
            ax.axhline(float(t["tokens_per_step_before"].mean()), color="grey", ls="--", lw=1, label="before refinement")
            ax.legend(fontsize=8)
        if base is not None and col in base and base[col] == base[col]:
            ax.axhline(float(base[col]) * (100 if col == "acc" else 1), color="k", ls=":", lw=1, label="base model")
            ax.legend(fontsize=8)
        if mark is not None:
            ax.axvline(mark, color="tab:red", lw=0.8, alpha=0.6)
        if logx:
            ax.set_xscale("log")
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, fontsize=8)
        ax.minorticks_off()
        ax.set(xlabel=xlabel, ylabel=ylabel + (" (%)" if col == "acc" else ""))
    fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.005, TOKENS_NOTE + "; bars: SD over training seeds", ha="center", fontsize=7, color="dimgray")
    fig.tight_layout()
    return fig


def ablation_tradeoff_figure(tables: dict[str, pd.DataFrame], titles: dict[str, str],
                             base: pd.Series | None = None):
    """Tables 2–4 in the accuracy–length plane: one panel per table, one point per row (SD bars), the base model starred."""
    fig, axes = plt.subplots(1, len(tables), figsize=(4.6 * len(tables), 3.8), squeeze=False)
    for ax, (group, t) in zip(axes[0], tables.items()):
        t = t.dropna(subset=["acc", "len_t"])
        for _, r in t.iterrows():
            xerr = r["len_t_sd"] if r["len_t_sd"] == r["len_t_sd"] else None
            yerr = r["acc_sd"] * 100 if r["acc_sd"] == r["acc_sd"] else None
            ax.errorbar(r["len_t"], r["acc"] * 100, xerr=xerr, yerr=yerr, fmt="o", capsize=3, ms=6)
            ax.annotate(r["label"], (r["len_t"], r["acc"] * 100), fontsize=7, xytext=(4, 3), textcoords="offset points")
        if base is not None and base["acc"] == base["acc"]:
            ax.plot(base["len_t"], base["acc"] * 100, "k*", ms=11, label="base model")
            ax.legend(fontsize=7, loc="lower right")
        ax.set(xlabel="Len-T (tokens of correct responses)", ylabel="accuracy (%)", title=titles.get(group, group))
    fig.text(0.5, 0.005, TOKENS_NOTE + "; up and left is better", ha="center", fontsize=7, color="dimgray")
    fig.tight_layout()
    return fig
