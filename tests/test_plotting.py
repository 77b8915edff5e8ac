"""Figures: the one palette, robustness to degenerate inputs (no finite KL), twins and seed counts on ablation
points."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from tsq_utils.lessons import palette, plotting  # noqa: E402
from tsq_utils.core.artifacts import load_table, save_table  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_each_model_and_variant_has_its_own_colour_and_marker():
    models = ["base", "tokensqueeze", "tldr", "static_mix", "oracle"]
    assert len({(palette.style(m).color, palette.style(m).marker) for m in models}) == len(models)
    for group in ("table2", "table3", "table4"):
        keys = [k for k in palette.STYLES if k.startswith(group + "/")]
        assert len({(palette.style(k).color, palette.style(k).marker) for k in keys}) == len(keys), group


def test_ours_is_one_style_under_every_name():
    ours = palette.style("tokensqueeze")
    for name in ("TokenSqueeze", "table2/q_dyn", "Q-DYN", "table3/kl", "table4/dpo_l_sft"):
        assert (palette.style(name).color, palette.style(name).marker) == (ours.color, ours.marker), name


def test_unknown_names_get_a_stable_fallback():
    assert palette.style("something new") == palette.style("something new")
    assert palette.style("alpha/0.3").color == palette.style("alpha").color  # a sweep row takes its sweep's style


def _step_log(kl_lists):
    return pd.DataFrame({"response_id": [f"p/{i}" for i in range(len(kl_lists))], "step": range(len(kl_lists)),
                         "kl": kl_lists, "n_sampled": [4] * len(kl_lists)})


def test_refinement_figure_with_no_finite_kl_after_a_parquet_round_trip(tmp_path):
    """An all-NaN KL list comes back from Parquet with None values (or None for the whole list): no crash."""
    path = save_table(_step_log([[math.nan, math.nan], [], None]), tmp_path / "log.parquet")
    log = load_table(path)
    summary = {"tokens_per_step_before": 10.0, "tokens_per_step_after": 10.0, "acceptance_rate": 0.0,
               "steps_per_response_before": 3.0, "steps_per_response_after": 3.0}
    fig = plotting.refinement_figure(log, summary, 0.005)
    assert fig.axes[0].get_title().startswith("0 candidates scored of 12 drawn")


def test_refinement_figure_counts_scored_of_drawn():
    log = _step_log([[0.001, None, 0.2], [math.nan, 0.003]])
    fig = plotting.refinement_figure(log, {}, 0.005)
    assert fig.axes[0].get_title().startswith("3 candidates scored of 8 drawn")


def test_selection_count_table_is_the_papers_rule():
    t = plotting.selection_count_table(8, alphas=(0.2, 0.5, 0.75, 1.0))
    assert (t.loc[0.2] == 1).all() and (t.loc[0.5] == 1).all()  # alpha*N/4 = 2*alpha <= 1: k = 1 everywhere
    assert t.loc[1.0, 0.5] == 2  # c = 4: ceil(1 * 0.5 * 4) = 2
    assert t.loc[0.75, 0.5] == 2  # ceil(1.5)
    assert list(t.columns) == [c / 8 for c in range(1, 8)]


def test_selection_count_figure_marks_the_runs_alpha():
    stats = pd.DataFrame({"c": [1, 4, 4, 7], "n": 8})
    fig = plotting.selection_count_figure(8, 0.2, stats)
    assert "α = 0.2" in fig.axes[0].get_title()


def test_training_figure_keeps_margin_and_accuracy_on_separate_axes():
    log = pd.DataFrame({"loss": [1.0, 0.5], "dpo_l_loss": [1.1, 0.6], "sft_loss": [0.9, 0.4],
                        "rewards/margins": [0.0, 12.0], "rewards/accuracies": [0.5, 1.0],
                        "length/chosen": [50, 50], "length/rejected": [100, 100]})
    fig = plotting.training_figure(log)
    ylabels = [ax.get_ylabel() for ax in fig.axes]
    assert "β·Δ (nats)" in ylabels and "share of pairs with Δ > 0" in ylabels
    acc_ax = fig.axes[ylabels.index("share of pairs with Δ > 0")]
    assert acc_ax.get_ylim()[1] <= 1.05


def _sweep(accs, seeds, sds=None):
    n = len(accs)
    return pd.DataFrame({"name": [f"alpha/{i}" for i in range(n)], "label": [f"α = {i}" for i in range(n)],
                         "x": np.linspace(0, 1, n), "benchmark": "toy", "n_seeds": seeds, "acc": accs,
                         "acc_sd": sds if sds is not None else [np.nan] * n, "acc_se": [0.01] * n,
                         "len_t": [55.0] * (n - 1) + [56.0], "len_t_sd": np.nan, "len_t_se": 1.0,
                         "auc": accs, "n_pairs": [700] * (n - 1) + [900], "chosen_tokens": 60.0})


def test_twin_runs_are_consecutive_identical_points():
    t = _sweep([0.98, 0.98, 0.98, 0.97], [1, 1, 1, 1])
    assert plotting._twin_runs(t) == [[0, 1, 2]]
    assert plotting._twin_runs(_sweep([0.9, 0.8, 0.7], [1, 1, 1])) == []


def test_ablation_sweep_figure_says_seed_counts_and_same_model():
    t = _sweep([0.986, 0.986, 0.986, 0.975], [1, 3, 1, 1], sds=[np.nan, 0.01, np.nan, np.nan])
    fig = plotting.ablation_sweep_figure(t, "α", "Fig. 4")
    texts = [tx.get_text() for ax in fig.axes for tx in ax.texts]
    assert texts.count("n=1") >= 3 and "n=3" in texts and "same model" in texts
    acc_ax = fig.axes[0]
    lo, hi = acc_ax.get_ylim()
    assert hi - lo >= 20  # a one-point dip must not fill the axis


def test_tradeoff_figure_marks_twins_as_one_model():
    t = pd.DataFrame({"name": ["table2/shortest", "table2/q_dyn", "table2/q_fix"],
                      "label": ["Shortest", "Q-DYN", "Q-FIX"],
                      "n_seeds": [1, 1, 3], "acc": [0.98, 0.98, 0.97], "acc_sd": [np.nan, np.nan, 0.01],
                      "acc_se": 0.01, "len_t": [55.3, 55.3, 55.2], "len_t_sd": [np.nan, np.nan, 0.2], "len_t_se": 1.0,
                      "auc": [0.85, 0.85, 0.84]})
    fig = plotting.ablation_tradeoff_figure({"table2": t}, {"table2": "Table 2"})
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert {"Shortest (n=1)", "Q-DYN (n=1)", "Q-FIX (n=3)"} <= set(labels)  # both twins keep their marker
    assert [t.get_text() for t in fig.axes[0].texts] == ["same model"]


def test_by_difficulty_figure_draws_twins_once():
    idx = pd.MultiIndex.from_product([["Shortest", "Q-DYN", "base model (no training)"], [2, 3]], names=["model", "k"])
    table = pd.DataFrame({"acc": [0.9, 0.8, 0.9, 0.8, 1.0, 0.9], "len_a": [50, 60, 50, 60, 100, 120]}, index=idx)
    fig = plotting.by_difficulty_figure(table)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "Shortest = Q-DYN (same model)" in labels and len(labels) == 2


def test_kl_heatmap_figure_marks_epsilon_and_the_kept_candidate():
    kl = np.array([[1e-4, 2e-3, 1e-5], [0.2, 0.05, 0.01]])
    fig = plotting.kl_heatmap_figure(kl, ["a", "b", "\n"], ["cand 1", "cand 2"], [True, False], 0.005)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["✓ kept  cand 1", "cand 2"]
    assert ax.get_yticklabels()[0].get_color() == palette.style("accepted").color
    assert any("ε" in t for t in fig.axes[1].get_legend_handles_labels()[1])


def test_paper_vs_ours_figure_puts_each_unit_on_its_own_axis():
    from tsq_utils.method.evaluation import PAPER_7B

    ours = {"len_t_change_pct": -50.5, "acc_change_points": -1.8, "acc_se_points": 0.6, "auc_base": 0.714,
            "auc_trained": 0.838}
    fig = plotting.paper_vs_ours_figure(ours, PAPER_7B)
    xlabels = [ax.get_xlabel() for ax in fig.axes]
    assert xlabels[0].startswith("Len-T change") and xlabels[1].startswith("accuracy change") and "AUC" in xlabels[2]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()][0] == "ours (toy)"


def test_k_over_p_n_has_k2_exactly_above_four_over_alpha():
    t = plotting.k_over_p_n_table(0.2, 32)
    assert t.loc[t["N"] <= 20, "k"].max() == 1 and t.loc[t["N"] == 21, "k"].max() == 2
    assert ((t["k"] >= 2) == (0.2 * t["N"] * t["p"] * (1 - t["p"]) > 1 + 1e-9)).all()
    fig = plotting.k_over_p_n_figure(0.2, 8)
    ax = fig.axes[0]
    assert any(line.get_ydata()[0] == 8 for line in ax.get_lines())  # the run's N is marked
    assert "N > 4/α = 20" in ax.get_title()


def test_sweep_with_equal_seed_counts_says_them_once_beside_no_point():
    t = _sweep([0.9, 0.8, 0.7], [3, 3, 3], sds=[0.01, 0.02, 0.01])
    fig = plotting.ablation_sweep_figure(t, "α", "Fig. 4")
    assert not [tx for ax in fig.axes for tx in ax.texts if tx.get_text().startswith("n=")]
    assert any("3 training seeds per point" in tx.get_text() for tx in fig.texts)


def test_seed_labels_sit_right_of_their_error_bars():
    t = _sweep([0.9, 0.8], [1, 3], sds=[np.nan, 0.01])
    fig = plotting.ablation_sweep_figure(t, "α", "Fig. 4")
    labels = [tx for tx in fig.axes[0].texts if tx.get_text().startswith("n=")]
    assert labels and all(tx.get_position()[0] > 0 and tx.get_ha() == "left" for tx in labels)  # offset right


def test_alpha_sweep_does_not_wear_shortests_colour():
    assert palette.style("alpha/0.2").color != palette.style("table2/shortest").color


def test_budget_curve_legend_sits_outside_the_axes():
    res = pd.DataFrame({"model": ["base"] * 3 + ["tokensqueeze"] * 3, "benchmark": "toy",
                        "correct": [True, False, True] * 2, "n_tokens": [50, 80, 120, 20, 40, 60]})
    fig = plotting.budget_curve_figure(res, 160, "toy")
    ax = fig.axes[0]
    fig.canvas.draw()
    legend_box = ax.get_legend().get_window_extent()
    assert legend_box.x0 >= ax.get_window_extent().x1  # right of the plotting area: no curve under it


def test_difficulty_axis_names_terms_without_the_letter_k():
    idx = pd.MultiIndex.from_product([["base"], [2, 3]], names=["model", "k"])
    fig = plotting.by_difficulty_figure(pd.DataFrame({"acc": [0.9, 0.8], "len_a": [50, 60]}, index=idx))
    assert all("number of terms" in ax.get_xlabel() and " k " not in ax.get_xlabel() for ax in fig.axes)
