"""The effect sentences of notebooks 05-07: each branch chosen by the numbers (a loss, a tie, a mechanism that did not
act), with the numbers of the toy run where a branch was written for it."""

import math

import pandas as pd
import pytest

from tsq_utils.lessons import claims


def _head(acc_base=0.991, acc_trained=0.973, change=-1.8, se=0.6, len_b=112.0, len_t=55.5, auc_b=0.714, auc_t=0.838):
    return {"acc_base": acc_base, "acc_trained": acc_trained, "acc_change_points": change, "acc_se_points": se,
            "len_t_base": len_b, "len_t_trained": len_t, "auc_base": auc_b, "auc_trained": auc_t}


def test_accuracy_change_branches():
    # the toy run: 99.1 -> 97.3, -1.8 ± 0.6 is 3 SEs: a loss, never "the same accuracy"
    s = claims.accuracy_change(_head())
    assert s == ("accuracy 99.1 -> 97.3 (-1.8 ± 0.6 points, SE of the difference): a loss of 3.0 standard errors: "
                 "the compression cost accuracy here.")
    assert "within two standard errors" in claims.accuracy_change(_head(acc_trained=0.985, change=-0.6))
    assert "a gain of 4.0 standard errors" in claims.accuracy_change(_head(acc_trained=0.999, change=2.4))
    assert "no standard error" in claims.accuracy_change(_head(se=float("nan")))
    assert "no standard error" in claims.accuracy_change(_head(se=0.0))


def test_budget_curve_branches():
    assert "rises earlier" in claims.budget_curve(_head()) and "a loss of 3.0" in claims.budget_curve(_head())
    assert "area under the curve is larger" in claims.budget_curve(_head(len_t=120.0))
    assert "no gain in accuracy within a budget" in claims.budget_curve(_head(auc_t=0.7))


def test_pure_dpo_against_the_papers_share():
    ours = {"acc": 0.955, "n_seeds": 3}
    # the toy run: 35.5 vs 95.5 keeps 37%; the paper's 48.3 vs 57.5 keeps 84%
    s = claims.pure_dpo({"acc": 0.355, "n_seeds": 3}, ours)
    assert "keeps 37% of the accuracy; the paper's pure DPO keeps 84% (48.3 vs 57.5 on AIME24)" in s
    assert s.endswith("collapses far deeper than the paper's.") and "as in the paper" not in s
    assert claims.pure_dpo({"acc": 0.80, "n_seeds": 3}, ours).endswith("about the paper's loss.")  # 84%
    assert claims.pure_dpo({"acc": 0.90, "n_seeds": 3}, ours).endswith("loses less than the paper's.")
    assert "pure DPO loses nothing in this run" in claims.pure_dpo({"acc": 0.955, "n_seeds": 3}, ours)  # a tie
    assert math.isclose(claims.PAPER_DPO_ACC / claims.PAPER_DPO_L_SFT_ACC, 0.84, abs_tol=0.005)


def _row(acc=0.986, len_t=55.3, n_pairs=300, acc_hard=0.975, acc_hard_se=0.013):
    return {"acc": acc, "len_t": len_t, "n_pairs": n_pairs, "acc_hard": acc_hard, "acc_hard_se": acc_hard_se}


def test_shortest_vs_q_dyn_branches():
    same = claims.shortest_vs_q_dyn(_row(), _row(), n=8, alpha=0.2)  # the toy run: one model
    assert same.startswith("Shortest and Q-DYN gave the same numbers") and "N = 8 and α = 0.2 n₊ = 1" in same
    assert "cut corners" not in same
    alike = claims.shortest_vs_q_dyn(_row(), _row(), n=32, alpha=0.2)  # k >= 2 possible: the models merely agree
    assert "answer alike" in alike and "n₊ = 1" not in alike
    worse = claims.shortest_vs_q_dyn(_row(acc=0.95, acc_hard=0.90), _row(), n=24, alpha=0.2)
    assert "-7.5 ±" in worse and worse.endswith("as in the paper.")
    assert "within two standard errors" in claims.shortest_vs_q_dyn(_row(acc=0.98, acc_hard=0.97), _row(), 24, 0.2)
    assert claims.shortest_vs_q_dyn(_row(acc=0.99, acc_hard=1.0, acc_hard_se=0.001), _row(acc_hard_se=0.001), 24,
                                    0.2).endswith("against the paper.")


