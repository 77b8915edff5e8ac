"""The toy world: problems, teacher traces, the oracle, tokenizer, model, pretraining, saving; the shipped reasoner."""

import dataclasses
import json
import random
import re
from pathlib import Path

import pytest
import torch

from tsq_utils.task import toy as tw
from tsq_utils.model import toy_reasoner as tr
from tsq_utils.core.config import PretrainConfig, ToyWorldConfig, load_profile, stage_seed

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "checkpoints" / "toy-reasoner"
CFG = ToyWorldConfig()


@pytest.fixture(scope="module")
def tok():
    """A tokenizer trained on 500 teacher documents of the default world (vocab at most 256)."""
    return tr.train_tokenizer(CFG, vocab_size=256, n_docs=500, seed=0)


def tiny_pretrain_config(**kw) -> PretrainConfig:
    """A tiny model config (hidden 32, one layer): fast enough for unit tests."""
    base = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=256, block_size=256,
                batch_size=8, n_tokens=1000, lr=1e-2, warmup_ratio=0.1)
    base.update(kw)
    return PretrainConfig(**base)


def chain_value(question: str) -> int:
    """The arithmetic of a question line, computed independently of ToyProblem: 'Q:a5,b+6,c-3' -> 8."""
    expr = re.sub(r"[a-h]", "", question[2:]).replace(",", "")
    assert re.fullmatch(r"\d+([+-]\d+)*", expr)
    total, pos = 0, 0
    for m in re.finditer(r"([+-]?)(\d+)", expr):
        total = total - int(m.group(2)) if m.group(1) == "-" else total + int(m.group(2))
        pos = m.end()
    assert pos == len(expr)
    return total


# ----------------------------------------------------------------------------- problems


@pytest.mark.parametrize("max_value", [9, 12, 19, 49, 99])
def test_make_problem_property(max_value):
    """Over many seeds and every k: labels in order, operands 1..9, running totals within [0, max_value]."""
    for seed in range(300):
        rng = random.Random(seed)
        for k in range(2, 9):
            p = tw.make_problem(rng, k, max_value)
            assert p.k == k == len(p.terms)
            assert [t.label for t in p.terms] == list("abcdefgh"[:k])
            assert p.terms[0].op == "" and 1 <= p.terms[0].value <= max_value
            assert all(t.op in "+-" and t.op and 1 <= t.value <= 9 for t in p.terms[1:])
            totals = p.totals()
            assert len(totals) == k and all(0 <= v <= max_value for v in totals)
            assert p.answer == totals[-1] == chain_value(p.question)


def test_make_problem_values_and_text():
    p = tw.ToyProblem("x", 3, [tw.Term("a", "", 5), tw.Term("b", "+", 6), tw.Term("c", "-", 3)])
    assert p.question == "Q:a5,b+6,c-3"
    assert p.totals() == [5, 11, 8]
    assert p.answer == 8


def test_make_problem_rejects_bad_k():
    for k in (1, 9):
        with pytest.raises(ValueError, match="k must be in 2..8"):
            tw.make_problem(random.Random(0), k)


def test_make_problem_seeded_and_id():
    a = tw.make_problem(random.Random(3), 5)
    b = tw.make_problem(random.Random(3), 5)
    assert a == b and re.fullmatch(r"toy-5-[0-9a-f]{8}", a.problem_id)
    assert tw.make_problem(random.Random(3), 5, problem_id="mine").problem_id == "mine"


def test_make_problems_seeded_and_k_spread():
    a = tw.make_problems(70, seed=1)
    assert a == tw.make_problems(70, seed=1)
    assert a != tw.make_problems(70, seed=2)
    counts = {k: sum(p.k == k for p in a) for k in range(2, 9)}
    assert counts == {k: 10 for k in range(2, 9)}
    # an n that is not a multiple of the k range: counts differ by at most one
    b = tw.make_problems(23, seed=1, k_min=3, k_max=5)
    counts = [sum(p.k == k for p in b) for k in (3, 4, 5)]
    assert sorted(counts) == [7, 8, 8] and {p.k for p in b} == {3, 4, 5}
    assert all(p.problem_id == f"train-{i:05d}-k{p.k}" for i, p in enumerate(b))


def test_make_problems_respects_max_value():
    for p in tw.make_problems(100, seed=4, max_value=19):
        assert all(0 <= v <= 19 for v in p.totals())


def test_make_problems_rejects_inverted_k_range():
    with pytest.raises(ValueError, match="k_min"):
        tw.make_problems(10, seed=0, k_min=6, k_max=4)


def test_make_problems_splits_are_disjoint():
    splits = {s: tw.make_problems(140, seed=5, split=s) for s in ("train", "heldout", "test")}
    ids = {s: {p.problem_id for p in ps} for s, ps in splits.items()}
    assert all(i.startswith(s + "-") for s, ps in ids.items() for i in ps)
    assert not (ids["train"] & ids["heldout"]) and not (ids["train"] & ids["test"])
    assert not (ids["heldout"] & ids["test"])
    qs = {s: [p.question for p in ps] for s, ps in splits.items()}
    # different streams: the same seed does not give the same problems under another split name
    for a, b in (("train", "heldout"), ("train", "test"), ("heldout", "test")):
        overlap = len(set(qs[a]) & set(qs[b]))
        assert overlap <= 3, (a, b, overlap)  # only the odd short chain can coincide by chance


# ----------------------------------------------------------------------------- parse_question


