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
# # 06 · Ablations: what each part of TokenSqueeze buys
#
# **Purpose.** Rerun the pipeline with one part changed at a time, and regenerate the paper's Tables 2–4 and Fig. 4 (plus three
# sweeps the paper lacks: ε, the sign of the length margin, and η), each row side by side with the paper's 7B numbers.
#
# **What it runs.** Every selected row is the pipeline of notebooks 02 to 05 with one part changed: its pairs, refinement, a short training and an
# evaluation, each cached. The rows, the training seeds and the evaluation size come from the profile's `ablations` section;
# the work left to do and an estimate of its time (from this machine's measured per-entry costs) are printed under the set-up
# cells, and the long cell shows one progress bar. A rerun with everything cached takes seconds. `headline_only=True` runs only
# the profile's headline rows (`ablations.headline`).
#
# Pipeline: [00 base model](00_base_model.ipynb) → [01 sampling](01_sampling.ipynb) → [02 selection](02_selection.ipynb) → [03 KL refinement](03_kl_refinement.ipynb) → [04 DPO-L training](04_dpo_l_training.ipynb) → [05 evaluation](05_evaluation.ipynb) → **06 ablations** → [07 TLDR](07_tldr.ipynb).
#
# ← previous: [05 evaluation](05_evaluation.ipynb) · next: [07 TLDR](07_tldr.ipynb) →
#
# *Follows:* TokenSqueeze's ablations: Tables 2–4 and Fig. 4. *The method in our words:* [docs/method.md](../docs/method.md). *Package functions used here:* [`ablations.run_rows`](../tsq_utils/ablations/runner.py), [`ablations.aggregate`](../tsq_utils/ablations/report.py), [`ablations.findings`](../tsq_utils/ablations/report.py) (the rows, cache, runner and report of [`ablations`](../tsq_utils/ablations/__init__.py)); figures: [`plotting`](../tsq_utils/lessons/plotting.py), summaries and exercises: [`lessons`](../tsq_utils/lessons/__init__.py).

# %% tags=["parameters"]
import os

profile = os.environ.get("TSQ_PROFILE", "toy")
# rows: None for every row; or the names or groups to (re)run, e.g. ["table4/dpo"] or ["table2", "alpha"]
# (the tables show every cached row)
rows = None
seeds = None  # None: the profile's ablations.seeds (training seeds of the headline rows; every other row trains once)
n_eval_problems = None  # None: ablations.n_eval_problems (the first n evaluation problems; 0: all of notebook 05's)
n_eval_samples = None  # None: ablations.n_eval_samples (responses per problem; 0: evaluation.n_samples, as 05)
max_steps = None  # None: ablations.max_steps (optimizer steps per trained row; 0: training.epochs in full, as 04)
# batch_size: pairs per optimizer step of every trained row (0: training.batch_size, as 04)
batch_size = None  # None: ablations.batch_size
lr = None  # None: ablations.lr (learning rate of every trained row; 0: training.lr, as 04)
alphas = None  # None: ablations.alphas (Fig. 4; the profile's selection.alpha is always added)
epsilons = None  # None: ablations.epsilons (the profile's epsilon and the no-KL rewrite, eps inf, are always added)
etas = None  # None: ablations.etas (the profile's training.eta is always added)
headline_only = False  # True: run only the profile's headline rows (ablations.headline); ignored when rows is given
force = False  # True: recompute the selected rows' stages instead of reusing the cache

# %%
import pandas as pd
from IPython.display import Markdown, display
from tsq_utils import ablations
from tsq_utils.method import evaluation
from tqdm.auto import tqdm
from tsq_utils.lessons import ablation_budget, claims, orientation, plotting, quiet
from tsq_utils.lessons.selection import min_alpha_for_two
from tsq_utils.core.artifacts import atomic_write_text, read_json, save_table
from tsq_utils.core.stage import setup_stage