def _traj(ws, run="tldr"):
    return pd.DataFrame({"run": run, "step": range(16, 16 * (len(ws) + 1), 16), "w_short": ws, "updated": True})


def test_tldr_weights_branches():
    flat = claims.tldr_weights(_traj([0.5417] * 6), {"a_s": 1.0, "a_l": 1.0})  # the toy run
    assert flat.startswith("TLDR's short-pool weight went 0.5 -> 0.542 over 6 updates: the weights hardly moved")
    assert "A_S = 1.000, A_L = 1.000" in flat and "almost the static 1:1 mix" in flat
    assert "nearly cancel" in claims.tldr_weights(_traj([0.52, 0.49]), {"a_s": 0.8, "a_l": 0.95})
    assert "the re-weighting acted" in claims.tldr_weights(_traj([0.7, 0.9]), {"a_s": 0.8, "a_l": 0.95})


def test_long_model_situation_follows_the_references():
    toy = claims.long_model_situation({"t_s": 55.0, "t_l": 195.0})  # the toy run prints b = (1.000, 0.000)
    assert "$b = (1, 0)$ and the short pool gains" in toy and "195.0" in toy
    flat = claims.long_model_situation({"t_s": 85.2, "t_l": 85.2})  # the ci run: no token gap
    assert "$b = (0, 0)$" in flat and "(1, 0)" not in flat


def test_short_model_situation_follows_the_references():
    toy = claims.short_model_situation({"a_s": 1.0, "a_l": 1.0})  # the toy run prints b = (0.000, 0.000)
    assert "$b = (0, 0)$" in toy and "(0, 1)" not in toy
    gap = claims.short_model_situation({"a_s": 0.8, "a_l": 0.95})
    assert "$b = (0, 1)$ and the long pool gains" in gap
    floored = claims.short_model_situation({"a_s": 0.99, "a_l": 1.0, "min_gap": [1.0, 0.02]})  # gap below one problem
    assert "$b = (0, 0.5)$" in floored


def test_trace_pair_picks_the_first_problem_a_fails_and_b_solves():
    def res(correct):
        return pd.DataFrame({"problem_id": ["p1", "p1", "p2", "p3"], "sample_idx": [0, 1, 0, 0], "k": [2, 2, 3, 4],
                             "gold": ["1", "1", "2", "3"], "correct": correct,
                             "text": [f"t{i}" for i in range(4)], "n_tokens": [10, 11, 12, 13]})
    pair = claims.trace_pair(res([True, True, False, False]), res([True, False, True, True]))
    assert (pair["problem_id"], pair["sample_idx"], pair["gold"], pair["k"]) == ("p2", 0, "2", 3)
    assert (pair["text_a"], pair["n_tokens_b"]) == ("t2", 12)
    assert claims.trace_pair(res([True] * 4), res([True] * 4)) is None


@pytest.mark.parametrize("text, n, expect", [("abc", 5, "abc"), ("abcdefgh", 3, "abc\n[... 5 more characters]")])
def test_truncate(text, n, expect):
    assert claims.truncate(text, n) == expect


def _tables(dpo_acc=0.355, same=True, kl_len=55.4):
    t2 = pd.DataFrame([{"name": "table2/shortest", **_row()},
                       {"name": "table2/q_dyn", **_row(acc_hard=0.975 if same else 0.99)}])
    t3 = pd.DataFrame([{"name": "table3/none", "acc": 0.986, "len_t": 55.3, "acceptance_rate": float("nan")},
                       {"name": "table3/kl", "acc": 0.955, "len_t": kl_len, "acceptance_rate": 0.012}])
    t4 = pd.DataFrame([{"name": "table4/dpo", "acc": dpo_acc, "n_seeds": 3},
                       {"name": "table4/dpo_l_sft", "acc": 0.955, "n_seeds": 3}])
    return {"table2": t2, "table3": t3, "table4": t4}


