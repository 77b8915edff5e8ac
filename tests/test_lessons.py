"""The teaching helpers: summaries that follow the numbers, collapsed answers, live views that never block."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from tsq_utils.lessons import evaluation as evaluation_lesson  # noqa: E402
from tsq_utils.lessons import refinement as refinement_lesson  # noqa: E402
from tsq_utils.lessons import sampling as samp  # noqa: E402
from tsq_utils.lessons import selection as sel  # noqa: E402
from tsq_utils.lessons import tldr as tldr_lesson  # noqa: E402
from tsq_utils.lessons import widgets  # noqa: E402
from tsq_utils.method.selection import quantile_count  # noqa: E402


@pytest.mark.parametrize("n", [4, 8, 16, 21, 32])
def test_min_alpha_for_two_is_where_qdyn_first_differs_from_shortest(n):
    a = sel.min_alpha_for_two(n)
    if a <= 1:
        assert max(quantile_count(a, c, n) for c in range(1, n)) == 1  # at the threshold k is still 1 ...
    if a < 1:
        assert max(quantile_count(a + 1e-6, c, n) for c in range(1, n)) == 2  # ... just above it, 2
    assert sel.min_alpha_for_two(8) == 0.5 and sel.min_alpha_for_two(21) < 0.2 <= sel.min_alpha_for_two(20)


def _stats(n_pos):
    return pd.DataFrame({"problem_id": range(len(n_pos)), "n": 8, "c": 4, "n_pairs": 3, "n_pos": n_pos})


SUMMARY = {"n_pairs": 30, "n_problems_used": 10, "n_problems": 12, "mean_chosen_tokens": 50.0,
           "mean_rejected_tokens": 120.0, "n_problems_skipped": {"all_correct": 1, "no_correct": 1}}


def test_selection_summary_says_when_k_is_one_everywhere():
    lines = sel.seen_selection(_stats([1] * 10), SUMMARY, 0.2)
    assert len(lines) == 3 and "k = 1 for every problem" in lines[1] and "α > 0.5" in lines[1]
    lines = sel.seen_selection(_stats([1] * 8 + [2, 3]), SUMMARY, 0.9)
    assert "2 of 10 problems keep more than one positive" in lines[1] and "k = 1 for every" not in lines[1]


def test_refinement_summary_does_not_claim_an_effect_it_did_not_have():
    s = {"acceptance_rate": 0.012, "n_steps_accepted": 12, "n_steps": 1000, "tokens_per_step_before": 10.0,
         "tokens_per_step_after": 9.98, "steps_per_response_before": 8.0, "steps_per_response_after": 8.0,
         "mean_chosen_tokens_before": 65.6, "mean_chosen_tokens_after": 65.5, "responses_reverted": 2}
    lines = refinement_lesson.seen_refinement(s, 17000, 5000, 0.005)
    assert "barely acts" in lines[0] and "5,000 of 17,000 candidates" in lines[0]
    assert "barely" not in refinement_lesson.seen_refinement({**s, "acceptance_rate": 0.3}, 17000, 5000, 0.005)[0]


def test_tldr_summary_reports_weights_that_did_not_move():
    traj = pd.DataFrame({"run": "tldr", "step": [32, 64, 96], "w_short": [0.51, 0.49, 0.5], "updated": True})
    comp = pd.DataFrame({"acc": [0.997, 0.996, 0.973], "len_t": [59.9, 60.1, 55.5], "acr": [0.469, 0.467, 0.499]},
                        index=["tldr", "static_mix", "tokensqueeze"])
    lines = tldr_lesson.seen_tldr(traj, comp)
    assert "barely moved" in lines[0] and "about the same place" in lines[1] and len(lines) == 3


def test_evaluation_summary_weighs_the_accuracy_change_by_its_se():
    head = {"acc_base": 0.991, "acc_trained": 0.973, "acc_change_points": -1.8, "acc_se_points": 0.6,
            "len_t_base": 112.0, "len_t_trained": 55.5, "len_t_change_pct": -50.5, "auc_base": 0.714,
            "auc_trained": 0.838}
    assert "a real loss of accuracy" in evaluation_lesson.seen_evaluation(head, "toy")[1]
    assert "within two standard errors" in evaluation_lesson.seen_evaluation({**head, "acc_se_points": 1.0}, "toy")[1]


def test_answer_is_collapsed_and_seen_is_markdown():
    a = widgets.answer("42 <b>", title="Answer 1")
    assert a.data.startswith("<details>") and "Answer 1" in a.data and "42 <b>" in a.data
    with pytest.raises(ValueError):
        widgets.seen([])
    assert "What you should have seen" in widgets.seen(["one", "two", "three"]).data


def test_live_renders_the_default_and_rerenders_on_change(capsys):
    calls = []

    def view(alpha, n):
        calls.append((alpha, n))
        return f"view {alpha} {n}"

    a, n = widgets.slider(0.2, 0.0, 1.0, 0.05, "α"), widgets.slider(8, 2, 8, 1, "N")
    box = widgets.live(view, alpha=a, n=n)
    assert calls == [(0.2, 8)]
    assert "view 0.2 8" in capsys.readouterr().out
    if box is not None:  # ipywidgets installed: moving a slider renders again
        n.value = 4
        assert calls[-1] == (0.2, 4)


def test_trace_diff_highlights_only_rewritten_steps():
    orig = "<think>\nStep one is long.\n\nStep two.\n\nStep three.\n</think>\n\\boxed{8}"
    new = "<think>\nStep 1.\n\nStep two.\n\nStep three.\n</think>\n\\boxed{8}"
    html = refinement_lesson.trace_diff_html(orig, new)
    assert html.startswith("<p>1 of 3 steps rewritten") and "<s>" in html and html.count("<s>") == 1


def test_count_scored_ignores_none_and_nan():
    log = pd.DataFrame({"kl": [[0.1, None, math.nan], None, [], [0.2]]})
    assert refinement_lesson.count_scored(log) == 2


def test_qdyn_shortest_warning_follows_alpha_over_four_over_n():
    warn = sel.qdyn_shortest_warning(8, 0.2)
    assert warn is not None and "Q-DYN selects exactly Shortest" in warn and "N ≥ 21" in warn
    assert sel.qdyn_shortest_warning(32, 0.2) is None
    assert sel.qdyn_shortest_warning(21, 0.2) is None and sel.qdyn_shortest_warning(20, 0.2) is not None


def _pstats(c, n_pos, n=8):
    return pd.DataFrame({"problem_id": [f"p{i}" for i in range(len(c))], "n": n, "c": c,
                         "p": [x / n for x in c], "n_pairs": [1 if 0 < x < n else 0 for x in c], "n_pos": n_pos,
                         "cv_tokens": 0.3, "k": 2})


def test_mixed_example_picks_p_nearest_half_and_none_without_mixed():
    st = _pstats([8, 1, 5, 3, 4], [0, 1, 1, 1, 1])
    assert samp.mixed_example(st) == "p4"
    assert samp.mixed_example(_pstats([8, 8], [0, 0])) is None
    assert "No problem of this run has 0 < p < 1" in samp.mixed_example_note(_pstats([8, 8], [0, 0]), None, None)
    samples = pd.DataFrame({"problem_id": "p4", "correct": [True] * 4 + [False] * 4,
                            "n_tokens": [30, 40, 50, 60, 70, 80, 90, 100]})
    assert "4 of 8 samples correct (p = 0.500)" in samp.mixed_example_note(st, samples, "p4")


def test_all_correct_by_difficulty_says_whether_easy_problems_pile_up():
    st = pd.DataFrame({"k": [2, 2, 8, 8], "c": [8, 8, 3, 8], "n": 8})
    assert "easy problems pile up" in samp.all_correct_by_difficulty(st)
    assert "not the easy ones" in samp.all_correct_by_difficulty(st.assign(k=[8, 8, 2, 2]))
    assert "no problem is all correct." in samp.all_correct_by_difficulty(st.assign(c=3))


def test_depth_examples_show_k2_beside_k1_or_say_there_is_none():
    st = _pstats([1, 4, 6, 2], [1, 2, 1, 1], n=24)
    assert sel.depth_examples(st) == ("p1", "p3")  # k = 1 with p nearest 4/24: c = 2
    assert "1 of 4 problems with pairs keep k ≥ 2" in sel.depth_example_note(st, 0.2)
    flat = _pstats([1, 4, 6], [1, 1, 1])
    assert sel.depth_examples(flat) == (None, "p0")
    assert "no problem with k ≥ 2" in sel.depth_example_note(flat, 0.2)


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
    ex = refinement_lesson.kl_examples(_log(), REFINED, 0.005)
    assert ex["verdict"].tolist() == ["accepted", "rejected"]
    acc, rej = ex.iloc[0], ex.iloc[1]
    assert (acc["candidate"], acc["kl"], acc["step_text"]) == ("s0 short", 0.001, "long step zero")
    assert (rej["response_id"], rej["candidate"], rej["kl"]) == ("a/0", "s0 other", 0.02)  # 0.004 < ε passed
    note = refinement_lesson.kl_example_note(ex, 0.005, 5)
    assert note.startswith("Accepted: step 0 of a/0, 24 -> 9 tokens") and "the same step" in note


def test_kl_examples_without_acceptance_say_so():
    log = _log().assign(accepted=False)
    ex = refinement_lesson.kl_examples(log, REFINED, 0.005)
    assert ex["verdict"].tolist() == ["rejected"] and ex["kl"].iloc[0] == 0.009  # the nearest miss overall
    assert "No candidate in this run passed ε = 0.005" in refinement_lesson.kl_example_note(ex, 0.005, 5)
    assert "none was scored" in refinement_lesson.kl_example_note(ex.iloc[:0], 0.005, 0)


def test_refinement_effect_branches():
    s = {"acceptance_rate": 0.3, "tokens_per_step_before": 10.0, "tokens_per_step_after": 8.0}
    assert "shortens steps here: tokens per step -20.0%" in refinement_lesson.refinement_effect(s, 100, 50)
    assert "change only -1.0%" in refinement_lesson.refinement_effect({**s, "tokens_per_step_after": 9.9}, 100, 50)
    low = refinement_lesson.refinement_effect({**s, "acceptance_rate": 0.01, "n_steps_accepted": 3}, 100, 50)
    assert "barely acts" in low and "50 of 100 candidates" in low and "only 3 steps had one under ε" in low
    assert "rarely" not in low
    assert "rarely re-words" in refinement_lesson.refinement_effect({**s, "acceptance_rate": 0.01}, 1000, 4)
    assert "did not act" in refinement_lesson.refinement_effect(s, 100, 0)


# --------------------------------------------------------------------------- derivations, orientation, scope

from tsq_utils.lessons import derivations, orientation  # noqa: E402

LUCKY = ("a7: 7\n\nSo b-4: 7-4=13, total 13.\n\nc+9: 13+9=22\n\ne-7: 22-7=5\n</think>\n\nThe answer is \\boxed{5}.")
CAUGHT = ("a14: 14\n\nb-1: 14-1=23\n\nWait, let me check b-1: 14-1=13. Not 23, so the total is 13.\n\n"
          "c+2: 13+2=15\n</think>\n\nThe answer is \\boxed{15}.")
REVIEWED = "a2: 2\n\nb+9: 2+9=1\n\nLet me double-check the whole chain: 2+9+0=11.\n</think>\n\\boxed{11}"


def test_derivations_find_wrong_steps_and_which_of_them_nothing_corrects():
    assert derivations.wrong_equations(LUCKY) == ["7-4=13", "22-7=5"]
    assert derivations.wrong_steps(LUCKY) == [1, 3]
    assert derivations.uncorrected_errors(LUCKY) == ["7-4=13", "22-7=5"]
    assert not derivations.derivation_ok(CAUGHT) and derivations.uncorrected_errors(CAUGHT) == []  # a check caught it
    assert derivations.uncorrected_errors(REVIEWED) == []  # the closing review of the chain corrects it
    assert derivations.derivation_ok("b+3: the total was 2, and 2+3=5.\n</think>\n\\boxed{5}")
    assert derivations.arithmetic_ok("f+9: 11+9=20") and not derivations.arithmetic_ok("So f+9: 11+9=10, total 10.")


def test_lucky_counts_and_note_come_from_the_tables():
    samples = pd.DataFrame({"text": [LUCKY, CAUGHT, "x\n</think>\\boxed{1}"], "correct": [True, True, False]})
    refined = pd.DataFrame({"chosen_original": [LUCKY, LUCKY, CAUGHT]})
    counts = derivations.lucky_counts(samples, refined)
    assert {k: counts[k] for k in ("n_correct", "n_lucky", "n_chosen", "n_lucky_chosen")} == \
        {"n_correct": 2, "n_lucky": 1, "n_chosen": 2, "n_lucky_chosen": 1}
    note = derivations.lucky_note(counts)
    assert "Of this run's 2 samples graded correct, 1 (50.0%) are lucky" in note and "7-4=13" in note
    assert "no lucky trace" in derivations.lucky_note({**counts, "n_correct": 0})


def test_kl_examples_prefer_a_correct_derivation_over_a_larger_saving():
    log = pd.DataFrame({
        "response_id": ["a/0", "b/1"], "step": [0, 0], "orig_tokens": [24, 20], "cand_tokens": [[5], [9]],
        "kl": [[0.001], [0.002]], "accepted": [True, True], "reverted": False, "new_tokens": [5, 9],
        "kl_chosen": [0.001, 0.002], "cand_texts": [["b-4: 7-4=3"], ["b+3: 2+3=5"]]})
    refined = pd.DataFrame({"problem_id": ["a", "b"], "chosen_sample_idx": [0, 1], "prompt": ["p", "q"],
                            "chosen_original": [LUCKY, "b+3: the total was 2, and 2+3=5.\n</think>\n\\boxed{5}"],
                            "chosen": ["x", "y"]})
    ex = refinement_lesson.kl_examples(log, refined, 0.005)
    assert ex.iloc[0]["response_id"] == "b/1"  # a/0 saves more tokens, but its derivation is lucky
    assert refinement_lesson.pick_kl_step(log, refined)["row"]["response_id"] == "b/1"


def test_refined_scope_says_how_many_responses_were_refined():
    s = {"n_responses_refined": 200, "mean_chosen_tokens_before": 94.7, "mean_chosen_tokens_after": 69.6}
    assert refinement_lesson.refined_scope(s, 622) == ("The 200 refined chosen responses (of 622 distinct ones; the "
                                                       "other 422 pass through unrefined) went 94.7 -> 69.6 tokens "
                                                       "on average")
    assert "pass through" not in refinement_lesson.refined_scope(s, 200)


def test_pipeline_diagram_highlights_its_stage_and_the_top_reads_the_profile():
    html = orientation.pipeline_diagram_html("03")
    assert html == orientation.pipeline_diagram_html("refinement") and html.count("font-weight:bold") == 1
    assert "03 KL refinement</span>" in html.split("font-weight:bold;'>")[1][:40]
    with pytest.raises(ValueError):
        orientation.pipeline_diagram_html("99")
    reads = {"sampling.n": 4, "sampling.temperature": 1.0, "sampling.backend": "transformers"}
    assert orientation.settings_line(reads, ["sampling.n", "sampling.temperature", "sampling.backend"]) == \
        "sampling.n = 4, sampling.temperature = 1, sampling.backend = transformers"
    with pytest.raises(KeyError):
        orientation.settings_line(reads, ["training.eta"])
    assert "recorded 42 s" in orientation.timing_line({"wall_time_s": 42.2, "complete": True})
    assert "No finished run" in orientation.timing_line(None)