stage = setup_stage("ablations", profile, {
    "rows": rows, "ablations.seeds": seeds, "ablations.n_eval_problems": n_eval_problems,
    "ablations.n_eval_samples": n_eval_samples, "ablations.max_steps": max_steps, "ablations.batch_size": batch_size,
    "ablations.lr": lr, "ablations.alphas": alphas, "ablations.epsilons": epsilons, "ablations.etas": etas,
    "headline_only": headline_only}, force=force)
P, A = stage.profile, stage.profile.ablations
quiet.quiet_libraries()  # library progress bars and warnings: nothing that changes a result
display(orientation.lesson_top(stage, ["ablations.seeds", "ablations.max_steps", "ablations.batch_size", "ablations.lr",
                                       "ablations.n_eval_problems", "ablations.n_eval_samples", "training.eta"]))

# %% [markdown]
# ## The idea
#
# An ablation changes one part of the method and keeps the rest, so a difference in accuracy or length can be blamed on that part.
# Every *row* below is the whole pipeline (selection → refinement → training → evaluation) on the same samples from 01, with the same
# evaluation problems and seeds:
#
# | table | varies | keeps | the paper's finding (7B, AIME24) |
# |---|---|---|---|
# | **Table 2** selection | [Shortest](../docs/glossary.md#shortest) ($n_+=1$ [positive](../docs/glossary.md#positives)), [Q-FIX](../docs/glossary.md#q-fix) ($q$ fixed), [Q-DYN](../docs/glossary.md#q-dyn) ($q=\alpha(1-p)$), Q-DYN + extra negatives | no refinement, DPO-L + SFT | Q-DYN best (57.3); Shortest and extra negatives shorter but worse |
# | **Table 3** refinement | none, KL-constrained, rewrite *without* the KL check | Q-DYN, DPO-L + SFT | KL refinement shortens at no cost (6190 → 5157 tokens); a free rewrite collapses (39.1) |
# | **Table 4** objective | DPO, SFT, DPO + SFT, DPO-L + SFT | Q-DYN, KL refinement | pure DPO loses accuracy (48.3 vs 57.5: it keeps 84%); SFT alone stays long (5734) |
# | **Fig. 4** α | $\alpha \in \{0, 0.1, 0.2, 0.3, 0.5, 1\}$ | Q-DYN, no refinement | the paper finds $\alpha = 0.2$ best |
# | ε, sign, η (new) | the KL threshold, the sign $s$ of the length margin, the DPO-L weight $\eta$ | everything else | — |
#
# The objectives are points of one family, $\mathcal{L} = \eta\,\mathcal{L}_{\text{DPO-L}} + (1-\eta)\,\mathcal{L}_{\text{SFT}}$ with
# $\mathcal{L}_{\text{DPO-L}} = -\log\sigma\big(\beta\Delta + s\,\lambda\log\frac{\ell(y_l)}{\ell(y_w)}\big)$: **DPO** is $\eta=1, \lambda=0$; **SFT** is
# $\eta=0$; **DPO + SFT** is $\lambda=0$; **DPO-L + SFT** is the profile's $\eta$ (printed at the top; the paper's is 0.5) with $\lambda=1$. The paper's outside-LLM rewrite is
# replaced by the same step-wise resampling with $\varepsilon=\infty$: the shortest shorter candidate of every step is taken, whatever
# it does to the model's view of the rest of the solution.
#
# **Caching.** Each stage of a row is stored under `runs/<profile>/ablations/cache/<key>/`, where the key hashes exactly the inputs
# that decide it (the samples, the selection parameters the variant reads, the refinement and training parameters, the seeds, the
# evaluation settings). Rows that share a prefix share its work: Table 3's "none" *is* Table 2's Q-DYN and Fig. 4's α = 0.2, and
# α = 0 *is* Shortest ($q = 0$ gives $n_+ = 1$). The default row reuses notebooks 02–04's pairs, refined pairs and model when their
# inputs match, and a rerun of this notebook is instant. **Seeds.** Selection, refinement and evaluation use the pipeline's stage
# seeds for every row; the rows named in the profile's `ablations.headline` are trained with `ablations.seeds` training seeds
# (± = SD over them, the evaluation seed fixed), the others once, and a finding compares two rows over the seeds they share.

