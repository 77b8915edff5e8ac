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
# # 00 · The base model: a toy reasoner that overthinks
#
# **Purpose.** Build (or load) the model whose chains of thought the rest of the pipeline compresses.
#
# Pipeline: **00 base model** → [01 sampling](01_sampling.ipynb) → [02 selection](02_selection.ipynb) → [03 KL refinement](03_kl_refinement.ipynb) → [04 DPO-L training](04_dpo_l_training.ipynb) → [05 evaluation](05_evaluation.ipynb) → [06 ablations](06_ablations.ipynb) → [07 TLDR](07_tldr.ipynb).
#
# ← (the first lesson) · next: [01 sampling](01_sampling.ipynb) →
#
# *Follows:* the base models of the paper's experiments (DeepSeek-R1-Distill-Qwen); the toy world is ours. *The method in our words:* [docs/method.md](../docs/method.md). *Package functions used here:* [`base_model.prepare_base`](../tsq_utils/model/base_model.py), [`sampling.reasoner_checks`](../tsq_utils/method/sampling.py), [`toy.teacher_trace`](../tsq_utils/task/toy.py), [`Task`](../tsq_utils/task/base.py); figures: [`plotting`](../tsq_utils/lessons/plotting.py), summaries and exercises: [`lessons.base_model`](../tsq_utils/lessons/base_model.py).
#
# On the GPU profiles (`r1-1.5b`, `r1-7b`) this stage only records which DeepSeek-R1-Distill model to load. On the CPU profiles
# (`toy`, the default, and `ci`) the hub is out of reach, so the project ships its own tiny reasoning world: a task, a teacher that
# writes long-CoT traces, a tokenizer, and a ~1M-parameter Llama-style model trained from scratch on those traces.

# %% tags=["parameters"]
import os

profile = os.environ.get("TSQ_PROFILE", "toy")  # toy (default), ci, r1-1.5b, r1-7b
retrain = None  # None: the profile decides (toy loads the shipped reasoner, ci trains a tiny one); True retrains
n_heldout = None  # held-out problems for the checks below (None: 420 on toy, the profile's eval size otherwise)
eval_samples = 4  # samples per held-out problem at the sampling temperature
force = False  # True reruns the held-out evaluation even if an up-to-date one exists
# hub profiles (r1-1.5b, r1-7b) only; None keeps the profile's value
model_override = None  # a local model folder that replaces the hub model (model.local_override), e.g. a stand-in
backend = None  # sampling.backend: vllm on a GPU, transformers anywhere
max_new_tokens = None  # sampling.max_new_tokens, for the worked example
data_dir = None  # data.local_dir: a folder of local benchmark files (the layout of ../shared/data) instead of the hub

# %%
from dataclasses import replace
from pathlib import Path

import pandas as pd
from tsq_utils.model import base_model, toy_reasoner
from tsq_utils.lessons import plotting
from tsq_utils.method import sampling
from tsq_utils.task import format as fmt, toy
from tsq_utils.task.registry import demo_task, training_task
from tsq_utils.core.artifacts import load_table, read_json, save_table
from tsq_utils.core.stage import display_path, setup_stage

stage = setup_stage("base_model", profile, {
    "pretrain.retrain": retrain, "n_heldout": n_heldout, "eval_samples": eval_samples,
    "model.local_override": model_override, "sampling.backend": backend, "sampling.max_new_tokens": max_new_tokens,
    "data.local_dir": data_dir}, force=force)
P = stage.profile
task = training_task(P)  # the toy world, or a math benchmark on the hub profiles
toy_world = task.has_oracle  # the toy world's own cells: its teacher, its oracle and the held-out checks

# %%
from tsq_utils.lessons import orientation, quiet

quiet.quiet_libraries()  # library progress bars and notices: none of them concerns the lesson
orientation.lesson_top(stage, ["model.source", "pretrain.retrain", "toyworld.k_min", "toyworld.k_max",
                               "sampling.temperature", "sampling.max_new_tokens"])

