"""Figures of the notebooks (matplotlib, headless-safe). Colours and markers come from tsq_utils.lessons.palette."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import BoundaryNorm, ListedColormap, LogNorm

from .palette import style

TOKENS_NOTE = "tokens = completion tokens (thinking + answer)"
CORRECT, WRONG = "#009E73", "#CC79A7"


def _finite(values) -> np.ndarray:
    """Flatten nested lists of KL values (None or NaN where not scored) to a float array of the finite ones."""
    out = []
    for v in values if values is not None else []:
        if isinstance(v, (list, tuple, np.ndarray)):
            out.extend(_finite(v).tolist())
        elif v is not None:
            try:
                f = float(v)
            except (TypeError, ValueError):
                continue
            if math.isfinite(f):
                out.append(f)
    return np.asarray(out, dtype=float)


def _same_groups(labels: list[str], keys: list[tuple]) -> list[tuple[list[int], str]]:
    """Indices grouped by identical result keys (twins: one trained model), with a joined label."""
    groups: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    out = []
    for idx in groups.values():
        lab = " = ".join(labels[i] for i in idx)
        out.append((idx, lab + (" (same model)" if len(idx) > 1 else "")))
    return out


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


def _count_heatmap(ax, table: pd.DataFrame, xlabel: str, ylabel: str, cmap: str = "Blues", fmt: str = "{:.0f}",
                   cbar_label: str = "problems"):
    """Draw a small annotated heat map of a DataFrame (index on y, columns on x)."""
    vals = table.to_numpy(dtype=float)
    im = ax.imshow(vals, aspect="auto", origin="lower", cmap=cmap)
    ax.set_xticks(range(table.shape[1]))
    ax.set_xticklabels([f"{c:g}" if isinstance(c, (int, float, np.floating, np.integer)) else str(c)
                        for c in table.columns], fontsize=7)
    ax.set_yticks(range(table.shape[0]))
    ax.set_yticklabels([f"{r:g}" if isinstance(r, (int, float, np.floating, np.integer)) else str(r)
                        for r in table.index], fontsize=7)
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
    """k = max(1, ⌈α(1−p)c⌉) for every α (rows) and correct count c = 1..N−1 (columns, labelled by p = c/N)."""
    from ..method.selection import quantile_count

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
    fig.colorbar(im, ax=axes, label="k (positives per problem)", ticks=range(1, kmax + 1), shrink=0.8)
    if stats is not None and len(stats):
        per_c = stats["c"].value_counts().reindex(range(1, n), fill_value=0)
        axes[0].bar(range(n - 1), per_c.values, color=style("base").color, width=0.8)
        axes[0].set_ylabel("problems", fontsize=8)
        axes[0].set_title(f"k = max(1, ⌈α(1−p)c⌉): black box = this run's α = {alpha:g}; bars: the run's problems",
                          fontsize=9)
    else:
        axes[0].axis("off")
        axes[0].set_title(f"k = max(1, ⌈α(1−p)c⌉) at N = {n}; black box: α = {alpha:g}", fontsize=9)
    return fig


def k_over_p_n_table(alpha: float, n_max: int = 40) -> pd.DataFrame:
    """k = max(1, ⌈α(1−p)c⌉) at α for every N = 2..n_max and correct count c = 1..N−1 (one row each, p = c/N)."""
    from ..method.selection import quantile_count

    return pd.DataFrame([(n, c, c / n, quantile_count(alpha, c, n)) for n in range(2, n_max + 1) for c in range(1, n)],
                        columns=["N", "c", "p", "k"])


def k_over_p_n_figure(alpha: float, n_run: int, n_max: int = 40):
    """k over (p, N) at this α: every (c/N, N) coloured by k, the boundary α·N·p(1−p) = 1 above which k ≥ 2, and
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
        ax.plot(p, 1 / (alpha * p * (1 - p)), color="k", lw=1.2, label="α·N·p(1−p) = 1 (k ≥ 2 above)")
    ax.axhline(n_run, color=style("tokensqueeze").color, ls="--", lw=1.2, label=f"this run: N = {n_run}")
    ax.set(xlim=(0, 1), ylim=(1, n_max + 1), xlabel="correctness rate p = c / N", ylabel="N (samples per problem)",
           title=f"k = max(1, ⌈α(1−p)c⌉) at α = {alpha:g}: k ≥ 2 needs N > 4/α = {4 / alpha:.3g}" if alpha > 0
           else "α = 0: k = 1 everywhere (Shortest)")
    ax.title.set_fontsize(9)
    fig.colorbar(sc, ax=ax, label="k (positives per problem)", ticks=range(1, kmax + 1))
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
    axes[0].set(xlabel="k (positives kept)", ylabel="problems with pairs",
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
                          f"p = {ex['p']:.2f}, k = {ex['n_pos']} positive(s)", fontsize=9)
        from matplotlib.patches import Patch

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


