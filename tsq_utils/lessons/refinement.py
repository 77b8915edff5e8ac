"""Notebook 03, KL-guided refinement: the token ids one step's KL compares, the examples picked by rule, the
before/after view of a refined response and sentences chosen by what refinement did in the run."""

from __future__ import annotations

import html

import pandas as pd

from ..method import refinement
from ..task.format import split_steps, step_parts
from .derivations import arithmetic_ok, derivation_ok
from .figures_common import _finite
from .widgets import pct


def step_kl_inputs(tokenizer, prompt: str, text: str, step: int, window: int) -> dict:
    """The token ids the windowed KL of one step compares: prefix, original step, continuation (as refinement does)."""
    return refinement.step_ids(tokenizer, prompt, text, step, window)


def _chosen_index(row) -> int | None:
    """The index of the candidate a step log row kept (None when it kept none)."""
    if not row["accepted"]:
        return None
    return next((j for j, (t, v) in enumerate(zip(row["cand_tokens"], row["kl"]))
                 if t == row["new_tokens"] and v == row["kl_chosen"]), None)


def _sound(log: pd.DataFrame, originals: dict) -> pd.Series:
    """Per step log row: its response's original is a correct derivation and the rewrite it kept (if any) writes no
    wrong equation."""
    def ok(row) -> bool:
        j = _chosen_index(row)
        rewrite_ok = j is None or arithmetic_ok(row["cand_texts"][j])
        return derivation_ok(originals.get(row["response_id"], "")) and rewrite_ok

    return log.apply(ok, axis=1).astype(bool) if len(log) else pd.Series(dtype=bool)


def _response_ids(refined: pd.DataFrame) -> pd.Series:
    return refined["problem_id"].astype(str) + "/" + refined["chosen_sample_idx"].astype(str)


def pick_kl_step(step_log: pd.DataFrame, refined: pd.DataFrame) -> dict | None:
    """A step worth a heat map, with its response's prompt, original and refined text: by rule, a correct derivation's
    kept rewrite that saves the most tokens (kl_examples' accepted step), else a scored step of a correct derivation.
    None when no step has a scored candidate."""
    if not len(step_log):
        return None
    n_scored = step_log["kl"].map(lambda v: _finite(list(v) if v is not None else []).size)
    log = step_log.assign(n_scored=n_scored)
    log = log[log["n_scored"] > 0]
    if not len(log):
        return None
    ids = _response_ids(refined)
    kept = log["accepted"].astype(bool) & ~log.get("reverted", pd.Series(False, index=log.index)).astype(bool)
    saving = (log["orig_tokens"] - log["new_tokens"]).where(kept, 0)
    log = log.assign(kept=kept, sound=_sound(log, dict(zip(ids, refined["chosen_original"]))), saving=saving)
    # the same order as kl_examples' accepted row, so that the heat map shows the worked example's step
    log = log.sort_values(["sound", "kept", "saving", "kl_chosen", "response_id", "step"],
                          ascending=[False, False, False, True, True, True], kind="stable")
    for _, row in log.iterrows():
        hit = refined[ids == row["response_id"]]
        if len(hit):
            r = hit.iloc[0]
            return {"row": row, "prompt": r["prompt"], "text": r["chosen_original"], "refined_text": r["chosen"]}
    return None


