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
# # 03 · KL-constrained intra-step refinement
#
# **Purpose.** Make each preferred response shorter *inside* its steps, by rewriting each step with the model itself and keeping a
# rewrite only if the model's view of everything that follows barely changes. (That is the method's aim; the worked example and the
# summary at the end say, from this run's numbers, how much it did here.)
#
# Pipeline: [00 base model](00_base_model.ipynb) → [01 sampling](01_sampling.ipynb) → [02 selection](02_selection.ipynb) → **03 KL refinement** → [04 DPO-L training](04_dpo_l_training.ipynb) → [05 evaluation](05_evaluation.ipynb) → [06 ablations](06_ablations.ipynb) → [07 TLDR](07_tldr.ipynb).
#
# ← previous: [02 selection](02_selection.ipynb) · next: [04 DPO-L training](04_dpo_l_training.ipynb) →
#
# *Follows:* TokenSqueeze §3.2 and Appendix B, KL-constrained intra-step refinement. *The method in our words:* [docs/method.md](../docs/method.md). *Package functions used here:* [`refinement.refine_pairs`](../tsq_utils/method/refinement.py), [`refinement.kl_window`](../tsq_utils/method/refinement.py), [`refinement.kl_per_token`](../tsq_utils/method/refinement.py), [`refinement.rethreshold`](../tsq_utils/method/refinement.py); figures: [`plotting`](../tsq_utils/lessons/plotting.py), summaries and exercises: [`lessons`](../tsq_utils/lessons/__init__.py).

# %% tags=["parameters"]
import os

profile = os.environ.get("TSQ_PROFILE", "toy")
epsilon = None  # None: the profile's refinement.epsilon (the paper: 0.005)
n_candidates = None  # None: refinement.n_candidates (the paper: K 64; fewer on CPU)
window = None  # None: refinement.window (the paper: L 512 following tokens)
kl_reduction = None  # None: refinement.kl_reduction ("mean" per token, our default; or "sum")
max_responses = None  # None: refinement.max_responses (0: refine every distinct chosen response)
force = False

# %%
from tsq_utils.model import base_model
from tsq_utils import lessons
from tsq_utils.lessons import plotting
from tsq_utils.method import refinement
from tsq_utils.core.artifacts import load_table, read_json, save_table
from tsq_utils.core.stage import setup_stage
from tsq_utils.task import format as fmt
from tsq_utils.task.registry import training_task

stage = setup_stage("refinement", profile, {
    "refinement.epsilon": epsilon, "refinement.n_candidates": n_candidates, "refinement.window": window,
    "refinement.kl_reduction": kl_reduction, "refinement.max_responses": max_responses}, force=force)
P, R = stage.profile, stage.profile.refinement
grader = training_task(P).grader  # a rewrite that no longer grades correct is reverted

# %% [markdown]
# ## The idea
#
# Selection (02) picks *which* reasoning to keep; refinement compresses *how it is worded*. A preferred response is a sequence of
# steps $s_1,\dots,s_n$ (blank-line separated, thinking part only: the answer is never rewritten). For step $i$ the same model samples
# $K$ candidates $s'$ conditioned on the original prefix $x, s_1,\dots,s_{i-1}$, each ending at the next step boundary (no rewrite prompt,
# no outside model). A candidate replaces the step only if it leaves the model's expectations about the rest of the solution intact:
#
# $$D_{\mathrm{KL}}\big(P(\cdot \mid x, s_{<i}, s_i)\,\big\|\,P(\cdot \mid x, s_{<i}, s')\big) < \varepsilon,$$
#
# and among those the shortest wins; if none passes, the step stays. The KL over all futures is estimated on the original
# continuation: teacher-force the next $L$ original tokens $c_1,\dots,c_L$ after the step under both contexts, and compare the two
# next-token distributions (full vocabulary, original first) at each of those positions,
#
# $$\widehat{D} = \frac{1}{L}\sum_{t=1}^{L} D_{\mathrm{KL}}\big(P(\cdot \mid x, s_{<i}, s_i, c_{<t})\,\big\|\,P(\cdot \mid x, s_{<i}, s', c_{<t})\big).$$
#
# The paper leaves "sum or mean" open; ε = 0.005 is only workable as the per-token mean (our default; `kl_reduction="sum"` is the
# other). Steps are refined independently against the original prefix, then reassembled; a refined response whose final answer no
# longer grades correct is reverted, and refinement never makes a response longer. All $K$ candidates of a step are scored in one
# padded forward pass that reuses the shared prefix's KV cache.

