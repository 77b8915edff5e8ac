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
# # 05 · Evaluation: accuracy, tokens, and the budget curve
#
# **Purpose.** Measure what TokenSqueeze bought: the trained model against the base model (and, in the toy world, against the
# oracle floor) on held-out problems, with the paper's Table 1 columns and its Fig. 3.
#
# Pipeline: [00 base model](00_base_model.ipynb) → [01 sampling](01_sampling.ipynb) → [02 selection](02_selection.ipynb) → [03 KL refinement](03_kl_refinement.ipynb) → [04 DPO-L training](04_dpo_l_training.ipynb) → **05 evaluation** → [06 ablations](06_ablations.ipynb) → [07 TLDR](07_tldr.ipynb).
#
# ← previous: [04 DPO-L training](04_dpo_l_training.ipynb) · next: [06 ablations](06_ablations.ipynb) →
#
# *Follows:* TokenSqueeze's experiments: Table 1 and Fig. 3. *The method in our words:* [docs/method.md](../docs/method.md). *Package functions used here:* [`evaluation.metrics_table`](../tsq_utils/method/evaluation.py), [`evaluation.auc`](../tsq_utils/method/evaluation.py), [`evaluation.acc_curve`](../tsq_utils/method/evaluation.py); figures: [`plotting`](../tsq_utils/lessons/plotting.py), summaries and exercises: [`lessons`](../tsq_utils/lessons/__init__.py).

# %% tags=["parameters"]
import os

profile = os.environ.get("TSQ_PROFILE", "toy")
n_samples = None  # None: the profile's evaluation.n_samples (samples per problem; the paper: 16 runs)
temperature = None  # None: evaluation.temperature (the paper: 0.6)
budget = None  # None: evaluation.budget B for AUC (the paper: 32768)
budget_forced = False  # also draw the budget-forced Acc(b) (thinking cut at b, answer forced), at a few budgets
n_problems = None  # None: the profile's data.n_eval_problems (problems per benchmark, the first ones)
max_new_tokens = None  # None: evaluation.max_new_tokens (the paper: 32768)
eval_sets = None  # None: data.eval; or a comma-separated list of benchmarks, e.g. "math500" or "math500,aime24"
data_dir = None  # None: data.local_dir, a folder of local benchmark files (like ../shared/data) instead of the hub
backend = None  # None: sampling.backend (vllm on the GPU profiles; transformers anywhere)
trained_model = None  # None: notebook 04's model; or a local model folder to compare with the base model
force = False

# %%
import pandas as pd
from tsq_utils.model import base_model
from tsq_utils.task import data
from tsq_utils.method import evaluation
from tsq_utils.lessons import claims, plotting
from tsq_utils.core.artifacts import atomic_write_json, atomic_write_text, load_table, read_json, save_table
from tsq_utils.core.stage import setup_stage
from tsq_utils.task.registry import eval_tasks

stage = setup_stage("evaluation", profile, {
    "evaluation.n_samples": n_samples, "evaluation.temperature": temperature, "evaluation.budget": budget,
    "budget_forced": budget_forced, "data.n_eval_problems": n_problems, "evaluation.max_new_tokens": max_new_tokens,
    "data.eval": data.benchmark_list(eval_sets), "data.local_dir": data_dir, "sampling.backend": backend,
    "trained_model": trained_model}, force=force)
P, E = stage.profile, stage.profile.evaluation
tasks = eval_tasks(P)  # data.eval: each benchmark's problems, prompt, grader (and the toy world's oracle)

# %% [markdown]
# ## The idea
#
# For each model and benchmark, every problem is answered $n$ times at the evaluation temperature, and each response is graded.
# With $c_j \in \{0,1\}$ its grade and $\ell_j$ its completion tokens (thinking + answer):
#
# - **Acc** $= \frac1n\sum_j c_j$, reported with a standard error clustered by problem;
# - **Len-T** = mean $\ell_j$ over the *correct* responses; **Len-A** = mean $\ell_j$ over all responses;
# - **Acc(b)** = share of responses that are correct *and* no longer than $b$ tokens (no forcing: a response over budget counts as
#   unsolved), and the **AUC** under a budget $B$:
#
# $$\mathrm{AUC} = \frac1B\int_0^B \mathrm{Acc}(b)\,db = \frac1n\sum_j c_j\,\max\!\Big(0,\,1-\frac{\ell_j}{B}\Big).$$
#
# A model that is as accurate but shorter has a higher AUC. The paper's numbers fit $\mathrm{Acc}\times(1-\text{Len-T}/B)$ at
# $B = 32{,}768$. In the toy world the **oracle** (the shortest correct trace of every problem) is the floor of compression.
# `budget_forced=True` adds the other common reading of a budget curve (s1, Dynasor): cut the thinking at $b$, force `</think>`,
# let the model answer.

