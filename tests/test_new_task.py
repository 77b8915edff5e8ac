"""A task defined only in this module, registered here, runs stages 01-05 at ci size through the package functions
the notebooks call: nothing else in the package learns its name, its prompt or its grader.

The task is a variant of the toy world: the same chain-arithmetic questions, asked for the final total modulo 7 in a
prompt of its own, and graded by a rule of its own (the last boxed integer, taken modulo 7). The shipped toy reasoner
answers with the whole total, so a response that the toy grader calls wrong (17 against gold 3) is correct here:
every stage that grades must ask the task.
"""

import re

import pandas as pd
import pytest

from tsq_utils.core.config import REPO_ROOT, load_profile
from tsq_utils.method import dpo_l, evaluation, refinement, sampling, selection
from tsq_utils.model import base_model
from tsq_utils.task import toy
from tsq_utils.task.base import Task
from tsq_utils.task.format import THINK_OPEN
from tsq_utils.task.grading import extract_boxed, grade_toy
from tsq_utils.task.registry import TASKS, eval_tasks, register_task, training_task

NAME = "toy_mod7"
SEEDS = {"train": 11, "test": 12}


class Mod7Task(Task):
    """Chain arithmetic, answered modulo 7: its own prompt and its own grader, no oracle."""

    name = NAME
    grader = "mod7"  # a name for cache keys and manifests; the rule itself is grade() below
    splits = ("train", "test")

    def problems(self, profile, tokenizer, split, n=None):
        self.check_split(split)
        n = {"train": profile.data.n_train_problems, "test": profile.data.n_eval_problems}[split] if n is None else n
        tw = profile.toyworld
        probs = toy.make_problems(n, SEEDS[split], tw.k_min, tw.k_max, tw.max_value, split=f"mod7-{split}")
        return pd.DataFrame({"problem_id": [p.problem_id for p in probs], "k": [p.k for p in probs],
                             "problem": [p.question for p in probs], "gold": [str(p.answer % 7) for p in probs],
                             "prompt": [self.prompt(p.question, tokenizer) for p in probs]})

    def prompt(self, problem, tokenizer):
        # its own prompt: the chat template written out here, not toy.prompt_for
        return f"{toy.USER}\n{problem}\n{toy.ASSISTANT}\n{THINK_OPEN}\n"

    def demo_example(self, profile, tokenizer):
        row = self.problems(profile, tokenizer, "test", n=1).iloc[0]
        return {"problem_id": row["problem_id"], "problem": row["problem"], "gold": row["gold"],
                "prompt": row["prompt"], "grader": self.grader, "oracle_tokens": None}

    def grade(self, texts, golds):
        out = []
        for text, gold in zip(texts, golds):
            answer = extract_boxed(text)
            if answer is None or not re.fullmatch(r"\s*[+-]?\d+\s*", answer):
                out.append("no_answer")
            else:
                out.append("correct" if int(answer) % 7 == int(gold) else "wrong")
        return out


@pytest.fixture
def registered():
    register_task([NAME], lambda name: Mod7Task())
    yield
    TASKS.pop(NAME)


def test_the_task_grades_by_its_own_rule():
    task = Mod7Task()
    assert task.grade(["x</think>\\boxed{17}", "\\boxed{17}", "x</think>\\boxed{16}", "x"], ["3"] * 4) == [
        "correct", "correct", "wrong", "no_answer"]
    assert grade_toy("x</think>\\boxed{17}", "3") == "wrong"  # what a toy-grader shortcut would say


def test_a_new_task_runs_stages_01_to_05(registered, tmp_path):
    P = load_profile("ci", {"data.train": NAME, "data.eval": [NAME], "shards": 2, "workers": 1})
    task = training_task(P)
    assert isinstance(task, Mod7Task) and list(eval_tasks(P)) == [NAME]
    model, tok = base_model.load_model(str(REPO_ROOT / "checkpoints" / "toy-reasoner"), "toy", P)
    quiet = sampling.SampleRun(shards=P.shards, workers=1, progress=False)

    # 01: N graded samples per training problem, graded by the task
    samples = sampling.sample_and_grade(model, tok, task.problems(P, tok, "train"), task,
                                        sampling.sampling_decoding(P, seed=1), quiet)
    assert len(samples) == P.data.n_train_problems * P.sampling.n
    expected = pd.Series(task.grade(list(samples["text"]), list(samples["gold"])))
    expected[samples["finish_reason"] != "stop"] = expected.where(expected != "correct", "no_answer")
    assert list(samples["status"]) == list(expected)
    boxes = samples["text"].map(extract_boxed)
    assert (samples["correct"] & (boxes != samples["gold"])).any()  # correct here, wrong by exact match

    # 02: preference pairs from the graded samples
    pairs, stats = selection.select_with(samples, P.selection, seed=2)
    assert len(pairs) > 0 and set(pairs["problem_id"]) <= set(samples["problem_id"])

    # 03: KL refinement; a rewrite is kept only while the task still grades it correct
    grade_fn_factory = refinement.grader_factory(samples, task)
    row = pairs.iloc[0]
    assert grade_fn_factory(row)(row["chosen"]) is True
    refined, step_log = refinement.refine_pairs(model, tok, pairs, P.refinement, seed=3,
                                                grade_fn_factory=grade_fn_factory, progress=False)
    assert len(refined) == len(pairs) and (refined["chosen_tokens"] <= refined["chosen_tokens_original"]).all()
    assert all(task.grade([t], [g])[0] == "correct"
               for t, g in zip(refined["chosen"], refined["problem_id"].map(samples.groupby("problem_id")["gold"]
                                                                            .first())))

    # 04: DPO-L + SFT on the refined pairs
    log = dpo_l.train_and_save(model, tok, refined, P.training, tmp_path / "training",
                               dpo_l.TrainRun(seed=4, device="cpu", progress=False))
    assert len(log) > 0
    trained = base_model.load_model(str(tmp_path / "training" / "model"), "toy", P)[0]
    base = base_model.load_model(str(REPO_ROOT / "checkpoints" / "toy-reasoner"), "toy", P)[0]

    # 05: both models on the task's test split, graded by the task; no oracle row (the task has none)
    problems = evaluation.eval_problems(P, tok)
    spec = evaluation.eval_decoding(P, seed=5)
    results = pd.concat([evaluation.evaluate_model(name, m, tok, problems, spec, quiet)
                         for name, m in (("base", base), ("tokensqueeze", trained))], ignore_index=True)
    assert not task.has_oracle
    table = evaluation.metrics_table(results, P.evaluation.budget)
    assert list(table.index) == [("base", NAME), ("tokensqueeze", NAME)]
    assert (table["n"] == P.data.n_eval_problems * P.evaluation.n_samples).all()
    graded = results[results["finish_reason"] == "stop"]
    assert list(graded["status"]) == task.grade(list(graded["text"]), list(graded["gold"]))
