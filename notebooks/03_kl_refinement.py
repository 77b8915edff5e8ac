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
# *Follows:* TokenSqueeze §3.2 and Appendix B, KL-constrained intra-step refinement. *The method in our words:* [docs/method.md](../docs/method.md). *Package functions used here:* [`refinement.refine_pairs`](../tsq_utils/method/refinement/refine.py), [`refinement.kl_window`](../tsq_utils/method/refinement/scoring.py), [`refinement.kl_per_token`](../tsq_utils/method/refinement/scoring.py), [`refinement.rethreshold`](../tsq_utils/method/refinement/refine.py); figures: [`plotting`](../tsq_utils/lessons/plotting.py), summaries, examples and exercises: [`lessons.refinement`](../tsq_utils/lessons/refinement.py), [`lessons.derivations`](../tsq_utils/lessons/derivations.py).

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
from tsq_utils.lessons import refinement as lesson, widgets
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
task = training_task(P)  # a rewrite that no longer grades correct (Task.grade) is reverted

# %%
from tsq_utils.lessons import orientation, quiet

quiet.quiet_libraries()  # library progress bars and notices: none of them concerns the lesson
orientation.lesson_top(stage, ["refinement.n_candidates", "refinement.window", "refinement.epsilon",
                               "refinement.kl_reduction", "refinement.max_responses"])

# %% [markdown]
# ## The idea
#
# Selection (02) picks *which* reasoning to keep; refinement compresses *how it is worded*. A preferred response is a sequence of
# steps $s_1,\dots,s_n$ (blank-line separated, thinking part only: the answer is never rewritten). For step $i$ the same model samples
# $K$ candidates $s'$ conditioned on the original prefix $x, s_1,\dots,s_{i-1}$, each ending at the next step boundary (no rewrite prompt,
# no outside model). A candidate replaces the step only if it leaves the model's expectations about the rest of the solution intact (a
# [KL divergence](../docs/glossary.md#kl-divergence), in [nats](../docs/glossary.md#nats), below [ε](../docs/glossary.md#epsilon)):
#
# $$D_{\mathrm{KL}}\big(P(\cdot \mid x, s_{<i}, s_i)\,\big\|\,P(\cdot \mid x, s_{<i}, s')\big) < \varepsilon,$$
#
# and among those the shortest wins; if none passes, the step stays. The KL over all futures is estimated on the original
# continuation: [teacher-force](../docs/glossary.md#teacher-forcing) the next $L$ original tokens $c_1,\dots,c_L$ after the step under both contexts, and compare the two
# next-token distributions (full vocabulary, original first) at each of those positions,
#
# $$\widehat{D} = \frac{1}{L}\sum_{t=1}^{L} D_{\mathrm{KL}}\big(P(\cdot \mid x, s_{<i}, s_i, c_{<t})\,\big\|\,P(\cdot \mid x, s_{<i}, s', c_{<t})\big).$$
#
# The paper leaves "sum or mean" open; the paper's ε = 0.005 is only workable as the per-token mean (our default;
# `kl_reduction="sum"` is the other). Steps are refined independently against the original prefix, then reassembled; a refined response whose final answer no
# longer grades correct is reverted, and refinement never makes a response longer. All $K$ candidates of a step are scored in one
# padded forward pass that reuses the shared prefix's [KV cache](../docs/glossary.md#kv-cache).

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
                                                grade_fn_factory=refinement.grader_factory(samples, task),
                                                options=refinement.RefineOptions(
                                                    shards=P.shards, workers=P.workers,
                                                    shard_dir=stage.run_dir / "refinement_shards"))
    save_table(refined, stage.dir / "refined_pairs.parquet")
    save_table(step_log, stage.dir / "step_log.parquet")
refined, step_log = load_table(stage.dir / "refined_pairs.parquet"), load_table(stage.dir / "step_log.parquet")
summary = refinement.refinement_summary(step_log, refined)
n_chosen = refined.drop_duplicates(["prompt", "chosen_original"]).shape[0]
print(lesson.refined_scope(summary, n_chosen) + ".")

