"""KL-constrained intra-step refinement (TokenSqueeze §3.2, App. B): shorter steps, same continuation distribution.

A chosen response's thinking part is split into steps on blank lines. For each step i the same
model samples K re-generations of that step from the original prefix (prompt, s_1..s_{i-1}); the
shortest candidate s' that is shorter than s_i and satisfies

    D_KL( P(. | prefix, s_i, cont_<t) || P(. | prefix, s', cont_<t) ) < epsilon

is kept, where the KL is taken over the full vocabulary at each of the next L original tokens
after the step (teacher-forced under both contexts, original context first) and reduced by a
per-token mean (default) or a sum over that window.

Choices made here (documented in notebook 03):
- Steps. ``split_steps`` (task/format.py, where its rules are written down) keeps each step's trailing
  separator in the step string, so ``"".join(steps) + tail`` is the original text byte for byte; a step
  ends at a blank line, the thinking part at the first "</think>", and the tail is never rewritten.
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
- KV cache (scoring "reference", the original path): the shared prefix (all but its last token) is run
  once per step; its cache is copied and repeated across each batch of rows (original + candidates), which
  then run only [last prefix token, step, continuation window], right-padded, with explicit positions.
- Scoring that never recomputes (scoring "full", the default, and "fast"). One forward pass over the whole
  original sequence gives the original-context distribution at every position (so every step's window) and
  a KV cache; each step's candidate rows branch from that cache at the step's prefix. Candidates are
  deduplicated by ids. "full" scores every candidate shorter than its step over the whole window (exact
  KLs: what rethreshold and notebook 06 need). "fast" scores length groups shortest first and stops after
  the first group with a pass (the shortest passing candidate is kept, so nothing longer can matter), and
  within a group rejects early: per-position KL is non-negative, so a partial sum over the first 32, then
  128 positions that already exceeds the threshold (L·ε for the mean, ε for the sum; with a small margin
  for rounding) cannot pass. Its step log records such KLs as lower bounds (``kl_bound``) and leaves the
  unscored ones NaN. Accept decisions equal the reference's in every mode (tests/test_refinement_fast.py).
- Candidates: "sampler" (the sampling interface, in bulk as above; on the transformers backend this is the
  original RNG use, so toy results do not move), "branch" (decoded per step from the response's own cache,
  one random stream per (response, step)) or "vllm" (one request of n = K per step as token ids, so vLLM's
  automatic prefix caching shares a response's step prefixes; stop at the blank line or "</think>",
  max_tokens at the step's cap).
- Steps as token spans (steps "spans"; default "segments" as above): the response is tokenized once and a
  step is the run of tokens that start inside it, ending in the boundary token that holds its blank line
  (tsq_utils.task.step_spans). Candidates are tokenized with the step's separator appended, so a candidate ends
  in the boundary token the model writes; step and candidate counts then include that token.
- Resumable and sharded: with ``shard_dir`` each finished group of responses is written as it completes and
  a rerun reads it back; ``shard=(i, n)`` computes only every n-th group (one process per GPU).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from ..model import compat
from ..core.config import RefinementConfig, stage_seed
from ..core.parallel import map_shards, n_workers
from ..core.fingerprint import package_hash
from ..model.generation import count_tokens, sample, vllm_finish_reason
from ..task.format import (STEP_SEP_RE, STEP_STOP_STRINGS, THINK_CLOSE, clean_candidate,  # noqa: F401
                           count_steps, join_steps, split_steps, step_bodies, step_parts)
from ..task.step_spans import encode_with_starts, step_spans

# Step splitting and the think/answer format are the task layer's (task/format.py); these names stay importable here.
STOP_STRINGS = list(STEP_STOP_STRINGS)
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
    "accepted", "new_tokens", "kl_chosen", "skipped", "reverted", "final_tokens", "cand_texts", "kl_bound",
)


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
    with _phase("prefill"):
        out = compat.forward_with_cache(model, None, input_ids=torch.tensor([ids], device=device), use_cache=True,
                                        logits_to_keep=1)
    return compat.output_cache(out)


def _window_batch(rows: list[list[int]], starts: list[int], n_window: int, n_cached: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask (n_cached cached tokens first), positions and the [B, L] window positions."""
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
    return ids, mask, positions, gather


