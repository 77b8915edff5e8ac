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
# # 07 · TLDR: dynamic re-weighting of short and long reasoning data
#
# **Purpose.** Compress the same base model with a second method, TLDR ("Too Long, Do Re-weighting", arXiv 2506.02678): plain SFT
# on a mixture of short-CoT and long-CoT data whose mixing weights follow the model's dev-set length and accuracy during training.
# Then compare it with TokenSqueeze, a static 1:1 mixture, the base model and the oracle on the problems of notebook 05.
#
# Pipeline: [00 base model](00_base_model.ipynb) → [01 sampling](01_sampling.ipynb) → [02 selection](02_selection.ipynb) → [03 KL refinement](03_kl_refinement.ipynb) → [04 DPO-L training](04_dpo_l_training.ipynb) → [05 evaluation](05_evaluation.ipynb) → [06 ablations](06_ablations.ipynb) → **07 TLDR**.
#
# ← previous: [06 ablations](06_ablations.ipynb) · (the last lesson) →
#
# *Follows:* TLDR (arXiv 2506.02678), dynamic re-weighting of short and long CoT data. *The method in our words:* [docs/method.md](../docs/method.md). *Package functions used here:* [`tldr.update_weights`](../tsq_utils/method/tldr.py), [`tldr.benefits`](../tsq_utils/method/tldr.py), [`tldr.train_mixture`](../tsq_utils/method/tldr.py); figures: [`plotting`](../tsq_utils/lessons/plotting.py), summaries and exercises: [`lessons`](../tsq_utils/lessons/__init__.py).
#
# This notebook reads 00's base model, 01's samples and 05's evaluation results.
#
# **What it runs.** Three SFT trainings from the base model (the short reference model, the [TLDR](../docs/glossary.md#tldr) run and the static mix, `tldr.max_steps` steps each, with a dev evaluation every `tldr.update_every` steps), then notebook 05's evaluation of the two mixtures. The settings and the time this stage last took are printed under the set-up cell; each training cell shows one progress bar.

# %% tags=["parameters"]
import os

profile = os.environ.get("TSQ_PROFILE", "toy")
update_every = None  # None: the profile's tldr.update_every, E (the authors: 32 optimizer steps between re-weightings)
eta = None  # None: tldr.eta, the step size of the weight update (4)
smoothing = None  # None: tldr.smoothing, c (1e-4): keeps both weights away from 0
acc_floor = None  # None: tldr.acc_floor (0.7): a checkpoint must keep dev accuracy > acc_floor * A_L
lr = None  # None: tldr.lr (the authors: 1e-5, constant)
max_steps = None  # None: tldr.max_steps
easy_max_k = None  # None: tldr.easy_max_k (0 means the midpoint of the k range); problems up to this k are easy
dev_temperature = None  # None: tldr.dev_temperature (0 means greedy dev evaluations)
force = False

# %%
import math

import pandas as pd
from tsq_utils.model import base_model
from tsq_utils.core import config
from tsq_utils.method import evaluation, sampling, tldr
from IPython.display import Markdown, display
from tsq_utils.lessons import claims, orientation, plotting, quiet
from tsq_utils.core.artifacts import atomic_write_json, atomic_write_text, load_table, read_json, save_table
from tsq_utils.core.stage import setup_stage
from tsq_utils.task.registry import training_task

stage = setup_stage("tldr", profile, {
    "tldr.update_every": update_every, "tldr.eta": eta, "tldr.smoothing": smoothing, "tldr.acc_floor": acc_floor,
    "tldr.lr": lr, "tldr.max_steps": max_steps, "tldr.easy_max_k": easy_max_k, "tldr.dev_temperature": dev_temperature},
    force=force)
P, C, E = stage.profile, stage.profile.tldr, stage.profile.evaluation
task = training_task(P)  # the toy world: its oracle makes the System-1 pool, its dev split the reference points
device = config.resolve_device(P)
quiet.quiet_libraries()  # library progress bars and warnings: nothing that changes a result
display(orientation.lesson_top(stage, ["tldr.max_steps", "tldr.batch_size", "tldr.update_every", "tldr.eta",
                                       "tldr.smoothing", "tldr.acc_floor", "tldr.lr", "tldr.n_dev_problems",
                                       "tldr.dev_temperature"]))