# %% [markdown]
# ## The idea
#
# A reasoning model that *overthinks* writes many more tokens than the problem needs: it restates, re-derives and re-checks.
# TokenSqueeze needs such a model, one that samples traces of different lengths for the same problem and is sometimes wrong,
# so that "short and correct" is something to select and learn.
#
# The toy task is **chain arithmetic**: `Q:a5,b+6,c-3` asks for $5 + 6 - 3$. The difficulty [$k$](../docs/glossary.md#k) is the number of
# terms (at most 8; the profile's `toyworld.k_min` and `k_max`, printed above, set this run's range). Each term has a label, and every step header repeats its term, so fetching the next operand is a copy, which a tiny model
# can learn. The teacher's habits are **local**, decided step by step as a model decides token by token: each step picks
# one of four phrasings of the same equation (the terse one is the *oracle*'s step, the others restate the running total in
# more words), and after each step it may add a "Wait, let me check…" step. Sometimes a step **slips** (a carry error: the
# tens digit off by one); only a check right after it, or the closing review of the whole chain, catches the slip, and a slip
# nobody catches carries into the answer. So checking costs tokens and buys accuracy, most of all on long chains, and the
# shortest correct traces of a hard problem are often [lucky](../docs/glossary.md#lucky-trace) ones that skipped every check. The long phrasings are the
# # majority, so the model's most likely output is long. Every figure counts length in tokens of the completion
# (thinking + answer, no prompt), with the model's own tokenizer.
#
# On the GPU profiles the base model is DeepSeek-R1-Distill-Qwen-1.5B or -7B, an overthinker by training; it is prompted R1-style
# (the problem, then "Please reason step by step, and put your final answer within \boxed{}.", and the chat template's
# `<think>`), and graded by `math-verify`. The toy-world cells below are skipped there.

# %%
import random

if toy_world:
    demo = toy.make_problem(random.Random(0), k=4, max_value=P.toyworld.max_value, problem_id="demo")
    print("question:", demo.question, "  answer:", demo.answer, "\n")
    for seed in range(100):  # the first teacher trace of this problem with a slip, to show what a check is for
        record = {}
        trace = toy.local_trace(demo, random.Random(seed), P.toyworld, record=record) if P.toyworld.teacher == "local" \
            else toy.teacher_trace(demo, random.Random(seed), P.toyworld)
        if any(record.get("slips", [])) or P.toyworld.teacher != "local":
            break
    print("--- a teacher trace ---")
    print(trace)
    if record:
        print(f"\n(phrasing of each step, 0 = terse: {record['styles']}; checked: {record['checks']}; "
              f"slipped: {record['slips']}; review: {record['review']}; answer right: {record['correct']})")
    print("\n--- the oracle (shortest correct) trace ---")
    print(toy.oracle_trace(demo))
else:
    print(f"hub model {P.model.path}: no toy world on this profile (evaluation sets: {', '.join(P.data.eval)})")

# %% [markdown]
# ## The reasoner
#
# On `toy` the model that notebook 00 trained once (`retrain=True` rebuilds it: about 25 minutes on one core) ships with the
# repo under `checkpoints/toy-reasoner/`, with a manifest of how it was made. On `ci` a much smaller one is trained here in
# about a minute. Pretraining is plain next-token prediction on fresh teacher traces (loss on the completion only), AdamW with
# warmup and a cosine schedule.

# %%
model, tok, info = base_model.prepare_base(stage)
where = Path(base_model.read_pointer(stage.run_dir, P.name)["model"])
# inside the run folder: say where in it (the run folder itself may be anywhere); else relative to the repository
print("model:", f"<run folder>/{where.relative_to(stage.run_dir).as_posix()}" if where.is_relative_to(stage.run_dir)
      else display_path(where))
if toy_world:
    print(f"parameters: {toy_reasoner.count_parameters(model):,}  vocab: {len(tok)}  "
          f"trained on {info['tokens_seen']:,} tokens in {info['wall_time_s']:.0f} s "
          f"(final loss {info['final_loss']:.3f})")

# %% [markdown]
# ## A worked example
#
# One problem, answered greedily by the reasoner: its steps (separated by blank lines), its length against the oracle's, and its grade.
# On a hub profile: the first problem of the first evaluation set, its full prompt, and the model's answer.

# %%
from tsq_utils.model.generation import Decoding, sample

ex_task = demo_task(P)
ex = ex_task.demo_example(P, tok)
if not toy_world:
    print(f"{ex['problem_id']} (gold {ex['gold']}), prompt as the model sees it:\n{ex['prompt']!r}\n")
out = sample(model, tok, [ex["prompt"]], Decoding(n=1, temperature=0.0, max_new_tokens=P.sampling.max_new_tokens),
             backend=P.sampling.backend)
trace = out.texts[0][0]
fmt.print_steps(trace)  # the steps as refinement (03) splits them
grade = ex_task.grade([trace], [ex["gold"]])[0]
oracle = f" (oracle: {ex['oracle_tokens']})" if ex["oracle_tokens"] else ""
print(f"\n{out.n_tokens[0][0]} tokens{oracle}, finish: {out.finish_reasons[0][0]}; grade: {grade}")