def test_parse_question_round_trip():
    for p in tw.make_problems(70, seed=8):
        q = tw.parse_question(p.question, p.problem_id)
        assert q == p
        assert q.answer == p.answer


@pytest.mark.parametrize("bad", [
    "a5,b+6",            # no Q: prefix
    "Q:",                # no terms
    "Q:a5",              # one term is not a chain
    "Q:b5,c+6",          # labels must start at a
    "Q:a5,c+6",          # labels must be consecutive
    "Q:a+5,b+6",         # the start has no operator
    "Q:a5,b6",           # later terms need one
    "Q:a5,b*6",
    "Q:a5,b+x",
    "Q:a5,,b+6",
    "Q:a5,b+6,",
    "Q:a5, b+6",
    "Q:a1,b+1,c+1,d+1,e+1,f+1,g+1,h+1,a+1",   # more than 8 terms
    "Q:a1,b+1,c+1,d+1,e+1,f+1,g+1,h+1,i+1",
])
def test_parse_question_rejects_malformed(bad):
    with pytest.raises(ValueError):
        tw.parse_question(bad)


# ----------------------------------------------------------------------------- teacher traces

# the habit teacher with the values it shipped with (the first toy world), so its tests keep testing that world
HABIT = dataclasses.replace(ToyWorldConfig(), teacher="habit", p_slip=0.08, p_review=0.5)
# the shipped reasoner's manifest records this hash of the default teacher's traces: a teacher change fails here
SHIPPED_TEACHER = "2caa7973f1f5e4738c178498df2cf555687490a4c35d808681a4aaabc8ce8d01"

_N = r"(?P<prev>-?\d+)(?P<op>[+-])(?P<v>\d+)=(?P<res>-?\d+)"  # a written equation (a slip can go below zero)
_T = r"(?P<t>[a-h][+-]\d+)"
START = [re.compile(r"a(\d+): (\d+)"), re.compile(r"We start with a(\d+), so the total is (\d+)\.")]
# the four phrasings of an operation step, terse to longest (the habit teacher writes 0 and 3)
PHRASINGS = [re.compile(rf"{_T}: {_N}"),
             re.compile(rf"So {_T}: {_N}, total (?P=res)\."),
             re.compile(rf"Then {_T}: the total was (?P<prev0>-?\d+), and {_N}\."),
             re.compile(rf"Next is {_T}\. The total was (?P<prev0>-?\d+), and {_N}, so now it is (?P=res)\.")]
CHECK = re.compile(rf"Wait, let me check {_T}: {_N}\.(?: Yes\.| Not (?P<claimed>-?\d+), so the total is (?P=res)\.)")
REVIEW = re.compile(r"Let me double-check the whole chain: ([\d+-]+)=(\d+)\.")
ANSWER = re.compile(r"\n</think>\n\nThe answer is \\boxed\{(-?\d+)\}\.")


def check_trace(p: tw.ToyProblem, text: str, teacher: str = "local") -> dict:
    """Assert the structure of a teacher trace and that it is consistent as written; return what it holds.

    Both teachers: each step works on its term starting from the running total as written, a check recomputes the
    step and says whether the written result was right, a review recomputes the question's chain, and the answer is
    the last total written. local: a slip is a carry slip and may go unchecked, so the answer can be wrong. habit:
    every slip is checked at once, so every step starts from the true total and the answer is right.
    """
    thinking, sep, answer = text.rpartition("\n</think>\n\n")
    assert sep and "</think>" not in thinking
    m_ans = ANSWER.fullmatch(sep + answer)
    assert m_ans, answer
    steps = thinking.split("\n\n")
    assert all(s and "\n" not in s for s in steps), "steps are non-empty lines separated by blank lines"
    m = START[0].fullmatch(steps[0]) or START[1].fullmatch(steps[0])
    assert m and int(m.group(1)) == int(m.group(2)) == p.terms[0].value
    info = {"styles": [], "checks": [], "slips": [], "review": False,
            "verbose_start": bool(START[1].fullmatch(steps[0]))}
    tot, i = p.terms[0].value, 1  # the running total as written
    for term, t in enumerate(p.terms[1:], start=1):
        assert i < len(steps), f"no step for {t.text()}"
        s = steps[i]
        styles = [k for k, rx in enumerate(PHRASINGS) if rx.fullmatch(s)]
        assert len(styles) == 1, f"step {i} should work on {t.text()} in one phrasing: {s!r}"
        g = PHRASINGS[styles[0]].fullmatch(s).groupdict()
        assert g["t"] == t.text() and g["op"] == t.op and int(g["v"]) == t.value, s
        assert g.get("prev0", g["prev"]) == g["prev"], s
        prev, claimed = int(g["prev"]), int(g["res"])
        assert prev == tot, f"{t.text()} must start from the total as written ({tot}): {s!r}"
        right = prev + t.value if t.op == "+" else prev - t.value
        slip = claimed != right
        nxt = CHECK.fullmatch(steps[i + 1]) if i + 1 < len(steps) else None
        if nxt:
            c = nxt.groupdict()
            assert (c["t"], int(c["prev"]), int(c["res"])) == (t.text(), prev, right), steps[i + 1]
            assert (c["claimed"] is None) == (not slip) and (not slip or int(c["claimed"]) == claimed), steps[i + 1]
            i += 1
        if teacher == "habit":
            assert prev == p.totals()[term - 1], "a habit slip never propagates"
            assert nxt or not slip, f"a habit slip is checked at once: {s!r}"
            assert styles[0] in (0, 3)
        else:
            assert not slip or claimed == tw.carry_slip(right), f"a local slip is a carry slip: {s!r}"
        info["styles"].append(styles[0])
        info["checks"].append(nxt is not None)
        info["slips"].append(slip)
        tot = right if nxt else claimed
        i += 1
    if i < len(steps):
        mr = REVIEW.fullmatch(steps[i])
        assert mr and i == len(steps) - 1, f"only a final review may follow the last term: {steps[i:]!r}"
        assert "Q:" + mr.group(1) == re.sub(r"[a-h]", "", p.question).replace(",", "")
        assert int(mr.group(2)) == p.answer == chain_value("Q:" + mr.group(1))
        info["review"], tot = True, p.answer
    assert int(m_ans.group(1)) == tot, "the answer is the last total written"
    info.update(answer=tot, correct=tot == p.answer,
                uncaught=sum(s and not c for s, c in zip(info["slips"], info["checks"])))
    if teacher == "habit":
        assert info["correct"]
    return info


