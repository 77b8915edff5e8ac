"""KL-constrained intra-step refinement (TokenSqueeze §3.2, App. B): shorter steps, same continuation distribution.

A chosen response's thinking part is split into steps on blank lines. For each step i the same
model samples K re-generations of that step from the original prefix (prompt, s_1..s_{i-1}); the
shortest candidate s' that is shorter than s_i and satisfies

    D_KL( P(. | prefix, s_i, cont_<t) || P(. | prefix, s', cont_<t) ) < epsilon

is kept, where the KL is taken over the full vocabulary at each of the next L original tokens
after the step (teacher-forced under both contexts, original context first) and reduced by a
per-token mean (default) or a sum over that window.

Choices made here (documented in notebook 03):
- Steps. ``split_steps`` keeps each step's trailing separator (the run of blank lines after it) in
  the step string, so ``"".join(steps) + tail`` is the original text byte for byte. A blank line is
  a newline followed by one or more lines holding only spaces/tabs/CR. Blank lines at the very
  start of the thinking part belong to the first step. The thinking part ends at the first
  "</think>"; whitespace just before it goes to the tail, which is never rewritten.
- Which predictions are compared. The distribution that predicts continuation token j sits at the
  position of the token before it, so the window holds the predictions of continuation tokens
  0..L-1: the first is made at the step's last token (a different token in each context), the
  rest at continuation tokens 0..L-2 (the same tokens, at positions shifted by the length
  difference of the steps).
- Tokenization. The prompt, each step body, each separator and the tail are tokenized separately
  (no special tokens added) and their ids concatenated; a candidate replaces only the step body's
  ids. Original and candidate contexts therefore share exactly the same prefix and continuation
  ids. Caveat: ids of a segment-wise tokenization can differ from those of the whole text where a
  BPE merge would cross a segment boundary (the sampler, which tokenizes the prefix text whole,
  can see slightly different ids). Both contexts get the same treatment, so the KL compares like
  with like. Token counts of steps and candidates are counts of this segment tokenization; whole
  response counts (``n_tokens``, ``chosen_tokens``) tokenize the whole completion text.
- Candidates are cut at the first blank line or "</think>" and stripped of trailing whitespace;
  empty ones and ones that hit the token limit are dropped, duplicates are scored once. With
  ``cap_to_original`` (default) sampling stops at the original step's length plus a few tokens
  for the stop string, and only candidates shorter than the original are scored (the others can
  never be kept; their KL is recorded as NaN). Ties in length go to the lower KL.
- A step with no continuation (the last step of a text with no "</think>" and no trailing blank
  line) or with one token (nothing shorter exists) is kept as is and logged as skipped.
- After reassembly the response is reverted to the original when ``grade_fn`` says the refined text
  is no longer correct (``revert_reason="grade"``) or when the whole refined text tokenizes longer
  than the original (``"longer"``, a guard against boundary merges; steps are only ever shortened).
- Sampling in bulk. Refinement runs in two phases: the candidates of every step of every response
  being refined are drawn in one ``sample`` call (``sample_batch_size`` rows per generate call; the
  sampler groups rows of similar prefix length), then each step's candidates are scored and the
  responses reassembled. (Past ``MAX_STEPS_PER_CALL`` steps, consecutive responses are split into
  several such calls, to bound memory.) A call runs to the largest token limit among its steps; a
  step then drops the samples whose text reaches its own limit, as a call with that limit would
  have cut them ("length"). The limit is judged on the token count of the sampled text, so it can
  differ by a token from a per-step call where the model's tokenization is not canonical or a stop
  string shares a token with text; only candidates at least as long as the original step are
  affected, and those are never kept. Seeds: each call's sampler seed is derived from ``seed`` and
  the call's number alone, and the sampler draws one random stream per batch of rows, so a step's
  candidates depend on the whole batch composition: the same responses (in the same order), seed
  and batch sizes give the same result, but refining a response alone or among others gives
  different candidates (from the same distribution).
- KV cache: the shared prefix (all but its last token) is run once; its cache is copied and
  repeated across each batch of rows (original + candidates), which then run only
  [last prefix token, step, continuation window], right-padded, with explicit positions.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from .config import RefinementConfig, stage_seed
from .generation import count_tokens, sample

THINK_CLOSE = "</think>"
STOP_STRINGS = ["\n\n", THINK_CLOSE]
# A blank line: a newline followed by one or more lines that hold only spaces, tabs or CRs.
STEP_SEP_RE = re.compile(r"\n(?:[ \t\r]*\n)+")
_STEP_PARTS_RE = re.compile(r"(.*?)((?:\n(?:[ \t\r]*\n)+)?)\Z", re.DOTALL)
# Extra sampled tokens allowed beyond the original step's length: the stop string ("\n\n") and
# any token boundary shifts must fit, or a candidate shorter than the original would be cut.
STOP_SLACK_TOKENS = 8
# Elements of one float32 [rows, positions, vocab] slice of the KL computation (about 1 GiB).
_KL_SLICE_ELEMENTS = 2**28
# Rows per generate call when the candidates of many steps are drawn together (a RefinementConfig with a
# sample_batch_size field overrides it). On one CPU thread the toy reasoner's generation is compute-bound, not
# overhead-bound: 64 rows was as fast as or faster than 16, 128 and 256 (more rows mean more padding and more
# decoding steps run to the largest token limit); a GPU wants far larger batches.
SAMPLE_BATCH_SIZE = 64
# Steps whose candidates one sampler call draws at most (responses are never split between calls): bounds the
# prefix texts and samples held at once; the toy profile's 200-400 responses fit in one call.
MAX_STEPS_PER_CALL = 4096
REDUCTIONS = ("mean", "sum")
STEP_LOG_COLUMNS = (
    "response_id", "problem_id", "step", "orig_tokens", "n_sampled", "n_dropped", "cand_tokens", "kl",
    "accepted", "new_tokens", "kl_chosen", "skipped", "reverted", "final_tokens", "cand_texts",
)


# --------------------------------------------------------------------------- steps


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


def count_steps(text: str) -> int:
    """Number of steps with a non-empty body in the thinking part of a text."""
    return sum(1 for s in split_steps(text)[0] if step_parts(s)[0].strip())


def clean_candidate(text: str) -> str:
    """A sampled step cut at the first blank line or '</think>', without trailing whitespace."""
    text = text.split(THINK_CLOSE, 1)[0]
    m = STEP_SEP_RE.search(text)
    if m is not None:
        text = text[:m.start()]
    return text.rstrip()


# --------------------------------------------------------------------------- windowed KL


def _as_ids(ids: Sequence[int], name: str) -> list[int]:
    """A list of ints, or a ValueError naming the argument."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{name} must be a sequence of token ids (ints)")
    return list(ids)


