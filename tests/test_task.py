"""The task layer: one Task interface for the toy world and the math benchmarks, one think/answer format."""

import json
import re
from pathlib import Path

import pytest

from tsq_utils.core.config import load_profile
from tsq_utils.task import format as fmt
from tsq_utils.task import grading
from tsq_utils.task.base import NoOracleError, Task
from tsq_utils.task.benchmark import MathTask
from tsq_utils.task.registry import demo_task, eval_tasks, get_task, task_names, training_task
from tsq_utils.task.toy import ToyTask

PACKAGE = Path(__file__).resolve().parents[1] / "tsq_utils"


class ChatStub:
    """A tokenizer with a chat template and nothing else (what MathTask.prompt needs)."""

    chat_template = "stub"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "<u>" + messages[0]["content"] + "<a>"


# --------------------------------------------------------------------------- registry


def test_registry_knows_the_toy_world_and_every_benchmark():
    assert isinstance(get_task("toy"), ToyTask) and get_task("toy").grader == "toy" and get_task("toy").has_oracle
    m = get_task("math500")
    assert isinstance(m, MathTask) and m.name == "math500" and m.grader == "math" and not m.has_oracle
    assert {"toy", "math500", "aime24", "aime25", "gsm8k", "amc23", "math_train"} <= set(task_names())


@pytest.mark.parametrize("name", ["tyo", "", "MATH500", None])
def test_registry_refuses_an_unknown_task_naming_the_known_ones(name):
    with pytest.raises(ValueError, match=r"unknown task .*known tasks are toy, math500"):
        get_task(name)


def test_profile_helpers():
    toy = load_profile("toy")
    assert training_task(toy).name == "toy" and list(eval_tasks(toy)) == ["toy"]
    hub = load_profile("r1-1.5b")
    assert training_task(hub).name == "math_train" and list(eval_tasks(hub)) == ["math500", "aime24", "aime25"]
    # notebook 00's example: the toy world where it trains, else the first benchmark of data.eval
    assert demo_task(toy).name == "toy" and demo_task(hub).name == "math500"


# --------------------------------------------------------------------------- the toy task


# The first two rows of each split of the ci profile (seed 1234, k 2..3, totals <= 19), as the code before the Task
# interface built them (sampling.training_problems, evaluation.eval_problems, tldr.dev_problems,
# base_model.heldout_problems): the same seeds, the same problems.
CI_SPLITS = {
    "train": (12, [("train-00000-k2", "Q:a7,b-1", "6"), ("train-00001-k3", "Q:a15,b-5,c-7", "3")]),
    "test": (12, [("test-00000-k2", "Q:a8,b+9", "17"), ("test-00001-k3", "Q:a6,b+5,c+8", "19")]),
    "dev": (8, [("dev-00000-k2", "Q:a7,b+2", "9"), ("dev-00001-k3", "Q:a7,b+1,c+1", "9")]),
    "heldout": (12, [("heldout-00000-k2", "Q:a9,b+5", "14"), ("heldout-00001-k3", "Q:a16,b-2,c-6", "8")]),
}


@pytest.mark.parametrize("split", list(CI_SPLITS))
def test_toy_splits_are_the_seeded_tables_of_before(split, tiny_toy_tokenizer):
    prof = load_profile("ci", {"tldr.n_dev_problems": 8})
    n, head = CI_SPLITS[split]
    table = get_task("toy").problems(prof, tiny_toy_tokenizer, split)
    assert list(table.columns) == ["problem_id", "k", "problem", "gold", "prompt", "source"]
    assert len(table) == n and [tuple(r) for r in table[["problem_id", "problem", "gold"]].head(2).values] == head
    assert all(p.endswith("<think>\n") and q in p for p, q in zip(table["prompt"], table["problem"]))
    assert table.equals(get_task("toy").problems(prof, tiny_toy_tokenizer, split))  # seeded