def test_check_trace_rejects_broken_traces():
    """The checker itself: a wrong answer, a step that ignores the written total, a wrong check all fail it."""
    p = tw.ToyProblem("x", 3, [tw.Term("a", "", 5), tw.Term("b", "+", 6), tw.Term("c", "-", 3)])
    good = "a5: 5\n\nb+6: 5+6=1\n\nc-3: 1-3=-2\n</think>\n\nThe answer is \\boxed{-2}."  # an uncaught carry slip
    info = check_trace(p, good)
    assert info["slips"] == [True, False] and info["uncaught"] == 1 and not info["correct"] and info["answer"] == -2
    for bad in (good.replace("{-2}", "{8}"),                           # the answer is not the total written
                good.replace("c-3: 1-3=-2", "c-3: 11-3=8").replace("{-2}", "{8}"),  # the slip silently vanished
                "a5: 5\n\nb+6: 5+6=12\n\nc-3: 12-3=9\n</think>\n\nThe answer is \\boxed{9}.",  # not a carry slip
                "a5: 5\n\nb+6: 5+6=1\n\nWait, let me check b+6: 5+6=11. Yes.\n\nc-3: 11-3=8"
                "\n</think>\n\nThe answer is \\boxed{8}."):             # a check that misses the slip it sees
        with pytest.raises(AssertionError):
            check_trace(p, bad)
    with pytest.raises(AssertionError):
        check_trace(p, good, teacher="habit")  # the habit teacher never leaves a slip unchecked


@pytest.mark.parametrize("teacher", ["local", "habit"])
def test_teacher_trace_structure_property(teacher):
    cfg = CFG if teacher == "local" else HABIT
    probs = tw.make_problems(140, seed=11)
    seen = {"slips": 0, "checks": 0, "review": 0, "verbose_start": 0, "wrong": 0}
    styles = set()
    for j, p in enumerate(probs):
        for r in range(10):
            info = check_trace(p, tw.teacher_trace(p, random.Random(j * 100 + r), cfg), teacher)
            seen["slips"] += sum(info["slips"])
            seen["checks"] += sum(info["checks"])
            seen["review"] += info["review"]
            seen["verbose_start"] += info["verbose_start"]
            seen["wrong"] += not info["correct"]
            styles.update(info["styles"])
    # the run exercised every habit; only the local teacher lets a slip reach the answer
    assert seen.pop("wrong") > 0 if teacher == "local" else seen.pop("wrong") == 0
    assert all(v > 0 for v in seen.values()), seen
    assert styles == ({0, 1, 2, 3} if teacher == "local" else {0, 3})


def test_habit_trace_with_every_step_a_slip():
    cfg = dataclasses.replace(HABIT, p_concise=0.0, p_slip=1.0)
    for j, p in enumerate(tw.make_problems(56, seed=12, max_value=19)):
        info = check_trace(p, tw.teacher_trace(p, random.Random(j), cfg), "habit")
        assert info["slips"] == info["checks"] == [True] * (p.k - 1)


def test_habit_trace_without_habits_is_plain():
    cfg = dataclasses.replace(HABIT, p_concise=0.0, p_verbose_step=1.0, p_check=0.0, p_slip=0.0, p_review=0.0)
    p = tw.ToyProblem("x", 3, [tw.Term("a", "", 5), tw.Term("b", "+", 6), tw.Term("c", "-", 3)])
    assert tw.teacher_trace(p, random.Random(0), cfg) == (
        "We start with a5, so the total is 5.\n\n"
        "Next is b+6. The total was 5, and 5+6=11, so now it is 11.\n\n"
        "Next is c-3. The total was 11, and 11-3=8, so now it is 8."
        "\n</think>\n\nThe answer is \\boxed{8}."
    )


def test_oracle_trace_value():
    p = tw.ToyProblem("x", 3, [tw.Term("a", "", 5), tw.Term("b", "+", 6), tw.Term("c", "-", 3)])
    assert tw.oracle_trace(p) == "a5: 5\n\nb+6: 5+6=11\n\nc-3: 11-3=8\n</think>\n\nThe answer is \\boxed{8}."
    assert tw.answer_text(8) == "\n</think>\n\nThe answer is \\boxed{8}."


