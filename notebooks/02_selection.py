# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Adaptive reasoning-depth selection
#
# **Purpose.** Turn the graded samples of 01 into preference pairs (short correct ≻ longer wrong), choosing *how short* a preferred
# response must be from how hard the problem is for the model.
#
# Pipeline: [00 base model](00_base_model.ipynb) → [01 sampling](01_sampling.ipynb) → **02 selection** → [03 KL refinement](03_kl_refinement.ipynb) → [04 DPO-L training](04_dpo_l_training.ipynb) → [05 evaluation](05_evaluation.ipynb) → [06 ablations](06_ablations.ipynb) → [07 TLDR](07_tldr.ipynb).
#
# ← previous: [01 sampling](01_sampling.ipynb) · next: [03 KL refinement](03_kl_refinement.ipynb) →
#
# *Follows:* TokenSqueeze §3.1, adaptive reasoning-depth selection. *The method in our words:* [docs/method.md](../docs/method.md). *Package functions used here:* [`selection.select_pairs`](../tsq_utils/method/selection.py), [`selection.quantile_count`](../tsq_utils/method/selection.py); figures: [`plotting`](../tsq_utils/lessons/plotting.py), summaries, examples and exercises: [`lessons.selection`](../tsq_utils/lessons/selection.py).

# %% tags=["parameters"]
import os

profile = os.environ.get("TSQ_PROFILE", "toy")
variant = None  # None: the profile's selection.variant; one of shortest, q_fix, q_dyn (the paper's), q_dyn_extra
alpha = None  # None: the profile's selection.alpha (the paper: 0.2)
max_pairs = None  # None: the profile's selection.max_pairs (the paper: M 64 per problem)
force = False

# %%
import pandas as pd
from tsq_utils.lessons import plotting, selection as lesson, widgets
from tsq_utils.method import selection
from tsq_utils.core.artifacts import load_table, save_table
from tsq_utils.core.stage import setup_stage

stage = setup_stage("selection", profile, {"selection.variant": variant, "selection.alpha": alpha,
                                           "selection.max_pairs": max_pairs}, force=force)
P, C = stage.profile, stage.profile.selection

# %%
from tsq_utils.lessons import orientation, quiet

quiet.quiet_libraries()
orientation.lesson_top(stage, ["selection.variant", "selection.alpha", "selection.max_pairs"])

# %% [markdown]
# ## The idea
#
# The paper's claim (§3.1): always preferring the single shortest correct response teaches the model to cut corners on problems
# that need long reasoning, so TokenSqueeze adapts the cut to difficulty ([Q-DYN](../docs/glossary.md#q-dyn)). Whether this run can show that depends on $n_+$ below.
# For a problem with $N$ samples, $c$ of them correct,
#
# $$p = \frac{c}{N}, \qquad q = \alpha\,(1 - p), \qquad n_+ = \max\!\big(1, \lceil q\,c \rceil\big),$$
#
# and the [positives](../docs/glossary.md#positives) are the $n_+$ shortest correct responses $\tau_1,\dots,\tau_{n_+}$. On an easy problem ($p \to 1$) $q \to 0$: only the
# very shortest correct response is preferred. On a harder one ($p$ smaller) $q$ grows, and once $q\,c > 1$ longer correct
# responses count as positives too: the paper's way of keeping deeper reasoning where it is needed. Each positive is paired with
# every *longer* incorrect response
# $(y_w, y_l)$, at most $M$ pairs per problem (seeded subsample). Problems with $p = 0$ or $p = 1$ give no pairs: there is nothing
# to prefer against, or nothing to prefer.
#
# **When does $n_+ \ge 2$ happen at all?** With $c = pN$, $q\,c = \alpha(1-p)\,pN$, and $n_+ \ge 2$ needs $\lceil q c \rceil \ge 2$,
# i.e. $\alpha\,p(1-p)\,N > 1$. Since $p(1-p) \le 1/4$ (equality at $p = 1/2$), that needs $\alpha N/4 > 1$:
#
# $$n_+ \ge 2 \text{ for some problem} \iff \alpha > \min_{0<c<N} \frac{1}{(1-c/N)\,c} \;\ge\; \frac{4}{N}.$$
#
# At the paper's $\alpha = 0.2$ that means $N \ge 21$ (this run's $N$ is the dashed line of the map below, and the line printed
# above that map gives the $\alpha$ this run's $N$ needs); below that Q-DYN selects exactly what Shortest selects. And $n_+ = 3$
# needs $\alpha N p(1-p) > 2$, so at the paper's $\alpha = 0.2$ it needs $N \ge 41$: below that, Q-DYN's positives are
# Shortest's plus at most the second-shortest correct response. The map of $n_+$ over $(p, N)$ further down shows it for this run's $\alpha$, with a warning when this run is
# below the line.
#
# Choices where the paper is silent: $n_+ \ge 1$ (so with $\alpha = 0$ Q-DYN is Shortest); a response cut off at the token limit counts
# as incorrect; equal length is not "longer"; ties in length go to the lower sample index. The ablation variants (06) are
# **shortest** ($n_+ = 1$), **q_fix** ($q$ fixed, independent of $p$), and **q_dyn_extra** (also rejecting correct responses longer
# than 1.5× the positive, Kimi-k1.5 style).

