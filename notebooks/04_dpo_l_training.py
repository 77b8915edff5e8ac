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
# # 04 · DPO-L + SFT: teaching the model the short answers
#
# **Purpose.** Fine-tune the base model on the (refined) preference pairs with the length-aware DPO objective ([DPO-L](../docs/glossary.md#dpo-l)) plus an [SFT](../docs/glossary.md#sft) anchor.
#
# **What it runs.** One training of the base model over notebook 03's refined pairs (`training.epochs` passes, `training.batch_size` pairs a step), then a few checks that recompute the loss by hand. The settings of this run and the time its stage last took are printed under the set-up cell; the longest cell is the training, with one progress bar.
#
# Pipeline: [00 base model](00_base_model.ipynb) → [01 sampling](01_sampling.ipynb) → [02 selection](02_selection.ipynb) → [03 KL refinement](03_kl_refinement.ipynb) → **04 DPO-L training** → [05 evaluation](05_evaluation.ipynb) → [06 ablations](06_ablations.ipynb) → [07 TLDR](07_tldr.ipynb).
#
# ← previous: [03 KL refinement](03_kl_refinement.ipynb) · next: [05 evaluation](05_evaluation.ipynb) →
#
# *Follows:* TokenSqueeze §3.3 and Appendix A.2, the length-aware objective DPO-L + SFT. *The method in our words:* [docs/method.md](../docs/method.md). *Package functions used here:* [`dpo_l.dpo_l_pair_losses`](../tsq_utils/method/dpo_l/loss.py), [`dpo_l.length_margin`](../tsq_utils/method/dpo_l/loss.py), [`dpo_l.train_and_save`](../tsq_utils/method/dpo_l/train.py); figures: [`plotting`](../tsq_utils/lessons/plotting.py), summaries and exercises: [`lessons`](../tsq_utils/lessons/__init__.py).

# %% tags=["parameters"]
import os

profile = os.environ.get("TSQ_PROFILE", "toy")
lr = None  # None: the profile's training.lr (the paper: 5e-6 on 7B; the toy reasoner needs its own, see the profile)
beta = None  # None: training.beta (0.1, LLaMA-Factory's default: the paper does not state it)
lam = None  # None: training.lam (the paper: lambda 1)
eta = None  # None: training.eta (the weight of DPO-L, 1 - eta goes to SFT; the paper: 0.5)
length_margin_sign = None  # None: training.length_margin_sign (-1: the length gap is a margin to beat; +1: head start)
epochs = None  # None: training.epochs
force = False

# %%
import pandas as pd
import torch
from tsq_utils.model import base_model
from tsq_utils.method import dpo_l
from IPython.display import Markdown, display
from tsq_utils.lessons import orientation, plotting, quiet
from tsq_utils.core.artifacts import load_table, read_json, save_table
from tsq_utils.core.config import resolve_device
from tsq_utils.core.stage import setup_stage

stage = setup_stage("training", profile, {
    "training.lr": lr, "training.beta": beta, "training.lam": lam, "training.eta": eta,
    "training.length_margin_sign": length_margin_sign, "training.epochs": epochs}, force=force)
P, T = stage.profile, stage.profile.training
quiet.quiet_libraries()  # library progress bars and warnings: nothing that changes a result
display(orientation.lesson_top(stage, ["training.lr", "training.beta", "training.lam", "training.eta",
                                       "training.length_margin_sign", "training.epochs", "training.batch_size"]))

