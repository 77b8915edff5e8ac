"""The teaching helpers: summaries that follow the numbers, collapsed answers, live views that never block."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from tsq_utils import lessons  # noqa: E402
from tsq_utils.method.selection import quantile_count  # noqa: E402


@pytest.mark.parametrize("n", [4, 8, 16, 21, 32])
def test_min_alpha_for_two_is_where_qdyn_first_differs_from_shortest(n):
    a = lessons.min_alpha_for_two(n)
    if a <= 1:
        assert max(quantile_count(a, c, n) for c in range(1, n)) == 1  # at the threshold k is still 1 ...
    if a < 1:
        assert max(quantile_count(a + 1e-6, c, n) for c in range(1, n)) == 2  # ... just above it, 2
    assert lessons.min_alpha_for_two(8) == 0.5 and lessons.min_alpha_for_two(21) < 0.2 <= lessons.min_alpha_for_two(20)


def _stats(n_pos):
    return pd.DataFrame({"problem_id": range(len(n_pos)), "n": 8, "c": 4, "n_pairs": 3, "n_pos": n_pos})


SUMMARY = {"n_pairs": 30, "n_problems_used": 10, "n_problems": 12, "mean_chosen_tokens": 50.0,
           "mean_rejected_tokens": 120.0, "n_problems_skipped": {"all_correct": 1, "no_correct": 1}}


def test_selection_summary_says_when_k_is_one_everywhere():
    lines = lessons.seen_selection(_stats([1] * 10), SUMMARY, 0.2)
    assert len(lines) == 3 and "k = 1 for every problem" in lines[1] and "α > 0.5" in lines[1]
    lines = lessons.seen_selection(_stats([1] * 8 + [2, 3]), SUMMARY, 0.9)
    assert "2 of 10 problems keep more than one positive" in lines[1] and "k = 1 for every" not in lines[1]


def test_refinement_summary_does_not_claim_an_effect_it_did_not_have():
    s = {"acceptance_rate": 0.012, "n_steps_accepted": 12, "n_steps": 1000, "tokens_per_step_before": 10.0,
         "tokens_per_step_after": 9.98, "steps_per_response_before": 8.0, "steps_per_response_after": 8.0,
         "mean_chosen_tokens_before": 65.6, "mean_chosen_tokens_after": 65.5, "responses_reverted": 2}
    lines = lessons.seen_refinement(s, 17000, 5000, 0.005)
    assert "barely shortens" in lines[0] and "17,000 candidates drawn" in lines[0]
    assert "barely" not in lessons.seen_refinement({**s, "acceptance_rate": 0.3}, 17000, 5000, 0.005)[0]


def test_tldr_summary_reports_weights_that_did_not_move():
    traj = pd.DataFrame({"run": "tldr", "step": [32, 64, 96], "w_short": [0.51, 0.49, 0.5], "updated": True})
    comp = pd.DataFrame({"acc": [0.997, 0.996, 0.973], "len_t": [59.9, 60.1, 55.5], "acr": [0.469, 0.467, 0.499]},
                        index=["tldr", "static_mix", "tokensqueeze"])
    lines = lessons.seen_tldr(traj, comp)
    assert "barely moved" in lines[0] and "about the same place" in lines[1] and len(lines) == 3


def test_evaluation_summary_weighs_the_accuracy_change_by_its_se():
    head = {"acc_base": 0.991, "acc_trained": 0.973, "acc_change_points": -1.8, "acc_se_points": 0.6,
            "len_t_base": 112.0, "len_t_trained": 55.5, "len_t_change_pct": -50.5, "auc_base": 0.714,
            "auc_trained": 0.838}
    assert "a real loss of accuracy" in lessons.seen_evaluation(head, "toy")[1]
    assert "within two standard errors" in lessons.seen_evaluation({**head, "acc_se_points": 1.0}, "toy")[1]


def test_answer_is_collapsed_and_seen_is_markdown():
    a = lessons.answer("42 <b>", title="Answer 1")
    assert a.data.startswith("<details>") and "Answer 1" in a.data and "42 <b>" in a.data
    with pytest.raises(ValueError):
        lessons.seen([])
    assert "What you should have seen" in lessons.seen(["one", "two", "three"]).data


def test_live_renders_the_default_and_rerenders_on_change(capsys):
    calls = []

    def view(alpha, n):
        calls.append((alpha, n))
        return f"view {alpha} {n}"

    a, n = lessons.slider(0.2, 0.0, 1.0, 0.05, "α"), lessons.slider(8, 2, 8, 1, "N")
    box = lessons.live(view, alpha=a, n=n)
    assert calls == [(0.2, 8)]
    assert "view 0.2 8" in capsys.readouterr().out
    if box is not None:  # ipywidgets installed: moving a slider renders again
        n.value = 4
        assert calls[-1] == (0.2, 4)


def test_trace_diff_highlights_only_rewritten_steps():
    orig = "<think>\nStep one is long.\n\nStep two.\n\nStep three.\n</think>\n\\boxed{8}"
    new = "<think>\nStep 1.\n\nStep two.\n\nStep three.\n</think>\n\\boxed{8}"
    html = lessons.trace_diff_html(orig, new)
    assert html.startswith("<p>1 of 3 steps rewritten") and "<s>" in html and html.count("<s>") == 1


def test_count_scored_ignores_none_and_nan():
    log = pd.DataFrame({"kl": [[0.1, None, math.nan], None, [], [0.2]]})
    assert lessons.count_scored(log) == 2