# %%
ctx = ablations.make_context(P, stage.run_dir)
all_rows = ablations.build_rows(P)
selected = ablations.select_rows(all_rows, list(A.headline) if headline_only and rows is None else rows)
print(f"{len(ctx.samples)} samples from 01 ({ctx.samples['problem_id'].nunique()} problems), reused by every row; "
      "evaluation: " + ", ".join(f"{b} x {len(p)}" for b, p in ctx.problems.items())
      + f" problems x {ctx.eval_n} responses; {len(selected)} of {len(all_rows)} rows selected "
      f"(headline rows with {A.seeds} training seeds: {A.headline})")
work, cost = ablations.plan(ctx, selected), ablations.costs(ctx)
if len(cost) and work["to_run"].sum():
    est = float((work["to_run"] * cost["mean_s"].reindex(work.index).fillna(0)).sum())
    took = f"{est / 60:.0f} min" if est >= 120 else f"{est:.0f} s"
    print(f"left to compute: {int(work['to_run'].sum())} cache entries, about {took} of work at this profile's "
          "measured per-entry costs (shared among the workers)")
else:
    print("left to compute: " + (f"{int(work['to_run'].sum())} cache entries (no per-entry cost measured yet on this "
                                 "profile)" if work["to_run"].sum() else "nothing: every entry is cached"))
work

# %% [markdown]
# ## A worked example: one row, and what it shares
#
# The cache keys of a few rows, one column per stage. Equal keys are shared work: the first three rows are one and the same
# pipeline, so are Shortest and α = 0, and Table 4's DPO row reuses the pairs and refined pairs of the KL row, differing only
# from the model on. Refinement has two stages: *scored* draws every step's candidates and computes their KLs (the expensive
# half, which does not depend on ε), *refined* keeps the candidates under ε and regrades the result. The ε sweep and the no-KL
# rewrite therefore share one scored entry (usually notebook 03's own step log) and cost almost nothing before training.
#
# Keys are made from settings, so they cannot see that two different settings pick the same pairs. With few samples per problem
# $n_+=\lceil \alpha(1-p)c\rceil$ is 1 for every problem unless α is large (some $n_+ \ge 2$ needs $\alpha\,p(1-p)N > 1$, so
# $\alpha > 4/N$ at best), and Q-DYN then picks exactly Shortest's positives; the line under the table says what this profile's
# $N$ and α give. Before
# training, a row looks the *content* of its pairs up (with its training settings and seed): a row whose twin already trained links
# that model and its results instead of training again (its source then reads "same pairs and settings as …").
#

# %%
lookup = {r.name: r for r in all_rows if r.seed == 0}
lookup.setdefault("alpha/0", ablations.make_row(P, "alpha/0", "α = 0", variant="q_dyn", alpha=0.0, refine="off",
                                                x=0.0))
ex_names = ["table2/q_dyn", "table3/none", "alpha/0.2", "table2/shortest", "alpha/0", "table3/kl", "table4/dpo"]
ex_rows = [lookup[n] for n in ex_names if n in lookup]
keys = pd.DataFrame([{"row": r.name, **{k: v[:10] for k, v in ablations.row_keys(ctx, r).items()}}
                     for r in ex_rows]).set_index("row")
display(ablations.describe_rows(ex_rows).set_index("name"))
N, alpha = P.sampling.n, P.selection.alpha
alpha_two = min_alpha_for_two(N)  # the smallest α at which some problem keeps n₊ >= 2 positives at this N
print(f"N = {N} samples per problem: some problem keeps n₊ >= 2 positives only for α > {alpha_two:.3g}; at the "
      f"profile's α = {alpha:g} " + ("Q-DYN is Shortest's twin (n₊ = 1 everywhere)." if alpha <= alpha_two
                                     else "Q-DYN can keep more than Shortest's positives."))