def test_seen_ablations_lines():
    lines = claims.seen_ablations(_tables(), n=8, alpha=0.2)  # the toy run's tables
    assert lines[0].endswith("far deeper than the paper's.") and lines[1].startswith("Shortest and Q-DYN gave the same")
    assert lines[2].startswith("KL refinement: Len-T 55.3 -> 55.4 (it rewrote 1.2% of") and "does not act" in lines[2]
    assert claims.seen_ablations(_tables(kl_len=45.0), 8, 0.2)[2].endswith("a visible shortening.")
    assert claims.seen_ablations({}, 8, 0.2) == ["Some tables have no results yet: run the rows first."] * 3


def test_seen_tldr_first_line_says_why():
    comp = pd.DataFrame({"acc": [0.98, 0.98, 0.97], "len_t": [58.0, 58.2, 55.5], "acr": [0.5, 0.5, 0.49]},
                        index=["tldr", "static_mix", "tokensqueeze"])
    lines = claims.seen_tldr(_traj([0.5417] * 6), comp, {"a_s": 1.0, "a_l": 1.0})
    assert len(lines) == 3 and "A_S = 1.000, A_L = 1.000" in lines[0] and lines[1].startswith("TLDR vs static mix")


def _tldr_results(acc_t, acc_s, len_t, len_s, n_problems=40, n=5, seed=0):
    """Per-response results of 'tldr' and 'static_mix' on the same problems, with the given accuracies and lengths."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for model, acc, length in (("tldr", acc_t, len_t), ("static_mix", acc_s, len_s)):
        for i in range(n_problems):
            for j in range(n):
                rows.append({"model": model, "problem_id": f"p{i}", "correct": bool(rng.random() < acc),
                             "n_tokens": int(length + rng.integers(-3, 4))})
    return pd.DataFrame(rows)


def test_paired_difference_closed_form():
    """Two problems answered twice by each model: the accuracy SE is the SD of the per-problem differences / sqrt(2)."""
    rows = [("tldr", "a", True, 10), ("tldr", "a", True, 12), ("tldr", "b", False, 30), ("tldr", "b", True, 14),
            ("static_mix", "a", True, 20), ("static_mix", "a", False, 40), ("static_mix", "b", False, 30),
            ("static_mix", "b", False, 30)]
    res = pd.DataFrame(rows, columns=["model", "problem_id", "correct", "n_tokens"])
    d = claims.paired_difference(res, "tldr", "static_mix")
    # per-problem differences: a 1 - 0.5 = 0.5, b 0.5 - 0 = 0.5: no spread, SE 0
    assert d["acc_diff"] == pytest.approx(0.75 - 0.25) and d["acc_se"] == pytest.approx(0.0)
    assert d["len_t_diff"] == pytest.approx(12.0 - 20.0)
    with pytest.raises(ValueError, match="no results for model"):
        claims.paired_difference(res, "tldr", "oracle")


def test_dynamic_vs_static_verdicts():
    beats = claims.dynamic_vs_static(_tldr_results(0.95, 0.60, 60, 60))
    assert "TLDR better, beyond 2 SE" in beats
    assert beats.endswith("dynamic re-weighting beats the static mix beyond noise.")
    loses = claims.dynamic_vs_static(_tldr_results(0.80, 0.80, 90, 60, seed=1))
    assert loses.endswith("the static mix beats dynamic re-weighting beyond noise.")
    tie = claims.dynamic_vs_static(_tldr_results(0.8, 0.8, 60, 60, seed=2))
    assert tie.endswith("no difference beyond noise.") and "within noise" in tie
    trade = claims.dynamic_vs_static(_tldr_results(0.95, 0.55, 90, 60, seed=3))
    assert trade.endswith("a trade-off: each is better on one count, beyond noise.")