def _model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters."""
    return next(model.parameters()).device


def _prefix_cache(model: torch.nn.Module, ids: list[int], device: torch.device):
    """The KV cache of a batch-1 forward pass over ids."""
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
    return out.cache


def _chunk_window_logits(model: torch.nn.Module, rows: list[list[int]], starts: list[int], n_window: int,
                         n_cached: int, cache, device: torch.device) -> torch.Tensor:
    """Model logits at positions starts[r] .. starts[r]+n_window-1 of each (right-padded) row: [B, L, V]."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)  # pad id is arbitrary: masked out
    mask = torch.zeros(len(rows), n_cached + width, dtype=torch.long, device=device)
    mask[:, :n_cached] = 1
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row, device=device)
        mask[b, n_cached:n_cached + len(row)] = 1
    # Right padding: real tokens keep their true positions; pads only ever come after them.
    positions = (n_cached + torch.arange(width, device=device)).expand(len(rows), width)
    gather = torch.tensor(starts, device=device)[:, None] + torch.arange(n_window, device=device)[None, :]
    batch_cache = None
    if cache is not None:
        batch_cache = copy.deepcopy(cache)  # the forward pass appends to it; keep the prefix cache intact
        batch_cache.batch_repeat_interleave(len(rows))
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=batch_cache,
                use_cache=cache is not None, logits_to_keep=gather)
    return out.logits  # [B, L, V], model dtype


