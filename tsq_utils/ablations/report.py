"""Ablation results as tables: one summary line per (row, seed, benchmark), tables with the SD over training seeds
beside the paper's 7B numbers, and the paper's qualitative findings checked with a verdict each.

The ± of a row is the SD over its training seeds with the evaluation seed fixed (the same eval problems and
sampling seed for every model), so it measures training variation as seen through one evaluation draw; each
row's evaluation SEs are reported beside it: acc_se and acc_hard_se problem-clustered (evaluation.std_error with
the problem ids as groups: the responses to one problem are correlated).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core.artifacts import atomic_write_text, load_table
from ..method.evaluation import mean_se, metrics_table, std_error
from .cache import RESULTS, entry_meta, row_keys
from .context import AblationContext
from .rows import GROUPS, Row

TITLES = {"table2": "Table 2 · selection (no refinement)", "table3": "Table 3 · refinement",
          "table4": "Table 4 · objective", "alpha": "Fig. 4 · α sweep (Q-DYN, no refinement)",
          "epsilon": "ε sweep (KL refinement; not in the paper)", "sign": "DPO-L margin sign s (not in the paper)",
          "eta": "η sweep, the DPO-L weight (not in the paper)"}
TABLE_FILES = {"table2": "table2_selection", "table3": "table3_refinement", "table4": "table4_objective",
               "alpha": "fig4_alpha_sweep", "epsilon": "sweep_epsilon", "sign": "sweep_margin_sign", "eta": "sweep_eta"}


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


# --------------------------------------------------------------------------- summaries and tables


def _hard_mask(res: pd.DataFrame) -> np.ndarray:
    """Responses to the harder half of the problems: k above the median k of the evaluation set."""
    k = pd.to_numeric(res["k"], errors="coerce")
    return (k > k.median()).to_numpy()


def hard_half(res: pd.DataFrame) -> tuple[float, float]:
    """Accuracy on the harder half of the problems (_hard_mask) and its problem-clustered SE (NaN when undefined)."""
    hard = res[_hard_mask(res)] if "k" in res else res.iloc[:0]
    acc = float(hard["correct"].mean()) if len(hard) else np.nan
    # responses to one problem are correlated: clustered by problem (evaluation.std_error), NaN for one problem
    se = std_error(hard["correct"], hard["problem_id"]) if len(hard) > 1 else np.nan
    return acc, se


SUMMARY_COLUMNS = (
    "name", "group", "label", "x", "seed", "benchmark", "acc", "acc_se", "len_t", "len_t_se", "len_a", "auc",
    "acc_hard", "acc_hard_se", "n", "n_pairs", "chosen_tokens", "tokens_per_step_before", "tokens_per_step_after",
    "acceptance_rate", "train_steps", "seconds_refine", "seconds_train", "seconds_eval", "model_key", "results_key",
)


def _summary_lines(ctx: AblationContext, r: Row, keys: dict[str, str], res: pd.DataFrame, budget: float) -> list[dict]:
    """The summary lines of one row and seed (one per benchmark) from its results and its entries' meta.json."""
    sel, ref, mod, scored = (entry_meta(ctx, keys.get(s)) for s in ("pairs", "refined", "model", "scored"))
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
        "seconds_eval": entry_meta(ctx, keys["results"]).get("seconds"),
        "model_key": keys.get("model"), "results_key": keys["results"],
    }
    out = []
    for (_, bench), m in metrics_table(res, budget).iterrows():
        g = res[res["benchmark"] == bench]
        acc_hard, acc_hard_se = hard_half(g)
        ok_len = g.loc[g["correct"].astype(bool), "n_tokens"].astype(float)
        out.append({
            "name": r.name, "group": r.group, "label": r.label, "x": r.x, "seed": r.seed, "benchmark": bench,
            "acc": m["acc"], "acc_se": m["acc_se"], "len_t": m["len_t"],
            # correct lengths of one problem are correlated too: clustered by problem, as every SE here
            "len_t_se": mean_se(ok_len, g.loc[ok_len.index, "problem_id"]) if len(ok_len) > 1 else np.nan,
            "len_a": m["len_a"], "auc": m["auc"], "acc_hard": acc_hard, "acc_hard_se": acc_hard_se, "n": int(m["n"]),
            **stage_info,
        })
    return out


def summarize(ctx: AblationContext, rows: Sequence[Row], budget: float | None = None) -> pd.DataFrame:
    """One line per (row, seed, benchmark) whose results are cached: Acc, Len-T, Len-A, AUC, hard-half accuracy (with
    evaluation SEs), the pairs and refinement numbers, and the seconds each stage took; rows not yet run are left
    out."""
    budget = ctx.profile.evaluation.budget if budget is None else budget
    out = []
    for r in rows:
        keys = row_keys(ctx, r)
        res_path = ctx.cache_dir / keys["results"] / RESULTS
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
        path = ctx.cache_dir / row_keys(ctx, r)["results"] / RESULTS
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
    """Write each table as CSV (numbers) and Markdown (formatted) under folder, named by TABLE_FILES; return the
    paths."""
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


