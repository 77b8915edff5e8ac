"""Stage 01 helpers: problem tables, sample_and_grade (schema, grading, unfinished responses), per-problem
statistics."""

import math
from dataclasses import replace

import pandas as pd
import pytest
import torch

from tsq_utils.method import sampling
from tsq_utils.task import toy as tw
from tsq_utils.core.config import load_profile
from tsq_utils.model.generation import Decoding, SampleResult, count_tokens
from tsq_utils.method.sampling import (
    SAMPLE_COLUMNS,
    SampleRun,
    per_problem_stats,
    sample_and_grade,
    sampling_decoding,
    sampling_summary,
    summary_by_k,
)
from tsq_utils.task.registry import get_task

TOY = get_task("toy")
QUIET = SampleRun(progress=False)


@pytest.fixture(scope="module")
def problems(tok):
    return tw.problem_table(tw.make_problems(3, seed=0, k_min=2, k_max=4), tok)


def make_samples(rows: list[tuple]) -> pd.DataFrame:
    """A samples table from (problem_id, k, n_tokens, correct, finish_reason) rows; sample_idx counts per problem."""
    out, idx = [], {}
    for pid, k, n, ok, fin in rows:
        j = idx.get(pid, 0)
        idx[pid] = j + 1
        out.append({"problem_id": pid, "k": k, "sample_idx": j, "prompt": f"<|user|>\n{pid}\n<|assistant|>\n<think>\n",
                    "text": f"{pid}/{j}", "n_tokens": n, "n_think_tokens": max(0, n - 5), "correct": ok,
                    "status": "correct" if ok else "wrong", "finish_reason": fin, "gold": "1"})
    return pd.DataFrame(out, columns=SAMPLE_COLUMNS)


# P1 (k=2): tokens 10, 20, 30, 40, correct T F T T -> c = 3, p = 0.75, mean 25, std (ddof 0) sqrt(125), CV sqrt(125)/25
# P2 (k=2): tokens 5, 5, both wrong, the second cut by the limit -> p = 0, std 0, CV 0
# P3 (k=3): tokens 12, 36, both correct -> p = 1, mean 24, std 12, CV 0.5
HAND = make_samples([
    ("P1", 2, 10, True, "stop"), ("P1", 2, 20, False, "stop"), ("P1", 2, 30, True, "stop"), ("P1", 2, 40, True, "stop"),
    ("P2", 2, 5, False, "stop"), ("P2", 2, 5, False, "length"),
    ("P3", 3, 12, True, "stop"), ("P3", 3, 36, True, "stop"),
])
CV1 = math.sqrt(125) / 25


def test_toy_problem_table(tok):
    probs = tw.make_problems(4, seed=1)
    df = tw.problem_table(probs, tok)
    assert list(df.columns) == ["problem_id", "k", "problem", "gold", "prompt", "source"]
    assert list(df["problem_id"]) == [p.problem_id for p in probs]
    assert list(df["gold"]) == [str(p.answer) for p in probs]
    assert all(df["prompt"][i] == tw.prompt_for(probs[i].question, tok) for i in range(4))
    assert set(df["source"]) == {"toy"}


def test_samples_are_graded_by_their_task(monkeypatch, tok):
    """sample_and_grade grades through Task.grade: a task with its own rule gets its own statuses."""
    texts = ["x\n</think>\n\nThe answer is \\boxed{5}.", "\\boxed{6}", "no box"]
    fake = SampleResult(texts=[texts], n_tokens=[[3, 3, 3]], finish_reasons=[["stop"] * 3], n_think_tokens=[[1, 1, 1]])
    monkeypatch.setattr(sampling, "sample", lambda *a, **kw: fake)
    problems = pd.DataFrame({"problem_id": ["p"], "k": [2], "prompt": ["Q:a5"], "gold": ["5"]})
    df = sample_and_grade(None, tok, problems, TOY, Decoding(n=3), QUIET)
    assert list(df["status"]) == ["correct", "wrong", "no_answer"]

    class Lenient(type(TOY)):
        def grade(self, texts, golds):
            return ["correct"] * len(texts)

    assert list(sample_and_grade(None, tok, problems, Lenient(), Decoding(n=3), QUIET)["correct"]) == [True] * 3


