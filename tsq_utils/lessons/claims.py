"""Effect sentences of notebooks 05-07 chosen by the run's numbers: each helper returns the sentence its numbers
support (a loss, a tie, a mechanism that did not act and why), so that no lesson states an effect its own outputs
contradict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd

from ..method.evaluation import mean_se
from .selection import min_alpha_for_two
from .tldr import seen_tldr as _seen_tldr

# The paper's Table 4 (7B, AIME24), as docs/method.md quotes it: pure DPO against DPO-L + SFT.
PAPER_DPO_ACC, PAPER_DPO_L_SFT_ACC = 0.483, 0.575


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(float(x))


def accuracy_change(head: Mapping[str, float]) -> str:
    """The accuracy change of the trained model against the base, with its SE and whether it exceeds two SEs."""
    d, se = float(head["acc_change_points"]), float(head["acc_se_points"])
    nums = (f"accuracy {100 * head['acc_base']:.1f} -> {100 * head['acc_trained']:.1f} "
            f"({d:+.1f} ± {se:.1f} points, SE of the difference)")
    if not _finite(se) or se == 0:
        verdict = "no standard error in this run, so no verdict on accuracy"
    elif abs(d) <= 2 * se:
        verdict = "within two standard errors: no accuracy change that this sample can show"
    elif d < 0:
        verdict = f"a loss of {abs(d) / se:.1f} standard errors: the compression cost accuracy here"
    else:
        verdict = f"a gain of {d / se:.1f} standard errors"
    return f"{nums}: {verdict}."


def budget_curve(head: Mapping[str, float]) -> str:
    """What Fig. 3 shows: whether the trained model's Acc(b) rises earlier, and the accuracy it ends at."""
    shorter = head["len_t_trained"] < head["len_t_base"]
    auc_up = head["auc_trained"] > head["auc_base"]
    first = (f"AUC {head['auc_base']:.3f} -> {head['auc_trained']:.3f}, Len-T {head['len_t_base']:.1f} -> "
             f"{head['len_t_trained']:.1f}: ")
    if shorter and auc_up:
        first += "the trained model's curve rises earlier (its correct answers are shorter)"
    elif auc_up:
        first += "the trained model's area under the curve is larger"
    else:
        first += "no gain in accuracy within a budget"
    return f"{first}; at the full budget the curves end at the models' accuracies, {accuracy_change(head)}"


def pure_dpo(dpo: Mapping[str, float], ours: Mapping[str, float], paper_dpo: float = PAPER_DPO_ACC,
             paper_ours: float = PAPER_DPO_L_SFT_ACC) -> str:
    """Pure DPO against DPO-L + SFT, as the share of accuracy it keeps, beside the paper's share."""
    paper_kept = paper_dpo / paper_ours
    if dpo["acc"] >= ours["acc"]:
        return (f"Pure DPO {100 * dpo['acc']:.1f}% against {100 * ours['acc']:.1f}% for DPO-L + SFT: pure DPO loses "
                f"nothing in this run, while the paper's keeps {100 * paper_kept:.0f}% of the accuracy "
                f"({100 * paper_dpo:.1f} vs {100 * paper_ours:.1f} on AIME24).")
    kept = dpo["acc"] / ours["acc"]
    nums = (f"Pure DPO {100 * dpo['acc']:.1f}% against {100 * ours['acc']:.1f}% for DPO-L + SFT "
            f"(n = {int(dpo['n_seeds'])} and {int(ours['n_seeds'])} training seeds): it keeps {100 * kept:.0f}% of "
            f"the accuracy; the paper's pure DPO keeps {100 * paper_kept:.0f}% ({100 * paper_dpo:.1f} vs "
            f"{100 * paper_ours:.1f} on AIME24)")
    if kept < paper_kept - 0.1:
        return nums + ": without the SFT anchor our model collapses far deeper than the paper's."
    if kept > paper_kept + 0.1:
        return nums + ": our pure DPO loses less than the paper's."
    return nums + ": about the paper's loss."