# %% [markdown]
# ## The idea
#
# A long-CoT model overthinks easy problems and needs its long reasoning on hard ones. TLDR fine-tunes it on two pools of data:
# **System-1** (easy questions answered with a short chain of thought) teaches brevity, **System-2** (hard questions with the long
# model's *shortest correct* answer) keeps the careful reasoning. A fixed 1:1 mix is a guess: at the start the model is far too long
# and needs mostly short data; once it has learned brevity it starts to lose accuracy on hard problems and needs long data. The
# paper's static 1:1 mix compresses too, but loses more accuracy (average 64.0 vs 69.3 on five math sets).
#
# So the mixture weights $w = (w_{\text{short}}, w_{\text{long}})$, starting at $(\tfrac12, \tfrac12)$, are re-weighted every $E$ optimizer steps
# from the current model's mean dev tokens $T_{\text{cur}}$ and dev accuracy $A_{\text{cur}}$, against two reference points measured once:
# a short model $(T_S, A_S)$ and the original long model $(T_L, A_L)$:
#
# $$b_{\text{short}} = \max\!\Big(\frac{T_{\text{cur}} - T_S}{|T_L - T_S|},\,0\Big)\quad\text{(still too long: more short data)},\qquad
# b_{\text{long}} = \max\!\Big(\frac{A_L - A_{\text{cur}}}{|A_L - A_S|},\,0\Big)\quad\text{(accuracy lost: more long data)},$$
#
# $$w \leftarrow \operatorname{softmax}\big(\log w + \gamma\, b\big),\qquad w \leftarrow (1-c)\,w + \tfrac{c}{2},$$
#
# with step size $\gamma$ (the paper calls it $\eta$; here [η](../docs/glossary.md#eta) is kept for the DPO-L weight of notebook 04; profile key
# `tldr.eta`) and smoothing $c$ (`tldr.smoothing`). Training keeps the checkpoint with the fewest dev tokens among those whose dev
# accuracy stays above `tldr.acc_floor` $\cdot A_L$. The static mix is the same recipe with $E = \infty$: the weights never move.
# (Our choices, all parameters: the dev set is decoded at `tldr.dev_temperature`; a gap between the reference points below the dev
# set's resolution, 1 token or one dev problem, is floored there so the benefits stay finite; `tsq_utils.method.tldr` holds the
# rule, the pools and the training loop.) This run's values are printed with the reference points below.

# %% [markdown]
# ## The two pools, from this project's own model and data
#
# The authors answer GSM8K with a short-CoT model (System-1) and take s1K's hard prompts with the long model's shortest correct answer
# (System-2). The toy world has both ingredients without an outside model; the difficulty split is by the number of terms $k$:
#
# - **System-1** = the easy training problems ($k \le$ `easy_max_k`) with the toy world's *oracle* trace: every step in its terse
#   phrasing, no checks, no review, the shortest correct trace there is. It plays the short-CoT model's answer: correct, terse,
#   no checks. Caveat: it is cleaner than a real short model (always right, always minimal), and it is outside help that TokenSqueeze
#   never gets; its self-generated data only ever contains what the base model itself samples.
# - **System-2** = the hard training problems ($k >$ `easy_max_k`) with the base model's shortest correct response among the $N$ samples
#   of notebook 01 (the very samples TokenSqueeze selects from). A hard problem with no correct sample contributes nothing.

# %%
base, tok = base_model.load_base(stage.run_dir, P)
samples_path = stage.require("sampling", "samples.parquet")
results05_path = stage.require("evaluation", "results.parquet")
inputs = {"samples": samples_path, "evaluation_results": results05_path, **base_model.base_inputs(stage.run_dir, P)}
done = stage.is_done(inputs)