def _kl_rows(orig_logp: torch.Tensor, cand_logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(orig || cand) in float32, [B, L], sliced over positions to bound memory."""
    b, n, v = cand_logits.shape
    step = max(1, _KL_SLICE_ELEMENTS // max(1, b * v))
    out = []
    for s in range(0, n, step):
        logp_c = F.log_softmax(cand_logits[:, s:s + step].float(), dim=-1)
        logp_o = orig_logp[None, s:s + step]
        out.append(F.kl_div(logp_c, logp_o.expand_as(logp_c), reduction="none", log_target=True).sum(-1))
    return torch.cat(out, dim=1)


def kl_window(model: torch.nn.Module, prefix_ids: Sequence[int], orig_step_ids: Sequence[int],
              cand_ids_list: Sequence[Sequence[int]], cont_ids: Sequence[int], reduction: str = "mean",
              batch_size: int = 16, use_prefix_cache: bool = True) -> torch.Tensor:
    """KL(P(.|prefix, step, cont_<t) || P(.|prefix, cand, cont_<t)) over the window cont, reduced per candidate: [K]."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prefix = _as_ids(prefix_ids, "prefix_ids")
    orig = _as_ids(orig_step_ids, "orig_step_ids")
    cont = _as_ids(cont_ids, "cont_ids")
    if isinstance(cand_ids_list, (str, bytes)) or len(cand_ids_list) == 0:
        raise ValueError("cand_ids_list must hold at least one candidate (a list of token ids)")
    cands = [_as_ids(c, f"cand_ids_list[{i}]") for i, c in enumerate(cand_ids_list)]
    if not cont:
        raise ValueError("cont_ids is empty: there is no continuation window to compare the two contexts on")
    steps = [orig] + cands
    if not prefix and any(len(s) == 0 for s in steps):
        raise ValueError("an empty step with an empty prefix: no token predicts the first continuation token")
    device = _model_device(model)
    # Cache all of the prefix but its last token, so every row holds the token that predicts cont[0]
    # even when its step is empty.
    n_cached = len(prefix) - 1 if use_prefix_cache and len(prefix) >= 2 else 0
    head = prefix[n_cached:]
    rows = [head + s + cont for s in steps]
    starts = [len(head) + len(s) - 1 for s in steps]  # row index of the token that predicts cont[0]
    n_window = len(cont)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            cache = _prefix_cache(model, prefix[:n_cached], device) if n_cached else None
            kl_rows, orig_logp = [], None
            for lo in range(0, len(rows), batch_size):
                logits = _chunk_window_logits(model, rows[lo:lo + batch_size], starts[lo:lo + batch_size],
                                              n_window, n_cached, cache, device)
                if orig_logp is None:  # row 0 of the first chunk is the original context
                    orig_logp = F.log_softmax(logits[0].float(), dim=-1)
                    logits = logits[1:]
                if len(logits):
                    kl_rows.append(_kl_rows(orig_logp, logits))
    finally:
        model.train(was_training)
    per_token = torch.cat(kl_rows, dim=0)  # [K, L]
    total = per_token.sum(dim=1)
    return (total / n_window if reduction == "mean" else total).cpu()


# --------------------------------------------------------------------------- one response


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


def _validate_refine_args(n_candidates: int, window: int, epsilon: float, reduction: str, temperature: float,
                          max_step_tokens: int, batch_size: int, sample_batch_size: int) -> None:
    for name, value, lo in (("n_candidates", n_candidates, 1), ("window", window, 1),
                            ("max_step_tokens", max_step_tokens, 1), ("batch_size", batch_size, 1),
                            ("sample_batch_size", sample_batch_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    if not (isinstance(epsilon, (int, float)) and epsilon >= 0 and not math.isnan(epsilon)):
        raise ValueError(f"epsilon must be a number >= 0, got {epsilon!r}")
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


@dataclass
class _StepJob:
    """A step whose candidates are drawn and scored: its record, its sampling limit and its candidates."""

    rec: StepRecord
    max_new_tokens: int  # this step's own sampling limit
    cands: list[str] = field(default_factory=list)  # distinct cleaned candidates, in sampling order


@dataclass
class _Plan:
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
    jobs: dict[int, _StepJob] = field(default_factory=dict)  # step index -> job (steps neither blank nor skipped)

    def prefix_text(self, i: int) -> str:
        """The prompt and the original steps before step i: the text the sampler continues."""
        return self.prompt + "".join(self.steps[:i])

    def prefix_ids(self, i: int) -> list[int]:
        """Segment-wise ids of the same prefix: what the KL is conditioned on."""
        ids = list(self.prompt_ids)
        for j in range(i):
            ids += self.body_ids[j] + self.sep_ids[j]
        return ids

    def cont_ids(self, i: int, window: int) -> list[int]:
        """The first `window` original tokens after step i's body (its separator, later steps, the tail)."""
        ids: list[int] = list(self.sep_ids[i])
        for j in range(i + 1, len(self.steps)):
            if len(ids) >= window:
                break
            ids += self.body_ids[j] + self.sep_ids[j]
        return (ids + self.tail_ids)[:window]


def _plan_response(tokenizer, prompt: str, text: str, window: int, max_step_tokens: int, cap_to_original: bool,
                   response_id: str) -> _Plan:
    """Split a response into steps, make their records, and a job for every step that can be refined."""
    if not isinstance(prompt, str) or not isinstance(text, str):
        raise ValueError("prompt and text must be str")
    steps, tail = split_steps(text)
    parts = [step_parts(s) for s in steps]
    # Segment-wise ids: prompt, then body/separator of every step, then the tail (see the module doc).
    segs = _token_ids(tokenizer, [prompt] + [x for p in parts for x in p] + [tail])
    plan = _Plan(prompt=prompt, text=text, steps=steps, seps=[sep for _, sep in parts], tail=tail,
                 prompt_ids=segs[0], body_ids=segs[1:-1:2], sep_ids=segs[2:-1:2], tail_ids=segs[-1])
    for i, (body, _) in enumerate(parts):
        if not body.strip():
            continue  # only blank lines: nothing to refine (and not counted as a step)
        rec = StepRecord(response_id=response_id, step=i, orig_tokens=len(plan.body_ids[i]))
        rec.new_tokens = rec.orig_tokens
        plan.records.append(rec)
        if rec.orig_tokens <= 1:
            rec.skipped = "too_short"
        elif not plan.cont_ids(i, window):
            rec.skipped = "no_continuation"
        else:
            max_new = (min(max_step_tokens, rec.orig_tokens + STOP_SLACK_TOKENS) if cap_to_original
                       else max_step_tokens)
            plan.jobs[i] = _StepJob(rec=rec, max_new_tokens=max_new)
    return plan


def _draw_candidates(model, tokenizer, plans: list[_Plan], n: int, temperature: float, seed: int,
                     batch_size: int, progress: bool) -> None:
    """Draw n candidates for every job of the plans in one sampler call; fill the jobs and their records' counts."""
    where = [(plan, i) for plan in plans for i in plan.jobs]
    if not where:
        return
    jobs = [plan.jobs[i] for plan, i in where]
    # One call runs to the largest limit among the steps; a step then drops the samples that reach its own
    # limit, which a call with that limit would have cut and reported as "length".
    res = sample(model, tokenizer, [plan.prefix_text(i) for plan, i in where], n=n, temperature=temperature,
                 max_new_tokens=max(j.max_new_tokens for j in jobs), seed=seed, stop=list(STOP_STRINGS),
                 batch_size=batch_size, progress=progress)
    if len(res.texts) != len(jobs):
        raise ValueError(f"the sampler returned {len(res.texts)} rows of samples for {len(jobs)} prefixes")
    for job, texts, n_toks, reasons in zip(jobs, res.texts, res.n_tokens, res.finish_reasons):
        kept, dropped = [], 0
        for text, n_tok, reason in zip(texts, n_toks, reasons):
            cand = clean_candidate(text)
            if reason == "length" or n_tok >= job.max_new_tokens or not cand:
                dropped += 1
            elif cand not in kept:
                kept.append(cand)
        job.cands, job.rec.n_sampled, job.rec.n_dropped = kept, n, dropped


def _score_job(model, tokenizer, plan: _Plan, i: int, window: int, epsilon: float, reduction: str,
               batch_size: int, cap_to_original: bool) -> str | None:
    """Score step i's candidates by the windowed KL, fill its record; return the accepted candidate or None."""
    job = plan.jobs[i]
    rec = job.rec
    cand_ids = _token_ids(tokenizer, job.cands)
    rec.cand_tokens = [len(c) for c in cand_ids]
    rec.cand_texts = list(job.cands)
    rec.kl = [float("nan")] * len(job.cands)
    to_score = [j for j, c in enumerate(cand_ids) if len(c) < rec.orig_tokens or not cap_to_original]
    if not to_score:
        return None
    kls = kl_window(model, plan.prefix_ids(i), plan.body_ids[i], [cand_ids[j] for j in to_score],
                    plan.cont_ids(i, window), reduction=reduction, batch_size=batch_size)
    for j, v in zip(to_score, kls.tolist()):
        rec.kl[j] = v
    best = _accept(rec, epsilon)
    return None if best is None else job.cands[best]


def _accept(rec: StepRecord, epsilon: float) -> int | None:
    """Index of the shortest scored candidate shorter than the step with KL < epsilon (ties: lower KL, then
    order); sets the record's accepted, new_tokens and kl_chosen. An unscored candidate's KL is NaN: never kept."""
    ok = [j for j, (n, kl) in enumerate(zip(rec.cand_tokens, rec.kl)) if n < rec.orig_tokens and kl < epsilon]
    rec.accepted, rec.new_tokens, rec.kl_chosen = False, rec.orig_tokens, float("nan")
    if not ok:
        return None
    best = min(ok, key=lambda j: (rec.cand_tokens[j], rec.kl[j], j))
    rec.accepted, rec.new_tokens, rec.kl_chosen = True, rec.cand_tokens[best], rec.kl[best]
    return best


def _assemble(tokenizer, plan: _Plan, chosen: dict[int, str], grade_fn: Callable[[str], bool] | None) -> RefineResult:
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


def _sampling_groups(plans: list[_Plan]) -> list[list[_Plan]]:
    """Consecutive responses grouped so that one sampler call holds at most MAX_STEPS_PER_CALL steps (at least
    one response each): bounds the memory of the prefix texts and samples held at once."""
    groups: list[list[_Plan]] = [[]]
    n_steps = 0
    for plan in plans:
        if groups[-1] and n_steps + len(plan.jobs) > MAX_STEPS_PER_CALL:
            groups.append([])
            n_steps = 0
        groups[-1].append(plan)
        n_steps += len(plan.jobs)
    return groups


def _refine_many(model, tokenizer, items: Sequence[tuple[str, str, str, Callable[[str], bool] | None]],
                 n_candidates: int, window: int, epsilon: float, reduction: str, temperature: float,
                 max_step_tokens: int, seed: int, batch_size: int, sample_batch_size: int, cap_to_original: bool,
                 progress: bool) -> list[RefineResult]:
    """Refine (prompt, text, response_id, grade_fn) items: plan all, then per group of responses draw every
    step's candidates in one sampler call, score them and reassemble."""
    from tqdm.auto import tqdm

    _validate_refine_args(n_candidates, window, epsilon, reduction, temperature, max_step_tokens, batch_size,
                          sample_batch_size)
    plans = [_plan_response(tokenizer, prompt, text, window, max_step_tokens, cap_to_original, rid)
             for prompt, text, rid, _ in items]
    grade_fns = [item[3] for item in items]
    results: list[RefineResult] = []
    bar = tqdm(total=len(plans), desc="refining responses", disable=not progress)
    for g, group in enumerate(_sampling_groups(plans)):
        _draw_candidates(model, tokenizer, group, n_candidates, temperature, stage_seed(seed, f"refine-candidates-{g}"),
                         sample_batch_size, progress)
        for plan in group:
            chosen = {}
            for i in plan.jobs:
                cand = _score_job(model, tokenizer, plan, i, window, epsilon, reduction, batch_size, cap_to_original)
                if cand is not None:
                    chosen[i] = cand
            results.append(_assemble(tokenizer, plan, chosen, grade_fns[len(results)]))
            bar.update(1)
    bar.close()
    return results


def refine_response(model, tokenizer, prompt: str, text: str, n_candidates: int = 16, window: int = 512,
                    epsilon: float = 0.005, reduction: str = "mean", temperature: float = 1.0,
                    max_step_tokens: int = 128, seed: int = 0, grade_fn: Callable[[str], bool] | None = None,
                    batch_size: int = 16, response_id: str = "", cap_to_original: bool = True,
                    sample_batch_size: int = SAMPLE_BATCH_SIZE) -> RefineResult:
    """Refine each thinking step of one response under the windowed KL; revert if it no longer grades correct."""
    return _refine_many(model, tokenizer, [(prompt, text, response_id, grade_fn)], n_candidates, window, epsilon,
                        reduction, temperature, max_step_tokens, seed, batch_size, sample_batch_size,
                        cap_to_original, progress=False)[0]


# --------------------------------------------------------------------------- pairs tables


PAIRS_REQUIRED = ("problem_id", "prompt", "chosen", "chosen_tokens", "chosen_sample_idx")


def _step_rows(res: RefineResult, problem_id: Any) -> list[dict]:
    """Step-log rows of one refined response."""
    rows = []
    for r in res.steps:
        d = asdict(r)
        d.update(problem_id=problem_id, reverted=res.reverted,
                 final_tokens=r.orig_tokens if res.reverted else r.new_tokens)
        rows.append(d)
    return rows


def _targets(pairs: pd.DataFrame, cfg: RefinementConfig) -> tuple[list, list, list[pd.Series]]:
    """The distinct (prompt, chosen) keys of a pairs table, those refine_pairs refines, and their first rows."""
    if not isinstance(pairs, pd.DataFrame):
        raise ValueError(f"pairs must be a pandas DataFrame, got {type(pairs).__name__}")
    missing = [c for c in PAIRS_REQUIRED if c not in pairs.columns]
    if missing:
        raise ValueError(f"pairs table lacks column(s) {missing} (needs {list(PAIRS_REQUIRED)})")
    # A response is refined in the context of its own prompt, so the cache key is (prompt, chosen).
    keys = list(dict.fromkeys(zip(pairs["prompt"], pairs["chosen"])))
    if not cfg.enabled:
        keys_to_refine = []
    else:
        keys_to_refine = keys[:cfg.max_responses] if cfg.max_responses > 0 else keys
    first_row: dict[tuple[str, str], int] = {}
    for pos, key in enumerate(zip(pairs["prompt"], pairs["chosen"])):
        first_row.setdefault(key, pos)
    return keys, keys_to_refine, [pairs.iloc[first_row[key]] for key in keys_to_refine]


def _response_id(row: pd.Series) -> str:
    """The step log's name of a pair row's chosen response."""
    return f"{row['problem_id']}/{row['chosen_sample_idx']}"


def _tables(tokenizer, pairs: pd.DataFrame, keys: list, keys_to_refine: list, rows: list[pd.Series],
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


def refine_pairs(model, tokenizer, pairs: pd.DataFrame, cfg: RefinementConfig, seed: int,
                 grade_fn_factory: Callable[[pd.Series], Callable[[str], bool] | None] | None = None,
                 progress: bool = True, sample_batch_size: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Refine each distinct chosen response once; return the refined pairs table and the per-step log."""
    keys, keys_to_refine, rows = _targets(pairs, cfg)
    if sample_batch_size is None:  # a config that carries the knob wins over the module default
        sample_batch_size = getattr(cfg, "sample_batch_size", SAMPLE_BATCH_SIZE)
    items = [(key[0], key[1], _response_id(row), grade_fn_factory(row) if grade_fn_factory is not None else None)
             for key, row in zip(keys_to_refine, rows)]
    refined = _refine_many(model, tokenizer, items, cfg.n_candidates, cfg.window, cfg.epsilon, cfg.kl_reduction,
                           cfg.temperature, cfg.max_step_tokens, seed, cfg.batch_size, sample_batch_size,
                           cap_to_original=True, progress=progress)
    return _tables(tokenizer, pairs, keys, keys_to_refine, rows, refined)


def rethreshold(tokenizer, pairs: pd.DataFrame, step_log: pd.DataFrame, cfg: RefinementConfig,
                grade_fn_factory: Callable[[pd.Series], Callable[[str], bool] | None] | None = None
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """refine_pairs' result at cfg.epsilon, from the step log of a run on the same pairs at any other epsilon.

    Exact because the candidates are drawn, and every candidate shorter than its step is scored, before epsilon
    is looked at: the run (same model, seed and other settings) differs only in which candidate each step keeps.
    """
    keys, keys_to_refine, rows = _targets(pairs, cfg)
    missing = [c for c in STEP_LOG_COLUMNS if c not in step_log.columns]
    if missing:
        raise ValueError(f"step log lacks column(s) {missing}: it comes from an older refinement run; rerun it")
    by_id = {rid: g.sort_values("step") for rid, g in step_log.groupby("response_id", sort=False)}
    refined = []
    for key, row in zip(keys_to_refine, rows):
        rid = _response_id(row)
        # window and token cap only decide the jobs' continuation and sampling limits, which the log already holds
        plan = _plan_response(tokenizer, key[0], key[1], window=1, max_step_tokens=1, cap_to_original=True,
                              response_id=rid)
        log = by_id.get(rid)
        n_log = 0 if log is None else len(log)
        if n_log != len(plan.records) or (n_log and (log["step"].tolist() != [r.step for r in plan.records]
                                                     or log["orig_tokens"].tolist() != [r.orig_tokens for r in plan.records])):
            raise ValueError(f"response {rid}: the step log does not match its steps (another pairs table, "
                             "tokenizer or refinement run?)")
        chosen: dict[int, str] = {}
        for rec, (_, e) in zip(plan.records, log.iterrows() if n_log else []):
            rec.skipped, rec.n_sampled, rec.n_dropped = e["skipped"], int(e["n_sampled"]), int(e["n_dropped"])
            rec.cand_tokens = [int(x) for x in e["cand_tokens"]]
            rec.cand_texts = [str(x) for x in e["cand_texts"]]
            rec.kl = [float(x) for x in e["kl"]]
            if rec.skipped:
                continue
            best = _accept(rec, cfg.epsilon)
            if best is not None:
                chosen[rec.step] = rec.cand_texts[best]
        grade_fn = grade_fn_factory(row) if grade_fn_factory is not None else None
        refined.append(_assemble(tokenizer, plan, chosen, grade_fn))
    return _tables(tokenizer, pairs, keys, keys_to_refine, rows, refined)


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


def grader_factory(samples: pd.DataFrame, kind: str = "toy") -> Callable[[pd.Series], Callable[[str], bool]]:
    """For refine_pairs: a factory giving, for a pair row, a function that says if a text still grades correct."""
    from .sampling import grade

    golds = samples.groupby("problem_id")["gold"].first().to_dict()

    def factory(row: pd.Series) -> Callable[[str], bool]:
        gold = golds[row["problem_id"]]
        return lambda text: grade([text], [gold], kind)[0] == "correct"

    return factory


def step_table(result: RefineResult) -> pd.DataFrame:
    """One refined response's steps: original text, candidates with their tokens and KL, and what was kept."""
    steps, _ = split_steps(result.original_text)
    bodies = [step_parts(s)[0] for s in steps if step_parts(s)[0].strip()]
    rows = []
    for rec, body in zip(result.steps, bodies):
        order = sorted(range(len(rec.cand_texts)), key=lambda j: rec.cand_tokens[j])
        rows.append({"step": rec.step, "text": body, "tokens": rec.orig_tokens, "KL": 0.0, "kept": not rec.accepted})
        for j in order:
            kl = rec.kl[j]
            rows.append({"step": rec.step, "text": "   ↳ " + rec.cand_texts[j], "tokens": rec.cand_tokens[j], "KL": kl,
                         "kept": rec.accepted and rec.cand_tokens[j] == rec.new_tokens and kl == rec.kl_chosen})
    return pd.DataFrame(rows)