# %%
pairs = load_table(stage.require("selection", "pairs.parquet"))
samples = load_table(stage.require("sampling", "samples.parquet"))
model, tok = base_model.load_base(stage.run_dir, P)
print(f"{len(pairs)} pairs, {pairs['chosen'].nunique()} distinct chosen responses")

# %% [markdown]
# ## At scale
#
# Every distinct chosen response (or the first `max_responses`), with a progress bar. The per-step log keeps every candidate's
# text, length and KL. Candidates are drawn, and every one shorter than its step is scored, before ε is looked at, so this log
# holds the result at any other ε too: `refinement.rethreshold(tok, pairs, step_log, cfg)` re-applies a new threshold without
# sampling or scoring again (06 sweeps ε that way).

# %%
inputs = {"pairs": stage.dir.parent / "selection" / "pairs.parquet", **base_model.base_inputs(stage.run_dir, P)}
if not stage.is_done(inputs):
    # resumable: finished groups are kept in the shard folder
    refined, step_log = refinement.refine_pairs(model, tok, pairs, R, seed=stage.seed,
                                                grade_fn_factory=refinement.grader_factory(samples, grader),
                                                shard_dir=stage.run_dir / "refinement_shards", shards=P.shards,
                                                workers=P.workers)
    save_table(refined, stage.dir / "refined_pairs.parquet")
    save_table(step_log, stage.dir / "step_log.parquet")
refined, step_log = load_table(stage.dir / "refined_pairs.parquet"), load_table(stage.dir / "step_log.parquet")
summary = refinement.refinement_summary(step_log, refined)
summary

# %% [markdown]
# ## A worked example: one accepted and one rejected candidate
#
# Chosen from the step log by rule: the kept rewrite that saves the most tokens, and the nearest miss above ε (from the same step
# when that step had one), each beside its original step with its window KL (the analogue of the paper's Figures 2 and 5–7).
# When nothing was accepted, the sentence says so.

# %%
import pandas as pd

pd.set_option("display.max_colwidth", 90)
examples = lessons.kl_examples(step_log, refined, R.epsilon)
print(lessons.kl_example_note(examples, R.epsilon, lessons.count_scored(step_log)))
examples

# %% [markdown] tsq_lesson="core-md"
# ### The equation in code: the windowed KL of one step
#
# A step with scored candidates (one that was rewritten, if any): both contexts are run in full, without the shared-prefix cache the package uses, and the KL is taken position by position over the original continuation. The assert checks it against `refinement.kl_per_token` and `refinement.kl_window` on the same ids.

# %% tsq_lesson="core"
import numpy as np
import torch

def kl_by_hand(model, prefix, step, cand, cont):
    """KL(P(.|prefix, step, cont<t) || P(.|prefix, cand, cont<t)) at every position t of the window."""
    with torch.no_grad():
        lo = model(input_ids=torch.tensor([prefix + step + cont])).logits[0, len(prefix) + len(step) - 1:]
        lc = model(input_ids=torch.tensor([prefix + cand + cont])).logits[0, len(prefix) + len(cand) - 1:]
        lo, lc = lo[:len(cont)].float().log_softmax(-1), lc[:len(cont)].float().log_softmax(-1)
    return (lo.exp() * (lo - lc)).sum(-1)

