"""Adaptive depth selection: k, positives, pairing, cap, skipped problems, variants, determinism."""

import math
from fractions import Fraction

import pandas as pd
import pytest

from tsq_utils.method.selection import (
    PAIR_COLUMNS,
    STATS_COLUMNS,
    count_from_q,
    quantile_count,
    select_pairs,
    selection_summary,
)


def make_samples(problems: dict[str, list[tuple]]) -> pd.DataFrame:
    """A samples table from {problem_id: [(n_tokens, correct[, finish_reason]), ...]} (sample_idx = position)."""
    rows = []
    for pid, items in problems.items():
        for i, item in enumerate(items):
            n_tok, ok, fin = (item + ("stop",))[:3]
            rows.append({
                "problem_id": pid, "k": 3, "sample_idx": i, "prompt": f"Q {pid} <think>\n",
                "text": f"{pid}/{i}", "n_tokens": n_tok, "n_think_tokens": max(0, n_tok - 5),
                "correct": ok, "status": "correct" if ok else "wrong", "finish_reason": fin, "gold": "1",
            })
    return pd.DataFrame(rows)


# Problem "a": 10 samples. Correct and finished: idx 0 (50), 1 (30), 2 (40), 3 (30), 4 (80) -> c = 5,
# p = 0.5. Incorrect: 5 (35), 6 (20), 7 (100), 9 (60), and 8 (45) which is graded correct but was
# cut by the token limit. Sorted correct: 1 (30), 3 (30, tie broken by sample_idx), 2 (40), 0, 4.
# Incorrect longer than 30, by length: 5 (35), 8 (45), 9 (60), 7 (100); 6 (20) is shorter.
PROBLEM_A = [(50, True), (30, True), (40, True), (30, True), (80, True),
             (35, False), (20, False), (100, False), (45, True, "length"), (60, False)]


def pairs_of(pairs: pd.DataFrame, pid: str = "a") -> list[tuple[int, int]]:
    sub = pairs[pairs["problem_id"] == pid]
    return list(zip(sub["chosen_sample_idx"], sub["rejected_sample_idx"]))


@pytest.mark.parametrize("alpha,c,n,k", [
    (0.2, 4, 8, 1),      # q = 0.1, q*c = 0.4 -> 1
    (0.2, 5, 10, 1),     # q = 0.1, q*c = 0.5 -> 1
    (0.2, 15, 16, 1),    # q = 0.0125, q*c = 0.1875 -> 1
    (0.0, 7, 10, 1),     # alpha = 0: the shortest only
    (0.0, 1, 1, 1),
    (1.0, 5, 10, 3),     # q = 0.5, q*c = 2.5 -> 3
    (1.0, 8, 16, 4),     # q*c = 4 exactly -> 4
    (1.0, 1, 2, 1),
    (1.0, 16, 16, 1),    # p = 1: q = 0 -> max(1, 0)
    (0.5, 10, 20, 3),    # q = 0.25, 2.5 -> 3
    (0.3, 10, 20, 2),    # q = 0.15, 1.5 -> 2
    (0.4, 20, 32, 3),    # 0.4*(12/32)*20 = 3 exactly; naive floating point gives 3.0000000000000004 -> 4
    (0.45, 10, 30, 3),   # 0.45*(20/30)*10 = 3 exactly; same trap
    (0.2, 0, 8, 0),      # no correct response: no positive
])
def test_quantile_count_hand_values(alpha, c, n, k):
    assert quantile_count(alpha, c, n) == k


def test_quantile_count_matches_exact_arithmetic_on_a_grid():
    for a100 in range(0, 101, 5):
        for n in range(1, 33):
            for c in range(1, n + 1):
                exact = max(1, math.ceil(Fraction(a100, 100) * (1 - Fraction(c, n)) * c))
                assert quantile_count(a100 / 100, c, n) == exact, (a100, c, n)


def test_brief_example_and_count_from_q():
    assert quantile_count(0.2, 2, 4) == 1  # 0.2*(1-0.5)*4 = 0.4
    assert count_from_q(0.2 * (1 - 0.5), 4) == 1
    assert count_from_q(0.1, 30) == 3  # 0.1*30 = 3.0000000000000004 in floating point
    assert count_from_q(1.0, 5) == 5
    assert count_from_q(0.5, 0) == 0


@pytest.mark.parametrize("args", [(-0.1, 1, 2), (1.1, 1, 2), (0.2, 3, 2), (0.2, -1, 2), (0.2, 1, 0), (0.2, 1.5, 2)])
def test_quantile_count_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        quantile_count(*args)


