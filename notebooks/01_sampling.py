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
# # 01 · Self-sampling: N graded responses per training problem
#
# **Purpose.** Let the base model answer every training problem N times and grade each answer; everything TokenSqueeze learns
# comes from these self-generated samples.
#
# Pipeline: [00 base model](00_base_model.ipynb) → **01 sampling** → [02 selection](02_selection.ipynb) → [03 KL refinement](03_kl_refinement.ipynb) → [04 DPO-L training](04_dpo_l_training.ipynb) → [05 evaluation](05_evaluation.ipynb) → [06 ablations](06_ablations.ipynb) → [07 TLDR](07_tldr.ipynb).
#
# ← previous: [00 base model](00_base_model.ipynb) · next: [02 selection](02_selection.ipynb) →
#
# *Follows:* TokenSqueeze §3.1 (self-generated samples, graded). *The method in our words:* [docs/method.md](../docs/method.md). *Package functions used here:* [`sampling.sample_and_grade`](../tsq_utils/method/sampling.py), [`sampling.per_problem_stats`](../tsq_utils/method/sampling.py); figures: [`plotting`](../tsq_utils/lessons/plotting.py), summaries, examples and exercises: [`lessons.sampling`](../tsq_utils/lessons/sampling.py).

# %% tags=["parameters"]
import os

profile = os.environ.get("TSQ_PROFILE", "toy")
n_samples = None  # N responses per problem (None: sampling.n; the paper leaves N open, 24 is our choice: N > 4/alpha)
temperature = None  # None: the profile's sampling.temperature (the paper samples at 0.9)
n_problems = None  # training problems (None: the profile's data.n_train_problems)
max_new_tokens = None  # None: the profile's sampling.max_new_tokens (a response cut there never counts as correct)
backend = None  # None: the profile's sampling.backend (vllm on the GPU profiles; transformers anywhere)
train_set = None  # None: the profile's data.train (toy, or a benchmark such as math_train, math500, gsm8k)
data_dir = None  # None: data.local_dir, a folder of local benchmark files (like ../shared/data) instead of the hub
force = False

# %%
import pandas as pd
from tsq_utils.model import base_model
from tsq_utils.lessons import plotting
from tsq_utils.method import sampling
from tsq_utils.core.artifacts import load_table, read_json, save_table
from tsq_utils.core.stage import setup_stage
from tsq_utils.task.registry import training_task

stage = setup_stage("sampling", profile, {
    "sampling.n": n_samples, "sampling.temperature": temperature, "data.n_train_problems": n_problems,
    "sampling.max_new_tokens": max_new_tokens, "sampling.backend": backend, "data.train": train_set,
    "data.local_dir": data_dir}, force=force)
P, S = stage.profile, stage.profile.sampling
task = training_task(P)  # data.train: the toy world or a math benchmark (its problems, prompt and grader)

# %%
from tsq_utils.lessons import orientation, quiet

quiet.quiet_libraries()
orientation.lesson_top(stage, ["data.n_train_problems", "sampling.n", "sampling.temperature", "sampling.top_p",
                               "sampling.max_new_tokens", "sampling.backend"])

# %% [markdown]
# ## The idea
#
# TokenSqueeze uses no outside data and no stronger model: the base model samples [$N$](../docs/glossary.md#n) responses $y_1,\dots,y_N$ for each training
# problem $x$, and a grader marks each one correct or wrong. For a problem with $c$ correct responses out of $N$, the
# [**correctness rate**](../docs/glossary.md#p)
#
# $$p(x) = \frac{c}{N}$$
#
# measures how hard the problem is *for this model*. Stage 02 uses $p$ to decide how short a preferred response may be, and the
# spread of lengths among the correct responses is the raw material of compression.
#
# Grading in the toy world is an exact match of the last `\boxed{}` after `</think>`; on the math profiles it is answer
# equivalence by `math-verify`. A response cut off at `max_new_tokens` (finish reason `length`) never counts as correct.
# Tokens are completion tokens (thinking + answer, no prompt) of the model's tokenizer.
#
# On the GPU profiles the training problems are the MATH train split (7,500 problems, disjoint from MATH500; the paper names no
# training set, so this is a **choice**: `train_set`), each with the R1 prompt, sampled by vLLM at the paper's temperature;
# top-p and $N$ are **choices** (every profile's values: [docs/profiles.md](../docs/profiles.md); 02 shows why $N$ must
# exceed $4/\alpha$). This run's own settings are the ones printed at the top.