k_easy = tldr.easy_max_k(P)
short_answers = tldr.oracle_answers(task.problems(P, tok, "train"), tok, task)
pools = tldr.build_pools(short_answers, load_table(samples_path), k_easy)
print(f"easy: k <= {k_easy}; System-1 {(pools['pool'] == 'short').sum()} problems, "
      f"System-2 {(pools['pool'] == 'long').sum()} problems")
pools.groupby(["pool", "k"], sort=False).agg(problems=("problem_id", "size"), mean_tokens=("n_tokens", "mean")).round(1)

# %%
for name in ("short", "long"):
    ex = pools[pools["pool"] == name].iloc[0]
    print(f"--- {name} pool, {ex['problem_id']} (k = {ex['k']}, {ex['n_tokens']} tokens) ---\n{ex['completion']}\n")

# %% [markdown]
# ## The reference points
#
# Both are measured once, on a **dev set** of `tldr.n_dev_problems` held-out problems (their own split, spread over $k$, never used for
# training or for the final evaluation), one answer each at `tldr.dev_temperature` (printed below with the numbers):
#
# - the **long model** $(T_L, A_L)$ is the base model itself;
# - the **short model** $(T_S, A_S)$ is the base model fine-tuned on System-1 data alone, i.e. the mixture with its weights fixed at
#   $(1, 0)$, with the same learning rate, batch size and number of steps as the TLDR run. It is the toy analogue of the authors'
#   short-CoT model: a model that answers tersely everywhere, hard problems included. Caveat: it is made with this run's budget, so
#   with too few steps or too small a learning rate it stays close to the base and the gaps shrink (the floors then take over);
#   the authors' short model is an independent model.

# %%
dev = tldr.dev_problems(P, tok)
def evaluate(m):
    return tldr.dev_eval(m, tok, dev, task, tldr.dev_decoding(P, stage.seed))


def fresh_base():
    return base_model.load_base(stage.run_dir, P)[0]  # every run starts from the base model


train_kw = dict(output_dir=stage.dir / ".trainer", seed=stage.seed, device=device)  # P.training: length, bf16
if not done:
    long_ref = evaluate(base)
    short_job = tldr.MixtureJob(weights=(1.0, 0.0), eval_every=C.max_steps, name="short", **train_kw)
    short_run = tldr.train_mixture(fresh_base(), tok, pools, C, evaluate, short_job, P.training)
    refs = tldr.reference_points(long_ref, short_run.records.iloc[-1], n_dev=len(dev), floor_gaps=C.floor_gaps)
    refs["short_model_wall_time_s"] = short_run.wall_time_s
    atomic_write_json(stage.dir / "references.json", refs)
refs = read_json(stage.dir / "references.json")
decoding = "the most likely token at every step" if C.dev_temperature == 0 else "sampled: dev numbers carry noise"
print(f"dev set: {len(dev)} problems, one answer each at T = {C.dev_temperature:g} ({decoding}); "
      f"step size γ = {C.eta:g}, smoothing c = {C.smoothing:g}, acc floor {C.acc_floor:g} x A_L")
print(f"long model  (base)            T_L = {refs['t_l']:.1f} tokens, A_L = {refs['a_l']:.3f}")
print(f"short model (SFT on System-1) T_S = {refs['t_s']:.1f} tokens, A_S = {refs['a_s']:.3f}")
print(f"gap floors {refs['min_gap']}: token gap floored: {refs['token_gap_floored']}, "
      f"accuracy gap floored: {refs['acc_gap_floored']}")

# %% [markdown]
# ## A worked example: one weight update by hand
#
# Two situations the rule must handle, with the dev numbers above: the model after $E$ steps is still the long model, or it has
# become the short model. What $b$ is in each depends on the gaps between the reference points ($T_L - T_S$, $A_L - A_S$) on this
# dev set: the two sentences printed first below are chosen by this run's numbers, then $b$ and $w$ are computed by hand.