def test_q_dyn_positive_is_shortest_correct_with_tie_by_sample_idx():
    pairs, stats = select_pairs(make_samples({"a": PROBLEM_A}), variant="q_dyn", alpha=0.2)
    # k = 1: only idx 1 (30 tokens; idx 3 has the same length but a higher sample_idx)
    assert pairs_of(pairs) == [(1, 5), (1, 8), (1, 9), (1, 7)]
    assert list(pairs["kind"]) == ["incorrect"] * 4
    assert list(pairs["chosen_tokens"]) == [30] * 4
    assert list(pairs["rejected_tokens"]) == [35, 45, 60, 100]
    assert (pairs["p"] == 0.5).all()
    assert list(pairs.columns) == list(PAIR_COLUMNS)
    row = stats.iloc[0]
    assert (row["n"], row["c"], row["p"], row["n_pos"], row["n_pairs"]) == (10, 5, 0.5, 1, 4)
    assert row["q"] == pytest.approx(0.1)
    assert row["pos_tokens"] == [30]
    assert (row["n_incorrect"], row["n_unfinished"], row["reason"]) == (5, 1, "")
    assert list(stats.columns) == list(STATS_COLUMNS)


def test_unfinished_response_counts_as_incorrect():
    pairs, stats = select_pairs(make_samples({"a": PROBLEM_A}))
    # idx 8 is graded correct but finish_reason "length": rejected, never chosen, not in c
    assert 8 in set(pairs["rejected_sample_idx"])
    assert 8 not in set(pairs["chosen_sample_idx"])
    assert stats.iloc[0]["c"] == 5


def test_q_dyn_alpha_one_takes_three_positives():
    pairs, stats = select_pairs(make_samples({"a": PROBLEM_A}), variant="q_dyn", alpha=1.0)
    # q = 0.5, k = ceil(2.5) = 3: idx 1 (30), 3 (30), 2 (40); idx 2 only pairs with 45, 60, 100
    assert pairs_of(pairs) == [(1, 5), (1, 8), (1, 9), (1, 7), (3, 5), (3, 8), (3, 9), (3, 7), (2, 8), (2, 9), (2, 7)]
    assert stats.iloc[0]["pos_tokens"] == [30, 30, 40]
    assert stats.iloc[0]["n_pos_paired"] == 3


def test_shortest_ignores_alpha():
    pairs, stats = select_pairs(make_samples({"a": PROBLEM_A}), variant="shortest", alpha=1.0)
    assert set(pairs["chosen_sample_idx"]) == {1}
    assert stats.iloc[0]["n_pos"] == 1 and stats.iloc[0]["q"] == 0.0


def test_q_fix_does_not_depend_on_p():
    # "a": c = 5 of 10; "e": c = 5 of 6 (one long wrong answer). q_fix = 0.4 -> k = ceil(2.0) = 2 for both.
    problem_e = [(10, True), (12, True), (14, True), (16, True), (18, True), (99, False)]
    samples = make_samples({"a": PROBLEM_A, "e": problem_e})
    _, stats = select_pairs(samples, variant="q_fix", q_fix=0.4, alpha=0.2)
    assert list(stats["n_pos"]) == [2, 2]
    assert list(stats["q"]) == [0.4, 0.4]
    _, stats_dyn = select_pairs(samples, variant="q_dyn", alpha=1.0)
    assert list(stats_dyn["n_pos"]) == [3, 1]  # q_dyn: 2.5 -> 3 and (1/6)*5 -> 1


def test_q_dyn_extra_adds_long_correct_as_rejected():
    pairs, stats = select_pairs(make_samples({"a": PROBLEM_A}), variant="q_dyn_extra", alpha=0.2, extra_neg_ratio=1.5)
    # positive idx 1 (30 tokens): correct responses longer than 45 are idx 0 (50) and 4 (80)
    assert pairs_of(pairs) == [(1, 5), (1, 8), (1, 9), (1, 7), (1, 0), (1, 4)]
    assert list(pairs["kind"]) == ["incorrect"] * 4 + ["extra_negative"] * 2
    assert stats.iloc[0]["n_extra_pairs"] == 2
    # 40 (idx 2) is not longer than 1.5 x 30 = 45; a larger ratio drops idx 0 (50 <= 60) as well
    pairs2, _ = select_pairs(make_samples({"a": PROBLEM_A}), variant="q_dyn_extra", extra_neg_ratio=2.0)
    assert pairs_of(pairs2)[-1:] == [(1, 4)]


