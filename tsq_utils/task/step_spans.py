"""Steps as token spans of the model's own tokenization of a whole response.

Tokenizing a response step by step is not what the model sees: Qwen's BPE merges punctuation with the blank line
after it (".\\n\\n" is one token), so segment-wise ids differ from the whole text's at almost every step boundary.
Here the response is tokenized once and each step (its body and its separator) is the run of tokens that start
inside it: the step's last token is the one that holds the end of its blank line (the boundary token), and the
ids of the prefix, the step and the continuation are slices of the one tokenization.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence


@dataclass
class StepSpans:
    """Token ranges [start, end) of each step (body and separator) and of the tail, over the whole text's ids."""

    spans: list[tuple[int, int]]
    tail: tuple[int, int]
    aligned: list[bool]  # the step's first token starts at the step's first character (no token crosses into it)
    suffixes: list[str]  # text of the step's span after its body: its separator, and more if a token crosses out


def encode_with_starts(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Token ids of a text (no special tokens added) and the character offset at which each token starts (a fast
    tokenizer: the offsets come from its offset mapping)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [int(a) for a, _ in enc["offset_mapping"]]


def step_spans(steps: Sequence[str], tail: str, bodies: Sequence[str], token_starts: Sequence[int]) -> StepSpans:
    """Assign each token of the whole text (steps joined, then the tail) to the step or tail where it starts."""
    if len(bodies) != len(steps) or any(not s.startswith(b) for s, b in zip(steps, bodies)):
        raise ValueError("bodies must be the steps' leading parts, one per step")
    starts = list(token_starts)
    if any(b < a for a, b in zip(starts, starts[1:])):
        raise ValueError("token start offsets must not decrease")
    bounds, pos = [], 0
    for s in steps:
        bounds.append(pos)
        pos += len(s)
    text_len = pos + len(tail)
    # token index of the first token starting at or after each step start, and at the tail
    first = [bisect.bisect_left(starts, c) for c in bounds + [pos]]
    spans = [(first[i], first[i + 1]) for i in range(len(steps))]
    whole = "".join(steps) + tail
    aligned, suffixes = [], []
    for i, (a, b) in enumerate(spans):
        aligned.append(a < b and starts[a] == bounds[i])
        end = starts[b] if b < len(starts) else text_len  # a span's last token ends where the next one starts
        # the step's text, plus the start of what follows when its last token crosses out of it
        suffixes.append(whole[bounds[i]:max(end, bounds[i] + len(steps[i]))][len(bodies[i]):])
    return StepSpans(spans=spans, tail=(first[-1], len(starts)), aligned=aligned, suffixes=suffixes)