keys.fillna("(no refinement)")

# %% [markdown]
# Running one row: Table 4's pure DPO ($\eta = 1$, $\lambda = 0$: no length margin, no SFT anchor). Each stage says whether it was
# computed, taken from the cache, or adopted from the pipeline's own notebooks.

# %%
ex = next(r for r in all_rows if r.name == "table4/dpo" and r.seed == 0)
rec = ablations.run_row(ctx, ex, force=force)
print(ex.training)
display(pd.Series(rec["sources"], name="source").to_frame())
ablations.summarize(ctx, [ex])[["name", "benchmark", "acc", "acc_se", "len_t", "auc", "acc_hard", "n_pairs",
                                "train_steps"]]

# %% [markdown]
# ## At scale
#
# Every selected row, with a progress bar. A row whose stages are all cached costs a few key computations; a failing row does not
# stop the others (the error lists them at the end). The tables below show every row that has results, selected or not.

# %%
groups = list(dict.fromkeys(r.group for r in selected))
parts, failures = [], []
for g in tqdm(groups, desc="ablation groups"):  # one bar for the cell; each group's rows run in waves inside
    try:
        parts.append(ablations.run_rows(ctx, [r for r in selected if r.group == g], force=force, progress=False))
    except RuntimeError as err:  # a failing row does not stop the others: the failures are raised after the last
        failures.append(str(err))
if failures:
    raise RuntimeError("\n".join(failures))
done = pd.concat(parts, ignore_index=True)
summary = ablations.summarize(ctx, all_rows)
tables = {g: ablations.aggregate(summary, g, all_rows, benchmarks=list(ctx.problems)) for g in ablations.TABLE_FILES}
paths = ablations.save_tables(tables, stage.figures, ablations.TITLES)
base = ablations.aggregate(summary, "base", all_rows, benchmarks=list(ctx.problems)).iloc[0]
sources = pd.Series(done.drop(columns=["name", "seed"]).values.ravel()).dropna().value_counts()
print(f"{len(done)} row runs; sources: " + ", ".join(f"{k} {v}" for k, v in sources.items()))
bench0 = next(iter(ctx.problems))
metrics_05 = stage.run_dir / "evaluation" / "metrics.json"
acc_05 = read_json(metrics_05)["tokensqueeze"][bench0]["acc"] if metrics_05.is_file() else None
training_04 = stage.run_dir / "training" / "summary.json"
budget = ablation_budget.training_budget(P, summary, read_json(training_04) if training_04.is_file() else None)


def show(group):
    """A table, its training budget against notebook 04's, and each row against the base and 05's model."""
    t = tables[group]
    display(Markdown(ablations.table_markdown(t, ablations.TITLES[group])))
    display(Markdown("*" + ablation_budget.budget_line(budget) + "*"))
    display(ablation_budget.versus(t[t["benchmark"] == bench0], float(base["acc"]), acc_05))


print("seconds per computed entry (this profile's per-row costs):")
ablations.costs(ctx)

# %% [markdown] tsq_lesson="core-md"
# ### The table in code
#
# Every line of every table is a mean over training seeds with its SD ($\text{ddof} = 1$) where a row has several; by hand from the per-seed summary, checked against `ablations.aggregate`.

# %% tsq_lesson="core"
import math

for g, t in tables.items():
    for _, r in t.dropna(subset=["acc"]).iterrows():
        x = summary.loc[(summary["name"] == r["name"]) & (summary["benchmark"] == r["benchmark"]), "acc"]
        mean = x.sum() / len(x)
        sd = math.sqrt(((x - mean) ** 2).sum() / (len(x) - 1)) if len(x) > 1 else float("nan")
        assert len(x) == r["n_seeds"] and math.isclose(mean, r["acc"], rel_tol=1e-9)
        assert ((len(x) == 1 and r["acc_sd"] != r["acc_sd"])
                or math.isclose(sd, r["acc_sd"], rel_tol=1e-9, abs_tol=1e-12))
