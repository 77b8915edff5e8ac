"""Ablation rows: one named variant of the pipeline each (selection, refinement, objective, training seed).

A row is built from the profile's settings with one part changed (make_row); table_rows gives the paper's
Tables 2–4 and the base model, sweep_rows the α (Fig. 4), ε, margin-sign and η sweeps, build_rows both plus the
extra training seeds of the headline rows. Objectives, as the paper defines them with
L = η·L_DPO-L + (1 − η)·L_SFT and the margin λ·log(ℓ_l/ℓ_w) inside L_DPO-L:

    dpo        η = 1, λ = 0     (plain DPO, no SFT anchor)
    sft        η = 0            (SFT on the chosen responses; β, λ and s play no part)
    dpo_sft    λ = 0            (DPO + SFT, η as the profile)
    dpo_l_sft  the profile's η, λ, s (TokenSqueeze)

The no-KL rewrite is refinement with ε = ∞ (refine = "no_kl").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ..core.config import AblationsConfig, Profile, RefinementConfig, SelectionConfig, TrainingConfig
from ..method import selection

OBJECTIVES: dict[str, dict[str, float]] = {
    "dpo": {"eta": 1.0, "lam": 0.0},
    "sft": {"eta": 0.0},
    "dpo_sft": {"lam": 0.0},
    "dpo_l_sft": {},
}
OBJECTIVE_LABELS = {"dpo": "DPO", "sft": "SFT", "dpo_sft": "DPO + SFT", "dpo_l_sft": "DPO-L + SFT"}
REFINE_MODES = ("off", "kl", "no_kl")
GROUPS = ("base", "table2", "table3", "table4", "alpha", "epsilon", "sign", "eta")


@dataclass
class Row:
    """One named variant of the pipeline: selection, refinement, training settings and a training seed."""

    name: str  # "group/point", e.g. "table4/dpo", "alpha/0.3"; "base" is the untrained base model
    label: str
    selection: SelectionConfig
    refine: str  # "off", "kl" or "no_kl"
    refinement: RefinementConfig
    objective: str  # a key of OBJECTIVES, or "none" for the base model
    training: TrainingConfig
    seed: int = 0  # training replicate: 0 is notebook 04's seed
    x: float | None = None  # the swept value of a sweep row

    @property
    def group(self) -> str:
        """The table or sweep the row belongs to (the part of its name before '/')."""
        return self.name.split("/", 1)[0]

    @property
    def is_base(self) -> bool:
        """True for the untrained base model's row."""
        return self.objective == "none"