def selection_figure(pairs: pd.DataFrame, stats: pd.DataFrame, samples: pd.DataFrame, alpha: float | None = None):
    """Stage 02: chosen vs rejected lengths, and each positive's length relative to its problem's correct ones vs p
    (with α, a third panel: the k × p heat map of the selection count at this N)."""
    n_panels = 3 if alpha is not None else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(5 * n_panels, 3.8))
    if len(pairs):
        hi = max(pairs["chosen_tokens"].max(), pairs["rejected_tokens"].max()) + 1
        bins = np.linspace(0, hi, 40)
        for col, key in (("chosen_tokens", "chosen"), ("rejected_tokens", "rejected")):
            axes[0].hist(pairs[col], bins=bins, alpha=0.6, color=style(key).color,
                         label=f"{key} (mean {pairs[col].mean():.0f})")
        axes[0].legend()
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
    if alpha is not None:
        n = int(stats["n"].max()) if len(stats) else 1
        if n >= 2:
            t = selection_count_table(n, sorted({0.0, 0.2, 0.5, 1.0, float(alpha)}))
            _count_heatmap(axes[2], t, f"p = c / N (N = {n})", "α", cmap="YlOrRd", cbar_label="k")
            axes[2].set_title(f"k positives per problem (run: α = {alpha:g})", fontsize=9)
        else:
            axes[2].axis("off")
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


# =========================================================================== 05 · evaluation


def budget_curve_figure(results: pd.DataFrame, budget: int, benchmark: str, forced: pd.DataFrame | None = None):
    """Fig. 3: Acc(b) against the token budget b, one curve per model (and the budget-forced reading if given)."""
    from ..method.evaluation import acc_curve, auc

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
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
    ax.legend(fontsize=8, loc="upper left")
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
    axes[0].set(xlabel="difficulty k (terms)", ylabel="accuracy", ylim=(0, 1.02), title="Accuracy by difficulty")
    axes[1].set(xlabel="difficulty k (terms)", ylabel="mean tokens (all responses)", title="Length by difficulty")
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
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
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
    axes[0].legend(fontsize=7)
    for ax, key in ((axes[1], "t"), (axes[2], "a")):
        ax.axhline(refs[f"{key}_l"], color=style("base").color, ls="--", lw=0.9, label=f"long model ({key.upper()}_L)")
        ax.axhline(refs[f"{key}_s"], color=style("short").color, ls=":", lw=0.9, label=f"short model ({key.upper()}_S)")
    axes[2].axhline(acc_floor * refs["a_l"], color="red", ls="-.", lw=0.8, label=f"floor {acc_floor:g}·A_L")
    axes[1].set(xlabel="optimizer step", ylabel="mean dev tokens", title="Dev length")
    axes[2].set(xlabel="optimizer step", ylabel="dev accuracy", ylim=(-0.02, 1.02), title="Dev accuracy")
    axes[1].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.suptitle(TOKENS_NOTE, fontsize=8, y=0.01)
    fig.tight_layout()
    return fig


def tldr_update_figure(refs: dict, eta: float, smoothing: float, w0: float = 0.5, eta_grid=None):
    """The TLDR rule at a glance: w_short after one update from w0, over the model's (dev tokens, dev accuracy)
    between the short and long reference points, for the given η and c."""
    from ..method.tldr import benefits, update_weights

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