print("seeds per row:",
      {r["name"]: int(r["n_seeds"]) for t in tables.values() for _, r in t.iterrows() if r["n_seeds"] > 1})

# %% [markdown]
# ## What happened
#
# ### Table 2 · selection
#
# Accuracy overall and on the harder half of the problems (more terms: higher [$k$](../docs/glossary.md#k)). The paper's Table 2 reports Shortest below Q-DYN (53.3 vs
# 57.3 on AIME24): it reads this as the shortest answers under-serving hard problems. Whether this run can show it depends on its
# $N$ and α (above); the line under the table says what its numbers give. Figures mark twin rows "same model". [Len-T](../docs/glossary.md#len-t) is the mean
# length of correct responses; ΔLen-T is against the base model.
#
# Under every table: the training budget each row got, against notebook 04's full training, and each row's accuracy against the
# base model (evaluated with the rows, on `ablations.n_eval_problems` problems) and against notebook 05's model (05's own evaluation,
# on all its problems and samples). A row trains far less than 04's model, so a gap to 05's model is the budget, not the method.

# %%
show("table2")
t2 = tables["table2"][tables["table2"]["benchmark"] == next(iter(ctx.problems))].set_index("name")
if t2.loc[["table2/shortest", "table2/q_dyn"], "acc"].notna().all():
    print(claims.shortest_vs_q_dyn(t2.loc["table2/shortest"], t2.loc["table2/q_dyn"], N, alpha))
res2 = ablations.row_results(ctx, [r for r in all_rows if r.group in ("table2", "base")])
if len(res2) and res2["k"].nunique() > 1:
    by_k = evaluation.by_difficulty(res2)
    stage.save_fig(plotting.by_difficulty_figure(by_k), "06_table2_by_difficulty")
    display(by_k["acc"].unstack("model").round(3))

# %% [markdown]
# ### Table 3 · refinement and Table 4 · objective

# %%
show("table3")
show("table4")
fig = plotting.ablation_tradeoff_figure({g: tables[g] for g in ("table2", "table3", "table4")}, ablations.TITLES,
                                       base)
stage.save_fig(fig, "06_tables_tradeoff")
t4 = tables["table4"][tables["table4"]["benchmark"] == next(iter(ctx.problems))].set_index("name")
if t4.loc[["table4/dpo", "table4/dpo_l_sft"], "acc"].notna().all():
    print(claims.pure_dpo(t4.loc["table4/dpo"], t4.loc["table4/dpo_l_sft"]))

# %% [markdown]
# ### A worked example: what pure DPO does to a trace
#
# One evaluation problem, the same sample index, answered by Table 4's pure DPO row and by DPO-L + SFT (both training seed 0):
# the first problem (by id) on which pure DPO is wrong and DPO-L + SFT is right, both responses shown (truncated).

# %%
bench = next(iter(ctx.problems))
by_name = {r.name: r for r in all_rows if r.seed == 0}
pair_res = {n: ablations.row_results(ctx, [by_name[n]]) for n in ("table4/dpo", "table4/dpo_l_sft")}
pair_res = {n: r[r["benchmark"] == bench] if len(r) else r for n, r in pair_res.items()}
shown = (claims.trace_pair(pair_res["table4/dpo"], pair_res["table4/dpo_l_sft"])
         if all(len(r) for r in pair_res.values()) else None)
if shown is None:
    print("no problem on which pure DPO is wrong and DPO-L + SFT right (or the rows have not run)")
else:
    print(f"{shown['problem_id']} ({shown['k']} terms), sample {shown['sample_idx']}, gold {shown['gold']}")
    print(f"\n--- pure DPO: wrong, {shown['n_tokens_a']} tokens ---\n{claims.truncate(shown['text_a'])}")
    print(f"\n--- DPO-L + SFT: right, {shown['n_tokens_b']} tokens ---\n{claims.truncate(shown['text_b'])}")

# %% [markdown]
# ### Fig. 4 · the α sweep
#
# Small α keeps only the shortest correct responses as positives; large α lets longer ones in on hard problems. The paper finds
# α = 0.2 best, with both ends worse.