# %%
samples = load_table(stage.require("sampling", "samples.parquet"))
print(f"{len(samples)} responses to {samples['problem_id'].nunique()} problems; "
      f"accuracy {samples['correct'].mean():.3f}")

# %%
inputs = {"samples": stage.dir.parent / "sampling" / "samples.parquet"}
if not stage.is_done(inputs):
    pairs, stats = selection.select_with(samples, C, seed=stage.seed)  # every knob of the profile's selection
    save_table(pairs, stage.dir / "pairs.parquet")
    save_table(stats, stage.dir / "problem_stats.parquet")
pairs, stats = load_table(stage.dir / "pairs.parquet"), load_table(stage.dir / "problem_stats.parquet")

# %% [markdown] tsq_lesson="core-md"
# ### The equation in code
#
# The selection count by hand, $n_+ = \max(1, \lceil \alpha(1-p)c \rceil)$, for every problem that gave pairs, checked against what `selection.select_pairs` chose and against `selection.quantile_count`.

# %% tsq_lesson="core"
import math

def k_by_hand(alpha: float, c: int, n: int) -> int:
    p = c / n
    return max(1, math.ceil(round(alpha * (1 - p) * c, 9))) if c else 0  # round: 0.1 * 30 is 3.0000000000000004

used = stats[stats["n_pairs"] > 0]
if C.variant in ("q_dyn", "q_dyn_extra"):
    assert all(k_by_hand(C.alpha, r.c, r.n) == r.n_pos == selection.quantile_count(C.alpha, r.c, r.n)
               for r in used.itertuples())
print(f"k over the {len(used)} problems with pairs: {used['n_pos'].value_counts().sort_index().to_dict()}")

# %% [markdown] tsq_lesson="heat-md"
# ### The k × p map
#
# Every cell is $n_+$ for one $\alpha$ (rows) and one correct count $c$ (columns, $p = c/N$) at this run's $N$; the bars on top count the run's problems at each $c$. The product $\alpha(1-p)c = \alpha N p(1-p)$ never exceeds $\alpha N/4$, so at this $N$ a row is all 1 unless $\alpha > 4/N$ (the line printed above the map gives the exact bound at this
# run's $N$).

# %% tsq_lesson="heat"
if int(stats["n"].max()) >= 2:
    n_run = int(stats["n"].max())
    print(f"At this run's N = {n_run}: some problem keeps n₊ ≥ 2 positives only for α > "
          f"{lesson.min_alpha_for_two(n_run):.3g} (4/N = {4 / n_run:.3g}).")
    fig = plotting.selection_count_figure(n_run, C.alpha, stats)
    stage.save_fig(fig, "02_selection_count")
else:  # one response per problem (sampling.n = 1): no correct count has a second sample to pair with
    print("N = 1: every problem has a single response, so there is no k × p map to draw (and no pair).")

# %% [markdown]
# ### k over (p, N) at this run's α
#
# Every point is one correct count $c$ at one $N$ ($p = c/N$), coloured by $n_+$; the black curve is $\alpha N p(1-p) = 1$, above
# which $n_+ \ge 2$; the dashed line is this run's $N$. Above the figure, one line: a warning when this run's $N$ and $\alpha$
# make Q-DYN identical to Shortest, else where this run stands.

