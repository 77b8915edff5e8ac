"""The teaching parts of the notebooks: "What you should have seen" lines made from a run's numbers, collapsible
answers, live views (ipywidgets) that render their default state headless, and the small computations the
lessons' inline re-implementations are checked against."""

from __future__ import annotations

import html
import math
from typing import Any, Callable, Sequence

import pandas as pd

# --------------------------------------------------------------------------- display


def seen(lines: Sequence[str]) -> Any:
    """'What you should have seen' as Markdown: one bullet per line (the lines come from the run's numbers)."""
    from IPython.display import Markdown

    if not lines:
        raise ValueError("no summary lines")
    return Markdown("**What you should have seen** (from this run's numbers)\n\n" + "\n".join(f"- {s}" for s in lines))


def answer(text: str, title: str = "Answer") -> Any:
    """A collapsed answer (HTML <details>): open it after trying the exercise."""
    from IPython.display import HTML

    return HTML(f"<details><summary><b>{html.escape(title)}</b> (click to open)</summary>"
                f"<div style='margin:0.4em 1em'>{text}</div></details>")


def live(view: Callable[..., Any], **controls: Any) -> Any:
    """Show view(**defaults) now, as an ordinary output (papermill, nbval and the book see this default state), and
    re-render it in place when a control moves in a live notebook. Returns the controls' box (None without
    ipywidgets). Never waits for input."""
    from IPython.display import display

    values = {k: getattr(c, "value", c) for k, c in controls.items()}
    first = view(**values)
    handle = display(first, display_id=True)
    _close(first)
    try:
        import ipywidgets as widgets
    except ImportError:  # headless without ipywidgets: the default state is all there is
        return None
    sliders = {k: c for k, c in controls.items() if isinstance(c, widgets.ValueWidget)}
    if not sliders:
        return None

    def update(_change: Any = None) -> None:
        out = view(**{k: getattr(c, "value", c) for k, c in controls.items()})
        if handle is not None:
            handle.update(out)
        else:  # no IPython shell (a plain script): show it again
            display(out)
        _close(out)

    for c in sliders.values():
        c.observe(update, names="value")
    box = widgets.HBox(list(sliders.values()))
    display(box)
    return box


def _close(obj: Any) -> None:
    """Close a matplotlib figure once displayed, so that it is not drawn twice."""
    try:
        import matplotlib.pyplot as plt
        from matplotlib.figure import Figure

        if isinstance(obj, Figure):
            plt.close(obj)
    except ImportError:  # pragma: no cover
        pass


def slider(value: float, lo: float, hi: float, step: float, description: str) -> Any:
    """A float (or int, for int arguments) slider; the plain value where ipywidgets is missing."""
    try:
        import ipywidgets as widgets
    except ImportError:
        return value
    style = {"description_width": "initial"}
    if all(isinstance(v, int) for v in (value, lo, hi, step)):
        return widgets.IntSlider(value=value, min=lo, max=hi, step=step, description=description, style=style)
    return widgets.FloatSlider(value=value, min=lo, max=hi, step=step, description=description, style=style,
                               readout_format=".3g")


# --------------------------------------------------------------------------- computations the lessons check


def sequence_logps(model, tokenizer, prompt: str, completion: str, add_eos: bool = True) -> tuple[float, int]:
    """log π(completion | prompt) summed over the completion's tokens (EOS appended, as TRL does), and their count."""
    import torch

    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        c_ids = c_ids + [tokenizer.eos_token_id]
    ids = torch.tensor([p_ids + c_ids])
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(p_ids) - 1:-1].float()
    finally:
        model.train(was)
    logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(c_ids)[:, None]).sum()
    return float(logp), len(c_ids)


def step_kl_inputs(tokenizer, prompt: str, text: str, step: int, window: int) -> dict:
    """The token ids the windowed KL of one step compares: prefix, original step, continuation (as refinement does)."""
    from ..method import refinement

    plan = refinement._plan_response(tokenizer, prompt, text, window=window, max_step_tokens=1, cap_to_original=True,
                                     response_id="lesson")
    if not 0 <= step < len(plan.steps):
        raise ValueError(f"step {step} out of range: the response has {len(plan.steps)} steps")
    return {"prefix_ids": plan.prefix_ids(step), "step_ids": list(plan.body_ids[step]),
            "cont_ids": plan.cont_ids(step, window)}