# %%
model, tok = base_model.load_base_sampler(stage.run_dir, P)  # a vLLM engine under the vllm backend, else the model
problems = task.problems(P, tok, "train")
print(f"{len(problems)} training problems; difficulty counts: {problems['k'].value_counts().sort_index().to_dict()}")
problems.head(3)

# %% [markdown]
# ## At scale
#
# All training problems, $N$ samples each. The problems are cut into the profile's fixed `shards`, which the machine's cores
# share (`workers`, one torch thread each); every (problem, sample) row draws from its own seeded stream, and the decoder
# refills a finished row's slot with the next waiting row, so the table is the same on any number of cores. It is saved as
# Parquet; a rerun with the same inputs and parameters reuses it.

# %%
inputs = base_model.base_inputs(stage.run_dir, P)
if not stage.is_done(inputs):
    samples = sampling.sample_and_grade(model, tok, problems, task, sampling.sampling_decoding(P, stage.seed),
                                        sampling.SampleRun.of(P))
    save_table(samples, stage.dir / "samples.parquet")
samples = load_table(stage.dir / "samples.parquet")
stats = sampling.per_problem_stats(samples)
sampling.summary_by_k(samples).round(3)

# %% [markdown]
# ## A worked example
#
# One training problem with both correct and wrong samples ($0 < p < 1$, the kind that gives preference pairs), chosen by rule
# from the samples table: $p$ nearest 1/2, then the widest spread of lengths. Its $N$ samples shortest first, and the shortest
# correct one in full.

# %%
from tsq_utils.lessons import sampling as lesson, widgets

example_id = lesson.mixed_example(stats)
print(lesson.mixed_example_note(stats, samples, example_id))
if example_id is not None:
    demo = samples[samples["problem_id"] == example_id].sort_values(["n_tokens", "sample_idx"], kind="stable")
    print(problems.set_index("problem_id").loc[example_id, "problem"], " gold:", demo["gold"].iloc[0])
    display(demo[["sample_idx", "n_tokens", "status", "finish_reason"]])
    print(demo.loc[demo["correct"], "text"].iloc[0])

# %% [markdown] tsq_lesson="core-md"
# ### The equation in code
#
# $p = c/N$ per problem, by hand from the samples table, checked against `sampling.per_problem_stats`.

# %% tsq_lesson="core"
by_problem = samples.groupby("problem_id")["correct"]
c, N = by_problem.sum(), by_problem.size()
p_by_hand = (c / N).sort_index()
assert (p_by_hand.to_numpy() == stats.set_index("problem_id")["p"].sort_index().to_numpy()).all()
print(f"{len(p_by_hand)} problems; p takes the values {', '.join(f'{v:.3g}' for v in sorted(p_by_hand.unique()))}")

# %% [markdown]
# ## What happened
#
# Left: how the correctness rate $p$ spreads per difficulty; problems at $p = 1$ give no preference pairs (there is no wrong
# answer to prefer against). Right: the lengths of the correct responses; the short end of that range is what TokenSqueeze wants
# the model to produce. The line printed above the figure says, from this run's numbers, where the all-correct problems
# sit.

# %%
print(lesson.all_correct_by_difficulty(stats))
fig = plotting.sampling_figure(samples, stats, S.temperature)
_ = stage.save_fig(fig, "01_sampling")

# %% [markdown]
# ## Try this
#
# What to expect (not measured in this run; rerun to see it):
# - Raise `n_samples`: a problem is all correct with probability $\pi^N$, which falls with $N$, so expect more mixed problems
#   (more pairs in 02); the minimum of more samples is never longer in expectation, so expect a shorter shortest correct sample.
# - Lower `temperature`: the model's likeliest answer gets more weight, so expect higher accuracy, a narrower spread of
#   lengths and more all-correct problems.

