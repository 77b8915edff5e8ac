"""The think/answer format of a completion and its steps: one definition for every task, model and method.

A completion is ``<thinking steps> </think> <answer>``: the prompt ends with ``<think>\\n`` and the model closes the
thinking block itself. The thinking part is split into steps on blank lines (refinement rewrites steps one by one).

Step splitting rules (the ones KL refinement has always used; changing them changes results):
- ``split_steps`` keeps each step's trailing separator (the run of blank lines after it) in the step string, so
  ``"".join(steps) + tail`` is the original text byte for byte.
- A blank line is a newline followed by one or more lines holding only spaces, tabs or CRs.
- Blank lines at the very start of the thinking part belong to the first step.
- The thinking part ends at the first ``</think>``; whitespace just before it goes to the tail, which is never
  rewritten. A text without ``</think>`` is all thinking, with an empty tail.

One rule for a response that never writes ``</think>`` (docs/method.md, "An unclosed </think>"): its thinking never
closed, so all of it is thinking (thinking_part: token counts, steps, refinement); its answer is read where the common
harnesses read it, anywhere in the text (answer_part: the last complete box of the whole output is graded). A response
cut off at the token limit never counts as correct whatever its box says (stage 01's finish_reason rule).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# What the toy teacher writes between steps; the splitter accepts any blank line (STEP_SEP_RE).
STEP_SEP = "\n\n"
# A blank line: a newline followed by one or more lines that hold only spaces, tabs or CRs.
STEP_SEP_RE = re.compile(r"\n(?:[ \t\r]*\n)+")
_STEP_PARTS_RE = re.compile(r"(.*?)((?:\n(?:[ \t\r]*\n)+)?)\Z", re.DOTALL)
# Where a sampled re-generation of one step stops: the end of the step, or the end of the thinking part.
STEP_STOP_STRINGS = (STEP_SEP, THINK_CLOSE)


def split_steps(text: str) -> tuple[list[str], str]:
    """The thinking part's steps (each with its trailing separator) and the untouched tail from '</think>' on."""
    if not isinstance(text, str):
        raise ValueError(f"split_steps needs a str, got {type(text).__name__}")
    cut = text.find(THINK_CLOSE)
    think = text if cut < 0 else text[:cut].rstrip()
    tail = text[len(think):]
    steps, start = [], 0
    for m in STEP_SEP_RE.finditer(think):
        if m.start() == 0:  # blank lines before any content stay with the first step
            continue
        steps.append(think[start:m.end()])
        start = m.end()
    if start < len(think):
        steps.append(think[start:])
    return steps, tail


def join_steps(steps: Sequence[str], tail: str = "") -> str:
    """Reassemble steps (with their separators) and the tail into the text."""
    if isinstance(steps, str) or not all(isinstance(s, str) for s in steps) or not isinstance(tail, str):
        raise ValueError("join_steps needs a list of str steps and a str tail")
    return "".join(steps) + tail


def step_parts(step: str) -> tuple[str, str]:
    """A step string split into its body and its trailing separator ('' when none)."""
    m = _STEP_PARTS_RE.match(step)
    return m.group(1), m.group(2)


def step_bodies(text: str) -> list[str]:
    """The non-empty step bodies of a text's thinking part (what count_steps counts)."""
    return [body for body in (step_parts(s)[0] for s in split_steps(text)[0]) if body.strip()]


def count_steps(text: str) -> int:
    """Number of steps with a non-empty body in the thinking part of a text."""
    return len(step_bodies(text))


def clean_candidate(text: str) -> str:
    """A sampled step cut at the first blank line or '</think>', without trailing whitespace."""
    text = text.split(THINK_CLOSE, 1)[0]
    m = STEP_SEP_RE.search(text)
    if m is not None:
        text = text[:m.start()]
    return text.rstrip()


def thinking_part(text: str) -> str:
    """Everything before the first '</think>' (the whole text when it never closes)."""
    cut = text.find(THINK_CLOSE)
    return text if cut < 0 else text[:cut]


def answer_part(text: str) -> str:
    """Where the answer is read: everything after the first '</think>' (the whole text when it never closes)."""
    cut = text.find(THINK_CLOSE)
    return text if cut < 0 else text[cut + len(THINK_CLOSE):]


def thinking_closed(text: str) -> bool:
    """Whether the text closes its thinking part with '</think>'."""
    return THINK_CLOSE in text


def format_steps(text: str, max_steps: int = 24) -> str:
    """The steps of a completion (as split_steps splits them), the first max_steps of them, then its answer."""
    bodies = step_bodies(text)
    lines = [f"step {i}: {body.strip(chr(10))}" for i, body in enumerate(bodies[:max_steps])]
    if len(bodies) > max_steps:
        lines.append(f"... ({len(bodies) - max_steps} more steps)")
    if thinking_closed(text):
        lines.append(f"answer: {answer_part(text).strip()}")
    else:  # graded all the same: its answer is read from the whole text (answer_part)
        lines.append(f"(no {THINK_CLOSE}: the thinking did not finish; the answer is read from the whole text)")
    return "\n".join(lines)


def print_steps(text: str, max_steps: int = 24) -> None:
    """Print the thinking steps of a completion, the first max_steps of them, then its answer."""
    print(format_steps(text, max_steps))
