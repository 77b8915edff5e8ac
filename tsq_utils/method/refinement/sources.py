"""Candidate sources: K rewrites of each step, drawn by the sampling interface in bulk ("sampler"), decoded from the
response's own KV cache ("branch") or requested from a vLLM engine with prefix caching ("vllm")."""

from __future__ import annotations

from dataclasses import fields

import torch

from ...core.config import RefinementConfig, stage_seed
from ...model import compat
from ...model.generation import (Decoding, _cut_at_stop, _pick, _stop_checker, count_tokens, sample,
                                 vllm_finish_reason)
from ...task.format import STEP_STOP_STRINGS, clean_candidate
from .plan import StepJob, StepPlan, _token_ids
from .scoring import _phase, _ResponseForward

# Step splitting and the think/answer format are the task layer's (task/format.py); a candidate stops where they do.
STOP_STRINGS = list(STEP_STOP_STRINGS)
# The profile's refinement.candidates choices (core/config.py is their one home)
CANDIDATE_SOURCES = next(f.metadata["choices"] for f in fields(RefinementConfig) if f.name == "candidates")


def _draw_candidates(model, tokenizer, plans: list[StepPlan], cfg: RefinementConfig, seed: int, batch_size: int,
                     progress: bool) -> None:
    """Draw cfg.n_candidates candidates for every job of the plans in one sampler call; fill the jobs and their
    records' counts."""
    n = cfg.n_candidates
    where = [(plan, i) for plan in plans for i in plan.jobs]
    if not where:
        return
    jobs = [plan.jobs[i] for plan, i in where]
    # One call runs to the largest limit among the steps; a step then drops the samples that reach its own
    # limit, which a call with that limit would have cut and reported as "length".
    spec = Decoding(n=n, temperature=cfg.temperature, max_new_tokens=max(j.max_new_tokens for j in jobs), seed=seed,
                    stop=list(STOP_STRINGS), batch_size=batch_size)
    res = sample(model, tokenizer, [plan.prefix_text(i) for plan, i in where], spec, progress=progress)
    if len(res.texts) != len(jobs):
        raise ValueError(f"the sampler returned {len(res.texts)} rows of samples for {len(jobs)} prefixes")
    for job, texts, n_toks, reasons in zip(jobs, res.texts, res.n_tokens, res.finish_reasons):
        _fill_job(job, texts, n_toks, reasons, n)


def _fill_job(job: StepJob, texts: list[str], n_toks: list[int], reasons: list[str], n: int) -> None:
    """Keep a step's distinct cleaned samples as its candidates; drop empty ones and ones that hit its limit."""
    kept, dropped = [], 0
    for text, n_tok, reason in zip(texts, n_toks, reasons):
        cand = clean_candidate(text)
        if reason == "length" or n_tok >= job.max_new_tokens or not cand:
            dropped += 1
        elif cand not in kept:
            kept.append(cand)
    job.cands, job.rec.n_sampled, job.rec.n_dropped = kept, n, dropped


@torch.no_grad()
def _branch_candidates(model, tokenizer, plan: StepPlan, fwd: _ResponseForward, cfg: RefinementConfig,
                       seed: int) -> None:
    """Draw cfg.n_candidates candidates for every job of one response by decoding from the original's KV cache at the
    step's prefix (the prefix is never recomputed: the CPU counterpart of vLLM's prefix caching). Each step has its
    own random stream, seeded from seed, the response id and the step, so a response's candidates do not depend on
    which other responses are refined with it (shards and resumed runs repeat them exactly)."""
    n, temperature = cfg.n_candidates, cfg.temperature
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


def _vllm_candidates(llm, tokenizer, plans: list[StepPlan], cfg: RefinementConfig, seed: int) -> None:
    """Draw cfg.n_candidates candidates for every job of the plans with vLLMin one generate call: one request per
    step (n samples), prompts as token ids so that vLLM's automatic prefix caching shares the step prefixes of a
    response (they are prefixes of one sequence), stopping at a blank line or '</think>', max_tokens at the step's
    own cap (just above its length: a longer candidate can never be kept), and a seed per (response, step) so a
    step's candidates do not depend on the other requests of the call."""
    n, temperature = cfg.n_candidates, cfg.temperature
    try:
        # vLLM is the optional GPU extra: imported only when candidates='vllm' asks for it
        from vllm import SamplingParams
    except ImportError as e:
        raise ImportError("candidates='vllm' needs the GPU extra: pip install -e .[gpu] (on a CPU use "
                          "candidates='sampler' or 'branch')") from e
    where = [(plan, i) for plan in plans for i in plan.jobs]
    if not where:
        return
    if cfg.steps == "spans":  # the model's own ids of the prefix: slices of the whole response's tokenization
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
