"""The ablation cache's keys: what decides each stage of a row (its payload), hashed with the code the rows run.

    pairs    samples table (bytes), the selection parameters the variant reads, the selection seed
    scored   pairs key, base model, every refinement parameter except ε, its seed: each step's candidates and
             their windowed KLs (the expensive half of refinement, run once at ε = ∞ without grading)
    refined  scored key, ε (∞ for the no-KL rewrite), the grader: the candidates kept under ε, reassembled and
             regraded (refinement.rethreshold, exact: candidates are drawn and scored before ε is looked at)
    model    pairs or refined key, base model, the training parameters the objective reads, training seed,
             max_steps, device
    results  model key (or the base model), the evaluation problems (content), n, temperature, top_p,
             max_new_tokens, seed, sampling batch size and backend, device

Parameters a stage does not read (α for Shortest, λ when η = 0, the evaluation budget, which only enters the
metrics) do not change keys; which selection knobs a variant reads is declared once, in its entry of
selection.REGISTRY (variant_params). Every key also covers the code: cache_key hashes the payload together with
the fingerprint of the code the rows run (package_hash: the normalized code of the ablations package and every
module it imports), so after an edit to that code nothing computed by the old code is reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

import numpy as np
import pandas as pd

from ..core import fingerprint
from ..core.config import Profile, RefinementConfig, SelectionConfig, TrainingConfig, stage_seed
from ..method import refinement, selection
from .context import AblationContext
from .rows import Row


def package_hash() -> str:
    """The code every key covers: the normalized code of the modules the rows run through (the tsq_utils.ablations
    package and what it imports, transitively: selection, refinement, training, evaluation, the model and the task),
    taken once per session. A comment, a docstring, or an edit to a module the rows never run (a lesson's figure,
    TLDR) re-keys nothing."""
    return fingerprint.code_of("tsq_utils.ablations")


def canon(value: Any) -> Any:
    """A JSON-stable form: numbers as floats (so 0 and 0.0 agree), infinities as strings, tuples as lists."""
    if isinstance(value, dict):
        return {str(k): canon(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canon(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float, np.integer, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "nan"
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else v
    raise TypeError(f"cannot put a {type(value).__name__} into a cache key: {value!r}")


def cache_key(payload: dict) -> str:
    """The cache key of a payload: the first 20 hex digits of the SHA-256 of its canonical JSON and of the code
    fingerprint (package_hash: after an edit to the code the rows run no entry computed by the old code is reused)."""
    text = json.dumps(canon({"code": package_hash(), "payload": payload}), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def selection_params(sel: SelectionConfig) -> dict:
    """The selection parameters that the variant reads, as its registry entry declares them (selection.REGISTRY;
    q_dyn with α = 0 is Shortest: q = 0 gives k = 1)."""
    return selection.variant_params(sel)


def refinement_params(ref: RefinementConfig) -> dict:
    """Every refinement parameter (refinement on), with the sampler's default batch size when the config has none."""
    d = dataclasses.asdict(ref)
    d.pop("enabled")
    if "sample_batch_size" not in d:
        # refine_pairs falls back to the module default: the rows per generate call decide the candidates
        d["sample_batch_size"] = getattr(refinement, "SAMPLE_BATCH_SIZE", None)
    return d


def refinement_payloads(pairs_key: str, base_hashes: dict, ref: RefinementConfig, seed: int, grader: str,
                        shards: int = 1) -> tuple[dict, dict]:
    """The payloads of the scored entry (candidates and their KLs: every refinement parameter but ε, and the profile's
    shards, which group the responses and so seed their candidates) and of the refined entry (the scored entry, ε and
    the grader that decides reverts)."""
    params = refinement_params(ref)
    epsilon = params.pop("epsilon")
    scored = {"kind": "scored", "pairs": pairs_key, "base": base_hashes, "refinement": params, "seed": seed}
    if shards != 1:  # the default keeps the keys of runs made before shards existed
        scored["shards"] = shards
    return scored, {"kind": "refined", "scored": cache_key(scored), "epsilon": epsilon, "grader": grader}


def data_sha(table: pd.DataFrame) -> str:
    """SHA-256 of what training reads from a pairs table: its prompt, chosen and rejected texts, in order."""
    rows = table[["prompt", "chosen", "rejected"]].astype(str).values.tolist()
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def training_params(tr: TrainingConfig) -> dict:
    """The training parameters the objective reads: none of β, λ, s when η = 0 (SFT); no s when λ = 0."""
    d = dataclasses.asdict(tr)
    if d["eta"] == 0:
        for k in ("beta", "lam", "length_margin_sign"):
            d.pop(k)
    elif d["lam"] == 0:
        d.pop("length_margin_sign")
    return d


def train_seed(profile: Profile, replicate: int) -> int:
    """Training seed of a replicate: notebook 04's stage seed for 0, a derived one for the others."""
    return stage_seed(profile.seed, "training" if replicate == 0 else f"training-{replicate}")


def payloads(ctx: AblationContext, row: Row) -> dict[str, dict]:
    """The key payloads of a row's stages: pairs, scored and refined (rows with refinement), model and results."""
    if row.is_base:
        return {"results": {"kind": "results", "model": {"base": ctx.base_hashes}, "eval": ctx.eval_spec()}}
    out = {"pairs": {"kind": "pairs", "samples": ctx.samples_sha, "selection": selection_params(row.selection),
                     "seed": ctx.selection_seed}}
    data = cache_key(out["pairs"])
    if row.refine != "off":
        out["scored"], out["refined"] = refinement_payloads(data, ctx.base_hashes, row.refinement, ctx.refinement_seed,
                                                            ctx.grader, ctx.profile.shards)
        data = cache_key(out["refined"])
    training = training_params(row.training)
    if ctx.max_steps:
        training.pop("epochs")  # a fixed step count makes the epoch count irrelevant
    out["model"] = {"kind": "model", "data": data, "base": ctx.base_hashes, "training": training,
                    "seed": train_seed(ctx.profile, row.seed), "max_steps": ctx.max_steps, "device": ctx.device}
    out["results"] = {"kind": "results", "model": cache_key(out["model"]), "eval": ctx.eval_spec()}
    return out


def row_keys(ctx: AblationContext, row: Row) -> dict[str, str]:
    """The cache keys of a row's stages (pairs, scored, refined, model, results; only results for the base row)."""
    return {stage: cache_key(p) for stage, p in payloads(ctx, row).items()}