# %%
n_run = int(stats["n"].max())
fig = plotting.k_over_p_n_figure(C.alpha, n_run)
_ = stage.save_fig(fig, "02_k_over_p_n")
if C.variant in ("q_dyn", "q_dyn_extra"):
    print(lesson.qdyn_shortest_warning(n_run, C.alpha)
          or f"N = {n_run}, α = {C.alpha:g}: above the curve, so problems near p = 1/2 can keep n₊ ≥ 2 positives.")

# %% [markdown]
# ## A worked example: n₊ ≥ 2 beside n₊ = 1
#
# The problem with the most positives ($n_+ \ge 2$, then $p$ nearest 1/2) beside an $n_+ = 1$ problem of similar $p$, when this run
# has such a problem; otherwise the highest-$p$ and lowest-$p$ problems with pairs, and the sentence says there is none. Samples
# are listed shortest first with their grade and the role selection gave them.

# %%
print(lesson.depth_example_note(stats, C.alpha))
deep, shallow = lesson.depth_examples(stats)
shown = (("n₊ ≥ 2", deep), ("n₊ = 1", shallow)) if deep is not None else \
    tuple(zip(("highest p", "lowest p"), selection.example_problems(stats)))
for name, pid in shown:
    if pid is None:
        print(f"{name}: no such problem with pairs in this run")
        continue
    row = stats[stats["problem_id"] == pid].iloc[0]
    print(f"{name}: {pid}  c={row['c']}/{row['n']}  p={row['p']:.2f}  q={row['q']:.3f}  n₊={row['n_pos']}  "
          f"pairs={row['n_pairs']}")
    display(selection.explain_problem(samples, pairs, pid))

# %% [markdown]
# ## What happened
#
# Left: the lengths of chosen and rejected responses (the summary below gives their means). Right: each problem's positives
# relative to the mean length of its correct responses, against its correctness rate. Where $n_+ > 1$ (problems near $p = 1/2$,
# above the curve of the $(p, N)$ map) a problem also keeps positives longer than its shortest correct response; with $n_+ = 1$
# every problem keeps only its shortest correct response. The summary at the end says which happened in this run.

# %%
fig = plotting.selection_figure(pairs, stats, samples)
_ = stage.save_fig(fig, "02_selection")
summary = selection.selection_summary(pairs, stats)
pd.Series({k: v for k, v in summary.items() if not isinstance(v, dict)}, dtype=object).to_frame("this run")

# %% [markdown] tsq_lesson="live-md"
# ### Live: α and N over the cached samples
#
# Move α and $N$ (the first $N$ of each problem's samples from 01); selection reruns on the cached samples, and the view shows how many positives each problem keeps and which responses of the problem with the most positives are chosen. Headless (papermill, nbval, the book) the view shows its default state, the run's own α and $N$.

# %% tsq_lesson="live"
from dataclasses import replace

def selection_view(alpha: float, n: int):
    """Selection on the first n samples of each problem at this alpha: k per problem and the chosen responses."""
    sub = samples[samples["sample_idx"] < n]
    pairs_n, stats_n = selection.select_with(sub, replace(C, variant="q_dyn", alpha=alpha), seed=stage.seed)
    return plotting.selection_live_figure(sub, pairs_n, stats_n, alpha, n)

controls = widgets.live(selection_view, alpha=widgets.slider(float(C.alpha), 0.0, 1.0, 0.05, "α"),
                        n=widgets.slider(n_run, 2, max(n_run, 2), 1, "N"))  # shown once, by live itself

# %% [markdown]
# ## Try this
#
# - `alpha=0` (always the shortest) or `alpha=1` ($n_+ = \lceil (1-p)c \rceil$, at most $\lceil N/4 \rceil$); 06 sweeps it (the
#   paper's Fig. 4).
# - `variant="q_dyn_extra"` adds correct-but-long rejected responses: meant as more length pressure; in the paper (7B) it costs
#   accuracy (AIME24 52.3 vs Q-DYN's 57.3), and 06 measures whether it does here.

# %%
manifest = stage.finish(inputs, outputs=["pairs.parquet", "problem_stats.parquet"], summary=summary)

# %% tsq_lesson="seen"
display(widgets.seen(lesson.seen_selection(stats, summary, C.alpha)))