def trace_diff_html(original: str, refined: str) -> str:
    """Before/after of a refined response, step by step, rewritten steps highlighted (the original struck through)."""
    o_steps, o_tail = split_steps(original)
    r_steps, r_tail = split_steps(refined)
    rows = []
    same_shape = len(o_steps) == len(r_steps)
    for i, o in enumerate(o_steps):
        ob = step_parts(o)[0]
        rb = step_parts(r_steps[i])[0] if same_shape else ob
        cell = f"<td style='padding:2px 6px;color:#888'>{i}</td>"
        if rb != ob:
            rows.append(f"<tr>{cell}<td style='background:#fde0d0;padding:2px 6px'><s>{html.escape(ob)}</s></td>"
                        f"<td style='background:#d6f5e3;padding:2px 6px'><b>{html.escape(rb)}</b></td></tr>")
        else:
            rows.append(f"<tr>{cell}<td style='padding:2px 6px' colspan=2>{html.escape(ob)}</td></tr>")
    n_changed = sum(1 for r in rows if "<s>" in r)
    head = (f"<p>{n_changed} of {len(o_steps)} steps rewritten (red: original, green: the rewrite kept)"
            + ("" if same_shape else "; the step counts differ, so only the original is shown") + "</p>")
    return (head + "<table style='font-family:monospace;font-size:11px;border-collapse:collapse'>" + "".join(rows)
            + f"<tr><td></td><td colspan=2 style='padding:2px 6px;color:#555'>{html.escape(o_tail)}</td></tr></table>")


def count_scored(step_log: pd.DataFrame) -> int:
    """Candidates with a finite KL in a step log (a list per step; None or NaN where a candidate was not scored)."""
    return int(sum(_finite(list(v) if v is not None else []).size for v in step_log["kl"])) if len(step_log) else 0


def refined_scope(summary: dict, n_chosen: int | None = None) -> str:
    """How many chosen responses were refined (of how many distinct ones) and their mean length before and after."""
    n_ref = summary.get("n_responses_refined")
    b, a = summary.get("mean_chosen_tokens_before") or 0, summary.get("mean_chosen_tokens_after") or 0
    who = "The refined chosen responses" if n_ref is None else f"The {n_ref:,} refined chosen responses"
    if n_chosen is not None and n_ref is not None and n_chosen > n_ref:
        rest = n_chosen - n_ref
        who += f" (of {n_chosen:,} distinct ones; the other {rest:,} pass{'es' if rest == 1 else ''} through unrefined)"
    return f"{who} went {b:.1f} -> {a:.1f} tokens on average"


def seen_refinement(summary: dict, n_drawn: int, n_scored: int, epsilon: float,
                    n_chosen: int | None = None) -> list[str]:
    """Three lines about refinement, honest about how much it did and on how many of the chosen responses."""
    acc = summary.get("acceptance_rate") or 0.0
    tb, ta = summary.get("tokens_per_step_before") or 0, summary.get("tokens_per_step_after") or 0
    sb, sa = summary.get("steps_per_response_before") or 0, summary.get("steps_per_response_after") or 0
    effect = refinement_effect(summary, n_drawn, n_scored)
    return [
        f"{n_drawn:,} candidates drawn, {n_scored:,} shorter than their step and scored; "
        f"{summary.get('n_steps_accepted', 0)} of {summary.get('n_steps', 0)} steps rewritten ({pct(acc)}) at "
        f"ε = {epsilon:g}: {effect}.",
        f"Tokens per step {tb:.2f} -> {ta:.2f} ({100 * (ta / tb - 1) if tb else 0:+.1f}%); steps per response "
        f"{sb:.2f} -> {sa:.2f} (the paper: steps about the same, 35.1 -> 30.6 tokens per step).",
        f"{refined_scope(summary, n_chosen)}; {summary.get('responses_reverted', 0)} of them were reverted because "
        "they no longer graded correct or got longer.",
    ]


def refinement_effect(summary: dict, n_drawn: int, n_scored: int) -> str:
    """Whether refinement acted in this run and, if it did not, why (from the candidate counts)."""
    acc = summary.get("acceptance_rate") or 0.0
    tb, ta = summary.get("tokens_per_step_before") or 0, summary.get("tokens_per_step_after") or 0
    change = (ta / tb - 1) if tb else 0.0
    if n_scored == 0:
        return ("refinement did not act: no candidate was shorter than its step, so none could be kept")
    if acc < 0.05:
        return (f"refinement barely acts in this run: only {n_scored:,} of {n_drawn:,} candidates "
                f"({pct(n_scored / n_drawn) if n_drawn else '0%'}) were shorter than their step"
                + (" (the model rarely re-words a step of these responses more briefly)"
                   if n_drawn and n_scored < 0.05 * n_drawn else "")
                + f", and only {summary.get('n_steps_accepted', 0)} steps had one under ε")
    if change <= -0.05:
        return f"refinement shortens steps here: tokens per step {100 * change:+.1f}%"
    return f"a visible share of the steps is rewritten, but tokens per step change only {100 * change:+.1f}%"


