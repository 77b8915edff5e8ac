"""Whether a trace's steps are right, not only its answer: every chain equation it writes ("14-1=13", "5+6-3=8") is
checked, so that a lesson can show correct derivations and count the lucky traces (answer right, some step wrong)
that answer-only grading rewards."""

from __future__ import annotations

import re

import pandas as pd

from ..task.format import split_steps, step_parts

# a chain of integer additions and subtractions and its claimed value, as the toy world's steps write them
EQUATION = re.compile(r"(?<![\d.])(-?\d+(?:\s*[+-]\s*\d+)+)\s*=\s*(-?\d+)(?!\d|\.\d)")


def _equations(part: str) -> list[tuple[str, str, bool]]:
    """(equation, left side without spaces, whether it is right) for each equation of a piece of text, in order."""
    out = []
    for m in EQUATION.finditer(part):
        lhs = m.group(1).replace(" ", "")
        out.append((m.group(0), lhs, sum(int(t) for t in re.findall(r"[+-]?\d+", lhs)) == int(m.group(2))))
    return out


def _wrong_in(part: str) -> list[str]:
    """The equations of a piece of text whose arithmetic is wrong, in order."""
    return [eq for eq, _, ok in _equations(part) if not ok]


def wrong_equations(text: str) -> list[str]:
    """The equations of a trace's thinking part whose arithmetic is wrong ("5-5=-1"), in order."""
    return _wrong_in("".join(split_steps(text)[0])) if isinstance(text, str) else []


def uncorrected_errors(text: str) -> list[str]:
    """The wrong equations no later step corrects: a later right equation with the same left side (a check) or over
    more than two terms (the closing review of the whole chain) counts as a correction."""
    eqs = _equations("".join(split_steps(text)[0])) if isinstance(text, str) else []
    return [eq for i, (eq, lhs, ok) in enumerate(eqs)
            if not ok and not any(ok2 and (lhs2 == lhs or len(re.findall(r"\d+", lhs2)) > 2)
                                  for _, lhs2, ok2 in eqs[i + 1:])]


def arithmetic_ok(piece: str) -> bool:
    """True when no equation in a piece of text (a step, a candidate rewrite) is wrong."""
    return not _wrong_in(piece)


def derivation_ok(text: str) -> bool:
    """True when every equation of the trace's thinking part is right (a trace with none is not refuted)."""
    return not wrong_equations(text)


def wrong_steps(text: str) -> list[int]:
    """The indices of the steps holding a wrong equation."""
    return [i for i, s in enumerate(split_steps(text)[0]) if _wrong_in(step_parts(s)[0])]


def lucky_counts(samples: pd.DataFrame, refined: pd.DataFrame) -> dict:
    """Lucky traces (graded correct, a wrong step nothing corrects) among 01's correct samples and 03's chosen
    responses."""
    def lucky(text: str) -> bool:
        return bool(uncorrected_errors(text))

    correct = samples.loc[samples["correct"].astype(bool), "text"]
    chosen = refined.drop_duplicates("chosen_original")["chosen_original"]
    lucky_chosen = chosen[chosen.map(lucky)]
    return {"n_correct": len(correct), "n_lucky": int(correct.map(lucky).sum()),
            "n_chosen": len(chosen), "n_lucky_chosen": len(lucky_chosen),
            "example": lucky_chosen.iloc[0] if len(lucky_chosen) else None}


def lucky_note(counts: dict) -> str:
    """A short paragraph on this run's lucky traces, from lucky_counts()."""
    n, k = counts["n_correct"], counts["n_lucky"]
    if not n:
        return "No sample of this run graded correct, so there is no lucky trace to count."
    head = (f"**Lucky traces.** Of this run's {n:,} samples graded correct, {k:,} ({100 * k / n:.1f}%) are lucky: the "
            "final answer is right but a step's arithmetic is wrong and no later check or review corrects it (slips "
            f"that cancel, or a wrong total the next steps happen to undo). Of the {counts['n_chosen']:,} distinct "
            f"chosen responses that 03 refines, {counts['n_lucky_chosen']:,} are lucky.")
    if counts["example"] is not None:
        head += f" One of them writes {', '.join(uncorrected_errors(counts['example'])[:3])}."
    return head + (" Grading only the answer rewards them like sound derivations, and selection (02) may even prefer "
                   "them, since skipping a check makes a trace short; the worked examples below are chosen among the "
                   "correct derivations only.")
