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
# [oracle](../docs/glossary.md#oracle) floor) on held-out problems, with the paper's Table 1 columns and its Fig. 3.
#
# **What it runs.** Both models answer every held-out problem `evaluation.n_samples` times at the evaluation temperature (the settings and the time this stage last took are printed under the set-up cell; sampling takes the two longest cells, one per model, each with one progress bar), then the metrics and figures are computed from the stored responses.
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
from tsq_utils.method import evaluation, sampling
from IPython.display import display
from tsq_utils.lessons import claims, orientation, plotting, quiet
from tsq_utils.core.artifacts import atomic_write_json, atomic_write_text, load_table, read_json, save_table
from tsq_utils.core.stage_paths import display_path
from tsq_utils.core.stage import setup_stage
from tsq_utils.task import registry
from tsq_utils.task.registry import eval_tasks

stage = setup_stage("evaluation", profile, {
    "evaluation.n_samples": n_samples, "evaluation.temperature": temperature, "evaluation.budget": budget,
    "budget_forced": budget_forced, "data.n_eval_problems": n_problems, "evaluation.max_new_tokens": max_new_tokens,
    "data.eval": registry.benchmark_list(eval_sets), "data.local_dir": data_dir, "sampling.backend": backend,
    "trained_model": trained_model}, force=force)
P, E = stage.profile, stage.profile.evaluation
quiet.quiet_libraries()  # library progress bars and warnings: nothing that changes a result
display(orientation.lesson_top(stage, ["evaluation.n_samples", "evaluation.temperature", "evaluation.max_new_tokens",
                                       "evaluation.budget", "data.n_eval_problems"]))
tasks = eval_tasks(P)  # data.eval: each benchmark's problems, prompt, grader (and the toy world's oracle)

# %% [markdown]
# ## The idea
#
# For each model and benchmark, every problem is answered $n$ times at the evaluation temperature, and each response is graded.
# With $c_j \in \{0,1\}$ its grade and $\ell_j$ its completion tokens (thinking + answer):
#
# - **Acc** $= \frac1n\sum_j c_j$, reported with a standard error [clustered by problem](../docs/glossary.md#clustered-se);
# - **[Len-T](../docs/glossary.md#len-t)** = mean $\ell_j$ over the *correct* responses; **[Len-A](../docs/glossary.md#len-a)** = mean $\ell_j$ over all responses;
# - **Acc(b)** = share of responses that are correct *and* no longer than $b$ tokens (no forcing: a response over budget counts as
#   unsolved), and the **[AUC](../docs/glossary.md#auc)** under a budget $B$:
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
      f"problems; {E.n_samples} samples each at T = {E.temperature:g}; trained model {display_path(trained_dir)}")

# %% [markdown]
# ## A worked example
#
# One held-out problem, one answer from each model at temperature 0 (the most likely token at every step, so the answer is
# reproducible; the evaluation below samples at the profile's temperature).

# %%
from tsq_utils.model.generation import Decoding, sample

