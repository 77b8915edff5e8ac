"""The step log: one row per step of every refined response (its candidates, their KLs and what was kept), the
refined pairs table built beside it, and the summaries read from both."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pandas as pd

from ...model.generation import count_tokens
from ...task.format import count_steps, step_bodies
from .plan import RefineResult

STEP_LOG_COLUMNS = (
    "response_id", "problem_id", "step", "orig_tokens", "n_sampled", "n_dropped", "cand_tokens", "kl",
    "accepted", "new_tokens", "kl_chosen", "skipped", "reverted", "final_tokens", "cand_texts", "kl_bound",
)


def _step_rows(res: RefineResult, problem_id: Any) -> list[dict]:
    """Step-log rows of one refined response."""
    rows = []
    for r in res.steps:
        d = asdict(r)
        d.update(problem_id=problem_id, reverted=res.reverted,
                 final_tokens=r.orig_tokens if res.reverted else r.new_tokens)
        rows.append(d)
    return rows


def refined_tables(tokenizer, pairs: pd.DataFrame, keys: list, keys_to_refine: list, rows: list[pd.Series],
            refined: list[RefineResult]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The refined pairs table and the step log from the refined responses."""
    results: dict[tuple[str, str], RefineResult] = dict(zip(keys_to_refine, refined))
    log_rows: list[dict] = []
    for row, res in zip(rows, refined):
        log_rows += _step_rows(res, row["problem_id"])
    out = pairs.copy()
    out["chosen_original"] = pairs["chosen"]
    out["chosen_tokens_original"] = pairs["chosen_tokens"]
    pair_keys = list(zip(pairs["prompt"], pairs["chosen"]))
    out["chosen"] = [results[k].text if k in results else k[1] for k in pair_keys]
    counts = {k: (results[k].n_tokens if k in results else count_tokens(tokenizer, k[1])) for k in keys}
    out["chosen_tokens"] = [counts[k] for k in pair_keys]
    out["refined"] = [k in results for k in pair_keys]
    out["reverted"] = [k in results and results[k].reverted for k in pair_keys]
    step_log = pd.DataFrame(log_rows, columns=list(STEP_LOG_COLUMNS))
    return out, step_log


def fully_scored(step_log: pd.DataFrame) -> bool:
    """Whether every candidate shorter than its step has its exact KL in the step log (no 'fast' scoring)."""
    bounds = step_log["kl_bound"] if "kl_bound" in step_log.columns else [()] * len(step_log)
    for skipped, orig, toks, kls, bnd in zip(step_log["skipped"], step_log["orig_tokens"], step_log["cand_tokens"],
                                             step_log["kl"], bounds):
        if skipped:
            continue
        for j, (n, kl) in enumerate(zip(toks, kls)):
            if n < orig and (kl != kl or (len(bnd) > j and bool(bnd[j]))):
                return False
    return True


def _mean_or_none(values: pd.Series) -> float | None:
    """The mean, or None for an empty series."""
    return float(values.mean()) if len(values) else None


def refinement_summary(step_log: pd.DataFrame, refined_pairs: pd.DataFrame) -> dict:
    """Acceptance rate, tokens per step and steps per response before/after, reverts, chosen tokens before/after."""
    for name, df, cols in (("step_log", step_log, ("accepted", "orig_tokens", "final_tokens", "skipped")),
                           ("refined_pairs", refined_pairs,
                            ("prompt", "chosen", "chosen_original", "chosen_tokens", "chosen_tokens_original",
                             "refined", "reverted"))):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise ValueError(f"{name} lacks column(s) {missing}")
    # Per distinct refined response (a response shared by several pairs counts once).
    done = refined_pairs[refined_pairs["refined"].astype(bool)].drop_duplicates(["prompt", "chosen_original"])
    same_text = refined_pairs["chosen"] == refined_pairs["chosen_original"]
    return {
        "n_pairs": int(len(refined_pairs)),
        "n_responses_refined": int(len(done)),
        "n_steps": int(len(step_log)),
        "n_steps_sampled": int((step_log["skipped"] == "").sum()),  # not skipped: candidates were drawn
        "n_steps_accepted": int(step_log["accepted"].sum()),
        "acceptance_rate": _mean_or_none(step_log["accepted"].astype(float)),
        "tokens_per_step_before": _mean_or_none(step_log["orig_tokens"]),
        "tokens_per_step_after": _mean_or_none(step_log["final_tokens"]),
        "steps_per_response_before": _mean_or_none(done["chosen_original"].map(count_steps)),
        "steps_per_response_after": _mean_or_none(done["chosen"].map(count_steps)),
        "responses_reverted": int(done["reverted"].sum()),
        "mean_chosen_tokens_before": _mean_or_none(done["chosen_tokens_original"]),
        "mean_chosen_tokens_after": _mean_or_none(done["chosen_tokens"]),
        # Rows whose text is unchanged but whose recomputed count differs from stage 01's: a sign that
        # stage 01 counted tokens differently (then "before" and "after" are not comparable).
        "n_token_count_mismatch": int((same_text & (refined_pairs["chosen_tokens"]
                                                    != refined_pairs["chosen_tokens_original"])).sum()),
    }


def step_table(result: RefineResult) -> pd.DataFrame:
    """One refined response's steps: original text, candidates with their tokens and KL, and what was kept."""
    bodies = step_bodies(result.original_text)
    rows = []
    for rec, body in zip(result.steps, bodies):
        order = sorted(range(len(rec.cand_texts)), key=lambda j: rec.cand_tokens[j])
        rows.append({"step": rec.step, "text": body, "tokens": rec.orig_tokens, "KL": 0.0, "kept": not rec.accepted})
        for j in order:
            kl = rec.kl[j]
            rows.append({"step": rec.step, "text": "   ↳ " + rec.cand_texts[j], "tokens": rec.cand_tokens[j], "KL": kl,
                         "kept": rec.accepted and rec.cand_tokens[j] == rec.new_tokens and kl == rec.kl_chosen})
    return pd.DataFrame(rows)
