"""Step plans: a response cut into steps with their token ids, records and refinement jobs, and its reassembly."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable

from ...core.config import RefinementConfig
from ...model.generation import count_tokens
from ...task.format import join_steps, split_steps, step_parts
from ...task.step_spans import encode_with_starts, step_spans

# Extra sampled tokens allowed beyond the original step's length: the stop string ("\n\n") and
# any token boundary shifts must fit, or a candidate shorter than the original would be cut.
STOP_SLACK_TOKENS = 8
# How steps are cut (the profile's refinement.steps choices: core/config.py is their one home)
STEP_MODES = next(f.metadata["choices"] for f in fields(RefinementConfig) if f.name == "steps")


@dataclass
class StepRecord:
    """What happened to one step of the thinking part."""

    response_id: str
    step: int
    orig_tokens: int
    n_sampled: int = 0
    n_dropped: int = 0  # empty candidates and ones that hit the token limit
    cand_tokens: list[int] = field(default_factory=list)  # distinct kept candidates
    cand_texts: list[str] = field(default_factory=list)  # their texts, in the same order
    kl: list[float] = field(default_factory=list)  # NaN where not scored (not shorter than the original)
    kl_bound: list[bool] = field(default_factory=list)  # True where kl is only a lower bound (rejected early)
    accepted: bool = False
    new_tokens: int = 0  # tokens of the step that was kept (the original's when not accepted)
    kl_chosen: float = float("nan")
    skipped: str = ""  # "", "too_short" (one token) or "no_continuation"


@dataclass
class RefineResult:
    """A refined response: the final text, the per-step records and whether it was reverted."""

    text: str
    original_text: str
    proposed_text: str  # the reassembled refinement, before any revert
    steps: list[StepRecord]
    n_tokens_original: int
    n_tokens: int
    reverted: bool = False
    revert_reason: str = ""  # "", "grade" or "longer"

    @property
    def n_accepted(self) -> int:
        """Steps whose refinement was accepted (before any revert)."""
        return sum(r.accepted for r in self.steps)


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added (empty text -> [])."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


@dataclass
class StepJob:
    """A step whose candidates are drawn and scored: its record, its sampling limit and its candidates."""

    rec: StepRecord
    max_new_tokens: int  # this step's own sampling limit
    cands: list[str] = field(default_factory=list)  # distinct cleaned candidates, in sampling order


@dataclass
class StepPlan:
    """One response prepared for refinement: its steps and their segment-wise ids, records and jobs.

    Prefixes and continuation windows are derived on demand, so a plan holds the response once rather
    than once per step (many responses are planned before any is scored).
    """

    prompt: str
    text: str
    steps: list[str]
    seps: list[str]
    tail: str
    prompt_ids: list[int]
    body_ids: list[list[int]]
    sep_ids: list[list[int]]
    tail_ids: list[int]
    records: list[StepRecord] = field(default_factory=list)  # one per step with a non-blank body
    response_id: str = ""
    # Text appended to a candidate before it is tokenized: "" for segment-wise steps; for token-span steps the
    # rest of the step's span (its separator), so a candidate ends in the boundary token the model would write.
    cand_suffix: list[str] = field(default_factory=list)
    jobs: dict[int, StepJob] = field(default_factory=dict)  # step index -> job (steps neither blank nor skipped)

    def prefix_text(self, i: int) -> str:
        """The prompt and the original steps before step i: the text the sampler continues."""
        return self.prompt + "".join(self.steps[:i])

    def prefix_ids(self, i: int) -> list[int]:
        """Segment-wise ids of the same prefix: what the KL is conditioned on."""
        ids = list(self.prompt_ids)
        for j in range(i):
            ids += self.body_ids[j] + self.sep_ids[j]
        return ids

    def all_ids(self) -> list[int]:
        """Segment-wise ids of the prompt and the whole response."""
        return self.prefix_ids(len(self.steps)) + list(self.tail_ids)

    def cont_ids(self, i: int, window: int) -> list[int]:
        """The first `window` original tokens after step i's body (its separator, later steps, the tail)."""
        ids: list[int] = list(self.sep_ids[i])
        for j in range(i + 1, len(self.steps)):
            if len(ids) >= window:
                break
            ids += self.body_ids[j] + self.sep_ids[j]
        return (ids + self.tail_ids)[:window]