# %%
show("alpha")
fig = plotting.ablation_sweep_figure(tables["alpha"], "α", ablations.TITLES["alpha"], base=base, mark=P.selection.alpha)
png = stage.save_fig(fig, "fig4_alpha_sweep", pdf=True)

# %% [markdown]
# ### New sweeps: ε, the margin sign, η
#
# ε is the [KL](../docs/glossary.md#kl-divergence) budget of a rewritten step: larger ε accepts more (and shorter) rewrites, $\varepsilon=\infty$ accepts the shortest
# candidate every time. The paper has no ε sweep; its steps get 35.1 → 30.6 tokens at ε = 0.005.

# %%
show("epsilon")
fig = plotting.ablation_sweep_figure(tables["epsilon"], "ε (per-token mean KL)", ablations.TITLES["epsilon"], logx=True,
                                     base=base, extra=[("tokens_per_step_after", "tokens per step (chosen responses)")],
                                     mark=P.refinement.epsilon)
png = stage.save_fig(fig, "06_epsilon_sweep")

# %% [markdown]
# The sign $s$ of the length term is ambiguous in the paper ($s=-1$: the length gap is a margin the policy must beat; $s=+1$: a head
# start). η trades the DPO-L term against the SFT anchor ($\eta = 0$ is SFT, $\eta = 1$ DPO-L alone).

# %%
show("sign")
show("eta")
fig = plotting.ablation_sweep_figure(tables["eta"], "η (weight of DPO-L; 1 − η on SFT)", ablations.TITLES["eta"],
                                     base=base, mark=P.training.eta)
png = stage.save_fig(fig, "06_eta_sweep")

# %% [markdown]
# ## Closing note: which of the paper's findings the toy world reproduces
#
# Each finding is a difference between two rows, **paired over training seeds**: every row trains with the same seeds and is
# evaluated on the same problems with the same sampling draws (common random numbers), so for each seed $s$ the difference
# $d_s$ cancels what the two rows share, and its standard error is $\mathrm{SD}(d_s)/\sqrt{n}$ over the $n$ seeds both rows have.
# **yes** when $d$ goes the paper's way by more than two SE, **no** when it goes the other way by more than two SE, **not settled**
# otherwise, with the number of seeds that would put a difference of this size beyond two SE (the SE shrinking as $1/\sqrt{n}$).
# **Not testable** when the two rows tie exactly (one model, or no difference) or when either was trained with one seed: a single
# training run has no SE over training seeds, and training variation is the larger noise. The toy world is a ~1M-parameter
# reasoner on chain arithmetic, evaluated on at most a thousand responses per row, and the paper's numbers are a 7B model on AIME24.

# %%
found = ablations.findings(tables, summary=summary)
display(Markdown(ablations.findings_markdown(found)))

# %% [markdown]
# One gap, two standard errors. The ± in Table 2's line above is the SE of one evaluation's two means (the sampling noise of the
# responses, the two rows treated as independent); the SE in this table is over training seeds, paired, wherever both rows have
# two or more seeds: each seed's difference cancels what the two rows share, and its spread measures training noise (with one
# seed the table falls back to the evaluation SE). They answer different questions, so they differ; for the hard-half gap, this
# run gives:

# %%
hard = found[found["finding"].str.startswith("Shortest hurts")]
sh, qd = t2.loc["table2/shortest"], t2.loc["table2/q_dyn"]
if len(hard) and sh["acc_hard"] == sh["acc_hard"] and qd["acc_hard"] == qd["acc_hard"]:
    eval_se = 100 * math.sqrt(sh["acc_hard_se"] ** 2 + qd["acc_hard_se"] ** 2)
    seed_se, n_seeds = hard.iloc[0]["se"], int(hard.iloc[0]["n_seeds"])
    print(f"hard half, Shortest - Q-DYN: {100 * (sh['acc_hard'] - qd['acc_hard']):+.1f} points; SE of one evaluation "
          f"(unpaired): {eval_se:.1f}; the closing table's SE: {seed_se:.1f}, "
          + (f"over {n_seeds} paired training seeds" if n_seeds >= 2
             else "the evaluation SE again (one training seed)"))
