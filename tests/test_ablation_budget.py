"""Notebook 06's reading aids: the training budget sentence, rows against the base and 05's model, twin reasons."""

from __future__ import annotations

import math

import pandas as pd

from tsq_utils.core.profile_loader import load_profile
from tsq_utils.lessons import ablation_budget


def _summary(steps=48, pairs=3317):
    return pd.DataFrame({"name": ["table4/dpo", "table4/sft"], "train_steps": [steps, steps],
                         "n_pairs": [pairs, pairs]})


def test_budget_counts_visits_against_notebook_04():
    p = load_profile("toy")
    b = ablation_budget.training_budget(p, _summary(), {"steps": 415, "pairs": 3317})
    assert b.steps == 48 and b.batch_size == p.ablations.batch_size and b.lr == p.ablations.lr
    # toy's notebook 04 trains as 2 processes of 4 pairs: 8 pairs per step, as a row's single process of 8
    assert p.training.num_processes == 2 and p.ablations.num_processes == 1
    assert b.visits == 48 * 8 and b.visits_04 == 415 * 8
    line = ablation_budget.budget_line(b)
    assert "48 optimizer steps" in line and "415 steps" in line and f"{b.visits / b.visits_04:.0%}" in line
    assert f"{p.ablations.lr / p.training.lr:.2g}x" in line


def test_budget_without_notebook_04_says_so():
    b = ablation_budget.training_budget(load_profile("ci"), _summary(2, 8), None)
    assert "notebook 04 has not run" in ablation_budget.budget_line(b)


def test_versus_gives_points_against_base_and_05():
    t = pd.DataFrame({"label": ["DPO", "SFT", "not run"], "acc": [0.5, 0.8, math.nan]})
    v = ablation_budget.versus(t, 0.86, 0.83)
    assert list(v.index) == ["DPO", "SFT"]
    assert v.loc["DPO", "vs base (points)"] == -36.0 and v.loc["SFT", "vs 05's model (points)"] == -3.0
    assert "vs 05's model (points)" not in ablation_budget.versus(t, 0.86, None)


def test_twin_reasons_name_the_cause():
    same = pd.DataFrame({"variant": ["q_dyn"] * 2, "alpha": [0.2] * 2, "objective": ["dpo_l_sft"] * 2,
                         "eta": [0.25] * 2})
    assert "same settings" in ablation_budget.twin_reason(same, 0.08)
    shortest = pd.DataFrame({"variant": ["shortest", "q_dyn"], "alpha": [0.2, 0.0]})
    assert "one positive per problem" in ablation_budget.twin_reason(shortest, 0.08)
    sft = pd.DataFrame({"objective": ["sft", "dpo_l_sft"], "eta": [0.0, 0.0], "lam": [0.0, 1.0]})
    assert "SFT alone" in ablation_budget.twin_reason(sft, 0.08)
    other = pd.DataFrame({"sign": [-1, 1]})
    assert "settings differ (sign)" in ablation_budget.twin_reason(other, 0.08)


def test_budget_equal_to_04_says_so():
    b = ablation_budget.Budget(steps=2, batch_size=4, lr=1e-5, pairs=8, steps_04=2, pairs_04=8, lr_04=1e-5,
                               batch_size_04=4)
    assert ablation_budget.budget_line(b).endswith("exactly as much as 04's model.")
