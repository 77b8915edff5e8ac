"""Figures of the notebooks (matplotlib, headless-safe). Colours and markers come from tsq_utils.lessons.palette.

This module holds notebooks 00–04's figures and re-exports the others (figures_results: 05 and 07;
figures_ablations: 06), so that `plotting.<name>` reaches every figure.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import BoundaryNorm, ListedColormap, LogNorm
from matplotlib.patches import Patch

from ..method.selection import quantile_count

# re-exported: notebooks and tests reach every figure as plotting.<name>
from .figures_ablations import (  # noqa: F401
    _sweep_positions, _twin_runs, ablation_sweep_figure, ablation_tradeoff_figure)
from .figures_common import CORRECT, TOKENS_NOTE, WRONG, _finite, _same_groups  # noqa: F401
from .figures_results import (  # noqa: F401
    budget_curve_figure, by_difficulty_figure, paper_vs_ours_figure, tldr_trajectory_figure, tldr_update_figure)
from .palette import style


# =========================================================================== 00 · 01 · 02


def base_model_figure(greedy: pd.DataFrame, sampled: pd.DataFrame, oracle_len_by_k: pd.Series, temperature: float,
                      loss_curve: dict | None = None):
    """Stage 00: accuracy by k (greedy and sampled), tokens by k against the oracle floor, and the pretraining loss."""
    ncols = 3 if loss_curve and loss_curve.get("tokens") else 2
    fig, axes = plt.subplots(1, ncols, figsize=(4.6 * ncols, 3.6))
    g, s = greedy.groupby("k")["correct"].mean(), sampled.groupby("k")["correct"].mean()
    sg, ss, so = style("greedy"), style("sampled"), style("oracle")
    axes[0].plot(g.index, g.values, **sg.kw(), label="greedy")
    axes[0].plot(s.index, s.values, **ss.kw(), label=f"T = {temperature:g}")
    axes[0].set(xlabel="difficulty k (terms)", ylabel="accuracy", ylim=(0, 1.02), title="Accuracy by difficulty")
    axes[0].legend()
    gl, sl = greedy.groupby("k")["n_tokens"].mean(), sampled.groupby("k")["n_tokens"].mean()
    axes[1].plot(gl.index, gl.values, **sg.kw(), label="greedy")
    axes[1].plot(sl.index, sl.values, **ss.kw(), label=f"T = {temperature:g}")
    axes[1].plot(oracle_len_by_k.index, oracle_len_by_k.values, **so.kw(), label="oracle (shortest correct)")
    axes[1].set(xlabel="difficulty k (terms)", ylabel="mean tokens", title="Response length by difficulty")
    axes[1].legend(fontsize=8)
    if ncols == 3:
        axes[2].plot(np.array(loss_curve["tokens"]) / 1e6, loss_curve["loss"], lw=1, color=style("base").color)
        axes[2].set(xlabel="training tokens (M)", ylabel="loss", yscale="log", title="Pretraining loss")
    fig.suptitle(TOKENS_NOTE, fontsize=8, y=0.01)
    fig.tight_layout()
    return fig


def _tick(c) -> str:
    """A heat map's tick label: numbers to two decimals at most, anything else as text."""
    return f"{round(float(c), 2):g}" if isinstance(c, (int, float, np.floating, np.integer)) else str(c)


def _count_heatmap(ax, table: pd.DataFrame, xlabel: str, ylabel: str, cmap: str = "Blues", fmt: str = "{:.0f}",
                   cbar_label: str = "problems"):
    """Draw a small annotated heat map of a DataFrame (index on y, columns on x)."""
    vals = table.to_numpy(dtype=float)
    im = ax.imshow(vals, aspect="auto", origin="lower", cmap=cmap)
    # at most about a dozen labels: one per column smears into a black band once N is in the tens
    every = max(1, int(np.ceil(table.shape[1] / 12)))
    ticks = list(range(0, table.shape[1], every))
    ax.set_xticks(ticks)
    ax.set_xticklabels([_tick(table.columns[j]) for j in ticks], fontsize=7)
    ax.set_yticks(range(table.shape[0]))
    ax.set_yticklabels([_tick(r) for r in table.index], fontsize=7)
    hi = np.nanmax(vals) if np.isfinite(vals).any() else 1.0
    for (i, j), v in np.ndenumerate(vals):
        if v == v and v != 0:
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6.5,
                    color="white" if v > 0.6 * hi else "black")
    ax.set(xlabel=xlabel, ylabel=ylabel)
    return im


