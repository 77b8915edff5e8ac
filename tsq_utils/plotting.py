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
