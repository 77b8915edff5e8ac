"""Adaptive reasoning-depth selection (TokenSqueeze §3.1): preference pairs from graded samples.

Per problem with N samples of which c are correct, p = c/N and q = alpha*(1-p). The correct
responses sorted by length (shortest first) are tau_1..tau_c; the positives are tau_1..tau_k with
k = max(1, ceil(q*c)). Each positive is paired with every *longer* incorrect response.

Choices made here (all documented in notebook 02):
- A response with finish_reason "length" was cut off by the token limit: it counts as incorrect
  (unfinished), whatever its grade, both for p and as a rejected response.
- A positive with no strictly longer incorrect response gets no pair; an incorrect response of
  the same length as the positive is not "longer" and is not paired with it.
- Ties in length are ordered by sample_idx (stable), so tau_1 is the lowest sample_idx among the
  shortest correct responses.
- Problems with p = 0 ("no_correct") or p = 1 ("all_correct") give no pairs in every variant
  (also q_dyn_extra), as the paper says; they are listed in the stats table with their reason.
- More than max_pairs candidate pairs: a uniform random subset of max_pairs, drawn from a
  generator seeded by (seed, problem_id), kept in candidate order. Samples are sorted first, so
  the result does not depend on the row order of the input nor on which other problems exist.
- q_dyn_extra: extra rejected responses are *correct* responses longer than extra_neg_ratio x the
  positive's length (other positives included: the preference order stays consistent). They
  share the max_pairs cap with the ordinary pairs.

Variants are a registry (REGISTRY): each declares the SelectionConfig knobs it reads, its quantile rule
and whether it adds extra negatives. The ablation cache keys a variant's pairs on exactly the knobs it
declares (variant_params), so a variant that reads alpha gets one cache entry per alpha, and one that
does not shares an entry across alphas. To add a variant: register it here, add its name to
config.SelectionConfig's variant choices (a test checks the two agree), and, for a new knob, add it to
SelectionConfig and as a keyword of select_pairs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd



@dataclass(frozen=True)
class Variant:
    """A selection variant: the knobs it reads, the quantile q it uses, and whether it adds extra negatives."""

    name: str
    # SelectionConfig fields the variant reads besides max_pairs (every variant's cap): the cache keys on these
    knobs: tuple[str, ...]
    # q for a problem with correctness rate p, from the knob values {knob: value}
    quantile: Callable[[Mapping[str, float], float], float]
    extra_negatives: bool = False
    # for some knob values the variant is another one (q_dyn at alpha 0 is shortest): that variant's name, else None
    same_as: Callable[[Mapping[str, Any]], str | None] | None = None
    doc: str = ""


REGISTRY: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    """Add a variant to the registry (a name already there is an error)."""
    if variant.name in REGISTRY:
        raise ValueError(f"selection variant {variant.name!r} is already registered")
    REGISTRY[variant.name] = variant
    return variant


register(Variant("shortest", (), lambda k, p: 0.0, doc="k = max(1, ceil(0)) = 1: only tau_1"))
register(Variant("q_fix", ("q_fix",), lambda k, p: k["q_fix"], doc="a fixed quantile q_fix"))
register(Variant("q_dyn", ("alpha",), lambda k, p: k["alpha"] * (1.0 - p),
                 same_as=lambda k: "shortest" if k["alpha"] == 0 else None,  # q = 0 * (1 - p) gives k = 1
                 doc="the paper's q = alpha * (1 - p)"))
register(Variant("q_dyn_extra", ("alpha", "extra_neg_ratio"), lambda k, p: k["alpha"] * (1.0 - p), extra_negatives=True,
                 doc="q_dyn, plus correct responses longer than extra_neg_ratio x the positive as extra negatives"))

# The registered variants' names, in registration order.
VARIANTS = tuple(REGISTRY)


def get_variant(name: str) -> Variant:
    """The registered variant of this name; ValueError naming the registered ones otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown selection variant {name!r}; one of {list(REGISTRY)}")
    return REGISTRY[name]


def variant_params(sel: Any) -> dict:
    """The selection settings a variant's pairs depend on: its name (after same_as), max_pairs and the knobs it reads.

    `sel` is a SelectionConfig or a mapping of its fields. A field that no registered variant declares counts
    too (the safe side: a knob added to SelectionConfig before any variant declares it).
    """
    d = dataclasses.asdict(sel) if dataclasses.is_dataclass(sel) else dict(sel)
    v = get_variant(d["variant"])
    if v.same_as is not None:
        v = get_variant(v.same_as(d) or v.name)
    out = {"variant": v.name, "max_pairs": d["max_pairs"], **{k: d[k] for k in v.knobs}}
    known = {"variant", "max_pairs"}.union(*(r.knobs for r in REGISTRY.values()))
    out.update({k: val for k, val in d.items() if k not in known})
    return out
