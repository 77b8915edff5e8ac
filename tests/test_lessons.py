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
    assert "barely acts" in lines[0] and "5,000 of 17,000 candidates" in lines[0]
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


def test_qdyn_shortest_warning_follows_alpha_over_four_over_n():
    warn = lessons.qdyn_shortest_warning(8, 0.2)
    assert warn is not None and "Q-DYN selects exactly Shortest" in warn and "N ≥ 21" in warn
    assert lessons.qdyn_shortest_warning(32, 0.2) is None
    assert lessons.qdyn_shortest_warning(21, 0.2) is None and lessons.qdyn_shortest_warning(20, 0.2) is not None


def _pstats(c, n_pos, n=8):
    return pd.DataFrame({"problem_id": [f"p{i}" for i in range(len(c))], "n": n, "c": c,
                         "p": [x / n for x in c], "n_pairs": [1 if 0 < x < n else 0 for x in c], "n_pos": n_pos,
                         "cv_tokens": 0.3, "k": 2})


def test_mixed_example_picks_p_nearest_half_and_none_without_mixed():
    st = _pstats([8, 1, 5, 3, 4], [0, 1, 1, 1, 1])
    assert lessons.mixed_example(st) == "p4"
    assert lessons.mixed_example(_pstats([8, 8], [0, 0])) is None
    assert "No problem of this run has 0 < p < 1" in lessons.mixed_example_note(_pstats([8, 8], [0, 0]), None, None)
    samples = pd.DataFrame({"problem_id": "p4", "correct": [True] * 4 + [False] * 4,
                            "n_tokens": [30, 40, 50, 60, 70, 80, 90, 100]})
    assert "4 of 8 samples correct (p = 0.500)" in lessons.mixed_example_note(st, samples, "p4")


def test_all_correct_by_difficulty_says_whether_easy_problems_pile_up():
    st = pd.DataFrame({"k": [2, 2, 8, 8], "c": [8, 8, 3, 8], "n": 8})
    assert "easy problems pile up" in lessons.all_correct_by_difficulty(st)
    assert "not the easy ones" in lessons.all_correct_by_difficulty(st.assign(k=[8, 8, 2, 2]))
    assert "no problem is all correct." in lessons.all_correct_by_difficulty(st.assign(c=3))


def test_depth_examples_show_k2_beside_k1_or_say_there_is_none():
    st = _pstats([1, 4, 6, 2], [1, 2, 1, 1], n=24)
    assert lessons.depth_examples(st) == ("p1", "p3")  # k = 1 with p nearest 4/24: c = 2
    assert "1 of 4 problems with pairs keep k ≥ 2" in lessons.depth_example_note(st, 0.2)
    flat = _pstats([1, 4, 6], [1, 1, 1])
    assert lessons.depth_examples(flat) == (None, "p0")
    assert "no problem with k ≥ 2" in lessons.depth_example_note(flat, 0.2)


def _log():
    return pd.DataFrame({
        "response_id": ["a/0", "a/0", "b/1"], "step": [0, 1, 0], "orig_tokens": [24, 9, 24],
        "cand_tokens": [[9, 17, 12], [9], [10]], "kl": [[0.001, 0.004, 0.02], [math.nan], [0.009]],
        "accepted": [True, False, False], "reverted": False, "new_tokens": [9, 9, 24], "kl_chosen": [0.001, None, None],
        "cand_texts": [["s0 short", "s0 mid", "s0 other"], ["x"], ["b short"]]})


REFINED = pd.DataFrame({"problem_id": ["a", "b"], "chosen_sample_idx": [0, 1],
                        "chosen_original": ["long step zero\n\nstep one\n</think>\n\\boxed{1}",
                                            "b step\n</think>\n\\boxed{2}"]})


def test_kl_examples_pick_the_kept_rewrite_and_the_nearest_miss_of_its_step():
    ex = lessons.kl_examples(_log(), REFINED, 0.005)
    assert ex["verdict"].tolist() == ["accepted", "rejected"]
    acc, rej = ex.iloc[0], ex.iloc[1]
    assert (acc["candidate"], acc["kl"], acc["step_text"]) == ("s0 short", 0.001, "long step zero")
    assert (rej["response_id"], rej["candidate"], rej["kl"]) == ("a/0", "s0 other", 0.02)  # 0.004 < ε passed
    note = lessons.kl_example_note(ex, 0.005, 5)
    assert note.startswith("Accepted: step 0 of a/0, 24 -> 9 tokens") and "the same step" in note


def test_kl_examples_without_acceptance_say_so():
    log = _log().assign(accepted=False)
    ex = lessons.kl_examples(log, REFINED, 0.005)
    assert ex["verdict"].tolist() == ["rejected"] and ex["kl"].iloc[0] == 0.009  # the nearest miss overall
    assert "No candidate in this run passed ε = 0.005" in lessons.kl_example_note(ex, 0.005, 5)
    assert "none was scored" in lessons.kl_example_note(ex.iloc[:0], 0.005, 0)


def test_refinement_effect_branches():
    s = {"acceptance_rate": 0.3, "tokens_per_step_before": 10.0, "tokens_per_step_after": 8.0}
    assert "shortens steps here: tokens per step -20.0%" in lessons.refinement_effect(s, 100, 50)
    assert "change only -1.0%" in lessons.refinement_effect({**s, "tokens_per_step_after": 9.9}, 100, 50)
    low = lessons.refinement_effect({**s, "acceptance_rate": 0.01, "n_steps_accepted": 3}, 100, 50)
    assert "barely acts" in low and "50 of 100 candidates" in low and "only 3 steps had one under ε" in low
    assert "rarely" not in low
    assert "rarely re-words" in lessons.refinement_effect({**s, "acceptance_rate": 0.01}, 1000, 4)
    assert "did not act" in lessons.refinement_effect(s, 100, 0)