# %% [markdown]
# ## At scale: is this a model worth compressing?
#
# Held-out problems, spread evenly over $k$, answered greedily and at the profile's sampling temperature. Three properties make the
# later stages meaningful: greedy output is accurate but long (well above the oracle), sampled accuracy is moderate and falls with
# $k$, and lengths vary among samples of the same problem (coefficient of variation $\sigma/\mu$ of tokens per problem).
# (Toy world only: on a hub profile notebook 01 measures the same things on the training problems.)

# %%
inputs = base_model.base_inputs(stage.run_dir, P)
done = True
if toy_world:  # first the greedy answers (one progress bar per cell)
    n_eval = n_heldout or task.split_size(P, "heldout")
    heldout = task.problems(P, tok, "heldout", n_eval)
    done = stage.is_done(inputs)
    spec, run = sampling.sampling_decoding(P, stage.seed), sampling.SampleRun(shards=P.shards, workers=P.workers)
    if not done:
        greedy_spec = replace(spec, n=1, temperature=0.0, top_p=1.0)  # the sampling settings, decoded greedily
        greedy = sampling.sample_and_grade(model, tok, heldout, task, greedy_spec, run)

# %%
if toy_world:  # then the samples at the sampling temperature
    if not done:
        sampled_spec = replace(spec, n=eval_samples, seed=stage.seed + 1)
        sampled = sampling.sample_and_grade(model, tok, heldout, task, sampled_spec, run)
        save_table(greedy, stage.dir / "heldout_greedy.parquet")
        save_table(sampled, stage.dir / "heldout_sampled.parquet")
    greedy = load_table(stage.dir / "heldout_greedy.parquet")
    sampled = load_table(stage.dir / "heldout_sampled.parquet")
    checks = sampling.reasoner_checks(greedy, sampled, heldout, tok, task)
    display(pd.DataFrame(checks["by_k"]))

# %%
if toy_world:
    print(f"greedy accuracy      {checks['greedy_accuracy']:.3f}   (want >= 0.90 on toy)")
    print(f"greedy / oracle len  {checks['greedy_over_oracle']:.2f}    (want >= 1.8: room to compress)")
    print(f"accuracy at T={P.sampling.temperature:g}    {checks['sampled_accuracy']:.3f}   "
          "(want 0.30-0.85, falling with k)")
    print(f"length CV per problem {checks['mean_cv']:.2f}   (want >= 0.1: samples of one problem differ in length)")
    if P.pretrain.retrain:  # a reasoner trained here carries its own measurements (the shipped one has them too)
        toy_reasoner.record_heldout(toy_reasoner.toy_model_dir(P, stage.run_dir), checks)

# %% [markdown] tsq_lesson="core-md"
# ### The measure in code
#
# The length spread that selection feeds on, by hand: for each held-out problem the coefficient of variation $\sigma/\mu$ of its samples' tokens, then the mean over problems. The assert checks it against `sampling.reasoner_checks`.

# %% tsq_lesson="core"
if toy_world:
    tokens = sampled.groupby("problem_id")["n_tokens"]
    cv_by_hand = (tokens.std(ddof=0) / tokens.mean()).mean()  # population SD, as per_problem_stats
    greedy_acc_by_hand = greedy["correct"].sum() / len(greedy)
    print(f"mean CV {cv_by_hand:.4f}, greedy accuracy {greedy_acc_by_hand:.4f}")
    assert abs(cv_by_hand - checks["mean_cv"]) < 1e-12 and abs(greedy_acc_by_hand - checks["greedy_accuracy"]) < 1e-12

# %% [markdown]
# ## What happened
#
# Left: accuracy by difficulty. Middle: mean length by difficulty, with the oracle floor; the gap between the curves is what
# TokenSqueeze tries to remove without losing accuracy. Right: the pretraining loss of the reasoner.

# %%
if toy_world:
    fig = plotting.base_model_figure(greedy, sampled, checks["oracle_len_by_k"], P.sampling.temperature,
                                     info.get("loss_curve"))
    _ = stage.save_fig(fig, "00_base_model", pdf=False)

# %% [markdown]
# ## Try this
#
# - `retrain=True` rebuilds the reasoner from its seed (about 25 minutes on one core on `toy`); the manifest records every setting.
# - Make the teacher less of an overthinker (more weight on the terse phrasing, `toyworld.phrasings` in `profiles/toy.yaml`) and
#   retrain: greedy output moves towards the oracle and there is less left to squeeze. `toyworld.teacher: habit` brings back the
#   first toy world (one concise-or-overthinking coin per trace, every slip caught), where refinement finds little to rewrite.
# - A higher sampling temperature (`sampling.temperature`) lowers accuracy and widens the length spread; 01 uses it.