def _chunk_window_logits(model: torch.nn.Module, rows: list[list[int]], starts: list[int], n_window: int,
                         n_cached: int, cache, device: torch.device) -> torch.Tensor:
    """Model logits at positions starts[r] .. starts[r]+n_window-1 of each (right-padded) row: [B, L, V]."""
    ids, mask, positions, gather = _window_batch(rows, starts, n_window, n_cached, device)
    batch_cache = None
    if cache is not None:
        batch_cache = copy.deepcopy(cache)  # the forward pass appends to it; keep the prefix cache intact
        batch_cache.batch_repeat_interleave(len(rows))
    out = compat.forward_logits_at(model, gather, cache=batch_cache, input_ids=ids, attention_mask=mask,
                                   position_ids=positions, use_cache=cache is not None)
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
    per_token = kl_per_token(model, prefix_ids, orig_step_ids, cand_ids_list, cont_ids, batch_size=batch_size,
                             use_prefix_cache=use_prefix_cache)
    total = per_token.sum(dim=1)
    return total / per_token.shape[1] if reduction == "mean" else total


def kl_per_token(model: torch.nn.Module, prefix_ids: Sequence[int], orig_step_ids: Sequence[int],
                 cand_ids_list: Sequence[Sequence[int]], cont_ids: Sequence[int], batch_size: int = 16,
                 use_prefix_cache: bool = True) -> torch.Tensor:
    """KL(P(.|prefix, step, cont_<t) || P(.|prefix, cand, cont_<t)) at each window position t: [K, L], float32, CPU."""
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
    return torch.cat(kl_rows, dim=0).cpu()  # [K, L]


# --------------------------------------------------------------------------- scoring without recomputation

# Which part of refinement a model call belongs to ("sample", "prefill", "decode", "kl_window"): read by
# benchmarks/bench_refinement.py's forward hook to split forward tokens by purpose. One slot, no threads.
_PHASE = ["idle"]


@contextlib.contextmanager
def _phase(name: str):
    """Label the model calls made inside the block (for the benchmark's token accounting)."""
    old, _PHASE[0] = _PHASE[0], name
    try:
        yield
    finally:
        _PHASE[0] = old


def _branch_cache(cache, n_tokens: int, rows: int):
    """A new cache holding the first n_tokens positions of a batch-1 cache, repeated over rows (shares no state
    with it: the forward pass replaces each layer's tensors by concatenation, never writes into them)."""
    layers = getattr(cache, "layers", None)
    if layers is None:  # older transformers: a cache with key_cache/value_cache lists
        new = copy.copy(cache)
        new.key_cache = [k[:, :, :n_tokens].expand(rows, -1, -1, -1).contiguous() for k in cache.key_cache]
        new.value_cache = [v[:, :, :n_tokens].expand(rows, -1, -1, -1).contiguous() for v in cache.value_cache]
        if hasattr(new, "_seen_tokens"):
            new._seen_tokens = n_tokens
        return new
    new = copy.copy(cache)
    new.layers = []
    for layer in layers:
        lay = copy.copy(layer)
        lay.keys = layer.keys[:, :, :n_tokens].expand(rows, -1, -1, -1)
        lay.values = layer.values[:, :, :n_tokens].expand(rows, -1, -1, -1)
        new.layers.append(lay)
    return new


class _ResponseForward:
    """One forward pass over a whole original sequence (prompt + response): the model's final hidden states at
    every position (the original-context distributions of every step's window, projected on demand) and the KV
    cache that every step's candidates branch from."""

    def __init__(self, model: torch.nn.Module, ids: list[int], device: torch.device):
        if not ids:
            raise ValueError("an empty sequence has no forward pass")
        self.ids = ids
        with _phase("prefill"):
            out = compat.unwrap(model).get_decoder()(input_ids=torch.tensor([ids], device=device), use_cache=True)
        self.hidden = out.last_hidden_state[0]  # [N, H]
        self.cache = compat.output_cache(out)
        self.head = compat.unwrap(model).get_output_embeddings()

    def orig_logp(self, pos: int, n: int) -> torch.Tensor:
        """Log-probabilities predicted at positions pos .. pos+n-1 of the original sequence: [n, V], float32."""
        return F.log_softmax(self.head(self.hidden[pos:pos + n]).float(), dim=-1)

    def branch(self, n_tokens: int, rows: int):
        """A cache of the first n_tokens positions for a batch of rows (None for n_tokens == 0)."""
        return _branch_cache(self.cache, n_tokens, rows) if n_tokens > 0 else None