def test_habit_overthinking_traces_open_verbosely():
    """The first step shows the habit, so the first sampled token chooses concise vs overthinking."""
    for j, p in enumerate(tw.make_problems(70, seed=18)):
        trace = tw.teacher_trace(p, random.Random(j), HABIT)
        if trace != tw.oracle_trace(p):
            assert trace.startswith(f"We start with a{p.terms[0].value}, so the total is")
        else:
            assert trace.startswith(f"a{p.terms[0].value}: ")


def test_habit_concise_traces_are_the_oracle():
    """The first draw decides the style; a concise trace is exactly the oracle (a final review marks the rest)."""
    cfg = dataclasses.replace(HABIT, p_review=1.0)
    for j, p in enumerate(tw.make_problems(70, seed=13)):
        for r in range(6):
            seed = j * 10 + r
            concise = random.Random(seed).random() < cfg.p_concise
            trace = tw.teacher_trace(p, random.Random(seed), cfg)
            assert (trace == tw.oracle_trace(p)) == concise


def test_habit_p_concise_one_gives_the_oracle_always():
    cfg = dataclasses.replace(HABIT, p_concise=1.0, p_slip=1.0, p_check=1.0, p_review=1.0, p_verbose_step=1.0)
    for j, p in enumerate(tw.make_problems(35, seed=14)):
        assert tw.teacher_trace(p, random.Random(j), cfg) == tw.oracle_trace(p)


def test_habit_concise_fraction_matches_p_concise():
    probs = tw.make_problems(70, seed=15)
    for p_concise in (0.25, 0.6):
        cfg = dataclasses.replace(HABIT, p_concise=p_concise, p_review=1.0)
        rng = random.Random(p_concise)
        n = 4000
        hits = sum(tw.teacher_trace(p, rng, cfg) == tw.oracle_trace(p) for p in (probs[i % 70] for i in range(n)))
        sd = (p_concise * (1 - p_concise) / n) ** 0.5
        assert abs(hits / n - p_concise) < 4 * sd, (p_concise, hits / n)


@pytest.mark.parametrize("teacher", ["local", "habit"])
def test_default_teacher_overthinks_on_average(tok, teacher):
    """Overthinking is the majority habit: teacher traces are well over the oracle's length on average."""
    probs = tw.make_problems(70, seed=16)
    rng = random.Random(0)
    cfg = CFG if teacher == "local" else HABIT
    oracle = sum(len(tok(tw.oracle_trace(p))["input_ids"]) for p in probs)
    traces = sum(len(tok(tw.teacher_trace(p, rng, cfg))["input_ids"]) for p in probs)
    assert traces / oracle > 1.8


def test_oracle_is_the_shortest_correct_trace(tok):
    """Habit: the oracle occurs and nothing is shorter. Local: no correct trace is shorter (an uncaught slip can write
    a shorter number, as 12 -> 2, but then the answer is wrong or a check or the review adds a line)."""
    for j, p in enumerate(tw.make_problems(21, seed=17)):
        oracle = tw.oracle_trace(p)
        o_chars, o_toks = len(oracle), len(tok(oracle)["input_ids"])
        traces = [tw.teacher_trace(p, random.Random(j * 1000 + r), HABIT) for r in range(60)]
        assert oracle in traces  # the concise style does occur
        assert min(len(t) for t in traces) == o_chars
        assert min(len(tok(t)["input_ids"]) for t in traces) == o_toks
        for r in range(60):
            rec: dict = {}
            t = tw.local_trace(p, random.Random(j * 1000 + r), CFG, record=rec)
            if rec["correct"]:
                assert len(t) >= o_chars and len(tok(t)["input_ids"]) >= o_toks


# ----------------------------------------------------------------------------- the local teacher


def test_local_trace_at_temperature_one_is_the_teacher():
    probs = tw.make_problems(140, seed=30)
    for j, p in enumerate(probs):
        a, b = random.Random(j), random.Random(j)
        assert tw.local_trace(p, a, CFG, temperature=1.0) == tw.teacher_trace(p, b, CFG)
        assert a.getstate() == b.getstate()
    assert CFG.teacher == "local"
    assert tw.teacher_fingerprint(CFG) == SHIPPED_TEACHER
    assert tw.teacher_fingerprint(HABIT) != SHIPPED_TEACHER


def verbose_op(t: tw.Term, prev: int, res: int) -> str:
    """The longest phrasing of an operation step, written out here independently of toy.py."""
    return f"Next is {t.text()}. The total was {prev}, and {prev}{t.op}{t.value}={res}, so now it is {res}."


def test_local_trace_at_temperature_zero_is_the_argmax_path():
    """Defaults at T = 0: verbose start (0.6), no slip (0.85), the longest phrasing (0.4); after a step that is not the
    last a check (0.4 > 0.6 x 0.4, the likeliest phrasing), and after the last one the answer (0.6 x 0.7 = 0.42 beats
    a check, 0.4, and a review, 0.6 x 0.3): no randomness is drawn, and the answer is right."""
    for p in tw.make_problems(70, seed=31):
        totals = p.totals()
        steps = [f"We start with a{totals[0]}, so the total is {totals[0]}."]
        for i, t in enumerate(p.terms[1:], start=1):
            steps.append(verbose_op(t, totals[i - 1], totals[i]))
            if i < p.k - 1:
                steps.append(f"Wait, let me check {t.text()}: {totals[i - 1]}{t.op}{t.value}={totals[i]}. Yes.")
        expected = "\n\n".join(steps) + f"\n</think>\n\nThe answer is \\boxed{{{p.answer}}}."
        rng = random.Random(5)
        state = rng.getstate()
        rec: dict = {}
        assert tw.local_trace(p, rng, CFG, temperature=0, record=rec) == expected
        assert rng.getstate() == state, "T = 0 draws nothing"
        assert rec == {"styles": [3] * (p.k - 1), "checks": [True] * (p.k - 2) + [False],
                       "slips": [False] * (p.k - 1), "review": False, "correct": True, "uncaught": 0}
    # a review likelier than the answer after the last step (0.6 x 0.8 > 0.6 x 0.2, 0.4): the argmax reviews
    p = tw.ToyProblem("x", 2, [tw.Term("a", "", 5), tw.Term("b", "+", 6)])
    assert tw.local_trace(p, random.Random(0), dataclasses.replace(CFG, p_review=0.8), temperature=0) == (
        "We start with a5, so the total is 5.\n\n" + verbose_op(p.terms[1], 5, 11) +
        "\n\nLet me double-check the whole chain: 5+6=11.\n</think>\n\nThe answer is \\boxed{11}.")