def kl_examples(step_log: pd.DataFrame, refined: pd.DataFrame, epsilon: float) -> pd.DataFrame:
    """03's worked example: one accepted candidate (the kept rewrite that saves the most tokens, in a correct derivation
    when there is one) and one rejected one
    (the nearest miss above ε, from the same step if it has one), each with its step and KL. Empty rows are left
    out: no accepted row when nothing was accepted."""
    cols = ["verdict", "response_id", "step", "step_text", "step_tokens", "candidate", "cand_tokens", "kl"]
    if not len(step_log):
        return pd.DataFrame(columns=cols)
    originals = dict(zip(_response_ids(refined), refined["chosen_original"]))

    def step_text(rid: str, i: int) -> str:
        text = originals.get(rid)
        steps = split_steps(text)[0] if text is not None else []
        return step_parts(steps[i])[0] if i < len(steps) else "?"

    rows, acc_key = [], None
    kept = step_log[step_log["accepted"].astype(bool) & ~step_log["reverted"].astype(bool)]
    if len(kept):
        kept = kept.assign(_unsound=~_sound(kept, originals), _save=-(kept["orig_tokens"] - kept["new_tokens"]))
        a = kept.sort_values(["_unsound", "_save", "kl_chosen", "response_id", "step"], kind="stable").iloc[0]
        j = _chosen_index(a)
        acc_key = (a["response_id"], int(a["step"]))
        rows.append(["accepted", a["response_id"], int(a["step"]), step_text(*acc_key), int(a["orig_tokens"]),
                     a["cand_texts"][j], int(a["cand_tokens"][j]), float(a["kl"][j])])
    misses = [(float(v), r.response_id, int(r.step), j, r) for r in step_log.itertuples()
              for j, v in enumerate(r.kl if r.kl is not None else []) if _finite([v]).size and v >= epsilon]
    if misses:
        same = [m for m in misses if (m[1], m[2]) == acc_key]
        v, rid, i, j, r = min(same or misses, key=lambda m: m[:3])
        rows.append(["rejected", rid, i, step_text(rid, i), int(r.orig_tokens), r.cand_texts[j], int(r.cand_tokens[j]),
                     v])
    return pd.DataFrame(rows, columns=cols)


def kl_example_note(examples: pd.DataFrame, epsilon: float, n_scored: int) -> str:
    """One sentence on 03's worked example, chosen by what it holds."""
    acc = examples[examples["verdict"] == "accepted"]
    rej = examples[examples["verdict"] == "rejected"]
    if n_scored == 0:
        return "No candidate in this run was shorter than its step, so none was scored and nothing was rewritten."
    if acc.empty:
        return (f"No candidate in this run passed ε = {epsilon:g}: nothing was rewritten"
                + (f" (the nearest miss had KL {rej['kl'].iloc[0]:.4g})." if len(rej) else "."))
    a = acc.iloc[0]
    out = (f"Accepted: step {a['step']} of {a['response_id']}, {a['step_tokens']} -> {a['cand_tokens']} tokens at "
           f"KL {a['kl']:.4g} < ε = {epsilon:g}.")
    if len(rej):
        r = rej.iloc[0]
        where = "the same step" if (r["response_id"], r["step"]) == (a["response_id"], a["step"]) else \
            f"step {r['step']} of {r['response_id']}"
        out += (f" Rejected: a {r['cand_tokens']}-token candidate for {where}, KL {r['kl']:.4g} ≥ ε: "
                "shorter, but it moves the model's view of what follows.")
    return out