# %%
summary = sampling.sampling_summary(samples)
manifest = stage.finish(inputs, outputs=["samples.parquet"], summary=summary)
pd.Series({k: v for k, v in summary.items() if not isinstance(v, dict)}, dtype=object).to_frame("this run")

# %% tsq_lesson="seen"
display(widgets.seen(lesson.seen_sampling(stats)))

# %% [markdown] tsq_lesson="ex"
# ## Exercises
#
# Try each before opening its answer (the answers below are computed from this run where they depend on it).
# 1. *(warm-up)* Say a problem has 3 correct responses out of $N = 8$. What is $p$?
# 2. *(warm-up)* Which problems can give no preference pair at all, and why?
# 3. *(core)* What share of this run's problems is *mixed* ($0 < p < 1$)? Read it off the heat map, then compute it.
# 4. *(stretch)* If each sample of a problem is correct independently with probability $\pi$, the chance that the problem is mixed is $1 - \pi^N - (1-\pi)^N$. Compute it for $\pi = 0.9$ at this run's $N$, and tell what raising $N$ does.
# 5. *(code)* Write `mixed_share(samples)`: the share of problems with $0 < p < 1$, from the samples table alone (the cell below the answers; checked against `per_problem_stats`).

# %% tsq_lesson="ans"
display(widgets.answer("$p = 3/8 = 0.375$.", title="Answer 1"))
display(widgets.answer("Those with $p = 0$ (no correct response to prefer) and $p = 1$ (no wrong response to prefer "
                       "against).", title="Answer 2"))
display(widgets.answer(f"{((stats['c'] > 0) & (stats['c'] < stats['n'])).mean():.3f} of {len(stats)} problems: "
                       "`((stats.c > 0) & (stats.c < stats.n)).mean()`.", title="Answer 3"))
display(widgets.answer(f"$1 - 0.9^{{{S.n}}} - 0.1^{{{S.n}}}$ = {1 - 0.9 ** S.n - 0.1 ** S.n:.3f} at N = {S.n}. A "
                       "larger $N$ makes an all-correct run of samples less likely, so more easy problems become mixed "
                       "and give pairs.", title="Answer 4"))
display(widgets.answer("<code>g = samples.groupby('problem_id')['correct'].mean(); ((g > 0) &amp; (g &lt; 1)).mean()"
                       "</code>", title="Answer 5"))

# %% [markdown] tsq_lesson="code-md"
# ### Exercise 5 (code)
#
# `mixed_share(samples)`: the share of problems whose samples are neither all correct nor all wrong. The cell holds a
# solution (hidden: click to show); replace it with yours, and the check compares it with the package's statistics.

# %% tsq_lesson="code" jupyter={"source_hidden": true}
def mixed_share(samples):
    g = samples.groupby("problem_id")["correct"].mean()
    return float(((g > 0) & (g < 1)).mean())

# %% tsq_lesson="code-check"
want = float(((stats["c"] > 0) & (stats["c"] < stats["n"])).mean())
assert abs(mixed_share(samples) - want) < 1e-12, (mixed_share(samples), want)
print(f"mixed_share agrees: {want:.3f} of this run's {len(stats)} problems are mixed")

# %%
# sanity checks (nbval runs these on the ci profile)
assert len(samples) == len(problems) * S.n
assert set(samples.columns) >= {"problem_id", "k", "sample_idx", "prompt", "text", "n_tokens", "n_think_tokens",
                                "correct", "status", "finish_reason", "gold"}
assert samples["correct"].eq(samples["status"] == "correct").all()
assert not samples.loc[samples["finish_reason"] == "length", "correct"].any()
assert read_json(stage.dir / "summary.json")["responses"] == len(samples)
if profile == "toy":  # the worked example must show a problem that gives pairs
    assert example_id is not None and 0 < float(stats.set_index("problem_id").loc[example_id, "p"]) < 1