pick = lessons.pick_kl_step(step_log, refined)
if pick is not None:
    row = pick["row"]
    ids = lessons.step_kl_inputs(tok, pick["prompt"], pick["text"], int(row["step"]), R.window)
    scored = [j for j, v in enumerate(row["kl"]) if v is not None and np.isfinite(v)]
    cand_ids = [tok(row["cand_texts"][j], add_special_tokens=False)["input_ids"] for j in scored]
    model.eval()
    by_hand = torch.stack([kl_by_hand(model, ids["prefix_ids"], ids["step_ids"], c, ids["cont_ids"]) for c in cand_ids])
    per_token = refinement.kl_per_token(model, ids["prefix_ids"], ids["step_ids"], cand_ids, ids["cont_ids"])
    assert torch.allclose(by_hand, per_token, rtol=1e-4, atol=1e-6)
    window_kl = refinement.kl_window(model, ids["prefix_ids"], ids["step_ids"], cand_ids, ids["cont_ids"],
                                     reduction="mean")
    assert torch.allclose(by_hand.mean(1), window_kl, rtol=1e-4, atol=1e-7)
    print(f"step {int(row['step'])} of {row['response_id']}: {len(scored)} scored candidates, "
          f"window of {len(ids['cont_ids'])} tokens; mean KL by hand {by_hand.mean(1).numpy().round(5)}, "
          f"in the step log {np.round([row['kl'][j] for j in scored], 5)}")
else:
    print("no step had a candidate shorter than itself: nothing was scored")

# %% [markdown]
# ## What happened
#
# Left: the KL of every scored candidate, with ε marked; candidates left of the line were acceptable. Middle and right: the
# paper's Table 3 columns. In the paper refinement shortens steps but barely changes how many there are (7B on MATH500: 55.0 → 57.5
# steps, 35.1 → 30.6 tokens per step); the summary at the end of this notebook says how much it did here.

# %%
fig = plotting.refinement_figure(step_log, summary, R.epsilon)
stage.save_fig(fig, "03_refinement")

# %% [markdown] tsq_lesson="heat-md"
# ### What “the model's view of the future barely moves” looks like
#
# The same step as above. Along $x$ the original continuation after the step, token by token; along $y$ the step's scored candidates (shortest first; the one kept, if any, in green). Colour is the KL between the two next-token distributions at that position, log scale, with ε marked on the colour bar; the right panel is each candidate's mean over the window, the number compared with ε.

# %% tsq_lesson="heat"
if pick is not None:
    order = sorted(range(len(scored)), key=lambda i: (row["cand_tokens"][scored[i]], i))
    kept = [bool(row["accepted"]) and row["cand_tokens"][scored[i]] == row["new_tokens"]
            and row["kl"][scored[i]] == row["kl_chosen"] for i in order]
    labels = [f"{row['cand_tokens'][scored[i]]:>3} tok {row['cand_texts'][scored[i]][:30]!r}" for i in order]
    body = fmt.step_parts(fmt.split_steps(pick["text"])[0][int(row["step"])])[0]
    title = (f"step {int(row['step'])} of {row['response_id']}, {row['orig_tokens']} tokens: {body[:70]!r}\n"
             f"per-token KL of its {len(order)} scored candidates")
    fig = plotting.kl_heatmap_figure(per_token.numpy()[order], tok.convert_ids_to_tokens(ids["cont_ids"]), labels, kept,
                                     R.epsilon, title=title, window_means=per_token.numpy()[order].mean(1))
    stage.save_fig(fig, "03_kl_heatmap")

# %% [markdown] tsq_lesson="trace-md"
# The response before and after refinement, step by step: rewritten steps are highlighted (the original struck through in red, the rewrite kept in green).

# %% tsq_lesson="trace"
from IPython.display import HTML

if pick is not None:
    display(HTML(lessons.trace_diff_html(pick["text"], pick["refined_text"])))