# %% [markdown]
# ## The idea
#
# **[DPO](../docs/glossary.md#dpo)** trains a policy $\pi_\theta$ directly on preference pairs $(x, y_w, y_l)$, against a frozen reference $\pi_{\text{ref}}$ (the base
# model), by making the implicit reward margin positive:
#
# $$\Delta = \big[\log \pi_\theta(y_w|x) - \log \pi_{\text{ref}}(y_w|x)\big] - \big[\log \pi_\theta(y_l|x) - \log \pi_{\text{ref}}(y_l|x)\big].$$
#
# Pure DPO only cares about the *difference*; it can lower the likelihood of both responses, and of everything else, so accuracy
# collapses (the paper's Table 4: DPO 48.3 vs DPO-L + SFT 57.5 on AIME24). Two additions keep it honest. **DPO-L** puts the length
# gap inside the sigmoid, so the shorter a preferred response is relative to the rejected one, the larger the margin it must earn;
# and an **SFT** term keeps the likelihood of the preferred response itself high:
#
# $$\mathcal{L}_{\text{DPO-L}} = -\log\sigma\!\Big(\beta\,\Delta + s\,\lambda\,\log\frac{\ell(y_l)}{\ell(y_w)}\Big),\qquad
# \mathcal{L} = \eta\,\mathcal{L}_{\text{DPO-L}} + (1-\eta)\,\mathcal{L}_{\text{SFT}},$$
#
# with $\ell$ the token length, $\mathcal{L}_{\text{SFT}}$ the per-token NLL of $y_w$, and [$\eta$](../docs/glossary.md#eta) the weight of DPO-L (this run's $\beta$, $\lambda$, $\eta$ and $s$ are printed below, beside the paper's). The sign $s$ is ambiguous
# in the paper; with $s = -1$ the length gap is a margin the model must beat (the implied optimum penalises length by $\ell^{-\lambda/\beta}$),
# with $s = +1$ it is a head start. It is a parameter, and 06 ablates both. The trainer is TRL's `DPOTrainer` with `compute_loss`
# overridden (`tsq_utils.method.dpo_l`).

# %%
display(Markdown(f"This run: $\\beta = {T.beta:g}$, $\\lambda = {T.lam:g}$, $\\eta = {T.eta:g}$, "
                 f"$s = {T.length_margin_sign:+d}$ (the paper: $\\lambda = 1$, $\\eta = 0.5$; it does not state "
                 f"$\\beta$ or $s$)."))
pairs = load_table(stage.require("refinement", "refined_pairs.parquet"))
print(f"{len(pairs)} pairs from {pairs['problem_id'].nunique()} problems; "
      f"mean chosen {pairs['chosen_tokens'].mean():.1f} tokens, rejected {pairs['rejected_tokens'].mean():.1f}")

# %% [markdown]
# ## A worked example: the loss of one pair before training
#
# Before the first step $\pi_\theta = \pi_{\text{ref}}$, so $\Delta = 0$ and only the length term is left: the loss of a pair is
# $-\log\sigma(s\,\lambda\,\log(\ell_l/\ell_w))$, which with $s=-1$ is larger the shorter the chosen response is.

# %%
ex = pairs.iloc[[0]]
# TRL appends EOS
lw, ll = torch.tensor(ex["chosen_tokens"].values + 1.0), torch.tensor(ex["rejected_tokens"].values + 1.0)
m = dpo_l.length_margin(lw, ll, T.lam, T.length_margin_sign)
zero = torch.zeros(1)
loss0 = dpo_l.dpo_l_pair_losses(zero, zero, zero, zero, m, T.beta)
print(f"chosen {int(lw)} tokens, rejected {int(ll)} tokens -> length term {m.item():+.3f}, "
      f"DPO-L loss at step 0 = {loss0.item():.3f} (log 2 = 0.693)")

# %% [markdown]
# ## At scale
#
# Training in `training.num_processes` processes: in this one with a progress bar, or (the `toy` profile: two data-parallel processes of 4 pairs, the same 8-pair steps) launched with `accelerate launch`, the first process printing a line per twentieth of the run. The reference model is the base model itself (its log-probabilities are precomputed once, as training visits every pair at least once; a run shorter than an epoch, like 06's rows, scores only the pairs it visits, with a frozen copy). Each step runs the batch's chosen and rejected sequences sorted by length, four at a time, each group cut at its own longest sequence: a random batch would otherwise pad every short response to the longest one's length (`benchmarks/bench_training.py`, part `split`, measures what that costs).

# %%
model, tok = base_model.load_base(stage.run_dir, P)
inputs = {"pairs": stage.dir.parent / "refinement" / "refined_pairs.parquet",
          **base_model.base_inputs(stage.run_dir, P)}
