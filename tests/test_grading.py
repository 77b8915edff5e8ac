"""Tests for tsq_utils.task.grading: boxed extraction, toy exact match, math-verify with a timeout."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest

from tsq_utils.method import sampling
from tsq_utils.model.generation import Decoding, SampleResult
from tsq_utils.task.data import load_benchmark, load_r1_traces
from tsq_utils.task.format import answer_part, thinking_closed, thinking_part
from tsq_utils.task.grading import GRADERS, extract_boxed, grade_many, grade_math, grade_toy, shutdown_workers
from tsq_utils.task.registry import get_task

TOY = "a5: start at 5\n\nb+6: 5+6=11\n\nc-3: 11-3=8\n</think>\n\nThe answer is \\boxed{8}."
# sympy tries to evaluate the power tower exactly and never returns
PATHOLOGICAL = "</think>\n\n\\boxed{9^{9^{9^{9}}}}"


def boxed(ans: str) -> str:
    return f"Some thinking.\n</think>\n\nThe answer is $\\boxed{{{ans}}}$."


# ----------------------------------------------------------------------------- extraction


def test_thinking_and_answer_parts():
    assert thinking_part(TOY) == "a5: start at 5\n\nb+6: 5+6=11\n\nc-3: 11-3=8\n"
    assert answer_part(TOY) == "\n\nThe answer is \\boxed{8}." and thinking_closed(TOY)
    # the one rule for an unclosed </think> (docs/method.md): all thinking, and its answer is read from all of it
    assert thinking_part("unfinished \\boxed{3}") == answer_part("unfinished \\boxed{3}") == "unfinished \\boxed{3}"
    assert not thinking_closed("unfinished \\boxed{3}")
    assert answer_part("a</think>b</think>c") == "b</think>c"  # the first </think> closes the thinking


# The example: a response cut off in its thinking, after a guess in a box.
CUT_OFF = "<think>I guess \\boxed{5}, but let me check: 2+3"


def test_an_unclosed_think_is_graded_on_its_last_box_anywhere():
    """The harnesses' rule (DeepSeek-R1's and Qwen2.5-Math's evaluation, lm-eval's minerva_math, math-verify): the last
    complete box of the whole output; the same for every grader, through Task.grade."""
    assert extract_boxed(CUT_OFF) == "5"
    assert grade_toy(CUT_OFF, "5") == "correct" and grade_toy(CUT_OFF, "6") == "wrong"
    assert get_task("toy").grade([CUT_OFF, CUT_OFF + " \\boxed{6"], ["5", "5"]) == ["correct", "correct"]
    assert grade_toy("<think>no box yet, 2+3", "5") == "no_answer"
    # once </think> is written, only the answer part counts: a box in the thinking is a guess, not the answer
    assert grade_toy(CUT_OFF + "=5\n</think>\n\nThe answer is 5.", "5") == "no_answer"


def test_a_cut_off_response_is_never_correct_in_the_samples_table(monkeypatch):
    """Stage 01 adds the finish_reason rule on top: cut at max_new_tokens, a response never counts as correct."""
    def fake_sample(model, tokenizer, prompts, spec, backend="transformers", progress=False):
        return SampleResult([[CUT_OFF, CUT_OFF]], [[12, 12]], [["length", "stop"]], [[12, 12]])

    monkeypatch.setattr(sampling, "sample", fake_sample)
    problems = pd.DataFrame({"problem_id": ["p"], "k": [2], "prompt": ["Q:a2,b+3\n<think>\n"], "gold": ["5"]})
    run = sampling.SampleRun(progress=False)
    df = sampling.sample_and_grade(None, None, problems, get_task("toy"), Decoding(n=2), run)
    assert list(df["status"]) == ["no_answer", "correct"] and list(df["correct"]) == [False, True]


@pytest.mark.parametrize(
    "text, expected",
    [
        (TOY, "8"),
        ("x \\boxed{\\frac{1}{2}} y", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces do not close the box
        ("\\boxed{1} then \\boxed{2}", "2"),  # the last one
        ("\\boxed{1}\n</think>\nso \\boxed{2} or \\boxed{3}", "3"),
        ("\\boxed{1}\n</think>\nno box here", None),  # a box in the thinking part does not count
        ("$\\boxed 5$", "5"),
        ("\\boxed{7} and a cut-off \\boxed{66666", "7"),  # an unclosed box is skipped
        ("\\boxedfoo{3}", None),  # not the \boxed command
        ("no answer at all", None),
        ("\\boxed{}", ""),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


# ----------------------------------------------------------------------------- toy


def test_grade_toy():
    assert grade_toy(TOY, "8") == "correct"
    assert grade_toy(TOY, " 8 ") == "correct"
    assert grade_toy(TOY, "9") == "wrong"
    assert grade_toy(TOY.replace("\\boxed{8}", "8"), "8") == "no_answer"
    assert grade_toy("\\boxed{8}</think>the answer is \\boxed{9}", "8") == "wrong"
    assert grade_toy("\\boxed{8}</think>the answer is 8", "8") == "no_answer"
    assert grade_toy("</think>\\boxed{ -3 }", "-3") == "correct"
    with pytest.raises(ValueError, match="integer"):
        grade_toy(TOY, "eight")


def test_grade_many_toy_and_errors():
    assert grade_many([TOY, TOY, "x"], ["8", "7", "8"], "toy") == ["correct", "wrong", "no_answer"]
    with pytest.raises(ValueError, match="length"):
        grade_many([TOY], ["8", "8"], "toy")
    with pytest.raises(ValueError, match="unknown grader 'code'"):
        grade_many([TOY], ["8"], kind="code")
    assert set(GRADERS) == {"toy", "math"}


# ----------------------------------------------------------------------------- math


def test_every_math500_gold_grades_correct_against_itself(shared_data):
    df = load_benchmark("math500", shared_data / "math500_test.jsonl")
    statuses = grade_many([boxed(g) for g in df["gold"]], df["gold"].tolist(), kind="math")
    failed = [g for g, s in zip(df["gold"], statuses) if s != "correct"]
    assert failed == []


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("0.5", "\\frac{1}{2}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("\\dfrac{1}{2}", "0.5"),
        ("1/2", "\\frac{1}{2}"),
        ("[ -2 , 7 ]", "[-2, 7]"),
        ("[-2,7]", "[-2, 7]"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})"),
        ("(3,\\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("1000", "1,\\!000"),
        ("2", "2\\,\\text{cm}"),
        ("10\\%", "10\\%"),
        ("C", "\\text{(C)}"),
        ("x=5", "5"),
        ("\\frac{\\sqrt2}{2}", "\\sqrt{2}/2"),
        ("27.0", "27"),
        ("1+x^2", "x^2+1"),
        ("\\{2,1\\}", "\\{1,2\\}"),
        ("90^\\circ", "90"),
    ],
)
def test_equivalent_answers_grade_correct(pred, gold):
    assert grade_math(boxed(pred), gold) == "correct"


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("4", "3"),
        ("\\frac{1}{3}", "\\frac{1}{2}"),
        ("(-2,7)", "[-2, 7]"),  # open vs closed interval
        ("\\text{(D)}", "\\text{(C)}"),
        ("(\\frac{\\pi}{2}, 3)", "(3, \\frac{\\pi}{2})"),
        ("x^2-1", "x^2+1"),
        ("\\text{Bob}", "\\text{Evelyn}"),
    ],
)
def test_wrong_answers_grade_wrong(pred, gold):
    assert grade_math(boxed(pred), gold) == "wrong"


def test_math_no_answer_and_thinking_box_ignored():
    assert grade_math("I think it is 5.\n</think>\n\nThe answer is 5.", "5") == "no_answer"
    assert grade_math("</think>\\boxed{}", "5") == "no_answer"
    # the box inside the thinking is a draft; only the answer part counts
    assert grade_math("maybe \\boxed{5}\n</think>\n\nno, \\boxed{6}", "5") == "wrong"
    assert grade_math("maybe \\boxed{6}\n</think>\n\nno, \\boxed{5}", "5") == "correct"
    assert grade_math("maybe \\boxed{5}\n</think>\n\nthe end", "5") == "no_answer"
    with pytest.raises(ValueError, match="empty"):
        grade_math(boxed("5"), "  ")
    with pytest.raises(ValueError, match="timeout_s"):
        grade_math(boxed("5"), "5", timeout_s=0)


def test_grading_in_worker_threads():
    cases = [(boxed("0.5"), "\\frac{1}{2}", "correct"), (boxed("3"), "4", "wrong"), ("x", "4", "no_answer")] * 4
    with ThreadPoolExecutor(max_workers=3) as pool:
        got = list(pool.map(lambda c: grade_math(c[0], c[1]), cases))
    assert got == [c[2] for c in cases]
    out = []
    t = threading.Thread(target=lambda: out.append(grade_math(boxed("[-2,7]"), "[-2, 7]")))
    t.start()
    t.join(timeout=60)
    assert out == ["correct"]
    assert grade_many([boxed(str(i)) for i in range(6)], ["3"] * 6, kind="math", n_workers=2) == (
        ["wrong"] * 3 + ["correct"] + ["wrong"] * 2
    )


def test_pathological_input_times_out_in_a_thread_and_grading_recovers():
    grade_math(boxed("1"), "1")  # a warm worker, so the clock below measures the check alone
    out = []

    def run():
        t0 = time.monotonic()
        out.append((grade_math(PATHOLOGICAL, "7", timeout_s=1.0), time.monotonic() - t0))

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "grade_math hung past its timeout"
    status, elapsed = out[0]
    assert status == "timeout"
    assert 1.0 <= elapsed < 5.0
    # the hung worker was killed; the next check starts a fresh one and works
    assert grade_math(boxed("7"), "7") == "correct"
    assert grade_many([PATHOLOGICAL, boxed("7")], ["7", "7"], kind="math", timeout_s=1.0) == ["timeout", "correct"]
    shutdown_workers()
    assert grade_math(boxed("7"), "7") == "correct"  # workers restart after a shutdown


def test_r1_traces_agree_with_recorded_is_correct(shared_data):
    agreements = {}
    for path in sorted(shared_data.glob("aime25_*_rollout_*.jsonl")):
        tr = load_r1_traces(path)
        statuses = grade_many(tr["completion"].tolist(), tr["gold"].tolist(), kind="math")
        agree = [(s == "correct") == c for s, c in zip(statuses, tr["is_correct"])]
        agreements[path.name] = sum(agree) / len(agree)
        # responses cut off before </think> have no answer, and none of them was marked correct
        unfinished = ~tr["completion"].str.contains("</think>", regex=False)
        assert all(s == "no_answer" for s, u in zip(statuses, unfinished) if u)
    print("is_correct agreement:", agreements)
    assert len(agreements) == 2
    # measured: 30/30 on both files (1.5B: 7 correct, 7B: 12 correct)
    assert all(a >= 0.9 for a in agreements.values()), agreements