def _rows_kl(model, fwd: _ResponseForward, n_cached: int, head: list[int], cands: list[list[int]], cont: list[int],
             orig_logp: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per-position KL(orig || cand) over the window cont for candidate steps branching from the original's
    cache after n_cached tokens (rows: head + cand + cont): [K, len(cont)], float32."""
    device = fwd.hidden.device
    out = []
    for lo in range(0, len(cands), batch_size):
        chunk = cands[lo:lo + batch_size]
        rows = [head + c + cont for c in chunk]
        starts = [len(head) + len(c) - 1 for c in chunk]
        ids, mask, positions, gather = _window_batch(rows, starts, len(cont), n_cached, device)
        cache = fwd.branch(n_cached, len(rows))
        with _phase("kl_window"):
            logits = compat.forward_logits_at(model, gather, cache=cache, input_ids=ids, attention_mask=mask,
                                              position_ids=positions, use_cache=cache is not None).logits
        out.append(_kl_rows(orig_logp, logits))
    return torch.cat(out, dim=0)


# Window lengths of the early-rejection stages before the full window ("fast" scoring): most candidates of a
# step that is not kept already exceed the threshold within the first few dozen tokens.
PRUNE_STAGES = (32, 128)
# A partial sum rejects a candidate only when it exceeds the threshold by this margin: per-position KLs are
# non-negative in exact arithmetic but can come out a few ulps below zero, and a stage's forward pass can round
# differently from the full one; a candidate within the margin is scored in full, so decisions stay exact.
_PRUNE_RTOL, _PRUNE_ATOL = 1e-4, 1e-6
SCORING_MODES = ("full", "fast", "reference")


def _score_step_cached(model, fwd: _ResponseForward, prefix_len: int, step_len: int, cont: list[int],
                       cand_ids: list[list[int]], reduction: str, epsilon: float, batch_size: int,
                       fast: bool) -> tuple[list[float], list[bool]]:
    """Windowed KLs of candidate steps against the original step from the response's forward pass.

    Full: every candidate over the whole window. Fast: length groups shortest first, stopping after the first
    group with a pass, and within a group early rejection by partial sums in PRUNE_STAGES; unscored candidates
    get NaN, rejected ones the (reduced) partial sum, a lower bound, flagged True.
    """
    n_window = len(cont)
    # Cache all but the last prefix token (kept in every row, as kl_per_token does) so an empty step works too.
    n_cached = prefix_len - 1 if prefix_len >= 2 else 0
    head = fwd.ids[n_cached:prefix_len]
    orig_logp = fwd.orig_logp(prefix_len + step_len - 1, n_window)
    reduce = (lambda s: s / n_window) if reduction == "mean" else (lambda s: s)
    kls = [float("nan")] * len(cand_ids)
    bound = [False] * len(cand_ids)
    if not fast:
        per = _rows_kl(model, fwd, n_cached, head, cand_ids, cont, orig_logp, batch_size)
        return [float(v) for v in reduce(per.sum(dim=1)).tolist()], bound
    stages = [m for m in PRUNE_STAGES if m < n_window] + [n_window]
    limit = epsilon * (1 + _PRUNE_RTOL) + _PRUNE_ATOL
    for length in sorted({len(c) for c in cand_ids}):
        alive = [j for j, c in enumerate(cand_ids) if len(c) == length]
        for m in stages:
            per = _rows_kl(model, fwd, n_cached, head, [cand_ids[j] for j in alive], cont[:m], orig_logp[:m],
                           batch_size)
            red = reduce(per.sum(dim=1)).tolist()
            if m == n_window:
                for j, v in zip(alive, red):
                    kls[j] = float(v)
                break
            survivors = []
            for j, v in zip(alive, red):
                if v > limit:  # the full window's KL is at least this (up to rounding): it cannot pass
                    kls[j], bound[j] = float(v), True
                else:
                    survivors.append(j)
            alive = survivors
            if not alive:
                break
        if any(kls[j] < epsilon and not bound[j] for j, c in enumerate(cand_ids) if len(c) == length):
            break  # the shortest passing length is found: no longer candidate can be kept
    return kls, bound


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
    response_id: str = ""
    # Text appended to a candidate before it is tokenized: "" for segment-wise steps; for token-span steps the
    # rest of the step's span (its separator), so a candidate ends in the boundary token the model would write.
    cand_suffix: list[str] = field(default_factory=list)
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


STEP_MODES = ("segments", "spans")


def _plan_response(tokenizer, prompt: str, text: str, window: int, max_step_tokens: int, cap_to_original: bool,
                   response_id: str, steps_mode: str = "segments") -> _Plan:
    """Split a response into steps, make their records, and a job for every step that can be refined."""
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
        plan = _Plan(prompt=prompt, text=text, steps=steps, seps=[sep for _, sep in parts], tail=tail,
                     prompt_ids=segs[0], body_ids=segs[1:-1:2], sep_ids=segs[2:-1:2], tail_ids=segs[-1],
                     response_id=response_id, cand_suffix=[""] * len(steps))
    else:
        # Token spans of the whole response's tokenization (step_spans): a step's ids end with its boundary token.
        ids, starts = encode_with_starts(tokenizer, text)
        sp = step_spans(steps, tail, [b for b, _ in parts], starts)
        aligned = sp.aligned
        plan = _Plan(prompt=prompt, text=text, steps=steps, seps=[sep for _, sep in parts], tail=tail,
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
        _fill_job(job, texts, n_toks, reasons, n)


def _fill_job(job: _StepJob, texts: list[str], n_toks: list[int], reasons: list[str], n: int) -> None:
    """Keep a step's distinct cleaned samples as its candidates; drop empty ones and ones that hit its limit."""
    kept, dropped = [], 0
    for text, n_tok, reason in zip(texts, n_toks, reasons):
        cand = clean_candidate(text)
        if reason == "length" or n_tok >= job.max_new_tokens or not cand:
            dropped += 1
        elif cand not in kept:
            kept.append(cand)
    job.cands, job.rec.n_sampled, job.rec.n_dropped = kept, n, dropped


CANDIDATE_SOURCES = ("sampler", "branch", "vllm")


@torch.no_grad()
def _branch_candidates(model, tokenizer, plan: "_Plan", fwd: _ResponseForward, n: int, temperature: float,
                       seed: int) -> None:
    """Draw n candidates for every job of one response by decoding from the original's KV cache at the step's
    prefix (the prefix is never recomputed: the CPU counterpart of vLLM's prefix caching). Each step has its own
    random stream, seeded from seed, the response id and the step, so a response's candidates do not depend on
    which other responses are refined with it (shards and resumed runs repeat them exactly)."""
    from ..model.generation import _cut_at_stop, _pick, _stop_checker

    device = fwd.hidden.device
    eos = tokenizer.eos_token_id
    stop_hit = _stop_checker(tokenizer, list(STOP_STRINGS))
    for i, job in plan.jobs.items():
        p = len(plan.prefix_ids(i))
        if p == 0:
            raise ValueError("branch sampling needs a non-empty prompt")
        gen = torch.Generator(device=device).manual_seed(stage_seed(seed, f"refine-branch:{plan.response_id}:{i}"))
        cache = fwd.branch(p - 1, n)
        nxt = torch.full((n,), fwd.ids[p - 1], dtype=torch.long, device=device)
        rows, ids, ended = list(range(n)), [[] for _ in range(n)], [False] * n
        for t in range(job.max_new_tokens):
            pos = torch.full((len(rows), 1), p - 1 + t, dtype=torch.long, device=device)
            with _phase("decode"):
                out = compat.forward_with_cache(model, cache, input_ids=nxt[:, None], position_ids=pos, use_cache=True,
                                                logits_to_keep=1)
            cache = compat.output_cache(out)
            nxt = _pick(out.logits[:, -1, :].float(), temperature, 1.0, gen)
            keep = []
            for a, tok_id in enumerate(nxt.tolist()):
                r = rows[a]
                if tok_id == eos:
                    ended[r] = True
                    continue
                ids[r].append(tok_id)
                if stop_hit(ids[r]):
                    ended[r] = True
                    continue
                keep.append(a)
            if not keep:
                break
            if len(keep) < len(rows):
                idx = torch.tensor(keep, device=device)
                cache.batch_select_indices(idx)
                rows, nxt = [rows[a] for a in keep], nxt[idx]
        texts, reasons = [], []
        for r in range(n):
            text, hit = _cut_at_stop(tokenizer.decode(ids[r], skip_special_tokens=True), list(STOP_STRINGS))
            texts.append(text)
            reasons.append("stop" if (ended[r] or hit) else "length")
        _fill_job(job, texts, [count_tokens(tokenizer, x) for x in texts], reasons, n)


def _vllm_candidates(llm, tokenizer, plans: list["_Plan"], n: int, temperature: float, seed: int,
                     steps_mode: str) -> None:
    """Draw n candidates for every job of the plans with vLLM in one generate call: one request per step (n
    samples), prompts as token ids so that vLLM's automatic prefix caching shares the step prefixes of a response
    (they are prefixes of one sequence), stopping at a blank line or '</think>', max_tokens at the step's own cap
    (just above its length: a longer candidate can never be kept), and a seed per (response, step) so a step's
    candidates do not depend on the other requests of the call."""
    try:
        from vllm import SamplingParams
    except ImportError as e:
        raise ImportError("candidates='vllm' needs the GPU extra: pip install -e .[gpu] (on a CPU use "
                          "candidates='sampler' or 'branch')") from e
    where = [(plan, i) for plan in plans for i in plan.jobs]
    if not where:
        return
    if steps_mode == "spans":  # the model's own ids of the prefix: slices of the whole response's tokenization
        prompts = [plan.prefix_ids(i) for plan, i in where]
    else:  # the prefix text tokenized whole, as the transformers sampler does
        prompts = _token_ids(tokenizer, [plan.prefix_text(i) for plan, i in where])
    params = [SamplingParams(n=n, temperature=float(temperature), top_p=1.0,
                             max_tokens=int(plan.jobs[i].max_new_tokens), stop=list(STOP_STRINGS),
                             seed=stage_seed(seed, f"refine-vllm:{plan.response_id}:{i}"))
              for plan, i in where]
    with _phase("sample"):
        outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    if len(outs) != len(where):
        raise RuntimeError(f"vLLM returned {len(outs)} outputs for {len(where)} requests")
    for (plan, i), o in zip(where, outs):
        comps = sorted(o.outputs, key=lambda c: c.index)
        texts = [c.text for c in comps]
        # an aborted or failed request raises (generation.vllm_finish_reason); "repetition" is unfinished, as "length"
        reasons = ["stop" if vllm_finish_reason(c.finish_reason) == "stop" else "length" for c in comps]
        # the sampled ids are the model's own count (a stop string's tokens are cut from the text, not the ids)
        n_toks = [count_tokens(tokenizer, t) for t in texts]
        _fill_job(plan.jobs[i], texts, n_toks, reasons, n)


def _score_job(model, tokenizer, plan: _Plan, i: int, window: int, epsilon: float, reduction: str,
               batch_size: int, cap_to_original: bool, scoring: str = "reference",
               fwd: _ResponseForward | None = None) -> str | None:
    """Score step i's candidates by the windowed KL, fill its record; return the accepted candidate or None."""
    job = plan.jobs[i]
    rec = job.rec
    cand_ids = _token_ids(tokenizer, [c + plan.cand_suffix[i] for c in job.cands])
    rec.cand_tokens = [len(c) for c in cand_ids]
    rec.cand_texts = list(job.cands)
    rec.kl = [float("nan")] * len(job.cands)
    rec.kl_bound = [False] * len(job.cands)
    to_score = [j for j, c in enumerate(cand_ids) if len(c) < rec.orig_tokens or not cap_to_original]
    if not to_score:
        return None
    if scoring == "reference":  # the original and every candidate recomputed from the step's prefix cache
        with _phase("kl_window"):
            kls = kl_window(model, plan.prefix_ids(i), plan.body_ids[i], [cand_ids[j] for j in to_score],
                            plan.cont_ids(i, window), reduction=reduction, batch_size=batch_size).tolist()
        bounds = [False] * len(to_score)
    else:
        # Distinct candidate texts can share ids: each id sequence is scored once.
        uniq = list(dict.fromkeys(tuple(cand_ids[j]) for j in to_score))
        u_kls, u_bounds = _score_step_cached(model, fwd, len(plan.prefix_ids(i)), len(plan.body_ids[i]),
                                             plan.cont_ids(i, window), [list(u) for u in uniq], reduction,
                                             epsilon, batch_size, fast=scoring == "fast")
        at = {u: k for k, u in enumerate(uniq)}
        kls = [u_kls[at[tuple(cand_ids[j])]] for j in to_score]
        bounds = [u_bounds[at[tuple(cand_ids[j])]] for j in to_score]
    for j, v, b in zip(to_score, kls, bounds):
        rec.kl[j], rec.kl_bound[j] = v, b
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


def _sampling_groups(plans: list[_Plan], min_groups: int = 1) -> list[list[_Plan]]:
    """Consecutive responses grouped so that one sampler call holds at most MAX_STEPS_PER_CALL steps (at least
    one response each): bounds the memory of the prefix texts and samples held at once. With min_groups > 1 a group
    also holds at most an even share of the steps, so that there are about min_groups groups for processes to share
    (the profile's `shards`: the grouping, and so every result, never depends on how many processes run)."""
    total = sum(len(p.jobs) for p in plans)
    cap = min(MAX_STEPS_PER_CALL, max(1, -(-total // max(1, min_groups))))
    groups: list[list[_Plan]] = [[]]
    n_steps = 0
    for plan in plans:
        if groups[-1] and n_steps + len(plan.jobs) > cap:
            groups.append([])
            n_steps = 0
        groups[-1].append(plan)
        n_steps += len(plan.jobs)
    return groups


def _refine_many(model, tokenizer, items: Sequence[tuple[str, str, str, Callable[[str], bool] | None]],
                 n_candidates: int, window: int, epsilon: float, reduction: str, temperature: float,
                 max_step_tokens: int, seed: int, batch_size: int, sample_batch_size: int, cap_to_original: bool,
                 progress: bool, scoring: str = "full", candidates: str = "sampler",
                 steps_mode: str = "segments", shard_dir: str | Path | None = None,
                 shard: tuple[int, int] = (0, 1), llm: Any = None, min_groups: int = 1) -> list[RefineResult | None]:
    """Refine (prompt, text, response_id, grade_fn) items: plan all, then per group of responses draw every
    step's candidates in one sampler call (or per response from its own cache), score them and reassemble.

    With a shard folder each finished group is written there and a group already there is read back instead of
    redone; only groups g with g % shard[1] == shard[0] are computed (the others stay None unless on disk)."""
    from tqdm.auto import tqdm

    _validate_refine_args(n_candidates, window, epsilon, reduction, temperature, max_step_tokens, batch_size,
                          sample_batch_size)
    if scoring not in SCORING_MODES:
        raise ValueError(f"scoring must be one of {SCORING_MODES}, got {scoring!r}")
    if candidates not in CANDIDATE_SOURCES:
        raise ValueError(f"candidates must be one of {CANDIDATE_SOURCES}, got {candidates!r}")
    if candidates == "vllm" and llm is None:
        raise ValueError("candidates='vllm' needs a vLLM engine (llm=...) of the same model")
    plans = [_plan_response(tokenizer, prompt, text, window, max_step_tokens, cap_to_original, rid, steps_mode)
             for prompt, text, rid, _ in items]
    grade_fns = [item[3] for item in items]
    index, n_shards = shard
    if not (isinstance(n_shards, int) and isinstance(index, int) and 0 <= index < n_shards):
        raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard!r}")
    settings = dict(n_candidates=n_candidates, window=window, epsilon=epsilon, reduction=reduction,
                    temperature=temperature, max_step_tokens=max_step_tokens, seed=seed, batch_size=batch_size,
                    sample_batch_size=sample_batch_size, cap_to_original=cap_to_original, scoring=scoring,
                    candidates=candidates, steps=steps_mode, max_steps_per_call=MAX_STEPS_PER_CALL,
                    min_groups=min_groups,
                    model=_model_fingerprint(model) if shard_dir is not None else None,
                    # a code edit must not reuse groups that the old code refined
                    code=package_hash() if shard_dir is not None else None)
    results: list[RefineResult | None] = [None] * len(plans)
    bar = tqdm(total=len(plans), desc="refining responses", disable=not progress)
    device = _model_device(model)
    first = 0
    for g, group in enumerate(_sampling_groups(plans, min_groups)):
        at, first = first, first + len(group)
        path = fingerprint = None
        if shard_dir is not None:
            path, fingerprint = Path(shard_dir) / f"group-{g:05d}.json", _group_fingerprint(settings, group)
            if path.exists():
                try:
                    results[at:first] = _load_group(path, fingerprint)
                    bar.update(len(group))
                    continue
                except StaleShardError:
                    pass  # another run's group (other settings, responses, model or code): redone and replaced
        if g % n_shards != index:
            continue
        done: list[RefineResult] = []
        if candidates == "sampler":
            with _phase("sample"):
                _draw_candidates(model, tokenizer, group, n_candidates, temperature,
                                 stage_seed(seed, f"refine-candidates-{g}"), sample_batch_size, progress)
        elif candidates == "vllm":
            _vllm_candidates(llm, tokenizer, group, n_candidates, temperature, seed, steps_mode)
        for plan in group:
            chosen = {}
            fwd = None
            if plan.jobs and (scoring != "reference" or candidates == "branch"):
                was_training = model.training
                model.eval()
                try:
                    with torch.no_grad():
                        fwd = _ResponseForward(model, plan.all_ids(), device)
                        if candidates == "branch":
                            _branch_candidates(model, tokenizer, plan, fwd, n_candidates, temperature, seed)
                        for i in plan.jobs:
                            cand = _score_job(model, tokenizer, plan, i, window, epsilon, reduction, batch_size,
                                              cap_to_original, scoring, fwd)
                            if cand is not None:
                                chosen[i] = cand
                finally:
                    model.train(was_training)
            else:
                for i in plan.jobs:
                    cand = _score_job(model, tokenizer, plan, i, window, epsilon, reduction, batch_size,
                                      cap_to_original)
                    if cand is not None:
                        chosen[i] = cand
            del fwd
            done.append(_assemble(tokenizer, plan, chosen, grade_fns[at + len(done)]))
            bar.update(1)
        if path is not None:
            _save_group(path, fingerprint, done)
        results[at:first] = done
    bar.close()
    return results


def _model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of the model's weights (its size and a hash of the first values of every tensor)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in compat.unwrap(model).state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _group_fingerprint(settings: dict, group: list[_Plan]) -> str:
    """What a shard file must match to be reused: the refinement settings and the group's responses."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for plan in group:
        h.update(json.dumps([plan.response_id, plan.prompt, plan.text]).encode())
    return h.hexdigest()


def _save_group(path: Path, fingerprint: str, results: list[RefineResult]) -> None:
    """Write one group's refined responses (with their step records) atomically (json keeps NaN KLs exactly)."""
    import json

    from ..core.artifacts import atomic_write_text

    atomic_write_text(path, json.dumps({"fingerprint": fingerprint, "results": [asdict(r) for r in results]}))


class StaleShardError(ValueError):
    """A shard file holds a group of another refinement run (other settings, responses, model or code)."""


def _load_group(path: Path, fingerprint: str) -> list[RefineResult]:
    """A group written by _save_group, checked against the fingerprint of the group it should hold."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("fingerprint") != fingerprint:
            raise StaleShardError(f"{path} holds another refinement run (other settings, responses, model or code)")
        out = []
        for r in data["results"]:
            r = dict(r)
            r["steps"] = [StepRecord(**rec) for rec in r["steps"]]
            out.append(RefineResult(**r))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, StaleShardError):
            raise
        # a truncated or damaged shard (a run killed mid-write before writes were atomic, a full disk): redone
        print(f"refinement: shard {path} is unreadable ({type(e).__name__}: {e}): its group is redone and the file "
              "replaced")
        raise StaleShardError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    return out


def refine_response(model, tokenizer, prompt: str, text: str, n_candidates: int = 16, window: int = 512,
                    epsilon: float = 0.005, reduction: str = "mean", temperature: float = 1.0,
                    max_step_tokens: int = 128, seed: int = 0, grade_fn: Callable[[str], bool] | None = None,
                    batch_size: int = 16, response_id: str = "", cap_to_original: bool = True,
                    sample_batch_size: int = SAMPLE_BATCH_SIZE, scoring: str = "full",
                    candidates: str = "sampler", steps: str = "segments") -> RefineResult:
    """Refine each thinking step of one response under the windowed KL; revert if it no longer grades correct."""
    return _refine_many(model, tokenizer, [(prompt, text, response_id, grade_fn)], n_candidates, window, epsilon,
                        reduction, temperature, max_step_tokens, seed, batch_size, sample_batch_size,
                        cap_to_original, progress=False, scoring=scoring, candidates=candidates,
                        steps_mode=steps)[0]


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
                 progress: bool = True, sample_batch_size: int | None = None, scoring: str | None = None,
                 candidates: str | None = None, steps: str | None = None, shard_dir: str | Path | None = None,
                 shard: tuple[int, int] = (0, 1), llm: Any = None, shards: int = 1,
                 workers: int = 1) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Refine each distinct chosen response once; return the refined pairs table and the per-step log.

    Resumable and shardable: with shard_dir, each group of responses (one sampler call, MAX_STEPS_PER_CALL steps at
    most) is written to shard_dir as it finishes, and a rerun reads finished groups back instead of redoing them
    (same results as an uninterrupted run: a group's candidates depend on its seed and its responses only). With
    shard=(i, n), this process computes only groups g with g % n == i (one process per GPU) and returns None while
    other groups are missing; a final call with the default shard, after all processes are done, assembles.

    scoring: "full" (every candidate shorter than its step gets its exact KL: what rethreshold needs), "fast"
    (the same accept decisions; length groups shortest first and early rejection leave NaNs and flagged lower
    bounds) or "reference" (the original recomputed with every batch of candidates, as before); candidates:
    "sampler" (one sampler call per group of responses), "branch" (decoded from each response's own cache) or
    "vllm" (llm: a vLLM engine of the same model; prefix caching shares each response's step prefixes);
    steps: "segments" (each segment tokenized alone, as before) or "spans" (token spans of the whole response's
    tokenization: the ids the model produces; step and candidate token counts then include the boundary token).
    None: the config's field of that name if it has one, else "full", "sampler" and "segments".

    shards / workers (the profile's): the responses form at least `shards` groups, which up to `workers` one-thread
    processes share (core/parallel.py); a group's result depends on its responses and seed only, so the tables are
    the same whatever `workers` is. Processes are for the transformers candidate sources (not vLLM's engine).
    """
    keys, keys_to_refine, rows = _targets(pairs, cfg)
    if sample_batch_size is None:  # a config that carries the knob wins over the module default
        sample_batch_size = getattr(cfg, "sample_batch_size", SAMPLE_BATCH_SIZE)
    scoring = scoring if scoring is not None else getattr(cfg, "scoring", "full")
    candidates = candidates if candidates is not None else getattr(cfg, "candidates", "sampler")
    steps = steps if steps is not None else getattr(cfg, "steps", "segments")
    items = [(key[0], key[1], _response_id(row), grade_fn_factory(row) if grade_fn_factory is not None else None)
             for key, row in zip(keys_to_refine, rows)]
    args = dict(model=model, tokenizer=tokenizer, items=items, n_candidates=cfg.n_candidates, window=cfg.window,
                epsilon=cfg.epsilon, reduction=cfg.kl_reduction, temperature=cfg.temperature,
                max_step_tokens=cfg.max_step_tokens, seed=seed, batch_size=cfg.batch_size,
                sample_batch_size=sample_batch_size, cap_to_original=True, progress=progress, scoring=scoring,
                candidates=candidates, steps_mode=steps, shard_dir=shard_dir, llm=llm, min_groups=shards)
    n_proc = 1 if (candidates == "vllm" or shard != (0, 1)) else min(n_workers(workers), max(1, shards))
    if n_proc <= 1:
        refined = _refine_many(**args, shard=shard)
    else:
        # process i computes groups g with g % n_proc == i; each group's result is the same in any process
        parts = map_shards(_refine_part, [(i, n_proc) for i in range(n_proc)], workers=workers,
                           shared={**args, "progress": False}, progress=progress, desc="refinement processes")
        refined = [next((part[j] for part in parts if part[j] is not None), None) for j in range(len(items))]
    if any(r is None for r in refined):
        return None
    return _tables(tokenizer, pairs, keys, keys_to_refine, rows, refined)


def _refine_part(args: dict, shard: tuple[int, int]) -> list[RefineResult | None]:
    """One process's share of _refine_many's groups (module-level: map_shards sends it by name)."""
    return _refine_many(**args, shard=shard)


def rethreshold(tokenizer, pairs: pd.DataFrame, step_log: pd.DataFrame, cfg: RefinementConfig,
                grade_fn_factory: Callable[[pd.Series], Callable[[str], bool] | None] | None = None,
                steps: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """refine_pairs' result at cfg.epsilon, from the step log of a run on the same pairs at any other epsilon.

    Exact because the candidates are drawn, and every candidate shorter than its step is scored, before epsilon
    is looked at: the run (same model, seed and other settings) differs only in which candidate each step keeps.
    """
    keys, keys_to_refine, rows = _targets(pairs, cfg)
    missing = [c for c in STEP_LOG_COLUMNS if c not in step_log.columns and c != "kl_bound"]  # older logs: exact
    if missing:
        raise ValueError(f"step log lacks column(s) {missing}: it comes from an older refinement run; rerun it")
    if not fully_scored(step_log):
        raise ValueError("the step log holds unscored or lower-bound KLs of candidates shorter than their step (a "
                         "run with scoring='fast'): re-thresholding needs refine_pairs(..., scoring='full')")
    by_id = {rid: g.sort_values("step") for rid, g in step_log.groupby("response_id", sort=False)}
    steps_mode = steps if steps is not None else getattr(cfg, "steps", "segments")
    refined = []
    for key, row in zip(keys_to_refine, rows):
        rid = _response_id(row)
        # window and token cap only decide the jobs' continuation and sampling limits, which the log already holds
        plan = _plan_response(tokenizer, key[0], key[1], window=1, max_step_tokens=1, cap_to_original=True,
                              response_id=rid, steps_mode=steps_mode)
        log = by_id.get(rid)
        n_log = 0 if log is None else len(log)
        if n_log != len(plan.records) or (n_log and (
                log["step"].tolist() != [r.step for r in plan.records]
                or log["orig_tokens"].tolist() != [r.orig_tokens for r in plan.records])):
            raise ValueError(f"response {rid}: the step log does not match its steps (another pairs table, "
                             "tokenizer or refinement run?)")
        chosen: dict[int, str] = {}
        for rec, (_, e) in zip(plan.records, log.iterrows() if n_log else []):
            rec.skipped, rec.n_sampled, rec.n_dropped = e["skipped"], int(e["n_sampled"]), int(e["n_dropped"])
            rec.cand_tokens = [int(x) for x in e["cand_tokens"]]
            rec.cand_texts = [str(x) for x in e["cand_texts"]]
            rec.kl = [float(x) for x in e["kl"]]
            rec.kl_bound = [bool(x) for x in e["kl_bound"]] if "kl_bound" in e else [False] * len(rec.kl)
            if rec.skipped:
                continue
            best = _accept(rec, cfg.epsilon)
            if best is not None:
                chosen[rec.step] = rec.cand_texts[best]
        grade_fn = grade_fn_factory(row) if grade_fn_factory is not None else None
        refined.append(_assemble(tokenizer, plan, chosen, grade_fn))
    return _tables(tokenizer, pairs, keys, keys_to_refine, rows, refined)


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


def grader_factory(samples: pd.DataFrame, kind: str = "toy") -> Callable[[pd.Series], Callable[[str], bool]]:
    """For refine_pairs: a factory giving, for a pair row, a function that says if a text still grades correct."""
    from ..task.grading import grade

    golds = samples.groupby("problem_id")["gold"].first().to_dict()

    def factory(row: pd.Series) -> Callable[[str], bool]:
        gold = golds[row["problem_id"]]
        return lambda text: grade([text], [gold], kind)[0] == "correct"

    return factory


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
