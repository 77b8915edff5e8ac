"""The Task interface: problems by split, prompt, grading, oracle and worked example of one reasoning task.

A task is what a profile names in data.train and data.eval: "toy" (the toy world, task/toy.py) or a math
benchmark such as "math500" (task/benchmark.py); task/registry.py finds a task by its name. Everything that
differs between the two lives behind this interface, so the stages ask the task instead of comparing names.
The think/answer format and step splitting are the same for every task (task/format.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import pandas as pd

from .grading import grade_many

# The problem splits a task may offer: training problems (stage 01), evaluation problems (05, 06, 07), TLDR's
# dev set (07) and notebook 00's held-out checks of the base model. Each has its own seed, so none overlap.
SPLITS = ("train", "test", "dev", "heldout")
# Columns every problems table has (a benchmark adds its own, e.g. source).
PROBLEM_COLUMNS = ("problem_id", "k", "problem", "gold", "prompt")


class NoOracleError(ValueError):
    """The task has no oracle (shortest correct trace): only the toy world knows one."""


class Task(ABC):
    """One reasoning task: its problems by split, its prompt, its grader and (toy world only) its oracle."""

    name: str
    # the grader of task.grading.GRADERS that Task.grade applies: "toy" (exact integer match) or "math" (math-verify
    # equivalence); a string because it is recorded in cache keys and manifests. A task with its own rule overrides
    # grade and names its rule here.
    grader: str
    # whether oracle_lengths/oracle_text exist (the toy world's shortest correct trace); a math task has none
    has_oracle: bool = False
    splits: tuple[str, ...] = ("train", "test")

    @abstractmethod
    def problems(self, profile, tokenizer, split: str, n: int | None = None) -> pd.DataFrame:
        """The problems table of a split (problem_id, k, problem, gold, prompt, ...); n overrides the profile's size."""

    @abstractmethod
    def prompt(self, problem: str, tokenizer) -> str:
        """The chat-formatted prompt of one problem text, ending with '<think>\\n'."""

    @abstractmethod
    def demo_example(self, profile, tokenizer) -> dict:
        """Notebook 00's worked example: problem_id, problem, gold, prompt, grader, oracle_tokens (None: no oracle)."""

    def grade(self, texts: Sequence[str], golds: Sequence[str]) -> list[str]:
        """Statuses (correct/wrong/no_answer/timeout) of completions against their golds, by this task's grader."""
        return grade_many(list(texts), list(golds), self.grader)

    def oracle_text(self, problem: str, problem_id: str = "") -> str:
        """The oracle (shortest correct) completion of a problem; NoOracleError for a task without one."""
        raise NoOracleError(f"task {self.name!r} has no oracle: only the toy world knows the shortest correct trace")

    def oracle_lengths(self, problems: pd.DataFrame, tokenizer) -> pd.DataFrame:
        """Per problem: problem_id, k, oracle_text, oracle_tokens; NoOracleError for a task without an oracle."""
        raise NoOracleError(f"task {self.name!r} has no oracle: only the toy world knows the shortest correct trace")

    def check_split(self, split: str) -> None:
        """ValueError unless this task offers the split."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        if split not in self.splits:
            raise ValueError(f"task {self.name!r} has no {split!r} split (it has {', '.join(self.splits)})")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