# %%
dt = max(abs(refs["t_l"] - refs["t_s"]), refs["min_gap"][0]) if refs["min_gap"] else abs(refs["t_l"] - refs["t_s"])
da = max(abs(refs["a_l"] - refs["a_s"]), refs["min_gap"][1]) if refs["min_gap"] else abs(refs["a_l"] - refs["a_s"])
display(Markdown(claims.long_model_situation(refs) + " " + claims.short_model_situation(refs)))
situations = {"still the long model": (refs["t_l"], refs["a_l"]), "already the short model": (refs["t_s"], refs["a_s"])}
for label, (t_cur, a_cur) in situations.items():
    b_short, b_long = max((t_cur - refs["t_s"]) / dt, 0), max((refs["a_l"] - a_cur) / da, 0)
    z_short, z_long = 0.5 * math.exp(C.eta * b_short), 0.5 * math.exp(C.eta * b_long)  # exp(log w + eta * b)
    w_short = (1 - C.smoothing) * z_short / (z_short + z_long) + C.smoothing / 2
    by_rule = tldr.update_weights((0.5, 0.5), (b_short, b_long), C.eta, C.smoothing)
    print(f"{label:24s}: T_cur = {t_cur:6.1f}, A_cur = {a_cur:.3f} -> b = ({b_short:.3f}, {b_long:.3f}) "
          f"-> w_short = {w_short:.4f} (tldr.update_weights: {by_rule[0]:.4f})")

# %% [markdown]
# ## At scale: the TLDR run and the static mix
#
# Two runs from the base model, with the same pools, steps, learning rate and sampler seed: **tldr** re-weights every $E$ steps,
# **static_mix** keeps $(\tfrac12, \tfrac12)$ ($E = \infty$). Both are evaluated on the dev set every $E$ steps and after the last one, and
# both keep their checkpoint by the same rule. Each batch's pools are drawn when the trainer asks for it, right after the previous
# step's re-weighting, so new weights apply from the next step on. The trainer is TRL's `SFTTrainer` (loss on the completion only,
# constant learning rate) with a mixture sampler and a re-weighting callback (`tsq_utils.method.tldr`).

# %%
RUNS = {"tldr": False, "static_mix": True}  # name -> static
MODEL_DIRS = {"tldr": "model", "static_mix": "static_mix_model"}
if not done:
    records, batches, logs, chosen, wall = [], [], [], {}, {}
    for name, static in RUNS.items():
        print(f"== {name} ==")
        sched = tldr.MixtureSchedule.from_config(C, refs["t_s"], refs["a_s"], refs["t_l"], refs["a_l"], seed=stage.seed,
                                                 static=static, min_gap=refs["min_gap"])
        job = tldr.MixtureJob(weights=sched, eval_every=C.update_every, name=name, **train_kw)
        run = tldr.train_mixture(fresh_base(), tok, pools, C, evaluate, job, P.training)
        if run.chosen is None:
            print(f"!! {name}: no checkpoint kept dev accuracy above {C.acc_floor} x A_L; "
                  "its final weights are saved instead")
        tldr.save_model(run.model, tok, stage.dir / MODEL_DIRS[name])
        records.append(run.records.assign(run=name))
        batches.append(run.batches.assign(run=name))
        logs.append(run.log.assign(run=name))
        chosen[name], wall[name] = (run.chosen or {}).get("step"), run.wall_time_s
    save_table(pd.concat(records, ignore_index=True), stage.dir / "trajectory.parquet")
    save_table(pd.concat(batches, ignore_index=True), stage.dir / "batches.parquet")
    save_table(pd.concat(logs, ignore_index=True), stage.dir / "training_log.parquet")
    atomic_write_json(stage.dir / "chosen.json", {"chosen_step": chosen, "wall_time_s": wall})
traj, batches = load_table(stage.dir / "trajectory.parquet"), load_table(stage.dir / "batches.parquet")
runs_info = read_json(stage.dir / "chosen.json")
traj.round(4)

