"""Scoring and KL maths: the windowed KL between an original step and its candidates, with a shared prefix cache
("reference") or branching from one forward pass over the whole response ("full", "fast"), and the accept rule."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import fields
from typing import Sequence

import torch
import torch.nn.functional as F

from ...core.config import RefinementConfig
from ...model import compat
from .plan import StepPlan, StepRecord, _token_ids

_CHOICES = {f.name: f.metadata["choices"] for f in fields(RefinementConfig) if f.metadata.get("choices")}
# The profile's refinement.kl_reduction and refinement.scoring choices (core/config.py is their one home)
REDUCTIONS = _CHOICES["kl_reduction"]
SCORING_MODES = _CHOICES["scoring"]
# Elements of one float32 [rows, positions, vocab] slice of the KL computation (about 1 GiB).
_KL_SLICE_ELEMENTS = 2**28


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


def _score_step_cached(model, fwd: _ResponseForward, plan: StepPlan, i: int, cand_ids: list[list[int]],
                       cfg: RefinementConfig) -> tuple[list[float], list[bool]]:
    """Windowed KLs of candidate steps against step i from the response's forward pass.

Full (cfg.scoring "full"): every candidate over the whole window. Fast ("fast"): length groups shortest first,
    stopping after the first group with a pass, and within a group early rejection by partial sums in PRUNE_STAGES;
    unscored candidates get NaN, rejected ones the (reduced) partial sum, a lower bound, flagged True."""
    prefix_len, step_len, cont = len(plan.prefix_ids(i)), len(plan.body_ids[i]), plan.cont_ids(i, cfg.window)
    reduction, epsilon, batch_size = cfg.kl_reduction, cfg.epsilon, cfg.batch_size
    n_window = len(cont)
    # Cache all but the last prefix token (kept in every row, as kl_per_token does) so an empty step works too.
    n_cached = prefix_len - 1 if prefix_len >= 2 else 0
    head = fwd.ids[n_cached:prefix_len]
    orig_logp = fwd.orig_logp(prefix_len + step_len - 1, n_window)
    reduce = (lambda s: s / n_window) if reduction == "mean" else (lambda s: s)
    kls = [float("nan")] * len(cand_ids)
    bound = [False] * len(cand_ids)
    if cfg.scoring != "fast":
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


# --------------------------------------------------------------------------- one step


def _score_job(model, tokenizer, plan: StepPlan, i: int, cfg: RefinementConfig, cap_to_original: bool,
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
    if cfg.scoring == "reference":  # the original and every candidate recomputed from the step's prefix cache
        with _phase("kl_window"):
            kls = kl_window(model, plan.prefix_ids(i), plan.body_ids[i], [cand_ids[j] for j in to_score],
                            plan.cont_ids(i, cfg.window), reduction=cfg.kl_reduction,
                            batch_size=cfg.batch_size).tolist()
        bounds = [False] * len(to_score)
    else:
        # Distinct candidate texts can share ids: each id sequence is scored once.
        uniq = list(dict.fromkeys(tuple(cand_ids[j]) for j in to_score))
        u_kls, u_bounds = _score_step_cached(model, fwd, plan, i, [list(u) for u in uniq], cfg)
        at = {u: k for k, u in enumerate(uniq)}
        kls = [u_kls[at[tuple(cand_ids[j])]] for j in to_score]
        bounds = [u_bounds[at[tuple(cand_ids[j])]] for j in to_score]
    for j, v, b in zip(to_score, kls, bounds):
        rec.kl[j], rec.kl_bound[j] = v, b
    best = accept(rec, cfg.epsilon)
    return None if best is None else job.cands[best]


def accept(rec: StepRecord, epsilon: float) -> int | None:
    """Index of the shortest scored candidate shorter than the step with KL < epsilon (ties: lower KL, then
    order); sets the record's accepted, new_tokens and kl_chosen. An unscored candidate's KL is NaN: never kept."""
    ok = [j for j, (n, kl) in enumerate(zip(rec.cand_tokens, rec.kl)) if n < rec.orig_tokens and kl < epsilon]
    rec.accepted, rec.new_tokens, rec.kl_chosen = False, rec.orig_tokens, float("nan")
    if not ok:
        return None
    best = min(ok, key=lambda j: (rec.cand_tokens[j], rec.kl[j], j))
    rec.accepted, rec.new_tokens, rec.kl_chosen = True, rec.cand_tokens[best], rec.kl[best]
    return best