# %%
ref, kind = base_model.base_ref(stage.run_dir, P)
if trained_model:
    trained_dir = base_model.local_model_dir(trained_model, "trained_model")
else:
    trained_dir = stage.require("training", "model")
# loaded on first use; under vLLM one engine at a time, since each takes most of the GPU's memory
models = base_model.Samplers(P, {"base": (ref, kind), "tokensqueeze": (str(trained_dir), kind)})
tok = base_model.load_tokenizer(ref, kind)
problems = {name: task.problems(P, tok, "test") for name, task in tasks.items()}  # = evaluation.eval_problems(P, tok)
print({b: len(p) for b, p in problems.items()},
      f"problems; {E.n_samples} samples each at T = {E.temperature:g}; trained model {trained_dir}")

# %% [markdown]
# ## A worked example
#
# One held-out problem, one greedy answer from each model.

# %%
from tsq_utils.model.generation import sample

bench = next(iter(problems))
ex = problems[bench].iloc[len(problems[bench]) // 2]
print(ex["problem"], " gold:", ex["gold"])
for name in models:
    out = sample(models[name], tok, [ex["prompt"]], n=1, temperature=0.0, max_new_tokens=E.max_new_tokens,
                 backend=P.sampling.backend)
    print(f"\n--- {name}: {out.n_tokens[0][0]} tokens ---\n{out.texts[0][0]}")

# %% [markdown]
# ## At scale

# %%
inputs = {"trained_model": trained_dir, **base_model.base_inputs(stage.run_dir, P)}
if not stage.is_done(inputs):
    kw = dict(n=E.n_samples, temperature=E.temperature, top_p=E.top_p, max_new_tokens=E.max_new_tokens,
              batch_size=P.sampling.batch_size, backend=P.sampling.backend, shards=P.shards, workers=P.workers)
    parts = [evaluation.evaluate_model(name, models[name], tok, problems, seed=stage.seed, **kw) for name in models]
    # a task with an oracle (the toy world) adds its shortest correct traces as one more row of the table
    parts += [evaluation.oracle_results(problems[name], tok, name) for name, task in tasks.items() if task.has_oracle]
    save_table(pd.concat(parts, ignore_index=True), stage.dir / "results.parquet")
results = load_table(stage.dir / "results.parquet")
table = evaluation.metrics_table(results, E.budget)
table.style.format({"acc": "{:.3f}", "acc_se": "{:.3f}", "len_t": "{:.1f}", "len_a": "{:.1f}", "auc": "{:.3f}"})

# %%
head = evaluation.headline(table, bench)
print(f"{bench}: accuracy {100*head['acc_base']:.1f} -> {100*head['acc_trained']:.1f} "
      f"({head['acc_change_points']:+.1f} ± {head['acc_se_points']:.1f} points), "
      f"Len-T {head['len_t_base']:.1f} -> {head['len_t_trained']:.1f} ({head['len_t_change_pct']:+.1f}%), "
      f"AUC {head['auc_base']:.3f} -> {head['auc_trained']:.3f}")
print("\nthe paper (7B, B = 32768):")
evaluation.PAPER_7B

# %% [markdown] tsq_lesson="core-md"
# ### The metric in code
#
# $\mathrm{AUC} = \frac1n\sum_j c_j\max(0, 1 - \ell_j/B)$ by hand for every model, checked against `evaluation.auc` and the table.

# %% tsq_lesson="core"
import math

for name, g in results[results["benchmark"] == bench].groupby("model"):
    auc_by_hand = (g["correct"] * (1 - g["n_tokens"] / E.budget).clip(lower=0)).mean()
    len_t_by_hand = g.loc[g["correct"], "n_tokens"].mean()
    assert math.isclose(auc_by_hand, evaluation.auc(g["correct"], g["n_tokens"], E.budget), rel_tol=1e-9)
    assert math.isclose(auc_by_hand, table.loc[(name, bench), "auc"], rel_tol=1e-9)
    assert len_t_by_hand != len_t_by_hand or math.isclose(len_t_by_hand, table.loc[(name, bench), "len_t"],
                                                          rel_tol=1e-9)
    print(f"{name:14s} AUC {auc_by_hand:.4f}  Len-T {len_t_by_hand:.1f}")

# %% [markdown] tsq_lesson="pvo-md"
# ### Paper vs ours
#
# The headline in one figure, each quantity on its own axis: how much shorter (Len-T, %), how much accuracy moved (points), and the AUC before and after. On `toy` our budget $B$ is the generation limit, a few times the lengths themselves (checked below); the paper's $B = 32{,}768$ is far above its lengths, so the same compression moves its AUC less.

# %% tsq_lesson="pvo"
fig = plotting.paper_vs_ours_figure(head, evaluation.PAPER_7B, ours_label=f"ours ({bench})")
stage.save_fig(fig, "05_paper_vs_ours")
if profile == "toy":  # the sentence above: B is a few times the base model's Len-T, not far above it as in the paper
    assert 2 < E.budget / head["len_t_base"] < 6, (E.budget, head["len_t_base"])

# %% [markdown]
# ## What happened
#
# Fig. 3: Acc(b) against the budget, the share of responses that are correct within $b$ tokens. What this run's curves show (do
# they rise earlier, and where do they end) is printed under the figure from its numbers. Below: accuracy and length by difficulty.

# %%
forced = None
if budget_forced:
    budgets = [int(E.budget * f) for f in (0.1, 0.2, 0.3, 0.5, 0.75)]
    forced = evaluation.budget_forced_curve(models, tok, results, budgets, grader=tasks[bench].grader,
                                            backend=P.sampling.backend)
    save_table(forced, stage.dir / "budget_forced.parquet")
fig = plotting.budget_curve_figure(results, E.budget, bench, forced)
stage.save_fig(fig, "fig3_budget_curve", pdf=True)
print(claims.budget_curve(head))

# %%
if "k" in results and results["k"].nunique() > 1:
    by_k = evaluation.by_difficulty(results)
    stage.save_fig(plotting.by_difficulty_figure(by_k), "05_by_difficulty")
    display(by_k.unstack("model").round(3))

# %% [markdown]
# ## Try this
#
# - `temperature=0` (greedy) shows the compression without sampling noise; the paper evaluates at 0.6.
# - More `n_samples`: the standard errors shrink as $1/\sqrt{n}$ per problem (up to the between-problem spread).
# - `budget_forced=True`: the forced curve credits a long model for answers it could give if cut short.

# %%
metrics = evaluation.metrics_json(table)
atomic_write_json(stage.dir / "metrics.json", metrics)
atomic_write_text(stage.dir / "metrics.md", table.round(4).to_markdown())
outputs = ["results.parquet", "metrics.json", "metrics.md"] + (["budget_forced.parquet"] if budget_forced else [])
manifest = stage.finish(inputs, outputs=outputs, summary={"headline": evaluation.json_safe(head), "budget": E.budget,
                                                          "tokens_counted": "completion tokens (thinking + answer)"})
models.close()

# %% tsq_lesson="seen"
from tsq_utils import lessons

display(lessons.seen(lessons.seen_evaluation(head, bench)))

# %% [markdown] tsq_lesson="ex"
# ## Exercises
#
# Try each before opening its answer (the answers below are computed from this run where they depend on it).
# 1. *(warm-up)* A correct response of 100 tokens at $B = 400$: what does it add to the AUC sum? A wrong one?
# 2. *(core)* Use $\mathrm{AUC} \approx \mathrm{Acc}\,(1 - \text{Len-T}/B)$ to estimate both models' AUC from the table, and compare with the exact values.
# 3. *(core)* Is this run's accuracy change larger than its standard error? What would make the SE smaller?
# 4. *(stretch)* Why does the paper's AUC move only 0.836 → 0.875 for a 51% shorter Len-T, while ours moves more?

# %% tsq_lesson="ans"
from tsq_utils import lessons

display(lessons.answer("$1 - 100/400 = 0.75$ (divided by $n$); a wrong response adds 0 whatever its length.",
                       title="Answer 1"))
approx_base = head["acc_base"] * (1 - head["len_t_base"] / E.budget)
approx_trained = head["acc_trained"] * (1 - head["len_t_trained"] / E.budget)
display(lessons.answer(f"base ≈ {approx_base:.3f} (exact {head['auc_base']:.3f}); trained ≈ {approx_trained:.3f} "
                       f"(exact {head['auc_trained']:.3f}). The approximation replaces each response's length by the "
                       "mean.", title="Answer 2"))
two_se = abs(head["acc_change_points"]) > 2 * head["acc_se_points"]
display(lessons.answer(f"{head['acc_change_points']:+.1f} points against a standard error of "
                       f"{head['acc_se_points']:.1f}: " + ("more than two SEs." if two_se else "within two SEs.")
                       + " More problems shrink it most; more samples per problem help only up to the "
                       "between-problem spread.", title="Answer 3"))
display(lessons.answer("The AUC weight $1 - \\ell/B$ is about $1 - 3638/32768 = 0.89$ for the paper's base and $0.95$ "
                       "after: both near 1. Our $B$ is a few times the lengths, so halving them moves the weight "
                       "a lot.", title="Answer 4"))

# %%
# sanity checks (nbval runs these on the ci profile)
m = read_json(stage.dir / "metrics.json")
assert {"base", "tokensqueeze"} <= set(m) and all(0 <= v["acc"] <= 1 for b in m.values() for v in b.values())
assert len(results[results["model"] == "base"]) == sum(len(p) for p in problems.values()) * E.n_samples