# %% [markdown]
# ## What happened
#
# Left: the weight of the short pool (steps) and the share of System-1 rows actually drawn per batch (faint, a rolling mean); the
# static mix stays at one half. Middle and right: dev length and accuracy from the base model (step 0) on, with the reference points,
# the accuracy floor, and the kept checkpoint (star). Whether this run's weights moved (and how far they swung on the way), and why,
# is printed above the figure from its numbers.

# %%
fig = plotting.tldr_trajectory_figure(traj, refs, batches, runs_info["chosen_step"], C.acc_floor)
png = stage.save_fig(fig, "07_tldr_trajectory")
print(claims.tldr_weights(traj, refs))  # printed now; the figure is drawn when the cell ends, below these lines
for name, step in runs_info["chosen_step"].items():
    print(f"{name}: chosen checkpoint "
          f"{'step ' + str(step) if step is not None else 'none above the floor (final weights kept)'}")

# %%
# the first re-weighting of the tldr run, recomputed by hand from its dev numbers
updates = traj[(traj["run"] == "tldr") & traj["updated"]]
first = updates.iloc[0] if len(updates) else None
if first is not None:
    b_short, b_long = max((first["dev_tokens"] - refs["t_s"]) / dt, 0), max((refs["a_l"] - first["dev_acc"]) / da, 0)
    z_short, z_long = 0.5 * math.exp(C.eta * b_short), 0.5 * math.exp(C.eta * b_long)
    w_hand = (1 - C.smoothing) * z_short / (z_short + z_long) + C.smoothing / 2
    print(f"step {int(first['step'])}: T_cur = {first['dev_tokens']:.1f}, A_cur = {first['dev_acc']:.3f} "
          f"-> b = ({b_short:.3f}, {b_long:.3f}) -> w_short = {w_hand:.4f} by hand, {first['w_short']:.4f} in the run")


# %% [markdown] tsq_lesson="core-md"
# ### The loop in code
#
# TLDR's whole loop over the run's dev evaluations, by hand: on every update step ($E$ apart) the benefits $b$ from the dev numbers and the reference points (gaps floored), $w \leftarrow \operatorname{softmax}(\log w + \gamma b)$, then $w \leftarrow (1-c)w + c/2$; at every evaluation the checkpoint rule (fewest dev tokens among those above the accuracy floor). Checked against the run's weights after each update and the checkpoint it kept.

# %% tsq_lesson="core"
def tldr_loop(dev_evals, refs, gamma, c, update_every, acc_floor):
    """TLDR's loop over its dev evaluations: re-weight on update steps, keep the shortest checkpoint above the floor."""
    floor_t, floor_a = refs["min_gap"] or (0.0, 0.0)  # gaps below the dev set's resolution are floored
    dt, da = max(abs(refs["t_l"] - refs["t_s"]), floor_t), max(abs(refs["a_l"] - refs["a_s"]), floor_a)
    w, kept, weights = [0.5, 0.5], None, []
    for step, t_cur, a_cur in dev_evals:
        if step % update_every == 0:
            b = [max((t_cur - refs["t_s"]) / dt, 0.0), max((refs["a_l"] - a_cur) / da, 0.0)]  # too long, acc lost
            z = [math.log(wi) + gamma * bi for wi, bi in zip(w, b)]
            e = [math.exp(zi - max(z)) for zi in z]  # softmax, shifted for stability
            w = [(1 - c) * ei / sum(e) + c / 2 for ei in e]
        above_floor = round(a_cur - acc_floor * refs["a_l"], 9) > 0  # rounded: float noise must not decide it
        if above_floor and (kept is None or (t_cur, -a_cur) < kept[1:]):  # fewer tokens, then higher accuracy
            kept = (step, t_cur, -a_cur)
        weights.append(w[0])
    return weights, (kept[0] if kept else None)


run_traj = traj[traj["run"] == "tldr"].sort_values("step")
w_by_hand, kept_by_hand = tldr_loop(run_traj[["step", "dev_tokens", "dev_acc"]].itertuples(index=False), refs,
                                    C.eta, C.smoothing, C.update_every, C.acc_floor)