@dataclass(frozen=True)
class RowChange:
    """What a row changes from the profile's settings (None: the profile's value); make_row's keyword arguments."""

    variant: str | None = None  # selection variant
    alpha: float | None = None
    refine: str = "kl"  # one of REFINE_MODES
    epsilon: float | None = None
    objective: str = "dpo_l_sft"  # a key of OBJECTIVES, or "none" for the base model
    eta: float | None = None
    length_margin_sign: int | None = None
    seed: int = 0  # training replicate
    x: float | None = None  # the swept value of a sweep row

    def check(self, name: str) -> None:
        """ValueError naming the row and the first value out of its range."""
        if self.refine not in REFINE_MODES:
            raise ValueError(f"row {name!r}: refine must be one of {REFINE_MODES}, got {self.refine!r}")
        if self.objective not in OBJECTIVES and self.objective != "none":
            raise ValueError(f"row {name!r}: objective must be one of {list(OBJECTIVES)} (or 'none'), "
                             f"got {self.objective!r}")
        if self.variant is not None and self.variant not in selection.VARIANTS:
            raise ValueError(f"row {name!r}: unknown selection variant {self.variant!r}; "
                             f"one of {list(selection.VARIANTS)}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"row {name!r}: alpha must lie in [0, 1], got {self.alpha!r}")
        if self.epsilon is not None and not (self.epsilon >= 0):
            raise ValueError(f"row {name!r}: epsilon must be a number >= 0, got {self.epsilon!r}")
        if self.eta is not None and not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"row {name!r}: eta must lie in [0, 1], got {self.eta!r}")
        if self.length_margin_sign is not None and self.length_margin_sign not in (-1, 1):
            raise ValueError(f"row {name!r}: length_margin_sign must be +1 or -1, got {self.length_margin_sign!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"row {name!r}: seed must be a non-negative integer, got {self.seed!r}")


def make_row(profile: Profile, name: str, label: str, **changes: Any) -> Row:
    """A row from the profile's settings with the given changes (RowChange's fields: variant, alpha, refine, epsilon,
    objective, eta, length_margin_sign, seed, x); objective sets η and λ as the paper defines."""
    c = RowChange(**changes)
    c.check(name)
    sel = dataclasses.replace(profile.selection)
    if c.variant is not None:
        sel.variant = c.variant
    if c.alpha is not None:
        sel.alpha = float(c.alpha)
    eps = math.inf if c.refine == "no_kl" else float(profile.refinement.epsilon if c.epsilon is None else c.epsilon)
    ref = dataclasses.replace(profile.refinement, enabled=c.refine != "off", epsilon=eps)
    tr = dataclasses.replace(profile.training, **OBJECTIVES.get(c.objective, {}))
    if profile.ablations.batch_size:
        tr.batch_size = profile.ablations.batch_size
    if profile.ablations.num_processes:
        tr.num_processes = profile.ablations.num_processes
    if profile.ablations.lr:
        tr.lr = profile.ablations.lr
    if c.eta is not None:
        tr.eta = float(c.eta)
    if c.length_margin_sign is not None:
        tr.length_margin_sign = int(c.length_margin_sign)
    return Row(name, label, sel, c.refine, ref, c.objective, tr, c.seed, None if c.x is None else float(c.x))


def _points(values: Iterable[float], default: float) -> list[float]:
    """Sorted distinct sweep points, the profile's own value included."""
    return sorted({float(v) for v in values} | {float(default)})


def _fmt(v: float) -> str:
    """A sweep value as it appears in a row name (0.2, 1, inf)."""
    return "inf" if math.isinf(v) else f"{v:g}"


def table_rows(profile: Profile) -> list[Row]:
    """The rows of the paper's Tables 2–4 and the base model, all with training seed 0."""
    P = profile
    r = [make_row(P, "base", "base model (no training)", refine="off", objective="none")]
    for v, lab in (("shortest", "Shortest"), ("q_fix", "Q-FIX"), ("q_dyn", "Q-DYN"),
                   ("q_dyn_extra", "Q-DYN + extra negatives")):
        r.append(make_row(P, f"table2/{v}", lab, variant=v, refine="off"))
    r += [make_row(P, "table3/none", "no refinement", refine="off"),
          make_row(P, "table3/kl", "KL-constrained refinement (ours)", refine="kl"),
          make_row(P, "table3/no_kl", "rewrite without the KL check", refine="no_kl")]
    r += [make_row(P, f"table4/{o}", OBJECTIVE_LABELS[o] + (" (ours)" if o == "dpo_l_sft" else ""), objective=o)
          for o in OBJECTIVES]
    return r


def sweep_rows(profile: Profile) -> list[Row]:
    """The α (Fig. 4), ε, margin-sign and η sweeps, with training seed 0; each holds the profile's own value."""
    P, A = profile, profile.ablations
    r = [make_row(P, f"alpha/{_fmt(a)}", f"α = {a:g}", variant="q_dyn", alpha=a, refine="off", x=a)
         for a in _points(A.alphas, P.selection.alpha)]
    r += [make_row(P, f"epsilon/{_fmt(e)}", f"ε = {e:g}", refine="kl", epsilon=e, x=e)
          for e in _points(A.epsilons, P.refinement.epsilon)]
    r.append(make_row(P, "epsilon/inf", "ε = ∞ (no KL check)", refine="no_kl", x=math.inf))
    r += [make_row(P, f"sign/{s:+d}", f"s = {s:+d}", length_margin_sign=s, x=s) for s in (-1, 1)]
    r += [make_row(P, f"eta/{_fmt(e)}", f"η = {e:g}", eta=e, x=e) for e in _points(A.etas, P.training.eta)]
    return r


def matches(row: Row, names: Iterable[str]) -> bool:
    """True when a row's name or group is among the names."""
    names = set(names)
    return row.name in names or row.group in names


def _check_names(names: Iterable[str], rows: Sequence[Row], what: str) -> None:
    """ValueError naming any entry that is neither a row name nor a group of the rows."""
    known = {r.name for r in rows} | {r.group for r in rows}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{what}: unknown row or group name(s) {unknown}; "
                         f"known groups {sorted({r.group for r in rows})}, "
                         f"rows {sorted(r.name for r in rows)}")


def build_rows(profile: Profile, seeds: int | None = None, headline: Sequence[str] | None = None) -> list[Row]:
    """Every row of the tables and sweeps, plus training seeds 1..seeds-1 of the headline rows."""
    A: AblationsConfig = profile.ablations
    seeds = A.seeds if seeds is None else seeds
    headline = A.headline if headline is None else headline
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive integer, got {seeds!r}")
    if isinstance(headline, str):
        raise ValueError(f"headline must be a list of row or group names, got the string {headline!r}")
    rows = table_rows(profile) + sweep_rows(profile)
    _check_names(headline, rows, "headline")
    extra = [dataclasses.replace(r, seed=s) for r in rows if matches(r, headline) and not r.is_base
             for s in range(1, seeds)]
    return rows + extra


def select_rows(rows: Sequence[Row], names: Sequence[str] | None) -> list[Row]:
    """The rows whose name or group is in names (all of them for None), every training seed included."""
    if names is None:
        return list(rows)
    if isinstance(names, str):
        names = [names]
    _check_names(names, rows, "rows")
    return [r for r in rows if matches(r, names)]


def describe_rows(rows: Sequence[Row]) -> pd.DataFrame:
    """One line per row: its name, seed and the settings that distinguish rows."""
    out = []
    for r in rows:
        s, t = r.selection, r.training
        out.append({
            "name": r.name, "seed": r.seed, "label": r.label, "variant": s.variant, "alpha": s.alpha,
            "refine": r.refine, "epsilon": r.refinement.epsilon if r.refine != "off" else None,
            "objective": r.objective, "eta": t.eta, "lam": t.lam, "sign": t.length_margin_sign,
        })
    return pd.DataFrame(out)