def pick_kl_step(step_log: pd.DataFrame, refined: pd.DataFrame) -> dict | None:
    """A step worth a heat map (an accepted one if any, with the most scored candidates), with its response's prompt,
    original and refined text. None when no step has a scored candidate."""
    if not len(step_log):
        return None
    from .plotting import _finite

    n_scored = step_log["kl"].map(lambda v: _finite(list(v) if v is not None else []).size)
    log = step_log.assign(n_scored=n_scored)
    log = log[log["n_scored"] > 0]
    if not len(log):
        return None
    kept = log["accepted"].astype(bool) & ~log.get("reverted", pd.Series(False, index=log.index)).astype(bool)
    log = log.assign(kept=kept).sort_values(["kept", "accepted", "n_scored"], ascending=False, kind="stable")
    ids = refined["problem_id"].astype(str) + "/" + refined["chosen_sample_idx"].astype(str)
    for _, row in log.iterrows():
        hit = refined[ids == row["response_id"]]
        if len(hit):
            r = hit.iloc[0]
            return {"row": row, "prompt": r["prompt"], "text": r["chosen_original"], "refined_text": r["chosen"]}
    return None


def trace_diff_html(original: str, refined: str) -> str:
    """Before/after of a refined response, step by step, rewritten steps highlighted (the original struck through)."""
    from ..task.format import split_steps, step_parts

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


# --------------------------------------------------------------------------- "What you should have seen"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def seen_base_model(checks: dict) -> list[str]:
    """Three lines about the base reasoner from reasoner_checks()."""
    ratio = checks["greedy_over_oracle"]
    return [
        f"Greedy accuracy {_pct(checks['greedy_accuracy'])}, at {ratio:.1f}x the oracle's length "
        + ("(plenty of room to compress)." if ratio >= 1.8 else "(little room to compress)."),
        f"At the sampling temperature accuracy drops to {_pct(checks['sampled_accuracy'])}: "
        "sampling gives both right and wrong answers, which selection needs.",
        f"The length of a problem's samples varies with a mean CV of {checks['mean_cv']:.2f} "
        + ("(a wide spread: short correct samples exist)." if checks["mean_cv"] >= 0.3 else "(a narrow spread)."),
    ]


def seen_sampling(stats: pd.DataFrame) -> list[str]:
    """Three lines about the samples of 01 from per_problem_stats()."""
    n = int(stats["n"].max())
    mixed = ((stats["c"] > 0) & (stats["c"] < stats["n"])).mean()
    allc, nonec = (stats["c"] == stats["n"]).mean(), (stats["c"] == 0).mean()
    by_k = stats.groupby("k")["p"].mean()
    trend = "falls" if by_k.iloc[-1] < by_k.iloc[0] else "does not fall"
    return [
        f"{len(stats)} problems x N = {n} samples; mean correctness rate p = {stats['p'].mean():.2f}, and it {trend} "
        f"with difficulty (k = {by_k.index[0]}: {by_k.iloc[0]:.2f}, k = {by_k.index[-1]}: {by_k.iloc[-1]:.2f}).",
        f"{_pct(mixed)} of the problems are mixed (0 < p < 1) and can give pairs; {_pct(allc)} are all correct and "
        f"{_pct(nonec)} all wrong.",
        f"Mean within-problem length CV {stats['cv_tokens'].mean():.2f}: the short end of each problem's correct "
        "samples is what the later stages want.",
    ]