# %% [markdown]
# ## Try this
#
# - Raise `epsilon` (e.g. 0.05): the accepted set can only grow (every candidate below the old ε is below the new one), at the
#   price of rewrites that move the model's view of what follows more; 06 sweeps ε, which the paper does not. Cheaper than a rerun:
#   `new, log = refinement.rethreshold(tok, pairs, step_log, dataclasses.replace(R, epsilon=0.05))` (after `import dataclasses`),
#   then `refinement.refinement_summary(log, new)`.
# - `kl_reduction="sum"` with the same ε accepts a subset of what the mean accepts: the sum over a window of L tokens is L times
#   the mean.
# - More `n_candidates`: more chances to find a short rewrite, at a linear cost (whether it finds more depends on how often the
#   model samples a shorter step at all; the summary counts those).

# %%
manifest = stage.finish(inputs, outputs=["refined_pairs.parquet", "step_log.parquet"], summary=summary)

# %% tsq_lesson="seen"
n_drawn = int(step_log["n_sampled"].sum()) if len(step_log) else 0
n_scored = lessons.count_scored(step_log)
display(lessons.seen(lessons.seen_refinement(summary, n_drawn, n_scored, R.epsilon)))

# %% [markdown] tsq_lesson="ex"
# ## Exercises
#
# Try each before opening its answer (the answers below are computed from this run where they depend on it).
# 1. *(warm-up)* A candidate's per-token KL averages 0.004 over a window of $L = 64$ tokens. Is it accepted at ε = 0.005 with `kl_reduction="mean"`? With `"sum"`?
# 2. *(core)* Why is the KL measured on the *original* continuation, teacher-forced, rather than on text the model generates after the candidate?
# 3. *(core)* In this run, what share of the steps was rewritten, and how much shorter did the chosen responses get?
# 4. *(stretch)* In the heat map, at which window positions is the KL largest? Explain why.

# %% tsq_lesson="ans"
from tsq_utils import lessons

display(lessons.answer("Mean: 0.004 < 0.005, accepted. Sum: $64 \\times 0.004 = 0.256$, far above ε: rejected. "
                       "The sum grows with $L$, which is why ε = 0.005 only works as a mean.", title="Answer 1"))
display(lessons.answer("It is one teacher-forced forward pass per context, deterministic, and it asks exactly the "
                       "question that matters: does the model, after the shorter step, still expect what it would "
                       "have written next? Sampling continuations would be slow and noisy.", title="Answer 2"))
rate = summary["acceptance_rate"] or 0
before, after = summary["mean_chosen_tokens_before"] or 0, summary["mean_chosen_tokens_after"] or 0
display(lessons.answer(f"{100 * rate:.1f}% of {summary['n_steps']} steps; chosen responses {before:.1f} -> {after:.1f}"
                       " tokens: " + lessons.refinement_effect(
                           summary, int(step_log["n_sampled"].sum()) if len(step_log) else 0,
                           lessons.count_scored(step_log)) + ".", title="Answer 3"))
if pick is not None:
    top = int(per_token.mean(0).argmax())
    where = (f"In this step the largest per-position KL sits at position {top} of {per_token.shape[1]} "
             f"(token {tok.convert_ids_to_tokens(ids['cont_ids'])[top]!r}). ")
else:
    where = ""
display(lessons.answer(where + "Expect it largest where the continuation depends on what the step said or how it said "
                       "it (the next step header, a repeated number, the wording of the next step), and small where "
                       "the teacher-forced continuation pins both distributions to the same tokens; compare with "
                       "the position named here and with the heat map.", title="Answer 4"))

# %%
# sanity checks (nbval runs these on the ci profile)
assert len(refined) == len(pairs)
assert (refined["chosen_tokens"] <= refined["chosen_tokens_original"]).all()
assert read_json(stage.dir / "summary.json")["n_pairs"] == len(refined)
if profile == "toy":  # the worked example must show the check acting both ways, with its KL on the right side of ε
    acc, rej = examples[examples["verdict"] == "accepted"], examples[examples["verdict"] == "rejected"]
    assert len(acc) == 1 and len(rej) == 1 and acc["kl"].iloc[0] < R.epsilon <= rej["kl"].iloc[0]
    assert acc["cand_tokens"].iloc[0] < acc["step_tokens"].iloc[0]