if not stage.is_done(inputs):
    run = dpo_l.TrainRun(seed=stage.seed, device=resolve_device(P))
    log = dpo_l.train_and_save(model, tok, pairs, T, stage.dir, run)
    save_table(log.reset_index(), stage.dir / "training_log.parquet")
log = load_table(stage.dir / "training_log.parquet").set_index("step")
columns = ["loss", "dpo_l_loss", "sft_loss", "rewards/margins", "rewards/accuracies", "length_margin"]
log[columns].iloc[sorted({0, len(log) // 2, len(log) - 1})]  # first, middle and last step

# %% [markdown] tsq_lesson="core-md"
# ### The loss in code
#
# The DPO-L + SFT loss of a few training pairs by hand, with the trained model as $\pi_\theta$ and the base model as $\pi_{\text{ref}}$ (sequence log-probs of the completion with EOS by [teacher forcing](../docs/glossary.md#teacher-forcing), as TRL scores them), checked against `dpo_l.dpo_l_pair_losses` and `dpo_l.length_margin`.

# %% tsq_lesson="core"
import math
from tsq_utils.lessons import training as lesson, widgets

trained = base_model.load_model(str(stage.dir / "model"), base_model.base_ref(stage.run_dir, P)[1], P)[0]
reference = base_model.load_base(stage.run_dir, P)[0]  # a fresh copy: training updated `model` in place
for _, r in pairs.head(3).iterrows():
    (cw, lw), (cl, ll) = (lesson.sequence_logps(trained, tok, r["prompt"], r[y]) for y in ("chosen", "rejected"))
    (rw, _), (rl, _) = (lesson.sequence_logps(reference, tok, r["prompt"], r[y]) for y in ("chosen", "rejected"))
    z = T.beta * ((cw - rw) - (cl - rl)) + T.length_margin_sign * T.lam * math.log(ll / lw)  # β·Δ + s·λ·log(ℓ_l/ℓ_w)
    dpo_l_by_hand = max(-z, 0) + math.log1p(math.exp(-abs(z)))  # −log σ(z), computed stably
    loss_by_hand = T.eta * dpo_l_by_hand + (1 - T.eta) * (-cw / lw)  # + (1 − η)·per-token NLL of y_w
    margin = dpo_l.length_margin(torch.tensor([lw]), torch.tensor([ll]), T.lam, T.length_margin_sign)
    pkg = dpo_l.dpo_l_pair_losses(*(torch.tensor([v]) for v in (cw, cl, rw, rl)), margin, T.beta)
    assert math.isclose(dpo_l_by_hand, pkg.item(), rel_tol=1e-5, abs_tol=1e-6)
    beta_delta = z - T.length_margin_sign * T.lam * math.log(ll / lw)
    print(f"pair {r['problem_id']}: ℓ_w {lw}, ℓ_l {ll}, β·Δ {beta_delta:+.3f}, L_DPO-L {dpo_l_by_hand:.4f}, "
          f"L {loss_by_hand:.4f}")

# %% [markdown]
# ### One training step in code
#
# What the trainer does at every step, written out: the batch as the package's collator builds it (the chosen rows, then their rejected rows; `completion_mask` marks each response's tokens and its EOS), one forward of the policy and one of the frozen reference, the loss, and one optimizer update. The policy here is the trained model and the reference the base model, so $\Delta \ne 0$; the loss must equal the package's `DPOLTrainer.compute_loss` on the same batch.

# %%
import torch.nn.functional as F
from tsq_utils.lessons import dpo_step


def dpo_l_sft_loss(policy, reference, batch, T):
    """η·L_DPO-L + (1 − η)·L_SFT of one collated batch: B chosen rows, then their B rejected rows."""
    ids, mask = batch["input_ids"], batch["completion_mask"][:, 1:]  # mask[:, t]: token t + 1 is a completion token

    def token_logps(model):  # log π(token t + 1 | tokens ≤ t), 0 outside the completions
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        return torch.log_softmax(logits, -1).gather(2, ids[:, 1:, None])[..., 0] * mask

    lp = token_logps(policy)
    with torch.no_grad():
        ref_w, ref_l = token_logps(reference).sum(1).chunk(2)
    pol_w, pol_l = lp.sum(1).chunk(2)
    len_w, len_l = mask.sum(1).float().chunk(2)  # ℓ: completion tokens, EOS included
    z = T.beta * ((pol_w - ref_w) - (pol_l - ref_l)) + T.length_margin_sign * T.lam * torch.log(len_l / len_w)
    sft = -lp.chunk(2)[0].sum() / mask.chunk(2)[0].sum()  # mean NLL over every chosen token of the batch
    return T.eta * (-F.logsigmoid(z).mean()) + (1 - T.eta) * sft


policy = trained  # updated in memory only: the saved model is not touched
trainer, batch = dpo_step.package_batch(policy, reference, tok, pairs, T, stage.seed)
loss = dpo_l_sft_loss(policy, reference, batch, T)
package_loss = trainer.compute_loss(policy, batch)
assert math.isclose(loss.item(), package_loss.item(), rel_tol=1e-5, abs_tol=1e-6), (loss.item(), package_loss.item())
optimizer = torch.optim.AdamW(policy.parameters(), lr=T.lr)
loss.backward()  # the update: gradients of the batch loss ...
optimizer.step()  # ... and one AdamW step at the profile's learning rate
after = dpo_l_sft_loss(policy, reference, batch, T).item()
print(f"one batch of {len(batch['input_ids']) // 2} pairs: loss {loss.item():.6f} by hand, {package_loss.item():.6f} "
      f"by the package; after one update at lr {T.lr:g}: {after:.6f}")

# %% [markdown]
# ## What happened
#
# Left: the loss and its two terms. Then, each on its own axis (different units): the implicit reward margin $\beta\Delta$ in [nats](../docs/glossary.md#nats),
# and the reward accuracy, the share of pairs with $\Delta > 0$; when both rise, the model prefers the short correct responses (the
# summary at the end says whether they did). Right: the lengths of the pairs it saw.

# %%
fig = plotting.training_figure(log)
png = stage.save_fig(fig, "04_training")

# %% [markdown]
# ## Try this
#
# - `eta=1.0` (pure DPO-L, no SFT anchor) or `lam=0` (plain DPO + SFT); 06 trains every row of the paper's Table 4.
# - `length_margin_sign=1` flips the length term; compare the reward margins and the evaluation in 05.
# - A larger `lr`: the toy reasoner is fragile, and accuracy can collapse within a few dozen steps.

# %%
last = log.iloc[-1]
summary = {"steps": int(log.index.max()), "pairs": int(len(pairs)), "final_loss": float(last["loss"]),
           "final_dpo_l_loss": float(last["dpo_l_loss"]), "final_sft_loss": float(last["sft_loss"]),
           "final_reward_margin": float(last["rewards/margins"]),
           "final_reward_accuracy": float(last["rewards/accuracies"]),
           "mean_reward_margin_last_10pct": float(log["rewards/margins"].iloc[-max(1, len(log) // 10):].mean())}
manifest = stage.finish(inputs, outputs=["model", "training_log.parquet"], summary=summary)
pd.Series(summary, name="value").to_frame().style.format("{:.4g}")

# %% tsq_lesson="seen"
display(widgets.seen(lesson.seen_training(log)))

# %% [markdown] tsq_lesson="ex"
# ## Exercises
#
# Try each before opening its answer (the answers below are computed from this run where they depend on it).
# 1. *(warm-up)* Before training ($\Delta = 0$), a pair with $\ell_w = 50$ and $\ell_l = 100$ tokens, $\lambda = 1$, $s = -1$: what is $\mathcal{L}_{\text{DPO-L}}$? And with $s = +1$?
# 2. *(core)* Pure DPO can lower the likelihood of *both* responses and still reduce its loss. Which term of our objective stops that, and how?
# 3. *(core)* What reward accuracy and margin did this run end with, and what does a reward accuracy of 1 mean?
# 4. *(stretch)* With $s = -1$ the implied optimal policy penalises length as $\ell^{-\lambda/\beta}$. What power is that at $\lambda = 1$, $\beta = 0.1$, and what does it say about β?

# %% tsq_lesson="ans"
from tsq_utils.lessons import training as lesson, widgets

check = dpo_l.dpo_l_pair_losses(*(torch.zeros(1),) * 4,
                                 dpo_l.length_margin(torch.tensor([50.0]), torch.tensor([100.0]), 1.0, -1), 0.1)
display(widgets.answer("$s=-1$: $-\\log\\sigma(-\\log 2) = \\log(1 + 2) = \\log 3 \\approx 1.099$. "
                       "$s=+1$: $-\\log\\sigma(\\log 2) = \\log(1 + 1/2) \\approx 0.405$. "
                       + f"Check: {check.item():.4f}.", title="Answer 1"))
display(widgets.answer("The SFT term $(1-\\eta)\\,\\mathcal{L}_{\\text{SFT}}$, the per-token NLL of $y_w$: it is "
                       "minimised only by keeping the preferred response likely, so the margin has to come from "
                       "pushing $y_l$ down, not $y_w$.", title="Answer 2"))
tail = log.iloc[-max(1, len(log) // 10):]
display(widgets.answer(f"Last 10% of steps: margin β·Δ {tail['rewards/margins'].mean():.2f} nats, reward accuracy "
                       f"{tail['rewards/accuracies'].mean():.2f}. A reward accuracy of 1 means every pair in the batch "
                       "has $\\Delta > 0$: relative to the base model, the trained model raised the chosen response "
                       "over the rejected one.", title="Answer 3"))
display(widgets.answer("$\\ell^{-10}$: a very strong preference for short responses. A smaller β makes the length term "
                       "weigh more against the learned reward ($\\lambda/\\beta$ grows).", title="Answer 4"))

# %% [markdown] tsq_lesson="code-ex"
# ### Your turn: the loss of one pair, in code
#
# Write `pair_loss(delta, l_w, l_l, beta, lam, s, eta, nll_w)`: the total loss $\eta\,\mathcal{L}_{\text{DPO-L}} + (1-\eta)\,\mathcal{L}_{\text{SFT}}$ of one pair, from its $\Delta$, its two lengths and the per-token NLL of $y_w$. Compute $-\log\sigma(z)$ so that it does not overflow for large $|z|$. A solution is filled in; replace its body with your own and run the check below.

# %% tsq_lesson="code-ex"
def pair_loss(delta, l_w, l_l, beta, lam, s, eta, nll_w):
    """η·(−log σ(β·Δ + s·λ·log(ℓ_l/ℓ_w))) + (1 − η)·NLL of y_w, for one pair."""
    z = beta * delta + s * lam * math.log(l_l / l_w)
    return eta * (max(-z, 0.0) + math.log1p(math.exp(-abs(z)))) + (1 - eta) * nll_w


# %% tsq_lesson="code-check"
# the check: against the package's formula, on this run's pair lengths, with made-up Δ (large ones included)
gen = torch.Generator().manual_seed(0)
for (_, r), delta in zip(pairs.head(20).iterrows(), torch.randn(20, generator=gen).tolist()):
    lw_, ll_ = r["chosen_tokens"] + 1.0, r["rejected_tokens"] + 1.0  # with EOS
    for d in (delta, 100 * delta):
        margin = dpo_l.length_margin(torch.tensor([lw_]), torch.tensor([ll_]), T.lam, T.length_margin_sign)
        want = dpo_l.dpo_l_pair_losses(torch.tensor([d]), *(torch.zeros(1),) * 3, margin, T.beta).item()
        got = pair_loss(d, lw_, ll_, T.beta, T.lam, T.length_margin_sign, T.eta, 0.5)
        assert math.isclose(got, T.eta * want + (1 - T.eta) * 0.5, rel_tol=1e-5, abs_tol=1e-6), (d, got, want)
print("pair_loss agrees with dpo_l.dpo_l_pair_losses on 40 cases")

# %%
# sanity checks (nbval runs these on the ci profile)
assert (stage.dir / "model" / "model.safetensors").exists()
assert log["loss"].notna().all() and len(log) >= 1
assert read_json(stage.dir / "summary.json")["steps"] == int(log.index.max())