def seen_selection(stats: pd.DataFrame, summary: dict, alpha: float) -> list[str]:
    """Three lines about selection, honest about the selection count k at this N."""
    used = stats[stats["n_pairs"] > 0]
    n = int(stats["n"].max())
    k_gt1 = int((used["n_pos"] > 1).sum()) if len(used) else 0
    p_deep = (used["c"] / used["n"])[used["n_pos"] > 1]
    first = min_alpha_for_two(n)
    line1 = (f"{summary['n_pairs']} pairs from {summary['n_problems_used']} of {summary['n_problems']} problems; "
             f"chosen responses average {summary['mean_chosen_tokens'] or 0:.0f} tokens, rejected "
             f"{summary['mean_rejected_tokens'] or 0:.0f}.")
    if k_gt1 == 0:
        line2 = (f"At N = {n} and α = {alpha:g}, k = 1 for every problem: Q-DYN picks exactly Shortest's positives "
                 f"here (some k > 1 needs α > {first:.3g} at this N).")
    else:
        line2 = (f"At N = {n} and α = {alpha:g}, {k_gt1} of {len(used)} problems keep more than one positive "
                 f"(k up to {int(used['n_pos'].max())}, at p from {p_deep.min():.2f} to {p_deep.max():.2f}): there "
                 "Q-DYN also prefers correct responses longer than the shortest, which Shortest never does.")
    line3 = (f"Problems skipped: {summary['n_problems_skipped'].get('all_correct', 0)} all correct, "
             f"{summary['n_problems_skipped'].get('no_correct', 0)} with no correct sample, "
             f"{summary['n_problems_skipped'].get('no_longer_negative', 0)} "
             "with no wrong answer longer than a positive.")
    return [line1, line2, line3]


def min_alpha_for_two(n: int) -> float:
    """The smallest α at which some problem with N = n samples gets k ≥ 2 positives: min over c of 1 / ((1 − c/n)·c)."""
    best = math.inf
    for c in range(1, n):
        best = min(best, 1.0 / ((1 - c / n) * c))
    return best


def seen_refinement(summary: dict, n_drawn: int, n_scored: int, epsilon: float) -> list[str]:
    """Three lines about refinement, honest about how much it did."""
    acc = summary.get("acceptance_rate") or 0.0
    tb, ta = summary.get("tokens_per_step_before") or 0, summary.get("tokens_per_step_after") or 0
    sb, sa = summary.get("steps_per_response_before") or 0, summary.get("steps_per_response_after") or 0
    effect = refinement_effect(summary, n_drawn, n_scored)
    return [
        f"{n_drawn:,} candidates drawn, {n_scored:,} shorter than their step and scored; "
        f"{summary.get('n_steps_accepted', 0)} of {summary.get('n_steps', 0)} steps rewritten ({_pct(acc)}) at "
        f"ε = {epsilon:g}: {effect}.",
        f"Tokens per step {tb:.2f} -> {ta:.2f} ({100 * (ta / tb - 1) if tb else 0:+.1f}%); steps per response "
        f"{sb:.2f} -> {sa:.2f} (the paper: steps about the same, 35.1 -> 30.6 tokens per step).",
        f"Chosen responses {summary.get('mean_chosen_tokens_before') or 0:.1f} -> "
        f"{summary.get('mean_chosen_tokens_after') or 0:.1f} tokens; {summary.get('responses_reverted', 0)} refined "
        "responses were reverted because they no longer graded correct or got longer.",
    ]


