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
- Resumable and sharded: with ``options.shard_dir`` each finished group of responses is written as it completes and
  a rerun reads it back; ``options.shard=(i, n)`` computes only every n-th group (one process per GPU).

The rooms: plan.py (step plans and reassembly), sources.py (candidate sources), scoring.py (scoring and KL maths),
shards.py (groups and resumable shards), step_log.py (the step log, the refined pairs table, summaries) and
refine.py (the run: refine_pairs, refine_response, rethreshold). Settings come as the profile's RefinementConfig;
how a run is carried out (batching, processes, shards, a vLLM engine) as RefineOptions.
"""

# Step splitting and the think/answer format are the task layer's (task/format.py); their names stay importable here.
from ...task.format import (STEP_SEP_RE, THINK_CLOSE, clean_candidate, count_steps, join_steps, split_steps,
                            step_bodies, step_parts)
from .plan import STEP_MODES, STOP_SLACK_TOKENS, RefineResult, StepPlan, StepRecord, plan_response, step_ids
from .refine import (PAIRS_REQUIRED, SAMPLE_BATCH_SIZE, RefineOptions, Response, grader_factory, refine_pairs,
                     refine_response, rethreshold)
from .scoring import PRUNE_STAGES, REDUCTIONS, SCORING_MODES, kl_per_token, kl_window
from .shards import MAX_STEPS_PER_CALL, StaleShardError
from .sources import CANDIDATE_SOURCES, STOP_STRINGS
from .step_log import STEP_LOG_COLUMNS, fully_scored, refinement_summary, step_table

__all__ = [
    "CANDIDATE_SOURCES", "MAX_STEPS_PER_CALL", "PAIRS_REQUIRED", "PRUNE_STAGES", "REDUCTIONS", "SAMPLE_BATCH_SIZE",
    "SCORING_MODES", "STEP_LOG_COLUMNS", "STEP_MODES", "STEP_SEP_RE", "STOP_SLACK_TOKENS", "STOP_STRINGS",
    "THINK_CLOSE", "RefineOptions", "RefineResult", "Response", "StaleShardError", "StepPlan", "StepRecord",
    "clean_candidate", "count_steps", "fully_scored", "grader_factory", "join_steps", "kl_per_token", "kl_window",
    "plan_response", "refine_pairs", "refine_response", "refinement_summary", "rethreshold", "split_steps",
    "step_bodies", "step_ids", "step_parts", "step_table",
]