# %% [markdown]
# ## Correct derivations and lucky traces
#
# The grader reads only the final answer. In the toy world every step writes its arithmetic (`b-1: 14-1=13`), so we can
# also check the steps: a *correct derivation* has every equation right; a [*lucky trace*](../docs/glossary.md#lucky-trace) has the right
# answer with a wrong step that nothing corrects. The paragraph below counts them in this run; the worked examples after
# it are chosen among the correct derivations only.

# %%
from IPython.display import Markdown
from tsq_utils.lessons import derivations

display(Markdown(derivations.lucky_note(derivations.lucky_counts(samples, refined))))

# %% [markdown]
# ## A worked example: one accepted and one rejected candidate
#
# Chosen from the step log by rule: among correct derivations (every equation of the response and of the rewrite right),
# the kept rewrite that saves the most tokens, and the nearest miss above ε (from the same step when that step had one),
# each beside its original step with its window KL (the analogue of the paper's Figures 2 and 5–7). When nothing was
# accepted, the sentence says so.

# %%
import pandas as pd

pd.set_option("display.max_colwidth", 90)
examples = lesson.kl_examples(step_log, refined, R.epsilon)
print(lesson.kl_example_note(examples, R.epsilon, lesson.count_scored(step_log)))
display(examples.style.hide(axis="index").format({"kl": "{:.3g}"}))

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

pick = lesson.pick_kl_step(step_log, refined)
if pick is not None:
    row = pick["row"]
    ids = lesson.step_kl_inputs(tok, pick["prompt"], pick["text"], int(row["step"]), R.window)
    scored = [j for j, v in enumerate(row["kl"]) if v is not None and np.isfinite(v)]
    cand_ids = [tok(row["cand_texts"][j], add_special_tokens=False)["input_ids"] for j in scored]
    model.eval()
    by_hand = torch.stack([kl_by_hand(model, ids["prefix_ids"], ids["step_ids"], c, ids["cont_ids"]) for c in cand_ids])
    per_token = refinement.kl_per_token(model, ids["prefix_ids"], ids["step_ids"], cand_ids, ids["cont_ids"])
    assert torch.allclose(by_hand, per_token, rtol=1e-4, atol=1e-6)
    window_kl = refinement.kl_window(model, ids["prefix_ids"], ids["step_ids"], cand_ids, ids["cont_ids"],
                                     reduction="mean")
    assert torch.allclose(by_hand.mean(1), window_kl, rtol=1e-4, atol=1e-7)
    logged = [float(row["kl"][j]) for j in scored]
    assert np.allclose(by_hand.mean(1).numpy(), logged, rtol=1e-3, atol=1e-6)  # the step log holds the same KLs
    if not derivations.derivation_ok(pick["text"]):
        print("(no correct derivation of this run had a scored step: this response writes "
              f"{', '.join(derivations.wrong_equations(pick['text']))})")
    print(f"step {int(row['step'])} of {row['response_id']}: {len(scored)} scored candidates, window of "
          f"{len(ids['cont_ids'])} tokens; mean KL by hand {', '.join(f'{v:.5f}' for v in by_hand.mean(1).tolist())}, "
          f"in the step log {', '.join(f'{v:.5f}' for v in logged)}")
else:
    print("no step had a candidate shorter than itself: nothing was scored")

# %% [markdown] tsq_lesson="code-md"
# ### Exercise 5 (code): the acceptance rule
#
# Write `shortest_under(lengths, kls, step_len, epsilon)`: the index of the shortest candidate that is shorter than the
# step and has KL below ε (ties: the lower KL, then the first), or `None`. A candidate that was not scored has KL NaN.
# The cell holds a solution (hidden: click to show); replace it with yours. The check below runs it on every step of
# this run's step log and compares with what the package kept.

# %% tsq_lesson="code" jupyter={"source_hidden": true}
def shortest_under(lengths, kls, step_len, epsilon):
    ok = [j for j, (n, kl) in enumerate(zip(lengths, kls)) if n < step_len and kl < epsilon]  # NaN < ε is False
    return min(ok, key=lambda j: (lengths[j], kls[j], j)) if ok else None