bench = next(iter(problems))
ex = problems[bench].iloc[len(problems[bench]) // 2]
print(ex["problem"], " gold:", ex["gold"])
for name in models:
    out = sample(models[name], tok, [ex["prompt"]], Decoding(n=1, temperature=0.0, max_new_tokens=E.max_new_tokens),
                 backend=P.sampling.backend)
    print(f"\n--- {name}: {out.n_tokens[0][0]} tokens ---\n{out.texts[0][0]}")

# %% [markdown]
# ## At scale

# %%
inputs = {"trained_model": trained_dir, **base_model.base_inputs(stage.run_dir, P)}
done = stage.is_done(inputs)
spec, run = evaluation.eval_decoding(P, stage.seed), sampling.SampleRun.of(P)
if not done:  # the base model's answers here, the trained model's in the next cell: one progress bar each
    parts = [evaluation.evaluate_model("base", models["base"], tok, problems, spec, run)]

# %%
if not done:
    parts.append(evaluation.evaluate_model("tokensqueeze", models["tokensqueeze"], tok, problems, spec, run))
    # a task with an oracle (the toy world) adds its shortest correct traces as one more row of the table
    parts += [evaluation.oracle_results(problems[name], tok, task) for name, task in tasks.items() if task.has_oracle]
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
png = stage.save_fig(fig, "05_paper_vs_ours")
if profile == "toy":  # the sentence above: B is a few times the base model's Len-T, not far above it as in the paper
    assert 2 < E.budget / head["len_t_base"] < 6, (E.budget, head["len_t_base"])

# %% [markdown]
# ## What happened
#
# Fig. 3: Acc(b) against the budget, the share of responses that are correct within $b$ tokens. What this run's curves show (do
# they rise earlier, and where do they end) is printed above the figure from its numbers. Below: accuracy and length by
# difficulty (the number of terms).

# %%
forced = None
if budget_forced:
    budgets = [int(E.budget * f) for f in (0.1, 0.2, 0.3, 0.5, 0.75)]
    forced = evaluation.budget_forced_curve(models, tok, results, budgets, backend=P.sampling.backend)
    save_table(forced, stage.dir / "budget_forced.parquet")
fig = plotting.budget_curve_figure(results, E.budget, bench, forced)
png = stage.save_fig(fig, "fig3_budget_curve", pdf=True)
print(claims.budget_curve(head))  # printed now; the figure is drawn when the cell ends, below this line

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
from tsq_utils.lessons import evaluation as lesson, widgets

display(widgets.seen(lesson.seen_evaluation(head, bench)))

# %% [markdown] tsq_lesson="ex"
# ## Exercises
#
# Try each before opening its answer (the answers below are computed from this run where they depend on it).
# 1. *(warm-up)* A correct response of 100 tokens at $B = 400$: what does it add to the AUC sum? A wrong one?
# 2. *(core)* Show that $\mathrm{AUC} = \mathrm{Acc}\,(1 - \text{Len-T}/B)$ holds exactly when no correct response is longer than $B$, and check it on both models' rows of the table.
# 3. *(core)* Is this run's accuracy change larger than its standard error? What would make the SE smaller?
# 4. *(stretch)* Why does the paper's AUC move only 0.836 → 0.875 for a 51% shorter Len-T, while ours moves more?

# %% tsq_lesson="ans"
from tsq_utils.lessons import evaluation as lesson, widgets

display(widgets.answer("$1 - 100/400 = 0.75$ (divided by $n$); a wrong response adds 0 whatever its length.",
                       title="Answer 1"))
from_table = {m: head[f"acc_{m}"] * (1 - head[f"len_t_{m}"] / E.budget) for m in ("base", "trained")}
over_b = int((results["correct"] & (results["n_tokens"] > E.budget)).sum())
display(widgets.answer(
    "With every correct $\\ell_j \\le B$ the clip does nothing, and the correct responses' lengths sum to "
    "$n\\,\\mathrm{Acc}\\cdot\\text{Len-T}$: $\\frac1n\\sum_j c_j(1 - \\ell_j/B) = \\mathrm{Acc} - "
    "\\mathrm{Acc}\\cdot\\text{Len-T}/B$. It is an identity, not an approximation. This run: base "
    f"{from_table['base']:.4f} from Acc and Len-T, {head['auc_base']:.4f} from the responses; trained "
    f"{from_table['trained']:.4f} and {head['auc_trained']:.4f}; correct responses longer than B = {E.budget}: "
    f"{over_b} (the generation limit is {E.max_new_tokens} tokens).", title="Answer 2"))
two_se = abs(head["acc_change_points"]) > 2 * head["acc_se_points"]
display(widgets.answer(f"{head['acc_change_points']:+.1f} points against a standard error of "
                       f"{head['acc_se_points']:.1f}: " + ("more than two SEs." if two_se else "within two SEs.")
                       + " More problems shrink it most; more samples per problem help only up to the "
                       "between-problem spread.", title="Answer 3"))
display(widgets.answer("The AUC weight $1 - \\ell/B$ is about $1 - 3638/32768 = 0.89$ for the paper's base and $0.95$ "
                       "after: both near 1. Our $B$ is a few times the lengths, so halving them moves the weight "
                       "a lot.", title="Answer 4"))

# %% [markdown] tsq_lesson="code-ex"
# ### Your turn: Acc(b) in code
#
# Write `acc_within(correct, n_tokens, b)`: the share of all responses that are correct *and* at most `b` tokens long, one point of Fig. 3's curve. A solution is filled in; replace its body with your own and run the check, which compares it with `evaluation.acc_curve` on this run's responses at several budgets (a response of exactly $b$ tokens fits).

# %% tsq_lesson="code-ex"
def acc_within(correct, n_tokens, b):
    """Share of responses that are correct and no longer than b tokens."""
    return sum(1 for c, n in zip(correct, n_tokens) if c and n <= b) / len(correct)


# %% tsq_lesson="code-check"
# the check: every model of this run, at budgets that include the responses' own lengths (the edge case)
for name, g in results[results["benchmark"] == bench].groupby("model"):
    budgets = sorted({0, E.budget // 4, E.budget // 2, E.budget, *g["n_tokens"].head(5).tolist()})
    want = evaluation.acc_curve(g["correct"], g["n_tokens"], budgets)
    got = [acc_within(g["correct"].tolist(), g["n_tokens"].tolist(), b) for b in budgets]
    assert all(math.isclose(x, y, abs_tol=1e-12) for x, y in zip(got, want)), (name, got, list(want))
print("acc_within agrees with evaluation.acc_curve for", ", ".join(sorted(results["model"].unique())))

# %%
# sanity checks (nbval runs these on the ci profile)
m = read_json(stage.dir / "metrics.json")
assert {"base", "tokensqueeze"} <= set(m) and all(0 <= v["acc"] <= 1 for b in m.values() for v in b.values())
assert len(results[results["model"] == "base"]) == sum(len(p) for p in problems.values()) * E.n_samples
