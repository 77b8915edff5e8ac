"""Notebook 06's reading aids: each table's training budget against notebook 04's, and each row against the base
model and notebook 05's model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import pandas as pd

from ..core.profile_schema import Profile


@dataclass(frozen=True)
class Budget:
    """What one trained ablation row gets, and what notebook 04's training got."""

    steps: int
    batch_size: int
    lr: float
    pairs: int  # the pairs a row trains on (the median over the rows)
    steps_04: int | None
    pairs_04: int | None
    lr_04: float
    batch_size_04: int

    @property
    def visits(self) -> int:
        """Pair visits: optimizer steps times pairs per step."""
        return self.steps * self.batch_size

    @property
    def visits_04(self) -> int | None:
        """Notebook 04's pair visits (None when 04 has not run)."""
        return None if self.steps_04 is None else self.steps_04 * self.batch_size_04


def training_budget(profile: Profile, summary: pd.DataFrame, training_summary: Mapping | None) -> Budget:
    """The rows' budget from the profile and the rows that ran (their steps and pairs), 04's from its summary."""
    A, T = profile.ablations, profile.training
    trained = summary[summary["train_steps"].fillna(0) > 0] if "train_steps" in summary else summary.iloc[:0]
    steps = int(trained["train_steps"].median()) if len(trained) else A.max_steps
    pairs = int(trained["n_pairs"].median()) if len(trained) else 0
    t04 = training_summary or {}
    # pairs per optimizer step: per-device batch x accumulation x processes (a row's and notebook 04's own counts)
    row_procs = A.num_processes or T.num_processes
    return Budget(steps=steps, batch_size=(A.batch_size or T.batch_size) * T.grad_accum * row_procs, lr=A.lr or T.lr,
                  pairs=pairs, steps_04=t04.get("steps"), pairs_04=t04.get("pairs"), lr_04=T.lr,
                  batch_size_04=T.batch_size * T.grad_accum * T.num_processes)


def budget_line(b: Budget) -> str:
    """One sentence: a row's steps, rate and pair visits, against notebook 04's."""
    row = (f"Training budget of every row: {b.steps} optimizer steps of {b.batch_size} pairs at lr {b.lr:g}, "
           f"{b.visits:,} pair visits")
    if b.pairs:
        row += f" over its {b.pairs:,} pairs ({b.visits / b.pairs:.2f} epochs)"
    if b.steps_04 is None:
        return row + "; notebook 04 has not run, so there is nothing to compare it with."
    row += (f"; notebook 04's model: {b.steps_04} steps of {b.batch_size_04} at lr {b.lr_04:g}, {b.visits_04:,} "
            f"visits over {b.pairs_04:,} pairs.")
    if b.visits == b.visits_04 and b.lr == b.lr_04:
        return row + " A row trains exactly as much as 04's model."
    return (row + f" A row gets {b.visits / b.visits_04:.0%} of 04's training at {b.lr / b.lr_04:.2g}x its rate: "
            "rows compare with each other, not with notebook 05.")


def versus(table: pd.DataFrame, base_acc: float, acc_05: float | None) -> pd.DataFrame:
    """Each row's accuracy (%) and its difference in points from the base model and from notebook 05's model."""
    t = table.dropna(subset=["acc"])
    out = pd.DataFrame({"row": t["label"].to_numpy(), "Acc (%)": (100 * t["acc"]).round(1).to_numpy(),
                        "vs base (points)": (100 * (t["acc"] - base_acc)).round(1).to_numpy()})
    if acc_05 is not None:
        out["vs 05's model (points)"] = (100 * (t["acc"] - acc_05)).round(1).to_numpy()
    return out.set_index("row")


_SETTINGS = ("variant", "alpha", "refine", "epsilon", "objective", "eta", "lam", "sign")


def twin_reason(settings: pd.DataFrame, alpha_two: float) -> str:
    """Why rows with identical results trained one model, from their settings (ablations.describe_rows)."""
    differ = {c for c in _SETTINGS if c in settings and settings[c].astype(str).nunique() > 1}
    if not differ:
        return "the same settings: the profile's own values recur in several tables and sweeps"
    if differ <= {"variant", "alpha"} and (settings["variant"].eq("shortest") | (settings["alpha"] <= alpha_two)).all():
        return (f"Shortest, and Q-DYN at α ≤ {alpha_two:.3g}, keep one positive per problem (n₊ = 1 at this N): "
                "the same pairs")
    if differ <= {"objective", "eta", "lam"} and settings["eta"].eq(0).any():
        return "η = 0 gives the DPO-L term weight 0: the objective is SFT alone"
    if differ <= {"refine", "epsilon"} and settings["epsilon"].astype(float).eq(float("inf")).any():
        return "ε = ∞ accepts every shorter candidate: it is the rewrite without the KL check"
    return (f"identical results although settings differ ({', '.join(sorted(differ))}): the same pairs, or trainings "
            "too short to move the models apart")