# %% tsq_lesson="code-check"
for r in step_log.itertuples():
    kls = [float("nan") if v is None else float(v) for v in r.kl]
    j = shortest_under(list(r.cand_tokens), kls, r.orig_tokens, R.epsilon)
    assert (j is not None) == bool(r.accepted), f"step {r.step} of {r.response_id}: the package kept {r.accepted}"
    assert j is None or r.cand_tokens[j] == r.new_tokens
print(f"shortest_under agrees with the package on all {len(step_log)} steps of this run")

# %% [markdown] tsq_lesson="loop-md"
# ### The loop in view: refine one step
#
# Draw, score, accept, for the step above. *Draw*: $K$ continuations of the prefix, each cut at the next step boundary
# (the package draws them in batches with its own seeds; here we take the ones it drew, from the step log, and also draw
# a fresh set to look at). *Score*: the mean window KL of every candidate shorter than the step. *Accept*: the shortest
# under ε (ties: the lower KL), written by you in exercise 5. The assert checks the decision against the package's.

# %% tsq_lesson="loop"
from tsq_utils.model.generation import Decoding, sample

def refine_one_step(model, tok, ids, draw, epsilon):
    """One step of refinement: draw candidates, score the shorter ones by window KL, keep the shortest under ε."""
    cands = draw()                                                            # draw
    cand_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in cands]
    lengths = [len(c) for c in cand_ids]
    kls = [kl_by_hand(model, ids["prefix_ids"], ids["step_ids"], c, ids["cont_ids"]).mean().item()
           if len(c) < len(ids["step_ids"]) else float("nan") for c in cand_ids]  # score
    best = shortest_under(lengths, kls, len(ids["step_ids"]), epsilon)        # accept
    return (cands[best], lengths[best], kls[best]) if best is not None else None

if pick is not None:
    mine = refine_one_step(model, tok, ids, lambda: list(row["cand_texts"]), R.epsilon)
    assert (mine is not None) == bool(row["accepted"])
    if mine is not None:
        assert mine[1] == row["new_tokens"] and abs(mine[2] - row["kl_chosen"]) <= 1e-3 * row["kl_chosen"] + 1e-6
    print("kept:", repr(mine[0]) if mine else "nothing (the step stays)")
    prefix = tok.decode(ids["prefix_ids"])
    fresh = sample(model, tok, [prefix], Decoding(n=R.n_candidates, temperature=R.temperature, seed=stage.seed,
                                                  max_new_tokens=len(ids["step_ids"]) + 8), backend="transformers")
    fresh_steps = [t.split("\n\n")[0].strip() for t in fresh.texts[0]]
    print("a fresh draw for the same step:", fresh_steps)

# %% [markdown]
# ## What happened
#
# Left: the KL of every scored candidate, with ε marked; candidates left of the line were acceptable. Middle and right: the
# paper's Table 3 columns. In the paper refinement shortens steps but barely changes how many there are (7B on MATH500: 55.0 → 57.5
# steps, 35.1 → 30.6 tokens per step); the summary at the end of this notebook says how much it did here.

# %%
fig = plotting.refinement_figure(step_log, summary, R.epsilon)
_ = stage.save_fig(fig, "03_refinement")

# %% [markdown] tsq_lesson="heat-md"
# ### What “the model's view of the future barely moves” looks like
#
# The same step as above. Along $x$ the original continuation after the step, token by token; along $y$ the step's scored candidates (shortest first; the one kept, if any, in green). Colour is the KL between the two next-token distributions at that position, log scale, with ε marked on the colour bar; the right panel is each candidate's mean over the window, the number compared with ε.