def sampling_figure(samples: pd.DataFrame, stats: pd.DataFrame, temperature: float):
    """Stage 01: problems per (difficulty k, correctness rate p) as a heat map, and correct vs wrong lengths."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.9), gridspec_kw={"width_ratios": [1.25, 1]})
    n = int(stats["n"].max())
    counts = pd.crosstab(stats["k"], stats["c"]).reindex(columns=range(n + 1), fill_value=0)
    counts.columns = [c / n for c in counts.columns]
    im = _count_heatmap(axes[0], counts, f"correctness rate p = c / N (N = {n})", "difficulty k (terms)")
    fig.colorbar(im, ax=axes[0], label="problems")
    axes[0].set_title(f"Problems per difficulty and p (T = {temperature:g}); only 0 < p < 1 gives pairs", fontsize=9)
    lb = np.linspace(0, samples["n_tokens"].max() + 1, 40)
    axes[1].hist(samples.loc[samples["correct"], "n_tokens"], bins=lb, alpha=0.6, color=CORRECT, label="correct")
    axes[1].hist(samples.loc[~samples["correct"], "n_tokens"], bins=lb, alpha=0.6, color=WRONG,
                 label="wrong / unfinished")
    axes[1].set(xlabel="completion tokens", ylabel="responses", title="Length distribution")
    axes[1].legend()
    fig.suptitle(TOKENS_NOTE, fontsize=8, y=0.01)
    fig.tight_layout()
    return fig


def selection_count_table(n: int, alphas=(0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)) -> pd.DataFrame:
    """Positives n₊ = max(1, ⌈α(1−p)c⌉) for every α (rows) and correct count c = 1..N−1 (columns: p = c/N)."""
    cs = range(1, n)
    return pd.DataFrame([[quantile_count(a, c, n) for c in cs] for a in alphas], index=list(alphas),
                        columns=[round(c / n, 3) for c in cs])


def selection_count_figure(n: int, alpha: float, stats: pd.DataFrame | None = None,
                           alphas=(0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)):
    """The k × p heat map: positives k per problem for each α and p = c/N at this N, the run's α marked, and how
    many problems of the run sit at each p (only those with 0 < p < 1 give pairs)."""
    alphas = sorted(set(alphas) | {float(alpha)})
    table = selection_count_table(n, alphas)
    fig, axes = plt.subplots(2, 1, figsize=(max(5.5, 0.5 * n + 2.5), 4.9), sharex=True,
                             gridspec_kw={"height_ratios": [1, 3.2]})
    kmax = int(table.to_numpy().max())
    cmap = ListedColormap(plt.get_cmap("YlOrRd")(np.linspace(0.15, 0.95, max(kmax, 1))))
    vals = table.to_numpy(dtype=float)
    im = axes[1].imshow(vals, aspect="auto", origin="lower", cmap=cmap,
                        norm=BoundaryNorm(np.arange(0.5, kmax + 1.5), cmap.N))
    for (i, j), v in np.ndenumerate(vals):
        axes[1].text(j, i, f"{int(v)}", ha="center", va="center", fontsize=7)
    axes[1].set_yticks(range(len(alphas)))
    axes[1].set_yticklabels([f"{a:g}" for a in alphas], fontsize=7)
    axes[1].set_xticks(range(table.shape[1]))
    axes[1].set_xticklabels([f"{c}/{n}" for c in range(1, n)], fontsize=7, rotation=90 if n > 16 else 0)
    ai = alphas.index(float(alpha))
    axes[1].add_patch(plt.Rectangle((-0.5, ai - 0.5), table.shape[1], 1, fill=False, ec="k", lw=1.6))
    axes[1].set(xlabel=f"correctness rate p = c / N (N = {n})", ylabel="α")
    fig.colorbar(im, ax=axes, label="n₊ (positives per problem)", ticks=range(1, kmax + 1), shrink=0.8)
    if stats is not None and len(stats):
        per_c = stats["c"].value_counts().reindex(range(1, n), fill_value=0)
        axes[0].bar(range(n - 1), per_c.values, color=style("base").color, width=0.8)
        axes[0].set_ylabel("problems", fontsize=8)
        axes[0].set_title(f"n₊ = max(1, ⌈α(1−p)c⌉): black box = this run's α = {alpha:g}; bars: the run's problems",
                          fontsize=9)
    else:
        axes[0].axis("off")
        axes[0].set_title(f"n₊ = max(1, ⌈α(1−p)c⌉) at N = {n}; black box: α = {alpha:g}", fontsize=9)
    return fig


def k_over_p_n_table(alpha: float, n_max: int = 40) -> pd.DataFrame:
    """Positives n₊ = max(1, ⌈α(1−p)c⌉) at α for every N = 2..n_max and c = 1..N−1 (one row each, p = c/N;
    column "k")."""
    return pd.DataFrame([(n, c, c / n, quantile_count(alpha, c, n)) for n in range(2, n_max + 1) for c in range(1, n)],
                        columns=["N", "c", "p", "k"])


def k_over_p_n_figure(alpha: float, n_run: int, n_max: int = 40):
    """n₊ over (p, N) at this α: every (c/N, N) coloured by n₊, the boundary α·N·p(1−p) = 1 above which n₊ ≥ 2, and
    the run's N marked."""
    n_max = max(n_max, n_run + 4)
    t = k_over_p_n_table(alpha, n_max)
    kmax = int(t["k"].max())
    cmap = ListedColormap(plt.get_cmap("YlOrRd")(np.linspace(0.15, 0.95, max(kmax, 1))))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sc = ax.scatter(t["p"], t["N"], c=t["k"], cmap=cmap, norm=BoundaryNorm(np.arange(0.5, kmax + 1.5), cmap.N), s=9,
                    marker="s")
    if alpha > 0:
        p = np.linspace(0.01, 0.99, 197)
        ax.plot(p, 1 / (alpha * p * (1 - p)), color="k", lw=1.2, label="α·N·p(1−p) = 1 (n₊ ≥ 2 above)")
    ax.axhline(n_run, color=style("tokensqueeze").color, ls="--", lw=1.2, label=f"this run: N = {n_run}")
    ax.set(xlim=(0, 1), ylim=(1, n_max + 1), xlabel="correctness rate p = c / N", ylabel="N (samples per problem)",
           title=f"n₊ = max(1, ⌈α(1−p)c⌉) at α = {alpha:g}: n₊ ≥ 2 needs N > 4/α = {4 / alpha:.3g}" if alpha > 0
           else "α = 0: n₊ = 1 everywhere (Shortest)")
    ax.title.set_fontsize(9)
    fig.colorbar(sc, ax=ax, label="n₊ (positives per problem)", ticks=range(1, kmax + 1))
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def selection_live_figure(samples: pd.DataFrame, pairs: pd.DataFrame, stats: pd.DataFrame, alpha: float, n: int):
    """The live view of 02: problems per selection count k, and the samples of the mixed problem with the most
    positives (among ties the one nearest p = 1/2), shortest first, coloured by the role selection gave them."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), gridspec_kw={"width_ratios": [1, 1.6]})
    used = stats[stats["n_pairs"] > 0]
    counts = used["n_pos"].value_counts().sort_index()
    axes[0].bar(counts.index.astype(int), counts.values, color=style("table2/q_dyn").color, width=0.6)
    axes[0].set(xlabel="n₊ (positives kept)", ylabel="problems with pairs",
                title=f"N = {n}, α = {alpha:g}: {len(pairs)} pairs from {len(used)} problems")
    axes[0].set_xticks(sorted(set(counts.index.astype(int)) | {1}))
    if len(used):
        # the most positives; among ties the problem nearest p = 1/2 (both correct and wrong responses to show)
        ex = used.assign(_mid=(used["p"] - 0.5).abs()).sort_values(["n_pos", "_mid", "problem_id"],
                                                                   ascending=[False, True, True], kind="stable").iloc[0]
        s = samples[samples["problem_id"] == ex["problem_id"]].sort_values(["n_tokens", "sample_idx"], kind="stable")
        pp = pairs[pairs["problem_id"] == ex["problem_id"]]
        pos, neg = set(pp["chosen_sample_idx"]), set(pp["rejected_sample_idx"])
        colors = []
        for _, r in s.iterrows():
            i = r["sample_idx"]
            colors.append(style("chosen").color if i in pos else style("rejected").color if i in neg
                          else ("#A6DBC8" if r["correct"] else "#CCCCCC"))
        y = np.arange(len(s))
        axes[1].barh(y, s["n_tokens"], color=colors, alpha=0.85)
        axes[1].set_yticks(y)
        axes[1].set_yticklabels([f"#{int(i)} {'✓' if c else '✗'}" for i, c in zip(s["sample_idx"], s["correct"])],
                                fontsize=7)
        axes[1].invert_yaxis()
        axes[1].set(xlabel="completion tokens")
        axes[1].set_title(f"problem {ex['problem_id']} (k = {ex['k']} terms): c = {ex['c']}/{ex['n']}, "
                          f"p = {ex['p']:.2f}, n₊ = {ex['n_pos']} positive(s)", fontsize=9)
        handles = [Patch(color=style("chosen").color, label="chosen (positive)"),
                   Patch(color=style("rejected").color, label="rejected"),
                   Patch(color="#A6DBC8", label="correct, not chosen"),
                   Patch(color="#CCCCCC", label="wrong, not paired")]
        axes[1].legend(handles=handles, fontsize=7, loc="lower right")
    else:
        axes[1].axis("off")
        axes[1].text(0.5, 0.5, "no problem gives pairs at this N", ha="center", va="center")
    fig.tight_layout()
    return fig


def selection_figure(pairs: pd.DataFrame, stats: pd.DataFrame, samples: pd.DataFrame):
    """Stage 02: chosen vs rejected lengths, and each positive's length relative to its problem's correct ones vs p."""
    # (the n₊ × p map of the selection count is selection_count_figure's, drawn once in the lesson)
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8))
    if len(pairs):
        hi = max(pairs["chosen_tokens"].max(), pairs["rejected_tokens"].max()) + 1
        bins = np.linspace(0, hi, 40)
        for col, key in (("chosen_tokens", "chosen"), ("rejected_tokens", "rejected")):
            axes[0].hist(pairs[col], bins=bins, alpha=0.6, color=style(key).color,
                         label=f"{key} (mean {pairs[col].mean():.0f})")
        # a band above the tallest bar keeps the legend off the data
        axes[0].set_ylim(top=axes[0].get_ylim()[1] * 1.3)
        axes[0].legend(loc="upper right", ncol=2, fontsize=8, frameon=False)
    axes[0].set(xlabel="completion tokens", ylabel="pairs", title="Chosen vs rejected length")
    correct_mean = samples[samples["correct"]].groupby("problem_id")["n_tokens"].mean()
    used = stats[stats["n_pairs"] > 0].copy()
    if len(used):
        used["pos_mean"] = [float(np.mean(t)) if len(t) else np.nan for t in used["pos_tokens"]]
        used["rel"] = used["pos_mean"] / used["problem_id"].map(correct_mean)
        sc = axes[1].scatter(used["p"], used["rel"], c=used["k"], cmap="viridis", s=14, alpha=0.8)
        fig.colorbar(sc, ax=axes[1], label="difficulty k (terms)")
    axes[1].axhline(1.0, color="grey", lw=0.8, ls=":")
    axes[1].set(xlabel="correctness rate p", ylabel="positive length / mean correct length",
                title="Positives against the problem's correct responses")
    fig.suptitle(TOKENS_NOTE, fontsize=8, y=0.01)
    fig.tight_layout()
    return fig


# =========================================================================== 03 · refinement


def refinement_figure(step_log: pd.DataFrame, summary: dict, epsilon: float):
    """Stage 03: the KL of scored candidates with ε marked, and tokens/steps per response before and after."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    kl_col = step_log["kl"] if len(step_log) and "kl" in step_log else []
    kls = _finite(list(kl_col))
    drawn = int(step_log["n_sampled"].sum()) if len(step_log) and "n_sampled" in step_log else None
    if kls.size:
        pos = np.clip(kls, 1e-7, None)
        axes[0].hist(np.log10(pos), bins=40, color=style("before").color, alpha=0.9, label="candidates")
        axes[0].axvline(np.log10(epsilon), color=style("accepted").color, ls="--", lw=1.5,
                        label=f"ε = {epsilon:g} (left: acceptable)")
        axes[0].legend(fontsize=8)
    else:
        axes[0].text(0.5, 0.5, "no candidate was scored\n(none shorter than its step)", ha="center", va="center",
                     transform=axes[0].transAxes, fontsize=9, color="dimgray")
    of = f" of {drawn:,} drawn" if drawn is not None else ""
    axes[0].set(xlabel="log10 KL (per-token mean over the window)", ylabel="candidates")
    axes[0].set_title(f"{kls.size:,} candidates scored{of}\n(only candidates shorter than their step are scored)",
                      fontsize=9)
    tb, ta = summary.get("tokens_per_step_before") or 0, summary.get("tokens_per_step_after") or 0
    sb, sa = summary.get("steps_per_response_before") or 0, summary.get("steps_per_response_after") or 0
    colors = [style("before").color, style("after").color]
    axes[1].bar(["before", "after"], [tb, ta], color=colors)
    axes[1].set(ylabel="tokens per step")
    axes[1].set_title(f"Tokens per step (steps rewritten: {100 * (summary.get('acceptance_rate') or 0):.1f}%)",
                      fontsize=9)
    axes[2].bar(["before", "after"], [sb, sa], color=colors)
    axes[2].set(ylabel="steps per response")
    axes[2].set_title("Steps per response (paper: about the same)", fontsize=9)
    for ax, vals in ((axes[1], (tb, ta)), (axes[2], (sb, sa))):
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    return fig