REQUIRED_COLUMNS = ("problem_id", "k", "sample_idx", "prompt", "text", "n_tokens", "correct", "finish_reason")
PAIR_COLUMNS = (
    "problem_id", "k", "prompt", "chosen", "rejected", "chosen_tokens", "rejected_tokens", "p",
    "chosen_sample_idx", "rejected_sample_idx", "kind",
)
# Stats, one row per problem: n samples, c correct (finished), p = c/n, q the quantile used, n_pos
# positives chosen by the rule and their lengths pos_tokens, n_pos_paired of them with at least one
# pair, n_incorrect = n - c (unfinished included), n_unfinished (finish_reason "length"), pairs before
# (n_candidate_pairs) and after the cap (n_pairs, of which n_extra_pairs extra negatives), reason.
STATS_COLUMNS = (
    "problem_id", "k", "n", "c", "p", "q", "n_pos", "pos_tokens", "n_pos_paired", "n_incorrect",
    "n_unfinished", "n_candidate_pairs", "n_pairs", "n_extra_pairs", "reason",
)
# Why a problem gave no pairs ("" when it gave some).
REASONS = ("all_correct", "no_correct", "no_longer_negative")
# Decimals kept in q*c before the ceiling: 0.1*30 is 3.0000000000000004 in floating point.
_ROUND_DECIMALS = 9


def count_from_q(q: float, c: int) -> int:
    """Number of positives k = max(1, ceil(q*c)) for quantile q among c correct responses (0 when c = 0)."""
    if not (0.0 <= q <= 1.0):
        raise ValueError(f"q must lie in [0, 1], got {q!r}")
    if int(c) != c or c < 0:
        raise ValueError(f"c must be a non-negative integer, got {c!r}")
    if c == 0:
        return 0
    return max(1, math.ceil(round(q * c, _ROUND_DECIMALS)))


def quantile_count(alpha: float, c: int, n: int) -> int:
    """The paper's k for c correct of n samples: max(1, ceil(alpha*(1-c/n)*c)), 0 when c = 0."""
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if int(c) != c or not (0 <= c <= n):
        raise ValueError(f"c must be an integer in [0, n={n}], got {c!r}")
    return count_from_q(alpha * (n - c) / n, int(c))


def _variant_q(name: str, alpha: float, q_fix: float, p: float, extra_neg_ratio: float = 1.5) -> float:
    """The quantile q a variant uses for a problem with correctness rate p."""
    return get_variant(name).quantile({"alpha": alpha, "q_fix": q_fix, "extra_neg_ratio": extra_neg_ratio}, p)


def _problem_seed(seed: int, problem_id: Any) -> np.random.Generator:
    """A generator that depends only on the run seed and the problem, not on other problems."""
    h = int(hashlib.sha256(str(problem_id).encode()).hexdigest()[:16], 16)
    return np.random.default_rng([seed, h])


