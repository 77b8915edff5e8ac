"""The math benchmarks (task/data.py) as tasks: the R1 prompt, math-verify grading, no oracle."""

from __future__ import annotations

import pandas as pd

from ..core.config import stage_seed
from .base import Task
from .data import BENCHMARKS, load_benchmark, local_path_for, r1_prompt


class MathTask(Task):
    """One math benchmark (MATH500, AIME, GSM8K, AMC23, the MATH train split) from the hub or a local JSONL file."""

    grader = "math"
    has_oracle = False
    splits = ("train", "test")

    def __init__(self, name: str) -> None:
        if name not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
        self.name = name

    def load(self, profile, limit: int | None = None) -> pd.DataFrame:
        """The benchmark's rows (data.local_files / data.local_dir, else the hub), the first `limit` of them."""
        d = profile.data
        return load_benchmark(self.name, local_path=local_path_for(self.name, d.local_files, d.local_dir), limit=limit)

    def problems(self, profile, tokenizer, split: str, n: int | None = None) -> pd.DataFrame:
        """train: a seeded random subset of n problems (kept in file order); test: the first n problems."""
        self.check_split(split)
        d = profile.data
        if split == "test":
            # the first n problems: evaluation sets are used whole at the paper's scale (MATH500 500, AIME 30 each)
            df = self.load(profile, limit=d.n_eval_problems if n is None else n).copy()
        else:
            # a seeded subset, not the first rows: a dataset's order can follow its subjects or difficulty
            n = d.n_train_problems if n is None else n
            df = self.load(profile)
            if len(df) > n:
                df = df.sample(n=n, random_state=stage_seed(profile.seed, "train-problems")).sort_index()
            df = df.reset_index(drop=True)
        df["prompt"] = [self.prompt(p, tokenizer) for p in df["problem"]]
        return df

    def prompt(self, problem: str, tokenizer) -> str:
        """The R1 prompt: the problem, R1's instruction, the chat template and '<think>\\n'."""
        return r1_prompt(problem, tokenizer)

    def demo_example(self, profile, tokenizer) -> dict:
        """The benchmark's first problem with its R1 prompt (no oracle)."""
        row = self.load(profile, limit=1).iloc[0]
        return {"problem_id": row["problem_id"], "problem": row["problem"], "gold": row["gold"],
                "prompt": self.prompt(row["problem"], tokenizer), "grader": self.grader, "oracle_tokens": None}