def slipped_chain(p: tw.ToyProblem) -> list[int]:
    """The totals written when every step slips and nothing catches it: each step's result is the carry slip of the
    right result from the (wrong) total written before."""
    out = [p.terms[0].value]
    for t in p.terms[1:]:
        out.append(tw.carry_slip(out[-1] + t.value if t.op == "+" else out[-1] - t.value))
    return out


def test_local_slips_reach_the_answer_unless_caught():
    probs = tw.make_problems(140, seed=32)
    base = dataclasses.replace(CFG, p_slip=1.0)
    n_right = 0
    for j, p in enumerate(probs):
        # no check, no review: every slip reaches the answer, which is the written chain's value
        rec: dict = {}
        text = tw.local_trace(p, random.Random(j), dataclasses.replace(base, p_check=0.0, p_review=0.0), record=rec)
        info = check_trace(p, text)
        chain = slipped_chain(p)
        assert text.endswith(tw.answer_text(chain[-1]))
        assert rec["uncaught"] == p.k - 1 and rec["slips"] == [True] * (p.k - 1) and not rec["review"]
        assert rec["correct"] == info["correct"] == (chain[-1] == p.answer)
        # each slip moves the total by ten either way: the error is an odd or even number of tens as k - 1 is, so an
        # odd number of slips is always wrong, while an even number can cancel (15 -> 5, then 5+3 = 8 -> 18 = 15+3)
        err = chain[-1] - p.answer
        assert err % 10 == 0 and abs(err) <= 10 * (p.k - 1) and (err // 10 - (p.k - 1)) % 2 == 0
        assert not rec["correct"] or p.k % 2 == 1
        n_right += rec["correct"]
        # a check after every step catches every slip
        rec = {}
        text = tw.local_trace(p, random.Random(j), dataclasses.replace(base, p_check=1.0, p_review=0.0), record=rec)
        info = check_trace(p, text)
        assert rec["checks"] == info["checks"] == [True] * (p.k - 1) and rec["uncaught"] == 0
        assert text.count(". Not ") == p.k - 1 and rec["correct"] and not rec["review"]
        assert text.endswith(tw.answer_text(p.answer))
        # no check, but the review recomputes the chain
        rec = {}
        text = tw.local_trace(p, random.Random(j), dataclasses.replace(base, p_check=0.0, p_review=1.0), record=rec)
        assert check_trace(p, text)["review"] and rec["review"] and rec["correct"] and rec["uncaught"] == p.k - 1
        assert text.endswith(tw.answer_text(p.answer))
    assert n_right > 0  # cancelling slips do occur


def test_local_trace_without_habits_is_the_oracle():
    cfg = dataclasses.replace(CFG, phrasings=[1, 0, 0, 0], p_check=0.0, p_review=0.0, p_slip=0.0, p_verbose_start=0.0)
    for j, p in enumerate(tw.make_problems(70, seed=33)):
        for r in range(3):
            assert tw.local_trace(p, random.Random(j * 10 + r), cfg) == tw.oracle_trace(p)


def test_local_record_agrees_with_the_text():
    n_wrong = 0
    for j, p in enumerate(tw.make_problems(210, seed=34)):
        rec: dict = {}
        text = tw.local_trace(p, random.Random(j), CFG, record=rec)
        info = check_trace(p, text)
        assert {k: info[k] for k in rec} == rec
        assert text.count("Wait, let me check") == sum(rec["checks"])
        assert ("Let me double-check the whole chain" in text) == rec["review"]
        n_wrong += not rec["correct"]
    assert n_wrong > 0


def test_local_wording_is_drawn_per_step():
    """Issue 14's local wording: each step's phrasing is drawn afresh from `phrasings`, whatever the step before it
    wrote, and each check whatever the step slipped (a habit, not a reaction). The habit teacher fails the first
    (its whole trace is concise or not), which shows the test can tell."""
    def pairs(cfg, teacher, n):
        styles, follows, checked = [], [], []
        for j, p in enumerate(tw.make_problems(n, seed=35, k_min=8)):
            info = check_trace(p, tw.teacher_trace(p, random.Random(j), cfg), teacher)
            styles += info["styles"]
            follows += list(zip(info["styles"], info["styles"][1:]))
            checked += list(zip(info["slips"], info["checks"]))
        return styles, follows, checked

    def within(hits, n, p):
        return abs(hits / n - p) < 4 * (p * (1 - p) / n) ** 0.5

    styles, follows, checked = pairs(CFG, "local", 2000)
    w = [x / sum(CFG.phrasings) for x in CFG.phrasings]
    for s in range(4):
        assert within(styles.count(s), len(styles), w[s]), (s, styles.count(s) / len(styles))
        after = [b for a, b in follows if a == s]
        assert within(after.count(s), len(after), w[s]), (s, after.count(s) / len(after))
    after_terse = [b for a, b in follows if a == 0]
    assert within(after_terse.count(3), len(after_terse), w[3])
    after_slip = [c for s, c in checked if s]
    assert len(after_slip) > 500 and within(sum(after_slip), len(after_slip), CFG.p_check)
    assert within(sum(c for _, c in checked), len(checked), CFG.p_check)

    styles, follows, _ = pairs(HABIT, "habit", 300)
    after = [b for a, b in follows if a == 0]
    assert not within(after.count(0), len(after), styles.count(0) / len(styles))


def test_carry_slip_values():
    assert [tw.carry_slip(r) for r in (0, 3, 9, 10, 15, 42, 49, 99)] == [10, 13, 19, 0, 5, 32, 39, 89]
    for r in range(0, 120):
        s = tw.carry_slip(r)
        # the units digit kept, the tens digit one off, never negative
        assert s % 10 == r % 10 and abs(s // 10 - r // 10) == 1 and s >= 0


def test_draw_temperature():
    probs = [0.2, 0.5, 0.3, 0.0]
    rng = random.Random(40)
    state = rng.getstate()
    assert tw._draw(rng, probs, 0) == 1 and rng.getstate() == state  # T = 0: the argmax, nothing drawn
    # one rng.random() per draw
    twin = random.Random(40)
    tw._draw(rng, probs, 1.0)
    twin.random()
    assert rng.getstate() == twin.getstate()
    # T = 1: the probabilities themselves (also unnormalised); T = 2: proportional to their square roots
    n = 20000
    for temperature, weights, scale in ((1.0, probs, 1.0), (1.0, probs, 7.0), (2.0, [x ** 0.5 for x in probs], 1.0)):
        counts = [0] * 4
        for _ in range(n):
            counts[tw._draw(rng, [x * scale for x in probs], temperature)] += 1
        for c, x in zip(counts, weights):
            q = x / sum(weights)
            assert abs(c / n - q) <= 4 * (q * (1 - q) / n) ** 0.5, (temperature, counts)
        assert counts[3] == 0  # a zero weight is never drawn
    # T -> 0: the argmax dominates (0.5^20 / 0.3^20 is about 27,000)
    assert sum(tw._draw(rng, probs, 0.05) == 1 for _ in range(2000)) == 2000


def test_world_description():
    d = tw.world_description(dataclasses.replace(CFG, k_min=3, k_max=5, max_value=19))
    assert d["k_range"] == [3, 5] and "19" in d["values"]
    assert d["teacher"] == {"teacher": "local", "phrasings": [0.15, 0.2, 0.25, 0.4], "p_verbose_start": 0.6,
                            "p_check": 0.4, "p_slip": 0.15, "p_review": 0.3}
    habits = ("teacher", "p_concise", "p_verbose_step", "p_check", "p_slip", "p_review")
    assert tw.world_description(HABIT)["teacher"] == {k: getattr(HABIT, k) for k in habits}
    assert tw.world_description(HABIT)["teacher"]["p_slip"] == 0.08


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(tok):
    rng = random.Random(21)
    for _ in range(100):
        p = tw.make_problem(rng, rng.randint(2, 8))
        text = tw.prompt_for(p.question, tok) + tw.teacher_trace(p, rng, CFG) + tok.eos_token
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # whatever the model emits decodes to text that re-encodes to the same text (tokens are counted that way)
    rng = random.Random(22)
    specials = set(tok.all_special_ids)
    plain = [i for i in range(len(tok)) if i not in specials]
    for _ in range(200):
        text = tok.decode([rng.choice(plain) for _ in range(rng.randint(1, 40))])
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_tokenizer_alphabet_is_the_worlds(tok):
    """The BPE alphabet is the teacher's characters only: an unseen character becomes <unk> (a limit, by design)."""
    assert tok.decode(tok("Q:a5,b+6 ✓")["input_ids"]) == "Q:a5,b+6 " + "<unk>" * 3  # one per UTF-8 byte of ✓


def test_tokenizer_numbers_and_separator_are_single_tokens(tok):
    for n in range(CFG.max_value + 1):
        assert len(tok(str(n), add_special_tokens=False)["input_ids"]) == 1, n
        assert len(tok(f" {n}", add_special_tokens=False)["input_ids"]) == 1, n  # as in 'the total is 42'
    assert len(tok("\n\n", add_special_tokens=False)["input_ids"]) == 1
    # inside a step, each number stays one token: 'b+6: 5+6=11' -> b + 6 : 5 + 6 = 11 (no split digits)
    pieces = [tok.decode([i]) for i in tok("b+6: 5+6=11", add_special_tokens=False)["input_ids"]]
    assert "11" in [s.strip() for s in pieces] and "5" in [s.strip() for s in pieces]


def test_tokenizer_specials(tok):
    assert len(tok) <= 256
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<pad>" and tok.eos_token_id != tok.pad_token_id
    for special in ("<think>", "</think>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1, special
    text = "<think>\na5: 5\n</think>\n\nThe answer is \\boxed{5}.<|end|>"
    kept = tok.decode(tok(text)["input_ids"], skip_special_tokens=True)
    # <think> and </think> are ordinary added tokens (a trace must keep them); the chat markers are special
    assert kept == "<think>\na5: 5\n</think>\n\nThe answer is \\boxed{5}."
    assert tok.padding_side == "left"


def test_tokenizer_is_seeded():
    a = tr.train_tokenizer(CFG, 128, 300, seed=3)
    b = tr.train_tokenizer(CFG, 128, 300, seed=3)
    assert a.get_vocab() == b.get_vocab()
    assert len(a) <= 128


def test_prompt_for(tok):
    prompt = tw.prompt_for("Q:a5,b+6", tok)
    assert prompt == "<|user|>\nQ:a5,b+6\n<|assistant|>\n<think>\n"
    assert prompt.endswith("<think>\n")


# ----------------------------------------------------------------------------- model


def expected_parameters(vocab: int, c: PretrainConfig) -> int:
    """Closed form for a tied-embedding Llama: embeddings + per layer (q,k,v,o + gate,up,down + 2 norms) + final
    norm."""
    h, inter = c.hidden_size, c.intermediate_size
    return vocab * h + c.num_layers * (4 * h * h + 3 * h * inter + 2 * h) + h


def test_model_config_follows_pretrain_config(tok):
    c = tiny_pretrain_config()
    mc = tr.model_config(tok, c)
    assert (mc.model_type, mc.vocab_size, mc.hidden_size, mc.intermediate_size) == ("llama", len(tok), 32, 64)
    assert (mc.num_hidden_layers, mc.num_attention_heads, mc.num_key_value_heads) == (1, 2, 2)
    assert mc.tie_word_embeddings and mc.pad_token_id == tok.pad_token_id and mc.eos_token_id == tok.eos_token_id


def test_toy_model_has_about_a_million_parameters(tok):
    """The toy profile's model: 4 x 262,400 (layers) + 128 (final norm) + 128 x vocab (tied embeddings).

    That is 1,049,728 + 128 V: 1,079,936 for the shipped tokenizer's 236 tokens, and about 1.08M for any
    tokenizer of the toy world (its BPE saturates near 230-240 tokens, well under the 512 allowed).
    """
    c = load_profile("toy").pretrain
    model = tr.new_model(tok, c, seed=0)
    n = tr.count_parameters(model)
    assert n == expected_parameters(len(tok), c) == 1_049_728 + 128 * len(tok)
    assert expected_parameters(236, c) == 1_079_936
    assert 1.0e6 < n < 1.2e6
    # tied embeddings are counted once
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_new_model_is_seeded(tok):
    c = tiny_pretrain_config()
    a, b, d = tr.new_model(tok, c, 1), tr.new_model(tok, c, 1), tr.new_model(tok, c, 2)
    sa, sb, sd = a.state_dict(), b.state_dict(), d.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sd["model.embed_tokens.weight"])


def batch_loss(model, x, y, pad_id) -> float:
    with torch.no_grad():
        return float(model(input_ids=x, attention_mask=(x != pad_id).long(), labels=y).loss)


def test_pretrain_lowers_the_loss(tok):
    cfg = dataclasses.replace(CFG, k_min=2, k_max=4)
    c = tiny_pretrain_config()
    c.n_tokens = int(tr._estimate_doc_tokens(tok, cfg) * c.batch_size * 20)  # about 20 steps
    model = tr.new_model(tok, c, seed=0)
    # a held-out batch from another seed's stream
    x, y, real = next(tr._batches(tok, cfg, c, seed=999))
    assert real == int((x != tok.pad_token_id).sum())
    assert (y[x == tok.pad_token_id] == -100).all()
    before = batch_loss(model, x, y, tok.pad_token_id)
    log = tr.pretrain(model, tok, cfg, c, seed=0, progress=False)
    after = batch_loss(model, x, y, tok.pad_token_id)
    assert after < before - 0.3, (before, after)
    assert 15 <= log.steps[-1] <= 25
    assert log.tokens[-1] >= c.n_tokens and log.tokens == sorted(log.tokens)
    assert log.loss[-1] < log.loss[0]
    assert max(log.lr) <= c.lr and log.lr[-1] < max(log.lr)  # cosine decay after the warm-up
    assert not model.training


def test_pretrain_masks_the_prompt(tok):
    """The loss covers the completion only: labels are -100 over each document's prompt."""
    c = tiny_pretrain_config()
    x, y, _ = next(tr._batches(tok, CFG, c, seed=1))
    assistant_think = tok("<|assistant|>\n<think>\n", add_special_tokens=False)["input_ids"]
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        start = next(i for i in range(len(row_x)) if row_x[i:i + len(assistant_think)] == assistant_think)
        n_prompt = start + len(assistant_think)
        assert all(v == -100 for v in row_y[:n_prompt])
        real = [i for i, t in enumerate(row_x) if t != tok.pad_token_id]
        assert row_y[n_prompt:real[-1] + 1] == row_x[n_prompt:real[-1] + 1]
        assert row_x[real[-1]] == tok.eos_token_id or len(real) == c.block_size


# ----------------------------------------------------------------------------- saving and loading


def test_save_and_load_round_trip(tok, tmp_path):
    c = tiny_pretrain_config()
    model = tr.new_model(tok, c, seed=3)
    target = tmp_path / "reasoner"
    manifest = {"seed": 3, "note": "test"}
    tr.save_reasoner(model, tok, target, manifest)
    # saving again over an existing folder replaces it
    tr.save_reasoner(model, tok, target, {**manifest, "again": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reasoner"], "no temp or old folder left behind"
    assert (target / "model.safetensors").exists()
    assert not list(target.glob("*.bin")) and not list(target.glob("*.pt"))
    assert tr.read_manifest(target) == {**manifest, "again": True}
    loaded, tok2 = tr.load_reasoner(target)
    assert not loaded.training
    ids = torch.tensor([tok(tw.prompt_for("Q:a5,b+6", tok) + "a5: 5", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    text = tw.prompt_for("Q:a5,b+6", tok) + tw.oracle_trace(tw.parse_question("Q:a5,b+6"))
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert tw.prompt_for("Q:a5,b+6", tok2) == tw.prompt_for("Q:a5,b+6", tok)
    assert len(tok2) == len(tok) and tok2.eos_token_id == tok.eos_token_id and tok2.pad_token_id == tok.pad_token_id


def test_load_reasoner_missing_names_notebook_00(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"notebooks/00_base_model\.ipynb"):
        tr.load_reasoner(tmp_path / "nothing-here")


# ----------------------------------------------------------------------------- the shipped reasoner

# notebook 00's bars ("want ..."). The length CV bar is 0.1 since the local teacher: its wording is drawn per step, so
# lengths average out over the steps and the teacher's own traces have a mean CV near 0.16 over 4 samples per problem
# (the habit teacher's, one style per trace, near 0.32)
HELDOUT_BARS = {"greedy_accuracy": (0.9, None), "greedy_over_oracle": (1.8, None),
                "sampled_accuracy": (0.3, 0.85), "mean_cv": (0.1, None)}


def test_shipped_reasoner_matches_config():
    """checkpoints/toy-reasoner is what the toy profile describes, was made from its seed, and reasons."""
    if not (SHIPPED / "model.safetensors").exists():
        pytest.skip(f"{SHIPPED.relative_to(REPO)} is absent: train it with notebooks/00_base_model.ipynb "
                    "(toy profile, pretrain.retrain=true) and copy the model folder there")
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from tsq_utils.model.generation import Decoding, sample

    profile = load_profile("toy")
    # safetensors only: no pickled weights shipped
    assert not [p.name for p in SHIPPED.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    weights = load_file(SHIPPED / "model.safetensors")
    tok = AutoTokenizer.from_pretrained(SHIPPED)
    expected = tr.model_config(tok, profile.pretrain)
    shipped = json.loads((SHIPPED / "config.json").read_text())
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "tie_word_embeddings", "pad_token_id", "eos_token_id"):
        assert shipped[key] == getattr(expected, key), key
    assert shipped["vocab_size"] == len(tok)
    assert weights["model.embed_tokens.weight"].shape == (len(tok), profile.pretrain.hidden_size)
    assert sum(1 for k in weights if k.endswith("self_attn.q_proj.weight")) == profile.pretrain.num_layers

    man = tr.read_manifest(SHIPPED)
    missing = [k for k in ("seed", "pretrain_config", "toyworld_config", "tokens_seen", "wall_time_s", "heldout")
               if k not in man]
    assert not missing, f"toy_manifest.json lacks {missing}"
    assert man["seed"] == stage_seed(profile.seed, "base_model"), "made from the toy profile's seed"
    pre = {k: v for k, v in man["pretrain_config"].items() if k != "retrain"}
    assert pre == {k: v for k, v in dataclasses.asdict(profile.pretrain).items() if k != "retrain"}
    assert man["toyworld_config"] == dataclasses.asdict(profile.toyworld) == dataclasses.asdict(ToyWorldConfig())
    assert man["toyworld"] == tw.world_description(profile.toyworld), "the manifest describes today's teacher"
    assert isinstance(man["tokens_seen"], int) and man["tokens_seen"] > 0
    assert man["wall_time_s"] > 0
    held = man["heldout"]
    for key, (lo, hi) in HELDOUT_BARS.items():
        assert held[key] >= lo, f"heldout.{key} = {held[key]} is below {lo}"
        if hi is not None:
            assert held[key] <= hi, f"heldout.{key} = {held[key]} is above {hi}"

    model, tok = tr.load_reasoner(SHIPPED)
    probs = [tw.parse_question(q) for q in ("Q:a5,b+6,c-3", "Q:a17,b-4,c+9,d+2", "Q:a30,b+8,c-6,d-9,e+3,f-7")]
    prompts = [tw.prompt_for(p.question, tok) for p in probs]
    res = sample(model, tok, prompts, Decoding(temperature=0, max_new_tokens=400))
    for p, text, reason in zip(probs, (t[0] for t in res.texts), (r[0] for r in res.finish_reasons)):
        assert reason == "stop", text
        assert re.search(r"\n</think>\n\nThe answer is \\boxed\{\d+\}\.$", text), text


def test_shipped_reasoner_was_trained_on_todays_teacher():
    """The shipped manifest's teacher fingerprint equals the current code's (and the pinned value, which
    test_local_trace_at_temperature_one_is_the_teacher checks without the checkpoint): a teacher change needs a
    retrained reasoner."""
    if not (SHIPPED / "toy_manifest.json").exists():
        pytest.skip("checkpoints/toy-reasoner is absent")
    fingerprint = tr.read_manifest(SHIPPED)["teacher_fingerprint"]
    assert fingerprint == tw.teacher_fingerprint(load_profile("toy").toyworld) == SHIPPED_TEACHER