def ablation_sweep_figure(table: pd.DataFrame, xlabel: str, title: str, logx: bool = False,
                          base: pd.Series | None = None, extra: list[tuple[str, str]] | None = None,
                          mark: float | None = None, sweep: str | None = None):
    """A sweep (Fig. 4 and the new ones): optional extra panels, then accuracy and Len-T against the swept value.

    Every point says how many training seeds it has: several seeds give SD bars, one seed gives the evaluation's
    standard error as a thin grey bar. Consecutive points with identical results are bracketed "same model".
    `base` draws reference lines; `mark` a vertical line at the profile's / paper's value.
    """
    panels = list(extra or []) + [("acc", "accuracy"), ("len_t", "Len-T (tokens of correct responses)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.7))
    axes = np.atleast_1d(axes)
    t = table.dropna(subset=["x"]).reset_index(drop=True)
    pos, ticks, labels = _sweep_positions(t["x"], logx)
    st = style(sweep or str(t["name"].iloc[0]).split("/")[0] if len(t) and "name" in t else "alpha")
    seeds = t["n_seeds"].to_numpy(dtype=int) if "n_seeds" in t else np.ones(len(t), dtype=int)
    twins = _twin_runs(t)
    for ax, (col, ylabel) in zip(axes, panels):
        scale = 100 if col in ("acc", "acceptance_rate") else 1
        y = t[col].to_numpy(dtype=float) * scale
        sd = t[f"{col}_sd"].to_numpy(dtype=float) * scale if f"{col}_sd" in t else np.full(len(t), np.nan)
        se = t[f"{col}_se"].to_numpy(dtype=float) * scale if f"{col}_se" in t else np.full(len(t), np.nan)
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
        for xi, yi, n in zip(pos, y, seeds):
            if yi == yi:
                ax.annotate(f"n={n}", (xi, yi), xytext=(0, -11), textcoords="offset points", ha="center",
                            fontsize=6.5, color="dimgray")
        for run in twins:
            xs, yv = pos[run], y[run[0]]
            if yv == yv:
                ax.annotate("", xy=(xs.min(), yv), xytext=(xs.max(), yv),
                            arrowprops=dict(arrowstyle="|-|", color="0.35", lw=0.8, shrinkA=0, shrinkB=0,
                                            mutation_scale=3))
                ax.annotate("same model", ((xs.min() * xs.max()) ** 0.5 if logx and xs.min() > 0 else xs.mean(), yv),
                            xytext=(0, 6), textcoords="offset points", ha="center", fontsize=7, color="0.3")
        if (col == "tokens_per_step_after" and "tokens_per_step_before" in t
                and t["tokens_per_step_before"].notna().any()):
            ax.axhline(float(t["tokens_per_step_before"].mean()), color=style("before").color, ls="--", lw=1,
                       label="before refinement")
        if base is not None and col in base and base[col] == base[col]:
            ax.axhline(float(base[col]) * scale, color=style("base").color, ls=":", lw=1, label="base model")
        if mark is not None:
            ax.axvline(mark, color="tab:red", lw=0.8, alpha=0.6)
        if col == "acc":
            # A range of at least 20 points, so that a one-seed dip of a point or two does not read as a cliff
            finite = y[np.isfinite(y)].tolist() + ([float(base[col]) * 100] if base is not None and col in base
                                                   and base[col] == base[col] else [])
            if finite:
                top = min(101.0, max(finite) + 3)
                ax.set_ylim(max(0.0, min(min(finite) - 5, top - 20)), top)
        if logx:
            ax.set_xscale("log")
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, fontsize=8)
        ax.minorticks_off()
        ax.set(xlabel=xlabel, ylabel=ylabel + (" (%)" if scale == 100 else ""))
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.005, TOKENS_NOTE + "; n = training seeds per point (red line: the profile's value)",
             ha="center", fontsize=7, color="dimgray")
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