def test_sample_and_grade_schema(model, tok, problems):
    spec = Decoding(n=3, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=0, batch_size=4)
    df = sample_and_grade(model, tok, problems, TOY, spec, QUIET)
    assert list(df.columns) == SAMPLE_COLUMNS
    assert len(df) == 3 * len(problems)
    assert df.groupby("problem_id")["sample_idx"].apply(sorted).tolist() == [[0, 1, 2]] * 3
    for col in ("k", "sample_idx", "n_tokens", "n_think_tokens"):
        assert pd.api.types.is_integer_dtype(df[col]), col
    assert df["correct"].dtype == bool
    for col in ("problem_id", "prompt", "text", "status", "finish_reason", "gold"):
        assert all(isinstance(v, str) for v in df[col]), col
    merged = df.merge(problems, on="problem_id", suffixes=("", "_p"))
    assert (merged["prompt"] == merged["prompt_p"]).all() and (merged["gold"] == merged["gold_p"]).all()
    assert (merged["k"] == merged["k_p"]).all()
    assert all(df["n_tokens"][i] == count_tokens(tok, df["text"][i]) for i in range(len(df)))
    assert set(df["finish_reason"]) <= {"stop", "length"}
    assert set(df["status"]) <= {"correct", "wrong", "no_answer", "timeout"}
    assert (df["correct"] == (df["status"] == "correct")).all()
    # seeded: the same call gives the same table
    again = sample_and_grade(model, tok, problems, TOY, spec, QUIET)
    pd.testing.assert_frame_equal(df, again)


def test_unfinished_responses_are_never_correct(monkeypatch, tok):
    """A right boxed answer in a response cut by max_new_tokens is no_answer; a finished one is correct."""
    right = "a5: 5\n</think>\n\nThe answer is \\boxed{11}."
    wrong = "a5: 5\n</think>\n\nThe answer is \\boxed{12}."
    fake = SampleResult(texts=[[right, right, wrong, wrong]], n_tokens=[[9, 9, 9, 9]],
                        finish_reasons=[["stop", "length", "stop", "length"]], n_think_tokens=[[3, 3, 3, 3]])
    monkeypatch.setattr(sampling, "sample", lambda *a, **kw: fake)
    problems = pd.DataFrame({"problem_id": ["p"], "k": [2], "prompt": ["Q:a5,b+6"], "gold": ["11"]})
    df = sample_and_grade(None, tok, problems, TOY, Decoding(n=4, max_new_tokens=9), QUIET)
    assert list(df["status"]) == ["correct", "no_answer", "wrong", "wrong"]
    assert list(df["correct"]) == [True, False, False, False]
    assert list(df["finish_reason"]) == ["stop", "length", "stop", "length"]


@pytest.mark.parametrize("drop", ["problem_id", "k", "prompt", "gold"])
def test_sample_and_grade_needs_columns(model, tok, problems, drop):
    with pytest.raises(ValueError, match=drop):
        sample_and_grade(model, tok, problems.drop(columns=[drop]), TOY, Decoding(max_new_tokens=4), QUIET)


def test_sample_and_grade_empty(model, tok, problems):
    with pytest.raises(ValueError, match="empty"):
        sample_and_grade(model, tok, problems.iloc[:0], TOY, Decoding(max_new_tokens=4), QUIET)


def test_per_problem_stats_hand_computed():
    s = per_problem_stats(HAND).set_index("problem_id")
    assert list(s.index) == ["P1", "P2", "P3"]
    assert s.loc["P1", ["k", "n", "c"]].tolist() == [2, 4, 3]
    assert s.loc["P1", "p"] == 0.75 and s.loc["P2", "p"] == 0.0 and s.loc["P3", "p"] == 1.0
    assert s.loc["P1", "mean_tokens"] == 25 and s.loc["P1", "std_tokens"] == pytest.approx(math.sqrt(125))
    assert s.loc["P1", "cv_tokens"] == pytest.approx(CV1)
    assert s.loc["P2", "std_tokens"] == 0 and s.loc["P2", "cv_tokens"] == 0
    assert s.loc["P3", "mean_tokens"] == 24 and s.loc["P3", "std_tokens"] == 12 and s.loc["P3", "cv_tokens"] == 0.5