assert all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(w_by_hand, run_traj["w_short"]))
assert kept_by_hand == runs_info["chosen_step"]["tldr"], (kept_by_hand, runs_info["chosen_step"])
print(f"replayed {len(w_by_hand)} dev evaluations ({int(run_traj['updated'].sum())} updates): w_short by hand "
      + ", ".join(f"{x:.4f}" for x in w_by_hand) + f"; kept checkpoint: step {kept_by_hand}, as in the run")

# %% [markdown] tsq_lesson="live-md"
# ### Live: γ and c
#
# One update from $w = (\tfrac12, \tfrac12)$, for every (dev tokens, dev accuracy) between the two reference points: blue means the short pool gains, red the long pool. Move γ (the step size) and $c$ (the smoothing); headless the map shows the run's own values.

# %% tsq_lesson="live"
from tsq_utils.lessons import widgets

controls = widgets.live(lambda eta, c: plotting.tldr_update_figure(refs, eta, c),
                        eta=widgets.slider(float(C.eta), 0.0, 16.0, 0.5, "γ"),
                        c=widgets.slider(float(C.smoothing), 0.0, 0.5, 0.01, "c"))

# %% [markdown]
# ## The comparison: five models on the problems of notebook 05
#
# TLDR's and the static mix's kept checkpoints answer the evaluation problems of notebook 05 with its settings (samples per problem,
# temperature, budget and sampling seed); the base, TokenSqueeze and oracle rows are 05's own results. **[A.C.R.](../docs/glossary.md#acr)** is TLDR's average
# compression ratio, the mean over benchmarks of $\max(0,\,1 - L/L_{\text{orig}})$ with $L$ the mean tokens of all responses ([Len-A](../docs/glossary.md#len-a)) and
# the base model as $L_{\text{orig}}$.

# %%
problems = evaluation.eval_problems(P, tok)
kind = base_model.read_pointer(stage.run_dir, P.name)["kind"]
if not done:  # TLDR's kept checkpoint here, the static mix's in the next cell: one progress bar each
    models = base_model.Samplers(P, {name: (str(stage.dir / d), kind) for name, d in MODEL_DIRS.items()})
    spec = evaluation.eval_decoding(P, config.stage_seed(P.seed, "evaluation"))  # 05's sampling seed
    parts = [evaluation.evaluate_model("tldr", models["tldr"], tok, problems, spec, sampling.SampleRun.of(P))]

# %%
if not done:
    parts.append(evaluation.evaluate_model("static_mix", models["static_mix"], tok, problems, spec,
                                           sampling.SampleRun.of(P)))
    models.close()
    save_table(pd.concat(parts, ignore_index=True), stage.dir / "results.parquet")
ORDER = ["base", "tokensqueeze", "tldr", "static_mix", "oracle"]
results = pd.concat([load_table(results05_path), load_table(stage.dir / "results.parquet")], ignore_index=True)
rank = results["model"].map({m: i for i, m in enumerate(ORDER)})
results = results.iloc[rank.argsort(kind="stable")].reset_index(drop=True)
table = evaluation.metrics_table(results, E.budget).reindex(ORDER, level="model")
comparison = tldr.compression_table(table).reindex(ORDER)
display(table.style.format({"acc": "{:.3f}", "acc_se": "{:.3f}", "len_t": "{:.1f}", "len_a": "{:.1f}",
                            "auc": "{:.3f}"}))
comparison.style.format({"acc": "{:.3f}", "len_t": "{:.1f}", "len_a": "{:.1f}", "acr": "{:.1%}"})

# %%
bench = next(iter(problems))
fig = plotting.budget_curve_figure(results, E.budget, bench)
png = stage.save_fig(fig, "07_budget_curve")

# %%
if "k" in results and results["k"].nunique() > 1:
    by_k = evaluation.by_difficulty(results)
    stage.save_fig(plotting.by_difficulty_figure(by_k), "07_by_difficulty")
    display(by_k["len_a"].unstack("model")[[m for m in ORDER if m in by_k.index.get_level_values("model")]].round(1))