# %% tsq_lesson="heat"
if pick is not None:
    order = sorted(range(len(scored)), key=lambda i: (row["cand_tokens"][scored[i]], i))
    kept = [bool(row["accepted"]) and row["cand_tokens"][scored[i]] == row["new_tokens"]
            and row["kl"][scored[i]] == row["kl_chosen"] for i in order]
    labels = [("KEPT " if k else "") + f"{row['cand_tokens'][scored[i]]:>3} tok: {row['cand_texts'][scored[i]][:48]}"
              for i, k in zip(order, kept)]
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
    display(HTML(lesson.trace_diff_html(pick["text"], pick["refined_text"])))

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
n_scored = lesson.count_scored(step_log)
display(widgets.seen(lesson.seen_refinement(summary, n_drawn, n_scored, R.epsilon, n_chosen)))

# %% [markdown] tsq_lesson="ex"
# ## Exercises
#
# Try each before opening its answer (the answers below are computed from this run where they depend on it).
# 1. *(warm-up)* Say a candidate's per-token KL averages 0.004 over a window of $L = 64$ tokens: is it accepted at ε = 0.005 with `kl_reduction="mean"`, and with `"sum"`?
# 2. *(core)* Why is the KL measured on the *original* continuation, teacher-forced, rather than on text the model generates after the candidate?
# 3. *(core)* In this run, what share of the steps was rewritten, and how much shorter did the chosen responses get?
# 4. *(stretch)* In the heat map, at which window positions is the KL largest? Explain why.
# 5. *(code)* Write the acceptance rule `shortest_under` (the cell under "Exercise 5" above, checked on this run's step log).

# %% tsq_lesson="ans"
from tsq_utils.lessons import refinement as lesson, widgets

display(widgets.answer("Mean: 0.004 < 0.005, accepted. Sum: $64 \\times 0.004 = 0.256$, far above ε: rejected. "
                       "The sum grows with $L$, which is why ε = 0.005 only works as a mean.", title="Answer 1"))
display(widgets.answer("It is one teacher-forced forward pass per context, deterministic, and it asks exactly the "
                       "question that matters: does the model, after the shorter step, still expect what it would "
                       "have written next? Sampling continuations would be slow and noisy.", title="Answer 2"))
rate = summary["acceptance_rate"] or 0
display(widgets.answer(f"{100 * rate:.1f}% of {summary['n_steps']} steps. {lesson.refined_scope(summary, n_chosen)}: "
                       + lesson.refinement_effect(
                           summary, int(step_log["n_sampled"].sum()) if len(step_log) else 0,
                           lesson.count_scored(step_log)) + ".", title="Answer 3"))
if pick is not None:
    top = int(per_token.mean(0).argmax())
    where = (f"In this step the largest per-position KL sits at position {top} of {per_token.shape[1]} "
             f"(token {tok.convert_ids_to_tokens(ids['cont_ids'])[top]!r}). ")
else:
    where = ""
display(widgets.answer(where + "Expect it largest where the continuation depends on what the step said or how it said "
                       "it (the next step header, a repeated number, the wording of the next step), and small where "
                       "the teacher-forced continuation pins both distributions to the same tokens; compare with "
                       "the position named here and with the heat map.", title="Answer 4"))
display(widgets.answer("<code>ok = [j for j, (n, kl) in enumerate(zip(lengths, kls)) if n &lt; step_len and "
                       "kl &lt; epsilon]</code>, then <code>min(ok, key=lambda j: (lengths[j], kls[j], j))</code> if "
                       "any: the package's <code>refinement.accept</code> does the same on a step record.",
                       title="Answer 5"))

# %%
# sanity checks (nbval runs these on the ci profile)
assert len(refined) == len(pairs)
assert (refined["chosen_tokens"] <= refined["chosen_tokens_original"]).all()
assert read_json(stage.dir / "summary.json")["n_pairs"] == len(refined)
if profile == "toy":  # the worked example must show the check acting both ways, with its KL on the right side of ε
    acc, rej = examples[examples["verdict"] == "accepted"], examples[examples["verdict"] == "rejected"]
    assert len(acc) == 1 and len(rej) == 1 and acc["kl"].iloc[0] < R.epsilon <= rej["kl"].iloc[0]
    assert acc["cand_tokens"].iloc[0] < acc["step_tokens"].iloc[0]