def test_cv_undefined_for_empty_responses():
    s = per_problem_stats(make_samples([("Z", 2, 0, False, "stop"), ("Z", 2, 0, False, "stop")]))
    assert math.isnan(s["cv_tokens"][0])


def test_summary_by_k_hand_computed():
    by = summary_by_k(HAND)
    assert list(by.index) == [2, 3]
    assert by.loc[2, "responses"] == 6 and by.loc[3, "responses"] == 2
    assert by.loc[2, "accuracy"] == 0.5 and by.loc[3, "accuracy"] == 1.0
    assert by.loc[2, "mean_tokens"] == pytest.approx(110 / 6) and by.loc[3, "mean_tokens"] == 24
    assert by.loc[2, "unfinished"] == pytest.approx(1 / 6) and by.loc[3, "unfinished"] == 0
    assert by.loc[2, "mean_cv_tokens"] == pytest.approx(CV1 / 2) and by.loc[3, "mean_cv_tokens"] == 0.5


def test_sampling_summary_hand_computed():
    s = sampling_summary(HAND)
    assert {k: s[k] for k in ("problems", "responses", "samples_per_problem", "unfinished")} == {
        "problems": 3, "responses": 8, "samples_per_problem": 4, "unfinished": 1}
    assert s["accuracy"] == 5 / 8
    assert s["mean_tokens"] == 158 / 8 and s["mean_think_tokens"] == 118 / 8
    assert s["mean_within_problem_cv"] == pytest.approx((CV1 + 0 + 0.5) / 3)
    assert s["problems_all_correct"] == 1 and s["problems_none_correct"] == 1
    assert s["accuracy_by_k"] == {2: 0.5, 3: 1.0}
    assert s["mean_tokens_by_k"] == pytest.approx({2: 110 / 6, 3: 24.0})
    assert "no prompt" in s["tokens_counted"]


@pytest.mark.parametrize("fn", [per_problem_stats, summary_by_k, sampling_summary])
@pytest.mark.parametrize("drop", ["problem_id", "k", "correct", "n_tokens"])
def test_missing_column_errors(fn, drop):
    with pytest.raises(ValueError, match=drop):
        fn(HAND.drop(columns=[drop]))


@pytest.mark.parametrize("fn", [per_problem_stats, summary_by_k, sampling_summary])
def test_empty_table_errors(fn):
    with pytest.raises(ValueError, match="empty"):
        fn(HAND.iloc[:0])


def test_training_problems_and_decoding(tok):
    p = load_profile("ci")
    df = sampling.training_problems(p, tok)
    assert len(df) == p.data.n_train_problems
    assert all(i.startswith("train-") for i in df["problem_id"])
    assert set(df["k"]) == {2, 3}
    pd.testing.assert_frame_equal(df, sampling.training_problems(p, tok))
    spec = sampling_decoding(p, 7)
    S = p.sampling
    assert (spec.n, spec.temperature, spec.top_p, spec.max_new_tokens, spec.batch_size, spec.seed) == (
        S.n, S.temperature, S.top_p, S.max_new_tokens, S.batch_size, 7)
    assert SampleRun.of(p) == SampleRun(S.backend, p.shards, p.workers, True)


def test_sample_is_seeded_per_call(model, tok, problems):
    """Different seeds give different samples tables (the stage seed reaches the sampler)."""
    spec = Decoding(n=2, temperature=1.0, top_p=1.0, max_new_tokens=8, batch_size=8)
    with torch.no_grad():
        a = sample_and_grade(model, tok, problems, TOY, replace(spec, seed=1), QUIET)
        b = sample_and_grade(model, tok, problems, TOY, replace(spec, seed=2), QUIET)
    assert list(a["text"]) != list(b["text"])