def plan_response(tokenizer, prompt: str, text: str, cfg: RefinementConfig, response_id: str = "",
                  cap_to_original: bool = True) -> StepPlan:
    """Split a response into steps, make their records, and a job for every step that can be refined."""
    window, max_step_tokens, steps_mode = cfg.window, cfg.max_step_tokens, cfg.steps
    if not isinstance(prompt, str) or not isinstance(text, str):
        raise ValueError("prompt and text must be str")
    if steps_mode not in STEP_MODES:
        raise ValueError(f"steps must be one of {STEP_MODES}, got {steps_mode!r}")
    steps, tail = split_steps(text)
    parts = [step_parts(s) for s in steps]
    aligned = [True] * len(steps)
    if steps_mode == "segments":
        # Segment-wise ids: prompt, then body/separator of every step, then the tail (see the module doc).
        segs = _token_ids(tokenizer, [prompt] + [x for p in parts for x in p] + [tail])
        plan = StepPlan(prompt=prompt, text=text, steps=steps, seps=[sep for _, sep in parts], tail=tail,
                     prompt_ids=segs[0], body_ids=segs[1:-1:2], sep_ids=segs[2:-1:2], tail_ids=segs[-1],
                     response_id=response_id, cand_suffix=[""] * len(steps))
    else:
        # Token spans of the whole response's tokenization (step_spans): a step's ids end with its boundary token.
        ids, starts = encode_with_starts(tokenizer, text)
        sp = step_spans(steps, tail, [b for b, _ in parts], starts)
        aligned = sp.aligned
        plan = StepPlan(prompt=prompt, text=text, steps=steps, seps=[sep for _, sep in parts], tail=tail,
                     prompt_ids=_token_ids(tokenizer, [prompt])[0], body_ids=[ids[a:b] for a, b in sp.spans],
                     sep_ids=[[] for _ in steps], tail_ids=ids[sp.tail[0]:sp.tail[1]], response_id=response_id,
                     cand_suffix=sp.suffixes)
    for i, (body, _) in enumerate(parts):
        if not body.strip():
            continue  # only blank lines: nothing to refine (and not counted as a step)
        rec = StepRecord(response_id=response_id, step=i, orig_tokens=len(plan.body_ids[i]))
        rec.new_tokens = rec.orig_tokens
        plan.records.append(rec)
        if not aligned[i]:
            rec.skipped = "boundary_merge"  # a token of the previous step runs into this one: no clean cut
        elif rec.orig_tokens <= 1:
            rec.skipped = "too_short"
        elif not plan.cont_ids(i, window):
            rec.skipped = "no_continuation"
        else:
            max_new = (min(max_step_tokens, rec.orig_tokens + STOP_SLACK_TOKENS) if cap_to_original
                       else max_step_tokens)
            plan.jobs[i] = StepJob(rec=rec, max_new_tokens=max_new)
    return plan


def step_ids(tokenizer, prompt: str, text: str, step: int, window: int) -> dict[str, list[int]]:
    """The token ids the windowed KL of one step compares: its prefix, the original step and the continuation."""
    plan = plan_response(tokenizer, prompt, text, RefinementConfig(window=window, max_step_tokens=1), "lesson")
    if not 0 <= step < len(plan.steps):
        raise ValueError(f"step {step} out of range: the response has {len(plan.steps)} steps")
    return {"prefix_ids": plan.prefix_ids(step), "step_ids": list(plan.body_ids[step]),
            "cont_ids": plan.cont_ids(step, window)}


def assemble(tokenizer, plan: StepPlan, chosen: dict[int, str], grade_fn: Callable[[str], bool] | None) -> RefineResult:
    """Put the accepted steps back into the text; revert to the original if it no longer grades or got longer."""
    new_steps = list(plan.steps)
    for i, cand in chosen.items():
        new_steps[i] = cand + plan.seps[i]
    proposed = join_steps(new_steps, plan.tail)
    n_orig = count_tokens(tokenizer, plan.text)
    result = RefineResult(text=proposed, original_text=plan.text, proposed_text=proposed, steps=plan.records,
                          n_tokens_original=n_orig, n_tokens=count_tokens(tokenizer, proposed))
    if proposed != plan.text:
        if grade_fn is not None and not grade_fn(proposed):
            result.revert_reason = "grade"
        elif result.n_tokens > n_orig:
            result.revert_reason = "longer"
        if result.revert_reason:
            result.text, result.n_tokens, result.reverted = plan.text, n_orig, True
    return result