def _token_label(t: str) -> str:
    """A BPE token as a tick label: byte-level space and newline markers shown as ␣ and ↵."""
    return repr(str(t).replace("Ġ", "␣").replace("Ċ", "↵").replace(" ", "␣").replace("\n", "↵"))[1:-1][:7]


def kl_heatmap_figure(kl: np.ndarray, cont_tokens: list[str], cand_labels: list[str], accepted: list[bool],
                      epsilon: float, title: str = "", window_means: np.ndarray | None = None,
                      max_positions: int = 96):
    """Per-token KL of one step: the original continuation along x, candidates along y (colour = KL at each
    position, log scale), with each candidate's window mean against ε on the right (the accepted one in green).
    Only the first max_positions positions are drawn; the means are over the whole window."""
    kl = np.asarray(kl, dtype=float)
    means = np.nanmean(kl, axis=1) if window_means is None else np.asarray(window_means, dtype=float)
    kl, cont_tokens = kl[:, :max_positions], list(cont_tokens)[:max_positions]
    k, length = kl.shape
    fig, (ax, axm) = plt.subplots(1, 2, figsize=(min(15, max(10, 5 + 0.12 * length)), 2.2 + 0.3 * k), sharey=True,
                                  gridspec_kw={"width_ratios": [max(3, length / 8), 1.2]})
    pos = kl[np.isfinite(kl) & (kl > 0)]
    lo = max(float(pos.min()) if pos.size else 1e-6, 1e-6)
    hi = max(float(pos.max()) if pos.size else 1.0, lo * 10)
    im = ax.imshow(np.clip(kl, lo, None), aspect="auto", cmap="magma_r", norm=LogNorm(lo, hi), interpolation="nearest")
    every = max(1, length // 64)
    ax.set_xticks(range(0, length, every))
    ax.set_xticklabels([_token_label(t) for t in cont_tokens[::every]], rotation=90, fontsize=6.5, family="monospace")
    ax.set_yticks(range(k))
    ax.set_yticklabels([("✓ kept  " if a else "") + lab for lab, a in zip(cand_labels, accepted)], fontsize=7,
                       family="monospace")
    for i, ok in enumerate(accepted):
        if ok:
            ax.get_yticklabels()[i].set_color(style("accepted").color)
            ax.get_yticklabels()[i].set_fontweight("bold")
    ax.set_xlabel("the original continuation after the step (teacher-forced in both contexts), token by token")
    cb = fig.colorbar(im, ax=ax, pad=0.01, fraction=0.03)
    cb.set_label("KL(original ‖ candidate) at the position", fontsize=8)
    if lo < epsilon < hi:
        cb.ax.axhline(epsilon, color="k", lw=2.5)
        cb.set_label("KL(original ‖ candidate) at the position\n(black line: ε)", fontsize=8)
    colors = [style("accepted").color if a else style("before").color for a in accepted]
    axm.barh(range(k), means, color=colors)
    axm.axvline(epsilon, color=style("accepted").color, ls="--", lw=1.2, label=f"ε = {epsilon:g}")
    axm.set_xscale("log")
    axm.set_xlabel("window mean KL", fontsize=8)
    axm.legend(fontsize=7, loc="lower right")
    axm.tick_params(labelsize=7)
    ax.set_title(title or "Per-token KL of one step's candidates", fontsize=9)
    fig.tight_layout()
    return fig


# =========================================================================== 04 · training


def training_figure(log: pd.DataFrame):
    """Stage 04: loss terms; reward margin (β·Δ, nats) and reward accuracy (a share) on separate axes; lengths."""
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    steps = log.index
    for col, lab, color in (("loss", "total", style("base").color),
                            ("dpo_l_loss", "DPO-L", style("table4/dpo_l").color),
                            ("sft_loss", "SFT", style("table4/sft").color)):
        if col in log:
            axes[0].plot(steps, log[col], label=lab, lw=1, color=color)
    axes[0].set(xlabel="step", ylabel="loss", title="Loss and its two terms")
    axes[0].legend()
    if "rewards/margins" in log:
        axes[1].plot(steps, log["rewards/margins"], lw=1, color=style("tokensqueeze").color)
    axes[1].axhline(0, color="grey", lw=0.6)
    axes[1].set(xlabel="step", ylabel="β·Δ (nats)", title="Implicit reward margin")
    if "rewards/accuracies" in log:
        axes[2].plot(steps, log["rewards/accuracies"], lw=1, color=style("tokensqueeze").color)
    axes[2].set(xlabel="step", ylabel="share of pairs with Δ > 0", ylim=(-0.02, 1.02), title="Reward accuracy")
    for col, key in (("length/chosen", "chosen"), ("length/rejected", "rejected")):
        if col in log:
            axes[3].plot(steps, log[col], label=key, lw=1, color=style(key).color)
    axes[3].set(xlabel="step", ylabel="tokens (incl. EOS)", title="Mean lengths in the batch")
    axes[3].legend()
    fig.tight_layout()
    return fig