# %%
if toy_world:
    summary = {k: v for k, v in checks.items() if k not in ("by_k", "oracle_len_by_k")}
    summary.update(by_k=checks["by_k"], task=toy.world_description(P.toyworld),
                   model=base_model.read_pointer(stage.run_dir, P.name))
    outputs = ["base_model.json", "heldout_greedy.parquet", "heldout_sampled.parquet"]
else:
    summary = {**info, "demo": {"problem_id": ex["problem_id"], "n_tokens": out.n_tokens[0][0], "grade": grade}}
    outputs = ["base_model.json"]
manifest = stage.finish(inputs, outputs=outputs, summary=summary)

# %% tsq_lesson="seen"
from tsq_utils.lessons import base_model as lesson, widgets

if toy_world:
    display(widgets.seen(lesson.seen_base_model(checks)))
else:
    print(f"hub model {P.model.path}: notebook 01 measures accuracy and length spread on the training problems")

# %% [markdown] tsq_lesson="ex"
# ## Exercises
#
# Try each before opening its answer (the answers below are computed from this run where they depend on it).
# 1. *(warm-up)* The toy question `Q:a5,b+6,c-3`: what is its difficulty $k$ and its answer?
# 2. *(warm-up)* Greedy output is $r$ times the oracle's length. What share of its tokens would a perfect compressor remove? Compute it for this run.
# 3. *(core)* Why does TokenSqueeze need a length spread *within* a problem (the CV), not only long outputs?
# 4. *(stretch)* Predict what a higher sampling temperature does to the sampled accuracy and to the CV, then check with `sampling.temperature` in a profile copy.
# 5. *(code)* Write `chain_answer(question)`, the answer of a toy question such as `Q:a5,b+6,c-3` (the cell below the answers; checked on this run's held-out problems).

# %% tsq_lesson="ans"
from tsq_utils.lessons import base_model as lesson, widgets

display(widgets.answer("$k = 3$ terms (a, b, c); the answer is $5 + 6 - 3 = 8$.", title="Answer 1"))
ratio = checks["greedy_over_oracle"] if toy_world else None
display(widgets.answer(f"$1 - 1/r$; here $r$ = {ratio:.2f}, so {100 * (1 - 1 / ratio):.0f}% of the greedy tokens."
                       if toy_world else "$1 - 1/r$.", title="Answer 2"))
display(widgets.answer("Selection prefers short *correct* responses of the same problem over longer wrong ones. "
                       "With CV = 0 every sample of a problem has the same length: there is no short correct "
                       "response to prefer, whatever the mean length.", title="Answer 3"))
display(widgets.answer("Accuracy falls (more random slips) and the CV rises (more varied habits per sample); "
                       "notebook 01 samples at a higher temperature than the evaluation for that reason.",
                       title="Answer 4"))
display(widgets.answer("Drop <code>Q:</code>, split at the commas, drop each term's label letter and add up the signed "
                       "numbers: <code>sum(int(t[1:]) for t in question[2:].split(','))</code>.", title="Answer 5"))

# %% [markdown] tsq_lesson="code-md"
# ### Exercise 5 (code)
#
# `chain_answer(question)`: the value of a toy question. The cell holds a solution (hidden: click to show); replace it
# with yours, and the check compares it with the gold answers of this run's held-out problems (toy world only).

# %% tsq_lesson="code" jupyter={"source_hidden": true}
def chain_answer(question):
    return sum(int(term[1:]) for term in question[2:].split(","))  # "a5" -> 5, "b+6" -> +6, "c-3" -> -3

# %% tsq_lesson="code-check"
assert chain_answer("Q:a5,b+6,c-3") == 8
if toy_world:
    assert all(chain_answer(q) == int(g) for q, g in zip(heldout["problem"], heldout["gold"]))
    print(f"chain_answer agrees with the gold answer of all {len(heldout)} held-out problems")

# %%
# sanity checks (nbval runs these on the ci profile)
assert (stage.dir / "base_model.json").exists() and out.n_tokens[0][0] > 0
if toy_world:
    assert read_json(stage.dir / "summary.json")["heldout_problems"] == n_eval
    assert len(greedy) == n_eval and len(sampled) == n_eval * eval_samples
    assert set(greedy["status"]) <= {"correct", "wrong", "no_answer"}
    assert (greedy["n_tokens"] > 0).all()
else:
    assert base_model.read_pointer(stage.run_dir, P.name)["kind"] == P.model.source
    assert grade in {"correct", "wrong", "no_answer", "timeout"}