def seeds_to_settle(diff: float, se: float, n_seeds: int) -> int | None:
    """Training seeds that would put a difference this size beyond 2 SE, the seed-to-seed spread unchanged
    (SE shrinks as 1/sqrt(seeds)); None when there is no difference or no SE to scale."""
    if not (diff == diff and se == se) or diff == 0 or se <= 0 or n_seeds < 1:
        return None
    return max(n_seeds + 1, math.ceil(n_seeds * (2 * se / abs(diff)) ** 2))


def _verdict(diff: float, se: float, expect_negative: bool, n_seeds: int = 2) -> str:
    """'yes' (the paper's direction beyond 2 SE), 'no' (the other way beyond 2 SE), else 'not settled' with the seeds
    that would settle it; '—' (not run); never yes/no on an exact tie or when a row was trained with one seed."""
    if diff != diff:
        return "—"
    if diff == 0:
        return "not testable: a tie (no difference)"
    right = diff < 0 if expect_negative else diff > 0
    way = "the paper's way" if right else "against the paper"
    if n_seeds < 2:
        # one training seed: the evaluation SE alone says nothing about training variation, which is the larger
        return f"not testable: one training seed (the difference goes {way})"
    if se == se and abs(diff) > 2 * se:
        return "yes" if right else "no"
    need = seeds_to_settle(diff, se, n_seeds)
    return f"not settled: {way} within 2 SE" + (f"; about {need} seeds would settle this size" if need else "")


def paired_difference(summary: pd.DataFrame, a: str, b: str, col: str, benchmark: str) -> tuple[float, float, int]:
    """Mean over common training seeds of row a minus row b, its paired SE (SD of the per-seed differences / sqrt n;
    NaN under 2 seeds) and n. Rows share their seeds and evaluation draws, so the pairing removes what they share."""
    s = summary[summary["benchmark"] == benchmark]
    va = s[s["name"] == a].groupby("seed")[col].mean()
    vb = s[s["name"] == b].groupby("seed")[col].mean()
    d = (va - vb).dropna()
    if not len(d):
        return math.nan, math.nan, 0
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
    return float(d.mean()), se, int(len(d))


@dataclass(frozen=True)
class Claim:
    """One of the paper's findings as a difference between two rows: row a minus row b on a column, the sign the
    paper expects, and how the difference is shown (scale and unit)."""

    group: str
    a: str
    b: str
    col: str
    expect_negative: bool
    finding: str
    paper: str
    scale: float = 100.0
    unit: str = "points"


# The paper's qualitative findings that compare two rows, in the order the findings table lists them.
CLAIMS = (
    Claim("table4", "table4/dpo", "table4/dpo_l_sft", "acc", True, "pure DPO loses accuracy",
          "DPO 48.3 vs DPO-L + SFT 57.5 on AIME24"),
    Claim("table2", "table2/shortest", "table2/q_dyn", "acc_hard", True,
          "Shortest hurts hard problems (accuracy on the hard half)", "Shortest 53.3 vs Q-DYN 57.3 on AIME24"),
    Claim("table2", "table2/q_dyn_extra", "table2/q_dyn", "acc", True, "extra negatives cost accuracy",
          "Q-DYN + extra negatives 52.3 vs Q-DYN 57.3 on AIME24"),
    Claim("table3", "table3/kl", "table3/none", "len_t", True, "KL refinement shortens correct responses (Len-T)",
          "6190 → 5157 tokens on AIME24", scale=1.0, unit="tokens"),
    Claim("table3", "table3/no_kl", "table3/kl", "acc", True, "a rewrite without the KL check costs accuracy",
          "outside-LLM rewrite 39.1 vs KL 57.5 on AIME24"),
    Claim("table4", "table4/sft", "table4/dpo_l_sft", "len_t", False, "SFT alone stays longer (Len-T)",
          "SFT 5734 vs DPO-L + SFT 5157 tokens on AIME24", scale=1.0, unit="tokens"),
)


def _not_run(finding: str, paper: str) -> dict:
    """A findings line for a claim whose rows did not run."""
    return {"finding": finding, "paper (7B)": paper, "ours": "not run", "difference": math.nan, "se": math.nan,
            "n_seeds": 0, "reproduced": "—"}