def _validate(samples: pd.DataFrame, variant: str, alpha: float, q_fix: float, max_pairs: int,
              extra_neg_ratio: float, seed: int) -> None:
    """Raise ValueError on a malformed samples table or parameter."""
    if not isinstance(samples, pd.DataFrame):
        raise ValueError(f"samples must be a pandas DataFrame, got {type(samples).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in samples.columns]
    if missing:
        raise ValueError(f"samples table lacks column(s) {missing} (needs {list(REQUIRED_COLUMNS)})")
    if samples.empty:
        raise ValueError("samples table is empty: nothing to select from")
    if variant not in REGISTRY:
        raise ValueError(f"unknown selection variant {variant!r}; one of {list(REGISTRY)}")
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    if not (0.0 <= q_fix <= 1.0):
        raise ValueError(f"q_fix must lie in [0, 1], got {q_fix!r}")
    if isinstance(max_pairs, bool) or int(max_pairs) != max_pairs or max_pairs < 1:
        raise ValueError(f"max_pairs must be a positive integer, got {max_pairs!r}")
    if not (extra_neg_ratio >= 1.0 and math.isfinite(extra_neg_ratio)):
        raise ValueError(f"extra_neg_ratio must be a finite number >= 1, got {extra_neg_ratio!r}")
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    tokens = pd.to_numeric(samples["n_tokens"], errors="coerce")
    if tokens.isna().any() or (tokens < 0).any() or (tokens != np.floor(tokens)).any():
        raise ValueError("column 'n_tokens' must hold non-negative integers (found NaN, negative or fractional)")
    if pd.to_numeric(samples["sample_idx"], errors="coerce").isna().any():
        raise ValueError("column 'sample_idx' must hold integers (found NaN or non-numbers)")
    bad = ~samples["correct"].isin([True, False])
    if bad.any():
        raise ValueError(f"column 'correct' must hold booleans, found {samples['correct'][bad].iloc[0]!r}")
    if samples["problem_id"].isna().any():
        raise ValueError("column 'problem_id' holds missing values")
    dup = samples.duplicated(["problem_id", "sample_idx"])
    if dup.any():
        row = samples[dup].iloc[0]
        raise ValueError(f"duplicate (problem_id, sample_idx) = ({row['problem_id']!r}, {row['sample_idx']!r})")
    for col in ("prompt", "k"):
        n_distinct = samples.groupby("problem_id", sort=False)[col].nunique(dropna=False)
        if (n_distinct > 1).any():
            pid = n_distinct[n_distinct > 1].index[0]
            raise ValueError(f"column {col!r} differs between samples of problem {pid!r}")


def _empty_pairs() -> pd.DataFrame:
    """A pairs table with no rows but the right columns and dtypes."""
    dtypes = {
        "problem_id": object, "k": "int64", "prompt": object, "chosen": object, "rejected": object,
        "chosen_tokens": "int64", "rejected_tokens": "int64", "p": "float64",
        "chosen_sample_idx": "int64", "rejected_sample_idx": "int64", "kind": object,
    }
    return pd.DataFrame({c: pd.Series(dtype=dtypes[c]) for c in PAIR_COLUMNS})


def _candidates(pos: pd.DataFrame, wrong: pd.DataFrame, right: pd.DataFrame, extra: bool,
                ratio: float) -> list[tuple[int, int, str]]:
    """(positive row, rejected row, kind) for every admissible pair, in a fixed order."""
    out = []
    for i in range(len(pos)):
        length = pos["n_tokens"].iat[i]
        out += [(i, j, "incorrect") for j in np.flatnonzero(wrong["n_tokens"].to_numpy() > length)]
        if extra:
            out += [(i, j, "extra_negative") for j in np.flatnonzero(right["n_tokens"].to_numpy() > ratio * length)]
    return out


def _select_problem(g: pd.DataFrame, variant: str, alpha: float, q_fix: float, max_pairs: int,
                    extra_neg_ratio: float, seed: int) -> tuple[list[dict], dict]:
    """Pairs and the stats row of one problem (g sorted by sample_idx)."""
    pid, k = g["problem_id"].iat[0], int(g["k"].iat[0])
    ok = g["_ok"].to_numpy()
    n, c = len(g), int(ok.sum())
    p = c / n
    q = _variant_q(variant, alpha, q_fix, p, extra_neg_ratio)
    stats = {
        "problem_id": pid, "k": k, "n": n, "c": c, "p": p, "q": q, "n_pos": 0, "pos_tokens": [],
        "n_pos_paired": 0, "n_incorrect": n - c, "n_unfinished": int(g["_unfinished"].sum()),
        "n_candidate_pairs": 0, "n_pairs": 0, "n_extra_pairs": 0, "reason": "",
    }
    if c == 0 or c == n:
        stats["reason"] = "no_correct" if c == 0 else "all_correct"
        return [], stats
    order = ["n_tokens", "sample_idx"]  # ties in length: lowest sample_idx first
    right = g[ok].sort_values(order, kind="stable")
    wrong = g[~ok].sort_values(order, kind="stable")
    pos = right.iloc[: count_from_q(q, c)]
    cands = _candidates(pos, wrong, right, REGISTRY[variant].extra_negatives, extra_neg_ratio)
    stats.update(n_pos=len(pos), pos_tokens=[int(t) for t in pos["n_tokens"]], n_candidate_pairs=len(cands))
    if not cands:
        stats["reason"] = "no_longer_negative"
        return [], stats
    if len(cands) > max_pairs:
        keep = np.sort(_problem_seed(seed, pid).choice(len(cands), size=max_pairs, replace=False))
        cands = [cands[i] for i in keep]
    pairs = []
    for i, j, kind in cands:
        w = pos.iloc[i]
        rej = (wrong if kind == "incorrect" else right).iloc[j]
        pairs.append({
            "problem_id": pid, "k": k, "prompt": w["prompt"], "chosen": w["text"], "rejected": rej["text"],
            "chosen_tokens": int(w["n_tokens"]), "rejected_tokens": int(rej["n_tokens"]), "p": p,
            "chosen_sample_idx": int(w["sample_idx"]), "rejected_sample_idx": int(rej["sample_idx"]), "kind": kind,
        })
    stats.update(
        n_pairs=len(pairs), n_extra_pairs=sum(kind == "extra_negative" for _, _, kind in cands),
        n_pos_paired=len({i for i, _, _ in cands}),
    )
    return pairs, stats


def select_pairs(samples: pd.DataFrame, variant: str = "q_dyn", alpha: float = 0.2, q_fix: float = 0.2,
                 max_pairs: int = 64, extra_neg_ratio: float = 1.5, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Preference pairs (shorter correct over longer incorrect) and per-problem stats from a samples table."""
    _validate(samples, variant, alpha, q_fix, max_pairs, extra_neg_ratio, seed)
    df = samples[list(REQUIRED_COLUMNS)].copy()
    df["n_tokens"] = df["n_tokens"].astype("int64")
    df["sample_idx"] = df["sample_idx"].astype("int64")
    df["correct"] = df["correct"].astype(bool)
    # A response cut by the token limit is unfinished: it counts as incorrect whatever its grade.
    df["_unfinished"] = df["finish_reason"].astype(str) != "stop"  # "length", or vLLM's "repetition"
    df["_ok"] = df["correct"] & ~df["_unfinished"]
    # Sort first so that neither pairs nor subsampling depend on the input's row order.
    df = df.sort_values(["problem_id", "sample_idx"], kind="stable").reset_index(drop=True)
    all_pairs, all_stats = [], []
    for _, g in df.groupby("problem_id", sort=True):
        pairs, stats = _select_problem(g, variant, alpha, q_fix, int(max_pairs), extra_neg_ratio, int(seed))
        all_pairs += pairs
        all_stats.append(stats)
    pairs_df = pd.DataFrame(all_pairs, columns=list(PAIR_COLUMNS)) if all_pairs else _empty_pairs()
    if len(df) and df.groupby("problem_id").size().max() < 2:
        # N = 1 (sampling.n: 1): said plainly, not left to a failing figure or an empty table further on
        print("selection: every problem has a single response (sampling.n = 1), and a pair needs two responses to "
              "one problem (a shorter correct one preferred over a longer or wrong one): no pairs. Sample "
              "sampling.n >= 2 responses per problem (notebook 01), then rerun 02.")
    return pairs_df, pd.DataFrame(all_stats, columns=list(STATS_COLUMNS))


def select_with(samples: pd.DataFrame, cfg: Any, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """select_pairs with a SelectionConfig's settings: each of its fields is the keyword of the same name, so a knob
    added to SelectionConfig and to select_pairs reaches every caller."""
    return select_pairs(samples, **dataclasses.asdict(cfg), seed=seed)


def _mean_or_none(values: pd.Series) -> float | None:
    """Mean as a float, None for no values (JSON-friendly)."""
    return float(values.mean()) if len(values) else None


def selection_summary(pairs: pd.DataFrame, stats: pd.DataFrame) -> dict:
    """Headline numbers of a selection: pairs, problems used and skipped by reason, mean lengths."""
    for name, table, cols in (("pairs", pairs, PAIR_COLUMNS), ("stats", stats, STATS_COLUMNS)):
        missing = [c for c in cols if c not in table.columns]
        if missing:
            raise ValueError(f"{name} table lacks column(s) {missing}")
    used = stats[stats["n_pairs"] > 0]
    skipped = stats.loc[stats["n_pairs"] == 0, "reason"].value_counts()
    return {
        "n_pairs": int(len(pairs)),
        "n_extra_negative_pairs": int((pairs["kind"] == "extra_negative").sum()),
        "n_problems": int(len(stats)),
        "n_problems_used": int(len(used)),
        "n_problems_skipped": {r: int(skipped.get(r, 0)) for r in REASONS},
        "mean_pairs_per_used_problem": _mean_or_none(used["n_pairs"]),
        "mean_positives_per_used_problem": _mean_or_none(used["n_pos"]),
        "mean_chosen_tokens": _mean_or_none(pairs["chosen_tokens"]),
        "mean_rejected_tokens": _mean_or_none(pairs["rejected_tokens"]),
    }


def explain_problem(samples: pd.DataFrame, pairs: pd.DataFrame, problem_id: Any) -> pd.DataFrame:
    """One problem's samples, shortest first, with the role selection gave each (positive, rejected, or none)."""
    s = samples[samples["problem_id"] == problem_id].sort_values(["n_tokens", "sample_idx"], kind="stable")
    if s.empty:
        raise ValueError(f"no samples for problem {problem_id!r}")
    pp = pairs[pairs["problem_id"] == problem_id]
    pos, neg = set(pp["chosen_sample_idx"]), set(pp["rejected_sample_idx"])
    role = ["positive" if i in pos else ("rejected" if i in neg else "") for i in s["sample_idx"]]
    return s.assign(role=role)[["sample_idx", "n_tokens", "correct", "finish_reason", "role"]].reset_index(drop=True)


def example_problems(stats: pd.DataFrame) -> tuple[Any, Any]:
    """An easy and a hard problem that both gave pairs: the highest and the lowest correctness rate (None if none)."""
    used = stats[stats["n_pairs"] > 0].sort_values(["p", "problem_id"], kind="stable")
    if used.empty:
        return None, None
    return used["problem_id"].iloc[-1], used["problem_id"].iloc[0]