def test_skipped_problems_are_counted_with_reason():
    samples = make_samples({
        "a": PROBLEM_A,
        "b_all_right": [(10, True), (20, True), (30, True)],
        "c_all_wrong": [(10, False), (20, False), (30, True, "length")],
        "d_no_longer": [(50, True), (40, False), (50, False)],  # equal length is not longer
    })
    for variant in ("shortest", "q_fix", "q_dyn", "q_dyn_extra"):
        pairs, stats = select_pairs(samples, variant=variant)
        reasons = dict(zip(stats["problem_id"], stats["reason"]))
        assert reasons == {"a": "", "b_all_right": "all_correct", "c_all_wrong": "no_correct",
                           "d_no_longer": "no_longer_negative"}, variant
        assert set(pairs["problem_id"]) == {"a"}
    summary = selection_summary(pairs, stats)
    assert summary["n_problems"] == 4 and summary["n_problems_used"] == 1
    assert summary["n_problems_skipped"] == {"all_correct": 1, "no_correct": 1, "no_longer_negative": 1}


def test_summary_values():
    pairs, stats = select_pairs(make_samples({"a": PROBLEM_A}), variant="q_dyn_extra")
    s = selection_summary(pairs, stats)
    assert s["n_pairs"] == 6 and s["n_extra_negative_pairs"] == 2
    assert s["mean_chosen_tokens"] == 30.0
    assert s["mean_rejected_tokens"] == pytest.approx((35 + 45 + 60 + 100 + 50 + 80) / 6)
    assert s["mean_pairs_per_used_problem"] == 6.0


def test_no_pairs_at_all_gives_typed_empty_table():
    pairs, stats = select_pairs(make_samples({"b": [(10, True), (20, True)]}))
    assert pairs.empty and list(pairs.columns) == list(PAIR_COLUMNS)
    assert str(pairs["chosen_tokens"].dtype) == "int64"
    s = selection_summary(pairs, stats)
    assert s["n_pairs"] == 0 and s["mean_chosen_tokens"] is None


def long_problem() -> list[tuple]:
    # one correct (5 tokens) and 100 longer incorrect responses -> 100 candidate pairs
    return [(5, True)] + [(10 + i, False) for i in range(100)]


def test_cap_subsamples_max_pairs():
    pairs, stats = select_pairs(make_samples({"x": long_problem()}), max_pairs=10, seed=3)
    assert len(pairs) == 10
    assert stats.iloc[0]["n_candidate_pairs"] == 100 and stats.iloc[0]["n_pairs"] == 10
    rejected = list(pairs["rejected_sample_idx"])
    assert len(set(rejected)) == 10 and rejected == sorted(rejected)  # a subset, kept in candidate order
    # not simply the first ten
    assert rejected != list(range(1, 11))


def test_cap_not_applied_at_or_below_limit():
    pairs, _ = select_pairs(make_samples({"x": long_problem()}), max_pairs=100)
    assert len(pairs) == 100


def test_determinism_and_row_order_independence():
    samples = make_samples({"x": long_problem(), "a": PROBLEM_A, "y": long_problem()})
    p1, s1 = select_pairs(samples, max_pairs=7, seed=11)
    p2, s2 = select_pairs(samples.sample(frac=1.0, random_state=5), max_pairs=7, seed=11)
    pd.testing.assert_frame_equal(p1, p2)
    pd.testing.assert_frame_equal(s1, s2)
    p3, _ = select_pairs(samples, max_pairs=7, seed=12)
    assert not p1[["problem_id", "rejected_sample_idx"]].equals(p3[["problem_id", "rejected_sample_idx"]])
    # a problem's subsample does not depend on which other problems are in the table
    alone, _ = select_pairs(make_samples({"x": long_problem()}), max_pairs=7, seed=11)
    assert list(alone["rejected_sample_idx"]) == list(p1.loc[p1["problem_id"] == "x", "rejected_sample_idx"])


def test_pair_rows_carry_texts_and_prompt():
    pairs, _ = select_pairs(make_samples({"a": PROBLEM_A}))
    first = pairs.iloc[0]
    assert (first["chosen"], first["rejected"], first["prompt"], first["k"]) == ("a/1", "a/5", "Q a <think>\n", 3)