def _claim_finding(tb: pd.DataFrame, c: Claim, summary: pd.DataFrame | None) -> dict:
    """One claim checked on its table (one benchmark): the difference, its SE (paired over seeds when the per-seed
    summary has two or more) and the verdict."""
    if not (len(tb[tb["name"] == c.a]) and len(tb[tb["name"] == c.b])):
        return _not_run(c.finding, c.paper)
    d = _val(tb, c.a, c.col) - _val(tb, c.b, c.col)
    se = math.sqrt(_se(tb, c.a, c.col) ** 2 + _se(tb, c.b, c.col) ** 2)
    n_seeds = int(min(_val(tb, c.a, "n_seeds"), _val(tb, c.b, "n_seeds")))
    if summary is not None and len(tb):
        pd_, pse, pn = paired_difference(summary, c.a, c.b, c.col, tb["benchmark"].iloc[0])
        if pn >= 2:
            d, se, n_seeds = pd_, pse, pn
    scale = c.scale
    ours = f"{_val(tb, c.a, c.col) * scale:.1f} vs {_val(tb, c.b, c.col) * scale:.1f} ({d * scale:+.1f} {c.unit})"
    # every number equal: the two rows are one model (twins: their settings picked the same pairs)
    same = all(_val(tb, c.a, col) == _val(tb, c.b, col) for col in ("acc", "len_t", "auc", "acc_hard"))
    verdict = ("not testable: every number equal (one model, or models that answer alike)" if same
               else _verdict(d, se, c.expect_negative, n_seeds))
    return {"finding": c.finding, "paper (7B)": c.paper, "ours": ours, "difference": d * scale, "se": se * scale,
            "n_seeds": n_seeds, "reproduced": verdict}


def _alpha_finding(ta: pd.DataFrame, summary: pd.DataFrame | None) -> dict:
    """Fig. 4's claim checked on the α sweep: α = 0.2 against the best other α."""
    finding = "α = 0.2 is the best α (accuracy)"
    if not (len(ta) and ta["acc"].notna().sum() >= 2 and (ta["x"] == 0.2).any()):
        return _not_run(finding, PAPER_FIG4)
    best = ta.loc[ta["acc"].idxmax()]
    a02 = ta[ta["x"] == 0.2].iloc[0]
    # α = 0.2 against the best other α (the runner-up when α = 0.2 is the best itself)
    others = ta[(ta["name"] != a02["name"]) & ta["acc"].notna()]
    other = others.loc[others["acc"].idxmax()]
    d_other = float(a02["acc"] - other["acc"])
    n_seeds = int(min(a02["n_seeds"], other["n_seeds"]))
    se_other = math.sqrt(_se(ta, a02["name"]) ** 2 + _se(ta, other["name"]) ** 2)
    if summary is not None:
        pd_, pse, pn = paired_difference(summary, a02["name"], other["name"], "acc", ta["benchmark"].iloc[0])
        if pn >= 2:
            d_other, se_other, n_seeds = pd_, pse, pn
    if d_other == 0:
        verdict = f"not testable: a tie (α = 0.2 and α = {other['x']:g} give the same accuracy)"
    elif n_seeds < 2:
        verdict = "not testable: one training seed"
    else:
        # the paper's claim is a peak at 0.2: α = 0.2 above the best other α beyond 2 SE is a yes, below it a no
        verdict = _verdict(d_other, se_other, False, n_seeds)
    return {"finding": finding, "paper (7B)": PAPER_FIG4,
            "ours": f"α = 0.2: {a02['acc'] * 100:.1f}; best α = {best['x']:g}: {best['acc'] * 100:.1f}",
            "difference": d_other * 100, "se": se_other * 100, "n_seeds": n_seeds, "reproduced": verdict}


def findings(tables: dict[str, pd.DataFrame], benchmark: str | None = None,
             summary: pd.DataFrame | None = None) -> pd.DataFrame:
    """The paper's qualitative findings checked on these tables: the difference, its SE and a verdict each.

    With the per-seed `summary` (summarize's table) a difference and its SE are paired over the training seeds the two
    rows share (paired_difference): common random numbers, since rows use the same seeds and evaluation draws;
    without it, the rows' own SEs are combined as if independent (the safe side)."""
    def t(group: str) -> pd.DataFrame:
        df = tables.get(group, pd.DataFrame(columns=list(TABLE_COLUMNS)))
        b = benchmark or (df["benchmark"].iloc[0] if len(df) else None)
        return df[df["benchmark"] == b]

    out = [_claim_finding(t(c.group), c, summary) for c in CLAIMS]
    out.append(_alpha_finding(t("alpha"), summary))
    return pd.DataFrame(out)


def findings_markdown(f: pd.DataFrame) -> str:
    """The findings table as Markdown (verdict: 'yes' / 'no' beyond 2 SE in / against the paper's direction, 'not
    settled' with the seeds that would settle it, or 'not testable' on a tie or a row trained with one seed)."""
    lines = ["| finding | paper (7B) | ours | reproduced |", "|---|---|---|---|"]
    for _, r in f.iterrows():
        n = r.get("n_seeds", 0)
        se = "" if r["se"] != r["se"] else f", SE {r['se']:.1f}" + (f" over {int(n)} paired seeds" if n == n and n >= 2
                                                                      else "")
        lines.append(f"| {r['finding']} | {r['paper (7B)']} | {r['ours']}{se} | {r['reproduced']} |")
    return "\n".join(lines)