# %% [markdown] tsq_lesson="ex"
# ## Exercises
#
# Try each before opening its answer (the answers below are computed from this run where they depend on it).
# 1. *(warm-up)* Say $c = 4$ correct of $N = 8$ samples and $\alpha = 0.2$: compute $p$, $q$ and $n_+$.
# 2. *(code)* Write `first_alpha(n)`, the α above which some problem with $N = n$ samples keeps $n_+ \ge 2$ (the cell below the answers; checked against the package for every $N$ up to 64). Which is it at this run's $N$?
# 3. *(core)* How large must $N$ be for the paper's $\alpha = 0.2$ to give some problem $n_+ = 2$?
# 4. *(core)* In this run, how many problems kept more than one positive?
# 5. *(stretch)* Q-DYN is said to keep longer positives on *hard* problems. At fixed $N$, for which $p$ is $n_+$ largest, and why not at the hardest problems?

# %% tsq_lesson="ans"
display(widgets.answer("$p = 4/8 = 0.5$, $q = 0.2 \\cdot 0.5 = 0.1$, $q c = 0.4$, so "
                       "$n_+ = \\max(1, \\lceil 0.4 \\rceil) = 1$: only the shortest correct response.",
                       title="Answer 1"))
display(widgets.answer("$n_+ \\ge 2$ needs $\\alpha (1 - c/N) c > 1$ for some $0 < c < N$, so "
                       "<code>min(1 / ((1 - c / n) * c) for c in range(1, n))</code>; it is about $4/N$ (exactly at "
                       f"even $N$). At this run's $N$ = {int(stats['n'].max())}: "
                       f"{lesson.min_alpha_for_two(int(stats['n'].max())):.3g}.", title="Answer 2"))
display(widgets.answer("$\\alpha N/4 > 1$, so $N > 20$: $N \\ge 21$ (e.g. $N = 21$, $c = 10$: "
                       "$0.2 \\cdot (11/21) \\cdot 10 = 1.05$, $n_+ = 2$). That is "
                       f"{21 / int(stats['n'].max()):.1f} times this run's sampling (N = {int(stats['n'].max())}).",
                       title="Answer 3"))
display(widgets.answer(f"{int((used['n_pos'] > 1).sum())} of {len(used)} problems with pairs "
                       f"(α = {C.alpha:g}, N = {int(stats['n'].max())}).", title="Answer 4"))
display(widgets.answer("$q c = \\alpha N p (1-p)$ is largest at $p = 1/2$: $q = \\alpha(1-p)$ grows as $p$ falls, "
                       "but $c = pN$ shrinks, so the hardest problems (few correct responses) keep only one or two "
                       "positives.", title="Answer 5"))

# %% [markdown] tsq_lesson="code-md"
# ### Exercise 2 (code)
#
# `first_alpha(n)`: the smallest α above which some problem with $N = n$ samples keeps $n_+ \ge 2$ positives. The cell holds
# a solution (hidden: click to show); replace it with yours, and the check compares it with the package's bound.

# %% tsq_lesson="code" jupyter={"source_hidden": true}
def first_alpha(n):
    return min(1 / ((1 - c / n) * c) for c in range(1, n))

# %% tsq_lesson="code-check"
for n_check in range(2, 65):
    assert abs(first_alpha(n_check) - lesson.min_alpha_for_two(n_check)) < 1e-12, n_check
    if first_alpha(n_check) < 0.99:  # α ≤ 1: just below the bound every problem keeps one positive, just above not
        ks = [[selection.quantile_count(first_alpha(n_check) * f, c, n_check) for c in range(1, n_check)]
              for f in (1 - 1e-6, 1 + 1e-6)]
        assert max(ks[0]) == 1 < max(ks[1]), n_check
print(f"first_alpha agrees for every N from 2 to 64; at this run's N = {n_run}: α > {first_alpha(n_run):.3g}")

# %%
# sanity checks (nbval runs these on the ci profile)
assert summary["n_pairs"] == len(pairs)
assert (pairs["chosen_tokens"] < pairs["rejected_tokens"]).all() or C.variant == "q_dyn_extra"
assert stats["n_pairs"].max() <= C.max_pairs if len(stats) else True
assert len(stats) == samples["problem_id"].nunique()