def _same_model(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    cols = ("acc", "len_t", "n_pairs")
    return all((a[c] == b[c]) or (a[c] != a[c] and b[c] != b[c]) for c in cols)


def shortest_vs_q_dyn(sh: Mapping[str, float], qd: Mapping[str, float], n: int, alpha: float) -> str:
    """Table 2's Shortest against Q-DYN on the hard half: one model (n₊ = 1 everywhere), or the difference and SE."""
    if _same_model(sh, qd):
        why = (f"at N = {n} and α = {alpha:g} n₊ = 1 for every problem, so Q-DYN keeps exactly Shortest's positives"
               if alpha <= min_alpha_for_two(n) else "the two rows' pairs trained models that answer alike")
        return (f"Shortest and Q-DYN gave the same numbers (accuracy, Len-T, pairs): {why}, and this run cannot "
                "show whether always preferring the shortest answer costs accuracy on hard problems.")
    d = 100 * (sh["acc_hard"] - qd["acc_hard"])
    se = 100 * math.sqrt(sh["acc_hard_se"] ** 2 + qd["acc_hard_se"] ** 2)
    nums = (f"Hard half: Shortest {100 * sh['acc_hard']:.1f}% vs Q-DYN {100 * qd['acc_hard']:.1f}% "
            f"({d:+.1f} ± {se:.1f} points, evaluation SEs)")
    if not _finite(se) or abs(d) <= 2 * se:
        return nums + ": within two standard errors, no effect of the selection count this run can show."
    if d < 0:
        return nums + ": Shortest loses accuracy on hard problems, as in the paper."
    return nums + ": Shortest is the more accurate here, against the paper."


def tldr_weights(traj: pd.DataFrame, refs: Mapping) -> str:
    """Whether TLDR's short-pool weight moved, and why not when it did not (no accuracy gap between the references)."""
    tl = traj[traj["run"] == "tldr"].sort_values("step")
    w = tl["w_short"].to_numpy(dtype=float)
    last = float(w[-1]) if len(w) else 0.5
    moved = float(max(abs(w - 0.5))) if len(w) else 0.0
    head = f"TLDR's short-pool weight went 0.5 -> {last:.3f} over {int(tl['updated'].sum())} updates"
    if moved >= 0.05:  # the end point alone would hide a swing (up to near 1 and back down, say)
        return (head + f", between {float(w.min()):.3f} and {float(w.max()):.3f} on the way: the re-weighting acted, "
                "and its mixture differs from the static 1:1 mix.")
    a_s, a_l = float(refs["a_s"]), float(refs["a_l"])
    if a_s >= a_l:
        return (head + f": the weights hardly moved. On the dev set the short model is as accurate as the long one "
                f"(A_S = {a_s:.3f}, A_L = {a_l:.3f}), so b_long = 0 at every update, and b_short is 0 as soon as the "
                "model is as short as T_S: there is nothing to balance, and TLDR trains on almost the static 1:1 mix.")
    return (head + f": the weights hardly moved although A_S = {a_s:.3f} < A_L = {a_l:.3f}: the model stayed between "
            "the reference points, where the two benefits nearly cancel.")


def long_model_situation(refs: Mapping) -> str:
    """07's worked example, first situation: what b is when the model is still the long model, from T_S and T_L."""
    t_s, t_l = float(refs["t_s"]), float(refs["t_l"])
    if t_l > t_s:
        return (f"If after $E$ steps the model were still the long model ($T_{{\\text{{cur}}}} = T_L = {t_l:.1f}$, "
                f"$A_{{\\text{{cur}}}} = A_L$), it is too long by the full gap to $T_S = {t_s:.1f}$ and has lost "
                "nothing: $b = (1, 0)$ and the short pool gains.")
    return (f"If after $E$ steps the model were still the long model, it would be no longer than the short model "
            f"($T_L = {t_l:.1f}$, $T_S = {t_s:.1f}$ on this dev set): $b = (0, 0)$, nothing to shorten.")


def short_model_situation(refs: Mapping) -> str:
    """07's worked example, second situation: what b is when the model has become the short model, from A_S and A_L."""
    a_s, a_l = float(refs["a_s"]), float(refs["a_l"])
    if a_s < a_l:
        floor = (refs.get("min_gap") or [0.0, 0.0])[1]  # a gap below the dev set's resolution is floored there
        b_long = (a_l - a_s) / max(a_l - a_s, floor)
        return (f"If it had become the short model ($T_S$, $A_S = {a_s:.3f}$), it is short enough but has lost the "
                f"whole accuracy gap to $A_L = {a_l:.3f}$: $b = (0, {b_long:.3g})$ and the long pool gains.")
    return (f"If it had become the short model ($T_S$, $A_S = {a_s:.3f}$), it is short enough and, since "
            f"$A_S \\ge A_L = {a_l:.3f}$ on this dev set, has lost nothing: $b = (0, 0)$ and the weights stay "
            "where they are. The rule only pulls towards the long pool when the short model is less accurate.")


def trace_pair(results_a: pd.DataFrame, results_b: pd.DataFrame) -> dict | None:
    """A problem on which model a's response is wrong and model b's is right (same sample index; the first by
    problem id, then sample index), with both responses; None when there is none."""
    key = ["problem_id", "sample_idx"]
    m = results_a.merge(results_b, on=key, suffixes=("_a", "_b"))
    hit = m[~m["correct_a"].astype(bool) & m["correct_b"].astype(bool)].sort_values(key)
    if hit.empty:
        return None
    r = hit.iloc[0]
    return {"problem_id": r["problem_id"], "sample_idx": int(r["sample_idx"]), "gold": r["gold_a"],
            "k": r.get("k_a"), "text_a": r["text_a"], "n_tokens_a": int(r["n_tokens_a"]),
            "text_b": r["text_b"], "n_tokens_b": int(r["n_tokens_b"])}


def truncate(text: str, max_chars: int = 600) -> str:
    """The text cut to max_chars, with a marker saying how much was left out."""
    return text if len(text) <= max_chars else text[:max_chars] + f"\n[... {len(text) - max_chars} more characters]"


def _table_row(tables: Mapping[str, pd.DataFrame], group: str, name: str) -> pd.Series | None:
    t = tables.get(group)
    if t is None or not len(t):
        return None
    hit = t[(t["name"] == name) & t["acc"].notna()]
    return None if hit.empty else hit.iloc[0]


def seen_ablations(tables: Mapping[str, pd.DataFrame], n: int, alpha: float) -> list[str]:
    """Three lines about the ablations: pure DPO against the paper's share, Shortest against Q-DYN, and refinement."""
    out = []
    ours, dpo = _table_row(tables, "table4", "table4/dpo_l_sft"), _table_row(tables, "table4", "table4/dpo")
    if ours is not None and dpo is not None:
        out.append(pure_dpo(dpo, ours))
    sh, qd = _table_row(tables, "table2", "table2/shortest"), _table_row(tables, "table2", "table2/q_dyn")
    if sh is not None and qd is not None:
        out.append(shortest_vs_q_dyn(sh, qd, n, alpha))
    none, kl = _table_row(tables, "table3", "table3/none"), _table_row(tables, "table3", "table3/kl")
    if none is not None and kl is not None:
        rate = kl.get("acceptance_rate")
        rate_txt = (f" (it rewrote {100 * rate:.1f}% of the steps it scored, in the chosen responses it refined: "
                    "at most refinement.max_responses of them, not all)" if _finite(rate) else "")
        out.append(f"KL refinement: Len-T {none['len_t']:.1f} -> {kl['len_t']:.1f}{rate_txt}; "
                   + ("no shortening to speak of: refinement does not act in this run (notebook 03 shows why), unlike "
                      "the paper's 6190 -> 5157." if abs(kl["len_t"] - none["len_t"]) < 0.05 * none["len_t"]
                      else "a visible shortening."))
    while len(out) < 3:
        out.append("Some tables have no results yet: run the rows first.")
    return out[:3]


def paired_difference(results: pd.DataFrame, a: str, b: str) -> dict[str, float]:
    """Model a minus model b on the same problems: accuracy difference with its problem-paired SE, and Len-T
    difference with the SE of two problem-clustered means (NaN where a model has no correct response)."""
    ra, rb = results[results["model"] == a], results[results["model"] == b]
    if ra.empty or rb.empty:
        raise ValueError(f"no results for model {a!r} or {b!r} (models: {sorted(results['model'].unique())})")
    # the mean correctness of each problem under each model; the SE of the mean per-problem difference is the SE of
    # the accuracy difference when both models answered every problem equally often (as 05 and 07 do)
    pa = ra.groupby("problem_id")["correct"].mean()
    pb = rb.groupby("problem_id")["correct"].mean()
    d = (pa - pb).dropna()
    se_acc = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
    ca, cb = ra[ra["correct"].astype(bool)], rb[rb["correct"].astype(bool)]
    if len(ca) and len(cb):
        d_len = float(ca["n_tokens"].mean() - cb["n_tokens"].mean())
        se_len = math.hypot(mean_se(ca["n_tokens"], ca["problem_id"]), mean_se(cb["n_tokens"], cb["problem_id"]))
    else:
        d_len, se_len = math.nan, math.nan
    return {"acc_diff": float(ra["correct"].mean() - rb["correct"].mean()), "acc_se": se_acc,
            "len_t_diff": d_len, "len_t_se": se_len}


def dynamic_vs_static(results: pd.DataFrame) -> str:
    """TLDR's dynamic re-weighting against the static 1:1 mix: accuracy and Len-T differences, each beyond two SEs
    or not."""
    d = paired_difference(results, "tldr", "static_mix")

    def sign(x: float, se: float) -> int:
        """+1 / -1 beyond two SEs in that direction, 0 within them (or without an SE)."""
        if not (_finite(x) and _finite(se)) or se == 0 or abs(x) <= 2 * se:
            return 0
        return 1 if x > 0 else -1

    acc, short = sign(d["acc_diff"], d["acc_se"]), sign(-d["len_t_diff"], d["len_t_se"])
    words = {1: "TLDR better, beyond 2 SE", -1: "the static mix better, beyond 2 SE", 0: "within noise"}
    if acc >= 0 and short >= 0 and acc + short > 0:
        verdict = "dynamic re-weighting beats the static mix beyond noise"
    elif acc <= 0 and short <= 0 and acc + short < 0:
        verdict = "the static mix beats dynamic re-weighting beyond noise"
    elif acc and short:
        verdict = "a trade-off: each is better on one count, beyond noise"
    else:
        verdict = "no difference beyond noise"
    return (f"TLDR vs static mix: accuracy {100 * d['acc_diff']:+.1f} ± {100 * d['acc_se']:.1f} points "
            f"({words[acc]}), Len-T {d['len_t_diff']:+.1f} ± {d['len_t_se']:.1f} tokens ({words[short]}): {verdict}.")


def seen_tldr(traj: pd.DataFrame, comparison: pd.DataFrame, refs: Mapping,
              results: pd.DataFrame | None = None) -> list[str]:
    """Three lines about TLDR's run: whether its weights moved and why, how it compares with the static mix (with SEs
    when the per-response results are given), and how it compares with TokenSqueeze."""
    lines = [tldr_weights(traj, refs), *_seen_tldr(traj, comparison)[1:]]
    if results is not None and {"tldr", "static_mix"} <= set(results["model"]):
        lines[1] = dynamic_vs_static(results)
    return lines
