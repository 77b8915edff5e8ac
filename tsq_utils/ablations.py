"""Notebook 06: the paper's ablations (Tables 2–4, Fig. 4) and the ε, margin-sign and η sweeps, as cached rows.

A *row* is one named variant of the pipeline run on stage 01's samples table (never resampled):
selection (variant, α) → refinement (off; KL-constrained with ε; or the rewrite without the KL check,
ε = ∞) → training (objective, η, length-margin sign, training seed) → evaluation. Objectives, as the paper
defines them with L = η·L_DPO-L + (1 − η)·L_SFT and the margin λ·log(ℓ_l/ℓ_w) inside L_DPO-L:

    dpo        η = 1, λ = 0     (plain DPO, no SFT anchor)
    sft        η = 0            (SFT on the chosen responses; β, λ and s play no part)
    dpo_sft    λ = 0            (DPO + SFT, η as the profile)
    dpo_l_sft  the profile's η, λ, s (TokenSqueeze)

The no-KL rewrite is refinement with ε = ∞ through refine_pairs' config: every scored candidate passes the
KL test, so the shortest candidate shorter than the original step is kept (a step whose candidates are all
at least as long stays; a response whose answer no longer grades is still reverted).

Caching. Every intermediate artifact lives in runs/<profile>/ablations/cache/<key>/, written atomically (a
temp folder renamed into place, so an entry that exists is complete), where key hashes exactly what
determines it:

    pairs    samples table (bytes), the selection parameters the variant reads, the selection seed
    scored   pairs key, base model, every refinement parameter except ε, its seed: each step's candidates and
             their windowed KLs (the expensive half of refinement, run once at ε = ∞ without grading)
    refined  scored key, ε (∞ for the no-KL rewrite), the grader: the candidates kept under ε, reassembled and
             regraded (refinement.rethreshold, exact: candidates are drawn and scored before ε is looked at)
    model    pairs or refined key, base model, the training parameters the objective reads, training seed,
             max_steps, device
    results  model key (or the base model), the evaluation problems (content), n, temperature, top_p,
             max_new_tokens, seed, sampling batch size and backend, device

so rows that share a prefix share its work (Table 3's "none" is Table 2's Q-DYN and Fig. 4's α = 0.2; α = 0
is "Shortest", since q = 0·(1 − p) gives k = 1; every ε point and the no-KL rewrite share one scoring run), and
a rerun is instant. Parameters a stage does not read (α for Shortest, λ when η = 0, the evaluation budget, which
only enters the metrics) do not change keys; which selection knobs a variant reads is declared once, in its
entry of selection.REGISTRY. Every key also covers the code: cache_key hashes the payload together with the
fingerprint of the tsq_utils source (fingerprint.package_hash), so after an edit to the package nothing computed
by the old code is reused, and a pipeline stage is adopted (below) only when its manifest records the same
fingerprint.

Twins. Rows with different selection settings can still give the very same pairs (at N = 8 samples, Q-DYN with
any α ≤ 0.5 takes one positive per problem, exactly as Shortest). Before training, a row looks up
cache/twins/<hash of the pairs' texts and its training settings>; when another key already trained on that
content with those settings, its model (and its results, evaluated the same way) are linked instead of
recomputed: the same computation, run once.

Seeds. Selection, refinement and evaluation use notebooks 02, 03 and 05's stage seeds for every row, so
rows differ only in what they vary, and the default row reproduces (and adopts: see below) the pipeline's
artifacts. Training seed 0 is notebook 04's; seeds 1, 2, … are further replicates, trained for the headline
rows only. The ± of a row is the SD over its training seeds with the evaluation seed fixed (the same eval
problems and sampling seed for every model), so it measures training variation as seen through one
evaluation draw; each row's problem-clustered evaluation SE is reported beside it (acc_se).

Adoption. Before computing an entry, the row checks the pipeline's own stage (02 selection, 03 refinement,
04 training, 05 evaluation): when that stage's manifest is complete, its recorded inputs have the same
hashes, and the key its recorded settings give equals the row's key, its files are linked into the cache
instead of recomputed. Evaluation is adopted only when the ablation evaluation has notebook 05's size.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from . import refinement, selection
from .artifacts import (atomic_dir, atomic_write_json, atomic_write_text, dir_hash, file_hash, load_table, path_hash,
                        read_json, save_table)
from .config import (AblationsConfig, Profile, RefinementConfig, SelectionConfig, TrainingConfig, resolve_device,
                     stage_seed)
from .evaluation import metrics_table
from .fingerprint import package_hash

OBJECTIVES: dict[str, dict[str, float]] = {
    "dpo": {"eta": 1.0, "lam": 0.0},
    "sft": {"eta": 0.0},
    "dpo_sft": {"lam": 0.0},
    "dpo_l_sft": {},
}
OBJECTIVE_LABELS = {"dpo": "DPO", "sft": "SFT", "dpo_sft": "DPO + SFT", "dpo_l_sft": "DPO-L + SFT"}
REFINE_MODES = ("off", "kl", "no_kl")
GROUPS = ("base", "table2", "table3", "table4", "alpha", "epsilon", "sign", "eta")
TITLES = {"table2": "Table 2 · selection (no refinement)", "table3": "Table 3 · refinement",
          "table4": "Table 4 · objective", "alpha": "Fig. 4 · α sweep (Q-DYN, no refinement)",
          "epsilon": "ε sweep (KL refinement; not in the paper)", "sign": "DPO-L margin sign s (not in the paper)",
          "eta": "η sweep, the DPO-L weight (not in the paper)"}
TABLE_FILES = {"table2": "table2_selection", "table3": "table3_refinement", "table4": "table4_objective",
               "alpha": "fig4_alpha_sweep", "epsilon": "sweep_epsilon", "sign": "sweep_margin_sign", "eta": "sweep_eta"}
CACHE_META = "meta.json"
PAPER_BUDGET = 32768

# The paper's 7B numbers for each row (accuracy as a fraction, Len-T in tokens). The ablations report AIME24
# (and MATH500 for Table 2); base rows are Table 1. AUC: Table 1's where reported, else implied by
# acc·(1 − Len-T/B) at B = 32,768, which Table 1's numbers fit (docs/method.md).
PAPER_ABLATIONS = pd.DataFrame(
    [
        ("base", "AIME24", 0.555, 7543, 0.416, "R1-Distill-Qwen-7B (Table 1)"),
        ("base", "MATH500", 0.928, 3638, 0.836, "R1-Distill-Qwen-7B (Table 1)"),
        ("table2/shortest", "AIME24", 0.533, 5960, None, "Shortest"),
        ("table2/shortest", "MATH500", 0.908, 1926, None, "Shortest"),
        ("table2/q_fix", "AIME24", 0.550, 6126, None, "Q-FIX"),
        ("table2/q_fix", "MATH500", 0.922, 2054, None, "Q-FIX"),
        ("table2/q_dyn", "AIME24", 0.573, 6190, None, "Q-DYN"),
        ("table2/q_dyn", "MATH500", 0.928, 2180, None, "Q-DYN"),
        ("table2/q_dyn_extra", "AIME24", 0.523, 5666, None, "Q-DYN + extra negatives"),
        ("table2/q_dyn_extra", "MATH500", 0.908, 1742, None, "Q-DYN + extra negatives"),
        ("table3/none", "AIME24", 0.573, 6190, None, "w/o refinement"),
        ("table3/kl", "AIME24", 0.575, 5157, 0.485, "KL-constrained refinement"),
        ("table3/no_kl", "AIME24", 0.391, 6596, None, "rewrite by an outside LLM"),
        ("table3/token_pruning", "AIME24", 0.544, 6378, None, "token pruning (TokenSkip)"),
        ("table4/dpo", "AIME24", 0.483, 4300, None, "DPO"),
        ("table4/sft", "AIME24", 0.560, 5734, None, "SFT"),
        ("table4/dpo_sft", "AIME24", 0.570, 5420, None, "DPO + SFT"),
        ("table4/dpo_l_sft", "AIME24", 0.575, 5157, 0.485, "SFT + DPO-L"),
    ],
    columns=["row", "benchmark", "acc", "len_t", "auc_reported", "paper_label"],
)
PAPER_ABLATIONS["auc"] = PAPER_ABLATIONS["auc_reported"].fillna(
    PAPER_ABLATIONS["acc"] * (1 - PAPER_ABLATIONS["len_t"] / PAPER_BUDGET))
PAPER_ABLATIONS["auc_source"] = np.where(PAPER_ABLATIONS["auc_reported"].notna(), "reported", "implied")
PAPER_ABLATIONS = PAPER_ABLATIONS.drop(columns="auc_reported")
# Fig. 4 gives no numbers: its finding, in words.
PAPER_FIG4 = "accuracy peaks at α = 0.2; α = 0 (always the shortest) and α = 1 are worse"


# --------------------------------------------------------------------------- rows


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


def make_row(profile: Profile, name: str, label: str, *, variant: str | None = None, alpha: float | None = None,
             refine: str = "kl", epsilon: float | None = None, objective: str = "dpo_l_sft", eta: float | None = None,
             length_margin_sign: int | None = None, seed: int = 0, x: float | None = None) -> Row:
    """A row from the profile's settings with the given changes (objective sets η and λ as the paper defines)."""
    if refine not in REFINE_MODES:
        raise ValueError(f"row {name!r}: refine must be one of {REFINE_MODES}, got {refine!r}")
    if objective not in OBJECTIVES and objective != "none":
        raise ValueError(f"row {name!r}: objective must be one of {list(OBJECTIVES)} (or 'none'), got {objective!r}")
    if variant is not None and variant not in selection.VARIANTS:
        raise ValueError(f"row {name!r}: unknown selection variant {variant!r}; one of {list(selection.VARIANTS)}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"row {name!r}: alpha must lie in [0, 1], got {alpha!r}")
    if epsilon is not None and not (epsilon >= 0):
        raise ValueError(f"row {name!r}: epsilon must be a number >= 0, got {epsilon!r}")
    if eta is not None and not 0.0 <= eta <= 1.0:
        raise ValueError(f"row {name!r}: eta must lie in [0, 1], got {eta!r}")
    if length_margin_sign is not None and length_margin_sign not in (-1, 1):
        raise ValueError(f"row {name!r}: length_margin_sign must be +1 or -1, got {length_margin_sign!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"row {name!r}: seed must be a non-negative integer, got {seed!r}")
    sel = dataclasses.replace(profile.selection)
    if variant is not None:
        sel.variant = variant
    if alpha is not None:
        sel.alpha = float(alpha)
    eps = math.inf if refine == "no_kl" else float(profile.refinement.epsilon if epsilon is None else epsilon)
    ref = dataclasses.replace(profile.refinement, enabled=refine != "off", epsilon=eps)
    tr = dataclasses.replace(profile.training, **OBJECTIVES.get(objective, {}))
    if profile.ablations.batch_size:
        tr.batch_size = profile.ablations.batch_size
    if profile.ablations.lr:
        tr.lr = profile.ablations.lr
    if eta is not None:
        tr.eta = float(eta)
    if length_margin_sign is not None:
        tr.length_margin_sign = int(length_margin_sign)
    return Row(name, label, sel, refine, ref, objective, tr, seed, None if x is None else float(x))


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
        raise ValueError(f"{what}: unknown row or group name(s) {unknown}; known groups {sorted({r.group for r in rows})}, "
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


# --------------------------------------------------------------------------- cache keys


def _canon(value: Any) -> Any:
    """A JSON-stable form: numbers as floats (so 0 and 0.0 agree), infinities as strings, tuples as lists."""
    if isinstance(value, dict):
        return {str(k): _canon(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canon(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float, np.integer, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "nan"
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else v
    raise TypeError(f"cannot put a {type(value).__name__} into a cache key: {value!r}")


def cache_key(payload: dict) -> str:
    """The cache key of a payload: the first 20 hex digits of the SHA-256 of its canonical JSON and of the code
    fingerprint (fingerprint.package_hash: after an edit to tsq_utils no entry computed by the old code is reused)."""
    text = json.dumps(_canon({"code": package_hash(), "payload": payload}), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def selection_params(sel: SelectionConfig) -> dict:
    """The selection parameters that the variant reads, as its registry entry declares them (selection.REGISTRY;
    q_dyn with α = 0 is Shortest: q = 0 gives k = 1)."""
    return selection.variant_params(sel)


def refinement_params(ref: RefinementConfig) -> dict:
    """Every refinement parameter (refinement on), with the sampler's default batch size when the config has none."""
    d = dataclasses.asdict(ref)
    d.pop("enabled")
    if "sample_batch_size" not in d:
        # refine_pairs falls back to the module default: the rows per generate call decide the candidates
        d["sample_batch_size"] = getattr(refinement, "SAMPLE_BATCH_SIZE", None)
    return d


def refinement_payloads(pairs_key: str, base_hashes: dict, ref: RefinementConfig, seed: int, grader: str
                        ) -> tuple[dict, dict]:
    """The payloads of the scored entry (candidates and their KLs: every refinement parameter but ε) and of the
    refined entry (the scored entry, ε and the grader that decides reverts)."""
    params = refinement_params(ref)
    epsilon = params.pop("epsilon")
    scored = {"kind": "scored", "pairs": pairs_key, "base": base_hashes, "refinement": params, "seed": seed}
    return scored, {"kind": "refined", "scored": cache_key(scored), "epsilon": epsilon, "grader": grader}


def data_sha(table: pd.DataFrame) -> str:
    """SHA-256 of what training reads from a pairs table: its prompt, chosen and rejected texts, in order."""
    rows = table[["prompt", "chosen", "rejected"]].astype(str).values.tolist()
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def training_params(tr: TrainingConfig) -> dict:
    """The training parameters the objective reads: none of β, λ, s when η = 0 (SFT); no s when λ = 0."""
    d = dataclasses.asdict(tr)
    if d["eta"] == 0:
        for k in ("beta", "lam", "length_margin_sign"):
            d.pop(k)
    elif d["lam"] == 0:
        d.pop("length_margin_sign")
    return d


def train_seed(profile: Profile, replicate: int) -> int:
    """Training seed of a replicate: notebook 04's stage seed for 0, a derived one for the others."""
    return stage_seed(profile.seed, "training" if replicate == 0 else f"training-{replicate}")


# --------------------------------------------------------------------------- context


@dataclass
class AblationContext:
    """What every row needs: the profile, the samples table, the base model's hashes, the evaluation set, the cache."""

    profile: Profile
    run_dir: Path
    samples: pd.DataFrame
    samples_sha: str
    base_hashes: dict[str, str]
    tokenizer: Any
    problems: dict[str, pd.DataFrame]
    eval_n: int
    device: str
    grader: str
    max_steps: int = 0
    forced: set = field(default_factory=set)  # keys recomputed under force in this session
    _base_model: Any = None

    @property
    def cache_dir(self) -> Path:
        """runs/<profile>/ablations/cache."""
        return self.run_dir / "ablations" / "cache"

    @property
    def selection_seed(self) -> int:
        """Notebook 02's seed."""
        return stage_seed(self.profile.seed, "selection")

    @property
    def refinement_seed(self) -> int:
        """Notebook 03's seed."""
        return stage_seed(self.profile.seed, "refinement")

    @property
    def eval_seed(self) -> int:
        """Notebook 05's seed (fixed for every row)."""
        return stage_seed(self.profile.seed, "evaluation")

    @property
    def base_model(self) -> Any:
        """The base model, loaded on first use (refinement samples from it)."""
        if self._base_model is None:
            from .base_model import load_base

            self._base_model, _ = load_base(self.run_dir, self.profile)
        return self._base_model

    @functools.cached_property
    def _problems_sha(self) -> str:
        """SHA-256 of the evaluation problems' ids, prompts and golds (computed once per context)."""
        problems = {b: p[["problem_id", "prompt", "gold"]].astype(str).values.tolist() for b, p in self.problems.items()}
        return hashlib.sha256(json.dumps(problems, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()

    def eval_spec(self) -> dict:
        """Everything that decides a model's evaluation results, except the model."""
        E, S = self.profile.evaluation, self.profile.sampling
        return {"problems": self._problems_sha, "n": self.eval_n, "temperature": E.temperature,
                "top_p": E.top_p, "max_new_tokens": E.max_new_tokens, "seed": self.eval_seed,
                "batch_size": S.batch_size, "backend": S.backend, "device": self.device}


def subset_problems(problems: dict[str, pd.DataFrame], n: int) -> dict[str, pd.DataFrame]:
    """The first n problems of each benchmark (0: all); toy problems cycle through k, so the first n cover every k."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n_eval_problems must be an integer >= 0, got {n!r}")
    return {b: (p if n == 0 else p.head(n)).reset_index(drop=True) for b, p in problems.items()}


def make_context(profile: Profile, run_dir: Path) -> AblationContext:
    """The context of a profile's run folder: samples of stage 01, base model hashes, tokenizer, evaluation subset."""
    from .base_model import base_inputs, base_ref, load_tokenizer
    from .evaluation import eval_problems
    from .sampling import grader_for
    from .stage import notebook_for

    run_dir = Path(run_dir)
    samples_path = run_dir / "sampling" / "samples.parquet"
    if not samples_path.is_file():
        raise FileNotFoundError(f"{samples_path} is missing: run {notebook_for('sampling')} first (profile {profile.name})")
    A = profile.ablations
    tok = load_tokenizer(*base_ref(run_dir, profile))  # the tokenizer alone: an all-cached rerun loads no model
    return AblationContext(
        profile=profile, run_dir=run_dir, samples=load_table(samples_path), samples_sha=file_hash(samples_path),
        base_hashes={k: path_hash(v) for k, v in base_inputs(run_dir, profile).items()}, tokenizer=tok,
        problems=subset_problems(eval_problems(profile, tok), A.n_eval_problems),
        eval_n=A.n_eval_samples or profile.evaluation.n_samples, device=resolve_device(profile),
        grader=grader_for(profile), max_steps=A.max_steps,
    )


def payloads(ctx: AblationContext, row: Row) -> dict[str, dict]:
    """The key payloads of a row's stages: pairs, scored and refined (rows with refinement), model and results."""
    if row.is_base:
        return {"results": {"kind": "results", "model": {"base": ctx.base_hashes}, "eval": ctx.eval_spec()}}
    out = {"pairs": {"kind": "pairs", "samples": ctx.samples_sha, "selection": selection_params(row.selection),
                     "seed": ctx.selection_seed}}
    data = cache_key(out["pairs"])
    if row.refine != "off":
        out["scored"], out["refined"] = refinement_payloads(data, ctx.base_hashes, row.refinement, ctx.refinement_seed,
                                                            ctx.grader)
        data = cache_key(out["refined"])
    training = training_params(row.training)
    if ctx.max_steps:
        training.pop("epochs")  # a fixed step count makes the epoch count irrelevant
    out["model"] = {"kind": "model", "data": data, "base": ctx.base_hashes, "training": training,
                    "seed": train_seed(ctx.profile, row.seed), "max_steps": ctx.max_steps, "device": ctx.device}
    out["results"] = {"kind": "results", "model": cache_key(out["model"]), "eval": ctx.eval_spec()}
    return out


def row_keys(ctx: AblationContext, row: Row) -> dict[str, str]:
    """The cache keys of a row's stages (pairs, scored, refined, model, results; only results for the base row)."""
    return {stage: cache_key(p) for stage, p in payloads(ctx, row).items()}


# --------------------------------------------------------------------------- adopting the pipeline's artifacts


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link a file or a folder's files (a copy across file systems); artifacts are replaced, never edited."""
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for p in src.iterdir():
            _link_or_copy(p, dst / p.name)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _stage_manifest(ctx: AblationContext, stage: str, files: Sequence[str]) -> dict | None:
    """A pipeline stage's manifest when it is complete and its files are no newer than it (else None)."""
    d = ctx.run_dir / stage
    mpath = d / "manifest.json"
    try:
        m = read_json(mpath)
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("complete") is not True or m.get("stage") != stage:
        return None
    # computed by other code: the keys it would give under today's code say nothing about it
    if not isinstance(m.get("code"), dict) or m["code"].get("package") != package_hash():
        return None
    # a rerun that died after rewriting an output but before its manifest leaves the output newer
    limit = mpath.stat().st_mtime
    if not all((d / f).exists() and (d / f).stat().st_mtime <= limit for f in files):
        return None
    return m


def _section(m: dict, cls: type, name: str) -> Any:
    """A profile section of a manifest as its config dataclass; None when its fields differ from today's (another
    version of the code: a field it lacks could have meant something else then)."""
    raw = (m.get("profile_config") or {}).get(name)
    if not isinstance(raw, dict) or set(raw) != {f.name for f in dataclasses.fields(cls)}:
        return None
    return cls(**raw)


def _same_base(ctx: AblationContext, m: dict) -> bool:
    """True when a manifest's recorded base-model inputs hash as the current ones."""
    rec = {k: (m.get("inputs") or {}).get(k, {}).get("sha256") for k in ctx.base_hashes}
    return rec == ctx.base_hashes


def _adopt_pairs(ctx: AblationContext, key: str, tmp: Path) -> str | None:
    """Link notebook 02's pairs when its settings give this key."""
    files = ("pairs.parquet", "problem_stats.parquet")
    m = _stage_manifest(ctx, "selection", files)
    sel = m and _section(m, SelectionConfig, "selection")
    if not sel or (m.get("inputs") or {}).get("samples", {}).get("sha256") != ctx.samples_sha:
        return None
    p = {"kind": "pairs", "samples": ctx.samples_sha, "selection": selection_params(sel), "seed": m.get("seed")}
    if cache_key(p) != key:
        return None
    for f in files:
        _link_or_copy(ctx.run_dir / "selection" / f, tmp / f)
    return "adopted from notebooks/02_selection.ipynb"


def _refinement_manifest(ctx: AblationContext, pairs_key: str, files: Sequence[str]) -> tuple[dict, RefinementConfig] | None:
    """Notebook 03's manifest and settings when it refined these pairs (this pairs key's file) with this base model."""
    m = _stage_manifest(ctx, "refinement", files)
    ref = m and _section(m, RefinementConfig, "refinement")
    if not ref or not ref.enabled or not _same_base(ctx, m):
        return None
    pairs_file = ctx.cache_dir / pairs_key / "pairs.parquet"
    if (m.get("inputs") or {}).get("pairs", {}).get("sha256") != file_hash(pairs_file):
        return None
    return m, ref


def _adopt_scored(ctx: AblationContext, key: str, pairs_key: str, tmp: Path) -> str | None:
    """Link notebook 03's step log (every candidate with its KL) when its settings, ε aside, give this key."""
    found = _refinement_manifest(ctx, pairs_key, ("step_log.parquet",))
    if not found:
        return None
    m, ref = found
    scored, _ = refinement_payloads(pairs_key, ctx.base_hashes, ref, m.get("seed"), ctx.grader)
    log = ctx.run_dir / "refinement" / "step_log.parquet"
    if cache_key(scored) != key or "cand_texts" not in load_table(log).columns:  # an older log lacks the texts
        return None
    if not refinement.fully_scored(load_table(log)):  # 03 ran with scoring="fast": its KLs cannot be re-thresholded
        return None
    _link_or_copy(log, tmp / "step_log.parquet")
    return "adopted from notebooks/03_kl_refinement.ipynb"


def _adopt_refined(ctx: AblationContext, key: str, pairs_key: str, tmp: Path) -> str | None:
    """Link notebook 03's refined pairs when it refined these pairs with settings that give this key."""
    files = ("refined_pairs.parquet", "step_log.parquet")
    found = _refinement_manifest(ctx, pairs_key, files)
    if not found:
        return None
    m, ref = found
    # 03 grades with the profile's grader, as the rows do
    _, refined = refinement_payloads(pairs_key, ctx.base_hashes, ref, m.get("seed"), ctx.grader)
    if cache_key(refined) != key:
        return None
    for f in files:
        _link_or_copy(ctx.run_dir / "refinement" / f, tmp / f)
    return "adopted from notebooks/03_kl_refinement.ipynb"


def _adopt_model(ctx: AblationContext, key: str, data_key: str, data_file: Path, tmp: Path) -> str | None:
    """Link notebook 04's model when it trained on these pairs with settings that give this key."""
    files = ("model", "training_log.parquet")
    m = _stage_manifest(ctx, "training", files)
    tr = m and _section(m, TrainingConfig, "training")
    if not tr or not _same_base(ctx, m) or (m.get("inputs") or {}).get("pairs", {}).get("sha256") != file_hash(data_file):
        return None
    device = ctx.device if (m.get("profile_config") or {}).get("device") == ctx.profile.device else None
    p = {"kind": "model", "data": data_key, "base": ctx.base_hashes, "training": training_params(tr),
         "seed": m.get("seed"), "max_steps": 0, "device": device}
    if cache_key(p) != key:
        return None
    for f in files:
        _link_or_copy(ctx.run_dir / "training" / f, tmp / f)
    return "adopted from notebooks/04_dpo_l_training.ipynb"


def _adopt_results(ctx: AblationContext, key: str, model_dir: Path | None, tmp: Path) -> str | None:
    """Take notebook 05's results of this model (the trained one, or the base) when the evaluation is the same."""
    m = _stage_manifest(ctx, "evaluation", ("results.parquet",))
    if not m:
        return None
    pc, P = m.get("profile_config") or {}, ctx.profile
    # 05 evaluates every problem of data.n_eval_problems; the ablation set is its first n_eval_problems (0: all)
    whole = P.ablations.n_eval_problems == 0 or P.ablations.n_eval_problems >= P.data.n_eval_problems
    E = pc.get("evaluation") or {}
    same = (whole and m.get("seed") == ctx.eval_seed and E.get("n_samples") == ctx.eval_n
            and pc.get("data") == dataclasses.asdict(P.data) and pc.get("toyworld") == dataclasses.asdict(P.toyworld)
            and pc.get("seed") == P.seed and pc.get("device") == P.device
            and all(E.get(k) == getattr(P.evaluation, k) for k in ("temperature", "top_p", "max_new_tokens"))
            and all((pc.get("sampling") or {}).get(k) == getattr(P.sampling, k) for k in ("batch_size", "backend")))
    if not same:
        return None
    if model_dir is None:
        if not _same_base(ctx, m):
            return None
        name = "base"
    else:
        if (m.get("inputs") or {}).get("trained_model", {}).get("sha256") != dir_hash(model_dir / "model"):
            return None
        name = "tokensqueeze"
    res = load_table(ctx.run_dir / "evaluation" / "results.parquet")
    res = res[res["model"] == name].reset_index(drop=True)
    if res.empty:
        return None
    save_table(res.assign(model=key), tmp / "results.parquet")
    return "adopted from notebooks/05_evaluation.ipynb"


# --------------------------------------------------------------------------- computing one stage


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the inner progress bars and chatter (datasets maps, TRL's reference pass) while a row runs."""
    import datasets
    from transformers.utils import logging as hf_logging

    was_enabled, hf_bars = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    old_env, old_level = os.environ.get("TQDM_DISABLE"), hf_logging.get_verbosity()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    os.environ["TQDM_DISABLE"] = "1"
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, once per row
            yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
        if hf_bars:
            hf_logging.enable_progress_bar()
        if old_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old_env
        hf_logging.set_verbosity(old_level)


def _ensure(ctx: AblationContext, key: str, payload: dict, build: Callable[[Path], None],
            adopt: Callable[[Path], str | None] | None, describe: Callable[[Path], dict], force: bool) -> tuple[Path, str]:
    """The cache entry of a key: reused when present (unless forced), else adopted or built in a temp folder.

    The entry's meta.json records its payload, where it came from, the seconds it took and describe()'s numbers.
    """
    path = ctx.cache_dir / key
    if path.is_dir() and not (force and key not in ctx.forced):
        return path, "cached"
    t0 = time.perf_counter()
    with atomic_dir(path) as tmp:
        source = adopt(tmp) if adopt is not None and not force else None
        if source is None:
            build(tmp)
            source = "computed"
        seconds = time.perf_counter() - t0
        info = describe(tmp)
        atomic_write_json(tmp / CACHE_META, {
            "key": key, "payload": _canon(payload), "code": package_hash(), "source": source,
            "seconds": round(seconds, 3),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "info": _canon(info),
        })
    if force:
        ctx.forced.add(key)
    return path, source


def _select(ctx: AblationContext, row: Row, tmp: Path) -> None:
    """Stage 02 for a row: pairs and per-problem stats."""
    s = row.selection
    pairs, stats = selection.select_pairs(ctx.samples, variant=s.variant, alpha=s.alpha, q_fix=s.q_fix,
                                          max_pairs=s.max_pairs, extra_neg_ratio=s.extra_neg_ratio,
                                          seed=ctx.selection_seed)
    save_table(pairs, tmp / "pairs.parquet")
    save_table(stats, tmp / "problem_stats.parquet")


def _describe_pairs(d: Path) -> dict:
    """A pairs entry's headline numbers (selection_summary)."""
    return selection.selection_summary(load_table(d / "pairs.parquet"), load_table(d / "problem_stats.parquet"))


def _score(ctx: AblationContext, row: Row, pairs_dir: Path, tmp: Path) -> None:
    """Stage 03's expensive half for a row: every step's candidates and their KLs (run at ε = ∞, no grading)."""
    pairs = load_table(pairs_dir / "pairs.parquet")
    cfg = dataclasses.replace(row.refinement, epsilon=math.inf, scoring="full")  # 06 re-thresholds: exact KLs
    _, step_log = refinement.refine_pairs(ctx.base_model, ctx.tokenizer, pairs, cfg, seed=ctx.refinement_seed,
                                          progress=False)
    save_table(step_log, tmp / "step_log.parquet")


def _describe_scored(d: Path) -> dict:
    """A scored entry's size: steps, candidates drawn and candidates scored."""
    log = load_table(d / "step_log.parquet")
    kls = [v for ks in log["kl"] for v in ks]
    return {"n_steps": int(len(log)), "n_candidates": len(kls), "n_scored": int(sum(not math.isnan(v) for v in kls))}


def _rethreshold(ctx: AblationContext, row: Row, pairs_dir: Path, scored_dir: Path, tmp: Path) -> None:
    """Stage 03's cheap half for a row: keep the candidates under the row's ε (∞ for the no-KL rewrite), regrade."""
    refined, step_log = refinement.rethreshold(ctx.tokenizer, load_table(pairs_dir / "pairs.parquet"),
                                               load_table(scored_dir / "step_log.parquet"), row.refinement,
                                               grade_fn_factory=refinement.grader_factory(ctx.samples, ctx.grader))
    save_table(refined, tmp / "refined_pairs.parquet")
    save_table(step_log, tmp / "step_log.parquet")


def _describe_refined(d: Path) -> dict:
    """A refined entry's headline numbers (refinement_summary: acceptance, tokens per step, ...)."""
    return refinement.refinement_summary(load_table(d / "step_log.parquet"), load_table(d / "refined_pairs.parquet"))


def train_model(ctx: AblationContext, pairs: pd.DataFrame, cfg: TrainingConfig, seed: int, out_dir: Path) -> pd.DataFrame:
    """Stage 04 on a fresh base model: DPO-L + SFT as notebook 04, saved to out_dir/model; returns the step log."""
    from transformers import PrinterCallback

    from . import dpo_l
    from .base_model import load_base

    model, tok = load_base(ctx.run_dir, ctx.profile)
    trainer = dpo_l.make_dpo_l_trainer(model, None, tok, pairs, cfg, output_dir=str(out_dir / ".trainer"), seed=seed,
                                       max_steps=ctx.max_steps or None, device=ctx.device, disable_tqdm=True)
    trainer.remove_callback(PrinterCallback)  # disable_tqdm swaps the bar for a printer of every log line
    trainer.train()
    log = dpo_l.training_log(trainer)
    trainer.model.save_pretrained(out_dir / "model", safe_serialization=True)
    tok.save_pretrained(out_dir / "model")
    shutil.rmtree(out_dir / ".trainer", ignore_errors=True)
    return log


def _train(ctx: AblationContext, row: Row, data_file: Path, tmp: Path) -> None:
    """Stage 04 for a row: the trained model and its per-step log."""
    pairs = load_table(data_file)
    if pairs.empty:
        raise ValueError(f"row {row.name}: its selection gave no preference pairs, so there is nothing to train on")
    log = train_model(ctx, pairs, row.training, train_seed(ctx.profile, row.seed), tmp)
    save_table(log.reset_index(), tmp / "training_log.parquet")


def _describe_model(d: Path) -> dict:
    """A model entry's optimizer steps and last logged loss terms."""
    log = load_table(d / "training_log.parquet")
    if log.empty:
        return {"steps": 0}
    last = log.iloc[-1]
    return {"steps": int(log["step"].max()), **{c: float(last[c]) for c in ("loss", "dpo_l_loss", "sft_loss") if c in log}}


def evaluate(ctx: AblationContext, model: Any) -> pd.DataFrame:
    """Stage 05 for one model on the ablation evaluation set: one graded row per response."""
    from .sampling import sample_and_grade

    E, S = ctx.profile.evaluation, ctx.profile.sampling
    frames = []
    for bench, probs in ctx.problems.items():
        df = sample_and_grade(model, ctx.tokenizer, probs, n=ctx.eval_n, temperature=E.temperature, top_p=E.top_p,
                              max_new_tokens=E.max_new_tokens, seed=ctx.eval_seed, batch_size=S.batch_size,
                              grader="toy" if bench == "toy" else "math", backend=S.backend, progress=False)
        frames.append(df.assign(benchmark=bench))
    return pd.concat(frames, ignore_index=True)


def _eval_model(ctx: AblationContext, model_dir: Path | None) -> Any:
    """What generation.sample draws from for a trained model's cache entry (None: the base model), per sampling.backend."""
    from .base_model import base_ref, load_sampler

    if model_dir is None:
        if ctx.profile.sampling.backend != "vllm":
            return ctx.base_model  # already loaded for refinement
        ref, kind = base_ref(ctx.run_dir, ctx.profile)
    else:
        ref, kind = str(model_dir / "model"), "toy" if ctx.profile.model.source == "toy" else "hub"
    return load_sampler(ref, kind, ctx.profile)[0]


def _results(ctx: AblationContext, key: str, model_dir: Path | None, tmp: Path) -> None:
    """Evaluate a trained model (or the base model) and save its results."""
    from .base_model import release_sampler

    model = _eval_model(ctx, model_dir)
    try:
        save_table(evaluate(ctx, model).assign(model=key), tmp / "results.parquet")
    finally:
        if model is not ctx._base_model:
            release_sampler(model)  # a vLLM engine's workers; a no-op for a transformers model


def _describe_results(d: Path) -> dict:
    """A results entry's size and accuracy."""
    res = load_table(d / "results.parquet")
    return {"responses": int(len(res)), "accuracy": float(res["correct"].mean())}


TWINS = "twins"  # cache/twins/<key>: the model entry trained on this content with these settings


def _twin_index(ctx: AblationContext, model_payload: dict, data_file: Path) -> Path:
    """Where the model trained on this data *content* with this row's settings is recorded.

    Rows whose selections or refinements differ in their settings can still give the very same pairs (on the toy
    profile at N = 8, Q-DYN with any α ≤ 0.5 picks one positive per problem, as Shortest does); training is then
    the same computation, so it runs once."""
    content = {**model_payload, "data": {"content": data_sha(load_table(data_file))}}
    return ctx.cache_dir / TWINS / cache_key(content)


def _adopt_twin_model(ctx: AblationContext, key: str, twin: Path, tmp: Path) -> str | None:
    """Link the model of another key trained on the same pairs with the same settings."""
    other = twin.read_text().strip() if twin.is_file() else ""
    if not other or other == key or not (ctx.cache_dir / other).is_dir():
        return None
    for f in ("model", "training_log.parquet"):
        _link_or_copy(ctx.cache_dir / other / f, tmp / f)
    (tmp / "twin_of").write_text(other)
    return f"same pairs and settings as {other}"


def _adopt_twin_results(ctx: AblationContext, key: str, model_dir: Path, tmp: Path) -> str | None:
    """Take the results of the model this one is a twin of, when evaluated the same way."""
    twin_of = model_dir / "twin_of"
    if not twin_of.is_file():
        return None
    other = cache_key({"kind": "results", "model": twin_of.read_text().strip(), "eval": ctx.eval_spec()})
    if not (ctx.cache_dir / other / "results.parquet").is_file():
        return None
    save_table(load_table(ctx.cache_dir / other / "results.parquet").assign(model=key), tmp / "results.parquet")
    return f"same model as {twin_of.read_text().strip()}"


def run_row(ctx: AblationContext, row: Row, force: bool = False) -> dict:
    """Run (or reuse) each stage of one row; return its keys and where each stage came from."""
    keys, pl = row_keys(ctx, row), payloads(ctx, row)
    sources: dict[str, str] = {}
    with _quiet():
        if row.is_base:
            _, sources["results"] = _ensure(ctx, keys["results"], pl["results"],
                                            lambda t: _results(ctx, keys["results"], None, t),
                                            lambda t: _adopt_results(ctx, keys["results"], None, t),
                                            _describe_results, force)
            return {"name": row.name, "seed": row.seed, "keys": keys, "sources": sources}
        pairs_dir, sources["pairs"] = _ensure(ctx, keys["pairs"], pl["pairs"], lambda t: _select(ctx, row, t),
                                              lambda t: _adopt_pairs(ctx, keys["pairs"], t), _describe_pairs, force)
        data_key, data_file = keys["pairs"], pairs_dir / "pairs.parquet"
        if row.refine != "off":
            # the refined entry needs the scored one only when it is not there yet (nor adoptable from 03)
            scored: list[Path] = []

            def scored_dir() -> Path:
                if not scored:
                    d, sources["scored"] = _ensure(ctx, keys["scored"], pl["scored"], lambda t: _score(ctx, row, pairs_dir, t),
                                                   lambda t: _adopt_scored(ctx, keys["scored"], keys["pairs"], t),
                                                   _describe_scored, force)
                    scored.append(d)
                return scored[0]

            ref_dir, sources["refined"] = _ensure(ctx, keys["refined"], pl["refined"],
                                                  lambda t: _rethreshold(ctx, row, pairs_dir, scored_dir(), t),
                                                  lambda t: _adopt_refined(ctx, keys["refined"], keys["pairs"], t),
                                                  _describe_refined, force)
            data_key, data_file = keys["refined"], ref_dir / "refined_pairs.parquet"
        twin = _twin_index(ctx, pl["model"], data_file)
        model_dir, sources["model"] = _ensure(ctx, keys["model"], pl["model"], lambda t: _train(ctx, row, data_file, t),
                                              lambda t: (_adopt_model(ctx, keys["model"], data_key, data_file, t)
                                                         or _adopt_twin_model(ctx, keys["model"], twin, t)),
                                              _describe_model, force)
        if not twin.exists():
            atomic_write_text(twin, keys["model"])
        _, sources["results"] = _ensure(ctx, keys["results"], pl["results"],
                                        lambda t: _results(ctx, keys["results"], model_dir, t),
                                        lambda t: (_adopt_results(ctx, keys["results"], model_dir, t)
                                                   or _adopt_twin_results(ctx, keys["results"], model_dir, t)),
                                        _describe_results, force)
    return {"name": row.name, "seed": row.seed, "keys": keys, "sources": sources}


def run_rows(ctx: AblationContext, rows: Sequence[Row | str] | None = None, force: bool = False,
             progress: bool = True) -> pd.DataFrame:
    """Run rows (Row objects, or names/groups of build_rows' rows; None: all) with a progress bar.

    A failing row does not stop the others: after the last row a RuntimeError lists the failures (the rows that
    finished stay cached). Returns one line per row: its name, seed and the source of each stage.
    """
    from tqdm.auto import tqdm

    every = build_rows(ctx.profile)
    if rows is None:
        todo = every
    else:
        names = [r for r in rows if isinstance(r, str)]
        todo = [r for r in rows if isinstance(r, Row)] + select_rows(every, names) if names else list(rows)
        bad = [r for r in todo if not isinstance(r, Row)]
        if bad:
            raise ValueError(f"rows must be Row objects or row/group names, got {bad[0]!r}")
    out, failed = [], []
    bar = tqdm(todo, desc="ablation rows", disable=not progress)
    for row in bar:
        bar.set_postfix_str(f"{row.name} seed {row.seed}")
        try:
            rec = run_row(ctx, row, force=force)
        except Exception as e:  # noqa: BLE001 -- reported together after the other rows ran
            failed.append(f"{row.name} (seed {row.seed}): {type(e).__name__}: {e}")
            continue
        out.append({"name": row.name, "seed": row.seed, **rec["sources"]})
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(todo)} ablation rows failed:\n  " + "\n  ".join(failed))
    return pd.DataFrame(out)


# --------------------------------------------------------------------------- summaries and tables


def plan(ctx: AblationContext, rows: Sequence[Row]) -> pd.DataFrame:
    """Distinct work per stage for these rows: how many entries exist already and how many remain to compute.

    Counts keys: rows whose pairs turn out to be identical share one training and evaluation at run time (twins),
    which cannot be known before their pairs exist, so "to_run" can overcount models and results."""
    seen: dict[str, set] = {"pairs": set(), "scored": set(), "refined": set(), "model": set(), "results": set()}
    for r in rows:
        for stage, key in row_keys(ctx, r).items():
            seen[stage].add(key)
    return pd.DataFrame([{"stage": s, "distinct": len(k), "cached": sum((ctx.cache_dir / x).is_dir() for x in k),
                          "to_run": sum(not (ctx.cache_dir / x).is_dir() for x in k)} for s, k in seen.items()]
                        ).set_index("stage")


def costs(ctx: AblationContext) -> pd.DataFrame:
    """Seconds per computed cache entry, by stage (mean, max, count): the per-row cost of this profile."""
    rows = []
    for meta in ctx.cache_dir.glob(f"*/{CACHE_META}"):
        m = read_json(meta)
        if m.get("source") == "computed":
            rows.append({"stage": m["payload"]["kind"], "seconds": m["seconds"]})
    if not rows:
        return pd.DataFrame(columns=["mean_s", "max_s", "n"])
    return pd.DataFrame(rows).groupby("stage")["seconds"].agg(mean_s="mean", max_s="max", n="count").round(2)


def _meta(ctx: AblationContext, key: str | None) -> dict:
    """A cache entry's meta.json ({} when absent)."""
    if key is None:
        return {}
    p = ctx.cache_dir / key / CACHE_META
    return read_json(p) if p.is_file() else {}


def _hard_mask(res: pd.DataFrame) -> np.ndarray:
    """Responses to the harder half of the problems: k above the median k of the evaluation set."""
    k = pd.to_numeric(res["k"], errors="coerce")
    return (k > k.median()).to_numpy()


def _binomial_se(correct: pd.Series) -> float:
    """SE of a share from independent responses: sqrt(p(1 − p)/(n − 1))."""
    c = correct.astype(float)
    return float(c.std(ddof=1) / math.sqrt(len(c)))


SUMMARY_COLUMNS = (
    "name", "group", "label", "x", "seed", "benchmark", "acc", "acc_se", "len_t", "len_t_se", "len_a", "auc",
    "acc_hard", "acc_hard_se", "n", "n_pairs", "chosen_tokens", "tokens_per_step_before", "tokens_per_step_after",
    "acceptance_rate", "train_steps", "seconds_refine", "seconds_train", "seconds_eval", "model_key", "results_key",
)


def _summary_lines(ctx: AblationContext, r: Row, keys: dict[str, str], res: pd.DataFrame, budget: float) -> list[dict]:
    """The summary lines of one row and seed (one per benchmark) from its results and its entries' meta.json."""
    sel, ref, mod = _meta(ctx, keys.get("pairs")), _meta(ctx, keys.get("refined")), _meta(ctx, keys.get("model"))
    scored = _meta(ctx, keys.get("scored"))
    si, ri = sel.get("info", {}), ref.get("info", {})
    stage_info = {
        "n_pairs": si.get("n_pairs"),
        "chosen_tokens": ri.get("mean_chosen_tokens_after") if ref else si.get("mean_chosen_tokens"),
        "tokens_per_step_before": ri.get("tokens_per_step_before"),
        "tokens_per_step_after": ri.get("tokens_per_step_after"), "acceptance_rate": ri.get("acceptance_rate"),
        "train_steps": mod.get("info", {}).get("steps"),
        "seconds_refine": (sum(m["seconds"] for m in (scored, ref) if m.get("source") == "computed")
                           if ref.get("source") == "computed" or scored.get("source") == "computed" else None),
        "seconds_train": mod.get("seconds") if mod.get("source") == "computed" else None,
        "seconds_eval": _meta(ctx, keys["results"]).get("seconds"),
        "model_key": keys.get("model"), "results_key": keys["results"],
    }
    out = []
    for (_, bench), m in metrics_table(res, budget).iterrows():
        g = res[res["benchmark"] == bench]
        hard = g[_hard_mask(g)] if "k" in g else g.iloc[:0]
        ok_len = g.loc[g["correct"].astype(bool), "n_tokens"].astype(float)
        out.append({
            "name": r.name, "group": r.group, "label": r.label, "x": r.x, "seed": r.seed, "benchmark": bench,
            "acc": m["acc"], "acc_se": m["acc_se"], "len_t": m["len_t"],
            "len_t_se": ok_len.std(ddof=1) / math.sqrt(len(ok_len)) if len(ok_len) > 1 else np.nan,
            "len_a": m["len_a"], "auc": m["auc"], "acc_hard": float(hard["correct"].mean()) if len(hard) else np.nan,
            "acc_hard_se": _binomial_se(hard["correct"]) if len(hard) > 1 else np.nan, "n": int(m["n"]), **stage_info,
        })
    return out


def summarize(ctx: AblationContext, rows: Sequence[Row], budget: float | None = None) -> pd.DataFrame:
    """One line per (row, seed, benchmark) whose results are cached: Acc, Len-T, Len-A, AUC, hard-half accuracy (with
    evaluation SEs), the pairs and refinement numbers, and the seconds each stage took; rows not yet run are left out."""
    budget = ctx.profile.evaluation.budget if budget is None else budget
    out = []
    for r in rows:
        keys = row_keys(ctx, r)
        res_path = ctx.cache_dir / keys["results"] / "results.parquet"
        if res_path.is_file():
            out += _summary_lines(ctx, r, keys, load_table(res_path), budget)
    df = pd.DataFrame(out, columns=list(SUMMARY_COLUMNS))
    for c in SUMMARY_COLUMNS[SUMMARY_COLUMNS.index("n_pairs"):-2]:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    df["x"] = pd.to_numeric(df["x"], errors="coerce")
    return df


def row_results(ctx: AblationContext, rows: Sequence[Row]) -> pd.DataFrame:
    """The cached per-response results of these rows (every seed), with model = the row's label."""
    frames = []
    for r in rows:
        path = ctx.cache_dir / row_keys(ctx, r)["results"] / "results.parquet"
        if path.is_file():
            frames.append(load_table(path).assign(model=r.label, row=r.name, seed=r.seed))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["model", "row", "seed"])


METRICS = ("acc", "len_t", "auc", "acc_hard")
TABLE_COLUMNS = (
    "name", "label", "x", "benchmark", "n_seeds", "acc", "acc_sd", "acc_se", "len_t", "len_t_sd", "len_t_se", "auc",
    "auc_sd", "acc_hard", "acc_hard_sd", "acc_hard_se", "len_t_vs_base_pct", "n_pairs", "chosen_tokens",
    "tokens_per_step_before", "tokens_per_step_after", "acceptance_rate", "paper_acc", "paper_len_t", "paper_auc",
    "paper_math500_acc", "paper_math500_len_t",
)


def aggregate(summary: pd.DataFrame, group: str, rows: Sequence[Row] | None = None,
              benchmarks: Sequence[str] | None = None) -> pd.DataFrame:
    """A table or sweep: per row and benchmark, the mean over training seeds with the SD (NaN for one seed), the
    Len-T change against the base model, and the paper's 7B numbers for that row (AIME24; MATH500 for Table 2).

    Rows come in the order of `rows` (table order; sweeps by x); with `rows`, a row with no results yet appears with
    empty metrics, so a table always has its full shape.
    """
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; one of {list(GROUPS)}")
    missing = [c for c in ("name", "group", "label", "x", "seed", "benchmark", *METRICS) if c not in summary.columns]
    if missing:
        raise ValueError(f"summary lacks column(s) {missing}")
    sub = summary[summary["group"] == group]
    benches = list(benchmarks) if benchmarks is not None else list(dict.fromkeys(summary["benchmark"]))
    if rows is not None:
        names = list(dict.fromkeys(r.name for r in rows if r.group == group))
        labels = {r.name: (r.label, r.x) for r in rows}
    else:
        names = list(dict.fromkeys(sub["name"]))
        labels = {n: (g["label"].iloc[0], g["x"].iloc[0]) for n, g in sub.groupby("name")}
    base = summary[summary["name"] == "base"].groupby("benchmark")["len_t"].mean()
    paper = PAPER_ABLATIONS.set_index(["row", "benchmark"])
    out = []
    for name in names:
        for bench in benches:
            g = sub[(sub["name"] == name) & (sub["benchmark"] == bench)]
            label, x = labels.get(name, (name, np.nan))
            rec: dict[str, Any] = {"name": name, "label": label, "x": x, "benchmark": bench, "n_seeds": len(g)}
            for c in METRICS:
                rec[c] = g[c].mean() if len(g) else np.nan
                rec[f"{c}_sd"] = g[c].std(ddof=1) if len(g) > 1 else np.nan
            for c in ("acc_se", "len_t_se", "acc_hard_se"):  # evaluation SEs, averaged over seeds
                rec[c] = g[c].mean() if c in g and len(g) else np.nan
            for c in ("n_pairs", "chosen_tokens", "tokens_per_step_before", "tokens_per_step_after", "acceptance_rate"):
                rec[c] = g[c].mean() if c in g and len(g) else np.nan
            b = base.get(bench, np.nan)
            rec["len_t_vs_base_pct"] = 100 * (rec["len_t"] / b - 1) if b == b and b else np.nan
            for col, pb in (("paper", "AIME24"), ("paper_math500", "MATH500")):
                hit = (name, pb) in paper.index
                rec[f"{col}_acc"] = paper.loc[(name, pb), "acc"] if hit else np.nan
                rec[f"{col}_len_t"] = paper.loc[(name, pb), "len_t"] if hit else np.nan
                if col == "paper":
                    rec["paper_auc"] = paper.loc[(name, pb), "auc"] if hit else np.nan
            out.append(rec)
    df = pd.DataFrame(out, columns=list(TABLE_COLUMNS))
    if group in ("alpha", "epsilon", "sign", "eta"):
        df = df.sort_values(["x", "benchmark"], kind="stable").reset_index(drop=True)
    return df


def _pm(mean: float, sd: float, scale: float, digits: int) -> str:
    """'mean ± sd' (sd left out when NaN), '—' for a missing mean."""
    if mean != mean:
        return "—"
    s = f"{mean * scale:.{digits}f}"
    return s + (f" ± {sd * scale:.{digits}f}" if sd == sd else "")


def _num(v: float, scale: float = 1.0, digits: int = 1) -> str:
    return "—" if v != v or v is None else f"{v * scale:.{digits}f}"


def table_markdown(table: pd.DataFrame, title: str = "") -> str:
    """A table as Markdown: ours (Acc and AUC in %, Len-T in tokens, ± SD over training seeds) beside the paper's 7B."""
    lines = [f"**{title}**", ""] if title else []
    has_eps = table["tokens_per_step_after"].notna().any()
    has_math = table["paper_math500_acc"].notna().any()
    head = ["row", "bench", "seeds", "Acc", "Len-T", "AUC", "Acc (hard half)", "ΔLen-T vs base"]
    head += ["tokens/step"] if has_eps else []
    head += ["paper AIME24 Acc / Len-T / AUC"] + (["paper MATH500 Acc / Len-T"] if has_math else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        cells = [r["label"], r["benchmark"], str(int(r["n_seeds"])), _pm(r["acc"], r["acc_sd"], 100, 1),
                 _pm(r["len_t"], r["len_t_sd"], 1, 1), _pm(r["auc"], r["auc_sd"], 100, 1),
                 _pm(r["acc_hard"], r["acc_hard_sd"], 100, 1),
                 "—" if r["len_t_vs_base_pct"] != r["len_t_vs_base_pct"] else f"{r['len_t_vs_base_pct']:+.1f}%"]
        if has_eps:
            cells.append(_num(r["tokens_per_step_after"], 1, 2))
        cells.append("—" if r["paper_acc"] != r["paper_acc"] else
                     f"{r['paper_acc'] * 100:.1f} / {r['paper_len_t']:.0f} / {r['paper_auc'] * 100:.1f}")
        if has_math:
            cells.append("—" if r["paper_math500_acc"] != r["paper_math500_acc"] else
                         f"{r['paper_math500_acc'] * 100:.1f} / {r['paper_math500_len_t']:.0f}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "Acc, AUC and the hard-half accuracy in %, mean ± SD over training seeds (evaluation seed fixed); "
              "Len-T = mean completion tokens (thinking + answer) of the correct responses. Paper: 7B, AUC at "
              "B = 32,768 (implied by Acc·(1 − Len-T/B) where the paper does not report it)."]
    return "\n".join(lines)


def save_tables(tables: dict[str, pd.DataFrame], folder: Path, titles: dict[str, str] | None = None) -> list[Path]:
    """Write each table as CSV (numbers) and Markdown (formatted) under folder, named by TABLE_FILES; return the paths."""
    paths = []
    for group, table in tables.items():
        stem = TABLE_FILES.get(group, group)
        csv = Path(folder) / f"{stem}.csv"
        atomic_write_text(csv, table.to_csv(index=False))
        md = Path(folder) / f"{stem}.md"
        atomic_write_text(md, table_markdown(table, (titles or {}).get(group, "")) + "\n")
        paths += [csv, md]
    return paths


# --------------------------------------------------------------------------- findings


def _se(t: pd.DataFrame, name: str, col: str = "acc") -> float:
    """Standard error of a row's mean: SD over training seeds / √n with ≥ 2 seeds, else its evaluation SE."""
    r = t[t["name"] == name].iloc[0]
    if r["n_seeds"] >= 2 and r[f"{col}_sd"] == r[f"{col}_sd"]:
        return float(r[f"{col}_sd"] / math.sqrt(r["n_seeds"]))
    return float(r[f"{col}_se"])


def _val(t: pd.DataFrame, name: str, col: str) -> float:
    hit = t[t["name"] == name]
    return float(hit[col].iloc[0]) if len(hit) else math.nan


def _verdict(diff: float, se: float, expect_negative: bool) -> str:
    """'yes' (paper's direction, beyond 2 SE), 'direction only' (within noise), 'no' (opposite), '—' (not run)."""
    if diff != diff:
        return "—"
    if diff == 0:
        return "no (no difference)"
    right = diff < 0 if expect_negative else diff > 0
    if not right:
        return "no"
    return "yes" if se == se and abs(diff) > 2 * se else "direction only"


def findings(tables: dict[str, pd.DataFrame], benchmark: str | None = None) -> pd.DataFrame:
    """The paper's qualitative findings checked on these tables: the difference, its SE and a verdict each."""
    def t(group: str) -> pd.DataFrame:
        df = tables.get(group, pd.DataFrame(columns=list(TABLE_COLUMNS)))
        b = benchmark or (df["benchmark"].iloc[0] if len(df) else None)
        return df[df["benchmark"] == b]

    def pair(group, a, b, col, expect_negative, finding, paper, scale=100.0, unit="points"):
        tb = t(group)
        if not (len(tb[tb["name"] == a]) and len(tb[tb["name"] == b])):
            return {"finding": finding, "paper (7B)": paper, "ours": "not run", "difference": math.nan, "se": math.nan,
                    "reproduced": "—"}
        d = _val(tb, a, col) - _val(tb, b, col)
        se = math.sqrt(_se(tb, a, col) ** 2 + _se(tb, b, col) ** 2)
        ours = f"{_val(tb, a, col) * scale:.1f} vs {_val(tb, b, col) * scale:.1f} ({d * scale:+.1f} {unit})"
        # every number equal: the two rows are one model (twins: their settings picked the same pairs)
        same = all(_val(tb, a, c) == _val(tb, b, c) for c in ("acc", "len_t", "auc", "acc_hard"))
        verdict = "not testable (the same pairs, so one model)" if same else _verdict(d, se, expect_negative)
        return {"finding": finding, "paper (7B)": paper, "ours": ours, "difference": d * scale, "se": se * scale,
                "reproduced": verdict}

    out = [
        pair("table4", "table4/dpo", "table4/dpo_l_sft", "acc", True, "pure DPO collapses (accuracy)",
             "DPO 48.3 vs DPO-L + SFT 57.5 on AIME24"),
        pair("table2", "table2/shortest", "table2/q_dyn", "acc_hard", True,
             "Shortest hurts hard problems (accuracy on the hard half)", "Shortest 53.3 vs Q-DYN 57.3 on AIME24"),
        pair("table2", "table2/q_dyn_extra", "table2/q_dyn", "acc", True, "extra negatives cost accuracy",
             "Q-DYN + extra negatives 52.3 vs Q-DYN 57.3 on AIME24"),
        pair("table3", "table3/kl", "table3/none", "len_t", True, "KL refinement shortens correct responses (Len-T)",
             "6190 → 5157 tokens on AIME24", scale=1.0, unit="tokens"),
        pair("table3", "table3/no_kl", "table3/kl", "acc", True, "a rewrite without the KL check costs accuracy",
             "outside-LLM rewrite 39.1 vs KL 57.5 on AIME24"),
        pair("table4", "table4/sft", "table4/dpo_l_sft", "len_t", False, "SFT alone stays longer (Len-T)",
             "SFT 5734 vs DPO-L + SFT 5157 tokens on AIME24", scale=1.0, unit="tokens"),
    ]
    ta = t("alpha")
    if len(ta) and ta["acc"].notna().sum() >= 2 and (ta["x"] == 0.2).any():
        best = ta.loc[ta["acc"].idxmax()]
        a02 = ta[ta["x"] == 0.2].iloc[0]
        d = float(a02["acc"] - best["acc"])
        se = math.sqrt(_se(ta, a02["name"]) ** 2 + _se(ta, best["name"]) ** 2) if best["name"] != a02["name"] else 0.0
        verdict = "yes" if d == 0 or abs(d) <= 2 * se else "no"
        out.append({"finding": "α = 0.2 is near the best α (accuracy)", "paper (7B)": PAPER_FIG4,
                    "ours": f"α = 0.2: {a02['acc'] * 100:.1f}; best α = {best['x']:g}: {best['acc'] * 100:.1f}",
                    "difference": d * 100, "se": se * 100, "reproduced": verdict})
    else:
        out.append({"finding": "α = 0.2 is near the best α (accuracy)", "paper (7B)": PAPER_FIG4, "ours": "not run",
                    "difference": math.nan, "se": math.nan, "reproduced": "—"})
    return pd.DataFrame(out)


def findings_markdown(f: pd.DataFrame) -> str:
    """The findings table as Markdown (verdict: 'yes' beyond 2 SE in the paper's direction, 'direction only', 'no')."""
    lines = ["| finding | paper (7B) | ours | reproduced |", "|---|---|---|---|"]
    for _, r in f.iterrows():
        se = "" if r["se"] != r["se"] else f", SE {r['se']:.1f}"
        lines.append(f"| {r['finding']} | {r['paper (7B)']} | {r['ours']}{se} | {r['reproduced']} |")
    return "\n".join(lines)