else:
    print("Table 2's Shortest and Q-DYN rows have not both run")

# %% [markdown]
# ## Try this
#
# - `rows=["table4"]` with `seeds=5`: rerun one table with more training seeds (cached rows are not retrained).
# - `n_eval_problems=0, n_eval_samples=0`: evaluate every row at notebook 05's size (slower; the standard errors shrink, and the
#   default row then reuses 05's own results).
# - `epsilons=[0.0005, 0.05, 0.5]`: where does refinement start to hurt? `alphas=[0.05, 0.15, 0.25]`: zoom in on the optimum.
# - `max_steps=20`: a shorter training budget per row (a cheaper, weaker ablation: the effects shrink with it).
# - `max_steps=0, batch_size=0, lr=0`: every row trained exactly as notebook 04 (on toy about 4 minutes a training, so
#   hours for every row; with `rows=["table2/shortest", "table2/q_dyn"]` about half an hour).

# %%
save_table(summary, stage.dir / "summary.parquet")
atomic_write_text(stage.dir / "tables.md",
                  "\n\n".join(ablations.table_markdown(t, ablations.TITLES[g]) for g, t in tables.items())
                  + "\n\n" + ablations.findings_markdown(found) + "\n")
run_summary = {"rows_run": len(done), "rows_with_results": int(summary["name"].nunique()),
               "plan": ablations.plan(ctx, selected).to_dict(orient="index"),
               "seconds_per_entry": ablations.costs(ctx).to_dict(orient="index"),
               "findings": found.drop(columns=["difference", "se"]).to_dict(orient="records"),
               "figures": [p.name for p in paths], "tokens_counted": "completion tokens (thinking + answer)"}
# the inputs and outputs the stage table (core/pipeline.py) declares for this stage
manifest = stage.finish(stage.inputs(), outputs=list(stage.spec.outputs), summary=run_summary)

# %% tsq_lesson="seen"
from tsq_utils.lessons import widgets

display(widgets.seen(claims.seen_ablations(tables, N, alpha)))

# %% [markdown] tsq_lesson="ex"
# ## Exercises
#
# Try each before opening its answer (the answers below are computed from this run where they depend on it).
# 1. *(warm-up)* Which rows of this run trained one and the same model, and why, group by group?
# 2. *(core)* A row trained with 3 seeds reads 95.5 ± 2.4 (SD). What is the standard error of its mean?
# 3. *(core)* How many standard errors apart are pure DPO and DPO-L + SFT in this run?
# 4. *(stretch)* What is the smallest $N$ (samples per problem in 01) at which Q-DYN can differ from Shortest at the profile's α, and how does it compare with this run's $N$?

# %% tsq_lesson="ans"
from tsq_utils.lessons import widgets

every_line = pd.concat([t.assign(group=k) for k, t in tables.items()]).dropna(subset=["acc"])
twins = [g for _, g in every_line.groupby(["acc", "len_t", "n_pairs"]) if g["name"].nunique() > 1]
reasons = [" = ".join(sorted(set(g["label"]))) + ": " + ablation_budget.twin_reason(
    ablations.describe_rows([by_name[n] for n in sorted(set(g["name"])) if n in by_name]), alpha_two) for g in twins]
display(widgets.answer("Rows with identical results (accuracy, Len-T and pairs), i.e. one trained model, and why: "
                       + ("; ".join(reasons) if reasons else "none in this run") + ".", title="Answer 1"))
display(widgets.answer("$2.4/\\sqrt{3} \\approx 1.39$ points.", title="Answer 2"))
f0 = found.iloc[0]
if f0["se"] == f0["se"] and f0["se"] > 0:
    answer3 = (f"{f0['finding']}: {f0['ours']}, SE {f0['se']:.1f} points, so {abs(f0['difference']) / f0['se']:.1f} "
               f"SEs apart; reproduced: {f0['reproduced']}.")