def test_toy_splits_do_not_overlap_and_n_overrides(tiny_toy_tokenizer):
    prof = load_profile("ci")
    toy = get_task("toy")
    questions = {s: set(toy.problems(prof, tiny_toy_tokenizer, s, n=40)["problem_id"])
                 for s in ("train", "test", "dev")}
    assert all(len(q) == 40 for q in questions.values())
    assert not (questions["train"] & questions["test"]) and not (questions["train"] & questions["dev"])
    # the held-out checks use as many problems as the evaluation: 420 on toy, as the shipped reasoner records
    assert toy.split_size(load_profile("toy"), "heldout") == 420
    assert toy.split_size(prof, "heldout") == prof.data.n_eval_problems
    with pytest.raises(ValueError, match="unknown split 'val'"):
        toy.problems(prof, tiny_toy_tokenizer, "val")


def test_toy_oracle_and_demo(tiny_toy_tokenizer):
    toy, prof = get_task("toy"), load_profile("ci")
    oracle = "a16: 16\n\nb-2: 16-2=14\n\nc-6: 14-6=8\n</think>\n\nThe answer is \\boxed{8}."
    assert toy.oracle_text("Q:a16,b-2,c-6") == oracle
    table = toy.problems(prof, tiny_toy_tokenizer, "heldout", n=2)
    lengths = toy.oracle_lengths(table, tiny_toy_tokenizer)
    assert list(lengths["oracle_text"]) == [toy.oracle_text(q) for q in table["problem"]]
    assert list(lengths["oracle_tokens"]) == [len(tiny_toy_tokenizer(t, add_special_tokens=False)["input_ids"])
                                              for t in lengths["oracle_text"]]
    ex = toy.demo_example(prof, tiny_toy_tokenizer)
    assert (ex["problem"], ex["gold"], ex["grader"]) == ("Q:a14,b-1,c-9,d+7", "11", "toy")
    assert ex["oracle_tokens"] == len(tiny_toy_tokenizer(toy.oracle_text(ex["problem"]),
                                                         add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------- the math task

ROWS = [{"problem": f"What is {i}+{i}?", "answer": str(2 * i), "unique_id": f"p{i}", "level": 1 + i % 5}
        for i in range(6)]


@pytest.fixture
def math_profile(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return load_profile("ci", {"data.train": "math500", "data.eval": ["math500"], "data.n_train_problems": 3,
                               "data.n_eval_problems": 4, "data.local_files": {"math500": str(path)}})


def test_math_task_tables_from_a_local_file(math_profile):
    task = training_task(math_profile)
    train = task.problems(math_profile, ChatStub(), "train")
    # a seeded subset of 3, kept in file order, with the R1 prompt
    assert len(train) == 3 and list(train.index) == [0, 1, 2]
    ids = [int(i[len("math500/p"):]) for i in train["problem_id"]]
    assert ids == sorted(ids) and train.equals(task.problems(math_profile, ChatStub(), "train"))
    assert all(p == f"<u>{q}\n{'Please reason step by step, and put your final answer within '}\\boxed{{}}.<a><think>\n"
               for p, q in zip(train["prompt"], train["problem"]))
    assert list(train["gold"]) == [str(2 * i) for i in ids] and list(train["k"]) == [1 + i % 5 for i in ids]
    test = eval_tasks(math_profile)["math500"].problems(math_profile, ChatStub(), "test")
    assert list(test["problem_id"]) == ["math500/p0", "math500/p1", "math500/p2", "math500/p3"]  # the first n
    ex = demo_task(math_profile).demo_example(math_profile, ChatStub())
    assert (ex["problem_id"], ex["gold"], ex["grader"], ex["oracle_tokens"]) == ("math500/p0", "0", "math", None)


def test_math_task_has_no_oracle_and_no_dev_split(math_profile):
    task = get_task("math500")
    with pytest.raises(NoOracleError, match="only the toy world"):
        task.oracle_text("What is 1+1?")
    with pytest.raises(ValueError, match="task 'math500' has no 'dev' split"):
        task.problems(math_profile, ChatStub(), "dev")


def test_a_new_task_needs_only_the_interface():
    class Echo(Task):
        name, grader = "echo", "toy"

        def problems(self, profile, tokenizer, split, n=None):
            raise NotImplementedError

        def prompt(self, problem, tokenizer):
            return problem + fmt.THINK_OPEN + "\n"

        def demo_example(self, profile, tokenizer):
            return {}

    echo = Echo()
    assert echo.grade(["x</think>\\boxed{3}", "\\boxed{3}", "x</think>\\boxed{4}"], ["3", "3", "3"]) == [
        "correct", "correct", "wrong"]
    with pytest.raises(TypeError):
        type("Half", (Task,), {"name": "h", "grader": "toy"})()  # abstract methods left out


# --------------------------------------------------------------------------- grading per task


def test_grading_per_task():
    text = "a5: 5\n\nb+3: 5+3=8\n</think>\n\nThe answer is \\boxed{8}."
    assert get_task("toy").grade([text, text, "a5: 5"], ["8", "9", "8"]) == ["correct", "wrong", "no_answer"]
    # the math grader accepts an equivalent form that exact match refuses
    half = "so\n</think>\n\nThe answer is $\\boxed{\\frac{1}{2}}$."
    assert get_task("math500").grade([half, half], ["0.5", "1/3"]) == ["correct", "wrong"]
    with pytest.raises(ValueError, match="toy gold must be an integer"):
        get_task("toy").grade([half], ["0.5"])
    with pytest.raises(ValueError, match="unknown grader 'exact'"):
        grading.grade_many([half], ["1"], "exact")


# --------------------------------------------------------------------------- one think/answer format


def test_one_definition_of_the_think_tags():
    from tsq_utils.method import refinement
    from tsq_utils.model import standin
    from tsq_utils.task import data

    assert grading.THINK_END is fmt.THINK_CLOSE and refinement.THINK_CLOSE is fmt.THINK_CLOSE
    assert standin.THINK_CLOSE is fmt.THINK_CLOSE and data.THINK_START is fmt.THINK_OPEN
    assert refinement.STOP_STRINGS == ["\n\n", "</think>"]
    # no other module assigns the tag to a name of its own
    assigned = re.compile(r"""^\s*[A-Z_, ]+=\s*(\(?\s*"<think>",\s*)?"</think>"\)?\s*$""", re.M)
    owners = [p.relative_to(PACKAGE).as_posix() for p in sorted(PACKAGE.rglob("*.py"))
              if assigned.search(p.read_text())]
    assert owners == ["task/format.py"]


@pytest.mark.parametrize("text, steps, tail", [
    ("a\n\nb\n</think>\n\nx", ["a\n\n", "b"], "\n</think>\n\nx"),
    ("a\n \t\nb", ["a\n \t\n", "b"], ""),  # a blank line may hold spaces and tabs
    ("\n\na\n\nb", ["\n\na\n\n", "b"], ""),  # leading blank lines stay with the first step
    ("a\nb\n\n\n\nc  </think>z</think>", ["a\nb\n\n\n\n", "c"], "  </think>z</think>"),
    ("</think>only", [], "</think>only"),
    ("", [], ""),
])
def test_split_steps_closed_cases(text, steps, tail):
    assert fmt.split_steps(text) == (steps, tail)
    assert fmt.join_steps(*fmt.split_steps(text)) == text
    assert fmt.count_steps(text) == sum(1 for s in steps if s.strip())


def test_print_steps_splits_as_refinement_does(capsys):
    fmt.print_steps("a5: 5\n \nb+3: 5+3=8\n\n\n\nc-1: 8-1=7\n</think>\n\nThe answer is \\boxed{7}.", max_steps=2)
    assert capsys.readouterr().out.splitlines() == [
        "step 0: a5: 5", "step 1: b+3: 5+3=8", "... (1 more steps)", "answer: The answer is \\boxed{7}."]
    fmt.print_steps("a5: 5\n\nb+3")
    assert capsys.readouterr().out.splitlines() == ["step 0: a5: 5", "step 1: b+3",
                                                    "(no </think>: the thinking did not finish; the answer is read "
                                                    "from the whole text)"]
