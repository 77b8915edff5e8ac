"""Metrics: accuracy, Len-T, Len-A, Acc(b), AUC, standard errors, tables, A.C.R., JSON."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from tsq_utils.core.config import load_profile
from tsq_utils.method import evaluation
from tsq_utils.model.generation import SampleResult
from tsq_utils.task.base import NoOracleError
from tsq_utils.task.registry import get_task
from tsq_utils.method.evaluation import (
    acc_curve,
    accuracy,
    acr,
    auc,
    eval_decoding,
    len_a,
    len_t,
    metrics_json,
    metrics_table,
    mean_se,
    oracle_results,
    std_error,
)

CORRECT = [True, False, True, True, False]
TOKENS = [100, 400, 300, 200, 50]


def test_small_known_case():
    assert accuracy(CORRECT) == pytest.approx(0.6)
    assert len_t(CORRECT, TOKENS) == pytest.approx(200.0)  # (100 + 300 + 200) / 3
    assert len_a(TOKENS) == pytest.approx(210.0)  # 1050 / 5
    # B = 400: correct contribute 0.75, 0.25, 0.5; wrong contribute 0
    assert auc(CORRECT, TOKENS, 400) == pytest.approx((0.75 + 0.25 + 0.5) / 5)
    assert list(acc_curve(CORRECT, TOKENS, [0, 99, 100, 250, 300, 1000])) == pytest.approx([0, 0, 0.2, 0.4, 0.6, 0.6])


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_closed_form_and_integral_of_curve(seed):
    rng = np.random.default_rng(seed)
    n, budget = 200, 1000
    correct = rng.random(n) < 0.6
    tokens = rng.integers(0, 1500, n)  # some beyond the budget
    closed = np.mean(correct * np.maximum(0.0, 1.0 - tokens / budget))
    assert auc(correct, tokens, budget) == pytest.approx(closed, abs=1e-12)
    # left Riemann sum of the step function on a fine grid converges to the same area
    grid = np.linspace(0, budget, 200_001)
    curve = acc_curve(correct, tokens, grid)
    integral = np.sum(curve[:-1] * np.diff(grid)) / budget
    assert integral == pytest.approx(closed, abs=1e-4)


def test_lengths_beyond_budget_contribute_zero():
    assert auc([True, True], [500, 2000], 1000) == pytest.approx(0.25)  # (0.5 + 0) / 2
    assert auc([True], [1000], 1000) == 0.0
    assert auc([True], [0], 1000) == 1.0


def test_all_wrong():
    assert math.isnan(len_t([False, False], [10, 20]))
    assert auc([False, False], [10, 20], 100) == 0.0
    assert accuracy([False, False]) == 0.0
    assert len_a([10, 20]) == 15.0
    assert list(acc_curve([False, False], [10, 20], [5, 50])) == [0.0, 0.0]


def test_empty_input_raises():
    for fn in (lambda: accuracy([]), lambda: len_a([]), lambda: len_t([], []), lambda: auc([], [], 10),
               lambda: acc_curve([], [], [1]), lambda: std_error([])):
        with pytest.raises(ValueError, match="empty"):
            fn()


def test_bad_input_raises():
    with pytest.raises(ValueError, match="differ"):
        len_t([True], [1, 2])
    with pytest.raises(ValueError, match="budget"):
        auc([True], [1], 0)
    with pytest.raises(ValueError, match="n_tokens"):
        len_a([1, float("nan")])
    with pytest.raises(ValueError, match="n_tokens"):
        auc([True], [-1], 10)
    with pytest.raises(ValueError, match="correct"):
        accuracy([0.5, 1])


def test_paper_sanity_auc_approximation():
    # MATH500 base 7B: Acc 92.8, Len-T 3638 at B = 32768. If every correct response had length Len-T,
    # AUC = Acc * (1 - Len-T/B) exactly; the paper reports 83.6, which the approximation roughly fits.
    correct = np.array([True] * 928 + [False] * 72)
    tokens = np.where(correct, 3638, 32768)
    value = auc(correct, tokens, 32768)
    assert value == pytest.approx(0.928 * (1 - 3638 / 32768), abs=1e-12)
    assert value == pytest.approx(0.825, abs=1e-3)
    assert abs(value - 0.836) < 0.02
    # AUC is linear in lengths of correct responses, so spreading them around Len-T keeps it
    spread = np.where(correct, 3638 + np.tile([-1000, 1000], 500), 32768)
    assert len_t(correct, spread) == pytest.approx(3638)
    assert auc(correct, spread, 32768) == pytest.approx(value, abs=1e-12)


def test_std_error_iid_and_clustered():
    y = [True, False, True, True]
    assert std_error(y) == pytest.approx(np.std([1, 0, 1, 1], ddof=1) / 2)
    # one response per problem: clustered equals i.i.d.
    assert std_error(y, ["a", "b", "c", "d"]) == pytest.approx(std_error(y))
    # two samples per problem: SE of the problem means (1, 0.5, 0): std(ddof=1)/sqrt(3) = 0.5/sqrt(3)
    y2 = [True, True, True, False, False, False]
    groups = ["p1", "p1", "p2", "p2", "p3", "p3"]
    assert std_error(y2, groups) == pytest.approx(0.5 / math.sqrt(3))
    # perfectly correlated samples within problems: clustered SE exceeds the naive one
    y3 = [True] * 4 + [False] * 4
    g3 = ["a"] * 2 + ["b"] * 2 + ["c"] * 2 + ["d"] * 2
    assert std_error(y3, g3) > std_error(y3)
    assert math.isnan(std_error([True]))
    assert math.isnan(std_error([True, False], ["a", "a"]))


def test_mean_se_of_lengths_clustered_by_problem():
    # lengths 10, 12 (problem a) and 30, 32 (problem b): mean 21, residual sums -20 and 20, G = 2:
    # sqrt(2/1 * (400 + 400)) / 4 = 10, where the i.i.d. SE is std(ddof=1)/2 = 5.89
    lengths, groups = [10.0, 12.0, 30.0, 32.0], ["a", "a", "b", "b"]
    assert mean_se(lengths, groups) == pytest.approx(10.0)
    assert mean_se(lengths) == pytest.approx(np.std(lengths, ddof=1) / 2)
    # the accuracy SE is this SE of a 0/1 mean
    y, g = [True, True, True, False, False, False], ["p1", "p1", "p2", "p2", "p3", "p3"]
    assert std_error(y, g) == mean_se([1, 1, 1, 0, 0, 0], g)
    with pytest.raises(ValueError, match="differ in length"):
        mean_se([1.0, 2.0], ["a"])


def results_frame() -> pd.DataFrame:
    rows = []
    specs = {
        ("base", "toy"): [(True, 100), (False, 300), (True, 200), (False, 150)],
        ("base", "math500"): [(False, 80), (False, 90)],
        ("tsq", "toy"): [(True, 50), (True, 150), (True, 600), (False, 40)],
    }
    for (model, bench), items in specs.items():
        for i, (ok, n) in enumerate(items):
            rows.append({"model": model, "benchmark": bench, "problem_id": f"p{i // 2}", "sample_idx": i % 2,
                         "correct": ok, "n_tokens": n, "n_think_tokens": n - 10, "finish_reason": "stop"})
    return pd.DataFrame(rows)


def test_metrics_table_values():
    table = metrics_table(results_frame(), budget=400)
    assert list(table.columns) == ["acc", "acc_se", "len_t", "len_a", "auc", "n"]
    assert list(table.index.names) == ["model", "benchmark"]
    base = table.loc[("base", "toy")]
    assert base["acc"] == 0.5 and base["len_t"] == 150.0 and base["len_a"] == 187.5 and base["n"] == 4
    assert base["auc"] == pytest.approx((0.75 + 0.5) / 4)
    # problems p0 = (T, F), p1 = (T, F): identical means -> clustered SE 0
    assert base["acc_se"] == pytest.approx(0.0)
    wrong = table.loc[("base", "math500")]
    assert wrong["acc"] == 0.0 and math.isnan(wrong["len_t"]) and wrong["auc"] == 0.0
    tsq = table.loc[("tsq", "toy")]
    assert tsq["len_t"] == pytest.approx(800 / 3)
    assert tsq["auc"] == pytest.approx((350 / 400 + 250 / 400 + 0) / 4)  # 600 > B contributes 0


def test_metrics_table_bad_input():
    with pytest.raises(ValueError, match="n_tokens"):
        metrics_table(results_frame().drop(columns=["n_tokens"]), budget=400)
    with pytest.raises(ValueError, match="empty"):
        metrics_table(results_frame().iloc[:0], budget=400)
    with pytest.raises(ValueError, match="budget"):
        metrics_table(results_frame(), budget=-1)


def test_metrics_json_is_valid_json():
    out = metrics_json(metrics_table(results_frame(), budget=400))
    assert set(out) == {"base", "tsq"} and set(out["base"]) == {"toy", "math500"}
    assert out["base"]["math500"]["len_t"] is None
    assert out["base"]["toy"]["n"] == 4 and isinstance(out["base"]["toy"]["n"], int)
    assert out["base"]["toy"]["acc"] == 0.5
    text = json.dumps(out, allow_nan=False)  # raises if a NaN slipped through
    assert json.loads(text) == out


def test_acr_known_values():
    # 1 - 50/100 = 0.5; 1 - 300/200 < 0 -> 0; 1 - 75/100 = 0.25
    assert acr({"a": 50, "b": 300, "c": 75}, {"a": 100, "b": 200, "c": 100}) == pytest.approx(0.25)
    assert acr({"a": 100}, {"a": 100}) == 0.0
    with pytest.raises(ValueError, match="differ"):
        acr({"a": 1}, {"b": 2})
    with pytest.raises(ValueError, match="original length"):
        acr({"a": 1}, {"a": 0})
    with pytest.raises(ValueError, match="no benchmarks"):
        acr({}, {})


# --------------------------------------------------------------------------- running the models, through the task


def test_eval_decoding_is_the_evaluation_settings():
    p = load_profile("ci")
    spec, E = eval_decoding(p, 3), p.evaluation
    assert (spec.n, spec.temperature, spec.top_p, spec.max_new_tokens, spec.batch_size, spec.seed) == (
        E.n_samples, E.temperature, E.top_p, E.max_new_tokens, p.sampling.batch_size, 3)
    assert eval_decoding(p, 3, n=7).n == 7


def test_oracle_results_come_from_the_task(tiny_toy_tokenizer):
    toy = get_task("toy")
    problems = toy.problems(load_profile("ci"), tiny_toy_tokenizer, "test", n=3)
    res = oracle_results(problems, tiny_toy_tokenizer, toy)
    assert list(res["text"]) == [toy.oracle_text(q) for q in problems["problem"]]
    assert set(res["benchmark"]) == {"toy"} and res["correct"].all() and (res["n_think_tokens"] < res["n_tokens"]).all()
    with pytest.raises(NoOracleError):
        oracle_results(problems, tiny_toy_tokenizer, get_task("math500"))


def test_budget_forced_answers_are_graded_by_the_benchmarks_task(monkeypatch, tiny_toy_tokenizer):
    """Over budget, the thinking is cut and '</think>' forced; the forced answer is graded by the task of its
    benchmark (here the toy world's exact match)."""
    answers = iter([["The answer is \\boxed{5}."], ["The answer is \\boxed{6}."]])
    monkeypatch.setattr(evaluation, "sample", lambda model, tok, prompts, spec, backend="transformers":
                        SampleResult([next(answers) for _ in prompts], [[1]] * len(prompts), [["stop"]] * len(prompts)))
    results = pd.DataFrame({"model": "m", "benchmark": "toy", "prompt": ["p", "p"], "gold": ["5", "5"],
                            "text": ["a b c d e f\n</think>\n\\boxed{5}", "a\n</think>\n\\boxed{4}"],
                            "n_think_tokens": [6, 1], "correct": [True, False]})
    out = evaluation.budget_forced_curve({"m": None}, tiny_toy_tokenizer, results, [3])
    # the first response is over budget and forced (answer 5: correct); the second fits and keeps its grade (wrong)
    assert out.to_dict("records") == [{"model": "m", "benchmark": "toy", "budget": 3, "acc": 0.5, "n": 2}]