else:
    answer3 = f"{f0['finding']}: {f0['ours']} (no SE in this run)."
display(widgets.answer(answer3, title="Answer 3"))
n_two = next((n for n in range(2, 4097) if min_alpha_for_two(n) < alpha), None)  # smallest N with some n₊ >= 2
if n_two is None:
    compare = f"no N up to 4096 does at α = {alpha:g}"
elif n_two <= N:
    compare = (f"at α = {alpha:g}, $N \\ge {n_two}$; this run's N = {N} already is, so Q-DYN can keep more "
               "positives than Shortest here")
else:
    compare = (f"at α = {alpha:g}, $N \\ge {n_two}$: {n_two / N:.1f} times this run's N = {N}, and notebook 01's "
               "sampling time with it")
display(widgets.answer("Some $n_+ \\ge 2$ needs $\\alpha\\,p(1-p)N > 1$, at best (p = 1/2) $\\alpha N/4 > 1$: "
                       + compare + ". Whether the selection then <i>matters</i> (Shortest less accurate on hard "
                       "problems) is a property of the task, not of N.", title="Answer 4"))

# %% [markdown] tsq_lesson="code-ex"
# ### Your turn: a paired difference and its SE, in code
#
# Write `paired(a, b)`: given two rows' values by training seed (two dicts `{seed: value}`), the mean over the seeds both have of $a_s - b_s$, and its standard error $\mathrm{SD}(d_s)/\sqrt{n}$ (sample SD, ddof 1; NaN under two seeds). This is the SE of the closing table. A solution is filled in; replace its body with your own and run the check, which compares it with the package on every finding of this run.

# %% tsq_lesson="code-ex"
def paired(a, b):
    """Mean over shared seeds of a[s] - b[s], and its SE (SD of the differences / sqrt(n), NaN under 2 seeds)."""
    d = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    if not d:
        return math.nan, math.nan
    mean = sum(d) / len(d)
    if len(d) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))


# %% tsq_lesson="code-check"
# the check: every finding's two rows of this run, against ablations.report.paired_difference
from tsq_utils.ablations.report import CLAIMS, paired_difference

s0 = summary[summary["benchmark"] == bench0]
for c in CLAIMS:
    a, b = ({int(k): v for k, v in s0[s0["name"] == n].groupby("seed")[c.col].mean().items()} for n in (c.a, c.b))
    want_d, want_se, _ = paired_difference(summary, c.a, c.b, c.col, bench0)
    got_d, got_se = paired(a, b)
    for got, want in ((got_d, want_d), (got_se, want_se)):
        both_nan = got != got and want != want
        assert both_nan or math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12), (c.finding, got, want)
print(f"paired agrees with ablations.report.paired_difference on all {len(CLAIMS)} findings")

# %%
# sanity checks (nbval runs these on the ci profile)
again = ablations.run_rows(ctx, selected, progress=False)  # everything is cached now: nothing may be recomputed
assert (again.drop(columns=["name", "seed"]).fillna("cached") == "cached").all().all()
assert set(summary["name"]) >= {r.name for r in selected}
for g, n in (("table2", 4), ("table3", 3), ("table4", 4)):
    ran = tables[g][tables[g]["acc"].notna()]  # a run of some rows (rows=[...]) leaves the others without results
    assert len(tables[g]) == n * len(ctx.problems) and ran["acc"].between(0, 1).all(), g
    assert rows is not None or headline_only or len(ran) == len(tables[g]), g
assert tables["table4"].set_index("name").loc["table4/dpo", "paper_acc"] == 0.483
head = [r for r in selected if ablations.matches(r, A.headline)]
assert all(summary[summary["name"] == r.name]["seed"].nunique() == A.seeds for r in head)
assert (stage.figures / "table2_selection.md").exists()
assert read_json(stage.dir / "summary.json")["rows_run"] == len(done)