# %% [markdown]
# ## Try this
#
# - `update_every=8`: the weights react faster (and the dev set is evaluated four times as often, the main cost of the run).
# - `eta=0` (the step size γ): the update is the identity up to smoothing, so TLDR becomes the static mix; a large `eta` swings the
#   weights to the pool bounds at each update.
# - `acc_floor=0.9`: a stricter checkpoint rule keeps an earlier, longer and more accurate checkpoint.
# - `easy_max_k`: move the easy/hard split; with everything "easy", System-2 is empty and the method has nothing to keep accuracy with.
# - `dev_temperature` set to the evaluation temperature: dev numbers in the evaluation's conditions, but noisier re-weighting.

# %%
metrics = evaluation.metrics_json(table)
atomic_write_json(stage.dir / "metrics.json", metrics)
atomic_write_text(stage.dir / "metrics.md", table.round(4).to_markdown() + "\n\n" + comparison.round(4).to_markdown())
tl = traj[traj["run"] == "tldr"]
def no_nan(d):
    """d with NaN as None, nested dicts too (JSON has no NaN)."""
    return {k: no_nan(v) if isinstance(v, dict) else (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in d.items()}



summary = no_nan({
    "references": refs, "easy_max_k": k_easy, "dev_problems": len(dev),
    "pools": pools.groupby("pool").agg(problems=("problem_id", "size"),
                                       mean_tokens=("n_tokens", "mean")).to_dict(orient="index"),
    "chosen_step": runs_info["chosen_step"], "dev_evaluations_per_run": int(len(tl)),
    "updates": int(tl["updated"].sum()),
    "final_w_short": float(tl["w_short"].iloc[-1]),
    "wall_time_s": {**runs_info["wall_time_s"], "short_model": refs["short_model_wall_time_s"]},
    "comparison": comparison.to_dict(orient="index"),
    "headline_tldr": evaluation.headline(table, bench, trained="tldr"),
    "headline_static_mix": evaluation.headline(table, bench, trained="static_mix"),
    "tokens_counted": "completion tokens (thinking + answer)",
})
outputs = ["pools.parquet", "references.json", "trajectory.parquet", "batches.parquet", "training_log.parquet",
           "chosen.json", "model", "static_mix_model", "results.parquet", "metrics.json", "metrics.md"]
if not done:
    save_table(pools, stage.dir / "pools.parquet")
manifest = stage.finish(inputs, outputs=outputs, summary=summary)

# %% tsq_lesson="seen"
display(widgets.seen(claims.seen_tldr(traj, comparison, refs, results)))

# %% [markdown] tsq_lesson="ex"
# ## Exercises
#
# Try each before opening its answer (the answers below are computed from this run where they depend on it).
# 1. *(warm-up)* Say $w = (0.5, 0.5)$, $b = (1, 0)$, $\gamma = 4$ and $c = 0$: what is the new $w_{\text{short}}$?
# 2. *(core)* What is $c$ for, and what does a step size $\gamma$ of zero turn TLDR into?
# 3. *(core)* How far did this run's weights move, and why does that explain the comparison table?
# 4. *(stretch)* TLDR's System-1 pool here is the toy world's oracle traces. Why does that make the comparison with TokenSqueeze unfair, and to whom?

# %% tsq_lesson="ans"
from tsq_utils.lessons import widgets

display(widgets.answer(f"$e^4/(e^4 + 1)$ = {math.exp(4) / (math.exp(4) + 1):.4f}; "
                       f"<code>tldr.update_weights((0.5, 0.5), (1, 0), 4, 0)</code> gives "
                       f"{tldr.update_weights((0.5, 0.5), (1, 0), 4.0, 0.0)[0]:.4f}.", title="Answer 1"))
display(widgets.answer("$c$ keeps both weights at least $c/2$ above 0, so $\\log w$ stays finite and a pool can always "
                       "come back. With $\\gamma = 0$ the update is the identity (up to smoothing): the static mix.",
                       title="Answer 2"))
display(widgets.answer(" ".join(claims.seen_tldr(traj, comparison, refs, results)[:2]),
                       title="Answer 3"))
display(widgets.answer("It favours TLDR: its short pool is the concise oracle trace of each easy problem, outside help "
                       "that is always correct and minimal, while TokenSqueeze learns only from what the base model "
                       "itself sampled.", title="Answer 4"))

# %% [markdown] tsq_lesson="code-ex"
# ### Your turn: one update, in code
#
# Write `one_update(w_short, b_short, b_long, gamma, c)`: the new $w_{\text{short}}$ after one TLDR update. It must stay finite for large $\gamma b$ (shift before exponentiating) and keep both weights at least $c/2$. A solution is filled in; replace its body with your own and run the check, which compares it with `tldr.update_weights` on this run's own benefits and on extreme ones.

# %% tsq_lesson="code-ex"
def one_update(w_short, b_short, b_long, gamma, c):
    """w_short after softmax(log w + γ·b) and (1 − c)·w + c/2."""
    z_short, z_long = math.log(w_short) + gamma * b_short, math.log(1 - w_short) + gamma * b_long
    top = max(z_short, z_long)
    e_short, e_long = math.exp(z_short - top), math.exp(z_long - top)
    return (1 - c) * e_short / (e_short + e_long) + c / 2


# %% tsq_lesson="code-check"
# the check: this run's own (w, b) at every update, then made-up extremes (large γ·b, c = 0, a weight near 0)
cases = [(w_prev, r["b_short"], r["b_long"], C.eta, C.smoothing)
         for w_prev, (_, r) in zip([0.5] + w_by_hand, run_traj.iterrows()) if r["updated"]]
cases += [(0.5, 1.0, 0.0, 4.0, 0.0), (0.5, 300.0, 0.0, 16.0, 1e-4), (1e-4, 0.0, 50.0, 8.0, 0.5),
          (0.9, 0.2, 0.7, 0.0, 0.1)]
for w0, bs, bl, gamma, c in cases:
    want = tldr.update_weights((w0, 1 - w0), (bs, bl), gamma, c)[0]
    assert math.isclose(one_update(w0, bs, bl, gamma, c), want, rel_tol=1e-9, abs_tol=1e-12), (w0, bs, bl, gamma, c)
print(f"one_update agrees with tldr.update_weights on {len(cases)} cases")

# %%
# sanity checks (nbval runs these on the ci profile)
m = read_json(stage.dir / "metrics.json")
assert set(ORDER) <= set(m) and all(0 <= v["acc"] <= 1 for b in m.values() for v in b.values())
for name in MODEL_DIRS:
    assert len(results[results["model"] == name]) == sum(len(p) for p in problems.values()) * E.n_samples
    assert (stage.dir / MODEL_DIRS[name] / "model.safetensors").exists()
st = traj[traj["run"] == "static_mix"]
assert (st["w_short"] == 0.5).all() and not st["updated"].any()
assert (batches.loc[batches["run"] == "static_mix", "w_short"] == 0.5).all()
# the tldr weights move only after update steps (multiples of E), and every batch was drawn with the weights of its time
assert (tl.loc[tl["updated"], "step"] % C.update_every == 0).all()
w_after = tl.set_index("step")["w_short"]
for _, b in batches[batches["run"] == "tldr"].iterrows():
    prior = w_after[w_after.index < b["step"]]
    assert math.isclose(b["w_short"], prior.iloc[-1] if len(prior) else 0.5)
for name, step in runs_info["chosen_step"].items():
    if step is not None:
        kept_acc = traj[(traj["run"] == name) & (traj["step"] == step)]["dev_acc"].iloc[0]
        assert kept_acc > C.acc_floor * refs["a_l"] - 1e-9
if first is not None:
    assert math.isclose(w_hand, first["w_short"], rel_tol=1e-9)
assert (pools.loc[pools["pool"] == "short", "k"] <= k_easy).all()
assert (pools.loc[pools["pool"] == "long", "k"] > k_easy).all()