def seen_training(log: pd.DataFrame) -> list[str]:
    """Three lines about DPO-L + SFT training from its log."""
    first, last = log.iloc[0], log.iloc[-1]
    tail = log.iloc[-max(1, len(log) // 10):]
    return [
        f"{len(log)} logged steps: the total loss went {first['loss']:.3f} -> {last['loss']:.3f} "
        f"(DPO-L {first['dpo_l_loss']:.3f} -> {last['dpo_l_loss']:.3f}, SFT {first['sft_loss']:.3f} -> "
        f"{last['sft_loss']:.3f}).",
        f"The reward margin β·Δ averaged {tail['rewards/margins'].mean():.2f} nats over the last 10% of steps, with "
        f"reward accuracy {tail['rewards/accuracies'].mean():.2f}: "
        + ("the model now prefers the short chosen responses." if tail["rewards/margins"].mean() > 0
           else "the model does not yet prefer the chosen responses."),
        f"The DPO-L loss starts at {first['dpo_l_loss']:.3f}, above log 2 = 0.693, because with s = -1 the length "
        "term is a margin to beat before any training.",
    ] if "dpo_l_loss" in log else [f"{len(log)} logged steps; final loss {last['loss']:.3f}.",
                                    "The log has no DPO-L term.", "See the figure."]


def seen_evaluation(head: dict, bench: str) -> list[str]:
    """Three lines about the evaluation headline, with the paper beside it."""
    d, se = head["acc_change_points"], head["acc_se_points"]
    verdict = ("within two standard errors: no accuracy lost that this sample can show" if abs(d) <= 2 * se
               else ("a real loss of accuracy" if d < 0 else "a real gain in accuracy"))
    return [
        f"{bench}: Len-T {head['len_t_base']:.1f} -> {head['len_t_trained']:.1f} tokens "
        f"({head['len_t_change_pct']:+.1f}%; the paper on MATH500: -51.3%).",
        f"Accuracy {100 * head['acc_base']:.1f} -> {100 * head['acc_trained']:.1f} ({d:+.1f} ± {se:.1f} points): "
        f"{verdict} (the paper: -0.4 on MATH500).",
        f"AUC {head['auc_base']:.3f} -> {head['auc_trained']:.3f}: "
        + ("the trained model's Acc(b) curve rises earlier." if head["auc_trained"] > head["auc_base"]
           else "no gain in accuracy within a budget."),
    ]


def seen_tldr(traj: pd.DataFrame, comparison: pd.DataFrame) -> list[str]:
    """Three lines about TLDR's run: how far its weights moved, and where it lands against the static mix."""
    tl = traj[traj["run"] == "tldr"].sort_values("step")
    w = tl["w_short"].to_numpy(dtype=float)
    lo, hi = (float(w.min()), float(w.max())) if len(w) else (0.5, 0.5)
    moved = max(abs(lo - 0.5), abs(hi - 0.5))
    span = f"{lo:.3f}" if abs(hi - lo) < 5e-4 else f"values in [{lo:.3f}, {hi:.3f}]"
    out = [f"TLDR's short-pool weight went from 0.5 to {span} over {int(tl['updated'].sum())} updates "
           + ("(it barely moved from 1/2: the dynamic and static mixtures drew about the same batches)." if moved < 0.05
              else "(it moved away from the static 1/2).")]
    if {"tldr", "static_mix"} <= set(comparison.index):
        t, s = comparison.loc["tldr"], comparison.loc["static_mix"]
        out.append(f"TLDR vs static mix: accuracy {100 * t['acc']:.1f} vs {100 * s['acc']:.1f}, Len-T "
                   f"{t['len_t']:.1f} vs {s['len_t']:.1f}: "
                   + ("about the same place." if abs(t["len_t"] - s["len_t"]) < 0.05 * s["len_t"]
                      and abs(t["acc"] - s["acc"]) < 0.02 else "a difference."))
    if {"tokensqueeze", "tldr"} <= set(comparison.index):
        t, q = comparison.loc["tldr"], comparison.loc["tokensqueeze"]
        out.append(f"TLDR vs TokenSqueeze: A.C.R. {t['acr']:.3f} vs {q['acr']:.3f}, accuracy {100 * t['acc']:.1f} vs "
                   f"{100 * q['acc']:.1f}; TLDR had the oracle's concise traces for its short pool, which "
                   "TokenSqueeze never sees.")
    while len(out) < 3:
        out.append("The comparison table has no TLDR rows yet.")
    return out[:3]


def count_scored(step_log: pd.DataFrame) -> int:
    """Candidates with a finite KL in a step log (a list per step; None or NaN where a candidate was not scored)."""
    from .plotting import _finite

    return int(sum(_finite(list(v) if v is not None else []).size for v in step_log["kl"])) if len(step_log) else 0


# --------------------------------------------------------------------------- worked examples and effect sentences
# Each helper below picks its example by a rule, or returns a sentence chosen by the run's numbers, so that a lesson
# never states an effect its own outputs contradict.


def mixed_example(stats: pd.DataFrame) -> Any:
    """The worked example of 01: a problem with 0 < p < 1 (p nearest 1/2, then the widest length spread, then the
    first id); None when no problem is mixed."""
    mixed = stats[(stats["c"] > 0) & (stats["c"] < stats["n"])]
    if mixed.empty:
        return None
    order = mixed.assign(_d=(mixed["p"] - 0.5).abs(), _cv=-mixed["cv_tokens"].fillna(0))
    return order.sort_values(["_d", "_cv", "problem_id"], kind="stable")["problem_id"].iloc[0]


def mixed_example_note(stats: pd.DataFrame, samples: pd.DataFrame, pid: Any) -> str:
    """One sentence on 01's worked example: its p and the lengths of its correct and wrong samples."""
    if pid is None:
        return (f"No problem of this run has 0 < p < 1 (all {len(stats)} are all correct or all wrong): selection "
                "(02) will find no pairs.")
    s = samples[samples["problem_id"] == pid]
    ok, bad = s.loc[s["correct"], "n_tokens"], s.loc[~s["correct"], "n_tokens"]
    def span(x: pd.Series) -> str:
        return f"{int(x.min())}" if x.min() == x.max() else f"{int(x.min())}-{int(x.max())}"

    longer = int((bad > ok.min()).sum())
    return (f"{pid}: {int(s['correct'].sum())} of {len(s)} samples correct (p = {s['correct'].mean():.3f}); correct "
            f"ones take {span(ok)} tokens, wrong ones {span(bad)}. "
            + (f"Its shortest correct sample ({int(ok.min())} tokens) is what 02 prefers to the {longer} longer wrong "
               f"one{'s' if longer > 1 else ''}." if longer else
               "No wrong sample is longer than its shortest correct one, so 02 finds no pair here."))


def all_correct_by_difficulty(stats: pd.DataFrame) -> str:
    """Where the all-correct problems (p = 1, no pairs) sit: their share per difficulty, and whether it falls."""
    share = stats.assign(all=stats["c"] == stats["n"]).groupby("k")["all"].mean()
    parts = ", ".join(f"k = {k}: {_pct(v)}" for k, v in share.items())
    if share.iloc[0] == 0 and share.iloc[-1] == 0:
        verdict = "no problem is all correct."
    elif share.iloc[0] > share.iloc[-1]:
        verdict = "easy problems pile up at p = 1 (no pairs), hard ones spread out below it."
    else:
        verdict = "the all-correct problems are not the easy ones in this run."
    return f"Share of problems with p = 1 by difficulty ({parts}): {verdict}"


def qdyn_shortest_warning(n: int, alpha: float) -> str | None:
    """A warning when N and α make Q-DYN identical to Shortest (k = 1 for every c), else None."""
    if n < 2 or alpha > min_alpha_for_two(n):
        return None
    top = alpha / min_alpha_for_two(n)  # the largest α(1 − c/N)c over c = 1..N−1 (≤ αN/4)
    return (f"Warning: at N = {n} and α = {alpha:g}, α·(1−p)·c is at most {top:.2f} ≤ 1 (α·N/4 = {alpha * n / 4:.2f}), "
            "so k = 1 for every "
            f"problem and Q-DYN selects exactly Shortest's positives. Some k ≥ 2 needs α > {min_alpha_for_two(n):.3g} "
            f"at this N, or N ≥ {_min_n_for_two(alpha)} at this α.")


def _min_n_for_two(alpha: float) -> int | str:
    """The smallest N at which α gives some problem k ≥ 2 ('no N' for α ≤ 0)."""
    if alpha <= 0:
        return "no N (α = 0 is Shortest)"
    n = 2
    while min_alpha_for_two(n) >= alpha:
        n += 1
    return n


def depth_examples(stats: pd.DataFrame) -> tuple[Any, Any]:
    """02's worked example: a problem with k ≥ 2 (the most positives, then p nearest 1/2) and a k = 1 problem with
    pairs (p nearest the first's, else the lowest p); None where the run has none."""
    used = stats[stats["n_pairs"] > 0]
    if used.empty:
        return None, None
    deep = used[used["n_pos"] >= 2]
    deep_id, target = None, None
    if len(deep):
        d = deep.assign(_k=-deep["n_pos"], _d=(deep["p"] - 0.5).abs()).sort_values(["_k", "_d", "problem_id"],
                                                                                    kind="stable").iloc[0]
        deep_id, target = d["problem_id"], float(d["p"])
    one = used[used["n_pos"] == 1]
    if one.empty:
        return deep_id, None
    key = (one["p"] - target).abs() if target is not None else one["p"]
    return deep_id, one.assign(_d=key).sort_values(["_d", "problem_id"], kind="stable")["problem_id"].iloc[0]


def depth_example_note(stats: pd.DataFrame, alpha: float) -> str:
    """One sentence on whether this run has a problem with k ≥ 2 to show beside a k = 1 one."""
    used = stats[stats["n_pairs"] > 0]
    n = int(stats["n"].max()) if len(stats) else 0
    deep = int((used["n_pos"] >= 2).sum())
    if deep:
        return (f"{deep} of {len(used)} problems with pairs keep k ≥ 2 positives at N = {n}, α = {alpha:g}: "
                "below, the one with the most positives beside a k = 1 problem of similar p.")
    return (f"This run has no problem with k ≥ 2: at N = {n} and α = {alpha:g} every one of the {len(used)} problems "
            "with pairs keeps only its shortest correct response, so Q-DYN acts here exactly as Shortest. The two "
            "problems below (highest and lowest p with pairs) both show k = 1.")


def kl_examples(step_log: pd.DataFrame, refined: pd.DataFrame, epsilon: float) -> pd.DataFrame:
    """03's worked example: one accepted candidate (the kept rewrite that saves the most tokens) and one rejected one
    (the nearest miss above ε, from the same step if it has one), each with its step and KL. Empty rows are left
    out: no accepted row when nothing was accepted."""
    from ..task.format import split_steps, step_parts
    from .plotting import _finite

    cols = ["verdict", "response_id", "step", "step_text", "step_tokens", "candidate", "cand_tokens", "kl"]
    if not len(step_log):
        return pd.DataFrame(columns=cols)
    ids = refined["problem_id"].astype(str) + "/" + refined["chosen_sample_idx"].astype(str)
    originals = dict(zip(ids, refined["chosen_original"]))

    def step_text(rid: str, i: int) -> str:
        text = originals.get(rid)
        steps = split_steps(text)[0] if text is not None else []
        return step_parts(steps[i])[0] if i < len(steps) else "?"

    rows, acc_key = [], None
    kept = step_log[step_log["accepted"].astype(bool) & ~step_log["reverted"].astype(bool)]
    if len(kept):
        a = kept.assign(_save=-(kept["orig_tokens"] - kept["new_tokens"])).sort_values(
            ["_save", "kl_chosen", "response_id", "step"], kind="stable").iloc[0]
        j = next(j for j, (t, v) in enumerate(zip(a["cand_tokens"], a["kl"]))
                 if t == a["new_tokens"] and v == a["kl_chosen"])
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


def refinement_effect(summary: dict, n_drawn: int, n_scored: int) -> str:
    """Whether refinement acted in this run and, if it did not, why (from the candidate counts)."""
    acc = summary.get("acceptance_rate") or 0.0
    tb, ta = summary.get("tokens_per_step_before") or 0, summary.get("tokens_per_step_after") or 0
    change = (ta / tb - 1) if tb else 0.0
    if n_scored == 0:
        return ("refinement did not act: no candidate was shorter than its step, so none could be kept")
    if acc < 0.05:
        return (f"refinement barely acts in this run: only {n_scored:,} of {n_drawn:,} candidates "
                f"({_pct(n_scored / n_drawn) if n_drawn else '0%'}) were shorter than their step"
                + (" (the model rarely re-words a step of these responses more briefly)"
                   if n_drawn and n_scored < 0.05 * n_drawn else "")
                + f", and only {summary.get('n_steps_accepted', 0)} steps had one under ε")
    if change <= -0.05:
        return f"refinement shortens steps here: tokens per step {100 * change:+.1f}%"
    return f"a visible share of the steps is rewritten, but tokens per step change only {100 * change:+.1f}%"