@pytest.mark.parametrize("column", ["problem_id", "n_tokens", "correct", "finish_reason", "text", "prompt"])
def test_missing_column_is_named(column):
    with pytest.raises(ValueError, match=column):
        select_pairs(make_samples({"a": PROBLEM_A}).drop(columns=[column]))


def test_bad_inputs():
    samples = make_samples({"a": PROBLEM_A})
    with pytest.raises(ValueError, match="empty"):
        select_pairs(samples.iloc[:0])
    with pytest.raises(ValueError, match="variant"):
        select_pairs(samples, variant="longest")
    with pytest.raises(ValueError, match="alpha"):
        select_pairs(samples, alpha=1.5)
    with pytest.raises(ValueError, match="max_pairs"):
        select_pairs(samples, max_pairs=0)
    with pytest.raises(ValueError, match="duplicate"):
        select_pairs(pd.concat([samples, samples.iloc[:1]]))
    bad = samples.copy()
    bad.loc[0, "n_tokens"] = -3
    with pytest.raises(ValueError, match="n_tokens"):
        select_pairs(bad)
    bad = samples.astype({"correct": object})
    bad.loc[0, "correct"] = None
    with pytest.raises(ValueError, match="correct"):
        select_pairs(bad)
    bad = samples.copy()
    bad.loc[0, "prompt"] = "another prompt"
    with pytest.raises(ValueError, match="prompt"):
        select_pairs(bad)


def test_variant_registry_agrees_with_the_profile_schema():
    """Every registered variant is a choice of selection.variant and back; each declares knobs that exist."""
    import dataclasses

    from tsq_utils.method import selection
    from tsq_utils.core.config import SelectionConfig

    field = {f.name: f for f in dataclasses.fields(SelectionConfig)}
    assert tuple(selection.REGISTRY) == selection.VARIANTS == field["variant"].metadata["choices"]
    for v in selection.REGISTRY.values():
        assert set(v.knobs) <= set(field) - {"variant", "max_pairs"}, v.name
    with pytest.raises(ValueError, match="already registered"):
        selection.register(selection.REGISTRY["q_dyn"])


def test_registry_quantiles_are_the_papers():
    from tsq_utils.method import selection

    knobs = {"alpha": 0.2, "q_fix": 0.35, "extra_neg_ratio": 1.5}
    q = {name: v.quantile(knobs, 0.25) for name, v in selection.REGISTRY.items()}
    assert q == {"shortest": 0.0, "q_fix": 0.35, "q_dyn": 0.2 * 0.75, "q_dyn_extra": 0.2 * 0.75}
    assert [v.name for v in selection.REGISTRY.values() if v.extra_negatives] == ["q_dyn_extra"]


def test_a_registered_variant_selects_with_its_quantile(monkeypatch):
    """A new variant needs only its registry entry (and a schema choice to reach it from a profile)."""
    from tsq_utils.method import selection

    monkeypatch.setitem(selection.REGISTRY, "half", selection.Variant("half", (), lambda k, p: 0.5))
    samples = make_samples({"a": [(10, True), (11, True), (12, True), (13, True), (20, False), (30, False)]})
    pairs, stats = select_pairs(samples, variant="half", seed=0)
    assert stats["n_pos"].tolist() == [2] and len(pairs) == 4  # ceil(0.5 * 4) = 2 positives x 2 longer wrong
    with pytest.raises(ValueError, match="unknown selection variant 'halve'"):
        select_pairs(samples, variant="halve")


def test_select_with_passes_every_config_field():
    """select_with(cfg) is select_pairs with each SelectionConfig field as its keyword (every field is one), so the
    pipeline and the ablation rows select with the same settings and a new knob cannot be left out."""
    import dataclasses
    import inspect

    from tsq_utils.core.config import SelectionConfig
    from tsq_utils.method import selection

    assert {f.name for f in dataclasses.fields(SelectionConfig)} <= set(inspect.signature(select_pairs).parameters)
    samples = make_samples({"a": PROBLEM_A})
    cfg = SelectionConfig(variant="q_fix", q_fix=0.5, max_pairs=3)
    got = selection.select_with(samples, cfg, seed=2)
    want = select_pairs(samples, variant="q_fix", q_fix=0.5, max_pairs=3, seed=2)
    pd.testing.assert_frame_equal(got[0], want[0])
    pd.testing.assert_frame_equal(got[1], want[1])
    assert len(got[0]) == 3  # q = 0.5 of c = 5 gives 3 positives, and the cap keeps 3 of their pairs
